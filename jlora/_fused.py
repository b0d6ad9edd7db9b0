"""The LoRA matmul with the rank-r update inside the base matmul's epilogue (Hopper GPUs).

``lora_matmul(x, w0, a, b, scale=s)`` is ``x·W0 + s·(x·A)·B`` for a 2-D kernel ``W0 (K, N)``. Plain XLA
computes it as three matmuls and an add: the rank-r product ``(x·A)·B`` is written as a full
``M × N`` array and read back to be added to ``x·W0``; the backward does the same for ``dx``. Those
extra passes over ``M × N`` activations are most of LoRA's cost over the frozen model (the
performance model in docs/architecture.md). Here one kernel computes each output tile of ``x·W0`` and, before storing it,
adds ``u_tile · v_tile`` with ``u = s·(x·A)`` (``M × r``) and ``v = B``: one more tensor-core
instruction per tile and an ``M × r`` read. The backward's ``dx = dy·W0ᵀ + s·(dy·Bᵀ)·Aᵀ`` is the same
kernel reading ``W0`` as stored (a transposed view of each shared-memory tile, so no ``W0ᵀ`` copy is
ever written: inside a scanned model XLA kept such copies for the whole backward). ``x·A`` and ``dA``
stay XLA matmuls: they are thin (and XLA merges those of adapters that read the same ``x``). The
backward's two products of ``dy``, ``s·dy·Bᵀ`` and ``dB``, are one Pallas Triton kernel that reads
``dy`` once on a CUDA GPU, at a (padded) rank of 16 and for blocks it takes; elsewhere two XLA
matmuls (:mod:`jlora._dy_pass`; ``Tiles.dy_pass``).

The kernel is a Pallas Mosaic GPU kernel (wgmma, TMA copies, warp-specialized, persistent), so it
needs an sm_90 GPU (H100/H200), shapes divisible by its tiles (:func:`supported`) and a rank whose
low-rank tiles fit in shared memory beside the pipeline's (up to 64 with the default tiles: :func:`fitted`).
``impl="xla"`` is the same function, custom VJP included, written with plain ``jnp``: the reference
in tests (wherever the kernel does not apply, the interpreter uses its general LoRA rule instead).

Under SPMD sharding the kernel call is partitioned (``custom_partitioning``, below): each device runs
it on its own rows of ``x``; see "the kernel call under SPMD partitioning". The custom VJP sits behind
one ``jax.jit`` per shape, so that a model's call sites share one trace. Inside ``lax.scan``/``while``
bodies the kernel is taken too, unless ``JLORA_FUSED_IN_LOOPS=0`` (:func:`in_loops`).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental.custom_partitioning import custom_partitioning

from jlora import _compat as jax_compat
from jlora import _dy_pass

__all__ = ["SMEM_BYTES", "Tiles", "fitted", "in_loops", "lora_matmul", "max_rank", "padded_rank", "smem_bytes",
           "supported", "unavailable"]

#: Environment switch: ``JLORA_FUSED_IN_LOOPS=0`` keeps ``matmul="pallas"`` out of ``lax.scan``/
#: ``while`` bodies (the plain path there). On by default: in a scanned model the kernel is 5–8 %
#: faster than the plain path and XLA plans no more device memory for it (benchmarks/RESULTS.md,
#: sixth session; before the kernel read W0 as stored it planned up to 8.8 GiB more).
IN_LOOPS_ENV = "JLORA_FUSED_IN_LOOPS"


_OFF = ("0", "false", "no", "off")
_ON = ("", "1", "true", "yes", "on")


def in_loops() -> bool:
    """Whether the interpreter takes the fused kernel inside loop bodies (read at every trace):
    yes unless ``JLORA_FUSED_IN_LOOPS`` is ``0`` (or ``false``, ``no``, ``off``; any case).

    Raises:
        ValueError: the variable holds anything else (a misspelt switch is not read as "on").
    """
    value = os.environ.get(IN_LOOPS_ENV, "").strip().lower()
    if value not in _OFF + _ON:
        raise ValueError(
            f"{IN_LOOPS_ENV}={os.environ[IN_LOOPS_ENV]!r} is not a switch jlora reads: set it to 0, "
            "false, no or off to keep matmul='pallas' out of lax.scan/while bodies, to 1, true, yes or "
            "on (or unset it) to take the kernel there."
        )
    return value not in _OFF


class Tiles(NamedTuple):
    """Tile shape of the Hopper (Mosaic GPU) kernel (two compute warpgroups side by side along N), and
    how the backward computes its two products of ``dy`` (``dy_pass``)."""

    tile_m: int = 128
    tile_n: int = 128  # per warpgroup; a CTA computes tile_m × 2·tile_n
    tile_k: int = 64
    steps: int = 3  # pipeline depth (shared-memory stages)
    epi: int = 64  # epilogue store tile (epi × epi)
    slots: int = 2  # epilogue store buffers per warpgroup
    width: int = 8  # output tiles walked in bands this wide (L2 reuse)
    r_align: int = 16  # the rank is zero-padded to a multiple of this (wgmma's K step)
    # the backward's s·dy·Bᵀ and dB: "auto" (one pass over dy, jlora._dy_pass, with the Mosaic kernel on
    # a CUDA GPU at a padded rank of 16, where it wins; else two XLA matmuls), "triton" (the one-pass
    # kernel at padded ranks up to 64: a CUDA GPU only), "interpret" (tests) or "xla"
    dy_pass: str = "auto"
    # CTAs per cluster along M (1 or 2; 2 and width 8 measured 1-5 % faster per call than 1 and 4 on the H200,
    # results/tiles_sweep_s10.txt): with 2, two CTAs take neighbouring row tiles and W0's tile
    # reaches both through one multicast TMA copy (half the W0 traffic from L2); a call whose rows are
    # not a whole number of cluster tiles runs with 1
    cluster: int = 2
    # how Pallas lowers the kernel body (Mosaic GPU's lowering semantics): "warpgroup" (its dialect,
    # then its layout inference) or "lane" (per-thread arrays, lowered directly: about 18 % less
    # lowering time, the same speed and results on the H200, benchmarks/RESULTS.md, twelfth session)
    lowering: str = "warpgroup"


def _mosaic_fused(x, w, u, v, *, tiles: "Tiles", w_t: bool = False, v_t: Optional[bool] = None):
    """``x·w + u·v`` on Hopper: a persistent, warp-specialized wgmma matmul whose accumulator gets
    one more wgmma, ``u_tile · v_tile`` (K = r), before the epilogue stores it. All 2-D, bf16/f16,
    ``r`` a multiple of 16, shapes divisible by the tiles. With ``w_t``, ``w`` is ``(N, K)`` and ``v``
    is ``(N, r)``, and the kernel computes ``x·wᵀ + u·vᵀ``: its tiles of both are loaded as stored
    and handed to wgmma through transposed views, so no transposed copy is ever written (the
    backward's ``dy·W0ᵀ + s·(dy·Bᵀ)·Aᵀ`` takes ``W0`` and ``A`` as they are). ``v_t`` (default: ``w_t``)
    says separately whether ``v`` is given ``(N, r)``; ``w_t`` with ``v_t=False`` takes ``v`` as
    ``(r, N)``.

    Longer than the project's 60 lines, on purpose: a Pallas Mosaic GPU kernel is one closure over
    its tiles, scoped allocations and barriers (the nested ``jlora_fused_matmul`` body is the
    kernel itself), and splitting it would pass a dozen of those between functions."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from jax.extend import backend

    m, k = x.shape
    n = w.shape[0] if w_t else w.shape[1]
    r = u.shape[1]
    v_t = w_t if v_t is None else v_t
    dtype = x.dtype
    tm, tn, tk, epi = tiles.tile_m, tiles.tile_n, tiles.tile_k, tiles.epi
    ctn = 2 * tn
    cl = tiles.cluster if m % (tiles.cluster * tm) == 0 else 1  # a preference: whole row tiles otherwise
    m_iters, n_iters, k_iters = m // (cl * tm), n // ctn, k // tk
    shared = ("cluster",) if cl > 1 else ()

    def tf(minor_elems):
        sw = plgpu.find_swizzle(minor_elems * jnp.dtype(dtype).itemsize * 8)
        return (plgpu.TilingTransform((8, sw // jnp.dtype(dtype).itemsize)),
                plgpu.SwizzleTransform(sw))

    main_tf, low_tf, out_tf = tf(tk), tf(r), tf(epi)  # wgmma wants one swizzle for both operands

    def jlora_fused_matmul(x_gmem, w_gmem, u_gmem, v_gmem, out_gmem):  # the kernel's name in profiles
        def pipeline(mma, ctx):
            return plgpu.emit_pipeline_warp_specialized(
                mma, grid=(k_iters,), memory_registers=40,
                in_specs=[plgpu.BlockSpec((tm, tk), lambda kk: (0, kk), transforms=main_tf,
                                          memory_space=plgpu.SMEM),
                          plgpu.BlockSpec((ctn, tk), lambda kk: (0, kk), transforms=main_tf,
                                          memory_space=plgpu.SMEM, collective_axes=shared) if w_t else
                          plgpu.BlockSpec((tk, ctn), lambda kk: (kk, 0), transforms=main_tf,
                                          memory_space=plgpu.SMEM, collective_axes=shared)],
                wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=tiles.steps,
                compute_context=ctx)

        nothing = lambda *_, **__: None

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline(nothing, nothing).get_allocations(x_gmem, w_gmem),
            u_smem=plgpu.SMEM((2, tm, r), dtype, transforms=low_tf),
            v_smem=plgpu.SMEM((2, tn, r) if v_t else (2, r, tn), dtype, transforms=low_tf),
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
                if cl > 1:  # this CTA's row tile of its cluster's
                    mi = mi * cl + jax.lax.axis_index("cluster")
                rows = pl.ds(mi * tm, tm)
                cols = pl.ds(ni * ctn, ctn)
                wg_cols = pl.ds(ni * ctn + wg * tn, tn)

                def ctx(run):
                    @functools.partial(pl.run_scoped, acc=plgpu.ACC((tm, tn), jnp.float32))
                    def acc_scope(acc):
                        # this tile's u rows and v columns arrive while the main loop runs
                        plgpu.copy_gmem_to_smem(u_gmem.at[rows], u_smem.at[wg], bars.at[2 * wg])
                        plgpu.copy_gmem_to_smem(v_gmem.at[wg_cols, :] if v_t else v_gmem.at[:, wg_cols],
                                                v_smem.at[wg], bars.at[2 * wg + 1])
                        run(acc)  # acc = x_tile · w_tile over all of K
                        plgpu.barrier_wait(bars.at[2 * wg])
                        plgpu.barrier_wait(bars.at[2 * wg + 1])
                        v_tile = plgpu.transpose_ref(v_smem.at[wg], (1, 0)) if v_t else v_smem.at[wg]
                        plgpu.wgmma(acc, u_smem.at[wg], v_tile)  # acc += u_tile · v_tile
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
                    if w_t:  # this warpgroup's (tn, tk) rows of the K-minor tile, seen as (tk, tn)
                        w_tile = plgpu.transpose_ref(w_smem.at[pl.ds(wg * tn, tn), :], (1, 0))
                    else:
                        w_tile = w_smem.at[:, pl.ds(wg * tn, tn)]
                    plgpu.wgmma(acc, x_smem, w_tile)
                    plgpu.wgmma_wait(0)
                    return acc

                w_block = w_gmem.at[cols, :] if w_t else w_gmem.at[:, cols]
                pipeline(mma, ctx)(x_gmem.at[rows, :], w_block, allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    f = plgpu.kernel(
        jlora_fused_matmul, out_type=jax.ShapeDtypeStruct((m, n), dtype),
        grid=(backend.get_default_device().core_count // cl,), grid_names=("sm",),
        **(dict(cluster=(cl,), cluster_names=("cluster",)) if cl > 1 else {}),
        num_threads=3, thread_name="wg",  # two compute warpgroups and one that issues the copies
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=getattr(plgpu.LoweringSemantics, _SEMANTICS[tiles.lowering])))
    return f(x, w, u, v)


DEFAULT_TILES = Tiles()


_SEMANTICS = {"lane": "Lane", "warpgroup": "Warpgroup"}  # Tiles.lowering -> plgpu.LoweringSemantics


#: Shared memory one CTA may use on sm_90 (H100, H200: 227 KiB), the bound Mosaic GPU checks against.
SMEM_BYTES = 232448


def smem_bytes(tiles: Tiles, r: int, itemsize: int = 2) -> int:
    """Shared memory the kernel asks for at padded rank ``r`` (the forward and the ``dx`` call alike):
    the pipeline's ``steps`` stages of an x tile and a W0 tile, two warpgroups' low-rank tiles of
    ``u`` and ``v``, the epilogue's store buffers and the barriers, as Mosaic GPU counts them."""
    stages = tiles.steps * (tiles.tile_m + 2 * tiles.tile_n) * tiles.tile_k
    low = 2 * (tiles.tile_m + tiles.tile_n) * r
    out = 2 * tiles.slots * tiles.epi * tiles.epi
    return (stages + low + out) * itemsize + 8 * (4 + 2 * tiles.steps)


def fitted(tiles: Tiles, r: int) -> Tiles | None:
    """``tiles`` if the kernel fits in shared memory at padded rank ``r``, else the same with one
    epilogue store buffer (the low-rank tiles grow with the rank: at 64 the defaults ask for 245,840
    bytes), else None: the rank is too large for these tiles."""
    for t in (tiles, tiles._replace(slots=1)):
        if smem_bytes(t, r) <= SMEM_BYTES:
            return t
    return None


def padded_rank(r: int, tiles: Tiles | None = None) -> int:
    """The rank as the kernel takes it: zero-padded to a multiple of ``tiles.r_align``."""
    align = (tiles or DEFAULT_TILES).r_align
    return -(-r // align) * align


def max_rank(tiles: Tiles | None = None) -> int:
    """The largest rank the kernel takes with ``tiles`` (:func:`fitted`; 0: none)."""
    t = tiles or DEFAULT_TILES
    r = 0
    while fitted(t, r + t.r_align) is not None:
        r += t.r_align
    return r


def supported(m: int, k: int, n: int, dtype, *, tiles: Tiles | None = None) -> bool:
    """Whether the kernel takes an ``(m, k)·(k, n)`` LoRA matmul, forward and backward (the rank is
    :func:`fitted`'s question)."""
    t = tiles or DEFAULT_TILES
    return (_dy_pass.is_16bit_float(dtype)
            and m % t.tile_m == 0 and n % (2 * t.tile_n) == 0 and k % (2 * t.tile_n) == 0
            and k % t.tile_k == 0 and n % t.tile_k == 0)


@functools.lru_cache(maxsize=None)
def unavailable() -> str | None:
    """Why the kernel cannot run in this process, or None when it can.

    It needs JAX's default device to be an sm_90 GPU with Pallas' Mosaic GPU backend. Several
    devices are fine: under SPMD sharding the kernel call is partitioned (``custom_partitioning``),
    each device running it on its own blocks.
    """
    try:
        dev = jax.devices()[0]
        if dev.platform != "gpu" or not str(getattr(dev, "compute_capability", "")).startswith("9"):
            return f"no sm_90 GPU ({dev.device_kind})"
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


def _takes(m: int, k: int, n: int, dtype, tiles: Tiles) -> bool:
    """Whether one kernel call ``(m, k)·(k, n)`` fits the tiles (the forward or the dx call alone)."""
    return (_dy_pass.is_16bit_float(dtype)
            and m % tiles.tile_m == 0 and n % (2 * tiles.tile_n) == 0 and k % tiles.tile_k == 0)


def _local_plus_low_rank(x, w, u, v, *, impl: str, tiles: Tiles, w_t: bool = False, k_axes: tuple = ()):
    """``x·w + u·v`` (all 2-D; ``x·wᵀ + u·vᵀ`` with ``w_t``, ``w`` then ``(N, K)`` and ``v`` ``(N, r)``)
    on one device's blocks, in the kernel or in plain XLA. The LoRA scale is already in ``u``.

    ``k_axes``: mesh axes over which the contracted K is split (x's columns and w's K axis): each
    device then adds its partial product and ``u·v`` is added on the first of them only. A block
    whose shape does not fit the tiles (a batch split too finely) takes the plain XLA form."""
    if k_axes:  # u·v once in the sum over the K shards
        u = jnp.where(jax.lax.axis_index(k_axes) == 0, u, jnp.zeros_like(u))
    n = w.shape[0] if w_t else w.shape[1]
    if impl == "xla" or not _takes(x.shape[0], x.shape[1], n, x.dtype, tiles):
        base = jax.lax.dot_general(x, w, (((1,), (1 if w_t else 0,)), ((), ())),
                                   preferred_element_type=jnp.float32)
        low = jax.lax.dot_general(u, v, (((1,), (1 if w_t else 0,)), ((), ())),
                                  preferred_element_type=jnp.float32)
        y = (base + low).astype(x.dtype)
    else:
        # with w_t the kernel reads w (N, K) and v (N, r) as stored and transposes tiles in shared memory;
        # the transposed low-rank tile is checked on the H200 at a padded rank of 16 only (a 32-byte
        # swizzle), so other ranks hand the kernel vᵀ, the form checked since the second session
        us = _pad_rank(u, 1, tiles.r_align)
        v_t = w_t and us.shape[1] == _V_T_RANK
        v = v.T if w_t and not v_t else v
        fit = fitted(tiles, us.shape[1])  # lora_matmul refused the ranks that fit no tiles
        y = _mosaic_call(x, w, us, _pad_rank(v, 1 if v_t else 0, tiles.r_align), tiles=fit, w_t=w_t, v_t=v_t)
        # One consumer for the call: inside a loop body XLA:GPU wraps a custom call that reads a
        # slice of a stacked weight into a dynamic-slice fusion, and then duplicated that fusion
        # into its consumers, running the kernel twice (3 of 7 projections a layer, H200,
        # benchmarks/RESULTS.md). The barrier stops that and costs nothing unrolled.
        y = jax.lax.optimization_barrier(y)
    return jax.lax.psum(y, k_axes) if k_axes else y


# A jitted wrapper, so that every call with the same shapes is one traced jaxpr: JAX then lowers the
# kernel once per shape in a whole model (a 16-layer unrolled model has 224 call sites, 3 shapes).
_mosaic_call = jax.jit(_mosaic_fused, static_argnames=("tiles", "w_t", "v_t"))
_V_T_RANK = 16  # the padded rank at which the kernel reads v (N, r) as stored


# -- the kernel call under SPMD partitioning ---------------------------------------------------------------
#
# A custom call is opaque to XLA's partitioner: left alone, under sharding it would be replicated (every
# operand gathered onto every device). ``custom_partitioning`` tells the partitioner how to split it:
# rows of x and u (M) follow x's batch sharding; the contracted K stays split where x arrives split along
# it (a row-parallel kernel: each device multiplies its blocks, then one psum), else it is whole (an FSDP
# kernel, rows split and x not, is all-gathered per use, as XLA does for the base matmul); columns of w
# and v (N) may stay split (a column-parallel kernel gives a column-parallel output); the rank is whole.
# The backward's dx call takes W0 itself, not W0ᵀ (``w_t``), so that an FSDP kernel's all-gather is
# the forward's, which XLA reuses, not a second one of a transposed copy. On one device the wrapper
# lowers to the plain call: nothing is added.


def _axes(entry) -> tuple:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _entry(axes: tuple):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _named(mesh, *axes: tuple) -> jax.sharding.NamedSharding:
    """The sharding that splits each array axis over the mesh axes given for it."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*map(_entry, axes)))


def _spec2(sharding) -> tuple | None:
    """A 2-D operand's per-axis mesh axes, or None for a sharding without axis names."""
    spec = getattr(sharding, "spec", None)
    if spec is None:
        return None
    entries = list(spec) + [None] * (2 - len(spec))
    return tuple(_axes(e) for e in entries)


def _plan(x, w, out, w_t: bool) -> tuple[tuple, tuple, tuple] | None:
    """``(m, k, n)``: the mesh axes of the partitioned call, from the operands' shardings (and the
    result's, where an operand leaves an axis free). None: shardings without axis names."""
    xs, ws = _spec2(x), _spec2(w)
    rs = _spec2(out) if out is not None else ((), ())
    if xs is None or ws is None or rs is None:
        return None
    w_n = ws[0] if w_t else ws[1]
    m = xs[0] or rs[0]
    k = tuple(a for a in xs[1] if a not in m)
    n = tuple(a for a in (w_n or rs[1]) if a not in m and a not in k)
    return m, k, n


def _partition(impl, tiles, w_t, mesh, arg_shapes, result_shape):
    x, w, u, v = (a.sharding for a in arg_shapes)
    plan = _plan(x, w, result_shape.sharding, w_t)
    if plan is None:  # shardings without axis names: the whole call on every device (correct, slow)
        rep = _replicated_like(x)
        return rep.mesh, functools.partial(_local_plus_low_rank, impl=impl, tiles=tiles, w_t=w_t), rep, (rep,) * 4
    m, k, n = plan
    named = functools.partial(_named, mesh)
    args = (named(m, k), named(n, k) if w_t else named(k, n), named(m, ()),
            named(n, ()) if w_t else named((), n))
    lower = functools.partial(_local_plus_low_rank, impl=impl, tiles=tiles, w_t=w_t, k_axes=k)
    return mesh, lower, named(m, n), args


def _replicated_like(sharding):
    import numpy as np

    devices = np.array(list(sharding._device_assignment))
    return jax.sharding.NamedSharding(jax.sharding.Mesh(devices, ("_all",)), jax.sharding.PartitionSpec())


def _infer(impl, tiles, w_t, mesh, arg_shapes, result_shape):
    """The result's sharding from the operands' (XLA's GSPMD propagation; Shardy, JAX's default,
    reads the ``sharding_rule`` instead)."""
    plan = _plan(arg_shapes[0].sharding, arg_shapes[1].sharding, None, w_t)
    if plan is None:
        return _replicated_like(arg_shapes[0].sharding)
    m, _, n = plan
    return _named(mesh, m, n)


def _rule(impl, tiles, w_t, mesh, operand_types, result_types):
    """Shardy's factors: m (rows of x, u, the result), n (columns of w or rows of wᵀ, of v, of the
    result), k and r contracted. Shardy never proposes a split of k or r (``need_replication``); the
    partition callback still keeps a K split that x already has."""
    w, v = ("n k", "n r") if w_t else ("k n", "r n")
    rule = f"m k, {w}, m r, {v} -> m n"
    if not jax_compat.shardy_rule_takes_options():  # JAX < 0.8: a plain einsum string; the partition callback copes
        return rule
    return rule, {"need_replication_factors": ("k", "r")}


def _plus_low_rank_whole(x, w, u, v, impl, tiles, w_t):
    return _local_plus_low_rank(x, w, u, v, impl=impl, tiles=tiles, w_t=w_t)


_partitioned = custom_partitioning(_plus_low_rank_whole, static_argnums=(4, 5, 6))
_partitioned.def_partition(_partition, infer_sharding_from_operands=_infer, sharding_rule=_rule)


@functools.lru_cache(maxsize=None)
def _row_batched(impl: str, tiles: Tiles, w_t: bool):
    """The partitioned call under ``jax.vmap``: ``custom_partitioning`` has no batching rule, but the
    call is row-wise in x and u, so a batch of them is more rows; a batch of kernels (w or v batched)
    takes the plain XLA form, batched by JAX."""

    @jax.custom_batching.custom_vmap
    def call(x, w, u, v):
        return _partitioned(x, w, u, v, impl, tiles, w_t)

    @call.def_vmap
    def rule(axis_size, in_batched, x, w, u, v):
        xb, wb, ub, vb = in_batched
        if wb or vb:
            plain = functools.partial(_local_plus_low_rank, impl="xla", tiles=tiles, w_t=w_t)
            return jax.vmap(plain, in_axes=tuple(0 if b else None for b in in_batched))(x, w, u, v), True
        x = x if xb else jnp.broadcast_to(x, (axis_size, *x.shape))
        u = u if ub else jnp.broadcast_to(u, (axis_size, *u.shape))
        y = call(x.reshape(-1, x.shape[-1]), w, u.reshape(-1, u.shape[-1]), v)
        return y.reshape(axis_size, -1, y.shape[-1]), True

    return call


def _partitioned_batchable(x, w, u, v, impl, tiles, w_t):
    return _row_batched(impl, tiles, w_t)(x, w, u, v)


# One jitted wrapper per (shapes, impl, tiles, w_t): every call site with the same shapes reuses one
# traced jaxpr (``custom_partitioning`` traces its function again at each call otherwise).
_partitioned_call = jax.jit(_partitioned_batchable, static_argnums=(4, 5, 6))


def _matmul_plus_low_rank(x, w, u, v, *, impl: str, tiles: Tiles, w_t: bool = False):
    """``x·w + u·v`` (``x·wᵀ + u·vᵀ`` with ``w_t``), all 2-D, in the kernel or in plain XLA;
    partitionable under SPMD. Callers fold the LoRA scale into ``u``."""
    return _partitioned_call(x, w, u, v, impl, tiles, w_t)


# The custom VJP takes x with its leading axes (reshaped to 2-D inside): its residual is then the very
# array the rest of the model keeps for its own backward, not a reshaped twin (under lax.scan a twin
# was stacked per layer as a second copy of the adapted inputs, seen in the H200's optimized HLO).
#
# x·A is computed *outside* it and passed in (named "jlora_xa", like the general rule's), so that a
# remat policy can keep it: a custom VJP's own residuals are invisible to jax.checkpoint's policies,
# and under a policy the backward re-ran x·A for every adapted matmul. The VJP gives x and A their
# whole gradients (through x·A too) and xa none, so the outer x·A adds nothing to them (a symbolic
# zero: its transpose is never computed).
#
# The scale s rides in the two thin matmuls' epilogues: xa is s·(x·A) and the backward's u is
# s·(dy·Bᵀ), so the kernel calls carry no scale and neither an M × r scaling pass nor Aᵀ is ever a
# kernel of its own (about 2 fewer kernels per adapted matmul a step; benchmarks/RESULTS.md).
@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _lora_matmul(x, xa, w0, a, b, scale, impl, tiles):
    return _fwd(x, xa, w0, a, b, scale, impl, tiles)[0]


def _fwd(x, xa, w0, a, b, scale, impl, tiles):
    x2, xa2 = x.reshape(-1, x.shape[-1]), xa.reshape(-1, xa.shape[-1])
    y = _matmul_plus_low_rank(x2, w0, xa2, b, impl=impl, tiles=tiles)  # xa is s·(x·A)
    return y.reshape(*x.shape[:-1], y.shape[-1]), (x, w0, a, b, xa)


def _bwd(scale, impl, tiles, res, g):
    x, w0, a, b, xa = res  # xa is s·(x·A)
    f32 = jnp.float32
    x2, g2, xa2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]), xa.reshape(-1, xa.shape[-1])
    gb, db = _dy_products(g2, b, xa2, scale, impl, tiles)  # s·dy·Bᵀ (M, r) and xaᵀ·dy (r, N)
    # dy·W0ᵀ + gb·Aᵀ with W0 and A read as stored
    dx = _matmul_plus_low_rank(g2, w0, gb, a, impl=impl, tiles=tiles, w_t=True)
    da = jnp.dot(x2.T, gb, preferred_element_type=f32).astype(a.dtype)
    # W0 is frozen: no gradient, not even one XLA drops; xa: none (x and A got its share above)
    return dx.reshape(x.shape), None, None, da, db


_lora_matmul.defvjp(_fwd, _bwd)


_DY_RANK = 16  # the padded rank at which "auto" takes the one-pass kernel (measured there)


def _dy_pass_form(impl: str, tiles: Tiles, rank: int = _DY_RANK) -> str:
    """How the backward computes its two products of dy: ``"triton"``, ``"interpret"`` or ``"xla"``
    (``rank``: the padded rank)."""
    if tiles.dy_pass not in ("auto", "triton", "interpret", "xla"):
        raise ValueError(f"Tiles.dy_pass={tiles.dy_pass!r}: use 'auto', 'triton', 'interpret' or 'xla'.")
    if tiles.dy_pass == "triton" and _dy_pass.triton_unavailable() is not None:
        raise ValueError(f"Tiles.dy_pass='triton' needs a CUDA GPU: {_dy_pass.triton_unavailable()}. "
                         "Use 'auto' to take the kernel where it runs.")
    if tiles.dy_pass != "auto":
        return tiles.dy_pass
    # auto: the padded rank at which the kernel wins on the H200 (16: 27 vs 33 µs and 64 vs 95 µs at
    # N = 2048 / 5632); at 32 it is about even, at 64 slower (benchmarks/results/dy_ranks_and_scan_hlo_s9.txt)
    return "triton" if impl == "mosaic" and rank == _DY_RANK and _dy_pass.triton_unavailable() is None else "xla"


def _padded_rank(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())  # a power of two ≥ 16: Triton's smallest dot


def _dy_products(g2: jax.Array, b: jax.Array, xa2: jax.Array, scale: float, impl: str,
                 tiles: Tiles) -> tuple[jax.Array, jax.Array]:
    """``(s·dy·Bᵀ, xaᵀ·dy)``: one pass over dy where :func:`_dy_pass_form` says so (the rank
    zero-padded to :func:`_padded_rank` and cut back), else two matmuls. The one-pass call is
    partitioned under SPMD like the kernel's (below)."""
    r = b.shape[0]
    rp = _padded_rank(r)
    form = _dy_pass_form(impl, tiles, rp)
    if form == "xla" or rp not in _dy_pass.RANKS:
        return _dy_pass.dy_products(g2, b, xa2, scale=scale, impl="xla")
    u, db = _dy_call(g2, _pad_rank(b, 0, rp), _pad_rank(xa2, 1, rp), form)  # float32, unscaled
    return (scale * u[:, :r]).astype(g2.dtype), db[:r].astype(b.dtype)


# -- the one-pass dy products under SPMD partitioning ------------------------------------------------------
#
# The same reasoning as the kernel call's: a Triton call is opaque to the partitioner, which would
# gather dy onto every device for it. Each device runs it on its blocks instead: rows of dy and xa as
# dy's rows are split (u's rows follow, dB is summed over them), columns of dy and B as dy's columns
# are split (dB's columns follow, u is summed over them); the rank is whole.


def _dy_local(dy, b, xa, *, form: str, m_axes: tuple = (), n_axes: tuple = ()):
    u, db = _dy_pass.products_f32(dy, b, xa, impl=form)
    if n_axes:
        u = jax.lax.psum(u, n_axes)
    if m_axes:
        db = jax.lax.psum(db, m_axes)
    return u, db


def _dy_whole(dy, b, xa, form):
    return _dy_local(dy, b, xa, form=form)


def _dy_partition(form, mesh, arg_shapes, result_shape):
    plan = _spec2(arg_shapes[0].sharding)  # (rows, columns) of dy: the mesh axes of m and n
    if plan is None:  # shardings without axis names: the whole call on every device (correct, slow)
        rep = _replicated_like(arg_shapes[0].sharding)
        return rep.mesh, functools.partial(_dy_local, form=form), (rep, rep), (rep,) * 3
    m, n = plan
    named = functools.partial(_named, mesh)
    lower = functools.partial(_dy_local, form=form, m_axes=m, n_axes=n)
    return mesh, lower, (named(m, ()), named((), n)), (named(m, n), named((), n), named(m, ()))


def _dy_infer(form, mesh, arg_shapes, result_shape):
    plan = _spec2(arg_shapes[0].sharding)  # (rows, columns) of dy: the mesh axes of m and n
    if plan is None:
        rep = _replicated_like(arg_shapes[0].sharding)
        return rep, rep
    m, n = plan
    return _named(mesh, m, ()), _named(mesh, (), n)


def _dy_rule(form, mesh, operand_types, result_types):
    """Shardy's factors: m (rows of dy, xa, u), n (columns of dy, B, dB), r whole."""
    rule = "m n, r n, m r -> m r, r n"
    if not jax_compat.shardy_rule_takes_options():
        return rule
    return rule, {"need_replication_factors": ("r",)}


_dy_partitioned = custom_partitioning(_dy_whole, static_argnums=(3,))
_dy_partitioned.def_partition(_dy_partition, infer_sharding_from_operands=_dy_infer, sharding_rule=_dy_rule)


@functools.lru_cache(maxsize=None)
def _dy_batchable(form: str):
    """The partitioned call under ``jax.vmap`` (``custom_partitioning`` has no batching rule): a batch
    of products takes the two XLA matmuls, batched by JAX."""

    @jax.custom_batching.custom_vmap
    def call(dy, b, xa):
        return _dy_partitioned(dy, b, xa, form)

    @call.def_vmap
    def rule(axis_size, in_batched, dy, b, xa):
        plain = functools.partial(_dy_pass.products_f32, impl="xla")
        return jax.vmap(plain, in_axes=tuple(0 if t else None for t in in_batched))(dy, b, xa), (True, True)

    return call


def _dy_products_call(dy, b, xa, form):
    return _dy_batchable(form)(dy, b, xa)


# one traced jaxpr per (shapes, form), as for the kernel call
_dy_call = jax.jit(_dy_products_call, static_argnums=(3,))

# The custom VJP behind one jax.jit per (shapes, scale, impl, tiles): a model's call sites of one shape
# then share one traced jaxpr, and JAX's differentiation of it (the forward rule, the split into
# known and residual parts, the transpose) is traced once per shape and cached, not once per call site
# (224 in the 16-layer unrolled model, 3 shapes). XLA inlines the call: the compiled step is the same.
_lora_matmul_jit = jax.jit(_lora_matmul, static_argnums=(5, 6, 7))


def clear_caches() -> None:
    """Forget the traced kernel calls (tests that swap the kernel call for a stand-in use this)."""
    for f in (_lora_matmul_jit, _partitioned_call, _mosaic_call, _dy_call):
        getattr(f, "clear_cache", lambda: None)()  # a stand-in may be a plain function
    _row_batched.cache_clear()
    _dy_batchable.cache_clear()


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
      gradient is zero, and no ``xᵀ·dy`` is ever computed for it. Sharded operands (Auto mesh axes)
      stay sharded: the kernel call is partitioned per device (rows of ``x`` as they are split, an
      FSDP ``w0`` gathered, a column split of ``w0`` kept, a split of the contracted axis summed).

    Example:
      >>> import jax.numpy as jnp
      >>> from jlora._fused import lora_matmul
      >>> x = jnp.ones((2, 4)); w0 = jnp.eye(4); a = jnp.ones((4, 1)); b = jnp.ones((1, 4))
      >>> lora_matmul(x, w0, a, b, scale=0.5, impl="xla")[0]
      Array([3., 3., 3., 3.], dtype=float32)
    """
    if impl not in ("mosaic", "xla"):
        raise ValueError(f"impl must be 'mosaic' or 'xla', got {impl!r}")
    t = tiles or DEFAULT_TILES
    _dy_pass_form(impl, t)  # a misspelt Tiles.dy_pass fails here, not in the backward
    if t.cluster not in (1, 2):
        raise ValueError(f"Tiles.cluster={t.cluster!r}: use 1 (one CTA a tile) or 2 "
                         "(two CTAs a cluster, W0's tile multicast to both).")
    if t.lowering not in _SEMANTICS:
        raise ValueError(f"Tiles.lowering={t.lowering!r}: use 'lane' or 'warpgroup'.")
    rp = padded_rank(a.shape[-1], t)
    if impl == "mosaic" and fitted(t, rp) is None:
        raise ValueError(
            f"rank {a.shape[-1]} (padded to {rp}): the kernel's tiles would need "
            f"{smem_bytes(t._replace(slots=1), rp):,} bytes of shared memory, more than sm_90's "
            f"{SMEM_BYTES:,}. Use impl='xla', a rank of at most {max_rank(t)}, or smaller tiles.")
    from jlora._rules.compute import XA_NAME  # the general rule's name for x·A (that module imports this one lazily)

    dt = x.dtype
    a = a.astype(dt)
    xa = checkpoint_name((scale * jnp.dot(x, a, preferred_element_type=jnp.float32)).astype(dt), XA_NAME)
    return _lora_matmul_jit(x, xa, w0.astype(dt), a, b.astype(dt), float(scale), impl, t)
