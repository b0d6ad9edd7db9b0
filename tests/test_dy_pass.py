"""One pass over ``dy`` for the LoRA backward's ``s·dy·Bᵀ`` and ``dB`` (:mod:`jlora._dy_pass`).

The Triton kernel itself runs on a CUDA GPU (checked there against float64 by the H200 sweep,
``benchmarks/results/dy_pass_sweep_s9.txt``, and by ``benchmarks/lora_step.py``'s first-step check).
Here the same kernel body runs in Pallas' interpreter on the CPU, against products written in
float64, for several blockings (several row groups, row blocks per program and column bands), the
fused backward's rank padding, its gradients, and the call partitioned over 8 simulated devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora import _dy_pass, _fused
from helpers import eqns_where

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


def test_kernel_with_row_groups_and_bands():
    """Several row groups, each of several row blocks, and several column bands of two blocks: every
    program's offsets differ in both grid axes (the reference model's shapes have all three)."""
    tiles = _dy_pass.DyTiles(rows=32, cols=64, band=2, programs=4)
    assert _dy_pass._rows_per_program(512, 2, tiles) == 8  # 16 row blocks: 2 groups of 8, 2 bands
    dy, b, xa = _operands(512, 256, 32, seed=4)
    u, db = _dy_pass.dy_products(dy, b, xa, scale=0.5, impl="interpret", tiles=tiles)
    u_ref, db_ref = _reference(dy, b, xa, 0.5)
    assert _rel(u, u_ref) < 5e-3 and _rel(db, db_ref) < 5e-3


def test_rows_per_program():
    t = _dy_pass.DEFAULT_DY_TILES  # 64-row blocks, 132 programs
    assert _dy_pass._rows_per_program(16384, 8, t) == 8  # N = 2048: 32 groups × 8 bands = 256 programs
    assert _dy_pass._rows_per_program(16384, 22, t) == 32  # N = 5632: 8 × 22 = 176
    assert _dy_pass._rows_per_program(64, 1, t) == 1  # one block: nothing to group


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
    assert not _dy_pass.takes(16384, 5632, 128, BF16)  # more shared memory than an H200 has
    assert not _dy_pass.takes(16384, t.cols * t.band + 64, 16, BF16)
    assert not _dy_pass.takes(t.rows + 1, 5632, 16, BF16)


def test_unknown_impl():
    with pytest.raises(ValueError, match="impl must be"):
        _dy_pass.dy_products(*_operands(64, 256, 16), scale=1.0, impl="cuda")


@pytest.mark.skipif(jax.devices()[0].platform == "gpu", reason="checks the CPU's answer")
def test_no_triton_here():
    assert _dy_pass.triton_unavailable().startswith("no CUDA GPU")
    # so the fused backward keeps two XLA matmuls on this machine, whatever impl asks
    assert _fused._dy_pass_form("mosaic", _fused.DEFAULT_TILES) == "xla"


def test_auto_takes_the_kernel_at_the_measured_rank_only(monkeypatch):
    monkeypatch.setattr(_dy_pass, "triton_unavailable", lambda: None)  # as on an H200
    auto = _fused.DEFAULT_TILES
    assert _fused._dy_pass_form("mosaic", auto, 16) == "triton"
    assert _fused._dy_pass_form("mosaic", auto, 32) == "xla"  # about even with two matmuls there
    assert _fused._dy_pass_form("xla", auto, 16) == "xla"  # the kernel's XLA stand-in keeps XLA
    assert _fused._dy_pass_form("mosaic", _fused.Tiles(dy_pass="triton"), 64) == "triton"  # asked for


def test_misspelt_dy_pass_raises_before_the_backward():
    x, w = jnp.ones((128, 256), BF16), jnp.ones((256, 256), BF16)
    a, b = jnp.ones((256, 4), BF16), jnp.ones((4, 256), BF16)
    with pytest.raises(ValueError, match="Tiles.dy_pass='trition'"):
        _fused.lora_matmul(x, w, a, b, scale=1.0, impl="xla", tiles=_fused.Tiles(dy_pass="trition"))


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
        jaxpr = jax.make_jaxpr(lambda *t: _fused._dy_products(*t, 2.0, "mosaic", tiles))(dy, b, xa)
        ranks = [e.invars[1].aval.shape[0] for e in _pallas_calls(jaxpr.jaxpr)]  # B's rows as the kernel sees them
        assert ranks == ([] if m % 64 else [max(16, 1 << (r - 1).bit_length())]), ranks


def _pallas_calls(jaxpr) -> list:
    return eqns_where(jaxpr, lambda e: e.primitive.name == "pallas_call")


def _count_kernels(closed_jaxpr) -> int:
    return len(_pallas_calls(closed_jaxpr.jaxpr))


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


# -- under SPMD sharding (8 simulated CPU devices, conftest) ----------------------------------------------

from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from helpers import collectives  # noqa: E402

needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

# (mesh shape and names, dy spec, B spec): dy's rows split by the batch, its columns by a
# column-parallel layer's output split (B follows W0's columns there)
DY_SHARDED = {
    "rows": (((8,), ("data",)), P("data"), P()),
    "rows-and-columns": (((2, 4), ("data", "model")), P("data", "model"), P(None, "model")),
    "columns": (((8,), ("model",)), P(None, "model"), P(None, "model")),
}


@needs8
@pytest.mark.parametrize("partitioner", ["shardy", "gspmd"])
@pytest.mark.parametrize("case", sorted(DY_SHARDED))
def test_partitioned_products_match_float64(case, partitioner, monkeypatch):
    """The fused backward's one-pass call on sharded dy, under both of XLA's partitioners: each device
    runs the kernel on its own blocks (the kernel's calls are recorded), the partial products are
    summed across the split axis and nothing else is communicated (u over a column split, dB over a
    row split), u's rows and dB's columns stay split like dy's, and the results equal the float64
    products."""
    old = jax.config.jax_use_shardy_partitioner
    jax.config.update("jax_use_shardy_partitioner", partitioner == "shardy")
    try:
        _check_partitioned_products(case, monkeypatch)
    finally:
        jax.config.update("jax_use_shardy_partitioner", old)


def _check_partitioned_products(case, monkeypatch):
    (shape, names), dy_spec, b_spec = DY_SHARDED[case]
    mesh = jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))
    calls = []
    kernel = _dy_pass._triton_products

    def recording(dy, b, xa, **kw):
        calls.append(dy.shape)
        return kernel(dy, b, xa, **kw)

    monkeypatch.setattr(_dy_pass, "_triton_products", recording)
    _fused.clear_caches()
    dy, b, xa = _operands(512, 2048, 16, seed=5)  # every device's block fits the kernel's 64 × 256
    put = lambda v, spec: jax.device_put(v, NamedSharding(mesh, spec))  # noqa: E731
    args = (put(dy, dy_spec), put(b, b_spec), put(xa, P(dy_spec[0])))
    f = jax.jit(lambda dy, b, xa: _fused._dy_products(dy, b, xa, 2.0, "mosaic", _fused.Tiles(dy_pass="interpret")))
    step = f.lower(*args).compile()
    u, db = step(*args)
    _fused.clear_caches()
    rows = 512 // (shape[0] if dy_spec[0] else 1)
    cols = 2048 // (shape[-1] if len(dy_spec) > 1 and dy_spec[1] else 1)
    assert (rows, cols) in calls, calls  # traced for one device's block
    u_ref, db_ref = _reference(dy, b, xa, 2.0)
    assert _rel(u, u_ref) < 5e-3 and _rel(db, db_ref) < 5e-3
    ops = collectives(step.as_text())
    summed = sorted(n for _, n in ops.pop("all-reduce", []))
    want = sorted(([rows * 16] if cols < 2048 else []) + ([16 * cols] if rows < 512 else []))  # u, dB
    assert summed == want and not any(ops.values()), (summed, dict(ops))
    split = lambda *spec: NamedSharding(mesh, P(*spec))  # noqa: E731
    row_axis = dy_spec[0] if len(dy_spec) else None
    col_axis = dy_spec[1] if len(dy_spec) > 1 else None
    assert u.sharding.is_equivalent_to(split(row_axis, None), 2), u.sharding
    assert db.sharding.is_equivalent_to(split(None, col_axis), 2), db.sharding


@pytest.mark.parametrize("batched", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)])
def test_products_under_vmap(batched):
    """A batch of products (``jax.vmap`` over the backward, e.g. per-example gradients or ``jacrev``)
    takes two batched matmuls, whichever operands are batched. Float32 operands: XLA:CPU cannot run
    some batched bf16 × bf16 → f32 dots (an XLA bug, not jlora's)."""
    ops = [t.astype(jnp.float32) for t in _operands(128, 256, 16, seed=6)]  # dy, b, xa
    ops = [jnp.stack([t, 2 * t, -t]) if on else t for t, on in zip(ops, batched)]
    tiles = _fused.Tiles(dy_pass="interpret")
    in_axes = tuple(0 if on else None for on in batched)
    u, db = jax.vmap(lambda d, b, x: _fused._dy_products(d, b, x, 2.0, "mosaic", tiles), in_axes=in_axes)(*ops)
    for i in range(3):
        dy_i, b_i, xa_i = (t[i] if on else t for t, on in zip(ops, batched))
        u_ref, db_ref = _reference(dy_i, b_i, xa_i, 2.0)
        assert _rel(u[i], u_ref) < 1e-5 and _rel(db[i], db_ref) < 1e-5


def test_kernel_outputs_behind_a_barrier():
    """The kernel's partial sums reach their reductions through an optimization barrier (inside a
    loop body XLA:GPU once duplicated a custom call into its consumers)."""
    dy, b, xa = _operands(128, 256, 16)
    jaxpr = jax.make_jaxpr(lambda *t: _dy_pass.products_f32(*t, impl="interpret"))(dy, b, xa).jaxpr
    (call,) = _pallas_calls(jaxpr)
    barrier = [e for e in jaxpr.eqns if e.primitive.name == "optimization_barrier"]
    assert len(barrier) == 1 and list(barrier[0].invars) == list(call.outvars)
    users = {id(e) for e in jaxpr.eqns for v in e.invars if v in set(call.outvars)}
    assert users == {id(barrier[0])}


def test_forcing_triton_off_cuda_says_so():
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        _fused._dy_pass_form("mosaic", _fused.Tiles(dy_pass="triton"))
