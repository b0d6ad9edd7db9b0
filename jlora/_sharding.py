"""Where A and B live on a mesh: they follow the sharding of the kernel they adapt.

For a kernel ``W0`` with a :class:`~jax.sharding.NamedSharding` and a :class:`~jlora.Layout`:

- ``A`` (stack..., in..., r) takes ``W0``'s mesh axes of its stack and input axes;
- ``B`` (stack..., r, out...) takes ``W0``'s mesh axes of its stack and output axes;
- the rank axis is replicated (r is tiny; splitting it would only add collectives).

So an FSDP kernel (rows over ``'fsdp'``) gets an FSDP ``A`` and a replicated ``B``; a
column-parallel kernel (columns over ``'tp'``) gets a replicated ``A`` and a column-parallel ``B``;
a row-parallel one the reverse; a scanned stack keeps its layer-axis sharding on both. Every
device then holds ``1/n`` of each factor along the same axes as its slice of ``W0``, which is what
the unmerged path ``(x·A)·B`` needs next to ``x·W0`` — no gather of the base is ever introduced.

``inject`` creates A and B already sharded (:func:`init_factors`: built under ``jax.jit`` with
``out_shardings``, so no device holds a full factor on the way); ``apply`` constrains A and B with
the derived specs wherever the program constrains the kernel (:func:`constrain_factors`); a
checkpoint restore places them next to the base it is loaded over (:func:`place_factors`).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from jlora import _compat as jax_compat
from jlora._node import Layout, LoraKernel, is_node
from jlora._value import Tag, factor_positions, layout_tags

__all__ = [
    "adapter_specs",
    "adapter_shardings",
    "factor_specs",
    "init_factors",
    "place_factors",
    "place_like",
    "constrain_factors",
    "shard_adapters",
]


def _entries(spec: PartitionSpec, ndim: int) -> list[Any]:
    """``spec``'s per-axis entries padded with None to ``ndim`` axes."""
    entries = list(spec)
    if len(entries) > ndim:
        raise ValueError(f"PartitionSpec {spec} has more entries than the kernel has axes ({ndim}).")
    return entries + [None] * (ndim - len(entries))


def factor_specs(spec: PartitionSpec, tags: Sequence[Tag], *, a_ndim: int, b_ndim: int
                 ) -> tuple[PartitionSpec, PartitionSpec]:
    """A's and B's specs from the spec of a kernel *view* whose axes have the given tags.

    A view axis's mesh axes go to the factor axes behind it (:func:`jlora._value.factor_positions`):
    a stack axis to both factors, an input axis to A, an output axis to B, an inserted unit axis
    nowhere. The rank axis is replicated.

    Example:
        >>> from jax.sharding import PartitionSpec as P
        >>> from jlora._value import Role, Tag
        >>> a, b = factor_specs(P("tp", None), [Tag(Role.OUT), Tag(Role.IN)], a_ndim=2, b_ndim=2)
        >>> tuple(a), tuple(b)
        ((None, None), (None, 'tp'))
    """
    a: list[Any] = [None] * a_ndim
    b: list[Any] = [None] * b_ndim
    for (pa, pb), e in zip(factor_positions(tags), _entries(spec, len(tags))):
        if pa is not None:
            a[pa] = e
        if pb is not None:
            b[pb] = e
    return PartitionSpec(*a), PartitionSpec(*b)


def adapter_specs(spec: PartitionSpec, layout: Layout) -> tuple[PartitionSpec, PartitionSpec]:
    """A's and B's ``PartitionSpec`` for a kernel with ``spec`` and ``layout``.

    Example:
        >>> from jax.sharding import PartitionSpec as P
        >>> from jlora import Layout
        >>> a, b = adapter_specs(P("fsdp", "tp"), Layout(stack=(), in_=(0,), out=(1,)))
        >>> tuple(a), tuple(b)
        (('fsdp', None), (None, 'tp'))
        >>> a, b = adapter_specs(P("layers", None, "tp"), Layout(stack=(0,), in_=(1,), out=(2,)))
        >>> tuple(a), tuple(b)
        (('layers', None, None), ('layers', None, 'tp'))
    """
    ns = len(layout.stack)
    return factor_specs(spec, layout_tags(layout), a_ndim=ns + len(layout.in_) + 1, b_ndim=ns + 1 + len(layout.out))


def _replicated_like(sharding: Sharding) -> Sharding:
    """A fully replicated sharding over the same devices as ``sharding``."""
    devices = sorted(sharding.device_set, key=lambda d: d.id)
    if len(devices) == 1:
        return SingleDeviceSharding(devices[0], memory_kind=sharding.memory_kind)
    mesh = jax.sharding.Mesh(np.array(devices), ("replica",))
    return NamedSharding(mesh, PartitionSpec(), memory_kind=sharding.memory_kind)


def adapter_shardings(
    w0_sharding: Sharding, layout: Layout, ndim: int | None = None
) -> tuple[Sharding, Sharding]:
    """``(a_sharding, b_sharding)`` for the factors of a kernel placed with ``w0_sharding``.

    A :class:`~jax.sharding.NamedSharding` gives named shardings on the same mesh (and memory
    kind) by :func:`adapter_specs`. A single-device sharding gives that device. Any other sharding
    (no axis names to follow) gives A and B replicated over the same devices.

    Args:
      w0_sharding: the kernel's sharding (``w0.sharding``).
      layout: the kernel's layout.
      ndim: the kernel's number of axes (checked against ``layout``; defaults to ``layout.ndim``).

    Example:
        >>> import jax
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> from jlora import Layout
        >>> mesh = jax.sharding.Mesh(jax.devices()[:1], ("tp",))
        >>> a, b = adapter_shardings(NamedSharding(mesh, P(None, "tp")), Layout((), (0,), (1,)))
        >>> a.spec == P(None, None), b.spec == P(None, "tp")
        (True, True)
    """
    if ndim is not None and ndim != layout.ndim:
        raise ValueError(f"layout {layout} has {layout.ndim} axes, the kernel has {ndim}.")
    if isinstance(w0_sharding, NamedSharding):
        sa, sb = adapter_specs(w0_sharding.spec, layout)
        kw = {"memory_kind": w0_sharding.memory_kind}
        return NamedSharding(w0_sharding.mesh, sa, **kw), NamedSharding(w0_sharding.mesh, sb, **kw)
    if isinstance(w0_sharding, SingleDeviceSharding):
        return w0_sharding, w0_sharding
    rep = _replicated_like(w0_sharding)
    return rep, rep


def _concrete_sharding(w0: Any) -> Sharding | None:
    """``w0``'s sharding if it is a concrete array with a NamedSharding (a mesh, even of one device)
    or on several devices; None for a single-device array, a tracer or a non-array."""
    if jax_compat.is_tracer(w0) or not isinstance(w0, jax.Array):
        return None
    try:
        sharding = w0.sharding
    except Exception:  # deleted / donated arrays, exotic array types
        return None
    if isinstance(sharding, NamedSharding):
        return sharding
    if isinstance(sharding, SingleDeviceSharding) or len(sharding.device_set) <= 1:
        return None
    return sharding


# The initializer runs once per shape, so on CPU its compile time is what counts: XLA's HLO passes
# (sharding included) run as usual, only LLVM's optimization is skipped (threefry compiles ~4x faster).
_CPU_INIT_OPTIONS = {"xla_backend_optimization_level": 0}


@functools.lru_cache(maxsize=None)
def _init_fn(a_shape, b_shape, dtype, std, shardings, platform):
    """One compiled initializer per (shapes, dtype, std, placement): cheaper than eager ops."""

    def init(key):
        a = (jax.random.normal(key, a_shape, jnp.float32) * std).astype(dtype)
        return a, jnp.zeros(b_shape, dtype)

    if platform is None:  # inside a trace: inline it (compiler options are for top-level jits only)
        return init
    kw = {"compiler_options": _CPU_INIT_OPTIONS} if platform == "cpu" else {}
    if shardings is not None:
        kw["out_shardings"] = shardings
    return jax.jit(init, **kw)


def init_factors(
    key: jax.Array, w0: Any, layout: Layout, rank: int, dtype: Any, std: float
) -> tuple[jax.Array, jax.Array]:
    """LoRA's initial ``A ~ N(0, std²)`` and ``B = 0``, placed like ``w0``.

    The values do not depend on the placement (JAX's partitionable threefry), so sharded and
    unsharded injection give the same adapters. A kernel on several devices gets factors built
    directly with :func:`adapter_shardings` (no device holds a full factor); inside a trace with
    explicitly sharded types, the factors are resharded to the derived specs.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jlora import Layout
        >>> a, b = init_factors(jax.random.key(0), jnp.ones((4, 3)), Layout((), (0,), (1,)), 2,
        ...                     jnp.float32, 0.5)
        >>> a.shape, b.shape, float(jnp.abs(b).sum())
        ((4, 2), (2, 3), 0.0)
    """
    shape = tuple(w0.shape)
    a_shape, b_shape = layout.a_shape(shape, rank), layout.b_shape(shape, rank)
    sharding = _concrete_sharding(w0)
    shardings = None if sharding is None else adapter_shardings(sharding, layout, len(shape))
    if jax_compat.is_tracer(w0) or jax_compat.is_tracer(key):
        platform = None
    elif sharding is not None:
        platform = next(iter(sharding.device_set)).platform
    else:
        platform = jax.default_backend()
    a, b = _init_fn(a_shape, b_shape, jnp.dtype(dtype), float(std), shardings, platform)(key)
    traced = _explicit_sharding(w0) if jax_compat.is_tracer(w0) else None
    if traced is not None and any(e is not None for e in traced.spec):
        sa, sb = adapter_shardings(traced, layout, len(shape))
        a, b = jax.sharding.reshard(a, sa), jax.sharding.reshard(b, sb)
    return a, b


def place_factors(w0: Any, layout: Layout, a: Any, b: Any) -> tuple[Any, Any]:
    """``a`` and ``b`` moved to the shardings derived from ``w0``'s (unchanged if ``w0`` is on
    one device, abstract, or not an array). Used when adapters are loaded over a sharded base.

    Example:
        >>> import jax.numpy as jnp
        >>> from jlora import Layout
        >>> a, b = place_factors(jnp.ones((4, 3)), Layout((), (0,), (1,)), jnp.ones((4, 2)), jnp.ones((2, 3)))
        >>> a.shape
        (4, 2)
    """
    sharding = _concrete_sharding(w0)
    if sharding is None:
        return a, b
    sa, sb = adapter_shardings(sharding, layout, len(w0.shape))
    return jax.device_put(a, sa), jax.device_put(b, sb)


def place_magnitude(w0: Any, layout: Layout, m: Any) -> Any:
    """DoRA's magnitude ``m`` (``(stack..., out...)``, B's axes without the rank axis) moved to the
    sharding of B's axes it shares (unchanged if ``w0`` is on one device, abstract, or not an array).

    Example:
        >>> import jax.numpy as jnp
        >>> from jlora import Layout
        >>> place_magnitude(jnp.ones((4, 3)), Layout((), (0,), (1,)), jnp.ones((3,))).shape
        (3,)
    """
    sharding = _concrete_sharding(w0)
    if sharding is None or m is None:
        return m
    if isinstance(sharding, NamedSharding):  # the kernel's entries on its stack and output axes, as Layout.m_shape
        e = _entries(sharding.spec, len(w0.shape))
        return jax.device_put(m, _named_with(sharding, PartitionSpec(*(e[i] for i in (*layout.stack, *layout.out)))))
    return jax.device_put(m, adapter_shardings(sharding, layout, len(w0.shape))[1])  # one device, or replicated


def place_like(ref: Any, x: Any) -> Any:
    """``x`` put on ``ref``'s sharding when ``ref`` is a concrete array on several devices (a leaf
    trained in full, loaded over its sharded base leaf); else ``x`` unchanged."""
    sharding = _concrete_sharding(ref)
    return x if sharding is None else jax.device_put(x, sharding)


def shard_adapters(params: Any) -> Any:
    """Injected ``params`` with every A and B (and DoRA magnitude) moved next to its (sharded) base kernel.

    Use it after resharding the base (``jax.device_put(params, new_shardings)`` moves A and B
    wherever ``new_shardings`` says; this puts them back where they belong on the new mesh).

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> k = jlora.LoraKernel(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)),
        ...                      layout=jlora.Layout((), (0,), (1,)), scale=1.0)
        >>> shard_adapters({"w": k})["w"].a.shape
        (4, 2)
    """

    def one(x):
        if not isinstance(x, LoraKernel) or x.a is None or x.b is None:
            return x
        a, b = place_factors(x.w0, x.layout, x.a, x.b)
        a0, b0 = (None, None) if x.a0 is None else place_factors(x.w0, x.layout, x.a0, x.b0)
        return x.replace(a=a, b=b, a0=a0, b0=b0, m=place_magnitude(x.w0, x.layout, x.m))

    return jax.tree.map(one, params, is_leaf=is_node)


# -- inside apply's interpreter -----------------------------------------------------------------


def _named_with(sharding: NamedSharding, spec: PartitionSpec) -> NamedSharding:
    kw = {}
    memory_kind = getattr(sharding, "memory_kind", None)
    if memory_kind is not None:
        kw["memory_kind"] = memory_kind
    return NamedSharding(sharding.mesh, spec, **kw)


def constrain_factors(eqn, a: jax.Array, b: jax.Array, tags: Sequence[Tag]):
    """Apply to A and B the sharding op ``eqn`` applies to a kernel view with axis ``tags``.

    ``eqn`` is a ``sharding_constraint`` (``jax.lax.with_sharding_constraint``) or a ``reshard``
    (``jax.sharding.reshard``) equation on the kernel. The same primitive is applied to each factor
    with the derived spec (rank axis replicated; no memory layout, which belongs to the kernel's
    shape). A sharding that is not a NamedSharding leaves the factors unconstrained.
    """
    p = eqn.params
    key = "sharding" if "sharding" in p else "dst_sharding" if "dst_sharding" in p else None
    sharding = p.get(key) if key else None
    if not isinstance(sharding, NamedSharding):
        return a, b
    sa, sb = factor_specs(sharding.spec, tags, a_ndim=a.ndim, b_ndim=b.ndim)
    out = []
    for f, spec in ((a, sa), (b, sb)):
        params = dict(p)
        params[key] = _named_with(sharding, spec)
        if "layout" in params:
            params["layout"] = None
        if "unconstrained_dims" in params:
            params["unconstrained_dims"] = frozenset(
                k for k, e in enumerate(spec) if e is PartitionSpec.UNCONSTRAINED
            )
        with jax_compat.source_context(eqn):
            (g,) = jax_compat.bind_with(eqn.primitive, params, f)
        out.append(g)
    return out[0], out[1]


# -- explicit sharding mode (mesh axes in the types) --------------------------------------------


def _explicit_sharding(x: Any) -> NamedSharding | None:
    """The NamedSharding of ``x``'s type when its mesh has *Explicit* axes
    (``jax.sharding.AxisType.Explicit``, the default of ``jax.make_mesh`` on current JAX); None in
    JAX's automatic (propagation) mode, where XLA chooses the shardings, or on a JAX too old to say."""
    explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
    typeof = getattr(jax, "typeof", None)
    if explicit is None or typeof is None:
        return None
    try:
        sharding = typeof(x).sharding
    except Exception:  # not a JAX value
        return None
    if not isinstance(sharding, NamedSharding):
        return None
    if not any(t == explicit for t in getattr(sharding.mesh, "axis_types", ())):
        return None
    return sharding


def explicit_entries(x: Any) -> list[Any] | None:
    """Per-axis spec entries of ``x``'s type when it is sharded over *Explicit* mesh axes; None in
    JAX's automatic (propagation) mode (see :func:`_explicit_sharding`)."""
    sharding = _explicit_sharding(x)
    return None if sharding is None else _entries(sharding.spec, len(np.shape(x)))


def product_spec(out: Sequence[str], operands: Sequence[tuple[Sequence[str], list[Any] | None]]) -> PartitionSpec:
    """The spec of an einsum's output in explicit mode: each output axis takes the mesh axes of an
    operand axis with the same letter (first sharded one wins; each mesh axis used once), so
    contracted sharded axes are summed over their mesh axes and the rank axis stays replicated.

    Example:
        >>> tuple(product_spec("bR", [("bh", ["data", "model"]), ("hR", ["model", None])]))
        ('data', None)
    """
    used: set[Any] = set()
    entries = []
    for c in out:
        e = None
        for letters, spec in operands:
            if spec is not None and c in letters and spec[list(letters).index(c)] is not None:
                e = spec[list(letters).index(c)]
                break
        axes = set(e) if isinstance(e, tuple) else {e}
        if e is not None and (axes & used):
            e = None
        if e is not None:
            used |= axes
        entries.append(e)
    return PartitionSpec(*entries)
