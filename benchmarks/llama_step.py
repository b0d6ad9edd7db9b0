"""Training steps of ``jlora.models.llama`` at named shapes: variants timed side by side, one process.

Every variant is ``KIND-LAYOUT-REMAT-LOSS``, optionally followed by ``-mbM``:

  KIND    floor   frozen forward + input-gradient backward, no adapters: the gradient is taken only
                  w.r.t. a scalar that scales the embedding table, so the whole backward runs but
                  no weight gradient does (the lower bound of any LoRA step on this model)
          lora    jlora.inject (rank 16, alpha 32, float32 adapters) on q,k,v,o,gate,up,down,
                  gradients w.r.t. the adapters of jlora.split (the base is an argument of the
                  step, not a closure), AdamW through jlora.optimizer
          qlora   the same over an NF4 base (jlora.NF4Tensor, block 64, double quantization),
                  built layer by layer and stacked; scanned layout only
  LAYOUT  unroll | scan                      LlamaConfig.scan_layers
  REMAT   none | auto | full | offload | lora | attention | dots
                                             LlamaConfig.remat (auto: dots when scanned, else none)
  LOSS    plain   the model returns float32 logits, the step takes their cross-entropy
          chunk   model.apply(..., labels=, loss_mask=): causal_lm_loss over token chunks, each
                  chunk's gradient computed in the forward pass (LlamaConfig's default; results
                  files before llama_*_fwdgrad.* call the re-computing form 'chunk')
          rechunk the same with LlamaConfig.loss_grad_in_forward=False: the backward pass
                  re-computes each chunk's logits
  -mbM    gradient accumulation: the batch as M equal microbatches in a lax.scan, each slice's
          gradient weighted by its share of the mask and summed in float32 (value_and_grad below)

Shapes (``--shape``), random bf16 weights, seq 2048:

  design  the reference 0.9 B model (docs/architecture.md §7): d 2048, 16 layers, 16 heads (MHA), ffn 5632, vocab 32000, batch 8
  8b      Llama-3-8B: d 4096, 32 layers, 32 heads / 8 KV heads, ffn 14336, vocab 128256,
          rope theta 500000, batch 8 (``--batch``; ``--find-batch`` tries several in subprocesses)
  70b     Llama-2-70B: d 8192, 80 layers, 64 heads / 8 KV heads, ffn 28672, vocab 32000, batch 1,
          QLoRA only (its bf16 weights, 138 GB, do not fit one H200): each layer's kernels are drawn
          and quantized to NF4 on the device, one layer at a time, into stacked NF4 children
  tiny    d 64, 2 layers, 4 heads / 2 KV heads, ffn 128, vocab 256, seq 32, batch 2: the CPU check

Per variant: trace and compile seconds (``jax.jit(step).trace(...)``, ``.lower().compile()``),
median step ms over ``--steps`` interleaved repetitions, tokens/s, MFU, XLA's static memory plan of
the step (``compiled.memory_analysis()``), the allocator's peak during the first step (GPU), how
many cuDNN attention calls (``__cudnn$fmha``) the optimized HLO holds, and the first loss (all
variants over the same base start from the same model, so their first losses must agree).

Run ``python benchmarks/llama_step.py --help``; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE), _HERE]
# JAX preallocates 75 % of a GPU by default; 8b at batch 8 needs more (export it to override).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jlora  # noqa: E402
import lora_step as L  # noqa: E402  (environment(), write_json(), xla_memory(), device_mem())
from jlora.models.llama import (  # noqa: E402
    Llama,
    LlamaConfig,
    attention_implementation,
    remat_policy,
    stack_layer_params,
)

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 2.0**30
H200_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H200 SXM, dense bf16 tensor-core peak
LOSS_RTOL = 2e-2  # first losses of variants over one base (bf16: fusion order differs)


@dataclasses.dataclass(frozen=True)
class Shape:
    d: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    seq: int
    batch: int
    rope_theta: float = 10000.0
    chunk_tokens: int | None = None  # LlamaConfig.loss_chunk_tokens of the 'chunk' variants
    variants: tuple[str, ...] = ()
    steps: int = 10


SHAPES = {
    "design": Shape(2048, 16, 16, 16, 5632, 32000, 2048, 8, steps=8, variants=(
        "floor-unroll-none-plain", "lora-unroll-none-plain", "lora-unroll-none-chunk", "floor-scan-none-plain",
        "floor-scan-dots-plain", "lora-scan-dots-chunk", "lora-scan-full-chunk")),
    "8b": Shape(4096, 32, 32, 8, 14336, 128256, 2048, 8, rope_theta=500000.0, steps=4, variants=(
        "floor-scan-dots-chunk", "lora-scan-dots-chunk", "lora-scan-full-chunk")),
    "70b": Shape(8192, 80, 64, 8, 28672, 32000, 2048, 1, steps=3, variants=(
        "qlora-scan-full-chunk", "qlora-scan-dots-chunk")),
    "tiny": Shape(64, 2, 4, 2, 128, 256, 32, 2, chunk_tokens=16, steps=2, variants=(
        "floor-unroll-none-plain", "lora-unroll-none-plain", "lora-unroll-none-chunk", "floor-scan-auto-chunk",
        "lora-scan-none-plain", "lora-scan-auto-chunk", "lora-scan-full-chunk", "lora-scan-attention-chunk-mb2",
        "qlora-scan-full-chunk")),
}
KINDS, LAYOUTS, REMATS, LOSSES = ("floor", "lora", "qlora"), ("unroll", "scan"), ("none", "auto", "full", "offload", "lora", "attention", "dots"), ("plain", "chunk", "rechunk")


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    kind: str
    scan: bool
    remat: str | None  # LlamaConfig.remat
    chunk: bool
    recompute: bool = False  # the chunked loss re-computes its logits (LOSS 'rechunk')
    microbatches: int = 1  # the optional 5th part 'mbM': gradients accumulated over M slices of the batch

    @classmethod
    def parse(cls, name: str) -> "Variant":
        parts = name.split("-")
        mb = 1
        if len(parts) == 5 and parts[4].startswith("mb") and parts[4][2:].isdigit() and int(parts[4][2:]) >= 1:
            mb = int(parts.pop()[2:])
        if len(parts) != 4 or parts[0] not in KINDS or parts[1] not in LAYOUTS or parts[2] not in REMATS \
                or parts[3] not in LOSSES:
            raise ValueError(f"variant {name!r} is not KIND-LAYOUT-REMAT-LOSS[-mbM] with KIND in {KINDS}, LAYOUT in "
                             f"{LAYOUTS}, REMAT in {REMATS}, LOSS in {LOSSES}, M ≥ 1 microbatches")
        if parts[0] == "qlora" and parts[1] != "scan":
            raise ValueError(f"{name}: qlora runs the scanned layout only (NF4 nodes stacked per layer)")
        return cls(name, parts[0], parts[1] == "scan", None if parts[2] == "none" else parts[2],
                   parts[3] != "plain", parts[3] == "rechunk", mb)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Variants: KIND-LAYOUT-REMAT-LOSS, see the module docstring.")
    p.add_argument("--shape", default="design", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: the shape's)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the shape's)")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers (a quick look)")
    p.add_argument("--variants", default=None, help="comma-separated KIND-LAYOUT-REMAT-LOSS (default: the shape's set)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: the shape's)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant after the first one")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--adapter-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--attention", default=None, choices=("xla", "cudnn"),
                   help="force LlamaConfig.attention (default None: cuDNN on a CUDA GPU when it applies)")
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help="LlamaConfig.loss_chunk_tokens of the 'chunk' variants (default: the shape's; None = auto)")
    p.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS,
                   help=f"dense bf16 peak for MFU (default {H200_BF16_DENSE_TFLOPS:g}, H200 SXM)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--matmul", default="xla", choices=("xla", "shared_xa", "pallas"),
                   help="inject's matmul= for the LoRA/QLoRA variants (pallas: the fused Hopper kernel)")
    p.add_argument("--no-attn-check", action="store_true", help="skip the forced-cuDNN attention compile check")
    p.add_argument("--find-batch", default=None, metavar="B1,B2,...",
                   help="instead of one run: try these batch sizes in order, each in a subprocess running "
                        "--variants for one step, and report the first where every variant runs")
    p.add_argument("--json", dest="json_path", default=None)
    a = p.parse_args(argv)
    shape = SHAPES[a.shape]
    names = a.variants.split(",") if a.variants else list(shape.variants)
    try:
        a.variant_list = [Variant.parse(v.strip()) for v in names if v.strip()]
    except ValueError as e:
        p.error(str(e))
    if len({v.name for v in a.variant_list}) != len(a.variant_list):
        p.error("a variant is listed twice")
    return a


# ----------------------------------------------------------------------------------------------
# Model, weights


def model_config(s: Shape, a: argparse.Namespace, v: Variant | None = None) -> LlamaConfig:
    cfg = LlamaConfig(
        vocab_size=s.vocab, hidden_size=s.d, intermediate_size=s.ffn, num_layers=s.layers, num_heads=s.heads,
        num_kv_heads=s.kv_heads, head_dim=s.d // s.heads, rope_theta=s.rope_theta, rms_norm_eps=1e-5,
        tie_embeddings=False, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention=a.attention,
    )
    if v is not None:
        chunk = a.chunk_tokens if a.chunk_tokens is not None else s.chunk_tokens
        cfg = cfg.replace(scan_layers=v.scan, remat=v.remat, loss_chunk_tokens=chunk if v.chunk else 0,
                          loss_grad_in_forward=not v.recompute)
    return cfg


def _std(path: str, shape: tuple[int, ...]) -> float:
    return 0.02 if "embed" in path else 1.0 / math.sqrt(shape[-2])


@functools.partial(jax.jit, static_argnums=(1,))
def _draw(key, shape, std):
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(jnp.bfloat16)


def init_params(cfg: LlamaConfig, seed: int = 0) -> dict:
    """Random bf16 params in the unrolled layout, drawn on the device one leaf at a time (one
    small compiled draw per distinct shape; a single draw of everything compiles for minutes)."""
    shapes = jax.eval_shape(Llama(cfg.replace(scan_layers=False)).init, jax.random.key(0),
                            jnp.zeros((1, 2), jnp.int32))
    key = jax.random.key(seed)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    out = []
    for i, (path, s) in enumerate(leaves):
        ps = jax.tree_util.keystr(path)
        if ps.endswith("['scale']"):
            out.append(jnp.ones(s.shape, jnp.bfloat16))
        else:
            out.append(_draw(jax.random.fold_in(key, i), tuple(s.shape), _std(ps, tuple(s.shape))))
    return jax.tree.unflatten(treedef, out)


def init_qlora_params(cfg: LlamaConfig, seed: int = 0) -> dict:
    """Params in the scanned layout with every projection an NF4 stack, never holding the bf16
    model: per projection, each layer's kernel is drawn and quantized on the device and written
    into preallocated stacked NF4 children (donated, so updated in place). Embedding, head and
    norms stay bf16."""
    shapes = jax.eval_shape(Llama(cfg.replace(scan_layers=True, remat=None)).init, jax.random.key(0),
                            jnp.zeros((1, 2), jnp.int32))
    key = jax.random.key(seed)
    n = cfg.num_layers

    def quantized(k, shape, std):
        return jlora.NF4Tensor.from_array(_draw(k, shape, std))

    def stack(k, shape, std):
        one = functools.partial(quantized, shape=shape, std=std)
        proto = jax.eval_shape(one, k)
        buf = jax.tree.map(lambda x: jnp.zeros((n,) + tuple(x.shape), x.dtype), proto)
        put = jax.jit(lambda b, k, i: jax.tree.map(lambda s, x: jax.lax.dynamic_update_index_in_dim(s, x, i, 0),
                                                   b, one(k)), donate_argnums=0)
        for i in range(n):
            buf = put(buf, jax.random.fold_in(k, i), i)
        return buf

    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    out = []
    for i, (path, s) in enumerate(leaves):
        ps = jax.tree_util.keystr(path)
        k = jax.random.fold_in(key, i)
        if ps.endswith("['scale']"):
            out.append(jnp.ones(s.shape, jnp.bfloat16))
        elif "['layers']" in ps and any(f"['{p}']" in ps for p in PROJ):
            out.append(stack(k, tuple(s.shape[1:]), 1.0 / math.sqrt(s.shape[-2])))
        else:
            out.append(_draw(k, tuple(s.shape), _std(ps, tuple(s.shape))))
        jax.block_until_ready(out[-1])
    return jax.tree.unflatten(treedef, out)


def matmul_params(cfg: LlamaConfig) -> tuple[int, int]:
    """(params in the layers' matmuls, params of the LM head)."""
    d, hd = cfg.hidden_size, cfg.head_dim
    per_layer = d * cfg.num_heads * hd * 2 + d * cfg.num_kv_heads * hd * 2 + 3 * d * cfg.intermediate_size
    return per_layer * cfg.num_layers, d * cfg.vocab_size


def step_flops(cfg: LlamaConfig, v: Variant, tokens: int, seq: int) -> float:
    """FLOPs of one step, counted per token (LoRA's rank-r matmuls not counted):

    layers' matmuls 2·N forward + 2·N input gradient (frozen weights: no weight gradient), plus
    2·N when remat re-runs the forward ('full', 'offload', 'lora'; 'dots' re-runs no matmul; 'attention' re-runs
    the gate and up projections, 2·N_gate_up); the LM head the same, plus 2·N_head when the chunked loss
    re-computes its logits ('rechunk'); causal attention (half the keys) 2·seq·heads·head_dim a layer forward,
    its backward twice that, plus one forward again under 'full'/'offload'/'lora' remat (and under 'dots' or
    'attention' with XLA's attention, whose softmax is re-computed).
    """
    n_layers, n_head = matmul_params(cfg)
    policy = remat_policy(cfg)
    rerun = policy in ("full", "offload", "lora")
    attn_fwd = 2 * seq * cfg.num_heads * cfg.head_dim * cfg.num_layers
    attn_rerun = rerun or (policy in ("dots", "attention") and attention_implementation(cfg) != "cudnn")
    gate_up = 2 * cfg.hidden_size * cfg.intermediate_size * cfg.num_layers if policy == "attention" else 0
    per_token = ((6 if rerun else 4) * n_layers + 2 * gate_up + (6 if v.recompute else 4) * n_head
                 + (4 if attn_rerun else 3) * attn_fwd)
    return float(per_token) * tokens


# ----------------------------------------------------------------------------------------------
# Steps: step(state, base, tokens, labels, mask) -> (state, loss); state is donated.


def xent(logits, labels, mask):
    logits = logits.astype(jnp.float32)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[..., None], -1)[..., 0]
    return jnp.sum(nll * mask) / jnp.sum(mask)


def model_loss(apply_fn: Callable, v: Variant) -> Callable:
    if v.chunk:
        return lambda p, tokens, labels, mask: apply_fn(p, tokens, labels=labels, loss_mask=mask)
    return lambda p, tokens, labels, mask: xent(apply_fn(p, tokens), labels, mask)


def value_and_grad(loss_of: Callable, microbatches: int) -> Callable:
    """``jax.value_and_grad(loss_of)`` over a batch, or over ``microbatches`` equal slices of it in a
    ``lax.scan`` (gradient accumulation: one slice's activations live at a time). Each slice's
    masked-mean loss and gradient are weighted by its share of the batch's mask, so the result is
    the whole batch's masked mean and its gradient."""
    if microbatches == 1:
        return jax.value_and_grad(loss_of)

    def vg(p, tokens, labels, mask):
        b = tokens.shape[0]
        if b % microbatches:
            raise ValueError(f"batch {b} does not split into {microbatches} equal microbatches")
        split = lambda x: x.reshape(microbatches, b // microbatches, *x.shape[1:])  # noqa: E731
        total = jnp.sum(mask)

        def body(carry, xs):
            loss, grads = carry
            l_i, g_i = jax.value_and_grad(loss_of)(p, *xs)
            n = jnp.sum(xs[2])
            keep = lambda x: jnp.where(n > 0, x, 0)  # noqa: E731  (an all-padding slice: its mean is 0/0)
            w = n / total
            return (loss + keep(w * l_i), jax.tree.map(lambda g, gi: g + keep(w * gi.astype(jnp.float32)), grads, g_i)), None

        # summed in float32 (bf16 adapters would lose bits at each add), cast once
        init = (jnp.zeros((), jnp.float32), jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), p))
        loss, grads = jax.lax.scan(body, init, (split(tokens), split(labels), split(mask)))[0]
        return loss, jax.tree.map(lambda g, x: g.astype(x.dtype), grads, p)

    return vg


def floor_step(apply_fn: Callable, v: Variant) -> Callable:
    loss_of = model_loss(apply_fn, v)

    def step(scale, base, tokens, labels, mask):
        def f(s, tokens, labels, mask):
            inner = base["params"]
            table = inner["embed_tokens"]["embedding"] * s.astype(inner["embed_tokens"]["embedding"].dtype)
            return loss_of({"params": dict(inner, embed_tokens={"embedding": table})}, tokens, labels, mask)

        loss, g = value_and_grad(f, v.microbatches)(scale, tokens, labels, mask)
        return scale - 1e-6 * g, loss

    return step


def lora_step(apply: Callable, v: Variant, tx) -> Callable:
    loss_of = model_loss(apply, v)

    def step(state, base, tokens, labels, mask):
        adapters, opt = state
        f = lambda a, tokens, labels, mask: loss_of(jlora.combine(a, base), tokens, labels, mask)  # noqa: E731
        loss, g = value_and_grad(f, v.microbatches)(adapters, tokens, labels, mask)
        upd, opt = tx.update(g, opt, adapters)
        return (optax.apply_updates(adapters, upd), opt), loss

    return step


# ----------------------------------------------------------------------------------------------
# Measurement


@dataclasses.dataclass
class Run:
    v: Variant
    cfg: LlamaConfig
    step: Callable | None = None
    state: Any = None
    base: Any = None
    compiled: Any = None
    times: list = dataclasses.field(default_factory=list)
    res: dict = dataclasses.field(default_factory=dict)


def count_cudnn_attention(hlo_text: str) -> int:
    """cuDNN attention custom calls (``__cudnn$fmha...``: forward and backward) in optimized HLO."""
    return hlo_text.count('custom_call_target="__cudnn$fmha')


def count_cudnn_any(hlo_text: str) -> int:
    """Any ``__cudnn$`` target (fmha calls, or the cuDNN fusions some XLA versions turn them into)."""
    return hlo_text.count('"__cudnn$')


def attention_check(cfg: LlamaConfig, seq: int, batch: int = 1) -> dict:
    """What the model's attention gets, and whether a forced ``implementation='cudnn'`` compiles and
    runs (forward + backward) at one sequence of the model's shape and agrees with XLA's."""
    out = {"default_implementation": attention_implementation(cfg), "backend": jax.default_backend()}
    hd = cfg.head_dim
    k = jax.random.split(jax.random.key(7), 3)
    q = jax.random.normal(k[0], (batch, seq, cfg.num_heads, hd), jnp.bfloat16)
    kk = jax.random.normal(k[1], (batch, seq, cfg.num_kv_heads, hd), jnp.bfloat16)
    vv = jax.random.normal(k[2], (batch, seq, cfg.num_kv_heads, hd), jnp.bfloat16)

    def f(impl):
        g = lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)  # noqa: E731
                                    .astype(jnp.float32) ** 2)
        return jax.jit(jax.value_and_grad(g, argnums=(0, 1, 2)))

    try:
        t0 = time.perf_counter()
        comp = f("cudnn").lower(q, kk, vv).compile()
        val, grads = comp(q, kk, vv)
        ref, rgrads = f("xla")(q, kk, vv)
        out.update(forced_cudnn="ok", forced_cudnn_compile_s=time.perf_counter() - t0,
                   forced_cudnn_fmha_calls=count_cudnn_attention(comp.as_text()),
                   forced_cudnn_rel_err=float(abs(val - ref) / abs(ref)),
                   forced_cudnn_dq_rel_err=L.rel_err(grads[0], rgrads[0]))
    except Exception as e:  # CPU, no cuDNN, an unsupported shape: reported, not fatal
        out["forced_cudnn"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return out


def compile_run(run: Run, args) -> None:
    jitted = jax.jit(run.step, donate_argnums=0)
    t0 = time.perf_counter()
    traced = jitted.trace(run.state, run.base, *args)
    t1 = time.perf_counter()
    compiled = traced.lower().compile()
    t2 = time.perf_counter()
    run.compiled = compiled
    run.res.update(trace_s=t1 - t0, compile_s=t2 - t1)
    try:
        run.res.update(L.xla_memory(compiled))
    except Exception as e:
        run.res["xla_memory_error"] = f"{type(e).__name__}: {e}"
    try:
        text = compiled.as_text()
        run.res["cudnn_fmha_calls"] = count_cudnn_attention(text)
        run.res["cudnn_calls_any"] = count_cudnn_any(text)
        del text
    except Exception as e:  # pragma: no cover
        run.res["cudnn_fmha_calls"] = None
        run.res["hlo_text_error"] = str(e)[:200]


def call(run: Run, args):
    run.state, loss = run.compiled(run.state, run.base, *args)
    jax.block_until_ready((run.state, loss))
    return loss


def first_step(run: Run, args) -> None:
    gc.collect()
    before = L.device_mem()
    t0 = time.perf_counter()
    loss = call(run, args)
    run.res["first_step_s"] = time.perf_counter() - t0
    after = L.device_mem()
    if before and after:
        run.res.update(peak_bytes_process=after["peak"], resident_before_bytes=before["in_use"],
                       peak_delta_bytes=after["peak"] - before["in_use"],
                       peak_delta_exact=after["peak"] > before["peak"])
    run.res["first_loss"] = float(loss)


# Phase 1 order: expected transient memory ascending, so that most steps raise the process peak
# (which makes their allocator peak exact).
def _memory_rank(v: Variant) -> tuple:
    remat = {"offload": 0, "full": 1, "lora": 1, "attention": 1.5, "dots": 2, "auto": 2 if v.scan else 4, None: 4}[v.remat]
    return (remat * 8 / v.microbatches, v.chunk is False, v.kind != "floor", not v.scan)


def find_batch(a: argparse.Namespace) -> int:
    """Try ``--find-batch`` sizes in order, one subprocess each (a fresh allocator)."""
    sizes = [int(b) for b in a.find_batch.split(",")]
    mb = max(v.microbatches for v in a.variant_list)
    if any(b % v.microbatches for b in sizes for v in a.variant_list):
        skipped = [b for b in sizes if any(b % v.microbatches for v in a.variant_list)]
        print(f"batch sizes {skipped} do not split into every variant's microbatches (up to {mb}): skipped")
        sizes = [b for b in sizes if b not in skipped]
    found = None
    rows = []
    for b in sizes:
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "r.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--shape", a.shape, "--batch", str(b), "--steps", "1",
                   "--warmup", "0", "--no-attn-check", "--variants", ",".join(v.name for v in a.variant_list),
                   "--json", out]
            for flag, val in (("--seq", a.seq), ("--layers", a.layers), ("--attention", a.attention),
                              ("--chunk-tokens", a.chunk_tokens)):
                if val is not None:
                    cmd += [flag, str(val)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            ok, status = False, f"exit {proc.returncode}"
            if os.path.exists(out):
                res = json.load(open(out))["results"]
                ok = all(r.get("status") == "ok" for r in res.values())
                status = "; ".join(f"{n}: {r.get('status')}"[:160] for n, r in res.items())
        rows.append({"batch": b, "ok": ok, "status": status, "seconds": time.perf_counter() - t0})
        print(f"batch {b}: {'fits' if ok else 'does not fit'} ({status}) {rows[-1]['seconds']:.0f} s", flush=True)
        if ok:
            found = b
            break
    print(f"largest batch that runs {[v.name for v in a.variant_list]}: {found}")
    if a.json_path:
        L.write_json(a.json_path, {"env": L.environment(), "find_batch": rows, "largest": found})
    return 0 if found is not None else 1


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.find_batch:
        return find_batch(a)
    s = SHAPES[a.shape]
    s = dataclasses.replace(s, batch=a.batch or s.batch, seq=a.seq or s.seq, layers=a.layers or s.layers)
    for v in a.variant_list:  # before any weight is drawn
        if s.batch % v.microbatches:
            print(f"llama_step.py: {v.name}: batch {s.batch} does not split into {v.microbatches} equal microbatches "
                  "(pass --batch)", file=sys.stderr)
            return 2
    steps = a.steps if a.steps is not None else s.steps
    base_cfg = model_config(s, a)
    env = L.environment()
    tokens_per_step = s.batch * s.seq
    print(f"# llama_step  jax {env['jax']}  {env['backend']}:{env['device_kind']}  {env['date']}", flush=True)
    print(f"# shape {a.shape}: d={s.d} layers={s.layers} heads={s.heads}/{s.kv_heads} ffn={s.ffn} vocab={s.vocab} "
          f"seq={s.seq} batch={s.batch} ({tokens_per_step} tokens/step) rank={a.rank} bf16", flush=True)

    extra: dict[str, Any] = {}
    if not a.no_attn_check:
        extra["attention"] = attention_check(base_cfg, s.seq)
        print(f"# attention: {extra['attention']}", flush=True)

    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, s.vocab, (s.batch, s.seq)), jnp.int32)
    labels = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
    mask = jnp.ones((s.batch, s.seq), jnp.float32).at[:, -1].set(0.0)
    args = (tokens, labels, mask)

    variants = a.variant_list
    t0 = time.perf_counter()
    dense = {}
    if any(v.kind != "qlora" for v in variants):
        unrolled = init_params(base_cfg)
        if any(v.scan and v.kind != "qlora" for v in variants):
            dense[True] = stack_layer_params(unrolled)
        if any(not v.scan for v in variants):
            dense[False] = unrolled
        del unrolled
        jax.block_until_ready(dense)
    quant = init_qlora_params(base_cfg) if any(v.kind == "qlora" for v in variants) else None
    extra["init_s"] = time.perf_counter() - t0
    print(f"# weights ready in {extra['init_s']:.1f} s", flush=True)
    adapter_dtype = jnp.float32 if a.adapter_dtype == "float32" else jnp.bfloat16

    runs: dict[str, Run] = {}
    status: dict[str, str] = {}
    for v in sorted(variants, key=_memory_rank):
        cfg = model_config(s, a, v)
        run = Run(v, cfg)
        try:
            apply_fn = Llama(cfg).apply
            if v.kind == "floor":
                run.step, run.state, run.base = floor_step(apply_fn, v), jnp.ones((), jnp.float32), dense[v.scan]
            else:
                src = quant if v.kind == "qlora" else dense[v.scan]
                t_inj = time.perf_counter()
                lp, apply = jlora.inject(src, apply_fn, a.rank, alpha=2.0 * a.rank, targets=PROJ,
                                         key=jax.random.key(2), example_args=(tokens,), adapter_dtype=adapter_dtype,
                                         matmul=a.matmul)
                adapters, base = jlora.split(lp)
                del lp
                tx = jlora.optimizer(optax.adamw(a.lr), adapters)
                run.step, run.state, run.base = lora_step(apply, v, tx), (adapters, tx.init(adapters)), base
                run.res["inject_s"] = time.perf_counter() - t_inj
            compile_run(run, args)
            first_step(run, args)
            for _ in range(a.warmup):
                call(run, args)
            runs[v.name] = run
            status[v.name] = "ok"
            if v.kind != "floor" and a.matmul == "pallas":
                run.res["fused_report"] = str(apply.fused_report).splitlines()[0] if apply.fused_report else None
                print(f"{v.name}: {run.res['fused_report']}", flush=True)
            r = run.res
            print(f"{v.name}: trace {r['trace_s']:.1f} s, compile {r['compile_s']:.1f} s, first loss "
                  f"{r['first_loss']:.4f}, cuDNN fmha calls {r.get('cudnn_fmha_calls')}", flush=True)
        except Exception as e:
            msg = str(e).splitlines()[0][:300] if str(e) else ""
            status[v.name] = f"FAILED: {type(e).__name__}: {msg}"
            print(f"{v.name}: {status[v.name]}", flush=True)
            traceback.print_exc()
            run.state = run.compiled = None  # free what it holds before the next variant
            gc.collect()

    if a.json_path:  # a partial record now, in case the timed phase is cut short
        L.write_json(a.json_path, {"env": env, "shape": dataclasses.asdict(s), "args": _jsonable(vars(a)),
                                   "extra": extra, "partial": True,
                                   "results": {n: dict(runs[n].res, status=st) if n in runs else {"status": st}
                                               for n, st in status.items()}})

    order = [v.name for v in variants if v.name in runs]
    for rep in range(steps):  # interleaved A B C … C B A
        for name in order if rep % 2 == 0 else order[::-1]:
            run = runs[name]
            t = time.perf_counter()
            try:
                call(run, args)
            except Exception as e:  # an OOM in the timed phase only drops this variant
                status[name] = f"FAILED in timed step: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                order.remove(name)
                run.state = None
                continue
            run.times.append(time.perf_counter() - t)

    results: dict[str, dict] = {}
    peak = a.peak_tflops * 1e12
    for v in variants:
        row: dict[str, Any] = {"status": status.get(v.name, "not run")}
        run = runs.get(v.name)
        if run is not None:
            row.update(run.res)
            row["remat_policy"] = remat_policy(run.cfg)
            row["attention"] = attention_implementation(run.cfg)
            row["flops_per_step"] = step_flops(run.cfg, v, tokens_per_step, s.seq)
            if run.times and status[v.name] == "ok":
                med = statistics.median(run.times)
                row.update(step_ms=med * 1e3, min_ms=min(run.times) * 1e3, max_ms=max(run.times) * 1e3,
                           times_ms=[t * 1e3 for t in run.times], tokens_per_s=tokens_per_step / med,
                           mfu=row["flops_per_step"] / med / peak)
        results[v.name] = row

    # × floor: against the fastest floor of the same layout (else of any layout).
    floors = {}
    for v in variants:
        ms = results[v.name].get("step_ms")
        if v.kind == "floor" and ms is not None:
            floors[v.scan] = min(ms, floors.get(v.scan, ms))
    for v in variants:
        row = results[v.name]
        ref = floors.get(v.scan, min(floors.values()) if floors else None)
        row["x_floor"] = row["step_ms"] / ref if ref and row.get("step_ms") else None

    # Every variant over the dense base starts from the same model (B = 0): same first loss.
    checks = {}
    for group in ("dense", "qlora"):
        names = [v.name for v in variants if (v.kind == "qlora") == (group == "qlora") and v.name in runs]
        if len(names) > 1:
            ref = results[names[0]]["first_loss"]
            errs = {n: abs(results[n]["first_loss"] - ref) / abs(ref) for n in names}
            checks[group] = {"ref": names[0], "rel_err": errs, "ok": max(errs.values()) <= LOSS_RTOL}
    extra["first_loss_check"] = checks
    extra["process_peak_bytes"] = (L.device_mem() or {}).get("peak")

    print()
    print("| variant | trace s | compile s | step ms (median) | tok/s | MFU % | × floor | XLA GiB (arg+out−alias+temp) "
          "| XLA temp GiB | host temp GiB | peak Δ GiB | cuDNN fmha / any | first loss |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    f = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    for name, row in results.items():
        if row["status"] != "ok":
            print(f"| {name} | {row['status']} |" + " |" * 11)
            continue
        gib = lambda k: None if row.get(k) is None else row[k] / GIB  # noqa: E731
        pd = gib("peak_delta_bytes")
        pd_s = "-" if pd is None else (f"{pd:.2f}" if row.get("peak_delta_exact") else f"≤{pd:.2f}")
        mfu = None if row.get("mfu") is None else 100 * row["mfu"]
        print(f"| {name} | {row['trace_s']:.1f} | {row['compile_s']:.1f} | {f(row.get('step_ms'), '.1f')} "
              f"| {f(row.get('tokens_per_s'), ',.0f')} | {f(mfu, '.1f')} | {f(row.get('x_floor'), '.3f')} "
              f"| {f(gib('xla_total_bytes'), '.2f')} "
              f"| {f(gib('xla_temp_bytes'), '.2f')} | {f(gib('xla_host_temp_bytes'), '.2f')} | {pd_s} "
              f"| {f(row.get('cudnn_fmha_calls'), 'd')} / {f(row.get('cudnn_calls_any'), 'd')} "
              f"| {row['first_loss']:.4f} |")
    print()
    n_layers, n_head = matmul_params(base_cfg)
    print(f"matmul params {(n_layers + n_head) / 1e9:.3f} B (layers {n_layers / 1e9:.3f} B + head {n_head / 1e9:.3f} B); "
          f"tokens/step {tokens_per_step}; MFU against {a.peak_tflops:g} TFLOP/s (FLOPs: see step_flops in the script)")
    if "attention" in extra:
        at = extra["attention"]
        print(f"attention: default implementation '{at['default_implementation']}'; forced cuDNN: {at['forced_cudnn']}"
              + (f" ({at.get('forced_cudnn_fmha_calls')} fmha calls, loss rel. err vs XLA "
                 f"{at.get('forced_cudnn_rel_err', float('nan')):.1e}, dq {at.get('forced_cudnn_dq_rel_err', float('nan')):.1e})"
                 if at["forced_cudnn"] == "ok" else ""))
    for group, ch in checks.items():
        worst = max(ch["rel_err"].items(), key=lambda kv: kv[1])
        print(f"first-loss check ({group}): {'ok' if ch['ok'] else 'FAIL'}, worst {worst[0]} {worst[1]:.1e} vs {ch['ref']}")
    if extra["process_peak_bytes"]:
        print(f"process peak {extra['process_peak_bytes'] / GIB:.2f} GiB (allocator); peak Δ: the first step's peak "
              f"minus bytes in use before it, exact unless marked ≤ (JAX cannot reset the peak counter)")

    if a.json_path:
        L.write_json(a.json_path, {"env": env, "shape": dataclasses.asdict(s), "args": _jsonable(vars(a)),
                                   "extra": extra, "results": results})
        print(f"wrote {a.json_path}")
    failed = [n for n, st in status.items() if st != "ok"]
    bad = [g for g, ch in checks.items() if not ch["ok"]]
    if failed or bad:
        print(f"FAILED variants: {failed}; failed checks: {bad}", file=sys.stderr)
        return 1
    return 0


def _jsonable(d: dict) -> dict:
    return {k: ([x.name for x in v] if k == "variant_list" else v) for k, v in d.items()}


if __name__ == "__main__":
    sys.exit(main())
