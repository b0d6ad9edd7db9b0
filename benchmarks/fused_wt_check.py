"""The fused kernel's ``w_t`` form against the transposed copy it replaces, one GPU process.

The backward pass's ``dx = dy·W0ᵀ + s·(dy·Bᵀ)·Aᵀ`` used to hand the kernel ``W0ᵀ``: one transposed
copy of every adapted kernel a step, which inside a scanned model XLA kept for the whole backward
pass (RESULTS: +1.25 GiB at the 0.9 B shape, +8.8 GiB at 8B). The kernel now reads ``W0`` as stored
and gives wgmma a transposed view of each shared-memory tile (``w_t=True``); since the eighth session
it reads ``A`` as stored too (``v`` of shape ``(N, r)``), where ``Aᵀ`` was one more small
transpose kernel per adapted matmul a step. Per shape this prints
both forms' time and relative error against a float32 reference, and exits 1 if the ``w_t`` form
is off by more than bf16 allows.

Usage: ``python benchmarks/fused_wt_check.py`` on an H100/H200 (elsewhere it says why it cannot run).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jlora import _fused  # noqa: E402

SHAPES = ((2048, 2048), (2048, 5632), (5632, 2048), (4096, 1024))  # (K, N) of dx = dy (M, N) · Wᵀ
M, R, REPS, RTOL = 16384, 16, 20, 1e-2


def timed(f, *args) -> tuple[jax.Array, float]:
    """The output and the mean ms of ``REPS`` calls after a warm-up."""
    y = f(*args)
    y.block_until_ready()
    t0 = time.perf_counter()
    for _ in range(REPS):
        y = f(*args)
    y.block_until_ready()
    return y, (time.perf_counter() - t0) / REPS * 1e3


def main() -> int:
    why = _fused.unavailable()
    if why:
        print(f"the kernel cannot run here: {why}")
        return 0
    tiles, ok = _fused.DEFAULT_TILES, True
    as_stored = jax.jit(lambda x, w, u, v: _fused._mosaic_call(x, w, u, v, tiles=tiles, w_t=True))
    copied = jax.jit(lambda x, w, u, v: _fused._mosaic_call(x, w.T, u, v.T, tiles=tiles))
    for k, n in SHAPES:
        ks = jax.random.split(jax.random.key(0), 4)
        x = jax.random.normal(ks[0], (M, k)).astype(jnp.bfloat16)
        w = (jax.random.normal(ks[1], (n, k)) * k ** -0.5).astype(jnp.bfloat16)  # stored (N, K)
        u = (jax.random.normal(ks[2], (M, R)) * 0.1).astype(jnp.bfloat16)
        v = (jax.random.normal(ks[3], (n, R)) * 0.1).astype(jnp.bfloat16)  # stored (N, r), like A
        f32 = lambda t: t.astype(jnp.float32)
        ref = f32(x) @ f32(w).T + f32(u) @ f32(v).T
        err = lambda y: float(jnp.linalg.norm(f32(y) - ref) / jnp.linalg.norm(ref))
        (y_new, t_new), (y_old, t_old) = timed(as_stored, x, w, u, v), timed(copied, x, w, u, v)
        ok &= err(y_new) < RTOL
        print(f"K {k} N {n}: w_t kernel {t_new:.3f} ms, rel err {err(y_new):.1e} | "
              f"transposed copy + kernel {t_old:.3f} ms, rel err {err(y_old):.1e}", flush=True)
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
