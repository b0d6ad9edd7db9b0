"""Helpers shared by the test modules (import with ``from helpers import ...``)."""

import jax

import jlora


def randomize(params, key=jax.random.key(42), scale=0.5):
    """Give every adapter nonzero A and B (B starts at zero, which would hide bugs)."""
    is_lk = lambda n: isinstance(n, jlora.LoraKernel)  # noqa: E731
    nodes = [x for x in jax.tree.leaves(params, is_leaf=is_lk) if is_lk(x)]
    keys = iter(jax.random.split(key, 2 * max(len(nodes), 1)))

    def one(n):
        if not is_lk(n):
            return n
        a = jax.random.normal(next(keys), n.a.shape, n.a.dtype) * scale
        b = jax.random.normal(next(keys), n.b.shape, n.b.dtype) * scale
        return jlora.LoraKernel(n.w0, a, b, layout=n.layout, scale=n.scale, dropout=n.dropout)

    return jax.tree.map(one, params, is_leaf=is_lk)
