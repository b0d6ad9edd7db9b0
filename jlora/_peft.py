"""Hugging Face PEFT interop: ``export_peft`` / ``import_peft``.

PEFT stores a LoRA adapter as two files in a directory:

* ``adapter_model.safetensors`` with, per adapted ``torch.nn.Linear`` named ``<module>``, the keys
  ``base_model.model.<module>.lora_A.weight`` of shape ``(r, in)`` and
  ``base_model.model.<module>.lora_B.weight`` of shape ``(out, r)``, so that
  ``ΔW_torch = (lora_alpha / r) · lora_B @ lora_A`` is added to the ``(out, in)`` torch weight
  (for a ``torch.nn.ConvNd``: ``lora_A`` ``(r, in, *kernel_size)``, ``lora_B`` ``(out, r, 1, ...)``);
* ``adapter_config.json`` (``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``target_modules``, ...).

jlora's A ``(in..., r)`` and B ``(r, out...)`` sit on the kernel's input and output axes, whatever
order the kernel stores them in (its :class:`~jlora.Layout`); kernels with several input or output
axes are flattened in the kernel's row-major order, a convolution's kernel (``Layout.conv``) is
written in torch's ``(out, in, *kernel_size)`` order, and a stacked (``nn.scan``) kernel becomes one
module per layer.

Which torch module a jlora path is comes from ``module_map``: a callable ``path -> name`` (None for
"not a torch module"), or a dict ``{regex: replacement}`` whose first fully matching regex wins
(``re.Match.expand``). A kernel with stack axes maps to a *template* with one ``{}`` field per
stack axis, filled with the layer index: ``"model.layers.{0}.self_attn.q_proj"``.
:data:`LLAMA_MODULE_MAP` covers :mod:`jlora.models.llama` in both layouts and is used when
``module_map`` is None.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import string
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jlora._quant import dequantized, shape_of
from jlora._version import __version__
from jlora._atomic import write_files
from jlora._discover import gather_layout, layout_from_uses
from jlora._trace import trace_uses
from jlora._bank import refuse_banks
from jlora._node import Layout, LoraKernel, Trainable, as_plain_lora, is_node
from jlora._paths import leaf_name, nearest, path_str
from jlora._sharding import place_factors, place_like, place_magnitude
from jlora._tree import Flat, host_array, is_jlora_leaf, plain

__all__ = ["LLAMA_MODULE_MAP", "ModuleMap", "export_peft", "import_peft"]

PathLike = Union[str, os.PathLike]
ModuleMap = Union[None, Callable[[str], Optional[str]], Mapping[str, str]]

_P = r"(?:params/)?"
#: ``jlora.models.llama`` paths (unrolled ``layers_<i>`` and scanned ``layers``) -> transformers'
#: ``LlamaForCausalLM`` module names.
LLAMA_MODULE_MAP: dict[str, str] = {
    _P + r"layers_(\d+)/(self_attn|mlp)/(\w+)/kernel": r"model.layers.\1.\2.\3",
    _P + r"layers/(self_attn|mlp)/(\w+)/kernel": r"model.layers.{0}.\1.\2",
    _P + r"layers_(\d+)/(input_layernorm|post_attention_layernorm)/scale": r"model.layers.\1.\2",
    _P + r"layers/(input_layernorm|post_attention_layernorm)/scale": r"model.layers.{0}.\1",
    _P + r"norm/scale": "model.norm",
    _P + r"embed_tokens/embedding": "model.embed_tokens",
    _P + r"lm_head/kernel": "lm_head",
}

# jlora leaf name -> (torch parameter name, transpose a 2-D kernel)
_PARAM_NAMES = {
    "kernel": ("weight", True),
    "scale": ("weight", False),
    "embedding": ("weight", False),
    "weight": ("weight", False),
    "bias": ("bias", False),
}
_DEFAULT = object()
_WEIGHTS = "adapter_model.safetensors"
_CONFIG = "adapter_config.json"


# ------------------------------------------------------------------------------------------------
# Module maps
# ------------------------------------------------------------------------------------------------
class _Resolver:
    def __init__(self, module_map: Union[Callable[[str], Optional[str]], Mapping[str, str]]):
        if isinstance(module_map, Mapping):
            try:
                self._rules = [(re.compile(k), v) for k, v in module_map.items()]
            except re.error as e:
                raise ValueError(f"module_map: invalid regular expression: {e}") from None
            self._fn = None
        elif callable(module_map):
            self._rules, self._fn = None, module_map
        else:
            raise TypeError(
                "module_map must be a callable (jlora path -> torch module name) or a dict "
                f"{{regex: replacement}}; got {type(module_map).__name__}."
            )

    def __call__(self, path: str) -> Optional[str]:
        if self._fn is not None:
            try:
                name = self._fn(path)
            except Exception as e:  # the user's own error, with the path it was called on
                e.add_note(f"(raised by module_map({path!r}); it should return None for paths it does not map)")
                raise
            if name is not None and not isinstance(name, str):
                raise TypeError(f"module_map({path!r}) returned {name!r}, not a str or None.")
            return name
        for rx, repl in self._rules:
            m = rx.fullmatch(path)
            if m:
                return m.expand(repl)
        return None


def _fields(template: str) -> int:
    try:
        return sum(1 for _, field, _, _ in string.Formatter().parse(template) if field is not None)
    except ValueError as e:
        raise ValueError(f"module name template {template!r} is malformed: {e}") from None


def _expand(template: str, idx: tuple[int, ...]) -> str:
    return template.format(*idx) if idx else template


def _resolver(module_map: ModuleMap, paths: Sequence[str], what: str) -> tuple[_Resolver, bool]:
    """The resolver to use, and whether it is the built-in Llama map."""
    if module_map is not None:
        return _Resolver(module_map), False
    r = _Resolver(LLAMA_MODULE_MAP)
    bad = [p for p in paths if r(p) is None]
    if not paths or bad:
        example = bad[0] if bad else "<none>"
        raise ValueError(
            f"{what}: no module_map given and {example!r} is not a jlora.models.llama path, so the "
            f"built-in Llama map does not apply. Pass module_map=: a callable (jlora path -> torch "
            f"module name, e.g. 'model.layers.0.self_attn.q_proj'; a template like "
            f"'model.layers.{{0}}.self_attn.q_proj' for a stacked kernel) or a dict "
            f"{{regex: replacement}}."
        )
    return r, True


def _param_name(path: str) -> tuple[str, bool]:
    leaf = leaf_name(path)
    if leaf not in _PARAM_NAMES:
        raise ValueError(
            f"{path!r}: no torch parameter name for a leaf named {leaf!r} (known: {sorted(_PARAM_NAMES)})."
        )
    return _PARAM_NAMES[leaf]


def _num(x: float) -> Union[int, float]:
    return int(round(x)) if abs(x - round(x)) < 1e-9 * max(1.0, abs(x)) else float(x)


# ------------------------------------------------------------------------------------------------
# Values refused on both sides
# ------------------------------------------------------------------------------------------------
def _float_dtype(dtype: Any, what: str) -> np.dtype:
    """``dtype`` as a numpy dtype, refused unless floating (integer factors would be truncated)."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"{what}: dtype={dtype!r} is not a dtype.") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(
            f"{what}: dtype={dt} is not a floating dtype: LoRA factors stored as {dt} would be "
            f"truncated (small values to zero). Use float32, bfloat16 or float16."
        )
    return dt


def _check_finite(x: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(x.astype(np.float32))):
        raise ValueError(f"{what} holds NaN or infinite values.")


# ------------------------------------------------------------------------------------------------
# A/B <-> lora_A/lora_B
# ------------------------------------------------------------------------------------------------
def _torch_shapes(layout: Layout, shape: tuple[int, ...], r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """One layer's lora_A / lora_B shapes: a Linear's (r, in), (out, r); a ConvNd's (r, in, *k), (out, r, 1...)."""
    if layout.conv:
        ones = (1,) * (len(layout.conv) - 1)
        return (r, *(shape[ax] for ax in layout.conv)), (shape[layout.out[0]], r, *ones)
    return (r, layout.fan_in(shape)), (math.prod(shape[ax] for ax in layout.out), r)


def _to_torch(a: np.ndarray, b: np.ndarray, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """One layer's A (in..., r), B (r, out...) -> lora_A, lora_B (see :func:`_torch_shapes`)."""
    ni, r = len(layout.in_), a.shape[-1]
    if layout.conv:
        la = a.transpose([ni, *(layout.in_.index(ax) for ax in layout.conv)])
        lb = b.T.reshape(b.shape[1], r, *(1,) * (len(layout.conv) - 1))
    else:
        la = a.transpose([*np.argsort(layout.in_), ni]).reshape(-1, r).T
        lb = b.transpose([0, *(1 + np.argsort(layout.out))]).reshape(r, -1).T
    return np.ascontiguousarray(la), np.ascontiguousarray(lb)


def _from_torch(
    la: np.ndarray, lb: np.ndarray, layout: Layout, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """lora_A, lora_B (see :func:`_torch_shapes`) -> one layer's A (in..., r), B (r, out...)."""
    r = la.shape[0]
    if layout.conv:
        a = la.transpose([*(1 + layout.conv.index(ax) for ax in layout.in_), 0])
        return a, lb.reshape(lb.shape[0], r).T
    s_in, s_out = sorted(layout.in_), sorted(layout.out)
    a = la.T.reshape([shape[i] for i in s_in] + [r])
    a = a.transpose([s_in.index(ax) for ax in layout.in_] + [len(s_in)])
    b = lb.T.reshape([r] + [shape[i] for i in s_out])
    b = b.transpose([0] + [1 + s_out.index(ax) for ax in layout.out])
    return a, b


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------
def _template(resolve: _Resolver, path: str, nstack: Optional[int]) -> str:
    """The torch module name (template) of ``path``, with one '{}' field per stack axis."""
    t = resolve(path)
    if t is None:
        raise ValueError(f"export_peft: module_map gives no torch module name for {path!r}.")
    n = _fields(t)
    if nstack is not None and n != nstack:
        raise ValueError(
            f"export_peft: {path!r} has {nstack} stack axes but its module name {t!r} has {n} "
            f"'{{}}' fields; a stacked kernel needs one per stack axis (e.g. 'model.layers.{{0}}.x')."
        )
    return t


def _claim(owner: dict[str, str], name: str, path: str) -> None:
    if name in owner and owner[name] != path:
        raise ValueError(f"export_peft: {owner[name]!r} and {path!r} both map to torch module {name!r}.")
    owner[name] = path


def _check_exportable(path: str, x: LoraKernel) -> None:
    if x.a is None or x.b is None:
        raise ValueError(f"export_peft: {path!r} is a LoraKernel without A/B.")
    if leaf_name(path) == "embedding" and not x.layout.gather:
        raise ValueError(
            f"export_peft: {path!r} is an embedding table that is also used as a matmul weight (a tied "
            f"output head); PEFT's LoRA on an Embedding adapts its lookups only, so no PEFT adapter computes "
            f"this model."
        )
    if x.layout.conv == ():
        raise ValueError(
            f"export_peft: {path!r} (layout {x.layout}) is used by a convolution whose kernel is "
            f"flipped, sliced or reshaped on the way, so which torch ConvNd weight it is is not known."
        )


class _Exported(NamedTuple):
    """One torch module's adapter, as the config describes it."""

    r: int
    alpha: float
    dropout: float
    dora: bool
    rslora: bool


def _magnitude_to_torch(m: np.ndarray, layout: Layout) -> np.ndarray:
    """One layer's DoRA magnitude (out...) -> PEFT's ``lora_magnitude_vector``: (out,) flattened like
    lora_B's rows (a ConvNd's: (1, out, 1, ...))."""
    flat = m.transpose(np.argsort(layout.out)).reshape(-1)
    return flat.reshape(1, -1, *(1,) * (len(layout.conv) - 1)) if layout.conv else flat


def _magnitude_from_torch(v: np.ndarray, layout: Layout, shape: tuple[int, ...]) -> np.ndarray:
    s_out = sorted(layout.out)
    return v.reshape([shape[i] for i in s_out]).transpose([s_out.index(ax) for ax in layout.out])


def _keys(prefix: str, name: str, layout: Layout) -> tuple[str, str]:
    """The lora_A / lora_B keys of a module: a Linear's or ConvNd's ``lora_A.weight``, an
    Embedding's ``lora_embedding_A`` (no ``.weight``: PEFT keeps them in a ParameterDict)."""
    if layout.gather:
        return f"{prefix}{name}.lora_embedding_A", f"{prefix}{name}.lora_embedding_B"
    return f"{prefix}{name}.lora_A.weight", f"{prefix}{name}.lora_B.weight"


def _export_lora(adapted, resolve, prefix: str, cast) -> tuple[dict, dict, dict]:
    """lora_A/lora_B (and DoRA magnitude) tensors; per torch module its :class:`_Exported`; torch
    module -> jlora path. PiSSA/OLoRA adapters are written converted (rank 2r over the original
    weights, as PEFT's ``path_initial_model_for_weight_conversion``)."""
    tensors: dict[str, np.ndarray] = {}
    lora: dict[str, _Exported] = {}
    owner: dict[str, str] = {}
    for path, x in adapted:
        if not isinstance(x, LoraKernel):
            continue
        x = as_plain_lora(x, f"export_peft: {path!r}")  # PiSSA/OLoRA converted; LoftQ refused
        _check_exportable(path, x)
        ns = len(x.layout.stack)
        template = _template(resolve, path, ns)
        a, b = host_array(x.a), host_array(x.b)
        _check_finite(a, f"export_peft: the A of {path!r}")
        _check_finite(b, f"export_peft: the B of {path!r}")
        m = None if x.m is None else host_array(x.m)
        if m is not None:
            _check_finite(m, f"export_peft: the DoRA magnitude of {path!r}")
        r = int(a.shape[-1])
        alpha = x.scale * (math.sqrt(r) if x.rslora else r)
        for idx in np.ndindex(*a.shape[:ns]):
            name = _expand(template, idx)
            _claim(owner, name, path)
            la, lb = _to_torch(a[idx], b[idx], x.layout)
            ka, kb = _keys(prefix, name, x.layout)
            tensors[ka], tensors[kb] = cast(la), cast(lb)
            if m is not None:
                tensors[f"{prefix}{name}.lora_magnitude_vector"] = cast(_magnitude_to_torch(m[idx], x.layout))
            lora[name] = _Exported(r, alpha, x.dropout, m is not None, x.rslora)
    return tensors, lora, owner


def _export_saved(adapted, universe, resolve, prefix: str, cast, tensors: dict) -> dict[str, str]:
    """Leaves trained in full -> modules_to_save, with every parameter of their module."""
    save_modules: dict[str, str] = {}  # torch module name -> jlora path of the Trainable leaf
    done: set[str] = set()
    for path, x in adapted:
        if not isinstance(x, Trainable):
            continue
        template = _template(resolve, path, None)
        if template in done:
            continue
        done.add(template)
        ns = _fields(template)
        for mpath, leaf in universe[template]:
            if isinstance(leaf, LoraKernel):
                continue  # LoRA on a module trained in full is refused by the caller
            value = host_array(plain(leaf))
            if value.ndim < ns:
                raise ValueError(f"export_peft: {mpath!r} has fewer axes than the {ns} stack axes of {template!r}.")
            _check_finite(value, f"export_peft: {mpath!r}")
            pname, transpose = _param_name(mpath)
            for idx in np.ndindex(*value.shape[:ns]):
                v = value[idx]
                if transpose:
                    if v.ndim != 2:
                        raise ValueError(f"export_peft: {mpath!r} is not a 2-D kernel (shape {v.shape}).")
                    v = v.T
                name = _expand(template, idx)
                tensors[f"{prefix}{name}.{pname}"] = cast(v)
                save_modules[name] = path
    return save_modules


def _module_names(universe) -> set[str]:
    """Every torch module name that the mapped leaves of params stand for."""
    names: set[str] = set()
    for t, leaves in universe.items():
        ns = _fields(t)
        for _, leaf in leaves:
            names.update(_expand(t, idx) for idx in np.ndindex(*shape_of(plain(leaf))[:ns]))
    return names


def _pattern_key(name: str, names: set[str]) -> str:
    """``name`` as a rank_pattern / alpha_pattern key. PEFT matches a key as a regex against the end
    of each module name (``(.*\\.)?(key)$``), so a bare ``lin`` also sets ``enc.lin``: where another
    module would match, the key is anchored and escaped."""
    literal = re.escape(name) == name.replace(".", "\\.")
    if literal and not any(n != name and re.match(rf"(.*\.)?({name})$", n) for n in names):
        return name
    return "^" + re.escape(name)


def _common(lora: Mapping[str, _Exported]) -> tuple[int, float, float, bool, bool]:
    """The most common (r, alpha) and dropout: the config's r / lora_alpha / lora_dropout; and
    use_dora / use_rslora, which PEFT has once per adapter (mixed ones are refused)."""
    if not lora:
        return 8, 8, 0.0, False, False
    (r0, alpha0), _ = collections.Counter((e.r, e.alpha) for e in lora.values()).most_common(1)[0]
    dropouts = collections.Counter(e.dropout for e in lora.values())
    dropout0 = dropouts.most_common(1)[0][0]
    if len(dropouts) > 1:
        warnings.warn(
            f"export_peft: kernels use different dropout rates {sorted(dropouts)}; PEFT has one "
            f"lora_dropout, {dropout0} is written.",
            stacklevel=4,  # the caller of export_peft
        )
    flags = []
    for what, key in (("DoRA", "dora"), ("rsLoRA", "rslora")):
        values = {getattr(e, key) for e in lora.values()}
        if len(values) > 1:
            some = sorted(n for n, e in lora.items() if getattr(e, key))[0]
            other = sorted(n for n, e in lora.items() if not getattr(e, key))[0]
            raise ValueError(f"export_peft: {some!r} is {what} but {other!r} is not; PEFT's use_{key} holds for "
                             f"the whole adapter. Export them separately.")
        flags.append(values.pop())
    return r0, alpha0, dropout0, flags[0], flags[1]


def _target_list(lora, names: set[str], target_modules: Optional[Sequence[str]]) -> list[str]:
    """Short names (``q_proj``) where every module of that name is adapted, full names otherwise."""
    if target_modules is not None:
        if isinstance(target_modules, str) or not all(isinstance(t, str) for t in target_modules):
            raise TypeError("target_modules must be a list of module names.")
        # PEFT adapts a module whose name is a target or ends with "." + a target.
        left = sorted(n for n in lora if not any(n == t or n.endswith("." + t) for t in target_modules))
        if left:
            raise ValueError(
                f"export_peft: target_modules {list(target_modules)} does not name the adapted module "
                f"{left[0]!r}; PEFT would leave it without its adapter."
            )
        return list(target_modules)
    by_short: dict[str, set[str]] = collections.defaultdict(set)
    for n in names:
        by_short[n.rsplit(".", 1)[-1]].add(n)
    chosen = set()
    for n in lora:
        short = n.rsplit(".", 1)[-1]
        chosen.add(short if by_short[short] <= set(lora) else n)
    return sorted(chosen)


def _peft_config(lora, save_modules, names, *, target_modules, builtin, base_model_name_or_path,
                 task_type) -> dict:
    r0, alpha0, dropout0, dora, rslora = _common(lora)
    return {
        "peft_type": "LORA",
        "task_type": ("CAUSAL_LM" if builtin else None) if task_type is _DEFAULT else task_type,
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": int(r0),
        "lora_alpha": _num(alpha0),
        "lora_dropout": float(dropout0),
        "target_modules": _target_list(lora, names, target_modules),
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": rslora,
        "use_dora": dora,
        "modules_to_save": sorted(save_modules) or None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {_pattern_key(n, names): e.r for n, e in sorted(lora.items()) if e.r != r0},
        "alpha_pattern": {_pattern_key(n, names): _num(e.alpha) for n, e in sorted(lora.items()) if e.alpha != alpha0},
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "loftq_config": {},
        "layer_replication": None,
    }


def export_peft(
    directory: PathLike,
    params: Any,
    *,
    module_map: ModuleMap = None,
    base_model_prefix: str = "base_model.model.",
    target_modules: Optional[Sequence[str]] = None,
    base_model_name_or_path: Optional[str] = None,
    dtype: Any = None,
    overwrite: bool = False,
    task_type: Optional[str] = _DEFAULT,  # type: ignore[assignment]
) -> Path:
    """Write the adapters of injected ``params`` as a Hugging Face PEFT LoRA adapter.

    The directory gets ``adapter_model.safetensors`` and ``adapter_config.json``, as PEFT's
    ``save_pretrained`` writes them, so ``PeftModel.from_pretrained(model, directory)`` loads it.
    ``lora_A = Aᵀ`` (r, in) and ``lora_B = Bᵀ`` (out, r), with multi-axis input / output groups
    flattened in the kernel's row-major order and stacked (scanned) kernels split per layer; a
    kernel that a convolution uses (``Layout.conv``, recorded by ``jlora.inject`` with
    ``example_args``) gets PEFT's ``ConvNd`` factors, ``lora_A`` (r, in, *kernel_size) and
    ``lora_B`` (out, r, 1, ...). ``lora_alpha = scale · r``. Kernels of different rank or scale go
    into PEFT's ``rank_pattern`` / ``alpha_pattern`` (a key is anchored, ``^name``, where it would
    also match another module's name). rsLoRA adapters write ``use_rslora: true`` with their own
    alpha (``scale·√r``). DoRA adapters add ``lora_magnitude_vector`` per module and
    ``use_dora: true``. An embedding table adapted where it is looked up (``Layout.gather``)
    becomes PEFT's ``Embedding`` LoRA, ``lora_embedding_A`` (r, vocab) and ``lora_embedding_B``
    (features, r). PiSSA/OLoRA adapters are written as PEFT's
    ``path_initial_model_for_weight_conversion`` converts them: rank 2r over the original weights,
    ``init_lora_weights: true``; LoftQ adapters are refused (their base is LoftQ's quantized
    weights). Leaves trained in full (:class:`~jlora.Trainable`) become ``modules_to_save``.
    Adapters holding NaN or infinite values are refused.

    Args:
        directory: The directory to write into (created if missing). Only the two files are
            written, each to a temporary file that is renamed into place once both are complete;
            the directory's other files are left alone, as with PEFT's ``save_pretrained``.
        params: Injected params.
        module_map: jlora path -> torch module name: a callable, or ``{regex: replacement}``.
            None uses :data:`LLAMA_MODULE_MAP` (``jlora.models.llama``, unrolled or scanned) if every
            adapted path matches it, and raises otherwise.
        base_model_prefix: Prefix of every key (PEFT's ``PeftModel`` adds ``base_model.model.``).
        target_modules: The config's ``target_modules``; by default the adapted modules' short
            names (``q_proj``) where every module of that name is adapted, full names otherwise.
        base_model_name_or_path: Stored in the config (e.g. ``"HuggingFaceTB/SmolLM2-135M"``).
        dtype: Floating dtype of the stored tensors (default: the adapters' own).
        overwrite: Replace an existing ``adapter_model.safetensors`` / ``adapter_config.json``
            (without it, either one being there is a ``FileExistsError``).
        task_type: The config's ``task_type`` (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...); by default
            ``"CAUSAL_LM"`` with the built-in Llama map and None otherwise.

    Returns:
        The absolute path of the directory.

    Example:
        >>> import json, os, tempfile, jax.numpy as jnp, jlora
        >>> k = jlora.LoraKernel(jnp.zeros((6, 5)), jnp.ones((6, 2)), jnp.ones((2, 5)),
        ...                      layout=jlora.Layout((), (0,), (1,)), scale=2.0)
        >>> params = {"params": {"layers_0": {"self_attn": {"q_proj": {"kernel": k}}}}}
        >>> d = export_peft(os.path.join(tempfile.mkdtemp(), "peft"), params)
        >>> cfg = json.load(open(d / "adapter_config.json"))
        >>> cfg["r"], cfg["lora_alpha"], cfg["target_modules"]
        (2, 4, ['q_proj'])
        >>> from safetensors.numpy import load_file
        >>> {k: v.shape for k, v in sorted(load_file(d / "adapter_model.safetensors").items())}
        {'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight': (2, 6),
         'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight': (5, 2)}
    """
    from safetensors.numpy import save_file

    refuse_banks(params, "export_peft")  # one adapter set per PEFT directory
    dt = None if dtype is None else _float_dtype(dtype, "export_peft")
    flat = Flat.of(params).items()
    adapted = [(p, x) for p, x in flat if is_node(x)]
    if not adapted:
        raise ValueError("params hold no adapters (no LoraKernel or Trainable node) to export.")
    resolve, builtin = _resolver(module_map, [p for p, _ in adapted], "export_peft")

    def cast(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x if dt is None else x.astype(dt))

    tensors, lora, owner = _export_lora(adapted, resolve, base_model_prefix, cast)
    universe: dict[str, list[tuple[str, Any]]] = collections.defaultdict(list)
    for path, x in flat:
        t = resolve(path)
        if t is not None:
            universe[t].append((path, x))
    save_modules = _export_saved(adapted, universe, resolve, base_model_prefix, cast, tensors)
    clash = sorted(set(lora) & set(save_modules))
    if clash:
        name = clash[0]
        raise ValueError(
            f"export_peft: torch module {name!r} is both LoRA-adapted ({owner[name]!r}) and trained in "
            f"full ({save_modules[name]!r}); PEFT cannot express both on one module."
        )
    if task_type is not _DEFAULT and task_type is not None and not isinstance(task_type, str):
        raise TypeError(f"export_peft: task_type must be a str (e.g. 'CAUSAL_LM') or None, got {task_type!r}.")
    config = _peft_config(lora, save_modules, _module_names(universe), target_modules=target_modules,
                          builtin=builtin, base_model_name_or_path=base_model_name_or_path, task_type=task_type)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    metadata = {"format": "pt", "jlora_version": __version__}
    writers = {
        _WEIGHTS: lambda p: save_file(tensors, str(p), metadata=metadata),
        _CONFIG: lambda p: p.write_text(text),
    }
    directory = Path(directory)
    write_files(directory, writers, overwrite=overwrite, what="export_peft")
    return directory.absolute()


# ------------------------------------------------------------------------------------------------
# import: read and check the two files
# ------------------------------------------------------------------------------------------------
_UNSUPPORTED = (  # config key, values that are fine, what it is
    ("bias", ("none", None), "LoRA biases (bias)"),
    ("lora_bias", (False, None), "lora_bias"),
    ("layer_replication", (None,), "layer_replication"),
    ("target_parameters", (None, [], ()), "target_parameters (LoRA on nn.Parameter)"),
    ("trainable_token_indices", (None,), "trainable_token_indices"),
)
# LoRA variants whose forward is not W0 + s·B·A (PEFT turns each on when its key is truthy).
_VARIANTS = (
    ("use_qalora", "QALoRA (use_qalora)"),
    ("alora_invocation_tokens", "aLoRA (alora_invocation_tokens)"),
    ("velora_config", "VeLoRA (velora_config)"),
    ("monteclora_config", "MonteCLoRA (monteclora_config)"),
    ("use_bdlora", "block-diagonal LoRA (use_bdlora)"),
    ("arrow_config", "Arrow routing (arrow_config)"),
    ("kasa_config", "KaSA (kasa_config)"),
)
# init_lora_weights values that leave the base weights alone (MiCA only freezes B while training).
_INIT_PLAIN = ("gaussian", "eva", "orthogonal", "mica")
# ... and those that subtract the initial adapter from the base weights when it is created.
_INIT_MODIFIES_BASE = {"pissa": "PiSSA", "olora": "OLoRA", "corda": "CorDA", "lora_ga": "LoRA-GA"}


def _check_init(value: Any, file: Path) -> None:
    """Refuse an adapter that only works over a base PEFT modified (PiSSA, OLoRA, LoftQ, ...)."""
    if value is None or isinstance(value, bool) or (isinstance(value, str) and value.lower() in _INIT_PLAIN):
        return
    low = value.lower() if isinstance(value, str) else ""
    kind = next((v for k, v in _INIT_MODIFIES_BASE.items() if low.startswith(k)), None)
    if kind is not None:
        raise ValueError(
            f"import_peft: {file}: init_lora_weights={value!r}: {kind} subtracts the initial adapter "
            f"from the base model's weights, so these factors are only right on top of that modified "
            f"base, not on the original weights import_peft loads them onto. jlora does not support "
            f"such adapters; save it with PEFT converted to a standard LoRA: "
            f"model.save_pretrained(out, path_initial_model_for_weight_conversion=<the adapter saved "
            f"before training>), which writes init_lora_weights=True and rank 2r, and import that."
        )
    if low == "loftq":
        raise ValueError(
            f"import_peft: {file}: init_lora_weights='loftq': LoftQ trains the adapter against a base "
            f"whose weights it replaced by their quantized approximation, not the original weights "
            f"import_peft loads it onto; jlora does not support LoftQ adapters."
        )
    raise ValueError(
        f"import_peft: {file}: init_lora_weights={value!r} is not a value jlora knows (True, False, "
        f"{', '.join(repr(v) for v in _INIT_PLAIN)}); it may change the base weights."
    )


def _check_supported(config: dict, file: Path) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"import_peft: {file}: peft_type {peft_type!r} is not supported (only 'LORA').")
    for key, fine, what in _UNSUPPORTED:
        if key in config and config[key] not in fine:
            raise ValueError(f"import_peft: {file}: {what} is not supported ({key}={config[key]!r}).")
    for key, what in _VARIANTS:
        if config.get(key):
            raise ValueError(f"import_peft: {file}: {what} is not supported ({key}={config[key]!r}).")
    _check_init(config.get("init_lora_weights"), file)


def _is_pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _is_pos_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _pattern(config: dict, key: str, ok: Callable[[Any], bool], want: str, file: Path) -> dict:
    pattern = config.get(key) or {}
    if not isinstance(pattern, dict):
        raise ValueError(f"import_peft: {file}: {key}={pattern!r} is not a dict {{module regex: value}}.")
    for k, v in pattern.items():
        try:
            re.compile(rf"(.*\.)?({k})$")
        except re.error as e:
            raise ValueError(f"import_peft: {file}: {key} key {k!r} is not a valid regular expression: {e}.") from None
        if not ok(v):
            raise ValueError(f"import_peft: {file}: {key}[{k!r}]={v!r} is not {want}.")
    return pattern


class _Settings(NamedTuple):
    """The config values import_peft uses, checked."""

    r: int
    alpha: float
    rank_pattern: dict
    alpha_pattern: dict
    rslora: bool
    dropout: float
    modules_to_save: list
    dora: bool = False

    def rank_scale(self, name: str, r: int, key: str) -> float:
        """The scale of module ``name``, whose lora_A (``key``) has rank ``r``."""
        want = _pattern_get(self.rank_pattern, name, self.r)
        if r != want:
            raise ValueError(f"import_peft: key {key!r} has rank {r}, the config says r={want}.")
        alpha = float(_pattern_get(self.alpha_pattern, name, self.alpha))
        return alpha / math.sqrt(r) if self.rslora else alpha / r


def _pattern_get(pattern: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first key that matches the end of the module name."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", name):
            return pattern[key]
    return default


def _settings(config: dict, file: Path) -> _Settings:
    def bad(key: str, want: str) -> ValueError:
        return ValueError(f"import_peft: {file}: {key}={config.get(key)!r} is not {want}.")

    for key in ("r", "lora_alpha"):
        if config.get(key) is None:
            raise ValueError(f"import_peft: {file}: {key!r} is missing.")
    if not _is_pos_int(config["r"]):
        raise bad("r", "a positive integer")
    if not _is_pos_num(config["lora_alpha"]):
        raise bad("lora_alpha", "a positive finite number")
    dropout = config.get("lora_dropout")
    dropout = 0.0 if dropout is None else dropout
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise bad("lora_dropout", "a number in [0, 1)")
    rslora = config.get("use_rslora")
    if rslora is not None and not isinstance(rslora, bool):
        raise bad("use_rslora", "true or false")
    mts = config.get("modules_to_save") or []
    if not isinstance(mts, list) or not all(isinstance(m, str) for m in mts):
        raise bad("modules_to_save", "a list of module names")
    dora = config.get("use_dora")
    if dora is not None and not isinstance(dora, bool):
        raise bad("use_dora", "true or false")
    return _Settings(
        r=config["r"], alpha=float(config["lora_alpha"]),
        rank_pattern=_pattern(config, "rank_pattern", _is_pos_int, "a positive integer", file),
        alpha_pattern=_pattern(config, "alpha_pattern", _is_pos_num, "a positive finite number", file),
        rslora=bool(rslora), dropout=float(dropout), modules_to_save=mts, dora=bool(dora),
    )


def _read_tensors(file: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:  # bfloat16 too: JAX has registered ml_dtypes' bfloat16 with numpy
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise ValueError(f"import_peft: {file} could not be read: {e}") from None
    if not tensors:
        raise ValueError(f"import_peft: {file} holds no tensors: there is no adapter in it.")
    for key, v in tensors.items():
        if not jnp.issubdtype(v.dtype, jnp.floating):
            raise ValueError(f"import_peft: key {key!r} has dtype {v.dtype}, not a floating dtype.")
        _check_finite(v, f"import_peft: key {key!r}")
    return tensors


def _read_adapter(directory: Path) -> tuple[_Settings, dict[str, np.ndarray], Path]:
    """The checked config, the tensors, and the safetensors file's path."""
    cfg_file, st_file = directory / _CONFIG, directory / _WEIGHTS
    if not cfg_file.is_file():
        raise FileNotFoundError(f"import_peft: {cfg_file} is missing.")
    if not st_file.is_file():
        hint = ""
        if (directory / "adapter_model.bin").exists():
            hint = (
                " (only adapter_model.bin is there: jlora never unpickles files; re-save the adapter "
                "with PEFT's save_pretrained(..., safe_serialization=True))"
            )
        raise FileNotFoundError(f"import_peft: {st_file} is missing{hint}.")
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"import_peft: {cfg_file} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"import_peft: {cfg_file} does not hold a JSON object.")
    _check_supported(config, cfg_file)
    return _settings(config, cfg_file), _read_tensors(st_file), st_file


def _split_keys(tensors, prefix: str, mts: list, file: Path, dora: bool = False) -> tuple[dict, dict]:
    """``{module: {"A": lora_A, "B": lora_B, "emb": an Embedding's, "m": DoRA magnitude or None}}`` and
    the modules_to_save ``{module: {param: value}}``."""
    lora: dict[str, dict[str, Any]] = collections.defaultdict(dict)
    saved: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    rx = re.compile(r"(.+)\.(?:lora_(A|B)\.weight|lora_embedding_(A|B)|lora_magnitude_vector|(base_layer)\.weight)")
    for key in sorted(tensors):
        if not key.startswith(prefix):
            raise ValueError(f"import_peft: key {key!r} does not start with {prefix!r}.")
        rest = key[len(prefix) :]
        m = rx.fullmatch(rest)
        if m:
            entry = lora[m.group(1)]
            if m.group(4):  # an adapted Embedding's own table (PEFT's save_embedding_layers): checked later
                entry["base"] = tensors[key]
            elif m.group(2) or m.group(3):
                kind = "emb" if m.group(3) else "lin"
                if entry.setdefault("kind", kind) != kind:
                    raise ValueError(f"import_peft: module {m.group(1)!r} has both Linear (lora_A/B.weight) and "
                                     f"Embedding (lora_embedding_A/B) factors.")
                entry[m.group(2) or m.group(3)] = tensors[key]
            else:
                if not dora:
                    raise ValueError(f"import_peft: key {key!r} is a DoRA magnitude, but the config's use_dora is "
                                     f"not true.")
                entry["m"] = tensors[key]
            continue
        if re.search(r"\.lora_[AB]\.bias\b", rest):
            raise ValueError(f"import_peft: key {key!r} is not supported (LoRA bias).")
        module, _, pname = rest.rpartition(".")
        if module and any(module == s or module.endswith("." + s) for s in mts):
            saved[module][pname] = tensors[key]
            continue
        raise ValueError(
            f"import_peft: unknown key {key!r} (neither lora_A/lora_B of a module nor a parameter of "
            f"modules_to_save {mts})."
        )
    if not lora:
        raise ValueError(f"import_peft: {file} holds no lora_A/lora_B tensors: there is no LoRA adapter in it.")
    for name, ab in lora.items():
        emb = ab.get("kind") == "emb"
        key = (lambda part: f"{prefix}{name}.lora_embedding_{part}") if emb else \
            (lambda part: f"{prefix}{name}.lora_{part}.weight")
        for part, other in (("A", "B"), ("B", "A")):
            if part not in ab:
                raise ValueError(
                    f"import_peft: key {key(part)} is missing"
                    + (f" (its lora_{other} is present)." if other in ab else " (the file holds only its other tensors).")
                )
        if dora and "m" not in ab:
            raise ValueError(f"import_peft: key {prefix}{name}.lora_magnitude_vector is missing (use_dora is true).")
        if ab["A"].ndim < 2 or ab["A"].ndim != ab["B"].ndim or (emb and ab["A"].ndim != 2):
            raise ValueError(
                f"import_peft: keys {key('A')} / {key('B')} have shapes {ab['A'].shape} / "
                f"{ab['B'].shape}; PEFT's are both 2-D (a Linear's or an Embedding's) or both ConvNd weights."
            )
        ab["emb"] = emb
        ab.setdefault("m", None)
    return lora, saved


# ------------------------------------------------------------------------------------------------
# import: the base, and which of its leaves each module is
# ------------------------------------------------------------------------------------------------
class _Mapped(NamedTuple):
    """A base leaf that module_map names (see import_peft)."""

    template: str
    stack: tuple[int, ...]  # the leaf's axes that the template's '{}' fields index
    stack_shape: tuple[int, ...]


class _Base:
    """``base`` flattened, with the torch module name of each leaf that module_map names."""

    def __init__(self, base: Any, module_map: ModuleMap):
        flat, self.treedef = jax.tree_util.tree_flatten_with_path(base, is_leaf=is_jlora_leaf)
        self.paths = [path_str(p) for p, _ in flat]
        self.leaves = [x for _, x in flat]
        if module_map is None:  # the built-in map applies when base is a jlora.models.llama tree
            llama = _Resolver(LLAMA_MODULE_MAP)
            kernels = [p for p, x in zip(self.paths, self.leaves) if len(shape_of(plain(x))) >= 2]
            matching = [p for p in kernels if llama(p) is not None]
            resolve, self.builtin = _resolver(None, matching or kernels[:1], "import_peft")
        else:
            resolve, self.builtin = _Resolver(module_map), False
        self.mapped: dict[int, _Mapped] = {}
        # (torch module, torch parameter name) -> [(leaf index, stack index)]; the parameter name
        # is None for a leaf name jlora does not know (it may be the module's weight).
        self.where: dict[tuple[str, Optional[str]], list] = collections.defaultdict(list)
        for i, (path, x) in enumerate(zip(self.paths, self.leaves)):
            t = resolve(path)
            if t is None:
                continue
            ns, shape = _fields(t), shape_of(plain(x))
            if len(shape) < ns:
                raise ValueError(
                    f"import_peft: {path!r} has shape {shape}, fewer axes than the {ns} '{{}}' fields of "
                    f"its module name {t!r}."
                )
            own = isinstance(x, LoraKernel) and len(x.layout.stack) == ns
            stack = x.layout.stack if own else tuple(range(ns))
            self.mapped[i] = m = _Mapped(t, stack, tuple(shape[a] for a in stack))
            pname = _PARAM_NAMES.get(leaf_name(path), (None,))[0]
            for idx in np.ndindex(*m.stack_shape):
                self.where[_expand(t, idx), pname].append((i, idx))

    def modules(self) -> list[str]:
        return sorted({module for module, _ in self.where})

    def assign(self, lora: Mapping[str, dict], prefix: str) -> dict[int, dict[tuple, tuple]]:
        """Per leaf: ``{stack index: (module, its entry from _split_keys)}``."""
        per_leaf: dict[int, dict[tuple, tuple]] = collections.defaultdict(dict)
        for name in sorted(lora):
            targets = self.where.get((name, "weight"), []) + self.where.get((name, None), [])
            if not targets:
                raise ValueError(
                    f"import_peft: key {prefix + name + '.lora_A.weight'!r}: module {name!r} has no kernel "
                    f"in base (nearest modules: {nearest(name, self.modules(), 3)}). Check module_map "
                    f"and base_model_prefix."
                )
            if len(targets) > 1:
                raise ValueError(
                    f"import_peft: module {name!r} maps to several base leaves: "
                    f"{[self.paths[i] for i, _ in targets]}."
                )
            (i, idx), = targets
            per_leaf[i][idx] = (name, lora[name])
        return per_leaf


# ------------------------------------------------------------------------------------------------
# import: each adapted leaf's layout, known and never guessed
# ------------------------------------------------------------------------------------------------
_TABLE_NAMES = ("embedding", "embeddings", "weight")


def _conventional_layout(base: _Base, i: int, emb: bool = False) -> Layout:
    """The layout of a plain base leaf without apply_fn, where a convention makes it certain."""
    path, m = base.paths[i], base.mapped[i]
    shape, ns, leaf = shape_of(plain(base.leaves[i])), len(base.mapped[i].stack), leaf_name(base.paths[i])
    if emb:  # every framework stores a table (num_embeddings, features): Flax nn.Embed, torch, equinox
        if len(shape) == 2 and ns == 0 and (base.builtin or leaf in _TABLE_NAMES):
            return Layout((), (0,), (1,), gather=True)
        raise ValueError(
            f"import_peft: the file holds an Embedding LoRA for base leaf {path!r} {list(shape)}, which is not "
            f"a 2-D table named {' / '.join(_TABLE_NAMES)}. Pass apply_fn and example_args (its layout is read "
            f"from the gather that reads it), or params injected by jlora.inject as base.")
    if len(shape) == ns + 2:
        if base.builtin or (leaf == "kernel" and shape[ns] != shape[ns + 1]):
            return Layout(m.stack, (ns,), (ns + 1,))  # Flax's Dense: (in, out)
        why = (
            "square: (in, out) as Flax's Dense stores a kernel and (out, in) as torch, equinox or "
            "transformers' Flax Conv1D do both fit" if leaf == "kernel" else
            f"a leaf named {leaf!r}: only leaves named 'kernel' are taken as Flax's (in, out), while "
            f"torch and equinox store a 'weight' (out, in)"
        )
    else:
        why = f"{len(shape) - ns} axes besides the {ns} stack axes"
    raise ValueError(
        f"import_peft: which axes of base leaf {path!r} {list(shape)} are inputs and which outputs is "
        f"ambiguous ({why}). Pass apply_fn=<the model's apply function> and example_args=(<example "
        f"inputs>,) so import_peft reads it from how apply_fn uses the leaf, as jlora.inject does, or "
        f"params injected by jlora.inject(..., example_args=...) as base."
    )


def _traced_layouts(base: _Base, ids: list[int], apply_fn, example_args, example_kwargs,
                    emb: frozenset = frozenset()) -> dict[int, Layout]:
    if not callable(apply_fn):
        raise TypeError(f"import_peft: apply_fn must be callable (e.g. model.apply), got {type(apply_fn).__name__}.")
    if not isinstance(example_args, (tuple, list)):
        raise TypeError("import_peft: example_args must be a tuple of apply_fn's arguments after params.")
    values = [plain(x) for x in base.leaves]
    uses = trace_uses(apply_fn, values, base.treedef, example_args, dict(example_kwargs or {}), ids)
    layouts = {}
    for i in ids:
        path, m = base.paths[i], base.mapped[i]
        find = gather_layout if i in emb else layout_from_uses
        layout, why = find(uses[i], len(shape_of(values[i])))
        if layout is None:
            raise ValueError(f"import_peft: the layout of {path!r} cannot be read from apply_fn: {why}.")
        if layout.stack != m.stack:
            raise ValueError(
                f"import_peft: apply_fn uses axes {list(layout.stack)} of {path!r} as stack axes, but its "
                f"module name {m.template!r} indexes axes {list(m.stack)}."
            )
        layouts[i] = layout
    return layouts


def _layouts(base: _Base, ids: list[int], apply_fn, example_args, example_kwargs,
             emb: frozenset = frozenset()) -> dict[int, tuple[Layout, bool]]:
    """Per leaf: ``(layout, taken by convention)``; ``emb``: the leaves the file adapts as Embeddings."""
    if apply_fn is None and (example_args or example_kwargs):
        raise TypeError("import_peft: example_args / example_kwargs are inputs of apply_fn; pass apply_fn too.")
    out: dict[int, tuple[Layout, bool]] = {}
    traced = []
    for i in ids:
        x, m = base.leaves[i], base.mapped[i]
        if isinstance(x, LoraKernel):
            if x.layout.stack != m.stack:
                raise ValueError(
                    f"import_peft: {base.paths[i]!r} has {len(x.layout.stack)} stack axes (layout "
                    f"{x.layout}) but its module name {m.template!r} has {len(m.stack)} '{{}}' fields."
                )
            if x.layout.gather != (i in emb):
                raise ValueError(
                    f"import_peft: the file holds {'an Embedding' if i in emb else 'a Linear/ConvNd'} LoRA for "
                    f"{base.paths[i]!r}, but its layout ({x.layout}) says it is "
                    f"{'a matmul kernel' if i in emb else 'a table read by gather (an Embedding)'}."
                )
            out[i] = (x.layout, False)
        elif apply_fn is not None:
            traced.append(i)
        else:
            out[i] = (_conventional_layout(base, i, i in emb), True)
    if traced:
        found = _traced_layouts(base, traced, apply_fn, example_args, example_kwargs, emb)
        out.update((i, (layout, False)) for i, layout in found.items())
    return out


# ------------------------------------------------------------------------------------------------
# import: build the nodes
# ------------------------------------------------------------------------------------------------
def _shape_hint(la: np.ndarray, layout: Layout, shape: tuple, path: str, conventional: bool) -> str:
    """Why lora_A / lora_B may not fit the kernel, beyond a wrong file."""
    if layout.conv and la.ndim == 2:
        return f"; the file holds a Linear's LoRA, but {path!r} is a convolution's kernel"
    if not layout.conv and la.ndim > 2:
        return (f"; the file holds a ConvNd's LoRA ((r, in, *kernel_size)), but {path!r} is not known to be "
                f"a convolution's kernel: pass apply_fn and example_args, or injected params")
    if conventional and len(shape) >= 2 and la.shape == (la.shape[0], shape[-1]):
        return (f"; {path!r} looks stored (out, in) (as torch/equinox `W @ x` or transformers' Flax "
                f"Conv1D store it): pass apply_fn and example_args, or injected params, so its layout "
                f"is read from its use")
    return ""


def _check_factors(key: str, la, lb, layout: Layout, shape: tuple, path: str, conventional: bool) -> None:
    r = la.shape[0]
    if layout.conv == ():
        raise ValueError(
            f"import_peft: {path!r} (layout {layout}) is used by a convolution whose kernel is flipped, "
            f"sliced or reshaped on the way, so which torch ConvNd weight it is is not known."
        )
    want_a, want_b = _torch_shapes(layout, shape, r)
    for k, got, want in ((key, la.shape, want_a), (key.replace(".lora_A.", ".lora_B."), lb.shape, want_b)):
        if got != want:
            raise ValueError(
                f"import_peft: key {k!r} has shape {got}, expected {want} for {path!r} (layout "
                f"{layout}){_shape_hint(la, layout, shape, path, conventional)}."
            )


def _build_kernel(base: _Base, i: int, parts, layout: Layout, conventional: bool,
                  settings: _Settings, dtype, prefix: str) -> LoraKernel:
    """One LoraKernel over base leaf ``i`` from its per-layer ``{stack index: (module, lora_A, lora_B)}``."""
    path, m = base.paths[i], base.mapped[i]
    w0 = plain(base.leaves[i])
    shape = shape_of(w0)
    a_full = b_full = m_full = first = w_host = None
    for idx in np.ndindex(*m.stack_shape):
        if idx not in parts:
            raise ValueError(
                f"import_peft: key {prefix}{_expand(m.template, idx)}.lora_A.weight is missing: the "
                f"stacked kernel {path!r} is adapted in other layers, and a stacked kernel needs an "
                f"adapter in every layer."
            )
        name, entry = parts[idx]
        la, lb, mag = entry["A"], entry["B"], entry["m"]
        key = _keys(prefix, name, layout)[0]
        if entry.get("base") is not None:  # PEFT saves an adapted embed_tokens' or lm_head's own weight
            if w_host is None:  # once per kernel, not per layer
                w_host = np.asarray(host_array(dequantized(w0)))
            _check_saved_table(f"{prefix}{name}.base_layer.weight", entry["base"], _torch_weight(w_host, layout, idx, entry["emb"]))
        r = int(la.shape[0])
        scale = settings.rank_scale(name, r, key)
        _check_factors(key, la, lb, layout, shape, path, conventional)
        if first is None:
            first = (r, scale)
            a_full = np.zeros(layout.a_shape(shape, r), np.float32)
            b_full = np.zeros(layout.b_shape(shape, r), np.float32)
            m_full = None if mag is None else np.zeros(layout.m_shape(shape), np.float32)
        elif (r, scale) != first:
            raise ValueError(
                f"import_peft: key {key!r}: rank {r} / scale {scale:g} differ from the other layers of "
                f"stacked kernel {path!r} (rank {first[0]}, scale {first[1]:g})."
            )
        a_full[idx], b_full[idx] = _from_torch(la.astype(np.float32), lb.astype(np.float32), layout, shape)
        if mag is not None:
            want = _magnitude_to_torch(np.zeros(layout.m_shape(shape)[len(m.stack):]), layout).shape
            if mag.shape != want:
                raise ValueError(f"import_peft: key {prefix}{name}.lora_magnitude_vector has shape {mag.shape}, "
                                 f"expected {want} for {path!r} (layout {layout}).")
            m_full[idx] = _magnitude_from_torch(mag.astype(np.float32), layout, shape)
    # Sharded like the base they are loaded over, as load_adapters does.
    a, b = place_factors(w0, layout, a_full.astype(dtype), b_full.astype(dtype))
    mm = None if m_full is None else place_magnitude(w0, layout, jnp.asarray(m_full.astype(dtype)))
    return LoraKernel(w0, jnp.asarray(a), jnp.asarray(b), layout=layout, scale=first[1], dropout=settings.dropout,
                      m=mm, rslora=settings.rslora)


def _torch_weight(w: np.ndarray, layout: Layout, idx: tuple, emb: bool) -> np.ndarray:
    """Layer ``idx`` (one index per stack axis, wherever those sit) of the base kernel ``w`` (on the
    host) as torch holds it: an Embedding's table as is, a Linear's weight ``(out, in)`` with the
    input and output axes each flattened in the kernel's order, as :func:`_to_torch` lays out
    lora_A and lora_B."""
    take: list[Any] = [slice(None)] * w.ndim
    for ax, i in zip(layout.stack, idx):
        take[ax] = i
    layer = w[tuple(take)]
    if emb:
        return layer
    pos = lambda ax: ax - sum(s < ax for s in layout.stack)  # noqa: E731  (its axis once the stack axes are gone)
    ins, outs = sorted(pos(ax) for ax in layout.in_), sorted(pos(ax) for ax in layout.out)
    n_out = math.prod(layer.shape[ax] for ax in outs)
    return layer.transpose(outs + ins).reshape(n_out, -1)


def _check_saved_table(key: str, saved: np.ndarray, table: np.ndarray) -> None:
    """PEFT saves the weight of an adapted ``embed_tokens`` or ``lm_head`` too (its
    ``save_embedding_layers``, in case the vocabulary was resized): it must be the base's, or the
    adapter belongs to another model."""
    if saved.shape != table.shape:
        raise ValueError(f"import_peft: key {key!r} (the base weight PEFT saved with its adapter) has shape "
                         f"{saved.shape}, the base's {table.shape}: the vocabulary was resized; resize the base.")
    a, b = saved.astype(np.float32), table.astype(np.float32)
    if not np.allclose(a, b, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(b).max()))):
        raise ValueError(f"import_peft: key {key!r} (the base weight PEFT saved with its adapter) differs from "
                         f"the base's (max |Δ| {float(np.abs(a - b).max()):.3g}): the adapter was trained over "
                         f"another model.")


def _attach_saved(base: _Base, new: list, saved: Mapping[str, dict], prefix: str) -> None:
    """modules_to_save tensors -> Trainable leaves in ``new``."""
    used: set[tuple[str, str]] = set()
    for i, (template, stack, stack_shape) in base.mapped.items():
        hits = [(idx, _expand(template, idx)) for idx in np.ndindex(*stack_shape)]
        if not any(name in saved for _, name in hits):
            continue
        if isinstance(new[i], LoraKernel):
            raise ValueError(f"import_peft: {base.paths[i]!r} is both LoRA-adapted and in modules_to_save.")
        pname, transpose = _param_name(base.paths[i])
        leaf = new[i]
        # Stack axes first (they may sit elsewhere in a base LoraKernel's w0), so value[idx] is a layer.
        lead = tuple(range(len(stack)))
        value = np.moveaxis(np.array(host_array(leaf)), stack, lead)
        for idx, name in hits:
            key = f"{prefix}{name}.{pname}"
            if pname not in saved.get(name, {}):
                raise ValueError(f"import_peft: key {key!r} is missing (module {name!r} is in modules_to_save).")
            v = saved[name][pname]
            v = v.T if transpose and v.ndim == 2 else v
            if v.shape != value[idx].shape:
                raise ValueError(f"import_peft: key {key!r} has shape {v.shape}, expected {value[idx].shape}.")
            value[idx] = v
            used.add((name, pname))
        value = np.moveaxis(value, lead, stack)  # dtype is the leaf's: np.array kept it
        new[i] = Trainable(jnp.asarray(place_like(leaf, value)))
    for module, ps in saved.items():
        for pname in ps:
            if (module, pname) not in used:
                raise ValueError(
                    f"import_peft: key {prefix}{module}.{pname!s} (modules_to_save) has no leaf in base "
                    f"(nearest modules: {nearest(module, base.modules(), 3)})."
                )


def import_peft(
    directory: PathLike,
    base: Any,
    *,
    module_map: ModuleMap = None,
    dtype: Any = jnp.float32,
    base_model_prefix: str = "base_model.model.",
    apply_fn: Optional[Callable] = None,
    example_args: Sequence[Any] = (),
    example_kwargs: Optional[dict[str, Any]] = None,
) -> Any:
    """Read a Hugging Face PEFT LoRA adapter into injected params over ``base``.

    Reads only ``adapter_model.safetensors`` and ``adapter_config.json`` (never pickle). Each
    ``lora_A`` (r, in) / ``lora_B`` (out, r) pair becomes ``A = lora_Aᵀ``, ``B = lora_Bᵀ`` on the
    kernel that ``module_map`` maps to that module, with ``scale = lora_alpha / r``
    (``/ sqrt(r)`` with ``use_rslora``; ``rank_pattern`` / ``alpha_pattern`` honoured); per-layer
    tensors are stacked back for scanned kernels, and a ``ConvNd``'s factors
    ((r, in, *kernel_size), (out, r, 1, ...)) go onto a convolution's kernel. ``modules_to_save``
    tensors become :class:`~jlora.Trainable` leaves.

    Which axes of each adapted kernel are its inputs and outputs is known, never guessed:

    * a :class:`~jlora.LoraKernel` in ``base`` (params from ``jlora.inject``) brings its layout,
      and its adapter is replaced;
    * with ``apply_fn`` and ``example_args``, the layouts are read from how ``apply_fn`` uses the
      leaves, as ``jlora.inject`` reads them;
    * otherwise only two conventions hold: the built-in :data:`LLAMA_MODULE_MAP`'s
      ``jlora.models.llama`` kernels are ``(in, out)``, and so is a non-square leaf named
      ``kernel`` (Flax's ``Dense``), after one leading stack axis per ``{}`` field of its module
      name. A square kernel (Flax's ``(in, out)`` and torch's ``(out, in)`` both fit), a leaf named
      otherwise (``weight`` is ``(out, in)`` in torch and equinox) or one with more axes is refused.

    DoRA (``use_dora``) adapters bring their ``lora_magnitude_vector`` (DoRA's ``m``); an
    ``Embedding``'s ``lora_embedding_A`` (r, vocab) / ``lora_embedding_B`` (features, r) go onto the
    table (``(vocab, features)``, read by gather); ``use_rslora`` is kept on the nodes.
    Other adapters that do not add ``s·B·A`` to the original base weights are refused: the other
    LoRA variants, and ``init_lora_weights`` that modify the base (PiSSA, OLoRA, CorDA, LoRA-GA: save
    those converted with PEFT's ``path_initial_model_for_weight_conversion``; LoftQ).

    Args:
        directory: A PEFT adapter directory.
        base: Plain base params (or injected params, whose adapters are replaced).
        module_map: jlora path -> torch module name, as for :func:`export_peft`.
        dtype: Floating dtype of the imported A and B.
        base_model_prefix: The prefix of the keys in the safetensors file.
        apply_fn: ``apply_fn(params, *example_args, **example_kwargs)``, e.g. ``model.apply``: traced
            once (never run) to read the layouts of plain base kernels.
        example_args, example_kwargs: Example inputs of ``apply_fn`` (after params).

    Returns:
        Injected params.

    Raises:
        FileNotFoundError: A file is missing.
        ValueError: Unsupported or malformed config (non-LoRA, VeRA-like variants, PiSSA, a non-positive r, ...,
            naming the file and key), an empty adapter, a kernel whose layout is not known, or a key
            that is unknown, missing, or of the wrong shape (the message names it).

    Example:
        >>> import os, tempfile, jax.numpy as jnp, jlora
        >>> k = jlora.LoraKernel(jnp.zeros((6, 5)), jnp.ones((6, 2)), jnp.ones((2, 5)),
        ...                      layout=jlora.Layout((), (0,), (1,)), scale=2.0)
        >>> tree = lambda leaf: {"params": {"layers_0": {"mlp": {"up_proj": {"kernel": leaf}}}}}
        >>> d = export_peft(os.path.join(tempfile.mkdtemp(), "peft"), tree(k))
        >>> p = import_peft(d, tree(jnp.zeros((6, 5))))
        >>> p["params"]["layers_0"]["mlp"]["up_proj"]["kernel"]
        LoraKernel(w0=float32[6, 5], a=float32[6, 2], b=float32[2, 5], layout=(in=[0] out=[1]), scale=2)
    """
    dtype = _float_dtype(dtype, "import_peft")
    settings, tensors, st_file = _read_adapter(Path(directory))
    lora, saved = _split_keys(tensors, base_model_prefix, settings.modules_to_save, st_file, settings.dora)
    tree = _Base(base, module_map)
    per_leaf = tree.assign(lora, base_model_prefix)
    emb = frozenset(i for i, parts in per_leaf.items() if any(e["emb"] for _, e in parts.values()))
    layouts = _layouts(tree, sorted(per_leaf), apply_fn, example_args, example_kwargs, emb)
    new = [plain(x) for x in tree.leaves]
    for i, parts in per_leaf.items():
        new[i] = _build_kernel(tree, i, parts, *layouts[i], settings, dtype, base_model_prefix)
    _attach_saved(tree, new, saved, base_model_prefix)
    return jax.tree_util.tree_unflatten(tree.treedef, new)
