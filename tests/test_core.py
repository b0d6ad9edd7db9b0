"""The core transform against independent references: hand-written W0 + s·A·B, and the merged model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import jlora
from helpers import randomize

K = jax.random.key


# apply's paths run under strict dtype promotion (conftest's fixture; optax-using tests opt out).
pytestmark = pytest.mark.strict_promotion


def close(a, b, tol=2e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def is_lk(x):
    return isinstance(x, jlora.LoraKernel)


# -- a plain JAX MLP with a hand-written reference ---------------------------------------------------------


def mlp(p, x):
    h = jax.nn.gelu(x @ p["l1"]["kernel"] + p["l1"]["bias"])
    return h @ p["l2"]["kernel"]


def mlp_params():
    k1, k2, k3 = jax.random.split(K(0), 3)
    return {
        "l1": {"kernel": jax.random.normal(k1, (6, 10)) / 3, "bias": jax.random.normal(k3, (10,))},
        "l2": {"kernel": jax.random.normal(k2, (10, 7)) / 3},
    }


def mlp_by_hand(p, lp, x):
    """W0 + s·A·B written out, independent of jlora's interpreter and merge."""
    def w(name):
        n = lp[name]["kernel"]
        return p[name]["kernel"] + n.scale * (n.a @ n.b)

    h = jax.nn.gelu(x @ w("l1") + p["l1"]["bias"])
    return h @ w("l2")


@pytest.mark.parametrize("example", [False, True])
def test_mlp_init_noop_then_matches_hand_written(example):
    p = mlp_params()
    x = jax.random.normal(K(1), (4, 6))
    lp, apply = jlora.inject(p, mlp, rank=3, alpha=6.0, example_args=(x,) if example else ())
    assert sorted(path for path, *_ in apply.report.adapted) == ["l1/kernel", "l2/kernel"]
    assert lp["l1"]["kernel"].scale == 2.0
    np.testing.assert_array_equal(jax.jit(apply)(lp, x), mlp(p, x))  # exact no-op at init
    lp = randomize(lp)
    close(jax.jit(apply)(lp, x), mlp_by_hand(p, lp, x))
    close(apply(lp, x), mlp(jlora.merge(lp), x))


def test_gradients_match_merged_model():
    p = mlp_params()
    x = jax.random.normal(K(1), (4, 6))
    lp, apply = jlora.inject(p, mlp, rank=3)
    lp = randomize(lp)
    ad, base = jlora.split(lp)
    loss_u = lambda ad: jnp.sum(apply(jlora.combine(ad, base), x) ** 2)
    loss_m = lambda ad: jnp.sum(mlp(jlora.merge(jlora.combine(ad, base)), x) ** 2)
    gu, gm = jax.jit(jax.grad(loss_u))(ad), jax.grad(loss_m)(ad)
    for a, b in zip(jax.tree.leaves(gu), jax.tree.leaves(gm)):
        close(a, b, 1e-4)
    # value_and_grad / vmap / checkpoint compose
    v, g = jax.value_and_grad(loss_u)(ad)
    close(v, loss_m(ad), 1e-4)
    xs = jax.random.normal(K(2), (3, 4, 6))
    close(jax.vmap(lambda x: apply(lp, x))(xs), jax.vmap(lambda x: mlp(jlora.merge(lp), x))(xs))
    close(jax.checkpoint(apply)(lp, x), mlp(jlora.merge(lp), x))


def test_rslora_scale_and_default_alpha():
    p = mlp_params()
    lp, _ = jlora.inject(p, mlp, rank=4)
    assert lp["l1"]["kernel"].scale == 1.0
    lp, _ = jlora.inject(p, mlp, rank=4, alpha=8, rslora=True)
    assert lp["l1"]["kernel"].scale == 8 / math.sqrt(4)
    # A ~ N(0, 1/fan_in), B = 0, adapters float32 by default
    a = lp["l1"]["kernel"].a
    assert a.dtype == jnp.float32 and lp["l1"]["kernel"].b.dtype == jnp.float32
    assert not np.any(np.asarray(lp["l1"]["kernel"].b))


def test_key_reproducible_and_different():
    p = mlp_params()
    a1 = jlora.inject(p, mlp, rank=2)[0]["l1"]["kernel"].a
    a2 = jlora.inject(p, mlp, rank=2)[0]["l1"]["kernel"].a
    a3 = jlora.inject(p, mlp, rank=2, key=K(7))[0]["l1"]["kernel"].a
    np.testing.assert_array_equal(a1, a2)
    assert not np.array_equal(a1, a3)


# -- higher-order primitives in apply_fn -------------------------------------------------------------------


def control_flow_fn(p, x):
    w1, w2 = p["w1"]["kernel"], p["w2"]["kernel"]

    @jax.jit
    def inner(x):
        return x @ w1

    h = inner(x)
    h = jax.checkpoint(lambda h: jnp.tanh(h) @ w2)(h)  # remat, w2 closed over
    h = lax.cond(jnp.sum(h) > 0, lambda h: h @ w2.T, lambda h: -h @ w2.T, h)  # x·Wᵀ
    h = lax.fori_loop(0, x.shape[0] % 3 + 2, lambda i, h: jnp.sin(h @ w1), h)  # while/scan
    return h


def test_control_flow_and_transposed_use():
    k1, k2 = jax.random.split(K(3))
    p = {"w1": {"kernel": jax.random.normal(k1, (5, 5)) / 2}, "w2": {"kernel": jax.random.normal(k2, (5, 3))}}
    x = jax.random.normal(K(4), (4, 5))
    for ex in [(), (x,)]:
        lp, apply = jlora.inject(p, control_flow_fn, rank=2, example_args=ex)
        np.testing.assert_array_equal(apply(lp, x), control_flow_fn(p, x))
        lp = randomize(lp, scale=0.3)
        close(jax.jit(apply)(lp, x), control_flow_fn(jlora.merge(lp), x), 1e-4)
        g = jax.grad(lambda lp: jnp.sum(apply(lp, x)))(lp)
        gm = jax.grad(lambda lp: jnp.sum(control_flow_fn(jlora.merge(lp), x)))(lp)
        close(g["w2"]["kernel"].b, gm["w2"]["kernel"].b, 1e-4)


def test_while_loop_dynamic_trip_count():
    p = {"w": {"kernel": jax.random.normal(K(5), (4, 4)) / 2}}

    def f(p, x, n):
        return lax.fori_loop(0, n, lambda i, h: jnp.tanh(h @ p["w"]["kernel"]), x)

    x = jax.random.normal(K(6), (2, 4))
    lp, apply = jlora.inject(p, f, rank=2)
    lp = randomize(lp)
    close(jax.jit(apply)(lp, x, jnp.int32(3)), f(jlora.merge(lp), x, 3))


def test_custom_vjp_kernel_is_inlined():
    @jax.custom_vjp
    def matmul(x, w):
        return x @ w

    matmul.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))
    p = {"d": {"kernel": jax.random.normal(K(7), (4, 3))}}
    f = lambda p, x: matmul(x, p["d"]["kernel"])
    x = jax.random.normal(K(8), (2, 4))
    lp, apply = jlora.inject(p, f, rank=2, example_args=(x,))
    lp = randomize(lp)
    close(apply(lp, x), f(jlora.merge(lp), x))
    g = jax.grad(lambda lp: jnp.sum(apply(lp, x) ** 2))(lp)
    gm = jax.grad(lambda lp: jnp.sum(f(jlora.merge(lp), x) ** 2))(lp)
    close(g["d"]["kernel"].a, gm["d"]["kernel"].a, 1e-4)


# -- plain lax.scan over stacked weights ---------------------------------------------------------------------


def scan_model(p, x):
    def layer(h, w):
        return jax.nn.relu(h @ w["up"]) @ w["down"] + h, None

    h, _ = lax.scan(layer, x @ p["embed_in"], p["layers"])
    return h


def test_lax_scan_stacked_kernels():
    ks = jax.random.split(K(9), 3)
    L, d, f = 3, 6, 10
    p = {
        "embed_in": jax.random.normal(ks[0], (5, d)),
        "layers": {"up": jax.random.normal(ks[1], (L, d, f)) / 3, "down": jax.random.normal(ks[2], (L, f, d)) / 3},
    }
    x = jax.random.normal(K(10), (2, 5))
    with pytest.raises(ValueError, match="example_args"):
        jlora.inject(p, scan_model, rank=2, targets="layers")  # 3-D: ambiguous without a trace
    lp, apply = jlora.inject(p, scan_model, rank=2, targets="layers", example_args=(x,))
    up = lp["layers"]["up"]
    assert up.layout == jlora.Layout(stack=(0,), in_=(1,), out=(2,))
    assert up.a.shape == (L, d, 2) and up.b.shape == (L, 2, f)
    np.testing.assert_array_equal(apply(lp, x), scan_model(p, x))
    lp = randomize(lp, scale=0.3)
    # hand-written: per-layer W0 + s·A_l·B_l
    up = lp["layers"]["up"]
    h = x @ p["embed_in"]
    for l in range(L):
        wu = p["layers"]["up"][l] + up.a[l] @ up.b[l]
        dn = lp["layers"]["down"]
        wd = p["layers"]["down"][l] + dn.a[l] @ dn.b[l]
        h = jax.nn.relu(h @ wu) @ wd + h
    close(jax.jit(apply)(lp, x), h, 1e-4)
    close(apply(lp, x), scan_model(jlora.merge(lp), x), 1e-4)


def test_indexing_a_stacked_kernel_in_a_python_loop():
    p = {"w": jax.random.normal(K(11), (3, 4, 4)) / 2}

    def f(p, x):
        for l in range(3):
            x = jnp.tanh(x @ p["w"][l])
        return x

    x = jax.random.normal(K(12), (2, 4))
    lp, apply = jlora.inject(p, f, rank=2, example_args=(x,))
    assert lp["w"].layout.stack == (0,)
    lp = randomize(lp)
    close(apply(lp, x), f(jlora.merge(lp), x))


# -- linen ---------------------------------------------------------------------------------------------------


def test_linen_dense_mlp_without_example_args():
    nn = pytest.importorskip("flax.linen")

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(12)(x))
            return nn.Dense(3)(x)

    m = MLP()
    x = jax.random.normal(K(13), (4, 5))
    v = m.init(K(14), x)
    lp, apply = jlora.inject(v, m.apply, rank=2)
    assert [p for p, *_ in apply.report.adapted] == ["params/Dense_0/kernel", "params/Dense_1/kernel"]
    np.testing.assert_array_equal(apply(lp, x), m.apply(v, x))
    lp = randomize(lp)
    d0, d1 = lp["params"]["Dense_0"]["kernel"], lp["params"]["Dense_1"]["kernel"]
    pv = v["params"]
    h = jax.nn.relu(x @ (pv["Dense_0"]["kernel"] + d0.a @ d0.b) + pv["Dense_0"]["bias"])
    ref = h @ (pv["Dense_1"]["kernel"] + d1.a @ d1.b) + pv["Dense_1"]["bias"]
    close(jax.jit(apply)(lp, x), ref)


def test_linen_attention_dense_general_3d_kernels():
    nn = pytest.importorskip("flax.linen")
    m = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, out_features=6)
    x = jax.random.normal(K(15), (2, 5, 6))
    v = m.init(K(16), x)
    with pytest.raises(ValueError, match="example_args"):
        jlora.inject(v, m.apply, rank=2)
    lp, apply = jlora.inject(v, m.apply, rank=2, example_args=(x,))
    q = lp["params"]["query"]["kernel"]  # (D, H, K): contracts D
    o = lp["params"]["out"]["kernel"]  # (H, K, D): contracts H, K
    assert q.layout == jlora.Layout((), (0,), (1, 2)) and q.a.shape == (6, 2) and q.b.shape == (2, 2, 4)
    assert o.layout == jlora.Layout((), (0, 1), (2,)) and o.a.shape == (2, 4, 2) and o.b.shape == (2, 6)
    np.testing.assert_array_equal(apply(lp, x), m.apply(v, x))
    lp = randomize(lp)
    close(jax.jit(apply)(lp, x), m.apply(jlora.merge(lp), x), 1e-4)
    # hand-written ΔW for the 3-D query kernel
    q = lp["params"]["query"]["kernel"]
    dq = jnp.einsum("dr,rhk->dhk", q.a, q.b)
    close(jlora.merge(lp)["params"]["query"]["kernel"], v["params"]["query"]["kernel"] + dq)


def test_linen_conv_net():
    nn = pytest.importorskip("flax.linen")

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(4, (3, 3))(x))
            x = nn.Conv(5, (3, 3), strides=2, padding="VALID")(x)
            return nn.Dense(2)(x.reshape(x.shape[0], -1))

    m = CNN()
    x = jax.random.normal(K(17), (2, 9, 9, 3))
    v = m.init(K(18), x)
    lp, apply = jlora.inject(v, m.apply, rank=2, example_args=(x,))
    c = lp["params"]["Conv_0"]["kernel"]
    assert c.layout == jlora.Layout((), (0, 1, 2), (3,), conv=(2, 0, 1)) and c.a.shape == (3, 3, 3, 2) and c.b.shape == (2, 4)
    np.testing.assert_array_equal(apply(lp, x), m.apply(v, x))
    lp = randomize(lp, scale=0.3)
    close(jax.jit(apply)(lp, x), m.apply(jlora.merge(lp), x), 1e-4)


def test_linen_nn_scan_stack_and_mutable_collections():
    nn = pytest.importorskip("flax.linen")

    class Block(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            h = h + nn.Dense(6)(nn.BatchNorm(use_running_average=False)(h))
            return h, None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            S = nn.scan(Block, variable_axes={"params": 0, "batch_stats": 0}, split_rngs={"params": True}, length=3)
            h, _ = S()(x, None)
            return h

    m = Stack()
    x = jax.random.normal(K(19), (4, 6))
    v = m.init(K(20), x)
    lp, apply = jlora.inject(v, m.apply, rank=2, example_args=(x,), example_kwargs={"mutable": ["batch_stats"]})
    k = lp["params"]["ScanBlock_0"]["Dense_0"]["kernel"]
    assert k.shape == (3, 6, 6) and k.layout.stack == (0,)
    lp = randomize(lp, scale=0.3)
    y, upd = jax.jit(lambda lp, x: apply(lp, x, mutable=["batch_stats"]))(lp, x)
    ym, updm = m.apply(jlora.merge(lp), x, mutable=["batch_stats"])
    close(y, ym, 1e-4)
    close(upd["batch_stats"]["ScanBlock_0"]["BatchNorm_0"]["mean"], updm["batch_stats"]["ScanBlock_0"]["BatchNorm_0"]["mean"])


def test_tied_embedding_head():
    nn = pytest.importorskip("flax.linen")

    class LM(nn.Module):
        @nn.compact
        def __call__(self, tok):
            emb = nn.Embed(11, 6)
            h = jnp.tanh(nn.Dense(6)(emb(tok)))
            return emb.attend(h)

    m = LM()
    tok = jnp.array([[1, 2, 3], [4, 5, 10]])
    v = m.init(K(21), tok)
    lp, apply = jlora.inject(v, m.apply, rank=2, example_args=(tok,))
    assert not isinstance(lp["params"]["Embed_0"]["embedding"], jlora.LoraKernel)
    assert any("tied embedding" in why for *_, why in apply.report.skipped)
    lp, apply = jlora.inject(v, m.apply, rank=2, example_args=(tok,), targets=["Embed_0", "Dense_0"])
    e = lp["params"]["Embed_0"]["embedding"]
    assert e.layout == jlora.Layout((), (1,), (0,))  # used as x·Eᵀ: contracts the feature axis
    np.testing.assert_array_equal(apply(lp, tok), m.apply(v, tok))
    lp = randomize(lp)
    close(jax.jit(apply)(lp, tok), m.apply(jlora.merge(lp), tok), 1e-4)  # gather and head both adapted


def test_nnx_functional():
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(5, 8, rngs=rngs)
            self.b = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.b(jax.nn.relu(self.a(x)))

    graphdef, state = nnx.split(Model(nnx.Rngs(0)))
    fn = lambda state, x: nnx.merge(graphdef, state)(x)
    x = jax.random.normal(K(22), (2, 5))
    lp, apply = jlora.inject(state, fn, rank=2, example_args=(x,))
    assert sorted(p for p, *_ in apply.report.adapted) == ["a/kernel", "b/kernel"]
    np.testing.assert_array_equal(apply(lp, x), fn(state, x))
    lp = randomize(lp)
    close(jax.jit(apply)(lp, x), fn(jlora.merge(lp), x), 1e-4)


# -- targets, bias, full, labels -------------------------------------------------------------------------------


def test_targets_forms_and_nearest_paths():
    p = mlp_params()
    x = jnp.ones((1, 6))
    by_regex = jlora.inject(p, mlp, rank=2, targets=r"l2/")[1].report.adapted
    by_list = jlora.inject(p, mlp, rank=2, targets=["l2"])[1].report.adapted
    by_fn = jlora.inject(p, mlp, rank=2, targets=lambda path, leaf: leaf.shape[1] == 7, example_args=(x,))[1].report.adapted
    assert [a[0] for a in by_regex] == [a[0] for a in by_list] == [a[0] for a in by_fn] == ["l2/kernel"]
    with pytest.raises(ValueError, match="matched no kernel.*l1/kernel"):
        jlora.inject(p, mlp, rank=2, targets="q_proj")
    with pytest.raises(ValueError, match="matched no kernel"):
        jlora.inject(p, mlp, rank=2, targets=["l"])  # names match whole components only


def test_bias_full_split_labels_optimizer():
    p = mlp_params()
    x = jax.random.normal(K(23), (3, 6))
    lp, apply = jlora.inject(p, mlp, rank=2, bias="all")
    assert isinstance(lp["l1"]["bias"], jlora.Trainable)
    lab = jlora.labels(lp)
    assert lab["l1"]["bias"].value == "lora" and lab["l1"]["kernel"].w0 == "frozen"
    ad, base = jlora.split(lp)
    assert {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(ad)[0]} == {
        "['l1']['bias'].value", "['l1']['kernel'].a", "['l1']['kernel'].b", "['l2']['kernel'].a", "['l2']['kernel'].b",
    }
    # full= trains whole leaves (PEFT's modules_to_save)
    lp2, _ = jlora.inject(p, mlp, rank=2, full=["l1"], targets=["l2"])
    assert isinstance(lp2["l1"]["kernel"], jlora.Trainable) and isinstance(lp2["l1"]["bias"], jlora.Trainable)
    g = jax.grad(lambda lp: jnp.sum(apply(lp, x)))(lp)
    assert np.any(np.asarray(g["l1"]["bias"].value))
    with pytest.raises(ValueError, match="full=.*matched no leaf"):
        jlora.inject(p, mlp, rank=2, full="nothing_here")


@pytest.mark.optax_promotion
def test_labels_for_callable_root():
    @jax.tree_util.register_pytree_node_class
    class Module:  # an equinox-like callable pytree
        def __init__(self, w):
            self.w = w

        def __call__(self, x):
            return x @ self.w

        def tree_flatten(self):
            return (self.w,), None

        @classmethod
        def tree_unflatten(cls, aux, ch):
            return cls(*ch)

    m = Module(jnp.ones((3, 2)))
    lp, apply = jlora.inject(m, lambda m, x: m(x), rank=1, targets=lambda p, l: True, example_args=(jnp.ones((1, 3)),))
    tx = jlora.optimizer(optax.sgd(0.1), lp)
    st = tx.init(lp)
    g = jax.grad(lambda lp: jnp.sum(apply(lp, jnp.ones((1, 3)))))(lp)
    upd, _ = tx.update(g, st, lp)
    assert np.all(np.asarray(upd.w.w0) == 0)


# -- training: FLOP guard, frozen base, no recompiles ---------------------------------------------------------------


def _dot_shapes(jaxpr, acc):
    from jlora import _compat as jax_compat

    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            acc.append(tuple(eqn.outvars[0].aval.shape))
        for v in eqn.params.values():
            for j in (v if isinstance(v, (tuple, list)) else [v]):
                if isinstance(j, jax_compat.ClosedJaxpr):
                    _dot_shapes(j.jaxpr, acc)
                elif isinstance(j, jax_compat.Jaxpr):
                    _dot_shapes(j, acc)
    return acc


def _train_setup():
    p = {"l1": {"kernel": jax.random.normal(K(30), (24, 40)) / 5, "bias": jnp.zeros(40)},
         "l2": {"kernel": jax.random.normal(K(31), (40, 17)) / 6}}
    x = jax.random.normal(K(32), (5, 24))
    y = jax.random.normal(K(33), (5, 17))
    return p, x, y


@pytest.mark.parametrize("whole_tree", [False, True])
@pytest.mark.optax_promotion
def test_no_kernel_sized_matmul_in_training_step(whole_tree):
    p, x, y = _train_setup()
    lp, apply = jlora.inject(p, mlp, rank=3)
    loss = lambda lp: jnp.mean((apply(lp, x) - y) ** 2)
    if whole_tree:
        tx = optax.chain(optax.clip_by_global_norm(1.0), jlora.optimizer(optax.adam(1e-2), lp))

        def step(lp, st):
            g = jax.grad(loss)(lp)
            u, st = tx.update(g, st, lp)
            return optax.apply_updates(lp, u), st

        jaxpr = jax.make_jaxpr(step)(lp, tx.init(lp))
    else:
        ad, base = jlora.split(lp)
        jaxpr = jax.make_jaxpr(jax.grad(lambda ad: loss(jlora.combine(ad, base))))(ad)
    shapes = set(_dot_shapes(jaxpr.jaxpr, []))
    assert shapes, "no matmul found"
    for kshape in [(24, 40), (40, 24), (40, 17), (17, 40)]:
        assert kshape not in shapes, f"a kernel-sized matmul {kshape} in the step: {shapes}"
    # the same in the optimized HLO that XLA runs
    hlo = jax.jit(jax.grad(loss)).lower(lp).compile().as_text()
    for line in hlo.splitlines():
        if " dot(" in line or "convolution(" in line:
            assert "f32[24,40]" not in line.split("=")[1].split("dot(")[0], line


@pytest.mark.optax_promotion
def test_training_moves_adapters_only_and_does_not_recompile():
    p, x, y = _train_setup()
    lp, apply = jlora.inject(p, mlp, rank=3)
    tx = jlora.optimizer(optax.adam(3e-2), lp)
    st = tx.init(lp)
    for leaf in jax.tree.leaves(st):
        assert np.size(leaf) < 24 * 40, f"optimizer state holds a frozen-sized array {np.shape(leaf)}"
    traces = []

    @jax.jit
    def step(lp, st):
        traces.append(1)
        l, g = jax.value_and_grad(lambda lp: jnp.mean((apply(lp, x) - y) ** 2))(lp)
        u, st = tx.update(g, st, lp)
        return optax.apply_updates(lp, u), st, l

    losses = []
    for _ in range(25):
        lp, st, l = step(lp, st)
        losses.append(float(l))
    assert losses[-1] < 0.7 * losses[0]
    assert len(traces) == 1, "the step recompiled"
    np.testing.assert_array_equal(lp["l1"]["kernel"].w0, p["l1"]["kernel"])
    np.testing.assert_array_equal(lp["l2"]["kernel"].w0, p["l2"]["kernel"])
    np.testing.assert_array_equal(lp["l1"]["bias"], p["l1"]["bias"])
    assert np.any(np.asarray(lp["l2"]["kernel"].b))


def test_frozen_base_gets_no_gradient():
    p, x, y = _train_setup()
    lp, apply = jlora.inject(p, mlp, rank=3)
    lp = randomize(lp)
    g = jax.grad(lambda lp: jnp.sum(apply(lp, x)))(lp)
    assert not np.any(np.asarray(g["l1"]["kernel"].w0)) and not np.any(np.asarray(g["l1"]["bias"]))


@pytest.mark.parametrize("dora", [False, True])
def test_rank_r_products_read_their_own_cotangent(dora):
    """In the backward, ``dy·W0ᵀ`` reads ``dy`` and the rank-r products (``dy·Bᵀ``, ``dB``) read it
    through an optimization barrier, as a value of its own: where they shared one, XLA:GPU merged
    ``dy·W0ᵀ`` and ``dy·Bᵀ`` into one matmul over a concatenated copy of W0 and B every step
    (1.24 GiB more than hand-written LoRA at rank 128 on an H200). DoRA's matmul too. Values are
    unchanged (the merged model is the reference)."""
    w = jax.random.normal(K(0), (8, 6))
    x = jax.random.normal(K(1), (3, 8))
    lp, apply = jlora.inject({"w": w}, lambda p, x: x @ p["w"], rank=4, dora=dora)
    lp = randomize(lp)
    ad, base = jlora.split(lp)
    loss = lambda ad, x: jnp.sum(jnp.square(apply(jlora.combine(ad, base), x)))
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(ad, x).jaxpr
    producer = {v: e for e in jaxpr.eqns for v in e.outvars}
    reads = {}  # the (3, 6) cotangent each backward dot reads, keyed by the other operand's shape
    for e in jaxpr.eqns:
        if e.primitive is lax.dot_general_p:
            ops = [v for v in e.invars if hasattr(v, "aval")]
            dy = [v for v in ops if v.aval.shape == (3, 6)]
            if dy:
                other, = [v for v in ops if v is not dy[0]]
                reads[other.aval.shape] = dy[0]
    w_reads, b_reads, t_reads = reads[(8, 6)], reads[(4, 6)], reads[(3, 4)]
    assert b_reads is t_reads and b_reads is not w_reads
    assert producer[b_reads].primitive.name == "optimization_barrier"
    merged = jlora.merge(lp)
    want = jax.grad(lambda x: jnp.sum(jnp.square(x @ merged["w"])))(x)
    close(jax.grad(loss, argnums=1)(ad, x), want, 1e-5)


def test_dropout_only_with_rng():
    p, x, _ = _train_setup()
    lp, apply = jlora.inject(p, mlp, rank=3, dropout=0.5)
    lp = randomize(lp)
    a, b = apply(lp, x), apply(lp, x)
    np.testing.assert_array_equal(a, b)
    close(a, mlp(jlora.merge(lp), x), 1e-4)
    d1 = apply(lp, x, lora_rng=K(1))
    d2 = apply(lp, x, lora_rng=K(2))
    assert not np.allclose(d1, a) and not np.allclose(d1, d2)
    # base path untouched by dropout: with zero B the output equals the base model exactly
    lp0, apply0 = jlora.inject(p, mlp, rank=3, dropout=0.5)
    np.testing.assert_array_equal(apply0(lp0, x, lora_rng=K(1)), mlp(p, x))


def test_merge_rounds_once_in_bf16():
    p = jax.tree.map(lambda a: a.astype(jnp.bfloat16), mlp_params())
    x = jax.random.normal(K(1), (4, 6)).astype(jnp.bfloat16)
    lp, apply = jlora.inject(p, mlp, rank=3)
    lp = randomize(lp)
    assert lp["l1"]["kernel"].a.dtype == jnp.float32
    n = lp["l1"]["kernel"]
    exact = p["l1"]["kernel"].astype(jnp.float32) + n.scale * (n.a @ n.b)
    np.testing.assert_array_equal(jlora.merge(lp)["l1"]["kernel"], exact.astype(jnp.bfloat16))
    y = apply(lp, x)
    assert y.dtype == jnp.bfloat16
    close(y.astype(jnp.float32), mlp(jlora.merge(lp), x).astype(jnp.float32), 0.1)


# -- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, -1, 2.5, True, "8"])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        jlora.inject(mlp_params(), mlp, rank=rank)


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan")])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        jlora.inject(mlp_params(), mlp, rank=2, alpha=alpha)


def test_non_callable_apply_fn():
    with pytest.raises(TypeError, match="apply_fn must be callable"):
        jlora.inject(mlp_params(), {"not": "a function"}, rank=2)


def test_apply_with_params_of_another_structure():
    p = mlp_params()
    lp, apply = jlora.inject(p, mlp, rank=2)
    bad = dict(lp)
    bad["extra"] = jnp.ones(3)
    with pytest.raises(ValueError, match="different structure.*unexpected 'extra'"):
        apply(bad, jnp.ones((1, 6)))
    bad = {"l1": lp["l1"], "l2": {"kernel": jnp.ones((10, 9))}}
    with pytest.raises(ValueError, match="'l2/kernel' has shape"):
        apply(bad, jnp.ones((1, 6)))


def test_injecting_twice_is_refused():
    lp, _ = jlora.inject(mlp_params(), mlp, rank=2)
    with pytest.raises(ValueError, match="already contain jlora adapters"):
        jlora.inject(lp, mlp, rank=2)


def test_unsupported_op_names_op_and_kernel_and_merge_fallback():
    p = {"w": {"kernel": jax.random.normal(K(40), (4, 4))}}
    f = lambda p, x: x @ jnp.abs(p["w"]["kernel"])  # abs has no LoRA rule
    x = jnp.ones((2, 4))
    lp, apply = jlora.inject(p, f, rank=2)  # no trace: adapted by convention
    with pytest.raises(jlora.UnsupportedOpError, match=r"'w/kernel'.*`abs`"):
        apply(lp, x)
    lp, apply = jlora.inject(p, f, rank=2, fallback="merge")
    lp = randomize(lp)
    close(apply(lp, x), f(jlora.merge(lp), x))
    # with a trace, the kernel is reported as skipped, and naming it explicitly is an error
    _, ap = jlora.inject({"w": p["w"], "v": {"kernel": jnp.ones((4, 4))}},
                         lambda p, x: f(p, x) @ p["v"]["kernel"], rank=2, example_args=(x,))
    assert any(path == "w/kernel" and "abs" in why for path, _, why in ap.report.skipped)


def test_fused_shared_input_equals_unfused():
    ks = jax.random.split(K(50), 4)
    p = {n: {"kernel": jax.random.normal(k, (8, 6)) / 3} for n, k in zip(["q", "k", "v"], ks)}
    p["o"] = {"kernel": jax.random.normal(ks[3], (6, 8)) / 3}

    def attn(p, x):
        q, k, v = (x @ p[n]["kernel"] for n in "qkv")
        w = jax.nn.softmax(q @ k.swapaxes(-1, -2), axis=-1)
        return (w @ v) @ p["o"]["kernel"]

    x = jax.random.normal(K(51), (2, 5, 8))
    lp, apply = jlora.inject(p, attn, rank=3, example_args=(x,))
    lp = randomize(lp, scale=0.3)
    _, fused = jlora.inject(p, attn, rank=3, example_args=(x,), matmul="shared_xa")
    jaxpr = jax.make_jaxpr(fused)(lp, x)
    n_dots = lambda j: sum(e.primitive.name == "dot_general" for e in j.jaxpr.eqns)
    assert n_dots(jaxpr) == n_dots(jax.make_jaxpr(apply)(lp, x)) - 2  # one x·[A_q A_k A_v], not three
    close(jax.jit(fused)(lp, x), attn(jlora.merge(lp), x), 1e-4)
    g1 = jax.grad(lambda lp: jnp.sum(apply(lp, x) ** 2))(lp)
    g2 = jax.grad(lambda lp: jnp.sum(fused(lp, x) ** 2))(lp)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        close(a, b, 1e-4)


def test_rank_r_product_is_named_for_remat_policies(capsys):
    """x·A carries the checkpoint name 'jlora_xa': a remat policy that names it keeps it."""
    from jax.ad_checkpoint import print_saved_residuals

    params = {"l1": {"kernel": jnp.ones((16, 32))}, "l2": {"kernel": jnp.ones((32, 4))}}
    x = jnp.ones((5, 16))

    def model(policy_names):
        policy = jax.checkpoint_policies.save_only_these_names(*policy_names)

        def f(p, x):
            layer = jax.checkpoint(lambda h, w: jnp.tanh(h @ w), policy=policy)
            return layer(layer(x, p["l1"]["kernel"]), p["l2"]["kernel"])

        return f

    for names, expected in ((("jlora_xa",), 2), (("something_else",), 0)):
        f = model(names)
        lp, app = jlora.inject(params, f, rank=3, example_args=(x,))
        tr, fr = jlora.split(lp)
        print_saved_residuals(lambda t: jnp.sum(app(jlora.combine(t, fr), x)), tr)
        out = capsys.readouterr().out
        # x·A is the only (batch, rank) array; JAX versions word its line differently
        assert sum(line.startswith("f32[5,3] ") for line in out.splitlines()) == expected, out


# -- the nodes' keyless flatten (what every jitted call runs) -------------------------------------------


def _every_node_kind():
    lay = jlora.Layout((), (0,), (1,))
    w = jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64) / 4096
    a, b = jnp.ones((64, 2)), jnp.full((2, 64), 0.5)
    plain = jlora.LoraKernel(w, a, b, layout=lay, scale=2.0, rslora=True)
    return {
        "plain": plain,
        "dora": plain.replace(m=jnp.ones(64)),
        "pissa": plain.replace(a0=a * 2, b0=b * 3, init="pissa"),
        "dora_pissa": plain.replace(m=jnp.ones(64), a0=a, b0=b),
        "nf4": plain.replace(w0=jlora.NF4Tensor.from_array(w)),
        "int8": jlora.Int8Tensor.from_array(w),
        "full": jlora.Trainable(jnp.ones(3)),
        "bank": jlora.LoraBank(w, jnp.ones((64, 2, 2)), jnp.ones((2, 2, 64)), layout=lay, names=("x", "y"),
                               ranks=(2, 1), scales=(1.0, 2.0)),
    }


def test_keyless_flatten_is_the_keyed_one(monkeypatch):
    """Each node's fast ``tree_flatten`` gives, in order, the leaves its key paths name (each leaf
    checked against the attribute its path reaches, not against the flatten code), round-trips, and a
    plain flatten never goes through the keyed form (the per-call cost the keyless one removes)."""
    nodes = _every_node_kind()
    for name, node in nodes.items():
        with monkeypatch.context() as m:
            for cls in type(node).__mro__:
                if "tree_flatten_with_keys" in vars(cls):
                    m.setattr(cls, "tree_flatten_with_keys", lambda self: 1 / 0)
            leaves, treedef = jax.tree_util.tree_flatten(node)  # must not call the keyed form
        with_path, treedef_k = jax.tree_util.tree_flatten_with_path(node)
        assert treedef == treedef_k and len(leaves) == len(with_path), name
        for leaf, (path, _) in zip(leaves, with_path):
            obj = node
            for key in path:  # a quantized node names children that are not plain attributes
                named = dict(zip(obj._child_names(), obj._child_values())) if hasattr(obj, "_child_names") else None
                obj = named[key.name] if named is not None else getattr(obj, key.name)
            assert obj is leaf, (name, jax.tree_util.keystr(path))
        back = jax.tree_util.tree_unflatten(treedef, leaves)
        assert type(back) is type(node) and jax.tree_util.tree_leaves(back) == leaves, name
    keys = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(nodes["dora_pissa"])[0]]
    assert keys == [".w0", ".a", ".b", ".m", ".a0", ".b0"]
