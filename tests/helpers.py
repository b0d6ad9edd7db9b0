"""Helpers shared by the test modules (import with ``from helpers import ...``)."""

import collections
import math
import re

import jax

import jlora


def randomize(params, key=jax.random.key(42), scale=0.5):
    """Give every adapter nonzero A and B (B starts at zero, which would hide bugs), and a DoRA
    adapter's magnitude m a random factor in [0.5, 1.5] (it starts at the kernel's norms)."""
    is_lk = lambda n: isinstance(n, jlora.LoraKernel)  # noqa: E731
    nodes = [x for x in jax.tree.leaves(params, is_leaf=is_lk) if is_lk(x)]
    keys = iter(jax.random.split(key, 3 * max(len(nodes), 1)))

    def one(n):
        if not is_lk(n):
            return n
        a = jax.random.normal(next(keys), n.a.shape, n.a.dtype) * scale
        b = jax.random.normal(next(keys), n.b.shape, n.b.dtype) * scale
        km = next(keys)
        m = None if n.m is None else n.m * jax.random.uniform(km, n.m.shape, n.m.dtype, 0.5, 1.5)
        return n.replace(a=a, b=b, m=m)

    return jax.tree.map(one, params, is_leaf=is_lk)


def eqns_where(jaxpr, pred) -> list:
    """The equations of ``jaxpr`` for which ``pred(eqn)`` holds, nested jaxprs followed (each
    reference to a sub-jaxpr counts; a matching equation's own sub-jaxprs are not searched)."""
    out = []
    for eqn in jaxpr.eqns:
        if pred(eqn):
            out.append(eqn)
            continue
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else [v]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += eqns_where(inner, pred)
    return out


# -- HLO: the collectives of a compiled program ---------------------------------------------------------

_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.-]+\s*=\s*(.*?)\s(all-gather|all-reduce|reduce-scatter|all-to-all)(-start)?\(")
_SHAPE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")


def collectives(hlo: str) -> dict[str, list[tuple[str, int]]]:
    """``{op: [(dtype, elements), ...]}`` for each collective's result(s) in optimized HLO text
    (a combined collective contributes each of its results; an async ``-start`` its outputs)."""
    out = collections.defaultdict(list)
    for line in hlo.splitlines():
        m = _OP.match(re.sub(r"/\*.*?\*/", "", line))
        if not m:
            continue
        shapes = _SHAPE.findall(m.group(1))
        if m.group(3):  # all-gather-start: ((operands), (results)) -> keep the results' half
            shapes = shapes[len(shapes) // 2:]
        for dt, dims in shapes:
            out[m.group(2)].append((dt, math.prod(int(d) for d in dims.split(",") if d)))
    return out
