"""The peer a user would pick instead: Hugging Face PEFT LoRA on ``LlamaForCausalLM``, one training step.

Same shape, same tokens per step and the same LoRA (r on q,k,v,o,gate,up,down, alpha = 2r) as
``benchmarks/lora_step.py``; random init, bf16 weights, SDPA attention, AdamW on the adapters.
Eager by default, ``--compile`` wraps the whole step (forward, backward, optimizer) in
``torch.compile``. Prints one markdown table row (and ``--json`` writes the details).

    python benchmarks/peft_step.py                      # GPU, the reference shape (docs/architecture.md)
    python benchmarks/peft_step.py --compile --floor-json out/lora_step.json
    python benchmarks/peft_step.py --d 64 --layers 2 --heads 4 --ffn 128 --vocab 256 \\
        --seq 32 --batch 2 --rank 4 --steps 2              # CPU, tiny: a check that it runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 2.0**30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2·rank)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first one compiles)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--compile", action="store_true", help="torch.compile the whole step")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA (no PEFT)")
    p.add_argument("--dora", action="store_true", help="DoRA (LoraConfig(use_dora=True)) instead of LoRA")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="base weights")
    p.add_argument("--adapter-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="float32: PEFT's default (autocast_adapter_dtype=True upcasts LoRA weights of a bf16 model), "
                        "what the reference PEFT row (docs/architecture.md) used; bfloat16: adapters in the base dtype, like lora_step's "
                        "handwritten / jlora rows")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--floor-ms", type=float, default=None, help="floor step time (ms) for the × floor column")
    p.add_argument("--floor-json", default=None, help="read the floor from lora_step.py --json output")
    p.add_argument("--json", dest="json_path", default=None)
    return p.parse_args(argv)


def build_model(a, dev, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=a.d, num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
        intermediate_size=a.ffn, vocab_size=a.vocab, max_position_embeddings=a.seq, tie_word_embeddings=False,
        rms_norm_eps=1e-6, rope_theta=10000.0,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in bf16, on the device: no fp32 copy, no transfer
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model = model.to(device=dev, dtype=dtype)
    if not a.full:
        from peft import LoraConfig, get_peft_model

        alpha = a.alpha if a.alpha is not None else 2 * a.rank
        model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=PROJ,
                                                 use_dora=a.dora),
                               autocast_adapter_dtype=(a.adapter_dtype == "float32"))
        got = {q.dtype for q in model.parameters() if q.requires_grad}
        if got != {getattr(torch, a.adapter_dtype)}:
            raise SystemExit(f"adapters are {got}, asked for {a.adapter_dtype}")
    model.train()
    return model


def environment(dev) -> dict:
    import peft
    import transformers

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
        "argv": sys.argv,
    }
    return env


def main(argv=None) -> int:
    a = parse_args(argv)
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    dtype = getattr(torch, a.dtype)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    t0 = time.perf_counter()
    model = build_model(a, dev, dtype)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, **({"fused": True} if cuda else {}))
    g = torch.Generator(device="cpu").manual_seed(1)
    tok = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(dev)
    sync()
    build_s = time.perf_counter() - t0

    def step():
        out = model(input_ids=tok, labels=tok)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    fn = torch.compile(step) if a.compile else step

    # warm-up; the first call compiles under --compile (its time is reported separately)
    t0 = time.perf_counter()
    first_loss = float(fn())
    sync()
    first_step_s = time.perf_counter() - t0
    for _ in range(max(a.warmup - 1, 0)):
        fn()
    sync()
    peak_incl_warmup = torch.cuda.max_memory_allocated(dev) if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)

    times = []
    for _ in range(a.steps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)

    floor_ms = a.floor_ms
    if floor_ms is None and a.floor_json:
        with open(a.floor_json) as fh:
            floor_ms = json.load(fh)["results"].get("floor", {}).get("step_ms")
    name = ("torch_full" if a.full else "peft_dora" if a.dora else "peft") + ("_compiled" if a.compile else "_eager")
    if not a.full and a.adapter_dtype != "float32":
        name += "_bf16"
    res = {
        "status": "ok",
        "build_s": build_s,
        "first_step_s": first_step_s,
        "first_loss": first_loss,
        "step_ms": med * 1e3,
        "min_ms": min(times) * 1e3,
        "max_ms": max(times) * 1e3,
        "times_ms": [t * 1e3 for t in times],
        "tokens_per_s": a.batch * a.seq / med,
        "x_floor": (med * 1e3 / floor_ms) if floor_ms else None,
        "floor_ms": floor_ms,
        "peak_bytes": torch.cuda.max_memory_allocated(dev) if cuda else None,
        "peak_bytes_incl_warmup": peak_incl_warmup,
        "trainable": sum(q.numel() for q in params),
        "trainable_dtype": str(params[0].dtype).replace("torch.", ""),
    }

    f = lambda x, spec: "-" if x is None else format(x, spec)
    peak = None if res["peak_bytes"] is None else res["peak_bytes"] / GIB
    env = environment(dev)
    print(f"# peft_step  torch {torch.__version__}  {dev.type}:{env['device_name']}")
    print("| variant | first step s (incl. compile) | step ms (median) | min–max ms | tok/s | × floor "
          "| peak GiB (steady) | trainable |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {name} | {first_step_s:.2f} | {res['step_ms']:.2f} | {res['min_ms']:.1f}–{res['max_ms']:.1f} "
          f"| {res['tokens_per_s']:,.0f} | {f(res['x_floor'], '.3f')} | {f(peak, '.2f')} | {res['trainable']:,} |",
          flush=True)
    if a.json_path:
        os.makedirs(os.path.dirname(os.path.abspath(a.json_path)), exist_ok=True)
        with open(a.json_path, "w") as fh:
            json.dump({"env": env, "args": vars(a), "results": {name: res}}, fh, indent=1)
        print(f"wrote {a.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
