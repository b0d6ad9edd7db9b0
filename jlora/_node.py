"""The pytree nodes that make injected params self-describing.

An adapted kernel is one :class:`LoraKernel` node in place of the kernel leaf. Its children are the
frozen base ``w0`` and the trainable factors ``a`` and ``b``; its static fields say how they fit
together (``layout``, ``scale``, ``rank``, ``dropout``). A leaf trained in full (``bias='all'``,
``full=``) is wrapped in :class:`Trainable`. Everything else in the tree is untouched, so
``jax.tree.map``, ``jax.jit``, Orbax and optax all see ordinary leaves.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Layout", "LoraKernel", "Trainable", "effective_factors"]


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which axes of a kernel are stacked, contracted ("in") and free ("out").

    ``A`` has shape ``[kernel.shape[i] for i in stack] + [kernel.shape[i] for i in in_] + [r]``
    and ``B`` has shape ``[kernel.shape[i] for i in stack] + [r] + [kernel.shape[i] for i in out]``,
    so that ``ΔW = einsum(A, B)`` over the rank axis, transposed back to the kernel's own axis order.

    ``gather`` marks a table read only by gathers (an embedding): its rows (``in_``) are looked up,
    not contracted, so it is PEFT's ``Embedding`` (``lora_embedding_A``/``lora_embedding_B``), not
    a ``Linear``; ``jlora.inject`` records it from the trace.

    ``conv`` is set for a kernel that a convolution uses (``jlora.inject`` records it from the
    trace): the kernel's input-feature axis followed by its spatial axes, in the convolution's
    order, so that one layer's torch ``ConvNd`` weight ``(out, in, *kernel_size)`` is the kernel
    transposed to ``(out, *conv)``. ``conv=()`` marks a convolution kernel that is flipped, sliced or
    reshaped on its way to the convolution (no torch weight layout follows from it). ``None``: a
    matmul weight, whose input axes PEFT/torch flatten in row-major order.

    Example:
        >>> Layout(stack=(), in_=(0,), out=(1,)).a_shape((4, 3), 2)
        (4, 2)
    """

    stack: tuple[int, ...]
    in_: tuple[int, ...]
    out: tuple[int, ...]
    conv: Optional[tuple[int, ...]] = None
    gather: bool = False

    def __post_init__(self):
        axes = tuple(self.stack) + tuple(self.in_) + tuple(self.out)
        if sorted(axes) != list(range(len(axes))):
            raise ValueError(f"Layout axes {axes} are not a permutation of the kernel's axes.")
        if not self.in_ or not self.out:
            raise ValueError(f"Layout needs at least one input and one output axis, got {self}.")
        if self.gather and (self.stack or len(self.in_) != 1 or len(self.out) != 1 or self.conv is not None):
            raise ValueError(f"Layout gather=True is a 2-D table's (one input, one output axis), got {self}.")
        if self.conv and (sorted(self.conv) != sorted(self.in_) or len(self.out) != 1):
            raise ValueError(
                f"Layout conv={self.conv} must order the input axes {self.in_} (feature axis, then "
                f"spatial axes) of a kernel with one output axis, got {self}."
            )

    @property
    def ndim(self) -> int:
        return len(self.stack) + len(self.in_) + len(self.out)

    def a_shape(self, shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
        return tuple(shape[i] for i in self.stack) + tuple(shape[i] for i in self.in_) + (rank,)

    def b_shape(self, shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
        return tuple(shape[i] for i in self.stack) + (rank,) + tuple(shape[i] for i in self.out)

    def m_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """DoRA's magnitude: one value per stacked layer and output unit (B without its rank axis).

        Example:
            >>> Layout(stack=(0,), in_=(1,), out=(2,)).m_shape((3, 4, 5))
            (3, 5)
        """
        return tuple(shape[i] for i in self.stack) + tuple(shape[i] for i in self.out)

    def fan_in(self, shape: tuple[int, ...]) -> int:
        return int(math.prod(shape[i] for i in self.in_))

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"stack": list(self.stack), "in": list(self.in_), "out": list(self.out)}
        if self.conv is not None:
            d["conv"] = list(self.conv)
        if self.gather:
            d["gather"] = True
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Layout":
        conv = d.get("conv")
        return cls(stack=tuple(d["stack"]), in_=tuple(d["in"]), out=tuple(d["out"]),
                   conv=None if conv is None else tuple(conv), gather=bool(d.get("gather", False)))

    def __str__(self) -> str:
        s = f"stack={list(self.stack)} " if self.stack else ""
        c = "" if self.conv is None else f" conv={list(self.conv)}"
        g = " gather" if self.gather else ""
        return f"{s}in={list(self.in_)} out={list(self.out)}{c}{g}"


def kernel_shape(layout: Layout, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The kernel shape that factors of these shapes adapt (their inverse of ``a_shape``/``b_shape``).

    Example:
        >>> kernel_shape(Layout(stack=(0,), in_=(2,), out=(1,)), (3, 8, 2), (3, 2, 5))
        (3, 5, 8)
    """
    ns = len(layout.stack)
    shape = [0] * layout.ndim
    for k, ax in enumerate(layout.stack):
        shape[ax] = a_shape[k]
    for k, ax in enumerate(layout.in_):
        shape[ax] = a_shape[ns + k]
    for k, ax in enumerate(layout.out):
        shape[ax] = b_shape[ns + 1 + k]
    return tuple(shape)


def factor_problem(node: "LoraKernel") -> str | None:
    """What is wrong with ``node``'s factors for its kernel and layout, or None.

    Checks that A and B are floating arrays of exactly ``layout.a_shape(w0.shape, r)`` and
    ``layout.b_shape(w0.shape, r)`` for one rank r (a broadcastable (in, 1) or (1, r) factor is
    wrong, not a shortcut), that DoRA's magnitude ``m`` is a floating ``layout.m_shape`` array, and
    that the initial factors ``a0``/``b0`` of a weight-modifying init have the shapes of A and B.
    ``w0`` may be absent (an adapters tree from :func:`jlora.split`).
    """
    a, b, lay = node.a, node.b, node.layout
    if a is None or b is None:
        return "it has no A/B factors"
    if not math.isfinite(node.scale) or node.scale <= 0:
        return f"its scale {node.scale} is not a positive finite number"
    if not 0.0 <= node.dropout < 1.0:
        return f"its dropout {node.dropout} is not in [0, 1)"
    a_shape, b_shape = tuple(np.shape(a)), tuple(np.shape(b))
    named = [("A", a), ("B", b)] + [(n, f) for n, f in (("m", node.m), ("A0", node.a0), ("B0", node.b0))
                                    if f is not None]
    for name, f in named:
        dt = getattr(f, "dtype", None)
        if dt is None or not jnp.issubdtype(dt, jnp.floating):
            return f"{name} has dtype {dt}; adapters must be floating point"
    if len(a_shape) != len(lay.stack) + len(lay.in_) + 1 or len(b_shape) != len(lay.stack) + 1 + len(lay.out):
        return f"A {list(a_shape)} / B {list(b_shape)} do not have the axes its layout ({lay}) needs"
    r = a_shape[-1]
    shape = tuple(node.w0.shape) if node.w0 is not None else kernel_shape(lay, a_shape, b_shape)
    want_a, want_b = lay.a_shape(shape, r), lay.b_shape(shape, r)
    if r < 1 or a_shape != want_a or b_shape != want_b:
        return (f"A {list(a_shape)} / B {list(b_shape)} do not fit kernel {list(shape)} with layout "
                f"({lay}): expected A {list(want_a)} and B {list(want_b)}")
    if node.m is not None and tuple(np.shape(node.m)) != lay.m_shape(shape):
        return (f"its DoRA magnitude m {list(np.shape(node.m))} does not fit kernel {list(shape)} with layout "
                f"({lay}): expected {list(lay.m_shape(shape))}")
    if (node.a0 is None) != (node.b0 is None):
        return "it has only one of the initial factors A0/B0"
    if node.a0 is not None and (tuple(np.shape(node.a0)) != want_a or tuple(np.shape(node.b0)) != want_b):
        return (f"its initial factors A0 {list(np.shape(node.a0))} / B0 {list(np.shape(node.b0))} do not have "
                f"the shapes of A {list(want_a)} / B {list(want_b)}")
    return None


@jax.tree_util.register_pytree_with_keys_class
class LoraKernel:
    """A frozen kernel ``w0`` with its low-rank adapter ``a``, ``b``.

    The value it stands for is ``w0 + scale * delta(a, b, layout)``; ``jlora``'s ``apply`` computes
    with it without forming that sum. ``w0`` may be an array or a quantized kernel node.

    Optional parts (``None`` for plain LoRA, and then absent from the pytree, so plain LoRA trees
    are exactly what they were):

    * ``m`` — DoRA's trainable magnitude, ``layout.m_shape``: the value becomes
      ``m ⊙ (w0 + s·ΔW) / ‖w0 + s·ΔW‖`` with the norm over the input axes per output unit (and per
      stacked layer), taken as a constant in the backward pass (DoRA §4.3, as PEFT).
    * ``a0``, ``b0`` — the frozen initial factors of an init that moves part of ``w0`` into the
      adapter (PiSSA, OLoRA): the value is ``w0 + s·(ΔW(a, b) − ΔW(a0, b0))``, so ``w0`` stays the
      original weights and the adapter starts as exactly the base model.

    Static fields: ``layout``, ``scale``, ``dropout``, ``rslora`` (the scale was ``alpha/√r``; kept
    so exports write ``use_rslora``), ``init`` (the init that modified the base: ``"pissa"``,
    ``"olora"``, ``"loftq"``...; None otherwise) and ``base_sha256`` (the fingerprint of the exact
    ``w0`` such an adapter is valid over; checkpoints refuse any other base).

    Example:
        >>> import jax.numpy as jnp
        >>> k = LoraKernel(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)),
        ...                layout=Layout((), (0,), (1,)), scale=0.5)
        >>> k.shape, k.rank
        ((4, 3), 2)
        >>> [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(k)[0]]
        ['.w0', '.a', '.b']
        >>> k.replace(m=jnp.ones(3)).m.shape
        (3,)
    """

    __slots__ = ("w0", "a", "b", "m", "a0", "b0", "layout", "scale", "dropout", "rslora", "init", "base_sha256")

    def __init__(self, w0, a, b, *, layout: Layout, scale: float, dropout: float = 0.0, m=None, a0=None,
                 b0=None, rslora: bool = False, init: Optional[str] = None, base_sha256: Optional[str] = None):
        self.w0 = w0
        self.a = a
        self.b = b
        self.m = m
        self.a0 = a0
        self.b0 = b0
        self.layout = layout
        self.scale = float(scale)
        self.dropout = float(dropout)
        self.rslora = bool(rslora)
        self.init = init
        self.base_sha256 = base_sha256

    # -- pytree protocol -----------------------------------------------------------------------
    # ``tree_flatten`` is the keyless form JAX calls on every jitted call (a training step flattens
    # params and optimizer state each time): without it JAX derives one from the keyed form below and
    # builds key objects per node per call, about 3× the host time (benchmarks/RESULTS.md).
    def tree_flatten(self):
        has_m, has_init = self.m is not None, self.a0 is not None or self.b0 is not None
        aux = (self.layout, self.scale, self.dropout, has_m, has_init, self.rslora, self.init, self.base_sha256)
        return (self.w0, self.a, self.b) + ((self.m,) if has_m else ()) + ((self.a0, self.b0) if has_init else ()), aux

    def tree_flatten_with_keys(self):
        ga = jax.tree_util.GetAttrKey
        children, aux = self.tree_flatten()
        names = ("w0", "a", "b") + (("m",) if aux[3] else ()) + (("a0", "b0") if aux[4] else ())
        return tuple(zip(map(ga, names), children)), aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        layout, scale, dropout, has_m, has_init, rslora, init, sha = aux
        obj = object.__new__(cls)
        it = iter(children)
        obj.w0, obj.a, obj.b = next(it), next(it), next(it)
        obj.m = next(it) if has_m else None
        obj.a0, obj.b0 = (next(it), next(it)) if has_init else (None, None)
        obj.layout, obj.scale, obj.dropout = layout, scale, dropout
        obj.rslora, obj.init, obj.base_sha256 = rslora, init, sha
        return obj

    def replace(self, **changes) -> "LoraKernel":
        """A copy with some children or static fields replaced (every other one kept).

        Example:
            >>> import jax.numpy as jnp
            >>> k = LoraKernel(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)),
            ...                layout=Layout((), (0,), (1,)), scale=0.5, rslora=True)
            >>> k2 = k.replace(b=jnp.ones((2, 3)))
            >>> k2.rslora, float(k2.b.sum())
            (True, 6.0)
        """
        fields = {n: getattr(self, n) for n in self.__slots__}
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(f"LoraKernel.replace: unknown fields {sorted(unknown)}.")
        fields.update(changes)
        w0, a, b = fields.pop("w0"), fields.pop("a"), fields.pop("b")
        return LoraKernel(w0, a, b, **fields)

    # -- conveniences -----------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """The kernel's shape (also for an adapters-only node of :func:`jlora.split`, from A and B)."""
        if self.w0 is None:
            return kernel_shape(self.layout, np.shape(self.a), np.shape(self.b))
        return tuple(self.w0.shape)

    @property
    def dtype(self):
        return self.w0.dtype

    @property
    def rank(self) -> int:
        return int(np.shape(self.a)[-1]) if self.a is not None else -1

    @property
    def dora(self) -> bool:
        """Whether this is a DoRA adapter (it has a magnitude ``m``)."""
        return self.m is not None

    @property
    def alpha(self) -> float:
        """LoRA's alpha: ``scale·r``, or ``scale·√r`` for an rsLoRA adapter."""
        r = self.rank
        return self.scale * (math.sqrt(r) if self.rslora else r)

    def __repr__(self) -> str:
        def desc(x):
            if x is None:
                return "None"
            return f"{getattr(x, 'dtype', type(x).__name__)}{list(np.shape(x))}"

        extra = "".join([
            f", m={desc(self.m)}" if self.m is not None else "",
            f", a0={desc(self.a0)}, b0={desc(self.b0)}" if self.a0 is not None else "",
            ", rslora" if self.rslora else "",
            f", init={self.init!r}" if self.init else "",
            f", dropout={self.dropout:g}" if self.dropout else "",
        ])
        return (
            f"LoraKernel(w0={desc(self.w0)}, a={desc(self.a)}, b={desc(self.b)}, "
            f"layout=({self.layout}), scale={self.scale:g}{extra})"
        )


@jax.tree_util.register_pytree_with_keys_class
class Trainable:
    """A leaf trained in full (a bias with ``bias='all'``, a head or norm in ``full=``).

    Example:
        >>> import jax
        >>> jax.tree.leaves(Trainable(1.0))
        [1.0]
    """

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def tree_flatten(self):  # keyless, for jitted calls (see LoraKernel.tree_flatten)
        return (self.value,), None

    def tree_flatten_with_keys(self):
        return ((jax.tree_util.GetAttrKey("value"), self.value),), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        (obj.value,) = children
        return obj

    def __repr__(self) -> str:
        v = self.value
        return f"Trainable({getattr(v, 'dtype', type(v).__name__)}{list(np.shape(v)) if v is not None else ''})"


def effective_factors(k: "LoraKernel") -> tuple[Any, Any]:
    """``(A, B)`` whose product is the adapter's whole ΔW: ``(a, b)`` for plain LoRA, and for an
    adapter with initial factors (PiSSA, OLoRA) the rank-2r pair ``([a, a0], [b; −b0])``, so that
    ``ΔW = A·B − A0·B0`` with A0, B0 frozen (behind ``stop_gradient``).

    Example:
        >>> import jax.numpy as jnp
        >>> k = LoraKernel(jnp.zeros((4, 3)), jnp.ones((4, 2)), jnp.ones((2, 3)), a0=jnp.ones((4, 2)),
        ...                b0=jnp.ones((2, 3)), layout=Layout((), (0,), (1,)), scale=1.0)
        >>> a, b = effective_factors(k)
        >>> a.shape, b.shape, float((a @ b).sum())
        ((4, 4), (4, 3), 0.0)
    """
    if k.a0 is None:
        return k.a, k.b
    ns = len(k.layout.stack)
    a0 = jax.lax.stop_gradient(k.a0).astype(k.a.dtype)
    b0 = jax.lax.stop_gradient(k.b0).astype(k.b.dtype)
    return jnp.concatenate([k.a, a0], axis=-1), jnp.concatenate([k.b, -b0], axis=ns)



def as_plain_lora(k: "LoraKernel", where: str) -> "LoraKernel":
    """``k`` as a standard LoRA over the original weights: a PiSSA/OLoRA adapter becomes its rank-2r
    pair (:func:`effective_factors`), trainable as a whole; a LoftQ adapter is refused (its base is
    LoftQ's quantized weights, and ``W_orig − Q`` is not low-rank). ``where`` starts the message."""
    if k.init is None:
        return k
    if k.a0 is None:
        raise ValueError(
            f"{where} was initialised with {k.init!r}, whose base is LoftQ's quantized weights: W_orig − Q is "
            f"not low-rank, so no LoRA over the original weights computes this model. Keep (or re-create) the "
            f"quantized base instead.")
    a, b = effective_factors(k)
    return k.replace(a=a, b=b, a0=None, b0=None, init=None, base_sha256=None)

def is_node(x: Any) -> bool:
    """True for jlora's own nodes (used as ``is_leaf`` when walking injected params)."""
    return isinstance(x, (LoraKernel, Trainable))
