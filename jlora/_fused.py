"""The LoRA matmul with the rank-r update inside the base matmul's epilogue (Hopper GPUs).

``lora_matmul(x, w0, a, b, scale=s)`` is ``x·W0 + s·(x·A)·B`` for a 2-D kernel ``W0 (K, N)``. Plain XLA
computes it as three matmuls and an add: the rank-r product ``(x·A)·B`` is written as a full
``M × N`` array and read back to be added to ``x·W0``; the backward does the same for ``dx``. Those
extra passes over ``M × N`` activations are most of LoRA's cost over the frozen model (the
performance model in docs/architecture.md). Here one kernel computes each output tile of ``x·W0`` and, before storing it,
adds ``u_tile · v_tile`` with ``u = s·(x·A)`` (``M × r``) and ``v = B``: one more tensor-core
instruction per tile and an ``M × r`` read. The backward's ``dx = dy·W0ᵀ + s·(dy·Bᵀ)·Aᵀ`` is the same
kernel over ``W0ᵀ`` (one transposed copy of the weight per step, a few MB). ``x·A``, ``dy·Bᵀ``,
``dA`` and ``dB`` stay XLA matmuls: they are thin.

The kernel is a Pallas Mosaic GPU kernel (wgmma, TMA copies, warp-specialized, persistent), so it
needs an sm_90 GPU (H100/H200) and shapes divisible by its tiles (:func:`supported`).
``impl="xla"`` is the same function, custom VJP included, written with plain ``jnp``: the reference
in tests (wherever the kernel does not apply, the interpreter uses its general LoRA rule instead).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["lora_matmul", "supported", "unavailable", "Tiles"]


class Tiles(NamedTuple):
    """Tile shape of the Hopper (Mosaic GPU) kernel: two compute warpgroups side by side along N."""

    tile_m: int = 128
    tile_n: int = 128  # per warpgroup; a CTA computes tile_m × 2·tile_n
    tile_k: int = 64
    steps: int = 3  # pipeline depth (shared-memory stages)
    epi: int = 64  # epilogue store tile (epi × epi)
    slots: int = 2  # epilogue store buffers per warpgroup
    width: int = 4  # output tiles walked in bands this wide (L2 reuse)
    r_align: int = 16  # the rank is zero-padded to a multiple of this (wgmma's K step)


def _mosaic_fused(x, w, u, v, *, tiles: "Tiles"):
    """``x·w + u·v`` on Hopper: a persistent, warp-specialized wgmma matmul whose accumulator gets
    one more wgmma, ``u_tile · v_tile`` (K = r), before the epilogue stores it. All 2-D, bf16/f16,
    ``r`` a multiple of 16, shapes divisible by the tiles."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from jax.extend import backend

    m, k = x.shape
    n = w.shape[1]
    r = u.shape[1]
    dtype = x.dtype
    tm, tn, tk, epi = tiles.tile_m, tiles.tile_n, tiles.tile_k, tiles.epi
    ctn = 2 * tn
    m_iters, n_iters, k_iters = m // tm, n // ctn, k // tk

    def tf(minor_elems):
        sw = plgpu.find_swizzle(minor_elems * jnp.dtype(dtype).itemsize * 8)
        return (plgpu.TilingTransform((8, sw // jnp.dtype(dtype).itemsize)),
                plgpu.SwizzleTransform(sw))

    main_tf, low_tf, out_tf = tf(tk), tf(r), tf(epi)  # wgmma wants one swizzle for both operands

    def body(x_gmem, w_gmem, u_gmem, v_gmem, out_gmem):
        def pipeline(mma, ctx):
            return plgpu.emit_pipeline_warp_specialized(
                mma, grid=(k_iters,), memory_registers=40,
                in_specs=[plgpu.BlockSpec((tm, tk), lambda kk: (0, kk), transforms=main_tf,
                                          memory_space=plgpu.SMEM),
                          plgpu.BlockSpec((tk, ctn), lambda kk: (kk, 0), transforms=main_tf,
                                          memory_space=plgpu.SMEM)],
                wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=tiles.steps,
                compute_context=ctx)

        nothing = lambda *_, **__: None

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline(nothing, nothing).get_allocations(x_gmem, w_gmem),
            u_smem=plgpu.SMEM((2, tm, r), dtype, transforms=low_tf),
            v_smem=plgpu.SMEM((2, r, tn), dtype, transforms=low_tf),
            out_smem=plgpu.SMEM((2, tiles.slots, epi, epi), dtype, transforms=out_tf),
            bars=plgpu.Barrier(num_barriers=4),
            collective_axes="wg",
        )
        def scope(allocs, u_smem, v_smem, out_smem, bars):
            wg = jax.lax.axis_index("wg")

            @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
            def tile_loop(info):
                (lin,) = info.index
                mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), 1, tiles.width)
                rows = pl.ds(mi * tm, tm)
                cols = pl.ds(ni * ctn, ctn)
                wg_cols = pl.ds(ni * ctn + wg * tn, tn)

                def ctx(run):
                    @functools.partial(pl.run_scoped, acc=plgpu.ACC((tm, tn), jnp.float32))
                    def acc_scope(acc):
                        # this tile's u rows and v columns arrive while the main loop runs
                        plgpu.copy_gmem_to_smem(u_gmem.at[rows], u_smem.at[wg], bars.at[2 * wg])
                        plgpu.copy_gmem_to_smem(v_gmem.at[:, wg_cols], v_smem.at[wg],
                                                bars.at[2 * wg + 1])
                        run(acc)  # acc = x_tile · w_tile over all of K
                        plgpu.barrier_wait(bars.at[2 * wg])
                        plgpu.barrier_wait(bars.at[2 * wg + 1])
                        plgpu.wgmma(acc, u_smem.at[wg], v_smem.at[wg])  # acc += u_tile · v_tile
                        plgpu.wgmma_wait(0)
                        res = acc[...].astype(dtype)
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        for ei in range(tm // epi):
                            for ej in range(tn // epi):
                                slot = (ei * (tn // epi) + ej) % tiles.slots
                                plgpu.wait_smem_to_gmem(tiles.slots - 1, wait_read_only=True)
                                out_smem[wg, slot] = res[ei * epi:(ei + 1) * epi, ej * epi:(ej + 1) * epi]
                                plgpu.commit_smem()
                                plgpu.copy_smem_to_gmem(
                                    out_smem.at[wg, slot],
                                    out_gmem.at[pl.ds(mi * tm + ei * epi, epi),
                                                pl.ds(ni * ctn + wg * tn + ej * epi, epi)])

                def mma(idxs, x_smem, w_smem, acc):
                    plgpu.wgmma(acc, x_smem, w_smem.at[:, pl.ds(wg * tn, tn)])
                    plgpu.wgmma_wait(0)
                    return acc

                pipeline(mma, ctx)(x_gmem.at[rows, :], w_gmem.at[:, cols], allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    f = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((m, n), dtype),
        grid=(backend.get_default_device().core_count,), grid_names=("sm",),
        num_threads=3, thread_name="wg",  # two compute warpgroups and one that issues the copies
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    return f(x, w, u, v)


DEFAULT_TILES = Tiles()


def supported(m: int, k: int, n: int, dtype, *, tiles: Tiles | None = None) -> bool:
    """Whether the kernel takes an ``(m, k)·(k, n)`` LoRA matmul, forward and backward."""
    t = tiles or DEFAULT_TILES
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and m % t.tile_m == 0 and n % (2 * t.tile_n) == 0 and k % (2 * t.tile_n) == 0
            and k % t.tile_k == 0 and n % t.tile_k == 0)


@functools.lru_cache(maxsize=None)
def unavailable() -> str | None:
    """Why the kernel cannot run in this process, or None when it can.

    It needs JAX's default device to be an sm_90 GPU with Pallas' Mosaic GPU backend, and exactly one
    visible device: the kernel is a custom call that XLA cannot partition, so under sharding it would
    be replicated (every operand gathered) rather than fail.
    """
    try:
        devs = jax.devices()
        dev = devs[0]
        if dev.platform != "gpu" or not str(getattr(dev, "compute_capability", "")).startswith("9"):
            return f"no sm_90 GPU ({dev.device_kind})"
        if len(devs) > 1:
            return (f"{len(devs)} devices visible; the kernel runs on one device only "
                    f"(e.g. CUDA_VISIBLE_DEVICES=0)")
        from jax.experimental.pallas import mosaic_gpu  # noqa: F401
    except Exception as e:  # no GPU backend, or a JAX without Mosaic GPU
        return f"Pallas Mosaic GPU unavailable ({type(e).__name__})"
    return None


def _pad_rank(t, axis: int, align: int):
    pad = -t.shape[axis] % align
    if not pad:
        return t
    widths = [(0, 0)] * t.ndim
    widths[axis] = (0, pad)
    return jnp.pad(t, widths)


def _matmul_plus_low_rank(x, w, u, v, *, scale: float, impl: str, tiles: Tiles):
    """``x·w + scale·u·v`` (all 2-D), in the kernel or in plain XLA."""
    if impl == "xla":
        base = jnp.dot(x, w, preferred_element_type=jnp.float32)
        low = jnp.dot(u, v, preferred_element_type=jnp.float32)
        return (base + scale * low).astype(x.dtype)
    us = (u.astype(jnp.float32) * scale).astype(x.dtype)  # M × r: folding s here is free
    return _mosaic_call(x, w, _pad_rank(us, 1, tiles.r_align), _pad_rank(v, 0, tiles.r_align),
                        tiles=tiles)


# A jitted wrapper, so that every call with the same shapes is one traced jaxpr: JAX then lowers the
# kernel once per shape in a whole model (a 16-layer unrolled model has 224 call sites, 3 shapes).
_mosaic_call = jax.jit(_mosaic_fused, static_argnames=("tiles",))


# The custom VJP takes x with its leading axes (reshaped to 2-D inside): its residual is then the very
# array the rest of the model keeps for its own backward, not a reshaped twin (under lax.scan a twin
# was stacked per layer as a second copy of the adapted inputs, seen in the H200's optimized HLO).
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _lora_matmul(x, w0, a, b, scale, impl, tiles):
    return _fwd(x, w0, a, b, scale, impl, tiles)[0]


def _fwd(x, w0, a, b, scale, impl, tiles):
    x2 = x.reshape(-1, x.shape[-1])
    xa = jnp.dot(x2, a, preferred_element_type=jnp.float32).astype(x.dtype)
    y = _matmul_plus_low_rank(x2, w0, xa, b, scale=scale, impl=impl, tiles=tiles)
    return y.reshape(*x.shape[:-1], y.shape[-1]), (x, w0, a, b, xa)


def _bwd(scale, impl, tiles, res, g):
    x, w0, a, b, xa = res
    f32 = jnp.float32
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    gb = jnp.dot(g2, b.T, preferred_element_type=f32).astype(g.dtype)  # dy·Bᵀ  (M, r)
    dx = _matmul_plus_low_rank(g2, w0.T, gb, a.T, scale=scale, impl=impl, tiles=tiles)
    da = (scale * jnp.dot(x2.T, gb, preferred_element_type=f32)).astype(a.dtype)
    db = (scale * jnp.dot(xa.T, g2, preferred_element_type=f32)).astype(b.dtype)
    return dx.reshape(x.shape), None, da, db  # W0 is frozen: no gradient, not even one XLA drops


_lora_matmul.defvjp(_fwd, _bwd)


def lora_matmul(x: jax.Array, w0: jax.Array, a: jax.Array, b: jax.Array, *, scale: float,
                impl: str = "mosaic", tiles: Tiles | None = None) -> jax.Array:
    """``x·W0 + scale·(x·A)·B`` with the rank-r update fused into the base matmul.

    Args:
      x: activations ``(..., K)``.
      w0: the frozen kernel ``(K, N)``.
      a: ``(K, r)``; cast to ``x``'s dtype.
      b: ``(r, N)``; cast to ``x``'s dtype.
      scale: ``alpha / r``.
      impl: ``"mosaic"`` (the Hopper kernel; see :func:`supported`) or ``"xla"`` (plain ``jnp``,
        any device).
      tiles: the kernel's tile shape (default :data:`DEFAULT_TILES`, tuned on an H200).

    Returns:
      ``(..., N)`` in ``x``'s dtype; gradients flow to ``x``, ``a`` and ``b``. ``w0`` is frozen: its
      gradient is zero, and no ``xᵀ·dy`` is ever computed for it.

    Example:
      >>> import jax.numpy as jnp
      >>> from jlora._fused import lora_matmul
      >>> x = jnp.ones((2, 4)); w0 = jnp.eye(4); a = jnp.ones((4, 1)); b = jnp.ones((1, 4))
      >>> lora_matmul(x, w0, a, b, scale=0.5, impl="xla")[0]
      Array([3., 3., 3., 3.], dtype=float32)
    """
    if impl not in ("mosaic", "xla"):
        raise ValueError(f"impl must be 'mosaic' or 'xla', got {impl!r}")
    dt = x.dtype
    return _lora_matmul(x, w0.astype(dt), a.astype(dt), b.astype(dt), float(scale), impl,
                        tiles or DEFAULT_TILES)
