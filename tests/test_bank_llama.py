"""Banks on jlora.models.llama: generation with a different adapter per prompt (KV cache) against
one-adapter-at-a-time generation, token for token; a mixed batch on the real SmolLM2-135M against
each example run alone.

XLA:CPU compile time dominates at these sizes, so the jitted functions here compile with LLVM
optimisations off (``compiler_options``, per function; the rest of the session is unaffected).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import jlora.models.llama as llama
from helpers import randomize
from test_llama import TINY, tiny_params
from test_peft import _randomize

pytestmark = pytest.mark.slow

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FAST = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def fast_jit(f, **kw):
    return jax.jit(f, compiler_options=FAST, **kw)


@pytest.fixture
def fast_generate(monkeypatch):
    """generate() as it is, its jitted loop compiled without LLVM optimisations."""
    impl = llama._generate_impl
    monkeypatch.setattr(llama, "_generate_impl", fast_jit(impl.__wrapped__, static_argnums=(0, 1, 2)))
    return llama.generate


def test_generate_with_an_adapter_per_prompt_matches_one_adapter_at_a_time(fast_generate):
    cfg, model = TINY, llama.Llama(TINY)
    base = tiny_params(cfg, seed=3)
    tok = jnp.zeros((1, 4), jnp.int32)
    pa, apply = jlora.inject(base, model.apply, rank=2, targets=PROJ, example_args=(tok,), key=jax.random.key(0))
    pb, _ = jlora.inject(base, model.apply, rank=4, alpha=8.0, targets=["q_proj", "v_proj", "down_proj"],
                         example_args=(tok,), key=jax.random.key(1))
    pa, pb = randomize(pa, jax.random.key(5), 0.3), randomize(pb, jax.random.key(6), 0.3)
    params = jlora.combine(jlora.stack_adapters({"a": pa, "b": pb}), base)
    prompts = [[5, 17, 99, 3, 42], [8, 1], [60, 61, 62], [7, 7, 7, 9], [33]]
    names = ["b", "a", None, "a", "b"]
    tokens, mask = llama.left_pad(prompts)
    kw = dict(prompt_mask=mask, max_new_tokens=6, config=cfg)
    got = np.asarray(fast_generate(apply, params, tokens, adapter_ids=jlora.adapter_ids(params, names), **kw))
    # one adapter at a time, for the whole batch (each row decodes as if alone: test_llama checks that)
    alone = {"a": fast_generate(apply, jlora.select_adapter(params, "a"), tokens, **kw),
             "b": fast_generate(apply, jlora.select_adapter(params, "b"), tokens, **kw),
             None: fast_generate(model.apply, base, tokens, **kw)}
    want = np.stack([np.asarray(alone[n][e]) for e, n in enumerate(names)])
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(alone["a"], alone[None]) and not np.array_equal(alone["b"], alone[None])
    assert not np.array_equal(alone["a"], alone["b"])
    # one prompt, one adapter id
    one = fast_generate(apply, params, prompts[1], max_new_tokens=6, config=cfg, adapter_ids=0)
    np.testing.assert_array_equal(one, want[1])
    with pytest.raises(ValueError, match="adapter_ids has 4 entries, but there are 5 prompts"):
        fast_generate(apply, params, tokens, adapter_ids=[0, 1, 0, 1], **kw)
    with pytest.raises(ValueError, match=r"adapter_ids\[2\] = 2 is out of range"):
        fast_generate(apply, params, tokens, adapter_ids=[0, 1, 2, 1, 0], **kw)


def test_mixed_batch_on_smollm2(smollm2):
    cfg, base, tok = smollm2
    model = llama.Llama(cfg)
    texts = ["The capital of France is Paris", "Two plus two is four", "Hello, my name is Ada"]
    ids = jnp.asarray([tok.encode(t)[:4] for t in texts], jnp.int32)
    pa, apply = jlora.inject(base, model.apply, rank=4, targets=PROJ, example_args=(ids[:1],), key=jax.random.key(0))
    # the same shapes (one compile for both references): ranks and targets that differ are tested on tiny models
    pa, pb = _randomize(pa, seed=2, b_std=0.02), _randomize(pa, seed=3, b_std=0.02)  # numpy: fast for 210 kernels
    params = jlora.combine(jlora.stack_adapters({"a": pa, "b": pb}), base)
    adapter_ids = np.array([1, -1, 0], np.int32)
    got = np.asarray(fast_jit(lambda p, t, i: apply(p, t, adapter_ids=i))(params, ids, adapter_ids))
    one, plain = fast_jit(apply), fast_jit(model.apply)
    want = np.concatenate([
        np.asarray(one(pb, ids[0:1])), np.asarray(plain(base, ids[1:2])), np.asarray(one(pa, ids[2:3]))])
    moved = [float(np.abs(want[e] - np.asarray(plain(base, ids[e:e + 1]))[0]).max()) for e in (0, 2)]
    assert min(moved) > 0.05, moved  # the adapters change the logits
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * scale)
