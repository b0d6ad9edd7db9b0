"""QLoRA over the GGUF file's own Q4_1 blocks: same weights as the dequantizing loader, trainable."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora

gguf_mod = pytest.importorskip("jlora.models.gguf")


@pytest.fixture(scope="module")
def both(gguf_path, smollm2_scanned):
    cfg, dense, tok = smollm2_scanned
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
    from helpers import randomize

    lp, lp_dense = randomize(lp, scale=0.05), randomize(lp_dense, scale=0.05)
    step = jax.jit(lambda p, t: apply(p, t))
    np.testing.assert_allclose(step(lp, tokens), jax.jit(apply_dense)(lp_dense, tokens), rtol=2e-4, atol=2e-4)
    ad, base = jlora.split(lp)
    g = jax.jit(jax.grad(lambda ad, base: jnp.mean(apply(jlora.combine(ad, base), tokens) ** 2)))(ad, base)
    assert np.any(np.asarray(g["params"]["layers"]["self_attn"]["q_proj"]["kernel"].b))


def _fake_reader(types):
    """A two-layer llama GGUF reader in memory (d = 32, ffn = 64); ``types[kind]`` gives, per
    layer, the storage type of that projection (``"Q4_1"`` or ``"F32"``; default Q4_1)."""
    from types import SimpleNamespace

    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize as gguf_quantize

    rng = np.random.default_rng(0)
    d, ffn = 32, 64
    shapes = {"attn_q": (d, d), "attn_k": (d, d), "attn_v": (d, d), "attn_output": (d, d),
              "ffn_gate": (ffn, d), "ffn_up": (ffn, d), "ffn_down": (d, ffn)}

    def tensor(name, value, kind="F32"):
        t = getattr(T, kind)
        data = value if kind == "F32" else gguf_quantize(value, t)
        return SimpleNamespace(name=name, tensor_type=t, data=data, shape=list(value.shape[::-1]))

    tensors = [tensor("token_embd.weight", rng.standard_normal((8, d), np.float32)),
               tensor("output_norm.weight", np.ones(d, np.float32))]
    for i in range(2):
        tensors += [tensor(f"blk.{i}.{n}.weight", np.ones(d, np.float32)) for n in ("attn_norm", "ffn_norm")]
        tensors += [tensor(f"blk.{i}.{k}.weight", rng.standard_normal(s, np.float32), types.get(k, ["Q4_1"] * 2)[i])
                    for k, s in shapes.items()]
    return SimpleNamespace(tensors=tensors)


def _fake_cfg():
    from jlora.models.llama import LlamaConfig

    return LlamaConfig(vocab_size=8, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                       num_kv_heads=2, head_dim=16, tie_embeddings=True)


def test_quantized_loader_keeps_a_projection_quantized_only_if_q4_1_in_every_layer():
    """attn_v is Q4_1 in layer 0 only: kept per tensor, the scanned stack mixed a Q4_1Kernel with a
    dense array and failed in jax.tree.map. It is dequantized in both layers, with a warning."""
    pytest.importorskip("gguf")
    from jlora.models.llama import stack_layer_params

    reader = _fake_reader({"attn_v": ["Q4_1", "F32"]})
    with pytest.warns(UserWarning, match="attn_v"):
        p = gguf_mod._params_from_reader(reader, _fake_cfg(), jnp.float32, quantized=True)
    for i in range(2):
        attn = p[f"layers_{i}"]["self_attn"]
        assert isinstance(attn["q_proj"]["kernel"], gguf_mod.Q4_1Kernel)
        assert not jlora.is_quantized(attn["v_proj"]["kernel"])
    stacked = stack_layer_params(p)["layers"]["self_attn"]
    assert stacked["q_proj"]["kernel"].shape == (2, 32, 32) and stacked["v_proj"]["kernel"].shape == (2, 32, 32)
    dense = gguf_mod._params_from_reader(reader, _fake_cfg(), jnp.float32)
    np.testing.assert_array_equal(p["layers_1"]["self_attn"]["q_proj"]["kernel"].dequantize(),
                                  dense["layers_1"]["self_attn"]["q_proj"]["kernel"])


def test_quantized_loader_refuses_a_file_without_q4_1():
    """quantized=True on a file with no Q4_1 projection used to return dense params silently."""
    pytest.importorskip("gguf")
    kinds = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    reader = _fake_reader({k: ["F32", "F32"] for k in kinds})
    with pytest.raises(ValueError, match=r"quantized=True.*Q4_1.*F32"):
        gguf_mod._params_from_reader(reader, _fake_cfg(), jnp.float32, quantized=True)
