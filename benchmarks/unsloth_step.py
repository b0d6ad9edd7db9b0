"""Unsloth's LoRA training step at llama_step.py's shapes (needs a CUDA GPU and the unsloth package).

The method of /work/shared/bench/unsloth_step.py (the measurement behind issue 13's Unsloth
numbers), parameterised by ``--shape``: a ``LlamaForCausalLM`` of the shape with random bf16
weights is saved to a temporary directory with a word-level tokenizer, loaded back with
``FastLanguageModel.from_pretrained(..., load_in_4bit=False)``, given LoRA r 16, alpha 32, no
dropout on q,k,v,o,gate,up,down (``get_peft_model``, ``use_gradient_checkpointing`` from
``--checkpointing``: off by default, as in the measurement), and trained with fused
``torch.optim.AdamW`` on ``model(input_ids=ids, labels=ids)``. ``--variants peft`` runs PEFT
eager on the same saved model (SDPA attention) for comparison.

  design  d 2048, 16 layers, 16 heads, ffn 5632, vocab 32000, seq 2048, batch 8, rope theta 1e4
  8b      Llama-3-8B: d 4096, 32 layers, 32 heads / 8 KV heads, ffn 14336, vocab 128256,
          rope theta 500000, seq 2048, batch 8 (``--batch``)

If a batch does not fit (CUDA out of memory), it is halved and tried again in the same process,
down to 1: the row reports the batch that ran. Columns: median step ms (after ``--warmup`` steps),
tokens/s, MFU (the FLOP count of llama_step.py: 4·N a token for a frozen base, 6·N with gradient
checkpointing, plus causal attention; against 989 TFLOP/s), peak GiB =
``torch.cuda.max_memory_allocated()`` over the timed steps (the counter is reset after warm-up).

    python benchmarks/unsloth_step.py --shape design --json $OUT/unsloth_design.json
    python benchmarks/unsloth_step.py --shape 8b --json $OUT/unsloth_8b.json

``--grad-accum 1,8`` times the step once per M on the same loaded model, each step splitting the
batch into M equal microbatches (forward and backward each, loss / M, one optimizer step): a row
``VARIANT-gaM`` for M > 1, whose ``grad_rel_err`` compares its summed gradient with the one-pass
gradient of the same batch, taken before its first step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

SHAPES = {
    "design": dict(d=2048, layers=16, heads=16, kv_heads=16, ffn=5632, vocab=32000, seq=2048, batch=8,
                   rope_theta=10000.0),
    "8b": dict(d=4096, layers=32, heads=32, kv_heads=8, ffn=14336, vocab=128256, seq=2048, batch=8,
               rope_theta=500000.0),
    # a check of the script itself: --shape tiny --device cpu --variants peft (Unsloth needs CUDA)
    "tiny": dict(d=64, layers=2, heads=4, kv_heads=2, ffn=128, vocab=256, seq=32, batch=2, rope_theta=500000.0),
}
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 16
PEAK_TFLOPS = 989.0  # NVIDIA H200 SXM, dense bf16


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="design", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=None, help="first batch size to try (default: the shape's)")
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default="unsloth", help="comma-separated: unsloth, peft")
    p.add_argument("--checkpointing", default="false", choices=("false", "true", "unsloth"),
                   help="get_peft_model(use_gradient_checkpointing=...): off (default), torch's, or Unsloth's")
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu: a check of the script with --variants peft only (no timing meaning, no peak memory)")
    p.add_argument("--grad-accum", default="1", metavar="M1,M2,...",
                   help="gradient accumulation: each step splits the batch into M equal microbatches (a "
                        "forward and backward each, loss / M), then one optimizer step; a row per M, "
                        "named VARIANT-gaM for M > 1, on the same loaded model")
    p.add_argument("--json", dest="json_path", default=None)
    return p.parse_args(argv)


def step_flops(s: dict, tokens: int, checkpointing: bool) -> float:
    """llama_step.py's count: matmuls 4·N a token (forward + input gradient, frozen base), 6·N with
    checkpointing; causal attention 2·seq·d a layer forward, 3× with its backward (4× checkpointed)."""
    d, hd = s["d"], s["d"] // s["heads"]
    n_layers = (2 * d * d + 2 * d * s["kv_heads"] * hd + 3 * d * s["ffn"]) * s["layers"]
    n_head = d * s["vocab"]
    attn = 2 * s["seq"] * d * s["layers"]
    c = 6 if checkpointing else 4
    return float(c * n_layers + 4 * n_head + (4 if checkpointing else 3) * attn) * tokens


def main(argv=None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    try:
        import torch
    except ImportError:
        print("unsloth_step.py: PyTorch is not installed; this benchmark needs torch with CUDA and unsloth.",
              file=sys.stderr)
        return 2
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("unsloth_step.py: needs a CUDA GPU (torch.cuda.is_available() is False); Unsloth runs on "
              "NVIDIA GPUs only. Nothing was measured.", file=sys.stderr)
        return 2
    if not cuda and "unsloth" in variants:
        print("unsloth_step.py: --device cpu runs --variants peft only; Unsloth needs a CUDA GPU.", file=sys.stderr)
        return 2
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    oom = torch.cuda.OutOfMemoryError if cuda else MemoryError
    if "unsloth" in variants:
        try:
            from unsloth import FastLanguageModel  # noqa: F401  (must be imported before transformers)
        except ImportError as e:
            print(f"unsloth_step.py: cannot import unsloth ({e}); put its wheels on PYTHONPATH.", file=sys.stderr)
            return 2
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    s = dict(SHAPES[a.shape])
    s.update({k: v for k, v in (("seq", a.seq), ("layers", a.layers)) if v is not None})
    first_batch = a.batch or s["batch"]
    ckpt = {"false": False, "true": True, "unsloth": "unsloth"}[a.checkpointing]
    accums = [int(m) if m.strip().isdigit() else 0 for m in a.grad_accum.split(",")]
    if any(m < 1 or first_batch % m for m in accums):
        print(f"unsloth_step.py: --grad-accum {a.grad_accum}: each M must be ≥ 1 and divide the batch "
              f"({first_batch})", file=sys.stderr)
        return 2

    # One random model for every variant, saved once.
    t0 = time.perf_counter()
    folder = tempfile.mkdtemp(prefix="unsloth_step_")
    cfg = LlamaConfig(hidden_size=s["d"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["kv_heads"], intermediate_size=s["ffn"], vocab_size=s["vocab"],
                      max_position_embeddings=s["seq"], tie_word_embeddings=False, rms_norm_eps=1e-5,
                      rope_theta=s["rope_theta"], torch_dtype="bfloat16")
    theta = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
    assert theta == s["rope_theta"], f"rope theta {theta} != {s['rope_theta']}"
    torch.manual_seed(0)
    with torch.device(a.device):
        torch.set_default_dtype(torch.bfloat16)
        m = LlamaForCausalLM(cfg)
        torch.set_default_dtype(torch.float32)
    m.save_pretrained(folder, safe_serialization=True)
    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(s["vocab"])}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="t1", pad_token="t2", bos_token="t3").save_pretrained(folder)
    del m
    if cuda:
        torch.cuda.empty_cache()
    save_s = time.perf_counter() - t0
    print(f"# unsloth_step shape {a.shape} {s}; model saved in {save_s:.0f} s", flush=True)

    res = {}
    for variant in variants:
        t0 = time.perf_counter()
        if variant == "unsloth":
            from unsloth import FastLanguageModel

            model, _ = FastLanguageModel.from_pretrained(folder, max_seq_length=s["seq"], dtype=torch.bfloat16,
                                                         load_in_4bit=False, local_files_only=True)
            model = FastLanguageModel.get_peft_model(model, r=RANK, lora_alpha=2 * RANK, lora_dropout=0, bias="none",
                                                     target_modules=PROJ, use_gradient_checkpointing=ckpt,
                                                     random_state=0)
        elif variant == "peft":
            from peft import LoraConfig, get_peft_model

            model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="sdpa").to(a.device)
            if ckpt:
                model.gradient_checkpointing_enable()
            model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0,
                                                     target_modules=PROJ))
        else:
            print(f"unknown variant {variant!r}", file=sys.stderr)
            return 2
        model.train()
        params = [q for q in model.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
        build_s = time.perf_counter() - t0

        for accum in accums:
            batch, row, tried = first_batch, None, None
            while batch >= accum and row is None:
                tried = batch
                g = torch.Generator(device="cpu").manual_seed(1)
                ids = torch.randint(0, s["vocab"], (batch, s["seq"]), generator=g).to(a.device)

                def backward(m):  # this batch's mean loss in m equal slices (every row has seq - 1 labels)
                    loss = 0.0
                    for part in ids.chunk(m):
                        out = model(input_ids=part, labels=part)
                        (out.loss / m).backward()
                        loss = loss + out.loss.detach() / m
                    return loss

                def step():
                    loss = backward(accum)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    return loss

                def grads(m):  # the adapters' gradient as step() leaves it for opt.step()
                    opt.zero_grad(set_to_none=True)
                    backward(m)
                    g = torch.cat([q.grad.detach().float().flatten() for q in params if q.grad is not None])
                    opt.zero_grad(set_to_none=True)
                    return g

                try:
                    grad_err = None
                    if accum > 1:
                        one, acc = grads(1), grads(accum)
                        grad_err = float((acc - one).norm() / one.norm())
                        del one, acc
                    t1 = time.perf_counter()
                    loss0 = float(step())
                    sync()
                    first_s = time.perf_counter() - t1
                    for _ in range(a.warmup):
                        step()
                    sync()
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    ts = []
                    for _ in range(a.steps):
                        sync()
                        t1 = time.perf_counter()
                        step()
                        sync()
                        ts.append((time.perf_counter() - t1) * 1e3)
                except oom:
                    print(f"{variant}: batch {batch} does not fit (CUDA out of memory); halving", flush=True)
                    opt.zero_grad(set_to_none=True)
                    del ids
                    if cuda:
                        torch.cuda.empty_cache()
                    batch = batch // 2 // accum * accum  # the next smaller batch that splits into M slices
                    continue
                ms = statistics.median(ts)
                tokens = batch * s["seq"]
                flops = step_flops(s, tokens, bool(ckpt))
                row = dict(status="ok", batch=batch, step_ms=ms, min_ms=min(ts), max_ms=max(ts), times_ms=ts,
                           tokens_per_s=tokens / (ms / 1e3), mfu=flops / (ms / 1e3) / (a.peak_tflops * 1e12),
                           peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None, first_step_s=first_s, build_s=build_s,
                           loss0=loss0, trainable=sum(q.numel() for q in params), adapter_dtype=str(params[0].dtype),
                           checkpointing=a.checkpointing, grad_accum=accum, grad_rel_err=grad_err)
            name = variant if accum == 1 else f"{variant}-ga{accum}"
            res[name] = row or {"status": f"FAILED: out of memory at batch {tried}"}
            print(name, json.dumps({k: v for k, v in res[name].items() if k != "times_ms"}), flush=True)
        del model, opt, params
        if cuda:
            torch.cuda.empty_cache()
    shutil.rmtree(folder, ignore_errors=True)

    print("\n| variant | batch | step ms (median) | tok/s | MFU % | peak GiB | first step s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for v, r in res.items():
        if r.get("status") != "ok":
            print(f"| {v} | {r.get('status')} | | | | | |")
        else:
            peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
            print(f"| {v} | {r['batch']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f} "
                  f"| {peak} | {r['first_step_s']:.1f} |")
    if a.json_path:
        env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "torch": torch.__version__, "device": torch.cuda.get_device_name(0) if cuda else "cpu", "python": platform.python_version(),
               "argv": sys.argv}
        try:
            import transformers

            env["transformers"] = transformers.__version__
            import unsloth

            env["unsloth"] = getattr(unsloth, "__version__", None)
        except Exception:
            pass
        os.makedirs(os.path.dirname(os.path.abspath(a.json_path)), exist_ok=True)
        with open(a.json_path, "w") as fh:
            json.dump({"env": env, "shape": s, "shape_name": a.shape, "results": res}, fh, indent=1)
        print(f"wrote {a.json_path}")
    return 0 if all(r.get("status") == "ok" for r in res.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
