"""DoRA's weight norm, computed without forming ``W0 + s·A·B``.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", eq. 5) replaces an adapted
kernel by ``m ⊙ (W0 + s·A·B) / ‖W0 + s·A·B‖``: a trainable magnitude ``m`` per output unit times
the direction, the norm taken over the kernel's input axes for every output unit (and stacked
layer). §4.3 treats the norm as a constant in the backward pass, as PEFT does; so does jlora.

The squared norm of output unit ``o`` expands, with ``P = Aᵀ·W0`` (r × out: one rank-r product
over the kernel) and ``G = AᵀA`` (r × r), into

    ‖w0_o‖² + 2s·⟨b_o, P_o⟩ + s²·b_oᵀ G b_o,

so a training step reads W0 twice more (the sum of squares and ``P``) and never holds an
``in × out`` array beyond W0 itself. :func:`weight_norm` computes it over a kernel in its own
axis order (any layout: several input or output axes, stacked layers), one layer at a time for a
quantized stack (dequantized per layer, as QLoRA's matmuls are).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jlora._node import Layout
from jlora._quant import dequantized, is_quantized
from jlora._value import layout_tags, subscripts

__all__ = ["weight_norm", "gain", "gain_in_kernel_order", "magnitude"]

_HI = lax.Precision.HIGHEST


def _sub_layout(layout: Layout) -> Layout:
    """The layout of one slice along kernel axis 0 (a stack axis)."""
    shift = lambda axes: tuple(a - 1 for a in axes)  # noqa: E731
    return Layout(stack=shift(layout.stack[1:]), in_=shift(layout.in_), out=shift(layout.out))


def weight_norm(w0: Any, a: jax.Array, b: jax.Array, scale: float, layout: Layout) -> jax.Array:
    """``‖W0 + s·A·B‖`` over the input axes, per stacked layer and output unit: float32 of shape
    ``layout.m_shape`` (``(stack..., out...)``), without forming ``W0 + s·A·B``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jlora import Layout
        >>> w, a, b = (jax.random.normal(jax.random.key(i), s) for i, s in enumerate([(5, 3), (5, 2), (2, 3)]))
        >>> lay = Layout((), (0,), (1,))
        >>> bool(jnp.allclose(weight_norm(w, a, b, 0.5, lay), jnp.linalg.norm(w + 0.5 * a @ b, axis=0), rtol=1e-5))
        True
    """
    if is_quantized(w0) and layout.stack and layout.stack[0] == 0 and w0.stack_shape:
        inner = _sub_layout(layout)  # a quantized stack: one dequantized layer at a time
        return lax.map(lambda t: weight_norm(t[0], t[1], t[2], scale, inner), (w0, a, b))
    w = dequantized(w0)
    s = subscripts(layout_tags(layout))
    ns = len(layout.stack)
    out_l = s.b[ns + 1:]
    so = s.stack + out_l
    # ‖w0_o‖² as a contraction of W0 with itself over the input axes: no kernel-sized temporary
    # (a square-then-sum may be left unfused, writing W0² out, as XLA's CPU backend does)
    n0 = jnp.einsum(f"{s.view},{s.view}->{so}", w, w, preferred_element_type=jnp.float32, precision=_HI)
    p = jnp.einsum(f"{s.a},{s.view}->{s.stack}{s.rank}{out_l}", a.astype(w.dtype), w,
                   preferred_element_type=jnp.float32, precision=_HI)
    a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
    r2 = "Z"  # a letter subscripts never draws for these few axes
    g = jnp.einsum(f"{s.a},{s.a[:-1]}{r2}->{s.stack}{s.rank}{r2}", a32, a32, precision=_HI)
    cross = jnp.einsum(f"{s.b},{s.stack}{s.rank}{out_l}->{so}", b32, p, precision=_HI)
    gb = jnp.einsum(f"{s.stack}{s.rank}{r2},{s.stack}{r2}{out_l}->{s.stack}{s.rank}{out_l}", g, b32, precision=_HI)
    quad = jnp.einsum(f"{s.b},{s.stack}{s.rank}{out_l}->{so}", b32, gb, precision=_HI)
    return jnp.sqrt(jnp.maximum(n0 + 2.0 * scale * cross + scale * scale * quad, 0.0))


def gain(w0: Any, a: jax.Array, b: jax.Array, m: jax.Array, scale: float, layout: Layout) -> jax.Array:
    """``m / ‖W0 + s·A·B‖`` (float32, ``layout.m_shape``), the norm a constant for gradients: what
    DoRA multiplies the adapted kernel's output units by."""
    norm = lax.stop_gradient(weight_norm(w0, a, b, scale, layout))
    return m.astype(jnp.float32) / norm


def magnitude(w0: Any, a: jax.Array, b: jax.Array, scale: float, layout: Layout, dtype: Any) -> jax.Array:
    """DoRA's initial magnitude: the norms of the initial adapted kernel (``‖W0‖`` when B = 0),
    so the injected model starts as the base model."""
    return weight_norm(w0, a, b, scale, layout).astype(dtype)


def gain_in_kernel_order(w: jax.Array, m: jax.Array, layout: Layout) -> jax.Array:
    """``m / ‖w‖`` for a dense (merged) kernel ``w``, shaped to broadcast against ``w`` (size 1 on
    the input axes); the norm a constant for gradients."""
    norm = lax.stop_gradient(jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=tuple(layout.in_),
                                              keepdims=True)))
    axes = list(layout.stack) + list(layout.out)  # m's axes, as kernel axes
    order = sorted(range(len(axes)), key=lambda k: axes[k])
    mk = jnp.transpose(m.astype(jnp.float32), order) if order != list(range(len(axes))) else m.astype(jnp.float32)
    mk = jnp.reshape(mk, norm.shape)
    return mk / norm
