"""QLoRA over the GGUF file's own Q4_1 blocks: same weights as the dequantizing loader, trainable."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora

gguf_mod = pytest.importorskip("jlora.models.gguf")


@pytest.fixture(scope="module")
def both(gguf_path):
    cfg, dense, tok = gguf_mod.load_gguf(gguf_path, scan_layers=True)
    _, quant, _ = gguf_mod.load_gguf(gguf_path, scan_layers=True, quantized=True)
    return cfg, dense, quant


def test_q4_1_kernels_equal_the_dequantized_file(both):
    cfg, dense, quant = both
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        q = quant["params"]["layers"]["self_attn"][name]["kernel"]
        assert isinstance(q, gguf_mod.Q4_1Kernel)
        assert q.shape == dense["params"]["layers"]["self_attn"][name]["kernel"].shape
        np.testing.assert_array_equal(q.dequantize(), dense["params"]["layers"]["self_attn"][name]["kernel"])
    down = quant["params"]["layers"]["mlp"]["down_proj"]["kernel"]
    assert down.nbytes / down.size == pytest.approx(0.625)


def test_qlora_over_q4_1_trains_and_matches_dense(both):
    from jlora.models.llama import Llama

    cfg, dense, quant = both
    model = Llama(cfg)
    tokens = jnp.asarray([[1, 504, 3458, 282, 4649, 314, 2]])
    lp, apply = jlora.inject(quant, model.apply, rank=4, targets=["q_proj", "v_proj"], example_args=(tokens,))
    lp_dense, apply_dense = jlora.inject(dense, model.apply, rank=4, targets=["q_proj", "v_proj"], example_args=(tokens,))
    from conftest import randomize

    lp, lp_dense = randomize(lp, scale=0.05), randomize(lp_dense, scale=0.05)
    step = jax.jit(lambda p, t: apply(p, t))
    np.testing.assert_allclose(step(lp, tokens), jax.jit(apply_dense)(lp_dense, tokens), rtol=2e-4, atol=2e-4)
    ad, base = jlora.split(lp)
    g = jax.jit(jax.grad(lambda ad, base: jnp.mean(apply(jlora.combine(ad, base), tokens) ** 2)))(ad, base)
    assert np.any(np.asarray(g["params"]["layers"]["self_attn"]["q_proj"]["kernel"].b))
