"""Mixed-batch apply: each example of one batch with its own adapter from a bank.

``apply(params, *args, adapter_ids=ids)`` with params holding :class:`~jlora.LoraBank` nodes
(``jlora.combine(jlora.stack_adapters({...}), base)``) computes example ``e`` with adapter
``ids[e]`` (-1: the base model), exactly as ``apply(select_adapter(params, name), example)``
would compute it alone.

How: a per-example function under ``jax.vmap``. ``apply_fn`` is traced once for *one* example
(every batched argument with its batch axis of size 1), and the interpreter evaluates that jaxpr
inside ``jax.vmap`` over ``(adapter_ids, the batched arguments)``. There, each bank becomes an
ordinary adapted kernel whose A and B are the example's slot, ``A[ids[e]]`` and ``B[ids[e]]``
(zeros for -1), while W0 and every other param is closed over, i.e. not batched. vmap's batching
rules then turn

* ``x·W0`` (W0 unbatched) into **one** ``dot_general`` over the whole batch, the batch axis joining
  x's free axes: the base model's matmul, done once, as without adapters;
* the low-rank part into one of two forms, chosen per matmul (:func:`jlora._rules.compute.mixed_form`):
  where an example brings few rows (a decode step), ``x·[A_1 … A_N]`` for the whole batch in one
  plain matmul, the other adapters' columns zeroed per example, then one plain matmul with
  ``[B_1; …; B_N]``; where it brings many (a prefill), a gather of each example's A and B and one
  batched ``dot_general`` each (the BGMV form of multi-adapter serving). Never one pass per
  adapter, never ``B·A``;
* everything else (attention, norms, a scan over layers, the KV-cache update) into the same op
  over the batch.

Why vmap, and not an example axis propagated through the trace: vmap is JAX's own batching of
every primitive (``scan``, ``while``, ``cond``, custom derivatives, gathers, reshapes that merge the
batch with other axes), so "each example as if alone" holds for any ``apply_fn`` with no new rule
per primitive; propagating an example axis ourselves would mean re-deriving, for every primitive,
where that axis goes — re-implementing vmap. The price is vmap's: which axis of each argument is
the batch axis must be known (``batch_axes``, like vmap's ``in_axes``; ``out_axes`` for the
outputs), and examples must not interact — a batch statistic (BatchNorm in training mode, a loss
averaged over the batch inside ``apply_fn``) sees one example at a time.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora import _compat as jax_compat
from jlora._apply import _entry_value
from jlora._bank import LoraBank, adapter_ids as _ids_from_names
from jlora._interpret import interpret
from jlora._trace import is_input, trace
from jlora._value import BankSlot, LoraValue, layout_tags

__all__ = ["mixed_apply"]


class _Auto:
    """The default batch axis: 0 for an array argument with at least one axis, none otherwise."""

    def __repr__(self) -> str:
        return "AUTO"


AUTO = _Auto()


def _none_leaf(x: Any) -> bool:
    return x is None


def _axis_leaf(x: Any) -> bool:
    return x is None or x is AUTO or isinstance(x, (int, np.integer))


def _label(path) -> str:
    """``argument 0``, ``argument 'cache'['k']`` from a key path into ``(args, kwargs)``."""
    ku = jax.tree_util
    head, key, rest = path[0], path[1], path[2:]
    name = str(key.idx) if isinstance(key, ku.SequenceKey) else repr(getattr(key, "key", key))
    del head  # (args, kwargs)[0] or [1]: the key after it names the argument either way
    return f"argument {name}{ku.keystr(tuple(rest))}"


def _spec_for(batch_axes: Any, args: tuple, kwargs: dict) -> tuple[Any, Any]:
    """``batch_axes`` as one spec per positional argument and per keyword argument."""
    if batch_axes is None or batch_axes is AUTO:
        per, default = {}, AUTO
    elif isinstance(batch_axes, (int, np.integer)) and not isinstance(batch_axes, bool):
        per, default = {}, int(batch_axes)
    elif isinstance(batch_axes, Mapping):
        per, default = dict(batch_axes), AUTO
    elif isinstance(batch_axes, (tuple, list)):
        if len(batch_axes) != len(args):
            raise ValueError(f"apply: batch_axes as a sequence has one entry per positional argument; got "
                             f"{len(batch_axes)} for {len(args)} positional arguments.")
        per, default = dict(enumerate(batch_axes)), AUTO
    else:
        raise TypeError(f"apply: batch_axes must be an int, a sequence (one per positional argument) or a "
                        f"mapping {{position or keyword: axes}}, got {type(batch_axes).__name__}.")
    unknown = [k for k in per if not ((isinstance(k, int) and 0 <= k < len(args)) or k in kwargs)]
    if unknown:
        raise ValueError(f"apply: batch_axes names {unknown[0]!r}, which is neither a positional argument "
                         f"(0..{len(args) - 1}) nor a keyword argument of this call ({sorted(kwargs)}).")
    return tuple(per.get(i, default) for i in range(len(args))), {k: per.get(k, default) for k in kwargs}


def _broadcast(spec: Any, tree: Any, what: str) -> Any:
    """``tree``'s structure with every leaf replaced by its axis from the prefix ``spec``."""
    spec_leaves, spec_def = jax.tree.flatten(spec, is_leaf=_axis_leaf)
    try:
        subs = spec_def.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(f"apply: {what} {spec!r} does not match the structure it describes: {e}") from None
    parts = [jax.tree.map(lambda _, ax=ax: ax, sub, is_leaf=_none_leaf) for ax, sub in zip(spec_leaves, subs)]
    return jax.tree.unflatten(spec_def, parts)


def _in_axes(args: tuple, kwargs: dict, batch_axes: Any, n: int) -> tuple[list, list]:
    """Per leaf of ``(args, kwargs)``: the batch axis (None: shared by every example), checked."""
    pos, kw = _spec_for(batch_axes, args, kwargs)
    tree = (tuple(_broadcast(s, a, f"batch_axes for argument {i}") for i, (s, a) in enumerate(zip(pos, args))),
            {k: _broadcast(kw[k], v, f"batch_axes for argument {k!r}") for k, v in kwargs.items()})
    axes = jax.tree.leaves(tree, is_leaf=_axis_leaf)
    flat, _ = jax.tree_util.tree_flatten_with_path((args, kwargs), is_leaf=_none_leaf)
    assert len(axes) == len(flat)
    out, labels = [], []
    for (path, x), ax in zip(flat, axes):
        label = _label(path)
        arr = is_input(x)
        nd = len(np.shape(x)) if arr else 0
        if ax is AUTO:
            ax = 0 if arr and nd >= 1 else None
        if ax is not None:
            ax = int(ax)
            if not arr:
                raise ValueError(f"apply: {label} is not an array ({type(x).__name__}), so it has no batch "
                                 f"axis {ax}; give it None in batch_axes (shared by every example).")
            if not -nd <= ax < nd:
                raise ValueError(f"apply: {label} has shape {tuple(np.shape(x))}, no axis {ax} for the batch.")
            ax %= nd
            if np.shape(x)[ax] != n:
                raise ValueError(
                    f"apply: {label} has size {np.shape(x)[ax]} on its batch axis {ax} (shape "
                    f"{tuple(np.shape(x))}), but adapter_ids has {n} entries (one per example). Pass "
                    f"batch_axes={{...}} for an argument whose batch axis is not 0, or None for one that all "
                    f"examples share.")
        out.append(ax)
        labels.append(label)
    return out, labels


def _out_axes(out_axes: Any, out_tree: Any, avals: list) -> list:
    """Per output leaf: the batch axis it gets (its one-example size-1 axis), or None (shared)."""
    shell = jax.tree.unflatten(out_tree, list(range(len(avals))))
    spec = AUTO if out_axes is None else out_axes
    axes = jax.tree.leaves(_broadcast(spec, shell, "out_axes"), is_leaf=_axis_leaf)
    paths = [jax.tree_util.keystr(p) or "(the output)" for p, _ in jax.tree_util.tree_flatten_with_path(shell)[0]]
    out = []
    for ax, aval, where in zip(axes, avals, paths):
        shape = tuple(aval.shape)
        if ax is AUTO:
            ax = 0 if shape else None
        if ax is not None:
            ax = int(ax)
            if not -len(shape) <= ax < len(shape) or shape[ax % len(shape)] != 1:
                raise ValueError(
                    f"apply: output {where} has shape {shape} for one example, so its axis {ax} is not the batch "
                    f"axis (size 1 for one example). Pass out_axes (a prefix of the output, like vmap's) with its "
                    f"batch axis, or None where it is shared by all examples.")
            ax %= len(shape)
        out.append(ax)
    return out


def check_ids(adapter_ids: Any, names: tuple[str, ...], bank: Any = None) -> jax.Array:
    """``adapter_ids`` as a 1-D int32 array; out-of-range entries refused where they are known
    (not under ``jit``; there they make that example's output NaN instead)."""
    if isinstance(adapter_ids, (list, tuple)) and any(isinstance(v, str) or v is None for v in adapter_ids):
        if bank is None:
            raise ValueError("apply: adapter_ids are integers; turn names into them with "
                             "jlora.adapter_ids(bank, names).")
        adapter_ids = _ids_from_names(bank, adapter_ids)
    n = len(names)
    traced = jax_compat.is_tracer(adapter_ids)
    ids = adapter_ids if traced else np.asarray(adapter_ids)
    if ids.ndim != 1:
        raise ValueError(f"apply: adapter_ids must be 1-D, one adapter index per example; got shape {ids.shape}.")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"apply: adapter_ids must be integers (0..{n - 1}, -1 for the base model); got "
                         f"{ids.dtype}. jlora.adapter_ids(bank, names) turns names into them.")
    if not traced:
        bad = [(e, int(v)) for e, v in enumerate(ids.tolist()) if not -1 <= v < n]
        if bad:
            e, v = bad[0]
            raise ValueError(f"apply: adapter_ids[{e}] = {v} is out of range: the bank holds {n} adapters "
                             f"({', '.join(f'{i}: {nm}' for i, nm in enumerate(names))}) and -1 is the base model.")
    return jnp.asarray(ids, jnp.int32)


def _bank_value(path: str, bank: LoraBank, i: jax.Array) -> LoraValue:
    """The kernel for one example: every adapter of the bank side by side on the rank axis, and the
    example's slot ``i`` (:class:`~jlora._value.BankSlot`); the matmul rule then either masks the
    other adapters' columns or gathers slot ``i`` (:func:`jlora._rules.compute.mixed_form`). Slot
    -1 or an id out of range weighs 0 (:func:`mixed_apply` makes such an example's outputs NaN, so
    no gradient reaches any slot)."""
    n, r, ns = bank.n, bank.rank, len(bank.layout.stack)
    present = [s for s, q in zip(bank.scales, bank.ranks) if q]
    common = present[0] if all(s == present[0] for s in present) else 1.0
    rel = jnp.asarray([s / common if q else 0.0 for s, q in zip(bank.scales, bank.ranks)], jnp.float32)
    idc = jnp.clip(i, 0, n - 1)
    valid = (i >= 0) & (i < n)
    weight = jnp.where(valid, rel[idc], 0.0)
    # a (stack..., in..., N, r) -> (stack..., in..., N·r); b (stack..., N, r, out...) -> (stack..., N·r, out...):
    # reshapes of adjacent axes, no copy (a copy of the whole bank per call cost more than the adapters' math)
    a = bank.a.reshape(bank.a.shape[:-2] + (n * r,))
    b = bank.b.reshape(bank.b.shape[:ns] + (n * r,) + bank.b.shape[ns + 2:])
    dropout = max(d for d, q in zip(bank.dropouts, bank.ranks) if q)
    w0 = jax.tree.map(lax.stop_gradient, bank.w0)
    return LoraValue(w0=w0, a=a, b=b, tags=layout_tags(bank.layout), scale=common, dropout=dropout, path=path,
                     slot=BankSlot(idc, weight, n, r))


def mixed_apply(apply: Any, flat: Any, args: tuple, kwargs: dict, adapter_ids: Any, *, batch_axes: Any = None,
                out_axes: Any = None, rng: Any = None) -> Any:
    """``apply(params, *args, adapter_ids=ids, batch_axes=..., out_axes=..., **kwargs)`` over a bank.

    Args:
      adapter_ids: one int per example: the adapter's slot in the bank (``jlora.adapter_names``
        order; ``jlora.adapter_ids(bank, names)`` makes them from names), -1 for the base model.
        Checked against the bank's size where known; under ``jit`` an out-of-range id makes that
        example's output NaN (never another adapter's).
      batch_axes: which axis of each argument is the batch axis. ``None`` (default): axis 0 of
        every array argument with at least one axis, none for scalars. An int: that axis for every
        array argument. A mapping ``{position or keyword: axes}`` or a sequence (one per positional
        argument), where ``axes`` is a prefix of that argument's tree, like ``vmap``'s ``in_axes``:
        an int, or None for a value shared by every example (e.g.
        ``{"cache": {"k": 1, "v": 1, "pos": 0, "index": None}}``). Unlisted arguments get the
        default. Each batched axis must have ``len(adapter_ids)`` entries.
      out_axes: a prefix of the output's tree: where each output leaf's batch axis is; ``None``
        (default): axis 0 of every output with at least one axis, none for scalars.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> base = {"w": jnp.ones((3, 2))}
        >>> fn = lambda p, x: x @ p["w"]
        >>> _, apply = jlora.inject(base, fn, rank=1)
        >>> lay = jlora.Layout((), (0,), (1,))
        >>> one = lambda v: {"w": jlora.LoraKernel(None, jnp.ones((3, 1)), jnp.full((1, 2), v), layout=lay, scale=1.0)}
        >>> params = jlora.combine(jlora.stack_adapters({"x": one(1.0), "y": one(10.0)}), base)
        >>> apply(params, jnp.ones((3, 3)), adapter_ids=jnp.array([1, -1, 0]))   # 3 + 3·v, or 3 for the base
        Array([[33., 33.],
               [ 3.,  3.],
               [ 6.,  6.]], dtype=float32)
    """
    ids = _checked_ids(flat, adapter_ids, rng)
    n = int(ids.shape[0])
    n_adapters = next(x.n for x in flat.leaves if isinstance(x, LoraBank))

    a_leaves, a_def = jax.tree.flatten((args, kwargs), is_leaf=_none_leaf)
    axes, labels = _in_axes(args, kwargs, batch_axes, n)
    if not any(ax is not None for ax in axes):
        raise ValueError("apply: no argument has a batch axis (batch_axes gives None to all of them), so "
                         "adapter_ids cannot be matched with examples.")

    ex = [x if ax is None else _one_example(x, ax) for x, ax in zip(a_leaves, axes)]
    ex_args, ex_kwargs = jax.tree.unflatten(a_def, ex)
    traced = trace(apply.apply_fn, flat.plain_leaves(), flat.treedef, tuple(ex_args), dict(ex_kwargs))
    a_in = [j for j, x in enumerate(ex) if is_input(x)]
    real = [a_leaves[j] for j in a_in]
    in_ax = [axes[j] for j in a_in]
    out_ax = _out_axes(out_axes, traced.out_tree, list(traced.jaxpr.out_avals))
    matmul = "xla" if apply.matmul == "pallas" else apply.matmul  # the Pallas kernel takes no batched factors

    def per_example(i, key, *xs):
        vals = [x if ax is None else jnp.expand_dims(x, ax) for x, ax in zip(xs, in_ax)]
        inputs = []
        for j in traced.params_in:
            leaf, path = flat.leaves[j], flat.paths[j]
            inputs.append(_bank_value(path, leaf, i) if isinstance(leaf, LoraBank) else _entry_value(path, leaf))
        outs, _ = interpret(traced.jaxpr, inputs + vals, fallback=apply.fallback, rng=key, matmul=matmul)
        return [o if ax is None else jnp.squeeze(o, ax) for o, ax in zip(outs, out_ax)]

    keys = None if rng is None else jax.random.split(rng, n)
    run = jax.vmap(per_example, in_axes=(0, None if keys is None else 0, *in_ax), out_axes=out_ax)
    try:
        outs = run(ids, keys, *real)
    except ValueError as e:
        if "out_axes" not in str(e):
            raise
        shared = [k for k, ax in enumerate(out_ax) if ax is None]
        raise ValueError(
            f"apply: an output without a batch axis (output leaves {shared}: scalars, or None in out_axes) "
            f"differs between examples; give it a batch axis in out_axes. ({e})") from None
    if jax_compat.is_tracer(adapter_ids):  # only then can an id be out of range (check_ids refused it otherwise)
        bad = (ids < -1) | (ids >= n_adapters)
        outs = [_poison(o, bad, ax) if ax is not None and jnp.issubdtype(o.dtype, jnp.inexact) else o
                for o, ax in zip(outs, out_ax)]  # a shared output (no batch axis) is left alone
    return jax.tree.unflatten(traced.out_tree, outs)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _poison(o: jax.Array, bad: jax.Array, ax: int) -> jax.Array:
    """``o`` with NaN in the examples ``bad`` marks (along its batch axis ``ax``): an id out of range,
    under ``jit``, makes that example's outputs NaN, never another adapter's.

    Written row by row in a loop that runs once per bad example (none, normally), so an output that
    is a step's state (a KV cache updated in place, donated) is not read and rewritten whole; a
    ``jnp.where`` over it cost a decode step more than all the adapters' arithmetic. Its derivative
    is the tangent with the bad examples' rows zeroed (``where``: in reverse mode too, no NaN flows
    back into any adapter).
    """
    order = jnp.argsort(~bad, stable=True)  # the bad examples first
    row = jnp.full(o.shape[:ax] + (1,) + o.shape[ax + 1:], jnp.nan, o.dtype)

    def one(j, acc):
        return lax.dynamic_update_slice_in_dim(acc, row, order[j], ax)

    return lax.fori_loop(0, jnp.sum(bad), one, o)


@_poison.defjvp
def _poison_jvp(ax, primals, tangents):
    o, bad = primals
    t = tangents[0]
    keep = jnp.reshape(~bad, (1,) * ax + (-1,) + (1,) * (o.ndim - ax - 1))
    return _poison(o, bad, ax), jnp.where(keep, t, jnp.zeros((), t.dtype))


def _checked_ids(flat: Any, adapter_ids: Any, rng: Any) -> Any:
    """The banks' common adapter names checked, and ``adapter_ids`` as an int array over them."""
    banks = [(p, x) for p, x in zip(flat.paths, flat.leaves) if isinstance(x, LoraBank)]
    if not banks:
        raise ValueError("apply: adapter_ids (and batch_axes/out_axes) select adapters from a bank, but these "
                         "params hold none. Make one: jlora.combine(jlora.stack_adapters({name: adapters, ...}), "
                         "base).")
    names = banks[0][1].names
    for p, x in banks[1:]:
        if x.names != names:
            raise ValueError(f"apply: the banks at '{banks[0][0]}' and '{p}' hold different adapters ({names} vs "
                             f"{x.names}); build the bank with jlora.stack_adapters / add_adapter.")
    if adapter_ids is None:
        raise ValueError(f"apply: these params hold an adapter bank ({', '.join(names)}): pass adapter_ids=, one "
                         f"index per example (-1 for the base model), or run one adapter with "
                         f"jlora.select_adapter(params, name).")
    ids = check_ids(adapter_ids, names, jax.tree.unflatten(flat.treedef, flat.leaves))
    if rng is not None:
        for p, x in banks:
            if len({d for d, q in zip(x.dropouts, x.ranks) if q}) > 1:
                raise ValueError(f"apply: the adapters at '{p}' have different dropout rates {x.dropouts}; with "
                                 f"lora_rng a mixed batch needs one rate per kernel.")
    return ids


def _one_example(x: Any, ax: int) -> jax.ShapeDtypeStruct:
    """The abstract value of one example of ``x`` (its batch axis ``ax`` of size 1)."""
    shape = list(np.shape(x))
    shape[ax] = 1
    weak = bool(getattr(getattr(x, "aval", None), "weak_type", False))
    return jax.ShapeDtypeStruct(tuple(shape), x.dtype, weak_type=weak)
