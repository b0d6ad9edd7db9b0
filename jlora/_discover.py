"""Read kernel layouts off a trace of ``apply_fn``: how each parameter leaf is actually used.

A static data-flow pass over the jaxpr: every floating parameter leaf starts as a *probe* whose
axes are tagged with the kernel axes they came from. Each equation a probe reaches goes through the
``discover`` half of its rule in :data:`jlora._rules.RULES` (the same table ``apply`` evaluates
with), which carries the probe through views and records, at a ``dot_general`` /
``conv_general_dilated`` / ``gather``, which kernel axes it contracts, batches and keeps. An
equation with no rule records an unsupported use. No value is computed.
"""

from __future__ import annotations

from typing import Any

from jlora import _compat as jax_compat
from jlora._node import Layout
from jlora._rules import RULES, Probe, Use

__all__ = ["Use", "discover", "gather_layout", "layout_from_uses"]


class _Analysis:
    def __init__(self, n_leaves: int):
        self.uses: dict[int, list[Use]] = {i: [] for i in range(n_leaves)}

    def add(self, probe: Probe, use: Use) -> None:
        self.uses[probe.leaf].append(use)

    def other(self, probe: Probe, eqn, why: str = "") -> None:
        self.add(probe, Use("other", eqn.primitive.name + (f" ({why})" if why else ""), jax_compat.where(eqn)))

    def run(self, jaxpr, env_in: list[Any]) -> list[Any]:
        env = {v: p for v, p in zip(jaxpr.invars, env_in) if p is not None}
        for eqn in jaxpr.eqns:
            ins = [None if jax_compat.is_literal(v) else env.get(v) for v in eqn.invars]
            if not any(isinstance(p, Probe) for p in ins):
                continue
            rule = RULES.get(eqn.primitive.name)
            if rule is None:
                for q in ins:
                    if isinstance(q, Probe):
                        self.other(q, eqn)
                continue
            for v, p in zip(eqn.outvars, rule.discover(self, eqn, ins)):
                if p is not None and not jax_compat.is_dropvar(v):
                    env[v] = p
        return [None if jax_compat.is_literal(v) else env.get(v) for v in jaxpr.outvars]


def discover(closed_jaxpr, n_leaves: int, candidates: list[int]) -> dict[int, list[Use]]:
    """Uses of each candidate leaf (leaf ``i`` is ``jaxpr.invars[i]``)."""
    a = _Analysis(n_leaves)
    jaxpr = closed_jaxpr.jaxpr
    env: list[Any] = [None] * len(jaxpr.invars)
    for i in candidates:
        nd = len(jaxpr.invars[i].aval.shape)
        env[i] = Probe(i, tuple(frozenset({k}) for k in range(nd)), frozenset())
    a.run(jaxpr, env)
    return {i: a.uses[i] for i in candidates}


def gather_layout(uses: list[Use], ndim: int) -> tuple[Layout | None, str]:
    """The layout of a table read only by gathers (an embedding): A on the gathered axis, B on the
    other, as PEFT's LoRA on embeddings; ``(None, reason)`` if it is used any other way."""
    bad = [u for u in uses if u.kind != "gather"]
    if bad:
        return None, f"used by {bad[0].op} at {bad[0].where}, which has no LoRA rule"
    first = uses[0]
    if any((u.in_, u.out) != (first.in_, first.out) for u in uses) or ndim != 2:
        return None, "gathered along different axes"
    return Layout(stack=(), in_=tuple(sorted(first.in_)), out=tuple(sorted(first.out)), gather=True), ""


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
