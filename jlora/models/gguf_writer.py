"""Write :mod:`jlora.models.llama` params as a GGUF file for llama.cpp (and everything built on it).

:func:`save_gguf` is the inverse of :func:`~jlora.models.gguf.load_gguf`: llama.cpp's tensor names
(``token_embd``, ``blk.N.attn_q`` ... ``output_norm``, ``output``), torch's ``(out, in)``
orientation, the per-head row order of ``attn_q``/``attn_k`` that llama.cpp's converter
(``convert_hf_to_gguf.py``, ``LlamaModel.permute``) produces from transformers' rotate-half
layout, the ``llama.*`` metadata, and the tokenizer (``tokenizer.ggml.*``: tokens, token types,
merges, special ids, pre-tokenizer name) with its chat template.

Tensors are converted and written one at a time (the writer is told every tensor's shape and
type first, then receives the data in order), into a hidden temporary file beside the target,
fsynced and renamed onto it (:func:`jlora._atomic.write_file`): a failure leaves an existing file
as it was, and a killed run only a hidden temporary file that the next write removes.

Dtypes: ``'f16'`` and ``'bf16'`` store every matrix in that type, ``'q8_0'`` stores every matrix
whose rows are a multiple of 32 values in Q8_0 (others in F16); norms (1-D) are always F32, as
llama.cpp's converter does. RoPE scaling: ``linear`` is written as llama.cpp's
``llama.rope.scaling.*`` keys; ``llama3`` as llama.cpp's ``rope_freqs.weight`` tensor (the
per-frequency divisors its converter computes) plus a ``jlora.rope_scaling`` JSON key from which
:func:`~jlora.models.gguf.load_gguf` restores the exact config.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Union

import jax
import numpy as np

from jlora._atomic import write_file
from jlora.models.llama import LlamaConfig

__all__ = ["save_gguf", "gguf_vocab", "llama3_rope_factors"]

PathLike = Union[str, "os.PathLike[str]"]

# llama.cpp's names: flax path inside a layer -> GGUF block tensor.
_BLOCK = {
    ("input_layernorm", "scale"): "attn_norm",
    ("post_attention_layernorm", "scale"): "ffn_norm",
    ("self_attn", "q_proj", "kernel"): "attn_q",
    ("self_attn", "k_proj", "kernel"): "attn_k",
    ("self_attn", "v_proj", "kernel"): "attn_v",
    ("self_attn", "o_proj", "kernel"): "attn_output",
    ("mlp", "gate_proj", "kernel"): "ffn_gate",
    ("mlp", "up_proj", "kernel"): "ffn_up",
    ("mlp", "down_proj", "kernel"): "ffn_down",
}
_FILE_TYPE = {"f16": 1, "q8_0": 7, "bf16": 32}  # llama.cpp's LlamaFileType (MOSTLY_*)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: within each head, transformers' row ``j*d/2 + i`` goes to ``2*i + j``
    (torch ``(out, in)`` weight); :func:`jlora.models.gguf._rope_rows` undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(config: LlamaConfig) -> np.ndarray:
    """The ``rope_freqs.weight`` llama.cpp's converter writes for ``rope_type='llama3'``: one
    float32 divisor per frequency (llama.cpp computes ``theta = pos * inv_freq / factor``)."""
    s = dict(config.rope_scaling)
    dim, base = config.head_dim, config.rope_theta
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


# ----------------------------------------------------------------------------------------------
# Tokenizer.

_PRE_BY_SPLIT = {  # a Split pre-tokenizer's regex -> llama.cpp's pre-tokenizer name
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "llama-bpe",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "qwen2",
}


def _pre_name(pre: Any) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a ``tokenizer.json`` pre-tokenizer (byte-level)."""
    if pre is None:
        raise NotImplementedError("A byte-level BPE tokenizer without pre-tokenizer is not written to GGUF.")
    kind = pre.get("type")
    if kind == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if kind == "Sequence":
        parts = pre.get("pretokenizers", [])
        types = [p.get("type") for p in parts]
        if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
            return "smollm"
        if types == ["Split", "ByteLevel"]:
            regex = parts[0].get("pattern", {}).get("Regex")
            if regex in _PRE_BY_SPLIT:
                return _PRE_BY_SPLIT[regex]
    raise NotImplementedError(
        f"This tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) has no llama.cpp name jlora "
        f"knows (gpt-2, smollm, llama-bpe, qwen2)."
    )


def gguf_vocab(tokenizer: Any) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` fields of a jlora tokenizer (GGUF :class:`Tokenizer` or
    :class:`HFTokenizer`): ``tokens``, ``token_type``, ``merges``, ``pre``, special ids, ``add_bos``,
    ``add_eos``, ``chat_template``.

    Raises:
        NotImplementedError: Not a byte-level BPE tokenizer (GPT-2 style); sentencepiece-style
            vocabularies (Llama 2, Mistral v0.1) are not converted.
    """
    from jlora.models.tokenizer import HFTokenizer, Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return {
            "tokens": list(tokenizer.tokens),
            "token_type": [int(t) for t in tokenizer.token_types],
            "merges": list(tokenizer.merges),
            "pre": tokenizer.pre,
            "bos": tokenizer.bos_id,
            "eos": tokenizer.eos_id,
            "pad": tokenizer.pad_id,
            "add_bos": bool(tokenizer.add_bos),
            "add_eos": bool(tokenizer.add_eos),
            "chat_template": tokenizer.chat_template,
        }
    if not isinstance(tokenizer, HFTokenizer):
        raise TypeError(f"tokenizer must be a jlora Tokenizer or HFTokenizer, got {type(tokenizer).__name__}.")
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model", {})
    decoder = spec.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        raise NotImplementedError(
            f"Only byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen2, SmolLM) are written to "
            f"GGUF; this one is {model.get('type')} with a {decoder.get('type')} decoder."
        )
    pre = _pre_name(spec.get("pre_tokenizer"))
    n = tokenizer.vocab_size
    tokens = list(tokenizer.tokens)
    types = [1] * n
    for added in spec.get("added_tokens", []):
        types[added["id"]] = 3 if added.get("special") else 4
    for i, text in enumerate(tokens):
        if text == "":
            tokens[i], types[i] = f"[PAD{i}]", 5  # a hole in the ids: llama.cpp's UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    # BOS/EOS added by the post-processor (TemplateProcessing), as transformers encodes.
    probe = tokenizer.backend.encode("a", add_special_tokens=True).ids
    plain = tokenizer.backend.encode("a", add_special_tokens=False).ids
    add_bos = bool(tokenizer.bos_id is not None and len(probe) > len(plain) and probe[0] == tokenizer.bos_id)
    add_eos = bool(tokenizer.eos_id is not None and len(probe) > len(plain) and probe[-1] == tokenizer.eos_id)
    return {
        "tokens": tokens,
        "token_type": types,
        "merges": merges,
        "pre": pre,
        "bos": tokenizer.bos_id,
        "eos": tokenizer.eos_id,
        "pad": tokenizer.pad_id,
        "add_bos": add_bos,
        "add_eos": add_eos,
        "chat_template": tokenizer.chat_template,
    }


# ----------------------------------------------------------------------------------------------
# Tensors.


def _inner(params: Any) -> Any:
    if "params" in params and len(params) == 1:
        return params["params"]
    return params


def _array(x: Any) -> np.ndarray:
    """float32 numpy copy of one array (a quantized kernel dequantized)."""
    from jlora._quant import is_quantized

    if is_quantized(x):
        x = x.dequantize()
    return np.asarray(jax.device_get(x), dtype=np.float32)


def _plan(params: Any, config: LlamaConfig) -> list[tuple[str, Callable[[], np.ndarray], tuple[int, ...]]]:
    """``(gguf name, make float32 array in numpy/torch order, shape)`` for every tensor."""
    from jlora.models.hf import check_plain

    check_plain(params)
    inner = _inner(params)
    scanned = "layers" in inner
    cfg = config

    def get(*keys: str) -> Any:
        node = inner
        for k in keys:
            if k not in node:
                raise ValueError(f"params have no {'/'.join(keys)!r}.")
            node = node[k]
        return node

    out: list = []
    d = cfg.hidden_size
    out.append(("token_embd.weight", lambda: _array(get("embed_tokens", "embedding")), (cfg.vocab_size, d)))
    q, kv, f = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    shapes = {"attn_norm": (d,), "ffn_norm": (d,), "attn_q": (q, d), "attn_k": (kv, d), "attn_v": (kv, d),
              "attn_output": (d, q), "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f)}
    for i in range(cfg.num_layers):
        for path, name in _BLOCK.items():

            def make(path=path, name=name, i=i) -> np.ndarray:
                if scanned:
                    x = jax.tree.map(lambda a: a[i], get("layers", *path))
                else:
                    x = get(f"layers_{i}", *path)
                w = _array(x)
                if w.ndim == 2:
                    w = w.T  # Flax (in, out) -> torch (out, in)
                if name == "attn_q":
                    w = _permute(w, cfg.num_heads)
                elif name == "attn_k":
                    w = _permute(w, cfg.num_kv_heads)
                return np.ascontiguousarray(w)

            out.append((f"blk.{i}.{name}.weight", make, shapes[name]))
    out.append(("output_norm.weight", lambda: _array(get("norm", "scale")), (d,)))
    if not cfg.tie_embeddings:
        out.append(("output.weight", lambda: np.ascontiguousarray(_array(get("lm_head", "kernel")).T),
                    (cfg.vocab_size, d)))
    if cfg.rope_scaling is not None and dict(cfg.rope_scaling)["rope_type"] == "llama3":
        factors = llama3_rope_factors(cfg)
        out.append(("rope_freqs.weight", lambda: factors, factors.shape))
    return out


def _encode(x: np.ndarray, name: str, dtype: str) -> tuple[np.ndarray, Any]:
    """``(data, raw_dtype)`` for GGUFWriter: 1-D tensors F32, matrices in ``dtype``."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    if x.ndim == 1:
        return x.astype(np.float32), None
    if dtype == "f16":
        return x.astype(np.float16), None
    if dtype == "bf16":
        import ml_dtypes

        return x.astype(ml_dtypes.bfloat16).view(np.uint8), T.BF16
    if x.shape[-1] % 32:  # q8_0 blocks run along a row
        return x.astype(np.float16), None
    return quantize(x, T.Q8_0), T.Q8_0


def _byte_layout(shape: tuple[int, ...], name: str, dtype: str) -> tuple[tuple[int, ...], Any, Any, int]:
    """What :func:`_encode` will give for a tensor of ``shape``: ``(stored shape, numpy dtype,
    raw ggml type, bytes)``, known before the data is made."""
    from gguf import GGMLQuantizationType as T
    from gguf import quant_shape_to_byte_shape

    if len(shape) == 1:
        return shape, np.float32, None, 4 * math.prod(shape)
    if dtype == "f16" or (dtype == "q8_0" and shape[-1] % 32):
        return shape, np.float16, None, 2 * math.prod(shape)
    qtype = T.BF16 if dtype == "bf16" else T.Q8_0
    byte_shape = tuple(quant_shape_to_byte_shape(shape, qtype))
    return byte_shape, np.uint8, qtype, math.prod(byte_shape)


def _check_options(config: LlamaConfig, *, dtype: str) -> None:
    """Refuse what is not written (an unknown dtype, q/k/v biases); warn about a sliding window."""
    import warnings

    if dtype not in _FILE_TYPE:
        raise ValueError(f"dtype must be one of {sorted(_FILE_TYPE)}, got {dtype!r}.")
    if config.qkv_bias:
        raise NotImplementedError(
            "save_gguf writes llama.cpp's 'llama' architecture; q/k/v biases (Qwen2) would need "
            "its 'qwen2' architecture, which is not written. Use save_pretrained and llama.cpp's "
            "convert_hf_to_gguf.py."
        )
    if config.sliding_window is not None:
        warnings.warn(
            f"save_gguf: the sliding window ({config.sliding_window}) is not stored; llama.cpp's "
            f"'llama' architecture attends to the whole context.",
            stacklevel=3,  # save_gguf's caller
        )


def _add_model_keys(writer: Any, config: LlamaConfig, *, dtype: str, name: str) -> None:
    """The ``general.*`` and ``llama.*`` metadata, RoPE scaling included."""
    cfg = config
    writer.add_name(name)
    writer.add_file_type(_FILE_TYPE[dtype])
    writer.add_quantization_version(2)
    writer.add_context_length(int(cfg.max_position_embeddings or 2048))
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim != cfg.hidden_size // cfg.num_heads:
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.rope_scaling is not None:
        scaling = dict(cfg.rope_scaling)
        if scaling["rope_type"] == "linear":
            from gguf import RopeScalingType

            writer.add_rope_scaling_type(RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(scaling["factor"]))
        writer.add_string("jlora.rope_scaling", json.dumps(scaling, sort_keys=True))


def _add_tokenizer_keys(writer: Any, vocab: dict[str, Any], *, vocab_size: int) -> None:
    """The ``tokenizer.ggml.*`` metadata and the chat template."""
    # A model with more rows than tokens gets padding entries (llama.cpp wants one token per
    # embedding row).
    tokens, types = list(vocab["tokens"]), list(vocab["token_type"])
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(vocab["merges"])
    if vocab["bos"] is not None:
        writer.add_bos_token_id(int(vocab["bos"]))
    if vocab["eos"] is not None:
        writer.add_eos_token_id(int(vocab["eos"]))
    if vocab["pad"] is not None:
        writer.add_pad_token_id(int(vocab["pad"]))
    writer.add_add_bos_token(vocab["add_bos"])
    writer.add_add_eos_token(vocab["add_eos"])
    if vocab["chat_template"]:
        writer.add_chat_template(vocab["chat_template"])


def _write_tensors(
    writer: Any, plan: list[tuple[str, Callable[[], np.ndarray], tuple[int, ...]]], *, dtype: str
) -> None:
    """Announce every tensor, write header, metadata and tensor infos, then each tensor's data."""
    layouts = []
    for tname, _, shape in plan:
        layout = _byte_layout(tuple(shape), tname, dtype)
        if tname == "rope_freqs.weight":
            layout = (tuple(shape), np.float32, None, 4 * math.prod(shape))
        layouts.append(layout)
        stored, np_dtype, raw, nbytes = layout
        writer.add_tensor_info(tname, stored, np.dtype(np_dtype), nbytes, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for (tname, make, shape), (stored, np_dtype, raw, nbytes) in zip(plan, layouts):
        x = make()
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"{tname}: shape {x.shape}, expected {shape}.")
        data, _ = _encode(x, tname, dtype) if tname != "rope_freqs.weight" else (x, None)
        del x
        if data.nbytes != nbytes:
            raise AssertionError(f"{tname}: {data.nbytes} bytes, announced {nbytes}.")
        writer.write_tensor_data(np.ascontiguousarray(data))


def save_gguf(
    path: PathLike,
    params: Any,
    config: LlamaConfig,
    tokenizer: Any,
    *,
    dtype: str = "f16",
    name: str = "jlora",
    overwrite: bool = False,
) -> Path:
    """Write plain Llama params and a tokenizer as a llama.cpp GGUF file.

    Args:
        path: The ``.gguf`` file to write.
        params: Plain params of :class:`~jlora.models.llama.Llama` (unrolled or scanned; quantized
            kernels are dequantized). LoRA params are refused: pass ``jlora.merge(params)``.
        config: The model's config. q/k/v biases (Qwen2) are refused: llama.cpp's 'qwen2'
            architecture is not written. A sliding window is not stored (llama.cpp's 'llama'
            architecture has none), with a warning.
        tokenizer: A GGUF :class:`~jlora.models.tokenizer.Tokenizer` or an
            :class:`~jlora.models.tokenizer.HFTokenizer` of a byte-level BPE.
        dtype: ``'f16'``, ``'bf16'`` or ``'q8_0'`` for the matrices (norms stay F32).
        name: ``general.name``.
        overwrite: Replace an existing file.

    Returns:
        The path written.

    Raises:
        NotImplementedError: q/k/v biases, or a tokenizer that is not byte-level BPE.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    from gguf import GGUFWriter

    _check_options(config, dtype=dtype)
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"save_gguf: {target} is a directory; pass the path of the .gguf file to write.")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it.")
    vocab = gguf_vocab(tokenizer)
    if len(vocab["tokens"]) > config.vocab_size:
        raise ValueError(f"The tokenizer has {len(vocab['tokens'])} tokens, the model {config.vocab_size}.")
    plan = _plan(params, config)

    def write(tmp: Path) -> None:
        writer = GGUFWriter(str(tmp), "llama")
        try:
            _add_model_keys(writer, config, dtype=dtype, name=name)
            _add_tokenizer_keys(writer, vocab, vocab_size=config.vocab_size)
            _write_tensors(writer, plan, dtype=dtype)
            writer.flush()
        finally:
            writer.close()

    return write_file(target, write)  # fsynced, renamed onto `target`; an error leaves it as it was
