"""Crash-safe writes: a directory swapped into place, or a set of files replaced all at once.

* :func:`atomic_directory` — write into a hidden temporary sibling, fsync, then rename it into
  place; an existing directory (only one its owner may replace) is swapped with one
  ``renameat2(RENAME_EXCHANGE)``, or moved aside first where that call does not exist
  (:func:`resolve` then finds the complete old one if a crash falls between the two renames).
  A killed writer leaves only a hidden sibling, removed by the next write (:func:`cleanup_stale`).
* :func:`write_files` — several files beside whatever a directory already holds (PEFT's layout):
  each written to a temporary file and renamed onto its name, all or none (optionally removing
  files the new set replaces in the same commit).
* :func:`write_file` — one file: a temporary file beside it, fsynced, renamed onto it.

Every temporary entry is named ``.<name>.jlora-tmp-<pid>-...``: one left by a killed writer is
never read and is removed by the next write of ``<name>`` (:func:`cleanup_stale`).
* :func:`disk_full_is_clear` — a full disk or quota, whichever layer reports it, becomes a short
  ``OSError(ENOSPC)`` naming the directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import secrets
import shutil
import uuid
import warnings
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

__all__ = ["atomic_directory", "cleanup_stale", "commit", "disk_full_is_clear", "exchange", "fsync", "replace_all",
           "resolve", "text_writer", "write_file", "write_files"]

PathLike = Union[str, os.PathLike]
_TMP_TAG = ".jlora-tmp-"
_OLD_TAG = ".jlora-old-"


def fsync(path: PathLike) -> None:
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


def cleanup_stale(target: Path, *, backups: bool = False) -> None:
    """Remove temporary siblings of ``target`` (directories or files) left by writers that died
    (killed mid-save), and with ``backups`` the old checkpoints moved aside by an interrupted
    overwrite (only once a complete ``target`` exists again)."""
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
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
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


def _listing(directory: Path, most: int = 6) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    more = f", ... ({len(names)} entries)" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def _check_target(target: Path, overwrite: bool, replaceable: Callable[[Path], bool], kind: str) -> bool:
    """Whether ``target`` exists with content (to be replaced); raises if it may not be."""
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
    if not replaceable(target):
        raise FileExistsError(
            f"{target} holds {_listing(target)}: that is not a {kind} (or not only one), and "
            f"overwrite=True replaces only a previous {kind}, never other files. Pick another directory."
        )
    return True


_FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left on device, disk quota exceeded


def _disk_full(err: Optional[BaseException]) -> Optional[int]:
    """``errno.ENOSPC`` / ``errno.EDQUOT`` if ``err`` or an exception it was raised from is a full
    disk or quota (TensorStore reports one as a ValueError whose text carries the OS error)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _FULL:
            return err.errno
        code = next((c for c in _FULL if os.strerror(c) in str(err)), None)
        if code is not None:
            return code
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def disk_full_is_clear(directory: Path, consequence: str) -> Iterator[None]:
    """Turn a full disk (or quota), whatever layer reports it, into a short ``OSError(ENOSPC)``
    (``EDQUOT``) that names ``directory``, with the original chained."""
    try:
        yield
    except Exception as err:
        code = _disk_full(err)
        if code is None:
            raise
        raise OSError(
            code, f"{os.strerror(code)} while saving {directory}; {consequence} Free some space and save again."
        ) from err


@contextlib.contextmanager
def atomic_directory(
    directory: PathLike,
    *,
    overwrite: bool,
    replaceable: Callable[[Path], bool],
    kind: str,
) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``directory``; on success, put it in place atomically.

    An existing non-empty ``directory`` is replaced only with ``overwrite`` and only if
    ``replaceable(directory)`` (it holds a previous ``kind`` and nothing else). On an exception the
    temporary directory is removed and ``directory`` is untouched; a full disk is reported as a short
    ``OSError(ENOSPC)``. If the process is killed, only a hidden ``.<name>.jlora-tmp-<pid>-...``
    sibling is left behind (never read, and removed by the next write to the same directory).
    """
    target = Path(directory).absolute()
    check = lambda: _check_target(target, overwrite, replaceable, kind)
    check()
    target.parent.mkdir(parents=True, exist_ok=True)
    cleanup_stale(target)
    tmp = target.parent / _temp_name(target.name, "")
    try:
        with disk_full_is_clear(target, "what was there is unchanged and nothing was left behind."):
            yield tmp
            for dirpath, _, files in os.walk(tmp):
                for name in files:
                    fsync(os.path.join(dirpath, name))
                fsync(dirpath)
            commit(tmp, target, check)
        cleanup_stale(target, backups=True)
    finally:
        # The temporary directory, and any sibling a writer derived from its name (Orbax's own
        # `<tmp>.orbax-checkpoint-tmp-*`), are ours to remove.
        for p in target.parent.glob(glob_escape(tmp.name) + "*"):
            shutil.rmtree(p, ignore_errors=True)


def commit(tmp: Path, target: Path, check: Callable[[], bool]) -> None:
    exists = check()  # re-check: it may have appeared meanwhile
    if not exists:
        if target.is_dir():
            target.rmdir()  # empty; rename cannot replace a directory on every platform
        os.rename(tmp, target)
    elif exchange(tmp, target):
        # `target` is now the new checkpoint and `tmp` holds the old one (removed by the caller).
        pass
    else:
        # No atomic exchange here: move the old one aside first. A crash between the two renames
        # leaves the complete old checkpoint at `.<name>.jlora-old-...`, which resolve() finds.
        old = target.parent / f".{target.name}{_OLD_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    fsync(target.parent)


def resolve(directory: PathLike) -> Path:
    """The directory to read, recovering from an overwrite interrupted between its two renames."""
    target = Path(directory).absolute()
    if target.is_dir():
        return target
    if os.path.lexists(target):
        raise NotADirectoryError(f"{target} is not a directory.")
    backups = (
        sorted(target.parent.glob(glob_escape(f".{target.name}{_OLD_TAG}") + "*"), key=lambda p: p.stat().st_mtime)
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


def text_writer(text: str) -> Callable[[Path], Any]:
    """A writer for :func:`write_file` / :func:`write_files` that writes ``text`` as UTF-8."""
    return lambda path: path.write_text(text, encoding="utf-8")


def _temp_name(name: str, suffix: str) -> str:
    """A hidden name beside ``name`` that :func:`cleanup_stale` recognizes once its writer is dead."""
    return f".{name}{_TMP_TAG}{os.getpid()}-{secrets.token_hex(6)}{suffix}"


def _write_temp(directory: Path, name: str, write: Callable[[Path], Any]) -> Path:
    """``write`` a new hidden file beside ``directory / name``, flushed; removed if writing fails."""
    tmp = directory / _temp_name(name, ".tmp")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # mode from the umask
    try:
        write(tmp)
        fsync(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def replace_all(directory: Path, tmps: Mapping[str, Path], remove: Iterable[str] = ()) -> None:
    """Rename each temporary file onto its name, then delete the files named in ``remove`` (those
    the new set makes stale); if one step fails, put back what was there."""
    backups: dict[str, Path] = {}
    done: list[str] = []

    def back_up(name: str) -> None:
        final = directory / name
        backups[name] = directory / _temp_name(name, ".bak")
        try:
            os.link(final, backups[name])
        except OSError:  # no hard links here: copy
            shutil.copy2(final, backups[name])

    try:
        for name, tmp in tmps.items():
            final = directory / name
            if final.exists():
                back_up(name)
            os.replace(tmp, final)
            done.append(name)
        for name in remove:
            final = directory / name
            if name in tmps or not final.is_file():
                continue
            back_up(name)
            final.unlink()
            done.append(name)
    except BaseException:
        for name in done:
            if name in backups:
                os.replace(backups.pop(name), directory / name)
            else:
                (directory / name).unlink(missing_ok=True)
        raise
    finally:
        for bak in backups.values():
            bak.unlink(missing_ok=True)
        fsync(directory)


def write_files(directory: Path, writers: Mapping[str, Callable[[Path], Any]], *, overwrite: bool,
                what: str, remove: Iterable[str] = ()) -> None:
    """Write each file of ``writers`` (name -> write(path)) into ``directory``, all or none, and
    delete the files named in ``remove`` in the same commit (files an earlier write made that this
    one supersedes), leaving the directory's other files alone; ``what`` names the caller in
    errors. Temporary files a killed writer left for these names are removed first."""
    remove = [n for n in remove if n not in writers]
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{what}: {directory} exists and is not a directory.")
    there = [n for n in writers if (directory / n).exists()]
    if there and not overwrite:
        raise FileExistsError(
            f"{what}: {directory} already holds {', '.join(there)}; pass overwrite=True to "
            f"replace them ({what} never touches the directory's other files)."
        )
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    for name in [*writers, *remove]:
        cleanup_stale(directory / name)
    tmps: dict[str, Path] = {}
    try:
        try:
            for name, write in writers.items():
                tmps[name] = _write_temp(directory, name, write)
            replace_all(directory, tmps, remove)
        finally:
            for tmp in tmps.values():
                tmp.unlink(missing_ok=True)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if still empty
        raise


def write_file(path: PathLike, write: Callable[[Path], Any]) -> Path:
    """Write one file crash-safely: ``write(tmp)`` into a hidden temporary file beside ``path``,
    fsync it, rename it onto ``path`` and fsync the directory. If ``write`` raises, the temporary
    file is removed and ``path`` (if it existed) is untouched; a killed writer leaves only a
    hidden ``.<name>.jlora-tmp-<pid>-...`` file, removed by the next write of ``path``.

    Example:
        >>> import tempfile
        >>> f = Path(tempfile.mkdtemp()) / "a.txt"
        >>> _ = write_file(f, lambda p: p.write_text("one"))
        >>> def broken(p):
        ...     p.write_text("half")
        ...     raise RuntimeError("killed")
        >>> write_file(f, broken)
        Traceback (most recent call last):
        RuntimeError: killed
        >>> f.read_text(), sorted(q.name for q in f.parent.iterdir())
        ('one', ['a.txt'])
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a directory, not a file.")
    target.parent.mkdir(parents=True, exist_ok=True)
    cleanup_stale(target)
    tmp = _write_temp(target.parent, target.name, write)
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(target.parent)
    return target
