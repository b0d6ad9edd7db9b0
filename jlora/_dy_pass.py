"""One pass over ``dy`` for both of the LoRA backward's thin products (GPU, Pallas Triton).

The backward of ``y = x·W0 + (s·x·A)·B`` needs two rank-r products of the output gradient ``dy``
``(M, N)``: ``u = s·dy·Bᵀ`` ``(M, r)``, which feeds ``dx`` and ``dA``, and ``dB = (s·x·A)ᵀ·dy``
``(r, N)``. As two XLA matmuls each reads all of ``dy`` from memory, and both are bandwidth-bound:
on an H200 they were 6.2 ms of a 141 ms fused training step (``benchmarks/RESULTS.md``, eighth
session). :func:`dy_products` reads ``dy`` once. Each program of a ``(row groups, column bands)``
grid walks its rows of ``dy`` in ``rows × cols`` blocks and multiplies each block twice: by ``Bᵀ``'s
rows for ``u`` and, transposed, by ``xa``'s rows for ``dB``. Partial sums go to small float32
arrays (``u`` per column band, ``dB`` per row group) that XLA adds up, so the result is the same
on every run (no atomics).

``impl="xla"`` is the two plain matmuls: the reference in tests, and what every other device runs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["DEFAULT_DY_TILES", "RANKS", "DyTiles", "dy_products", "is_16bit_float", "products_f32", "takes",
           "triton_unavailable"]


class DyTiles(NamedTuple):
    """Blocking of :func:`dy_products`' kernel (the defaults were the fastest or within 1 % of it
    for both of the reference model's widths on an H200, ``benchmarks/results/dy_pass_sweep_s9.txt``)."""

    rows: int = 64  # rows of one dy block (a power of two)
    cols: int = 256  # columns of one dy block (a power of two)
    band: int = 1  # dy blocks side by side in one program's column band
    programs: int = 132  # the grid keeps at least this many programs where the rows allow (H200: 132 SMs)
    warps: int = 4
    stages: int = 3


DEFAULT_DY_TILES = DyTiles()
#: The ranks the kernel takes: powers of two ≥ 16 (Triton's dot); at 128 the default blocking needs
#: more shared memory than an H200 has.
RANKS = (16, 32, 64)


def is_16bit_float(dtype) -> bool:
    """bf16 or f16: the dtypes jlora's GPU kernels take."""
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def takes(m: int, n: int, r: int, dtype, *, tiles: DyTiles | None = None) -> bool:
    """Whether the kernel takes ``dy (m, n)`` with rank ``r``: 16-bit floats, ``r`` in :data:`RANKS`,
    and ``m``, ``n`` multiples of the blocks."""
    tiles = tiles or DEFAULT_DY_TILES
    return (is_16bit_float(dtype) and r in RANKS
            and m % tiles.rows == 0 and n % (tiles.cols * tiles.band) == 0)


def _rows_per_program(m: int, bands: int, tiles: DyTiles) -> int:
    """Row blocks per program: doubled while rows allow and the grid keeps ``tiles.programs``."""
    blocks = 1
    while m % (2 * blocks * tiles.rows) == 0 and (m // (2 * blocks * tiles.rows)) * bands >= tiles.programs:
        blocks *= 2
    return blocks


def _triton_products(dy, b, xa, *, tiles: DyTiles, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """The kernel, returning float32 partial sums: ``u``'s per column band ``(bands, M, r)`` and
    ``dB``'s per row group ``(groups, r, N)`` (the caller adds them up)."""
    from jax.experimental import pallas as pl

    m, n = dy.shape
    r = b.shape[0]
    tm, tn, band = tiles.rows, tiles.cols, tiles.band
    bands = n // (tn * band)
    rows = _rows_per_program(m, bands, tiles)
    groups = m // (rows * tm)
    f32 = jnp.float32
    dims_u = (((1,), (1,)), ((), ()))  # (tm, tn)·(r, tn)ᵀ -> (tm, r)
    dims_b = (((0,), (0,)), ((), ()))  # (tm, r)ᵀ·(tm, tn) -> (r, tn)

    def jlora_dy_products(dy_ref, b_ref, xa_ref, u_ref, db_ref):  # the kernel's name in profiles
        g, c = pl.program_id(0), pl.program_id(1)
        cols = [pl.ds(pl.multiple_of((c * band + j) * tn, tn), tn) for j in range(band)]
        b_blocks = [b_ref[:, cj] for cj in cols]

        def row_block(i, acc):
            rs = pl.ds(pl.multiple_of((g * rows + i) * tm, tm), tm)
            xa = xa_ref[rs, :]
            u = jnp.zeros((tm, r), f32)
            out = []
            for j, cj in enumerate(cols):
                d = dy_ref[rs, cj]
                u = u + jax.lax.dot_general(d, b_blocks[j], dims_u, preferred_element_type=f32)
                out.append(acc[j] + jax.lax.dot_general(xa, d, dims_b, preferred_element_type=f32))
            u_ref[c, rs, :] = u
            return tuple(out)

        acc = jax.lax.fori_loop(0, rows, row_block, tuple(jnp.zeros((r, tn), f32) for _ in range(band)))
        for j, cj in enumerate(cols):
            db_ref[g, :, cj] = acc[j]

    kwargs = {}
    if not interpret:
        from jax.experimental.pallas import triton as pl_triton

        kwargs["compiler_params"] = pl_triton.CompilerParams(num_warps=tiles.warps, num_stages=tiles.stages)
    return pl.pallas_call(
        jlora_dy_products, grid=(groups, bands), interpret=interpret,
        out_shape=(jax.ShapeDtypeStruct((bands, m, r), f32), jax.ShapeDtypeStruct((groups, r, n), f32)),
        **kwargs)(dy, b, xa)


def products_f32(dy: jax.Array, b: jax.Array, xa: jax.Array, *, impl: str = "xla",
                 tiles: DyTiles | None = None) -> tuple[jax.Array, jax.Array]:
    """``(dy·Bᵀ, xaᵀ·dy)`` in float32, unscaled: the kernel where ``impl`` asks for it and it
    :func:`takes` the shapes, else two XLA matmuls. The sharded call runs this on each device's
    blocks (``jlora._fused``), so a block too small for the kernel still gets a result."""
    if impl not in ("triton", "interpret", "xla"):
        raise ValueError(f"impl must be 'triton', 'interpret' or 'xla', got {impl!r}")
    tiles = tiles or DEFAULT_DY_TILES
    if impl != "xla" and takes(dy.shape[0], dy.shape[1], b.shape[0], dy.dtype, tiles=tiles):
        up, dbp = _triton_products(dy, b, xa, tiles=tiles, interpret=impl == "interpret")
        # one consumer for the call: inside a loop body XLA:GPU once duplicated a custom call that read
        # a slice of a stacked weight into its consumers (jlora._fused, the same barrier there)
        up, dbp = jax.lax.optimization_barrier((up, dbp))
        return up.sum(axis=0), dbp.sum(axis=0)
    f32 = jnp.float32
    return jnp.dot(dy, b.T, preferred_element_type=f32), jnp.dot(xa.T, dy, preferred_element_type=f32)


def dy_products(dy: jax.Array, b: jax.Array, xa: jax.Array, *, scale: float, impl: str = "xla",
                tiles: DyTiles | None = None) -> tuple[jax.Array, jax.Array]:
    """``(s·dy·Bᵀ, xaᵀ·dy)``, the LoRA backward's two products of ``dy``, reading ``dy`` once.

    Args:
      dy: the output gradient ``(M, N)``.
      b: ``B`` as stored, ``(r, N)``, in ``dy``'s dtype.
      xa: ``s·x·A``, ``(M, r)``, in ``dy``'s dtype.
      scale: ``s``, applied to the first product.
      impl: ``"triton"`` (the one-pass kernel, on a CUDA GPU), ``"interpret"`` (the same kernel run
        by Pallas' interpreter, for tests on any device) or ``"xla"`` (two matmuls). Shapes the
        kernel does not take (:func:`takes`) get the two matmuls whatever ``impl`` says.
      tiles: the kernel's blocking (default :data:`DEFAULT_DY_TILES`).

    Returns:
      ``u`` ``(M, r)`` in ``dy``'s dtype and ``dB`` ``(r, N)`` in ``b``'s dtype, both accumulated in
      float32.

    Example:
      >>> import jax.numpy as jnp
      >>> u, db = dy_products(jnp.ones((4, 3)), jnp.ones((2, 3)), jnp.ones((4, 2)), scale=0.5)
      >>> u[0].tolist(), db[0].tolist()
      ([1.5, 1.5], [4.0, 4.0, 4.0])
    """
    u, db = products_f32(dy, b, xa, impl=impl, tiles=tiles)
    return (scale * u).astype(dy.dtype), db.astype(b.dtype)


@functools.lru_cache(maxsize=None)
def triton_unavailable() -> str | None:
    """Why the kernel cannot run here (None when it can): it needs a CUDA GPU (JAX's default
    device; a ROCm GPU reports another ``platform_version``)."""
    try:
        dev = jax.devices()[0]
        if dev.platform != "gpu" or "cuda" not in str(getattr(dev.client, "platform_version", "")).lower():
            return f"no CUDA GPU ({dev.device_kind})"
    except Exception as e:  # no backend at all
        return f"no CUDA GPU ({type(e).__name__})"
    return None
