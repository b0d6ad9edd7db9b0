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
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "CACHE_AXES",
    "LlamaConfig",
    "Llama",
    "init_cache",
    "generate",
    "left_pad",
    "stack_layer_params",
    "unstack_layer_params",
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

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}."
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE.")

    def replace(self, **changes: Any) -> "LlamaConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------
# Building blocks.


def rope_tables(positions: Array, *, head_dim: int, theta: float) -> tuple[Array, Array]:
    """Cosine and sine tables of rotary embeddings: float32, ``positions.shape + (head_dim,)``.

    The frequencies are repeated, not interleaved (``[f0..f_{d/2-1}, f0..f_{d/2-1}]``), to go with
    :func:`apply_rope`'s rotate-half convention (the one transformers uses).
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
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


def _dense(cfg: LlamaConfig, features: int, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=False,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=_INIT,
        name=name,
    )


def _norm(cfg: LlamaConfig, name: str) -> RMSNorm:
    return RMSNorm(eps=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE and an optional KV cache (HF: ``self_attn``)."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        cos: Array,
        sin: Array,
        mask: Array,
        kv: Optional[tuple[Array, Array]],
        index: Any,
    ) -> tuple[Array, Optional[tuple[Array, Array]]]:
        cfg = self.config
        batch, seq, _ = x.shape
        heads, kv_heads, dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = _dense(cfg, heads * dim, "q_proj")(x).reshape(batch, seq, heads, dim)
        k = _dense(cfg, kv_heads * dim, "k_proj")(x).reshape(batch, seq, kv_heads, dim)
        v = _dense(cfg, kv_heads * dim, "v_proj")(x).reshape(batch, seq, kv_heads, dim)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)

        if kv is None:
            keys, values, new_kv = k, v, None
        else:
            k_cache, v_cache = kv
            k = k.astype(k_cache.dtype)
            v = v.astype(v_cache.dtype)
            keys = jax.lax.dynamic_update_slice(k_cache, k, (0, index, 0, 0))
            values = jax.lax.dynamic_update_slice(v_cache, v, (0, index, 0, 0))
            new_kv = (k, v)

        # Query head h = g_kv * group + r reads KV head g_kv, like transformers' repeat_kv.
        group = heads // kv_heads
        qg = q.reshape(batch, seq, kv_heads, group, dim)
        scores = jnp.einsum(
            "btkgd,bskd->bkgts", qg, keys.astype(q.dtype), preferred_element_type=jnp.float32
        )
        scores = scores * (dim**-0.5)
        scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, values.astype(cfg.dtype))
        out = out.reshape(batch, seq, heads * dim)
        return _dense(cfg, cfg.hidden_size, "o_proj")(out), new_kv


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))`` (HF: ``mlp``)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        gate = _dense(cfg, cfg.intermediate_size, "gate_proj")(x)
        up = _dense(cfg, cfg.intermediate_size, "up_proj")(x)
        return _dense(cfg, cfg.hidden_size, "down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: attention and MLP, each with a residual connection."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        cos: Array,
        sin: Array,
        mask: Array,
        kv: Optional[tuple[Array, Array]],
        index: Any,
    ) -> tuple[Array, Optional[tuple[Array, Array]]]:
        cfg = self.config
        h = _norm(cfg, "input_layernorm")(x)
        attn, new_kv = Attention(cfg, name="self_attn")(h, cos, sin, mask, kv, index)
        x = x + attn
        h = _norm(cfg, "post_attention_layernorm")(x)
        x = x + MLP(cfg, name="mlp")(h)
        return x, new_kv


class Llama(nn.Module):
    """Llama causal language model (Flax linen), parameter-compatible with HF's layout.

    Call as ``model.apply(params, tokens, positions=None, cache=None)``:

    * without ``cache``: returns logits ``(batch, seq, vocab)``;
    * with a cache from :func:`init_cache`: writes the new keys/values at ``cache['index']`` and
      returns ``(logits, new_cache)``.

    Logits are always float32. ``positions`` (int, ``(batch, seq)``) default to ``0..seq-1``
    (offset by ``cache['index']`` with a cache). A negative position marks a padding token: it is
    never attended to as a key. Attention is causal in the order tokens were fed (cache slot order).

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
    ) -> Any:
        cfg = self.config
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (batch, seq) int32, got shape {tokens.shape}.")
        batch, seq = tokens.shape
        steps = jnp.arange(seq, dtype=jnp.int32)

        # Without a cache the keys are this call's tokens; with one, every slot of the cache.
        index = 0 if cache is None else jnp.asarray(cache["index"], jnp.int32)
        query_slot = index + steps
        if positions is None:
            positions = jnp.broadcast_to(query_slot, (batch, seq))
        positions = jnp.asarray(positions, jnp.int32)
        if cache is None:
            key_pos, key_slot = positions, steps
        else:
            key_pos = jax.lax.dynamic_update_slice(cache["pos"], positions, (0, index))
            key_slot = jnp.arange(cache["pos"].shape[1], dtype=jnp.int32)
        # (batch, seq, keys): causal in slot order, and padding (position < 0) never seen.
        mask = (key_slot[None, None, :] <= query_slot[None, :, None]) & (key_pos[:, None, :] >= 0)
        cos, sin = rope_tables(positions, head_dim=cfg.head_dim, theta=cfg.rope_theta)

        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=_INIT,
            name="embed_tokens",
        )
        x = embed(tokens)

        if cfg.scan_layers:
            kv = None if cache is None else (cache["k"], cache["v"])
            layers = nn.scan(
                DecoderLayer,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=cfg.num_layers,
            )(cfg, name="layers")
            x, new_kv = layers(x, cos, sin, mask, kv, index)
        else:
            chunks = []
            for i in range(cfg.num_layers):
                kv_i = None if cache is None else (cache["k"][i], cache["v"][i])
                x, new_kv_i = DecoderLayer(cfg, name=f"layers_{i}")(x, cos, sin, mask, kv_i, index)
                chunks.append(new_kv_i)
            new_kv = None
            if cache is not None:
                new_kv = (jnp.stack([c[0] for c in chunks]), jnp.stack([c[1] for c in chunks]))

        x = _norm(cfg, "norm")(x)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = _dense(cfg, cfg.vocab_size, "lm_head")(x)
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
