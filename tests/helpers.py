"""Helpers shared by the test modules (import with ``from helpers import ...``)."""

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
