"""The public contract (README's API table) as behaviour: split/combine, the one-line call, and refusals.

Each test here was written against a failure found by probing the public API (issue 12); each
checks against an independent reference (hand-written W0 + s·A·B, the base model itself).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from helpers import randomize

K = jax.random.key


# apply's paths run under strict dtype promotion (conftest's fixture; optax-using tests opt out).
pytestmark = pytest.mark.strict_promotion


def close(a, b, tol=2e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def plain_params():
    k1, k2, k3 = jax.random.split(K(0), 3)
    return {"w1": jax.random.normal(k1, (16, 32)) / 4, "b1": jax.random.normal(k3, (32,)),
            "w2": jax.random.normal(k2, (32, 8)) / 6}


def plain_fn(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


# -- split / combine -----------------------------------------------------------------------------------


def test_split_base_is_the_original_structure():
    p = plain_params()
    lp, apply = jlora.inject(p, plain_fn, rank=4, full=["b1"])
    lp = randomize(lp)
    adapters, base = jlora.split(lp)
    assert jax.tree.structure(base) == jax.tree.structure(p)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(p)):
        np.testing.assert_array_equal(a, b)
    x = jax.random.normal(K(1), (3, 16))
    np.testing.assert_array_equal(plain_fn(base, x), plain_fn(p, x))  # apply_fn runs the base model
    back = jlora.combine(adapters, base)
    by_hand = {"w1": p["w1"] + lp["w1"].a @ lp["w1"].b, "b1": lp["b1"].value,
               "w2": p["w2"] + lp["w2"].a @ lp["w2"].b}
    close(apply(back, x), plain_fn(by_hand, x), 1e-4)


def test_split_base_keeps_quantized_kernels_quantized():
    p = {"w": jax.random.normal(K(2), (64, 64)), "v": jax.random.normal(K(3), (64, 64))}
    q = jlora.quantize(p, targets=["w", "v"], min_size=0)
    lp, _ = jlora.inject(q, lambda p, x: x @ p["w"] @ p["v"], rank=2)
    _, base = jlora.split(lp)
    assert isinstance(base["w"], jlora.NF4Tensor) and isinstance(base["v"], jlora.NF4Tensor)
    np.testing.assert_array_equal(base["w"].codes, q["w"].codes)


def test_combine_onto_injected_params_replaces_their_adapters():
    p = plain_params()
    lp, apply = jlora.inject(p, plain_fn, rank=4)
    trained = randomize(lp)
    x = jax.random.normal(K(4), (3, 16))
    close(apply(jlora.combine(jlora.split(trained)[0], lp), x), apply(trained, x))


def test_combine_refuses_trees_of_different_injections():
    p = plain_params()
    lp_a, _ = jlora.inject(p, plain_fn, rank=4, targets=["w1"])
    lp_b, _ = jlora.inject(p, plain_fn, rank=4, targets=["w2"])
    with pytest.raises(ValueError, match="base has an adapter at 'w2'.*different injections"):
        jlora.combine(jlora.split(lp_a)[0], lp_b)
    lp_c, _ = jlora.inject({"w1": p["w1"][:8], "b1": p["b1"], "w2": p["w2"]}, plain_fn, rank=4)
    with pytest.raises(ValueError, match="adapter at 'w1' does not fit base kernel"):
        jlora.combine(jlora.split(lp_c)[0], p)
    with pytest.raises(ValueError, match="different tree structures"):
        jlora.combine(jlora.split(lp_a)[0], {"w1": p["w1"]})


def test_apply_refuses_base_and_adapters_alone():
    p = plain_params()
    lp, apply = jlora.inject(p, plain_fn, rank=4)
    adapters, base = jlora.split(lp)
    x = jnp.ones((1, 16))
    with pytest.raises(ValueError, match="hold no adapters.*combine"):
        apply(base, x)
    with pytest.raises(ValueError, match="'w1' holds an adapter without its base kernel.*combine"):
        apply(adapters, x)
    with pytest.raises(ValueError, match="merge: .*without their base kernels"):
        jlora.merge(adapters)


@pytest.mark.optax_promotion
def test_optimizer_over_adapters_tree_with_a_quantized_base():
    """README's QLoRA recipe: gradients w.r.t. split(params)[0], jlora.optimizer(tx, params)."""
    p = {"w": jax.random.normal(K(5), (64, 64)) / 8}
    q = jlora.quantize(p, targets=["w"], min_size=0)
    f = lambda p, x: x @ p["w"]
    lp, apply = jlora.inject(q, f, rank=2)
    x, y = jax.random.normal(K(6), (4, 64)), jax.random.normal(K(7), (4, 64))
    tx = jlora.optimizer(optax.sgd(0.1), lp)
    adapters, base = jlora.split(lp)
    state = tx.init(adapters)
    loss = lambda ad: jnp.mean((apply(jlora.combine(ad, base), x) - y) ** 2)
    g = jax.grad(loss)(adapters)
    upd, state = tx.update(g, state, adapters)
    new = optax.apply_updates(adapters, upd)
    # plain SGD on B by hand (A's gradient is zero at B = 0): B - 0.1 · dL/dB
    w0 = jlora.dequantize(q)["w"]
    a = lp["w"].a
    gb = jax.grad(lambda b: jnp.mean((x @ (w0 + a @ b) - y) ** 2))(lp["w"].b)
    close(new["w"].b, lp["w"].b - 0.1 * gb, 1e-5)
    assert float(loss(new)) < float(loss(adapters))


def test_optimizer_refuses_params_without_adapters():
    with pytest.raises(ValueError, match="hold no adapters"):
        jlora.optimizer(optax.sgd(0.1), plain_params())


# -- the one-line call -------------------------------------------------------------------------------


@pytest.mark.parametrize("names", [("w1", "w2"), ("W_q", "W_o"), ("proj", "out")])
def test_headline_call_on_a_plain_function_with_free_names(names):
    n1, n2 = names
    base = plain_params()
    p = {n1: base["w1"], "b1": base["b1"], n2: base["w2"]}
    fn = lambda p, x: jnp.tanh(x @ p[n1] + p["b1"]) @ p[n2]
    lp, apply = jlora.inject(p, fn, rank=8)
    assert sorted(path for path, *_ in apply.report.adapted) == sorted([n1, n2])
    assert "every 2-D floating leaf" in str(apply.report)
    x = jax.random.normal(K(8), (5, 16))
    np.testing.assert_array_equal(apply(lp, x), fn(p, x))
    lp = randomize(lp)
    ref = jnp.tanh(x @ (p[n1] + lp[n1].a @ lp[n1].b) + p["b1"]) @ (p[n2] + lp[n2].a @ lp[n2].b)
    close(jax.jit(apply)(lp, x), ref, 1e-4)


def test_embedding_named_tables_are_left_out_without_example_args():
    p = {"wte": jnp.ones((10, 4)), "embed_tokens": jnp.ones((10, 4)), "tok_embedding": jnp.ones((10, 4)),
         "w": jnp.ones((4, 3))}
    fn = lambda p, t: (p["wte"][t] + p["embed_tokens"][t] + p["tok_embedding"][t]) @ p["w"]
    lp, apply = jlora.inject(p, fn, rank=2)
    assert [path for path, *_ in apply.report.adapted] == ["w"]
    skipped = {path: why for path, _, why in apply.report.skipped}
    assert set(skipped) == {"wte", "embed_tokens", "tok_embedding"}
    assert all("embedding" in why for why in skipped.values())


def test_whole_equinox_module_with_and_without_example_args():
    eqx = pytest.importorskip("equinox")
    m = eqx.nn.MLP(4, 3, 8, 2, key=K(9))  # holds activation functions as leaves
    f = lambda m, x: jax.vmap(m)(x)
    x = jax.random.normal(K(10), (2, 4))
    for kw in ({}, {"example_args": (x,)}):
        lp, apply = jlora.inject(m, f, rank=2, **kw)
        assert len(apply.report.adapted) == 3
        np.testing.assert_array_equal(apply(lp, x), f(m, x))
        lp = randomize(lp)
        merged = jlora.merge(lp)
        def by_hand_one(n):  # A on the contracted side: (out, in) weights used as W @ x get (A·B)ᵀ
            if not isinstance(n, jlora.LoraKernel):
                return n
            d = n.a @ n.b
            return n.w0 + n.scale * (d if n.layout.in_ == (0,) else d.T)

        by_hand = jax.tree.map(by_hand_one, lp, is_leaf=lambda n: isinstance(n, jlora.LoraKernel))
        close(eqx.filter_jit(apply)(lp, x), f(by_hand, x), 1e-4)
        close(f(merged, x), f(by_hand, x), 1e-4)


def test_python_scalar_leaf_is_passed_through():
    p = {"w": jax.random.normal(K(11), (4, 3)), "temperature": 2.0}
    f = lambda p, x: (x @ p["w"]) / p["temperature"]
    x = jnp.ones((1, 4))
    for kw in ({}, {"example_args": (x,)}):
        lp, apply = jlora.inject(p, f, rank=2, **kw)
        lp = randomize(lp)
        close(jax.jit(apply)(lp, x), x @ (p["w"] + lp["w"].a @ lp["w"].b) / 2.0)


# -- targets -----------------------------------------------------------------------------------------


def test_every_targets_entry_must_choose_a_kernel():
    p = {"l1": {"kernel": jnp.ones((4, 4))}, "l2": {"kernel": jnp.ones((4, 4))}}
    f = lambda p, x: x @ p["l1"]["kernel"] @ p["l2"]["kernel"]
    for kw in ({}, {"example_args": (jnp.ones((1, 4)),)}):
        with pytest.raises(ValueError, match="targets entry 'l2_typo' matched no kernel.*l2/kernel"):
            jlora.inject(p, f, rank=2, targets=["l1", "l2_typo"], **kw)


def test_targeting_an_embedding_with_example_args_adapts_it():
    """A table read only by a gather: A on the gathered (vocabulary) axis, B on the features, as
    PEFT's LoRA on embeddings."""
    p = {"embed": jax.random.normal(K(12), (10, 4)), "w": jax.random.normal(K(13), (4, 3))}
    f = lambda p, t: p["embed"][t] @ p["w"]
    t = jnp.array([[1, 2], [9, 0]])
    lp, apply = jlora.inject(p, f, rank=2, targets=["embed"], example_args=(t,))
    assert lp["embed"].layout == jlora.Layout((), (0,), (1,), gather=True)
    lp = randomize(lp)
    e = lp["embed"]
    close(jax.jit(apply)(lp, t), (p["embed"] + e.a @ e.b)[t] @ p["w"], 1e-5)
    g = jax.grad(lambda lp: jnp.sum(apply(lp, t) ** 2))(lp)
    ga = jax.grad(lambda a: jnp.sum(((p["embed"] + a @ e.b)[t] @ p["w"]) ** 2))(e.a)
    close(g["embed"].a, ga, 1e-4)


def test_targeting_a_leaf_used_otherwise_says_why():
    p = {"table": jnp.ones((10, 4)), "w": jnp.ones((4, 3))}
    f = lambda p, x: (x + jnp.sum(p["table"])) @ p["w"]
    with pytest.raises(ValueError, match="matched no kernel. It matched 'table' \\(not used as a matmul weight"):
        jlora.inject(p, f, rank=2, targets=["table"], example_args=(jnp.ones((1, 4)),))


# -- dtypes and factor shapes -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, "int8"])
def test_non_floating_adapter_dtype_is_refused(dtype):
    with pytest.raises(ValueError, match="adapter_dtype must be a floating dtype"):
        jlora.inject(plain_params(), plain_fn, rank=2, adapter_dtype=dtype)


@pytest.mark.parametrize("a_shape,b_shape", [((16, 1), (4, 32)), ((1, 4), (4, 32)), ((16, 4), (4, 1)),
                                             ((17, 4), (4, 32))])
def test_factors_of_the_wrong_shape_are_refused_naming_the_kernel(a_shape, b_shape):
    p = plain_params()
    lp, apply = jlora.inject(p, plain_fn, rank=4)
    k = lp["w1"]
    bad = dict(lp, w1=jlora.LoraKernel(k.w0, jnp.ones(a_shape), jnp.ones(b_shape), layout=k.layout, scale=1.0))
    with pytest.raises(ValueError, match="adapted kernel 'w1'.*expected A \\[16, 4\\] and B \\[4, 32\\]|"
                                         "adapted kernel 'w1'.*expected A \\[16, 1\\] and B \\[1, 32\\]"):
        apply(bad, jnp.ones((1, 16)))
    with pytest.raises(ValueError, match="'w1'"):
        jlora.combine(jlora.split(bad)[0], p)


def test_bias_lora_only_trains_the_biases_of_adapted_modules_only():
    nn = pytest.importorskip("flax.linen")
    m = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(4)])
    x = jnp.ones((2, 6))
    v = m.init(K(20), x)
    for kw in ({}, {"example_args": (x,)}):
        lp, apply = jlora.inject(v, m.apply, rank=2, targets=["layers_0"], bias="lora_only", **kw)
        assert apply.report.trained == ["params/layers_0/bias"]
        assert not isinstance(lp["params"]["layers_2"]["bias"], jlora.Trainable)


def test_every_full_entry_must_choose_a_leaf():
    with pytest.raises(ValueError, match="full entry 'b1_typo' matched no leaf.*b1"):
        jlora.inject(plain_params(), plain_fn, rank=2, full=["b1", "b1_typo"])
