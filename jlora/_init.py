"""Adapter initialisations beyond LoRA's Gaussian A and zero B: PiSSA, OLoRA, LoftQ.

Each works on the kernel as a matrix per stacked layer, ``M = W`` laid out ``(in, out)`` (input
axes flattened in the layout's order, output axes likewise): jlora's ``A`` is ``(in, r)`` and
``B`` is ``(r, out)`` of that matrix, so ``ΔW = A·B``.

* **PiSSA** (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation
  of Large Language Models", §3): with ``M = U S Vᵀ``, ``A = U_r √(S_r/s)`` and
  ``B = √(S_r/s) V_rᵀ`` (PEFT's ``pissa_init``: the scale is divided out of the singular values),
  so ``s·A·B`` is M's best rank-r approximation. ``pissa_niter_N`` takes the top-r singular
  triplets from the randomised SVD of Halko, Martinsson & Tropp 2011 (Algorithm 4.4, subspace
  iteration with N power iterations, then Algorithm 5.1), as ``torch.svd_lowrank(M, q=r, niter=N)``
  that PEFT calls.
* **OLoRA** (Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models",
  §3): the QR decomposition of the torch weight ``Mᵀ = Q R``; ``B = Q_rᵀ``, ``A = R_rᵀ`` (the
  first r columns of Q and rows of R), unscaled, as PEFT's ``olora_init``.
* **LoftQ** (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language
  Models", Algorithm 1): alternately quantize and decompose, starting from ``A·B = 0``:
  ``Q_t = NF4(W − s·A_{t−1}·B_{t−1})`` and ``A_t, B_t`` = the rank-r SVD of ``W − Q_t`` (split as
  for PiSSA), for T iterations; the base becomes ``Q_T``, so ``Q_T + s·A_T·B_T ≈ W`` more closely
  than NF4 alone.

PiSSA and OLoRA move part of W into the adapter. PEFT subtracts it from the base weights; jlora
keeps the original W and the initial factors ``a0``, ``b0`` in the node instead, and computes
``W + s·(A·B − A0·B0)`` unmerged (a rank-2r adapter whose second half is frozen): the model starts
as exactly the base model, the base stays the user's unmodified weights (``split``, checkpoints,
``merge`` all see them), and the adapter is at every step already what PEFT's
``path_initial_model_for_weight_conversion`` converts to. LoftQ's base is its quantized ``Q_T``.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jlora._node import Layout
from jlora._quant import NF4Tensor, dequantized, is_quantized

__all__ = ["INITS", "Init", "parse_init", "fingerprint", "to_matrix", "from_matrix", "svd_lowrank", "pissa",
           "olora", "loftq"]

#: The values ``inject(..., init=...)`` takes (``N`` a positive integer).
INITS = ("default", "gaussian", "pissa", "pissa_niter_N", "olora", "loftq", "loftq_iter_N")
_HI = jax.lax.Precision.HIGHEST


class Init(NamedTuple):
    """A parsed ``init``: its canonical name, kind and iteration count."""

    name: Optional[str]  # None for jlora's default
    kind: str  # 'default' | 'gaussian' | 'pissa' | 'olora' | 'loftq'
    n: Optional[int] = None  # pissa_niter_N: N; loftq: iterations

    @property
    def modifies_base(self) -> bool:
        return self.kind in ("pissa", "olora", "loftq")


def parse_init(init: Any) -> Init:
    """Check and parse ``inject``'s ``init``.

    Example:
        >>> parse_init("pissa_niter_4"), parse_init(None).kind
        (Init(name='pissa_niter_4', kind='pissa', n=4), 'default')
    """
    if init is None or init == "default":
        return Init(None, "default")
    if isinstance(init, str):
        low = init.lower()
        if low in ("gaussian", "pissa", "olora"):
            return Init(low, low)
        if low == "loftq":
            return Init("loftq", "loftq", 1)
        m = re.fullmatch(r"(pissa_niter|loftq_iter)_(\d+)", low)
        if m and int(m.group(2)) > 0:
            return Init(low, "pissa" if m.group(1) == "pissa_niter" else "loftq", int(m.group(2)))
    raise ValueError(f"inject: init must be one of {', '.join(INITS)} (N a positive integer), got {init!r}.")


def fingerprint(x: Any) -> str:
    """sha256 of a kernel's stored arrays (every child of a quantized node), with shapes and dtypes:
    what an adapter made by a weight-modifying init records of the base it is valid over.

    Example:
        >>> fingerprint(jnp.zeros((2, 2))) == fingerprint(np.zeros((2, 2), np.float32))
        True
    """
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(x):
        a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# -- the kernel as a matrix per stacked layer ------------------------------------------------------------


def to_matrix(w: jax.Array, layout: Layout) -> jax.Array:
    """``(S, in, out)``: the kernel transposed to stack + in + out and flattened per group."""
    perm = list(layout.stack) + list(layout.in_) + list(layout.out)
    t = jnp.transpose(w, perm)
    s = int(math.prod(w.shape[i] for i in layout.stack))
    return t.reshape(s, layout.fan_in(w.shape), -1)


def from_matrix(a: jax.Array, b: jax.Array, layout: Layout, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Factors ``(S, in, r)``, ``(S, r, out)`` of :func:`to_matrix`'s matrix -> jlora's A and B."""
    r = a.shape[-1]
    return a.reshape(layout.a_shape(shape, r)), b.reshape(layout.b_shape(shape, r))


def _split_svd(u, s, vh, r: int, scale: float):
    """``A = U_r √(S_r/scale)``, ``B = √(S_r/scale) V_rᵀ`` (PEFT's PiSSA split)."""
    root = jnp.sqrt(s[..., :r] / scale)
    return u[..., :, :r] * root[..., None, :], root[..., :, None] * vh[..., :r, :]


@functools.partial(jax.jit, static_argnames=("r", "niter"))
def svd_lowrank(m: jax.Array, key: jax.Array, r: int, niter: int):
    """Randomised truncated SVD of ``m`` (``(..., p, q)``) to rank ``r``: Halko et al. 2011,
    Algorithm 4.4 (subspace iteration, ``niter`` power iterations, re-orthonormalised) and
    Algorithm 5.1, as ``torch.svd_lowrank(m, q=r, niter=niter)``. Returns ``(U, S, Vᵀ)``.

    Example:
        >>> m = jax.random.normal(jax.random.key(0), (20, 3)) @ jax.random.normal(jax.random.key(1), (3, 12))
        >>> u, s, vh = svd_lowrank(m, jax.random.key(2), r=3, niter=2)
        >>> bool(jnp.allclose(u * s[None] @ vh, m, atol=1e-4))
        True
    """
    omega = jax.random.normal(key, m.shape[:-2] + (m.shape[-1], r), m.dtype)
    mt = jnp.swapaxes(m, -1, -2)
    q = jnp.linalg.qr(jnp.matmul(m, omega, precision=_HI))[0]
    for _ in range(niter):
        q = jnp.linalg.qr(jnp.matmul(mt, q, precision=_HI))[0]
        q = jnp.linalg.qr(jnp.matmul(m, q, precision=_HI))[0]
    small = jnp.matmul(jnp.swapaxes(q, -1, -2), m, precision=_HI)
    u, s, vh = jnp.linalg.svd(small, full_matrices=False)
    return jnp.matmul(q, u, precision=_HI), s, vh


@functools.partial(jax.jit, static_argnames=("r", "scale"))
def _pissa_full(m, r: int, scale: float):
    u, s, vh = jnp.linalg.svd(m, full_matrices=False)
    return _split_svd(u, s, vh, r, scale)


def pissa(w: Any, layout: Layout, r: int, scale: float, niter: Optional[int] = None,
          key: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """PiSSA's initial ``(A, B)`` (float32, jlora's layout) for kernel ``w``: ``s·A·B`` is its best
    rank-r approximation per stacked layer (full SVD, or randomised with ``niter``).

    Example:
        >>> w = jax.random.normal(jax.random.key(0), (6, 5))
        >>> a, b = pissa(w, Layout((), (0,), (1,)), r=5, scale=2.0)
        >>> bool(jnp.allclose(2.0 * a @ b, w, atol=1e-5))
        True
    """
    m = to_matrix(dequantized(w).astype(jnp.float32), layout)
    if niter is None:
        a, b = _pissa_full(m, r, float(scale))
    else:
        u, s, vh = svd_lowrank(m, jax.random.key(0) if key is None else key, r, niter)
        a, b = _split_svd(u, s, vh, r, float(scale))
    return from_matrix(a, b, layout, tuple(w.shape))


@functools.partial(jax.jit, static_argnames=("r",))
def _olora(m, r: int):
    q, rr = jnp.linalg.qr(jnp.swapaxes(m, -1, -2))  # the torch weight (out, in) = Q R
    return jnp.swapaxes(rr[..., :r, :], -1, -2), jnp.swapaxes(q[..., :, :r], -1, -2)


def olora(w: Any, layout: Layout, r: int) -> tuple[jax.Array, jax.Array]:
    """OLoRA's initial ``(A, B)`` (float32): ``A = R_rᵀ``, ``B = Q_rᵀ`` of the QR decomposition of
    the ``(out, in)`` weight, per stacked layer.

    Example:
        >>> w = jax.random.normal(jax.random.key(0), (6, 4))
        >>> a, b = olora(w, Layout((), (0,), (1,)), r=4)
        >>> bool(jnp.allclose(a @ b, w, atol=1e-5)), bool(jnp.allclose(b @ b.T, jnp.eye(4), atol=1e-5))
        (True, True)
    """
    m = to_matrix(dequantized(w).astype(jnp.float32), layout)
    a, b = _olora(m, r)
    return from_matrix(a, b, layout, tuple(w.shape))


@functools.partial(jax.jit, static_argnames=("r", "scale", "perm", "sizes"))
def _residual_svd(w32, deq, r: int, scale: float, perm: tuple, sizes: tuple):
    m = jnp.transpose(w32 - deq, perm).reshape(sizes)
    u, s, vh = jnp.linalg.svd(m, full_matrices=False)
    return _split_svd(u, s, vh, r, scale)


def loftq(w: Any, layout: Layout, r: int, scale: float, iters: int = 1, block_size: int = 64,
          double_quant: bool = True) -> tuple[NF4Tensor, jax.Array, jax.Array]:
    """LoftQ (Algorithm 1): the NF4 base ``Q`` and initial ``(A, B)`` with ``Q + s·A·B ≈ w``.

    Example:
        >>> w = jax.random.normal(jax.random.key(0), (64, 32))
        >>> lay = Layout((), (0,), (1,))
        >>> q, a, b = loftq(w, lay, r=8, scale=1.0, iters=2)
        >>> plain = NF4Tensor.from_array(w).dequantize()
        >>> err = lambda x: float(jnp.linalg.norm(w - x))
        >>> err(q.dequantize() + a @ b) < err(plain)
        True
    """
    if is_quantized(w):
        raise ValueError("LoftQ quantizes the dense weights itself: pass the unquantized base.")
    from jlora._value import delta

    shape = tuple(w.shape)
    w32 = jnp.asarray(w, jnp.float32)
    perm = tuple(layout.stack) + tuple(layout.in_) + tuple(layout.out)
    sizes = (int(math.prod(shape[i] for i in layout.stack)), layout.fan_in(shape), -1)
    target = w32
    for t in range(iters):
        q = NF4Tensor.from_array(target.astype(w.dtype), block_size=block_size, double_quant=double_quant)
        a, b = _residual_svd(w32, q.dequantize().astype(jnp.float32), r, float(scale), perm, sizes)
        a, b = from_matrix(a, b, layout, shape)
        if t + 1 < iters:
            target = w32 - scale * delta(a, b, layout, jnp.float32)
    return q, a, b
