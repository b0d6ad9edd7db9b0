"""Many adapters over one base: the :class:`LoraBank` node and pure tree functions over banks.

A *bank* holds N named adapters of one model. It has the structure of :func:`jlora.split`'s
adapters tree: every kernel that at least one adapter adapts holds one :class:`LoraBank` node (the
N adapters' A and B stacked on a new leading axis), every other position ``None``. Put onto a base
with :func:`jlora.combine` it becomes params that ``apply`` runs as a mixed batch
(``apply(params, x, adapter_ids=ids)``, each example with its own adapter, see :mod:`jlora._mixed`).

* Ranks may differ between adapters: A and B are padded with zeros to the largest rank of each
  kernel (a zero column of A and a zero row of B add exactly 0 to ``x·A·B``); ``ranks`` records
  each adapter's own rank so that :func:`select_adapter` gives back exactly the adapter stacked.
* Target sets may differ: an adapter that does not adapt a kernel has rank 0 there and zero
  factors in its slot.
* Scales and dropout rates stay per adapter (static tuples, like :class:`~jlora.LoraKernel`'s).
* Layouts must agree: one kernel is contracted the same way by every adapter of the bank.

Every function here is a pure tree function: it returns new trees and never changes its inputs.
A bank is either in *adapters form* (``w0`` is ``None``; what :func:`stack_adapters` returns) or
in *params form* (``w0`` is the base kernel; what ``combine(bank, base)`` returns). Each function
keeps the form it was given.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora._node import Layout, LoraKernel, Trainable, as_plain_lora, is_node, kernel_shape
from jlora._paths import path_str
from jlora._quant import is_quantized

__all__ = ["LoraBank", "BASE", "adapter_ids", "adapter_names", "add_adapter", "bank_problem", "has_bank",
           "is_bank", "refuse_banks", "remove_adapter", "select_adapter", "slot_factors", "stack_adapters"]

#: The name that means "no adapter, the base model" in :func:`adapter_ids` (as PEFT's ``adapter_names``).
BASE = "__base__"


@jax.tree_util.register_pytree_with_keys_class
class LoraBank:
    """The adapters of N named adapter sets at one frozen kernel ``w0``.

    ``a`` is ``(stack..., in..., N, r)`` and ``b`` is ``(stack..., N, r, out...)``: the adapter
    axis sits just before the rank axis, and ``a[..., i, :]`` / ``b[..., i, :, ...]`` are the i-th
    adapter's A and B in :class:`~jlora.LoraKernel`'s layout, padded with zeros from its own rank
    ``ranks[i]`` to ``r`` (the largest). So the bank is also one adapter of rank ``N·r`` (A and B
    reshaped, no copy), which is how a decode step's mixed batch reads it in one matmul. ``ranks[i] == 0`` where adapter ``i`` does not
    adapt this kernel (its slot is all zeros). Static fields: ``layout`` (shared by every adapter),
    ``names``, ``ranks``, ``scales``, ``dropouts``, ``rslora`` (one entry per adapter; ``rslora[i]``:
    adapter ``i``'s scale was ``alpha/√r``, kept so that its export writes ``use_rslora``).

    Example:
        >>> import jax.numpy as jnp
        >>> bank = LoraBank(None, jnp.zeros((4, 2, 3)), jnp.zeros((2, 3, 5)), layout=Layout((), (0,), (1,)),
        ...                 names=("x", "y"), ranks=(3, 1), scales=(1.0, 2.0))
        >>> bank.shape, bank.rank, bank.n
        ((4, 5), 3, 2)
    """

    __slots__ = ("w0", "a", "b", "layout", "names", "ranks", "scales", "dropouts", "rslora")

    def __init__(self, w0, a, b, *, layout: Layout, names: Sequence[str], ranks: Sequence[int],
                 scales: Sequence[float], dropouts: Optional[Sequence[float]] = None,
                 rslora: Optional[Sequence[bool]] = None):
        self.w0, self.a, self.b = w0, a, b
        self.layout = layout
        self.names = tuple(str(n) for n in names)
        self.ranks = tuple(int(r) for r in ranks)
        self.scales = tuple(float(s) for s in scales)
        self.dropouts = tuple(float(d) for d in (dropouts if dropouts is not None else [0.0] * len(self.names)))
        self.rslora = tuple(bool(x) for x in (rslora if rslora is not None else [False] * len(self.names)))

    def tree_flatten(self):  # keyless, for jitted calls (see LoraKernel.tree_flatten)
        return (self.w0, self.a, self.b), (self.layout, self.names, self.ranks, self.scales, self.dropouts,
                                           self.rslora)

    def tree_flatten_with_keys(self):
        ga = jax.tree_util.GetAttrKey
        children, aux = self.tree_flatten()
        return tuple(zip(map(ga, ("w0", "a", "b")), children)), aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.w0, obj.a, obj.b = children
        obj.layout, obj.names, obj.ranks, obj.scales, obj.dropouts, obj.rslora = aux
        return obj

    @property
    def n(self) -> int:
        """The number of adapters."""
        return len(self.names)

    @property
    def rank(self) -> int:
        """The padded rank (the largest of ``ranks``)."""
        return int(np.shape(self.a)[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        """The kernel's shape (from A and B when ``w0`` is absent)."""
        if self.w0 is None:
            a, b, ns = tuple(np.shape(self.a)), tuple(np.shape(self.b)), len(self.layout.stack)
            return kernel_shape(self.layout, a[:-2] + a[-1:], b[:ns] + b[ns + 1:])
        return tuple(self.w0.shape)

    def replace(self, **kw) -> "LoraBank":
        d = {k: getattr(self, k) for k in self.__slots__}
        d.update(kw)
        w0, a, b = d.pop("w0"), d.pop("a"), d.pop("b")
        return LoraBank(w0, a, b, **d)

    def __repr__(self) -> str:
        def desc(x):
            return "None" if x is None else f"{getattr(x, 'dtype', type(x).__name__)}{list(np.shape(x))}"

        return (f"LoraBank(w0={desc(self.w0)}, a={desc(self.a)}, b={desc(self.b)}, layout=({self.layout}), "
                f"names={self.names}, ranks={self.ranks}, scales={tuple(f'{s:g}' for s in self.scales)})")


def is_bank(x: Any) -> bool:
    return isinstance(x, LoraBank)


def has_bank(tree: Any) -> bool:
    """Whether ``tree`` holds at least one :class:`LoraBank`."""
    return any(is_bank(x) for x in jax.tree.leaves(tree, is_leaf=is_bank))


def refuse_banks(tree: Any, what: str) -> None:
    """Raise, naming the first bank's path, where a function takes one adapter set only."""
    for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_bank)[0]:
        if is_bank(x):
            raise ValueError(
                f"{what}: '{path_str(path)}' holds an adapter bank ({x.n} adapters: {', '.join(x.names)}); "
                f"{what} takes one adapter set. Pass jlora.select_adapter(bank, name) for each name, "
                f"e.g. {{name: {what}(..., jlora.select_adapter(bank, name)) for name in jlora.adapter_names(bank)}}.")


def bank_problem(node: LoraBank) -> str | None:
    """What is wrong with a bank node's factors and static fields, or None."""
    n = len(node.names)
    if n < 1:
        return "it holds no adapters"
    if len(set(node.names)) != n:
        return f"its names {node.names} are not unique"
    if not (len(node.ranks) == len(node.scales) == len(node.dropouts) == len(node.rslora) == n):
        return f"names, ranks, scales, dropouts and rslora have different lengths ({n}, {len(node.ranks)}, " \
               f"{len(node.scales)}, {len(node.dropouts)}, {len(node.rslora)})"
    a, b, lay = node.a, node.b, node.layout
    if a is None or b is None:
        return "it has no A/B factors"
    for name, f in (("A", a), ("B", b)):
        dt = getattr(f, "dtype", None)
        if dt is None or not jnp.issubdtype(dt, jnp.floating):
            return f"{name} has dtype {dt}; adapters must be floating point"
    a_shape, b_shape = tuple(np.shape(a)), tuple(np.shape(b))
    ns = len(lay.stack)
    if len(a_shape) != ns + len(lay.in_) + 2 or len(b_shape) != ns + 2 + len(lay.out):
        return f"A {list(a_shape)} / B {list(b_shape)} do not have the axes its layout ({lay}) needs with an " \
               f"adapter axis before the rank axis"
    r = a_shape[-1]
    shape = node.shape
    one_a, one_b = tuple(lay.a_shape(shape, r)), tuple(lay.b_shape(shape, r))
    want_a, want_b = one_a[:-1] + (n, r), one_b[:ns] + (n,) + one_b[ns:]
    if a_shape != want_a or b_shape != want_b:
        return (f"A {list(a_shape)} / B {list(b_shape)} do not fit kernel {list(shape)} with layout ({lay}) "
                f"and {n} adapters: expected A {list(want_a)} and B {list(want_b)}")
    if any(q < 0 or q > r for q in node.ranks) or not any(node.ranks):
        return f"its ranks {node.ranks} are not between 0 and the padded rank {r} (with at least one > 0)"
    for nm, q, s, d in zip(node.names, node.ranks, node.scales, node.dropouts):
        if q and (not math.isfinite(s) or s <= 0):
            return f"adapter {nm!r} has scale {s}, not a positive finite number"
        if not 0.0 <= d < 1.0:
            return f"adapter {nm!r} has dropout {d}, not in [0, 1)"
    return None


# -- flattening ---------------------------------------------------------------------------------------------


def _unit(x: Any) -> bool:
    return x is None or is_node(x) or is_bank(x) or is_quantized(x)


def bank_leaves(tree: Any):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_unit)
    return [path_str(p) for p, _ in flat], [x for _, x in flat], treedef


def _check_paths(what: str, name: str, paths: list[str], want: list[str]) -> None:
    if paths == want:
        return
    have, wanted = set(paths), set(want)
    missing = [p for p in want if p not in have]
    extra = [p for p in paths if p not in wanted]
    first = (f"it lacks '{missing[0]}'" if missing else f"it has '{extra[0]}', which the others lack") \
        if missing or extra else "its leaves are in a different order"
    raise ValueError(f"{what}: adapter {name!r} has a different tree structure from the others ({first}): "
                     f"adapters of one bank must come from the same model (jlora.split(params)[0] or the "
                     f"injected params of one base).")


def _kernel_of(what: str, name: str, path: str, x: Any) -> Optional[LoraKernel]:
    """The adapter at one position of one input tree, or None where it adapts nothing."""
    if isinstance(x, Trainable):
        raise ValueError(
            f"{what}: adapter {name!r} trains '{path}' in full (bias= or full= of inject, PEFT's "
            f"modules_to_save); a bank holds LoRA factors only. Leave it out of the adapter (inject "
            f"without bias/full), or serve that adapter on its own.")
    if is_bank(x):
        raise ValueError(f"{what}: adapter {name!r} is itself a bank (at '{path}'); use jlora.add_adapter to "
                         f"add to a bank, or jlora.select_adapter to take one adapter out of it.")
    if not isinstance(x, LoraKernel):
        return None
    if getattr(x, "m", None) is not None:
        raise ValueError(f"{what}: adapter {name!r} has a DoRA magnitude at '{path}'; banks hold plain LoRA "
                         f"adapters only.")
    if x.a is None or x.b is None:
        raise ValueError(f"{what}: adapter {name!r} has no A/B factors at '{path}'.")
    return as_plain_lora(x, f"{what}: adapter {name!r} at '{path}'")  # PiSSA/OLoRA: rank 2r; LoftQ refused


def _fit(slot: Optional[LoraKernel], r: int, ns: int, a_shape, b_shape, dtype_a, dtype_b):
    """One slot's A and B padded to rank ``r`` (zeros for an adapter absent here)."""
    if slot is None:
        return jnp.zeros(a_shape[:-1] + (r,), dtype_a), jnp.zeros(b_shape[:ns] + (r,) + b_shape[ns + 1:], dtype_b)
    a, b = jnp.asarray(slot.a, dtype_a), jnp.asarray(slot.b, dtype_b)
    q = a.shape[-1]
    if q < r:
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, r - q)])
        b = jnp.pad(b, [(0, 0)] * ns + [(0, r - q)] + [(0, 0)] * (b.ndim - ns - 1))
    return a, b


def _bank_of(what: str, path: str, w0: Any, entries: list[tuple[str, Optional[LoraKernel]]]) -> Optional[LoraBank]:
    """Stack one kernel's adapters (None where an adapter does not adapt it); None if none does."""
    present = [(nm, k) for nm, k in entries if k is not None]
    if not present:
        return None
    nm0, k0 = present[0]
    shape0 = tuple(k0.shape)
    for nm, k in present[1:]:
        if k.layout != k0.layout:
            raise ValueError(
                f"{what}: kernel '{path}' has layout ({k0.layout}) in adapter {nm0!r} but ({k.layout}) in "
                f"adapter {nm!r}; the adapters of one bank must contract each kernel the same way (inject "
                f"them over the same apply_fn, or import them with the same layouts).")
        if tuple(k.shape) != shape0:
            raise ValueError(
                f"{what}: kernel '{path}' is {list(shape0)} in adapter {nm0!r} but {list(k.shape)} in adapter "
                f"{nm!r}: the adapters come from different base models.")
    if w0 is not None and tuple(np.shape(w0)) != shape0:
        raise ValueError(f"{what}: the adapters at '{path}' fit a kernel {list(shape0)}, but the base holds "
                         f"{list(np.shape(w0))} there: they were trained on a different base.")
    r = max(k.rank for _, k in present)
    ns = len(k0.layout.stack)
    dt_a = jnp.result_type(*[k.a.dtype for _, k in present])
    dt_b = jnp.result_type(*[k.b.dtype for _, k in present])
    a_shape, b_shape = tuple(np.shape(k0.a)), tuple(np.shape(k0.b))
    slots = [_fit(k, r, ns, a_shape, b_shape, dt_a, dt_b) for _, k in entries]
    a_all, b_all = jnp.stack([s[0] for s in slots], axis=-2), jnp.stack([s[1] for s in slots], axis=ns)
    return LoraBank(w0, a_all, b_all, layout=k0.layout,
                    names=[nm for nm, _ in entries], ranks=[0 if k is None else k.rank for _, k in entries],
                    scales=[0.0 if k is None else k.scale for _, k in entries],
                    dropouts=[0.0 if k is None else k.dropout for _, k in entries],
                    rslora=[False if k is None else k.rslora for _, k in entries])


def _slot(bank: LoraBank, i: int) -> Optional[LoraKernel]:
    """Adapter ``i`` of a bank node as a LoraKernel (w0 as the bank's), or None where it adapts nothing."""
    q = bank.ranks[i]
    if q == 0:
        return None
    a, b = slot_factors(bank, i)
    return LoraKernel(bank.w0, a, b, layout=bank.layout, scale=bank.scales[i], dropout=bank.dropouts[i],
                      rslora=bank.rslora[i])


def slot_factors(bank: LoraBank, i: int) -> tuple[jax.Array, jax.Array]:
    """Adapter ``i``'s A and B at this kernel, in LoraKernel's layout, without the rank padding.

    Example:
        >>> import jax.numpy as jnp
        >>> bank = LoraBank(None, jnp.zeros((4, 2, 3)), jnp.zeros((2, 3, 5)), layout=Layout((), (0,), (1,)),
        ...                 names=("x", "y"), ranks=(3, 1), scales=(1.0, 2.0))
        >>> [f.shape for f in slot_factors(bank, 1)]
        [(4, 1), (1, 5)]
    """
    q, ns = bank.ranks[i], len(bank.layout.stack)
    a = bank.a[..., i, :q]
    b = jax.lax.slice_in_dim(jax.lax.index_in_dim(bank.b, i, axis=ns, keepdims=False), 0, q, axis=ns)
    return a, b


def names_of(tree: Any, what: str) -> tuple[str, ...]:
    banks = [(p, x) for p, x in zip(*bank_leaves(tree)[:2]) if is_bank(x)]
    if not banks:
        raise ValueError(f"{what}: the tree holds no adapter bank (no LoraBank node); make one with "
                         f"jlora.stack_adapters({{name: adapters, ...}}).")
    names = banks[0][1].names
    for p, x in banks[1:]:
        if x.names != names:
            raise ValueError(f"{what}: the banks at '{banks[0][0]}' and '{p}' hold different adapters "
                             f"({names} and {x.names}); build a bank with jlora.stack_adapters / add_adapter.")
    return names


def params_form(leaves: list[Any]) -> bool:
    return any(is_bank(x) and x.w0 is not None for x in leaves)


def absent_leaf(x: Any, in_params: bool) -> Any:
    """What a position adapted by no adapter holds: the base value in params form, else None."""
    if not in_params:
        return None
    if isinstance(x, (LoraKernel, LoraBank)):
        return x.w0
    return x.value if isinstance(x, Trainable) else x


# -- public ---------------------------------------------------------------------------------------------------


def stack_adapters(adapters: Mapping[str, Any]) -> Any:
    """A bank of the named adapter sets: ``{name: adapters}`` -> one adapters tree with a
    :class:`LoraBank` at every kernel that at least one of them adapts.

    Each value is ``jlora.split(params)[0]`` or injected params (from ``inject``,
    ``load_adapters`` or ``import_peft``) over one base model. Ranks and target sets may differ
    (factors are zero-padded to the largest rank; a kernel that an adapter does not adapt gets zero
    factors in its slot); scales and dropout rates are kept per adapter. The result is in adapters
    form: ``jlora.combine(bank, base)`` puts it onto the base for ``apply(..., adapter_ids=ids)``.
    Factors of different dtypes are promoted to a common one.

    Refused, naming the path: trees of different structure (different models), a kernel whose
    layout or shape differs between adapters, leaves trained in full (``bias=``/``full=``; a bank
    holds LoRA factors only), DoRA adapters.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> lay = jlora.Layout((), (0,), (1,))
        >>> a = {"w": jlora.LoraKernel(None, jnp.ones((4, 2)), jnp.ones((2, 3)), layout=lay, scale=1.0), "v": None}
        >>> b = {"w": jlora.LoraKernel(None, jnp.ones((4, 1)), jnp.ones((1, 3)), layout=lay, scale=0.5),
        ...      "v": jlora.LoraKernel(None, jnp.ones((3, 1)), jnp.ones((1, 3)), layout=lay, scale=2.0)}
        >>> bank = jlora.stack_adapters({"a": a, "b": b})
        >>> bank["w"].a.shape, bank["w"].ranks, bank["v"].ranks   # (in, N, r): padded to rank 2; "a" leaves v alone
        ((4, 2, 2), (2, 1), (0, 1))
        >>> jlora.select_adapter(bank, "b")["w"].a.shape
        (4, 1)
    """
    what = "stack_adapters"
    if not isinstance(adapters, Mapping) or not adapters:
        raise ValueError(f"{what}: pass a non-empty mapping {{name: adapters tree}}, got {type(adapters).__name__}.")
    names = list(adapters)
    for nm in names:
        if not isinstance(nm, str) or not nm or nm == BASE:
            raise ValueError(f"{what}: adapter names must be non-empty strings other than {BASE!r}, got {nm!r}.")
    flats = {nm: bank_leaves(adapters[nm]) for nm in names}
    paths0, _, treedef = flats[names[0]]
    for nm in names[1:]:
        _check_paths(what, nm, flats[nm][0], paths0)
    out = []
    for j, path in enumerate(paths0):
        entries = [(nm, _kernel_of(what, nm, path, flats[nm][1][j])) for nm in names]
        out.append(_bank_of(what, path, None, entries))
    if not any(x is not None for x in out):
        raise ValueError(f"{what}: none of the adapters adapts any kernel (no LoraKernel node).")
    return jax.tree_util.tree_unflatten(treedef, out)


def adapter_names(bank: Any) -> tuple[str, ...]:
    """The names of a bank's adapters, in slot order (``adapter_ids`` counts from 0 in this order).

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> k = jlora.LoraKernel(None, jnp.ones((4, 2)), jnp.ones((2, 3)), layout=jlora.Layout((), (0,), (1,)), scale=1.0)
        >>> jlora.adapter_names(jlora.stack_adapters({"en": {"w": k}, "de": {"w": k}}))
        ('en', 'de')
    """
    return names_of(bank, "adapter_names")


def adapter_ids(bank: Any, names: Sequence[Optional[str]]) -> np.ndarray:
    """Per-example adapter indices for ``apply(..., adapter_ids=...)`` from adapter names.

    ``None`` or ``"__base__"`` (PEFT's name for it) means the base model: index -1.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> k = jlora.LoraKernel(None, jnp.ones((4, 2)), jnp.ones((2, 3)), layout=jlora.Layout((), (0,), (1,)), scale=1.0)
        >>> bank = jlora.stack_adapters({"en": {"w": k}, "de": {"w": k}})
        >>> jlora.adapter_ids(bank, ["de", None, "en", "__base__"])
        array([ 1, -1,  0, -1], dtype=int32)
    """
    known = names_of(bank, "adapter_ids")
    index = {nm: i for i, nm in enumerate(known)}
    out = []
    for nm in names:
        if nm is None or nm == BASE:
            out.append(-1)
        elif nm in index:
            out.append(index[nm])
        else:
            raise ValueError(f"adapter_ids: no adapter named {nm!r} in the bank; it holds {list(known)} "
                             f"(None or {BASE!r} for the base model).")
    return np.asarray(out, np.int32)


def select_adapter(bank: Any, name: str) -> Any:
    """One adapter of a bank, exactly as it was stacked: an adapters tree (bank in adapters form)
    or injected params (bank in params form, from ``combine(bank, base)``).

    Kernels that this adapter does not adapt come back as ``None`` (adapters form) or as the plain
    base kernel (params form). The result works with every single-adapter function:
    ``apply``, ``merge``, ``save_adapters``, ``export_peft``.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> lay = jlora.Layout((), (0,), (1,))
        >>> k = lambda r: jlora.LoraKernel(None, jnp.ones((4, r)), jnp.ones((r, 3)), layout=lay, scale=1.0)
        >>> bank = jlora.stack_adapters({"x": {"w": k(1)}, "y": {"w": k(3)}})
        >>> jlora.select_adapter(bank, "x")["w"]
        LoraKernel(w0=None, a=float32[4, 1], b=float32[1, 3], layout=(in=[0] out=[1]), scale=1)
    """
    names = names_of(bank, "select_adapter")
    if name not in names:
        raise ValueError(f"select_adapter: no adapter named {name!r} in the bank; it holds {list(names)}.")
    i = names.index(name)
    paths, leaves, treedef = bank_leaves(bank)
    form = params_form(leaves)
    out = [(_slot(x, i) or absent_leaf(x, form)) if is_bank(x) else x for x in leaves]
    return jax.tree_util.tree_unflatten(treedef, out)


def add_adapter(bank: Any, name: str, adapters: Any) -> Any:
    """``bank`` with one more adapter set, ``name``, appended (a new bank; ``bank`` is unchanged).

    ``adapters`` is an adapters tree or injected params of the same model, as for
    :func:`stack_adapters`; ranks are re-padded where the new adapter's is larger. In params form
    the new adapter must fit the base kernels the bank holds.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> lay = jlora.Layout((), (0,), (1,))
        >>> k = lambda r: jlora.LoraKernel(None, jnp.ones((4, r)), jnp.ones((r, 3)), layout=lay, scale=1.0)
        >>> bank = jlora.add_adapter(jlora.stack_adapters({"x": {"w": k(1)}}), "y", {"w": k(3)})
        >>> jlora.adapter_names(bank), bank["w"].ranks, bank["w"].a.shape
        (('x', 'y'), (1, 3), (4, 2, 3))
    """
    what = "add_adapter"
    names = names_of(bank, what)
    if not isinstance(name, str) or not name or name == BASE:
        raise ValueError(f"{what}: adapter names must be non-empty strings other than {BASE!r}, got {name!r}.")
    if name in names:
        raise ValueError(f"{what}: the bank already holds an adapter named {name!r}; remove_adapter it first.")
    paths, leaves, treedef = bank_leaves(bank)
    new_paths, new_leaves, _ = bank_leaves(adapters)
    _check_paths(what, name, new_paths, paths)
    form = params_form(leaves)
    out = []
    for path, x, y in zip(paths, leaves, new_leaves):
        k = _kernel_of(what, name, path, y)
        if is_bank(x):
            entries = [(nm, _slot(x, i)) for i, nm in enumerate(names)] + [(name, k)]
            out.append(_bank_of(what, path, x.w0, entries))
        elif k is not None:
            w0 = absent_leaf(x, form)
            if form and (w0 is None or not hasattr(w0, "shape")):
                raise ValueError(f"{what}: adapter {name!r} adapts '{path}', but the bank's base holds "
                                 f"{type(w0).__name__} there, not a kernel.")
            out.append(_bank_of(what, path, w0, [(nm, None) for nm in names] + [(name, k)]))
        else:
            out.append(x)
    return jax.tree_util.tree_unflatten(treedef, out)


def remove_adapter(bank: Any, name: str) -> Any:
    """``bank`` without adapter ``name`` (a new bank): the other slots keep their order and are
    re-padded to their own largest rank; a kernel no remaining adapter adapts goes back to ``None``
    (adapters form) or its plain base kernel (params form).

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> lay = jlora.Layout((), (0,), (1,))
        >>> k = lambda r: jlora.LoraKernel(None, jnp.ones((4, r)), jnp.ones((r, 3)), layout=lay, scale=1.0)
        >>> bank = jlora.stack_adapters({"x": {"w": k(1)}, "y": {"w": k(3)}})
        >>> small = jlora.remove_adapter(bank, "y")
        >>> jlora.adapter_names(small), small["w"].a.shape
        (('x',), (4, 1, 1))
    """
    what = "remove_adapter"
    names = names_of(bank, what)
    if name not in names:
        raise ValueError(f"{what}: no adapter named {name!r} in the bank; it holds {list(names)}.")
    if len(names) == 1:
        raise ValueError(f"{what}: {name!r} is the bank's only adapter; a bank needs at least one. Use "
                         f"jlora.select_adapter(bank, {name!r}) for the adapter, or the base params alone.")
    paths, leaves, treedef = bank_leaves(bank)
    form = params_form(leaves)
    out = []
    for path, x in zip(paths, leaves):
        if is_bank(x):
            entries = [(nm, _slot(x, i)) for i, nm in enumerate(names) if nm != name]
            node = _bank_of(what, path, x.w0, entries)
            out.append(node if node is not None else absent_leaf(x, form))
        else:
            out.append(x)
    return jax.tree_util.tree_unflatten(treedef, out)
