"""Every touch of JAX's jaxpr internals lives here.

JAX's internal jaxpr API moves between releases (primitive names such as ``pjit``/``jit`` and
``checkpoint``/``remat2``, where ``Literal`` lives, how a primitive is re-bound). The rest of jlora
only uses the small surface below; when JAX moves, this is the one file to fix.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax

try:  # jax >= 0.4.30
    from jax.extend import core as _jcore
except ImportError:  # pragma: no cover
    from jax import core as _jcore  # type: ignore

Jaxpr = _jcore.Jaxpr
ClosedJaxpr = _jcore.ClosedJaxpr
Literal = _jcore.Literal
Var = _jcore.Var

try:
    DropVar = _jcore.DropVar
except AttributeError:  # pragma: no cover
    from jax._src.core import DropVar  # type: ignore

# Primitive names, grouped by how jlora treats them. Several names per group cover JAX releases.
JIT = frozenset({"jit", "pjit", "closed_call", "core_call", "xla_call"})
REMAT = frozenset({"remat2", "checkpoint", "remat"})
CUSTOM_JVP = frozenset({"custom_jvp_call", "custom_jvp_call_jaxpr"})
CUSTOM_VJP = frozenset({"custom_vjp_call", "custom_vjp_call_jaxpr"})
SCAN = "scan"
WHILE = "while"
COND = "cond"


def scan_counts(eqn) -> tuple[int, int]:
    """``(num_consts, num_carry)`` of a scan equation.

    Newer JAX releases stop recording these counts on the equation; then they are read off the
    shapes: a carry leaves the loop with its body shape, a stacked output (ys) with ``(length,)``
    in front, and the trailing inputs sliced by the loop (xs) likewise carry ``(length,)``.
    """
    p = eqn.params
    body, _ = closed_parts(p["jaxpr"])
    if "num_carry" in p:
        nk = p["num_carry"]
    else:
        nk = 0
        for outer, inner in zip(eqn.outvars, body.outvars):
            if tuple(outer.aval.shape) != tuple(inner.aval.shape):
                break
            nk += 1
    if "num_consts" in p:
        return p["num_consts"], nk
    length = scan_length(eqn)
    n_xs = 0
    for outer, inner in reversed(list(zip(eqn.invars, body.invars))):
        if tuple(outer.aval.shape) == (length,) + tuple(inner.aval.shape) and len(eqn.invars) - n_xs > nk:
            n_xs += 1
        else:
            break
    return len(eqn.invars) - nk - n_xs, nk


def scan_length(eqn) -> int:
    p = eqn.params
    if "length" in p:
        return p["length"]
    body, _ = closed_parts(p["jaxpr"])
    for outer, inner in zip(eqn.outvars, body.outvars):
        if len(outer.aval.shape) == len(inner.aval.shape) + 1:
            return outer.aval.shape[0]
    for outer, inner in zip(reversed(eqn.invars), reversed(body.invars)):
        if len(outer.aval.shape) == len(inner.aval.shape) + 1:
            return outer.aval.shape[0]
    raise NotImplementedError(f"cannot read the length of this scan: {sorted(p)}")


def while_counts(eqn) -> tuple[int, int]:
    """``(cond_nconsts, body_nconsts)`` of a while equation, also where JAX stops recording them."""
    p = eqn.params
    if "cond_nconsts" in p and "body_nconsts" in p:
        return p["cond_nconsts"], p["body_nconsts"]
    cj, _ = closed_parts(p["cond_jaxpr"])
    bj, _ = closed_parts(p["body_jaxpr"])
    n_carry = len(bj.outvars)
    return len(cj.invars) - n_carry, len(bj.invars) - n_carry


def make_jaxpr(fun, *args):
    """``jax.make_jaxpr`` returning ``(closed_jaxpr, out_tree)``."""
    closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(*args)
    return closed, jax.tree.structure(out_shape)


def is_literal(v: Any) -> bool:
    return isinstance(v, Literal)


def is_dropvar(v: Any) -> bool:
    return isinstance(v, DropVar)


def inner_jaxpr(eqn) -> tuple[Jaxpr, Sequence[Any]]:
    """The single sub-jaxpr of a call-like equation (jit, remat, custom_jvp/vjp) and its consts."""
    p = eqn.params
    j = p.get("jaxpr", p.get("call_jaxpr", p.get("fun_jaxpr")))
    if isinstance(j, ClosedJaxpr):
        return j.jaxpr, j.consts
    return j, ()


def closed_parts(cj) -> tuple[Jaxpr, Sequence[Any]]:
    if isinstance(cj, ClosedJaxpr):
        return cj.jaxpr, cj.consts
    return cj, ()


def bind_params(prim, params: dict) -> tuple[list[Any], dict]:
    """``(subfuns, params)`` to bind ``prim`` with (older JAX returned subfuns separately)."""
    res = prim.get_bind_params(params)
    if isinstance(res, tuple) and len(res) == 2 and isinstance(res[1], dict):
        return list(res[0]), res[1]
    return [], res


def bind_with(prim, params: dict, *invals) -> list[Any]:
    subfuns, bp = bind_params(prim, params)
    out = prim.bind(*subfuns, *invals, **bp)
    return list(out) if prim.multiple_results else [out]


def bind(eqn, invals: Sequence[Any]) -> list[Any]:
    """Re-bind an equation unchanged on new inputs (what ``jax.core.eval_jaxpr`` does)."""
    with source_context(eqn):
        ctx = getattr(eqn, "ctx", None)
        manager = getattr(ctx, "manager", None)
        if manager is not None:
            with manager:
                return bind_with(eqn.primitive, eqn.params, *invals)
        return bind_with(eqn.primitive, eqn.params, *invals)


def source_context(eqn):
    """Keep the user's source line and name stack on re-bound equations (profiles, HLO metadata)."""
    try:
        from jax._src import source_info_util as siu

        return siu.user_context(
            eqn.source_info.traceback, name_stack=siu.current_name_stack() + eqn.source_info.name_stack
        )
    except Exception:  # pragma: no cover - cosmetic only
        import contextlib

        return contextlib.nullcontext()


def where(eqn) -> str:
    """The user source line an equation came from, for error messages."""
    try:
        from jax._src import source_info_util as siu

        return siu.summarize(eqn.source_info)
    except Exception:  # pragma: no cover
        return "<unknown>"


def is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


@functools.lru_cache(maxsize=None)
def shardy_rule_takes_options() -> bool:
    """Whether this JAX's ``custom_partitioning`` Shardy rules accept ``need_replication_factors``
    (newer than 0.7; JAX 0.7 takes an einsum string only)."""
    import inspect

    try:
        from jax._src.custom_partitioning_sharding_rule import str_to_sdy_sharding_rule
    except ImportError:  # pragma: no cover - a JAX that moved it: assume the current API
        return True
    return "need_replication_factors" in inspect.signature(str_to_sdy_sharding_rule).parameters
