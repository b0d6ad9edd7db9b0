"""Params as jlora sees them (flat units with '/'-joined paths), and the trace of ``apply_fn``.

Both ``inject`` (to read layouts) and ``apply`` (to evaluate) trace ``apply_fn`` the same way:
array leaves of the params and array arguments become inputs of the jaxpr; every other leaf (a
Python number, an activation function inside an equinox module, a string) stays what it is,
closed over, exactly as ``apply_fn`` would see it when called directly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from jlora import _compat as jax_compat
from jlora._discover import discover
from jlora._quant import is_quantized, shape_of
from jlora._tree import Flat, plain

__all__ = ["Flat", "Traced", "is_input", "plain", "shape_of", "trace", "trace_uses"]


def is_input(x: Any) -> bool:
    """Whether a leaf is an input of the traced jaxpr (an array, a tracer or a quantized kernel)."""
    return (isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))
            or jax_compat.is_tracer(x) or is_quantized(x))


def _spec(x: Any) -> jax.ShapeDtypeStruct:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if is_quantized(x):
        return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)
    weak = bool(getattr(getattr(x, "aval", None), "weak_type", False))
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, weak_type=weak)


@dataclasses.dataclass(frozen=True)
class Traced:
    """``apply_fn``'s jaxpr: invars are ``params_in`` (leaf indices) then ``args`` (arrays)."""

    jaxpr: Any  # ClosedJaxpr
    out_tree: Any
    params_in: list[int]
    args: list[Any]


def trace(apply_fn: Callable, leaves: list[Any], treedef: Any, args: tuple, kwargs: dict) -> Traced:
    """Trace ``apply_fn(params, *args, **kwargs)`` with ``params = unflatten(treedef, leaves)``."""
    a_leaves, a_def = jax.tree.flatten((args, kwargs), is_leaf=lambda x: x is None)
    p_in = [i for i, x in enumerate(leaves) if is_input(x)]
    a_in = [i for i, x in enumerate(a_leaves) if is_input(x)]

    def flat_fn(*xs):
        pl, al = list(leaves), list(a_leaves)
        for i, v in zip(p_in, xs[: len(p_in)]):
            pl[i] = v
        for i, v in zip(a_in, xs[len(p_in):]):
            al[i] = v
        a, kw = jax.tree.unflatten(a_def, al)
        return apply_fn(jax.tree.unflatten(treedef, pl), *a, **kw)

    specs = [_spec(leaves[i]) for i in p_in] + [_spec(a_leaves[i]) for i in a_in]
    closed, out_tree = jax_compat.make_jaxpr(flat_fn, *specs)
    return Traced(closed, out_tree, p_in, [a_leaves[i] for i in a_in])


def trace_uses(apply_fn: Callable, leaves: list[Any], treedef: Any, args: tuple, kwargs: dict,
               candidates: list[int]) -> dict[int, list]:
    """How ``apply_fn(params, *args, **kwargs)`` uses each candidate leaf: ``{leaf index: [Use]}``
    (a leaf that is not an array, hence not traced, has no uses)."""
    traced = trace(apply_fn, leaves, treedef, tuple(args), dict(kwargs))
    slot = {leaf: k for k, leaf in enumerate(traced.params_in)}
    inside = [i for i in candidates if i in slot]
    found = discover(traced.jaxpr, len(traced.jaxpr.jaxpr.invars), [slot[i] for i in inside])
    return {i: (found[slot[i]] if i in slot else []) for i in candidates}
