"""Hugging Face checkpoints in and out of :mod:`jlora.models.llama`.

:func:`from_pretrained` reads a local Hugging Face folder of the Llama family (``config.json``,
``*.safetensors`` with ``model.safetensors.index.json`` when sharded, ``tokenizer.json`` and
``tokenizer_config.json``) into a :class:`~jlora.models.llama.LlamaConfig`, Flax params and a
:class:`~jlora.models.tokenizer.HFTokenizer`. :func:`save_pretrained` writes params back as such a
folder, which ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

Supported architectures (``config.json``'s ``architectures``): ``LlamaForCausalLM`` (Llama 2/3,
SmolLM, TinyLlama, ...; RoPE scaling ``linear`` and ``llama3``), ``MistralForCausalLM``
(``sliding_window`` becomes :attr:`LlamaConfig.sliding_window`) and ``Qwen2ForCausalLM``
(q/k/v biases; full attention only). Only safetensors and JSON are read, never a pickle.

Memory: the weights stream one tensor at a time (``safetensors.safe_open``: each tensor is read,
converted and placed before the next one is read), so at most one tensor is ever held in float32
on the host. With ``scan_layers=True`` a kernel kind is stacked into one host buffer of the target
dtype as its layers come (peak host memory: one stack, e.g. every layer's ``gate_proj``). With
``quantize=`` each projection is quantized as it is read (NF4 or int8), and stacks are built from
the quantized layers. With ``mesh=`` each array goes straight into its ``NamedSharding``.

Example (a tiny random model written with :func:`save_pretrained` and read back):

    >>> import tempfile, jax, jax.numpy as jnp
    >>> from jlora.models.llama import Llama, LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2,
    ...                   num_heads=2, num_kv_heads=1, head_dim=8)
    >>> shapes = jax.eval_shape(Llama(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    >>> params = jax.tree.map(lambda s: jnp.linspace(-1, 1, s.size).reshape(s.shape), shapes)
    >>> folder = tempfile.mkdtemp() + "/tiny"
    >>> _ = save_pretrained(folder, params, cfg)
    >>> cfg2, params2, tok = from_pretrained(folder, dtype=jnp.float32)
    >>> cfg2 == cfg, tok is None
    (True, True)
    >>> bool(jnp.array_equal(params2["params"]["layers_1"]["mlp"]["up_proj"]["kernel"],
    ...                      params["params"]["layers_1"]["mlp"]["up_proj"]["kernel"]))
    True
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jlora._atomic import atomic_directory, disk_full_is_clear, text_writer, write_file, write_files
from jlora.models.llama import LlamaConfig

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "from_pretrained",
    "save_pretrained",
    "config_from_hf",
    "config_to_hf",
    "fsdp_rule",
    "write_safetensors",
]

PathLike = Union[str, "os.PathLike[str]"]
Partition = Union[None, str, Callable[[str, tuple], Any]]

#: ``config.json`` architectures that :func:`from_pretrained` reads, with their ``model_type``.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}

_PROJ_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_PROJ_MLP = ("gate_proj", "up_proj", "down_proj")
_QUANT_METHODS = ("nf4", "int8")


# ----------------------------------------------------------------------------------------------
# config.json <-> LlamaConfig


def _unsupported(what: str) -> NotImplementedError:
    return NotImplementedError(
        f"{what}. jlora.models.llama reads {sorted(SUPPORTED_ARCHITECTURES)} checkpoints "
        f"(Llama 2/3 incl. RoPE scaling 'linear'/'llama3', Mistral, Qwen2, SmolLM)."
    )


def _rope(hf: Mapping[str, Any]) -> tuple[float, Optional[dict]]:
    """``(rope_theta, rope_scaling or None)`` from transformers 5's ``rope_parameters`` or the
    older ``rope_theta`` + ``rope_scaling`` keys."""
    params = hf.get("rope_parameters")
    if isinstance(params, Mapping) and "full_attention" in params:  # per layer type
        params = params["full_attention"]
    if isinstance(params, Mapping):
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = dict(params)
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = dict(hf.get("rope_scaling") or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if float(scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise _unsupported("Partial RoPE (partial_rotary_factor != 1) is not implemented")
    if kind in (None, "default"):
        return float(theta), None
    if kind not in ("linear", "llama3"):
        raise _unsupported(f"RoPE scaling {kind!r} is not implemented (only 'linear' and 'llama3')")
    if kind == "llama3" and "original_max_position_embeddings" not in scaling:
        scaling["original_max_position_embeddings"] = hf.get("max_position_embeddings")
    scaling["rope_type"] = kind
    return float(theta), scaling


def config_from_hf(
    hf: Mapping[str, Any], *, dtype: Any = jnp.bfloat16, scan_layers: bool = False
) -> LlamaConfig:
    """A :class:`LlamaConfig` from a transformers ``config.json`` dict.

    Raises:
        NotImplementedError: An architecture or a feature jlora's Llama does not have (the message
            names it and what is supported): another ``architectures``/``model_type``, an
            activation other than SiLU, MLP biases, a bias on ``o_proj``, RoPE scaling other than
            ``linear``/``llama3``, partial RoPE, per-layer sliding windows (Qwen2), a
            ``quantization_config`` (GPTQ, AWQ, bitsandbytes files).
    """
    archs = list(hf.get("architectures") or [])
    model_type = hf.get("model_type")
    known = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
    if archs and not known:
        raise _unsupported(f"This checkpoint's architecture is {archs} (model_type {model_type!r})")
    if model_type not in SUPPORTED_ARCHITECTURES.values():
        raise _unsupported(f"This checkpoint's model_type is {model_type!r} (architectures {archs})")
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        raise _unsupported(
            f"A pre-quantized checkpoint ({method}) is not read; load the float weights and pass "
            f"quantize='nf4' or 'int8'"
        )
    act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if act not in ("silu", "swish"):
        raise _unsupported(f"Activation {act!r} is not implemented (SwiGLU with silu only)")
    if hf.get("mlp_bias"):
        raise _unsupported("MLP biases (mlp_bias=true) are not implemented")
    if model_type != "qwen2" and hf.get("attention_bias"):
        raise _unsupported("attention_bias=true (biases on q/k/v and o_proj) is not implemented")
    sliding = None
    if model_type == "mistral":
        sliding = hf.get("sliding_window")
    elif model_type == "qwen2":
        types = hf.get("layer_types") or []
        if hf.get("use_sliding_window") or "sliding_attention" in types:
            raise _unsupported(
                "Qwen2 with use_sliding_window=true (sliding attention in some layers) is not "
                "implemented"
            )
    theta, scaling = _rope(hf)
    hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    default_tie = False  # LlamaConfig, MistralConfig and Qwen2Config all default to untied
    return LlamaConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        rope_theta=theta,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", default_tie)),
        dtype=dtype,
        param_dtype=dtype,
        scan_layers=scan_layers,
        qkv_bias=model_type == "qwen2",
        rope_scaling=scaling,
        sliding_window=None if sliding is None else int(sliding),
        max_position_embeddings=hf.get("max_position_embeddings"),
    )


def _dtype_name(dtype: Any) -> str:
    return {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}.get(
        np.dtype(dtype).name, "float32"
    )


def architecture(config: LlamaConfig) -> str:
    """The transformers class a config is written as: ``Qwen2ForCausalLM`` with q/k/v biases,
    ``MistralForCausalLM`` with a sliding window, else ``LlamaForCausalLM``."""
    if config.qkv_bias:
        if config.sliding_window is not None:
            raise NotImplementedError("q/k/v biases and a sliding window together: no such HF class.")
        return "Qwen2ForCausalLM"
    return "MistralForCausalLM" if config.sliding_window is not None else "LlamaForCausalLM"


def config_to_hf(
    config: LlamaConfig, *, dtype: Any = None, tokenizer: Any = None
) -> dict[str, Any]:
    """The ``config.json`` dict of :func:`save_pretrained` (loads in transformers 4.5x and 5.x:
    RoPE is written with the ``rope_theta``/``rope_scaling`` keys both read)."""
    arch = architecture(config)
    model_type = SUPPORTED_ARCHITECTURES[arch]
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": _dtype_name(dtype if dtype is not None else config.param_dtype),
    }
    if config.max_position_embeddings is not None:
        out["max_position_embeddings"] = config.max_position_embeddings
    if config.rope_scaling is not None:
        scaling = dict(config.rope_scaling)
        out["rope_scaling"] = {**scaling, "type": scaling["rope_type"]}
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif model_type == "mistral":
        out["sliding_window"] = config.sliding_window
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_layers)
    if tokenizer is not None:
        for key, i in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id),
                       ("pad_token_id", tokenizer.pad_id)):
            if i is not None:
                out[key] = int(i)
    return out


# ----------------------------------------------------------------------------------------------
# The tensors of a checkpoint, by name.


class _Tensor(NamedTuple):
    """One transformers tensor and where it goes in jlora's unrolled params."""

    hf: str  # transformers name, e.g. model.layers.3.self_attn.q_proj.weight
    path: tuple[str, ...]  # jlora path inside {'params': ...}, unrolled layout
    torch_shape: tuple[int, ...]
    transpose: bool  # a linear weight: torch (out, in) <-> Flax kernel (in, out)
    layer: Optional[int]  # None outside the decoder layers
    kind: tuple[str, ...]  # path inside a layer (or the full path outside)


def tensor_plan(cfg: LlamaConfig) -> list[_Tensor]:
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out = [_Tensor("model.embed_tokens.weight", ("embed_tokens", "embedding"), (cfg.vocab_size, d),
                   False, None, ("embed_tokens", "embedding"))]
    linear = {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
              "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            kind = (norm, "scale")
            out.append(_Tensor(pre + norm + ".weight", (f"layers_{i}", *kind), (d,), False, i, kind))
        for name, shape in linear.items():
            module = "self_attn" if name in _PROJ_ATTN else "mlp"
            kind = (module, name, "kernel")
            out.append(_Tensor(f"{pre}{module}.{name}.weight", (f"layers_{i}", *kind), shape, True, i, kind))
            if cfg.qkv_bias and name in ("q_proj", "k_proj", "v_proj"):
                kind = (module, name, "bias")
                out.append(_Tensor(f"{pre}{module}.{name}.bias", (f"layers_{i}", *kind), shape[:1], False, i, kind))
    out.append(_Tensor("model.norm.weight", ("norm", "scale"), (d,), False, None, ("norm", "scale")))
    if not cfg.tie_embeddings:
        out.append(_Tensor("lm_head.weight", ("lm_head", "kernel"), (cfg.vocab_size, d), True, None,
                           ("lm_head", "kernel")))
    return out


_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


_MIN_QUANT_SIZE = 4096  # jlora.quantize's min_size: smaller kernels stay dense


def _is_projection(t: _Tensor) -> bool:
    """A kernel that ``quantize=`` quantizes: a layer's projection of at least 4096 values."""
    return t.layer is not None and t.kind[-1] == "kernel" and math.prod(t.torch_shape) >= _MIN_QUANT_SIZE


# ----------------------------------------------------------------------------------------------
# Placement on a mesh.


def fsdp_rule(mesh: Any, axes: Any = None) -> Callable[[str, tuple], Any]:
    """A partition rule for :func:`from_pretrained`: FSDP over ``axes`` (default: the mesh axis
    named ``'fsdp'``, else every mesh axis).

    Each array of 2 or more axes is split along its first axis, after any stacked-layer axis,
    whose size the devices of ``axes`` divide (a kernel's input axis, an embedding's vocabulary
    axis); 1-D arrays (norms, biases) and arrays with no divisible axis are replicated.

    Example:
        >>> import jax
        >>> mesh = jax.make_mesh((1,), ("fsdp",))   # 1 device here; the rule is the same on 8
        >>> rule = fsdp_rule(mesh)
        >>> tuple(rule("params/layers_0/mlp/up_proj/kernel", (64, 128)))
        ('fsdp', None)
        >>> tuple(rule("params/layers/mlp/up_proj/kernel", (2, 64, 128))), tuple(rule("params/norm/scale", (64,)))
        ((None, 'fsdp', None), ())
    """
    from jax.sharding import PartitionSpec

    if axes is None:
        axes = "fsdp" if "fsdp" in mesh.axis_names else tuple(mesh.axis_names)
    names = axes if isinstance(axes, tuple) else (axes,)
    size = math.prod(mesh.shape[a] for a in names)
    entry = axes if not isinstance(axes, tuple) or len(axes) > 1 else axes[0]

    def rule(path: str, shape: tuple) -> Any:
        first = 1 if "/layers/" in f"/{path}/" else 0  # a scanned stack's layer axis
        if len(shape) - first < 2:
            return PartitionSpec()
        for ax in range(first, len(shape)):
            if shape[ax] % size == 0:
                return PartitionSpec(*([None] * ax), entry, *([None] * (len(shape) - ax - 1)))
        return PartitionSpec()

    return rule


class _Placer:
    """Puts each array on the device(s) it belongs on, as soon as it exists."""

    def __init__(self, mesh: Any, partition: Partition):
        self.mesh = mesh
        if mesh is None:
            if partition not in (None, "fsdp"):
                raise ValueError("partition= needs a mesh=.")
            self.rule = None
        elif partition in (None, "fsdp"):
            self.rule = fsdp_rule(mesh)
        elif partition == "replicated":
            self.rule = lambda path, shape: jax.sharding.PartitionSpec()
        elif callable(partition):
            self.rule = partition
        else:
            raise ValueError(
                f"partition must be 'fsdp', 'replicated' or a callable (path, shape) -> "
                f"PartitionSpec; got {partition!r}."
            )

    def spec(self, path: str, shape: tuple) -> Any:
        spec = self.rule(path, tuple(shape))
        if spec is None:
            spec = jax.sharding.PartitionSpec()
        if not isinstance(spec, jax.sharding.PartitionSpec):
            raise TypeError(f"partition({path!r}, {shape}) returned {spec!r}, not a PartitionSpec.")
        return spec

    def __call__(self, path: str, x: Any) -> jax.Array:
        if self.mesh is None:
            return jax.device_put(x)
        from jax.sharding import NamedSharding

        return jax.device_put(x, NamedSharding(self.mesh, self.spec(path, x.shape)))

    def quantized(self, path: str, node: Any) -> Any:
        """A quantized kernel's children placed like the kernel: stack axes as the kernel's
        spec says, the next (flattened) axis over the mesh axes the kernel's other axes use, when
        they divide it; replicated otherwise."""
        if self.mesh is None:
            return node
        from jax.sharding import NamedSharding, PartitionSpec

        spec = list(self.spec(path, node.shape)) + [None] * len(node.shape)
        nstack = len(node.stack_shape)
        used = [e for e in spec[nstack : len(node.shape)] if e is not None]
        flat_axes = tuple(a for e in used for a in (e if isinstance(e, tuple) else (e,)))
        size = math.prod(self.mesh.shape[a] for a in flat_axes) if flat_axes else 1

        def place(child: jax.Array) -> jax.Array:
            entries = list(spec[:nstack])
            if child.ndim > nstack:
                ok = flat_axes and child.shape[nstack] % size == 0
                entries.append((flat_axes if len(flat_axes) > 1 else flat_axes[0]) if ok else None)
            return jax.device_put(child, NamedSharding(self.mesh, PartitionSpec(*entries)))

        return jax.tree.map(place, node)


# ----------------------------------------------------------------------------------------------
# Reading.


def _weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index or the single file."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / "model.safetensors"
    files = [single] if single.is_file() else sorted(directory.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt*"))
        hint = (f" It holds {pickles[:3]}: PyTorch pickles, which jlora never unpickles; convert "
                f"them to safetensors first.") if pickles else ""
        raise FileNotFoundError(f"No *.safetensors weights in {directory}.{hint}")
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="numpy") as f:
            for name in f.keys():
                out[name] = file
    return out


def _strip_prefix(names: Sequence[str]) -> dict[str, str]:
    """Canonical name -> name in the file (a bare ``LlamaModel`` checkpoint lacks ``model.``)."""
    out = {}
    for name in names:
        canon = name
        if not name.startswith(("model.", "lm_head.")):
            canon = "model." + name
        out[canon] = name
    return out


def _host(x: np.ndarray, t: _Tensor, np_dtype: np.dtype) -> np.ndarray:
    """The tensor in jlora's layout and the target dtype, as a C-contiguous host array."""
    if tuple(x.shape) != t.torch_shape:
        raise ValueError(f"{t.hf} has shape {tuple(x.shape)}, the config says {t.torch_shape}.")
    if x.dtype != np_dtype:
        if x.dtype.name not in _ST_DTYPES:
            raise ValueError(f"{t.hf} has dtype {x.dtype}, not a floating dtype.")
        x = x.astype(np_dtype)  # one tensor in flight at a time
    return np.ascontiguousarray(x.T) if t.transpose else np.ascontiguousarray(x)


def _quantizer(method: Optional[str], dtype: Any) -> Optional[Callable[[jax.Array], Any]]:
    if method is None:
        return None
    from jlora._quant import Int8Tensor, NF4Tensor

    if method == "nf4":
        return lambda x: NF4Tensor.from_array(x, block_size=64, double_quant=True, dtype=dtype)
    if method == "int8":
        return lambda x: Int8Tensor.from_array(x, block_size=64, dtype=dtype)
    raise ValueError(f"quantize must be None, 'nf4' or 'int8'; got {method!r}.")


def _set(tree: dict, path: Sequence[str], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _read_config(directory: Path, *, dtype: Any, scan_layers: bool) -> LlamaConfig:
    """The folder's ``config.json`` as a :class:`LlamaConfig` (FileNotFoundError without one)."""
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory / 'config.json'} not found: not a Hugging Face model folder.")
    hf = json.loads((directory / "config.json").read_text())
    return config_from_hf(hf, dtype=dtype, scan_layers=scan_layers)


def _match_tensors(directory: Path, in_file: Mapping[str, str], cfg: LlamaConfig) -> list[_Tensor]:
    """The tensors ``cfg`` needs, checked against the files': none missing, none left over."""
    wanted = tensor_plan(cfg)
    names = {t.hf for t in wanted}
    missing = [t.hf for t in wanted if t.hf not in in_file]
    if missing:
        raise ValueError(f"{directory}: {len(missing)} tensors missing, first {missing[:3]}.")
    tied_head = cfg.tie_embeddings and "lm_head.weight" in in_file
    extra = sorted(n for n in in_file if n not in names and not _IGNORED.search(n)
                   and not (tied_head and n == "lm_head.weight"))
    if extra:
        raise ValueError(
            f"{directory}: {len(extra)} tensors jlora's Llama has no place for, first {extra[:3]} "
            f"(biases, MoE experts or another architecture?)."
        )
    return wanted


@contextlib.contextmanager
def _tensor_reader(
    files: Mapping[str, Path], in_file: Mapping[str, str], *, np_dtype: np.dtype
) -> Iterator[Callable[[_Tensor], np.ndarray]]:
    """``read(t)``: one tensor on the host in jlora's layout; each file opened once, closed at exit."""
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def read(t: _Tensor) -> np.ndarray:
            file = files[in_file[t.hf]]
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(str(file), framework="numpy"))
            return _host(handles[file].get_slice(in_file[t.hf])[:], t, np_dtype)

        yield read


def _param_path(p: Sequence[str]) -> str:
    """A params path as partition rules see it: ``'params/layers_0/self_attn/q_proj/kernel'``."""
    return "/".join(("params", *p))


def _read_unrolled(
    wanted: Sequence[_Tensor],
    read: Callable[[_Tensor], np.ndarray],
    *,
    place: _Placer,
    quant: Optional[Callable[[jax.Array], Any]],
) -> dict:
    """Unrolled params (``layers_N``), each tensor read, quantized if asked and placed in turn."""
    params: dict = {}
    for t in wanted:
        x = read(t)
        if quant is not None and _is_projection(t):
            _set(params, t.path, place.quantized(_param_path(t.path), quant(jnp.asarray(x))))
        else:
            _set(params, t.path, place(_param_path(t.path), x))
        del x
    return params


def _read_stack(
    ts: Sequence[_Tensor],
    read: Callable[[_Tensor], np.ndarray],
    *,
    place: _Placer,
    quant: Optional[Callable[[jax.Array], Any]],
    np_dtype: np.dtype,
) -> Any:
    """One kernel kind of every layer as a placed stack (a quantized node when quantized)."""
    p = ("layers", *ts[0].kind)
    if quant is not None and _is_projection(ts[0]):
        nodes = [quant(jnp.asarray(read(t))) for t in ts]
        node = jax.tree.map(lambda *xs: jnp.stack(xs), *nodes)
        del nodes
        return place.quantized(_param_path(p), node)
    first = read(ts[0])
    buf = np.empty((len(ts), *first.shape), np_dtype)
    buf[0] = first
    del first
    for t in ts[1:]:
        buf[t.layer] = read(t)
    return place(_param_path(p), buf)


def _read_scanned(
    wanted: Sequence[_Tensor],
    read: Callable[[_Tensor], np.ndarray],
    *,
    place: _Placer,
    quant: Optional[Callable[[jax.Array], Any]],
    np_dtype: np.dtype,
) -> dict:
    """Scanned params: tensors outside the layers as read, each kernel kind stacked under ``layers``."""
    params: dict = {}
    by_kind: dict[tuple[str, ...], list[_Tensor]] = {}
    for t in wanted:
        if t.layer is None:
            _set(params, t.path, place(_param_path(t.path), read(t)))
        else:
            by_kind.setdefault(t.kind, []).append(t)
    for kind, ts in by_kind.items():
        ts = sorted(ts, key=lambda t: t.layer)
        _set(params, ("layers", *kind), _read_stack(ts, read, place=place, quant=quant, np_dtype=np_dtype))
    return params


def from_pretrained(
    path: PathLike,
    *,
    dtype: Any = jnp.bfloat16,
    scan_layers: bool = False,
    quantize: Optional[str] = None,
    mesh: Any = None,
    partition: Partition = "fsdp",
    tokenizer: bool = True,
) -> tuple[LlamaConfig, dict, Any]:
    """Read a local Hugging Face folder of the Llama family into jlora's Llama.

    Args:
        path: The folder: ``config.json``, ``model.safetensors`` (or shards with
            ``model.safetensors.index.json``), and optionally ``tokenizer.json`` /
            ``tokenizer_config.json`` / ``chat_template.jinja``.
        dtype: Dtype of the params and of the config's compute dtype (bfloat16 by default; the
            file's dtype does not matter, each tensor is converted as it is read).
        scan_layers: Return the stacked layout for ``LlamaConfig(scan_layers=True)``.
        quantize: ``'nf4'`` (QLoRA: :class:`~jlora.NF4Tensor`, block 64, double quantization) or
            ``'int8'`` (:class:`~jlora.Int8Tensor`, block 64): the seven projections of every
            layer are quantized as they are read (from ``dtype``), exactly as
            ``jlora.quantize(params, method=..., targets=<the projections>)`` would (projections
            of fewer than 4096 values per layer stay dense, like its ``min_size``); embeddings,
            norms, biases and ``lm_head`` stay dense.
        mesh: A ``jax.sharding.Mesh``: every array is placed into ``NamedSharding(mesh, spec)`` as
            it is read, ``spec`` from ``partition``.
        partition: With a mesh: ``'fsdp'`` (:func:`fsdp_rule`), ``'replicated'``, or a callable
            ``(path, shape) -> PartitionSpec`` (``path`` as jlora writes it,
            ``'params/layers_0/self_attn/q_proj/kernel'``; ``shape`` the Flax shape, stacked when
            ``scan_layers``). A quantized kernel's children follow its spec (see
            :class:`_Placer.quantized`).
        tokenizer: Read the tokenizer too (``None`` is returned when the folder has none).

    Returns:
        ``(config, {'params': ...}, tokenizer)``, like :func:`~jlora.models.gguf.load_gguf`.

    Raises:
        NotImplementedError: An unsupported architecture or feature (named, with what is
            supported).
        FileNotFoundError: No ``config.json`` or no safetensors weights (pickles are refused).
        ValueError: A tensor missing, unexpected, or of the wrong shape.
    """
    directory = Path(path)
    cfg = _read_config(directory, dtype=dtype, scan_layers=scan_layers)
    np_dtype = np.dtype(dtype)
    files = _weight_files(directory)
    in_file = _strip_prefix(list(files))
    wanted = _match_tensors(directory, in_file, cfg)
    place = _Placer(mesh, partition)
    quant = _quantizer(quantize, dtype)
    with _tensor_reader(files, in_file, np_dtype=np_dtype) as read:
        if scan_layers:
            params = _read_scanned(wanted, read, place=place, quant=quant, np_dtype=np_dtype)
        else:
            params = _read_unrolled(wanted, read, place=place, quant=quant)

    tok = None
    if tokenizer and (directory / "tokenizer.json").is_file():
        from jlora.models.tokenizer import HFTokenizer

        tok = HFTokenizer.from_pretrained(directory)
    return cfg, {"params": params}, tok


# ----------------------------------------------------------------------------------------------
# Writing.

_ST_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64"}


def write_safetensors(
    file: PathLike,
    entries: Sequence[tuple[str, tuple[int, ...], Any, Callable[[], np.ndarray]]],
    metadata: Optional[Mapping[str, str]] = None,
) -> int:
    """Write a safetensors file one tensor at a time, crash-safely.

    The header (names, dtypes, shapes, offsets) is computed from ``entries`` first, then each
    ``make()`` is called and its bytes written before the next is made, so only one tensor is in
    memory at a time (``safetensors.numpy.save_file`` needs all of them at once). The bytes go to
    a hidden temporary file beside ``file``, renamed onto it once complete: if a ``make()`` raises
    (or the process is killed), an existing ``file`` is left as it was.

    Args:
        file: The file to write.
        entries: ``(name, shape, dtype, make)``; ``make()`` returns a C-contiguous array of that
            shape and dtype (bfloat16, float16, float32 or float64).
        metadata: The header's ``__metadata__`` (``{'format': 'pt'}`` by default, which
            transformers requires).

    Returns:
        The number of tensor bytes written.

    Example:
        >>> import tempfile, numpy as np
        >>> from safetensors.numpy import load_file
        >>> f = tempfile.mkdtemp() + "/x.safetensors"
        >>> write_safetensors(f, [("a", (2, 3), np.float32, lambda: np.ones((2, 3), np.float32))])
        24
        >>> load_file(f)["a"].sum()
        np.float32(6.0)
    """
    write, nbytes = _safetensors_writer(entries, metadata)
    write_file(file, write)  # flushed and fsynced there
    return nbytes


def _safetensors_writer(entries, metadata=None) -> tuple[Writer, int]:
    """The function that writes a safetensors file of ``entries`` to a path (plainly: the caller
    makes it crash-safe), and its tensor bytes, known before anything is made."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype, _ in entries:
        dt = np.dtype(dtype)
        if dt.name not in _ST_DTYPES:
            raise ValueError(f"{name}: dtype {dt} is not written (bfloat16, float16, float32, float64).")
        size = math.prod(shape) * dt.itemsize
        header[name] = {"dtype": _ST_DTYPES[dt.name], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    def write(path: Path) -> None:
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, shape, dtype, make in entries:
                x = make()
                if tuple(x.shape) != tuple(shape) or x.dtype != np.dtype(dtype):
                    raise ValueError(f"{name}: made {x.shape} {x.dtype}, announced {tuple(shape)} {np.dtype(dtype)}.")
                f.write(memoryview(np.ascontiguousarray(x).reshape(-1).view(np.uint8)))
                del x

    return write, offset


def size_bytes(size: Union[int, str]) -> int:
    """``'5GB'`` -> 5·10⁹, ``'500MiB'`` -> 500·2²⁰, an int as is (transformers' convention)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size: {size!r} is not a size like '5GB' or '500MiB'.")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "_KMGT".index(m.group(2) or "_"))


def _inner(params: Mapping[str, Any]) -> Mapping[str, Any]:
    if "params" in params and len(params) == 1 and isinstance(params["params"], Mapping):
        return params["params"]
    return params


def check_plain(params: Any) -> None:
    from jlora._bank import LoraBank
    from jlora._node import LoraKernel, Trainable
    from jlora._paths import path_str
    from jlora._tree import is_jlora_leaf

    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_jlora_leaf)
    for kp, x in flat:
        if isinstance(x, LoraBank):
            raise ValueError(
                f"save_pretrained takes plain params, and {path_str(kp)!r} holds an adapter bank: merge one "
                f"adapter first: save_pretrained(dir, jlora.merge(jlora.select_adapter(params, name)), config).")
        if isinstance(x, (LoraKernel, Trainable)):
            raise ValueError(
                f"save_pretrained takes plain params, and {path_str(kp)!r} is a "
                f"{type(x).__name__} (LoRA adapters or a leaf trained in full). Fold them in first: "
                f"save_pretrained(dir, jlora.merge(params), config)."
            )


def _getter(inner: Mapping[str, Any], t: _Tensor, scanned: bool) -> Any:
    """The array (or quantized node) of ``t`` in unrolled or scanned params."""
    node: Any = inner
    keys = ("layers", *t.kind) if scanned and t.layer is not None else t.path
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            raise ValueError(f"params have no {'/'.join(keys)!r} (needed for {t.hf}).")
        node = node[key]
    if scanned and t.layer is not None:
        return jax.tree.map(lambda x: x[t.layer], node)
    return node


def _torch_array(x: Any, t: _Tensor, np_dtype: Optional[np.dtype]) -> np.ndarray:
    from jlora._quant import is_quantized

    if is_quantized(x):
        x = x.dequantize()
    x = np.asarray(jax.device_get(x))
    if np_dtype is not None and x.dtype != np_dtype:
        x = x.astype(np_dtype)
    if t.transpose:
        x = x.T
    return np.ascontiguousarray(x)


def _leaf_dtype(x: Any) -> np.dtype:
    return np.dtype(x.dtype)


_WEIGHT_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")


_Entry = tuple[_Tensor, tuple[int, ...], np.dtype]  # (tensor, torch shape, written dtype)


def _entries(
    inner: Mapping[str, Any], config: LlamaConfig, *, scanned: bool, np_dtype: Optional[np.dtype]
) -> list[_Entry]:
    """Every tensor to write with its torch shape (checked against the config) and dtype."""
    plan = []
    for t in tensor_plan(config):
        x = _getter(inner, t, scanned)
        shape = tuple(x.shape)[::-1] if t.transpose else tuple(x.shape)
        if shape != t.torch_shape:
            raise ValueError(f"{'/'.join(t.path)} has shape {tuple(x.shape)}, the config needs "
                             f"{t.torch_shape[::-1] if t.transpose else t.torch_shape}.")
        dt = np_dtype if np_dtype is not None else _leaf_dtype(x)
        plan.append((t, shape, dt))
    return plan


def _as_hf_tokenizer(tokenizer: Any) -> Any:
    """An :class:`HFTokenizer` (a GGUF Tokenizer converted) or ``None``; a TypeError otherwise."""
    from jlora.models.tokenizer import HFTokenizer, Tokenizer

    if tokenizer is not None and isinstance(tokenizer, Tokenizer):
        tokenizer = HFTokenizer.from_tokenizer(tokenizer)
    if tokenizer is not None and not isinstance(tokenizer, HFTokenizer):
        raise TypeError(f"tokenizer must be a jlora HFTokenizer or GGUF Tokenizer, got {type(tokenizer).__name__}.")
    return tokenizer


def _shards(plan: Sequence[_Entry], *, limit: int) -> list[list[_Entry]]:
    """``plan`` cut in order into shards of at most ``limit`` bytes (a larger tensor alone)."""
    shards: list[list] = [[]]
    used = 0
    for entry in plan:
        size = math.prod(entry[1]) * entry[2].itemsize
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(entry)
        used += size
    return shards


Writer = Callable[[Path], Any]


def _weight_writers(
    shards: Sequence[Sequence[_Entry]], inner: Mapping[str, Any], *, scanned: bool
) -> dict[str, Writer]:
    """The safetensors file(s), plus ``model.safetensors.index.json`` when sharded."""
    out: dict[str, Writer] = {}
    weight_map, total = {}, 0
    n = len(shards)
    for k, shard in enumerate(shards, 1):
        name = "model.safetensors" if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
        entries = [
            (t.hf, shape, dt, lambda t=t, dt=dt: _torch_array(_getter(inner, t, scanned), t, dt))
            for t, shape, dt in shard
        ]
        # a plain writer: the folder's own transaction (atomic_directory / write_files) makes it crash-safe
        out[name], nbytes = _safetensors_writer(entries)
        weight_map.update({t.hf: name for t, _, _ in shard})
        total += nbytes
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        out["model.safetensors.index.json"] = text_writer(json.dumps(index, indent=2) + "\n")
    return out


def _config_writers(config: LlamaConfig, *, dtype: np.dtype, tokenizer: Any) -> dict[str, Writer]:
    """``config.json``, ``generation_config.json`` and the tokenizer's files."""
    hf_config = config_to_hf(config, dtype=dtype, tokenizer=tokenizer)
    generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf_config}
    out = {"generation_config.json": text_writer(json.dumps(generation, indent=2) + "\n")}
    if tokenizer is not None:
        out.update({name: text_writer(text) for name, text in tokenizer.files().items()})
    out["config.json"] = text_writer(json.dumps(hf_config, indent=2) + "\n")  # last: replaced after the rest
    return out


def _stale(target: Path, writers: Mapping[str, Writer], tokenizer: Any) -> list[str]:
    """Files of an earlier save in ``target`` that this one supersedes without writing them: weight
    files and index (transformers would read them), and with a tokenizer its superseded files (an
    old ``chat_template.jinja`` is preferred to ``tokenizer_config.json``'s template)."""
    owned = set(tokenizer.replaces) if tokenizer is not None else set()
    return sorted(
        p.name for p in target.iterdir()
        if p.name not in writers and p.is_file()
        and (_WEIGHT_FILE.match(p.name) or p.name == "model.safetensors.index.json" or p.name in owned)
    )


def save_pretrained(
    directory: PathLike,
    params: Any,
    config: LlamaConfig,
    tokenizer: Any = None,
    *,
    max_shard_size: Union[int, str] = "5GB",
    dtype: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write plain Llama params as a Hugging Face folder that transformers loads.

    Writes ``config.json`` (``LlamaForCausalLM``; ``Qwen2ForCausalLM`` when the config has q/k/v
    biases; ``MistralForCausalLM`` with a sliding window), ``generation_config.json``, the weights
    as ``model.safetensors`` or, past ``max_shard_size``, ``model-0000k-of-0000n.safetensors``
    with ``model.safetensors.index.json``, and with a ``tokenizer`` its ``tokenizer.json`` and
    ``tokenizer_config.json`` (chat template inside). A GGUF
    :class:`~jlora.models.tokenizer.Tokenizer` is converted to the same ``tokenizers``
    pipeline (``HFTokenizer.from_tokenizer``), which ``AutoTokenizer`` loads as a
    ``PreTrainedTokenizerFast``.

    Tensors are converted and written one at a time (a quantized kernel is dequantized when its
    turn comes). Everything is written into a hidden sibling folder first; that folder is renamed
    into place when ``directory`` does not exist or is empty. A non-empty ``directory`` is
    refused unless ``overwrite=True``; then each file is written to a hidden temporary file beside
    its old version and, once all are complete, renamed over it, in the same commit as the
    deletion of the files of an earlier save that this one supersedes without writing them (weight
    files and index, which transformers would read, and with a ``tokenizer`` an old
    ``chat_template.jinja`` or ``special_tokens_map.json``, which would override the new
    tokenizer's); if anything fails, every old file is put back. Every other file is left alone.
    A killed save leaves only hidden ``.*.jlora-tmp-<pid>-*`` entries, removed by the next save.

    Args:
        directory: The folder to write.
        params: Plain params of :class:`~jlora.models.llama.Llama` (``{'params': ...}`` or the
            inner dict; unrolled or scanned layout; quantized kernels allowed). LoRA params are
            refused: pass ``jlora.merge(params)``.
        config: The model's config.
        tokenizer: A :class:`~jlora.models.tokenizer.HFTokenizer` or GGUF
            :class:`~jlora.models.tokenizer.Tokenizer`, or ``None``.
        max_shard_size: Largest safetensors file (bytes, or ``'5GB'``/``'500MiB'``).
        dtype: Dtype of the written tensors (default: each array's own dtype).
        overwrite: Write into a non-empty ``directory``.

    Returns:
        ``directory`` as a :class:`~pathlib.Path`.
    """
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory.")
    nonempty = target.is_dir() and any(target.iterdir())
    if nonempty and not overwrite:
        raise FileExistsError(
            f"{target} is not empty; pass overwrite=True to replace the model files in it "
            f"(other files are left alone)."
        )
    check_plain(params)
    inner = _inner(params)
    scanned = "layers" in inner
    np_dtype = None if dtype is None else np.dtype(dtype)
    plan = _entries(inner, config, scanned=scanned, np_dtype=np_dtype)
    tokenizer = _as_hf_tokenizer(tokenizer)
    shards = _shards(plan, limit=size_bytes(max_shard_size))

    writers = {
        **_weight_writers(shards, inner, scanned=scanned),
        **_config_writers(config, dtype=plan[0][2], tokenizer=tokenizer),
    }
    if nonempty:
        with disk_full_is_clear(target, "the files there are unchanged."):
            write_files(target, writers, overwrite=True, what="save_pretrained",
                        remove=_stale(target, writers, tokenizer))
        return target
    # Absent or empty: the whole folder is written beside it and renamed into place.
    with atomic_directory(target, overwrite=False, replaceable=lambda _: False,
                          kind="Hugging Face model folder") as tmp:
        tmp.mkdir()
        for name, write in writers.items():
            write(tmp / name)
    return target
