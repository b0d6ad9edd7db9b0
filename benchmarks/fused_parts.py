"""The device time of each part of one fused LoRA projection, kernel by kernel.

For each projection shape of the reference model (M tokens; K → N), every part of
``jlora._fused.lora_matmul``'s forward and backward runs alone under ``jax.jit`` and the profiler,
and the device busy time per call is printed with its top kernels: the base matmul and ``dy·W0ᵀ``
(cuBLAS), the fused kernel forward and ``dx`` (``w_t``: ``W0`` and ``A`` read as stored), the four
thin rank-r matmuls (``s·x·A``, ``s·dy·Bᵀ``, ``dA``, ``dB``), ``x·A`` for three adapters at once (what
XLA merges adapters that read the same input into), ``s·dy·Bᵀ`` and ``dB`` in one pass over ``dy``
(:mod:`jlora._dy_pass`, checked against float32 too), and the whole backward of ``lora_matmul`` against the base's.

On an H100/H200 (about 1 minute)::

    python benchmarks/fused_parts.py

Elsewhere the kernel call runs its plain-XLA form and the profile has host events instead (a smoke
run: ``--m 256 --shapes 256x512``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (os.path.dirname(_HERE), _HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import profile_step as P  # noqa: E402
from jlora import _dy_pass as D, _fused as F  # noqa: E402

F32, BF16 = jnp.float32, jnp.bfloat16


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", type=int, default=16384, help="tokens (rows of x)")
    p.add_argument("--shapes", default="2048x2048,2048x5632,5632x2048", help="comma-separated KxN")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--scale", type=float, default=2.0)
    p.add_argument("--calls", type=int, default=10, help="profiled calls per part")
    return p.parse_args(argv)


def device_ms(f, args, calls: int) -> tuple[float, str]:
    """Busy ms per call of ``jax.jit(f)(*args)`` under the profiler, and its top kernels."""
    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    d = tempfile.mkdtemp(prefix="fused_parts_")
    with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(calls):
            out = f(*args)
        jax.block_until_ready(out)
    agg = P.aggregate_trace(P.find_trace(d), calls)
    names = sorted(agg["by_name"].items(), key=lambda kv: -kv[1][0])[:4]
    return agg["busy_ms"], "; ".join(f"{n[:40]} {ms * 1e3:.0f} µs ×{c:g}" for n, (ms, c) in names)


def parts(x, dy, w, a, b, *, s: float, impl: str, dy_impl: str) -> dict:
    t = F.DEFAULT_TILES
    dot = lambda p, q: jnp.dot(p, q, preferred_element_type=F32)
    xa = (s * dot(x, a)).astype(BF16)
    gb = (s * dot(dy, b.T)).astype(BF16)
    a3 = jnp.concatenate([a, a * 0.5, a * 0.25], 1)
    return {
        "base x·W0": (lambda x, w: x @ w, x, w),
        "base dy·W0ᵀ": (lambda dy, w: dy @ w.T, dy, w),
        "kernel forward": (lambda x, w, xa, b: F._matmul_plus_low_rank(x, w, xa, b, impl=impl, tiles=t),
                           x, w, xa, b),
        "kernel dx (W0, A as stored)": (lambda dy, w, gb, a: F._matmul_plus_low_rank(
            dy, w, gb, a, impl=impl, tiles=t, w_t=True), dy, w, gb, a),
        "s·x·A": (lambda x, a: (s * dot(x, a)).astype(BF16), x, a),
        "x·[A1 A2 A3] (3 adapters)": (lambda x, a3: dot(x, a3).astype(BF16), x, a3),
        "s·dy·Bᵀ": (lambda dy, b: (s * dot(dy, b.T)).astype(BF16), dy, b),
        "dA = xᵀ·u": (lambda x, gb: dot(x.T, gb).astype(BF16), x, gb),
        "dB = xaᵀ·dy": (lambda xa, dy: dot(xa.T, dy).astype(BF16), xa, dy),
        f"s·dy·Bᵀ and dB, one pass over dy ({dy_impl})": (
            lambda dy, b, xa: D.dy_products(dy, b, xa, scale=s, impl=dy_impl), dy, b, xa),
        "base backward (dx)": (lambda x, w, dy: jax.vjp(lambda x: x @ w, x)[1](dy), x, w, dy),
        "lora_matmul backward (dx, dA, dB)": (lambda x, w, a, b, dy: jax.vjp(
            lambda x, a, b: F.lora_matmul(x, w, a, b, scale=s, impl=impl), x, a, b)[1](dy), x, w, a, b, dy),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    impl = "mosaic" if F.unavailable() is None else "xla"
    dy_impl = "triton" if D.triton_unavailable() is None else "interpret"
    print(f"# fused_parts  jax {jax.__version__}  {jax.devices()[0].device_kind}  impl {impl}  dy pass {dy_impl}  "
          f"M {args.m}  r {args.rank}", flush=True)
    bad = False
    for shape in args.shapes.split(","):
        k_, n_ = map(int, shape.split("x"))
        ks = jax.random.split(jax.random.key(0), 5)
        x = jax.random.normal(ks[0], (args.m, k_), BF16)
        dy = jax.random.normal(ks[1], (args.m, n_), BF16)
        w = (jax.random.normal(ks[2], (k_, n_), F32) / k_ ** 0.5).astype(BF16)
        a = (jax.random.normal(ks[3], (k_, args.rank), F32) / k_ ** 0.5).astype(BF16)
        b = (jax.random.normal(ks[4], (args.rank, n_), F32) * 0.1).astype(BF16)
        print(f"\n## {k_} → {n_}\n\n| part | device µs per call | top kernels |\n| --- | ---: | --- |", flush=True)
        table = parts(x, dy, w, a, b, s=args.scale, impl=impl, dy_impl=dy_impl)
        for name, (fn, *ops) in table.items():
            ms, top = device_ms(fn, ops, args.calls)
            print(f"| {name} | {ms * 1e3:.1f} | {top} |", flush=True)
        # the two kernel calls against float32 references (x·W0 + u·B, dy·W0ᵀ + u·Aᵀ)
        f = lambda t: t.astype(F32)
        for name, ref in (("kernel forward", f(x) @ f(w) + f(table["kernel forward"][3]) @ f(b)),
                          ("kernel dx (W0, A as stored)", f(dy) @ f(w).T + f(table["kernel dx (W0, A as stored)"][3]) @ f(a).T)):
            fn, *ops = table[name]
            err = float(jnp.linalg.norm(f(jax.jit(fn)(*ops)) - ref) / jnp.linalg.norm(ref))
            print(f"{name}: rel. error {err:.1e} against float32", flush=True)
            bad = bad or not err < 1e-2
        # the one-pass products against float32 references (s·dy·Bᵀ, xaᵀ·dy)
        fn, *ops = table[f"s·dy·Bᵀ and dB, one pass over dy ({dy_impl})"]
        u, db = jax.jit(fn)(*ops)
        for name, got, ref in (("one pass s·dy·Bᵀ", u, args.scale * f(dy) @ f(b).T), ("one pass dB", db, f(ops[2]).T @ f(dy))):
            err = float(jnp.linalg.norm(f(got) - ref) / jnp.linalg.norm(ref))
            print(f"{name}: rel. error {err:.1e} against float32", flush=True)
            bad = bad or not err < 1e-2
    print("MISMATCH" if bad else "OK")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
