"""Rules for higher-order primitives: calls (jit, custom_jvp/vjp), remat, scan, while, cond.

Both passes enter the sub-jaxprs. The interpreter rebuilds each primitive with the public
``jax``/``jax.lax`` function (``jax.checkpoint`` with the same policy, ``lax.scan`` over the
stacked factors, ``lax.while_loop``, ``lax.switch``), never by re-binding primitive internals;
a call (jit, custom_jvp, custom_vjp) is inlined, so a kernel inside a ``custom_vjp`` is
differentiated through its primal, not its custom rule.
"""

from __future__ import annotations

import jax
from jax import lax

from jlora import _compat as jax_compat
from jlora._rules import recompute
from jlora._rules.table import NoRule, OpRule, Probe, expand
from jlora._value import LoraValue, Role, Tag

__all__ = ["RULES", "flatten_values"]


def flatten_values(vals):
    """Split values into a flat list of arrays and a function that rebuilds them."""
    flat, protos = [], []
    for v in vals:
        protos.append(v if isinstance(v, LoraValue) else None)
        flat.extend([v.w0, v.a, v.b, v.gain] if isinstance(v, LoraValue) else [v])  # gain: None unless DoRA

    def rebuild(arrs):
        out, it = [], iter(arrs)
        for proto in protos:
            out.append(proto.with_(w0=next(it), a=next(it), b=next(it), gain=next(it)) if proto is not None
                       else next(it))
        return out

    return flat, rebuild


def _out(v):
    return v.materialize() if isinstance(v, LoraValue) else v


# -- calls: jit / pjit / closed_call, custom_jvp, custom_vjp, and remat --------------------------------


def _call_discover(analysis, eqn, ins):
    inner, _ = jax_compat.inner_jaxpr(eqn)
    return analysis.run(inner, ins)


def _inline_evaluate(eqn, invals, ctx):
    jaxpr, consts = jax_compat.inner_jaxpr(eqn)
    sub = ctx.child(ctx.next_key()) if ctx.rng is not None else ctx
    return [_out(v) for v in ctx.run(jaxpr, consts, invals, sub)]


def _remat_evaluate(eqn, invals, ctx):
    jaxpr, consts = jax_compat.inner_jaxpr(eqn)
    flat, rebuild = flatten_values(invals)

    def body(rng, *arrs):
        return [_out(v) for v in ctx.run(jaxpr, consts, rebuild(arrs), ctx.child(rng))]

    fn = jax.checkpoint(body, prevent_cse=eqn.params.get("prevent_cse", True), policy=eqn.params.get("policy"))
    return list(fn(ctx.maybe_key(), *flat))


# -- scan ------------------------------------------------------------------------------------------------


def _invariant_carries(jaxpr, carry_in_pos, carry_out_pos) -> set[int]:
    """Carry slots whose body output is the very input variable (a loop-invariant carry)."""
    return {k for k, (i, o) in enumerate(zip(carry_in_pos, carry_out_pos)) if jaxpr.outvars[o] is jaxpr.invars[i]}


def _refuse_changing_kernel_carries(init, invariant, what: str) -> None:
    for k, c in enumerate(init):
        if isinstance(c, LoraValue) and k not in invariant:
            raise NoRule(f"an adapted kernel is a {what} carry that the loop changes")


def _scan_discover(analysis, eqn, ins):
    j, _ = jax_compat.closed_parts(eqn.params["jaxpr"])
    nc, nk = jax_compat.scan_counts(eqn)
    inner = list(ins)
    for idx in range(nc + nk, len(ins)):  # xs: the scan slices axis 0 away
        x = ins[idx]
        if isinstance(x, Probe):
            inner[idx] = Probe(x.leaf, x.tags[1:], x.removed | x.tags[0], x.exact)
    outs = analysis.run(j, inner)
    res = [None] * len(eqn.outvars)
    for idx in range(nk):  # a kernel passed through the carry unchanged stays a kernel
        c = ins[nc + idx]
        if isinstance(c, Probe) and outs[idx] is c:
            res[idx] = c
    return res


def _scan_evaluate(eqn, invals, ctx):
    jaxpr, jconsts = jax_compat.closed_parts(eqn.params["jaxpr"])
    nc, nk = jax_compat.scan_counts(eqn)
    consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
    _refuse_changing_kernel_carries(init, _invariant_carries(jaxpr, range(nc, nc + nk), range(nk)), "scan")
    xs_flat, xs_rebuild = flatten_values([x.stack_first() if isinstance(x, LoraValue) else x for x in xs])
    length = jax_compat.scan_length(eqn)
    rngs = jax.random.split(ctx.next_key(), length) if ctx.rng is not None else None
    # the adapted matmuls' inputs that the backward recomputes instead of stacking (_rules.recompute)
    again = recompute.plan(jaxpr, invals)

    def body(carry, x):
        arrs, key = x
        it = iter(carry)
        cv = [c if isinstance(c, LoraValue) else next(it) for c in init]
        sub = ctx.child(key, in_loop=True)
        sub.recompute = again
        outs = ctx.run(jaxpr, jconsts, list(consts) + cv + [_sliced(v) for v in xs_rebuild(arrs)], sub)
        new_carry = [o for k, o in enumerate(outs[:nk]) if not isinstance(init[k], LoraValue)]
        return new_carry, [_out(o) for o in outs[nk:]]

    carry_plain = [c for c in init if not isinstance(c, LoraValue)]
    carry_out, ys = lax.scan(body, carry_plain, (xs_flat, rngs), length=length,
                             reverse=eqn.params.get("reverse", False), unroll=eqn.params.get("unroll", 1))
    it = iter(carry_out)
    return [c if isinstance(c, LoraValue) else next(it) for c in init] + list(ys)


def _sliced(v):
    """The view inside a scan body: axis 0 (A's and B's first stack axis) taken away."""
    if not isinstance(v, LoraValue):
        return v
    return v.with_(tags=tuple(Tag(Role.STACK, t.idx - 1) if t.role is Role.STACK else t for t in v.tags[1:]))


# -- while -------------------------------------------------------------------------------------------------


def _while_discover(analysis, eqn, ins):
    cj, _ = jax_compat.closed_parts(eqn.params["cond_jaxpr"])
    bj, _ = jax_compat.closed_parts(eqn.params["body_jaxpr"])
    nc, nb = jax_compat.while_counts(eqn)
    carry = ins[nc + nb:]
    analysis.run(cj, ins[:nc] + carry)
    outs = analysis.run(bj, ins[nc:nc + nb] + carry)
    return [c if c is not None and o is c else None for c, o in zip(carry, outs)]


def _while_evaluate(eqn, invals, ctx):
    cj, cconsts = jax_compat.closed_parts(eqn.params["cond_jaxpr"])
    bj, bconsts = jax_compat.closed_parts(eqn.params["body_jaxpr"])
    nc, nb = jax_compat.while_counts(eqn)
    cond_c, body_c, init = invals[:nc], invals[nc:nc + nb], invals[nc + nb:]
    n = len(init)
    _refuse_changing_kernel_carries(init, _invariant_carries(bj, range(nb, nb + n), range(n)), "loop")

    def full(carry):
        it = iter(carry)
        return [c if isinstance(c, LoraValue) else next(it) for c in init]

    def cond_fun(state):
        carry, _ = state
        (out,) = ctx.run(cj, cconsts, list(cond_c) + full(carry), ctx)
        return _out(out)

    def body_fun(state):
        carry, key = state
        sub_key = None
        if key is not None:
            key, sub_key = jax.random.split(key)
        outs = ctx.run(bj, bconsts, list(body_c) + full(carry), ctx.child(sub_key, in_loop=True))
        return [_out(o) for k, o in enumerate(outs) if not isinstance(init[k], LoraValue)], key

    plain = [c for c in init if not isinstance(c, LoraValue)]
    carry, _ = lax.while_loop(cond_fun, body_fun, (plain, ctx.maybe_key()))
    return full(carry)


# -- cond ----------------------------------------------------------------------------------------------------


def _cond_discover(analysis, eqn, ins):
    """Uses inside every branch count; a kernel does not flow out of a cond."""
    for br in eqn.params["branches"]:
        j, _ = jax_compat.closed_parts(br)
        analysis.run(j, ins[1:])
    return [None] * len(eqn.outvars)


def _cond_evaluate(eqn, invals, ctx):
    index, *ops = invals
    flat, rebuild = flatten_values(ops)

    def make(br):
        j, consts = jax_compat.closed_parts(br)

        def f(key, *arrs):
            sub = ctx.child(key) if key is not None else ctx
            return [_out(o) for o in ctx.run(j, consts, rebuild(arrs), sub)]

        return f

    return list(lax.switch(index, [make(b) for b in eqn.params["branches"]], ctx.maybe_key(), *flat))


RULES = expand({
    jax_compat.JIT: OpRule(_call_discover, _inline_evaluate),
    jax_compat.CUSTOM_JVP: OpRule(_call_discover, _inline_evaluate),
    jax_compat.CUSTOM_VJP: OpRule(_call_discover, _inline_evaluate),
    jax_compat.REMAT: OpRule(_call_discover, _remat_evaluate),
    jax_compat.SCAN: OpRule(_scan_discover, _scan_evaluate),
    jax_compat.WHILE: OpRule(_while_discover, _while_evaluate),
    jax_compat.COND: OpRule(_cond_discover, _cond_evaluate),
})
