"""The adapted matmuls' inputs inside a ``lax.scan`` body: recomputed in the backward, not stacked.

A LoRA step needs each adapted matmul's input ``x`` in its backward (``dA = xᵀ·(s·dy·Bᵀ)``); a
frozen base does not. Unrolled, XLA keeps ``x`` alive at no cost. Inside a scan, JAX stacks every
residual across iterations: a zeroed ``(layers, …)`` buffer, a dynamic-update-slice per layer in the
forward loop and a slice copied out per layer in the backward loop, for inputs that are mostly cheap
elementwise functions of values the base's own backward keeps anyway (an RMS norm of the residual
stream, ``silu(gate)·up``, a reshape of the attention output).

:func:`recomputable` finds, in a scan body's own equations, the values built by cheap elementwise
equations (:data:`CHEAP`, or a call made only of them, like ``jax.nn.silu``) and used for nothing but
building an adapted matmul's input. :func:`regions` groups them per adapted matmul: the equations that
build its input from *roots* (values the body computes anyway, such as the norm's float32 input and
row sums, ``gate`` and ``up``). The interpreter evaluates each adapted matmul together with its
region inside ``jax.checkpoint`` whose policy saves every value but the cheap elementwise ones
(:func:`saveable`): its residuals are then the roots, which the base's own backward keeps anyway,
besides what the adapter's own backward keeps (``x·A``, a DoRA norm), and the backward recomputes the
input from them. Every other residual of the body is saved as before; values are not changed, only where they
are computed. ``JLORA_RECOMPUTE_IN_LOOPS=0`` turns it off (:func:`enabled`).

Why not a policy on the whole body: a policy decides per primitive, and the last elementwise equation
before a named input is saveable like any other, so JAX would stack its output, the same array.
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

from jlora import _compat as jax_compat
from jlora._quant import is_quantized
from jlora._value import LoraValue

__all__ = ["CHEAP", "ENV", "LINEAR", "Plan", "Region", "enabled", "plan", "recomputable", "regions", "saveable"]

#: Environment switch, read at every trace: ``0`` (or false, no, off) stacks the inputs as JAX does.
ENV = "JLORA_RECOMPUTE_IN_LOOPS"

#: Primitives cheap to recompute: elementwise arithmetic, conversions and the layout ops between.
CHEAP = frozenset({
    "abs", "add", "sub", "mul", "div", "neg", "max", "min", "sign", "square", "sqrt", "rsqrt", "exp",
    "exp2", "log", "log1p", "logistic", "tanh", "erf", "integer_pow", "pow", "select_n", "clamp",
    "convert_element_type", "broadcast_in_dim", "reshape", "squeeze", "expand_dims", "transpose",
    "copy", "copy_p",
})

#: Cheap primitives whose backward needs none of their operands (``select_n``: but its predicate);
#: ``mul`` by a literal and ``div`` by one are too.
LINEAR = frozenset({
    "add", "sub", "neg", "convert_element_type", "broadcast_in_dim", "reshape", "squeeze", "expand_dims",
    "transpose", "copy", "copy_p", "select_n",
})

_OFF = ("0", "false", "no", "off")
_ON = ("", "1", "true", "yes", "on")


def enabled() -> bool:
    """Whether scan bodies recompute their adapted matmuls' inputs (``JLORA_RECOMPUTE_IN_LOOPS``).

    Raises:
        ValueError: the variable holds anything but a switch.
    """
    value = os.environ.get(ENV, "").strip().lower()
    if value not in _OFF + _ON:
        raise ValueError(f"{ENV}={os.environ[ENV]!r} is not a switch jlora reads: set it to 0, false, no or "
                         "off to stack the adapted matmuls' inputs in lax.scan bodies as JAX does, to 1 (or "
                         "unset it) to recompute them in the backward.")
    return value not in _OFF


def _cheap(eqn) -> bool:
    name = eqn.primitive.name
    if name in CHEAP:
        return True
    if name in jax_compat.JIT:  # jax.nn.silu and friends are jitted functions of cheap equations
        inner, _ = jax_compat.inner_jaxpr(eqn)
        return all(_cheap(e) for e in inner.eqns)
    return False


def saveable(prim, *_, **__) -> bool:
    """The checkpoint policy of a region: every value but those of cheap elementwise equations (calls
    are entered: their equations are judged one by one)."""
    return prim.name not in CHEAP


def recomputable(jaxpr, kernel_invars, *, excluded=()) -> set:
    """Variables of ``jaxpr``'s own equations to recompute in the backward.

    Args:
        jaxpr: a scan body.
        kernel_invars: its input variables that carry adapted kernels.
        excluded: those of ``kernel_invars`` whose matmuls must not be evaluated in a region. A
            quantized base is: its dequantization runs inside a ``jax.checkpoint`` that saves
            nothing, and nested in a region's checkpoint JAX applies the region's policy to it and
            would stack the dense dequantized kernel per layer.

    Returns:
        Every variable that a cheap equation produces, that is not an output of ``jaxpr``, does not
        depend on a kernel, and whose every use is either as an operand of a ``dot_general`` with a
        kernel (not an excluded one) on the other side or by a cheap equation all of whose outputs
        are in the set; less the inputs whose region would keep more bytes than the input itself,
        and what those are built from (:func:`_worthwhile`).

    >>> import jax, jax.numpy as jnp
    >>> def body(h, w):
    ...     x = jnp.tanh(h) * 2.0
    ...     return h + x @ w, None
    >>> j = jax.make_jaxpr(body)(jnp.ones((2, 3)), jnp.ones((3, 3))).jaxpr
    >>> sorted(str(j.eqns[i].primitive) for i, e in enumerate(j.eqns)
    ...        if set(e.outvars) & recomputable(j, {j.invars[1]}))
    ['mul', 'tanh']
    """
    kern, excl = set(kernel_invars), set(excluded)
    users: dict = {}
    for eqn in jaxpr.eqns:
        ins = [v for v in eqn.invars if not jax_compat.is_literal(v)]
        for v in ins:
            users.setdefault(v, []).append(eqn)
        if eqn.primitive.name != "dot_general" and any(v in kern for v in ins):
            kern.update(eqn.outvars)  # views of a kernel (transpose, convert, …) are kernels too
            if any(v in excl for v in ins):
                excl.update(eqn.outvars)
    outs = {v for v in jaxpr.outvars if not jax_compat.is_literal(v)}

    def adapted_input(eqn, v) -> bool:  # v is one operand of a matmul whose other one is a kernel
        if eqn.primitive.name != "dot_general":
            return False
        lhs, rhs = eqn.invars
        other = rhs if v is lhs else lhs
        return not jax_compat.is_literal(other) and other in kern and other not in excl and other is not v

    chain: set = set()
    for eqn in reversed(jaxpr.eqns):  # every use of a variable comes after its equation
        if not _cheap(eqn) or any(v in kern for v in eqn.outvars):
            continue
        if all(v not in outs and users.get(v)
               and all(adapted_input(u, v) or (_cheap(u) and all(o in chain for o in u.outvars))
                       for u in users[v])
               for v in eqn.outvars):
            chain.update(eqn.outvars)
    return _worthwhile(jaxpr, chain)


def _worthwhile(jaxpr, chain: set) -> set:
    """``chain`` less every matmul input whose region would keep more bytes than the input itself
    (and the chain values it is built from): a region's roots cost nothing where the stacked path keeps
    them, or a linear function of them, anyway (:func:`_kept_anyway`); the others are kept for the
    region alone, like two frozen matmuls' outputs summed into ``x``, or a float32 value cast to the
    bfloat16 ``x``."""
    producer = {v: e for e in jaxpr.eqns for v in e.outvars}

    def costly(r: Region) -> bool:
        kept = _kept_anyway(r)
        return sum(_nbytes(v) for v in r.roots if v not in kept) > _nbytes(r.x)

    while True:
        bad = [r.x for r in regions(jaxpr, chain).values() if costly(r)]
        if not bad:
            return chain
        stack = bad  # the rejected inputs and what they are built from leave the chain
        while stack:
            v = stack.pop()
            if v in chain:
                e = producer[v]
                chain = chain - set(e.outvars)
                stack.extend(u for u in e.invars if not jax_compat.is_literal(u) and u in chain)


def _linear_in(eqn, i: int) -> bool:
    name = eqn.primitive.name
    if name == "select_n":
        return i > 0
    if name in LINEAR:
        return True
    lits = [jax_compat.is_literal(v) for v in eqn.invars]
    return (name == "mul" and any(lits)) or (name == "div" and i == 0 and lits[1])


def _kept_anyway(region: "Region") -> set:
    """The region's values whose backward (as JAX stacks it) needs them, or a linear function of them:
    the operands of its non-linear equations (``rsqrt``, ``x·w``, ``silu``), and what those are
    built from through linear ones."""
    need: set = set()
    for e in reversed(region.eqns):
        used = any(o in need for o in e.outvars)
        need.update(v for i, v in enumerate(e.invars)
                    if not jax_compat.is_literal(v) and (used or not _linear_in(e, i)))
    return need


def _nbytes(v) -> int:
    return math.prod(v.aval.shape) * v.aval.dtype.itemsize


class Region(NamedTuple):
    """One adapted matmul's input, rebuilt from ``roots`` by ``eqns`` (in the body's order)."""

    eqns: tuple
    roots: tuple  # variables the equations read that they do not produce (literals left out)
    x: Any  # the matmul's operand that the equations produce


def regions(jaxpr, chain: set) -> dict[int, Region]:
    """``id(dot_general equation) -> Region`` for every matmul of ``jaxpr`` with an operand in ``chain``
    (from :func:`recomputable`)."""
    producer = {v: e for e in jaxpr.eqns for v in e.outvars}
    out: dict[int, Region] = {}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name != "dot_general":
            continue
        xs = [v for v in eqn.invars if not jax_compat.is_literal(v) and v in chain]
        if len(xs) != 1:
            continue
        need, stack = set(), [producer[xs[0]]]
        while stack:  # the chain equations this input depends on
            e = stack.pop()
            if id(e) in need:
                continue
            need.add(id(e))
            stack.extend(producer[v] for v in e.invars if not jax_compat.is_literal(v) and v in chain)
        eqns = tuple(e for e in jaxpr.eqns if id(e) in need)
        made = {v for e in eqns for v in e.outvars}
        roots = tuple(dict.fromkeys(v for e in eqns for v in e.invars
                                    if not jax_compat.is_literal(v) and v not in made))
        out[id(eqn)] = Region(eqns, roots, xs[0])
    return out


class Plan(NamedTuple):
    """What :func:`~jlora._interpret.eval_jaxpr` does differently in one scan body: skip the ``chain``
    equations and evaluate each planned matmul with its region (``id(eqn) -> Region``)."""

    jaxpr: Any  # the body this plan was made for (a call inside it runs its own jaxpr, unplanned)
    chain: frozenset
    regions: dict


def plan(jaxpr, invals) -> Plan | None:
    """The plan of a scan body evaluated on ``invals`` (LoraValues for adapted kernels), or None when
    the switch is off or no input is worth a region. A kernel with a quantized base gets none (see
    :func:`recomputable`'s ``excluded``)."""
    if not enabled():
        return None
    kernels = [(v, a) for v, a in zip(jaxpr.invars, invals) if isinstance(a, LoraValue)]
    chain = recomputable(jaxpr, [v for v, _ in kernels], excluded=[v for v, a in kernels if is_quantized(a.w0)])
    return Plan(jaxpr, frozenset(chain), regions(jaxpr, chain)) if chain else None
