"""examples/sft.py (jlora.models.sft) on a tiny random HF checkpoint and the shipped sample data.

The model comes from benchmarks/make_random_checkpoint.py --shape tiny (2 layers, d 64); the runs
share JAX's persistent compilation cache (--compile-cache), so only the first one compiles.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("optax")

import jlora  # noqa: E402
from jlora.models import sft  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "data" / "sample.jsonl"
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples" / "data"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import make_random_checkpoint

    return make_random_checkpoint.main(["--shape", "tiny", "--out", str(tmp_path_factory.mktemp("tiny") / "m")])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("jax-cache")
    yield str(path)
    jax.config.update("jax_compilation_cache_dir", None)


# ----------------------------------------------------------------------------------------------
# Data: no model needed.


def test_sample_is_what_the_script_generates(tmp_path):
    import make_data

    out = make_data.main(["--out", str(tmp_path / "s.jsonl")])
    assert out.read_text() == SAMPLE.read_text()
    rows = sft.read_jsonl(SAMPLE)
    assert len(rows) == 400 and {r.messages is None for r in rows} == {True, False}


BAD = [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}', r":2: messages\[1\] has role 'bot'"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}]}', r":2: messages\[1\] \(assistant\) has content of type int"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', ":2: no assistant message"),
    ('{"text": "hello"}', r":2: no 'messages' and no 'prompt'/'completion' \(keys: \['text'\]\)"),
    ('{"prompt": "a", "completion": ["b"]}', ":2: prompt and completion must both be strings"),
    ('{"messages": "hi"}', ":2: 'messages' must be a non-empty list"),
    ("[1, 2]", ":2: a line must be a JSON object"),
    ('{"prompt": "a", "completion": "b"', ":2: not valid JSON"),
]


@pytest.mark.parametrize("line,message", BAD)
def test_bad_lines_name_their_line_number(tmp_path, line, message):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "1+1=", "completion": "2"}\n' + line + "\n")
    with pytest.raises(sft.DataError, match=message):
        sft.read_jsonl(f)


def test_buckets_cover_every_example_once_with_little_padding():
    lengths = np.random.default_rng(0).integers(10, 300, 1000)
    widths = sft.bucket_widths(lengths, 4, 256)
    lengths = np.minimum(lengths, 256)
    batches = sft.epoch_batches(lengths, widths, 8, seed=1)
    seen = sorted(i for _, ix in batches for i in ix)
    assert seen == list(range(1000))
    assert all(lengths[i] <= w for w, ix in batches for i in ix)
    padded = sum(8 * w for w, _ in batches)
    assert 1 - lengths.sum() / padded < 0.2  # one width (256 for all) would waste ~45%
    assert batches != sft.epoch_batches(lengths, widths, 8, seed=2)
    assert batches == sft.epoch_batches(lengths, widths, 8, seed=1)


GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_answer_tokens_match_transformers_assistant_mask(tiny):
    """The tokens trained on are those transformers' assistant mask ({% generation %}) marks."""
    import transformers

    from jlora.models.tokenizer import HFTokenizer

    tok = HFTokenizer.from_pretrained(tiny)
    tok.chat_template = GENERATION_TEMPLATE
    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 10 - 4?"},
            {"role": "assistant", "content": "6"}]
    ids, answer = sft.encode_example(tok, sft.Example(1, chat, 0, None, None))
    ref = hf_tok.apply_chat_template(chat, chat_template=GENERATION_TEMPLATE, tokenize=True,
                                     return_dict=True, return_assistant_tokens_mask=True)
    assert ids.tolist() == list(ref["input_ids"])
    assert answer.astype(int).tolist() == list(ref["assistant_masks"])
    assert tok.decode(ids[answer]) == "5<|im_end|>\n6<|im_end|>\n"
    # Conversational prompt/completion: only the completion's turns.
    _, answer2 = sft.encode_example(tok, sft.Example(1, chat, 3, None, None))
    assert tok.decode(ids[answer2]) == "6<|im_end|>\n"
    # A text pair: the completion and EOS, also when the prompt ends with a space.
    for prompt, completion in (("Question: 2+3?\nAnswer:", " 5"), ("Question: 2+3?\nAnswer: ", "5")):
        ids, answer = sft.encode_example(tok, sft.Example(1, None, 0, prompt, completion))
        assert tok.decode(ids) == prompt + completion + "<|im_end|>"
        assert tok.decode(ids[answer]).strip() == "5<|im_end|>"
    # A tokenizer whose post-processor appends EOS itself: that EOS is trained, and not doubled.
    from tokenizers.processors import TemplateProcessing

    eos = tok.backend.id_to_token(tok.eos_id)
    tok.backend.post_processor = TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, tok.eos_id)])
    ids, answer = sft.encode_example(tok, sft.Example(1, None, 0, "Question: 2+3?\nAnswer:", " 5"))
    assert ids[-1] == tok.eos_id and ids[-2] != tok.eos_id and answer[-1]
    assert tok.decode(ids[answer]).strip() == "5<|im_end|>"


# ----------------------------------------------------------------------------------------------
# Runs.


def run(tiny, out, cache, *extra):
    return sft.main(["--model", str(tiny), "--data", str(SAMPLE), "--out", str(out), "--steps", "6",
                     "--batch", "8", "--seq-len", "64", "--buckets", "1", "--lr", "1e-2", "--save-every", "2",
                     "--eval-fraction", "0.05", "--compile-cache", cache, *extra])


def test_sft_end_to_end_files_and_exact_resume(tiny, tmp_path, cache, capsys, monkeypatch):
    import torch
    import transformers
    from peft import PeftModel

    from jlora.models.gguf import load_gguf
    from jlora.models.llama import Llama

    full = run(tiny, tmp_path / "full", cache, "--gguf", "q8_0")
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "padding" in printed and "held-out loss" in printed
    assert full["eval_loss"] < full["eval_loss_before"]
    assert full["losses"][-1] < full["losses"][0]
    assert 0 < full["padding_fraction"] < 0.7  # one width here, to compile once
    assert full["tokens_per_second"] > 0
    out = tmp_path / "full"
    for f in ("adapter/config/jlora_config.json", "peft/adapter_config.json", "peft/adapter_model.safetensors",
              "merged/config.json", "merged/model.safetensors", "merged/tokenizer.json", "model-q8_0.gguf",
              "loss.png", "metrics.json"):
        assert (out / f).is_file(), f
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["eval_loss"] == full["eval_loss"] and saved["files"]["gguf"].endswith("model-q8_0.gguf")

    # What was written computes what was trained: the merged folder and the PEFT adapter in
    # transformers, the GGUF file in jlora's reader.
    params, apply, tok = full["params"], full["apply"], full["tokenizer"]
    ids = np.asarray([tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}]))])
    want = np.asarray(apply(params, jnp.asarray(ids)))
    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(base, out / "peft").eval()
    with torch.no_grad():
        for m in (merged, peft_model):
            got = m(torch.tensor(ids, dtype=torch.long)).logits.numpy()
            assert float(np.abs(got - want).max()) <= 1e-4
    gcfg, gparams, gtok = load_gguf(out / "model-q8_0.gguf")
    assert gtok.encode("What is 2 + 2?") == tok.encode("What is 2 + 2?")
    got = np.asarray(jax.jit(Llama(gcfg).apply)(gparams, jnp.asarray(ids)))
    assert float(np.abs(got - want).max()) <= 0.05 * float(np.abs(want).max())

    # Interrupted after 3 steps (the last checkpoint is step 2), then resumed: the same run.
    part = run(tiny, tmp_path / "part", cache, "--stop-after", "3")
    assert part["stopped"] and not (tmp_path / "part" / "adapter").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        run(tiny, tmp_path / "part", cache)
    with monkeypatch.context() as m:  # refused before the model is loaded
        m.setattr(sft, "load_model", lambda *a, **k: pytest.fail("loaded the model before checking the settings"))
        with pytest.raises(ValueError, match=r"settings differ.*'lr': \(0.01, 0.02\)"):
            run(tiny, tmp_path / "part", cache, "--resume", "--lr", "2e-2")
        with pytest.raises(ValueError, match=r"settings differ.*'dtype': \('float32', 'bfloat16'\)"):
            run(tiny, tmp_path / "part", cache, "--resume", "--dtype", "bfloat16")  # "auto" was float32 here
    run_json = tmp_path / "part" / "run.json"  # a run recorded before "auto" was resolved still resumes
    run_json.write_text(json.dumps({**json.loads(run_json.read_text()), "dtype": "auto"}))
    resumed = run(tiny, tmp_path / "part", cache, "--resume", "--no-merged")
    assert resumed["start_step"] == 2
    assert resumed["losses"] == full["losses"]
    a, b = jlora.split(resumed["params"])[0], jlora.split(full["params"])[0]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    # Resuming a finished run runs no step and writes the same adapter again (it crashed in the summary).
    capsys.readouterr()
    again = run(tiny, tmp_path / "part", cache, "--resume", "--no-merged")
    assert again["start_step"] == again["steps"] == resumed["steps"] and again["padding_fraction"] is None
    assert "padding n/a (no step run)" in capsys.readouterr().out
    for x, y in zip(jax.tree.leaves(jlora.split(again["params"])[0]), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_sft_from_gguf_with_qlora(tiny, tmp_path, cache):
    from jlora.models.gguf_writer import save_gguf
    from jlora.models.hf import from_pretrained

    cfg, params, tok = from_pretrained(tiny, dtype=jnp.float32)
    gguf = save_gguf(tmp_path / "tiny.gguf", params, cfg, tok, dtype="f16")
    result = sft.main(["--model", str(gguf), "--data", str(SAMPLE), "--out", str(tmp_path / "q"), "--qlora",
                       "--steps", "2", "--batch", "8", "--seq-len", "64", "--buckets", "1", "--targets", "q_proj,v_proj",
                       "--eval-fraction", "0", "--no-merged", "--compile-cache", cache])
    kernel = result["params"]["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(kernel, jlora.LoraKernel) and isinstance(kernel.w0, jlora.NF4Tensor)
    assert not isinstance(result["params"]["params"]["layers"]["mlp"]["up_proj"]["kernel"], jlora.LoraKernel)
    assert all(np.isfinite(result["losses"]))
    assert (tmp_path / "q" / "adapter").is_dir()


@pytest.mark.parametrize("flag,value,message", [
    ("--steps", "0", "--steps must be positive"), ("--batch", "-1", "--batch must be positive"),
    ("--lr", "nan", "--lr must be positive"), ("--lr", "inf", "--lr must be positive"), ("--rank", "0", "--rank must be positive"),
    ("--seq-len", "0", "--seq-len must be positive"), ("--warmup", "-2", "--warmup must be 0 or more"),
    ("--warmup", "500", "--warmup 500 is longer than --steps 100"), ("--dropout", "1", "--dropout must be in"),
    ("--save-every", "0", "--save-every must be positive"), ("--eval-fraction", "1", "--eval-fraction must be in"),
])
def test_bad_arguments_are_refused_before_loading_anything(flag, value, message, capsys):
    with pytest.raises(SystemExit):
        sft.parse_args(["--model", "nowhere", "--data", "nothing.jsonl", flag, value])
    assert message in capsys.readouterr().err


def test_long_sequences_refused_or_truncated_and_bad_inputs(tiny, tmp_path, capsys):
    args = ["--model", str(tiny), "--data", str(SAMPLE), "--out", str(tmp_path / "x"), "--seq-len", "20"]
    with pytest.raises(sft.DataError, match=r"sequences longer than --seq-len 20 \(lines \[1, 2,"):
        sft.main([*args, "--refuse-long"])
    capsys.readouterr()
    cut = sft.main([*args, "--truncate", "--stop-after", "0", "--eval-fraction", "0"])  # no step: no compile
    printed = capsys.readouterr().out
    assert cut["truncated"] > 100 and f"truncated {cut['truncated']} of 400 sequences" in printed
    assert cut["dropped"] > 0 and f"dropped {cut['dropped']} examples" in printed
    bad = tmp_path / "bad.jsonl"
    bad.write_text(SAMPLE.read_text().splitlines()[0] + "\n" + '{"messages": [{"role": "robot", "content": "x"}]}\n')
    with pytest.raises(sft.DataError, match=r"bad.jsonl:2: messages\[0\] has role 'robot'"):
        sft.main(["--model", str(tiny), "--data", str(bad), "--out", str(tmp_path / "y")])
    gpt2 = tmp_path / "gpt2"
    shutil.copytree(tiny, gpt2)
    config = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(NotImplementedError, match="GPT2LMHeadModel.*supported|GPT2LMHeadModel.*LlamaForCausalLM"):
        sft.main(["--model", str(gpt2), "--data", str(SAMPLE), "--out", str(tmp_path / "z")])
    # The command line reports it as an error, not a traceback.
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "sft.py"), "--model", str(gpt2), "--data",
                           str(SAMPLE), "--out", str(tmp_path / "w")], capture_output=True, text=True)
    assert proc.returncode == 1 and "jlora-sft: error:" in proc.stderr and "GPT2LMHeadModel" in proc.stderr
    assert "Traceback" not in proc.stderr


def _tiny_lora(tiny, **config):
    """The tiny checkpoint's config (with ``config`` replaced), LoRA r 2 on it with B ≠ 0, and apply."""
    from jlora.models.llama import Llama, from_pretrained

    cfg, params, _ = from_pretrained(tiny, dtype="float32")
    cfg = cfg.replace(**config)
    lp, apply = jlora.inject(params, Llama(cfg).apply, rank=2, example_args=(jnp.zeros((1, 4), jnp.int32),))
    lp = jax.tree.map(lambda x: x.replace(b=x.b + 0.05) if isinstance(x, jlora.LoraKernel) else x, lp,
                      is_leaf=lambda x: isinstance(x, jlora.LoraKernel))
    return cfg, lp, apply


def test_step_loss_is_the_answer_token_cross_entropy(tiny):
    """The training/eval loss (the model's chunked loss) is optax's cross-entropy of the full
    logits on the answer tokens, each position predicting the next token."""
    import optax

    from jlora.models.llama import Llama

    cfg, lp, apply = _tiny_lora(tiny, loss_chunk_tokens=5)  # several chunks, one of them padded
    ad, base = jlora.split(lp)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
    weights = jnp.asarray(rng.random((2, 9)) > 0.4, jnp.float32)
    _, eval_fn = sft._step_functions(apply, optax.sgd(0.0), dropout=0.0, donate=False)
    total, count = eval_fn(ad, base, ids, weights)
    logits = Llama(cfg).apply(jlora.merge(lp), ids)  # the merged model's full logits
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
    np.testing.assert_allclose(float(count), float(weights[:, :-1].sum()))
    np.testing.assert_allclose(float(total), float(jnp.sum(nll * weights[:, :-1])), rtol=1e-5)


def test_microbatched_step_is_the_whole_batch_step(tiny):
    """``--microbatches``: the step over equal slices (one all-padding) gives the whole batch's loss
    and the same optimizer update as one pass, which is SGD on the merged model's answer-token mean."""
    import optax

    from jlora.models.llama import Llama

    cfg, lp, apply = _tiny_lora(tiny, scan_layers=False, remat="attention")
    ad, base = jlora.split(lp)
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (4, 9)), jnp.int32)
    weights = jnp.asarray(rng.random((4, 9)) > 0.3, jnp.float32).at[2:].set(0.0).at[0, :3].set(0.0)
    key = jax.random.key(0)
    tx = optax.sgd(1.0)
    out = {}
    for m in (1, 2, 4):
        step, _ = sft._step_functions(apply, tx, dropout=0.0, donate=False, microbatches=m)
        out[m] = step(ad, tx.init(ad), base, ids, weights, key)

    def ref(a):  # the merged model, full logits, masked mean over the answer tokens
        logits = Llama(cfg.replace(remat=None)).apply(jlora.merge(jlora.combine(a, base)), ids)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
        return jnp.sum(nll * weights[:, :-1]) / jnp.sum(weights[:, :-1])

    want_loss, g = jax.value_and_grad(ref)(ad)
    want = jax.tree.map(lambda a, d: a - d, ad, g)
    for m, (new, _, loss) in out.items():
        np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5, err_msg=str(m))
        for x, y in zip(jax.tree.leaves(new), jax.tree.leaves(want)):
            np.testing.assert_allclose(x, y, rtol=2e-4, atol=1e-6, err_msg=str(m))


def test_microbatches_must_divide_the_batch(capsys):
    with pytest.raises(SystemExit):
        sft.parse_args(["--model", "m", "--data", "d.jsonl", "--batch", "6", "--microbatches", "4"])
    assert "--microbatches must be a positive divisor of --batch 6" in capsys.readouterr().err
    args = sft.parse_args(["--model", "m", "--data", "d.jsonl", "--microbatches", "4", "--remat", "attention",
                           "--matmul", "pallas"])
    assert (args.microbatches, args.remat, args.matmul) == (4, "attention", "pallas")
    for flag, bad in (("--matmul", "triton"), ("--remat", "everything")):
        with pytest.raises(SystemExit):
            sft.parse_args(["--model", "m", "--data", "d.jsonl", flag, bad])
        assert f"invalid choice: '{bad}'" in capsys.readouterr().err
