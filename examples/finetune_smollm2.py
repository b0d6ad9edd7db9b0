"""Fine-tune the real SmolLM2-135M-Instruct with jlora: a skill it lacks, learned in a few minutes.

The task: rewrite an ISO date (``2023-04-15``) as ``DD/MM/YYYY`` (``15/04/2023``), answering with
the date only. The base model chats about the date instead; a rank-8 LoRA on every projection
learns the format from generated examples. The script prints the base model's answers on held-out
dates, trains (progress bar with loss and tokens/s), prints the answers again with exact-match
accuracy before → after, writes a loss-curve PNG and saves the adapter with ``jlora.save_adapters``,
then the merged model as a Hugging Face folder (``merged/``) and a GGUF file for llama.cpp.

    python examples/finetune_smollm2.py                 # CPU by default; GPU when JAX sees one
    python examples/finetune_smollm2.py --steps 120 --rank 16 --targets "q_proj|v_proj"
    python examples/finetune_smollm2.py --qlora          # train over the file's 4-bit weights
    python examples/finetune_smollm2.py --dora           # DoRA: a trained magnitude per output unit
    python examples/finetune_smollm2.py --init pissa     # PiSSA: start from the top singular vectors
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from jlora.models.gguf import load_gguf
from jlora.models.llama import Llama, generate, left_pad, save_gguf, save_pretrained

SYSTEM = "You rewrite dates."
PHRASINGS = [
    "Rewrite {d} as DD/MM/YYYY.",
    "Convert the date {d} to DD/MM/YYYY format.",
    "Write {d} in day/month/year order as DD/MM/YYYY.",
    "Change {d} to the DD/MM/YYYY format.",
]
EVAL_PHRASING = "Rewrite {d} as DD/MM/YYYY."


def make_dates(n: int, seed: int, exclude: set[str] = frozenset()) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out, seen = [], set(exclude)
    while len(out) < n:
        y, m, d = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
        iso = f"{y:04d}-{m:02d}-{d:02d}"
        if iso in seen:
            continue
        seen.add(iso)
        out.append((iso, f"{d:02d}/{m:02d}/{y:04d}"))
    return out


def prompt(tok, iso: str, phrasing: str) -> str:
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": phrasing.format(d=iso)}]
    return tok.apply_chat_template(msgs, add_generation_prompt=True)


def encode_examples(tok, pairs, rng: random.Random, seq_len: int):
    """Token ids, and a mask that is 1 on the answer tokens the loss is taken over."""
    end = "<|im_end|>"
    ids = np.full((len(pairs), seq_len), tok.pad_id or 0, np.int32)
    mask = np.zeros((len(pairs), seq_len), np.float32)
    for i, (iso, answer) in enumerate(pairs):
        p = tok.encode(prompt(tok, iso, rng.choice(PHRASINGS)), add_special_tokens=False)
        a = tok.encode(answer + end, add_special_tokens=False)
        seq = p + a
        if len(seq) > seq_len:
            raise ValueError(f"example of {len(seq)} tokens does not fit --seq-len {seq_len}")
        ids[i, : len(seq)] = seq
        mask[i, len(p) - 1 : len(seq) - 1] = 1.0  # position t predicts token t+1
    return ids, mask


def evaluate(tok, cfg, apply_fn, params, pairs, *, batch: int, show: int) -> float:
    """Exact-match accuracy of greedy answers (up to ``<|im_end|>``, the tokenizer's EOS)."""
    answers = []
    for s in range(0, len(pairs), batch):
        chunk = pairs[s : s + batch]
        ids, mask = left_pad([tok.encode(prompt(tok, iso, EVAL_PHRASING), add_special_tokens=False)
                              for iso, _ in chunk], pad_id=tok.pad_id or 0)
        # every token after a row's EOS is EOS too, so skipping special tokens cuts the answer there
        out = generate(apply_fn, params, ids, prompt_mask=mask, max_new_tokens=12, config=cfg, eos_id=tok.eos_id)
        answers += [tok.decode(row, skip_special_tokens=True).strip() for row in np.asarray(out).tolist()]
    correct = [a == want for a, (_, want) in zip(answers, pairs)]
    for (iso, want), a, ok in list(zip(pairs, answers, correct))[:show]:
        print(f"  {iso} -> {a!r:40.40} {'ok' if ok else 'want ' + want}")
    return float(np.mean(correct))


def main(argv=None) -> dict:
    """Run the demo; returns what it writes to result.json plus the trained ``params`` and ``apply``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--targets", default=None, help="regex of kernels to adapt (default: all projections)")
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--eval-size", type=int, default=40)
    ap.add_argument("--seq-len", type=int, default=0, help="0: the longest training example, rounded up to 8")
    ap.add_argument("--out", default="out/smollm2-dates", help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--qlora", action="store_true",
                    help="QLoRA: keep the GGUF file's 4-bit (Q4_1) projection weights quantized while training")
    ap.add_argument("--dora", action="store_true", help="DoRA: also train a magnitude per output unit")
    ap.add_argument("--init", default=None,
                    help="adapter init: gaussian, pissa, pissa_niter_N, olora (default: jlora's Gaussian A, zero B)")
    args = ap.parse_args(argv)
    variant = " + ".join(["DoRA"] * args.dora + [args.init] * bool(args.init)) or "LoRA"

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform.upper()} ({jax.devices()[0].device_kind})")
    t0 = time.time()
    cfg, variables, tok = load_gguf(scan_layers=True, quantized=args.qlora)
    model = Llama(cfg)
    print(f"loaded SmolLM2-135M-Instruct from GGUF in {time.time() - t0:.1f}s: {cfg.num_layers} layers, "
          f"d={cfg.hidden_size}, vocab={cfg.vocab_size}")

    test = make_dates(args.eval_size, seed=12345)
    train = make_dates(args.train_size, seed=args.seed, exclude={iso for iso, _ in test})

    rng = random.Random(args.seed)
    if args.seq_len <= 0:  # one fixed length (no recompiles) that fits every prompt + answer + <|im_end|>
        longest = max(len(tok.encode(prompt(tok, iso, p) + ans + "<|im_end|>", add_special_tokens=False))
                      for iso, ans in train[:50] for p in PHRASINGS)
        args.seq_len = -(-(longest + 2) // 8) * 8
    ids0, _ = encode_examples(tok, train[: args.batch], rng, args.seq_len)
    t_inject = time.time()
    params, apply = jlora.inject(
        variables, model.apply, rank=args.rank, alpha=args.alpha, targets=args.targets,
        example_args=(jnp.asarray(ids0),), dora=args.dora, init=args.init,
    )
    print(f"injected ({variant}) in {time.time() - t_inject:.1f}s")
    print("\n" + str(apply.report).split("\n")[0])
    print(jlora.summary(params).splitlines()[-1])

    # The injected model is exactly the base model (B starts at zero; DoRA's magnitudes are the
    # kernels' norms; PiSSA/OLoRA subtract the part of W they start the adapter with): evaluate the
    # base through it (this also works when the base is kept quantized, which model.apply cannot read).
    print("\nBase model on held-out dates:")
    base_acc = evaluate(tok, cfg, apply, params, test, batch=args.eval_size, show=5)
    print(f"base exact match: {base_acc:.0%}")

    adapters, base = jlora.split(params)
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, args.lr, 5, args.steps, args.lr * 0.1), weight_decay=0.0)
    opt_state = tx.init(adapters)

    def loss_fn(adapters, base, ids, mask):
        # The model computes the loss itself (labels=): position t predicts token t+1, the last
        # position nothing (label -1). It goes over chunks of tokens when the float32 logits of
        # the batch would be large (a long sequence or a big batch on a GPU); this batch fits one.
        labels = jnp.concatenate([ids[:, 1:], jnp.full_like(ids[:, :1], -1)], axis=1)
        return apply(jlora.combine(adapters, base), ids, labels=labels, loss_mask=mask)

    # The frozen base is an argument, not a closure: closed-over arrays become compile-time
    # constants that XLA would copy and constant-fold.
    @jax.jit
    def step(adapters, opt_state, base, ids, mask):
        loss, grads = jax.value_and_grad(loss_fn)(adapters, base, ids, mask)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    losses = []
    bar = tqdm(range(args.steps), desc=variant, ncols=90, file=sys.stdout) if tqdm else range(args.steps)
    t_train = time.time()
    tokens = 0
    for i in bar:
        batch = [train[(i * args.batch + j) % len(train)] for j in range(args.batch)]
        ids, mask = encode_examples(tok, batch, rng, args.seq_len)
        adapters, opt_state, loss = step(adapters, opt_state, base, jnp.asarray(ids), jnp.asarray(mask))
        loss = float(loss)
        losses.append(loss)
        if i == 0:
            t_first = time.time()  # exclude compilation from tokens/s
        else:
            tokens += ids.size
        if tqdm:
            tps = tokens / max(time.time() - t_first, 1e-9) if i else 0.0
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:.0f}")
    train_time = time.time() - t_train
    params = jlora.combine(adapters, base)

    print("\nFine-tuned model on the same held-out dates:")
    lora_acc = evaluate(tok, cfg, apply, params, test, batch=args.eval_size, show=5)
    print(f"\nexact match: base {base_acc:.0%} -> {variant} {lora_acc:.0%}  "
          f"(loss {losses[0]:.3f} -> {losses[-1]:.3f}, {args.steps} steps in {train_time:.0f}s)")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(losses)
        ax.set(xlabel="step", ylabel="loss (answer tokens)", yscale="log",
               title=f"SmolLM2-135M + jlora {variant} r={args.rank}: dates → DD/MM/YYYY")
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=120)
        plt.close(fig)
    except ImportError:  # pragma: no cover
        pass
    ckpt = out / "adapter"
    jlora.save_adapters(ckpt, params, overwrite=True)
    # The fine-tuned model for serving: LoRA folded into the weights (a QLoRA base is dequantized),
    # as a Hugging Face folder (transformers, vLLM, ...) and a GGUF file (llama.cpp, Ollama, ...).
    t_export = time.time()
    merged = jlora.merge(params)
    hf_dir = save_pretrained(out / "merged", merged, cfg, tok, dtype=jnp.bfloat16, overwrite=True)
    gguf_file = save_gguf(out / "smollm2-dates.gguf", merged, cfg, tok, dtype="f16", overwrite=True)
    del merged
    export_time = time.time() - t_export
    result = {"base_accuracy": base_acc, "lora_accuracy": lora_acc, "losses": losses,
              "train_seconds": train_time, "total_seconds": time.time() - t0, "steps": args.steps,
              "merged": str(hf_dir), "gguf": str(gguf_file), "variant": variant}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 1e6  # noqa: E731
    print(f"wrote {out / 'loss.png'}, {out / 'result.json'} and the adapter checkpoint {ckpt} "
          f"({size(ckpt):.1f} MB)")
    print(f"merged model: {hf_dir} (Hugging Face, {size(hf_dir):.0f} MB) and {gguf_file} "
          f"(GGUF f16, {gguf_file.stat().st_size / 1e6:.0f} MB), written in {export_time:.1f}s; "
          f"total {time.time() - t0:.0f}s")
    return {**result, "params": params, "apply": apply}


if __name__ == "__main__":
    main()
