"""Key paths as strings, and the ``targets`` matcher."""

from __future__ import annotations

import difflib
import re
from typing import Any, Callable, Sequence, Union

import jax

Targets = Union[None, str, Sequence[str], Callable[[str, Any], bool]]

# Components a framework adds around the real array (NNX's Variable.value, our own nodes).
_WRAPPER_KEYS = ("value", "raw_value")


def key_str(entry: Any) -> str:
    """One key-path entry as the string used in '/'-joined paths."""
    ku = jax.tree_util
    if isinstance(entry, ku.DictKey):
        return str(entry.key)
    if isinstance(entry, ku.GetAttrKey):
        return str(entry.name)
    if isinstance(entry, ku.SequenceKey):
        return str(entry.idx)
    if isinstance(entry, ku.FlattenedIndexKey):
        return str(entry.key)
    return str(entry)


def path_str(path: Sequence[Any]) -> str:
    """Join a key path with '/': ``layers/3/attn/query/kernel``.

    Example:
        >>> import jax
        >>> [(p, _)] = jax.tree_util.tree_flatten_with_path({"layers": [{"w": 1}]})[0]
        >>> path_str(p)
        'layers/0/w'
    """
    parts = [key_str(e) for e in path]
    # NNX-style wrappers end paths with 'value'; drop it so paths name the parameter.
    while len(parts) > 1 and parts[-1] in _WRAPPER_KEYS:
        parts.pop()
    return "/".join(parts)


def leaf_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def make_matcher(targets: Targets) -> Callable[[str, Any], bool]:
    """Turn ``targets`` into a predicate ``(path, leaf) -> bool``.

    A string is a regex searched in the path; a list of names matches whole path components
    (``["q_proj", "v_proj"]`` matches ``layers/0/self_attn/q_proj/kernel``); a callable decides.
    """
    if targets is None:
        return lambda path, leaf: True
    if isinstance(targets, str):
        try:
            rx = re.compile(targets)
        except re.error as e:
            raise ValueError(f"targets={targets!r} is not a valid regular expression: {e}") from None
        return lambda path, leaf: rx.search(path) is not None
    if callable(targets):
        return lambda path, leaf: bool(targets(path, leaf))
    if isinstance(targets, (list, tuple, set, frozenset)):
        names = set(targets)
        bad = [n for n in names if not isinstance(n, str)]
        if bad:
            raise TypeError(f"targets list must hold module names (str), got {bad!r}.")
        return lambda path, leaf: bool(names.intersection(path.split("/")))
    raise TypeError(
        f"targets must be None, a regex string, a list of names or a callable (path, leaf) -> bool; "
        f"got {type(targets).__name__}."
    )


def nearest(query: str, paths: Sequence[str], n: int = 5) -> list[str]:
    """The paths most like ``query`` (for 'matched nothing' errors)."""
    close = difflib.get_close_matches(query, list(paths), n=n, cutoff=0.0)
    return close or list(paths)[:n]


def describe_targets(targets: Targets) -> str:
    if isinstance(targets, str):
        return f"regex {targets!r}"
    if callable(targets):
        return f"callable {getattr(targets, '__name__', repr(targets))}"
    return repr(list(targets)) if targets is not None else "None"
