"""Adapter checkpoints on Orbax: ``save_adapters`` / ``load_adapters`` and ``TrainCheckpointer``.

A checkpoint holds only the trainable leaves (A, B, and leaves trained in full) as one flat dict
keyed by '/'-joined path, and a JSON config beside them that says how to rebuild the
:class:`~jlora.LoraKernel` / :class:`~jlora.Trainable` nodes over a base (layout, rank, scale,
dropout, adapter dtype) plus a fingerprint of the base (shape and dtype of every adapted leaf).
So ``load_adapters(directory, base)`` needs nothing but the directory and the plain base params.

Layout of a ``save_adapters`` directory (an ordinary Orbax composite checkpoint)::

    ckpt/
      _CHECKPOINT_METADATA
      adapters/                 # Orbax StandardCheckpointHandler (OCDBT): {path/a, path/b, path/value}
      config/jlora_config.json  # format version, jlora version, per-adapter layout/rank/scale/...

The directory is written under a temporary sibling name and renamed into place, so it either
exists complete or not at all; an overwrite swaps the old and new directories atomically, and
replaces only a previous checkpoint (never a directory holding anything else). Every config value is
checked when saving and when loading, so what is written can be read back and a damaged config is a
:class:`CheckpointError` naming the adapter and the field.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import json
import math
import operator
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from jlora._version import __version__
from jlora._atomic import atomic_directory, disk_full_is_clear, resolve
from jlora._node import Layout, LoraKernel, Trainable, factor_problem, kernel_shape
from jlora._paths import nearest
from jlora._quant import shape_of
from jlora._sharding import place_factors, place_like, place_magnitude
from jlora._tree import Flat, host_array, iter_kernels

__all__ = [
    "CheckpointError",
    "FORMAT_VERSION",
    "Restored",
    "TrainCheckpointer",
    "load_adapters",
    "save_adapters",
]

PathLike = Union[str, os.PathLike]

#: Version of the on-disk format written by this jlora. ``load_adapters`` reads every version up to
#: this one and refuses newer ones. Version 2 adds, per adapter, DoRA's magnitude ``m``, the frozen
#: initial factors ``a0``/``b0`` and ``init``/``base_sha256`` of weight-modifying inits, and the
#: ``conv``/``gather`` layout fields; a checkpoint that uses none of them is still written as
#: version 1, so older jlora reads it.
FORMAT_VERSION = 2
_FORMAT = "jlora-adapters"
_CONFIG_ITEM = "config"
_CONFIG_FILE = "jlora_config.json"
_ADAPTERS_ITEM = "adapters"
_OPT_ITEM = "opt_state"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing or corrupt files, a newer format, or a base that
    does not match the one the adapters were trained on."""


def _dtype_name(x: Any) -> str:
    dt = getattr(x, "dtype", None)
    if dt is None:
        dt = np.asarray(x).dtype
    try:
        return str(np.dtype(dt))
    except TypeError:
        return str(dt)


def _digest(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


def _is_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` holds a jlora adapter checkpoint and nothing else: what
    ``save_adapters(..., overwrite=True)`` may replace without losing anything but that checkpoint."""
    try:
        config = json.loads((directory / _CONFIG_ITEM / _CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    if not isinstance(config, dict) or config.get("format") != _FORMAT:
        return False
    ours = (_ADAPTERS_ITEM, _CONFIG_ITEM, "commit_success.txt")
    return all(p.name in ours or p.name.startswith("_") for p in directory.iterdir())  # _*: Orbax's


# ------------------------------------------------------------------------------------------------
# The adapter config: what to store, how to check it, and how to rebuild nodes from it.
# ------------------------------------------------------------------------------------------------
class _Bad(ValueError):
    """A config value that is wrong; the caller says where (a save or a checkpoint file)."""


def _kernel_shape(layout: Layout, a_shape: Any, b_shape: Any) -> tuple[int, ...]:
    """The kernel shape that A and B fit with ``layout`` (A = stack + in + (r,), B = stack + (r,) + out)."""
    a, b, ns = tuple(a_shape), tuple(b_shape), len(layout.stack)
    if (
        len(a) != ns + len(layout.in_) + 1
        or len(b) != ns + 1 + len(layout.out)
        or a[:ns] != b[:ns]
        or a[-1] != b[ns]
    ):
        raise _Bad(
            f"A{a} and B{b} do not fit layout ({layout}): A must be stack + in + (rank,) and B "
            f"stack + (rank,) + out, with the same stack sizes and rank."
        )
    return kernel_shape(layout, a, b)


def _lora_entry(path: str, x: LoraKernel) -> tuple[dict, dict, dict]:
    a, b = host_array(x.a), host_array(x.b)
    shape = _kernel_shape(x.layout, a.shape, b.shape)
    if x.w0 is not None and shape_of(x.w0) != shape:
        raise _Bad(f"A{a.shape} and B{b.shape} do not fit W0 of shape {shape_of(x.w0)} (layout {x.layout})")
    why = factor_problem(x) if x.m is not None or x.a0 is not None else None  # m / A0 / B0 fit the kernel
    if why is not None:
        raise _Bad(why)
    entry = {
        "kind": "lora",
        "layout": x.layout.to_json(),
        "rank": int(a.shape[-1]),
        "scale": float(x.scale),
        "dropout": float(x.dropout),
        "dtype": str(a.dtype),
        "a_shape": list(a.shape),
        "b_shape": list(b.shape),
    }
    arrays = {f"{path}/a": a, f"{path}/b": b}
    if x.rslora:
        entry["rslora"] = True
    if x.m is not None:  # DoRA
        arrays[f"{path}/m"] = m = host_array(x.m)
        entry["m_dtype"] = str(m.dtype)
    if x.a0 is not None:  # PiSSA / OLoRA: the frozen initial factors
        arrays[f"{path}/a0"], arrays[f"{path}/b0"] = a0, b0 = host_array(x.a0), host_array(x.b0)
        if a0.dtype != a.dtype or b0.dtype != b.dtype:
            raise _Bad(f"its initial factors A0/B0 ({a0.dtype}/{b0.dtype}) are not of A's dtype {a.dtype}")
    if x.init is not None:
        entry["init"] = x.init
        if x.base_sha256 is None:
            raise _Bad(f"init {x.init!r} modified or moved part of the base, but no base_sha256 records which base")
        entry["base_sha256"] = x.base_sha256
    # The adapters tree of `jlora.split` has no W0: its shape follows from A and B, its dtype is unknown.
    fingerprint = {"shape": list(shape), "dtype": None if x.w0 is None else _dtype_name(x.w0)}
    return entry, fingerprint, arrays


def _collect(params: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
    """``(entries, fingerprint, arrays)`` for the trainable leaves of ``params`` (injected params or
    the adapters tree of :func:`jlora.split`)."""
    entries: dict[str, Any] = {}
    fingerprint: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for path, x in iter_kernels(params):
        if path in entries:
            raise _Bad(f"adapter {path!r}: two leaves have this path (a key with '/' spells a nesting)")
        try:
            if isinstance(x, LoraKernel):
                if x.a is None or x.b is None:
                    raise _Bad("a LoraKernel without A/B (a split-off base?)")
                entries[path], fingerprint[path], new = _lora_entry(path, x)
            else:  # Trainable
                if x.value is None:
                    raise _Bad("Trainable(None) (a split-off base?)")
                v = host_array(x.value)
                entries[path] = {"kind": "full", "dtype": str(v.dtype), "shape": list(v.shape)}
                fingerprint[path] = {"shape": list(v.shape), "dtype": str(v.dtype)}
                new = {f"{path}/value": v}
        except _Bad as err:
            raise _Bad(f"adapter {path!r}: {err}") from None
        arrays.update(new)
    if not arrays:
        raise ValueError(
            "params hold no adapters (no LoraKernel or Trainable node); pass the params returned by "
            "jlora.inject (or their adapters, jlora.split(params)[0])."
        )
    return entries, fingerprint, arrays


def _make_config(params: Any, metadata: Optional[Mapping[str, Any]], **extra: Any) -> tuple[dict, dict]:
    """The config (with ``extra`` entries) and the arrays to write; refuses what loading would refuse."""

    try:
        entries, fingerprint, arrays = _collect(params)
        for key, arr in arrays.items():
            path, _, name = key.rpartition("/")
            entries[path].setdefault("sha256", {})[name] = _digest(arr)
        config = {
            "format": _FORMAT,
            "format_version": _needed_version(entries),
            "jlora_version": __version__,
            "adapters": entries,
            "base_fingerprint": fingerprint,
            "metadata": _json_metadata(metadata),
            **extra,
        }
        _check_entries(config)
    except _Bad as err:
        raise ValueError(f"Cannot save the adapters: {err}; load_adapters would refuse it.") from None
    return config, arrays


def _needed_version(entries: Mapping[str, Any]) -> int:
    """1 unless an adapter uses what version 2 added (so older jlora reads plain checkpoints)."""
    new = ("m_dtype", "init", "base_sha256")
    for e in entries.values():
        if any(k in e for k in new) or any(k in e.get("layout", {}) for k in ("conv", "gather")):
            return 2
        if "a0" in e.get("sha256", {}):
            return 2
    return 1


def _json_metadata(metadata: Optional[Mapping[str, Any]]) -> Optional[dict]:
    if metadata is None:
        return None
    try:
        json.dumps(dict(metadata))
    except (TypeError, ValueError) as e:
        raise TypeError(f"metadata must be JSON-serializable: {e}") from None
    return dict(metadata)


# -- checking a config: every value that is read, with the adapter path and the field named --------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_shape(v: Any) -> bool:
    return isinstance(v, list) and all(_is_int(n) and n >= 0 for n in v)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_dtype(v: Any, *, floating: bool = False) -> bool:
    try:
        dt = jnp.dtype(v) if isinstance(v, str) else None
    except TypeError:
        return False
    if dt is None:
        return False
    if floating:
        return bool(jnp.issubdtype(dt, jnp.floating))
    return bool(jnp.issubdtype(dt, jnp.number) or dt == jnp.bool_)


def _get(d: dict, key: str, ok: Callable[[Any], bool], what: str, *, prefix: str = "") -> Any:
    """``d[key]``, or a :class:`_Bad` saying that it is missing or what it should be."""
    if key not in d:
        raise _Bad(f"{prefix}has no {key!r}")
    v = d[key]
    if not ok(v):
        shown = repr(v) if len(repr(v)) <= 80 else repr(v)[:77] + "..."
        raise _Bad(f"{prefix}{key} {shown} is not {what}")
    return v


def _layout(v: Any) -> Layout:
    axes = lambda x: isinstance(x, list) and all(_is_int(i) for i in x)
    ok = (isinstance(v, dict) and {"stack", "in", "out"} <= set(v) <= {"stack", "in", "out", "conv", "gather"}
          and all(axes(v[k]) for k in v if k != "gather") and v.get("gather", False) in (True, False))
    if not ok:
        raise _Bad(f"layout {v!r} is not {{'stack': [...], 'in': [...], 'out': [...]}} of axis numbers "
                   f"(with optional 'conv': [...] and 'gather': true)")
    try:
        return Layout.from_json(v)
    except ValueError as err:
        raise _Bad(f"layout {v!r} is not a layout: {err}") from None


def _check_lora(e: dict) -> tuple[int, ...]:
    """Check a ``'lora'`` entry; returns the kernel shape that its A and B fit."""
    layout = _layout(_get(e, "layout", lambda v: True, ""))
    rank = _get(e, "rank", lambda v: _is_int(v) and v > 0, "a positive int")
    _get(e, "scale", lambda v: _is_number(v) and math.isfinite(v) and v > 0, "a finite number > 0")
    _get(e, "dropout", lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)")
    _get(e, "dtype", lambda v: _is_dtype(v, floating=True), "the name of a floating dtype")
    a = _get(e, "a_shape", _is_shape, "a shape (a list of ints >= 0)")
    b = _get(e, "b_shape", _is_shape, "a shape (a list of ints >= 0)")
    shape = _kernel_shape(layout, a, b)
    if a[-1] != rank:
        raise _Bad(f"rank {rank} does not match A{tuple(a)} and B{tuple(b)}")
    if "m_dtype" in e:
        _get(e, "m_dtype", lambda v: _is_dtype(v, floating=True), "the name of a floating dtype")
    if "rslora" in e:
        _get(e, "rslora", lambda v: isinstance(v, bool), "true or false")
    if "init" in e:
        _get(e, "init", lambda v: isinstance(v, str) and bool(v), "the name of an init")
        _get(e, "base_sha256", lambda v: isinstance(v, str) and len(v) == 64, "a sha256 hex digest")
    return shape


def _lora_names(e: dict) -> list[str]:
    """The arrays a 'lora' entry stores: a, b, DoRA's m, the initial factors a0, b0."""
    names = ["a", "b"]
    if "m_dtype" in e:
        names.append("m")
    if "a0" in e.get("sha256", {}):
        names += ["a0", "b0"]
    return sorted(names)


def _check_entry(e: Any, fp: Any) -> None:
    if not isinstance(e, dict):
        raise _Bad(f"{e!r} is not a mapping")
    kind = _get(e, "kind", lambda v: v in ("lora", "full"), "'lora' or 'full'")
    if kind == "lora":
        shape, names = _check_lora(e), _lora_names(e)
    else:
        _get(e, "dtype", _is_dtype, "the name of a numeric or bool dtype")
        shape, names = tuple(_get(e, "shape", _is_shape, "a shape (a list of ints >= 0)")), ["value"]
    digests = lambda v: isinstance(v, dict) and sorted(v) == names and all(isinstance(h, str) for h in v.values())
    _get(e, "sha256", digests, f"a mapping of {names} to sha256 hex digests")
    if not isinstance(fp, dict):
        raise _Bad("has no base_fingerprint entry" if fp is None else f"base_fingerprint {fp!r} is no mapping")
    fp_shape = _get(fp, "shape", _is_shape, "a shape (a list of ints >= 0)", prefix="base_fingerprint ")
    if tuple(fp_shape) != shape:
        raise _Bad(f"base_fingerprint shape {fp_shape} does not match the shape {shape} its arrays fit")
    _get(fp, "dtype", lambda v: v is None or _is_dtype(v), "a dtype name or null", prefix="base_fingerprint ")


def _check_opt_state(s: Any) -> None:
    """The optimizer-state record of a :class:`TrainCheckpointer` step: None or paths/shapes/dtypes."""
    if s is None:
        return
    if not isinstance(s, dict):
        raise _Bad(f"opt_state {s!r} is not a mapping or null")
    p = "opt_state "
    listed = lambda v, ok, n=None: isinstance(v, list) and n in (None, len(v)) and all(map(ok, v))
    paths = _get(s, "paths", lambda v: listed(v, lambda x: isinstance(x, str)), "a list of key paths", prefix=p)
    n = len(paths)
    _get(s, "shapes", lambda v: listed(v, _is_shape, n), f"a list of {n} shapes", prefix=p)
    _get(s, "dtypes", lambda v: listed(v, _is_dtype, n), f"a list of {n} dtype names", prefix=p)
    if "sha256" in s:  # written since the optimizer state is verified too; older steps lack it
        _get(s, "sha256", lambda v: listed(v, lambda h: isinstance(h, str), n), f"a list of {n} digests", prefix=p)


def _check_entries(config: dict) -> None:
    """Check every value that loading reads; raises :class:`_Bad` naming the adapter and the field."""
    fingerprint = config["base_fingerprint"]
    for path, e in config["adapters"].items():
        try:
            _check_entry(e, fingerprint.get(path))
        except _Bad as err:
            raise _Bad(f"adapter {path!r}: {err}") from None
    if "opt_state" in config:
        _check_opt_state(config["opt_state"])
    if "step" in config:
        _get(config, "step", lambda v: _is_int(v) and v >= 0, "an int >= 0")


def _check_config(config: Any, where: Path) -> dict:
    fmt = config.get("format") if isinstance(config, dict) else None
    if fmt != _FORMAT:
        raise CheckpointError(f"{where} is not a jlora adapter config (format={fmt!r}).")
    version = config.get("format_version")
    if not _is_int(version) or version < 1:
        raise CheckpointError(f"{where}: format_version {version!r} is not a format version (an int >= 1).")
    if version > FORMAT_VERSION:

        raise CheckpointError(
            f"{where} was written by jlora {config.get('jlora_version')} in format version {version}; "
            f"this jlora {__version__} reads format versions up to {FORMAT_VERSION}. Upgrade jlora."
        )
    for key in ("adapters", "base_fingerprint"):
        if not isinstance(config.get(key), dict):
            raise CheckpointError(f"{where}: config has no {key!r} mapping.")
    if not config["adapters"]:
        raise CheckpointError(f"{where}: config lists no adapters (no jlora save writes that).")
    try:
        _check_entries(config)
    except _Bad as err:
        raise CheckpointError(f"{where}: {err}.") from None
    return config


# -- rebuilding nodes over a base (from a checked config) -------------------------------------------
def _abstract(config: dict) -> dict[str, jax.ShapeDtypeStruct]:
    """The arrays a (checked) config describes, by key."""
    out = {}
    for path, e in config["adapters"].items():
        dtype = jnp.dtype(e["dtype"])
        if e["kind"] == "lora":
            out[f"{path}/a"] = jax.ShapeDtypeStruct(tuple(e["a_shape"]), dtype)
            out[f"{path}/b"] = jax.ShapeDtypeStruct(tuple(e["b_shape"]), dtype)
            if "m_dtype" in e:
                layout = Layout.from_json(e["layout"])
                m_shape = layout.m_shape(kernel_shape(layout, e["a_shape"], e["b_shape"]))
                out[f"{path}/m"] = jax.ShapeDtypeStruct(m_shape, jnp.dtype(e["m_dtype"]))
            if "a0" in e["sha256"]:
                out[f"{path}/a0"] = jax.ShapeDtypeStruct(tuple(e["a_shape"]), dtype)
                out[f"{path}/b0"] = jax.ShapeDtypeStruct(tuple(e["b_shape"]), dtype)
        else:
            out[f"{path}/value"] = jax.ShapeDtypeStruct(tuple(e["shape"]), dtype)
    return out


def _check_base_leaf(plain: Any, path: str, fp: dict, where: str) -> None:
    """Refuse a base leaf that is not the one the adapters were trained on (shape, and dtype if known)."""
    if plain is None:
        raise CheckpointError(
            f"{where}: base leaf {path!r} is None; load over the plain params the adapters were trained "
            f"on (not an adapters tree)."
        )
    got_shape, got_dtype = shape_of(plain), _dtype_name(plain)
    if list(got_shape) != fp["shape"]:
        raise CheckpointError(
            f"{where}: base leaf {path!r} has shape {got_shape}, the adapters were trained on "
            f"shape {tuple(fp['shape'])}."
        )
    if fp["dtype"] is not None and got_dtype != fp["dtype"]:
        raise CheckpointError(
            f"{where}: base leaf {path!r} has dtype {got_dtype}, the adapters were trained on "
            f"dtype {fp['dtype']}. Cast the base (e.g. jax.tree.map(lambda x: x.astype(...), base)) "
            f"to the dtype it had when saving."
        )


def _check_modified_base(plain: Any, path: str, e: dict, where: str) -> None:
    """An adapter from a weight-modifying init is valid only over the exact base it was made on."""
    if "base_sha256" not in e:
        return
    from jlora._init import fingerprint

    if fingerprint(plain) != e["base_sha256"]:
        kind = e.get("init", "")
        what = ("LoftQ's NF4-quantized weights (re-create them with jlora.inject(original, ..., init="
                f"{kind!r}) on the same original weights, or save them)" if kind.startswith("loftq")
                else f"the original weights it was initialised from ({kind}: its frozen A0·B0 came from them)")
        raise CheckpointError(
            f"{where}: base leaf {path!r} is not the base this {kind} adapter was trained over (its sha256 "
            f"differs from the one recorded); load it over {what}.")


def _node(plain: Any, path: str, e: dict, arrays: Mapping[str, Any]) -> Any:
    """The LoraKernel / Trainable of entry ``e`` over the base leaf ``plain``."""
    if e["kind"] == "full":
        return Trainable(place_like(plain, arrays[f"{path}/value"]))
    layout = Layout.from_json(e["layout"])
    a, b = place_factors(plain, layout, arrays[f"{path}/a"], arrays[f"{path}/b"])  # sharded like the base
    a0 = b0 = None
    if f"{path}/a0" in arrays:
        a0, b0 = place_factors(plain, layout, arrays[f"{path}/a0"], arrays[f"{path}/b0"])
    m = arrays.get(f"{path}/m")
    return LoraKernel(plain, a, b, layout=layout, scale=float(e["scale"]), dropout=float(e["dropout"]),
                      m=None if m is None else place_magnitude(plain, layout, jnp.asarray(m)), a0=a0, b0=b0,
                      rslora=bool(e.get("rslora", False)),
                      init=e.get("init"), base_sha256=e.get("base_sha256"))


def _rebuild(base: Any, config: dict, arrays: Mapping[str, Any], *, where: str) -> Any:
    """Injected params: ``base`` with the adapters of ``config`` / ``arrays`` put back.

    Adapters already in ``base`` are dropped first (a LoraKernel becomes its ``w0``, a Trainable
    its value), so the result holds exactly the checkpoint's adapters.
    """
    entries: dict = config["adapters"]
    flat = Flat.of(base)
    paths = flat.paths
    count = collections.Counter(paths)
    missing = [p for p in entries if count[p] != 1]
    if missing and count[missing[0]] > 1:
        raise CheckpointError(f"{where}: {count[missing[0]]} base leaves have the path {missing[0]!r}.")
    if missing:
        raise CheckpointError(
            f"{where}: adapted path {missing[0]!r} is not in base (nearest base paths: "
            f"{nearest(missing[0], paths, 3)}). Load over the params the adapters were trained on."
        )
    leaves = []
    for path, x in zip(paths, flat.plain_leaves()):
        if path in entries:
            _check_base_leaf(x, path, config["base_fingerprint"][path], where)
            _check_modified_base(x, path, entries[path], where)
            x = _node(x, path, entries[path], arrays)
        leaves.append(x)
    return jax.tree_util.tree_unflatten(flat.treedef, leaves)


def _verify_arrays(
    arrays: Mapping[str, Any], specs: Mapping[str, jax.ShapeDtypeStruct], digests: Mapping[str, Optional[str]], where: Path
) -> None:
    """Every array of ``specs`` is in ``arrays`` with that shape and dtype, and its sha256 where known."""
    for key, spec in specs.items():
        if key not in arrays:
            raise CheckpointError(f"{where}: array {key!r} is missing.")
        x = host_array(arrays[key])
        if x.shape != spec.shape or x.dtype != spec.dtype:
            raise CheckpointError(
                f"{where}: array {key!r} is {x.dtype}{list(x.shape)}, the config says "
                f"{spec.dtype}{list(spec.shape)}."
            )
        if digests.get(key) is not None and _digest(x) != digests[key]:
            raise CheckpointError(f"{where}: array {key!r} is corrupt (its sha256 does not match the config).")


def _verify(config: dict, arrays: Mapping[str, Any], where: Path) -> None:
    """The adapters' arrays are the ones the config lists (shape, dtype, sha256)."""
    digests = {
        f"{path}/{name}": digest for path, e in config["adapters"].items() for name, digest in e["sha256"].items()
    }
    _verify_arrays(arrays, _abstract(config), digests, where)


def _read_config(ckpt: Path) -> dict:
    file = ckpt / _CONFIG_ITEM / _CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(
            f"{ckpt} is not a (complete) jlora checkpoint: {file.relative_to(ckpt)} is missing."
        )
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is corrupt: {e}") from None
    return _check_config(config, file)


def _composite_checkpointer():
    import orbax.checkpoint as ocp

    return ocp.Checkpointer(
        ocp.CompositeCheckpointHandler(
            **{
                _ADAPTERS_ITEM: ocp.StandardCheckpointHandler(),
                _CONFIG_ITEM: ocp.JsonCheckpointHandler(filename=_CONFIG_FILE),
            }
        )
    )


# ------------------------------------------------------------------------------------------------
# Public: save_adapters / load_adapters
# ------------------------------------------------------------------------------------------------
def save_adapters(
    directory: PathLike,
    params: Any,
    *,
    overwrite: bool = False,
    metadata: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Save the adapters of injected ``params`` (A, B, fully trained leaves) with Orbax.

    Only the trainable leaves are written (megabytes, not the gigabytes of the base), as a flat
    dict keyed by '/'-joined path, together with a JSON config holding everything
    :func:`load_adapters` needs besides the base: per adapted kernel its layout, rank, scale,
    dropout and dtype, the shape and dtype of the base leaf (to refuse a different base), a
    checksum per array, the format version and the jlora version.

    The checkpoint is written into a hidden temporary sibling directory and renamed into place,
    so ``directory`` is never seen half-written. An existing, non-empty ``directory`` is refused
    unless ``overwrite=True``, and even then unless it holds a jlora checkpoint and nothing else
    (other files in it, a tokenizer or a folder of checkpoints, are never deleted); the old and new
    checkpoints are then swapped atomically (a crash leaves either the complete old or the complete
    new one). Nothing that :func:`load_adapters` would refuse is written.

    Args:
        directory: Where to write; created with its parents.
        params: Injected params (with :class:`~jlora.LoraKernel` / :class:`~jlora.Trainable` nodes),
            or their adapters tree, ``jlora.split(params)[0]`` (the base's shape is then derived
            from A and B, and its dtype is not recorded).
        overwrite: Replace a previous checkpoint at ``directory``.
        metadata: JSON-serializable extra information stored in the config (``"metadata"``).

    Returns:
        The absolute path of the checkpoint.

    Raises:
        FileExistsError: ``directory`` is not empty and ``overwrite`` is False, or it holds
            something other than a jlora checkpoint.
        ValueError: ``params`` hold no adapters, or adapters that could not be loaded back (A and B
            that do not fit W0 or each other, a scale that is not finite and positive, ...).
        OSError: With ``errno.ENOSPC`` (``EDQUOT``), the disk (quota) filled up; ``directory`` is
            unchanged.

    Example:
        >>> import tempfile, os, jax.numpy as jnp, jlora
        >>> k = jlora.LoraKernel(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.ones((2, 3)),
        ...                      layout=jlora.Layout((), (0,), (1,)), scale=0.5)
        >>> d = os.path.join(tempfile.mkdtemp(), "step_10")
        >>> _ = save_adapters(d, {"w": k, "bias": jnp.zeros(3)})
        >>> sorted(os.listdir(d))  # Orbax may add a commit_success.txt
        ['_CHECKPOINT_METADATA', 'adapters', ...'config']
        >>> sorted(os.listdir(os.path.join(d, "config")))
        [...'jlora_config.json']
        >>> load_adapters(d, {"w": jnp.ones((4, 3)), "bias": jnp.zeros(3)})["w"]
        LoraKernel(w0=float32[4, 3], a=float32[4, 2], b=float32[2, 3], layout=(in=[0] out=[1]), scale=0.5)
    """
    import orbax.checkpoint as ocp

    if jax.process_count() > 1:
        raise NotImplementedError(
            "save_adapters writes from a single process; in a multi-process job use "
            "jlora.TrainCheckpointer (Orbax CheckpointManager) instead."
        )
    config, arrays = _make_config(params, metadata)
    target = Path(directory).absolute()
    with atomic_directory(target, overwrite=overwrite, replaceable=_is_checkpoint, kind="jlora checkpoint") as tmp:
        ckptr = _composite_checkpointer()
        try:
            ckptr.save(
                tmp,
                args=ocp.args.Composite(
                    **{_ADAPTERS_ITEM: ocp.args.StandardSave(arrays), _CONFIG_ITEM: ocp.args.JsonSave(config)}
                ),
            )
        finally:
            ckptr.close()
    return target


def load_adapters(directory: PathLike, base: Any) -> Any:
    """Load adapters saved by :func:`save_adapters` over ``base``; returns injected params.

    ``base`` is the plain params (the original structure, no adapters), or injected params whose
    adapters are replaced by the checkpoint's (kernels adapted in ``base`` but not in the
    checkpoint go back to plain). The nodes are rebuilt from the stored config, so the result works
    with any ``apply`` wrapped around the same ``apply_fn``.

    Args:
        directory: A checkpoint written by :func:`save_adapters`.
        base: The params the adapters were trained on.

    Returns:
        ``base`` with a :class:`~jlora.LoraKernel` / :class:`~jlora.Trainable` node at every
        adapted path.

    Raises:
        FileNotFoundError: No checkpoint at ``directory``.
        CheckpointError: Missing or corrupt files, a format version newer than this jlora reads,
            or a base that does not match (naming the first path that does not).

    Example:
        >>> import tempfile, os, jax.numpy as jnp, jlora
        >>> k = jlora.LoraKernel(jnp.zeros((4, 3)), jnp.ones((4, 2)), jnp.ones((2, 3)),
        ...                      layout=jlora.Layout((), (0,), (1,)), scale=0.5)
        >>> d = os.path.join(tempfile.mkdtemp(), "ckpt")
        >>> _ = save_adapters(d, {"w": k})
        >>> p = load_adapters(d, {"w": jnp.zeros((4, 3))})
        >>> jlora.merge(p)["w"][0]
        Array([1., 1., 1.], dtype=float32)
        >>> load_adapters(d, {"w": jnp.zeros((5, 3))})
        Traceback (most recent call last):
        ...
        jlora._checkpoint.CheckpointError: ...: base leaf 'w' has shape (5, 3), the adapters were trained on shape (4, 3).
    """
    import orbax.checkpoint as ocp

    try:
        ckpt = resolve(directory)
    except NotADirectoryError as e:
        raise CheckpointError(str(e)) from None
    config = _read_config(ckpt)
    target = _abstract(config)
    if not (ckpt / _ADAPTERS_ITEM).is_dir():
        raise CheckpointError(f"{ckpt} is not a (complete) jlora checkpoint: {_ADAPTERS_ITEM}/ is missing.")
    ckptr = _composite_checkpointer()
    try:
        restored = ckptr.restore(
            ckpt, args=ocp.args.Composite(**{_ADAPTERS_ITEM: ocp.args.StandardRestore(target)})
        )[_ADAPTERS_ITEM]
    except Exception as e:  # Orbax / TensorStore errors come in many types
        raise CheckpointError(f"{ckpt}/{_ADAPTERS_ITEM} could not be read (missing or corrupt files): {e}") from e
    finally:
        ckptr.close()
    _verify(config, restored, ckpt)
    return _rebuild(base, config, restored, where=str(ckpt))


# ------------------------------------------------------------------------------------------------
# Training-loop checkpoints
# ------------------------------------------------------------------------------------------------
class Restored(NamedTuple):
    """What :meth:`TrainCheckpointer.restore` returns."""

    params: Any
    opt_state: Any
    step: int


def _flat_state(opt_state: Any) -> tuple[dict[str, np.ndarray], list[str]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(opt_state)
    arrays, names = {}, []
    for i, (p, x) in enumerate(flat):
        arrays[f"{i:06d}"] = host_array(x)
        names.append(jax.tree_util.keystr(p))
    return arrays, names


def _opt_state_target(saved: Any, opt_state_like: Any, where: Path) -> tuple[Any, list, dict]:
    """``(treedef, leaves of opt_state_like, abstract arrays to restore)``; refuses a state whose
    structure, shapes or dtypes differ from the saved one."""
    if saved is None:
        raise CheckpointError(f"{where} holds no optimizer state; pass opt_state_like=None.")
    flat, treedef = jax.tree_util.tree_flatten_with_path(opt_state_like)
    names = [jax.tree_util.keystr(p) for p, _ in flat]
    if len(names) != len(saved["paths"]):
        raise CheckpointError(
            f"{where}: the optimizer state has {len(saved['paths'])} leaves, opt_state_like has "
            f"{len(names)}; build it with the same optimizer over the same adapted params."
        )
    for i, (name, (_, x)) in enumerate(zip(names, flat)):
        want = (saved["paths"][i], tuple(saved["shapes"][i]), saved["dtypes"][i])
        got = (name, shape_of(x), _dtype_name(x))
        if got != want:
            raise CheckpointError(
                f"{where}: optimizer-state leaf {i} is {want[0]} {want[1]} {want[2]} in the "
                f"checkpoint but {got[0]} {got[1]} {got[2]} in opt_state_like."
            )
    abstract = {
        f"{i:06d}": jax.ShapeDtypeStruct(tuple(s), jnp.dtype(d))
        for i, (s, d) in enumerate(zip(saved["shapes"], saved["dtypes"]))
    }
    return treedef, [x for _, x in flat], abstract


def _opt_state_from(got: Mapping[str, Any], saved: dict, treedef: Any, like: list, where: Path) -> Any:
    """The restored optimizer state, its leaves checked against the record ``saved`` and placed
    (sharded) like the leaves of ``opt_state_like``."""
    keys = [f"{i:06d}" for i in range(len(like))]
    names = [f"opt_state leaf {i} {p}" for i, p in enumerate(saved["paths"])]
    specs = [jax.ShapeDtypeStruct(tuple(s), jnp.dtype(d)) for s, d in zip(saved["shapes"], saved["dtypes"])]
    digests = saved.get("sha256") or [None] * len(keys)  # steps saved before it was recorded lack it
    _verify_arrays(
        {n: got[k] for n, k in zip(names, keys) if k in got}, dict(zip(names, specs)), dict(zip(names, digests)), where
    )
    return jax.tree_util.tree_unflatten(treedef, [place_like(x, got[k]) for x, k in zip(like, keys)])


def _int_arg(name: str, value: Any, *, minimum: int, none_ok: bool = False) -> Optional[int]:
    """``value`` as an int >= ``minimum``; a float, a bool or a string is a TypeError, not a guess."""
    if value is None and none_ok:
        return None
    what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    message = f"{name} must be {what}{' or None' if none_ok else ''}, got {value!r}."
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(message)
    try:
        n = operator.index(value)  # ints, numpy integers, 0-d integer arrays
    except TypeError:
        raise TypeError(message) from None
    if n < minimum:
        raise ValueError(message)
    return n


class TrainCheckpointer:
    """Periodic training checkpoints (adapters + optimizer state + step) on Orbax's
    ``CheckpointManager``, keeping the last ``keep``.

    Each step directory ``<directory>/<step>/`` holds three Orbax items: ``adapters`` (the same
    flat dict as :func:`save_adapters`), ``opt_state`` (the optimizer state's leaves in flattening
    order) and ``config`` (the adapter config plus the step and the optimizer state's key paths).
    Orbax finalizes each step atomically, so an interrupted save is never restored.

    Args:
        directory: Root directory of the step checkpoints (created).
        every: Save when ``step % every == 0`` (``save(..., force=True)`` saves any step); a
            positive int.
        keep: How many of the most recent checkpoints to keep, a positive int (None: all).
        async_save: Write in a background thread (Orbax async checkpointing); the arrays are
            copied to host before :meth:`save` returns, so the caller may go on updating them.
        metadata: JSON-serializable extra information stored in every step's config.

    Raises:
        TypeError: ``every`` or ``keep`` is not an int (a float, a bool or a string is not guessed
            at), or ``metadata`` is not JSON-serializable.
        ValueError: ``every`` or ``keep`` is < 1.

    Example:
        >>> import tempfile, jax.numpy as jnp, optax, jlora
        >>> k = jlora.LoraKernel(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)),
        ...                      layout=jlora.Layout((), (0,), (1,)), scale=1.0)
        >>> params = {"w": k}
        >>> tx = jlora.optimizer(optax.adam(1e-2), params)
        >>> opt_state = tx.init(params)
        >>> with TrainCheckpointer(tempfile.mkdtemp(), every=2, keep=2) as ckpt:
        ...     for step in range(1, 7):
        ...         _ = ckpt.save(step, params, opt_state)
        ...     print(ckpt.all_steps())
        ...     params2, opt_state2, step = ckpt.restore({"w": jnp.ones((4, 3))}, opt_state)
        [4, 6]
        >>> step, params2["w"].rank
        (6, 2)
    """

    def __init__(
        self,
        directory: PathLike,
        *,
        every: int = 1,
        keep: Optional[int] = None,
        async_save: bool = False,
        metadata: Optional[Mapping[str, Any]] = None,
    ):
        import orbax.checkpoint as ocp

        self.every = _int_arg("every", every, minimum=1)
        self.keep = _int_arg("keep", keep, minimum=1, none_ok=True)
        self.directory = Path(directory).absolute()
        self._metadata = _json_metadata(metadata)
        policies = getattr(ocp, "checkpoint_managers", None)
        if policies is not None and hasattr(policies, "FixedIntervalPolicy"):
            # Exactly step % every == 0 (the default policy would also save the first step).
            schedule = {"save_decision_policy": policies.FixedIntervalPolicy(self.every)}
        else:  # pragma: no cover - older Orbax
            schedule = {"save_interval_steps": self.every}
        options = ocp.CheckpointManagerOptions(
            **schedule,
            max_to_keep=self.keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                _ADAPTERS_ITEM: ocp.StandardCheckpointHandler(),
                _OPT_ITEM: ocp.StandardCheckpointHandler(),
                _CONFIG_ITEM: ocp.JsonCheckpointHandler(filename=_CONFIG_FILE),
            },
        )

    # -- saving ---------------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        """Whether :meth:`save` at ``step`` writes a checkpoint."""
        return self._manager.should_save(_int_arg("step", step, minimum=0))

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Report a full disk as a short ``OSError(ENOSPC)`` and drop the partial step it left."""
        try:
            with disk_full_is_clear(self.directory, "the step being written is dropped, the others are intact."):
                yield
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT) and jax.process_count() == 1:
                for partial in self.directory.glob("*.orbax-checkpoint-tmp*"):  # nothing is in flight now
                    shutil.rmtree(partial, ignore_errors=True)
            raise

    def save(self, step: int, params: Any, opt_state: Any = None, *, force: bool = False) -> bool:
        """Save adapters, optimizer state and ``step`` if ``step`` is due (or ``force``).

        Args:
            step: The number of optimizer steps taken so far (an int >= 0).
            params: Injected params, or their adapters tree ``jlora.split(params)[0]``.
            opt_state: The optimizer state (``jlora.optimizer(...).init(params)`` and its updates),
                or None to save the adapters only.
            force: Save even if ``step`` is not a multiple of ``every``.

        Returns:
            Whether a checkpoint was written.

        Raises:
            ValueError: ``params`` hold adapters that could not be loaded back (see
                :func:`save_adapters`).
            OSError: With ``errno.ENOSPC``, the disk filled up (this step, or an earlier one saved
                in the background); the steps already saved are intact.
        """
        import orbax.checkpoint as ocp

        step = _int_arg("step", step, minimum=0)
        if not force and not self.should_save(step):
            return False
        opt_arrays, record = {}, None
        if opt_state is not None:
            opt_arrays, names = _flat_state(opt_state)
            record = {
                "paths": names,
                "shapes": [list(a.shape) for a in opt_arrays.values()],
                "dtypes": [str(a.dtype) for a in opt_arrays.values()],
                "sha256": [_digest(a) for a in opt_arrays.values()],
            }
        config, arrays = _make_config(params, self._metadata, step=step, opt_state=record)
        items = {_ADAPTERS_ITEM: ocp.args.StandardSave(arrays), _CONFIG_ITEM: ocp.args.JsonSave(config)}
        if opt_arrays:
            items[_OPT_ITEM] = ocp.args.StandardSave(opt_arrays)
        with self._writing():
            return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=force))

    # -- restoring ------------------------------------------------------------------------------
    def latest_step(self) -> Optional[int]:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the checkpoints on disk, oldest first."""
        return sorted(self._manager.all_steps())

    def restore(self, base: Any, opt_state_like: Any = None, *, step: Optional[int] = None) -> Restored:
        """Restore the latest (or the given) step's adapters over ``base`` and its optimizer state.

        Args:
            base: The plain base params (or injected params whose adapters are replaced).
            opt_state_like: An optimizer state with the structure to restore into, e.g.
                ``tx.init(params)`` for freshly injected params, or its ``jax.eval_shape``. None
                restores no optimizer state (``Restored.opt_state`` is None).
            step: The step to restore; None for the latest.

        Returns:
            ``Restored(params, opt_state, step)``.

        Raises:
            FileNotFoundError: There is no checkpoint (at ``step``).
            CheckpointError: The checkpoint does not match ``base`` or ``opt_state_like``.
        """
        import orbax.checkpoint as ocp

        self.wait()
        if step is None:
            step = self._manager.latest_step()
            if step is None:
                raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        step = _int_arg("step", step, minimum=0)
        if step not in self._manager.all_steps():
            raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory} (have {self.all_steps()}).")
        where = self.directory / str(step)
        config = _read_config(where)
        items = {_ADAPTERS_ITEM: ocp.args.StandardRestore(_abstract(config))}
        if opt_state_like is not None:
            opt_treedef, opt_like, abstract = _opt_state_target(config.get("opt_state"), opt_state_like, where)
            if abstract:
                items[_OPT_ITEM] = ocp.args.StandardRestore(abstract)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise CheckpointError(f"{where} could not be read (missing or corrupt files): {e}") from e
        arrays = restored[_ADAPTERS_ITEM]
        _verify(config, arrays, where)
        params = _rebuild(base, config, arrays, where=str(where))
        opt_state = None
        if opt_state_like is not None:
            got = restored[_OPT_ITEM] if _OPT_ITEM in items else {}
            opt_state = _opt_state_from(got, config["opt_state"], opt_treedef, opt_like, where)
        return Restored(params, opt_state, step)

    # -- lifecycle ------------------------------------------------------------------------------
    def wait(self) -> None:
        """Block until a background (async) save has finished (raising what made it fail)."""
        with self._writing():
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> "TrainCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TrainCheckpointer({str(self.directory)!r}, every={self.every}, keep={self.keep})"
