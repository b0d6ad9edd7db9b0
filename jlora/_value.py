"""An adapted kernel as the interpreter sees it, and the bookkeeping of A's and B's axes.

Every axis of a kernel *view* (the kernel after whatever transposes, reshapes and slices the
program applied to it) has a :class:`Role`: a stacked-layer axis (in A and in B), an input axis
(in A), an output axis (in B), or an inserted unit axis (in neither). :func:`factor_positions`
and :func:`subscripts` turn a view's roles into A's and B's axes and einsum subscripts; every
place that pairs view axes with factor axes (``delta``, ``LoraValue.materialize``, the matmul
rule, the sharding specs) goes through them.
"""

from __future__ import annotations

import dataclasses
import enum
import string
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jlora._node import Layout
from jlora._quant import dequantized

__all__ = ["Role", "Tag", "Subscripts", "BankSlot", "LoraValue", "UnsupportedOpError", "delta", "factor_positions",
           "layout_tags", "subscripts"]


class UnsupportedOpError(NotImplementedError):
    """An adapted kernel reached an operation that has no LoRA rule."""


class Role(enum.Enum):
    """What a kernel-view axis is to the adapter."""

    STACK = "stack"  # a stacked-layer axis: in A and in B
    IN = "in"  # an input (contracted) axis: in A
    OUT = "out"  # an output (free) axis: in B
    UNIT = "unit"  # an inserted axis of size one: in neither


@dataclasses.dataclass(frozen=True)
class Tag:
    """The role of one view axis, and which of that role's factor axes it is."""

    role: Role
    idx: int = 0


def layout_tags(layout: Layout) -> tuple[Tag, ...]:
    """The tags of a whole kernel with ``layout`` (axis ``k`` of the kernel is view axis ``k``).

    Example:
        >>> [t.role.value for t in layout_tags(Layout(stack=(0,), in_=(2,), out=(1,)))]
        ['stack', 'out', 'in']
    """
    tags: list[Tag] = [Tag(Role.UNIT)] * layout.ndim
    for role, axes in ((Role.STACK, layout.stack), (Role.IN, layout.in_), (Role.OUT, layout.out)):
        for j, ax in enumerate(axes):
            tags[ax] = Tag(role, j)
    return tuple(tags)


def factor_positions(tags: Sequence[Tag]) -> list[tuple[int | None, int | None]]:
    """For each view axis, its axis in A and its axis in B (None where it has none).

    A is ``(stack..., in..., r)`` and B is ``(stack..., r, out...)``.

    Example:
        >>> factor_positions([Tag(Role.STACK, 0), Tag(Role.IN, 0), Tag(Role.OUT, 0), Tag(Role.UNIT)])
        [(0, 0), (1, None), (None, 2), (None, None)]
    """
    ns = sum(t.role is Role.STACK for t in tags)
    pos = {Role.STACK: lambda j: (j, j), Role.IN: lambda j: (ns + j, None),
           Role.OUT: lambda j: (None, ns + 1 + j), Role.UNIT: lambda j: (None, None)}
    return [pos[t.role](t.idx) for t in tags]


@dataclasses.dataclass(frozen=True)
class Subscripts:
    """Einsum subscripts of a kernel view (one letter per axis, unit axes included) and of its
    factors: ``a`` = stack + in + rank, ``b`` = stack + rank + out; ``stack`` = the stack letters."""

    view: str
    a: str
    b: str
    rank: str
    stack: str


def subscripts(tags: Sequence[Tag], letters: Iterator[str] | None = None) -> Subscripts:
    """The view's and the factors' einsum subscripts (letters drawn from ``letters``).

    Example:
        >>> s = subscripts([Tag(Role.OUT, 0), Tag(Role.STACK, 0), Tag(Role.IN, 0)])
        >>> s.view, s.a, s.b
        ('abc', 'bcd', 'bda')
    """
    letters = iter(string.ascii_letters) if letters is None else letters
    view = "".join(next(letters) for _ in tags)
    rank = next(letters)
    ns = sum(t.role is Role.STACK for t in tags)
    a, b = [""] * (ns + sum(t.role is Role.IN for t in tags) + 1), [""] * (ns + 1 + sum(t.role is Role.OUT for t in tags))
    a[-1], b[ns] = rank, rank
    for c, (pa, pb) in zip(view, factor_positions(tags)):
        if pa is not None:
            a[pa] = c
        if pb is not None:
            b[pb] = c
    return Subscripts(view, "".join(a), "".join(b), rank, "".join(a[:ns]))


def delta(a: jax.Array, b: jax.Array, layout: Layout, dtype: Any = jnp.float32) -> jax.Array:
    """``A·B`` in the kernel's own axis order (the full ΔW; only for merging and references).

    Example:
        >>> d = delta(jnp.ones((4, 2)), jnp.ones((2, 3)), Layout((), (1,), (0,)))
        >>> d.shape  # in_ is axis 1: the kernel is (out, in)
        (3, 4)
    """
    s = subscripts(layout_tags(layout))
    return jnp.einsum(f"{s.a},{s.b}->{s.view}", a.astype(dtype), b.astype(dtype), precision=lax.Precision.HIGHEST)


@dataclasses.dataclass(frozen=True)
class BankSlot:
    """One example of a mixed batch (inside ``jax.vmap``): which adapter of a bank it uses.

    The kernel's A and B then hold *all* ``n`` adapters of the bank side by side on their rank
    axis (``n·r`` wide, adapter ``i`` in columns ``i·r … i·r + r − 1``), and the example's
    adapter is either picked out of them (:meth:`LoraValue.gathered`) or kept by masking the
    rank-``n·r`` product (:meth:`mask`), whichever the matmul rule finds cheaper.

    Attributes:
      index: the example's slot, an int32 scalar already clipped to ``0 … n−1``.
      weight: the slot's scale relative to the kernel's ``scale`` (0 for the base model or an
        id out of range), a float32 scalar.
      n: the number of adapters in the bank.
      r: the bank's (padded) rank.
    """

    index: Any
    weight: Any
    n: int
    r: int

    def mask(self, dtype: Any) -> jax.Array:
        """``(n·r,)``: ``weight`` on the example's own adapter's columns, 0 elsewhere."""
        own = (jnp.arange(self.n * self.r) // self.r) == self.index
        return jnp.where(own, self.weight, 0.0).astype(dtype)


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
    gain: Any = None  # DoRA: m / ‖W0 + s·ΔW‖, shaped (stack..., out...) like B without its rank axis
    slot: Any = None  # a mixed batch's example: a BankSlot, and A/B hold the whole bank on their rank axis

    @property
    def n_stack(self) -> int:
        return sum(t.role is Role.STACK for t in self.tags)

    @property
    def dtype(self):
        return self.w0.dtype

    def dense(self) -> jax.Array:
        """The frozen base view as an array (dequantizing a quantized base here, per use)."""
        return dequantized(self.w0)

    def with_(self, **kw) -> "LoraValue":
        return dataclasses.replace(self, **kw)

    def roles(self, axes: Sequence[int]) -> set[Role]:
        return {self.tags[a].role for a in axes}

    def count(self, role: Role) -> int:
        return sum(t.role is role for t in self.tags)

    def gathered(self) -> "LoraValue":
        """A mixed-batch kernel (``slot`` set) as an ordinary one: the example's own adapter's
        columns of A and rows of B (times its relative weight); any other value unchanged."""
        if self.slot is None:
            return self
        s = self.slot
        a = lax.dynamic_slice_in_dim(self.a, s.index * s.r, s.r, axis=self.a.ndim - 1)
        b = lax.dynamic_slice_in_dim(self.b, s.index * s.r, s.r, axis=self.n_stack)
        return self.with_(a=a, b=b * s.weight.astype(b.dtype), slot=None)

    def materialize(self) -> jax.Array:
        """``w0 + s·ΔW`` in the view's layout (only for the opt-in merge fallback and outputs)."""
        if self.slot is not None:
            return self.gathered().materialize()
        s = subscripts(self.tags)
        out = "".join(c for t, c in zip(self.tags, s.view) if t.role is not Role.UNIT)
        d = jnp.einsum(f"{s.a},{s.b}->{out}", self.a.astype(jnp.float32), self.b.astype(jnp.float32),
                       precision=lax.Precision.HIGHEST)
        d = d.reshape(tuple(1 if t.role is Role.UNIT else n for t, n in zip(self.tags, self.w0.shape)))
        w0 = self.dense()
        w = w0.astype(jnp.float32) + self.scale * d
        if self.gain is not None:
            w = w * self.gain_view()
        return w.astype(w0.dtype)

    def gain_axis(self, view_axis: int) -> int | None:
        """The axis of ``gain`` behind a view axis (its stack and output axes have one)."""
        t = self.tags[view_axis]
        return t.idx if t.role is Role.STACK else self.n_stack + t.idx if t.role is Role.OUT else None

    def gain_on(self, positions: dict[int, int], ndim: int, dtype: Any) -> jax.Array:
        """``gain`` laid out for broadcasting against an array of ``ndim`` axes in which view axis
        ``v`` is axis ``positions[v]`` (every stack and output axis of the view must have one)."""
        ga = {self.gain_axis(v): pos for v, pos in positions.items() if self.gain_axis(v) is not None}
        if sorted(ga) != list(range(self.gain.ndim)):
            raise ValueError("not every stack/output axis of the kernel has a place in the result")
        order = sorted(ga, key=ga.get)
        g = jnp.transpose(self.gain, order) if order != list(range(self.gain.ndim)) else self.gain
        shape = [1] * ndim
        for k in order:
            shape[ga[k]] = self.gain.shape[k]
        return jnp.reshape(g, shape).astype(dtype)

    def gain_view(self) -> jax.Array:
        """``gain`` shaped to broadcast against the view (size 1 on input and unit axes)."""
        return self.gain_on({v: v for v in range(len(self.tags))}, len(self.tags), jnp.float32)

    def ordered(self) -> "LoraValue":
        """Reorder A's and B's axes so that each role's axes follow the view's order."""
        ns = self.n_stack
        order = {r: [t.idx for t in self.tags if t.role is r] for r in (Role.STACK, Role.IN, Role.OUT)}
        a_perm = order[Role.STACK] + [ns + k for k in order[Role.IN]] + [self.a.ndim - 1]
        b_perm = order[Role.STACK] + [ns] + [ns + 1 + k for k in order[Role.OUT]]
        g_perm = order[Role.STACK] + [ns + k for k in order[Role.OUT]]
        gain = None if self.gain is None else _transpose(self.gain, g_perm)
        return self.with_(a=_transpose(self.a, a_perm), b=_transpose(self.b, b_perm), gain=gain,
                          tags=renumber(self.tags))

    def stack_first(self) -> "LoraValue":
        """Make view axis 0 (a stack axis) the leading axis of A and B too."""
        t0 = self.tags[0]
        if t0.role is not Role.STACK:
            raise UnsupportedOpError(
                f"Kernel '{self.path}' is sliced along its axis 0, which is not a stacked-layer axis "
                f"(it is {_ROLE_NAMES[t0.role]} of the adapter).")
        return self.ordered()  # the first stack axis in view order becomes A/B axis 0


_ROLE_NAMES = {Role.STACK: "a stack axis", Role.IN: "an input axis", Role.OUT: "an output axis",
               Role.UNIT: "an inserted unit axis"}


def renumber(tags: Sequence[Tag]) -> tuple[Tag, ...]:
    """Number each role's axes in view order (valid once the factors are ``ordered()``)."""
    count = {r: 0 for r in Role}
    out = []
    for t in tags:
        out.append(Tag(t.role, count[t.role]))
        count[t.role] += 1
    return tuple(out)


def _transpose(x, perm):
    perm = list(perm)
    return x if perm == list(range(x.ndim)) else jnp.transpose(x, perm)
