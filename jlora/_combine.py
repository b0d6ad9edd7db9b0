"""One adapter from a weighted combination of a bank's adapters: PEFT's ``add_weighted_adapter``.

For every kernel, with ``w_i`` the weight and ``s_i`` the scale of each chosen adapter that adapts
it (the others are skipped there, as in PEFT), and jlora's ``ΔW_i = A_i·B_i``:

* ``"linear"``: ``A = Σ sign(w_i s_i)·√|w_i s_i|·A_i`` and ``B = Σ √|w_i s_i|·B_i`` — the factors
  are averaged, not the updates (so it is *not* ``Σ w_i s_i ΔW_i``; PEFT calls it a rough
  approximation). Every chosen adapter must have the same rank at the kernel, which the result keeps.
* ``"cat"``: ``A = [w_1 s_1 A_1, …, w_n s_n A_n]`` and ``B = [B_1; …; B_n]`` along the rank axis:
  exactly ``Σ w_i s_i ΔW_i``, with rank the sum of the ranks.
* ``"svd"``: the best rank-``rank`` approximation of ``Σ w_i s_i ΔW_i`` (``rank`` defaults to the
  largest rank among the chosen adapters), factored as PEFT does (the singular values on B's
  side). It never forms the ``in × out`` update: with ``U = [A_1 … A_n]`` and ``V = [w_1 s_1 B_1;
  …]`` (``ΔW = U·V``), a QR decomposition of ``U`` and of ``Vᵀ`` and an SVD of the small
  ``R_U·R_Vᵀ`` core give the exact truncated SVD (cost ``O((in + out)·R²)`` for total rank ``R``).

The result has scale 1 (PEFT: ``lora_alpha = r``) and the dropout rate of the first chosen
adapter (PEFT copies its config). As in PEFT, a single chosen adapter always combines linearly.
PEFT with ``use_rslora`` would additionally multiply its combined adapter by ``√r`` (it keeps
``use_rslora`` with ``lora_alpha = r``); jlora does not copy that.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax

from jlora._bank import LoraBank, absent_leaf, bank_leaves, is_bank, names_of, params_form, slot_factors
from jlora._node import LoraKernel

__all__ = ["combine_adapters", "METHODS"]

#: ``combine_adapters(..., method=...)``: PEFT's add_weighted_adapter combination types that jlora has.
METHODS = ("linear", "cat", "svd")

_HI = lax.Precision.HIGHEST


def _weights(names: tuple[str, ...], weights: Union[Mapping[str, float], Sequence[float]]) -> list[tuple[int, float]]:
    if isinstance(weights, Mapping):
        unknown = [k for k in weights if k not in names]
        if unknown:
            raise ValueError(f"combine_adapters: no adapter named {unknown[0]!r} in the bank; it holds {list(names)}.")
        chosen = [(names.index(k), float(w)) for k, w in weights.items()]
    else:
        ws = list(weights)
        if len(ws) != len(names):
            raise ValueError(f"combine_adapters: {len(ws)} weights for {len(names)} adapters {list(names)}; pass one "
                             f"per adapter, or a mapping {{name: weight}} for some of them.")
        chosen = [(i, float(w)) for i, w in enumerate(ws)]
    if not chosen:
        raise ValueError("combine_adapters: no adapters chosen (empty weights).")
    for i, w in chosen:
        if not math.isfinite(w):
            raise ValueError(f"combine_adapters: the weight of {names[i]!r} is {w}, not a finite number.")
    return chosen


def _factors(node: LoraBank, i: int) -> tuple[jax.Array, jax.Array]:
    """Adapter ``i``'s own A and B at this kernel, float32, without the rank padding."""
    a, b = slot_factors(node, i)
    return a.astype(jnp.float32), b.astype(jnp.float32)


def _as_matrices(a: jax.Array, b: jax.Array, ns: int) -> tuple[jax.Array, jax.Array]:
    """A as (stack..., in, r) and B as (stack..., r, out), the input and output axes flattened."""
    stack = a.shape[:ns]
    return a.reshape(stack + (-1, a.shape[-1])), b.reshape(stack + (b.shape[ns], -1))


def _svd_factors(us: list[jax.Array], vs: list[jax.Array], ns: int, k: int) -> tuple[jax.Array, jax.Array]:
    """The rank-k truncated SVD of ``Σ u_i·v_i`` as ``(A, B)`` with ``A·B`` that truncation, never
    forming the product: QR of ``U = [u_1 … u_n]`` and of ``Vᵀ``, then the SVD of the small core."""
    a_shape, b_shape = us[0].shape, vs[0].shape
    ms = [_as_matrices(u, v, ns) for u, v in zip(us, vs)]
    u = jnp.concatenate([m[0] for m in ms], axis=-1)  # (S, IN, R)
    v = jnp.concatenate([m[1] for m in ms], axis=-2)  # (S, R, OUT)
    qa, ra = jnp.linalg.qr(u)  # (S, IN, k1), (S, k1, R)
    qb, rb = jnp.linalg.qr(jnp.swapaxes(v, -1, -2))  # (S, OUT, k2), (S, k2, R)
    core = jnp.matmul(ra, jnp.swapaxes(rb, -1, -2), precision=_HI)  # (S, k1, k2)
    p, sv, qt = jnp.linalg.svd(core, full_matrices=False)
    kk = min(k, sv.shape[-1])
    a = jnp.matmul(qa, p[..., :kk], precision=_HI)  # (S, IN, kk)
    b = jnp.matmul(sv[..., :kk, None] * qt[..., :kk, :], jnp.swapaxes(qb, -1, -2), precision=_HI)  # (S, kk, OUT)
    if kk < k:  # the update has rank < k: zero columns / rows carry nothing
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, k - kk)])
        b = jnp.pad(b, [(0, 0)] * (b.ndim - 2) + [(0, k - kk), (0, 0)])
    return a.reshape(a_shape[:-1] + (k,)), b.reshape(b_shape[:ns] + (k,) + b_shape[ns + 1:])


def _combine_node(path: str, node: LoraBank, chosen: list[tuple[int, float]], method: str, k: int) -> Optional[LoraKernel]:
    here = [(i, w) for i, w in chosen if node.ranks[i] > 0]
    if not here:
        return None
    ns = len(node.layout.stack)
    fs = [(_factors(node, i), w * node.scales[i]) for i, w in here]
    if method == "linear":
        ranks = sorted({node.ranks[i] for i, _ in here})
        if len(ranks) > 1:
            raise ValueError(
                f"combine_adapters: method='linear' needs one rank per kernel, but at '{path}' the adapters "
                f"{', '.join(f'{node.names[i]!r} (r={node.ranks[i]})' for i, _ in here)} differ (as PEFT's "
                f"add_weighted_adapter). Use method='cat' or 'svd'.")
        a = sum(math.copysign(math.sqrt(abs(ws)), ws) * fa for (fa, _), ws in fs)
        b = sum(math.sqrt(abs(ws)) * fb for (_, fb), ws in fs)
    elif method == "cat":
        a = jnp.concatenate([ws * fa for (fa, _), ws in fs], axis=-1)
        b = jnp.concatenate([fb for (_, fb), _ in fs], axis=ns)
    else:
        a, b = _svd_factors([fa for (fa, _), _ in fs], [ws * fb for (_, fb), ws in fs], ns, k)
    first = here[0][0]
    return LoraKernel(node.w0, a.astype(node.a.dtype), b.astype(node.b.dtype), layout=node.layout, scale=1.0,
                      dropout=node.dropouts[first])


def combine_adapters(bank: Any, weights: Union[Mapping[str, float], Sequence[float]], method: str = "linear",
                     rank: Optional[int] = None) -> Any:
    """One adapter set from a weighted combination of a bank's adapters, with the semantics of
    PEFT's ``add_weighted_adapter(adapters, weights, combination_type=method, svd_rank=rank)``.

    Args:
      bank: a bank from :func:`jlora.stack_adapters` (adapters form) or ``combine(bank, base)``
        (params form).
      weights: ``{name: weight}`` for the adapters to combine (in that order; the others are left
        out), or one weight per adapter in the bank's order. Negative weights subtract.
      method: ``"linear"`` (factors averaged, equal ranks), ``"cat"`` (exact sum, ranks add up) or
        ``"svd"`` (exact sum truncated to ``rank``); see :mod:`jlora._combine` for the formulas.
      rank: only for ``"svd"``: the rank of the result (default: the largest rank of the chosen
        adapters, as PEFT's ``svd_rank=None``).

    Returns:
      An adapters tree with one :class:`~jlora.LoraKernel` (scale 1) at every kernel that a chosen
      adapter adapts — injected params if ``bank`` was in params form. Add it to the bank with
      :func:`jlora.add_adapter`, run it with ``apply``, save or export it.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> lay = jlora.Layout((), (0,), (1,))
        >>> k = lambda v, s: jlora.LoraKernel(None, jnp.full((4, 1), v), jnp.ones((1, 3)), layout=lay, scale=s)
        >>> bank = jlora.stack_adapters({"x": {"w": k(1.0, 2.0)}, "y": {"w": k(3.0, 1.0)}})
        >>> mix = jlora.combine_adapters(bank, {"x": 0.5, "y": 1.0}, method="cat")
        >>> mix["w"].rank, float((mix["w"].a @ mix["w"].b)[0, 0])   # 0.5·2·1 + 1·1·3
        (2, 4.0)
        >>> svd = jlora.combine_adapters(bank, {"x": 0.5, "y": 1.0}, method="svd", rank=1)
        >>> round(float((svd["w"].a @ svd["w"].b)[0, 0]), 5)
        4.0
    """
    if method not in METHODS:
        raise ValueError(f"combine_adapters: method must be one of {METHODS} (PEFT's combination types that jlora "
                         f"has), got {method!r}.")
    names = names_of(bank, "combine_adapters")
    chosen = _weights(names, weights)
    if len({i for i, _ in chosen}) != len(chosen):
        raise ValueError("combine_adapters: an adapter is named twice in weights.")
    if rank is not None and method != "svd":
        raise ValueError(f"combine_adapters: rank= is only for method='svd' ({method!r} fixes the rank).")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"combine_adapters: rank must be a positive int, got {rank!r}.")
    if len(chosen) == 1:
        method = "linear"  # as PEFT: one adapter is always combined linearly
    paths, leaves, treedef = bank_leaves(bank)
    k = rank or max(x.ranks[i] for x in leaves if is_bank(x) for i, _ in chosen)
    form = params_form(leaves)
    out = []
    for path, x in zip(paths, leaves):
        if is_bank(x):
            node = _combine_node(path, x, chosen, method, k)
            out.append(node if node is not None else absent_leaf(x, form))
        else:
            out.append(x)
    if not any(isinstance(x, LoraKernel) for x in out):
        raise ValueError(f"combine_adapters: the chosen adapters {[names[i] for i, _ in chosen]} adapt no kernel.")
    return jax.tree_util.tree_unflatten(treedef, out)
