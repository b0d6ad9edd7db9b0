"""``inject``: pair chosen kernels with adapters, in four phases.

1. **Options** — every option is checked in Python before anything is traced (:class:`_Options`).
2. **Classify** — which leaves are kernels and what their layout is: read off a trace of
   ``apply_fn`` with ``example_args`` (:func:`_choose_traced`), or by the 2-D convention without
   them (:func:`_choose_by_convention`); then every ``targets`` entry must have chosen something.
3. **Trained in full** — ``bias=`` and ``full=`` (:func:`_choose_trained`).
4. **Build** — A (Gaussian) and B (zeros) placed like each kernel, the nodes, the report.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _dora, _fused, _init
from jlora._apply import MATMUL_PATHS, Apply
from jlora._discover import gather_layout, layout_from_uses
from jlora._init import Init, parse_init
from jlora._node import Layout, LoraKernel, Trainable, effective_factors, is_node
from jlora._paths import Targets, describe_targets, leaf_name, make_matcher, nearest
from jlora._quant import is_quantized
from jlora._report import Report
from jlora._sharding import init_factors, place_factors, place_magnitude
from jlora._trace import Flat, shape_of, trace_uses

__all__ = ["inject", "EMBEDDING_NAMES"]

KERNEL_NAMES = ("kernel", "weight", "w", "W")
BIAS_NAMES = ("bias", "b")
#: Without ``example_args``, a 2-D leaf with a path component matching this is taken for an
#: embedding table (read by a gather, not a matmul weight) and left alone unless targeted.
EMBEDDING_NAMES = r"^(embed.*|.*embedding.*|wte|wpe)$"
_EMBEDDING = re.compile(EMBEDDING_NAMES, re.IGNORECASE)
_CONVENTION = "without example_args: every 2-D floating leaf, as (in, out); embedding-named tables left out"
_TRACED = "traced: every leaf apply_fn uses as a matmul/conv weight"


# -- phase 1: options ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Options:
    rank: Any  # int, or {regex: int}
    alpha: Any  # None, a number, or {regex: number}
    rslora: bool
    dropout: float
    bias: str
    fallback: str | None
    adapter_dtype: Any
    matmul: str
    dora: bool
    init: Init

    @classmethod
    def check(cls, *, rank, alpha, rslora, dropout, bias, fallback, adapter_dtype, matmul, dora=False,
              init=None) -> "_Options":
        _check_pattern("rank", rank, _is_rank, "a positive integer")
        if alpha is not None:
            _check_pattern("alpha", alpha, _is_alpha, "a positive number")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"inject: dropout must be in [0, 1), got {dropout!r}.")
        if bias not in ("none", "all", "lora_only"):
            raise ValueError(f"inject: bias must be 'none', 'all' or 'lora_only', got {bias!r}.")
        if fallback not in (None, "merge"):
            raise ValueError(f"inject: fallback must be None or 'merge', got {fallback!r}.")
        if matmul not in MATMUL_PATHS:
            raise ValueError(f"inject: matmul must be one of {MATMUL_PATHS}, got {matmul!r}.")
        if matmul == "pallas":
            _fused.in_loops()  # a misspelt JLORA_FUSED_IN_LOOPS raises here, before anything is traced
        if not isinstance(dora, bool):
            raise TypeError(f"inject: dora must be True or False, got {dora!r}.")
        return cls(rank, alpha, bool(rslora), float(dropout), bias, fallback, _adapter_dtype(adapter_dtype), matmul,
                   dora, parse_init(init))

    def rank_for(self, path: str) -> int:
        return int(_lookup("rank", self.rank, path))

    def scale_for(self, path: str, rank: int) -> float:
        alpha = rank if self.alpha is None else _lookup("alpha", self.alpha, path, default=rank)
        return float(alpha) / (math.sqrt(rank) if self.rslora else rank)

    @property
    def uniform(self) -> bool:
        return not isinstance(self.rank, dict) and not isinstance(self.alpha, dict)


def _is_rank(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, numbers.Integral) and v > 0


def _is_alpha(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v) and v > 0


def _check_pattern(name: str, value: Any, ok, want: str) -> None:
    """``value`` is ``ok``, or a non-empty dict ``{regex: ok value}``."""
    if isinstance(value, dict):
        if not value:
            raise ValueError(f"inject: {name}={{}} chooses nothing; pass a number or {{regex: value}}.")
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"inject: {name} pattern keys are regexes (str), got {k!r}.")
            try:
                re.compile(k)
            except re.error as e:
                raise ValueError(f"inject: {name} pattern {k!r} is not a valid regular expression: {e}.") from None
            if not ok(v):
                raise ValueError(f"inject: {name}[{k!r}] must be {want}, got {v!r}.")
    elif not ok(value):
        raise ValueError(f"inject: {name} must be {want} or a dict {{regex: value}}, got {value!r}.")


_MISSING = object()


def _lookup(name: str, value: Any, path: str, default: Any = _MISSING) -> Any:
    """A per-kernel option: a plain value, or the first ``{regex: value}`` whose regex is found in
    the '/'-joined path (``re.search``, as ``targets``)."""
    if not isinstance(value, dict):
        return value
    for k, v in value.items():
        if re.search(k, path):
            return v
    if default is not _MISSING:
        return default
    raise ValueError(f"inject: no {name} pattern matches adapted kernel {path!r} (patterns {list(value)}); "
                     f"add a catch-all such as '.*'.")


def _adapter_dtype(dt: Any) -> Any:
    if dt is None:
        return None
    try:
        dt = jnp.dtype(dt)
    except TypeError:
        raise TypeError(f"inject: adapter_dtype {dt!r} is not a dtype.") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"inject: adapter_dtype must be a floating dtype (float32, bfloat16, ...), got {dt}; "
                         f"integer adapters would be rounded to zero.")
    return dt


def _matmul_option(matmul: str, fuse_shared_inputs: bool, fused_matmul: bool) -> str:
    """``matmul``, or the deprecated boolean spelling of it."""
    old = [n for n, v in (("fuse_shared_inputs", fuse_shared_inputs), ("fused_matmul", fused_matmul)) if v]
    if not old:
        return matmul
    if len(old) > 1 or matmul != "xla":
        raise ValueError("inject: pass one of matmul=, fuse_shared_inputs=, fused_matmul= "
                         "(the last two are the deprecated spellings of matmul='shared_xa' / 'pallas').")
    new = "shared_xa" if old[0] == "fuse_shared_inputs" else "pallas"
    warnings.warn(f"inject: {old[0]}=True is deprecated; pass matmul={new!r}.", DeprecationWarning, stacklevel=3)
    return new


# -- phase 2: classify ---------------------------------------------------------------------------------


@dataclasses.dataclass
class _Choice:
    layouts: dict[int, Layout]
    skipped: list[tuple[str, tuple, str]]
    why_not: dict[int, str]  # for targets' error message: leaves a target matched but could not adapt
    rule: str


def _is_float(x: Any) -> bool:
    if is_quantized(x):
        return True
    dt = getattr(x, "dtype", None)
    return dt is not None and jnp.issubdtype(dt, jnp.floating) and len(shape_of(x)) >= 1


def _choose_traced(flat: Flat, apply_fn: Callable, targets: Targets, args: tuple, kwargs: dict,
                   fallback: str | None) -> _Choice:
    """Layouts read off how the traced ``apply_fn`` uses each floating leaf."""
    leaves = flat.plain_leaves()
    cands = [i for i, x in enumerate(leaves) if _is_float(x)]
    uses = trace_uses(apply_fn, leaves, flat.treedef, args, kwargs, cands)
    match = make_matcher(targets)
    choice = _Choice({}, [], {}, _TRACED)
    for i in cands:
        u, shape, path = uses[i], shape_of(leaves[i]), flat.paths[i]
        named = targets is not None and len(shape) >= 2 and match(path, leaves[i])
        lay, why = layout_from_uses(u, len(shape))
        gathered = any(x.kind == "gather" for x in u)
        if named and gathered and not any(x.kind in ("dot", "conv") for x in u):
            lay, why = gather_layout(u, len(shape))  # an embedding table that a target names
        elif lay is not None and gathered and not named:
            lay, why = None, "a tied embedding (read by gather and used as a matmul weight); name it in targets to adapt it"
        if lay is None:
            if named and any(x.kind in ("dot", "conv") for x in u) and fallback is None:
                raise ValueError(f"inject: cannot adapt '{path}': {why}. Leave it out of targets, or pass "
                                 f"fallback='merge'.")
            if named:
                choice.why_not[i] = why
            if len(shape) >= 2 and any(x.kind != "operand" for x in u):
                choice.skipped.append((path, shape, why))
        elif targets is None or named:
            choice.layouts[i] = lay
        else:
            choice.skipped.append((path, shape, f"not in targets {describe_targets(targets)}"))
    return choice


def _choose_by_convention(flat: Flat, targets: Targets) -> _Choice:
    """Without a trace: every 2-D floating leaf is an ``(in, out)`` kernel, except tables named like
    embeddings (unless a target names them); a chosen leaf of more axes is ambiguous."""
    match = make_matcher(targets)
    choice = _Choice({}, [], {}, _CONVENTION)
    ambiguous = []
    for i, (path, x) in enumerate(zip(flat.paths, flat.plain_leaves())):
        shape = shape_of(x)
        if not _is_float(x) or len(shape) < 2:
            if targets is not None and match(path, x) and x is not None:
                choice.why_not[i] = "not a floating array of 2 or more axes"
            continue
        if targets is not None and not match(path, x):
            choice.skipped.append((path, shape, f"not in targets {describe_targets(targets)}"))
        elif targets is None and any(_EMBEDDING.match(c) for c in path.split("/")):
            choice.skipped.append((path, shape, "named like an embedding table; name it in targets to adapt it"))
        elif len(shape) == 2:
            choice.layouts[i] = Layout(stack=(), in_=(0,), out=(1,))
        elif targets is not None or leaf_name(path) in KERNEL_NAMES:
            ambiguous.append(f"'{path}' {list(shape)}")
        else:
            choice.skipped.append((path, shape, f"{len(shape)}-D: which axes are inputs is ambiguous "
                                                f"without example_args"))
    if ambiguous:
        raise ValueError(
            "inject: which axes of these kernels are inputs and which outputs is ambiguous without "
            f"a trace: {', '.join(ambiguous[:5])}{' ...' if len(ambiguous) > 5 else ''}. Pass "
            "example_args=(example inputs of apply_fn after params,) so inject can read the layout "
            "from how apply_fn uses them, or exclude them with targets.")
    return choice


def _check_targets_chose(targets: Targets, flat: Flat, choice: _Choice, traced: bool) -> None:
    """Every ``targets`` entry (each name of a list) must have chosen at least one kernel."""
    chosen = [flat.paths[i] for i in choice.layouts]
    if callable(targets) or targets is None or isinstance(targets, str):
        entries = [(f"targets {describe_targets(targets)}", None if callable(targets) else make_matcher(targets))]
    else:
        entries = [(f"targets entry {n!r}", make_matcher([n])) for n in targets]
    for what, m in entries:
        picks = (lambda p: True) if m is None else (lambda p, m=m: m(p, None))
        if any(picks(p) for p in chosen):
            continue
        hits = [f"'{flat.paths[i]}' ({why})" for i, why in choice.why_not.items() if picks(flat.paths[i])]
        pool = [p for p, x in zip(flat.paths, flat.plain_leaves()) if _is_float(x) and len(shape_of(x)) >= 2]
        near = nearest(what.split(" ", 2)[-1].strip("'"), pool)
        raise ValueError(
            f"inject: {what} matched no kernel."
            + (f" It matched {', '.join(hits[:3])}." if hits else "")
            + f" Kernels in params: {', '.join(near) or '(none)'}{' ...' if len(pool) > len(near) else ''}."
            + ("" if traced else " (Without example_args, every 2-D floating leaf is a candidate.)"))


# -- phase 3: leaves trained in full -------------------------------------------------------------------


def _choose_trained(flat: Flat, layouts: dict[int, Layout], full: Targets, bias: str) -> set[int]:
    leaves = flat.plain_leaves()
    trained: set[int] = set()
    if full is not None:
        is_list = isinstance(full, (list, tuple, set, frozenset))
        for entry in ([[n] for n in full] if is_list else [full]):  # every list entry must choose a leaf
            fm = make_matcher(entry)
            hit = {i for i, x in enumerate(leaves) if _is_float(x) and fm(flat.paths[i], x) and i not in layouts}
            if not hit:
                what = f"full entry {entry[0]!r}" if is_list else f"full={describe_targets(full)}"
                near = nearest(entry[0] if is_list else str(full), flat.paths)
                raise ValueError(f"inject: {what} matched no leaf. Nearest paths: {', '.join(near)}.")
            trained |= hit
    if bias != "none":
        parents = {_module_of(flat.paths[i]) for i in layouts}
        for i, p in enumerate(flat.paths):
            if leaf_name(p) in BIAS_NAMES and _is_float(leaves[i]) and i not in layouts:
                if bias == "all" or _module_of(p) in parents:
                    trained.add(i)
    return trained


def _module_of(path: str) -> str:
    """The module a leaf belongs to: its path without the leaf name (``params/Dense_0``)."""
    return path.rsplit("/", 1)[0] if "/" in path else ""


# -- phase 4: build ------------------------------------------------------------------------------------


def _build(flat: Flat, choice: _Choice, trained: set[int], opts: _Options, key: jax.Array):
    """The new leaves (LoraKernel / Trainable nodes in place) and the report."""
    leaves = flat.leaves
    keys = jax.random.split(key, max(len(leaves), 1))
    new_leaves, adapted, ranks, scales = list(leaves), [], set(), set()
    for i, lay in choice.layouts.items():
        path, w0, shape = flat.paths[i], leaves[i], shape_of(leaves[i])
        r = opts.rank_for(path)
        scale = opts.scale_for(path, r)
        dt = w0.dtype if opts.adapter_dtype is None else opts.adapter_dtype
        node = _adapter(keys[i], path, w0, lay, r, scale, dt, opts)
        new_leaves[i] = node
        ranks.add(r)
        scales.add(scale)
        desc = str(lay) if opts.uniform else f"{lay}, r={r}, scale={scale:g}"
        adapted.append((path, shape, desc))
    for i in trained:
        new_leaves[i] = Trainable(leaves[i])
    n_train = sum(sum(int(np.size(f)) for f in (x.a, x.b, x.m) if f is not None)
                  for x in new_leaves if isinstance(x, LoraKernel))
    n_train += sum(int(np.size(leaves[i])) for i in trained)
    total = sum(int(math.prod(shape_of(x))) for x in leaves if hasattr(x, "shape"))
    variant = ", ".join(v for v in ("DoRA" if opts.dora else "", "rsLoRA" if opts.rslora else "",
                                    f"init {opts.init.name}" if opts.init.name else "") if v)
    one = lambda vals, fmt: fmt(vals.pop()) if len(vals) == 1 else "per module"  # noqa: E731
    report = Report(adapted=adapted, skipped=choice.skipped, trained=[flat.paths[i] for i in sorted(trained)],
                    rank=one(set(ranks), int) if ranks else opts.rank if not isinstance(opts.rank, dict) else 0,
                    scale=one(set(scales), float) if scales else 0.0, trainable=n_train, total=total,
                    rule=choice.rule, variant=variant)
    return new_leaves, report


def _adapter(key: jax.Array, path: str, w0: Any, lay: Layout, r: int, scale: float, dt: Any,
             opts: _Options) -> LoraKernel:
    """One kernel's LoraKernel, initialised as ``opts.init`` says (placed like ``w0``)."""
    init = opts.init
    a0 = b0 = sha = None
    if init.kind in ("default", "gaussian"):
        # jlora's default: std 1/sqrt(fan_in), so x·A keeps x's scale; PEFT's "gaussian": std 1/r
        std = 1.0 / math.sqrt(lay.fan_in(shape_of(w0))) if init.kind == "default" else 1.0 / r
        a, b = init_factors(key, w0, lay, r, dt, std)  # placed like w0 (sharded or not)
    else:
        _check_init_fits(path, w0, lay, r, init)
        if init.kind == "pissa":
            a, b = _init.pissa(w0, lay, r, scale, init.n, key)
        elif init.kind == "olora":
            a, b = _init.olora(w0, lay, r)
        else:  # LoftQ: the base becomes its NF4 quantization Q, with Q + s·A·B ≈ W
            w0, a, b = _init.loftq(w0, lay, r, scale, init.n)
        a, b = place_factors(w0, lay, a.astype(dt), b.astype(dt))
        if init.kind != "loftq":
            a0, b0 = a, b  # the part of W the adapter starts with, subtracted unmerged (see _init)
        sha = _init.fingerprint(w0)
    node = LoraKernel(w0, a, b, layout=lay, scale=scale, dropout=opts.dropout, a0=a0, b0=b0, rslora=opts.rslora,
                      init=init.name if init.modifies_base else None, base_sha256=sha)
    if opts.dora:
        ea, eb = effective_factors(node)
        m = _dora.magnitude(w0, ea, eb, scale, lay, dt)
        zero = np.flatnonzero(~(np.asarray(m, np.float32) > 0))
        if zero.size:
            raise ValueError(
                f"inject: dora=True divides each output unit of '{path}' by its weight norm, and {zero.size} of its "
                f"units (flat indices {zero[:5].tolist()}{', ...' if zero.size > 5 else ''}) are all zero (or not "
                f"finite), which would make that output NaN. Leave this kernel out of targets, or use plain LoRA.")
        node = node.replace(m=place_magnitude(w0, lay, m))
    return node


def _check_init_fits(path: str, w0: Any, lay: Layout, r: int, init: Init) -> None:
    shape = shape_of(w0)
    n_in, n_out = lay.fan_in(shape), int(math.prod(shape[i] for i in lay.out))
    if r > min(n_in, n_out):
        raise ValueError(f"inject: init={init.name!r} needs rank <= min(in, out) = {min(n_in, n_out)} for "
                         f"'{path}' {list(shape)} (layout {lay}), got rank {r}.")
    if init.kind == "loftq" and is_quantized(w0):
        raise ValueError(f"inject: init={init.name!r} quantizes the dense weights itself, but '{path}' is already "
                         f"quantized; pass the unquantized base.")
    if lay.gather and init.kind != "loftq":
        raise ValueError(f"inject: init={init.name!r} is for matmul kernels; '{path}' is an embedding table "
                         f"(PEFT's {init.kind} init does not apply to embeddings either).")


def inject(
    params: Any,
    apply_fn: Callable,
    rank: int | dict[str, int] = 8,
    *,
    alpha: float | dict[str, float] | None = None,
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
    matmul: str = "xla",
    dora: bool = False,
    init: str | None = None,
    verbose: bool = False,
    fuse_shared_inputs: bool = False,
    fused_matmul: bool = False,
) -> tuple[Any, Apply]:
    """Add LoRA adapters to every chosen kernel of ``params``; return ``(params, apply)``.

    Each adapted kernel ``W0`` becomes a :class:`LoraKernel` holding ``W0`` (frozen), ``A``
    (Gaussian, std ``1/sqrt(fan_in)``) and ``B`` (zeros), so the injected model equals the base
    model exactly until the first update. ``apply(params, *args, **kwargs)`` has ``apply_fn``'s
    signature and computes ``W0·x + s·B·A·x`` without ever forming ``B·A``, with
    ``s = alpha / rank`` (``alpha / sqrt(rank)`` with ``rslora``).

    Which kernels, and which of their axes are inputs and outputs, is read from how ``apply_fn``
    really uses them: pass ``example_args`` (and ``example_kwargs``) and ``inject`` traces
    ``apply_fn(params, *example_args, **example_kwargs)`` once. Without them every 2-D floating
    leaf is a candidate, taken as ``(in, out)`` (a 2-D kernel has an unmerged form in either
    orientation, so ``W @ x`` and ``x @ W.T`` compute correctly too), except tables whose path names
    an embedding (``embed*``, ``*embedding*``, ``wte``, ``wpe``; see :data:`EMBEDDING_NAMES`);
    kernels of more axes need the trace. ``apply.report`` lists what was adapted, what was left
    alone and why, and which rule chose.

    Args:
      params: the model's parameter pytree (a Flax variables dict, an NNX state, an equinox
        module, any pytree). Leaves that are not arrays (Python numbers, functions) are passed
        to ``apply_fn`` as they are.
      apply_fn: ``apply_fn(params, *args, **kwargs)``, e.g. ``model.apply``.
      rank: the adapter rank r (a positive integer), or per kernel ``{regex: rank}``: the first
        regex found (``re.search``) in a kernel's '/'-joined path gives its rank, e.g.
        ``{"q_proj|v_proj": 16, ".*": 8}`` (every adapted kernel must match one; PEFT's
        ``rank_pattern``).
      alpha: LoRA alpha; defaults to the kernel's rank (scale 1). A ``{regex: alpha}`` dict is
        looked up like ``rank`` (a kernel no regex matches gets alpha = its rank; PEFT's
        ``alpha_pattern``).
      targets: None — every kernel used as a matmul/conv weight; a regex searched in the
        '/'-joined key path; a list of module names matching whole path components (every name
        must choose a kernel); or a callable ``(path, leaf) -> bool``. A target that chooses
        nothing raises ``ValueError`` listing the nearest paths. A table read only by a gather
        (an embedding) is adapted when a target names it.
      key: PRNG key for A (default ``jax.random.key(0)``: reproducible).
      example_args, example_kwargs: example inputs of ``apply_fn`` (after params).
      rslora: scale by ``alpha / sqrt(rank)`` (rank-stabilised LoRA).
      dropout: adapter input dropout rate, active only when ``apply`` gets ``lora_rng=key``.
      bias: ``'none'``, ``'all'`` (train every bias in full) or ``'lora_only'`` (biases next to
        adapted kernels).
      full: leaves to train in full (PEFT's ``modules_to_save``: heads, norms); same forms as
        ``targets``.
      adapter_dtype: floating dtype of A and B (float32 by default, also over a bf16 base; they are
        cast to the kernel's compute dtype at the matmul). ``None`` uses the kernel's dtype.
      fallback: ``'merge'`` lets an op with no LoRA rule compute with ``W0 + s·A·B`` materialised;
        by default such an op is an error that names it and the kernel.
      matmul: how an adapted matmul is computed. ``'xla'`` (default): ``x·W0 + s·(x·A)·B`` as XLA
        matmuls. ``'shared_xa'``: one ``x·[A_q A_k A_v]`` for adapted 2-D kernels that read the same
        input with the same contraction (q/k/v, gate/up). ``'pallas'`` (H100/H200): each plain 2-D
        bf16/f16 ``x @ W`` through one Pallas Mosaic GPU kernel that adds ``s·(x·A)·B`` in the base
        matmul's epilogue (and the same for ``dx``); matmuls it does not cover keep ``'xla'``, and
        ``apply.fused_report`` says which and why. Same function to rounding; measured in
        benchmarks/RESULTS.md.
      dora: DoRA (Liu et al. 2024): each adapted kernel also gets a trainable magnitude ``m`` (one
        value per output unit and stacked layer, initialised to the kernel's norms) and computes
        ``m ⊙ (W0 + s·A·B) / ‖W0 + s·A·B‖`` — the norm over the input axes, a constant in the
        backward pass (the paper's §4.3, as PEFT) — still without forming ``A·B``: the norm comes
        from ``‖W0‖²``, ``Aᵀ·W0`` and ``AᵀA`` (see ``jlora._dora``).
      init: how A and B start. ``None`` (default): A ~ N(0, 1/fan_in), B = 0. ``"gaussian"``: A ~
        N(0, 1/r²), B = 0 (PEFT's). Inits that move part of W0 into the adapter — ``"pissa"``
        (top-r singular vectors), ``"pissa_niter_N"`` (randomised SVD, N power iterations),
        ``"olora"`` (QR) — keep W0 unmodified and store the initial factors as frozen ``a0``,
        ``b0``, computing ``W0 + s·(A·B − A0·B0)``: the model starts as exactly the base model, and
        the adapter is a standard rank-2r LoRA over the original weights (what ``export_peft``
        writes, as PEFT's ``path_initial_model_for_weight_conversion``). ``"loftq"`` /
        ``"loftq_iter_N"`` replace W0 by its NF4 quantization Q from LoftQ's alternating
        algorithm (1 or N iterations), with Q + s·A·B ≈ W0. Adapters from these inits record a
        sha256 of the base they are valid over; ``load_adapters`` refuses any other. The papers'
        algorithms are cited in ``jlora._init``.
      verbose: print the report (also available as ``apply.report``).
      fuse_shared_inputs, fused_matmul: deprecated spellings of ``matmul='shared_xa'`` /
        ``matmul='pallas'``.

    Returns:
      ``(params, apply)``.

    Example:
        >>> import jax, jax.numpy as jnp, jlora
        >>> params = {"w1": jnp.ones((8, 16)), "b1": jnp.zeros(16), "w2": jnp.ones((16, 4))}
        >>> def mlp(p, x):
        ...     return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
        >>> lp, apply = jlora.inject(params, mlp, rank=2)
        >>> lp["w1"].a.shape, lp["w1"].b.shape
        ((8, 2), (2, 16))
        >>> x = jnp.ones((2, 8))
        >>> bool(jnp.array_equal(apply(lp, x), mlp(params, x)))
        True
        >>> lp, apply = jlora.inject(params, mlp, rank=2, targets=["w2"], example_args=(x,))
        >>> [path for path, *_ in apply.report.adapted]
        ['w2']
        >>> lp, apply = jlora.inject(params, mlp, rank={"w1": 4, ".*": 2}, dora=True, init="pissa")
        >>> lp["w1"].rank, lp["w1"].m.shape, lp["w1"].init
        (4, (16,), 'pissa')
        >>> bool(jnp.allclose(apply(lp, x), mlp(params, x), atol=1e-4))  # PiSSA and DoRA start as the base
        True
    """
    if not callable(apply_fn):
        raise TypeError(f"inject: apply_fn must be callable (e.g. model.apply), got {type(apply_fn).__name__}.")
    opts = _Options.check(rank=rank, alpha=alpha, rslora=rslora, dropout=dropout, bias=bias, fallback=fallback,
                          adapter_dtype=adapter_dtype, matmul=_matmul_option(matmul, fuse_shared_inputs, fused_matmul),
                          dora=dora, init=init)
    if not isinstance(example_args, (tuple, list)):
        raise TypeError("inject: example_args must be a tuple of apply_fn's arguments after params.")
    example_kwargs = dict(example_kwargs or {})
    flat = Flat.of(params)
    if any(is_node(x) for x in flat.leaves):
        raise ValueError("inject: params already contain jlora adapters; inject the base params once.")
    traced = bool(example_args or example_kwargs)
    if traced:
        choice = _choose_traced(flat, apply_fn, targets, tuple(example_args), example_kwargs, opts.fallback)
    else:
        choice = _choose_by_convention(flat, targets)
    _check_targets_chose(targets, flat, choice, traced)
    trained = _choose_trained(flat, choice.layouts, full, opts.bias)
    new_leaves, report = _build(flat, choice, trained, opts, jax.random.key(0) if key is None else key)
    apply = Apply(apply_fn, flat.paths, [shape_of(x) for x in flat.leaves], opts.fallback, report, opts.matmul)
    if verbose:
        print(report)
    return jax.tree.unflatten(flat.treedef, new_leaves), apply
