"""Pure tree functions over injected params: split, combine, merge, labels, optimizer, summary."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlora._node import LoraKernel, Trainable, delta, is_node
from jlora._paths import path_str
from jlora._quant import dense, is_quantized

__all__ = ["split", "combine", "merge", "labels", "optimizer", "summary", "iter_kernels"]


def is_unit(x: Any) -> bool:
    """A leaf for jlora's own flattening: a LoraKernel/Trainable node or a quantized kernel."""
    return is_node(x) or is_quantized(x)


def split(params: Any) -> tuple[Any, Any]:
    """Split injected params into ``(adapters, base)``.

    ``adapters`` has the structure of ``params`` with ``None`` in place of every frozen leaf (so it
    holds exactly the trainable leaves: A, B, and leaves trained in full); ``base`` has ``None`` in
    place of every trainable leaf. ``combine(adapters, base)`` puts them back together. Use it to
    differentiate with respect to the adapters only::

        adapters, base = jlora.split(params)
        grads = jax.grad(lambda ad: loss(jlora.combine(ad, base), batch))(adapters)

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> k = jlora.LoraKernel(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)),
        ...                      layout=jlora.Layout((), (0,), (1,)), scale=1.0)
        >>> adapters, base = jlora.split({"w": k, "bias": jnp.zeros(3)})
        >>> adapters["bias"] is None, base["w"].a is None
        (True, True)
    """

    def ad(x):
        if isinstance(x, LoraKernel):
            return LoraKernel(None, x.a, x.b, layout=x.layout, scale=x.scale, dropout=x.dropout)
        if isinstance(x, Trainable):
            return x
        return None

    def bs(x):
        if isinstance(x, LoraKernel):
            return LoraKernel(x.w0, None, None, layout=x.layout, scale=x.scale, dropout=x.dropout)
        if isinstance(x, Trainable):
            return Trainable(None)
        return x

    return (
        jax.tree.map(ad, params, is_leaf=is_node),
        jax.tree.map(bs, params, is_leaf=is_node),
    )


def combine(adapters: Any, base: Any) -> Any:
    """Inverse of :func:`split`: fill ``base``'s holes with ``adapters``' leaves.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> k = jlora.LoraKernel(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)),
        ...                      layout=jlora.Layout((), (0,), (1,)), scale=1.0)
        >>> p = jlora.combine(*jlora.split({"w": k}))
        >>> p["w"].w0.shape, p["w"].a.shape
        ((4, 3), (4, 2))
    """
    pick = lambda a, b: b if a is None else a
    return jax.tree.map(pick, adapters, base, is_leaf=lambda x: x is None)


def merge(params: Any) -> Any:
    """The original params structure with ``W0 + s·A·B`` folded into every adapted kernel.

    The sum is accumulated in float32 and cast back to W0's dtype (for a bfloat16 base that is one
    rounding of the exact sum, so ``merge`` can differ from the unmerged model by half a bf16 ulp
    per weight). Leaves trained in full are unwrapped. Quantized bases are dequantized first.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> k = jlora.LoraKernel(jnp.zeros((2, 2)), jnp.eye(2), jnp.ones((2, 2)),
        ...                      layout=jlora.Layout((), (0,), (1,)), scale=0.5)
        >>> jlora.merge({"w": k})["w"]
        Array([[0.5, 0.5],
               [0.5, 0.5]], dtype=float32)
    """

    def one(x):
        if isinstance(x, LoraKernel):
            w0 = dense(x.w0)
            d = delta(x.a, x.b, x.layout, jnp.float32)
            return (w0.astype(jnp.float32) + x.scale * d).astype(w0.dtype)
        if isinstance(x, Trainable):
            return x.value
        return x

    return jax.tree.map(one, params, is_leaf=is_node)


def _label_tree(params: Any) -> Any:
    def one(x):
        if isinstance(x, LoraKernel):
            w0 = jax.tree.map(lambda _: "frozen", x.w0)  # a quantized base has several children
            return LoraKernel(w0, "lora", "lora", layout=x.layout, scale=x.scale, dropout=x.dropout)
        if isinstance(x, Trainable):
            return Trainable("lora")
        return jax.tree.map(lambda _: "frozen", x)

    return jax.tree.map(one, params, is_leaf=is_node)


def labels(params: Any) -> Any:
    """``'lora'`` for every trainable leaf and ``'frozen'`` for every other, per leaf.

    The result is ``optax.multi_transform``'s ``param_labels``. When the params' root is itself
    callable (an equinox module), optax would call it as a labelling function, so in that case the
    label tree is returned wrapped in a function that returns it.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> k = jlora.LoraKernel(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)),
        ...                      layout=jlora.Layout((), (0,), (1,)), scale=1.0)
        >>> lab = jlora.labels({"w": k, "norm": jnp.ones(3)})
        >>> lab["norm"], lab["w"].w0, lab["w"].a
        ('frozen', 'frozen', 'lora')
    """
    tree = _label_tree(params)
    if callable(tree):
        return lambda _params: tree
    return tree


def optimizer(tx: optax.GradientTransformation, params: Any) -> optax.GradientTransformation:
    """``tx`` on the adapters, nothing on the frozen base.

    ``optax.multi_transform({'lora': tx, 'frozen': optax.set_to_zero()}, labels(params))``: the
    optimizer state holds only adapter-sized arrays, and frozen leaves get zero updates.

    Example:
        >>> import jax.numpy as jnp, optax, jlora
        >>> k = jlora.LoraKernel(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)),
        ...                      layout=jlora.Layout((), (0,), (1,)), scale=1.0)
        >>> tx = jlora.optimizer(optax.adam(1e-3), {"w": k})
        >>> state = tx.init({"w": k})
    """
    return optax.multi_transform({"lora": tx, "frozen": optax.set_to_zero()}, labels(params))


def iter_kernels(params: Any):
    """Yield ``(path, node)`` for every :class:`LoraKernel` and :class:`Trainable` in ``params``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)
    for path, x in flat:
        if is_node(x):
            yield path_str(path), x


def _count(x) -> int:
    if x is None:
        return 0
    return int(math.prod(np.shape(x)))


def summary(params: Any) -> str:
    """A table of what was adapted: path, kernel shape, layout, rank, trainable counts.

    Like PEFT's ``print_trainable_parameters``, with one row per adapted kernel.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> k = jlora.LoraKernel(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)),
        ...                      layout=jlora.Layout((), (0,), (1,)), scale=1.0)
        >>> print(jlora.summary({"w": k}))  # doctest: +NORMALIZE_WHITESPACE
        path  kernel  layout          rank  scale  trainable
        w     (4, 3)  in=[0] out=[1]  2     1      14
        trainable params: 14 || all params: 26 || trainable%: 53.8462
    """
    rows = [("path", "kernel", "layout", "rank", "scale", "trainable")]
    trainable = 0
    for path, x in iter_kernels(params):
        if isinstance(x, LoraKernel):
            n = _count(x.a) + _count(x.b)
            rows.append((path, str(tuple(x.shape)), str(x.layout), str(x.rank), f"{x.scale:g}", str(n)))
        else:
            n = _count(x.value)
            rows.append((path, str(tuple(np.shape(x.value))), "full", "-", "-", str(n)))
        trainable += n
    total = 0
    for leaf in jax.tree.leaves(params, is_leaf=is_quantized):
        total += int(math.prod(getattr(leaf, "shape", np.shape(leaf))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    pct = 100.0 * trainable / max(total, 1)
    lines.append(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}")
    return "\n".join(lines)
