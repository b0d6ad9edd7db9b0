"""The jaxpr interpreter behind ``apply``: evaluate apply_fn with adapted kernels kept unmerged.

An adapted kernel enters the jaxpr as a :class:`LoraValue`: the current *view* of the frozen base
(``w0``, after whatever transposes / reshapes / slices the program applied to it) together with
the factors ``a`` (stack..., in..., r) and ``b`` (stack..., r, out...) and one tag per view axis
saying which factor axis it corresponds to. Equations that consume a LoraValue go through the rule
table ``_RULES``; every other equation is re-bound unchanged. Matmuls and convolutions get
``base(x, w0) + s·((x·A)·B)``; ``B·A`` is never formed.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from jlora import _compat as C
from jlora._discover import gather_form, reshape_groups
from jlora._quant import dense, is_quantized
from jlora._sharding import constrain_factors, explicit_entries, product_spec

__all__ = ["LoraValue", "UnsupportedOpError", "Context", "eval_jaxpr"]


XA_NAME = "jlora_xa"  # jax.ad_checkpoint name of every adapter's rank-r product x·A


class UnsupportedOpError(NotImplementedError):
    """An adapted kernel reached an operation that has no LoRA rule."""


@dataclasses.dataclass(frozen=True)
class Tag:
    role: str  # 's' stack (in A and B), 'i' input (A), 'o' output (B), 'u' inserted unit axis
    idx: int = 0


@dataclasses.dataclass
class LoraValue:
    """One adapted kernel, as seen at some point of the program (internal, per call)."""

    w0: Any
    a: jax.Array
    b: jax.Array
    tags: tuple[Tag, ...]
    scale: float
    dropout: float
    path: str

    # -- bookkeeping -------------------------------------------------------------------------
    @property
    def ns(self) -> int:
        return sum(t.role == "s" for t in self.tags)

    @property
    def dtype(self):
        return self.w0.dtype

    def dense(self) -> jax.Array:
        """The frozen base view as an array (dequantizing a quantized base here, per use)."""
        return dense(self.w0)

    def with_(self, **kw) -> "LoraValue":
        return dataclasses.replace(self, **kw)

    def materialize(self) -> jax.Array:
        """``w0 + s·ΔW`` in the view's layout (only for the opt-in merge fallback and outputs)."""
        letters = iter(string.ascii_letters)
        view = [next(letters) for _ in self.tags]
        ns = self.ns
        slots = {"s": [None] * ns, "i": [None] * (self.a.ndim - ns - 1), "o": [None] * (self.b.ndim - ns - 1)}
        for t, c in zip(self.tags, view):
            if t.role in slots:  # unit axes have no factor axis
                slots[t.role][t.idx] = c
        s_l, i_l, o_l = slots["s"], slots["i"], slots["o"]
        out = "".join(c for t, c in zip(self.tags, view) if t.role != "u")
        d = jnp.einsum(f"{''.join(s_l)}{''.join(i_l)}Z,{''.join(s_l)}Z{''.join(o_l)}->{out}",
                       self.a.astype(jnp.float32), self.b.astype(jnp.float32),
                       precision=lax.Precision.HIGHEST)
        d = d.reshape(tuple(1 if t.role == "u" else n for t, n in zip(self.tags, self.w0.shape)))
        w0 = self.dense()
        return (w0.astype(jnp.float32) + self.scale * d).astype(w0.dtype)

    # -- canonical forms -----------------------------------------------------------------------
    def ordered(self) -> "LoraValue":
        """Reorder A's and B's axes so that each role's axes follow the view's order."""
        ns = self.ns
        order = {r: [t.idx for t in self.tags if t.role == r] for r in "sio"}
        a_perm = order["s"] + [ns + k for k in order["i"]] + [self.a.ndim - 1]
        b_perm = order["s"] + [ns] + [ns + 1 + k for k in order["o"]]
        count = {r: 0 for r in "siou"}
        tags = []
        for t in self.tags:
            tags.append(Tag(t.role, count[t.role]))
            count[t.role] += 1
        return self.with_(a=_transpose(self.a, a_perm), b=_transpose(self.b, b_perm), tags=tuple(tags))

    def stack_first(self) -> "LoraValue":
        """Make view axis 0 (a stack axis) the leading axis of A and B too."""
        t0 = self.tags[0]
        if t0.role != "s":
            raise UnsupportedOpError(
                f"Kernel '{self.path}' is sliced along its axis 0, which is not a stacked-layer axis "
                f"(it is an {'input' if t0.role == 'i' else 'output'} axis of the adapter)."
            )
        return self.ordered()  # the first 's' in view order becomes A/B axis 0


def _transpose(x, perm):
    perm = list(perm)
    return x if perm == list(range(x.ndim)) else jnp.transpose(x, perm)


# -- per-call context: merge fallback, dropout keys --------------------------------------------------


@dataclasses.dataclass
class Context:
    fallback: str | None = None
    rng: jax.Array | None = None
    counter: int = 0
    fuse: bool = False  # one x·[A_1 … A_n] for adapted kernels that share an input
    shared: dict = dataclasses.field(default_factory=dict)  # id(eqn) -> precomputed x·A
    fused_matmul: bool = False  # the epilogue-fused Hopper kernel where it applies
    in_loop: bool = False  # inside a scan/while body
    fused_log: list = dataclasses.field(default_factory=list)  # (kernel path, None | why not fused)

    def next_key(self):
        self.counter += 1
        return jax.random.fold_in(self.rng, self.counter)

    def child(self, rng, *, in_loop: bool = False) -> "Context":
        return Context(self.fallback, rng, 0, self.fuse, fused_matmul=self.fused_matmul,
                       in_loop=self.in_loop or in_loop, fused_log=self.fused_log)

    def loop_body(self, rng) -> "Context":
        """The context of a scan/while body. The fused Hopper kernel stays off there: inside
        lax.scan it measured slower than XLA's own matmuls on the H200 (benchmarks/RESULTS.md)."""
        return self.child(rng, in_loop=True)


def _dropout(x, rate: float, ctx: Context):
    if rate <= 0.0 or ctx.rng is None:
        return x
    keep = jax.random.bernoulli(ctx.next_key(), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)


# -- the interpreter -----------------------------------------------------------------------------------


def eval_jaxpr(jaxpr, consts, args, ctx: Context) -> list[Any]:
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if C.is_literal(v) else env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    groups = _shared_input_groups(jaxpr) if ctx.fuse else {}
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if any(isinstance(x, LoraValue) for x in invals):
            if id(eqn) in groups and id(eqn) not in ctx.shared:
                _fuse_shared_input(groups[id(eqn)], env, ctx)
            outs = _apply_rule(eqn, invals, ctx)
        else:
            outs = C.bind(eqn, invals)
        for v, o in zip(eqn.outvars, outs):
            if not C.is_dropvar(v):
                env[v] = o
    return [read(v) for v in jaxpr.outvars]


def _shared_input_groups(jaxpr) -> dict[int, list]:
    """dot_general equations whose lhs is the same variable, with the same contraction."""
    by_x: dict[Any, list] = {}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and not C.is_literal(eqn.invars[0]) \
                and not C.is_literal(eqn.invars[1]):
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            key = (eqn.invars[0], tuple(lc), tuple(rc), tuple(lb), tuple(rb), str(eqn.params.get("precision")))
            by_x.setdefault(key, []).append(eqn)
    return {id(e): g for g in by_x.values() if len(g) > 1 for e in g}


def _is_matrix_on_input(k, contracted) -> bool:
    """``k`` is a plain 2-D (in, out) kernel view, no stack or unit axes, contracted on its input
    axis alone: the form both matmul fast paths (shared-input fusion, the fused kernel) take."""
    return (isinstance(k, LoraValue) and len(contracted) == 1 and k.ns == 0
            and sorted(t.role for t in k.tags) == ["i", "o"] and k.tags[contracted[0]].role == "i")


def _fuse_shared_input(group, env, ctx: Context) -> None:
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
    members = []
    for e in group:
        k = env.get(e.invars[1])
        if _is_matrix_on_input(k, rc) and not (k.dropout > 0 and ctx.rng is not None):
            members.append((e, k))
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


def _apply_rule(eqn, invals, ctx: Context):
    name = eqn.primitive.name
    rule = _RULES.get(name)
    if rule is None:
        for group, r in _GROUP_RULES:
            if name in group:
                rule = r
                break
    if rule is not None:
        try:
            with C.source_context(eqn):
                return rule(eqn, invals, ctx)
        except _NoRule as e:
            reason = str(e)
    else:
        reason = "it has no LoRA rule"
    return _fallback(eqn, invals, ctx, reason)


class _NoRule(Exception):
    pass


def _fallback(eqn, invals, ctx: Context, reason: str):
    kernels = [x.path for x in invals if isinstance(x, LoraValue)]
    if ctx.fallback == "merge":
        vals = [x.materialize() if isinstance(x, LoraValue) else x for x in invals]
        return C.bind(eqn, vals)
    raise UnsupportedOpError(
        f"Adapted kernel {', '.join(repr(k) for k in kernels)} reaches `{eqn.primitive.name}` at "
        f"{C.where(eqn)}, but {reason}. jlora computes LoRA unmerged through matmuls "
        f"(dot_general), convolutions, gathers and the reshapes/transposes/slices between them. "
        f"Leave this kernel out of `targets`, or pass `fallback='merge'` to inject to compute this "
        f"op with W0 + s·A·B materialised."
    )


# -- view rules --------------------------------------------------------------------------------------


def _unary_w0(fn):
    def rule(eqn, invals, ctx):
        x = invals[0]
        if len(invals) != 1:
            raise _NoRule("it takes the kernel together with other operands")
        return [x.with_(w0=fn(x.dense(), eqn.params))]

    return rule


def _convert(eqn, invals, ctx):
    x, dt = invals[0], eqn.params["new_dtype"]
    # a quantized base stays quantized: it is dequantized (to dt) only where it is computed with
    return [x.with_(w0=x.w0.with_dtype(dt) if is_quantized(x.w0) else x.w0.astype(dt))]


def _base_product(k: "LoraValue", f):
    """``f(W0)``: the frozen model's own product with the kernel. A quantized base is dequantized
    inside a ``jax.checkpoint`` that saves nothing, so the backward keeps the stored codes and
    dequantizes again, never a dense copy of the kernel (QLoRA's memory saving, in training too)."""
    if not is_quantized(k.w0):
        return f(k.w0)
    return jax.checkpoint(lambda w: f(dense(w)), policy=jax.checkpoint_policies.nothing_saveable)(k.w0)


def _transpose_rule(eqn, invals, ctx):
    x = invals[0]
    perm = eqn.params["permutation"]
    return [x.with_(w0=jnp.transpose(x.dense(), perm), tags=tuple(x.tags[k] for k in perm))]


def _factor_axis(x: LoraValue, tag: Tag) -> list[tuple[str, int]]:
    """Which factor axes (('a'|'b', axis)) correspond to a view axis."""
    ns = x.ns
    if tag.role == "s":
        return [("a", tag.idx), ("b", tag.idx)]
    if tag.role == "i":
        return [("a", ns + tag.idx)]
    if tag.role == "o":
        return [("b", ns + 1 + tag.idx)]
    return []


def _on_factors(x: LoraValue, view_axis: int, fn) -> LoraValue:
    fa = {"a": x.a, "b": x.b}
    for which, ax in _factor_axis(x, x.tags[view_axis]):
        fa[which] = fn(fa[which], ax)
    return x.with_(a=fa["a"], b=fa["b"])


def _slice_rule(eqn, invals, ctx):
    x = invals[0]
    p = eqn.params
    strides = p["strides"] or (1,) * len(x.tags)
    w0 = lax.slice(x.dense(), p["start_indices"], p["limit_indices"], p["strides"])
    out = x.with_(w0=w0)
    for ax, (s, l, st) in enumerate(zip(p["start_indices"], p["limit_indices"], strides)):
        if (s, l, st) != (0, x.w0.shape[ax], 1):
            out = _on_factors(out, ax, lambda f, a, s=s, l=l, st=st: lax.slice_in_dim(f, s, l, st, axis=a))
    return [out]


def _dynamic_slice_rule(eqn, invals, ctx):
    x, *starts = invals
    if any(isinstance(s, LoraValue) for s in starts):
        raise _NoRule("a kernel is used as an index")
    sizes = eqn.params["slice_sizes"]
    w0 = lax.dynamic_slice(x.dense(), starts, sizes)
    out = x.with_(w0=w0)
    for ax, (s, n) in enumerate(zip(starts, sizes)):
        if n != x.w0.shape[ax]:
            out = _on_factors(out, ax, lambda f, a, s=s, n=n: lax.dynamic_slice_in_dim(f, s, n, axis=a))
    return [out]


def _renumber(tags) -> tuple[Tag, ...]:
    """Number each role's axes in view order (valid once the factors are ``ordered()``)."""
    count = {"s": 0, "i": 0, "o": 0, "u": 0}
    out = []
    for t in tags:
        out.append(Tag(t.role, count[t.role]))
        count[t.role] += 1
    return tuple(out)


def _squeeze_rule(eqn, invals, ctx):
    x = invals[0].ordered()
    nd = len(x.tags)
    dims = sorted({d % nd for d in eqn.params["dimensions"]})
    gone = {"a": [], "b": []}
    for d in dims:
        for which, ax in _factor_axis(x, x.tags[d]):
            gone[which].append(ax)
    a = jnp.squeeze(x.a, tuple(gone["a"])) if gone["a"] else x.a
    b = jnp.squeeze(x.b, tuple(gone["b"])) if gone["b"] else x.b
    tags = _renumber([t for k, t in enumerate(x.tags) if k not in dims])
    return [x.with_(w0=lax.squeeze(x.dense(), dims), a=a, b=b, tags=tags)]


def _reshape_rule(eqn, invals, ctx):
    x = invals[0]
    if len(invals) != 1 or eqn.params.get("dimensions") is not None:
        raise _NoRule("it is a dynamic or transposing reshape")
    old = tuple(x.w0.shape)
    new = tuple(eqn.params["new_sizes"])
    groups = reshape_groups(old, new)
    if groups is None:
        raise _NoRule(f"the reshape {old} -> {new} is not a merge or split of contiguous axes")
    x = x.ordered()
    new_roles = ["u"] * len(new)
    for go, gn in groups:
        roles = {x.tags[k].role for k in go} - {"u"}
        if len(roles) > 1:
            raise _NoRule(f"the reshape {old} -> {new} merges kernel axes of different roles")
        for k in gn:
            new_roles[k] = roles.pop() if roles else "u"
            roles = {new_roles[k]} - {"u"}
    sizes = {r: tuple(n for n, rr in zip(new, new_roles) if rr == r) for r in "sio"}
    rank = x.a.shape[-1]
    a = x.a.reshape(sizes["s"] + sizes["i"] + (rank,))
    b = x.b.reshape(sizes["s"] + (rank,) + sizes["o"])
    tags = _renumber([Tag(r) for r in new_roles])
    return [x.with_(w0=jnp.reshape(x.dense(), new), a=a, b=b, tags=tags)]


def _broadcast_rule(eqn, invals, ctx):
    x = invals[0]
    shape, bd = tuple(eqn.params["shape"]), tuple(eqn.params["broadcast_dimensions"])
    old = tuple(x.w0.shape)
    if len(invals) != 1 or not (
        all(shape[d] == old[k] for k, d in enumerate(bd))
        and all(shape[k] == 1 for k in range(len(shape)) if k not in bd)
    ):
        raise _NoRule("it broadcasts the kernel (only inserting unit axes has a LoRA rule)")
    tags = [Tag("u")] * len(shape)
    for k, d in enumerate(bd):
        tags[d] = x.tags[k]
    return [x.with_(w0=jnp.reshape(x.dense(), shape), tags=tuple(tags))]


def _rev_rule(eqn, invals, ctx):
    x = invals[0]
    dims = eqn.params["dimensions"]
    out = x.with_(w0=lax.rev(x.dense(), dims))
    for ax in dims:
        out = _on_factors(out, ax, lambda f, a: lax.rev(f, (a,)))
    return [out]


def _sharding_rule(eqn, invals, ctx):
    x = invals[0]
    # A and B follow the kernel: its spec on their stack/input (A) and stack/output (B) axes.
    a, b = constrain_factors(eqn, x.a, x.b, [(t.role, t.idx) for t in x.tags])
    return [x.with_(w0=C.bind(eqn, [x.dense()])[0], a=a, b=b)]


# -- compute rules -----------------------------------------------------------------------------------


def _letters():
    return iter(string.ascii_letters)


def _lora_dot(x, k: LoraValue, kc, kb, xc, xb, x_is_lhs: bool, ctx: Context, precision, pref, like=None,
              pre=None):
    """``s·(x·A)·B`` (or ``s·(x·Bᵀ)·Aᵀ``) laid out exactly as ``dot_general``'s output."""
    roles = {k.tags[a].role for a in kc} - {"u"}
    n_role = lambda r: sum(t.role == r for t in k.tags)
    if roles == {"i"} and sum(k.tags[a].role == "i" for a in kc) == n_role("i"):
        first, second, c_role, f_role = k.a, k.b, "i", "o"
    elif roles == {"o"} and sum(k.tags[a].role == "o" for a in kc) == n_role("o"):
        first, second, c_role, f_role = k.b, k.a, "o", "i"
    else:
        raise _NoRule(
            "its contraction is neither exactly the adapter's input axes nor exactly its output axes"
        )
    if any(k.tags[a].role == "s" for a in kc):
        raise _NoRule("it contracts a stacked-layer axis")
    if any(k.tags[a].role == f_role for a in kb):
        raise _NoRule("it batches over a non-stack kernel axis")

    L = _letters()
    k_l = [next(L) for _ in k.tags]
    x_l = [None] * x.ndim
    for xa, ka in zip(xc, kc):
        x_l[xa] = k_l[ka]
    for xa, ka in zip(xb, kb):
        x_l[xa] = k_l[ka]
    for i in range(x.ndim):
        if x_l[i] is None:
            x_l[i] = next(L)
    R = next(L)
    ns = k.ns
    s_l = [None] * ns
    role_l = {"i": [None] * (k.a.ndim - ns - 1), "o": [None] * (k.b.ndim - ns - 1)}
    for t, c in zip(k.tags, k_l):
        if t.role == "s":
            s_l[t.idx] = c
        elif t.role in "io":
            role_l[t.role][t.idx] = c
    a_l = "".join(s_l) + "".join(role_l["i"]) + R
    b_l = "".join(s_l) + R + "".join(role_l["o"])
    first_l, second_l = (a_l, b_l) if c_role == "i" else (b_l, a_l)

    # dot_general output: batch dims, then lhs free, then rhs free.
    k_free = [a for a in range(len(k.tags)) if a not in kc and a not in kb]
    x_free = [a for a in range(x.ndim) if a not in xc and a not in xb]
    batch_l = [k_l[a] for a in kb]
    xf_l, kf_l = [x_l[a] for a in x_free], [k_l[a] for a in k_free]
    out_l = batch_l + (xf_l + kf_l if x_is_lhs else kf_l + xf_l)
    # unit axes of the kernel carry no factor axis: drop them from the einsum, re-insert after
    unit_free = {k_l[a] for a in k_free if k.tags[a].role == "u"}
    x_unit = [i for i in range(x.ndim) if x_l[i] in {k_l[a] for a in kc if k.tags[a].role == "u"}]
    if x_unit:
        x = jnp.sum(x, axis=tuple(x_unit))  # contraction over a unit axis: a squeeze
        x_l = [c for i, c in enumerate(x_l) if i not in x_unit]
    t_l = [c for c in x_l if c not in first_l or c in s_l] + [c for c in s_l if c not in x_l] + [R]
    t_l = list(dict.fromkeys(t_l))
    dtype = k.dtype
    x = _dropout(x, k.dropout, ctx)
    y_l = [c for c in out_l if c not in unit_free]
    # explicit sharding mode: say where the rank-r products live (else XLA propagates shardings)
    xs, fs, ss = explicit_entries(x), explicit_entries(first), explicit_entries(second)
    t_kw = y_kw = {}
    if xs is not None or fs is not None or ss is not None:
        t_spec = product_spec(t_l, [(x_l, xs), (first_l, fs)])
        t_kw = {"out_sharding": t_spec}
        base = explicit_entries(like) if like is not None else None
        y_kw = {"out_sharding": PartitionSpec(*[e for c, e in zip(out_l, base) if c not in unit_free])
                if base is not None else product_spec(y_l, [(t_l, list(t_spec)), (second_l, ss)])}
    if pre is not None:  # x·A computed once for all kernels sharing this input
        t = pre
    else:
        t = jnp.einsum(f"{''.join(x_l)},{first_l}->{''.join(t_l)}", x, first.astype(dtype),
                       precision=precision, preferred_element_type=dtype, **t_kw)
    t = checkpoint_name(t, XA_NAME)  # the rank-r product: a remat policy can keep it by this name
    if k.scale != 1.0:
        t = t * jnp.asarray(k.scale, dtype)
    y = jnp.einsum(f"{''.join(t_l)},{second_l}->{''.join(y_l)}", t, second.astype(dtype),
                   precision=precision, preferred_element_type=pref, **y_kw)
    if unit_free:
        y = jnp.reshape(y, tuple(1 if c in unit_free else d for c, d in zip(out_l, _expand(y.shape, out_l, unit_free))))
    return y


def _expand(shape, out_l, unit):
    it = iter(shape)
    return [1 if c in unit else next(it) for c in out_l]


def _fused_dot(x, k: LoraValue, p, ctx: Context):
    """``(x @ W, None)`` for a plain 2-D adapted kernel through :func:`jlora._fused.lora_matmul`, or
    ``(None, why not)`` where that path does not apply (then the general rule runs)."""
    from jlora import _fused

    if ctx.in_loop:
        return None, "inside a lax.scan/while body (measured slower there)"
    (xc, kc), (xb, kb) = p["dimension_numbers"]
    if xb or kb or tuple(xc) != (x.ndim - 1,) or not _is_matrix_on_input(k, kc):
        return None, "not a plain x @ W of a 2-D kernel"
    if k.dropout > 0 and ctx.rng is not None:
        return None, "adapter dropout is on"
    if is_quantized(k.w0):
        return None, "quantized base"
    pet = p.get("preferred_element_type")
    if x.dtype != k.dtype or (pet is not None and jnp.dtype(pet) != x.dtype):
        return None, f"mixed dtypes (x {x.dtype}, kernel {k.dtype}, result {pet})"
    prec = p.get("precision")
    if prec is not None and any(q not in (None, lax.Precision.DEFAULT) for q in
                                (prec if isinstance(prec, tuple) else (prec,))):
        return None, f"precision {prec}"
    if any(explicit_entries(t) is not None for t in (x, k.w0, k.a, k.b)):
        return None, "sharded (explicit mesh axes)"
    why = _fused.unavailable()
    if why:
        return None, why
    w0 = k.w0 if kc[0] == 0 else k.w0.T
    m, (kk, n) = int(np.prod(x.shape[:-1])), w0.shape
    if not _fused.supported(m, kk, n, x.dtype):
        t = _fused.DEFAULT_TILES
        return None, (f"{x.dtype} ({m}, {kk}) @ ({kk}, {n}): the kernel takes bf16/f16 with M a multiple "
                      f"of {t.tile_m} and K, N multiples of {2 * t.tile_n}")
    return _fused.lora_matmul(x, w0, k.a, k.b, scale=k.scale, impl="mosaic"), None


def _dot_rule(eqn, invals, ctx):
    lhs, rhs = invals
    p = eqn.params
    if isinstance(lhs, LoraValue) and isinstance(rhs, LoraValue):
        raise _NoRule("both operands are adapted kernels")
    if ctx.fused_matmul and isinstance(rhs, LoraValue):
        y, why = _fused_dot(lhs, rhs, p, ctx)
        ctx.fused_log.append((rhs.path, why))
        if y is not None:
            return [y]
    (lc, rc), (lb, rb) = p["dimension_numbers"]
    if isinstance(rhs, LoraValue):
        k, x, kc, kb, xc, xb, x_is_lhs = rhs, lhs, rc, rb, lc, lb, True
        base = _base_product(rhs, lambda w: C.bind(eqn, [lhs, w])[0])
    else:
        k, x, kc, kb, xc, xb, x_is_lhs = lhs, rhs, lc, lb, rc, rb, False
        base = _base_product(lhs, lambda w: C.bind(eqn, [w, rhs])[0])
    pre = ctx.shared.pop(id(eqn), None) if x_is_lhs else None
    y = _lora_dot(x, k, kc, kb, xc, xb, x_is_lhs, ctx, p.get("precision"), base.dtype, like=base, pre=pre)
    return [base + y.astype(base.dtype)]


def _conv_rule(eqn, invals, ctx):
    x, k = invals
    p = eqn.params
    if isinstance(x, LoraValue) or not isinstance(k, LoraValue):
        raise _NoRule("the adapted kernel is the convolution's input, not its kernel")
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        raise _NoRule("grouped or depthwise convolutions have no LoRA rule")
    dn = p["dimension_numbers"]
    o_ax = dn.rhs_spec[0]
    if k.tags[o_ax].role != "o" or sum(t.role == "o" for t in k.tags) != 1 or k.ns:
        raise _NoRule("its output-feature axis is not the adapter's only output axis")
    if any(t.role not in "iu" for a, t in enumerate(k.tags) if a != o_ax):
        raise _NoRule("its input/spatial axes are not the adapter's input axes")
    base = _base_product(k, lambda w: C.bind(eqn, [x, w])[0])
    dtype = k.dtype
    r = k.a.shape[-1]
    n_i = k.a.ndim - 1
    # A as a convolution kernel: the view's layout with the output feature axis replaced by r.
    perm, shape = [], []
    for ax, t in enumerate(k.tags):
        if ax == o_ax:
            perm.append(n_i)
            shape.append(r)
        elif t.role == "i":
            perm.append(t.idx)
            shape.append(k.a.shape[t.idx])
        else:  # unit axis
            shape.append(1)
    a_conv = jnp.reshape(jnp.transpose(k.a, perm), shape).astype(dtype)
    params = dict(p)
    params["preferred_element_type"] = dtype
    xd = _dropout(x, k.dropout, ctx)
    (t,) = C.bind_with(eqn.primitive, params, xd, a_conv)
    f = dn.out_spec[1]
    t = t * jnp.asarray(k.scale, dtype)
    y = jnp.tensordot(t, k.b.astype(dtype), axes=([f], [0]))
    y = jnp.moveaxis(y, -1, f)
    return [base + y.astype(base.dtype)]


def _gather_rule(eqn, invals, ctx):
    k, idx = invals[0], invals[1]
    if isinstance(idx, LoraValue) or len(k.tags) != 2 or k.ns or any(t.role == "u" for t in k.tags):
        raise _NoRule("only gathering rows or columns of a 2-D kernel has a LoRA rule")
    p = eqn.params
    dn = p["dimension_numbers"]
    g, why = gather_form(dn, p["slice_sizes"], tuple(k.w0.shape))
    if g is None:
        raise _NoRule(why)
    other = 1 - g
    base = _base_product(k, lambda w: C.bind(eqn, [w, idx])[0])
    dtype = k.dtype
    # F1: the factor holding the gathered axis, laid out like the view with `other` replaced by r.
    if k.tags[g].role == "o":
        f1 = k.b.T  # (out, r)
        f2 = k.a.T  # (r, in)
    else:
        f1 = k.a  # (in, r)
        f2 = k.b  # (r, out)
    if g == 1:
        f1 = f1.T
    r = k.a.shape[-1]
    sizes = list(p["slice_sizes"])
    sizes[other] = r
    params = dict(p)
    params["slice_sizes"] = tuple(sizes)
    (t,) = C.bind_with(eqn.primitive, params, f1.astype(dtype), idx)
    od = dn.offset_dims[0]
    t = t * jnp.asarray(k.scale, dtype)
    y = jnp.moveaxis(jnp.tensordot(t, f2.astype(dtype), axes=([od], [0])), -1, od)
    return [base + y.astype(base.dtype)]


# -- higher-order primitives ---------------------------------------------------------------------------


def _flatten_vals(vals):
    """Split values into a flat list of arrays and a function that rebuilds them."""
    flat, specs = [], []
    for v in vals:
        if isinstance(v, LoraValue):
            specs.append(("L", v))
            flat.extend([v.w0, v.a, v.b])
        else:
            specs.append(("A", None))
            flat.append(v)

    def rebuild(arrs):
        out, it = [], iter(arrs)
        for kind, proto in specs:
            if kind == "L":
                w0, a, b = next(it), next(it), next(it)
                out.append(proto.with_(w0=w0, a=a, b=b))
            else:
                out.append(next(it))
        return out

    return flat, rebuild


def _inline_rule(eqn, invals, ctx):
    jaxpr, consts = C.inner_jaxpr(eqn)
    sub = ctx.child(ctx.next_key()) if ctx.rng is not None else ctx
    return [_out(v) for v in eval_jaxpr(jaxpr, consts, invals, sub)]


def _out(v):
    return v.materialize() if isinstance(v, LoraValue) else v


def _remat_rule(eqn, invals, ctx):
    jaxpr, consts = C.inner_jaxpr(eqn)
    p = eqn.params
    flat, rebuild = _flatten_vals(invals)
    rng = ctx.next_key() if ctx.rng is not None else None

    def body(rng, *arrs):
        sub = ctx.child(rng)
        return [_out(v) for v in eval_jaxpr(jaxpr, consts, rebuild(arrs), sub)]

    fn = jax.checkpoint(body, prevent_cse=p.get("prevent_cse", True), policy=p.get("policy"))
    return list(fn(rng, *flat))


def _passthrough_carries(jaxpr, carry_in_pos, carry_out_pos):
    """Carry slots whose body output is the very input variable (a loop-invariant carry)."""
    same = set()
    for k, (i, o) in enumerate(zip(carry_in_pos, carry_out_pos)):
        if jaxpr.outvars[o] is jaxpr.invars[i]:
            same.add(k)
    return same


def _scan_rule(eqn, invals, ctx):
    p = eqn.params
    jaxpr, jconsts = C.closed_parts(p["jaxpr"])
    nc, nk = C.scan_counts(eqn)
    consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
    inv = _passthrough_carries(jaxpr, range(nc, nc + nk), range(nk))
    for k, c in enumerate(init):
        if isinstance(c, LoraValue) and k not in inv:
            raise _NoRule("an adapted kernel is a scan carry that the loop changes")
    xs_l = [x.stack_first() if isinstance(x, LoraValue) else x for x in xs]
    xs_flat, xs_rebuild = _flatten_vals(xs_l)
    carry_plain = [c for k, c in enumerate(init) if not isinstance(c, LoraValue)]
    length = C.scan_length(eqn)
    rngs = jax.random.split(ctx.next_key(), length) if ctx.rng is not None else None

    def sliced(v):  # the scan took view axis 0 (A/B's first stack axis) away
        if not isinstance(v, LoraValue):
            return v
        return v.with_(tags=tuple(Tag("s", t.idx - 1) if t.role == "s" else t for t in v.tags[1:]))

    def body(carry, x):
        arrs, key = x
        xv = [sliced(v) for v in xs_rebuild(arrs)]
        it = iter(carry)
        cv = [c if isinstance(c, LoraValue) else next(it) for c in init]
        sub = ctx.loop_body(key)
        outs = eval_jaxpr(jaxpr, jconsts, list(consts) + cv + xv, sub)
        new_carry = [o for k, o in enumerate(outs[:nk]) if not isinstance(init[k], LoraValue)]
        return new_carry, [_out(o) for o in outs[nk:]]

    carry_out, ys = lax.scan(body, carry_plain, (xs_flat, rngs), length=length,
                             reverse=p.get("reverse", False), unroll=p.get("unroll", 1))
    it = iter(carry_out)
    carry_vals = [c if isinstance(c, LoraValue) else next(it) for c in init]
    return carry_vals + list(ys)


def _while_rule(eqn, invals, ctx):
    p = eqn.params
    cj, cconsts = C.closed_parts(p["cond_jaxpr"])
    bj, bconsts = C.closed_parts(p["body_jaxpr"])
    nc, nb = C.while_counts(eqn)
    cond_c, body_c, init = invals[:nc], invals[nc:nc + nb], invals[nc + nb:]
    n = len(init)
    inv = _passthrough_carries(bj, range(nb, nb + n), range(n))
    for k, c in enumerate(init):
        if isinstance(c, LoraValue) and k not in inv:
            raise _NoRule("an adapted kernel is a loop carry that the loop changes")
    plain = [c for c in init if not isinstance(c, LoraValue)]
    key0 = ctx.next_key() if ctx.rng is not None else None

    def full(carry):
        it = iter(carry)
        return [c if isinstance(c, LoraValue) else next(it) for c in init]

    def cond_fun(state):
        carry, _ = state
        (out,) = eval_jaxpr(cj, cconsts, list(cond_c) + full(carry), ctx)
        return _out(out)

    def body_fun(state):
        carry, key = state
        sub_key = None
        if key is not None:
            key, sub_key = jax.random.split(key)
        outs = eval_jaxpr(bj, bconsts, list(body_c) + full(carry), ctx.loop_body(sub_key))
        return [_out(o) for k, o in enumerate(outs) if not isinstance(init[k], LoraValue)], key

    carry, _ = lax.while_loop(cond_fun, body_fun, (plain, key0))
    return full(carry)


def _cond_rule(eqn, invals, ctx):
    index, *ops = invals
    branches = eqn.params["branches"]
    flat, rebuild = _flatten_vals(ops)
    key = ctx.next_key() if ctx.rng is not None else None

    def make(br):
        j, consts = C.closed_parts(br)

        def f(key, *arrs):
            sub = ctx.child(key) if key is not None else ctx
            return [_out(o) for o in eval_jaxpr(j, consts, rebuild(arrs), sub)]

        return f

    return list(lax.switch(index, [make(b) for b in branches], key, *flat))


_RULES: dict[str, Callable] = {
    "convert_element_type": _convert,
    "copy": _unary_w0(lambda w, p: w),
    "copy_p": _unary_w0(lambda w, p: w),
    "transpose": _transpose_rule,
    "reshape": _reshape_rule,
    "squeeze": _squeeze_rule,
    "broadcast_in_dim": _broadcast_rule,
    "slice": _slice_rule,
    "dynamic_slice": _dynamic_slice_rule,
    "rev": _rev_rule,
    "sharding_constraint": _sharding_rule,
    "reshard": _sharding_rule,
    "dot_general": _dot_rule,
    "conv_general_dilated": _conv_rule,
    "gather": _gather_rule,
    C.SCAN: _scan_rule,
    C.WHILE: _while_rule,
    C.COND: _cond_rule,
}
_GROUP_RULES = [
    (C.JIT, _inline_rule),
    (C.CUSTOM_JVP, _inline_rule),
    (C.CUSTOM_VJP, _inline_rule),
    (C.REMAT, _remat_rule),
]
