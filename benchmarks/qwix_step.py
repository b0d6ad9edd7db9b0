"""qwix against jlora: one LoRA training step of the same Llama-shaped Flax NNX model, one process.

The closest JAX peer of jlora is Google's qwix (``qwix.apply_lora_to_model``, what Tunix and MaxText
use). This script builds one NNX model (``nnx.Embed``; ``nnx.Linear`` projections named q_proj,
k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; RMSNorm; RoPE; causal
``jax.nn.dot_product_attention``, cuDNN on a GPU; SwiGLU; an untied head; bf16 weights), its layers
in a Python loop or, with ``--scan``, stacked with ``nnx.vmap`` and run with ``nnx.scan``, and times,
interleaved:

  floor        frozen forward + input-gradient backward (the gradient of a scalar that scales the
               embedding output): the lower bound of any LoRA step on this model;
  qwix         ``qwix.apply_lora_to_model(model, qwix.LoraProvider(module_path=<the 7 projections>,
               rank, alpha))``, a pure step under ``jax.jit``: ``nnx.split(model, nnx.LoRAParam, ...)``,
               ``nnx.merge`` inside, ``nnx.value_and_grad(..., argnums=nnx.DiffState(0, nnx.LoRAParam))``,
               optax AdamW;
  qwix_nnx     the same model trained as Tunix's PeftTrainer does: ``nnx.jit`` of a step taking
               (model, optimizer), ``nnx.Optimizer(model, adamw, wrt=nnx.LoRAParam)``;
  jlora        ``jlora.inject`` on the model's ``nnx.split`` state (bf16 adapters, the 7
               projections), gradients w.r.t. ``jlora.split``'s adapters, optax AdamW;
  jlora_fused  the same with ``matmul="pallas"`` (the Hopper kernel; elsewhere the plain path).

Both LoRA implementations compute ``x·W0 + (alpha/r)·(x·A)·B`` unmerged with bf16 adapters and start
from the same A (jlora's draw, copied into qwix's ``kernel_lora_a``) and B (zero, or ``--b-init``),
so their first losses must equal each other and the floor's (B = 0), and their adapter gradients
must agree: the script checks both. Per variant: trace / lower / compile seconds (``qwix_nnx``: its
first call, which compiles), median step ms, tokens/s, × floor, × qwix, XLA's memory plan and, on a
GPU, the allocator's peak. ``--tiny`` is a CPU-sized check. With ``--scan`` qwix cannot create its
LoRA params inside ``nnx.scan``; the script adds the stacked ``nnx.LoRAParam`` itself first.

Usage: ``python benchmarks/qwix_step.py [--scan] [--tiny] [--json out.json]``. qwix 0.1.8 is in the
test install (``pip install --no-deps qwix==0.1.8``); on the GPU machine carry its wheel.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
import traceback
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE), _HERE]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import jlora  # noqa: E402
import lora_step as L  # noqa: E402  (Cfg, rope, xent, Run, compile_run, first_step, environment, ...)

VARIANTS = ("floor", "qwix", "qwix_nnx", "jlora", "jlora_fused")
CHECKED = ("qwix", "qwix_nnx", "jlora_fused")  # first step checked against jlora's (built whenever one runs)
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DT = jnp.bfloat16
GRAD_RTOL = 5e-2  # bf16: per-kernel relative L2 error of dA / dB, qwix against jlora


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("d", 2048), ("layers", 16), ("heads", 16), ("ffn", 5632), ("vocab", 32000),
                          ("seq", 2048), ("batch", 8), ("rank", 16)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--scan", action="store_true", help="stack the layers (nnx.vmap) and run them with nnx.scan")
    p.add_argument("--tiny", action="store_true", help="CPU-sized: d 128, 2 layers, 4 heads, ffn 256, "
                   "vocab 256, seq 32, batch 4, rank 4")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (interleaved)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--b-init", type=float, default=0.0, help="std of the initial B (0: standard LoRA)")
    p.add_argument("--json", dest="json_path", default=None)
    a = p.parse_args(argv)
    if a.tiny:
        a.d, a.layers, a.heads, a.ffn, a.vocab, a.seq, a.batch, a.rank = 128, 2, 4, 256, 256, 32, 4, 4
    a.variants = [v for v in a.variants.split(",") if v]
    bad = sorted(set(a.variants) - set(VARIANTS))
    if bad:
        p.error(f"unknown variants {bad}; choose from {list(VARIANTS)}")
    return a


# ----------------------------------------------------------------------------------------------
# The model


def _linear(i: int, o: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(i, o, use_bias=False, dtype=DT, param_dtype=DT,
                      kernel_init=nnx.initializers.normal(1.0 / math.sqrt(i)), rngs=rngs)


class RMSNorm(nnx.Module):
    def __init__(self, d: int):
        self.scale = nnx.Param(jnp.ones((d,), DT))

    def __call__(self, x):
        return L.rms_norm(x, self.scale[...])


class Block(nnx.Module):
    def __init__(self, c: L.Cfg, rngs: nnx.Rngs):
        self.c = c
        self.ln1, self.ln2 = RMSNorm(c.d), RMSNorm(c.d)
        for n, (i, o) in c.proj_shapes().items():  # lora_step's names: q, k, v, o, gate, up, down
            setattr(self, f"{n}_proj", _linear(i, o, rngs))

    def __call__(self, h):
        b, t, d = h.shape
        heads = (b, t, self.c.heads, self.c.head_dim)
        x = self.ln1(h)
        q, k = L.rope(self.q_proj(x).reshape(heads)), L.rope(self.k_proj(x).reshape(heads))
        att = L.causal_attention(q, k, self.v_proj(x).reshape(heads), self.c.attn)
        h = h + self.o_proj(att.reshape(b, t, d))
        x = self.ln2(h)
        return h + self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Model(nnx.Module):
    def __init__(self, c: L.Cfg, rngs: nnx.Rngs):
        self.scan = c.scan
        self.embed = nnx.Embed(c.vocab, c.d, dtype=DT, param_dtype=DT,
                               embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        if c.scan:
            @nnx.split_rngs(splits=c.layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(r):
                return Block(c, r)

            self.layers = make(rngs)
        else:
            self.layers = nnx.List([Block(c, rngs) for _ in range(c.layers)])
        self.norm = RMSNorm(c.d)
        self.lm_head = _linear(c.d, c.vocab, rngs)

    def __call__(self, tokens, emb_scale=None):
        h = self.embed(tokens)
        if emb_scale is not None:
            h = (h * emb_scale).astype(DT)
        if self.scan:
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def body(h, block):
                return block(h)

            h = body(h, self.layers)
        else:
            for block in self.layers:
                h = block(h)
        return self.lm_head(self.norm(h)).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Adapters as {"layers/<i>/q_proj/kernel": (A, B)} (scanned: "layers/q_proj/kernel", stacked)


def _key(path: tuple) -> str:
    """A key path as ``a/b/c``, without an nnx Variable's own trailing key."""
    parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    while parts and parts[-1] in ("value", "raw_value"):  # an nnx Variable's own key
        parts.pop()
    return "/".join(parts)


def jlora_pairs(tree: Any) -> dict[str, tuple[Any, Any]]:
    """``{path: (A, B)}`` of a jlora params (or gradients) tree."""
    is_k = lambda x: isinstance(x, jlora.LoraKernel)
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_k)[0]
    return {_key(p): (x.a, x.b) for p, x in flat if is_k(x)}


def qwix_pairs(state: Any) -> dict[str, tuple[Any, Any]]:
    """``{path: (A, B)}`` of a qwix LoRA state (or its gradients): its ``kernel_lora_a/b`` leaves."""
    flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    got: dict[str, dict[str, Any]] = {}
    for p, x in flat:
        k = _key(p)
        v = x.get_raw_value() if isinstance(x, nnx.Variable) else x
        for end, slot in (("kernel_lora_a", "a"), ("kernel_lora_b", "b")):
            if k.endswith(end):
                got.setdefault(k[: -len(end)] + "kernel", {})[slot] = v
    return {k: (d["a"], d["b"]) for k, d in got.items()}


def set_qwix_pairs(model: nnx.Module, pairs: dict) -> int:
    """Give every qwix LoRA module ``pairs[path]`` (its own copies); returns how many."""
    n = 0
    for path, mod in nnx.iter_modules(model):
        if hasattr(mod, "kernel_lora_a"):
            a, b = pairs["/".join(map(str, path)) + "/kernel"]
            for var, val in ((mod.kernel_lora_a, a), (mod.kernel_lora_b, b)):
                if tuple(var.shape) != tuple(np.shape(val)):
                    raise ValueError(f"{path}: qwix {tuple(var.shape)} vs {np.shape(val)}")
                var.set_value(jnp.array(val, var.dtype, copy=True))
            n += 1
    return n


def set_jlora_pairs(lp: Any, pairs: dict) -> Any:
    """jlora params with every A and B replaced by ``pairs[path]`` (bf16 copies)."""
    def visit(path, x):
        if isinstance(x, jlora.LoraKernel):
            a, b = pairs[_key(path)]
            return x.replace(a=jnp.array(a, DT, copy=True), b=jnp.array(b, DT, copy=True))
        return x

    return jax.tree_util.tree_map_with_path(visit, lp, is_leaf=lambda x: isinstance(x, jlora.LoraKernel))


# ----------------------------------------------------------------------------------------------
# Steps: step(state, const, tokens) -> (state, loss, grads), state donated


def floor_step(graphdef: Any) -> Any:
    def step(emb_scale, state, tokens):
        f = lambda e, m: L.xent(m(tokens, emb_scale=e), tokens)
        loss, g = nnx.value_and_grad(f, argnums=0)(emb_scale, nnx.merge(graphdef, state))
        return emb_scale - 1e-6 * g, loss, None

    return step


def qwix_step(qgraph: Any, tx: optax.GradientTransformation) -> Any:
    def step(state, rest, tokens):
        lora, opt = state
        model = nnx.merge(qgraph, lora, rest)
        loss, grads = nnx.value_and_grad(lambda m: L.xent(m(tokens), tokens),
                                         argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        upd, opt = tx.update(grads, opt, lora)
        return (optax.apply_updates(lora, upd), opt), loss, grads

    return step


def jlora_step(apply: Any, tx: optax.GradientTransformation) -> Any:
    def step(state, base, tokens):
        ad, opt = state
        loss, grads = jax.value_and_grad(lambda x: L.xent(apply(jlora.combine(x, base), tokens), tokens))(ad)
        upd, opt = tx.update(grads, opt, ad)
        return (optax.apply_updates(ad, upd), opt), loss, grads

    return step


@dataclasses.dataclass
class NnxRun(L.Run):
    """``qwix_nnx``: an ``nnx.jit`` step over (model, optimizer) objects, compiled by its first call."""

    objs: Any = None


def call(run: L.Run, tokens: jax.Array) -> tuple[Any, Any]:
    """One step of any variant: ``(loss, grads)`` once the step's updated state is ready."""
    if isinstance(run, NnxRun):
        f, model, opt = run.objs
        loss, grads = f(model, opt, tokens)
        jax.block_until_ready((loss, grads, nnx.state(model, nnx.LoRAParam), nnx.state(opt)))
        return loss, grads
    return L.call(run, tokens)


def first_step(run: L.Run, tokens: jax.Array) -> None:
    """The first step (``qwix_nnx``: its first call, which compiles): loss, gradients and, on a
    GPU, the allocator's peak, as ``lora_step.first_step`` records them."""
    if not isinstance(run, NnxRun):
        return L.first_step(run, tokens)
    before = L.device_mem()
    t0 = time.perf_counter()
    loss, grads = call(run, tokens)
    run.res.update(first_call_s=time.perf_counter() - t0, trace_s=None, lower_s=None, compile_s=None)
    after = L.device_mem()
    if before and after:
        run.res.update(peak_bytes_process=after["peak"], peak_delta_bytes=after["peak"] - before["in_use"],
                       peak_delta_exact=after["peak"] > before["peak"])
    run.first_loss, run.first_grads = float(loss), jax.device_get(grads)


# ----------------------------------------------------------------------------------------------


def _prepare(a: argparse.Namespace, c: L.Cfg, tokens: jax.Array) -> tuple:
    """The model, jlora's injected variants, the shared adapters and the qwix model."""
    model = Model(c, nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    fn = lambda s, t: nnx.merge(graphdef, s)(t)
    jl, status = {}, {}
    for name, kw in (("jlora", {}), ("jlora_fused", {"matmul": "pallas"})):
        if name in a.variants or (name == "jlora" and set(a.variants) & set(CHECKED)):
            jl[name] = jlora.inject(state, fn, rank=c.rank, alpha=c.alpha, targets=list(PROJ),
                                    key=jax.random.PRNGKey(2), example_args=(tokens,), adapter_dtype=DT, **kw)
    pairs = {}  # the adapters every LoRA variant starts from: jlora's draw (jlora runs with any of them)
    if jl:
        pairs = {k: (np.asarray(x, np.float32), np.asarray(y, np.float32))
                 for k, (x, y) in jlora_pairs(next(iter(jl.values()))[0]).items()}
    if a.b_init:
        rng = np.random.default_rng(3)
        pairs = {k: (x, rng.standard_normal(np.shape(y)).astype(np.float32) * a.b_init)
                 for k, (x, y) in sorted(pairs.items())}
    qmodel = None
    if any(v.startswith("qwix") for v in a.variants):
        try:
            import qwix

            provider = qwix.LoraProvider(module_path=".*(" + "|".join(PROJ) + ")", rank=c.rank, alpha=c.alpha)
            base = nnx.clone(model)
            if c.scan:  # qwix's eager init call cannot create params inside nnx.scan: stack them here
                for n in PROJ:
                    lin = getattr(base.layers, n)
                    x, y = pairs[f"layers/{n}/kernel"]
                    lin.kernel_lora_a = nnx.LoRAParam(jnp.asarray(x, DT))
                    lin.kernel_lora_b = nnx.LoRAParam(jnp.asarray(y, DT))
                qmodel = qwix.apply_lora_to_model(base, provider, tokens[:1], rngs=nnx.Rngs(4), skip_nnx_init=True)
            else:
                qmodel = qwix.apply_lora_to_model(base, provider, tokens[:1], rngs=nnx.Rngs(4))
            n = set_qwix_pairs(qmodel, pairs)
            if n != len(PROJ) * (1 if c.scan else c.layers):
                raise ValueError(f"qwix adapted {n} modules")
        except Exception as e:  # qwix missing or failing fails its variants only
            for v in a.variants:
                if v.startswith("qwix"):
                    status[v] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            qmodel = None
    return graphdef, state, jl, pairs, qmodel, status


def _build(name: str, tx: optax.GradientTransformation, graphdef: Any, state: Any, jl: dict, pairs: dict,
           qmodel: Any) -> L.Run:
    """One variant's step, state and constants (``qwix_nnx``: its nnx.jit step and objects)."""
    if name == "floor":
        return L.Run(name, step=floor_step(graphdef), state=jnp.ones((), jnp.float32), const=state)
    if name.startswith("qwix"):
        qgraph, lora, rest = nnx.split(qmodel, nnx.LoRAParam, ...)
        lora = jax.tree.map(lambda x: jnp.array(x, copy=True), lora)  # its own buffers: donated
        if name == "qwix":
            return L.Run(name, step=qwix_step(qgraph, tx), state=(lora, jax.jit(tx.init)(lora)), const=rest)
        model = nnx.merge(qgraph, lora, rest)
        opt = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)

        def train_step(model, optimizer, tokens):  # Tunix's PeftTrainer step
            loss, grads = nnx.value_and_grad(lambda m: L.xent(m(tokens), tokens),
                                             argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
            optimizer.update(model, grads)
            return loss, grads

        return NnxRun(name, objs=(nnx.jit(train_step, donate_argnames=("optimizer",)), model, opt))
    lp, apply = jl[name]
    ad, base = jlora.split(set_jlora_pairs(lp, pairs))
    return L.Run(name, step=jlora_step(apply, tx), state=(ad, jax.jit(tx.init)(ad)), const=base, apply=apply)


def _check(run: L.Run, ref: L.Run, floor: L.Run | None, b_zero: bool) -> dict:
    """First loss and adapter gradients of ``run`` against ``ref`` (jlora's). With B = 0 both
    losses must also equal the floor's (when it ran) and dA is zero on both sides, so only dB is
    really compared (``--b-init`` makes dA count)."""
    rel = lambda x, y: abs(x - y) / max(abs(y), 1e-30)
    out = {"ref": ref.name, "loss_rel_err": rel(run.first_loss, ref.first_loss), "dA_compared": not b_zero}
    if b_zero and floor is not None:
        out["loss_vs_floor_rel_err"] = rel(run.first_loss, floor.first_loss)
    to_pairs = lambda r: (qwix_pairs if r.name.startswith("qwix") else jlora_pairs)(r.first_grads)
    got, want = to_pairs(run), to_pairs(ref)
    if not want or set(got) != set(want):
        out.update(ok=False, error=f"adapter paths differ: {sorted(set(got) ^ set(want))[:4]}")
        return out
    err = max(max(L.rel_err(got[k][0], want[k][0]), L.rel_err(got[k][1], want[k][1])) for k in want)
    db = math.sqrt(sum(float(np.sum(np.square(np.asarray(got[k][1], np.float64)))) for k in got))
    losses_ok = max(out["loss_rel_err"], out.get("loss_vs_floor_rel_err", 0.0)) <= L.LOSS_RTOL
    out.update(max_grad_rel_err=err, dB_norm=db, ok=losses_ok and err <= GRAD_RTOL and db > 0)
    return out


def _first_steps(a, names: list[str], tokens, built: dict) -> tuple[dict[str, L.Run], dict[str, str]]:
    """Per variant: build, compile, first step, warm-up; a variant that fails is reported, not fatal."""
    runs: dict[str, L.Run] = {}
    status = built["status"]
    for name in names:
        if name in status:
            print(f"{name}: {status[name]}", flush=True)
            continue
        try:
            run = _build(name, built["tx"], built["graphdef"], built["state"], built["jl"], built["pairs"],
                         built["qmodel"])
            if not isinstance(run, NnxRun):
                L.compile_run(run, tokens)
            first_step(run, tokens)
            for _ in range(a.warmup):
                call(run, tokens)
            runs[name], status[name] = run, "ok"
            report = getattr(run.apply, "fused_report", None)
            print(f"{name}: first loss {run.first_loss:.5f}"
                  + (f"; {report}".replace("\n", " ") if report else ""), flush=True)
        except Exception as e:
            status[name] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            print(f"{name}: {status[name]}", flush=True)
            traceback.print_exc()
    return runs, status


def _time_interleaved(steps: int, runs: dict[str, L.Run], status: dict[str, str], tokens) -> None:
    """Timed steps, in the order A B C … C B A …; a variant whose step raises is dropped."""
    for i in range(steps):
        order = list(runs)
        for name in order if i % 2 == 0 else order[::-1]:
            try:
                t0 = time.perf_counter()
                call(runs[name], tokens)
                runs[name].times.append(time.perf_counter() - t0)
            except Exception as e:
                status[name] = f"FAILED in a timed step: {type(e).__name__}: {str(e)[:200]}"
                print(f"{name}: {status[name]}", flush=True)
                del runs[name]


def _fmt_check(ch: dict | None) -> str:
    if ch is None:
        return "-"
    if "error" in ch:
        return f"FAIL ({ch['error']})"
    s = f"loss {ch['loss_rel_err']:.0e}"
    if "loss_vs_floor_rel_err" in ch:
        s += f", vs floor {ch['loss_vs_floor_rel_err']:.0e}"
    s += f", grads {ch['max_grad_rel_err']:.0e}" + ("" if ch["dA_compared"] else ", dA = 0")
    return f"{'ok' if ch['ok'] else 'FAIL'} ({s})"


def _table(c: L.Cfg, runs: dict[str, L.Run], status: dict[str, str], checks: dict[str, dict]) -> dict:
    """Prints the markdown table; returns the per-variant results for the JSON."""
    ms = {n: 1e3 * statistics.median(r.times) for n, r in runs.items() if r.times}
    ratio = lambda n, ref: f"{ms[n] / ms[ref]:.3f}" if n in ms and ref in ms else "-"
    print("\n| variant | compile s | step ms (median) | tok/s | × floor | × qwix | XLA GiB | peak Δ GiB "
          "| first loss | check vs jlora |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    results = {}
    for name, run in runs.items():
        r = dict(run.res, status=status[name], first_loss=run.first_loss, step_ms=ms.get(name),
                 times_s=run.times, check=checks.get(name))
        results[name] = r
        comp = r.get("compile_s") if r.get("compile_s") is not None else r.get("first_call_s")
        gib = lambda key: f"{r[key] / 2**30:.2f}" if r.get(key) else "-"
        tok_s = f"{c.batch * c.seq / (ms[name] / 1e3):,.0f}" if name in ms else "-"
        print(f"| {name} | {comp or 0:.1f} | {ms.get(name, float('nan')):.2f} | {tok_s} | {ratio(name, 'floor')} "
              f"| {ratio(name, 'qwix')} | {gib('xla_total_bytes')} | {gib('peak_delta_bytes')} "
              f"| {run.first_loss:.5f} | {_fmt_check(checks.get(name))} |")
    return results


def main(argv=None) -> int:
    """Set up, compile and first-step every variant, time them interleaved, check, print, write."""
    a = parse_args(argv)
    attn = "cudnn" if jax.default_backend() == "gpu" else "xla"
    c = L.Cfg(a.d, a.layers, a.heads, a.ffn, a.vocab, a.seq, a.batch, a.rank, 2.0 * a.rank, a.scan, attn)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (c.batch, c.seq), 0, c.vocab)
    print(f"# qwix_step  jax {jax.__version__}  {jax.default_backend()}:{jax.devices()[0].device_kind}  "
          f"d={c.d} layers={c.layers} heads={c.heads} ffn={c.ffn} vocab={c.vocab} seq={c.seq} batch={c.batch} "
          f"rank={c.rank} scan={c.scan} attn={attn} b_init={a.b_init}", flush=True)
    tx = optax.adamw(1e-4)
    graphdef, state, jl, pairs, qmodel, status = _prepare(a, c, tokens)
    names = list(a.variants)
    if set(names) & set(CHECKED) and "jlora" not in names:
        names.append("jlora")  # the reference of every check
    built = dict(tx=tx, graphdef=graphdef, state=state, jl=jl, pairs=pairs, qmodel=qmodel, status=status)
    runs, status = _first_steps(a, names, tokens, built)
    _time_interleaved(a.steps, runs, status, tokens)
    checks = {}
    for name in CHECKED:
        if name not in runs:
            continue
        if "jlora" not in runs:
            checks[name] = {"ok": False, "error": "no jlora run to check against"}
            continue
        try:
            checks[name] = _check(runs[name], runs["jlora"], runs.get("floor"), a.b_init == 0)
        except Exception as e:
            checks[name] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    results = _table(c, runs, status, checks)
    failed = [n for n in names if status.get(n) != "ok"] + [n for n, ch in checks.items() if not ch["ok"]]
    if a.json_path:
        L.write_json(a.json_path, {"env": L.environment(), "config": dataclasses.asdict(c), "args": vars(a),
                                   "results": results, "status": status, "checks": checks})
    if failed:
        print(f"FAILED: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
