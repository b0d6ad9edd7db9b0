"""DoRA (``inject(..., dora=True)``) against the merged model, through every rule of the table.

The reference is ``apply_fn`` on ``jlora.merge(params)``: ``m ⊙ (W0 + s·A·B) / ‖W0 + s·A·B‖``
materialised (an independent computation), with the norm a constant for gradients as in DoRA
§4.3 (and PEFT). PEFT itself is the reference in tests/test_peft_family.py.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import jlora
from helpers import randomize
from jlora._dora import weight_norm
from jlora._node import Layout
from test_rules import ROWS

K = jax.random.key


def _f32(y):
    return np.asarray(y, np.float32)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_dora_rule_matches_the_merged_model(name):
    params, fn, x = ROWS[name]
    lp, apply = jlora.inject(params, fn, rank=2, targets=["w"], example_args=(x,), dora=True)
    node = lp["w"]
    assert node.m is not None and node.m.shape == node.layout.m_shape(node.shape)
    np.testing.assert_allclose(_f32(apply(lp, x)), _f32(fn(params, x)), rtol=1e-5, atol=1e-5)  # starts as the base
    lp = randomize(lp, scale=0.4)
    tol = 2e-2 if name == "convert_element_type" else 1e-5
    np.testing.assert_allclose(_f32(jax.jit(apply)(lp, x)), _f32(fn(jlora.merge(lp), x)), rtol=tol, atol=tol)
    adapters, base = jlora.split(lp)
    assert adapters["w"].m is not None
    loss_u = lambda ad: jnp.sum(jnp.sin(apply(jlora.combine(ad, base), x).astype(jnp.float32)))  # noqa: E731
    loss_m = lambda ad: jnp.sum(jnp.sin(fn(jlora.merge(jlora.combine(ad, base)), x).astype(jnp.float32)))  # noqa: E731
    if name == "while":  # no reverse mode through lax.while_loop: a directional derivative
        t = jax.tree.map(lambda a: jax.random.normal(K(3), a.shape, a.dtype), adapters)
        gu, gm = jax.jvp(loss_u, (adapters,), (t,))[1], jax.jvp(loss_m, (adapters,), (t,))[1]
    else:
        gu, gm = jax.grad(loss_u)(adapters), jax.grad(loss_m)(adapters)
        assert np.any(_f32(gu["w"].m))  # the magnitude is trained
    for a, b in zip(jax.tree.leaves(gu), jax.tree.leaves(gm)):
        np.testing.assert_allclose(_f32(a), _f32(b), rtol=5 * tol, atol=5 * tol)


@pytest.mark.parametrize("layout, shape", [
    (Layout((), (0,), (1,)), (7, 5)),
    (Layout((), (1,), (0,)), (5, 7)),  # stored (out, in)
    (Layout((0,), (2,), (1, 3)), (3, 2, 6, 4)),  # stacked, two output axes
    (Layout((), (0, 2), (1,)), (3, 4, 5)),  # two input axes
])
def test_weight_norm_is_the_norm_over_the_input_axes(layout, shape):
    w = jax.random.normal(K(0), shape)
    a = jax.random.normal(K(1), layout.a_shape(shape, 3))
    b = jax.random.normal(K(2), layout.b_shape(shape, 3))
    from jlora._value import delta

    full = w + 0.7 * delta(a, b, layout)
    want = jnp.sqrt(jnp.sum(full ** 2, axis=layout.in_))  # kernel order of the remaining axes
    kept = [ax for ax in range(len(shape)) if ax not in layout.in_]
    want = jnp.transpose(want, [kept.index(ax) for ax in list(layout.stack) + list(layout.out)])
    np.testing.assert_allclose(weight_norm(w, a, b, 0.7, layout), want, rtol=1e-5)


def test_dora_on_a_kernel_used_transposed():
    """A tied kernel used as x·W and h·Wᵀ: the transposed use scales its contracted (output) axis."""
    p = {"w": jax.random.normal(K(0), (6, 4)) / 2}
    f = lambda p, x: jnp.tanh(x @ p["w"]) @ p["w"].T  # noqa: E731
    x = jax.random.normal(K(1), (3, 6))
    lp, apply = jlora.inject(p, f, rank=2, example_args=(x,), dora=True)
    lp = randomize(lp, scale=0.4)
    np.testing.assert_allclose(apply(lp, x), f(jlora.merge(lp), x), rtol=1e-5, atol=1e-5)
    g1 = jax.grad(lambda lp: jnp.sum(apply(lp, x) ** 2))(lp)
    g2 = jax.grad(lambda lp: jnp.sum(f(jlora.merge(lp), x) ** 2))(lp)
    for n in ("a", "b", "m"):
        np.testing.assert_allclose(getattr(g1["w"], n), getattr(g2["w"], n), rtol=1e-4, atol=1e-5)


def test_dora_on_a_tied_embedding():
    """A table read by gather (rows = output units of the head x·Eᵀ) and used as the head: each
    gathered row is scaled by its own magnitude."""
    p = {"embed": jax.random.normal(K(0), (10, 4)), "w": jax.random.normal(K(1), (4, 4)) / 2}
    f = lambda p, t: jnp.tanh(p["embed"][t] @ p["w"]) @ p["embed"].T  # noqa: E731
    t = jnp.array([[1, 2, 9], [0, 3, 3]])
    lp, apply = jlora.inject(p, f, rank=2, targets=["embed", "w"], example_args=(t,), dora=True)
    assert lp["embed"].layout == Layout((), (1,), (0,)) and lp["embed"].m.shape == (10,)
    lp = randomize(lp, scale=0.4)
    np.testing.assert_allclose(apply(lp, t), f(jlora.merge(lp), t), rtol=1e-5, atol=1e-5)


def test_dora_scanned_qlora_base_is_dequantized_per_layer():
    w = jax.random.normal(K(0), (3, 64, 64)) / 8
    p = {"w": jlora.NF4Tensor.from_array(w)}
    f = lambda p, x: lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]  # noqa: E731
    x = jax.random.normal(K(1), (2, 64))
    lp, apply = jlora.inject(p, f, rank=4, example_args=(x,), dora=True)
    lp = randomize(lp, scale=0.1)
    np.testing.assert_allclose(apply(lp, x), f(jlora.merge(lp), x), rtol=1e-4, atol=1e-5)
    ad, base = jlora.split(lp)
    g = jax.grad(lambda ad: jnp.sum(apply(jlora.combine(ad, base), x)))(ad)
    assert g["w"].m.shape == (3, 64) and np.all(np.isfinite(g["w"].m))


def test_dora_dropout_has_peft_form():
    """With dropout on, DoRA computes x·W0 + (g − 1)·d·W0 + g·s·(d·A)·B with d = dropout(x), as
    PEFT's DoRA layer in training mode (the mask is the one apply draws: key fold_in(rng, 1))."""
    p = {"w": jax.random.normal(K(0), (6, 5))}
    f = lambda p, x: x @ p["w"]  # noqa: E731
    x = jax.random.normal(K(1), (4, 6))
    lp, apply = jlora.inject(p, f, rank=2, example_args=(x,), dora=True, dropout=0.5)
    lp = randomize(lp, scale=0.4)
    k = lp["w"]
    out = apply(lp, x, lora_rng=K(7))
    keep = jax.random.bernoulli(jax.random.fold_in(K(7), 1), 0.5, x.shape)
    d = jnp.where(keep, x / 0.5, 0.0)
    g = k.m / jnp.linalg.norm(k.w0 + k.scale * k.a @ k.b, axis=0)  # the materialised kernel's column norms
    want = x @ k.w0 + (g - 1) * (d @ k.w0) + g * (k.scale * (d @ k.a) @ k.b)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(apply(lp, x), g * (x @ k.w0 + k.scale * ((x @ k.a) @ k.b)), rtol=1e-5, atol=1e-5)


def _dot_output_shapes(jaxpr, acc):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            acc.append(tuple(eqn.outvars[0].aval.shape))
        for v in eqn.params.values():
            for j in (v if isinstance(v, (tuple, list)) else [v]):
                inner = getattr(j, "jaxpr", j)
                if hasattr(inner, "eqns"):
                    _dot_output_shapes(inner, acc)
    return acc


def test_no_kernel_sized_array_in_the_dora_training_step():
    """DoRA's norm comes from ‖W0‖², Aᵀ·W0 and AᵀA: no matmul produces a kernel-sized array and, in
    the compiled step, no kernel-sized array is computed at all (W0 itself is only read)."""
    p = {"l1": {"kernel": jax.random.normal(K(30), (24, 40)) / 5, "bias": jnp.zeros(40)},
         "l2": {"kernel": jax.random.normal(K(31), (40, 17)) / 6}}
    x, y = jax.random.normal(K(32), (5, 24)), jax.random.normal(K(33), (5, 17))
    mlp = lambda p, x: jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"]) @ p["l2"]["kernel"]  # noqa: E731
    lp, apply = jlora.inject(p, mlp, rank=3, dora=True)
    ad, base = jlora.split(lp)
    full_loss = lambda ad, base: jnp.mean((apply(jlora.combine(ad, base), x) - y) ** 2)  # noqa: E731
    loss = lambda ad: full_loss(ad, base)  # noqa: E731
    tx = jlora.optimizer(optax.sgd(1e-2), ad)

    def step(ad, st, base):  # the base an argument, as in training (a closed-over one is folded away)
        g = jax.grad(full_loss)(ad, base)
        u, st = tx.update(g, st, ad)
        return optax.apply_updates(ad, u), st

    shapes = set(_dot_output_shapes(jax.make_jaxpr(step)(ad, tx.init(ad), base).jaxpr, []))
    assert shapes
    kernel_shapes = [(24, 40), (40, 24), (40, 17), (17, 40)]
    assert not set(kernel_shapes) & shapes, shapes
    hlo = jax.jit(step).lower(ad, tx.init(ad), base).compile().as_text()
    # Every kernel-sized value a computation writes is W0 itself (a parameter) or computed from W0 alone:
    # never from A or B (no W0 + s·A·B). Inside a fusion's body nothing is written to memory. (W0 alone
    # does produce one: on the CPU, XLA writes W0² transposed for the weight norm of a kernel reduced
    # over its major axis; the norm is recomputed every step, a known cost.)
    bodies, name = {}, None
    for line in hlo.splitlines():
        if line and not line[0].isspace() and "{" in line:  # a computation's header
            name = line.split()[0].lstrip("%") if not line.startswith("ENTRY") else "ENTRY"
            bodies[name] = []
        elif name and "=" in line:
            m = re.match(r"\s*(?:ROOT )?%\S+ = (\([^=]*?\)|\S+) ([\w\-]+)\((.*)", line)
            if m:
                bodies[name].append((m.group(1), m.group(2), m.group(3), line.strip()))
    checked = 0
    for comp, instrs in bodies.items():
        if comp.startswith(("fused", "wrapped")) or "_computation" in comp:
            continue
        for result, op, args, line in instrs:  # tuple results (multi-output fusions) included
            if not any(f"[{a},{b}]" in result for a, b in kernel_shapes):
                continue
            checked += 1
            if op in ("parameter", "constant", "get-tuple-element"):
                continue
            operands = re.findall(r"%[\w.\-]+", args.split(")", 1)[0])
            assert operands and all(o.startswith("%base") for o in operands), line
    assert checked
    # trained: the loss goes down, m moves
    st = tx.init(ad)
    l0 = loss(ad)
    for _ in range(20):
        ad, st = jax.jit(step)(ad, st, base)
    assert loss(ad) < l0 and not np.allclose(ad["l1"]["kernel"].m, lp["l1"]["kernel"].m)



def test_dora_refuses_a_kernel_with_a_zero_output_unit():
    """DoRA divides by each output unit's norm: a zero-initialised unit would turn its outputs,
    the merged kernel and every gradient into NaN, so inject names the kernel instead."""
    w = np.ones((6, 5), np.float32)
    w[:, 2] = 0.0
    f = lambda p, x: x @ p["w"]  # noqa: E731
    with pytest.raises(ValueError, match=r"'w' by its weight norm, and 1 of its units \(flat indices \[2\]\)"):
        jlora.inject({"w": jnp.asarray(w)}, f, rank=2, dora=True)
    jlora.inject({"w": jnp.asarray(w)}, f, rank=2)  # plain LoRA is fine

def test_dora_split_labels_optimizer_merge():
    p = {"w": jax.random.normal(K(0), (6, 5))}
    f = lambda p, x: x @ p["w"]  # noqa: E731
    lp, _ = jlora.inject(p, f, rank=2, dora=True)
    lab = jlora.labels(lp)
    assert (lab["w"].a, lab["w"].b, lab["w"].m, lab["w"].w0) == ("lora", "lora", "lora", "frozen")
    st = jlora.optimizer(optax.adam(1e-3), lp).init(lp)
    assert any(np.shape(leaf) == (5,) for leaf in jax.tree.leaves(st))  # m has optimizer state
    # merge at init is the base; after changing m it scales the output columns
    np.testing.assert_allclose(jlora.merge(lp)["w"], p["w"], rtol=1e-6, atol=1e-6)
    k = lp["w"].replace(m=lp["w"].m * 2)
    np.testing.assert_allclose(jlora.merge({"w": k})["w"], 2 * p["w"], rtol=1e-5, atol=1e-6)
    assert "m=float32[5]" in repr(k)


def test_dora_checkpoint_round_trip(tmp_path):
    p = {"w": jax.random.normal(K(0), (6, 5)), "v": jax.random.normal(K(1), (5, 3))}
    f = lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"]  # noqa: E731
    x = jax.random.normal(K(2), (2, 6))
    lp, apply = jlora.inject(p, f, rank=2, dora=True, example_args=(x,), rslora=True)
    lp = randomize(lp)
    jlora.save_adapters(tmp_path / "c", lp)
    back = jlora.load_adapters(tmp_path / "c", p)
    assert back["w"].rslora and back["w"].m is not None
    np.testing.assert_array_equal(back["w"].m, lp["w"].m)
    np.testing.assert_allclose(apply(back, x), apply(lp, x), rtol=1e-6)
    import json

    cfg = json.loads((tmp_path / "c" / "config" / "jlora_config.json").read_text())
    assert cfg["format_version"] == 2 and sorted(cfg["adapters"]["w"]["sha256"]) == ["a", "b", "m"]
    # the adapters tree saves too
    jlora.save_adapters(tmp_path / "d", jlora.split(lp)[0])
    np.testing.assert_allclose(apply(jlora.load_adapters(tmp_path / "d", p), x), apply(lp, x), rtol=1e-6)
