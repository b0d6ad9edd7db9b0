"""QLoRA: adapters over a quantized frozen base, through inject / apply / split / merge."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import jlora
from conftest import randomize

K = jax.random.key


def scan_model(p, x):
    def layer(h, w):
        return jnp.tanh(h @ w["up"]) @ w["down"] + h, None

    h, _ = lax.scan(layer, x, p["layers"])
    return h @ p["head"]["kernel"]


def _params(dtype=jnp.float32):
    ks = jax.random.split(K(0), 3)
    return {
        "layers": {"up": (jax.random.normal(ks[0], (2, 64, 128)) / 8).astype(dtype),
                   "down": (jax.random.normal(ks[1], (2, 128, 64)) / 11).astype(dtype)},
        "head": {"kernel": (jax.random.normal(ks[2], (64, 64)) / 8).astype(dtype)},
    }


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_qlora_apply_equals_dequantized_reference(method):
    p = _params()
    x = jax.random.normal(K(1), (3, 64))
    q = jlora.quantize(p, method=method, targets=lambda path, leaf: True, min_size=0)
    assert jlora.is_quantized(q["layers"]["up"]) and jlora.is_quantized(q["head"]["kernel"])
    lp, apply = jlora.inject(q, scan_model, rank=4, example_args=(x,))
    assert lp["layers"]["up"].layout.stack == (0,)
    deq = jlora.dequantize(q)
    np.testing.assert_allclose(jax.jit(apply)(lp, x), scan_model(deq, x), rtol=1e-5, atol=1e-5)
    lp = randomize(lp, scale=0.2)
    ref = scan_model(jlora.merge(lp), x)  # merge dequantizes, then folds W0 + s·A·B in float32
    np.testing.assert_allclose(jax.jit(apply)(lp, x), ref, rtol=1e-4, atol=1e-4)


def test_qlora_training_keeps_quantized_base_bitwise():
    p = _params(jnp.bfloat16)
    x = jax.random.normal(K(2), (8, 64)).astype(jnp.bfloat16)
    y = jax.random.normal(K(3), (8, 64)).astype(jnp.bfloat16)
    q = jlora.quantize(p, targets=lambda path, leaf: True, min_size=0)
    lp, apply = jlora.inject(q, scan_model, rank=4, example_args=(x,))
    ad, base = jlora.split(lp)
    tx = optax.adam(1e-2)
    st = tx.init(ad)

    @jax.jit
    def step(ad, st):
        loss = lambda ad: jnp.mean((apply(jlora.combine(ad, base), x).astype(jnp.float32) - y) ** 2)
        l, g = jax.value_and_grad(loss)(ad)
        u, st = tx.update(g, st, ad)
        return optax.apply_updates(ad, u), st, l

    losses = []
    for _ in range(15):
        ad, st, l = step(ad, st)
        losses.append(float(l))
    assert losses[-1] < 0.9 * losses[0]
    after = jlora.combine(ad, base)
    for a, b in zip(jax.tree.leaves(after["layers"]["up"].w0), jax.tree.leaves(q["layers"]["up"])):
        np.testing.assert_array_equal(a, b)
    labels = jlora.labels(after)
    assert set(jax.tree.leaves(labels["layers"]["up"].w0)) == {"frozen"}
    print(jlora.summary(after))
