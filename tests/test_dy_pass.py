"""One pass over ``dy`` for the LoRA backward's ``s·dy·Bᵀ`` and ``dB`` (:mod:`jlora._dy_pass`).

The Triton kernel itself runs on a CUDA GPU (checked there against float64 by the H200 sweep,
``benchmarks/results/dy_pass_sweep_s9.txt``, and by ``benchmarks/lora_step.py``'s first-step check).
Here the same kernel body runs in Pallas' interpreter on the CPU, against products written in
float64, for several blockings: every program's rows and column bands, the float32 partial sums and
their reduction are exercised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora import _dy_pass, _fused

BF16 = jnp.bfloat16


def _operands(m, n, r, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    dy = jax.random.normal(k[0], (m, n)).astype(BF16)
    b = (0.1 * jax.random.normal(k[1], (r, n))).astype(BF16)
    xa = (0.1 * jax.random.normal(k[2], (m, r))).astype(BF16)
    return dy, b, xa


def _reference(dy, b, xa, s):
    f = lambda t: np.asarray(t, np.float64)  # noqa: E731
    return s * f(dy) @ f(b).T, f(xa).T @ f(dy)


def _rel(a, b):
    a = np.asarray(a, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("tiles", [
    _dy_pass.DyTiles(rows=32, cols=64, band=1, programs=4),  # several row blocks per program
    _dy_pass.DyTiles(rows=32, cols=32, band=2, programs=64),  # two blocks side by side, one row block
    _dy_pass.DyTiles(rows=64, cols=128, band=1, programs=1),  # one program per column band
])
def test_kernel_matches_float64(tiles):
    dy, b, xa = _operands(256, 256, 16)
    u, db = _dy_pass.dy_products(dy, b, xa, scale=1.5, impl="interpret", tiles=tiles)
    u_ref, db_ref = _reference(dy, b, xa, 1.5)
    assert u.dtype == BF16 and u.shape == (256, 16) and db.shape == (16, 256)
    assert _rel(u, u_ref) < 5e-3 and _rel(db, db_ref) < 5e-3  # bf16 outputs of float32 sums


def test_xla_form_matches_float64():
    dy, b, xa = _operands(64, 96, 8)
    u, db = _dy_pass.dy_products(dy, b, xa, scale=0.5, impl="xla")
    u_ref, db_ref = _reference(dy, b, xa, 0.5)
    assert _rel(u, u_ref) < 5e-3 and _rel(db, db_ref) < 5e-3


def test_takes():
    t = _dy_pass.DEFAULT_DY_TILES
    assert _dy_pass.takes(16384, 5632, 16, BF16)
    assert not _dy_pass.takes(16384, 5632, 16, jnp.float32)  # 16-bit floats only
    assert not _dy_pass.takes(16384, 5632, 24, BF16)  # Triton's dot: a power-of-two rank ≥ 16
    assert not _dy_pass.takes(16384, t.cols * t.band + 64, 16, BF16)
    assert not _dy_pass.takes(t.rows + 1, 5632, 16, BF16)


def test_unknown_impl():
    with pytest.raises(ValueError, match="impl must be"):
        _dy_pass.dy_products(*_operands(64, 256, 16), scale=1.0, impl="cuda")


def test_no_triton_here():
    assert _dy_pass.triton_unavailable().startswith("no CUDA GPU")
    # so the fused backward keeps two XLA matmuls on this machine, whatever impl asks
    assert _fused._dy_pass_form("mosaic", _fused.DEFAULT_TILES) == "xla"


def test_misspelt_dy_pass_raises():
    with pytest.raises(ValueError, match="Tiles.dy_pass='trition'"):
        _fused._dy_pass_form("mosaic", _fused.Tiles(dy_pass="trition"))


@pytest.mark.parametrize("r", [8, 16, 20])
def test_backward_products_pad_the_rank(r):
    """The fused backward's entry point: a rank that is not a power of two ≥ 16 is zero-padded for
    the kernel and the padding cut off again; shapes the kernel does not take get two matmuls."""
    tiles = _fused.Tiles(dy_pass="interpret")
    for m, n in ((128, 256), (96, 256)):  # 96 rows: not a multiple of the 64-row block, two matmuls
        dy, b, xa = _operands(m, n, r, seed=r)
        u, db = _fused._dy_products(dy, b, xa, 2.0, "mosaic", tiles)
        u_ref, db_ref = _reference(dy, b, xa, 2.0)
        assert u.shape == (m, r) and db.shape == (r, n)
        assert _rel(u, u_ref) < 5e-3 and _rel(db, db_ref) < 5e-3


def _count_kernels(closed_jaxpr) -> int:
    def walk(jaxpr):
        n = 0
        for eqn in jaxpr.eqns:
            n += eqn.primitive.name == "pallas_call"
            for v in eqn.params.values():
                for sub in v if isinstance(v, (tuple, list)) else [v]:
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        n += walk(inner)
        return n

    return walk(closed_jaxpr.jaxpr)


def test_lora_matmul_backward_through_the_kernel():
    """``lora_matmul``'s gradients with the one-pass products against ``x·(W0 + s·A·B)`` by hand."""
    k = jax.random.split(jax.random.key(3), 5)
    x = jax.random.normal(k[0], (2, 64, 128)).astype(BF16)
    w0 = (jax.random.normal(k[1], (128, 256)) / 12).astype(BF16)
    a = (0.1 * jax.random.normal(k[2], (128, 16))).astype(BF16)
    b = (0.1 * jax.random.normal(k[3], (16, 256))).astype(BF16)
    g = jax.random.normal(k[4], (2, 64, 256)).astype(BF16)
    tiles = _fused.Tiles(dy_pass="interpret")
    f = lambda x, a, b: _fused.lora_matmul(x, w0, a, b, scale=2.0, impl="xla", tiles=tiles)  # noqa: E731
    assert _count_kernels(jax.make_jaxpr(lambda *t: jax.vjp(f, *t)[1](g))(x, a, b)) == 1
    _, vjp = jax.vjp(f, x, a, b)
    # by hand in float64: y = x·W with W = W0 + s·A·B, so dx = g·Wᵀ, dA = s·xᵀ·g·Bᵀ, dB = s·(x·A)ᵀ·g
    x2, g2 = (np.asarray(t, np.float64).reshape(-1, t.shape[-1]) for t in (x, g))
    w0_, a_, b_ = (np.asarray(t, np.float64) for t in (w0, a, b))
    want = (g2 @ (w0_ + 2.0 * a_ @ b_).T, 2.0 * x2.T @ g2 @ b_.T, 2.0 * (x2 @ a_).T @ g2)
    for got, w in zip(vjp(g), want):
        assert _rel(np.asarray(got, np.float64).reshape(w.shape), w) < 2e-2  # bf16 inputs and outputs
