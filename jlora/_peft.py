"""Hugging Face PEFT interop: ``export_peft`` / ``import_peft``.

PEFT stores a LoRA adapter as two files in a directory:

* ``adapter_model.safetensors`` with, per adapted ``torch.nn.Linear`` named ``<module>``, the keys
  ``base_model.model.<module>.lora_A.weight`` of shape ``(r, in)`` and
  ``base_model.model.<module>.lora_B.weight`` of shape ``(out, r)``, so that
  ``ΔW_torch = (lora_alpha / r) · lora_B @ lora_A`` is added to the ``(out, in)`` torch weight;
* ``adapter_config.json`` (``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``target_modules``, ...).

jlora's A ``(in..., r)`` and B ``(r, out...)`` are the transposes (Flax kernels are ``(in, out)``,
the transpose of torch's weight); kernels with several input or output axes are flattened in the
kernel's row-major order, and a stacked (``nn.scan``) kernel becomes one module per layer.

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
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jlora._checkpoint import _atomic_directory, _flat, _plain, _shape, _to_numpy
from jlora._tree import is_unit
from jlora._node import Layout, LoraKernel, Trainable, is_node
from jlora._paths import leaf_name, nearest, path_str
from jlora._sharding import place_factors, place_like

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
# A/B <-> lora_A/lora_B
# ------------------------------------------------------------------------------------------------
def _to_torch(a: np.ndarray, b: np.ndarray, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """One layer's A (in..., r), B (r, out...) -> lora_A (r, in_flat), lora_B (out_flat, r)."""
    ni, r = len(layout.in_), a.shape[-1]
    a2 = a.transpose([*np.argsort(layout.in_), ni]).reshape(-1, r)
    b2 = b.transpose([0, *(1 + np.argsort(layout.out))]).reshape(r, -1)
    return np.ascontiguousarray(a2.T), np.ascontiguousarray(b2.T)


def _from_torch(
    la: np.ndarray, lb: np.ndarray, layout: Layout, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """lora_A (r, in_flat), lora_B (out_flat, r) -> one layer's A (in..., r), B (r, out...)."""
    r = la.shape[0]
    s_in, s_out = sorted(layout.in_), sorted(layout.out)
    a = la.T.reshape([shape[i] for i in s_in] + [r])
    a = a.transpose([s_in.index(ax) for ax in layout.in_] + [len(s_in)])
    b = lb.T.reshape([r] + [shape[i] for i in s_out])
    b = b.transpose([0] + [1 + s_out.index(ax) for ax in layout.out])
    return a, b


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------
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
) -> Path:
    """Write the adapters of injected ``params`` as a Hugging Face PEFT LoRA adapter.

    The directory gets ``adapter_model.safetensors`` and ``adapter_config.json``, as PEFT's
    ``save_pretrained`` writes them, so ``PeftModel.from_pretrained(model, directory)`` loads it.
    ``lora_A = Aᵀ`` (r, in) and ``lora_B = Bᵀ`` (out, r), with multi-axis input / output groups
    flattened in the kernel's row-major order and stacked (scanned) kernels split per layer;
    ``lora_alpha = scale · r``. Kernels of different rank or scale go into PEFT's
    ``rank_pattern`` / ``alpha_pattern``. Leaves trained in full (:class:`~jlora.Trainable`)
    become ``modules_to_save``.

    Args:
        directory: The directory to write (refused if it exists and is not empty, unless
            ``overwrite``; written under a temporary name and renamed into place).
        params: Injected params.
        module_map: jlora path -> torch module name: a callable, or ``{regex: replacement}``.
            None uses :data:`LLAMA_MODULE_MAP` (``jlora.models.llama``, unrolled or scanned) if every
            adapted path matches it, and raises otherwise.
        base_model_prefix: Prefix of every key (PEFT's ``PeftModel`` adds ``base_model.model.``).
        target_modules: The config's ``target_modules``; by default the adapted modules' short
            names (``q_proj``) where every module of that name is adapted, full names otherwise.
        base_model_name_or_path: Stored in the config (e.g. ``"HuggingFaceTB/SmolLM2-135M"``).
        dtype: Dtype of the stored tensors (default: the adapters' own).
        overwrite: Replace a previous export at ``directory`` (a directory holding only
            ``adapter_model.safetensors`` and ``adapter_config.json``; other files are never deleted:
            a directory that holds any is refused).

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

    from jlora import __version__

    flat = _flat(params)
    adapted = [(p, x) for p, x in flat if is_node(x)]
    if not adapted:
        raise ValueError("params hold no adapters (no LoraKernel or Trainable node) to export.")
    resolve, builtin = _resolver(module_map, [p for p, _ in adapted], "export_peft")

    def template_of(path: str, nstack: Optional[int]) -> str:
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

    tensors: dict[str, np.ndarray] = {}
    owner: dict[str, str] = {}  # torch module name -> jlora path
    lora: dict[str, tuple[int, float, float]] = {}  # module -> (r, alpha, dropout)
    save_modules: dict[str, str] = {}  # torch module name -> jlora path of the Trainable leaf

    def claim(name: str, path: str) -> None:
        if name in owner and owner[name] != path:
            raise ValueError(f"export_peft: {owner[name]!r} and {path!r} both map to torch module {name!r}.")
        owner[name] = path

    def cast(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.astype(jnp.dtype(dtype)) if dtype is not None else x)

    for path, x in adapted:
        if not isinstance(x, LoraKernel):
            continue
        if x.a is None or x.b is None:
            raise ValueError(f"export_peft: {path!r} is a LoraKernel without A/B.")
        if leaf_name(path) == "embedding":
            raise ValueError(
                f"export_peft: {path!r} is an embedding table (a tied output head?); PEFT's LoRA "
                f"on embeddings has another layout (lora_embedding_A/B), which export_peft does not write."
            )
        ns = len(x.layout.stack)
        template = template_of(path, ns)
        a, b = _to_numpy(x.a), _to_numpy(x.b)
        r = int(a.shape[-1])
        for idx in np.ndindex(*a.shape[:ns]):
            name = _expand(template, idx)
            claim(name, path)
            la, lb = _to_torch(a[idx], b[idx], x.layout)
            tensors[f"{base_model_prefix}{name}.lora_A.weight"] = cast(la)
            tensors[f"{base_model_prefix}{name}.lora_B.weight"] = cast(lb)
            lora[name] = (r, x.scale * r, x.dropout)

    # Leaves trained in full -> modules_to_save, with every parameter of their module.
    universe: dict[str, list[tuple[str, Any]]] = collections.defaultdict(list)
    for path, x in flat:
        t = resolve(path)
        if t is not None:
            universe[t].append((path, x))
    done_templates: set[str] = set()
    for path, x in adapted:
        if not isinstance(x, Trainable):
            continue
        template = template_of(path, None)
        if template in done_templates:
            continue
        done_templates.add(template)
        ns = _fields(template)
        for mpath, leaf in universe[template]:
            if isinstance(leaf, LoraKernel):
                continue  # LoRA on a module trained in full is refused below
            value = _to_numpy(_plain(leaf))
            if value.ndim < ns:
                raise ValueError(f"export_peft: {mpath!r} has fewer axes than the {ns} stack axes of {template!r}.")
            pname, transpose = _param_name(mpath)
            for idx in np.ndindex(*value.shape[:ns]):
                v = value[idx]
                if transpose:
                    if v.ndim != 2:
                        raise ValueError(f"export_peft: {mpath!r} is not a 2-D kernel (shape {v.shape}).")
                    v = v.T
                name = _expand(template, idx)
                tensors[f"{base_model_prefix}{name}.{pname}"] = cast(v)
                save_modules[name] = path
    clash = sorted(set(lora) & set(save_modules))
    if clash:
        name = clash[0]
        raise ValueError(
            f"export_peft: torch module {name!r} is both LoRA-adapted ({owner[name]!r}) and trained in "
            f"full ({save_modules[name]!r}); PEFT cannot express both on one module."
        )

    if lora:
        (r0, alpha0), _ = collections.Counter((r, al) for r, al, _ in lora.values()).most_common(1)[0]
        dropouts = collections.Counter(d for _, _, d in lora.values())
        dropout0 = dropouts.most_common(1)[0][0]
    else:
        r0, alpha0, dropout0, dropouts = 8, 8, 0.0, collections.Counter()
    if len(dropouts) > 1:
        import warnings

        warnings.warn(
            f"export_peft: kernels use different dropout rates {sorted(dropouts)}; PEFT has one "
            f"lora_dropout, {dropout0} is written.",
            stacklevel=2,
        )
    rank_pattern = {n: r for n, (r, _, _) in sorted(lora.items()) if r != r0}
    alpha_pattern = {n: _num(al) for n, (_, al, _) in sorted(lora.items()) if al != alpha0}

    if target_modules is None:
        all_names: dict[str, set[str]] = collections.defaultdict(set)
        for t, leaves in universe.items():
            ns = _fields(t)
            for _, leaf in leaves:
                shape = _shape(_plain(leaf))
                for idx in np.ndindex(*shape[:ns]):
                    n = _expand(t, idx)
                    all_names[n.rsplit(".", 1)[-1]].add(n)
        chosen: set[str] = set()
        for n in lora:
            short = n.rsplit(".", 1)[-1]
            chosen.add(short if all_names[short] <= set(lora) else n)
        target_list = sorted(chosen)
    else:
        if isinstance(target_modules, str) or not all(isinstance(t, str) for t in target_modules):
            raise TypeError("target_modules must be a list of module names.")
        target_list = list(target_modules)

    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if builtin else None,
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": int(r0),
        "lora_alpha": _num(alpha0),
        "lora_dropout": float(dropout0),
        "target_modules": target_list,
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": sorted(save_modules) or None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "loftq_config": {},
        "layer_replication": None,
    }
    exported = lambda d: {p.name for p in d.iterdir()} <= {_WEIGHTS, _CONFIG}  # what overwrite may replace
    with _atomic_directory(directory, overwrite=overwrite, replaceable=exported, kind="PEFT adapter export") as tmp:
        tmp.mkdir()
        save_file(tensors, str(tmp / _WEIGHTS), metadata={"format": "pt", "jlora_version": __version__})
        (tmp / _CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(directory).absolute()


# ------------------------------------------------------------------------------------------------
# import
# ------------------------------------------------------------------------------------------------
_UNSUPPORTED = (  # config key, value that is fine, what it is
    ("use_dora", (False, None), "DoRA (use_dora)"),
    ("bias", ("none", None), "LoRA biases (bias)"),
    ("lora_bias", (False, None), "lora_bias"),
    ("layer_replication", (None,), "layer_replication"),
    ("target_parameters", (None, [], ()), "target_parameters (LoRA on nn.Parameter)"),
    ("trainable_token_indices", (None,), "trainable_token_indices"),
    ("alora_invocation_tokens", (None,), "aLoRA (alora_invocation_tokens)"),
    ("use_qalora", (False, None), "QALoRA (use_qalora)"),
)


def _pattern_get(pattern: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first key that matches the end of the module name."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", name):
            return pattern[key]
    return default


def _load_peft_config(file: Path) -> dict:
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"import_peft: {file} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"import_peft: {file} does not hold a JSON object.")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"import_peft: {file}: peft_type {peft_type!r} is not supported (only 'LORA').")
    for key, fine, what in _UNSUPPORTED:
        if key in config and config[key] not in fine:
            raise ValueError(f"import_peft: {file}: {what} is not supported ({key}={config[key]!r}).")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool):
            raise ValueError(f"import_peft: {file}: {key!r} is missing or not a number.")
    return config


class _Mapped(NamedTuple):
    """A base leaf that module_map names (see import_peft)."""

    template: str
    stack: tuple[int, ...]  # the leaf's axes that the template's '{}' fields index
    layout: Optional[Layout]  # LoRA factors' layout; None where the in/out axes are ambiguous
    stack_shape: tuple[int, ...]


def import_peft(
    directory: PathLike,
    base: Any,
    *,
    module_map: ModuleMap = None,
    dtype: Any = jnp.float32,
    base_model_prefix: str = "base_model.model.",
) -> Any:
    """Read a Hugging Face PEFT LoRA adapter into injected params over ``base``.

    Reads only ``adapter_model.safetensors`` and ``adapter_config.json`` (never pickle). Each
    ``lora_A`` (r, in) / ``lora_B`` (out, r) pair becomes ``A = lora_Aᵀ``, ``B = lora_Bᵀ`` on the
    kernel that ``module_map`` maps to that module, with ``scale = lora_alpha / r``
    (``/ sqrt(r)`` with ``use_rslora``; ``rank_pattern`` / ``alpha_pattern`` honoured); per-layer
    tensors are stacked back for scanned kernels. ``modules_to_save`` tensors become
    :class:`~jlora.Trainable` leaves.

    The layout of a plain base kernel is jlora's convention: ``(in, out)``, after one leading
    stack axis per ``{}`` field of its module-name template. For kernels with several input or
    output axes, pass injected params (from ``jlora.inject`` with ``example_args``) as ``base``:
    their recorded layouts are used, and their adapters replaced.

    Args:
        directory: A PEFT adapter directory.
        base: Plain base params (or injected params, whose adapters are replaced).
        module_map: jlora path -> torch module name, as for :func:`export_peft`.
        dtype: Dtype of the imported A and B.
        base_model_prefix: The prefix of the keys in the safetensors file.

    Returns:
        Injected params.

    Raises:
        FileNotFoundError: A file is missing.
        ValueError: Unsupported config (non-LoRA, DoRA, ...), or a key that is unknown, missing,
            or of the wrong shape (the message names it).

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
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = Path(directory)
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
    config = _load_peft_config(cfg_file)
    try:
        tensors = load_file(str(st_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"import_peft: {st_file} could not be read: {e}") from None

    flat, treedef = jax.tree_util.tree_flatten_with_path(base, is_leaf=is_unit)
    paths = [path_str(p) for p, _ in flat]
    leaves = [x for _, x in flat]
    if module_map is None:
        llama = _Resolver(LLAMA_MODULE_MAP)
        kernels = [p for p, x in zip(paths, leaves) if len(_shape(_plain(x))) >= 2]
        # The built-in map applies when base is a jlora.models.llama tree.
        matching = [p for p in kernels if llama(p) is not None]
        resolve, _ = _resolver(None, matching or kernels[:1], "import_peft")
    else:
        resolve = _Resolver(module_map)

    # Each base leaf module_map names, once: its template, the axes the template's fields index
    # and, for LoRA, its layout (None where the in/out axes are ambiguous).
    mapped: dict[int, _Mapped] = {}
    # (torch module name, torch parameter name) -> [(leaf index, stack index)]; the parameter name
    # is None for a leaf name jlora does not know (it may be the module's weight).
    where: dict[tuple[str, Optional[str]], list[tuple[int, tuple[int, ...]]]] = collections.defaultdict(list)
    for i, (path, x) in enumerate(zip(paths, leaves)):
        t = resolve(path)
        if t is None:
            continue
        ns = _fields(t)
        shape = _shape(_plain(x))
        if isinstance(x, LoraKernel) and len(x.layout.stack) == ns:
            m = _Mapped(t, x.layout.stack, x.layout, tuple(shape[a] for a in x.layout.stack))
        elif len(shape) < ns:
            raise ValueError(
                f"import_peft: {path!r} has shape {shape}, fewer axes than the {ns} '{{}}' fields of "
                f"its module name {t!r}."
            )
        else:
            layout = Layout(tuple(range(ns)), (ns,), (ns + 1,)) if len(shape) == ns + 2 else None
            m = _Mapped(t, tuple(range(ns)), layout, shape[:ns])
        mapped[i] = m
        pname = _PARAM_NAMES.get(leaf_name(path), (None,))[0]
        for idx in np.ndindex(*m.stack_shape):
            where[_expand(t, idx), pname].append((i, idx))

    def known_modules() -> list[str]:
        return sorted({module for module, _ in where})

    lora: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    saved: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    mts = config.get("modules_to_save") or []
    rx = re.compile(r"(.+)\.lora_(A|B)\.weight")
    for key in sorted(tensors):
        if not key.startswith(base_model_prefix):
            raise ValueError(f"import_peft: key {key!r} does not start with {base_model_prefix!r}.")
        rest = key[len(base_model_prefix) :]
        m = rx.fullmatch(rest)
        if m:
            lora[m.group(1)][m.group(2)] = tensors[key]
            continue
        if re.search(r"\.(lora_embedding_[AB]|lora_magnitude_vector|lora_[AB]\.bias)\b", rest):
            raise ValueError(f"import_peft: key {key!r} is not supported (LoRA on embeddings, DoRA or LoRA bias).")
        module, _, pname = rest.rpartition(".")
        if module and any(module == s or module.endswith("." + s) for s in mts):
            saved[module][pname] = tensors[key]
            continue
        raise ValueError(
            f"import_peft: unknown key {key!r} (neither lora_A/lora_B of a module nor a parameter of "
            f"modules_to_save {mts})."
        )

    r_default, alpha_default = config["r"], config["lora_alpha"]
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout") or 0.0)

    # Per base leaf: {stack index: (lora_A, lora_B, r, scale, key)}
    per_leaf: dict[int, dict[tuple[int, ...], tuple]] = collections.defaultdict(dict)
    for name in sorted(lora):
        ab = lora[name]
        key = f"{base_model_prefix}{name}.lora_A.weight"
        for part in ("A", "B"):
            if part not in ab:
                other = "A" if part == "B" else "B"
                raise ValueError(
                    f"import_peft: key {base_model_prefix}{name}.lora_{part}.weight is missing "
                    f"(its lora_{other} is present)."
                )
        targets = where.get((name, "weight"), []) + where.get((name, None), [])
        if not targets:
            raise ValueError(
                f"import_peft: key {key!r}: module {name!r} has no kernel in base (nearest modules: "
                f"{nearest(name, known_modules(), 3)}). Check module_map and base_model_prefix."
            )
        if len(targets) > 1:
            raise ValueError(
                f"import_peft: module {name!r} maps to several base leaves: "
                f"{[paths[i] for i, _ in targets]}."
            )
        (i, idx), = targets
        la, lb = ab["A"], ab["B"]
        if la.ndim != 2 or lb.ndim != 2:
            raise ValueError(f"import_peft: key {key!r}: lora_A/lora_B must be 2-D, got {la.shape}/{lb.shape}.")
        r = int(la.shape[0])
        want_r = _pattern_get(rank_pattern, name, r_default)
        if r != want_r:
            raise ValueError(f"import_peft: key {key!r} has rank {r}, the config says r={want_r}.")
        alpha = float(_pattern_get(alpha_pattern, name, alpha_default))
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        per_leaf[i][idx] = (la, lb, r, scale, name)

    new = list(_plain(x) for x in leaves)
    for i, parts in per_leaf.items():
        path, (template, _, layout, stack_shape) = paths[i], mapped[i]
        w0 = new[i]
        shape = _shape(w0)
        if layout is None:
            raise ValueError(
                f"import_peft: base kernel {path!r} has shape {shape}; which of its axes are inputs "
                f"and which outputs is ambiguous. Pass params injected by jlora.inject(..., "
                f"example_args=...) as base: their recorded layouts are used."
            )
        in_flat = layout.fan_in(shape)
        out_flat = math.prod(shape[a] for a in layout.out)
        first = next(iter(parts.values()))
        r, scale = first[2], first[3]
        a_full = np.zeros(layout.a_shape(shape, r), dtype=np.float32)
        b_full = np.zeros(layout.b_shape(shape, r), dtype=np.float32)
        for idx in np.ndindex(*stack_shape):
            if idx not in parts:
                raise ValueError(
                    f"import_peft: key {base_model_prefix}{_expand(template, idx)}.lora_A.weight "
                    f"is missing: the stacked kernel {path!r} is adapted in other layers, and a "
                    f"stacked kernel needs an adapter in every layer."
                )
            la, lb, r_i, scale_i, name = parts[idx]
            key = f"{base_model_prefix}{name}.lora_A.weight"
            if (r_i, scale_i) != (r, scale):
                raise ValueError(
                    f"import_peft: key {key!r}: rank {r_i} / scale {scale_i:g} differ from the other "
                    f"layers of stacked kernel {path!r} (rank {r}, scale {scale:g})."
                )
            if la.shape != (r, in_flat):
                raise ValueError(f"import_peft: key {key!r} has shape {la.shape}, expected {(r, in_flat)} for {path!r}.")
            if lb.shape != (out_flat, r):
                kb = key.replace(".lora_A.", ".lora_B.")
                raise ValueError(f"import_peft: key {kb!r} has shape {lb.shape}, expected {(out_flat, r)} for {path!r}.")
            a, b = _from_torch(la.astype(np.float32), lb.astype(np.float32), layout, shape)
            a_full[idx], b_full[idx] = a, b
        # Sharded like the base they are loaded over, as load_adapters does.
        a, b = place_factors(w0, layout, a_full.astype(jnp.dtype(dtype)), b_full.astype(jnp.dtype(dtype)))
        new[i] = LoraKernel(w0, jnp.asarray(a), jnp.asarray(b), layout=layout, scale=scale, dropout=dropout)

    # modules_to_save -> Trainable leaves
    used: set[tuple[str, str]] = set()
    for i, (template, stack, _, stack_shape) in mapped.items():
        hits = [(idx, _expand(template, idx)) for idx in np.ndindex(*stack_shape)]
        if not any(name in saved for _, name in hits):
            continue
        if isinstance(new[i], LoraKernel):
            raise ValueError(f"import_peft: {paths[i]!r} is both LoRA-adapted and in modules_to_save.")
        pname, transpose = _param_name(paths[i])
        plain = new[i]
        # Stack axes first (they may sit elsewhere in a base LoraKernel's w0), so value[idx] is a layer.
        lead = tuple(range(len(stack)))
        value = np.moveaxis(np.array(_to_numpy(plain)), stack, lead)
        for idx, name in hits:
            key = f"{base_model_prefix}{name}.{pname}"
            if pname not in saved.get(name, {}):
                raise ValueError(f"import_peft: key {key!r} is missing (module {name!r} is in modules_to_save).")
            v = saved[name][pname]
            v = v.T if transpose and v.ndim == 2 else v
            if v.shape != value[idx].shape:
                raise ValueError(f"import_peft: key {key!r} has shape {v.shape}, expected {value[idx].shape}.")
            value[idx] = v
            used.add((name, pname))
        value = np.moveaxis(value, lead, stack)  # dtype is plain's: np.array kept it
        new[i] = Trainable(jnp.asarray(place_like(plain, value)))
    for module, ps in saved.items():
        for pname in ps:
            if (module, pname) not in used:
                raise ValueError(
                    f"import_peft: key {base_model_prefix}{module}.{pname!s} (modules_to_save) has no "
                    f"leaf in base (nearest modules: {nearest(module, known_modules(), 3)})."
                )
    return jax.tree_util.tree_unflatten(treedef, new)
