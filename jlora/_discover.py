"""Read kernel layouts off a trace of ``apply_fn``: how each parameter leaf is actually used.

A static data-flow pass over the jaxpr: every floating parameter leaf starts as a *probe* whose
axes are tagged with the kernel axes they came from. Probes follow the shape-preserving ops a
kernel passes through on its way to a matmul (dtype conversion, transpose, reshape, slicing,
squeezing, a scan slicing a stack of layers, calls into jit / remat / custom_jvp / custom_vjp,
cond and while bodies) and every ``dot_general`` / ``conv_general_dilated`` / ``gather`` that
consumes one records which kernel axes it contracts, batches and keeps. No value is computed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jlora import _compat as C
from jlora._node import Layout

__all__ = ["Use", "discover", "gather_form", "gather_layout", "layout_from_uses", "reshape_groups"]


# Ops that keep a kernel's axes as they are; the interpreter has a rule for each (tested).
PASS_THROUGH = frozenset({"convert_element_type", "copy", "copy_p", "sharding_constraint", "reshard"})


@dataclasses.dataclass(frozen=True)
class Use:
    kind: str  # 'dot' | 'conv' | 'gather' | 'other' | 'operand' (both operands are params)
    op: str
    where: str
    stack: frozenset = frozenset()
    in_: frozenset = frozenset()
    out: frozenset = frozenset()
    conv: tuple | None = None  # a convolution's kernel axes (in-feature, *spatial); () if not one each


@dataclasses.dataclass(frozen=True)
class _Probe:
    leaf: int
    tags: tuple  # per view axis: frozenset of original kernel axes (empty: an inserted unit axis)
    removed: frozenset  # original axes sliced away (scan over a stack, squeeze of an index)
    exact: bool = True  # no element moved or dropped on the way (no flip, slice, merge or split)


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
        # unit axes on either side form groups of their own
        if i < len(old) and old[i] == 1:
            groups.append(((i,), ()))
            i += 1
            continue
        if j < len(new) and new[j] == 1:
            groups.append(((), (j,)))
            j += 1
            continue
        if i >= len(old) or j >= len(new):
            return None
        gi, gj = [i], [j]
        pi, pj = old[i], new[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                if i >= len(old):
                    return None
                pi *= old[i]
                gi.append(i)
                i += 1
            else:
                if j >= len(new):
                    return None
                pj *= new[j]
                gj.append(j)
                j += 1
        groups.append((tuple(gi), tuple(gj)))
    return groups


def _union(tags, axes):
    out = frozenset()
    for a in axes:
        out |= tags[a]
    return out


class _Analysis:
    def __init__(self, n_leaves: int):
        self.uses: dict[int, list[Use]] = {i: [] for i in range(n_leaves)}

    def add(self, probe: _Probe, use: Use):
        self.uses[probe.leaf].append(use)

    def other(self, probe: _Probe, eqn, why: str = ""):
        self.add(probe, Use("other", eqn.primitive.name + (f" ({why})" if why else ""), C.where(eqn)))

    # -- the pass ----------------------------------------------------------------------------
    def run(self, jaxpr, env_in: list[Any]):
        env: dict[Any, Any] = {}
        for v, p in zip(jaxpr.invars, env_in):
            if p is not None:
                env[v] = p
        for eqn in jaxpr.eqns:
            ins = [None if C.is_literal(v) else env.get(v) for v in eqn.invars]
            if not any(isinstance(p, _Probe) for p in ins):
                continue
            outs = self.eqn(eqn, ins)
            for v, p in zip(eqn.outvars, outs):
                if p is not None and not C.is_dropvar(v):
                    env[v] = p
        return [None if C.is_literal(v) else env.get(v) for v in jaxpr.outvars]

    def eqn(self, eqn, ins):
        name = eqn.primitive.name
        p = eqn.params
        probes = [x for x in ins if isinstance(x, _Probe)]
        nout = len(eqn.outvars)
        if name in PASS_THROUGH:  # the same ops the interpreter carries a kernel through unchanged
            return [ins[0]]
        x = ins[0]
        if name == "transpose":
            perm = p["permutation"]
            return [dataclasses.replace(x, tags=tuple(x.tags[k] for k in perm))]
        if name == "reshape" and isinstance(x, _Probe):
            old = tuple(eqn.invars[0].aval.shape)
            new = tuple(p["new_sizes"])
            groups = reshape_groups(old, new)
            if p.get("dimensions") is not None or groups is None:
                self.other(x, eqn, "not a merge/split of contiguous axes")
                return [None]
            tags = [frozenset()] * len(new)
            removed = x.removed
            for go, gn in groups:
                u = _union(x.tags, go)
                if not gn:
                    removed |= u
                for k in gn:
                    tags[k] = u
            exact = x.exact and all(len(go) <= 1 and len(gn) <= 1 for go, gn in groups)
            return [_Probe(x.leaf, tuple(tags), removed, exact)]
        if name == "squeeze" and isinstance(x, _Probe):
            dims = set(d % len(x.tags) for d in p["dimensions"])
            removed = x.removed | _union(x.tags, dims)
            return [_Probe(x.leaf, tuple(t for k, t in enumerate(x.tags) if k not in dims), removed, x.exact)]
        if name == "broadcast_in_dim" and isinstance(x, _Probe):
            shape, bd = tuple(p["shape"]), tuple(p["broadcast_dimensions"])
            old = tuple(eqn.invars[0].aval.shape)
            if len(ins) == 1 and all(shape[d] == old[k] for k, d in enumerate(bd)) and all(
                shape[k] == 1 for k in range(len(shape)) if k not in bd
            ):
                tags = [frozenset()] * len(shape)
                for k, d in enumerate(bd):
                    tags[d] = x.tags[k]
                return [_Probe(x.leaf, tuple(tags), x.removed, x.exact)]
            self.other(x, eqn, "broadcasts the kernel")
            return [None]
        if name in ("slice", "rev") and isinstance(x, _Probe):
            return [dataclasses.replace(x, exact=False)]
        if name == "dynamic_slice" and isinstance(x, _Probe) and not any(isinstance(q, _Probe) for q in ins[1:]):
            return [dataclasses.replace(x, exact=False)]
        if name == "dot_general":
            return [self.dot(eqn, ins)]
        if name == "conv_general_dilated":
            return [self.conv(eqn, ins)]
        if name == "gather" and isinstance(x, _Probe) and not any(isinstance(q, _Probe) for q in ins[1:]):
            axis, why = gather_form(p["dimension_numbers"], p["slice_sizes"], eqn.invars[0].aval.shape)
            if axis is None or x.removed or any(not t for t in x.tags):
                self.other(x, eqn, why or "gathers from a sliced or reshaped kernel")
                return [None]
            self.add(x, Use("gather", name, C.where(eqn), in_=x.tags[axis], out=x.tags[1 - axis]))
            return [None]
        if name in C.JIT or name in C.CUSTOM_JVP or name in C.CUSTOM_VJP or name in C.REMAT:
            inner, _ = C.inner_jaxpr(eqn)
            return self.run(inner, ins)
        if name == C.SCAN:
            return self.scan(eqn, ins)
        if name == C.WHILE:
            cj, _ = C.closed_parts(p["cond_jaxpr"])
            bj, _ = C.closed_parts(p["body_jaxpr"])
            nc, nb = C.while_counts(eqn)
            carry = ins[nc + nb:]
            self.run(cj, ins[:nc] + carry)
            outs = self.run(bj, ins[nc:nc + nb] + carry)
            return [c if c is not None and o is c else None for c, o in zip(carry, outs)]
        if name == C.COND:  # uses inside every branch count; a kernel does not flow out of a cond
            for br in p["branches"]:
                j, _ = C.closed_parts(br)
                self.run(j, ins[1:])
            return [None] * nout
        for q in probes:
            self.other(q, eqn)
        return [None] * nout

    def dot(self, eqn, ins):
        lhs, rhs = ins
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        if isinstance(lhs, _Probe) and isinstance(rhs, _Probe):
            for q in (lhs, rhs):
                self.add(q, Use("operand", "dot_general (both operands are parameters)", C.where(eqn)))
            return None
        k, kc, kb = (rhs, rc, rb) if isinstance(rhs, _Probe) else (lhs, lc, lb)
        free = [a for a in range(len(k.tags)) if a not in kc and a not in kb]
        self.add(k, Use(
            "dot", "dot_general", C.where(eqn),
            stack=_union(k.tags, kb) | k.removed,
            in_=_union(k.tags, kc),
            out=_union(k.tags, free),
        ))
        return None

    def conv(self, eqn, ins):
        lhs, rhs = ins
        if not isinstance(rhs, _Probe) or isinstance(lhs, _Probe):
            for q in (lhs, rhs):
                if isinstance(q, _Probe):
                    self.other(q, eqn, "parameter used as the convolution's input")
            return None
        dn = eqn.params["dimension_numbers"]
        o = dn.rhs_spec[0]
        if eqn.params["feature_group_count"] != 1 or eqn.params["batch_group_count"] != 1:
            self.other(rhs, eqn, "grouped/depthwise convolution")
            return None
        ins_axes = [a for a in range(len(rhs.tags)) if a != o]
        # The kernel axes of the input-feature and spatial axes, where each is one kernel axis.
        torch_order = [rhs.tags[a] for a in dn.rhs_spec[1:]]
        clean = rhs.exact and all(len(t) == 1 for t in torch_order)
        conv = tuple(next(iter(t)) for t in torch_order) if clean else ()
        self.add(rhs, Use("conv", "conv_general_dilated", C.where(eqn), stack=rhs.removed,
                          in_=_union(rhs.tags, ins_axes), out=rhs.tags[o], conv=conv))
        return None

    def scan(self, eqn, ins):
        p = eqn.params
        j, _ = C.closed_parts(p["jaxpr"])
        nc, nk = C.scan_counts(eqn)
        inner = list(ins)
        for idx in range(nc + nk, len(ins)):
            x = ins[idx]
            if isinstance(x, _Probe):
                inner[idx] = _Probe(x.leaf, x.tags[1:], x.removed | x.tags[0], x.exact)
        outs = self.run(j, inner)
        res = [None] * len(eqn.outvars)
        for idx in range(nk):  # a kernel passed through the carry unchanged stays a kernel
            c = ins[nc + idx]
            if isinstance(c, _Probe) and outs[idx] is c:
                res[idx] = c
        return res


def discover(closed_jaxpr, n_leaves: int, candidates: list[int]) -> dict[int, list[Use]]:
    """Uses of each candidate leaf (leaf ``i`` is ``jaxpr.invars[i]``)."""
    a = _Analysis(n_leaves)
    jaxpr = closed_jaxpr.jaxpr
    env = [None] * len(jaxpr.invars)
    for i in candidates:
        nd = len(jaxpr.invars[i].aval.shape)
        env[i] = _Probe(i, tuple(frozenset({k}) for k in range(nd)), frozenset())
    a.run(jaxpr, env)
    return {i: a.uses[i] for i in candidates}


def gather_form(dimension_numbers, slice_sizes, shape) -> tuple[int | None, str]:
    """``(axis, "")`` when a gather reads whole rows (axis 0) or columns (axis 1) of a 2-D kernel —
    the only gather with a LoRA rule — else ``(None, why not)``.

    Example:
        >>> import jax.numpy as jnp, jax
        >>> eqn = jax.make_jaxpr(lambda e, i: e[i])(jnp.ones((10, 4)), jnp.array([1, 2])).eqns[-1]
        >>> gather_form(eqn.params["dimension_numbers"], eqn.params["slice_sizes"], (10, 4))
        (0, '')
    """
    dn = dimension_numbers
    if (len(shape) != 2 or len(dn.start_index_map) != 1
            or tuple(dn.collapsed_slice_dims) != tuple(dn.start_index_map)
            or getattr(dn, "operand_batching_dims", ())):
        return None, "only gathering whole rows or columns of a 2-D kernel has a LoRA rule"
    g = dn.start_index_map[0]
    if slice_sizes[1 - g] != shape[1 - g]:
        return None, "only gathering whole rows or columns of a 2-D kernel has a LoRA rule"
    return g, ""


def gather_layout(uses: list[Use], ndim: int) -> tuple[Layout | None, str]:
    """The layout of a table read only by gathers (an embedding): A on the gathered axis, B on the
    other, as PEFT's LoRA on embeddings; ``(None, reason)`` if it is used any other way."""
    bad = [u for u in uses if u.kind != "gather"]
    if bad:
        return None, f"used by {bad[0].op} at {bad[0].where}, which has no LoRA rule"
    first = uses[0]
    if any((u.in_, u.out) != (first.in_, first.out) for u in uses) or ndim != 2:
        return None, "gathered along different axes"
    return Layout(stack=(), in_=tuple(sorted(first.in_)), out=tuple(sorted(first.out))), ""


def layout_from_uses(uses: list[Use], ndim: int) -> tuple[Layout | None, str]:
    """A :class:`Layout` consistent with every matmul/conv use, or ``(None, reason)``."""
    mm = [u for u in uses if u.kind in ("dot", "conv")]
    bad = [u for u in uses if u.kind in ("other", "operand")]
    if not mm:
        if any(u.kind == "gather" for u in uses):
            return None, "read by gather only (an embedding table, not a kernel)"
        if bad:
            return None, f"not used as a matmul weight (used by {bad[0].op} at {bad[0].where})"
        return None, "not used as a matmul weight"
    if bad:
        return None, f"used by {bad[0].op} at {bad[0].where}, which has no LoRA rule"
    first = mm[0]
    stack = set(first.stack)
    in_, out = set(first.in_), set(first.out)
    leftover = set(range(ndim)) - stack - in_ - out
    stack |= leftover  # axes of size one that vanished without a role
    if in_ & out or stack & (in_ | out):
        return None, f"{first.op} at {first.where} uses one kernel axis in two roles"
    if not in_ or not out:
        return None, f"{first.op} at {first.where} leaves no {'output' if in_ else 'input'} axis"
    for u in mm[1:]:
        same = set(u.in_) == in_ and set(u.out) == out
        swapped = set(u.in_) == out and set(u.out) == in_
        if not (same or swapped) or (set(u.stack) - stack):
            return None, (f"used with different contractions ({first.op} at {first.where} and "
                          f"{u.op} at {u.where})")
    convs = {u.conv for u in mm if u.kind == "conv"}
    conv = None if not convs else convs.pop() if len(convs) == 1 else ()
    if conv and set(conv) != in_:
        conv = ()
    return Layout(stack=tuple(sorted(stack)), in_=tuple(sorted(in_)), out=tuple(sorted(out)), conv=conv), ""
