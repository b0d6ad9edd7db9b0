"""The LoRA family's costs: one DoRA training step against LoRA's, and the one-off cost of the inits.

Part 1 — the step, at the reference shape of ``benchmarks/lora_step.py`` (its model, its timing):

  floor        frozen forward + input-gradient backward (the lower bound; lora_step.py's floor)
  jlora        ``jlora.inject(...)`` LoRA on q, k, v, o, gate, up, down, float32 adapters, AdamW
  jlora_dora   the same with ``dora=True``: the magnitude per output unit, the weight norm from
               ‖W0‖², Aᵀ·W0 and AᵀA every step (never W0 + s·A·B)
  peft_dora    Hugging Face PEFT's DoRA (``LoraConfig(use_dora=True)``) on ``LlamaForCausalLM`` at the
               same shape, PyTorch eager (``benchmarks/peft_step.py --dora``, run first in a
               subprocess so the two frameworks never hold the GPU at once; ``--no-peft`` skips it)

  Both jlora rows start from B = 0, so their first losses must equal the floor's (checked).

Part 2 — the inits' one-off cost (``inject(..., init=...)``) for the kernels of an 8B Llama
(d 4096, GQA k/v 1024, ffn 14336, 32 layers): one kernel of each distinct shape is initialised twice
(the first call compiles that shape), a layer's cost is the second call's times summed over its 7
kernels, and the model's that times the layer count. Each init also hashes its kernel (sha256, the
base fingerprint checkpoints check); DoRA's magnitude (one weight norm) is timed alongside.

    python benchmarks/dora_step.py --json out/dora_step.json            # GPU: the reference shapes
    python benchmarks/dora_step.py --d 64 --layers 2 --heads 4 --ffn 128 --vocab 256 --seq 32 \\
        --batch 2 --rank 4 --steps 2 --init-d 64 --init-kv 32 --init-ffn 128 --init-layers 2   # CPU smoke

Prints two tables and writes ``--json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import lora_step as L  # noqa: E402  (also puts the repository on sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jlora  # noqa: E402
from jlora import _dora, _init  # noqa: E402
from jlora._node import Layout  # noqa: E402

INITS = ("pissa", "pissa_niter_4", "olora", "loftq")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("step shape (defaults: lora_step.py's reference 0.9 B model)")
    for name, default in (("d", 2048), ("layers", 16), ("heads", 16), ("ffn", 5632), ("vocab", 32000), ("seq", 2048),
                          ("batch", 8), ("rank", 16)):
        g.add_argument(f"--{name}", type=int, default=default)
    g.add_argument("--scan", action="store_true")
    g = p.add_argument_group("init shape (defaults: an 8B Llama's kernels)")
    g.add_argument("--init-d", type=int, default=4096)
    g.add_argument("--init-kv", type=int, default=1024, help="k/v projection width (GQA)")
    g.add_argument("--init-ffn", type=int, default=14336)
    g.add_argument("--init-layers", type=int, default=32)
    g.add_argument("--init-rank", type=int, default=16)
    g.add_argument("--inits", default=",".join(INITS), help=f"comma-separated subset of {','.join(INITS)}; '' skips")
    m = p.add_argument_group("measurement")
    m.add_argument("--steps", type=int, default=10)
    m.add_argument("--warmup", type=int, default=2)
    m.add_argument("--no-peft", action="store_true", help="skip PEFT's DoRA step")
    m.add_argument("--no-step", action="store_true", help="time the inits only (no step, no PEFT)")
    m.add_argument("--json", dest="json_path", default=None)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Part 1: the step


def _peft_dora(a) -> dict:
    """peft_step.py --dora at the same shape, in its own process (before JAX takes the device)."""
    out = os.path.join(tempfile.mkdtemp(), "peft.json")
    cmd = [sys.executable, os.path.join(_HERE, "peft_step.py"), "--dora", "--d", str(a.d), "--layers", str(a.layers),
           "--heads", str(a.heads), "--ffn", str(a.ffn), "--vocab", str(a.vocab), "--seq", str(a.seq),
           "--batch", str(a.batch), "--rank", str(a.rank), "--steps", str(a.steps), "--json", out]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except Exception as e:  # torch or peft missing, timeout, ...
        return {"status": f"FAILED: {type(e).__name__}: {e}"}
    if proc.returncode != 0:
        return {"status": f"FAILED: peft_step.py exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    with open(out) as fh:
        res = json.load(fh)["results"]["peft_dora_eager"]
    res["wall_s"] = time.perf_counter() - t0
    return res


def _steps(a, peft: dict | None) -> tuple[dict, dict]:
    c = L.Cfg(a.d, a.layers, a.heads, a.ffn, a.vocab, a.seq, a.batch, a.rank, 2.0 * a.rank, a.scan,
              "cudnn" if jax.default_backend() == "gpu" else "xla")
    params = L.init_params(0, c)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, c.vocab, (c.batch, c.seq)), jnp.int32)
    apply_fn = functools.partial(L.forward, c=c)
    tx = optax.adamw(1e-4)
    runs, status, extra = {}, {}, {}
    floor = L.Run("floor", step=L.floor_step(c), state=jnp.ones((), L.DT), const=params)
    variants = [("floor", None)] + [(name, dora) for name, dora in (("jlora", False), ("jlora_dora", True))]
    for name, dora in variants:
        try:
            if dora is None:
                run = floor
            else:
                t0 = time.perf_counter()
                lp, apply = jlora.inject(params, apply_fn, c.rank, alpha=c.alpha, targets=list(L.PROJ),
                                         key=jax.random.PRNGKey(2), example_args=(tokens,), dora=dora)
                jax.block_until_ready(lp)
                extra[f"{name}_inject_s"] = time.perf_counter() - t0
                ad, base = jlora.split(lp)
                run = L.Run(name, step=L.jlora_step(apply, tx), state=(ad, tx.init(ad)), const=base)
            L.compile_run(run, tokens)
            run.first_loss = float(L.call(run, tokens)[0])
            for _ in range(a.warmup):
                L.call(run, tokens)
            runs[name], status[name] = run, "ok"
            print(f"{name}: compile {run.res['compile_s']:.2f} s, first loss {run.first_loss:.5f}", flush=True)
        except Exception as e:
            status[name] = f"FAILED: {type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
    order = list(runs)
    for rep in range(a.steps):
        for name in order if rep % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            L.call(runs[name], tokens)
            runs[name].times.append(time.perf_counter() - t0)
    floor_ms = statistics.median(runs["floor"].times) * 1e3 if "floor" in runs and runs["floor"].times else None
    results = {}
    for name, _ in variants:
        row = {"status": status.get(name, "not run")}
        run = runs.get(name)
        if run is not None and run.times:
            med = statistics.median(run.times) * 1e3
            row.update(run.res, step_ms=med, tokens_per_s=c.batch * c.seq / (med / 1e3), first_loss=run.first_loss,
                       x_floor=med / floor_ms if floor_ms else None)
            if name != "floor" and "floor" in runs:  # B = 0: the adapted model is the base model
                row["check_ok"] = abs(run.first_loss - runs["floor"].first_loss) <= 2e-2 * abs(runs["floor"].first_loss)
        results[name] = row
    if peft is not None:
        if peft.get("status") == "ok" and floor_ms:
            peft["x_floor"] = peft["step_ms"] / floor_ms
        results["peft_dora_eager"] = peft
    jl, jd = results.get("jlora", {}), results.get("jlora_dora", {})
    if jl.get("step_ms") and jd.get("step_ms"):
        extra["dora_over_lora"] = jd["step_ms"] / jl["step_ms"]
    if jd.get("step_ms") and peft and peft.get("step_ms"):
        extra["peft_dora_over_jlora_dora"] = peft["step_ms"] / jd["step_ms"]
    return results, extra


def _print_steps(results: dict, extra: dict, a) -> None:
    f = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    print(f"\n# step: d={a.d} layers={a.layers} ffn={a.ffn} vocab={a.vocab} seq={a.seq} batch={a.batch} rank={a.rank} "
          f"({jax.default_backend()}:{jax.devices()[0].device_kind})")
    print("| variant | compile s | step ms (median) | tok/s | × floor | first loss | check |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, row in results.items():
        if row.get("status") != "ok":
            print(f"| {name} | {row.get('status')} | | | | | |")
            continue
        check = {True: "ok (= floor)", False: "FAIL"}.get(row.get("check_ok"), "-")
        print(f"| {name} | {f(row.get('compile_s'), '.2f')} | {f(row.get('step_ms'), '.2f')} "
              f"| {f(row.get('tokens_per_s'), ',.0f')} | {f(row.get('x_floor'), '.3f')} | {f(row.get('first_loss'), '.5f')} "
              f"| {check} |")
    if "dora_over_lora" in extra:
        print(f"jlora DoRA / jlora LoRA step: × {extra['dora_over_lora']:.3f}")
    if "peft_dora_over_jlora_dora" in extra:
        print(f"PEFT DoRA (eager) / jlora DoRA step: × {extra['peft_dora_over_jlora_dora']:.2f}")


# ----------------------------------------------------------------------------------------------
# Part 2: the inits' one-off cost


def _init_shapes(a) -> dict[str, tuple[int, int]]:
    d, kv, f = a.init_d, a.init_kv, a.init_ffn
    return {"q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d), "gate": (d, f), "up": (d, f), "down": (f, d)}


def _one_init(init: str, w, r: int, scale: float):
    lay = Layout((), (0,), (1,))
    parsed = _init.parse_init(init)
    if parsed.kind == "pissa":
        out = _init.pissa(w, lay, r, scale, parsed.n, jax.random.key(0))
    elif parsed.kind == "olora":
        out = _init.olora(w, lay, r)
    else:
        out = _init.loftq(w, lay, r, scale, parsed.n)
    jax.block_until_ready(out)
    if parsed.kind != "loftq":
        _init.fingerprint(w)  # PiSSA/OLoRA record the base's sha256; LoftQ hashes its Q (cheap) as well
    else:
        _init.fingerprint(out[0])
    return out


def _inits(a) -> dict:
    """Each init on one kernel of every distinct shape of a layer: a first call (compiling that
    shape) and a second (the steady cost); a layer is the sum over its 7 kernels of the steady cost."""
    names = [n for n in a.inits.split(",") if n]
    shapes = _init_shapes(a)
    distinct = sorted(set(shapes.values()))
    count = {s: sum(v == s for v in shapes.values()) for s in distinct}
    key = jax.random.key(0)
    weights = {s: (jax.random.normal(jax.random.fold_in(key, i), s, jnp.float32) / np.sqrt(s[0])).astype(jnp.bfloat16)
               for i, s in enumerate(distinct)}
    jax.block_until_ready(weights)
    lay = Layout((), (0,), (1,))

    def run(name, w):
        if name == "dora_magnitude":  # DoRA's init: one weight norm per kernel
            r = a.init_rank
            jax.block_until_ready(_dora.magnitude(w, jnp.zeros((w.shape[0], r)), jnp.zeros((r, w.shape[1])), 1.0, lay,
                                                  jnp.float32))
        else:
            _one_init(name, w, a.init_rank, 2.0)

    results = {}
    for name in ["dora_magnitude"] + names:
        try:
            first, steady = {}, {}
            for s, w in weights.items():
                t0 = time.perf_counter()
                run(name, w)  # compiles this shape (always repeated below: compiling can dominate)
                first[s] = time.perf_counter() - t0
                t0 = time.perf_counter()
                run(name, w)
                steady[s] = time.perf_counter() - t0
            layer = sum(count[s] * steady[s] for s in distinct)
            results[name] = {"status": "ok", "per_shape_s": {f"{s[0]}x{s[1]}": steady[s] for s in distinct},
                             "layer_s": layer, "model_s": layer * a.init_layers,
                             "compile_overhead_s": sum(first[s] - steady[s] for s in distinct)}
        except Exception as e:
            results[name] = {"status": f"FAILED: {type(e).__name__}: {str(e)[:300]}"}
            traceback.print_exc()
        print(f"{name}: {results[name].get('layer_s', float('nan')):.2f} s a layer", flush=True)
    return results


def _print_inits(results: dict, a) -> None:
    shapes = _init_shapes(a)
    print(f"\n# inits: one layer's 7 kernels {sorted(set(shapes.values()))}, rank {a.init_rank}, × {a.init_layers} "
          f"layers (bf16 weights, computed in float32)")
    print("| init | s / layer | s / model (× layers) | compile s (once per shape) | slowest shape |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, row in results.items():
        if row.get("status") != "ok":
            print(f"| {name} | {row.get('status')} | | | |")
            continue
        k = max(row["per_shape_s"], key=row["per_shape_s"].get)
        print(f"| {name} | {row['layer_s']:.3f} | {row['model_s']:.1f} | {row['compile_overhead_s']:.2f} "
              f"| {k}: {row['per_shape_s'][k]:.3f} s |")


def main(argv=None) -> int:
    a = parse_args(argv)
    peft = None if a.no_peft or a.no_step else _peft_dora(a)
    env = L.environment()
    print(f"# dora_step  jax {env['jax']}  {env['backend']}:{env['device_kind']}  {env['date']}", flush=True)
    if peft is not None:
        print(f"peft_dora_eager: {peft.get('status')}" + (f", {peft['step_ms']:.2f} ms" if peft.get("step_ms") else ""),
              flush=True)
    steps, extra = ({}, {}) if a.no_step else _steps(a, peft)
    inits = _inits(a) if a.inits else {}
    if steps:
        _print_steps(steps, extra, a)
    if inits:
        _print_inits(inits, a)
    if a.json_path:
        L.write_json(a.json_path, {"env": env, "args": vars(a), "steps": steps, "extra": extra, "inits": inits})
        print(f"wrote {a.json_path}")
    bad = [n for n, r in {**steps, **inits}.items() if n != "peft_dora_eager" and str(r.get("status", "")).startswith("FAILED")
           or r.get("check_ok") is False]
    if bad:
        print(f"FAILED: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
