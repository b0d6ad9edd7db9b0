"""QLoRA vs LoRA on one Llama-shaped decoder: bytes per base parameter and step time, one process.

Variants, same model and tokens as ``lora_step.py`` (bf16 base, adapters on q,k,v,o,gate,up,down):

  lora_bf16   jlora.inject over the bf16 base (the ``jlora_f32`` row of lora_step.py)
  qlora_nf4   jlora.quantize(method="nf4") (block 64, double quantization), then jlora.inject
  qlora_int8  jlora.quantize(method="int8")

Prints bytes per quantized base parameter (real storage of every child array), median step time,
the ratio to lora_bf16, and XLA's static memory plan of the step. ``--scan`` (default) runs the
layers with lax.scan, so a quantized layer is dequantized one at a time inside the loop.

    python benchmarks/qlora_step.py                       # the reference 0.9 B shape, on a GPU
    python benchmarks/qlora_step.py --d 64 --layers 2 --heads 4 --ffn 128 --vocab 256 --seq 32 --batch 2 --rank 4
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE), _HERE]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jlora  # noqa: E402
import lora_step as L  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("d", 2048), ("layers", 16), ("heads", 16), ("ffn", 5632), ("vocab", 32000),
                          ("seq", 2048), ("batch", 8), ("rank", 16), ("steps", 10)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--no-scan", dest="scan", action="store_false")
    p.add_argument("--variants", default="lora_bf16,qlora_nf4,qlora_int8")
    p.add_argument("--json", dest="json_path", default=None)
    a = p.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    c = L.Cfg(a.d, a.layers, a.heads, a.ffn, a.vocab, a.seq, a.batch, a.rank, 2.0 * a.rank, a.scan,
              "cudnn" if on_gpu else "xla")
    print(f"# qlora_step jax {jax.__version__} {jax.devices()[0].device_kind} shape {c}", flush=True)
    params = L.init_params(0, c)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, c.vocab, (c.batch, c.seq)), jnp.int32)
    apply_fn = functools.partial(L.forward, c=c)
    tx = optax.adamw(1e-4)
    rows = []
    for v in a.variants.split(","):
        t0 = time.perf_counter()
        src = params
        bpp = 2.0
        if v.startswith("qlora"):
            src = jlora.quantize(params, method=v.split("_")[1], targets=list(L.PROJ))
            qs = [x for x in jax.tree.leaves(src, is_leaf=jlora.is_quantized) if jlora.is_quantized(x)]
            bpp = sum(x.nbytes for x in qs) / sum(x.size for x in qs)
            jax.block_until_ready(src)
        lp, apply = jlora.inject(src, apply_fn, c.rank, alpha=c.alpha, targets=list(L.PROJ),
                                 example_args=(tokens,))
        ad, base = jlora.split(lp)
        state = (ad, tx.init(ad))
        step = jax.jit(L.jlora_step(apply, tx), donate_argnums=0)
        compiled = step.lower(state, base, tokens).compile()
        plan_bytes = L.xla_plan_bytes(compiled)
        plan = float("nan") if plan_bytes is None else plan_bytes / 2**30
        setup = time.perf_counter() - t0
        state, loss, _ = compiled(state, base, tokens)
        jax.block_until_ready(loss)
        times = []
        for _ in range(a.steps + 2):
            t = time.perf_counter()
            state, loss, _ = compiled(state, base, tokens)
            jax.block_until_ready(loss)
            times.append(time.perf_counter() - t)
        ms = statistics.median(times[2:]) * 1e3
        base_gib = sum(x.nbytes for x in jax.tree.leaves(base)) / 2**30
        rows.append({"variant": v, "bytes_per_param": bpp, "step_ms": ms, "x_lora": None,
                     "base_GiB": base_gib, "xla_plan_GiB": plan, "setup_s": setup, "loss": float(loss)})
        print(f"{v}: {ms:.2f} ms, {bpp:.3f} B/param, base {base_gib:.2f} GiB, plan {plan:.2f} GiB", flush=True)
        del state, base, lp, ad, src
    lora_ms = next((r["step_ms"] for r in rows if r["variant"] == "lora_bf16"), None)
    for r in rows:  # relative to the unquantized base, whatever order the variants ran in
        r["x_lora"] = r["step_ms"] / lora_ms if lora_ms else None
    print("\n| variant | bytes / base param | base GiB | step ms | × lora_bf16 | XLA plan GiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['variant']} | {r['bytes_per_param']:.3f} | {r['base_GiB']:.2f} | {r['step_ms']:.2f} | "
              f"{'-' if r['x_lora'] is None else format(r['x_lora'], '.3f')} | {r['xla_plan_GiB']:.2f} |")
    if a.json_path:
        L.write_json(a.json_path, {"env": L.environment(), "jax": jax.__version__,
                                   "device": jax.devices()[0].device_kind, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
