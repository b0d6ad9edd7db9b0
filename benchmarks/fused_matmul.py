"""One LoRA matmul, forward and forward+backward, three ways: where the time of the rank-r path goes.

For each projection shape of the reference model (M = batch·seq tokens; K -> N = 2048->2048 for q/k/v/o,
2048->5632 for gate/up, 5632->2048 for down), in one process:

  base         ``x·W0`` (and ``dx = dy·W0ᵀ``): the frozen model's share, the floor
  xla          hand-written unmerged LoRA ``x·W0 + s·(x·A)·B`` as XLA compiles it (grads for x, A, B)
  fused[...]   ``jlora._fused.lora_matmul`` (the rank-r update in the base matmul's epilogue, Pallas
               Mosaic GPU kernel, sm_90), one entry per tile configuration tried
  mgpu_example_gemm  (``--mgpu-ref``) JAX's own Hopper matmul example, forward only: what a Pallas
               Mosaic GPU matmul reaches here without any LoRA

Prints the median time, the ratio to ``base`` and the relative error against a float32 reference,
for the forward alone and for forward + backward. ``--impl xla`` runs the fused variants' custom VJP
in plain jnp (the CPU smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (os.path.dirname(_HERE), _HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lora_step as L  # noqa: E402
from jlora._fused import DEFAULT_TILES, Tiles, lora_matmul, supported  # noqa: E402

# name -> tile configuration of the Hopper kernel (Tiles' fields: tile_m, tile_n per warpgroup,
# tile_k, pipeline steps, epilogue tile, epilogue slots, band width, rank alignment)
TILES = {
    "default": DEFAULT_TILES,
    "lane": DEFAULT_TILES._replace(lowering="lane"),
    "s4_e1": Tiles(128, 128, 64, 4, 64, 1, 4, 16),
    "s3_e1_r64": Tiles(128, 128, 64, 3, 64, 1, 4, 64),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", type=int, default=16384)
    p.add_argument("--shapes", default="2048x2048,2048x5632,5632x2048")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--tiles", default=",".join(TILES))
    p.add_argument("--mgpu-ref", action="store_true",
                   help="also time JAX's own Hopper matmul example (no LoRA) as a yardstick")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--impl", default="mosaic", choices=("mosaic", "xla"),
                   help="'xla' runs the fused variants' custom VJP in plain jnp (CPU smoke test)")
    p.add_argument("--json", dest="json_path", default=None)
    return p.parse_args(argv)


def timeit(fn, args, iters, reps):
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) / iters * 1e3)
    return statistics.median(ts)


def rel_err(out, ref):
    num = sum(float(jnp.sum((o.astype(jnp.float32) - r) ** 2)) for o, r in zip(out, ref))
    den = sum(float(jnp.sum(r ** 2)) for r in ref)
    return (num / den) ** 0.5


def main(argv=None):
    args = parse_args(argv)
    scale = 2.0
    dt = jnp.bfloat16
    rows = []
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        m, r = args.m, args.rank
        ks = jax.random.split(jax.random.key(k * 7 + n), 5)
        x = jax.random.normal(ks[0], (m, k), dt)
        w0 = (jax.random.normal(ks[1], (k, n), jnp.float32) / k ** 0.5).astype(dt)
        a = (jax.random.normal(ks[2], (k, r), jnp.float32) / k ** 0.5).astype(dt)
        b = (jax.random.normal(ks[3], (r, n), jnp.float32) * 0.1).astype(dt)
        g = jax.random.normal(ks[4], (m, n), dt)
        f32 = lambda t: t.astype(jnp.float32)
        ref_f = lambda x, w0, a, b: x @ w0 + scale * ((x @ a) @ b)
        ref_y, ref_vjp = jax.vjp(ref_f, f32(x), f32(w0), f32(a), f32(b))
        ref_dx, _, ref_da, ref_db = ref_vjp(f32(g))

        def base_f(x, w0, a, b):
            return x @ w0

        def xla_f(x, w0, a, b):
            return x @ w0 + (scale * ((x @ a) @ b)).astype(x.dtype)

        variants = {"base": base_f, "xla": xla_f}
        for name in args.tiles.split(","):
            t = TILES[name]
            if args.impl == "xla" or supported(m, k, n, dt, tiles=t):
                variants[f"fused[{name}]"] = (lambda t: lambda x, w0, a, b: lora_matmul(
                    x, w0, a, b, scale=scale, impl=args.impl, tiles=t))(t)
        if args.mgpu_ref:
            from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
            cfg = hm.TuningConfig(tile_m=128, tile_n=128, tile_k=64, max_concurrent_steps=4,
                                  grid_tile_width=4)
            variants["mgpu_example_gemm"] = lambda x, w0, a, b: hm.matmul(x, w0, None, cfg)

        for vname, f in variants.items():
            fwd = jax.jit(f)
            if vname == "mgpu_example_gemm":  # forward only: it has no VJP
                fb = None
            elif vname == "base":
                def fb(x, w0, a, b, g, f=f):
                    y, vjp = jax.vjp(lambda x: f(x, w0, a, b), x)
                    return y, vjp(g)[0]
            else:
                def fb(x, w0, a, b, g, f=f):
                    y, vjp = jax.vjp(lambda x, a, b: f(x, w0, a, b), x, a, b)
                    return (y, *vjp(g))
            fb = fb and jax.jit(fb)
            row = {"shape": shape, "variant": vname}
            try:
                if fb is None:
                    row["err_fwd"] = rel_err([fwd(x, w0, a, b)], [f32(x) @ f32(w0)])
                else:
                    out = fb(x, w0, a, b, g)
                    if vname != "base":
                        row["err_fwd"] = rel_err(out[:1], [ref_y])
                        row["err_bwd"] = rel_err(out[1:], [ref_dx, ref_da, ref_db])
                row["fwd_ms"] = timeit(fwd, (x, w0, a, b), args.iters, args.reps)
                if fb is not None:
                    row["fwdbwd_ms"] = timeit(fb, (x, w0, a, b, g), args.iters, args.reps)
            except Exception as e:  # a tile configuration the compiler refuses: record, go on
                row["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
            rows.append(row)
            print(json.dumps(row), flush=True)

    print()
    print(f"{'shape':>10} {'variant':>24} {'fwd ms':>8} {'x base':>7} {'f+b ms':>8} {'x base':>7} "
          f"{'err fwd':>8} {'err bwd':>8}")
    for shape in args.shapes.split(","):
        sel = [r for r in rows if r["shape"] == shape]
        base = next(r for r in sel if r["variant"] == "base")
        for r in sel:
            if "error" in r:
                print(f"{shape:>10} {r['variant']:>24}  error: {r['error'][:80]}")
                continue
            fb_ms = r.get("fwdbwd_ms", float("nan"))
            print(f"{shape:>10} {r['variant']:>24} {r['fwd_ms']:8.3f} {r['fwd_ms'] / base['fwd_ms']:7.3f} "
                  f"{fb_ms:8.3f} {fb_ms / base['fwdbwd_ms']:7.3f} "
                  f"{r.get('err_fwd', 0):8.1e} {r.get('err_bwd', 0):8.1e}")
    if args.json_path:
        L.write_json(args.json_path, {"env": L.environment(), "jax": jax.__version__, "device": str(jax.devices()[0]),
                                      "m": args.m, "rank": args.rank, "rows": rows})


if __name__ == "__main__":
    main()
