"""Serving many adapters: a mixed batch (each sequence with its own adapter) against one adapter.

Inference only, on ``jlora.models.llama`` (bf16, scanned layers) at the reference shape of
docs/architecture.md (d 2048, 16 layers, 16 heads, ffn 5632, vocab 32000, r 16 on q,k,v,o,gate,
up,down, alpha 2r, bf16 adapters). Two modes:

  prefill  ``apply(params, tokens (8, 2048), cache=...)``: logits and a filled KV cache;
  decode   one step ``apply(params, token (64, 1), positions, cache)`` over a KV cache holding
           ``--decode-ctx`` tokens (the cache is carried from step to step, donated).

Variants, each compiled once and timed interleaved (A B C … C B A …), median of ``--steps``:

  base      ``model.apply`` without adapters (the floor of any adapter);
  one       ``apply`` with one adapter for the whole batch (``jlora.select_adapter``);
  mixed{k}  ``apply(params, ..., adapter_ids=ids)`` over a bank of ``--bank`` (64) adapters,
            the batch using k distinct ones (ids spread over the bank); every mixed{k} shares one
            compile (the ids are an argument). k > batch is skipped (prefill has 8 sequences);
  mixed{k}-gather / mixed{k}-dense  the largest mixed batch again with the low-rank form forced
            (``JLORA_MIXED_FORM`` at trace time) to the one ``auto`` does not pick for this mode
            (at the reference shape: gather at decode, dense at prefill). It shows what the
            automatic choice saves.

``× one`` is the step time over ``one``'s (goal: mixed64 ≤ 1.15). The same variants run with
Hugging Face PEFT in a subprocess (``--torch``; transformers' LlamaForCausalLM, SDPA attention,
bf16, the same number of adapters; mixed batches through PEFT's ``adapter_names``, which runs the
rank-r path once per distinct adapter per layer). jlora's model attends with
``jax.nn.dot_product_attention`` (cuDNN at prefill, XLA over the KV cache at decode), so compare
the ``× one`` columns across frameworks rather than the milliseconds.

Checks (jlora): mixed1's logits against one's (the same adapter: bf16 noise only), for a mixed
batch the logits of a row against ``one`` run with that row's adapter, and the forced form's logits
against the automatic one's. A check over ``CHECK_TOL`` (relative) fails the run (exit status 1).

    python benchmarks/mixed_batch.py --json out/mixed_batch.json          # H200, reference shape
    python benchmarks/mixed_batch.py --d 64 --layers 2 --heads 4 --ffn 128 --vocab 256 --prefill-seq 16 \\
        --prefill-batch 2 --decode-batch 4 --decode-ctx 8 --bank 4 --distinct 1,2,4 --rank 4 --steps 2  # CPU
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODES = ("prefill", "decode")
CHECK_TOL = 0.1  # largest relative logit difference the built-in checks accept (bf16 noise: ~3e-2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("shape (defaults: the reference 0.9 B Llama shape)")
    g.add_argument("--d", type=int, default=2048)
    g.add_argument("--layers", type=int, default=16)
    g.add_argument("--heads", type=int, default=16)
    g.add_argument("--ffn", type=int, default=5632)
    g.add_argument("--vocab", type=int, default=32000)
    g.add_argument("--rank", type=int, default=16)
    g.add_argument("--alpha", type=float, default=None, help="default 2·rank")
    g.add_argument("--prefill-seq", type=int, default=2048)
    g.add_argument("--prefill-batch", type=int, default=8)
    g.add_argument("--decode-batch", type=int, default=64)
    g.add_argument("--decode-ctx", type=int, default=512, help="tokens already in the KV cache at each decode step")
    g.add_argument("--bank", type=int, default=64, help="adapters in the bank")
    g.add_argument("--distinct", default="1,8,64", help="distinct adapters in a mixed batch (comma-separated)")
    g.add_argument("--no-scan", action="store_true", help="unrolled layers instead of one lax.scan (jlora)")
    m = p.add_argument_group("measurement")
    m.add_argument("--modes", default=",".join(MODES))
    m.add_argument("--steps", type=int, default=10)
    m.add_argument("--warmup", type=int, default=2)
    m.add_argument("--no-peft", action="store_true", help="skip the PEFT subprocess")
    m.add_argument("--torch", action="store_true", help="(internal) run the PEFT side in this process")
    m.add_argument("--json", dest="json_path", default=None)
    return p.parse_args(argv)


def distinct_counts(a, batch: int) -> list[int]:
    return [k for k in (int(s) for s in a.distinct.split(",") if s) if k <= min(batch, a.bank)]


def spread_ids(k: int, batch: int, bank: int) -> list[int]:
    """k distinct adapters over ``batch`` rows, spread over the bank (0, bank/k, 2·bank/k, ...)."""
    return [(e % k) * (bank // k) for e in range(batch)]


def write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1, default=str)


def interleaved(fns: dict, steps: int, sync) -> dict[str, list[float]]:
    """Time each ``fns[name]()`` ``steps`` times, the order alternating forwards and backwards."""
    names = list(fns)
    times = {n: [] for n in names}
    for s in range(steps):
        for n in (names if s % 2 == 0 else names[::-1]):
            sync()
            t0 = time.perf_counter()
            fns[n]()
            sync()
            times[n].append((time.perf_counter() - t0) * 1e3)
    return times


# ----------------------------------------------------------------------------------------------
# jlora


def jax_side(a) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jlora
    from jlora.models.llama import CACHE_AXES, Llama, LlamaConfig, init_cache
    from jlora._rules.compute import mixed_form

    bf16 = jnp.bfloat16
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.d, intermediate_size=a.ffn, num_layers=a.layers,
                      num_heads=a.heads, num_kv_heads=a.heads, head_dim=a.d // a.heads, dtype=bf16, param_dtype=bf16,
                      scan_layers=not a.no_scan)
    model = Llama(cfg)
    alpha = a.alpha if a.alpha is not None else 2.0 * a.rank
    t0 = time.perf_counter()
    base = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    params, apply = jlora.inject(base, model.apply, rank=a.rank, alpha=alpha, targets=PROJ,
                                 example_args=(jnp.zeros((1, 8), jnp.int32),), adapter_dtype=bf16, key=jax.random.key(1))

    @jax.jit
    def draw(key, lk):  # one adapter: the injected A, and a nonzero B
        a_, b_ = jax.random.split(key)
        return (jax.random.normal(a_, lk.a.shape, bf16) * (lk.layout.fan_in(lk.shape) ** -0.5),
                jax.random.normal(b_, lk.b.shape, bf16) * 0.02)

    is_lk = lambda x: isinstance(x, jlora.LoraKernel)  # noqa: E731

    def adapter(i):
        keys = (jax.random.fold_in(jax.random.key(100 + i), j) for j in itertools.count())  # any kernel count

        def one(x):
            if not is_lk(x):
                return None
            fa, fb = draw(next(keys), jlora.LoraKernel(None, x.a, x.b, layout=x.layout, scale=x.scale))
            return jlora.LoraKernel(None, fa, fb, layout=x.layout, scale=x.scale)

        return jax.tree.map(one, params, is_leaf=is_lk)

    names = [f"ad{i}" for i in range(a.bank)]
    bank = jlora.stack_adapters({n: adapter(i) for i, n in enumerate(names)})
    banked = jlora.combine(bank, base)
    single = jlora.select_adapter(banked, names[0])
    jax.block_until_ready(banked)
    setup_s = time.perf_counter() - t0
    print(f"# jlora setup {setup_s:.1f}s: base + bank of {a.bank} adapters "
          f"({sum(x.size for x in jax.tree.leaves(bank)) * 2 / 2**30:.2f} GiB)", flush=True)

    results = {}
    for mode in [m for m in a.modes.split(",") if m]:
        if mode == "prefill":
            batch, seq = a.prefill_batch, a.prefill_seq
            tokens = jax.random.randint(jax.random.key(2), (batch, seq), 0, a.vocab, jnp.int32)
            cache0 = init_cache(cfg, batch, seq)
            inputs = dict(tokens=tokens, cache=cache0)

            def run(fn, p, *ids):
                return fn(p, inputs["tokens"], inputs["cache"], *ids)[0]

            # last-token logits and the filled cache (what serving keeps of a prefill)
            f_base = jax.jit(lambda p, t, c: _last(model.apply(p, t, cache=c)))
            f_one = jax.jit(lambda p, t, c: _last(apply(p, t, cache=c)))
            def mix(fn):
                return jax.jit(lambda p, t, c, ids: _last(fn(p, t, cache=c, adapter_ids=ids,
                                                             batch_axes={"cache": CACHE_AXES}, out_axes=(0, CACHE_AXES))))

            f_mix = mix(apply)
            other = "gather" if mixed_form(seq, a.bank) == "dense" else "dense"  # the form auto does not pick
            f_other = mix(forced(other, apply))
            carry = False
        else:
            batch, ctx = a.decode_batch, a.decode_ctx
            slots = ctx + a.steps + a.warmup + 2
            c = init_cache(cfg, batch, slots)
            c["pos"] = c["pos"].at[:, :ctx].set(jnp.arange(ctx, dtype=jnp.int32))
            c["index"] = jnp.asarray(ctx, jnp.int32)
            token = jax.random.randint(jax.random.key(3), (batch, 1), 0, a.vocab, jnp.int32)
            positions = jnp.full((batch, 1), ctx, jnp.int32)
            inputs = {"cache": {}}

            def step(fn, extra=None):
                def f(p, t, pos, cache, *ids):
                    kw = {} if not ids else dict(adapter_ids=ids[0], batch_axes={"cache": CACHE_AXES},
                                                 out_axes=(0, CACHE_AXES))
                    logits, cache = fn(p, t, positions=pos, cache=cache, **kw)
                    cache = dict(cache, index=jnp.asarray(ctx, jnp.int32))  # every step at the same depth
                    return logits[:, -1], cache
                return jax.jit(f, donate_argnums=(3,))

            f_base, f_one, f_mix = step(model.apply), step(apply), step(apply)
            other = "gather" if mixed_form(1, a.bank) == "dense" else "dense"  # the form auto does not pick
            f_other = step(forced(other, apply))

            def run(fn, p, *ids):  # each variant carries its own (donated) cache from step to step
                key = (id(fn), id(p), ids[0].tobytes() if ids else b"")
                cache = inputs["cache"].pop(key, None)
                if cache is None:
                    cache = jax.tree.map(jnp.copy, c)
                logits, inputs["cache"][key] = fn(p, token, positions, cache, *ids)
                return logits
            carry = True

        variants = {"base": (f_base, base, ()), "one": (f_one, single, ())}
        for k in distinct_counts(a, batch):
            variants[f"mixed{k}"] = (f_mix, banked, (np.asarray(spread_ids(k, batch, a.bank), np.int32),))
        if distinct_counts(a, batch):
            k = distinct_counts(a, batch)[-1]
            forced_name, auto_name = f"mixed{k}-{other}", f"mixed{k}"
            variants[forced_name] = (f_other, banked, variants[auto_name][2])
        res, first = {}, {}
        compiled = set()
        for name, (fn, p, ids) in variants.items():
            t0 = time.perf_counter()
            out = run(fn, p, *ids)
            jax.block_until_ready(out)
            first_s = time.perf_counter() - t0
            for _ in range(a.warmup):
                jax.block_until_ready(run(fn, p, *ids))
            first[name] = np.asarray(out, np.float32)
            res[name] = {"status": "ok", "first_call_s": first_s, "compiled_here": id(fn) not in compiled,
                         "distinct": len(set(ids[0].tolist())) if ids else (0 if name == "base" else 1)}
            compiled.add(id(fn))
        fns = {n: (lambda fn=fn, p=p, ids=ids: jax.block_until_ready(run(fn, p, *ids)))
               for n, (fn, p, ids) in variants.items()}
        times = interleaved(fns, a.steps, lambda: None)  # each call blocks until its result is ready
        tokens_per_step = batch * (a.prefill_seq if mode == "prefill" else 1)
        for n, t in times.items():
            med = statistics.median(t)
            res[n].update(ms=med, min_ms=min(t), max_ms=max(t), times_ms=t, tokens_per_s=tokens_per_step / med * 1e3)
        for n in res:
            res[n]["x_one"] = res[n]["ms"] / res["one"]["ms"]
        # checks: the same adapter through the bank; one row of a mixed batch against `one` with its adapter
        scale = float(np.abs(first["one"]).max()) or 1.0
        if "mixed1" in first:
            res["mixed1"]["check_vs_one"] = float(np.abs(first["mixed1"] - first["one"]).max()) / scale
        ks = [k for k in distinct_counts(a, batch) if k > 1]
        if ks and not carry:
            k = ks[-1]
            ids = spread_ids(k, batch, a.bank)
            row = next(e for e in range(batch) if ids[e] != 0)
            theirs = jlora.select_adapter(banked, names[ids[row]])
            ref = np.asarray(run(f_one, theirs), np.float32)[row]
            res[f"mixed{k}"]["check_row_vs_one"] = float(np.abs(first[f"mixed{k}"][row] - ref).max()) / scale
        if distinct_counts(a, batch):  # the other low-rank form, on the same ids: the same logits up to bf16 noise
            res[forced_name]["check_vs_auto"] = float(np.abs(first[forced_name] - first[auto_name]).max()) / scale
        results[mode] = {"batch": batch, "tokens_per_step": tokens_per_step, "variants": res}
        print_table("jlora", mode, results[mode])
    return {"setup_s": setup_s, "results": results, "config": dict(vars(a)), "env": jax_env()}


def forced(form: str, fn):
    """``fn`` traced with the mixed batch's low-rank form forced to ``form`` (dense or gather)."""
    from jlora._rules.compute import MIXED_FORM_ENV

    def call(*args, **kw):
        old = os.environ.get(MIXED_FORM_ENV)
        os.environ[MIXED_FORM_ENV] = form
        try:
            return fn(*args, **kw)
        finally:
            if old is None:
                del os.environ[MIXED_FORM_ENV]
            else:
                os.environ[MIXED_FORM_ENV] = old

    return call


def _last(out):
    logits, cache = out
    return logits[:, -1], cache


def jax_env() -> dict:
    import jax

    import jlora

    dev = jax.devices()[0]
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "jax": jax.__version__,
            "jlora": jlora.__version__, "backend": jax.default_backend(), "device_kind": dev.device_kind,
            "python": platform.python_version(), "host": platform.node(), "argv": sys.argv,
            "xla_flags": os.environ.get("XLA_FLAGS")}


# ----------------------------------------------------------------------------------------------
# PEFT (PyTorch)


def torch_side(a) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = torch.bfloat16
    alpha = a.alpha if a.alpha is not None else 2.0 * a.rank
    t0 = time.perf_counter()
    cfg = LlamaConfig(hidden_size=a.d, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                      num_key_value_heads=a.heads, intermediate_size=a.ffn, vocab_size=a.vocab,
                      max_position_embeddings=max(a.prefill_seq, a.decode_ctx + a.steps + a.warmup + 8),
                      tie_word_embeddings=False, rms_norm_eps=1e-5)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    names = [f"ad{i}" for i in range(a.bank)]
    lcfg = lambda: LoraConfig(r=a.rank, lora_alpha=alpha, target_modules=PROJ, init_lora_weights=False)  # noqa: E731
    pm = get_peft_model(model, lcfg(), adapter_name=names[0], autocast_adapter_dtype=False)
    for n in names[1:]:
        pm.add_adapter(n, lcfg(), autocast_adapter_dtype=False)
    pm.set_adapter(names[0])
    pm.eval()
    sync()
    setup_s = time.perf_counter() - t0
    print(f"# PEFT setup {setup_s:.1f}s: {dev.type}, {a.bank} adapters", flush=True)
    g = torch.Generator(device="cpu").manual_seed(1)
    results = {}
    with torch.inference_mode():
        for mode in [m for m in a.modes.split(",") if m]:
            if mode == "prefill":
                batch = a.prefill_batch
                tok = torch.randint(0, a.vocab, (batch, a.prefill_seq), generator=g).to(dev)

                def call(adapter_names=None, base=False):
                    kw = {} if adapter_names is None else {"adapter_names": adapter_names}
                    if base:
                        with pm.disable_adapter():
                            return pm(input_ids=tok, use_cache=True).logits[:, -1]
                    return pm(input_ids=tok, use_cache=True, **kw).logits[:, -1]
            else:
                batch, ctx = a.decode_batch, a.decode_ctx
                with pm.disable_adapter():
                    pre = pm(input_ids=torch.randint(0, a.vocab, (batch, ctx), generator=g).to(dev), use_cache=True)
                cache: DynamicCache = pre.past_key_values
                tok = torch.randint(0, a.vocab, (batch, 1), generator=g).to(dev)

                def call(adapter_names=None, base=False):
                    kw = {} if adapter_names is None else {"adapter_names": adapter_names}
                    if base:
                        with pm.disable_adapter():
                            out = pm(input_ids=tok, past_key_values=cache, use_cache=True)
                    else:
                        out = pm(input_ids=tok, past_key_values=cache, use_cache=True, **kw)
                    extra = cache.get_seq_length() - ctx
                    if extra > 0:
                        cache.crop(-extra)  # every step at the same depth
                    return out.logits[:, -1]

            variants = {"base": dict(base=True), "one": {}}
            for k in distinct_counts(a, batch):
                variants[f"mixed{k}"] = dict(adapter_names=[names[i] for i in spread_ids(k, batch, a.bank)])
            res = {}
            for n, kw in variants.items():
                t0 = time.perf_counter()
                call(**kw)
                sync()
                res[n] = {"status": "ok", "first_call_s": time.perf_counter() - t0}
                for _ in range(a.warmup):
                    call(**kw)
            times = interleaved({n: (lambda kw=kw: call(**kw)) for n, kw in variants.items()}, a.steps, sync)
            tokens_per_step = batch * (a.prefill_seq if mode == "prefill" else 1)
            for n, t in times.items():
                med = statistics.median(t)
                res[n].update(ms=med, min_ms=min(t), max_ms=max(t), times_ms=t, tokens_per_s=tokens_per_step / med * 1e3,
                              distinct=len(set(variants[n]["adapter_names"])) if "adapter_names" in variants[n]
                              else (0 if n == "base" else 1))
            for n in res:
                res[n]["x_one"] = res[n]["ms"] / res["one"]["ms"]
            results[mode] = {"batch": batch, "tokens_per_step": tokens_per_step, "variants": res}
            print_table("PEFT", mode, results[mode])
    import peft
    import transformers

    env = {"torch": torch.__version__, "peft": peft.__version__, "transformers": transformers.__version__,
           "device": torch.cuda.get_device_name(dev) if cuda else "cpu"}
    return {"setup_s": setup_s, "results": results, "env": env}


# ----------------------------------------------------------------------------------------------


def print_table(who: str, mode: str, r: dict) -> None:
    print(f"\n{who} {mode}: batch {r['batch']}, {r['tokens_per_step']} tokens a step", flush=True)
    print("| framework | mode | variant | distinct adapters | ms (median) | min–max ms | tokens/s | × one | check |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for n, v in r["variants"].items():
        check = ", ".join(f"{k[6:]} {v[k]:.1e}" for k in v if k.startswith("check_"))
        print(f"| {who} | {mode} | {n} | {v.get('distinct', '-')} | {v['ms']:.2f} | {v['min_ms']:.2f}–{v['max_ms']:.2f} "
              f"| {v['tokens_per_s']:,.0f} | {v['x_one']:.3f} | {check or '-'} |", flush=True)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.torch:
        out = torch_side(a)
        if a.json_path:
            write_json(a.json_path, out)
        return 0
    t_start = time.perf_counter()
    out = {}
    if not a.no_peft:  # first, in its own process: it frees the GPU before JAX takes it
        import tempfile

        src = list(argv if argv is not None else sys.argv[1:])
        if "--json" in src:
            i = src.index("--json")
            del src[i:i + 2]
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "peft.json")
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), *src, "--torch", "--json", path],
                                  text=True, capture_output=True)
            sys.stdout.write(proc.stdout)
            if proc.returncode != 0:
                sys.stdout.write(proc.stderr[-4000:])
                out["peft"] = {"status": f"FAILED (exit {proc.returncode})", "stderr": proc.stderr[-4000:]}
            else:
                with open(path) as fh:
                    out["peft"] = json.load(fh)
        sys.stdout.flush()
    out["jlora"] = jax_side(a)
    out["wall_s"] = time.perf_counter() - t_start
    print(f"\n# total {out['wall_s']:.0f}s", flush=True)
    if a.json_path:
        write_json(a.json_path, out)
        print(f"wrote {a.json_path}")
    failed = "peft" in out and str(out["peft"].get("status", "ok")).startswith("FAILED")
    bad = [f"{mode} {name} {key} {val:.1e}" for mode, r in out["jlora"]["results"].items()
           for name, v in r["variants"].items() for key, val in v.items()
           if key.startswith("check_") and not val <= CHECK_TOL]
    if bad:  # a wrong adapter's logits differ by O(1); bf16 noise stays near 1e-2
        print(f"CHECK FAILED (relative difference over {CHECK_TOL}): {'; '.join(bad)}", flush=True)
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())
