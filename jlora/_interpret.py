"""The jaxpr interpreter behind ``apply``: evaluate apply_fn with adapted kernels kept unmerged.

An adapted kernel enters the jaxpr as a :class:`~jlora._value.LoraValue`: the current *view* of
the frozen base together with its factors and the role of every view axis. An equation that
consumes one goes through its rule in :data:`jlora._rules.RULES`; every other equation is
re-bound unchanged.
"""

from __future__ import annotations

from typing import Any

import jax

from jlora import _compat as jax_compat
from jlora._rules import RULES, Context, NoRule, recompute
from jlora._rules.compute import fuse_shared_input, shared_input_groups
from jlora._rules.control import flatten_values
from jlora._value import LoraValue, UnsupportedOpError

__all__ = ["UnsupportedOpError", "interpret", "eval_jaxpr"]


def interpret(closed_jaxpr, args: list[Any], *, fallback: str | None = None, rng: jax.Array | None = None,
              matmul: str = "xla") -> tuple[list[Any], list]:
    """Evaluate ``closed_jaxpr`` on ``args`` (LoraValues for adapted kernels); returns the outputs
    and, with ``matmul='pallas'``, the log of which matmuls took the fused kernel."""
    ctx = Context(eval_jaxpr, fallback=fallback, rng=rng, shared_xa=matmul == "shared_xa", pallas=matmul == "pallas")
    outs = eval_jaxpr(closed_jaxpr.jaxpr, closed_jaxpr.consts, args, ctx)
    return [o.materialize() if isinstance(o, LoraValue) else o for o in outs], ctx.fused_log


def eval_jaxpr(jaxpr, consts, args, ctx: Context) -> list[Any]:
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if jax_compat.is_literal(v) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    groups = shared_input_groups(jaxpr) if ctx.shared_xa else {}
    plan = ctx.recompute if ctx.recompute is not None and ctx.recompute.jaxpr is jaxpr else None
    for eqn in jaxpr.eqns:
        if plan and eqn.outvars and all(v in plan.chain for v in eqn.outvars):
            continue  # built inside the checkpointed region of each matmul that reads it (below)
        if plan and id(eqn) in plan.regions:
            outs = _with_region(eqn, plan.regions[id(eqn)], read, ctx)
            env.update(zip(eqn.outvars, outs))
            continue
        invals = [read(v) for v in eqn.invars]
        if any(isinstance(x, LoraValue) for x in invals):
            if id(eqn) in groups and id(eqn) not in ctx.shared:
                fuse_shared_input(groups[id(eqn)], env, ctx)
            outs = _apply_rule(eqn, invals, ctx)
        else:
            outs = jax_compat.bind(eqn, invals)
        for v, o in zip(eqn.outvars, outs):
            if not jax_compat.is_dropvar(v):
                env[v] = o
    return [read(v) for v in jaxpr.outvars]


def _with_region(eqn, region, read, ctx: Context) -> list[Any]:
    """``eqn`` (an adapted matmul) and the equations building its input, under ``jax.checkpoint``
    saving all but cheap elementwise values: the backward rebuilds the input from the region's roots
    instead of JAX stacking it across a scan's iterations (:mod:`jlora._rules.recompute`)."""
    others = [v for v in eqn.invars if v is not region.x]
    flat, rebuild = flatten_values([read(v) for v in others if not jax_compat.is_literal(v)])

    def body(roots, arrs):
        local = dict(zip(region.roots, roots))
        get = lambda v: v.val if jax_compat.is_literal(v) else local[v]
        for e in region.eqns:
            local.update(zip(e.outvars, jax_compat.bind(e, [get(v) for v in e.invars])))
        it = iter(rebuild(arrs))
        invals = [local[v] if v is region.x else (v.val if jax_compat.is_literal(v) else next(it))
                  for v in eqn.invars]
        outs = _apply_rule(eqn, invals, ctx) if any(isinstance(x, LoraValue) for x in invals) else \
            jax_compat.bind(eqn, invals)
        return [o.materialize() if isinstance(o, LoraValue) else o for o in outs]

    return jax.checkpoint(body, prevent_cse=False, policy=recompute.saveable)([read(v) for v in region.roots], flat)


def _apply_rule(eqn, invals, ctx: Context):
    rule = RULES.get(eqn.primitive.name)
    reason = "it has no LoRA rule"
    if rule is not None:
        try:
            with jax_compat.source_context(eqn):
                return rule.evaluate(eqn, invals, ctx)
        except NoRule as e:
            reason = str(e)
    kernels = [x.path for x in invals if isinstance(x, LoraValue)]
    if ctx.fallback == "merge":
        return jax_compat.bind(eqn, [x.materialize() if isinstance(x, LoraValue) else x for x in invals])
    raise UnsupportedOpError(
        f"Adapted kernel {', '.join(repr(k) for k in kernels)} reaches `{eqn.primitive.name}` at "
        f"{jax_compat.where(eqn)}, but {reason}. jlora computes LoRA unmerged through matmuls "
        f"(dot_general), convolutions, gathers and the reshapes/transposes/slices between them. "
        f"Leave this kernel out of `targets`, or pass `fallback='merge'` to inject to compute this "
        f"op with W0 + s·A·B materialised.")
