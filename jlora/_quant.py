"""Quantized frozen kernels for QLoRA: NF4 (with double quantization) and int8.

A quantized kernel is one pytree node in place of the kernel leaf, :class:`NF4Tensor` or
:class:`Int8Tensor`. Its children are the stored arrays (packed codes, scales); its static aux
data is the shape of *one slice*, the dequantized dtype and the block sizes. Nothing else.

**Stacks of slices.** A kernel of ndim ``n`` is quantized as independent slices over its first
``max(n - 2, 0)`` axes (the "stack"): a ``(L, in, out)`` scanned stack is quantized per layer,
a 2-D kernel as a whole. Every child array carries the stack dims as its own leading dims, and
the aux data does not mention them: the full shape is ``stack + slice_shape`` where ``stack`` is
read off the children. So ``jax.lax.scan`` (or ``jax.vmap``, or ``jax.tree.map(lambda c: c[i],
node)``) can slice a quantized stack along axis 0 like an ordinary array, and the node it hands
the body describes the sliced kernel.

**Blocking and padding.** Within a slice the values are flattened in row-major order and cut
into blocks of ``block_size``. If the slice size is not a multiple of ``block_size`` the
flattened slice is padded with zeros up to the next multiple (the zeros are stored, and dropped
again by ``dequantize``). The same rule applies to the second-level blocks of NF4 double
quantization (padding there is not stored: the int8 absmax codes keep their true length).

Example:
    >>> import jax, jax.numpy as jnp
    >>> w = jax.random.normal(jax.random.key(0), (2, 128, 64))   # a stack of 2 layers
    >>> q = NF4Tensor.from_array(w)
    >>> q.shape, q.codes.shape
    ((2, 128, 64), (2, 4096))
    >>> _, ys = jax.lax.scan(lambda c, layer: (c, layer.dequantize()), 0, q)
    >>> bool(jnp.array_equal(ys, q.dequantize()))
    True
"""

from __future__ import annotations

import copy
import functools
import math
import statistics
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jlora._paths import Targets, describe_targets, leaf_name, make_matcher, nearest, path_str

__all__ = [
    "QuantizedKernel",
    "NF4Tensor",
    "Int8Tensor",
    "NF4_CODEBOOK",
    "nf4_codebook",
    "quantize",
    "dequantize",
    "is_quantized",
]

# The 16 NormalFloat-4 values, as printed in the QLoRA paper (Dettmers et al. 2023, appendix E)
# and used by bitsandbytes. Code i (a 4-bit integer) stands for NF4_CODEBOOK[i].
NF4_CODEBOOK: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# Decision thresholds: a normalized value x gets the code i = #{midpoints < x} (a value exactly
# on a midpoint goes to the lower code).
_NF4_MIDPOINTS: tuple[float, ...] = tuple(
    (a + b) / 2 for a, b in zip(NF4_CODEBOOK[:-1], NF4_CODEBOOK[1:])
)

_DQ_BLOCK = 256  # second-level block size of double quantization (the paper's choice)


def nf4_codebook(bits: int = 4) -> tuple[float, ...]:
    """Re-derive the NormalFloat codebook from its definition in the QLoRA paper.

    NF-k holds ``2**k`` values: the quantiles of a standard normal ``N(0, 1)`` normalized into
    ``[-1, 1]``, built asymmetrically so that 0 is represented exactly. With
    ``δ = (1/(2·(2**k - 1)) + 1/(2·2**k)) / 2`` (the paper's offset, ``1 - δ = 0.9677083`` for
    k = 4), the positive half is the ``2**(k-1)`` quantiles ``Q(p)`` for ``p`` equally spaced from
    ``1 - δ`` down to (but excluding) 0.5 in ``2**(k-1)`` steps, the negative half is ``-Q(p)`` for
    ``2**(k-1) - 1`` values of ``p`` equally spaced from ``1 - δ`` to (excluding) 0.5, plus a
    single 0; the set is divided by its largest value. Computed in float64 with
    :class:`statistics.NormalDist` (no scipy).

    Args:
        bits: ``k``, the number of bits (4 for NF4).

    Returns:
        The ``2**bits`` values in increasing order, ``-1.0`` first and ``1.0`` last.

    Example:
        >>> cb = nf4_codebook()
        >>> len(cb), cb[0], cb[7], cb[-1]
        (16, -1.0, 0.0, 1.0)
        >>> max(abs(a - b) for a, b in zip(cb, NF4_CODEBOOK)) < 1e-6
        True
    """
    if bits < 2:
        raise ValueError(f"bits must be >= 2, got {bits}.")
    n = 2**bits
    half = n // 2
    top = 1.0 - 0.5 * (1.0 / (2 * (n - 1)) + 1.0 / (2 * n))
    q = statistics.NormalDist().inv_cdf

    def probs(count: int) -> list[float]:  # `count + 1` points from `top` to 0.5, 0.5 dropped
        return [top + (0.5 - top) * i / count for i in range(count)]

    pos = [q(p) for p in probs(half)]
    neg = [-q(p) for p in probs(half - 1)]
    vals = sorted(pos + [0.0] + neg)
    m = max(vals)
    return tuple(v / m for v in vals)


# ---------------------------------------------------------------------------------------------
# helpers


def shape_of(x: Any) -> tuple[int, ...]:
    s = getattr(x, "shape", None)
    return tuple(s) if s is not None else tuple(np.shape(x))


def _nbytes(x: Any) -> int:
    dt = getattr(x, "dtype", None)
    itemsize = np.dtype(dt).itemsize if dt is not None else np.asarray(x).dtype.itemsize
    return int(math.prod(shape_of(x))) * itemsize


def _split_stack(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    k = max(len(shape) - 2, 0)
    return tuple(shape[:k]), tuple(shape[k:])


def _pad_last(x: jax.Array, multiple: int) -> jax.Array:
    n = x.shape[-1]
    pad = (-n) % multiple
    if pad == 0:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])


def _to_blocks(x: jax.Array, block_size: int) -> jax.Array:
    """``stack + (n,)`` -> ``stack + (n_blocks, block_size)``, zero-padded to whole blocks."""
    x = _pad_last(x, block_size)
    return x.reshape(x.shape[:-1] + (-1, block_size))


def _from_blocks(blocks: jax.Array, n: int) -> jax.Array:
    """``stack + (n_blocks, block_size)`` -> ``stack + (n,)``, the padding dropped."""
    return blocks.reshape(blocks.shape[:-2] + (-1,))[..., :n]


def _int8_block_encode(
    blocks: jax.Array, round_scale: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Symmetric absmax int8 per block (last axis): ``(q, s)`` with ``q = round(x / s)``
    clipped to ``[-127, 127]`` and float32 ``s = absmax / 127`` (rounded up to 16 significant
    bits with ``round_scale``)."""
    scale = jnp.max(jnp.abs(blocks), axis=-1) / 127.0
    if round_scale:
        scale = _round_up_16bit(scale)
    q = jnp.clip(jnp.round(blocks / _absmax_scale(scale)[..., None]), -127, 127)
    return q.astype(jnp.int8), scale


def _int8_block_decode(q: jax.Array, scale: jax.Array) -> jax.Array:
    """Inverse of :func:`_int8_block_encode`: float32 ``q * s`` per block."""
    return q.astype(jnp.float32) * scale.astype(jnp.float32)[..., None]


def _check_input(x: Any, what: str) -> jax.Array:
    if is_quantized(x):
        raise ValueError(f"{what}: the input is already quantized ({type(x).__name__}).")
    dt = getattr(x, "dtype", None)
    dt = np.dtype(dt) if dt is not None else np.asarray(x).dtype
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"{what}: only floating kernels can be quantized, got dtype {dt}.")
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"{what}: cannot quantize a scalar.")
    if x.size == 0:
        raise ValueError(f"{what}: cannot quantize an empty array (shape {tuple(x.shape)}).")
    _check_finite(x, what)
    return x


def _check_finite(x: jax.Array, what: str) -> None:
    """Refuse inf / NaN in a concrete ``x``: one inf makes its whole NF4 block or int8 channel
    non-finite, and a NaN can come back as a finite number. Skipped for a tracer (under
    ``jax.jit``, ``vmap`` or a ``scan`` body the values are unknown)."""
    if isinstance(x, jax.core.Tracer):
        return
    finite = jnp.isfinite(x)
    bad = int(x.size - jnp.count_nonzero(finite))
    if bad:
        first = tuple(int(i) for i in np.unravel_index(int(jnp.argmin(finite)), x.shape))
        raise ValueError(
            f"{what}: {bad} non-finite value{'s' if bad > 1 else ''} (inf or NaN) out of "
            f"{x.size}, first at index {first}; quantization needs finite weights."
        )


def canonical_dtype(dtype: Any) -> np.dtype:
    """The dtype JAX actually produces for ``dtype`` (float64 is float32 without x64)."""
    return np.dtype(jax.dtypes.canonicalize_dtype(dtype))


def _out_dtype(x: jax.Array, dtype: Any) -> np.dtype:
    dt = canonical_dtype(x.dtype if dtype is None else dtype)
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dt}.")
    return dt


def _check_block_size(block_size: Any, what: str, even: bool = False) -> int:
    """``block_size`` as an int, or a ValueError (a bool or a float is not a block size)."""
    ok = isinstance(block_size, (int, np.integer)) and not isinstance(block_size, bool)
    if not ok or block_size <= 0 or (even and block_size % 2):
        kind = "positive even" if even else "positive"
        raise ValueError(f"{what} block_size must be a {kind} integer, got {block_size!r}.")
    return int(block_size)


def _absmax_scale(amax: jax.Array) -> jax.Array:
    """``amax`` with zeros replaced by 1 (an all-zero block then quantizes to exact zeros)."""
    return jnp.where(amax == 0, jnp.ones_like(amax), amax)


def _round_up_16bit(s: jax.Array) -> jax.Array:
    """Round positive float32 ``s`` up to 16 significant bits (clear the low 8 mantissa bits).

    Then ``q * s`` is exact in float32 for any int8 ``q``, so ``q * s + mean`` rounds the same
    whether or not XLA fuses it into an FMA: eager, jitted and scanned dequantization agree
    bit for bit.
    """
    bits = jax.lax.bitcast_convert_type(s.astype(jnp.float32), jnp.uint32)
    bits = (bits + jnp.uint32(0xFF)) & jnp.uint32(0xFFFFFF00)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _check_dq_mean(mean: jax.Array) -> None:
    """Refuse a double quantization whose mean of the block absmax overflowed float32 (finite
    weights of magnitude ~1e37 and up): every dequantized value would be NaN."""
    if not bool(jnp.all(jnp.isfinite(mean))):
        raise ValueError(
            "NF4Tensor.from_array: the weights are too large for double quantization (the mean "
            "of the block absmax overflows float32); pass double_quant=False."
        )


# ---------------------------------------------------------------------------------------------
# NF4


@functools.partial(jax.jit, static_argnames=("block_size", "double_quant"))
def _nf4_encode(x: jax.Array, block_size: int, double_quant: bool) -> tuple[jax.Array, ...]:
    stack, _ = _split_stack(x.shape)
    blocks = _to_blocks(x.astype(jnp.float32).reshape(stack + (-1,)), block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)  # stack + (nb,)
    xn = blocks / _absmax_scale(absmax)[..., None]
    # code = number of midpoints strictly below the value: one fused elementwise pass.
    idx = sum((xn > jnp.float32(m)).astype(jnp.uint8) for m in _NF4_MIDPOINTS)
    idx = idx.reshape(stack + (-1, 2))
    codes = (idx[..., 0] << 4) | idx[..., 1]  # first value of each pair in the high nibble
    if not double_quant:
        return codes, absmax
    mean = jnp.mean(absmax, axis=-1)  # stack
    centered = _to_blocks(absmax - mean[..., None], _DQ_BLOCK)
    q, scale = _int8_block_encode(centered, round_scale=True)  # scale: stack + (nd,)
    return codes, _from_blocks(q, absmax.shape[-1]), scale, mean


@jax.jit
def _nf4_absmax(scales: tuple[jax.Array, ...]) -> jax.Array:
    if len(scales) == 1:
        return jnp.asarray(scales[0], jnp.float32)
    q, scale, mean = scales
    centered = _int8_block_decode(_to_blocks(q, _DQ_BLOCK), scale)
    return _from_blocks(centered, q.shape[-1]) + mean[..., None]


@functools.partial(jax.jit, static_argnames=("block_size", "slice_shape", "dtype"))
def _nf4_decode(
    codes: jax.Array,
    scales: tuple[jax.Array, ...],
    block_size: int,
    slice_shape: tuple[int, ...],
    dtype: np.dtype,
) -> jax.Array:
    stack = codes.shape[:-1]
    idx = jnp.stack([codes >> 4, codes & 0xF], axis=-1).reshape(stack + (-1,))
    vals = jnp.take(jnp.asarray(NF4_CODEBOOK, jnp.float32), idx.astype(jnp.int32))
    vals = _to_blocks(vals, block_size) * _nf4_absmax(scales)[..., None]
    n = int(math.prod(slice_shape))
    return _from_blocks(vals, n).reshape(stack + slice_shape).astype(dtype)


class QuantizedKernel:
    """The array-like surface shared by quantized kernel nodes.

    A subclass stores its arrays as attributes named by ``_children`` (the pytree children, in
    order; the first one has the stack dims then one more axis) and its static data as
    attributes named by ``_aux`` (which includes ``_dtype``, what :meth:`dequantize` returns);
    it defines ``slice_shape`` and ``dequantize()`` and registers itself with
    ``jax.tree_util.register_pytree_with_keys_class``. A subclass whose children are not plain
    attributes overrides ``_child_names``/``_child_values``/``_set_children``, not the flatten methods:
    the keyless ``tree_flatten`` (what jitted calls use) and the keyed one are both built on them. ``jlora.inject`` and ``apply`` accept any
    such node in place of a kernel.
    """

    _children: tuple[str, ...] = ()
    _aux: tuple[str, ...] = ("_dtype",)
    _dtype: np.dtype
    slice_shape: tuple[int, ...]

    # A subclass whose children are not plain attributes overrides these three.
    def _child_names(self) -> tuple[str, ...]:
        return self._children

    def _child_values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, n) for n in self._children)

    def _set_children(self, children: tuple[Any, ...]) -> None:
        for name, value in zip(self._children, children):
            setattr(self, name, value)

    # -- pytree protocol ---------------------------------------------------------------------------
    def tree_flatten(self):  # keyless, for jitted calls (see LoraKernel.tree_flatten)
        return tuple(self._child_values()), tuple(getattr(self, n) for n in self._aux)

    def tree_flatten_with_keys(self):
        ga = jax.tree_util.GetAttrKey
        children, aux = self.tree_flatten()
        return tuple(zip(map(ga, self._child_names()), children)), aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        for name, value in zip(cls._aux, aux):
            setattr(obj, name, value)
        obj._set_children(tuple(children))
        return obj

    # -- array-like properties ---------------------------------------------------------------------
    @property
    def stack_shape(self) -> tuple[int, ...]:
        """The leading dims of independently quantized slices (read off the first child)."""
        return shape_of(self._child_values()[0])[:-1]

    @property
    def shape(self) -> tuple[int, ...]:
        """The dequantized shape, ``stack_shape + slice_shape``."""
        return self.stack_shape + self.slice_shape

    @property
    def dtype(self) -> np.dtype:
        """The dtype :meth:`dequantize` returns."""
        return self._dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: all children together."""
        return sum(_nbytes(x) for x in jax.tree.leaves(self))

    def dequantize(self) -> jax.Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def with_dtype(self, dtype: Any) -> "QuantizedKernel":
        """The same stored arrays, dequantizing to ``dtype`` (a cast that stays quantized)."""
        out = copy.copy(self)
        out._dtype = canonical_dtype(dtype)
        return out

    def _repr_extra(self) -> str:
        return ""

    def __repr__(self) -> str:
        # After a tree map (e.g. to per-leaf labels) the children are not arrays: shape unknown.
        known = hasattr(self._child_values()[0], "shape")
        shape = self.shape if known else "?"
        return f"{type(self).__name__}(shape={shape}, dtype={self._dtype.name}{self._repr_extra()})"


@jax.tree_util.register_pytree_with_keys_class
class NF4Tensor(QuantizedKernel):
    """A frozen kernel stored in 4-bit NormalFloat, as in QLoRA (Dettmers et al. 2023).

    Scheme, per slice (see the module docstring for slices, blocking and padding):

    * first level: the flattened slice is cut into blocks of ``block_size`` (64) values; each
      block is divided by its absmax and every value is replaced by the index of the nearest of
      the 16 :data:`NF4_CODEBOOK` values (a value exactly halfway goes to the lower code). Two
      4-bit codes are packed per ``uint8``, the first (even) position in the high nibble.
    * double quantization (``double_quant=True``, the default): the float32 absmax constants are
      centered by subtracting their mean (over the slice), then quantized blockwise with block
      size 256 to **symmetric linear int8**: ``q = round(c / s)`` (round half to even) clipped
      to ``[-127, 127]``, with one float32 ``s = absmax(block) / 127`` per 256-block, ``s``
      rounded *up* to 16 significant bits (so ``q * s`` is exact in float32 and dequantization
      is bit-identical eager, jitted or scanned). (bitsandbytes uses its
      "dynamic" 8-bit float map here instead; this linear int8 scheme is what jlora stores.)
      Dequantized absmax is ``q * s + mean``.

    Children (all with the stack dims leading): ``codes`` uint8 ``(..., padded/2)``, and either
    ``absmax`` float32 ``(..., n_blocks)`` or, with double quantization, ``absmax_q`` int8
    ``(..., n_blocks)``, ``absmax_scale`` float32 ``(..., ceil(n_blocks/256))`` and
    ``absmax_mean`` float32 ``(...)``. Aux data: slice shape, dequantized dtype, block size.

    Storage per parameter with double quantization: 4 + 8/64 + 32/(64·256) ≈ 4.127 bits.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> w = jax.random.normal(jax.random.key(0), (256, 64), jnp.bfloat16)
        >>> q = NF4Tensor.from_array(w)
        >>> q
        NF4Tensor(shape=(256, 64), dtype=bfloat16, block_size=64, double_quant=True)
        >>> q.nbytes, w.nbytes
        (8456, 32768)
        >>> q.dequantize().dtype
        dtype(bfloat16)
    """

    __slots__ = ("codes", "scales", "slice_shape", "_dtype", "block_size")
    _aux = ("slice_shape", "_dtype", "block_size")

    def __init__(
        self,
        codes: Any,
        scales: tuple[Any, ...],
        *,
        slice_shape: tuple[int, ...],
        dtype: Any,
        block_size: int,
    ):
        """Build from stored arrays; use :meth:`from_array` to quantize a dense kernel.

        ``scales`` is ``(absmax,)`` or ``(absmax_q, absmax_scale, absmax_mean)``.
        """
        if len(scales) not in (1, 3):
            raise ValueError(f"scales must hold 1 or 3 arrays, got {len(scales)}.")
        self.codes = codes
        self.scales = tuple(scales)
        self.slice_shape = tuple(int(d) for d in slice_shape)
        self._dtype = canonical_dtype(dtype)
        self.block_size = int(block_size)

    @classmethod
    def from_array(
        cls,
        x: Any,
        *,
        block_size: int = 64,
        double_quant: bool = True,
        dtype: Any = None,
    ) -> "NF4Tensor":
        """Quantize a dense floating kernel to NF4.

        Args:
            x: The kernel (any floating dtype, ndim >= 1). Its first ``ndim - 2`` axes are a
                stack of independently quantized slices.
            block_size: Values per absmax block; a positive even number.
            double_quant: Quantize the absmax constants to int8 (block size 256).
            dtype: The dtype :meth:`dequantize` returns; default ``x.dtype``.

        Returns:
            The quantized kernel. Jit-friendly (shapes are static).

        Raises:
            ValueError: ``x`` is already quantized, not floating, holds inf or NaN values, is
                too large for double quantization (``|x|`` ~1e37: the mean of the absmax would
                overflow), or ``block_size`` is invalid. The value checks are done eagerly on
                concrete arrays (inf/NaN before the jitted encoder), and skipped when ``x`` is a
                tracer (a call under ``jax.jit``, ``vmap`` or inside a ``scan`` body).

        Example:
            >>> import jax.numpy as jnp
            >>> q = NF4Tensor.from_array(jnp.ones((3, 5)), dtype=jnp.bfloat16)
            >>> q.shape, q.dtype, q.codes.shape
            ((3, 5), dtype(bfloat16), (32,))
        """
        block_size = _check_block_size(block_size, "NF4", even=True)
        x = _check_input(x, "NF4Tensor.from_array")
        out = _out_dtype(x, dtype)
        stack, slice_shape = _split_stack(tuple(x.shape))
        arrays = _nf4_encode(x, block_size=block_size, double_quant=bool(double_quant))
        if double_quant and not isinstance(x, jax.core.Tracer):
            _check_dq_mean(arrays[-1])
        return cls(arrays[0], arrays[1:], slice_shape=slice_shape, dtype=out, block_size=block_size)

    # Children: ``codes`` then the ``scales`` tuple, keyed by what each scale array is.
    def _child_names(self) -> tuple[str, ...]:
        if self.double_quant:
            return ("codes", "absmax_q", "absmax_scale", "absmax_mean")
        return ("codes", "absmax")

    def _child_values(self) -> tuple[Any, ...]:
        return (self.codes, *self.scales)

    def _set_children(self, children: tuple[Any, ...]) -> None:
        self.codes, self.scales = children[0], tuple(children[1:])

    @property
    def double_quant(self) -> bool:
        """Whether the absmax constants are stored double-quantized."""
        return len(self.scales) == 3

    def absmax(self) -> jax.Array:
        """The per-block absmax constants, float32 ``stack + (n_blocks,)`` (dequantized)."""
        return _nf4_absmax(self.scales)

    def dequantize(self) -> jax.Array:
        """The dense kernel, of :attr:`shape` and :attr:`dtype`. Pure ``jnp``; jit-friendly.

        Example:
            >>> import jax, jax.numpy as jnp
            >>> w = jnp.linspace(-1.0, 1.0, 128).reshape(2, 64)
            >>> err = jnp.abs(NF4Tensor.from_array(w).dequantize() - w).max()
            >>> bool(err < 0.15)
            True
        """
        return _nf4_decode(
            self.codes,
            self.scales,
            block_size=self.block_size,
            slice_shape=self.slice_shape,
            dtype=self._dtype,
        )

    def _repr_extra(self) -> str:
        return f", block_size={self.block_size}, double_quant={self.double_quant}"


# ---------------------------------------------------------------------------------------------
# int8


@functools.partial(jax.jit, static_argnames=("block_size", "channel_axis"))
def _int8_encode(
    x: jax.Array, block_size: Optional[int], channel_axis: int
) -> tuple[jax.Array, jax.Array]:
    stack, slice_shape = _split_stack(x.shape)
    xf = x.astype(jnp.float32)
    if block_size is None:
        reduce_axis = -1 if channel_axis == -2 else -2
        amax = jnp.max(jnp.abs(xf), axis=reduce_axis, keepdims=True)
        scale = amax / 127.0
        q = jnp.clip(jnp.round(xf / _absmax_scale(scale)), -127, 127).astype(jnp.int8)
        return q.reshape(stack + (-1,)), jnp.squeeze(scale, reduce_axis)
    q, scale = _int8_block_encode(_to_blocks(xf.reshape(stack + (-1,)), block_size))
    return q.reshape(stack + (-1,)), scale


@functools.partial(
    jax.jit, static_argnames=("block_size", "channel_axis", "slice_shape", "dtype")
)
def _int8_decode(
    q: jax.Array,
    scale: jax.Array,
    block_size: Optional[int],
    channel_axis: int,
    slice_shape: tuple[int, ...],
    dtype: np.dtype,
) -> jax.Array:
    stack = q.shape[:-1]
    scale = scale.astype(jnp.float32)
    if block_size is None:
        scale = scale[..., None, :] if channel_axis == -1 else scale[..., :, None]
        out = q.reshape(stack + slice_shape).astype(jnp.float32) * scale
    else:
        n = int(math.prod(slice_shape))
        out = _from_blocks(_int8_block_decode(_to_blocks(q, block_size), scale), n)
        out = out.reshape(stack + slice_shape)
    return out.astype(dtype)


@jax.tree_util.register_pytree_with_keys_class
class Int8Tensor(QuantizedKernel):
    """A frozen kernel stored as symmetric absmax int8.

    ``q = round(x / s)`` clipped to ``[-127, 127]`` with a float32 ``s = absmax / 127``, either
    per output channel (default: one scale per index of ``channel_axis`` of each slice; the last
    axis, i.e. ``out`` of a flax ``(in, out)`` kernel; use ``channel_axis=-2`` for a PyTorch
    ``(out, in)`` weight) or per block of ``block_size`` values of the row-major flattened slice
    (zero-padded to a whole number of blocks, see the module docstring).

    Children (stack dims leading): ``q`` int8 ``(..., slice_size or padded size)`` (the slice
    flattened row-major) and ``scale`` float32 ``(..., channels or n_blocks)``. Aux data: slice
    shape, dequantized dtype, block size (``None`` for per-channel), channel axis.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> w = jax.random.normal(jax.random.key(0), (64, 32))
        >>> q = Int8Tensor.from_array(w)
        >>> q
        Int8Tensor(shape=(64, 32), dtype=float32, per-channel axis=-1)
        >>> q.scale.shape, q.nbytes
        ((32,), 2176)
    """

    __slots__ = ("q", "scale", "slice_shape", "_dtype", "block_size", "channel_axis")
    _children = ("q", "scale")
    _aux = ("slice_shape", "_dtype", "block_size", "channel_axis")

    def __init__(
        self,
        q: Any,
        scale: Any,
        *,
        slice_shape: tuple[int, ...],
        dtype: Any,
        block_size: Optional[int] = None,
        channel_axis: int = -1,
    ):
        """Build from stored arrays; use :meth:`from_array` to quantize a dense kernel."""
        self.q = q
        self.scale = scale
        self.slice_shape = tuple(int(d) for d in slice_shape)
        self._dtype = canonical_dtype(dtype)
        self.block_size = None if block_size is None else int(block_size)
        self.channel_axis = int(channel_axis)

    @classmethod
    def from_array(
        cls,
        x: Any,
        *,
        block_size: Optional[int] = None,
        channel_axis: int = -1,
        dtype: Any = None,
    ) -> "Int8Tensor":
        """Quantize a dense floating kernel to int8.

        Args:
            x: The kernel (floating; ndim >= 2 for per-channel, >= 1 for blockwise). Its first
                ``ndim - 2`` axes are a stack of independently quantized slices.
            block_size: ``None`` for per-channel scales, else values per absmax block.
            channel_axis: The output-channel axis for per-channel scales: ``-1`` or ``-2``.
            dtype: The dtype :meth:`dequantize` returns; default ``x.dtype``.

        Returns:
            The quantized kernel. Jit-friendly.

        Raises:
            ValueError: ``x`` is already quantized, not floating, holds inf or NaN values
                (checked on concrete arrays only, as in :meth:`NF4Tensor.from_array`), or the
                options are invalid.

        Example:
            >>> import jax.numpy as jnp
            >>> q = Int8Tensor.from_array(jnp.ones((3, 5)), block_size=4)
            >>> q.shape, q.q.shape, q.scale.shape
            ((3, 5), (16,), (4,))
        """
        bs = None if block_size is None else _check_block_size(block_size, "int8")
        if channel_axis not in (-1, -2):
            raise ValueError(f"channel_axis must be -1 or -2, got {channel_axis!r}.")
        if bs is not None and channel_axis != -1:
            raise ValueError("channel_axis is for per-channel scales: pass block_size=None.")
        x = _check_input(x, "Int8Tensor.from_array")
        out = _out_dtype(x, dtype)
        if bs is None and x.ndim < 2:
            raise ValueError(
                f"per-channel int8 needs ndim >= 2, got shape {tuple(x.shape)}; pass block_size."
            )
        _, slice_shape = _split_stack(tuple(x.shape))
        q, scale = _int8_encode(x, block_size=bs, channel_axis=int(channel_axis))
        return cls(
            q, scale, slice_shape=slice_shape, dtype=out, block_size=bs, channel_axis=channel_axis
        )

    def dequantize(self) -> jax.Array:
        """The dense kernel, of :attr:`shape` and :attr:`dtype`. Pure ``jnp``; jit-friendly.

        Example:
            >>> import jax.numpy as jnp
            >>> w = jnp.arange(12.0).reshape(3, 4)
            >>> bool(jnp.abs(Int8Tensor.from_array(w).dequantize() - w).max() < 0.05)
            True
        """
        return _int8_decode(
            self.q,
            self.scale,
            block_size=self.block_size,
            channel_axis=self.channel_axis,
            slice_shape=self.slice_shape,
            dtype=self._dtype,
        )

    def _repr_extra(self) -> str:
        if self.block_size is None:
            return f", per-channel axis={self.channel_axis}"
        return f", block_size={self.block_size}"


# ---------------------------------------------------------------------------------------------
# tree functions


def is_quantized(x: Any) -> bool:
    """True for a quantized kernel node (:class:`NF4Tensor`, :class:`Int8Tensor`, any :class:`QuantizedKernel`).

    Example:
        >>> import jax.numpy as jnp
        >>> is_quantized(jnp.ones((2, 2))), is_quantized(NF4Tensor.from_array(jnp.ones((2, 2))))
        (False, True)
    """
    return isinstance(x, QuantizedKernel)


def dequantized(x: Any) -> Any:
    """``x.dequantize()`` for a quantized kernel node, ``x`` itself otherwise (one leaf)."""
    return x.dequantize() if isinstance(x, QuantizedKernel) else x


_DEFAULT_NAMES = ("kernel", "weight")
_METHODS = ("nf4", "int8")


def quantize(
    params: Any,
    *,
    method: str = "nf4",
    targets: Targets = None,
    block_size: Optional[int] = 64,
    double_quant: bool = True,
    dtype: Any = None,
    min_size: int = 4096,
) -> Any:
    """Replace chosen kernels in a params pytree by quantized nodes.

    A leaf is quantized when it is an array with ``ndim >= 2`` and ``size >= min_size`` and it is
    chosen by ``targets``. With ``targets=None`` (default) the chosen leaves are the floating ones
    whose last key-path component is ``kernel`` or ``weight``. Otherwise ``targets`` picks by the
    '/'-joined key path (see :func:`jlora._paths.make_matcher`): a regex string searched in the
    path, a list of names matching whole path components, or a callable ``(path, leaf) -> bool``;
    a chosen leaf that is not floating is an error then. Paths drop NNX's ``value`` wrapper.

    Args:
        params: Any pytree of arrays (dicts, flax/NNX state, ...).
        method: ``"nf4"`` (:class:`NF4Tensor`) or ``"int8"`` (:class:`Int8Tensor`).
        targets: Which leaves to quantize (see above).
        block_size: Values per absmax block. For ``"int8"``, ``None`` means per output channel
            (the kernel's last axis); for ``"nf4"`` it must be a positive even number.
        double_quant: NF4 only: double-quantize the absmax constants (int8, block 256).
        dtype: The dtype the quantized kernels dequantize to; default each leaf's own dtype.
        min_size: Leaves with fewer elements stay dense (use 0 to quantize any size).

    Returns:
        ``params`` with the chosen leaves replaced by :class:`NF4Tensor` / :class:`Int8Tensor`.

    Raises:
        ValueError: A chosen leaf is already quantized, has an integer/complex/bool dtype, or
            holds inf or NaN values (the message names its key path and the count; checked
            eagerly on concrete leaves, skipped for tracers when ``quantize`` runs under
            ``jax.jit``); explicit ``targets`` match no leaf; nothing would be quantized (every
            chosen leaf has ndim < 2 or fewer than ``min_size`` elements, or the default rule
            finds no floating ``kernel``/``weight``), rather than returning ``params`` unchanged;
            bad ``method``.

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"dense": {"kernel": jnp.ones((128, 64)), "bias": jnp.zeros(64)}}
        >>> qp = quantize(params)
        >>> qp["dense"]["kernel"]
        NF4Tensor(shape=(128, 64), dtype=float32, block_size=64, double_quant=True)
        >>> qp["dense"]["bias"].shape
        (64,)
        >>> quantize(params, method="int8", block_size=None)["dense"]["kernel"]
        Int8Tensor(shape=(128, 64), dtype=float32, per-channel axis=-1)
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")
    if method == "nf4" and block_size is None:
        raise ValueError("NF4 needs a block_size (64 in QLoRA).")
    if method == "nf4":
        make = functools.partial(
            NF4Tensor.from_array, block_size=block_size, double_quant=double_quant, dtype=dtype
        )
    else:
        make = functools.partial(Int8Tensor.from_array, block_size=block_size, dtype=dtype)
    choose = _default_rule if targets is None else make_matcher(targets)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)
    out, chosen, paths = [], [], []
    for kp, leaf in leaves:
        path = path_str(kp)
        paths.append(path)
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype") and choose(path, leaf)):
            out.append(leaf)
            continue
        if is_quantized(leaf):
            raise ValueError(
                f"quantize: {path!r} is already quantized ({leaf!r}); dequantize it first."
            )
        chosen.append((path, tuple(leaf.shape)))
        if len(leaf.shape) < 2 or math.prod(leaf.shape) < min_size:
            out.append(leaf)
            continue
        try:
            out.append(make(leaf))
        except ValueError as e:
            raise ValueError(f"quantize: {path!r}: {e}") from None
    if not any(is_quantized(x) for x in out):
        raise _nothing_quantized(targets, chosen, paths, min_size)
    return jax.tree_util.tree_unflatten(treedef, out)


def _default_rule(path: str, leaf: Any) -> bool:
    """``quantize``'s ``targets=None``: floating leaves named ``kernel`` or ``weight``."""
    return leaf_name(path) in _DEFAULT_NAMES and jnp.issubdtype(np.dtype(leaf.dtype), jnp.floating)


def _nothing_quantized(
    targets: Targets, chosen: list[tuple[str, tuple[int, ...]]], paths: list[str], min_size: int
) -> ValueError:
    """The error for a ``quantize`` call that would return its input unchanged."""
    if chosen:
        shown = ", ".join(f"{p!r} {shape}" for p, shape in chosen[:5])
        return ValueError(
            f"quantize: nothing to quantize: the {len(chosen)} chosen leaves all have ndim < 2 "
            f"or fewer than min_size={min_size} elements ({shown}); lower min_size or pick "
            f"other targets."
        )
    if targets is None:
        near = nearest("kernel", paths)
        return ValueError(
            f"quantize: no floating leaf named 'kernel' or 'weight' (the default targets); "
            f"pass targets. Some paths: {near}."
        )
    near = nearest(targets if isinstance(targets, str) else str(targets), paths)
    return ValueError(
        f"quantize: targets {describe_targets(targets)} matched no array leaf. Some paths: {near}."
    )


def dequantize(tree: Any) -> Any:
    """Replace every quantized node in ``tree`` by its dense array.

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"w": {"kernel": jnp.ones((64, 64))}}
        >>> d = dequantize(quantize(params))
        >>> d["w"]["kernel"].shape, bool(jnp.all(d["w"]["kernel"] == 1.0))
        ((64, 64), True)
    """
    return jax.tree.map(
        dequantized, tree, is_leaf=is_quantized
    )
