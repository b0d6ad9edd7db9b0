"""QLoRA: adapters over a quantized frozen base, through inject / apply / split / merge."""

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
    # hand-written reference: dequantized W0 + s·A·B per kernel (stacked kernels: per layer)
    by_hand = {
        "layers": {n: deq["layers"][n] + lp["layers"][n].scale * jnp.einsum(
            "lir,lro->lio", lp["layers"][n].a, lp["layers"][n].b) for n in ("up", "down")},
        "head": {"kernel": deq["head"]["kernel"] + lp["head"]["kernel"].scale
                 * lp["head"]["kernel"].a @ lp["head"]["kernel"].b},
    }
    np.testing.assert_allclose(jax.jit(apply)(lp, x), scan_model(by_hand, x), rtol=1e-4, atol=1e-4)


@pytest.mark.optax_promotion
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
    def step(ad, st, base):  # the base is an argument: what comes back out of combine is checked
        loss = lambda ad: jnp.mean((apply(jlora.combine(ad, base), x).astype(jnp.float32) - y) ** 2)
        l, g = jax.value_and_grad(loss)(ad)
        u, st = tx.update(g, st, ad)
        return optax.apply_updates(ad, u), st, l, jlora.split(jlora.combine(ad, base))[1]

    losses = []
    for _ in range(15):
        ad, st, l, base = step(ad, st, base)
        losses.append(float(l))
    assert losses[-1] < 0.9 * losses[0]
    after = jlora.combine(ad, base)
    assert jlora.is_quantized(after["layers"]["up"].w0)
    got, want = jax.tree.leaves(after["layers"]["up"].w0), jax.tree.leaves(q["layers"]["up"])
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    labels = jlora.labels(after)
    assert set(jax.tree.leaves(labels["layers"]["up"].w0)) == {"frozen"}


def test_qlora_backward_keeps_codes_not_a_dense_kernel(capsys):
    """The backward needs W0 for dx; it must keep the stored codes and dequantize again, not save a
    dense copy of each kernel (which would undo QLoRA's memory saving during training)."""
    from jax.ad_checkpoint import print_saved_residuals

    p = _params()
    x = jax.random.normal(K(4), (3, 64))
    q = jlora.quantize(p, targets=lambda path, leaf: True, min_size=0)
    lp, apply = jlora.inject(q, lambda p, x: scan_model(  # a dtype cast on the way, as flax does
        jax.tree.map(lambda w: w.astype(jnp.float32), p), x), rank=4, example_args=(x,))
    ad, base = jlora.split(lp)
    print_saved_residuals(lambda ad: jnp.sum(apply(jlora.combine(ad, base), x)), ad)
    saved = capsys.readouterr().out.splitlines()
    dense_kernels = [s for s in saved if s.startswith(("f32[2,64,128]", "f32[2,128,64]", "f32[64,64]"))]
    assert not dense_kernels, saved
    assert any(s.startswith("u8[") for s in saved), saved  # the NF4 codes are what is kept
