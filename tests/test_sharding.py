"""Sharded adapters on 8 simulated CPU devices (conftest forces them), with JAX's own SPMD.

A and B inherit the base kernel's sharding (A on its stack/input axes, B on its stack/output axes,
rank replicated). The training step — ``inject``, ``apply``, ``split``/``combine``, ``merge``,
``labels``/``optimizer`` all inside one ``jax.jit`` — runs on FSDP, tensor-parallel and 2-D meshes
and matches a single-device NumPy reference (hand-written W0 + s·A·B and its hand-written
backward), and its optimized HLO gathers no frozen kernel that the base model's own
forward + input-gradient step does not gather.

Kept small: few, tiny compiles (the file runs on two loaded cores).
"""

from __future__ import annotations

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

import jlora
from jlora import Layout, LoraKernel
from jlora._sharding import adapter_shardings, adapter_specs, factor_specs, shard_adapters
from jlora._value import Role, Tag
from helpers import collectives, randomize

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

AUTO = getattr(getattr(jax.sharding, "AxisType", None), "Auto", None)
# LLVM's optimization level only (XLA's HLO passes, SPMD partitioning included, run as usual):
# the compiled HLO that the tests read is the same, and tiny programs compile several times faster.
FAST = {"xla_backend_optimization_level": 0}
LR = 0.5
RANK = 4


def mesh(shape, names):
    kw = {} if AUTO is None else {"axis_types": (AUTO,) * len(names)}
    return jax.make_mesh(shape, names, **kw)


def put(x, m, spec):
    return jax.device_put(np.asarray(x, np.float32), NamedSharding(m, spec))


def specs_of(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def randomize_factors(lp, seed):
    """Nonzero A and B (B starts at zero), put back where inject placed them (next to W0)."""
    return shard_adapters(randomize(lp, jax.random.key(seed), scale=0.3))


# -- HLO: which collectives move frozen-kernel-sized data ----------------------------------------------

def big(ops, threshold):
    return collections.Counter(x for x in ops if x[1] >= threshold)


def check_no_extra_kernel_collectives(lora_hlo, base_hlo, threshold, what):
    lo, ba = collectives(lora_hlo), collectives(base_hlo)
    for op in ("all-gather", "all-reduce", "reduce-scatter", "all-to-all"):
        extra = big(lo[op], threshold) - big(ba[op], threshold)
        assert not extra, (
            f"{what}: the LoRA step has {op}s of frozen-kernel size (dtype, elements) {dict(extra)} that the "
            f"base step does not (LoRA: {sorted(lo[op])}, base: {sorted(ba[op])})"
        )
    return lo, ba


# -- unit: the spec rule --------------------------------------------------------------------------------


def test_adapter_specs_follow_the_kernel():
    two = Layout(stack=(), in_=(0,), out=(1,))
    assert adapter_specs(P("fsdp", None), two) == (P("fsdp", None), P(None, None))  # FSDP rows
    assert adapter_specs(P(None, "tp"), two) == (P(None, None), P(None, "tp"))  # column-parallel
    assert adapter_specs(P("tp"), two) == (P("tp", None), P(None, None))  # row-parallel, short spec
    assert adapter_specs(P(("data", "model"), None), two) == (P(("data", "model"), None), P(None, None))
    stacked = Layout(stack=(0,), in_=(1,), out=(2,))
    assert adapter_specs(P("layers", "fsdp", "tp"), stacked) == (P("layers", "fsdp", None), P("layers", None, "tp"))
    # (out, in) storage and multi-axis kernels: A and B take the axes by role, not by position
    assert adapter_specs(P("tp", "fsdp"), Layout((), (1,), (0,))) == (P("fsdp", None), P(None, "tp"))
    heads = Layout(stack=(), in_=(0,), out=(1, 2))  # (D, N, H) query kernel, heads over 'tp'
    assert adapter_specs(P("fsdp", "tp", None), heads) == (P("fsdp", None), P(None, "tp", None))
    # a view seen by apply's interpreter: (out, in) after a transpose, plus an inserted unit axis
    view = [Tag(Role.OUT), Tag(Role.UNIT), Tag(Role.IN)]
    assert factor_specs(P("tp", None, "fsdp"), view, a_ndim=2, b_ndim=2) == (
        P("fsdp", None), P(None, "tp"))
    with pytest.raises(ValueError, match="more entries"):
        adapter_specs(P("a", "b", "c"), two)


def test_adapter_shardings_named_single_and_other():
    m = mesh((2, 4), ("data", "model"))
    sa, sb = adapter_shardings(NamedSharding(m, P("data", "model")), Layout((), (0,), (1,)), 2)
    assert (sa.mesh, sa.spec, sb.spec) == (m, P("data", None), P(None, "model"))
    dev = jax.devices()[3]
    single = jax.sharding.SingleDeviceSharding(dev)
    assert adapter_shardings(single, Layout((), (0,), (1,))) == (single, single)
    gspmd = getattr(jax.sharding, "GSPMDSharding", None)
    if gspmd is not None:  # a sharding without axis names: A and B replicated on the same devices
        s = gspmd(tuple(m.devices.flat), NamedSharding(m, P("data", "model"))._to_xla_hlo_sharding(2))
        ra, rb = adapter_shardings(s, Layout((), (0,), (1,)))
        assert ra.is_fully_replicated and ra.device_set == s.device_set and rb == ra
    with pytest.raises(ValueError, match="axes"):
        adapter_shardings(single, Layout((), (0,), (1,)), 3)


# -- a small MLP: FSDP and a 2-D (data, model) mesh ----------------------------------------------------

D_IN, D_H, D_OUT, BATCH = 64, 64, 32, 16  # A of l1 and l2: one shape, one compile


def mlp(p, x):
    return jnp.tanh(x @ p["l1"]["kernel"]) @ p["l2"]["kernel"]


def mlp_numpy_step(lp, x):
    """Loss, forward output and the SGD-updated (A, B) of both layers, in float64 NumPy."""
    f = lambda v: np.asarray(v, np.float64)
    n1, n2 = lp["l1"]["kernel"], lp["l2"]["kernel"]
    w1 = f(n1.w0) + n1.scale * f(n1.a) @ f(n1.b)
    w2 = f(n2.w0) + n2.scale * f(n2.a) @ f(n2.b)
    x = f(x)
    h = np.tanh(x @ w1)
    y = h @ w2
    loss = np.mean(y**2)
    dy = 2 * y / y.size
    dw2 = h.T @ dy
    dw1 = x.T @ ((dy @ w2.T) * (1 - h**2))
    new = {}
    for name, n, dw in (("l1", n1, dw1), ("l2", n2, dw2)):
        a, b = f(n.a), f(n.b)
        new[name] = (a - LR * n.scale * dw @ b.T, b - LR * n.scale * a.T @ dw)
    return loss, y, new


def make_step(apply, model, tx):
    def step(lp, st, x):
        def loss_fn(lp):
            ad, base = jlora.split(lp)  # split/combine inside jit, on sharded leaves
            y = apply(jlora.combine(ad, base), x)
            return jnp.mean(y**2), y

        (loss, y), g = jax.value_and_grad(loss_fn, has_aux=True)(lp)  # whole tree: W0 gets no gradient
        upd, st = tx.update(g, st, lp)  # labels/optimizer: only A and B move
        lp = optax.apply_updates(lp, upd)
        return lp, st, loss, y, jlora.merge(lp)

    step.__name__ = "lora_step"

    return step


def floor_step(model):
    """The base model's forward + input-gradient backward: what any LoRA step must at least do."""

    def step(p, x):
        return jax.value_and_grad(lambda x: jnp.mean(model(p, x) ** 2))(x)

    return step


MLP_CASES = {
    # FSDP: kernel rows (the contracted axis) over 'fsdp', the batch over 'fsdp' too
    "fsdp": (((8,), ("fsdp",)), {"l1": P("fsdp", None), "l2": P("fsdp", None)}, P("fsdp", None),
             {"l1": (P("fsdp", None), P(None, None)), "l2": (P("fsdp", None), P(None, None))}),
    # 2-D: batch over 'data'; l1 column-parallel, l2 row-parallel over 'model'
    "2d": (((2, 4), ("data", "model")), {"l1": P(None, "model"), "l2": P("model", None)}, P("data", None),
           {"l1": (P(None, None), P(None, "model")), "l2": (P("model", None), P(None, None))}),
}


@pytest.mark.parametrize("case", sorted(MLP_CASES))
def test_mlp_training_step_sharded(case):
    (shape, names), kspecs, xspec, want = MLP_CASES[case]
    m = mesh(shape, names)
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((D_IN, D_H)) / 8
    w2 = rng.standard_normal((D_H, D_OUT)) / 11
    x_np = rng.standard_normal((BATCH, D_IN))
    params = {"l1": {"kernel": put(w1, m, kspecs["l1"])}, "l2": {"kernel": put(w2, m, kspecs["l2"])}}
    x = put(x_np, m, xspec)

    lp, apply = jlora.inject(params, mlp, rank=RANK, alpha=8.0, example_args=(x,))
    for name, (sa, sb) in want.items():
        node = lp[name]["kernel"]
        assert node.w0 is params[name]["kernel"], "inject copied the base kernel"
        assert (node.a.sharding.spec, node.b.sharding.spec) == (sa, sb), name
        assert node.a.sharding.mesh == m and node.b.sharding.mesh == m
        # every device holds only its own slice of A (nothing gathered on one device)
        assert {s.data.shape for s in node.a.addressable_shards} == {node.a.sharding.shard_shape(node.a.shape)}

    lp = randomize_factors(lp, 1)
    tx = jlora.optimizer(optax.sgd(LR), lp)
    st = tx.init(lp)
    # a training step keeps its state where it is (out_shardings); the HLO checks below are of that step
    step = jax.jit(make_step(apply, mlp, tx), out_shardings=(specs_of(lp), specs_of(st), None, None, specs_of(params)))
    compiled = step.lower(lp, st, x).compile(FAST)
    new, _, loss, y, merged = compiled(lp, st, x)

    ref_loss, ref_y, ref_new = mlp_numpy_step(lp, x_np)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(y), ref_y, rtol=1e-4, atol=1e-4)
    for name, (a, b) in ref_new.items():
        node = new[name]["kernel"]
        np.testing.assert_allclose(np.asarray(node.a), a, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(node.b), b, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(node.w0), np.asarray(params[name]["kernel"]))
        w0 = np.asarray(params[name]["kernel"], np.float64)
        np.testing.assert_allclose(np.asarray(merged[name]["kernel"]), w0 + node.scale * a @ b, rtol=1e-4, atol=1e-4)

    base_hlo = jax.jit(floor_step(mlp)).lower(params, x).compile(FAST).as_text()
    lo, ba = check_no_extra_kernel_collectives(compiled.as_text(), base_hlo, min(w1.size, w2.size), case)
    if case == "fsdp":  # the base gathers its FSDP kernels; the LoRA step gathers them no more often
        assert big(lo["all-gather"], w2.size) == big(ba["all-gather"], w2.size) == collections.Counter(
            {("f32", w1.size): 1, ("f32", w2.size): 1})
    else:  # column- then row-parallel: no kernel is gathered at all
        assert not big(lo["all-gather"], w2.size) and not big(ba["all-gather"], w2.size)


def mlp_explicit(p, x):
    """The MLP written for explicit sharding (mesh axes in the types): l1 is stored FSDP over 'data'
    and column-parallel over 'model', gathered over 'data' before use; l2 is row-parallel."""
    w1 = jax.sharding.reshard(p["l1"]["kernel"], P(None, "model"))
    h = jnp.tanh(x @ w1)
    return jnp.einsum("bh,ho->bo", h, p["l2"]["kernel"], out_sharding=P("data", None))


@pytest.mark.skipif(not hasattr(jax.sharding, "reshard"), reason="explicit sharding needs a newer JAX")
def test_mlp_training_step_explicit_sharding():
    m = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    rng = np.random.default_rng(7)
    w1, w2 = rng.standard_normal((D_IN, D_H)) / 8, rng.standard_normal((D_H, D_OUT)) / 11
    x_np = rng.standard_normal((BATCH, D_IN))
    params = {"l1": {"kernel": put(w1, m, P("data", "model"))}, "l2": {"kernel": put(w2, m, P("model", None))}}
    x = put(x_np, m, P("data", None))
    with (getattr(jax, "set_mesh", None) or jax.sharding.use_mesh)(m):
        lp, apply = jlora.inject(params, mlp_explicit, rank=RANK, alpha=8.0, example_args=(x,))
        assert lp["l1"]["kernel"].a.sharding.spec == P("data", None)
        assert lp["l1"]["kernel"].b.sharding.spec == P(None, "model")
        assert lp["l2"]["kernel"].a.sharding.spec == P("model", None)
        lp = randomize_factors(lp, 8)
        tx = jlora.optimizer(optax.sgd(LR), lp)
        st = tx.init(lp)
        new, _, loss, y, merged = jax.jit(make_step(apply, mlp_explicit, tx)).lower(lp, st, x).compile(FAST)(lp, st, x)
    ref_loss, ref_y, ref_new = mlp_numpy_step(lp, x_np)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(y), ref_y, rtol=1e-4, atol=1e-4)
    assert y.sharding.spec == P("data", None)
    for name, (a, b) in ref_new.items():
        np.testing.assert_allclose(np.asarray(new[name]["kernel"].a), a, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(new[name]["kernel"].b), b, rtol=1e-4, atol=1e-4)
    assert merged["l1"]["kernel"].sharding.spec == P("data", "model")  # merged in place, not gathered


# -- a scanned stack of attention layers: tensor parallel, and layer-axis sharding ----------------------

L, D, HEADS, B, T = 2, 32, 8, 2, 4


def attn_stack(p, x):
    """Pre-norm-free multi-head attention layers under ``lax.scan``; kernels stacked (L, in, out)."""

    def layer(h, w):
        split = lambda t: t.reshape(B, T, HEADS, D // HEADS)
        q, k, v = split(h @ w["q"]), split(h @ w["k"]), split(h @ w["v"])
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D // HEADS)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v).reshape(B, T, D)
        return h + o @ w["o"], None

    return lax.scan(layer, x, p["layers"])[0]


def attn_numpy(w, x):
    """The same model in float64 NumPy on dense (merged) weights ``w[name]`` of shape (L, in, out)."""
    h = np.asarray(x, np.float64)
    for l in range(L):
        split = lambda t: t.reshape(B, T, HEADS, D // HEADS)
        q, k, v = (split(h @ w[n][l]) for n in ("q", "k", "v"))
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D // HEADS)
        s = np.exp(s - s.max(-1, keepdims=True))
        o = np.einsum("bhqk,bkhd->bqhd", s / s.sum(-1, keepdims=True), v).reshape(B, T, D)
        h = h + o @ w["o"][l]
    return h


def attn_loss_numpy(w0, factors, scale, x):
    """The loss of the hand-written unmerged model (W0 + s·A·B per layer), float64 NumPy."""
    w = {n: w0[n] + scale * np.einsum("lir,lro->lio", *factors[n]) for n in w0}
    return np.mean(attn_numpy(w, x) ** 2)


# Tensor parallel over 'model' (q/k/v column-parallel: heads split; o row-parallel) and the stacked
# layer axis over 'data': A and B keep the layer axis on their stack axis.
SCAN_MESH = ((2, 4), ("data", "model"))
SCAN_SPECS = {"q": P("data", None, "model"), "k": P("data", None, "model"), "v": P("data", None, "model"),
              "o": P("data", "model", None)}
# A (L, in, r) takes the kernel's layer and input axes, B (L, r, out) its layer and output axes
SCAN_WANT = {n: (P("data", None, None), P("data", None, "model")) for n in ("q", "k", "v")}
SCAN_WANT["o"] = (P("data", "model", None), P("data", None, None))


def test_scanned_stack_tensor_parallel():
    m, kspecs, case = mesh(*SCAN_MESH), SCAN_SPECS, "scan"
    rng = np.random.default_rng(2)
    w_np = {n: rng.standard_normal((L, D, D)) / math.sqrt(D) for n in ("q", "k", "v", "o")}
    x_np = rng.standard_normal((B, T, D))
    params = {"layers": {n: put(w_np[n], m, kspecs[n]) for n in w_np}}
    x = put(x_np, m, P())

    lp, apply = jlora.inject(params, attn_stack, rank=RANK, example_args=(x,))
    for n in kspecs:
        node = lp["layers"][n]
        assert node.layout == Layout(stack=(0,), in_=(1,), out=(2,))
        assert (node.a.sharding.spec, node.b.sharding.spec) == SCAN_WANT[n], n

    lp = randomize_factors(lp, 3)
    tx = jlora.optimizer(optax.sgd(LR), lp)
    st = tx.init(lp)
    # a training step keeps its state where it is (out_shardings); the HLO checks below are of that step
    step = jax.jit(make_step(apply, attn_stack, tx),
                   out_shardings=(specs_of(lp), specs_of(st), None, None, specs_of(params)))
    compiled = step.lower(lp, st, x).compile(FAST)
    new, _, loss, y, merged = compiled(lp, st, x)

    dense = {n: w_np[n] + lp["layers"][n].scale * np.einsum(
        "lir,lro->lio", np.asarray(lp["layers"][n].a, np.float64), np.asarray(lp["layers"][n].b, np.float64))
        for n in w_np}
    np.testing.assert_allclose(np.asarray(y), attn_numpy(dense, x_np), rtol=1e-4, atol=1e-4)
    # the SGD step's gradient, (old - new) / LR, against central differences of the NumPy loss
    # along a random direction in each factor of each kernel
    scale = lp["layers"]["q"].scale
    factors = {n: (np.asarray(lp["layers"][n].a, np.float64), np.asarray(lp["layers"][n].b, np.float64))
               for n in w_np}
    np.testing.assert_allclose(float(loss), attn_loss_numpy(w_np, factors, scale, x_np), rtol=1e-5)
    eps = 1e-4
    for n in w_np:
        node, old = new["layers"][n], lp["layers"][n]
        for j, (f_new, f_old) in enumerate(((node.a, old.a), (node.b, old.b))):
            grad = (np.asarray(f_old, np.float64) - np.asarray(f_new, np.float64)) / LR
            d = rng.standard_normal(grad.shape)
            moved = lambda e: {k: tuple(v + e * d if (k, i) == (n, j) else v for i, v in enumerate(fs))
                               for k, fs in factors.items()}
            fd = (attn_loss_numpy(w_np, moved(eps), scale, x_np)
                  - attn_loss_numpy(w_np, moved(-eps), scale, x_np)) / (2 * eps)
            np.testing.assert_allclose(np.sum(grad * d), fd, rtol=1e-3, atol=1e-6, err_msg=f"{n} {'ab'[j]}")
        ab = np.einsum("lir,lro->lio", np.asarray(node.a, np.float64), np.asarray(node.b, np.float64))
        np.testing.assert_allclose(np.asarray(merged["layers"][n]), w_np[n] + node.scale * ab, rtol=1e-4, atol=1e-4)

    base_hlo = jax.jit(floor_step(attn_stack)).lower(params, x).compile(FAST).as_text()
    check_no_extra_kernel_collectives(compiled.as_text(), base_hlo, D * D, case)


def test_sharding_constraint_on_the_kernel_constrains_a_and_b():
    """A program that constrains its kernel (``with_sharding_constraint``) constrains A and B too."""
    m = mesh((2, 4), ("data", "model"))
    w = put(np.random.default_rng(4).standard_normal((16, 8)), m, P())

    def model(p, x):
        k = lax.with_sharding_constraint(p["w"], NamedSharding(m, P("data", "model")))
        return x @ k

    x = jnp.ones((4, 16))
    lp, apply = jlora.inject({"w": w}, model, rank=2, example_args=(x,))
    jaxpr = jax.make_jaxpr(apply)(lp, x)
    got = {tuple(e.invars[0].aval.shape): e.params["sharding"].spec
           for e in jaxpr.jaxpr.eqns if e.primitive.name == "sharding_constraint"}
    # the kernel (16, 8), A (16, 2) on the kernel's input axis, B (2, 8) on its output axis
    assert got == {(16, 8): P("data", "model"), (16, 2): P("data", None), (2, 8): P(None, "model")}


def test_inject_abstract_placement_independent_and_shard_adapters():
    """``jax.eval_shape(inject)`` gives the injected tree without allocating it; A's values do not
    depend on the placement; ``shard_adapters`` puts A and B back next to a resharded base."""
    p = {"l1": {"kernel": np.zeros((D_IN, D_H), np.float32)}, "l2": {"kernel": np.zeros((D_H, D_OUT), np.float32)}}
    x = np.zeros((BATCH, D_IN), np.float32)
    shapes = jax.eval_shape(lambda p: jlora.inject(p, mlp, rank=RANK, example_args=(x,))[0], p)
    assert shapes["l1"]["kernel"].a.shape == (D_IN, RANK) and shapes["l2"]["kernel"].b.shape == (RANK, D_OUT)

    lp, _ = jlora.inject(p, mlp, rank=RANK, example_args=(x,))
    fsdp = mesh((8,), ("fsdp",))
    sharded, _ = jlora.inject(jax.device_put(p, NamedSharding(fsdp, P("fsdp"))), mlp, rank=RANK, example_args=(x,))
    assert sharded["l1"]["kernel"].a.sharding.spec == P("fsdp", None)
    np.testing.assert_array_equal(np.asarray(sharded["l1"]["kernel"].a), np.asarray(lp["l1"]["kernel"].a))

    m = mesh((2, 4), ("data", "model"))
    moved = jax.tree.map(lambda n: LoraKernel(put(n.w0, m, P("data", "model")), np.asarray(n.a), np.asarray(n.b),
                                              layout=n.layout, scale=n.scale),
                         lp, is_leaf=lambda n: isinstance(n, LoraKernel))
    fixed = shard_adapters(moved)
    for name in ("l1", "l2"):
        node = fixed[name]["kernel"]
        assert (node.a.sharding.spec, node.b.sharding.spec) == (P("data", None), P(None, "model"))
        np.testing.assert_array_equal(np.asarray(node.a), np.asarray(lp[name]["kernel"].a))


# -- checkpoints: save from one mesh, restore onto another -------------------------------------------


def test_checkpoint_restores_onto_a_different_mesh(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    m1, m2 = mesh((8,), ("fsdp",)), mesh((2, 4), ("data", "model"))
    rng = np.random.default_rng(5)
    w = {n: rng.standard_normal((D_IN, D_H)).astype(np.float32) for n in ("l1",)}
    w["l2"] = rng.standard_normal((D_H, D_OUT)).astype(np.float32)
    x = jnp.zeros((BATCH, D_IN))
    base1 = {n: {"kernel": put(v, m1, P("fsdp", None))} for n, v in w.items()}
    lp, apply = jlora.inject(base1, mlp, rank=RANK, example_args=(x,))
    lp = randomize_factors(lp, 6)
    jlora.save_adapters(tmp_path / "ckpt", lp)

    spec2 = {"l1": P(None, "model"), "l2": P("model", "data")}
    # l1 column-parallel: A replicated, B on 'model'; l2 rows over 'model', columns over 'data'
    want = {"l1": (P(None, None), P(None, "model")), "l2": (P("model", None), P(None, "data"))}
    base2 = {n: {"kernel": put(v, m2, spec2[n])} for n, v in w.items()}
    got = jlora.load_adapters(tmp_path / "ckpt", base2)
    for n in w:
        node, old = got[n]["kernel"], lp[n]["kernel"]
        assert node.w0 is base2[n]["kernel"]
        assert node.a.sharding.mesh == m2 and node.b.sharding.mesh == m2
        assert (node.a.sharding.spec, node.b.sharding.spec) == want[n], n
        np.testing.assert_array_equal(np.asarray(node.a), np.asarray(old.a))
        np.testing.assert_array_equal(np.asarray(node.b), np.asarray(old.b))


def test_dora_magnitude_is_placed_like_b(tmp_path):
    """DoRA's magnitude m (one per output unit) is sharded like B's output axes: at inject over a
    sharded base, by shard_adapters after a reshard, and by load_adapters onto another mesh; its
    values never change."""
    pytest.importorskip("orbax.checkpoint")
    rng = np.random.default_rng(8)
    w = {"l1": rng.standard_normal((D_IN, D_H)).astype(np.float32), "l2": rng.standard_normal((D_H, D_OUT)).astype(np.float32)}
    x = jnp.zeros((BATCH, D_IN))
    m1, m2 = mesh((8,), ("fsdp",)), mesh((2, 4), ("data", "model"))
    ref, _ = jlora.inject({n: {"kernel": v} for n, v in w.items()}, mlp, rank=RANK, dora=True, example_args=(x,))
    base1 = {n: {"kernel": put(v, m1, P(None, "fsdp"))} for n, v in w.items()}  # output axes over 'fsdp'
    lp, _ = jlora.inject(base1, mlp, rank=RANK, dora=True, example_args=(x,))
    for n in w:
        node = lp[n]["kernel"]
        assert node.b.sharding.spec == P(None, "fsdp") and node.m.sharding.spec == P("fsdp"), n
        np.testing.assert_allclose(np.asarray(node.m), np.asarray(ref[n]["kernel"].m), rtol=1e-6)

    spec2 = {"l1": P(None, "model"), "l2": P("model", "data")}
    moved = jax.tree.map(lambda k: k.replace(w0=put(np.asarray(k.w0), m2, spec2["l1" if k.w0.shape == (D_IN, D_H) else "l2"]),
                                              a=np.asarray(k.a), b=np.asarray(k.b), m=np.asarray(k.m)),
                         lp, is_leaf=lambda k: isinstance(k, LoraKernel))
    fixed = shard_adapters(moved)
    want_m = {"l1": P("model"), "l2": P("data")}
    for n in w:
        assert fixed[n]["kernel"].m.sharding.spec == want_m[n], n
        assert fixed[n]["kernel"].m.sharding.mesh == m2

    jlora.save_adapters(tmp_path / "ckpt", lp)
    got = jlora.load_adapters(tmp_path / "ckpt", {n: {"kernel": put(v, m2, spec2[n])} for n, v in w.items()})
    for n in w:
        node = got[n]["kernel"]
        assert node.m.sharding.spec == want_m[n] and node.m.sharding.mesh == m2, n
        np.testing.assert_array_equal(np.asarray(node.m), np.asarray(lp[n]["kernel"].m))
