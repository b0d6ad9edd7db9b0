"""Rules for the ops that consume a kernel: ``dot_general``, ``conv_general_dilated``, ``gather``.

Each computes the frozen model's own op on W0 and adds the low-rank path, never forming B·A:
a matmul ``x·W0 + s·(x·A)·B`` laid out exactly as the original ``dot_general``'s output, a
convolution ``conv(x, W0) + s·conv(x, A)·B``, a gather of rows (an embedding) gathers rows of A
and multiplies by B. Discovery records which kernel axes each op contracts, batches and keeps: that
*is* the kernel's layout.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from jlora import _compat as jax_compat
from jlora._quant import dequantized, is_quantized
from jlora._rules.table import NoRule, OpRule, Probe, Use, expand, union
from jlora._sharding import explicit_entries, product_spec
from jlora._value import LoraValue, Role, subscripts

__all__ = ["RULES", "DORA_OUT_NAME", "XA_NAME", "MIXED_DENSE_MAX", "MIXED_FORM_ENV", "gather_form", "mixed_form", "shared_input_groups",
           "fuse_shared_input"]

DORA_OUT_NAME = "jlora_dora_out"  # jax.ad_checkpoint name of a DoRA matmul's output before its gain
XA_NAME = "jlora_xa"  # jax.ad_checkpoint name of every adapter's rank-r product x·A (s·x·A on the fused path)

#: Mixed batches: a matmul over a bank keeps all N adapters and masks the rank product when
#: (rows of x per example) × N is at most this, else it gathers each example's own A and B.
MIXED_DENSE_MAX = 1024
#: Environment switch for benchmarks and tests: ``auto`` (default), ``dense`` or ``gather``.
MIXED_FORM_ENV = "JLORA_MIXED_FORM"


def mixed_form(rows: int, n: int) -> str:
    """How a mixed batch's matmul computes an example's adapter: ``"dense"`` or ``"gather"``.

    ``rows`` is the number of rows of x one example brings to the matmul (1 for a decode step),
    ``n`` the bank's size. Gathering copies the example's A and B (``r·(in + out)`` values per
    example) and runs one small batched matmul per example; the dense form reads the bank once and
    multiplies x by every adapter's A (``n`` times the rank-r FLOPs) in one plain matmul per
    kernel, then zeroes the other adapters' columns. On an H200 (bf16: ~1 PFLOP/s, 4.8 TB/s) the
    extra FLOPs cost less than the copy while ``rows × n`` stays below ~600, and the dense form
    also launches fewer, larger kernels; ``MIXED_DENSE_MAX`` sits a little above that
    (``benchmarks/mixed_batch.py`` measures both).

    Example:
        >>> mixed_form(1, 64), mixed_form(2048, 8)
        ('dense', 'gather')
    """
    forced = os.environ.get(MIXED_FORM_ENV, "auto")
    if forced not in ("auto", "dense", "gather"):
        raise ValueError(f"{MIXED_FORM_ENV}={forced!r}: use auto, dense or gather.")
    if forced != "auto":
        return forced
    return "dense" if rows * n <= MIXED_DENSE_MAX else "gather"


def base_product(k: LoraValue, f):
    """``f(W0)``: the frozen model's own product with the kernel. A quantized base is dequantized
    inside a ``jax.checkpoint`` that saves nothing, so the backward keeps the stored codes and
    dequantizes again, never a dense copy of the kernel (QLoRA's memory saving, in training too)."""
    if not is_quantized(k.w0):
        return f(k.w0)
    return jax.checkpoint(lambda w: f(dequantized(w)), policy=jax.checkpoint_policies.nothing_saveable)(k.w0)


# -- dot_general -----------------------------------------------------------------------------------------


def _dot_discover(analysis, eqn, ins):
    lhs, rhs = ins
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if isinstance(lhs, Probe) and isinstance(rhs, Probe):
        for q in (lhs, rhs):
            analysis.add(q, Use("operand", "dot_general (both operands are parameters)", jax_compat.where(eqn)))
        return [None]
    k, kc, kb = (rhs, rc, rb) if isinstance(rhs, Probe) else (lhs, lc, lb)
    free = [a for a in range(len(k.tags)) if a not in kc and a not in kb]
    analysis.add(k, Use("dot", "dot_general", jax_compat.where(eqn), stack=union(k.tags, kb) | k.removed,
                        in_=union(k.tags, kc), out=union(k.tags, free)))
    return [None]


def _dot_evaluate(eqn, invals, ctx):
    lhs, rhs = invals
    p = eqn.params
    if isinstance(lhs, LoraValue) and isinstance(rhs, LoraValue):
        raise NoRule("both operands are adapted kernels")
    if ctx.pallas and isinstance(rhs, LoraValue):
        y, why = _pallas_dot(lhs, rhs, p, ctx)
        ctx.fused_log.append((rhs.path, why))
        if y is not None:
            return [y]
    (lc, rc), (lb, rb) = p["dimension_numbers"]
    if isinstance(rhs, LoraValue):
        k, x, kc, kb, xc, xb, x_is_lhs = rhs, lhs, rc, rb, lc, lb, True
        op = lambda xx, w: jax_compat.bind(eqn, [xx, w])[0]  # noqa: E731
    else:
        k, x, kc, kb, xc, xb, x_is_lhs = lhs, rhs, lc, lb, rc, rb, False
        op = lambda xx, w: jax_compat.bind(eqn, [w, xx])[0]  # noqa: E731
    pre = ctx.shared.pop(id(eqn), None) if x_is_lhs else None
    dims = (kc, kb, xc, xb)
    if k.slot is not None:  # a mixed batch's example: its own adapter, or all of them masked
        rows = math.prod(x.shape) // max(1, math.prod(x.shape[a] for a in xc))
        if mixed_form(rows, k.slot.n) == "gather":
            k = k.gathered()
    if k.gain is not None:
        return [_dora_dot(x, k, dims, x_is_lhs, ctx, p.get("precision"), op, pre)]
    base = base_product(k, lambda w: op(x, w))
    y = _low_rank_dot(x, k, dims, x_is_lhs, ctx, p.get("precision"), base, pre)
    return [base + y.astype(base.dtype)]


@jax.custom_jvp
def _own_cotangent(y):
    """The identity, whose tangent (and so, under ``jax.grad``, whose cotangent) passes an
    optimization barrier: the rank-r term's ``dy`` is then a value of its own. Without it XLA:GPU
    merged ``dy·W0ᵀ`` with ``dy·Bᵀ``, which share ``dy``, into one matmul over a concatenation of W0
    and B made every step (1.24 GiB more than hand-written LoRA at rank 128 on an H200,
    benchmarks/RESULTS.md). The barrier moves no data."""
    return y


@_own_cotangent.defjvp
def _own_cotangent_jvp(primals, tangents):
    return primals[0], lax.optimization_barrier(tangents[0])


def _dora_dot(x, k: LoraValue, dims, x_is_lhs: bool, ctx, precision, op, pre):
    """A DoRA kernel's matmul: the LoRA matmul with every output unit scaled by ``g = m/‖W‖``.

    As PEFT's DoRA layer: ``g ⊙ (x·W0 + s·(x·A)·B)``, and with adapter dropout active
    ``x·W0 + (g − 1) ⊙ d·W0 + g ⊙ s·(d·A)·B`` with ``d = dropout(x)``. A kernel used transposed
    (``x·Wᵀ``, contracting its output axes) is scaled along the contracted axes instead:
    ``(x ⊙ g)·Wᵀ``."""
    kc, kb, xc, xb = dims
    a_first = _contraction_side(k, kc, kb)
    dropping = k.dropout > 0 and ctx.rng is not None
    xd = ctx.dropout(x, k.dropout) if dropping else x
    if a_first:
        k_free = [a for a in range(len(k.tags)) if a not in kc and a not in kb]
        off = len(kb) + ((x.ndim - len(xc) - len(xb)) if x_is_lhs else 0)
        base = base_product(k, lambda w: op(x, w))
        pos = {ka: i for i, ka in enumerate(kb)} | {ka: off + j for j, ka in enumerate(k_free)}
        g = k.gain_on(pos, base.ndim, base.dtype)
        y = _low_rank_dot(xd, k, dims, x_is_lhs, ctx, precision, base, None if dropping else pre, drop=False)
        if dropping:
            base_d = base_product(k, lambda w: op(xd, w))
            return base + (g - jnp.ones((), g.dtype)) * base_d + g * y.astype(base.dtype)
        # named: the backward of g·out needs out, and a policy (a recompute region's) can keep it by
        # this name rather than its two terms
        return g * checkpoint_name(base + y.astype(base.dtype), DORA_OUT_NAME)
    pos = {ka: xa for xa, ka in zip(xc, kc)} | {ka: xa for xa, ka in zip(xb, kb)}
    try:
        gx = k.gain_on(pos, x.ndim, x.dtype)
    except ValueError:
        raise NoRule("DoRA: the kernel is used transposed with a stacked-layer axis the matmul does not batch") from None
    if dropping:
        base = base_product(k, lambda w: op(x, w))
        base = base + base_product(k, lambda w: op(xd * (gx - jnp.ones((), gx.dtype)), w))
    else:
        base = base_product(k, lambda w: op(x * gx, w))
    y = _low_rank_dot(xd * gx, k, dims, x_is_lhs, ctx, precision, base, None, drop=False)
    return base + y.astype(base.dtype)


def _contraction_side(k: LoraValue, kc, kb) -> bool:
    """True when the dot contracts exactly the adapter's input axes (``(x·A)·B``), False when
    exactly its output axes (``(x·Bᵀ)·Aᵀ``, a kernel used transposed); NoRule otherwise."""
    roles = k.roles(kc) - {Role.UNIT}
    n_in = sum(k.tags[a].role is Role.IN for a in kc)
    n_out = sum(k.tags[a].role is Role.OUT for a in kc)
    if roles == {Role.IN} and n_in == k.count(Role.IN):
        a_first = True
    elif roles == {Role.OUT} and n_out == k.count(Role.OUT):
        a_first = False
    else:
        raise NoRule("its contraction is neither exactly the adapter's input axes nor exactly its output axes")
    if Role.STACK in k.roles(kc):
        raise NoRule("it contracts a stacked-layer axis")
    if (Role.OUT if a_first else Role.IN) in k.roles(kb):
        raise NoRule("it batches over a non-stack kernel axis")
    return a_first


def _low_rank_dot(x, k: LoraValue, dims, x_is_lhs: bool, ctx, precision, base, pre=None, drop=True):
    """``s·(x·A)·B`` (or ``s·(x·Bᵀ)·Aᵀ``) laid out exactly as ``dot_general``'s output (``drop``:
    apply the adapter's dropout to ``x`` here; False when the caller already did)."""
    kc, kb, xc, xb = dims
    a_first = _contraction_side(k, kc, kb)
    letters = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    s = subscripts(k.tags, letters)
    k_l = s.view
    x_l = [None] * x.ndim
    for xa, ka in list(zip(xc, kc)) + list(zip(xb, kb)):
        x_l[xa] = k_l[ka]
    x_l = [c if c is not None else next(letters) for c in x_l]
    first, second, first_l, second_l = (k.a, k.b, s.a, s.b) if a_first else (k.b, k.a, s.b, s.a)
    # dot_general's output: batch dims, then lhs free, then rhs free.
    k_free = [a for a in range(len(k.tags)) if a not in kc and a not in kb]
    x_free = [a for a in range(x.ndim) if a not in xc and a not in xb]
    xf_l, kf_l = [x_l[a] for a in x_free], [k_l[a] for a in k_free]
    out_l = [k_l[a] for a in kb] + (xf_l + kf_l if x_is_lhs else kf_l + xf_l)
    # unit axes of the kernel carry no factor axis: drop them from the einsum, re-insert after
    unit_free = {k_l[a] for a in k_free if k.tags[a].role is Role.UNIT}
    unit_contracted = {k_l[a] for a in kc if k.tags[a].role is Role.UNIT}
    x_unit = [i for i in range(x.ndim) if x_l[i] in unit_contracted]
    if x_unit:
        x = jnp.sum(x, axis=tuple(x_unit))  # a contraction over a unit axis is a squeeze
        x_l = [c for i, c in enumerate(x_l) if i not in x_unit]
    t_l = list(dict.fromkeys([c for c in x_l if c not in first_l or c in s.stack]
                             + [c for c in s.stack if c not in x_l] + [s.rank]))
    y_l = [c for c in out_l if c not in unit_free]
    if drop:
        x = ctx.dropout(x, k.dropout)
    if k.slot is not None and pre is None:
        # A mixed batch's dense form: x·[A_1 … A_N] of several kernels that read the same x would be
        # merged by XLA into one matmul against their concatenated banks, a copy of those banks'
        # slices every step (0.4 ms of a 7.8 ms decode step on an H200). The barrier keeps them apart.
        x = lax.optimization_barrier(x)
    t_kw, y_kw = _explicit_shardings(x, x_l, (first, first_l), (second, second_l), t_l, y_l, out_l,
                                     unit_free, base)
    dtype = k.dtype
    t = pre if pre is not None else jnp.einsum(
        f"{''.join(x_l)},{first_l}->{''.join(t_l)}", x, first.astype(dtype), precision=precision,
        preferred_element_type=dtype, **t_kw)
    t = checkpoint_name(t, XA_NAME)  # the rank-r product: a remat policy can keep it by this name
    if k.slot is not None:  # every adapter of a bank: keep the example's own columns (its rank axis is last)
        t = t * k.slot.mask(t.dtype)
    if k.scale != 1.0:
        t = t * jnp.asarray(k.scale, dtype)
    y = jnp.einsum(f"{''.join(t_l)},{second_l}->{''.join(y_l)}", t, second.astype(dtype), precision=precision,
                   preferred_element_type=base.dtype, **y_kw)
    if unit_free:
        y = jnp.reshape(y, tuple(base.shape))
    return _own_cotangent(y)  # every caller adds y to a base product that reads the same dy


def _explicit_shardings(x, x_l, first, second, t_l, y_l, out_l, unit_free, base):
    """In explicit sharding mode, where the rank-r products live (else XLA propagates shardings)."""
    (f, f_l), (g, g_l) = first, second
    xs, fs, gs = explicit_entries(x), explicit_entries(f), explicit_entries(g)
    if xs is None and fs is None and gs is None:
        return {}, {}
    t_spec = product_spec(t_l, [(x_l, xs), (f_l, fs)])
    like = explicit_entries(base)
    y_spec = (PartitionSpec(*[e for c, e in zip(out_l, like) if c not in unit_free]) if like is not None
              else product_spec(y_l, [(t_l, list(t_spec)), (g_l, gs)]))
    return {"out_sharding": t_spec}, {"out_sharding": y_spec}


def is_matrix_on_input(k, contracted) -> bool:
    """``k`` is a plain 2-D (in, out) kernel view, no stack or unit axes, contracted on its input
    axis alone: the form both matmul fast paths (shared ``x·A``, the Pallas kernel) take."""
    return (isinstance(k, LoraValue) and len(contracted) == 1 and k.n_stack == 0
            and sorted(t.role.value for t in k.tags) == ["in", "out"] and k.tags[contracted[0]].role is Role.IN)


def _pallas_dot(x, k: LoraValue, p, ctx):
    """``(x @ W, None)`` for a plain 2-D adapted kernel through :func:`jlora._fused.lora_matmul`, or
    ``(None, why not)`` where that path does not apply (then the general rule runs)."""
    from jlora import _fused

    (xc, kc), (xb, kb) = p["dimension_numbers"]
    why = _pallas_refusal(x, k, p, ctx) or _fused.unavailable()
    if why:
        return None, why
    w0 = k.w0 if kc[0] == 0 else k.w0.T
    m, (kk, n) = int(np.prod(x.shape[:-1])), w0.shape
    if not _fused.supported(m, kk, n, x.dtype):
        t = _fused.DEFAULT_TILES
        return None, (f"{x.dtype} ({m}, {kk}) @ ({kk}, {n}): the kernel takes bf16/f16 with M a multiple "
                      f"of {t.tile_m} and K, N multiples of {2 * t.tile_n}")
    if _fused.fitted(_fused.DEFAULT_TILES, _fused.padded_rank(k.a.shape[-1])) is None:
        return None, (f"rank {k.a.shape[-1]}: the kernel's low-rank tiles would not fit in shared memory (it takes "
                      f"ranks up to {_fused.max_rank()})")
    return _fused.lora_matmul(x, w0, k.a, k.b, scale=k.scale, impl="mosaic"), None


def _pallas_refusal(x, k: LoraValue, p, ctx) -> str | None:
    """Why the Pallas kernel does not take this matmul (checked before any device query).

    Sharded operands are taken as long as their mesh axes are Auto (JAX's default): the kernel call
    is partitioned (:mod:`jlora._fused`), x's batch split stays, an FSDP kernel is gathered per use
    as for the base matmul. Explicit mesh axes (sharding in the types) are not: the rank-r products'
    placement there is written out by the general rule."""
    from jlora import _fused

    (xc, kc), (xb, kb) = p["dimension_numbers"]
    pet, prec = p.get("preferred_element_type"), p.get("precision")
    precs = prec if isinstance(prec, tuple) else (prec,)
    checks = [
        (ctx.in_loop and not _fused.in_loops(),
         "inside a lax.scan/while body, and JLORA_FUSED_IN_LOOPS=0 is set"),
        (bool(xb or kb or tuple(xc) != (x.ndim - 1,) or not is_matrix_on_input(k, kc)),
         "not a plain x @ W of a 2-D kernel"),
        (k.dropout > 0 and ctx.rng is not None, "adapter dropout is on"),
        (k.gain is not None, "DoRA"),
        (k.slot is not None, "a mixed batch (adapter_ids)"),
        (is_quantized(k.w0), "quantized base"),
        (x.dtype != k.dtype or (pet is not None and jnp.dtype(pet) != x.dtype),
         f"mixed dtypes (x {x.dtype}, kernel {k.dtype}, result {pet})"),
        (prec is not None and any(q not in (None, lax.Precision.DEFAULT) for q in precs), f"precision {prec}"),
        (any(explicit_entries(t) is not None for t in (x, k.w0, k.a, k.b)),
         "sharded with explicit mesh axes (Auto axes take the partitioned kernel)"),
    ]
    return next((why for bad, why in checks if bad), None)


# -- one x·[A_1 … A_n] for kernels that read the same input (matmul='shared_xa') --------------------------


def shared_input_groups(jaxpr) -> dict[int, list]:
    """dot_general equations whose lhs is the same variable, with the same contraction."""
    by_x: dict = {}
    for eqn in jaxpr.eqns:
        if (eqn.primitive.name == "dot_general" and not jax_compat.is_literal(eqn.invars[0])
                and not jax_compat.is_literal(eqn.invars[1])):
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            key = (eqn.invars[0], tuple(lc), tuple(rc), tuple(lb), tuple(rb), str(eqn.params.get("precision")))
            by_x.setdefault(key, []).append(eqn)
    return {id(e): g for g in by_x.values() if len(g) > 1 for e in g}


def fuse_shared_input(group, env, ctx) -> None:
    """Compute ``x·A`` for every fusable adapted kernel of ``group`` with one matmul.

    Fusable: the kernel (rhs) is a 2-D view contracted on its input axis, no stack axes, no
    dropout, the same compute dtype. The products are split and left in ``ctx.shared`` for the
    equations' own rule, which then skips its first matmul.
    """
    first = group[0]
    x = env[first.invars[0]]
    (lc, rc), (lb, rb) = first.params["dimension_numbers"]
    if lb or rb or len(rc) != 1 or isinstance(x, LoraValue) or explicit_entries(x) is not None:
        return
    members = [(e, k) for e in group for k in [env.get(e.invars[1])]
               if is_matrix_on_input(k, rc) and k.slot is None and not (k.dropout > 0 and ctx.rng is not None)]
    dtypes = {k.dtype for _, k in members}
    if len(members) < 2 or len(dtypes) != 1:
        return
    dtype = dtypes.pop()
    a_cat = jnp.concatenate([k.a.astype(dtype) for _, k in members], axis=-1)
    t = lax.dot_general(x, a_cat, ((tuple(lc), (0,)), ((), ())), precision=first.params.get("precision"),
                        preferred_element_type=dtype)
    offsets = np.cumsum([k.a.shape[-1] for _, k in members])[:-1]
    for (e, _), part in zip(members, jnp.split(t, offsets, axis=-1)):
        ctx.shared[id(e)] = part


# -- conv_general_dilated --------------------------------------------------------------------------------


def _conv_form(eqn, x_is_kernel: bool, k_is_kernel: bool) -> None:
    """Only an ungrouped convolution whose *kernel* operand is the adapted kernel has a rule."""
    if x_is_kernel or not k_is_kernel:
        raise NoRule("the adapted kernel is the convolution's input, not its kernel")
    if eqn.params["feature_group_count"] != 1 or eqn.params["batch_group_count"] != 1:
        raise NoRule("grouped or depthwise convolutions have no LoRA rule")


def _conv_discover(analysis, eqn, ins):
    lhs, rhs = ins
    try:
        _conv_form(eqn, isinstance(lhs, Probe), isinstance(rhs, Probe))
    except NoRule as e:
        for q in (lhs, rhs):
            if isinstance(q, Probe):
                analysis.other(q, eqn, str(e))
        return [None]
    dn = eqn.params["dimension_numbers"]
    o = dn.rhs_spec[0]
    # The kernel axes of the input-feature and spatial axes, where each is one kernel axis.
    torch_order = [rhs.tags[a] for a in dn.rhs_spec[1:]]
    clean = rhs.exact and all(len(t) == 1 for t in torch_order)
    conv = tuple(next(iter(t)) for t in torch_order) if clean else ()
    ins_axes = [a for a in range(len(rhs.tags)) if a != o]
    analysis.add(rhs, Use("conv", "conv_general_dilated", jax_compat.where(eqn), stack=rhs.removed,
                          in_=union(rhs.tags, ins_axes), out=rhs.tags[o], conv=conv))
    return [None]


def _conv_evaluate(eqn, invals, ctx):
    x, k = invals
    _conv_form(eqn, isinstance(x, LoraValue), isinstance(k, LoraValue))
    k = k.gathered()  # a mixed batch: the example's own adapter
    p, dn = eqn.params, eqn.params["dimension_numbers"]
    o_ax = dn.rhs_spec[0]
    if k.tags[o_ax].role is not Role.OUT or k.count(Role.OUT) != 1 or k.n_stack:
        raise NoRule("its output-feature axis is not the adapter's only output axis")
    if any(t.role not in (Role.IN, Role.UNIT) for a, t in enumerate(k.tags) if a != o_ax):
        raise NoRule("its input/spatial axes are not the adapter's input axes")
    base = base_product(k, lambda w: jax_compat.bind(eqn, [x, w])[0])
    dropping = k.gain is not None and k.dropout > 0 and ctx.rng is not None
    xd = ctx.dropout(x, k.dropout)
    dtype, r, n_i = k.dtype, k.a.shape[-1], k.a.ndim - 1
    # A as a convolution kernel: the view's layout with the output feature axis replaced by r.
    perm = [n_i if ax == o_ax else t.idx for ax, t in enumerate(k.tags) if ax == o_ax or t.role is Role.IN]
    shape = [r if ax == o_ax else k.a.shape[t.idx] if t.role is Role.IN else 1 for ax, t in enumerate(k.tags)]
    a_conv = jnp.reshape(jnp.transpose(k.a, perm), shape).astype(dtype)
    (t,) = jax_compat.bind_with(eqn.primitive, dict(p, preferred_element_type=dtype), xd, a_conv)
    f = dn.out_spec[1]
    t = t * jnp.asarray(k.scale, dtype)
    y = jnp.moveaxis(jnp.tensordot(t, k.b.astype(dtype), axes=([f], [0])), -1, f).astype(base.dtype)
    if k.gain is None:
        return [base + y]
    g = k.gain_on({o_ax: f}, base.ndim, base.dtype)  # DoRA: per output feature, as PEFT's DoRA ConvNd
    if dropping:
        base_d = base_product(k, lambda w: jax_compat.bind(eqn, [xd, w])[0])
        return [base + (g - jnp.ones((), g.dtype)) * base_d + g * y]
    return [g * (base + y)]


# -- gather (an embedding table, or a tied one) ----------------------------------------------------------


def gather_form(dimension_numbers, slice_sizes, shape) -> tuple[int | None, str]:
    """``(axis, "")`` when a gather reads whole rows (axis 0) or columns (axis 1) of a 2-D kernel —
    the only gather with a LoRA rule — else ``(None, why not)``.

    Example:
        >>> import jax.numpy as jnp, jax
        >>> eqn = jax.make_jaxpr(lambda e, i: e[i])(jnp.ones((10, 4)), jnp.array([1, 2])).eqns[-1]
        >>> gather_form(eqn.params["dimension_numbers"], eqn.params["slice_sizes"], (10, 4))
        (0, '')
    """
    dn = dimension_numbers
    why = "only gathering whole rows or columns of a 2-D kernel has a LoRA rule"
    if (len(shape) != 2 or len(dn.start_index_map) != 1 or tuple(dn.collapsed_slice_dims) != tuple(dn.start_index_map)
            or getattr(dn, "operand_batching_dims", ())):
        return None, why
    g = dn.start_index_map[0]
    return (g, "") if slice_sizes[1 - g] == shape[1 - g] else (None, why)


def _gather_discover(analysis, eqn, ins):
    x = ins[0]
    if not isinstance(x, Probe) or any(isinstance(q, Probe) for q in ins[1:]):
        for q in ins:
            if isinstance(q, Probe):
                analysis.other(q, eqn, "a parameter is used as gather indices")
        return [None]
    axis, why = gather_form(eqn.params["dimension_numbers"], eqn.params["slice_sizes"], eqn.invars[0].aval.shape)
    if axis is None or x.removed or any(not t for t in x.tags):
        analysis.other(x, eqn, why or "gathers from a sliced or reshaped kernel")
    else:
        analysis.add(x, Use("gather", "gather", jax_compat.where(eqn), in_=x.tags[axis], out=x.tags[1 - axis]))
    return [None]


def _gather_evaluate(eqn, invals, ctx):
    k, idx = invals[0], invals[1]
    if isinstance(idx, LoraValue) or len(k.tags) != 2 or k.n_stack or Role.UNIT in k.roles(range(2)):
        raise NoRule("only gathering rows or columns of a 2-D kernel has a LoRA rule")
    p = eqn.params
    dn = p["dimension_numbers"]
    g, why = gather_form(dn, p["slice_sizes"], tuple(k.w0.shape))
    if g is None:
        raise NoRule(why)
    k = k.gathered()  # a mixed batch: the example's own adapter
    base = base_product(k, lambda w: jax_compat.bind(eqn, [w, idx])[0])
    # f1: the factor holding the gathered axis, laid out like the view with the other axis as r.
    f1, f2 = (k.b.T, k.a.T) if k.tags[g].role is Role.OUT else (k.a, k.b)  # (gathered, r), (r, other)
    if g == 1:
        f1 = f1.T
    sizes = list(p["slice_sizes"])
    sizes[1 - g] = k.a.shape[-1]
    (t,) = jax_compat.bind_with(eqn.primitive, dict(p, slice_sizes=tuple(sizes)), f1.astype(k.dtype), idx)
    od = dn.offset_dims[0]
    t = t * jnp.asarray(k.scale, k.dtype)
    y = jnp.moveaxis(jnp.tensordot(t, f2.astype(k.dtype), axes=([od], [0])), -1, od)
    out = base + y.astype(base.dtype)
    if k.gain is None:
        return [out]
    if k.tags[g].role is Role.IN:  # DoRA: the rows' features are output units
        return [out * k.gain_on({1 - g: od}, out.ndim, out.dtype)]
    # a table gathered along its output axis (a tied head's rows): each row has its own gain
    gdn = lax.GatherDimensionNumbers(offset_dims=(), collapsed_slice_dims=(0,), start_index_map=(0,))
    gi = lax.gather(k.gain, idx, gdn, (1,), mode=p.get("mode"), fill_value=p.get("fill_value"))
    return [out * jnp.expand_dims(gi, od).astype(out.dtype)]


RULES = expand({
    "dot_general": OpRule(_dot_discover, _dot_evaluate),
    "conv_general_dilated": OpRule(_conv_discover, _conv_evaluate),
    "gather": OpRule(_gather_discover, _gather_evaluate),
})
