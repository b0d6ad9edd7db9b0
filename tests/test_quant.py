"""Tests for jlora._quant: NF4 / int8 quantized frozen kernels (CPU, small shapes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora._quant import (
    NF4_CODEBOOK,
    Int8Tensor,
    NF4Tensor,
    dequantize,
    is_quantized,
    nf4_codebook,
    quantize,
)

# ---------------------------------------------------------------------------------------------
# An independent numpy reference of the first NF4 level (does not call jlora). The second level
# (double quantization of the absmax constants) is jlora's own linear int8 scheme; its references
# are bitsandbytes (test_matches_bitsandbytes_nf4_double_quant, bnb's state decoded in numpy) and
# the error bound of round-to-nearest, not a numpy restatement of the same code.

# Appendix E of the QLoRA paper.
PAPER_NF4 = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)  # fmt: skip


def ref_nf4(x: np.ndarray, block: int = 64):
    """Quantize and dequantize one slice (any shape) with plain numpy loops over blocks, float32
    absmax constants (no double quantization).

    Returns (dequantized float32 array of x's shape, flat 4-bit code indices, absmax per block).
    """
    flat = np.asarray(x, np.float32).reshape(-1)
    n = flat.size
    nb = -(-n // block)
    padded = np.zeros(nb * block, np.float32)
    padded[:n] = flat
    codes = np.zeros(nb * block, np.int64)
    absmax = np.zeros(nb, np.float32)
    for b in range(nb):
        blk = padded[b * block : (b + 1) * block]
        m = np.float32(np.abs(blk).max())
        absmax[b] = m
        xn = blk / (m if m != 0 else np.float32(1))
        # nearest codebook value; argmin picks the lower index on an exact tie
        codes[b * block : (b + 1) * block] = np.argmin(np.abs(xn[:, None] - PAPER_NF4[None, :]), 1)
    vals = PAPER_NF4[codes].reshape(nb, block) * absmax[:, None]
    return vals.reshape(-1)[:n].reshape(np.shape(x)), codes, absmax


def unpack(codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes)
    return np.stack([codes >> 4, codes & 15], -1).reshape(codes.shape[:-1] + (-1,))


def randn(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# ---------------------------------------------------------------------------------------------
# codebook


def test_codebook_matches_paper_derivation():
    """The independent reference is the table published in the QLoRA paper (PAPER_NF4); the
    bitsandbytes test below also checks the values in use against bitsandbytes' own NF4 map."""
    derived = np.array(nf4_codebook(4))
    assert derived.shape == (16,)
    np.testing.assert_allclose(np.array(NF4_CODEBOOK), PAPER_NF4, atol=0)
    # In float64 the derivation agrees with the published values to their float32 rounding.
    assert np.abs(derived - PAPER_NF4).max() < 1e-6
    assert NF4_CODEBOOK[7] == 0.0 and sorted(NF4_CODEBOOK) == list(NF4_CODEBOOK)


# ---------------------------------------------------------------------------------------------
# NF4 round trip vs the numpy reference


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(96, 700), (13, 7)])
def test_nf4_matches_numpy_reference(shape, double_quant):
    """Exact against the numpy reference without double quantization. With it, the 4-bit codes
    are the same (they are computed from the exact absmax) and each dequantized absmax is within
    half an int8 step of the exact one (the bound of round-to-nearest); the stored int8 scheme
    itself is compared with bitsandbytes' compress_statistics in
    test_matches_bitsandbytes_nf4_double_quant."""
    x = randn(shape, seed=1)
    q = NF4Tensor.from_array(x, double_quant=double_quant)
    ref, ref_codes, ref_absmax = ref_nf4(x)
    got = np.asarray(q.dequantize())
    assert got.shape == shape and got.dtype == np.float32
    np.testing.assert_array_equal(unpack(q.codes), ref_codes)
    if double_quant:
        absmax_q, absmax_scale, _ = (np.asarray(a) for a in q.scales)
        assert absmax_q.dtype == np.int8 and np.abs(absmax_q.astype(int)).max() <= 127
        step = np.repeat(absmax_scale, 256)[: ref_absmax.size]  # one int8 step per 256 absmax
        err = np.abs(np.asarray(q.absmax()) - ref_absmax)
        assert np.all(err <= step / 2 + 4 * np.spacing(ref_absmax)), (err / step).max()
        # |code value| <= 1, so no dequantized value moves by more than its block's absmax error.
        np.testing.assert_allclose(got, ref, rtol=0, atol=float(step.max()) / 2 * 1.01)
    else:
        np.testing.assert_array_equal(got, ref)
    # Round-trip error is that of 4-bit quantization: small relative to the data.
    err = np.abs(got - x)
    assert np.sqrt((err**2).mean()) / x.std() < 0.11
    assert err.max() < 0.16 * np.abs(x).max()


def test_nf4_round_trip_error_levels():
    x = randn((512, 512), seed=2)
    for dq in (True, False):
        got = np.asarray(NF4Tensor.from_array(x, double_quant=dq).dequantize())
        rel_rmse = np.sqrt(((got - x) ** 2).mean()) / np.sqrt((x**2).mean())
        assert 0.05 < rel_rmse < 0.11, rel_rmse
    # Double quantization barely changes the absmax constants.
    a = np.asarray(NF4Tensor.from_array(x, double_quant=False).absmax())
    b = np.asarray(NF4Tensor.from_array(x, double_quant=True).absmax())
    assert np.abs(a - b).max() < 0.01 * a.max()


def test_nf4_bf16_dtype_and_codes_layout():
    x = jnp.asarray(randn((64, 64), seed=3), jnp.bfloat16)
    q = NF4Tensor.from_array(x)
    assert q.dtype == jnp.bfloat16 and q.dequantize().dtype == jnp.bfloat16
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (64 * 64 // 2,)
    q32 = NF4Tensor.from_array(x, dtype=jnp.float32)
    assert q32.dequantize().dtype == jnp.float32
    # first value of a pair in the high nibble
    x2 = np.zeros((2, 64), np.float32)
    x2[0, 0], x2[0, 1] = 1.0, -1.0
    c = np.asarray(NF4Tensor.from_array(x2).codes)
    assert c[0] == (15 << 4 | 0)


def test_nf4_bytes_per_param():
    x = randn((1024, 1024), seed=4)
    q = NF4Tensor.from_array(x)
    bpp = q.nbytes / q.size
    # 4 bits + 8/64 bits + 32/(64*256) bits, plus one float32 mean: 540932 bytes.
    assert q.nbytes == 1024 * 1024 // 2 + 16384 + 64 * 4 + 4
    assert bpp <= 0.52, bpp
    q_nodq = NF4Tensor.from_array(x, double_quant=False)
    assert q_nodq.nbytes / q_nodq.size == pytest.approx(0.5 + 4 / 64)
    assert q.nbytes == sum(np.asarray(c).nbytes for c in jax.tree.leaves(q))


def test_nf4_zero_block_and_padding_rule():
    # 5 x 7 = 35 values: one block of 64, padded with 29 zeros that are stored then dropped.
    x = randn((5, 7), seed=5)
    q = NF4Tensor.from_array(x)
    assert q.codes.shape == (32,) and q.shape == (5, 7)
    padded = np.zeros((1, 64), np.float32)
    padded[0, :35] = x.reshape(-1)
    qp = NF4Tensor.from_array(padded)
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(qp.codes))
    np.testing.assert_array_equal(
        np.asarray(q.dequantize()), np.asarray(qp.dequantize()).reshape(-1)[:35].reshape(5, 7)
    )
    assert np.all(unpack(q.codes)[35:] == 7)  # padding zeros are NF4 code 7 (0.0)
    # 3 x 100 with block 64: 300 -> 320 values (5 blocks); absmax not padded
    q2 = NF4Tensor.from_array(randn((3, 100)), double_quant=True)
    assert q2.codes.shape == (160,) and q2.scales[0].shape == (5,)
    # an all-zero kernel round-trips exactly
    z = NF4Tensor.from_array(np.zeros((4, 64), np.float32))
    assert np.all(np.asarray(z.dequantize()) == 0)
    with pytest.raises(ValueError, match="even"):
        NF4Tensor.from_array(x, block_size=63)


# ---------------------------------------------------------------------------------------------
# stacks and scan


@pytest.mark.parametrize("cls", ["nf4", "int8", "int8_block"])
def test_scan_over_stack_slices_per_layer(cls):
    L = 3
    w = randn((L, 64, 96), seed=6)
    make = {
        "nf4": lambda a: NF4Tensor.from_array(a),
        "int8": lambda a: Int8Tensor.from_array(a),
        "int8_block": lambda a: Int8Tensor.from_array(a, block_size=64),
    }[cls]
    q = make(w)
    assert q.shape == (L, 64, 96) and q.ndim == 3 and q.size == w.size
    for leaf in jax.tree.leaves(q):
        assert leaf.shape[0] == L
    whole = np.asarray(q.dequantize())

    def body(carry, layer):
        assert layer.shape == (64, 96)  # the node handed to the body describes one layer
        return carry + 1, layer.dequantize()

    n, ys = jax.lax.scan(body, 0, q)
    assert int(n) == L
    np.testing.assert_array_equal(np.asarray(ys), whole)
    for i in range(L):
        # per-layer quantization: identical to quantizing the layer on its own
        np.testing.assert_array_equal(np.asarray(make(w[i]).dequantize()), whole[i])
        sliced = jax.tree.map(lambda c: c[i], q)
        assert sliced.shape == (64, 96)
        np.testing.assert_array_equal(np.asarray(sliced.dequantize()), whole[i])
    # jit and vmap see the same
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda t: t.dequantize())(q)), whole)
    np.testing.assert_array_equal(np.asarray(jax.vmap(lambda t: t.dequantize())(q)), whole)


def test_nested_stack_and_scan_output():
    w = randn((2, 3, 64, 64), seed=7)
    q = NF4Tensor.from_array(w)
    assert q.stack_shape == (2, 3) and q.shape == (2, 3, 64, 64)

    def outer(c, qs):
        assert qs.shape == (3, 64, 64)
        _, inner = jax.lax.scan(lambda c2, ql: (c2, ql.dequantize()), 0, qs)
        return c, inner

    _, ys = jax.lax.scan(outer, 0, q)
    np.testing.assert_array_equal(np.asarray(ys), np.asarray(q.dequantize()))
    # a node can also be built inside a scan and stacked as its output
    _, qs = jax.lax.scan(lambda c, wl: (c, NF4Tensor.from_array(wl)), 0, w[0])
    assert isinstance(qs, NF4Tensor) and qs.shape == (3, 64, 64)
    np.testing.assert_array_equal(np.asarray(qs.dequantize()), np.asarray(q.dequantize())[0])


# ---------------------------------------------------------------------------------------------
# int8


def test_int8_round_trip_per_channel_and_blockwise():
    x = randn((128, 64), seed=8) * np.linspace(0.1, 3.0, 64, dtype=np.float32)
    q = Int8Tensor.from_array(x)
    assert q.q.dtype == jnp.int8 and q.scale.shape == (64,) and q.nbytes == 128 * 64 + 64 * 4
    got = np.asarray(q.dequantize())
    amax = np.abs(x).max(0)
    ref = np.clip(np.rint(x / (amax / 127)), -127, 127) * (amax / 127)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    assert np.all(np.abs(got - x) <= amax / 127 / 2 + 1e-6)  # half a step per channel
    # the other channel axis: one scale per row
    qr = Int8Tensor.from_array(x, channel_axis=-2)
    assert qr.scale.shape == (128,)
    row_step = np.abs(x).max(1, keepdims=True) / 127
    assert np.all(np.abs(np.asarray(qr.dequantize()) - x) <= row_step / 2 + 1e-6)
    # blockwise, with padding (8000 -> 8064 = 63 blocks of 128)
    xb = randn((100, 80), seed=9)
    qb = Int8Tensor.from_array(xb, block_size=128)
    assert qb.q.shape == (8064,) and qb.scale.shape == (63,)
    gb = np.asarray(qb.dequantize())
    assert gb.shape == (100, 80)
    rel = np.sqrt(((gb - xb) ** 2).mean()) / xb.std()
    assert rel < 0.01, rel


# ---------------------------------------------------------------------------------------------
# quantize / dequantize over trees


def make_params():
    return {
        "embed": {"embedding": jnp.asarray(randn((256, 64), 10))},
        "layers": {
            "attn": {
                "q_proj": {
                    "kernel": jnp.asarray(randn((4, 64, 128), 11)),
                    "bias": jnp.zeros((4, 128)),
                }
            },
            "mlp": {"up": {"weight": jnp.asarray(randn((4, 128, 64), 12), jnp.bfloat16)}},
        },
        "head": {"kernel": jnp.asarray(randn((64, 32), 13))},  # 2048 < min_size
        "step": jnp.asarray(3),
        "scale": 1.5,
    }


def test_quantize_default_targets_and_dequantize():
    params = make_params()
    qp = quantize(params)
    qk = qp["layers"]["attn"]["q_proj"]["kernel"]
    qw = qp["layers"]["mlp"]["up"]["weight"]
    assert isinstance(qk, NF4Tensor) and qk.shape == (4, 64, 128) and qk.dtype == jnp.float32
    assert isinstance(qw, NF4Tensor) and qw.dtype == jnp.bfloat16
    assert not is_quantized(qp["head"]["kernel"])  # below min_size
    assert not is_quantized(qp["embed"]["embedding"])  # not named kernel/weight
    assert qp["layers"]["attn"]["q_proj"]["bias"] is params["layers"]["attn"]["q_proj"]["bias"]
    assert qp["scale"] == 1.5
    assert is_quantized(quantize(params, min_size=0)["head"]["kernel"])

    dq = dequantize(qp)
    assert jax.tree.structure(dq) == jax.tree.structure(params)
    k = dq["layers"]["attn"]["q_proj"]["kernel"]
    assert k.shape == (4, 64, 128) and dq["layers"]["mlp"]["up"]["weight"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(k), np.asarray(qk.dequantize()))

    q8 = quantize(params, method="int8", block_size=None, dtype=jnp.bfloat16)
    assert isinstance(q8["layers"]["attn"]["q_proj"]["kernel"], Int8Tensor)
    assert q8["layers"]["attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    # quantized params go through jit as ordinary pytrees
    out = jax.jit(lambda p: dequantize(p)["layers"]["attn"]["q_proj"]["kernel"].sum())(qp)
    assert np.isfinite(float(out))


def test_quantize_targets_forms():
    params = make_params()
    by_list = quantize(params, targets=["q_proj"])
    assert is_quantized(by_list["layers"]["attn"]["q_proj"]["kernel"])
    assert not is_quantized(by_list["layers"]["mlp"]["up"]["weight"])
    by_regex = quantize(params, targets=r"embed|mlp/")
    assert is_quantized(by_regex["embed"]["embedding"])
    assert is_quantized(by_regex["layers"]["mlp"]["up"]["weight"])
    assert not is_quantized(by_regex["layers"]["attn"]["q_proj"]["kernel"])
    by_fn = quantize(params, targets=lambda path, leaf: leaf.ndim == 3 and path.endswith("weight"))
    assert is_quantized(by_fn["layers"]["mlp"]["up"]["weight"])
    assert not is_quantized(by_fn["layers"]["attn"]["q_proj"]["kernel"])
    with pytest.raises(ValueError, match="matched no"):
        quantize(params, targets=["nope"])


def test_quantize_twice_refused():
    qp = quantize(make_params())
    with pytest.raises(ValueError, match="already quantized"):
        quantize(qp)
    with pytest.raises(ValueError, match="layers/attn/q_proj/kernel.*already quantized"):
        quantize(qp, targets=["q_proj"])
    with pytest.raises(ValueError, match="already quantized"):
        NF4Tensor.from_array(qp["layers"]["attn"]["q_proj"]["kernel"])


def test_bad_dtype_refused_with_path():
    params = {
        "blk": {"kernel": jnp.ones((64, 128), jnp.int32), "w": jnp.ones((64, 128), jnp.complex64)}
    }
    # the default rule only picks floating leaves: here none
    with pytest.raises(ValueError, match="no floating leaf named 'kernel'"):
        quantize(params)
    with pytest.raises(ValueError, match=r"blk/kernel.*int32"):
        quantize(params, targets=["kernel"])
    with pytest.raises(ValueError, match=r"blk/w.*complex64"):
        quantize(params, targets="blk/w", method="int8")
    with pytest.raises(ValueError, match="method"):
        quantize(params, method="fp4")


_MAKERS = {
    "nf4": lambda a: NF4Tensor.from_array(a),
    "nf4_nodq": lambda a: NF4Tensor.from_array(a, double_quant=False),
    "int8": lambda a: Int8Tensor.from_array(a),
    "int8_block": lambda a: Int8Tensor.from_array(a, block_size=64),
}


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("method", list(_MAKERS))
def test_non_finite_weights_refused(method, bad):
    """One inf makes its whole block (NF4) or channel (int8) non-finite, and a NaN can come back
    as a finite number: both are refused, with the count and the first position."""
    x = randn((64, 64), seed=15)
    x[3, 5] = x[60, 1] = bad
    with pytest.raises(ValueError, match=r"2 non-finite values .* first at index \(3, 5\)"):
        _MAKERS[method](x)
    with pytest.raises(ValueError, match="1 non-finite value "):
        _MAKERS[method](jnp.asarray(x[:4], jnp.bfloat16))


def test_nf4_double_quant_overflow_refused():
    """Finite weights near float32's limit: the mean of the block absmax overflowed and double
    quantization returned NaN everywhere. Refused, pointing at double_quant=False (which works)."""
    x = randn((64, 64), seed=17) * np.float32(1e37)
    with pytest.raises(ValueError, match="double_quant=False"):
        NF4Tensor.from_array(x)
    assert np.isfinite(np.asarray(NF4Tensor.from_array(x, double_quant=False).dequantize())).all()


def test_non_finite_refused_by_quantize_with_path():
    x = randn((64, 64), seed=16)
    x[0, 0] = np.nan
    params = {"ok": {"kernel": jnp.ones((64, 64))}, "blk": {"kernel": jnp.asarray(x)}}
    for method in ("nf4", "int8"):
        with pytest.raises(ValueError, match=r"'blk/kernel'.*1 non-finite value"):
            quantize(params, method=method, min_size=0)
    # A leaf that stays dense is not inspected.
    assert not is_quantized(quantize(params, targets=["ok"], min_size=0)["blk"]["kernel"])
    # Under jit the values are unknown: the check is skipped there (documented).
    jax.jit(lambda a: NF4Tensor.from_array(a).codes)(jnp.asarray(x))


def test_quantize_that_quantizes_nothing_is_an_error():
    """A rule that chooses only small or 1-D leaves (or nothing at all) used to return the tree
    unchanged: a run that believed its base was quantized."""
    params = {"blk": {"kernel": jnp.ones((32, 32)), "bias": jnp.ones((4096,))}}
    with pytest.raises(ValueError, match=r"nothing.*min_size=4096.*'blk/kernel' \(32, 32\)"):
        quantize(params)
    with pytest.raises(ValueError, match=r"nothing.*ndim < 2.*'blk/bias' \(4096,\)"):
        quantize(params, targets=["bias"], min_size=0)
    with pytest.raises(ValueError, match=r"no floating leaf named 'kernel' or 'weight'.*blk/w"):
        quantize({"blk": {"w": jnp.ones((64, 64))}})
    assert is_quantized(quantize(params, min_size=0)["blk"]["kernel"])


def test_bad_shapes_and_options_refused_clearly():
    for make in _MAKERS.values():  # int8 per channel used to fail with a numpy reduction error
        with pytest.raises(ValueError, match=r"empty.*\(0, 64\)"):
            make(np.zeros((0, 64), np.float32))
    with pytest.raises(ValueError, match="block_size"):
        Int8Tensor.from_array(randn((8, 8)), block_size=True)  # a bool is not a block size
    with pytest.raises(ValueError, match="block_size"):
        NF4Tensor.from_array(randn((8, 8)), block_size=np.int64(-2))
    # channel_axis only means something per channel; with block_size it was silently ignored
    with pytest.raises(ValueError, match="channel_axis.*block_size=None"):
        Int8Tensor.from_array(randn((8, 64)), block_size=64, channel_axis=-2)


def test_node_dtype_is_what_dequantize_returns():
    """Without jax_enable_x64 a float64 request dequantizes to float32: the node says so, rather
    than claiming float64 (inject builds abstract values from it)."""
    if jax.config.jax_enable_x64:
        pytest.skip("float64 is available")
    q = NF4Tensor.from_array(randn((8, 8)), dtype=np.float64)
    assert q.dtype == q.dequantize().dtype == np.float32
    i8 = Int8Tensor.from_array(randn((8, 8)), dtype="float64")
    assert i8.dtype == i8.dequantize().dtype == np.float32
    w = q.with_dtype(np.float64)
    assert w.dtype == w.dequantize().dtype == np.float32


def test_nodes_properties_and_pytree_keys():
    q = NF4Tensor.from_array(randn((2, 64, 64)))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(q)[0]]
    assert paths == [".codes", ".absmax_q", ".absmax_scale", ".absmax_mean"]
    leaves, treedef = jax.tree.flatten(q)
    again = jax.tree.unflatten(treedef, leaves)
    assert again.shape == q.shape and again.dtype == q.dtype and again.nbytes == q.nbytes
    assert "stack" not in repr(treedef) and "(2," not in str(treedef.node_data())
    sd = jax.eval_shape(lambda t: t, q)
    assert sd.shape == (2, 64, 64)
    assert jax.eval_shape(lambda t: t.dequantize(), q).shape == (2, 64, 64)
    assert "Int8Tensor(shape=(64, 64)" in repr(Int8Tensor.from_array(randn((64, 64))))


def _q4_1_kernel(layers: int = 2, out: int = 3, blocks: int = 2):
    """A hand-made GGUF Q4_1 kernel: d = row + 1, m = -block, codes = position % 16."""
    from jlora.models.gguf import Q4_1Kernel

    raw = np.zeros((layers * out, blocks, 20), np.uint8)
    d = np.repeat(np.arange(1, out + 1, dtype=np.float16), blocks).reshape(out, blocks)
    m = -np.tile(np.arange(blocks, dtype=np.float16), (out, 1))
    raw[..., 0:2] = np.tile(d[..., None], (layers, 1, 1)).view(np.uint8)
    raw[..., 2:4] = np.tile(m[..., None], (layers, 1, 1)).view(np.uint8)
    lo = np.arange(16, dtype=np.uint8)  # values 0..15 (low nibbles) and 16..31 (high nibbles)
    raw[..., 4:20] = lo | (lo << 4)
    k = Q4_1Kernel.from_raw(raw)
    return jax.tree.map(lambda c: c.reshape((layers, out) + c.shape[1:]), k)


@pytest.mark.parametrize(
    "make",
    [
        lambda: NF4Tensor.from_array(randn((2, 64, 64))),
        lambda: NF4Tensor.from_array(randn((64, 64)), double_quant=False),
        lambda: Int8Tensor.from_array(randn((2, 64, 64)), block_size=128),
        _q4_1_kernel,
    ],
    ids=["nf4", "nf4_nodq", "int8", "q4_1"],
)
def test_repr_of_a_tree_mapped_node(make):
    """What jlora.labels builds, jax.tree.map(lambda _: "frozen", node), still prints."""
    q = make()
    assert f"shape={q.shape}" in repr(q)
    labels = jax.tree.map(lambda _: "frozen", q)
    assert type(labels) is type(q) and "shape=?" in repr(labels)
    assert jax.tree.leaves(labels) == ["frozen"] * len(jax.tree.leaves(q))


def test_q4_1_kernel_by_hand():
    k = _q4_1_kernel()
    assert k.shape == (2, 64, 3) and k.stack_shape == (2,) and k.slice_shape == (64, 3)
    w = np.asarray(k.dequantize())
    pos = np.arange(64)
    want = (np.arange(1, 4)[None, :] * (pos % 16)[:, None] - (pos // 32)[:, None]).astype(np.float32)
    np.testing.assert_array_equal(w, np.broadcast_to(want, (2, 64, 3)))
    _, ys = jax.lax.scan(lambda c, layer: (c, layer.dequantize()), 0, k)
    np.testing.assert_array_equal(np.asarray(ys), w)
    assert k.nbytes / k.size == pytest.approx(0.625)
    assert k.with_dtype(jnp.bfloat16).dequantize().dtype == jnp.bfloat16


def test_q4_1_from_raw_refuses_what_is_not_the_files_bytes():
    """from_raw cast any array to uint8 and reshaped a 3-D array to (rows, -1, 20): float data, or
    a stacked (layers, out, blocks * 20) array, became a kernel of the wrong values or shape."""
    from jlora.models.gguf import Q4_1Kernel

    raw = np.zeros((4, 2, 20), np.uint8)
    assert Q4_1Kernel.from_raw(raw).shape == Q4_1Kernel.from_raw(raw.reshape(4, 40)).shape == (64, 4)
    with pytest.raises(ValueError, match="uint8"):
        Q4_1Kernel.from_raw(raw.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(out, blocks, 20\).*\(2, 4, 40\)"):
        Q4_1Kernel.from_raw(np.zeros((2, 4, 40), np.uint8))
    with pytest.raises(ValueError, match=r"\(4, 30\)"):
        Q4_1Kernel.from_raw(np.zeros((4, 30), np.uint8))


# ---------------------------------------------------------------------------------------------
# bitsandbytes (optional; CPU backend in recent releases)


def _bnb():
    """torch and bitsandbytes.functional, or a skip. Only bitsandbytes' *quantization* is used:
    its packed codes and its state (codebook, absmax, nested absmax) are the reference, decoded
    here in numpy. Its own ``dequantize_4bit`` is not: on some CPUs (bitsandbytes 0.50.2 with
    AVX-512) it returns values no NF4 rounding can produce."""
    torch = pytest.importorskip("torch")
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    try:
        bnb_f.quantize_4bit(torch.zeros(64, 64), blocksize=64, quant_type="nf4")
    except Exception as e:  # e.g. a build that needs CUDA
        pytest.skip(f"bitsandbytes NF4 does not run on CPU here: {type(e).__name__}: {e}")
    return torch, bnb_f


def _bnb_nf4(x: np.ndarray, double_quant: bool):
    """bitsandbytes' NF4 of ``x`` (block 64) decoded in numpy from its packed codes and state.

    Returns (packed codes as flat uint8, per-value codebook values, per-block absmax, dequantized
    values of x's shape). With double quantization the absmax is bitsandbytes' nested state
    decoded by hand: ``state2.code[absmax_u8] * state2.absmax[block of 256] + offset``.
    """
    torch, F = _bnb()
    p, st = F.quantize_4bit(
        torch.from_numpy(x), blocksize=64, compress_statistics=double_quant, quant_type="nf4"
    )
    assert st.blocksize == 64 and st.nested == double_quant
    packed = p.numpy().reshape(-1)
    code_vals = st.code.numpy()[unpack(packed)][: x.size]  # bnb's own NF4 map, indexed
    if st.nested:
        s2 = st.state2
        q = st.absmax.numpy()
        assert q.dtype == np.uint8 and s2.blocksize == 256 and not s2.nested
        absmax = s2.code.numpy()[q] * np.repeat(s2.absmax.numpy(), 256)[: q.size]
        absmax = absmax + np.float32(st.offset.item())
    else:
        absmax = st.absmax.numpy()
    out = code_vals * np.repeat(absmax, 64)[: x.size]
    return packed, code_vals, absmax, out.reshape(x.shape)


@pytest.mark.parametrize("shape", [(256, 96), (3, 100)])
def test_matches_bitsandbytes_nf4(shape):
    """Without double quantization the scheme is bitsandbytes': byte-identical packed codes,
    the same absmax constants, and jlora's output equals bitsandbytes' codebook value times
    absmax, computed in numpy from bitsandbytes' state (the last block of (3, 100) is partial)."""
    x = randn(shape, seed=14)
    packed, code_vals, absmax, ref = _bnb_nf4(x, double_quant=False)
    ours = NF4Tensor.from_array(x, double_quant=False)
    np.testing.assert_array_equal(np.asarray(ours.codes)[: packed.size], packed)
    np.testing.assert_array_equal(code_vals, PAPER_NF4[unpack(packed)][: x.size])
    np.testing.assert_array_equal(np.asarray(ours.absmax()), absmax)
    np.testing.assert_allclose(np.asarray(ours.dequantize()), ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(256, 96), (3, 100)])
def test_matches_bitsandbytes_nf4_double_quant(shape):
    """With double quantization bitsandbytes stores the absmax with its dynamic 8-bit map (its
    (256, 96) case has two second-level blocks, the second partial), jlora with linear int8:
    the 4-bit codes are still byte-identical, and both absmax lie within 1 % of the exact one,
    so each value differs from bitsandbytes' by at most its code value times 2 % of its block's
    absmax."""
    x = randn(shape, seed=14)
    packed, code_vals, bnb_absmax, ref = _bnb_nf4(x, double_quant=True)
    exact = _bnb_nf4(x, double_quant=False)[2]
    ours = NF4Tensor.from_array(x, double_quant=True)
    np.testing.assert_array_equal(np.asarray(ours.codes)[: packed.size], packed)
    # the hand decoding of bnb's nested state is right: it lands next to the exact absmax
    assert np.all(np.abs(bnb_absmax - exact) <= 0.01 * exact), np.abs(bnb_absmax / exact - 1).max()
    assert np.all(np.abs(np.asarray(ours.absmax()) - exact) <= 0.01 * exact)
    bound = np.abs(code_vals) * np.repeat(0.02 * exact, 64)[: x.size] + 1e-6
    diff = np.abs(np.asarray(ours.dequantize()).reshape(-1) - ref.reshape(-1))
    assert np.all(diff <= bound), (diff - bound).max()
