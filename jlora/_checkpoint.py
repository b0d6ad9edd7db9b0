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
exists complete or not at all; an overwrite swaps the old and new directories atomically.
"""

from __future__ import annotations

import contextlib
from glob import escape as glob_escape
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from jlora._node import Layout, LoraKernel, Trainable
from jlora._paths import nearest, path_str
from jlora._quant import _shape
from jlora._sharding import place_factors, place_like
from jlora._tree import is_unit, iter_kernels

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
#: this one and refuses newer ones.
FORMAT_VERSION = 1
_FORMAT = "jlora-adapters"
_CONFIG_ITEM = "config"
_CONFIG_FILE = "jlora_config.json"
_ADAPTERS_ITEM = "adapters"
_OPT_ITEM = "opt_state"
_TMP_TAG = ".jlora-tmp-"
_OLD_TAG = ".jlora-old-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing or corrupt files, a newer format, or a base that
    does not match the one the adapters were trained on."""


# ------------------------------------------------------------------------------------------------
# Small helpers shared with the PEFT export.
# ------------------------------------------------------------------------------------------------
def _flat(params: Any) -> list[tuple[str, Any]]:
    """``(path, leaf)`` with jlora nodes and quantized kernels kept whole."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_unit)
    return [(path_str(p), x) for p, x in flat]


def _dtype_name(x: Any) -> str:
    dt = getattr(x, "dtype", None)
    if dt is None:
        dt = np.asarray(x).dtype
    try:
        return str(np.dtype(dt))
    except TypeError:
        return str(dt)


def _plain(x: Any) -> Any:
    """The base value under a jlora node (a LoraKernel's ``w0``, a Trainable's value), or ``x``."""
    if isinstance(x, LoraKernel):
        return x.w0
    if isinstance(x, Trainable):
        return x.value
    return x


def _to_numpy(x: Any) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def _digest(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


def _fsync(path: PathLike) -> None:
    """Flush a file or directory (its entries) to disk; best effort: a crash of the process needs
    none of it, a power cut does."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True  # it exists (PermissionError included: another user's process)


def _cleanup_stale(target: Path, *, backups: bool = False) -> None:
    """Remove temporary siblings of ``target`` left by writers that died (killed mid-save), and
    with ``backups`` the old checkpoints moved aside by an interrupted overwrite (only once a
    complete ``target`` exists again)."""
    parent = target.parent
    if not parent.is_dir():
        return
    prefixes = [f".{target.name}{_TMP_TAG}"] + ([f".{target.name}{_OLD_TAG}"] if backups else [])
    for entry in parent.iterdir():
        prefix = next((p for p in prefixes if entry.name.startswith(p)), None)
        if prefix is None:
            continue
        try:
            pid = int(entry.name[len(prefix) :].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE) failed: {os.strerror(err)}")


def _check_target(target: Path, overwrite: bool) -> bool:
    """Whether ``target`` exists with content; raises if it does and ``overwrite`` is False."""
    if not os.path.lexists(target):
        return False
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory.")
    if not any(target.iterdir()):
        return False  # an empty directory holds nothing to lose
    if not overwrite:
        raise FileExistsError(
            f"{target} already exists; pass overwrite=True to replace it (atomically), or choose "
            f"another directory."
        )
    return True


@contextlib.contextmanager
def _atomic_directory(directory: PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``directory``; on success, put it in place atomically.

    On an exception the temporary directory is removed and ``directory`` is untouched. If the
    process is killed, only a hidden ``.<name>.jlora-tmp-<pid>-...`` sibling is left behind (never
    read, and removed by the next write to the same directory).
    """
    target = Path(directory).absolute()
    _check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    _cleanup_stale(target)
    tmp = target.parent / f".{target.name}{_TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        for dirpath, _, files in os.walk(tmp):
            for name in files:
                _fsync(os.path.join(dirpath, name))
            _fsync(dirpath)
        _commit(tmp, target, overwrite)
        _cleanup_stale(target, backups=True)
    finally:
        # The temporary directory, and any sibling a writer derived from its name (Orbax's own
        # `<tmp>.orbax-checkpoint-tmp-*`), are ours to remove.
        for p in target.parent.glob(glob_escape(tmp.name) + "*"):
            shutil.rmtree(p, ignore_errors=True)


def _commit(tmp: Path, target: Path, overwrite: bool) -> None:
    exists = _check_target(target, overwrite)  # re-check: it may have appeared meanwhile
    if not exists:
        if target.is_dir():
            target.rmdir()  # empty; rename cannot replace a directory on every platform
        os.rename(tmp, target)
    elif _exchange(tmp, target):
        # `target` is now the new checkpoint and `tmp` holds the old one (removed by the caller).
        pass
    else:
        # No atomic exchange here: move the old one aside first. A crash between the two renames
        # leaves the complete old checkpoint at `.<name>.jlora-old-...`, which _resolve() finds.
        old = target.parent / f".{target.name}{_OLD_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    _fsync(target.parent)


def _resolve(directory: PathLike) -> Path:
    """The directory to read, recovering from an overwrite interrupted between its two renames."""
    target = Path(directory).absolute()
    if target.is_dir():
        return target
    if os.path.lexists(target):
        raise CheckpointError(f"{target} is not a directory.")
    backups = (
        sorted(target.parent.glob(f".{target.name}{_OLD_TAG}*"), key=lambda p: p.stat().st_mtime)
        if target.parent.is_dir()
        else []
    )
    if backups:
        warnings.warn(
            f"{target} is missing but {backups[-1].name} (the previous checkpoint, moved aside by "
            f"an interrupted overwrite) is complete; reading it.",
            stacklevel=3,
        )
        return backups[-1]
    raise FileNotFoundError(f"No checkpoint at {target}.")


# ------------------------------------------------------------------------------------------------
# The adapter config: what to store, and how to rebuild nodes from it.
# ------------------------------------------------------------------------------------------------
def _collect(params: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
    """``(entries, fingerprint, arrays)`` for the trainable leaves of ``params``."""
    entries: dict[str, Any] = {}
    fingerprint: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for path, x in iter_kernels(params):
        if isinstance(x, LoraKernel):
            if x.a is None or x.b is None:
                raise ValueError(f"{path}: LoraKernel without A/B (a split-off base?) cannot be saved.")
            a, b = _to_numpy(x.a), _to_numpy(x.b)
            arrays[f"{path}/a"], arrays[f"{path}/b"] = a, b
            entries[path] = {
                "kind": "lora",
                "layout": x.layout.to_json(),
                "rank": int(a.shape[-1]),
                "scale": float(x.scale),
                "dropout": float(x.dropout),
                "dtype": str(a.dtype),
                "a_shape": list(a.shape),
                "b_shape": list(b.shape),
            }
            fingerprint[path] = {"shape": list(_shape(x.w0)), "dtype": _dtype_name(x.w0)}
        else:  # Trainable
            if x.value is None:
                raise ValueError(f"{path}: Trainable(None) (a split-off base?) cannot be saved.")
            v = _to_numpy(x.value)
            arrays[f"{path}/value"] = v
            entries[path] = {"kind": "full", "dtype": str(v.dtype), "shape": list(v.shape)}
            fingerprint[path] = {"shape": list(v.shape), "dtype": str(v.dtype)}
    if not arrays:
        raise ValueError(
            "params hold no adapters (no LoraKernel or Trainable node); pass the params returned by "
            "jlora.inject."
        )
    return entries, fingerprint, arrays


def _make_config(params: Any, metadata: Optional[Mapping[str, Any]]) -> tuple[dict, dict]:
    from jlora import __version__

    entries, fingerprint, arrays = _collect(params)
    for key, arr in arrays.items():
        path, _, name = key.rpartition("/")
        entries[path].setdefault("sha256", {})[name] = _digest(arr)
    config = {
        "format": _FORMAT,
        "format_version": FORMAT_VERSION,
        "jlora_version": __version__,
        "adapters": entries,
        "base_fingerprint": fingerprint,
        "metadata": dict(metadata) if metadata is not None else None,
    }
    try:
        json.dumps(config)
    except TypeError as e:
        raise TypeError(f"metadata must be JSON-serializable: {e}") from None
    return config, arrays


def _check_config(config: Any, where: Path) -> dict:
    fmt = config.get("format") if isinstance(config, dict) else None
    if fmt != _FORMAT:
        raise CheckpointError(f"{where} is not a jlora adapter config (format={fmt!r}).")
    version = config.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{where}: format_version {version!r} is not an integer.")
    if version > FORMAT_VERSION:
        from jlora import __version__

        raise CheckpointError(
            f"{where} was written by jlora {config.get('jlora_version')} in format version {version}; "
            f"this jlora {__version__} reads format versions up to {FORMAT_VERSION}. Upgrade jlora."
        )
    for key in ("adapters", "base_fingerprint"):
        if not isinstance(config.get(key), dict):
            raise CheckpointError(f"{where}: config has no {key!r} mapping.")
    return config


def _abstract(config: dict) -> dict[str, jax.ShapeDtypeStruct]:
    out = {}
    for path, e in config["adapters"].items():
        if e.get("kind") == "lora":
            out[f"{path}/a"] = jax.ShapeDtypeStruct(tuple(e["a_shape"]), jnp.dtype(e["dtype"]))
            out[f"{path}/b"] = jax.ShapeDtypeStruct(tuple(e["b_shape"]), jnp.dtype(e["dtype"]))
        elif e.get("kind") == "full":
            out[f"{path}/value"] = jax.ShapeDtypeStruct(tuple(e["shape"]), jnp.dtype(e["dtype"]))
        else:
            raise CheckpointError(f"adapter {path!r} has unknown kind {e.get('kind')!r}.")
    return out


def _rebuild(base: Any, config: dict, arrays: Mapping[str, Any], *, where: str) -> Any:
    """Injected params: ``base`` with the adapters of ``config`` / ``arrays`` put back.

    Adapters already in ``base`` are dropped first (a LoraKernel becomes its ``w0``, a Trainable
    its value), so the result holds exactly the checkpoint's adapters.
    """
    entries: dict = config["adapters"]
    fingerprint: dict = config["base_fingerprint"]
    flat, treedef = jax.tree_util.tree_flatten_with_path(base, is_leaf=is_unit)
    paths = [path_str(p) for p, _ in flat]
    index = {p: i for i, p in enumerate(paths)}
    for path in entries:
        if path not in index:
            raise CheckpointError(
                f"{where}: adapted path {path!r} is not in base (nearest base paths: "
                f"{nearest(path, paths, 3)}). Load over the params the adapters were trained on."
            )
    leaves = []
    for (_, x), path in zip(flat, paths):
        plain = _plain(x)
        e = entries.get(path)
        if e is None:
            leaves.append(plain)
            continue
        fp = fingerprint.get(path, {})
        got_shape, got_dtype = _shape(plain), _dtype_name(plain)
        if list(got_shape) != list(fp.get("shape", got_shape)):
            raise CheckpointError(
                f"{where}: base leaf {path!r} has shape {got_shape}, the adapters were trained on "
                f"shape {tuple(fp['shape'])}."
            )
        if got_dtype != fp.get("dtype", got_dtype):
            raise CheckpointError(
                f"{where}: base leaf {path!r} has dtype {got_dtype}, the adapters were trained on "
                f"dtype {fp['dtype']}. Cast the base (e.g. jax.tree.map(lambda x: x.astype(...), base)) "
                f"to the dtype it had when saving."
            )
        if e["kind"] == "lora":
            layout = Layout.from_json(e["layout"])
            if layout.ndim != len(got_shape):
                raise CheckpointError(f"{where}: layout {layout} of {path!r} does not fit shape {got_shape}.")
            a, b = arrays[f"{path}/a"], arrays[f"{path}/b"]
            rank = int(e["rank"])
            if _shape(a) != layout.a_shape(got_shape, rank) or _shape(b) != layout.b_shape(got_shape, rank):
                raise CheckpointError(
                    f"{where}: adapter {path!r} has A{_shape(a)} B{_shape(b)}, which do not fit a "
                    f"kernel of shape {got_shape} with layout {layout} and rank {rank}."
                )
            a, b = place_factors(plain, layout, a, b)  # sharded like the base they are loaded over
            leaves.append(
                LoraKernel(plain, a, b, layout=layout, scale=float(e["scale"]), dropout=float(e.get("dropout", 0.0)))
            )
        else:
            leaves.append(Trainable(place_like(plain, arrays[f"{path}/value"])))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _verify(config: dict, arrays: Mapping[str, Any], where: Path) -> None:
    for path, e in config["adapters"].items():
        for name, digest in (e.get("sha256") or {}).items():
            key = f"{path}/{name}"
            if key not in arrays:
                raise CheckpointError(f"{where}: array {key!r} is missing.")
            if _digest(_to_numpy(arrays[key])) != digest:
                raise CheckpointError(f"{where}: array {key!r} is corrupt (its sha256 does not match the config).")


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
    unless ``overwrite=True``; then old and new are swapped atomically (a crash leaves either the
    complete old or the complete new checkpoint).

    Args:
        directory: Where to write; created with its parents.
        params: Injected params (with :class:`~jlora.LoraKernel` / :class:`~jlora.Trainable` nodes).
        overwrite: Replace an existing checkpoint at ``directory``.
        metadata: JSON-serializable extra information stored in the config (``"metadata"``).

    Returns:
        The absolute path of the checkpoint.

    Raises:
        FileExistsError: ``directory`` exists and ``overwrite`` is False.
        ValueError: ``params`` hold no adapters.

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
    with _atomic_directory(target, overwrite=overwrite) as tmp:
        ckptr = _composite_checkpointer()
        ckptr.save(
            tmp,
            args=ocp.args.Composite(
                **{_ADAPTERS_ITEM: ocp.args.StandardSave(arrays), _CONFIG_ITEM: ocp.args.JsonSave(config)}
            ),
        )
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

    ckpt = _resolve(directory)
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
        arrays[f"{i:06d}"] = _to_numpy(x)
        names.append(jax.tree_util.keystr(p))
    return arrays, names


class TrainCheckpointer:
    """Periodic training checkpoints (adapters + optimizer state + step) on Orbax's
    ``CheckpointManager``, keeping the last ``keep``.

    Each step directory ``<directory>/<step>/`` holds three Orbax items: ``adapters`` (the same
    flat dict as :func:`save_adapters`), ``opt_state`` (the optimizer state's leaves in flattening
    order) and ``config`` (the adapter config plus the step and the optimizer state's key paths).
    Orbax finalizes each step atomically, so an interrupted save is never restored.

    Args:
        directory: Root directory of the step checkpoints (created).
        every: Save when ``step % every == 0`` (``save(..., force=True)`` saves any step).
        keep: How many of the most recent checkpoints to keep (None: all).
        async_save: Write in a background thread (Orbax async checkpointing); the arrays are
            copied to host before :meth:`save` returns, so the caller may go on updating them.
        metadata: JSON-serializable extra information stored in every step's config.

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

        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}.")
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 or None, got {keep}.")
        self.directory = Path(directory).absolute()
        self.every = int(every)
        self.keep = keep
        self._metadata = dict(metadata) if metadata is not None else None
        policies = getattr(ocp, "checkpoint_managers", None)
        if policies is not None and hasattr(policies, "FixedIntervalPolicy"):
            # Exactly step % every == 0 (the default policy would also save the first step).
            schedule = {"save_decision_policy": policies.FixedIntervalPolicy(self.every)}
        else:  # pragma: no cover - older Orbax
            schedule = {"save_interval_steps": self.every}
        options = ocp.CheckpointManagerOptions(
            **schedule,
            max_to_keep=keep,
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
        return self._manager.should_save(int(step))

    def save(self, step: int, params: Any, opt_state: Any = None, *, force: bool = False) -> bool:
        """Save adapters, optimizer state and ``step`` if ``step`` is due (or ``force``).

        Args:
            step: The number of optimizer steps taken so far.
            params: Injected params.
            opt_state: The optimizer state (``jlora.optimizer(...).init(params)`` and its updates),
                or None to save the adapters only.
            force: Save even if ``step`` is not a multiple of ``every``.

        Returns:
            Whether a checkpoint was written.
        """
        import orbax.checkpoint as ocp

        step = int(step)
        if not force and not self.should_save(step):
            return False
        config, arrays = _make_config(params, self._metadata)
        config["step"] = step
        items = {_ADAPTERS_ITEM: ocp.args.StandardSave(arrays)}
        if opt_state is not None:
            opt_arrays, names = _flat_state(opt_state)
            config["opt_state"] = {
                "paths": names,
                "shapes": [list(a.shape) for a in opt_arrays.values()],
                "dtypes": [str(a.dtype) for a in opt_arrays.values()],
            }
            if opt_arrays:
                items[_OPT_ITEM] = ocp.args.StandardSave(opt_arrays)
        else:
            config["opt_state"] = None
        items[_CONFIG_ITEM] = ocp.args.JsonSave(config)
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

        self._manager.wait_until_finished()
        if step is None:
            step = self._manager.latest_step()
            if step is None:
                raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        step = int(step)
        if step not in self._manager.all_steps():
            raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory} (have {self.all_steps()}).")
        where = self.directory / str(step)
        config = _read_config(where)
        items = {_ADAPTERS_ITEM: ocp.args.StandardRestore(_abstract(config))}

        opt_treedef = opt_like_leaves = None
        if opt_state_like is not None:
            saved = config.get("opt_state")
            if saved is None:
                raise CheckpointError(f"{where} holds no optimizer state; pass opt_state_like=None.")
            flat, opt_treedef = jax.tree_util.tree_flatten_with_path(opt_state_like)
            opt_like_leaves = [x for _, x in flat]
            names = [jax.tree_util.keystr(p) for p, _ in flat]
            if len(names) != len(saved["paths"]):
                raise CheckpointError(
                    f"{where}: the optimizer state has {len(saved['paths'])} leaves, opt_state_like has "
                    f"{len(names)}; build it with the same optimizer over the same adapted params."
                )
            for i, (name, x) in enumerate(zip(names, opt_like_leaves)):
                want = (saved["paths"][i], tuple(saved["shapes"][i]), saved["dtypes"][i])
                got = (name, _shape(x), _dtype_name(x))
                if got != want:
                    raise CheckpointError(
                        f"{where}: optimizer-state leaf {i} is {want[0]} {want[1]} {want[2]} in the "
                        f"checkpoint but {got[0]} {got[1]} {got[2]} in opt_state_like."
                    )
            if names:
                items[_OPT_ITEM] = ocp.args.StandardRestore(
                    {
                        f"{i:06d}": jax.ShapeDtypeStruct(tuple(s), jnp.dtype(d))
                        for i, (s, d) in enumerate(zip(saved["shapes"], saved["dtypes"]))
                    }
                )
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise CheckpointError(f"{where} could not be read (missing or corrupt files): {e}") from e
        arrays = restored[_ADAPTERS_ITEM]
        _verify(config, arrays, where)
        params = _rebuild(base, config, arrays, where=str(where))
        opt_state = None
        if opt_treedef is not None:
            got = restored[_OPT_ITEM] if _OPT_ITEM in items else {}
            leaves = [got[f"{i:06d}"] for i in range(len(opt_like_leaves))]
            # Keep each leaf's placement (sharding) from opt_state_like where it has one.
            leaves = [place_like(x, v) for v, x in zip(leaves, opt_like_leaves)]
            opt_state = jax.tree_util.tree_unflatten(opt_treedef, leaves)
        return Restored(params, opt_state, step)

    # -- lifecycle ------------------------------------------------------------------------------
    def wait(self) -> None:
        """Block until a background (async) save has finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "TrainCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TrainCheckpointer({str(self.directory)!r}, every={self.every}, keep={self.keep})"
