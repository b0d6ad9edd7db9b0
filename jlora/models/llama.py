"""A Llama decoder in Flax linen, laid out like Hugging Face's ``LlamaForCausalLM``.

The module names follow transformers', so parameter paths read the same way::

    params['embed_tokens']['embedding']                          (vocab, hidden)
    params['layers_0']['input_layernorm']['scale']               (hidden,)
    params['layers_0']['self_attn']['q_proj']['kernel']          (hidden, heads * head_dim)
    params['layers_0']['self_attn']['k_proj' | 'v_proj']['kernel']  (hidden, kv_heads * head_dim)
    params['layers_0']['self_attn']['o_proj']['kernel']          (heads * head_dim, hidden)
    params['layers_0']['post_attention_layernorm']['scale']      (hidden,)
    params['layers_0']['mlp']['gate_proj' | 'up_proj']['kernel'] (hidden, intermediate)
    params['layers_0']['mlp']['down_proj']['kernel']             (intermediate, hidden)
    params['norm']['scale']                                      (hidden,)
    params['lm_head']['kernel']                                  (hidden, vocab), only if untied

Every kernel is a 2-D ``(in, out)`` Flax kernel (the transpose of torch's ``(out, in)`` weight).
With ``LlamaConfig(scan_layers=True)`` the layers are one ``nn.scan``-ned module named ``layers``
and each of its leaves carries a leading layer axis (``params['layers']['self_attn']['q_proj']
['kernel']`` has shape ``(num_layers, hidden, heads * head_dim)``);
:func:`stack_layer_params` and :func:`unstack_layer_params` convert between the two layouts.

Everything is functional: the KV cache is a plain dict of arrays from :func:`init_cache` that goes
in and comes out of ``model.apply``; no Flax mutable collections are used, so ``model.apply`` can be
traced through any JAX transform.

Training at scale (see :class:`LlamaConfig`): attention is :func:`jax.nn.dot_product_attention`
(cuDNN flash attention on an NVIDIA GPU, so no ``(batch, heads, seq, seq)`` scores are stored),
``remat`` re-computes each layer in the backward pass, and ``model.apply(params, tokens,
labels=..., loss_mask=...)`` returns the cross-entropy computed over chunks of tokens
(:func:`causal_lm_loss`), so the float32 logits of the whole batch never exist at once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

__all__ = [
    "CACHE_AXES",
    "LlamaConfig",
    "Llama",
    "causal_lm_loss",
    "attention_implementation",
    "REMAT_POLICIES",
    "remat_policy",
    "decode_unroll",
    "LOSS_CHUNK_BYTES",
    "PROJECTIONS",
    "LAYER_INPUT",
    "init_cache",
    "generate",
    "left_pad",
    "stack_layer_params",
    "unstack_layer_params",
    "from_pretrained",
    "save_pretrained",
    "save_gguf",
]

Array = jax.Array
# {'k', 'v': (layers, batch, max_len, kv_heads, head_dim), 'pos': (batch, max_len), 'index': ()}
Cache = dict

_INIT = nn.initializers.normal(stddev=0.02)

#: The batch axis of each entry of a KV cache from :func:`init_cache` (``index`` is shared by the
#: whole batch): ``batch_axes={"cache": CACHE_AXES}`` and ``out_axes=(0, CACHE_AXES)`` for a
#: mixed-adapter ``apply`` (``jlora.stack_adapters``) with a cache.
CACHE_AXES = {"k": 1, "v": 1, "pos": 0, "index": None}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Shape and numerics of a Llama decoder.

    Attributes:
        vocab_size: Number of tokens.
        hidden_size: Model width ``d``.
        intermediate_size: Width of the SwiGLU MLP.
        num_layers: Number of decoder layers.
        num_heads: Number of query heads.
        num_kv_heads: Number of key/value heads (grouped-query attention); divides ``num_heads``.
        head_dim: Width of one attention head (even, for RoPE).
        rope_theta: RoPE base frequency.
        rms_norm_eps: Epsilon of the RMS norms.
        tie_embeddings: Whether the output projection is the transposed input embedding.
        dtype: Compute dtype of activations (norms and softmax always run in float32).
        param_dtype: Dtype that freshly initialised parameters get.
        scan_layers: Run the layers as one ``nn.scan`` over stacked parameters.
        qkv_bias: Give the q/k/v projections a bias (Qwen2); the params then hold
            ``self_attn/{q,k,v}_proj/bias``.
        rope_scaling: ``None``, or transformers' RoPE scaling parameters as a mapping:
            ``{'rope_type': 'linear', 'factor': f}`` or ``{'rope_type': 'llama3', 'factor': ...,
            'low_freq_factor': ..., 'high_freq_factor': ..., 'original_max_position_embeddings':
            ...}`` (Llama 3.1+). Stored as a sorted tuple of ``(key, value)`` pairs so that the
            config stays hashable; ``dict(cfg.rope_scaling)`` reads it back.
        sliding_window: Mistral's sliding-window attention: a query at position ``p`` sees keys at
            positions ``p - sliding_window < q <= p`` (``None``: every earlier key).
        max_position_embeddings: The context length the model was trained for (written to
            ``config.json`` and GGUF metadata; not used in the computation).
        attention: Implementation of :func:`jax.nn.dot_product_attention` for training and
            cache-free calls: ``None`` (default) chooses, per call, ``'cudnn'`` (flash attention:
            no ``(batch, heads, seq, seq)`` scores are stored) on an NVIDIA GPU when the compute
            dtype is bfloat16/float16 and the head width allows it, else ``'xla'`` (the plain
            softmax, what every CPU run gets); ``'xla'`` or ``'cudnn'`` force one (``'cudnn'``
            raises where cuDNN cannot run it). Calls with a KV cache always use ``'xla'``
            (:func:`attention_implementation` says what a call gets).
        remat: What each decoder layer keeps for the backward pass (a per-layer
            ``jax.checkpoint``, inside the ``nn.scan`` body with ``scan_layers``): ``None``
            (no checkpoint: whatever autodiff saves), ``'full'`` (only the layer's input; the
            backward runs the layer's forward again), ``'lora'`` (as ``'full'``, plus jlora's
            rank-r products ``x·A``), ``'offload'`` (as ``'lora'``, but the layer's input waits
            for the backward pass in the host's pinned memory, not on the device; needs
            ``scan_layers=True``: with unrolled layers every cache-free call raises, even one
            that is not differentiated; on a CPU, whose device memory is the host's, it is
            ``'lora'``)
            ``'dots'`` (every projection's output and the attention's; RMSNorm, RoPE and
            SiLU are re-computed, no matmul is) or ``'attention'`` (as ``'dots'`` for the
            attention block; the MLP's gate and up projections run again: about a third of
            ``'dots'``' bytes, for microbatches that must fit beside a large base). See
            :data:`REMAT_POLICIES`. ``'auto'``
            (default) is ``'dots'`` with ``scan_layers`` (a scan otherwise stacks float32 copies
            and every SwiGLU intermediate per layer: about twice the bytes, written and read back
            each step) and ``None`` without (XLA fuses those copies away in an unrolled model).
            The same on every backend; on a CPU ``'dots'`` costs the scanned demo no time. Only
            training uses it: calls with a cache ignore it. :func:`remat_policy` says what a
            config gets.
        loss_chunk_tokens: How :func:`causal_lm_loss` (``model.apply(..., labels=...)``) splits
            the tokens: ``None`` (default) into chunks whose float32 logits take at most
            :data:`LOSS_CHUNK_BYTES` (256 MiB), and not at all when the whole batch fits (so a
            small batch, like the CPU demo's, computes exactly the plain cross-entropy);
            ``0`` never splits; ``n`` splits into chunks of about ``n`` tokens.
        loss_grad_in_forward: When the chunked loss is differentiated, compute each chunk's
            gradient in the forward pass, from the logits it has just made (``True``, default:
            the backward pass only scales it), or re-compute each chunk's logits in the backward
            pass (``False``). Same result up to rounding; with a frozen head ``True`` runs one
            head matmul fewer (an adapted head, or one trained in full, gets the re-computing
            form's cost). ``True`` rules out forward-mode differentiation (``jax.jvp``) through
            the chunked loss. See :func:`causal_lm_loss`.
        decode_unroll: With ``scan_layers``, how many layers one iteration of the layer scan
            runs in calls with a cache (generation): ``None`` (default) is every layer on an
            NVIDIA GPU (the scan is unrolled, so XLA reads each layer's weights in place rather
            than copying them out of the stacked arrays every step: a design-shape decode step
            on the H200 went from 5.5 to 4.2 ms) and 1 elsewhere (on a CPU unrolling made the
            demo's generation compile four times longer). :func:`decode_unroll` says what a
            config gets.

    Example:
        >>> cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2,
        ...                   num_heads=4, num_kv_heads=2, head_dim=16)
        >>> cfg.replace(scan_layers=True).num_layers, cfg.num_heads // cfg.num_kv_heads
        (2, 2)
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    qkv_bias: bool = False
    rope_scaling: Any = None
    sliding_window: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    attention: Optional[str] = None
    remat: Optional[str] = "auto"
    loss_chunk_tokens: Optional[int] = None
    loss_grad_in_forward: bool = True
    decode_unroll: Optional[int] = None

    def __post_init__(self):
        if self.attention not in (None, "xla", "cudnn"):
            raise ValueError(f"attention must be None, 'xla' or 'cudnn', got {self.attention!r}.")
        if self.remat not in (None, "auto", *REMAT_POLICIES):
            raise ValueError(
                f"remat must be None, 'auto' or one of {sorted(REMAT_POLICIES)}, got {self.remat!r}."
            )
        if self.loss_chunk_tokens is not None and (
            not isinstance(self.loss_chunk_tokens, int) or self.loss_chunk_tokens < 0
        ):
            raise ValueError(f"loss_chunk_tokens must be None or an int >= 0, got {self.loss_chunk_tokens!r}.")
        if self.decode_unroll is not None:
            if isinstance(self.decode_unroll, bool) or not isinstance(self.decode_unroll, numbers.Integral) \
                    or self.decode_unroll < 1:
                raise ValueError(f"decode_unroll must be None or an int >= 1, got {self.decode_unroll!r}.")
            object.__setattr__(self, "decode_unroll", int(self.decode_unroll))
        if not isinstance(self.loss_grad_in_forward, (bool, np.bool_)):
            raise ValueError(f"loss_grad_in_forward must be True or False, got {self.loss_grad_in_forward!r}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}."
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE.")
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", _rope_scaling(self.rope_scaling))
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}.")

    def replace(self, **changes: Any) -> "LlamaConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------
# Building blocks.


_ROPE_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _rope_scaling(scaling: Any) -> tuple[tuple[str, Any], ...]:
    """``scaling`` (a mapping or pairs; transformers' ``type`` or ``rope_type`` key) as the sorted
    ``(key, value)`` pairs that :attr:`LlamaConfig.rope_scaling` holds, only the keys it uses."""
    scaling = dict(scaling)
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in _ROPE_KEYS:
        raise NotImplementedError(
            f"RoPE scaling of type {kind!r} is not implemented; supported: "
            f"{sorted(_ROPE_KEYS)} (and no scaling)."
        )
    missing = [k for k in _ROPE_KEYS[kind] if k not in scaling]
    if missing:
        raise ValueError(f"RoPE scaling {kind!r} needs {missing}; got {scaling}.")
    return tuple(sorted({"rope_type": kind, **{k: scaling[k] for k in _ROPE_KEYS[kind]}}.items()))


def rope_tables(
    positions: Array, *, head_dim: int, theta: float, scaling: Any = None
) -> tuple[Array, Array]:
    """Cosine and sine tables of rotary embeddings: float32, ``positions.shape + (head_dim,)``.

    The frequencies are repeated, not interleaved (``[f0..f_{d/2-1}, f0..f_{d/2-1}]``), to go with
    :func:`apply_rope`'s rotate-half convention (the one transformers uses).

    ``scaling`` (:attr:`LlamaConfig.rope_scaling`) rescales the inverse frequencies exactly as
    transformers' ``ROPE_INIT_FUNCTIONS`` do: ``'linear'`` divides all of them by ``factor``;
    ``'llama3'`` divides those of wavelength above ``original_max_position_embeddings /
    low_freq_factor`` by ``factor``, keeps those below ``original_max_position_embeddings /
    high_freq_factor`` and interpolates smoothly in between. Neither changes the amplitude.

    Example:
        >>> pos = jnp.arange(4)[None]
        >>> cos, _ = rope_tables(pos, head_dim=8, theta=10000.0)
        >>> cos2, _ = rope_tables(2 * pos, head_dim=8, theta=10000.0,
        ...                       scaling={"rope_type": "linear", "factor": 2.0})
        >>> cos.shape, bool(jnp.allclose(cos, cos2, atol=1e-6))
        ((1, 4, 8), True)
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is not None:
        scaling = dict(_rope_scaling(scaling))
        kind = scaling["rope_type"]
        factor = float(scaling["factor"])
        if kind == "linear":
            inv_freq = inv_freq / factor
        else:  # llama3, as transformers' _compute_llama3_parameters (float32 throughout)
            low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
            old_len = float(scaling["original_max_position_embeddings"])
            wavelen = 2 * math.pi / inv_freq
            scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
            smooth = (old_len / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
            inv_freq = jnp.where(medium, smoothed, scaled)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate ``x`` (batch, seq, heads, head_dim) by position: ``x·cos + rotate_half(x)·sin``."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, with a learned ``scale``."""

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * scale.astype(jnp.float32)).astype(self.dtype)


def _dense(cfg: LlamaConfig, features: int, name: str, bias: bool = False) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=bias,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=_INIT,
        name=name,
    )


def _norm(cfg: LlamaConfig, name: str) -> RMSNorm:
    return RMSNorm(eps=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)


# ----------------------------------------------------------------------------------------------
# Attention, remat policies and the chunked loss.

#: Checkpoint names of the projections' outputs (the Flax module names).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: Checkpoint name of a decoder layer's input (what ``remat='offload'`` sends to the host).
LAYER_INPUT = "layer_input"


def _project(cfg: LlamaConfig, features: int, name: str, x: Array, bias: bool = False) -> Array:
    """A projection, its output named ``name`` for remat policies (:data:`REMAT_POLICIES`)."""
    return checkpoint_name(_dense(cfg, features, name, bias)(x), name)


def _attention_saveable(prim: Any, *_: Any, **__: Any) -> bool:
    """cuDNN attention's forward (its output and softmax statistics: what its backward reads)."""
    return prim.name.startswith("dot_product_attention_fwd")


_cp = jax.checkpoint_policies

#: ``LlamaConfig.remat`` names and the ``jax.checkpoint`` policy each one applies per layer:
#:
#: * ``'full'``: nothing is saved but the layer's input; the backward pass runs the layer's
#:   forward again (one more forward pass in all: about 6·N instead of 4·N FLOPs a token for a
#:   frozen base).
#: * ``'offload'``: as ``'lora'``, but the layer's input (checkpoint name :data:`LAYER_INPUT`)
#:   is copied to the host's pinned memory in the forward pass and back in the backward pass, so
#:   that no layer input stays on the device between the two (a Llama-3-8B at 8 × 2048 tokens:
#:   4 GiB). Scanned layers only. On an H200 (JAX 0.11.2) XLA does not overlap the copies with
#:   compute: the 8B step takes 7–9 % longer than under ``'full'`` (benchmarks/RESULTS.md).
#: * ``'lora'``: as ``'full'``, but jlora's rank-r products ``x·A`` (checkpoint name
#:   ``'jlora_xa'``, N × r each) are kept.
#: * ``'dots'``: every projection's output (checkpoint names :data:`PROJECTIONS`: with LoRA, the
#:   sum ``x·W0 + s·(x·A)·B``, not its two terms), the attention output (``'attn_out'``), jlora's
#:   ``x·A`` and cuDNN attention's forward results are kept; RMSNorm, RoPE, SiLU (and the softmax
#:   of XLA's attention) are re-computed. No projection runs twice, and what is kept is in the
#:   compute dtype: without a policy, a scanned layer stacks the float32 copies that RMSNorm and
#:   RoPE make and every SwiGLU intermediate (``lax.scan`` saves whatever the backward reads,
#:   where an unrolled layer leaves XLA free to fuse such copies away).
#: * ``'attention'``: as ``'dots'`` for the attention block (the q, k, v and o projections'
#:   outputs, the attention output and cuDNN's forward results, jlora's ``x·A``), nothing of the
#:   MLP: its gate and up projections run again in the backward pass (about half a layer's forward
#:   FLOPs at Llama's shapes), for a third of ``'dots'``' bytes (the two ``intermediate_size``-wide
#:   outputs are the bulk of them). Meant for small microbatches (gradient accumulation) beside a
#:   base that takes most of the device: a Llama-3-8B keeps 1.8 GiB a 2048-token sequence,
#:   against 5.4 GiB under ``'dots'``.
REMAT_POLICIES: dict[str, Callable[..., Any]] = {
    "full": _cp.nothing_saveable,
    "offload": _cp.save_and_offload_only_these_names(
        names_which_can_be_saved=["jlora_xa"], names_which_can_be_offloaded=[LAYER_INPUT],
        offload_src="device", offload_dst="pinned_host",
    ),
    "lora": _cp.save_only_these_names("jlora_xa"),
    "dots": _cp.save_from_both_policies(
        _attention_saveable, _cp.save_only_these_names(*PROJECTIONS, "attn_out", "jlora_xa")
    ),
    "attention": _cp.save_from_both_policies(
        _attention_saveable,
        _cp.save_only_these_names("q_proj", "k_proj", "v_proj", "o_proj", "attn_out", "jlora_xa"),
    ),
}

#: Largest float32 logits (bytes) one chunk of :func:`causal_lm_loss` makes when
#: ``loss_chunk_tokens`` is None.
LOSS_CHUNK_BYTES = 256 * 2**20


def remat_policy(config: LlamaConfig) -> Optional[str]:
    """The :data:`REMAT_POLICIES` name a config's training calls use (``None``: no checkpoint).

    Example:
        >>> cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2,
        ...                   num_heads=4, num_kv_heads=2, head_dim=16)
        >>> remat_policy(cfg), remat_policy(cfg.replace(scan_layers=True)), remat_policy(cfg.replace(remat="full"))
        (None, 'dots', 'full')
    """
    if config.remat == "auto":
        return "dots" if config.scan_layers else None
    return config.remat


def decode_unroll(config: LlamaConfig) -> int:
    """The ``unroll`` of the layer scan in calls with a cache (see ``LlamaConfig.decode_unroll``).

    Example:
        >>> cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2,
        ...                   num_heads=4, num_kv_heads=2, head_dim=16, scan_layers=True)
        >>> decode_unroll(cfg.replace(decode_unroll=2)), decode_unroll(cfg) in (1, 2)
        (2, True)
    """
    if config.decode_unroll is not None:
        return min(config.decode_unroll, config.num_layers)
    return config.num_layers if _on_cuda() else 1


def _on_cuda() -> bool:
    try:
        if jax.default_backend() != "gpu":
            return False
        from jax.extend import backend as jex_backend

        return "cuda" in jex_backend.get_backend().platform_version.lower()
    except Exception:  # pragma: no cover - unusual installs
        return False


def attention_implementation(
    config: LlamaConfig, *, dtype: Any = None, query_len: int = 2, key_len: int = 2,
    masked: bool = False, cache: bool = False,
) -> str:
    """The ``implementation`` that :class:`Llama` passes to :func:`jax.nn.dot_product_attention`.

    ``config.attention`` when set; otherwise ``'cudnn'`` on a CUDA GPU where cuDNN's flash
    attention takes the call (bfloat16/float16, head width a multiple of 8 and at most 128, even
    lengths when a padding mask becomes its bias), else ``'xla'``. Calls with a KV cache always
    get ``'xla'`` (see :class:`Attention`).

    Example:
        >>> cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2,
        ...                   num_heads=4, num_kv_heads=2, head_dim=16)
        >>> attention_implementation(cfg, dtype=jnp.float32)
        'xla'
    """
    if cache:
        return "xla"
    if config.attention is not None:
        return config.attention
    dtype = jnp.dtype(config.dtype if dtype is None else dtype)
    ok = (
        dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and config.head_dim % 8 == 0
        and config.head_dim <= 128
        and not (masked and (query_len % 2 or key_len % 2))
    )
    return "cudnn" if ok and _on_cuda() else "xla"


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE and an optional KV cache (HF: ``self_attn``).

    Without a cache (training, scoring, cache-free prefill) the keys are this call's own tokens
    and :func:`jax.nn.dot_product_attention` runs with ``is_causal=True`` and, only when
    ``mask`` (``(batch, 1, 1, keys)``: padding) is given, a key mask; K and V keep their
    ``num_kv_heads`` heads (the function groups query head ``h`` with KV head
    ``h // (num_heads // num_kv_heads)``, like transformers' ``repeat_kv``). With cuDNN that is
    flash attention: nothing of size ``seq × seq`` is stored for the backward pass.

    With a cache the keys are every cache slot and ``mask`` (``(batch, 1, seq, slots)``) says
    which slots each query sees (slot order and padding, from ``cache['pos']``). That call also
    goes through :func:`jax.nn.dot_product_attention`, but always with ``implementation='xla'``:
    cuDNN would take the mask only as a dense additive bias (its sequence-length form cannot say
    "left padding" or "start at slot ``index``"), and a decode step of one query gains nothing
    from flash attention. Generation never differentiates, so no scores are kept either way.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        cos: Array,
        sin: Array,
        mask: Optional[Array],
        kv: Optional[tuple[Array, Array]],
        index: Any,
    ) -> tuple[Array, Optional[tuple[Array, Array]]]:
        cfg = self.config
        batch, seq, _ = x.shape
        heads, kv_heads, dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.qkv_bias
        q = _project(cfg, heads * dim, "q_proj", x, bias).reshape(batch, seq, heads, dim)
        k = _project(cfg, kv_heads * dim, "k_proj", x, bias).reshape(batch, seq, kv_heads, dim)
        v = _project(cfg, kv_heads * dim, "v_proj", x, bias).reshape(batch, seq, kv_heads, dim)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)

        if kv is None:
            impl = attention_implementation(
                cfg, dtype=q.dtype, query_len=seq, key_len=seq, masked=mask is not None
            )
            if mask is not None and impl == "cudnn":  # cuDNN takes a mask as a (.., T, S) bias
                mask = jnp.broadcast_to(mask, (batch, 1, seq, seq))
            out = jax.nn.dot_product_attention(
                q, k, v, mask=mask, is_causal=True, implementation=impl
            )
            new_kv = None
        else:
            k_cache, v_cache = kv
            k = k.astype(k_cache.dtype)
            v = v.astype(v_cache.dtype)
            keys = jax.lax.dynamic_update_slice(k_cache, k, (0, index, 0, 0))
            values = jax.lax.dynamic_update_slice(v_cache, v, (0, index, 0, 0))
            new_kv = (k, v)
            out = jax.nn.dot_product_attention(
                q, keys.astype(q.dtype), values.astype(q.dtype), mask=mask, implementation="xla"
            )
        out = checkpoint_name(out.reshape(batch, seq, heads * dim), "attn_out")
        return _project(cfg, cfg.hidden_size, "o_proj", out), new_kv


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))`` (HF: ``mlp``)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        gate = _project(cfg, cfg.intermediate_size, "gate_proj", x)
        up = _project(cfg, cfg.intermediate_size, "up_proj", x)
        return _project(cfg, cfg.hidden_size, "down_proj", nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: attention and MLP, each with a residual connection."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        cos: Array,
        sin: Array,
        mask: Optional[Array],
        kv: Optional[tuple[Array, Array]],
        index: Any,
    ) -> tuple[Array, Optional[tuple[Array, Array]]]:
        cfg = self.config
        x = checkpoint_name(x, LAYER_INPUT)
        h = _norm(cfg, "input_layernorm")(x)
        attn, new_kv = Attention(cfg, name="self_attn")(h, cos, sin, mask, kv, index)
        x = x + attn
        h = _norm(cfg, "post_attention_layernorm")(x)
        x = x + MLP(cfg, name="mlp")(h)
        return x, new_kv


class LMHead(nn.Module):
    """The untied output projection (HF: ``lm_head``): one ``(hidden, vocab)`` kernel, no bias.

    The same parameter (``lm_head/kernel``) and product as ``nn.Dense(vocab, use_bias=False)``;
    a module of its own so that :func:`causal_lm_loss` can take the kernel and compute the
    product chunk by chunk.
    """

    config: LlamaConfig

    def setup(self):
        cfg = self.config
        shape = (cfg.hidden_size, cfg.vocab_size)
        self.kernel = self.param("kernel", _INIT, shape, cfg.param_dtype)

    def __call__(self, x: Array) -> Array:
        return _head_logits(x, self.kernel, transposed=False, dtype=self.config.dtype)


def _head_logits(x: Array, kernel: Array, *, transposed: bool, dtype: Any) -> Array:
    """``x · kernel`` (or ``x · kernelᵀ`` for a tied embedding) in ``dtype``, as ``nn.Dense`` /
    ``nn.Embed.attend`` compute it (both operands cast to ``dtype`` first)."""
    x = jnp.asarray(x, dtype)
    w = jnp.asarray(kernel, dtype)
    if transposed:
        return jnp.dot(x, w.T)
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _chunk_nll(h: Array, kernel: Array, labels: Array, *, transposed: bool, dtype: Any) -> tuple[Array, Array, Array]:
    """``(logits, logsumexp, nll)`` of the rows of ``h``: float32 logits and per-row ``nll``."""
    logits = _head_logits(h, kernel, transposed=transposed, dtype=dtype).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return logits, lse, lse - jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]


def _nll_sum(h: Array, kernel: Array, labels: Array, weights: Array, *, transposed: bool, dtype: Any) -> Array:
    """``Σ weights · (logsumexp(logits) - logits[label])`` over the rows of ``h`` (float32)."""
    return jnp.sum(_chunk_nll(h, kernel, labels, transposed=transposed, dtype=dtype)[2] * weights)


def _chunk_logit_grads(hc: Array, kernel: Array, yc: Array, wc: Array, *, transposed: bool,
                       dtype: Any) -> tuple[Array, Array]:
    """One chunk's per-token ``nll`` (float32, unweighted) and the logits' cotangent
    ``w·(softmax - onehot)`` cast to the matmul dtype (as reverse-mode autodiff of
    :func:`_nll_sum` casts it; the results agree with autodiff's up to rounding)."""
    logits, lse, nll = _chunk_nll(hc, kernel, yc, transposed=transposed, dtype=dtype)
    hot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == yc[:, None]
    return nll, ((jnp.exp(logits - lse[:, None]) - hot) * wc[:, None]).astype(dtype)


def _zeros_of(shape: tuple[int, ...], *inputs: Array) -> Array:
    """float32 zeros of ``shape`` that vary over the same ``shard_map`` axes as ``inputs`` do (a
    scan's carry must start with the type its body gives it; outside ``shard_map`` plain zeros).
    Never given the kernel: an adapted kernel may reach only the ops jlora has rules for."""
    z = jnp.zeros((), jnp.float32)
    for x in inputs:
        z = z + jnp.sum(x[(slice(0, 0),) + (slice(None),) * (x.ndim - 1)]).astype(jnp.float32)
    return jnp.broadcast_to(z, shape)


def _vary_like(xs: tuple[Array, ...]) -> tuple[Array, ...]:
    """``xs``, each made to vary over every ``shard_map`` axis any of them varies over (a
    ``custom_vjp`` must give each input a cotangent of the input's type; an input that JAX would
    otherwise broadcast inside the rule gets its cotangent summed over those axes outside it).
    Unchanged outside ``shard_map`` or on a JAX without varying-axis types."""
    typeof = getattr(jax, "typeof", None)
    cast = getattr(jax.lax, "pcast", None)
    if typeof is None or (cast is None and not hasattr(jax.lax, "pvary")):
        return xs

    def varying(x):  # JAX >= 0.10: aval.manual_axis_type.varying; before: aval.vma
        aval = typeof(x)
        mat = getattr(aval, "manual_axis_type", None)
        return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()) or ())

    axes = [varying(x) for x in xs]
    union = frozenset().union(*axes)
    out = []
    for x, have in zip(xs, axes):
        missing = tuple(sorted(union - have))
        if missing:
            x = cast(x, missing, to="varying") if cast is not None else jax.lax.pvary(x, missing)
        out.append(x)
    return tuple(out)


def _chunked_nll_recompute(h: Array, kernel: Array, y: Array, w: Array, *, transposed: bool,
                           dtype: Any) -> Array:
    """``Σ w·nll`` over chunks ``h[i]`` (``(count, size, d)``), each under ``jax.checkpoint``:
    the backward pass computes a chunk's logits again rather than storing them."""
    nll = functools.partial(_nll_sum, transposed=transposed, dtype=dtype)
    chunk_nll = jax.checkpoint(nll, policy=jax.checkpoint_policies.nothing_saveable)

    def body(acc, xs):
        hc, yc, wc = xs
        return acc + chunk_nll(hc, kernel, yc, wc), None

    total, _ = jax.lax.scan(body, _zeros_of((), h, y, w), (h, y, w))
    return total


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_nll_forward(h: Array, kernel: Array, y: Array, w: Array, transposed: bool, dtype: Any) -> Array:
    """As :func:`_chunked_nll_recompute`, whose primal it is; differentiated, its forward pass
    also computes each chunk's gradient (see :func:`_forward_grads`)."""
    return _chunked_nll_recompute(h, kernel, y, w, transposed=transposed, dtype=dtype)


def _forward_grads(h, kernel, y, w, transposed, dtype):
    """The forward pass with ``d/dh``: a chunk's logits give its per-token loss and, right away,
    ``d/dh = g·kernelᵀ`` (stacked: the residual), so the backward pass only scales it.

    The residuals also hold what the other gradients need: the per-token losses (``d/dw``) and
    ``h`` and the kernel, from which the backward pass re-computes the logits for ``d/dkernel``.
    When the kernel is not differentiated (a frozen LoRA head), that computation's result is
    unused and jit removes it."""

    def body(total, xs):
        hc, yc, wc = xs
        nll, g = _chunk_logit_grads(hc, kernel, yc, wc, transposed=transposed, dtype=dtype)
        dims = (((1,), (0 if transposed else 1,)), ((), ()))  # g·kernelᵀ, or g·kernel if (vocab, hidden)
        dh = jax.lax.dot_general(g, jnp.asarray(kernel, dtype), dims).astype(hc.dtype)
        return total + jnp.sum(nll * wc), (dh, nll)

    total, (dh, nll) = jax.lax.scan(body, _zeros_of((), h, y, w), (h, y, w))
    return total, (dh, nll, h, kernel, y, w)


def _backward_grads(transposed, dtype, res, g):
    """``g`` (the loss's cotangent) times each input's gradient: ``d/dh`` and ``d/dw`` (the
    per-token losses) from the forward pass, ``d/dkernel`` computed here chunk by chunk."""
    dh, nll, h, kernel, y, w = res
    g = jnp.asarray(g, jnp.float32)

    def body(dk, xs):
        hc, yc, wc = xs
        _, gl = _chunk_logit_grads(hc, kernel, yc, wc, transposed=transposed, dtype=dtype)
        hd = jnp.asarray(hc, dtype)
        lhs, rhs = (gl, hd) if transposed else (hd, gl)  # (hidden, vocab) = hᵀ·g, or its transpose
        return dk + jax.lax.dot_general(lhs, rhs, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32), None

    dk, _ = jax.lax.scan(body, _zeros_of(jnp.shape(kernel), h, y, w), (h, y, w))
    return ((dh.astype(jnp.float32) * g).astype(dh.dtype), (dk * g).astype(jnp.result_type(kernel)), None,
            (nll * g).astype(w.dtype))


_chunked_nll_forward.defvjp(_forward_grads, _backward_grads)


def _loss_chunks(n: int, vocab: int, chunk_tokens: Optional[int]) -> tuple[int, int]:
    """``(count, size)`` of the token chunks: ``count · size >= n`` with less than ``count`` padding."""
    if chunk_tokens == 0:
        return 1, n
    if chunk_tokens is None:
        chunk_tokens = max(1, LOSS_CHUNK_BYTES // (4 * vocab))
    count = -(-n // max(1, min(n, chunk_tokens)))
    return count, -(-n // count)


def causal_lm_loss(
    hidden: Array,
    kernel: Array,
    labels: Array,
    mask: Optional[Array] = None,
    *,
    transposed: bool = False,
    dtype: Any = None,
    chunk_tokens: Optional[int] = None,
    grad_in_forward: bool = True,
) -> Array:
    """Mean cross-entropy of ``hidden · kernel`` against ``labels``, a chunk of tokens at a time.

    The tokens (every position of ``hidden``, flattened) are cut into chunks; a ``lax.scan`` over
    the chunks computes each chunk's float32 logits, their log-sum-exp and the label's logit, and
    keeps only the sum: the logits of the whole batch (``tokens × vocab`` float32, 2 GiB for 16k
    tokens of a 32k vocabulary) never exist at once, only one chunk's. Differentiated, the chunks
    need their logits again; with ``grad_in_forward`` (default) each chunk's gradient,
    ``w·(softmax - onehot)`` times the kernel, is computed in the forward pass right after its
    logits (a ``jax.custom_vjp``; the backward pass only scales it), so no logits are computed
    twice for a frozen head. The kernel's own gradient, when the kernel is trained, re-computes
    the logits in the backward pass (for a frozen kernel jit drops that computation). Without
    it each chunk runs under ``jax.checkpoint`` and the backward pass computes its logits again. When everything fits in one chunk there is no scan
    and no re-computation: the result is the plain cross-entropy, computed the plain way.

    Call it inside the function that ``jlora.inject``/``apply`` traces (``Llama.__call__`` does,
    with ``labels=``), so that an adapted head is computed unmerged like any other kernel: the
    scan body closes over the kernel, and jlora evaluates the body (and the ``jax.checkpoint``
    in it) with the kernel unmerged (an adapted kernel is differentiated through the
    re-computing form: jlora inlines a ``custom_vjp`` that an adapted kernel reaches). The
    chunks run over tokens, not over the vocabulary, on purpose: token chunks leave the kernel
    whole and are independent of each other. Vocabulary
    chunks would slice the kernel's output axis: fed to ``lax.scan`` as ``xs`` that slice is
    refused by ``jlora.inject`` (one kernel axis would be both a stacked-layer axis and an output
    axis; jlora's scan rule slices adapted kernels only along stacked-layer axes); a
    ``lax.dynamic_slice`` of the closed-over kernel inside the body would be accepted, but needs
    an online log-sum-exp across chunks and the label's logit from whichever chunk holds it.

    Args:
        hidden: Final hidden states, ``(..., hidden)`` (after the last norm).
        kernel: The output projection, ``(hidden, vocab)``; ``(vocab, hidden)`` with
            ``transposed=True`` (a tied input embedding).
        labels: Integer targets, ``hidden.shape[:-1]``: ``labels[..., t]`` is the token that
            position ``t`` should predict (shift the input tokens yourself). Negative labels are
            ignored (weight 0), like transformers' ``-100``.
        mask: Optional weights, ``labels.shape``, e.g. 1 on answer tokens and 0 elsewhere.
        transposed: Whether ``kernel`` is ``(vocab, hidden)``.
        dtype: Dtype of the matmul (both operands are cast to it); defaults to ``hidden``'s.
            The logits are then cast to float32.
        chunk_tokens: Tokens per chunk: ``None`` for as many as keep one chunk's float32 logits
            within :data:`LOSS_CHUNK_BYTES`, ``0`` for no chunking.
        grad_in_forward: Compute the chunks' gradients in the forward pass (``True``) or
            re-compute their logits in the backward pass (``False``). Same result up to
            rounding; with a frozen kernel ``True`` runs one head matmul fewer. ``True`` cannot
            be differentiated in forward mode (``jax.jvp``).

    Returns:
        ``Σ w·nll / Σ w`` over all positions (float32 scalar; 0 when every weight is 0).

    Example:
        >>> h = jnp.ones((2, 5, 8)); w = jnp.full((8, 11), 0.1); y = jnp.zeros((2, 5), jnp.int32)
        >>> plain = causal_lm_loss(h, w, y, chunk_tokens=0)
        >>> bool(jnp.allclose(causal_lm_loss(h, w, y, chunk_tokens=3), plain)), round(float(plain), 4)
        (True, 2.3979)
    """
    d = hidden.shape[-1]
    vocab = kernel.shape[0] if transposed else kernel.shape[-1]
    dtype = hidden.dtype if dtype is None else dtype
    labels = jnp.asarray(labels)
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels have shape {labels.shape}, expected {hidden.shape[:-1]} (hidden's minus its last axis).")
    h = hidden.reshape(-1, d)
    y = labels.reshape(-1).astype(jnp.int32)
    w = (y >= 0).astype(jnp.float32)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.shape != labels.shape:
            raise ValueError(f"mask has shape {mask.shape}, expected the labels' {labels.shape}.")
        w = w * mask.reshape(-1).astype(jnp.float32)
    y = jnp.maximum(y, 0)
    n = h.shape[0]
    count, size = _loss_chunks(n, vocab, chunk_tokens)
    if count == 1:
        total = _nll_sum(h, kernel, y, w, transposed=transposed, dtype=dtype)
    else:
        pad = count * size - n
        if pad:
            h = jnp.pad(h, ((0, pad), (0, 0)))
            y, w = jnp.pad(y, (0, pad)), jnp.pad(w, (0, pad))
        xs = (h.reshape(count, size, d), y.reshape(count, size), w.reshape(count, size))
        if grad_in_forward:
            hc, kc, yc, wc = _vary_like((xs[0], jnp.asarray(kernel), xs[1], xs[2]))
            total = _chunked_nll_forward(hc, kc, yc, wc, transposed, dtype)
        else:
            total = _chunked_nll_recompute(xs[0], kernel, *xs[1:], transposed=transposed, dtype=dtype)
    denom = jnp.sum(w)
    return total / jnp.where(denom > 0, denom, 1.0)


class Llama(nn.Module):
    """Llama causal language model (Flax linen), parameter-compatible with HF's layout.

    Call as ``model.apply(params, tokens, positions=None, cache=None, labels=None, loss_mask=None)``:

    * without ``cache`` or ``labels``: returns logits ``(batch, seq, vocab)``;
    * with ``labels`` (``(batch, seq)`` int, ``labels[:, t]`` the token position ``t`` predicts;
      negative ones are ignored) and optionally ``loss_mask`` (``(batch, seq)`` weights): returns
      the mean cross-entropy, a float32 scalar, computed by :func:`causal_lm_loss` in chunks of
      ``config.loss_chunk_tokens`` tokens, so the full logits are never formed. The head matmul
      happens inside this call, so ``jlora.inject``'s ``apply`` computes an adapted ``lm_head`` (or
      tied embedding) unmerged here too;
    * with a cache from :func:`init_cache`: writes the new keys/values at ``cache['index']`` and
      returns ``(logits, new_cache)``.

    Logits are always float32. ``positions`` (int, ``(batch, seq)``) default to ``0..seq-1``
    (offset by ``cache['index']`` with a cache). A negative position marks a padding token: it is
    never attended to as a key. Attention is causal in the order tokens were fed (cache slot order).
    Without a cache, leaving ``positions`` out is the fastest path (plain causal attention, no
    mask); right padding needs no positions, since no real token ever attends to a later one.

    Attributes:
        config: The :class:`LlamaConfig`.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        *,
        positions: Optional[Array] = None,
        cache: Optional[Cache] = None,
        labels: Optional[Array] = None,
        loss_mask: Optional[Array] = None,
    ) -> Any:
        """Float32 logits; ``(logits, cache)`` with a cache; the mean loss with ``labels`` (see the
        class docstring). Over 60 lines on purpose: Flax defines submodules (the embedding, the
        layer stack, the head) only inline in the ``compact`` method, so they stay here; the
        positions and masks are :func:`_positions_and_mask`, the loss :func:`causal_lm_loss`."""
        cfg = self.config
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (batch, seq) int32, got shape {tokens.shape}.")
        if labels is not None and cache is not None:
            raise ValueError("labels (the loss) and cache (generation) cannot be used together.")
        if loss_mask is not None and labels is None:
            raise ValueError("loss_mask needs labels.")
        batch, seq = tokens.shape
        positions, mask, index, key_pos = _positions_and_mask(cfg, batch, seq, positions, cache)
        cos, sin = rope_tables(
            positions, head_dim=cfg.head_dim, theta=cfg.rope_theta, scaling=cfg.rope_scaling
        )

        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=_INIT,
            name="embed_tokens",
        )
        x = embed(tokens)

        layer_cls = DecoderLayer
        policy = remat_policy(cfg)
        if policy == "offload" and cache is None and not cfg.scan_layers and not self.is_initializing():
            raise ValueError(
                "LlamaConfig(remat='offload') needs scan_layers=True: with unrolled layers XLA on "
                "the GPU kept the inputs on the device (measured on an H200: more device memory, "
                "not less). Use remat='full' for unrolled layers, or stack them "
                "(stack_layer_params) and scan."
            )
        if policy is not None and cache is None:
            # Inside nn.scan, CSE across iterations cannot happen anyway (JAX's advice).
            layer_cls = nn.remat(
                DecoderLayer, policy=REMAT_POLICIES[policy], prevent_cse=not cfg.scan_layers
            )
        if cfg.scan_layers:
            kv = None if cache is None else (cache["k"], cache["v"])
            layers = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=cfg.num_layers,
                unroll=1 if cache is None else decode_unroll(cfg),
            )(cfg, name="layers")
            x, new_kv = layers(x, cos, sin, mask, kv, index)
        else:
            chunks = []
            for i in range(cfg.num_layers):
                kv_i = None if cache is None else (cache["k"][i], cache["v"][i])
                x, new_kv_i = layer_cls(cfg, name=f"layers_{i}")(x, cos, sin, mask, kv_i, index)
                chunks.append(new_kv_i)
            new_kv = None
            if cache is not None:
                new_kv = (jnp.stack([c[0] for c in chunks]), jnp.stack([c[1] for c in chunks]))

        x = _norm(cfg, "norm")(x)
        if labels is not None:
            if cfg.tie_embeddings:
                kernel, transposed = embed.embedding, True
            else:
                kernel, transposed = LMHead(cfg, name="lm_head").kernel, False
            return causal_lm_loss(
                x, kernel, labels, loss_mask, transposed=transposed, dtype=cfg.dtype,
                chunk_tokens=cfg.loss_chunk_tokens, grad_in_forward=cfg.loss_grad_in_forward,
            )
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = LMHead(cfg, name="lm_head")(x)
        logits = logits.astype(jnp.float32)

        if cache is None:
            return logits
        new_k, new_v = new_kv
        new_cache = {
            "k": jax.lax.dynamic_update_slice(cache["k"], new_k, (0, 0, index, 0, 0)),
            "v": jax.lax.dynamic_update_slice(cache["v"], new_v, (0, 0, index, 0, 0)),
            "pos": key_pos,
            "index": index + seq,
        }
        return logits, new_cache


def _positions_and_mask(cfg: LlamaConfig, batch: int, seq: int, positions: Optional[Array],
                        cache: Optional[Cache]) -> tuple[Array, Optional[Array], Optional[Array], Optional[Array]]:
    """``(positions, mask, index, key_pos)`` of one call: the tokens' RoPE positions, the attention
    mask (None: causal only), and with a cache its fill index and the cached keys' positions.

    Without a cache the keys are this call's tokens: causal attention, plus a key mask for padding
    (negative positions). With one, the keys are every slot of the cache: causal in slot order,
    padding never seen. Mistral's sliding window limits both to keys within the window before the
    query."""
    steps = jnp.arange(seq, dtype=jnp.int32)
    index = key_pos = None
    if cache is None:
        if positions is None:
            mask = None
            positions = jnp.broadcast_to(steps, (batch, seq))
        else:
            positions = jnp.asarray(positions, jnp.int32)
            mask = (positions >= 0)[:, None, None, :]
        if cfg.sliding_window is not None:
            window = positions[:, None, None, :] > positions[:, None, :, None] - cfg.sliding_window
            mask = window if mask is None else mask & window  # (batch, 1, seq, seq), with is_causal
        return positions, mask, index, key_pos
    index = jnp.asarray(cache["index"], jnp.int32)
    query_slot = index + steps
    if positions is None:
        positions = jnp.broadcast_to(query_slot, (batch, seq))
    positions = jnp.asarray(positions, jnp.int32)
    key_pos = jax.lax.dynamic_update_slice(cache["pos"], positions, (0, index))
    key_slot = jnp.arange(cache["pos"].shape[1], dtype=jnp.int32)
    mask = (key_slot[None, None, :] <= query_slot[None, :, None]) & (key_pos[:, None, :] >= 0)
    if cfg.sliding_window is not None:
        mask &= key_pos[:, None, :] > positions[:, :, None] - cfg.sliding_window
    return positions, mask[:, None], index, key_pos  # mask: (batch, 1, seq, slots)


# ----------------------------------------------------------------------------------------------
# KV cache and generation.


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype: Any = None) -> Cache:
    """An empty KV cache: a plain dict of arrays to pass as ``model.apply(..., cache=cache)``.

    Args:
        config: The model's config.
        batch: Batch size.
        max_len: Number of slots, i.e. the most tokens (prompt, padding included, plus generated)
            the cache can hold. Writing past it is not checked (``dynamic_update_slice`` clamps).
        dtype: Dtype of keys and values; defaults to ``config.dtype``.

    Returns:
        ``{'k', 'v': (num_layers, batch, max_len, num_kv_heads, head_dim), 'pos': (batch, max_len)
        int32 positions of the cached tokens (-1 for empty slots and padding), 'index': () int32
        number of slots filled}``.

    Example:
        >>> cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2,
        ...                   num_heads=4, num_kv_heads=2, head_dim=16)
        >>> c = init_cache(cfg, 3, 16)
        >>> c["k"].shape, c["pos"].shape, int(c["index"])
        ((2, 3, 16, 2, 16), (3, 16), 0)
    """
    dtype = config.dtype if dtype is None else dtype
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "pos": jnp.full((batch, max_len), -1, jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def left_pad(prompts: list[list[int]], *, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stack prompts of different lengths, left-padded, as ``(tokens, mask)`` for :func:`generate`.

    Example:
        >>> t, m = left_pad([[5, 6, 7], [8]], pad_id=0)
        >>> t.tolist(), m.astype(int).tolist()
        ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
    """
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for row, p in enumerate(prompts):
        if len(p):
            tokens[row, width - len(p) :] = p
            mask[row, width - len(p) :] = True
    return tokens, mask


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _generate_impl(
    apply_fn: Callable[..., Any],
    config: LlamaConfig,
    max_new_tokens: int,
    params: Any,
    tokens: Array,
    mask: Array,
    key: Array,
    temperature: Array,
    eos_id: Array,
    fill_id: Array,
    adapter_ids: Optional[Array] = None,
) -> Array:
    if adapter_ids is not None:  # one adapter per row from a bank: jlora's mixed-batch apply
        apply_fn = functools.partial(apply_fn, adapter_ids=adapter_ids, batch_axes={"cache": CACHE_AXES},
                                     out_axes=(0, CACHE_AXES))
    batch, width = tokens.shape
    # Move every row's padding to the left (stable, so real tokens keep their order): left- and
    # right-padded prompts both end up left-padded and the last column is each row's last token.
    order = jnp.argsort(mask.astype(jnp.int32), axis=1, stable=True)
    tokens = jnp.take_along_axis(tokens, order, axis=1)
    mask = jnp.take_along_axis(mask, order, axis=1)
    lengths = mask.sum(axis=1).astype(jnp.int32)
    positions = jnp.where(mask, jnp.cumsum(mask, axis=1) - 1, -1).astype(jnp.int32)

    def pick(logits: Array, k: Array) -> Array:
        # temperature, eos_id and fill_id are traced: changing them does not recompile.
        return jax.lax.cond(
            temperature > 0,
            lambda: jax.random.categorical(k, logits / jnp.maximum(temperature, 1e-6), axis=-1),
            lambda: jnp.argmax(logits, axis=-1),
        ).astype(jnp.int32)

    cache = init_cache(config, batch, width + max_new_tokens)
    logits, cache = apply_fn(params, tokens, positions=positions, cache=cache)
    key, sub = jax.random.split(key)
    token = pick(logits[:, -1], sub)
    out = jnp.full((batch, max_new_tokens), fill_id, jnp.int32).at[:, 0].set(token)
    done = token == eos_id  # eos_id = -1 when there is none: never true

    def cond(state):
        i, _, done, _, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, token, done, cache, out, key = state
        logits, cache = apply_fn(
            params, token[:, None], positions=(lengths + i - 1)[:, None], cache=cache
        )
        key, sub = jax.random.split(key)
        nxt = jnp.where(done, fill_id, pick(logits[:, -1], sub))
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        done = done | (nxt == eos_id)
        return i + 1, nxt, done, cache, out, key

    state = (jnp.asarray(1, jnp.int32), token, done, cache, out, key)
    return jax.lax.while_loop(cond, body, state)[4]


def generate(
    apply_fn: Callable[..., Any],
    params: Any,
    prompt_tokens: Any,
    *,
    max_new_tokens: int,
    config: LlamaConfig,
    temperature: float = 0.0,
    key: Optional[Array] = None,
    eos_id: Optional[int] = None,
    prompt_mask: Optional[Any] = None,
    pad_id: Optional[int] = None,
    adapter_ids: Optional[Any] = None,
) -> Array:
    """Greedy or sampled decoding with the KV cache, compiled with ``jax.jit``.

    One prefill call over the whole (padded) prompt, then one-token steps in a
    ``lax.while_loop`` that stops early once every row has produced ``eos_id``.

    Batches: ``prompt_tokens`` is one prompt ``(seq,)`` or a batch ``(batch, seq)``. Prompts of
    different lengths go with ``prompt_mask`` (``True`` on real tokens); they may be left-padded
    (see :func:`left_pad`) or right-padded: each row's padding is moved to the left internally and
    given position -1, so every row is decoded exactly as if it were alone. Without a mask all
    tokens are real. Every row needs at least one real token.

    Args:
        apply_fn: ``apply_fn(params, tokens, positions=..., cache=...) -> (logits, cache)``, e.g.
            ``Llama(config).apply`` or a LoRA-wrapped apply with that signature. It must be
            hashable (functions, ``model.apply`` and ``jlora.inject``'s apply are): ``jax.jit``
            caches the compiled loop per ``(apply_fn, config, max_new_tokens)``, while
            ``temperature``, ``eos_id`` and ``pad_id`` are traced, so changing them does not
            recompile.
        params: Whatever ``apply_fn`` takes as its first argument (``{'params': ...}``).
        prompt_tokens: Integer tokens, ``(seq,)`` or ``(batch, seq)``.
        max_new_tokens: Number of tokens to generate (static).
        config: The model's config (for the cache's shape).
        temperature: 0 for greedy decoding, otherwise the softmax temperature of sampling
            (a Python number or a scalar array).
        key: PRNG key, required when ``temperature > 0``.
        eos_id: Token that ends a row; later positions of that row get ``pad_id``. Decoding
            stops early once every row has ended.
        prompt_mask: Boolean ``(batch, seq)``, ``True`` on real prompt tokens.
        pad_id: Filler after ``eos_id``; defaults to ``eos_id`` (or 0 without one).
        adapter_ids: With ``params`` holding a bank of adapters (``jlora.combine(
            jlora.stack_adapters({...}), base)``) and ``apply_fn`` from ``jlora.inject``: one adapter
            index per prompt (-1 for the base model; ``jlora.adapter_ids(bank, names)`` from names),
            so that one batch decodes with different adapters, each row as if alone with its own.
            Traced: changing the ids does not recompile.

    Returns:
        The generated tokens only, int32, ``(max_new_tokens,)`` for one prompt or
        ``(batch, max_new_tokens)``.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if isinstance(temperature, (int, float)):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}.")
        if temperature > 0 and key is None:
            raise ValueError("Sampling (temperature > 0) needs a PRNG key: key=jax.random.key(0).")
    if key is None:
        key = jax.random.key(0)
    tokens = jnp.asarray(prompt_tokens, jnp.int32)
    single = tokens.ndim == 1
    if single:
        tokens = tokens[None]
    if tokens.ndim != 2:
        raise ValueError(f"prompt_tokens must be (seq,) or (batch, seq), got {tokens.shape}.")
    if prompt_mask is None:
        mask = jnp.ones(tokens.shape, bool)
    else:
        mask = jnp.asarray(prompt_mask, bool).reshape(tokens.shape)
    fill = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    ids = None
    if adapter_ids is not None:
        from jlora._bank import adapter_names
        from jlora._mixed import check_ids

        ids = jnp.reshape(jnp.asarray(adapter_ids), (-1,)) if single else adapter_ids
        ids = check_ids(ids, adapter_names(params), params)
        if ids.shape[0] != tokens.shape[0]:
            raise ValueError(f"adapter_ids has {ids.shape[0]} entries, but there are {tokens.shape[0]} prompts "
                             f"(one adapter index per prompt).")
    out = _generate_impl(
        apply_fn,
        config,
        int(max_new_tokens),
        params,
        tokens,
        mask,
        key,
        jnp.asarray(temperature, jnp.float32),
        jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32),
        jnp.asarray(fill, jnp.int32),
        ids,
    )
    return out[0] if single else out


# ----------------------------------------------------------------------------------------------
# Unrolled <-> scanned parameter layouts.

_LAYER_KEY = re.compile(r"^layers_(\d+)$")


def _split_variables(tree: Mapping[str, Any]) -> tuple[Mapping[str, Any], bool]:
    if "params" in tree and len(tree) == 1 and isinstance(tree["params"], Mapping):
        return tree["params"], True
    return tree, False


def stack_layer_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Unrolled layout (``layers_0 .. layers_{n-1}``) to the ``scan_layers=True`` layout.

    Args:
        params: ``{'params': {...}}`` or the inner dict, from ``Llama(cfg).init`` with
            ``scan_layers=False`` (or :func:`~jlora.models.gguf.load_gguf`).

    Returns:
        The same tree with the per-layer subtrees replaced by one subtree ``layers`` whose leaves
        are stacked along a new leading axis; wrapped in ``{'params': ...}`` if the input was.
    """
    inner, wrapped = _split_variables(params)
    found = {int(m.group(1)): k for k in inner if (m := _LAYER_KEY.match(k))}
    if not found:
        raise ValueError(f"No 'layers_<i>' entries to stack; keys are {sorted(inner)}.")
    if sorted(found) != list(range(len(found))):
        raise ValueError(f"Layer indices are not 0..n-1: {sorted(found)}.")
    layers = [inner[found[i]] for i in range(len(found))]
    out = {k: v for k, v in inner.items() if k not in found.values()}
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return {"params": out} if wrapped else out


def unstack_layer_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The ``scan_layers=True`` layout back to the unrolled one (``layers_0 .. layers_{n-1}``).

    Args:
        params: ``{'params': {...}}`` or the inner dict, holding a stacked ``layers`` subtree.

    Returns:
        The tree with ``layers`` split along its leading axis; wrapped if the input was.
    """
    inner, wrapped = _split_variables(params)
    if "layers" not in inner:
        raise ValueError(f"No stacked 'layers' entry to unstack; keys are {sorted(inner)}.")
    stacked = inner["layers"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in inner.items() if k != "layers"}
    for i in range(n):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return {"params": out} if wrapped else out


# ----------------------------------------------------------------------------------------------
# Hugging Face folders and GGUF files, from their own modules (imported on first use).

_ELSEWHERE = {
    "from_pretrained": "jlora.models.hf",
    "save_pretrained": "jlora.models.hf",
    "save_gguf": "jlora.models.gguf_writer",
}


def __getattr__(name: str) -> Any:
    """``from_pretrained`` / ``save_pretrained`` (:mod:`jlora.models.hf`) and ``save_gguf``
    (:mod:`jlora.models.gguf_writer`), importable from here."""
    if name in _ELSEWHERE:
        import importlib

        return getattr(importlib.import_module(_ELSEWHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
