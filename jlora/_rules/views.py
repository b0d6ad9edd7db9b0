"""Rules for the ops a kernel passes through on its way to a matmul: they change the view.

Each op changes the view of W0 and, axis for axis, the same axes of A and B (a slice of an input
axis slices A, of an output axis slices B, of a stack axis both), so the adapter keeps describing
exactly the sliced, transposed or reshaped kernel.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from jlora import _compat as jax_compat
from jlora._quant import is_quantized
from jlora._rules.table import NoRule, OpRule, Probe, expand, union
from jlora._sharding import constrain_factors
from jlora._value import LoraValue, Role, Tag, factor_positions, renumber

__all__ = ["RULES", "reshape_groups"]


def _first_only(analysis, eqn, ins) -> bool:
    """Whether the kernel is the op's first operand and no other operand is a parameter; if
    not, the op is recorded as a use without a rule."""
    if isinstance(ins[0], Probe) and not any(isinstance(q, Probe) for q in ins[1:]):
        return True
    for q in ins:
        if isinstance(q, Probe):
            analysis.other(q, eqn, "takes the kernel together with other parameters")
    return False


def _no_view(eqn) -> list:
    return [None] * len(eqn.outvars)


# -- ops that keep the view as it is -------------------------------------------------------------------


def _same_view_discover(analysis, eqn, ins):
    return [ins[0]] if _first_only(analysis, eqn, ins) else _no_view(eqn)


def _convert_evaluate(eqn, invals, ctx):
    x, dt = invals[0], eqn.params["new_dtype"]
    # a quantized base stays quantized: it is dequantized (to dt) only where it is computed with
    return [x.with_(w0=x.w0.with_dtype(dt) if is_quantized(x.w0) else x.w0.astype(dt))]


def _copy_evaluate(eqn, invals, ctx):
    if len(invals) != 1:
        raise NoRule("it takes the kernel together with other operands")
    return [invals[0].with_(w0=invals[0].dense())]


def _sharding_evaluate(eqn, invals, ctx):
    x = invals[0]
    # A and B follow the kernel: its spec on their stack/input (A) and stack/output (B) axes.
    a, b = constrain_factors(eqn, x.a, x.b, x.tags)
    return [x.with_(w0=jax_compat.bind(eqn, [x.dense()])[0], a=a, b=b)]


# -- transpose -----------------------------------------------------------------------------------------


def _transpose_discover(analysis, eqn, ins):
    x = ins[0]
    return [dataclasses.replace(x, tags=tuple(x.tags[k] for k in eqn.params["permutation"]))]


def _transpose_evaluate(eqn, invals, ctx):
    x, perm = invals[0], eqn.params["permutation"]
    return [x.with_(w0=jnp.transpose(x.dense(), perm), tags=tuple(x.tags[k] for k in perm))]


# -- reshape -------------------------------------------------------------------------------------------


def reshape_groups(old: tuple[int, ...], new: tuple[int, ...]):
    """Pair contiguous runs of old and new axes with equal products.

    Returns a list of ``(old_axes, new_axes)`` groups (either side may be empty for unit axes), or
    ``None`` when the reshape is not a merge/split of contiguous axes.

    Example:
        >>> reshape_groups((4, 6), (4, 2, 3))
        [((0,), (0,)), ((1,), (1, 2))]
    """
    groups = []
    i = j = 0
    while i < len(old) or j < len(new):
        if i < len(old) and old[i] == 1:  # unit axes on either side form groups of their own
            groups.append(((i,), ()))
            i += 1
        elif j < len(new) and new[j] == 1:
            groups.append(((), (j,)))
            j += 1
        elif i >= len(old) or j >= len(new):
            return None
        else:
            group = _one_group(old, new, i, j)
            if group is None:
                return None
            groups.append(group)
            i, j = i + len(group[0]), j + len(group[1])
    return groups


def _one_group(old, new, i, j):
    gi, gj, pi, pj = [i], [j], old[i], new[j]
    while pi != pj:
        if pi < pj:
            if i + len(gi) >= len(old):
                return None
            pi *= old[i + len(gi)]
            gi.append(i + len(gi))
        else:
            if j + len(gj) >= len(new):
                return None
            pj *= new[j + len(gj)]
            gj.append(j + len(gj))
    return tuple(gi), tuple(gj)


def _reshape_form(eqn, n_operands: int):
    """The reshape's axis groups, or NoRule: only a merge/split of contiguous axes has a rule."""
    old, new = tuple(eqn.invars[0].aval.shape), tuple(eqn.params["new_sizes"])
    groups = reshape_groups(old, new)
    if n_operands != 1 or eqn.params.get("dimensions") is not None or groups is None:
        raise NoRule(f"the reshape {old} -> {new} is not a merge or split of contiguous axes")
    return groups


def _reshape_discover(analysis, eqn, ins):
    x = ins[0]
    try:
        groups = _reshape_form(eqn, len(ins))
    except NoRule as e:
        analysis.other(x, eqn, str(e))
        return [None]
    tags, removed = [frozenset()] * len(eqn.params["new_sizes"]), x.removed
    for go, gn in groups:
        u = union(x.tags, go)
        if not gn:
            removed |= u
        for k in gn:
            tags[k] = u
    exact = x.exact and all(len(go) <= 1 and len(gn) <= 1 for go, gn in groups)
    return [Probe(x.leaf, tuple(tags), removed, exact)]


def _reshape_evaluate(eqn, invals, ctx):
    groups = _reshape_form(eqn, len(invals))
    x = invals[0].ordered()
    new = tuple(eqn.params["new_sizes"])
    new_roles = [Role.UNIT] * len(new)
    for go, gn in groups:
        roles = {x.tags[k].role for k in go} - {Role.UNIT}
        if len(roles) > 1:
            raise NoRule(f"the reshape {tuple(x.w0.shape)} -> {new} merges kernel axes of different roles")
        for k in gn:
            new_roles[k] = next(iter(roles)) if roles else Role.UNIT
    sizes = {r: tuple(n for n, rr in zip(new, new_roles) if rr is r) for r in (Role.STACK, Role.IN, Role.OUT)}
    rank = x.a.shape[-1]
    a = x.a.reshape(sizes[Role.STACK] + sizes[Role.IN] + (rank,))
    b = x.b.reshape(sizes[Role.STACK] + (rank,) + sizes[Role.OUT])
    gain = None if x.gain is None else x.gain.reshape(sizes[Role.STACK] + sizes[Role.OUT])
    return [x.with_(w0=jnp.reshape(x.dense(), new), a=a, b=b, gain=gain, tags=renumber([Tag(r) for r in new_roles]))]


# -- squeeze and broadcast_in_dim (unit axes out and in) -----------------------------------------------


def _squeeze_discover(analysis, eqn, ins):
    x = ins[0]
    dims = {d % len(x.tags) for d in eqn.params["dimensions"]}
    removed = x.removed | union(x.tags, dims)
    return [Probe(x.leaf, tuple(t for k, t in enumerate(x.tags) if k not in dims), removed, x.exact)]


def _squeeze_evaluate(eqn, invals, ctx):
    x = invals[0].ordered()
    dims = sorted({d % len(x.tags) for d in eqn.params["dimensions"]})
    pos = factor_positions(x.tags)
    gone_a = tuple(pos[d][0] for d in dims if pos[d][0] is not None)
    gone_b = tuple(pos[d][1] for d in dims if pos[d][1] is not None)
    a = jnp.squeeze(x.a, gone_a) if gone_a else x.a
    b = jnp.squeeze(x.b, gone_b) if gone_b else x.b
    gone_g = tuple(g for g in (x.gain_axis(d) for d in dims) if g is not None)
    gain = jnp.squeeze(x.gain, gone_g) if x.gain is not None and gone_g else x.gain
    tags = renumber([t for k, t in enumerate(x.tags) if k not in dims])
    return [x.with_(w0=lax.squeeze(x.dense(), dims), a=a, b=b, gain=gain, tags=tags)]


def _inserts_unit_axes(eqn, n_operands: int) -> None:
    """Only a broadcast that inserts axes of size one (a reshape in disguise) has a rule."""
    shape, bd = tuple(eqn.params["shape"]), tuple(eqn.params["broadcast_dimensions"])
    old = tuple(eqn.invars[0].aval.shape)
    if n_operands != 1 or not (all(shape[d] == old[k] for k, d in enumerate(bd))
                               and all(shape[k] == 1 for k in range(len(shape)) if k not in bd)):
        raise NoRule("it broadcasts the kernel (only inserting unit axes has a LoRA rule)")


def _broadcast_discover(analysis, eqn, ins):
    x = ins[0]
    try:
        _inserts_unit_axes(eqn, len(ins))
    except NoRule as e:
        analysis.other(x, eqn, str(e))
        return [None]
    tags = [frozenset()] * len(eqn.params["shape"])
    for k, d in enumerate(eqn.params["broadcast_dimensions"]):
        tags[d] = x.tags[k]
    return [Probe(x.leaf, tuple(tags), x.removed, x.exact)]


def _broadcast_evaluate(eqn, invals, ctx):
    _inserts_unit_axes(eqn, len(invals))
    x, shape = invals[0], tuple(eqn.params["shape"])
    tags = [Tag(Role.UNIT)] * len(shape)
    for k, d in enumerate(eqn.params["broadcast_dimensions"]):
        tags[d] = x.tags[k]
    return [x.with_(w0=jnp.reshape(x.dense(), shape), tags=tuple(tags))]


# -- slices and flips ------------------------------------------------------------------------------------


def _inexact_discover(analysis, eqn, ins):
    """slice, dynamic_slice, rev: the view keeps its axes, but no longer every element in place."""
    if not _first_only(analysis, eqn, ins):
        return _no_view(eqn)
    return [dataclasses.replace(ins[0], exact=False)]


def _on_factors(x: LoraValue, view_axis: int, fn) -> LoraValue:
    """``fn(factor, axis)`` applied to the factor axes behind one view axis (and to DoRA's gain,
    which has B's stack and output axes)."""
    pa, pb = factor_positions(x.tags)[view_axis]
    pg = x.gain_axis(view_axis) if x.gain is not None else None
    return x.with_(a=x.a if pa is None else fn(x.a, pa), b=x.b if pb is None else fn(x.b, pb),
                   gain=x.gain if pg is None else fn(x.gain, pg))


def _slice_evaluate(eqn, invals, ctx):
    x, p = invals[0], eqn.params
    strides = p["strides"] or (1,) * len(x.tags)
    out = x.with_(w0=lax.slice(x.dense(), p["start_indices"], p["limit_indices"], p["strides"]))
    for ax, (s, lim, st) in enumerate(zip(p["start_indices"], p["limit_indices"], strides)):
        if (s, lim, st) != (0, x.w0.shape[ax], 1):
            out = _on_factors(out, ax, lambda f, a, s=s, lim=lim, st=st: lax.slice_in_dim(f, s, lim, st, axis=a))
    return [out]


def _dynamic_slice_evaluate(eqn, invals, ctx):
    x, *starts = invals
    if any(isinstance(s, LoraValue) for s in starts):
        raise NoRule("a kernel is used as an index")
    sizes = eqn.params["slice_sizes"]
    out = x.with_(w0=lax.dynamic_slice(x.dense(), starts, sizes))
    for ax, (s, n) in enumerate(zip(starts, sizes)):
        if n != x.w0.shape[ax]:
            out = _on_factors(out, ax, lambda f, a, s=s, n=n: lax.dynamic_slice_in_dim(f, s, n, axis=a))
    return [out]


def _rev_evaluate(eqn, invals, ctx):
    x, dims = invals[0], eqn.params["dimensions"]
    out = x.with_(w0=lax.rev(x.dense(), dims))
    for ax in dims:
        out = _on_factors(out, ax, lambda f, a: lax.rev(f, (a,)))
    return [out]


RULES = expand({
    "convert_element_type": OpRule(_same_view_discover, _convert_evaluate),
    ("copy", "copy_p"): OpRule(_same_view_discover, _copy_evaluate),
    ("sharding_constraint", "reshard"): OpRule(_same_view_discover, _sharding_evaluate),
    "transpose": OpRule(_transpose_discover, _transpose_evaluate),
    "reshape": OpRule(_reshape_discover, _reshape_evaluate),
    "squeeze": OpRule(_squeeze_discover, _squeeze_evaluate),
    "broadcast_in_dim": OpRule(_broadcast_discover, _broadcast_evaluate),
    "slice": OpRule(_inexact_discover, _slice_evaluate),
    "dynamic_slice": OpRule(_inexact_discover, _dynamic_slice_evaluate),
    "rev": OpRule(_inexact_discover, _rev_evaluate),
})
