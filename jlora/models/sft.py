"""Supervised fine-tuning of a Llama-family model on your own JSONL data, then files you can serve.

The command behind ``examples/sft.py`` and the ``jlora-sft`` console script::

    jlora-sft --model path/to/hf-folder-or.gguf --data train.jsonl --out out/run --gguf q8_0

Data: one JSON object per line, either a chat, ``{"messages": [{"role": "system"|"user"|
"assistant", "content": "..."}, ...]}`` (rendered with the tokenizer's chat template), or a pair,
``{"prompt": "...", "completion": "..."}`` (plain text, the tokenizer's EOS after the completion;
``prompt``/``completion`` may also be lists of messages, as in TRL's conversational format). The
loss is taken on the answer tokens only: every assistant turn of a chat, or the completion. A
malformed line is an error naming its line number.

Batches: examples are grouped by length into at most ``--buckets`` widths (quantiles of the
lengths, rounded up to 8), so each batch is padded only to its bucket's width and only a few
shapes are compiled; the padding fraction is reported. A sequence longer than ``--seq-len`` is
truncated (``--truncate``, the default) or refused (``--refuse-long``), and the count is reported.

Training: LoRA (``jlora.inject``) on the chosen projections, AdamW with warm-up and cosine decay
on the adapters only, a progress bar with loss and tokens/s, the held-out loss (``--eval-fraction``)
before and after, checkpoints with :class:`jlora.TrainCheckpointer` every ``--save-every`` steps
(``--resume`` continues from the newest: the data order depends only on ``--seed`` and the step,
so a resumed run ends with the adapters of an uninterrupted one). ``--qlora`` trains over an NF4
base (quantized as it is loaded).

Outputs in ``--out``: ``adapter/`` (``jlora.save_adapters``), ``peft/`` (``jlora.export_peft``),
``merged/`` (the merged model as a Hugging Face folder, :func:`~jlora.models.hf.save_pretrained`),
``model-<dtype>.gguf`` with ``--gguf`` (:func:`~jlora.models.gguf_writer.save_gguf`), ``loss.png``,
``metrics.json``, ``checkpoints/`` and ``run.json`` (the settings; ``--resume`` refuses different
ones, the data compared by its SHA-256).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np

__all__ = ["DataError", "Example", "read_jsonl", "encode_example", "bucket_widths", "epoch_batches", "main"]

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and line."""


class Example(NamedTuple):
    """One training example: ``messages`` (``train_from``: index of the first message whose
    assistant turns are trained), or a text ``prompt``/``completion`` pair."""

    line: int
    messages: Optional[list]
    train_from: int
    prompt: Optional[str]
    completion: Optional[str]


# ----------------------------------------------------------------------------------------------
# Data.


def _check_messages(messages: Any, where: str, what: str = "messages") -> list[dict]:
    """The ``role``/``content`` of each message, checked; a :class:`DataError` at ``where`` if one is wrong."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: {what!r} must be a non-empty list of {{'role', 'content'}} objects.")
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: {what}[{k}] is a {type(m).__name__}, not an object.")
        if m.get("role") not in _ROLES:
            raise DataError(f"{where}: {what}[{k}] has role {m.get('role')!r}; roles are {list(_ROLES)}.")
        if not isinstance(m.get("content"), str):
            raise DataError(
                f"{where}: {what}[{k}] ({m['role']}) has content of type "
                f"{type(m.get('content')).__name__}, not a string."
            )
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_jsonl(path: Any) -> list[Example]:
    """Read and check a JSONL file of chats or prompt/completion pairs (blank lines skipped).

    Raises:
        DataError: A line that is not a JSON object, has neither ``messages`` nor
            ``prompt``/``completion``, a message with a wrong role or a non-string content, or no
            assistant turn to train on; the message names the file and line number.
    """
    path = Path(path)
    out = []
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg}).") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: a line must be a JSON object, got {type(row).__name__}.")
            if "messages" in row:
                msgs = _check_messages(row["messages"], where)
                if not any(m["role"] == "assistant" for m in msgs):
                    raise DataError(f"{where}: no assistant message to train on.")
                out.append(Example(n, msgs, 0, None, None))
            elif "prompt" in row and "completion" in row:
                p, c = row["prompt"], row["completion"]
                if isinstance(p, str) and isinstance(c, str):
                    if not c:
                        raise DataError(f"{where}: empty completion.")
                    out.append(Example(n, None, 0, p, c))
                elif isinstance(p, list) and isinstance(c, list):
                    p = _check_messages(p, where, "prompt")
                    c = _check_messages(c, where, "completion")
                    if not any(m["role"] == "assistant" for m in c):
                        raise DataError(f"{where}: the completion has no assistant message.")
                    out.append(Example(n, p + c, len(p), None, None))
                else:
                    raise DataError(
                        f"{where}: prompt and completion must both be strings or both lists of "
                        f"messages; got {type(p).__name__} and {type(c).__name__}."
                    )
            else:
                raise DataError(
                    f"{where}: no 'messages' and no 'prompt'/'completion' (keys: {sorted(row)})."
                )
    if not out:
        raise DataError(f"{path}: no examples.")
    return out


def _encode_spans(tok: Any, text: str, spans: list[tuple[int, int]], add_special_tokens: bool):
    """Token ids of ``text`` and a mask of the tokens overlapping any character span."""
    backend = tok.backend
    if add_special_tokens and not hasattr(tok, "config"):  # the GGUF Tokenizer adds BOS/EOS itself
        enc = backend.encode(text, add_special_tokens=False)
        ids, offsets = list(enc.ids), list(enc.offsets)
        if tok.add_bos and tok.bos_id is not None:
            ids, offsets = [tok.bos_id, *ids], [(0, 0), *offsets]
    else:
        enc = backend.encode(text, add_special_tokens=add_special_tokens)
        ids, offsets = list(enc.ids), list(enc.offsets)
    mask = [any(e > a and s < b for a, b in spans) and e > s for s, e in offsets]
    return ids, mask


def encode_example(tok: Any, ex: Example) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, answer)``: int32 token ids and a bool mask that is True on the tokens to learn
    (the assistant turns, with their end-of-turn tokens, or the completion and EOS).

    Chats are rendered with the tokenizer's chat template; each assistant turn is located as the
    text between the rendering of the messages before it (with the generation prompt) and the
    rendering through it, and tokens overlapping those spans are answer tokens.

    Raises:
        DataError: The template does not render a conversation as successive extensions of its
            prefixes (so the assistant turns cannot be located), or there is no chat template.
    """
    where = f"line {ex.line}"
    if ex.messages is None:
        text = ex.prompt + ex.completion
        ids, mask = _encode_spans(tok, text, [(len(ex.prompt), len(text))], True)
        if tok.eos_id is not None and ids and ids[-1] == tok.eos_id:
            mask[-1] = True  # an EOS the tokenizer's post-processor appended: the model must learn to stop
        elif tok.eos_id is not None:
            ids, mask = ids + [tok.eos_id], mask + [True]
        return np.asarray(ids, np.int32), np.asarray(mask, bool)
    msgs = ex.messages
    try:
        text = tok.apply_chat_template(msgs, add_generation_prompt=False)
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant" or i < ex.train_from:
                continue
            before = tok.apply_chat_template(msgs[:i], add_generation_prompt=True) if i else ""
            through = tok.apply_chat_template(msgs[: i + 1], add_generation_prompt=False)
            if not (through.startswith(before) and text.startswith(through)):
                raise DataError(
                    f"{where}: the chat template does not render message {i} as an extension of "
                    f"the messages before it, so its answer tokens cannot be located."
                )
            spans.append((len(before), len(through)))
    except ValueError as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{where}: {e}") from None
    ids, mask = _encode_spans(tok, text, spans, False)
    return np.asarray(ids, np.int32), np.asarray(mask, bool)


def bucket_widths(lengths: Sequence[int], buckets: int, seq_len: int) -> list[int]:
    """At most ``buckets`` batch widths: quantiles of ``lengths`` rounded up to 8 (the longest
    example's length included), capped at ``seq_len``.

    Example:
        >>> bucket_widths([5, 9, 17, 30, 31], 2, 64)
        [24, 32]
    """
    lengths = np.asarray(lengths)
    qs = np.quantile(lengths, [k / buckets for k in range(1, buckets + 1)], method="higher")
    return sorted({min(seq_len, int(-(-int(q) // 8) * 8)) for q in qs})


def epoch_batches(lengths: Sequence[int], widths: Sequence[int], batch: int, seed: int) -> list[tuple[int, list[int]]]:
    """One epoch's batches, ``(width, example indices)``, shuffled with ``seed``.

    Each example goes to the narrowest width that holds it; each width's examples are shuffled
    and cut into batches of ``batch``; an incomplete remainder moves on to the next width, and
    the widest width's remainder is a last, smaller batch (filled with empty rows when stacked).

    Example:
        >>> sorted(len(ix) for _, ix in epoch_batches([3, 4, 10, 12, 12], [8, 16], 2, 0))
        [1, 2, 2]
    """
    rng = np.random.default_rng(seed)
    per: dict[int, list[int]] = {w: [] for w in widths}
    for i, n in enumerate(lengths):
        per[next(w for w in widths if n <= w)].append(i)
    out, carry = [], []
    for w in widths:
        items = carry + [int(i) for i in rng.permutation(per[w])]
        full = len(items) // batch * batch
        out += [(w, items[k : k + batch]) for k in range(0, full, batch)]
        carry = items[full:]
    if carry:
        out.append((widths[-1], carry))
    order = rng.permutation(len(out))
    return [out[k] for k in order]


def stack_batch(encoded: Sequence[tuple[np.ndarray, np.ndarray]], indices: Sequence[int], width: int,
                batch: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``(ids, weights, real_tokens)``: right-padded ``(batch, width)`` ids and the loss weight of
    each position (1 where the *next* token is an answer token)."""
    ids = np.full((batch, width), pad_id, np.int32)
    weights = np.zeros((batch, width), np.float32)
    real = 0
    for row, i in enumerate(indices):
        seq, answer = encoded[i]
        ids[row, : len(seq)] = seq
        weights[row, : len(seq) - 1] = answer[1:]
        real += len(seq)
    return ids, weights, real


# ----------------------------------------------------------------------------------------------
# Model.


def load_model(path: Any, *, dtype: Any, qlora: bool) -> tuple[Any, dict, Any]:
    """``(config, params, tokenizer)`` from a Hugging Face folder or a GGUF file, scanned layers;
    with ``qlora`` the projections are NF4."""
    import jlora
    from jlora.models.gguf import load_gguf
    from jlora.models.hf import from_pretrained

    path = Path(path)
    if path.is_dir():
        cfg, params, tok = from_pretrained(path, dtype=dtype, scan_layers=True, quantize="nf4" if qlora else None)
    elif path.suffix == ".gguf":
        cfg, params, tok = load_gguf(path, dtype=dtype, scan_layers=True)
        if qlora:
            params = jlora.quantize(params, method="nf4", targets="|".join(PROJECTIONS))
    else:
        raise FileNotFoundError(f"--model {path}: neither a Hugging Face folder nor a .gguf file.")
    if tok is None:
        raise FileNotFoundError(f"--model {path}: no tokenizer (tokenizer.json) found.")
    return cfg, params, tok


def _targets(spec: str) -> Any:
    """``--targets``: all projections, a list of module names, or a regex."""
    if spec in ("all", ""):
        return list(PROJECTIONS)
    if re.fullmatch(r"[\w,]+", spec):
        return [s for s in spec.split(",") if s]
    return spec  # a regex


def _dtype(name: str) -> Any:
    """``--dtype`` as a JAX dtype (``auto``: float32 on CPU, bfloat16 elsewhere)."""
    import jax
    import jax.numpy as jnp

    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32, "f32": jnp.float32}[name]


def _run_settings(args: argparse.Namespace) -> dict:
    """What a resumed run must share with the run it continues (the data by content)."""
    import hashlib

    keys = ("model", "seed", "batch", "seq_len", "long", "buckets", "eval_fraction", "rank", "alpha",
            "targets", "dropout", "qlora", "dtype", "steps", "lr", "warmup")
    out = {k: getattr(args, k) for k in keys}
    out["dtype"] = np.dtype(_dtype(args.dtype)).name  # what "auto" meant on this machine
    out["model"] = str(Path(args.model).resolve())
    out["data_sha256"] = hashlib.sha256(Path(args.data).read_bytes()).hexdigest()
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line of ``jlora-sft`` (``--alpha`` defaults to 2 x ``--rank``)."""
    from jlora.models.llama import REMAT_POLICIES  # here, not at import: this module imports no JAX then

    ap = argparse.ArgumentParser(
        prog="jlora-sft", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--model", required=True, help="a Hugging Face folder or a .gguf file")
    ap.add_argument("--data", required=True, help="JSONL: chat 'messages' or 'prompt'/'completion' per line")
    ap.add_argument("--out", default="out/sft", help="output directory")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    ap.add_argument("--targets", default="all",
                    help="'all' (the 7 projections), a comma list of module names (q_proj,v_proj) or a regex")
    ap.add_argument("--qlora", action="store_true", help="NF4 base, quantized as it is loaded")
    ap.add_argument("--matmul", default="xla", choices=("xla", "shared_xa", "pallas"),
                    help="jlora.inject's matmul path: 'pallas' runs each adapted bf16 matmul in jlora's fused "
                         "Hopper kernel (H100/H200; elsewhere, and for an NF4 base, the plain path, said once "
                         "the first step has run)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                    help="base weights and compute (auto: float32 on CPU, bfloat16 elsewhere)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 5%% of --steps)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024, help="longest sequence")
    long = ap.add_mutually_exclusive_group()
    long.add_argument("--truncate", dest="long", action="store_const", const="truncate", default="truncate",
                      help="cut sequences longer than --seq-len (default)")
    long.add_argument("--refuse-long", dest="long", action="store_const", const="refuse",
                      help="stop with an error if a sequence is longer than --seq-len")
    ap.add_argument("--buckets", type=int, default=4, help="most distinct batch widths (compiled shapes)")
    ap.add_argument("--eval-fraction", type=float, default=0.05, help="held-out share of the data")
    ap.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0: before and after)")
    ap.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="stop after N steps of this run, without exporting (a time-boxed job; --resume later)")
    ap.add_argument("--gguf", nargs="?", const="f16", default=None, choices=("f16", "bf16", "q8_0"),
                    help="also write a GGUF file (default type f16)")
    ap.add_argument("--no-merged", action="store_true", help="skip the merged Hugging Face folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--microbatches", type=int, default=1,
                    help="split each batch into this many slices, one forward and backward each, gradients "
                         "summed before the optimizer step (gradient accumulation: the same step, without "
                         "dropout exactly, one slice's activations at a time); must divide --batch")
    ap.add_argument("--remat", default="auto", choices=("auto", "none", *REMAT_POLICIES),
                    help="what each layer keeps for the backward pass (LlamaConfig.remat; 'attention' with "
                         "--microbatches fits a Llama-3-8B step beside its base in Unsloth's memory)")
    ap.add_argument("--compile-cache", default=None,
                    help="directory of JAX's persistent compilation cache (re-runs skip compiling)")
    args = ap.parse_args(argv)
    if args.alpha is None:
        args.alpha = 2.0 * args.rank
    if not 0 <= args.eval_fraction < 1:
        ap.error("--eval-fraction must be in [0, 1).")
    positive = {"--rank": args.rank, "--steps": args.steps, "--batch": args.batch, "--seq-len": args.seq_len,
                "--buckets": args.buckets, "--save-every": args.save_every, "--lr": args.lr, "--alpha": args.alpha}
    for flag, value in positive.items():
        if not (math.isfinite(value) and value > 0):  # NaN and inf too
            ap.error(f"{flag} must be positive, got {value}.")
    at_least_zero = {"--warmup": args.warmup, "--eval-every": args.eval_every, "--stop-after": args.stop_after}
    for flag, value in at_least_zero.items():
        if value is not None and value < 0:
            ap.error(f"{flag} must be 0 or more, got {value}.")
    if args.warmup is not None and args.warmup > args.steps:
        ap.error(f"--warmup {args.warmup} is longer than --steps {args.steps}.")
    if not 0 <= args.dropout < 1:
        ap.error(f"--dropout must be in [0, 1), got {args.dropout}.")
    if args.microbatches < 1 or args.batch % args.microbatches:
        ap.error(f"--microbatches must be a positive divisor of --batch {args.batch}, got {args.microbatches}.")
    return args


# ----------------------------------------------------------------------------------------------
# The run, phase by phase: each function below is one step of ``main``.


class _Plan:
    """Each epoch's batches, made on first use from the seed and the epoch alone (so a resumed run
    sees the batches an uninterrupted one would have)."""

    def __init__(self, lengths: list[int], widths: list[int], *, batch: int, seed: int) -> None:
        self.lengths, self.widths, self.batch, self.seed = lengths, widths, batch, seed
        self._epochs: dict[int, list] = {}

    def epoch(self, epoch: int) -> list[tuple[int, list[int]]]:
        """The batches of ``epoch``, ``(width, example indices)``."""
        if epoch not in self._epochs:
            self._epochs[epoch] = epoch_batches(self.lengths, self.widths, self.batch, seed=self.seed * 100003 + epoch)
        return self._epochs[epoch]

    def __call__(self, step: int) -> tuple[int, list[int]]:
        """The batch of ``step``, ``(width, example indices)``."""
        epoch, k = divmod(step, len(self.epoch(0)))
        return self.epoch(epoch)[k]


class _Data(NamedTuple):
    """The tokenized examples, split and bucketed, and how many were cut (``too_long``) or dropped."""

    train: list[tuple[np.ndarray, np.ndarray]]
    held_out: list[tuple[np.ndarray, np.ndarray]]
    widths: list[int]
    plan: _Plan
    too_long: int
    dropped: int


@dataclasses.dataclass
class _Trainer:
    """The jitted step and loss, the frozen base, and the adapters and optimizer state they update."""

    apply: Any
    base: Any
    adapters: Any
    opt_state: Any
    step_fn: Any
    eval_fn: Any
    pad_id: int


@dataclasses.dataclass
class _Throughput:
    """Tokens (padding included) and real tokens of every step, and of the timed steps with their seconds."""

    seconds: float = 0.0
    tokens: int = 0
    real: int = 0
    all_tokens: int = 0
    all_real: int = 0
    train_seconds: float = 0.0

    def add(self, tokens: int, real: int, seconds: float, *, timed: bool) -> None:
        """Count one step; its time and tokens only if ``timed``."""
        self.all_tokens, self.all_real = self.all_tokens + tokens, self.all_real + real
        if timed:
            self.seconds, self.tokens, self.real = self.seconds + seconds, self.tokens + tokens, self.real + real


@dataclasses.dataclass
class _Run:
    """Where the run stands: its checkpointer, first and last step, and the losses so far."""

    ckpt: Any
    start: int
    losses: list[float]
    end: int = 0
    eval_before: Optional[float] = None
    evals: list = dataclasses.field(default_factory=list)
    speed: _Throughput = dataclasses.field(default_factory=_Throughput)


def _start(args: argparse.Namespace) -> tuple[Path, str]:
    """The compilation cache, the output folder and the device line; ``(out, platform)``."""
    import jax

    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", str(args.compile_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = jax.devices()[0]
    print(f"JAX {jax.__version__} on {dev.platform.upper()} ({dev.device_kind})")
    return out, dev.platform


def _load(args: argparse.Namespace, *, t0: float) -> tuple[Any, dict, Any]:
    """``(config, params, tokenizer)`` of ``--model`` in ``--dtype``, and the model line."""
    dtype = _dtype(args.dtype)
    cfg, variables, tok = load_model(args.model, dtype=dtype, qlora=args.qlora)
    print(f"model: {cfg.num_layers} layers, d={cfg.hidden_size}, vocab={cfg.vocab_size}, "
          f"{np.dtype(dtype).name}{', NF4 base' if args.qlora else ''} ({time.time() - t0:.1f}s)")
    return cfg, variables, tok


def _tokenize(examples: list[Example], tok: Any, *, data: Any, seq_len: int,
              long: str) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[int], int]:
    """``(encoded, too_long lines, dropped)``: sequences over ``seq_len`` cut or refused, then
    those with no answer token left dropped."""
    encoded, too_long, dropped = [], [], 0
    for ex in examples:
        ids, answer = encode_example(tok, ex)
        if len(ids) > seq_len:
            too_long.append(ex.line)
            if long == "refuse":
                continue
            ids, answer = ids[:seq_len], answer[:seq_len]
        if not answer[1:].any():
            dropped += 1
            continue
        encoded.append((ids, answer))
    if too_long and long == "refuse":
        raise DataError(
            f"{data}: {len(too_long)} sequences longer than --seq-len {seq_len} (lines "
            f"{too_long[:10]}{' ...' if len(too_long) > 10 else ''}); raise --seq-len or pass --truncate."
        )
    if too_long:
        print(f"truncated {len(too_long)} of {len(examples)} sequences to --seq-len {seq_len}")
    if dropped:
        print(f"dropped {dropped} examples with no answer token within --seq-len")
    return encoded, too_long, dropped


def _split(encoded: list, *, data: Any, seed: int, eval_fraction: float) -> tuple[list, list]:
    """``(train, held_out)``: a seeded shuffle, its first ``eval_fraction`` (at least one if any) held out."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(encoded))
    n_eval = int(round(eval_fraction * len(encoded)))
    if eval_fraction > 0:
        n_eval = max(1, n_eval)
    held_out = [encoded[i] for i in order[:n_eval]]
    train = [encoded[i] for i in order[n_eval:]]
    if not train:
        raise DataError(f"{data}: no training examples left after the held-out split.")
    return train, held_out


def _prepare_data(examples: list[Example], tok: Any, *, args: argparse.Namespace) -> _Data:
    """Tokenize, split and bucket the examples, and print the data line."""
    encoded, too_long, dropped = _tokenize(examples, tok, data=args.data, seq_len=args.seq_len, long=args.long)
    train, held_out = _split(encoded, data=args.data, seed=args.seed, eval_fraction=args.eval_fraction)
    lengths = [len(s) for s, _ in train]
    widths = bucket_widths(lengths + [len(s) for s, _ in held_out], args.buckets, args.seq_len)
    plan = _Plan(lengths, widths, batch=args.batch, seed=args.seed)
    one_epoch = plan.epoch(0)
    real_epoch = sum(lengths)
    padded_epoch = sum(w * args.batch for w, _ in one_epoch)
    print(f"data: {len(train)} train / {len(held_out)} held-out examples, "
          f"{sum(int(a.sum()) for _, a in train)} answer tokens; widths {widths}, "
          f"{len(one_epoch)} batches an epoch, padding {1 - real_epoch / padded_epoch:.1%}")
    return _Data(train, held_out, widths, plan, len(too_long), dropped)


def _step_functions(apply: Any, tx: Any, *, dropout: float, donate: bool, microbatches: int = 1) -> tuple[Any, Any]:
    """``(step, loss sums)``, jitted: one optimizer step on the answer-token loss, and its sum and weight.

    With ``microbatches`` > 1 the step runs the batch's equal slices one after the other in a
    ``lax.scan``, sums their loss sums, weights and gradients, and divides once: the whole batch's
    mean and gradient, with one slice's activations in memory at a time (with dropout, each slice
    draws its own masks, so the step equals the one-pass step in distribution, not bit for bit)."""
    import jax
    import jax.numpy as jnp
    import optax

    import jlora

    def loss_sums(adapters, base, ids, weights, key):
        # The model's own loss (labels=): chunked over tokens, so the batch's float32 logits
        # (batch × seq × vocab) never exist at once. Position t predicts token t + 1.
        rng = key if dropout else None
        pad = jnp.zeros((ids.shape[0], 1), ids.dtype)
        labels = jnp.concatenate([ids[:, 1:], pad - 1], axis=1)  # the last position predicts nothing
        w = jnp.concatenate([weights[:, :-1], pad.astype(weights.dtype)], axis=1)
        count = jnp.sum(w)
        mean = apply(jlora.combine(adapters, base), ids, labels=labels, loss_mask=w, lora_rng=rng)
        return mean * count, count

    sums = jax.value_and_grad(loss_sums, has_aux=True)

    def summed(adapters, base, ids, weights, key):
        """The batch's loss sum, weight and gradient of the sum, over ``microbatches`` slices."""
        if microbatches == 1:
            (total, count), grads = sums(adapters, base, ids, weights, key)
            return total, count, grads
        split = lambda x: x.reshape(microbatches, x.shape[0] // microbatches, *x.shape[1:])  # noqa: E731

        def body(carry, xs):
            total, count, grads = carry
            (t, c), g = sums(adapters, base, *xs)
            return (total + t, count + c, jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)), None

        zero = jnp.zeros((), jnp.float32)
        init = (zero, zero, jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), adapters))  # summed in float32
        keys = jax.random.split(key, microbatches)
        return jax.lax.scan(body, init, (split(ids), split(weights), keys))[0]

    def train_step(adapters, opt_state, base, ids, weights, key):
        total, count, grads = summed(adapters, base, ids, weights, key)
        count = jnp.maximum(count, 1.0)  # the mean over the answer tokens, and its gradient
        grads = jax.tree.map(lambda g, a: (g / count).astype(a.dtype), grads, adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, total / count

    # The frozen base is an argument, not a closure (closed-over arrays become constants).
    step_fn = jax.jit(train_step, donate_argnums=(0, 1) if donate else ())
    eval_fn = jax.jit(lambda a, b, i, w: loss_sums(a, b, i, w, None))
    return step_fn, eval_fn


def _inject(cfg: Any, variables: dict, tok: Any, data: _Data, *, args: argparse.Namespace,
            platform: str) -> _Trainer:
    """LoRA on the chosen projections (and its summary line), AdamW with warm-up and cosine decay on the adapters."""
    import jax
    import jax.numpy as jnp
    import optax

    import jlora
    from jlora.models.llama import Llama

    model = Llama(cfg.replace(remat=None if args.remat == "none" else args.remat))
    pad_id = tok.pad_id if tok.pad_id is not None else 0
    w0, ix0 = data.plan.epoch(0)[0]
    ids0, _, _ = stack_batch(data.train, ix0, w0, args.batch, pad_id)
    params, apply = jlora.inject(
        variables, model.apply, rank=args.rank, alpha=args.alpha, targets=_targets(args.targets),
        dropout=args.dropout, key=jax.random.key(args.seed), example_args=(jnp.asarray(ids0),),
        matmul=args.matmul,
    )
    print(jlora.summary(params).splitlines()[-1])
    adapters, base = jlora.split(params)
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, max(args.steps, warmup + 1), args.lr * 0.1)
    tx = optax.adamw(schedule, weight_decay=0.0)
    opt_state = tx.init(adapters)
    step_fn, eval_fn = _step_functions(apply, tx, dropout=args.dropout, donate=platform != "cpu",
                                       microbatches=args.microbatches)
    return _Trainer(apply, base, adapters, opt_state, step_fn, eval_fn, pad_id)


def _evaluate(tr: _Trainer, data: _Data, *, batch: int) -> Optional[float]:
    """The held-out loss on the answer tokens, in length-sorted batches (None without held-out examples)."""
    import jax.numpy as jnp

    if not data.held_out:
        return None
    total = count = 0.0
    eval_lengths = [len(s) for s, _ in data.held_out]
    idx = np.argsort(eval_lengths, kind="stable")
    for k in range(0, len(idx), batch):
        chunk = [int(i) for i in idx[k : k + batch]]
        width = next(w for w in data.widths if max(eval_lengths[i] for i in chunk) <= w)
        ids, weights, _ = stack_batch(data.held_out, chunk, width, batch, tr.pad_id)
        t, c = tr.eval_fn(tr.adapters, tr.base, jnp.asarray(ids), jnp.asarray(weights))
        total, count = total + float(t), count + float(c)
    return total / max(count, 1.0)


def _check_settings(run_file: Path, run: dict, *, out: Path) -> None:
    """Refuse to resume a run of other settings: anything else would not continue it."""
    if not run_file.is_file():
        return
    before = json.loads(run_file.read_text())
    if before.get("dtype") == "auto":  # recorded before "auto" was resolved: what it means here
        before["dtype"] = np.dtype(_dtype("auto")).name
    changed = {k: (before.get(k), v) for k, v in run.items() if before.get(k) != v}
    if changed:
        raise ValueError(
            f"--resume: these settings differ from the run in {out} (before, now): {changed}; "
            f"resume with the same ones, or choose another --out."
        )


def _resume(tr: _Trainer, variables: dict, *, out: Path, args: argparse.Namespace, settings: dict) -> _Run:
    """The checkpointer, and with ``--resume`` its newest step restored into ``tr``; records
    ``settings`` (checked against the run's ``run.json`` before the model was loaded) as ``run.json``."""
    import jlora

    run_file = out / "run.json"
    ckpt = jlora.TrainCheckpointer(out / "checkpoints", every=args.save_every, keep=2)
    losses_file = out / "losses.json"
    run = _Run(ckpt, 0, [])
    latest = ckpt.latest_step()
    if latest is not None and not args.resume:
        raise FileExistsError(
            f"{out / 'checkpoints'} holds a checkpoint of step {latest}: pass --resume to continue "
            f"it, or choose another --out."
        )
    if args.resume and latest is not None:
        restored = ckpt.restore(variables, opt_state_like=tr.opt_state)
        tr.adapters = jlora.split(restored.params)[0]
        tr.opt_state, run.start = restored.opt_state, restored.step
        if losses_file.is_file():
            run.losses = json.loads(losses_file.read_text())[: run.start]
        print(f"resumed from step {run.start} ({out / 'checkpoints' / str(run.start)})")
    elif args.resume:
        print(f"--resume: no checkpoint in {out / 'checkpoints'}, starting at step 0")
    run_file.write_text(json.dumps(settings, indent=1))
    return run


def _progress_bar(*, total: int, initial: int) -> Any:
    """A tqdm bar on stdout, or None without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=initial, desc="sft", ncols=100, file=sys.stdout)


def _train(tr: _Trainer, data: _Data, run: _Run, *, out: Path, args: argparse.Namespace) -> None:
    """Steps ``run.start`` to ``run.end`` under the progress bar; checkpoints and held-out losses on their schedule."""
    import jax
    import jax.numpy as jnp

    bar = _progress_bar(total=args.steps, initial=run.start)
    seen_widths: set[int] = set()
    speed = run.speed
    base_key = jax.random.key(args.seed + 1)
    t_train = time.time()
    for step in range(run.start, run.end):
        width, indices = data.plan(step)
        ids, weights, real = stack_batch(data.train, indices, width, args.batch, tr.pad_id)
        t1 = time.perf_counter()
        tr.adapters, tr.opt_state, loss = tr.step_fn(tr.adapters, tr.opt_state, tr.base, jnp.asarray(ids),
                                                     jnp.asarray(weights), jax.random.fold_in(base_key, step))
        loss = float(loss)  # waits for the step
        dt = time.perf_counter() - t1
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {step + 1}: loss is {loss}; lower --lr.")
        run.losses.append(loss)
        speed.add(ids.size, real, dt, timed=width in seen_widths)  # the first step of each shape compiles: not timed
        if not seen_widths and args.matmul == "pallas":
            report = tr.apply.fused_report
            line = str(report).splitlines()[0] if report else "matmul='pallas': no adapted matmul was traced"
            (bar.write if bar is not None else print)(line)  # above the progress bar, not inside it
        seen_widths.add(width)
        if run.ckpt.save(step + 1, tr.adapters, tr.opt_state):
            (out / "losses.json").write_text(json.dumps(run.losses))
        if args.eval_every and (step + 1) % args.eval_every == 0:
            run.evals.append((step + 1, _evaluate(tr, data, batch=args.batch)))
        if bar is not None:
            tps = speed.tokens / speed.seconds if speed.seconds else 0.0
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:.0f}", width=width)
            bar.update(1)
    if bar is not None:
        bar.close()
    speed.train_seconds = time.time() - t_train


def _metrics(data: _Data, run: _Run, *, args: argparse.Namespace) -> dict[str, Any]:
    """What ``metrics.json`` records of the training (the held-out loss after and the files come later)."""
    speed = run.speed
    return {
        "model": str(args.model), "data": str(args.data), "steps": run.end, "start_step": run.start,
        "losses": run.losses, "eval_loss_before": run.eval_before, "evals": run.evals,
        "train_examples": len(data.train), "eval_examples": len(data.held_out),
        "truncated": data.too_long if args.long == "truncate" else 0, "dropped": data.dropped,
        "widths": data.widths,
        "padding_fraction": (1 - speed.all_real / speed.all_tokens) if speed.all_tokens else None,
        "tokens_per_second": speed.tokens / speed.seconds if speed.seconds else None,
        "real_tokens_per_second": speed.real / speed.seconds if speed.seconds else None,
        "train_seconds": speed.train_seconds,
    }


def _close_checkpoints(tr: _Trainer, run: _Run, *, steps: int) -> bool:
    """Close the checkpointer, the last step saved; False (and a line) if ``--stop-after`` ended the run early."""
    if run.end < steps:
        run.ckpt.close()
        print(f"stopped after step {run.end} of {steps} (--stop-after); continue with --resume")
        return False
    if run.ckpt.latest_step() != run.end:
        run.ckpt.save(run.end, tr.adapters, tr.opt_state, force=True)
    run.ckpt.close()
    return True


def _held_out_after(tr: _Trainer, data: _Data, run: _Run, *, batch: int) -> Optional[float]:
    """The held-out loss after training, printed with the one before."""
    eval_loss = _evaluate(tr, data, batch=batch)
    if eval_loss is not None:
        before = f"{run.eval_before:.4f} -> " if run.eval_before is not None else ""
        print(f"held-out loss: {before}{eval_loss:.4f}")
    return eval_loss


def _write_model(params: Any, cfg: Any, tok: Any, *, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``adapter/``, ``peft/`` (skipped with a line if PEFT cannot express it), ``merged/`` and the GGUF file."""
    import jlora

    written: dict[str, Any] = {}
    jlora.save_adapters(out / "adapter", params, overwrite=True)
    written["adapter"] = out / "adapter"
    try:
        jlora.export_peft(out / "peft", params, base_model_name_or_path=str(args.model), overwrite=True)
        written["peft"] = out / "peft"
    except ValueError as e:
        print(f"PEFT export skipped: {e}")
    merged = None
    if not args.no_merged or args.gguf:
        merged = jlora.merge(params)
    if not args.no_merged:
        from jlora.models.hf import save_pretrained

        written["merged"] = save_pretrained(out / "merged", merged, cfg, tok, overwrite=True)
    if args.gguf:
        from jlora.models.gguf_writer import save_gguf

        written["gguf"] = save_gguf(out / f"model-{args.gguf}.gguf", merged, cfg, tok, dtype=args.gguf,
                                    overwrite=True)
    del merged
    return written


def _plot(run: _Run, eval_loss: Optional[float], *, path: Path, rank: int) -> bool:
    """The loss curve (train, and the held-out points) as a PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(range(1, len(run.losses) + 1), run.losses, label="train (answer tokens)")
        before = [(0, run.eval_before)] if run.eval_before is not None else []
        points = [(s, v) for s, v in before + run.evals + [(run.end, eval_loss)] if v is not None]
        if points:
            ax.plot(*zip(*points), "o--", label="held-out")
        ax.set(xlabel="step", ylabel="loss", yscale="log", title=f"jlora SFT r={rank}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return True
    except ImportError:  # pragma: no cover
        return False


def _print_summary(metrics: dict[str, Any], written: dict[str, Any], run: _Run) -> None:
    """The closing lines: steps, seconds, tokens/s and padding, then each file written."""
    pad, tokens_per_s = metrics["padding_fraction"], metrics["tokens_per_second"]
    tps = "n/a (every step compiled)" if tokens_per_s is None else (
        f"{tokens_per_s:,.0f} tokens/s incl. padding, {metrics['real_tokens_per_second']:,.0f} without")
    padding = "n/a (no step run)" if pad is None else f"{pad:.1%}"
    print(f"\ntrain: {run.end - run.start} steps in {metrics['train_seconds']:.0f}s; {tps} "
          f"(compiling steps excluded); padding {padding}")
    for k, v in written.items():
        print(f"  {k:8s} {v}")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run a fine-tuning; returns the metrics written to ``metrics.json`` plus ``params``,
    ``apply``, ``config`` and ``tokenizer`` (with ``stopped`` and no files after ``--stop-after``)."""
    import jlora

    args = parse_args(argv)
    out, platform = _start(args)
    t0 = time.time()
    examples = read_jsonl(args.data)  # before loading a model: bad data fails fast
    settings = _run_settings(args)
    if args.resume:  # and so do settings that differ from the run being resumed
        _check_settings(out / "run.json", settings, out=out)
    cfg, variables, tok = _load(args, t0=t0)
    data = _prepare_data(examples, tok, args=args)
    tr = _inject(cfg, variables, tok, data, args=args, platform=platform)
    run = _resume(tr, variables, out=out, args=args, settings=settings)
    run.eval_before = _evaluate(tr, data, batch=args.batch) if run.start == 0 else None
    if run.eval_before is not None:
        print(f"held-out loss before: {run.eval_before:.4f}")
    run.end = args.steps if args.stop_after is None else min(args.steps, run.start + args.stop_after)
    _train(tr, data, run, out=out, args=args)
    run.ckpt.wait()
    (out / "losses.json").write_text(json.dumps(run.losses))
    params = jlora.combine(tr.adapters, tr.base)
    metrics = _metrics(data, run, args=args)
    result = {**metrics, "params": params, "apply": tr.apply, "config": cfg, "tokenizer": tok}
    if not _close_checkpoints(tr, run, steps=args.steps):
        return {**result, "stopped": True}
    metrics["eval_loss"] = _held_out_after(tr, data, run, batch=args.batch)
    written = _write_model(params, cfg, tok, out=out, args=args)
    if _plot(run, metrics["eval_loss"], path=out / "loss.png", rank=args.rank):
        written["plot"] = out / "loss.png"
    metrics["files"] = {k: str(v) for k, v in written.items()}
    metrics["total_seconds"] = time.time() - t0
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    _print_summary(metrics, written, run)
    return {**result, **metrics}


def cli() -> None:
    """Console entry point: errors about the data or the model end the program with their message."""
    try:
        main()
    except (DataError, NotImplementedError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"jlora-sft: error: {e}")


if __name__ == "__main__":
    cli()
