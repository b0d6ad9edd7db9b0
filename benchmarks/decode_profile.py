"""Where a mixed-batch decode step's time goes: one adapter against 64 in one batch, profiled.

Builds ``jlora.models.llama`` at the reference shape (d 2048, 16 layers, MHA, ffn 5632, vocab 32000,
bf16), a bank of 64 rank-16 adapters on the 7 projections, and a KV cache of 64 sequences holding
512 tokens each; then compiles one decode step (one new token per sequence) with one adapter for
the whole batch (``one``) and with each sequence's own adapter (``dense``: the mixed batch's dense
form, forced; ``--gather`` adds the gather form). For each: the median of 20 steps, the HLO census
of ``profile_step.py`` (copies, dynamic slices, custom calls and their bytes), and a device-kernel
profile of 5 steps aggregated by kernel kind and name, then the ``dense − one`` difference.

Layers are scanned (``LlamaConfig.scan_layers``; the decode's layer scan is unrolled on an NVIDIA GPU
by ``LlamaConfig.decode_unroll``) unless ``--unrolled``.

On one H200 (about 1–2 minutes)::

    python benchmarks/decode_profile.py [--unrolled]

A CPU smoke run: ``python benchmarks/decode_profile.py --tiny``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import profile_step as PS  # noqa: E402
from mixed_batch import forced  # noqa: E402

import jlora  # noqa: E402
from jlora.models.llama import CACHE_AXES, Llama, LlamaConfig, init_cache  # noqa: E402

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--unrolled", action="store_true", help="unrolled layers (scan_layers=False)")
    p.add_argument("--gather", action="store_true", help="also profile the mixed batch's gather form")
    p.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke run)")
    a = p.parse_args(argv)
    bf16 = jnp.bfloat16
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=16, num_heads=16,
                      num_kv_heads=16, head_dim=128, dtype=bf16, param_dtype=bf16, scan_layers=not a.unrolled)
    batch, ctx, n_adapters = 64, 512, 64
    if a.tiny:
        cfg = cfg.replace(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                          num_kv_heads=4, head_dim=16)
        batch, ctx, n_adapters = 8, 16, 8
    model = Llama(cfg)
    tok0 = jnp.zeros((1, 8), jnp.int32)
    base = jax.jit(model.init)(jax.random.key(0), tok0)
    params, apply = jlora.inject(base, model.apply, rank=16, alpha=32.0, targets=PROJ, example_args=(tok0,),
                                 adapter_dtype=bf16, key=jax.random.key(1))
    adapters = jlora.split(params)[0]
    banked = jlora.combine(jlora.stack_adapters({f"a{i}": adapters for i in range(n_adapters)}), base)
    single = jlora.select_adapter(banked, "a0")
    c0 = init_cache(cfg, batch, ctx + 16)
    c0["pos"] = c0["pos"].at[:, :ctx].set(jnp.arange(ctx, dtype=jnp.int32))
    c0["index"] = jnp.asarray(ctx, jnp.int32)
    tok = jnp.zeros((batch, 1), jnp.int32)
    pos = jnp.full((batch, 1), ctx, jnp.int32)
    ids = np.arange(batch, dtype=np.int32) % n_adapters

    def step(fn, mixed):
        def f(p, t, pos, cache, *i):
            kw = dict(adapter_ids=i[0], batch_axes={"cache": CACHE_AXES}, out_axes=(0, CACHE_AXES)) if mixed else {}
            logits, cache = fn(p, t, positions=pos, cache=cache, **kw)
            return logits[:, -1], dict(cache, index=jnp.asarray(ctx, jnp.int32))  # the same step every time
        return jax.jit(f, donate_argnums=(3,))

    variants = {"one": (step(apply, False), single, ()), "dense": (step(forced("dense", apply), True), banked, (ids,))}
    if a.gather:
        variants["gather"] = (step(forced("gather", apply), True), banked, (ids,))
    print(f"# decode_profile  jax {jax.__version__}  {jax.devices()[0].device_kind}  layers "
          f"{'unrolled' if a.unrolled else 'scanned'}; batch {batch}, ctx {ctx}, bank of {n_adapters}", flush=True)
    profiles, census = {}, {}
    for name, (fn, prm, extra) in variants.items():
        cache = jax.tree.map(jnp.copy, c0)
        census[name] = PS.hlo_census(fn.lower(prm, tok, pos, cache, *extra).compile().as_text())
        for _ in range(3):
            _, cache = fn(prm, tok, pos, cache, *extra)
        jax.block_until_ready(cache)
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            logits, cache = fn(prm, tok, pos, cache, *extra)
            jax.block_until_ready(logits)
            times.append(time.perf_counter() - t0)
        print(f"{name}: median {np.median(times) * 1e3:.2f} ms", flush=True)
        with tempfile.TemporaryDirectory() as log_dir:
            with jax.profiler.trace(log_dir, create_perfetto_trace=True):
                for _ in range(5):
                    logits, cache = fn(prm, tok, pos, cache, *extra)
                jax.block_until_ready(logits)
            path = PS.find_trace(log_dir)
            if path:
                profiles[name] = PS.aggregate_trace(path, 5)
    PS.print_census_table(census)
    for name, agg in profiles.items():
        PS.print_profile(name, agg, 15)
    if "dense" in profiles and "one" in profiles:
        PS.print_diff("dense", profiles["dense"], "one", profiles["one"], 20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
