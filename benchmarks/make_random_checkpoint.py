"""Write a random-weight Hugging Face checkpoint of a real model's shape, offline.

For throughput runs of ``examples/sft.py`` without downloading a model: the ``config.json`` is
made by transformers (``LlamaConfig``), the weights are random bfloat16 (normal, std 0.02, drawn
with ``jax.random`` on the default device; norms 1), written tensor by tensor into safetensors shards of at most ``--max-shard-size`` (one tensor in
memory at a time, never the model), and the tokenizer is a byte-level BPE trained in a second on
``examples/data/sample.jsonl`` with ChatML special tokens and chat template (its few hundred
tokens are the first rows of the model's embedding; the rest are never used).

    python benchmarks/make_random_checkpoint.py --shape 8b --out /tmp/llama-8b-random   # 16 GB
    python benchmarks/make_random_checkpoint.py --shape tiny --out /tmp/tiny              # tests

Shapes: ``8b`` (Llama 3.1 8B: d 4096, 32 layers, 32/8 heads, ffn 14336, vocab 128256, llama3
RoPE), ``1b`` (Llama 3.2 1B, tied), ``smollm2-135m`` and ``tiny`` (d 64, 2 layers; vocab = the
tokenizer's).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

_REPO = pathlib.Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0,
               rope_scaling=LLAMA3_ROPE, max_position_embeddings=131072, tie_word_embeddings=False,
               rms_norm_eps=1e-5),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0,
               rope_scaling={**LLAMA3_ROPE, "factor": 32.0}, max_position_embeddings=131072,
               tie_word_embeddings=True, rms_norm_eps=1e-5),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=None, rope_theta=10000.0,
                 max_position_embeddings=2048, tie_word_embeddings=False, rms_norm_eps=1e-5),
}
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def write_tokenizer(out: pathlib.Path, vocab_size: int = 512) -> int:
    """A byte-level BPE trained on the shipped sample data; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = []
    sample = _REPO / "examples" / "data" / "sample.jsonl"
    for line in sample.read_text().splitlines():
        row = json.loads(line)
        texts += [m["content"] for m in row.get("messages", [])] + [row.get("prompt", ""), row.get("completion", "")]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts + ["system user assistant"] * 10, trainer)
    (out / "tokenizer.json").write_text(backend.to_str())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
              "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML,
              "clean_up_tokenization_spaces": False, "model_max_length": 131072}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return backend.get_vocab_size(with_added_tokens=True)


def main(argv=None) -> pathlib.Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-shard-size", default="5GB")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import ml_dtypes
    import transformers

    from jlora.models.hf import size_bytes, tensor_plan, config_from_hf, write_safetensors

    out = pathlib.Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        # a second run's shards beside the first's would be read back mixed with them
        raise SystemExit(f"make_random_checkpoint: {out} exists and is not an empty folder; pick a new --out.")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    n_tok = write_tokenizer(out)
    shape = dict(SHAPES[args.shape])
    if shape["vocab_size"] is None:
        shape["vocab_size"] = n_tok
    hf_config = transformers.LlamaConfig(**shape, bos_token_id=0, eos_token_id=2, pad_token_id=0)
    hf_config.architectures = ["LlamaForCausalLM"]
    hf_config.save_pretrained(out)
    cfg = config_from_hf(json.loads((out / "config.json").read_text()))
    bf16 = np.dtype(ml_dtypes.bfloat16)
    key = jax.random.key(args.seed)
    draw = jax.jit(lambda k, shape: jax.random.normal(k, shape, jnp.bfloat16) * 0.02, static_argnums=1)

    def make(t, i):
        if t.kind[-1] == "scale":
            return np.ones(t.torch_shape, bf16)
        # drawn by JAX on its default device (a GPU draws 8 B values in seconds), then copied out
        return np.asarray(draw(jax.random.fold_in(key, i), t.torch_shape))

    tensors = tensor_plan(cfg)
    index = {t.hf: i for i, t in enumerate(tensors)}
    limit, shards, used = size_bytes(args.max_shard_size), [[]], 0
    for t in tensors:
        size = 2 * int(np.prod(t.torch_shape))
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(t)
        used += size
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        name = "model.safetensors" if len(shards) == 1 else f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(out / name, [(t.hf, t.torch_shape, bf16, lambda t=t: make(t, index[t.hf]))
                                                for t in shard])
        weight_map.update({t.hf: name for t in shard})
        print(f"  {name}: {len(shard)} tensors", flush=True)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    n_params = sum(int(np.prod(t.torch_shape)) for t in tensors)
    print(f"wrote {out}: {args.shape}, {n_params / 1e9:.2f} B params ({total / 1e9:.1f} GB bf16), "
          f"tokenizer of {n_tok} tokens, in {time.time() - t0:.0f}s")
    return out


if __name__ == "__main__":
    main()
