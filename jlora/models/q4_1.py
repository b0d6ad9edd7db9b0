"""GGUF's Q4_1 blocks as a quantized kernel node: QLoRA over a GGUF file's own 4-bit weights."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._quant import QuantizedKernel, canonical_dtype, shape_of

__all__ = ["Q4_1Kernel"]

@jax.tree_util.register_pytree_with_keys_class
class Q4_1Kernel(QuantizedKernel):
    """A linear weight kept in GGUF's Q4_1 blocks, standing for the Flax kernel ``(in, out)``.

    GGUF stores a linear weight torch-style, ``(out, in)``, each row in blocks of 32 values:
    a float16 scale ``d``, a float16 minimum ``m`` and 16 bytes of 4-bit codes (low nibbles are
    values 0..15, high nibbles 16..31); value = ``d * code + m``. The children keep that layout
    (``d``, ``m``: ``(..., out, blocks)``; ``qs``: ``(..., out, blocks, 16)``) with any stack of
    layers as leading axes, so ``lax.scan`` slices a stacked kernel per layer; :meth:`dequantize`
    returns the ``(..., in, out)`` kernel in ``dtype``. 0.625 bytes per parameter.

    Example:
        >>> import numpy as np
        >>> raw = np.zeros((2, 1, 20), np.uint8)            # 2 rows (out) x 32 inputs, one block
        >>> raw[..., 0:2] = np.frombuffer(np.float16(1).tobytes(), np.uint8)   # d = 1
        >>> raw[..., 4] = 0x21                              # value 0 -> code 1, value 16 -> code 2
        >>> k = Q4_1Kernel.from_raw(raw)
        >>> k.shape, k.dequantize()[[0, 16], 0].tolist()
        ((32, 2), [1.0, 2.0])
    """

    _children = ("d", "m", "qs")

    def __init__(self, d, m, qs, *, dtype=jnp.float32):
        self.d, self.m, self.qs = d, m, qs
        self._dtype = canonical_dtype(dtype)

    @classmethod
    def from_raw(cls, raw: np.ndarray, *, dtype: Any = jnp.float32) -> "Q4_1Kernel":
        """From the file's bytes, ``(out, blocks, 20)`` uint8 (or ``(out, blocks * 20)``).

        Raises:
            ValueError: ``raw`` is not uint8 (it is not cast) or not of one of those shapes.
        """
        raw = np.asarray(raw)
        if raw.dtype != np.uint8:
            raise ValueError(f"Q4_1Kernel.from_raw: raw must be uint8 bytes, got {raw.dtype}.")
        if raw.ndim == 2 and raw.shape[1] % 20 == 0:
            raw = raw.reshape(raw.shape[0], -1, 20)
        if raw.ndim != 3 or raw.shape[2] != 20:
            raise ValueError(
                "Q4_1Kernel.from_raw: raw must be (out, blocks, 20) or (out, blocks * 20) "
                f"bytes, got shape {raw.shape}."
            )
        raw = np.ascontiguousarray(raw)
        d = raw[..., 0:2].copy().view(np.float16)[..., 0]
        m = raw[..., 2:4].copy().view(np.float16)[..., 0]
        return cls(jnp.asarray(d), jnp.asarray(m), jnp.asarray(raw[..., 4:20]), dtype=dtype)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """The leading dims of a stack of layers (read off ``d``, ``(..., out, blocks)``)."""
        return shape_of(self.d)[:-2]

    @property
    def slice_shape(self) -> tuple[int, ...]:
        """The Flax kernel shape of one layer, ``(in, out)``."""
        *_, out, blocks = shape_of(self.d)
        return (blocks * 32, out)

    def dequantize(self) -> jax.Array:
        qs = jnp.asarray(self.qs)
        codes = jnp.concatenate([qs & 0xF, qs >> 4], axis=-1).astype(jnp.float32)  # (..., out, blocks, 32)
        w = codes * jnp.asarray(self.d, jnp.float32)[..., None] + jnp.asarray(self.m, jnp.float32)[..., None]
        *stack, out, blocks, _ = w.shape
        return jnp.swapaxes(w.reshape(*stack, out, blocks * 32), -1, -2).astype(self._dtype)
