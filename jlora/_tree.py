"""Pure tree functions over injected params: split, combine, merge, labels, optimizer, summary."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlora._bank import LoraBank, bank_problem, is_bank
from jlora._node import LoraKernel, Trainable, as_plain_lora, effective_factors, factor_problem, is_node
from jlora._paths import leaf_name, path_str
from jlora._quant import dequantized, is_quantized
from jlora._value import delta

__all__ = ["split", "combine", "merge", "labels", "optimizer", "loraplus", "convert_to_lora", "summary", "iter_kernels", "base_of", "Flat",
           "host_array", "is_jlora_leaf", "plain"]


def is_jlora_leaf(x: Any) -> bool:
    """A leaf for jlora's own flattening: a LoraKernel/Trainable/LoraBank node or a quantized kernel."""
    return is_node(x) or is_bank(x) or is_quantized(x)


def _is_unit(x: Any) -> bool:
    """A node that the tree functions treat whole: LoraKernel, Trainable, LoraBank."""
    return is_node(x) or is_bank(x)


def plain(x: Any) -> Any:
    """The base value under a jlora node (a LoraKernel's or LoraBank's ``w0``, a Trainable's value),
    or ``x``."""
    if isinstance(x, (LoraKernel, LoraBank)):
        return x.w0
    return x.value if isinstance(x, Trainable) else x


def host_array(x: Any) -> np.ndarray:
    """``x`` as a numpy array on the host."""
    return np.asarray(jax.device_get(x))


@dataclasses.dataclass(frozen=True)
class Flat:
    """Params flattened with jlora's nodes and quantized kernels kept whole, with their paths."""

    paths: list[str]
    leaves: list[Any]
    treedef: Any

    @classmethod
    def of(cls, params: Any) -> "Flat":
        """Example:
        >>> Flat.of({"a": {"kernel": 1.0}, "b": [2.0]}).paths
        ['a/kernel', 'b/0']
        """
        flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_jlora_leaf)
        return cls([path_str(p) for p, _ in flat], [x for _, x in flat], treedef)

    def items(self) -> list[tuple[str, Any]]:
        return list(zip(self.paths, self.leaves))

    def plain_leaves(self) -> list[Any]:
        return [plain(x) for x in self.leaves]


def split(params: Any) -> tuple[Any, Any]:
    """Split injected params into ``(adapters, base)``.

    ``base`` is exactly the original structure: the plain pretrained params, with every adapted
    kernel back to its ``W0`` (a quantized kernel stays quantized) and every leaf trained in full
    back to its plain value, so ``apply_fn(base, x)`` runs the base model and
    ``load_adapters(directory, base)`` accepts it. ``adapters`` has the structure of ``params``
    with ``None`` in place of every frozen leaf: it holds exactly the trainable leaves (A and B in
    :class:`LoraKernel` nodes whose ``w0`` is ``None``, and :class:`Trainable` leaves).
    ``combine(adapters, base)`` rebuilds the injected params. Differentiate with respect to the
    adapters only::

        adapters, base = jlora.split(params)
        grads = jax.grad(lambda ad: loss(jlora.combine(ad, base), batch))(adapters)

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> k = jlora.LoraKernel(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)),
        ...                      layout=jlora.Layout((), (0,), (1,)), scale=1.0)
        >>> adapters, base = jlora.split({"w": k, "bias": jnp.zeros(3)})
        >>> adapters["bias"] is None, adapters["w"].a.shape, base["w"].shape
        (True, (4, 2), (4, 3))
    """

    def ad(x):
        if isinstance(x, LoraKernel):
            return x.replace(w0=None)  # A, B, DoRA's m (and PiSSA/OLoRA's frozen A0, B0)
        if isinstance(x, LoraBank):
            return x.replace(w0=None)
        return x if isinstance(x, Trainable) else None

    return jax.tree.map(ad, params, is_leaf=_is_unit), base_of(params)


def base_of(params: Any) -> Any:
    """``params`` with every jlora node replaced by its plain base value (``split``'s base)."""

    return jax.tree.map(plain, params, is_leaf=_is_unit)


def combine(adapters: Any, base: Any) -> Any:
    """Inverse of :func:`split`: put ``adapters``' trainable leaves onto ``base``.

    ``base`` is the plain base params (``split``'s base), or injected params whose adapters are
    replaced by ``adapters``'. Each adapter must fit the base kernel it lands on; trees from
    different models or different injections are refused with the first path that differs.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> k = jlora.LoraKernel(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)),
        ...                      layout=jlora.Layout((), (0,), (1,)), scale=1.0)
        >>> p = jlora.combine(*jlora.split({"w": k}))
        >>> p["w"].w0.shape, p["w"].a.shape
        ((4, 3), (4, 2))
    """
    ad_flat, ad_def = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=_hole_or_node)
    try:
        base_parts = ad_def.flatten_up_to(base)
    except (ValueError, TypeError) as e:
        raise ValueError(
            "combine: adapters and base have different tree structures; pass the two halves of "
            f"one jlora.split(params) (or the base params the adapters were trained on). {e}"
        ) from None
    out = [_combine_one(path_str(p), a, b) for (p, a), b in zip(ad_flat, base_parts)]
    return jax.tree_util.tree_unflatten(ad_def, out)


def _hole_or_node(x: Any) -> bool:
    return x is None or _is_unit(x)


def _combine_one(path: str, ad: Any, base: Any) -> Any:
    if isinstance(base, (LoraKernel, LoraBank)) and ad is None:
        raise ValueError(
            f"combine: base has an adapter at '{path}' but adapters has none: the two trees come "
            f"from different injections. Pass split(params)[1] (the plain base) as base."
        )
    plain = base.w0 if isinstance(base, (LoraKernel, LoraBank)) else base.value if isinstance(base, Trainable) else base
    if ad is None:
        return plain
    if isinstance(ad, Trainable):
        if np.shape(ad.value) != tuple(_shape_of(plain)):
            raise ValueError(f"combine: '{path}' is trained in full with shape {np.shape(ad.value)}, "
                             f"but base has {_describe(plain)} there.")
        return ad
    if plain is None or not hasattr(plain, "shape"):
        raise ValueError(f"combine: '{path}' is adapted, but base has {_describe(plain)} there, not a "
                         f"kernel. Pass the base params the adapters were trained on.")
    node = ad.replace(w0=plain)
    why = bank_problem(node) if isinstance(ad, LoraBank) else factor_problem(node)
    if why is not None:
        raise ValueError(f"combine: the adapter at '{path}' does not fit base kernel {_describe(plain)}: "
                         f"{why}. Adapters and base come from different models or injections.")
    return node


def _shape_of(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def _describe(x: Any) -> str:
    if x is None:
        return "None"
    if hasattr(x, "shape"):
        return f"{getattr(x, 'dtype', '')}{list(x.shape)}"
    return type(x).__name__


def merge(params: Any) -> Any:
    """The original params structure with ``W0 + s·A·B`` folded into every adapted kernel.

    A DoRA kernel becomes ``m ⊙ (W0 + s·A·B) / ‖W0 + s·A·B‖`` (the norm over its input axes per
    output unit, a constant for gradients as in ``apply``); a PiSSA/OLoRA kernel
    ``W0 + s·(A·B − A0·B0)``. The sum is accumulated in float32 and cast back to W0's dtype (for a bfloat16 base that is one
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
            if x.w0 is None:
                raise ValueError("merge: these params hold adapters without their base kernels (split's "
                                 "adapters tree); pass jlora.combine(adapters, base).")
            return merged_kernel(x)
        if isinstance(x, Trainable):
            return x.value
        if isinstance(x, LoraBank):
            raise ValueError(f"merge: the params hold an adapter bank ({', '.join(x.names)}); merge one "
                             f"adapter: jlora.merge(jlora.select_adapter(params, name)), or combine several "
                             f"into one with jlora.combine_adapters.")
        return x

    return jax.tree.map(one, params, is_leaf=_is_unit)


def merged_kernel(x: LoraKernel) -> jax.Array:
    """One adapted kernel's merged value (see :func:`merge`), in W0's dtype."""
    from jlora._dora import gain_in_kernel_order

    w0 = dequantized(x.w0)
    a, b = effective_factors(x)
    w = w0.astype(jnp.float32) + x.scale * delta(a, b, x.layout, jnp.float32)
    if x.m is not None:
        w = w * gain_in_kernel_order(w, x.m, x.layout)
    return w.astype(w0.dtype)


def convert_to_lora(params: Any) -> Any:
    """Adapters made by a weight-modifying init (PiSSA, OLoRA) as standard LoRA over the original
    weights: each such kernel's ``(A, B, A0, B0)`` becomes the rank-2r pair ``([A, A0], [B; −B0])``,
    trainable as a whole, computing the same model (as PEFT's ``path_initial_model_for_weight_
    conversion`` writes it; :func:`jlora.export_peft` does this itself). Other kernels are unchanged.
    A LoftQ adapter is refused: its base is LoftQ's quantized weights, and the difference from the
    original weights is not low-rank.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> k = jlora.LoraKernel(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.ones((2, 3)), a0=jnp.zeros((4, 2)),
        ...                      b0=jnp.zeros((2, 3)), layout=jlora.Layout((), (0,), (1,)), scale=0.5, init="pissa")
        >>> c = jlora.convert_to_lora({"w": k})["w"]
        >>> c.rank, c.init, bool(jnp.allclose(jlora.merge({"w": c})["w"], jlora.merge({"w": k})["w"]))
        (4, None, True)
    """

    def one(path, x):
        return as_plain_lora(x, f"convert_to_lora: '{path_str(path)}'") if isinstance(x, LoraKernel) else x

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_node)


def _label_tree(params: Any, plus: bool = False) -> Any:
    """Per leaf: 'lora' / 'frozen'; with ``plus`` (LoRA+), the trainable ones split into 'lora_a',
    'lora_b', 'lora_b_no_decay' and 'embedding' as PEFT's ``create_loraplus_optimizer`` groups them
    (B, DoRA's magnitude and 1-D leaves trained in full with B; biases without weight decay; the
    factors of an embedding table on their own)."""

    def one(path, x):
        if isinstance(x, LoraKernel):
            w0 = jax.tree.map(lambda _: "frozen", x.w0)  # a quantized base has several children
            la, lb = _factor_labels(x.layout, plus)
            frozen = None if x.a0 is None else "frozen"
            return x.replace(w0=w0, a=la, b=lb, m=None if x.m is None else lb, a0=frozen, b0=frozen)
        if isinstance(x, Trainable):
            if not plus:
                return Trainable("lora")
            if np.ndim(x.value) == 1:
                return Trainable("lora_b_no_decay" if leaf_name(path_str(path)) in ("bias", "b") else "lora_b")
            return Trainable("lora_a")
        if isinstance(x, LoraBank):
            la, lb = _factor_labels(x.layout, plus)
            return x.replace(w0=jax.tree.map(lambda _: "frozen", x.w0), a=la, b=lb)
        return jax.tree.map(lambda _: "frozen", x)

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_unit)


def _factor_labels(layout: Any, plus: bool) -> tuple[str, str]:
    """A's and B's labels: one group without LoRA+; with it, A and B apart, an embedding's together."""
    if not plus:
        return "lora", "lora"
    return ("embedding", "embedding") if layout.gather else ("lora_a", "lora_b")


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


def optimizer(tx: optax.GradientTransformation, params: Any, *, lr_ratio: float | None = None
              ) -> optax.GradientTransformation:
    """``tx`` on the adapters, nothing on the frozen base.

    ``optax.multi_transform({'lora': tx, 'frozen': optax.set_to_zero()}, labels)``: the optimizer
    state holds only adapter-sized arrays, and frozen leaves get zero updates. The labels are
    computed from the tree the optimizer is given, so the same optimizer works over the whole
    injected params and over ``split(params)[0]`` (the adapters alone, which is what a QLoRA
    base needs: its integer codes cannot be differentiated) — use one of the two consistently
    for ``init`` and ``update``.

    ``lr_ratio=λ`` is LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large
    Models"): B's learning rate is λ times A's. B — with DoRA's magnitudes and 1-D leaves trained
    in full, as PEFT's ``create_loraplus_optimizer`` groups them — gets ``chain(tx, scale(λ))``,
    A and the rest ``tx``, each group with its own optimizer state. Scaling an update by λ is
    scaling the learning rate by λ for every optimizer whose update is linear in its learning rate
    (SGD with or without momentum, Adam, AdamW with its weight decay, RMSProp, Lion, ...); for one
    that is not (Adafactor's relative steps, schedule-free or learning-rate-free optimizers), use
    :func:`loraplus`, which builds each group's optimizer with its own learning rate. Embedding
    adapters are in the A/B groups here; :func:`loraplus` gives them their own learning rate.

    Args:
      tx: the optimizer for the adapters (e.g. ``optax.adamw(2e-4)``).
      params: injected params or their adapters tree; checked to hold adapters.
      lr_ratio: LoRA+'s ηB/ηA (PEFT's ``loraplus_lr_ratio``, e.g. 16); None for plain LoRA.

    Example:
        >>> import jax.numpy as jnp, optax, jlora
        >>> k = jlora.LoraKernel(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)),
        ...                      layout=jlora.Layout((), (0,), (1,)), scale=1.0)
        >>> tx = jlora.optimizer(optax.adam(1e-3), {"w": k})
        >>> state = tx.init({"w": k})
        >>> adapters, base = jlora.split({"w": k})
        >>> state = tx.init(adapters)     # or over the adapters alone
        >>> tx = jlora.optimizer(optax.sgd(0.1), {"w": k}, lr_ratio=16)
        >>> g = jax.tree.map(jnp.ones_like, {"w": k})
        >>> u, _ = tx.update(g, tx.init({"w": k}), {"w": k})
        >>> [round(float(x[0, 0]), 6) for x in (u["w"].a, u["w"].b, u["w"].w0)]
        [-0.1, -1.6, 0.0]
    """
    _check_has_adapters(params, "optimizer")
    if lr_ratio is None:
        return optax.multi_transform({"lora": tx, "frozen": optax.set_to_zero()}, _label_tree)
    ratio = _check_ratio(lr_ratio)
    b_tx = optax.chain(tx, optax.scale(ratio))
    groups = {"lora_a": tx, "embedding": tx, "lora_b": b_tx, "lora_b_no_decay": b_tx, "frozen": optax.set_to_zero()}
    return optax.multi_transform(groups, functools.partial(_label_tree, plus=True))


def loraplus(optimizer_cls, params: Any, *, lr, lr_ratio: float, lr_embedding: float = 1e-6,
             weight_decay: float = 0.0, **kwargs) -> optax.GradientTransformation:
    """LoRA+ exactly as PEFT's ``create_loraplus_optimizer``: one optimizer per parameter group.

    Groups (Hayou et al. 2024; PEFT's grouping): A and leaves of 2+ axes trained in full get
    ``optimizer_cls(lr)``; B, DoRA's magnitudes and 1-D leaves trained in full get
    ``optimizer_cls(lr · lr_ratio)``; the factors of an embedding table get
    ``optimizer_cls(lr_embedding)`` (PEFT's ``loraplus_lr_embedding``, default 1e-6). With
    ``weight_decay`` (PEFT's ``loraplus_weight_decay``) passed as ``weight_decay=`` to every group
    but the biases trained in full. The frozen base gets zero updates.

    Args:
      optimizer_cls: an optax optimizer factory taking the learning rate first, e.g. ``optax.adamw``.
      params: injected params or their adapters tree.
      lr: A's learning rate (a float or an optax schedule).
      lr_ratio: ηB/ηA (>= 1 in the paper; e.g. 16).
      lr_embedding: the embedding factors' learning rate.
      weight_decay: weight decay of every group but biases (needs an optimizer that takes it).
      **kwargs: passed to every ``optimizer_cls`` call (``b1``, ``eps``, ...).

    Example:
        >>> import jax.numpy as jnp, optax, jlora
        >>> k = jlora.LoraKernel(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)),
        ...                      layout=jlora.Layout((), (0,), (1,)), scale=1.0)
        >>> tx = jlora.loraplus(optax.sgd, {"w": k}, lr=0.1, lr_ratio=4)
        >>> u, _ = tx.update(jax.tree.map(jnp.ones_like, {"w": k}), tx.init({"w": k}))
        >>> round(float(u["w"].a[0, 0]), 6), round(float(u["w"].b[0, 0]), 6)
        (-0.1, -0.4)
    """
    _check_has_adapters(params, "loraplus")
    ratio = _check_ratio(lr_ratio)
    scaled = (lambda n: lr(n) * ratio) if callable(lr) else lr * ratio  # noqa: E731
    decay = {} if weight_decay == 0.0 else {"weight_decay": weight_decay}
    no_decay = {} if weight_decay == 0.0 else {"weight_decay": 0.0}
    groups = {
        "lora_a": optimizer_cls(lr, **decay, **kwargs),
        "embedding": optimizer_cls(lr_embedding, **decay, **kwargs),
        "lora_b": optimizer_cls(scaled, **decay, **kwargs),
        "lora_b_no_decay": optimizer_cls(scaled, **no_decay, **kwargs),
        "frozen": optax.set_to_zero(),
    }
    return optax.multi_transform(groups, functools.partial(_label_tree, plus=True))


def _check_ratio(lr_ratio: Any) -> float:
    if isinstance(lr_ratio, bool) or not isinstance(lr_ratio, (int, float)) or not math.isfinite(lr_ratio) \
            or lr_ratio <= 0:
        raise ValueError(f"lr_ratio must be a positive number (LoRA+'s ηB/ηA, e.g. 16), got {lr_ratio!r}.")
    return float(lr_ratio)


def _check_has_adapters(params: Any, what: str) -> None:
    if not any(_is_unit(x) for x in jax.tree.leaves(params, is_leaf=_is_unit)):
        raise ValueError(f"{what}: params hold no adapters (no LoraKernel or Trainable node); pass "
                         "the params returned by jlora.inject, or split(params)[0].")


def iter_kernels(params: Any, *, banks: bool = False):
    """Yield ``(path, node)`` for every :class:`LoraKernel` and :class:`Trainable` in ``params``
    (and :class:`~jlora.LoraBank` with ``banks=True``; without it a bank is refused, naming its path:
    the callers save or export one adapter set)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_unit)
    for path, x in flat:
        if is_bank(x) and not banks:
            raise ValueError(
                f"'{path_str(path)}' holds an adapter bank ({', '.join(x.names)}), but this function takes "
                f"one adapter set: pass jlora.select_adapter(bank, name) for each name.")
        if _is_unit(x):
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
    for path, x in iter_kernels(params, banks=True):
        if isinstance(x, LoraKernel):
            n = _count(x.a) + _count(x.b) + _count(x.m)
            rows.append((path, str(tuple(x.shape)), str(x.layout), str(x.rank), f"{x.scale:g}", str(n)))
        elif isinstance(x, LoraBank):  # one row for the bank: ranks and scales per adapter
            n = _count(x.a) + _count(x.b)
            rows.append((path, str(tuple(x.shape)), str(x.layout), "/".join(map(str, x.ranks)),
                         "/".join(f"{s:g}" for s in x.scales), str(n)))
        else:
            n = _count(x.value)
            rows.append((path, str(tuple(np.shape(x.value))), "full", "-", "-", str(n)))
        trainable += n
    total = sum(int(math.prod(leaf.shape)) for leaf in jax.tree.leaves(params, is_leaf=is_quantized)
                if hasattr(leaf, "shape"))  # arrays and quantized kernels; not Python numbers or functions
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    pct = 100.0 * trainable / max(total, 1)
    lines.append(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}")
    return "\n".join(lines)
