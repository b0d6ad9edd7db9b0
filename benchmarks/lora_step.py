"""One LoRA training step on a Llama-shaped decoder: variants measured side by side, one process.

Variants (all on the same plain-JAX model, bf16 weights, same tokens):

  floor        frozen forward + input-gradient backward: the gradient is taken only w.r.t. a scalar
               that scales the embeddings, so the whole backward runs but no weight gradient does.
               The lower bound of any LoRA step on this model.
  handwritten  unmerged LoRA written by hand, y = xW + s(xA)B on q,k,v,o,gate,up,down; grads w.r.t.
               the adapters only; AdamW on the adapters.
  merged       LoRA with W + s·A@B materialised every step.
  full         full fine-tuning, grads for every weight, AdamW.
  jlora        ``jlora.inject`` on the same forward (adapters on the same 7 projections through
               ``targets``), bf16 adapters, grads w.r.t. the adapters via ``jlora.split``/``combine``,
               AdamW (optax) on the adapters.
  jlora_f32    the same with jlora's default float32 adapters.
  jlora_fused  ``jlora`` with ``inject(..., matmul="pallas")``: the rank-r update inside the base
               matmul's epilogue (Pallas Mosaic GPU kernel; sm_90 only, else the same as ``jlora``;
               with ``--scan`` inside the loop body too unless ``JLORA_FUSED_IN_LOOPS=0``; the run
               prints how many matmuls took the kernel).

For each variant: trace / lower / compile time (``jax.jit(step).trace(...).lower().compile()``), the
median step time over ``--steps`` interleaved repetitions (after warm-up), tokens/s, the ratio to
``floor``, XLA's static memory plan (``compiled.memory_analysis()``), the device allocator's peak
(``memory_stats()``, GPU only), and a first-step correctness check (loss and adapter gradients
against ``handwritten``, whose adapters are built from jlora's A and B so both start identical).

Run ``python benchmarks/lora_step.py --help``; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Any, Callable

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jlora  # noqa: E402
from jlora._paths import path_str  # noqa: E402
from jlora._tree import iter_kernels  # noqa: E402

PROJ = ("q", "k", "v", "o", "gate", "up", "down")
VARIANTS = ("floor", "handwritten", "merged", "full", "jlora", "jlora_f32", "jlora_fused")
# Phase 1 (compile + first step + memory) runs in this order: expected peak memory ascending, so
# that the allocator's process-wide peak is most often set by the variant just run.
MEMORY_ORDER = ("floor", "handwritten", "jlora", "jlora_f32", "jlora_fused", "merged", "full")
JLORA_VARIANTS = ("jlora", "jlora_f32", "jlora_fused")
GIB = 2.0**30

# First-step check tolerances (bf16 compute): relative error of the loss, and the largest
# per-kernel relative L2 error of dA and dB, against the hand-written reference.
LOSS_RTOL = 2e-2
GRAD_RTOL = {"jlora": 5e-2, "jlora_f32": 5e-2, "jlora_fused": 5e-2, "merged": 1e-1}


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class Cfg:
    d: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    seq: int
    batch: int
    rank: int
    alpha: float
    scan: bool
    attn: str  # "cudnn" | "xla" | "manual"

    @property
    def head_dim(self) -> int:
        return self.d // self.heads

    def proj_shapes(self) -> dict[str, tuple[int, int]]:
        d, f = self.d, self.ffn
        return {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "gate": (d, f), "up": (d, f), "down": (f, d)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model shape (defaults: the reference 0.9 B Llama-shaped model)")
    g.add_argument("--d", type=int, default=2048, help="hidden size")
    g.add_argument("--layers", type=int, default=16)
    g.add_argument("--heads", type=int, default=16)
    g.add_argument("--ffn", type=int, default=5632, help="SwiGLU intermediate size")
    g.add_argument("--vocab", type=int, default=32000)
    g.add_argument("--seq", type=int, default=2048)
    g.add_argument("--batch", type=int, default=8)
    g.add_argument("--rank", type=int, default=16)
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2·rank, so s = 2 as in the reference runs)")
    g.add_argument("--scan", action="store_true", help="stack the layers and run them with lax.scan")
    g.add_argument("--attn", default="auto", choices=("auto", "cudnn", "xla", "manual"),
                   help="attention: jax.nn.dot_product_attention with cuDNN (auto on GPU) or XLA (auto elsewhere), or hand-written")
    m = p.add_argument_group("measurement")
    m.add_argument("--jlora-fuse", action="store_true",
                   help="inject(..., matmul='shared_xa'): one x·[A_q A_k A_v] and x·[A_gate A_up]")
    m.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    m.add_argument("--steps", type=int, default=10, help="timed steps per variant (interleaved across variants)")
    m.add_argument("--warmup", type=int, default=2, help="untimed steps per variant after the first (compiling) one")
    m.add_argument("--lr", type=float, default=1e-4)
    m.add_argument("--b-init", type=float, default=1e-2,
                   help="std of the initial B (0 gives standard LoRA, B = 0, but then dA = 0 and the check cannot see it)")
    m.add_argument("--no-check", action="store_true", help="skip the first-step correctness check")
    m.add_argument("--json", dest="json_path", default=None, help="write results (and environment) to this file")
    a = p.parse_args(argv)
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in a.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    if a.d % a.heads or (a.d // a.heads) % 2:
        p.error("--d must be a multiple of --heads with an even head dimension")
    return a


# ----------------------------------------------------------------------------------------------
# The model: plain JAX, Llama-shaped (RMSNorm, RoPE, causal MHA, SwiGLU), untied head, bf16.

DT = jnp.bfloat16


def _weight_specs(c: Cfg) -> list[tuple[str, tuple[int, ...], float]]:
    """(name, shape, std) of every random weight: embed, head, then layer-major projections."""
    specs = [("embed", (c.vocab, c.d), 0.02), ("head", (c.d, c.vocab), 1.0 / math.sqrt(c.d))]
    for i in range(c.layers):
        specs += [(f"{i}/{n}", s, 1.0 / math.sqrt(s[0])) for n, s in c.proj_shapes().items()]
    return specs


def _assemble(c: Cfg, ws: dict, xp) -> dict:
    layers = []
    for i in range(c.layers):
        layer = {n: ws[f"{i}/{n}"] for n in PROJ}
        layer["ln1"] = xp.ones((c.d,), DT)
        layer["ln2"] = xp.ones((c.d,), DT)
        layers.append(layer)
    params = {"embed": ws["embed"], "head": ws["head"], "layers": layers}
    if c.scan:
        params["layers"] = jax.tree.map(lambda *xs: xp.stack(xs), *layers)
    return params


def init_params(seed: int, c: Cfg) -> dict:
    """Random bf16 weights; kernels are (in, out) and used as ``x @ W``.

    Small models are drawn on the host (numpy: no XLA compile, which dominates on a CPU); large ones
    on the device, one compiled draw per distinct shape (no host transfer).
    """
    specs = _weight_specs(c)
    total = sum(math.prod(s) for _, s, _ in specs)
    if total <= 50_000_000:
        rng = np.random.default_rng(seed)
        ws = {n: (rng.standard_normal(s, np.float32) * std).astype(DT) for n, s, std in specs}
        return jax.device_put(_assemble(c, ws, np))

    # One small compiled draw per distinct shape (a single draw of every weight at once took
    # XLA 8.5 minutes to compile on an H200).
    draw = jax.jit(lambda key, std, shape: (jax.random.normal(key, shape, jnp.float32) * std).astype(DT),
                   static_argnums=2)
    key = jax.random.PRNGKey(seed)
    ws = {n: draw(jax.random.fold_in(key, i), std, s) for i, (n, s, std) in enumerate(specs)}
    return _assemble(c, ws, jnp)


def rms_norm(x, w, eps=1e-6):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * w


def rope(x, theta=10000.0):
    """Rotary embedding, rotate-half convention (as in Hugging Face Llama). x: (B, T, N, H)."""
    t, h = x.shape[1], x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)
    ang = jnp.arange(t, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    ang = jnp.concatenate([ang, ang], axis=-1)[None, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * jnp.cos(ang) + rotated * jnp.sin(ang)).astype(x.dtype)


def causal_attention(q, k, v, impl: str):
    if impl in ("cudnn", "xla"):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    # hand-written: softmax in float32
    t = q.shape[1]
    s = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    mask = jnp.tril(jnp.ones((t, t), bool))
    s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bnts,bsnh->btnh", p, v)


def linear(x, w, ad, mode: str, scale: float):
    """``x @ w``, plus the hand-written LoRA path when ``ad = {'a': A, 'b': B}`` is given."""
    if ad is None:
        return x @ w
    a, b = ad["a"], ad["b"]
    if mode == "merged":
        return x @ (w + (scale * (a @ b)).astype(w.dtype))
    return x @ w + (scale * ((x @ a) @ b)).astype(x.dtype)


def decoder_block(h, w, ad, c: Cfg, mode: str, scale: float):
    bsz, t, _ = h.shape
    lin = lambda x, n: linear(x, w[n], None if ad is None else ad[n], mode, scale)
    x = rms_norm(h, w["ln1"])
    q = rope(lin(x, "q").reshape(bsz, t, c.heads, c.head_dim))
    k = rope(lin(x, "k").reshape(bsz, t, c.heads, c.head_dim))
    v = lin(x, "v").reshape(bsz, t, c.heads, c.head_dim)
    att = causal_attention(q, k, v, c.attn).reshape(bsz, t, c.d)
    h = h + lin(att, "o")
    x = rms_norm(h, w["ln2"])
    return h + lin(jax.nn.silu(lin(x, "gate")) * lin(x, "up"), "down")


def forward(params, tokens, c: Cfg, *, lora=None, mode="unmerged", scale=1.0, emb_scale=None):
    """Logits (float32). ``lora`` mirrors ``params['layers']`` with ``{'a', 'b'}`` per projection."""
    h = params["embed"][tokens]
    if emb_scale is not None:
        h = (h * emb_scale).astype(DT)
    if c.scan:

        def body(h, xs):
            w, ad = xs
            return decoder_block(h, w, ad, c, mode, scale), None

        h, _ = jax.lax.scan(body, h, (params["layers"], lora))
    else:
        for i, w in enumerate(params["layers"]):
            h = decoder_block(h, w, None if lora is None else lora[i], c, mode, scale)
    return (h @ params["head"]).astype(jnp.float32)


def xent(logits, tokens):
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def matmul_params(c: Cfg) -> int:
    return sum(i * o for i, o in c.proj_shapes().values()) * c.layers + c.d * c.vocab


def attn_flops_fwd_per_token(c: Cfg) -> float:
    # causal QK^T and PV: 2 matmuls · 2 FLOP · seq/2 keys on average · d, per layer
    return 2 * 2 * c.layers * (c.seq / 2) * c.d


# ----------------------------------------------------------------------------------------------
# Adapters


def _is_handwritten_pair(x) -> bool:
    return isinstance(x, dict) and set(x) == {"a", "b"}


def adapter_pairs(tree) -> dict[str, tuple[Any, Any]]:
    """``{path: (A, B)}`` for a jlora tree (LoraKernel nodes) or a hand-written one ({'a', 'b'})."""
    out = {path: (k.a, k.b) for path, k in iter_kernels(tree) if isinstance(k, jlora.LoraKernel)}
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_handwritten_pair)
    out.update({path_str(path): (x["a"], x["b"]) for path, x in flat if _is_handwritten_pair(x)})
    return out


def adapter_shapes(c: Cfg) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """``{path: (A's shape, B's shape)}`` of the adapter on every projection (paths as in ``params``)."""
    r, shapes = c.rank, c.proj_shapes()
    if c.scan:
        return {f"layers/{n}": ((c.layers, i, r), (c.layers, r, o)) for n, (i, o) in shapes.items()}
    return {f"layers/{l}/{n}": ((i, r), (r, o)) for l in range(c.layers) for n, (i, o) in shapes.items()}


def check_pair_shapes(pairs: dict[str, tuple[Any, Any]], c: Cfg) -> None:
    """Raise unless ``pairs`` has an A (…, in, r) and a B (…, r, out) at every projection's path."""
    for path, (a_shape, b_shape) in adapter_shapes(c).items():
        if path not in pairs:
            raise KeyError(f"no adapter at {path!r}; have {sorted(pairs)[:8]}...")
        a, b = pairs[path]
        if tuple(a.shape) != a_shape or tuple(b.shape) != b_shape:
            raise ValueError(f"{path}: A{tuple(a.shape)} B{tuple(b.shape)}, expected A{a_shape} B{b_shape}")


def handwritten_from_pairs(pairs: dict[str, tuple[Any, Any]], c: Cfg, dtype=DT):
    """The hand-written adapter tree (mirroring params['layers']) from ``{path: (A, B)}``."""
    check_pair_shapes(pairs, c)
    # copies: the step donates its state, and the same pairs seed several variants
    get = lambda path: {"a": jnp.array(pairs[path][0], dtype, copy=True),
                        "b": jnp.array(pairs[path][1], dtype, copy=True)}
    if c.scan:
        return {n: get(f"layers/{n}") for n in PROJ}
    return [{n: get(f"layers/{l}/{n}") for n in PROJ} for l in range(c.layers)]


def own_init_pairs(seed: int, c: Cfg) -> dict[str, tuple[Any, Any]]:
    """A ~ N(0, 1/fan_in), B = 0 (jlora's documented init), for a run without a jlora variant.

    Host-side numpy (adapters are small): no per-shape XLA compiles for eager random ops.
    """
    rng = np.random.default_rng(seed)
    pairs = {}
    r = c.rank
    for l in range(c.layers):
        for n, (i, o) in c.proj_shapes().items():
            a = (rng.standard_normal((i, r), np.float32) / math.sqrt(i)).astype(np.float32)
            pairs[f"layers/{l}/{n}"] = (a, np.zeros((r, o), np.float32))
    if c.scan:
        pairs = {
            f"layers/{n}": tuple(np.stack([pairs[f"layers/{l}/{n}"][t] for l in range(c.layers)]) for t in (0, 1))
            for n in PROJ
        }
    return pairs


def with_random_b(pairs, seed: int, std: float):
    """Replace every B by std·N(0, 1) so that dA ≠ 0 on the first step (what the check compares)."""
    if std == 0:
        return dict(pairs)
    rng = np.random.default_rng(seed)
    return {path: (a, (rng.standard_normal(np.shape(b), np.float32) * std).astype(np.float32))
            for path, (a, b) in sorted(pairs.items())}


def set_jlora_pairs(lora_params, pairs, dtype):
    """jlora params with each LoraKernel's A and B replaced by ``pairs[path]`` cast to ``dtype``."""

    def visit(path, x):
        if isinstance(x, jlora.LoraKernel):
            a, b = pairs[path_str(path)]
            if tuple(a.shape) != tuple(x.a.shape) or tuple(b.shape) != tuple(x.b.shape):
                raise ValueError(f"{path_str(path)}: shapes differ from the reference adapters")
            return jlora.LoraKernel(x.w0, jnp.array(a, dtype, copy=True), jnp.array(b, dtype, copy=True), layout=x.layout,
                                    scale=x.scale, dropout=x.dropout)
        return x

    return jax.tree_util.tree_map_with_path(visit, lora_params, is_leaf=lambda x: isinstance(x, jlora.LoraKernel))


# ----------------------------------------------------------------------------------------------
# Steps. Every step is ``step(state, const, tokens) -> (state, loss, grads)``; state is donated.


def floor_step(c: Cfg):
    def step(emb_scale, params, tokens):
        f = lambda e: xent(forward(params, tokens, c, emb_scale=e), tokens)
        loss, g = jax.value_and_grad(f)(emb_scale)
        return emb_scale - 1e-6 * g, loss, g

    return step


def optax_step(loss_fn: Callable, tx, *, grads: bool = True):
    """``step(state, const, tokens) -> ((params, opt), loss, grads)``: ``jax.value_and_grad`` of
    ``loss_fn(params, const, tokens)`` w.r.t. ``params``, then ``tx.update`` and ``optax.apply_updates``.
    ``grads=False`` gives None for the gradients (they are then not an output of the step)."""

    def step(state, const, tokens):
        params, opt = state
        loss, g = jax.value_and_grad(loss_fn)(params, const, tokens)
        upd, opt = tx.update(g, opt, params)
        return (optax.apply_updates(params, upd), opt), loss, (g if grads else None)

    return step


def lora_step(c: Cfg, tx, mode: str, scale: float):
    return optax_step(
        lambda lora, params, tokens: xent(forward(params, tokens, c, lora=lora, mode=mode, scale=scale), tokens), tx)


def full_step(c: Cfg, tx):
    return optax_step(lambda params, _unused, tokens: xent(forward(params, tokens, c), tokens), tx, grads=False)


def jlora_step(apply: Callable, tx):
    return optax_step(lambda adapters, base, tokens: xent(apply(jlora.combine(adapters, base), tokens), tokens), tx)


# ----------------------------------------------------------------------------------------------
# Measurement


def device_mem():
    try:
        s = jax.devices()[0].memory_stats()
    except Exception:
        return None
    if not s or "peak_bytes_in_use" not in s:
        return None
    return {"in_use": int(s.get("bytes_in_use", 0)), "peak": int(s["peak_bytes_in_use"])}


@dataclasses.dataclass
class Run:
    name: str
    step: Callable | None = None
    state: Any = None
    const: Any = None
    compiled: Any = None
    times: list = dataclasses.field(default_factory=list)
    res: dict = dataclasses.field(default_factory=dict)
    first_loss: float | None = None
    first_grads: Any = None
    apply: Any = None  # a jlora variant's apply (its fused_report is read after tracing)


def compile_run(run: Run, tokens):
    jitted = jax.jit(run.step, donate_argnums=0)
    t0 = time.perf_counter()
    traced = jitted.trace(run.state, run.const, tokens)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    run.compiled = compiled
    run.res.update(trace_s=t1 - t0, lower_s=t2 - t1, compile_s=t3 - t2)
    try:
        run.res.update(xla_memory(compiled))
    except Exception as e:  # not every backend reports it
        run.res["xla_memory_error"] = f"{type(e).__name__}: {e}"


def xla_memory(compiled) -> dict:
    """XLA's static memory plan of a compiled step (``compiled.memory_analysis()``), in bytes:
    argument, output, alias, temp, and ``xla_total_bytes`` = argument + output − alias (donated
    buffers reused) + temp, all on the device; ``xla_host_temp_bytes``: temp in host memory
    (activations a remat policy offloads). Raises where the backend reports no analysis."""
    ma = compiled.memory_analysis()
    arg, out = int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes)
    alias, temp = int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes)
    return dict(xla_argument_bytes=arg, xla_output_bytes=out, xla_alias_bytes=alias, xla_temp_bytes=temp,
                xla_total_bytes=arg + out - alias + temp,
                xla_peak_bytes=int(getattr(ma, "peak_memory_in_bytes", 0) or 0) or None,
                xla_host_temp_bytes=int(getattr(ma, "host_temp_size_in_bytes", 0) or 0))


def xla_plan_bytes(compiled) -> int | None:
    """:func:`xla_memory`'s total (argument + output − alias + temp bytes), None where there is none."""
    try:
        return xla_memory(compiled)["xla_total_bytes"]
    except Exception:
        return None


def call(run: Run, tokens):
    run.state, loss, grads = run.compiled(run.state, run.const, tokens)
    jax.block_until_ready((run.state, loss))
    return loss, grads


def first_step(run: Run, tokens):
    gc.collect()  # drop what earlier variants left unreferenced before reading "in use"
    before = device_mem()
    t0 = time.perf_counter()
    loss, grads = call(run, tokens)
    run.res["first_step_s"] = time.perf_counter() - t0
    after = device_mem()
    if before and after:
        run.res["peak_bytes_process"] = after["peak"]
        run.res["resident_before_bytes"] = before["in_use"]
        # Only a step that sets a new process-wide peak tells its own transient need exactly.
        run.res["peak_delta_bytes"] = after["peak"] - before["in_use"]
        run.res["peak_delta_exact"] = after["peak"] > before["peak"]
    run.first_loss = float(loss)
    if grads is not None and run.name in ("handwritten", "merged"):
        grads = {"layers": grads}  # the hand-written adapters mirror params["layers"]: same paths as jlora's
    run.first_grads = None if grads is None else jax.device_get(grads)


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def check_against(run: Run, ref: Run, grad_rtol: float | None) -> dict:
    out = {"ref": ref.name, "loss": run.first_loss, "ref_loss": ref.first_loss,
           "loss_rel_err": abs(run.first_loss - ref.first_loss) / max(abs(ref.first_loss), 1e-30)}
    ok = out["loss_rel_err"] <= LOSS_RTOL and math.isfinite(run.first_loss)
    if grad_rtol is not None:
        got, want = adapter_pairs(run.first_grads), adapter_pairs(ref.first_grads)
        if set(got) != set(want):
            out["error"] = f"adapter paths differ: {sorted(set(got) ^ set(want))[:6]}"
            ok = False
        else:
            errs = {p: (rel_err(got[p][0], want[p][0]), rel_err(got[p][1], want[p][1])) for p in want}
            worst_a = max(errs.items(), key=lambda kv: kv[1][0])
            worst_b = max(errs.items(), key=lambda kv: kv[1][1])
            out.update(max_dA_rel_err=worst_a[1][0], max_dA_at=worst_a[0],
                       max_dB_rel_err=worst_b[1][1], max_dB_at=worst_b[0], grad_rtol=grad_rtol)
            ok = ok and max(worst_a[1][0], worst_b[1][1]) <= grad_rtol
    out["ok"] = bool(ok)
    return out


def fmt_check(ch: dict | None) -> str:
    if not ch:
        return "-"
    if ch.get("ref") is None:
        return ch.get("note", "-")
    if "error" in ch:
        return f"FAIL ({ch['error']})"
    s = f"loss {ch['loss_rel_err']:.0e}"
    if "max_dA_rel_err" in ch:
        s += f", dA {ch['max_dA_rel_err']:.0e}, dB {ch['max_dB_rel_err']:.0e}"
    return f"{'ok' if ch['ok'] else 'FAIL'} vs {ch['ref']} ({s})"


def environment() -> dict:
    dev = jax.devices()[0]
    try:
        import jaxlib

        jaxlib_version = jaxlib.__version__
    except Exception:
        jaxlib_version = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "jaxlib": jaxlib_version,
        "optax": optax.__version__,
        "jlora": getattr(jlora, "__version__", None),
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "python": platform.python_version(),
        "host": platform.node(),
        "argv": sys.argv,
        "xla_flags": os.environ.get("XLA_FLAGS"),
    }


def write_json(path: str, obj: dict) -> None:
    """Write ``obj`` as JSON, whole or not at all (jlora's crash-safe writer: a run killed by a
    time limit never leaves a half-written results file)."""
    from jlora import _atomic

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _atomic.write_file(path, _atomic.text_writer(json.dumps(obj, indent=1, default=str)))


def _setup(a) -> tuple[Cfg, dict, Any, Any, dict]:
    """Phase 0: the shape, the base params and the tokens."""
    on_gpu = jax.default_backend() == "gpu"
    attn = a.attn if a.attn != "auto" else ("cudnn" if on_gpu else "xla")
    alpha = float(a.alpha) if a.alpha is not None else 2.0 * a.rank
    c = Cfg(a.d, a.layers, a.heads, a.ffn, a.vocab, a.seq, a.batch, a.rank, alpha, a.scan, attn)
    env = environment()
    print(f"# lora_step  jax {env['jax']}  {env['backend']}:{env['device_kind']}  {env['date']}", flush=True)
    print(f"# shape d={c.d} layers={c.layers} heads={c.heads} ffn={c.ffn} vocab={c.vocab} seq={c.seq} "
          f"batch={c.batch} rank={c.rank} alpha={alpha:g} scan={c.scan} attn={attn}", flush=True)
    t_setup = time.perf_counter()
    params = init_params(0, c)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, c.vocab, (c.batch, c.seq)), jnp.int32)
    jax.block_until_ready((params, tokens))
    extra: dict[str, Any] = {"init_s": time.perf_counter() - t_setup}
    print(f"# init {extra['init_s']:.2f} s", flush=True)
    return c, env, params, tokens, extra


def _inject_variants(a, c: Cfg, params, tokens, extra: dict, status: dict) -> dict:
    """Phase 1: one ``jlora.inject`` per kind of jlora variant.

    jlora and jlora_f32 share one inject (set_jlora_pairs casts A and B to each one's dtype; apply
    takes the dtype from the nodes); jlora_fused needs its own (matmul="pallas")."""
    want = [v for v in a.variants if v in JLORA_VARIANTS]
    apply_fn = functools.partial(forward, c=c)  # apply_fn(params, tokens) -> logits
    injects = [([v for v in ("jlora", "jlora_f32") if v in want], {}),
               (["jlora_fused"] if "jlora_fused" in want else [], {"matmul": "pallas"})]
    jl_params = {}
    for names, kw in injects:
        if not names:
            continue
        try:
            t0 = time.perf_counter()
            lp, apply = jlora.inject(params, apply_fn, c.rank, alpha=c.alpha, targets=list(PROJ),
                                     key=jax.random.PRNGKey(2), example_args=(tokens,), adapter_dtype=jnp.bfloat16,
                                     **({"matmul": "shared_xa"} if a.jlora_fuse else {}), **kw)
            jax.block_until_ready(lp)
            inject_s = time.perf_counter() - t0
        except Exception as e:
            for v in names:
                status[v] = f"FAILED: inject: {type(e).__name__}: {e}"
            traceback.print_exc()
            continue
        print(f"# inject ({', '.join(names)}) {inject_s:.2f} s", flush=True)
        for v in names:
            extra[f"{v}_inject_s"] = inject_s
            jl_params[v] = (lp, apply)
    return jl_params


def _shared_pairs(a, c: Cfg, jl_params: dict, extra: dict, status: dict) -> dict:
    """Phase 2: the adapters every variant starts from — jlora's A when a jlora variant runs, so that
    handwritten, merged and the jlora variants start from identical A and B; B small random values."""
    pairs = None
    if jl_params:
        src = next(iter(jl_params.values()))[0]
        try:
            pairs = {k: (np.asarray(jax.device_get(x), np.float32), np.asarray(jax.device_get(y), np.float32))
                     for k, (x, y) in adapter_pairs(src).items()}
            check_pair_shapes(pairs, c)  # the layout: A (…, in, r), B (…, r, out)
        except Exception as e:
            for v in jl_params:
                status.setdefault(v, f"FAILED: adapters not in the expected layout: {e}")
            pairs = None
    extra["adapter_init"] = "jlora.inject's A" if pairs is not None else "benchmark's own (A ~ N(0, 1/fan_in))"
    return with_random_b(pairs if pairs is not None else own_init_pairs(2, c), 3, a.b_init)


def _build(name: str, c: Cfg, tx, params, pairs: dict, jl_params: dict) -> Run:
    """One variant's step function, its state and the constant it closes over (the base)."""
    run, scale = Run(name), c.alpha / c.rank
    if name == "floor":
        run.step, run.state, run.const = floor_step(c), jnp.ones((), jnp.float32), params
    elif name in ("handwritten", "merged"):
        lora = handwritten_from_pairs(pairs, c)
        run.step = lora_step(c, tx, "merged" if name == "merged" else "unmerged", scale)
        run.state, run.const = (lora, jax.jit(tx.init)(lora)), params
    elif name == "full":
        own = jax.jit(lambda p: jax.tree.map(jnp.copy, p))(params)  # donated: must not alias the shared base
        run.step, run.state, run.const = full_step(c, tx), (own, jax.jit(tx.init)(own)), None
    else:
        lp, apply = jl_params[name]
        lp = set_jlora_pairs(lp, pairs, jnp.float32 if name == "jlora_f32" else jnp.bfloat16)
        adapters, base = jlora.split(lp)
        run.step, run.state, run.const = jlora_step(apply, tx), (adapters, jax.jit(tx.init)(adapters)), base
        run.apply = apply
    return run


def _compile_all(a, build: Callable[[str], Run], tokens, extra: dict, status: dict) -> dict[str, Run]:
    """Phase 3: per variant, build, trace/lower/compile, run the first step (check + memory), warm up."""
    runs: dict[str, Run] = {}
    extra["phase1_order"] = sorted(a.variants, key=MEMORY_ORDER.index)
    for name in extra["phase1_order"]:
        if name in status:
            print(f"{name}: {status[name]}", flush=True)
            continue
        try:
            run = build(name)
            compile_run(run, tokens)
            first_step(run, tokens)
            for _ in range(a.warmup):
                call(run, tokens)
            runs[name], status[name] = run, "ok"
            r = run.res
            report = getattr(run.apply, "fused_report", None)
            if report is not None:  # matmul="pallas": how many matmuls took the kernel
                r["fused_report"] = str(report)
            print(f"{name}: trace {r['trace_s']:.2f} s, lower {r['lower_s']:.2f} s, compile {r['compile_s']:.2f} s, "
                  f"first loss {run.first_loss:.5f}" + (f"; {report}".replace("\n", " ") if report else ""), flush=True)
        except Exception as e:
            status[name] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            print(f"{name}: {status[name]}", flush=True)
            traceback.print_exc()
    return runs


def _time_interleaved(a, runs: dict[str, Run], tokens) -> None:
    """Phase 4: timed steps, interleaved A B C … C B A … so that drift on a shared machine hits all."""
    order = [v for v in a.variants if v in runs]
    for rep in range(a.steps):
        for name in order if rep % 2 == 0 else order[::-1]:
            run = runs[name]
            t0 = time.perf_counter()
            call(run, tokens)
            run.times.append(time.perf_counter() - t0)


def _time_pipelined(a, runs: dict[str, Run], tokens) -> None:
    """Phase 4b: ``--steps`` steps per variant dispatched back to back and waited for once, as a training
    loop that does not read the loss every step runs them: the host's per-step work (flattening the
    state, handing ~10³ buffers to the runtime, launching) then overlaps the device's instead of
    adding to it. ``res["pipelined_ms"]``: the mean step."""
    if a.steps < 1:
        return
    for name, run in runs.items():
        jax.block_until_ready(run.state)
        t0 = time.perf_counter()
        for _ in range(a.steps):
            run.state, loss, _ = run.compiled(run.state, run.const, tokens)
        jax.block_until_ready((run.state, loss))
        run.res["pipelined_ms"] = (time.perf_counter() - t0) / a.steps * 1e3


def _check_first_steps(a, runs: dict[str, Run]) -> dict[str, dict]:
    """Phase 5: every LoRA variant's first step against handwritten; floor and full against each other."""
    checks: dict[str, dict] = {}
    if a.no_check:
        return checks
    hw = runs.get("handwritten")
    for name in ("jlora", "jlora_f32", "jlora_fused", "merged"):
        if name in runs:
            checks[name] = ({"ref": None, "note": "no handwritten run to compare with"} if hw is None
                            else check_against(runs[name], hw, GRAD_RTOL[name]))
    if "handwritten" in runs:
        checks["handwritten"] = {"ref": None, "note": "reference"}
    if "floor" in runs and "full" in runs:  # both run the unadapted model: their losses must agree
        checks["floor"] = check_against(runs["floor"], runs["full"], None)
        checks["full"] = check_against(runs["full"], runs["floor"], None)
    return checks


def _results(a, c: Cfg, runs: dict[str, Run], status: dict, checks: dict) -> dict[str, dict]:
    """Phase 6: one row per variant (median step, tokens/s, × floor, the compile and memory numbers)."""
    floor = runs.get("floor")
    floor_ms = statistics.median(floor.times) * 1e3 if floor is not None and floor.times else None
    tokens_per_step = c.batch * c.seq
    results = {}
    for name in a.variants:
        run = runs.get(name)
        row: dict[str, Any] = {"status": status.get(name, "not run")}
        if run is not None:
            row.update(run.res)
            if run.times:
                med = statistics.median(run.times)
                row.update(step_ms=med * 1e3, min_ms=min(run.times) * 1e3, max_ms=max(run.times) * 1e3,
                           times_ms=[t * 1e3 for t in run.times], tokens_per_s=tokens_per_step / med,
                           x_floor=(med * 1e3 / floor_ms) if floor_ms else None)
            row["first_loss"] = run.first_loss
        if name in checks:
            row["check"] = checks[name]
        results[name] = row
    return results


def _print_table(results: dict[str, dict]) -> None:
    print()
    print("| variant | trace s | lower s | compile s | step ms (median) | min–max ms | tok/s | × floor "
          "| XLA GiB (arg+out−alias+temp) | XLA temp GiB | peak Δ GiB | first-step check |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    f = lambda x, spec: "-" if x is None else format(x, spec)
    for name, row in results.items():
        if row["status"] != "ok":
            print(f"| {name} | {row['status']} |" + " |" * 10)
            continue
        gib = lambda k: None if row.get(k) is None else row[k] / GIB
        pd = gib("peak_delta_bytes")
        pd_s = "-" if pd is None else (f"{pd:.2f}" if row.get("peak_delta_exact") else f"≤{pd:.2f}")
        print(f"| {name} | {row['trace_s']:.2f} | {row['lower_s']:.2f} | {row['compile_s']:.2f} "
              f"| {f(row.get('step_ms'), '.2f')} | {f(row.get('min_ms'), '.1f')}–{f(row.get('max_ms'), '.1f')} "
              f"| {f(row.get('tokens_per_s'), ',.0f')} | {f(row.get('x_floor'), '.3f')} "
              f"| {f(gib('xla_total_bytes'), '.2f')} | {f(gib('xla_temp_bytes'), '.2f')} | {pd_s} "
              f"| {fmt_check(row.get('check'))} |")


def _print_summary(a, c: Cfg, results: dict[str, dict], extra: dict) -> None:
    """The achieved FLOP rate of the floor, and each jlora variant's inject and compile times."""
    tokens_per_step = c.batch * c.seq
    print()
    print(f"matmul params {matmul_params(c) / 1e9:.3f} B; tokens/step {tokens_per_step}; LoRA scale "
          f"{c.alpha / c.rank:g}; adapters: {extra['adapter_init']}, B ~ {a.b_init:g}·N(0,1)")
    fl_row = results.get("floor", {})
    if fl_row.get("step_ms"):
        fl = (4 * matmul_params(c) + 3 * attn_flops_fwd_per_token(c)) * tokens_per_step
        print(f"floor achieved {fl / (fl_row['step_ms'] / 1e3) / 1e12:.1f} TFLOP/s (4·P + 3·attn per token)")
    fp = fl_row.get("pipelined_ms")
    print("pipelined (steps dispatched back to back, one wait): " + "; ".join(
        f"{n} {r['pipelined_ms']:.2f} ms" + (f" ({r['pipelined_ms'] / fp:.3f} × floor)" if fp else "")
        for n, r in results.items() if r.get("pipelined_ms")))
    ftc = fl_row["trace_s"] + fl_row["lower_s"] + fl_row["compile_s"] if fl_row.get("status") == "ok" else None
    for name in JLORA_VARIANTS:
        row = results.get(name, {})
        if row.get("status") != "ok":
            continue
        tc = row["trace_s"] + row["lower_s"] + row["compile_s"]
        line = f"{name}: inject {extra.get(f'{name}_inject_s', float('nan')):.2f} s; trace+lower+compile {tc:.2f} s"
        if ftc:
            line += (f" vs floor (base forward+backward) {ftc:.2f} s (× {tc / ftc:.2f}); "
                     f"trace alone {row['trace_s']:.2f} s vs {fl_row['trace_s']:.2f} s")
        row["trace_compile_vs_floor"] = tc / ftc if ftc else None
        print(line)
    if jax.default_backend() == "gpu":
        print("peak Δ: allocator peak during the first step minus bytes in use before it (state, base, and every "
              "earlier variant's state); '≤' marks a step that did not raise the process peak (an upper bound).")


def main(argv=None) -> int:
    """Setup → inject → shared adapters → compile each variant → timed, interleaved steps → checks →
    the table. Returns 1 if a variant failed or a first-step check did not pass."""
    a = parse_args(argv)
    c, env, params, tokens, extra = _setup(a)
    tx = optax.adamw(a.lr)
    status: dict[str, str] = {}  # variant -> "ok" | "FAILED: ..."
    jl_params = _inject_variants(a, c, params, tokens, extra, status)
    pairs = _shared_pairs(a, c, jl_params, extra, status)
    extra["scale"] = c.alpha / c.rank
    runs = _compile_all(a, lambda name: _build(name, c, tx, params, pairs, jl_params), tokens, extra, status)
    if a.json_path:  # a partial record now, in case the timed phase is cut short (the final one replaces it)
        partial = {n: dict(r.res, first_loss=r.first_loss, status=status.get(n)) for n, r in runs.items()}
        partial.update({n: {"status": st} for n, st in status.items() if n not in runs})
        write_json(a.json_path, {"env": env, "config": dataclasses.asdict(c), "args": vars(a), "extra": extra,
                                  "partial": True, "results": partial})
    _time_interleaved(a, runs, tokens)
    _time_pipelined(a, runs, tokens)
    checks = _check_first_steps(a, runs)
    results = _results(a, c, runs, status, checks)
    _print_table(results)
    _print_summary(a, c, results, extra)
    if a.json_path:
        write_json(a.json_path, {"env": env, "config": dataclasses.asdict(c), "args": dict(vars(a)), "extra": extra,
                                 "results": results})
        print(f"wrote {a.json_path}")
    failed = [n for n, s in status.items() if s.startswith("FAILED")]
    bad_checks = [n for n, ch in checks.items() if ch.get("ref") is not None and not ch.get("ok")]
    if failed or bad_checks:
        print(f"FAILED variants: {failed}; failed checks: {bad_checks}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
