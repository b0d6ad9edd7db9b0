"""``inject``: pair kernels with adapters, and the ``apply`` that computes with them unmerged."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora import _compat as C
from jlora._discover import discover, layout_from_uses
from jlora._interpret import Context, LoraValue, Tag, eval_jaxpr
from jlora._node import Layout, LoraKernel, Trainable, is_node
from jlora._paths import Targets, describe_targets, leaf_name, make_matcher, nearest, path_str
from jlora._quant import dense, is_quantized
from jlora._sharding import init_factors
from jlora._tree import is_unit

__all__ = ["inject", "Apply", "Report"]

KERNEL_NAMES = ("kernel", "weight", "w", "W")
BIAS_NAMES = ("bias", "b")


# -- the report ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Report:
    """What ``inject`` adapted, and what it left alone and why."""

    adapted: list[tuple[str, tuple[int, ...], str]]  # (path, shape, layout)
    skipped: list[tuple[str, tuple[int, ...], str]]  # (path, shape, reason)
    trained: list[str]  # leaves trained in full
    rank: int
    scale: float
    trainable: int
    total: int

    def __str__(self) -> str:
        lines = [f"jlora: adapted {len(self.adapted)} kernels with rank {self.rank}, scale {self.scale:g}"]
        for p, s, lay in self.adapted:
            lines.append(f"  + {p} {list(s)} ({lay})")
        for p in self.trained:
            lines.append(f"  * {p} (trained in full)")
        for p, s, why in self.skipped:
            lines.append(f"  - {p} {list(s)}: {why}")
        pct = 100.0 * self.trainable / max(self.total, 1)
        lines.append(f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                     f"trainable%: {pct:.4f}")
        return "\n".join(lines)


@dataclasses.dataclass
class FusedReport:
    """With ``inject(..., fused_matmul=True)``: which adapted matmuls of the last traced call took
    the fused kernel, and why the others did not (``apply.fused_report``)."""

    matmuls: list[tuple[str, str | None]]  # (kernel path, None if fused else the reason), distinct

    @property
    def fused(self) -> int:
        return sum(why is None for _, why in self.matmuls)

    def __str__(self) -> str:
        lines = [f"jlora fused_matmul: {self.fused} of {len(self.matmuls)} adapted matmuls fused"]
        plain: dict[str, list[str]] = {}
        for path, why in self.matmuls:
            if why is not None:
                plain.setdefault(why, []).append(path)
        for why, paths in plain.items():
            shown = ", ".join(dict.fromkeys(paths))
            lines.append(f"  - {len(paths)} plain: {why} ({shown})")
        return "\n".join(lines)


# -- argument handling shared by inject and apply --------------------------------------------------


def _is_dynamic(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) or C.is_tracer(x)


def _spec(x: Any):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if is_quantized(x):
        return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)
    weak = bool(getattr(getattr(x, "aval", None), "weak_type", False))
    try:
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, weak_type=weak)
    except TypeError:  # pragma: no cover - old jax without weak_type
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype)


def _trace(apply_fn, base_leaves, base_def, args, kwargs):
    """Trace ``apply_fn(params, *args, **kwargs)``; params leaves and array args are inputs."""
    a_leaves, a_def = jax.tree.flatten((args, kwargs), is_leaf=lambda x: x is None)
    dyn = [i for i, x in enumerate(a_leaves) if _is_dynamic(x)]
    n = len(base_leaves)

    def flat_fn(*xs):
        params = jax.tree.unflatten(base_def, xs[:n])
        al = list(a_leaves)
        for i, v in zip(dyn, xs[n:]):
            al[i] = v
        a, kw = jax.tree.unflatten(a_def, al)
        return apply_fn(params, *a, **kw)

    specs = [_spec(x) for x in base_leaves] + [_spec(a_leaves[i]) for i in dyn]
    closed, out_tree = C.make_jaxpr(flat_fn, *specs)
    return closed, out_tree, [a_leaves[i] for i in dyn]


def trace_uses(apply_fn, leaves, treedef, example_args, example_kwargs, candidates):
    """How ``apply_fn(params, *example_args, **example_kwargs)`` uses each candidate leaf.

    ``leaves`` / ``treedef`` are the params flattened with jlora's units as leaves (plain values
    in their places); returns ``{leaf index: [Use, ...]}`` for ``candidates``.
    """
    base_def = jax.tree.structure(jax.tree.unflatten(treedef, [0] * len(leaves)))
    closed, _, _ = _trace(apply_fn, leaves, base_def, tuple(example_args), example_kwargs)
    return discover(closed, len(leaves), candidates)


def _base_view(params):
    """``params`` with every jlora node replaced by its base leaf (the tree apply_fn expects)."""

    def one(x):
        if isinstance(x, LoraKernel):
            return x.w0
        if isinstance(x, Trainable):
            return x.value
        return x

    return jax.tree.map(one, params, is_leaf=is_node)


def _flat_nodes(params):
    """Flatten with LoraKernel/Trainable/quantized nodes as leaves: (paths, leaves, treedef)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_unit)
    return [path_str(p) for p, _ in flat], [x for _, x in flat], treedef


# -- apply -----------------------------------------------------------------------------------------


class Apply:
    """``apply(params, *args, **kwargs)``: ``apply_fn`` with every adapted kernel unmerged.

    Has ``apply_fn``'s signature. Works with any injected params whose base structure matches the
    one ``inject`` saw (params restored from a checkpoint included). Frozen leaves are wrapped in
    ``lax.stop_gradient``, so no gradient of the base is ever computed.

    Extra keyword, consumed here and not passed on: ``lora_rng`` — a PRNG key that turns on
    adapter dropout (``B·A·dropout(x)``, as PEFT); without it dropout is off (evaluation).

    With ``inject(..., fused_matmul=True)``, ``apply.fused_report`` (a :class:`FusedReport`) says,
    after each traced call, which adapted matmuls took the fused kernel and why the others did not.
    """

    def __init__(self, apply_fn: Callable, base_paths: list[str], base_shapes: list, fallback, report,
                 fuse_shared_inputs: bool = False, fused_matmul: bool = False):
        self.apply_fn = apply_fn
        self._paths = base_paths
        self._shapes = base_shapes
        self.fallback = fallback
        self.report = report
        self.fuse_shared_inputs = fuse_shared_inputs
        self.fused_matmul = bool(fused_matmul)
        self.fused_report: FusedReport | None = None  # with fused_matmul: the last trace's choices
        self.__wrapped__ = apply_fn
        self.__name__ = getattr(apply_fn, "__name__", "apply") + "_lora"
        self.__doc__ = Apply.__doc__

    def _check(self, paths, leaves):
        if paths == self._paths:
            for p, x, shape in zip(paths, leaves, self._shapes):
                s = _shape(x.w0 if isinstance(x, LoraKernel) else x.value if isinstance(x, Trainable) else x)
                if s != shape:
                    raise ValueError(
                        f"apply: params leaf '{p}' has shape {s}, but inject saw {shape}. Pass params "
                        f"made by inject (or load_adapters) over the same base model."
                    )
            return
        have, want = set(paths), set(self._paths)
        missing = [p for p in self._paths if p not in have]
        extra = [p for p in paths if p not in want]
        first = (f"missing '{missing[0]}'" if missing else f"unexpected '{extra[0]}'") if (missing or extra) \
            else "leaves in a different order"
        raise ValueError(
            f"apply: params have a different structure from the ones inject saw ({first}; "
            f"{len(missing)} missing, {len(extra)} unexpected). Pass the params returned by inject "
            f"(or by load_adapters / combine) for this model."
        )

    def __call__(self, params, *args, lora_rng=None, **kwargs):
        paths, leaves, treedef = _flat_nodes(params)
        self._check(paths, leaves)
        base_leaves = []
        for x in leaves:
            if isinstance(x, LoraKernel):
                base_leaves.append(x.w0)
            elif isinstance(x, Trainable):
                base_leaves.append(x.value)
            else:
                base_leaves.append(x)
        base_def = jax.tree.structure(jax.tree.unflatten(treedef, [0] * len(leaves)))
        closed, out_tree, dyn = _trace(self.apply_fn, base_leaves, base_def, args, kwargs)
        inputs = []
        for p, x in zip(paths, leaves):
            if isinstance(x, LoraKernel):
                inputs.append(_lora_value(p, x))
            elif isinstance(x, Trainable):
                inputs.append(x.value)
            else:
                inputs.append(lax.stop_gradient(dense(x)))
        ctx = Context(fallback=self.fallback, rng=lora_rng, fuse=self.fuse_shared_inputs,
                      fused_matmul=self.fused_matmul)
        outs = eval_jaxpr(closed.jaxpr, closed.consts, inputs + list(dyn), ctx)
        if self.fused_matmul:  # a loop body may be traced more than once: one entry per distinct choice
            self.fused_report = FusedReport(list(dict.fromkeys(ctx.fused_log)))
        outs = [o.materialize() if isinstance(o, LoraValue) else o for o in outs]
        return jax.tree.unflatten(out_tree, outs)


def _lora_value(path: str, k: LoraKernel) -> LoraValue:
    lay = k.layout
    tags = [None] * lay.ndim
    for j, ax in enumerate(lay.stack):
        tags[ax] = Tag("s", j)
    for j, ax in enumerate(lay.in_):
        tags[ax] = Tag("i", j)
    for j, ax in enumerate(lay.out):
        tags[ax] = Tag("o", j)
    w0 = jax.tree.map(lax.stop_gradient, k.w0)
    return LoraValue(w0=w0, a=k.a, b=k.b, tags=tuple(tags), scale=k.scale, dropout=k.dropout, path=path)


# -- inject ----------------------------------------------------------------------------------------


def _check_options(rank, alpha, dropout, bias, fallback, apply_fn):
    if not callable(apply_fn):
        raise TypeError(f"inject: apply_fn must be callable (e.g. model.apply), got {type(apply_fn).__name__}.")
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank <= 0:
        raise ValueError(f"inject: rank must be a positive integer, got {rank!r}.")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real)
                              or not math.isfinite(alpha) or alpha <= 0):
        raise ValueError(f"inject: alpha must be a positive number, got {alpha!r}.")
    if not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"inject: dropout must be in [0, 1), got {dropout!r}.")
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"inject: bias must be 'none', 'all' or 'lora_only', got {bias!r}.")
    if fallback not in (None, "merge"):
        raise ValueError(f"inject: fallback must be None or 'merge', got {fallback!r}.")


def _shape(x) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def _is_float(x) -> bool:
    dt = getattr(x, "dtype", None)  # not getattr(x, "dtype", np.asarray(x)...): that fetches x
    return jnp.issubdtype(np.asarray(x).dtype if dt is None else dt, jnp.floating)


def inject(
    params: Any,
    apply_fn: Callable,
    rank: int = 8,
    *,
    alpha: float | None = None,
    targets: Targets = None,
    key: jax.Array | None = None,
    example_args: Sequence[Any] = (),
    example_kwargs: dict[str, Any] | None = None,
    rslora: bool = False,
    dropout: float = 0.0,
    bias: str = "none",
    full: Targets = None,
    adapter_dtype: Any = jnp.float32,
    fallback: str | None = None,
    fuse_shared_inputs: bool = False,
    fused_matmul: bool = False,
    verbose: bool = False,
) -> tuple[Any, Apply]:
    """Add LoRA adapters to every chosen kernel of ``params``; return ``(params, apply)``.

    Each adapted kernel ``W0`` becomes a :class:`LoraKernel` holding ``W0`` (frozen), ``A``
    (Gaussian, std ``1/sqrt(fan_in)``) and ``B`` (zeros), so the injected model equals the base
    model exactly until the first update. ``apply(params, *args, **kwargs)`` has ``apply_fn``'s
    signature and computes ``W0·x + s·B·A·x`` without ever forming ``B·A``, with
    ``s = alpha / rank`` (``alpha / sqrt(rank)`` with ``rslora``).

    Which kernels, and which of their axes are inputs and outputs, is read from how ``apply_fn``
    really uses them: pass ``example_args`` (and ``example_kwargs``) and ``inject`` traces
    ``apply_fn(params, *example_args, **example_kwargs)`` once. Without them only 2-D kernels
    (leaves named ``kernel``/``weight``/``w``) are adapted, as ``(in, out)``; any other candidate
    is an error that asks for ``example_args``.

    Args:
      params: the model's parameter pytree (a Flax variables dict, an NNX state, any pytree).
      apply_fn: ``apply_fn(params, *args, **kwargs)``, e.g. ``model.apply``.
      rank: the adapter rank r (a positive integer).
      alpha: LoRA alpha; defaults to ``rank`` (scale 1).
      targets: None — every kernel used as a matmul/conv weight; a regex searched in the
        '/'-joined key path; a list of module names matching whole path components; or a callable
        ``(path, leaf) -> bool``. A target that matches nothing raises ``ValueError``.
      key: PRNG key for A (default ``jax.random.key(0)``: reproducible).
      example_args, example_kwargs: example inputs of ``apply_fn`` (after params).
      rslora: scale by ``alpha / sqrt(rank)`` (rank-stabilised LoRA).
      dropout: adapter input dropout rate, active only when ``apply`` gets ``lora_rng=key``.
      bias: ``'none'``, ``'all'`` (train every bias in full) or ``'lora_only'`` (biases next to
        adapted kernels).
      full: leaves to train in full (PEFT's ``modules_to_save``: heads, norms); same forms as
        ``targets``.
      adapter_dtype: dtype of A and B (float32 by default, also over a bf16 base; they are cast to
        the kernel's compute dtype at the matmul). ``None`` uses the kernel's dtype.
      fallback: ``'merge'`` lets an op with no LoRA rule compute with ``W0 + s·A·B`` materialised;
        by default such an op is an error that names it and the kernel.
      fuse_shared_inputs: experimental; compute ``x·A`` once for all adapted 2-D kernels that read
        the same input with the same contraction (q/k/v, gate/up): one matmul against
        ``[A_q A_k A_v]`` instead of three. Same results; measured in benchmarks/RESULTS.md.
      fused_matmul: experimental; on an H100/H200 (sm_90), compute each ``x @ W`` of a plain 2-D
        adapted kernel with one Pallas Mosaic GPU kernel that adds ``s·(x·A)·B`` to the base
        matmul's output tiles before they are stored (and the same for ``dx`` in the backward),
        instead of XLA's separate rank-r product and add. Applies to bf16/f16 matmuls whose shapes
        divide the kernel's tiles, on one device, without adapter dropout; every other matmul, and
        every other device, keeps the plain path (same function, to rounding); matmuls inside
        ``lax.scan``/``while`` bodies keep it too (the kernel measured slower there).
        ``apply.fused_report`` lists what took the kernel and why the rest did not. Not
        combinable with ``fuse_shared_inputs``. Measured in benchmarks/RESULTS.md.
      verbose: print the report (also available as ``apply.report``).

    Returns:
      ``(params, apply)``.

    Example:
        >>> import jax, jax.numpy as jnp, jlora
        >>> params = {"l1": {"kernel": jnp.ones((8, 16))}, "l2": {"kernel": jnp.ones((16, 4))}}
        >>> def mlp(p, x):
        ...     return jax.nn.relu(x @ p["l1"]["kernel"]) @ p["l2"]["kernel"]
        >>> x = jnp.ones((2, 8))
        >>> lp, apply = jlora.inject(params, mlp, rank=2, example_args=(x,))
        >>> lp["l1"]["kernel"].a.shape, lp["l1"]["kernel"].b.shape
        ((8, 2), (2, 16))
        >>> bool(jnp.array_equal(apply(lp, x), mlp(params, x)))
        True
    """
    _check_options(rank, alpha, dropout, bias, fallback, apply_fn)
    if fuse_shared_inputs and fused_matmul:
        raise ValueError("inject: fuse_shared_inputs and fused_matmul are alternatives; pass one of them.")
    example_kwargs = dict(example_kwargs or {})
    if not isinstance(example_args, (tuple, list)):
        raise TypeError("inject: example_args must be a tuple of apply_fn's arguments after params.")
    if any(True for _ in jax.tree.leaves(params, is_leaf=is_node) if is_node(_)):
        raise ValueError("inject: params already contain jlora adapters; inject the base params once.")
    alpha = float(rank if alpha is None else alpha)
    scale = alpha / (math.sqrt(rank) if rslora else rank)
    key = jax.random.key(0) if key is None else key

    paths, leaves, treedef = _flat_nodes(params)
    match = make_matcher(targets)
    is_float = [(is_quantized(x) or _is_float(x)) and len(_shape(x)) >= 1 for x in leaves]
    layouts: dict[int, Layout] = {}
    skipped: list[tuple[str, tuple, str]] = []

    if example_args or example_kwargs:
        cands = [i for i, f in enumerate(is_float) if f]
        uses = trace_uses(apply_fn, leaves, treedef, example_args, example_kwargs, cands)
        for i in cands:
            lay, why = layout_from_uses(uses[i], len(_shape(leaves[i])))
            tied = any(u.kind == "gather" for u in uses[i])
            chosen = len(_shape(leaves[i])) >= 2 and match(paths[i], leaves[i])
            if lay is not None and tied and targets is None:
                lay, why = None, "a tied embedding (read by gather and used as a matmul weight); name it in targets to adapt it"
            if lay is None:
                if chosen and (targets is not None) and any(u.kind in ("dot", "conv") for u in uses[i]):
                    raise ValueError(f"inject: cannot adapt '{paths[i]}': {why}. Leave it out of "
                                     f"targets, or pass fallback='merge'." if fallback is None else
                                     f"inject: cannot adapt '{paths[i]}': {why}.")
                if any(u.kind in ("dot", "conv", "other") for u in uses[i]) and len(_shape(leaves[i])) >= 2:
                    skipped.append((paths[i], _shape(leaves[i]), why))
                continue
            if chosen:
                layouts[i] = lay
            else:
                skipped.append((paths[i], _shape(leaves[i]), f"not in targets {describe_targets(targets)}"))
        pool = [paths[i] for i in cands if any(u.kind in ("dot", "conv") for u in uses[i])]
    else:
        ambiguous = []
        for i, x in enumerate(leaves):
            if not is_float[i]:
                continue
            named = leaf_name(paths[i]) in KERNEL_NAMES
            chosen = len(_shape(x)) >= 2 and (named if targets is None else True) and match(paths[i], x)
            if not chosen:
                continue
            nd = len(_shape(x))
            if nd == 2:
                layouts[i] = Layout(stack=(), in_=(0,), out=(1,))
            elif nd > 2:
                ambiguous.append(f"'{paths[i]}' {list(np.shape(x))}")
        if ambiguous:
            raise ValueError(
                "inject: which axes of these kernels are inputs and which outputs is ambiguous without "
                f"a trace: {', '.join(ambiguous[:5])}{' ...' if len(ambiguous) > 5 else ''}. Pass "
                "example_args=(example inputs of apply_fn after params,) so inject can read the layout "
                "from how apply_fn uses them, or exclude them with targets."
            )
        pool = [p for p, x, f in zip(paths, leaves, is_float) if f and len(_shape(x)) >= 2]

    if not layouts:
        what = describe_targets(targets)
        near = nearest(targets if isinstance(targets, str) else str(targets), pool)
        raise ValueError(
            f"inject: targets {what} matched no kernel. Kernels in params: "
            f"{', '.join(near) or '(none)'}{' ...' if len(pool) > len(near) else ''}."
            + ("" if example_args or example_kwargs else
               " (Without example_args only 2-D leaves named kernel/weight/w are candidates.)")
        )

    # Leaves trained in full.
    trained: set[int] = set()
    if full is not None:
        fm = make_matcher(full)
        hit = {i for i, x in enumerate(leaves) if is_float[i] and fm(paths[i], x) and i not in layouts}
        if not hit:
            raise ValueError(f"inject: full={describe_targets(full)} matched no leaf. Nearest paths: "
                             f"{', '.join(nearest(str(full), paths))}.")
        trained |= hit
    if bias != "none":
        parents = {paths[i].rsplit("/", 2)[0] for i in layouts}
        for i, p in enumerate(paths):
            if leaf_name(p) in BIAS_NAMES and is_float[i] and i not in layouts:
                if bias == "all" or p.rsplit("/", 2)[0] in parents:
                    trained.add(i)

    # Build the nodes.
    keys = jax.random.split(key, max(len(leaves), 1))
    new_leaves = list(leaves)
    adapted = []
    for i, lay in layouts.items():
        w0 = leaves[i]
        shape = tuple(w0.shape)
        dt = w0.dtype if adapter_dtype is None else jnp.dtype(adapter_dtype)
        std = 1.0 / math.sqrt(lay.fan_in(shape))
        a, b = init_factors(keys[i], w0, lay, rank, dt, std)  # placed like w0 (sharded or not)
        new_leaves[i] = LoraKernel(w0, a, b, layout=lay, scale=scale, dropout=float(dropout))
        adapted.append((paths[i], shape, str(lay)))
    for i in trained:
        new_leaves[i] = Trainable(leaves[i])

    out = jax.tree.unflatten(treedef, new_leaves)
    n_train = sum(int(np.size(x.a)) + int(np.size(x.b)) for x in new_leaves if isinstance(x, LoraKernel))
    n_train += sum(int(np.size(leaves[i])) for i in trained)
    total = sum(int(math.prod(_shape(x))) for x in leaves)
    report = Report(adapted=adapted, skipped=skipped, trained=[paths[i] for i in sorted(trained)],
                    rank=int(rank), scale=scale, trainable=n_train, total=total)
    base_shapes = [_shape(x) for x in leaves]
    apply = Apply(apply_fn, paths, base_shapes, fallback, report, fuse_shared_inputs, fused_matmul)
    if verbose:
        print(report)
    return out, apply
