"""The LoRA family against Hugging Face PEFT itself: DoRA, PiSSA/OLoRA (converted), rank/alpha
patterns with rsLoRA, Embedding LoRA — both ways, on a tiny transformers Llama copied into
``jlora.models.llama`` (tests/test_peft.py's ``tiny`` fixture) and on the real SmolLM2-135M (slow).
"""

from __future__ import annotations

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import LoraKernel
from jlora._peft import export_peft, import_peft
from test_peft import PROJ, LORA_NODE, _cfg, _load, _peft_load, _report, _torch_logits, smol, tiny  # noqa: F401


def _randomize(params, seed=0, b_std=0.1, m_spread=0.3):
    """Nonzero A, B (and DoRA magnitudes moved by up to ±m_spread) that change the model noticeably."""
    rng = np.random.default_rng(seed)

    def one(x):
        if not isinstance(x, LoraKernel):
            return x
        a = rng.standard_normal(np.shape(x.a)) / math.sqrt(x.layout.fan_in(x.shape))
        b = rng.standard_normal(np.shape(x.b)) * b_std
        m = None if x.m is None else np.asarray(x.m) * (1 + m_spread * rng.uniform(-1, 1, np.shape(x.m)))
        return x.replace(a=jnp.asarray(a, x.a.dtype), b=jnp.asarray(b, x.b.dtype),
                         m=None if m is None else jnp.asarray(m, x.m.dtype))

    return jax.tree.map(one, params, is_leaf=LORA_NODE)


def _inject(tiny, scan=False, **kw):
    model, base = tiny["flax"][scan]
    ids = jnp.asarray(tiny["ids"])
    kw.setdefault("targets", PROJ)
    params, apply = jlora.inject(base, model.apply, example_args=(ids,), key=jax.random.key(0), **kw)
    return model, base, ids, params, jax.jit(apply)


def _peft_logits(tiny, d):
    if any("lora_embedding" in k for k in _load(d)):
        pm = _peft_load_embedding(tiny["peft"], copy.deepcopy(tiny["hf"]), d)
    else:
        pm = _peft_load(tiny["peft"], copy.deepcopy(tiny["hf"]), d)
    return _torch_logits(tiny["torch"], pm, tiny["ids"]), pm


def _peft_load_embedding(peft, model, d):
    """As test_peft._peft_load, for an adapter with Embedding LoRA: PEFT's state dict then also holds
    the embedding's base weight (save_embedding_layers), so the file's keys are a subset of it."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(model, str(d))
        sd = peft.get_peft_model_state_dict(pm)
    pm.eval()
    file = _load(d)
    assert set(file) <= set(sd), sorted(set(file) - set(sd))
    assert set(sd) - set(file) <= {"base_model.model.model.embed_tokens.base_layer.weight"}
    for k, v in file.items():
        np.testing.assert_array_equal(sd[k].detach().float().numpy(), v, err_msg=k)
    return pm


# ------------------------------------------------------------------------------------------------
# DoRA
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_tiny_dora_export_loads_in_peft_with_same_logits(tiny, tmp_path, scan):
    model, base, ids, params, apply = _inject(tiny, scan, rank=4, alpha=8.0, dora=True)
    np.testing.assert_allclose(np.asarray(apply(params, ids)), np.asarray(model.apply(base, ids)), rtol=1e-5,
                               atol=1e-5)  # DoRA starts as the base model
    params = _randomize(params, seed=1)
    d = export_peft(tmp_path / "peft", params)
    cfg = _cfg(d)
    assert cfg["use_dora"] is True and (cfg["r"], cfg["lora_alpha"]) == (4, 8)
    assert _load(d)["base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector"].shape == (32,)
    want, _ = _peft_logits(tiny, d)
    got = np.asarray(apply(params, ids))
    assert np.abs(want - np.asarray(model.apply(base, ids))).max() > 0.1  # the adapters matter
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(model.apply(jlora.merge(params), ids)), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_tiny_peft_dora_adapter_imports_with_same_logits(tiny, tmp_path, scan):
    torch, peft = tiny["torch"], tiny["peft"]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=PROJ, use_dora=True, task_type="CAUSAL_LM",
                             rank_pattern={"o_proj": 2})
    pm = peft.get_peft_model(copy.deepcopy(tiny["hf"]), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * (2 * torch.rand_like(p) - 1))
    pm.save_pretrained(str(tmp_path / "peft"))
    pm.eval()
    want = _torch_logits(torch, pm, tiny["ids"])
    model, base = tiny["flax"][scan]
    params = import_peft(tmp_path / "peft", base)
    k = params["params"]["layers" if scan else "layers_0"]["self_attn"]["o_proj"]["kernel"]
    assert k.m is not None and k.rank == 2
    ids = jnp.asarray(tiny["ids"])
    got = np.asarray(tiny["applies"][scan](params, ids))
    assert np.abs(want - np.asarray(model.apply(base, ids))).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_tiny_dora_gradients_equal_peft(tiny, tmp_path):
    """The same weights and batch in both: the adapters' gradients (A, B, magnitude) agree."""
    torch, peft = tiny["torch"], tiny["peft"]
    model, base, ids, params, apply = _inject(tiny, False, rank=4, alpha=8.0, dora=True)
    params = _randomize(params, seed=3)
    d = export_peft(tmp_path / "peft", params)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(tiny["hf"]), str(d), is_trainable=True)
    pm.train()  # no dropout configured: train mode only turns on gradients
    labels = np.array(tiny["ids"], np.int64)
    out = pm(torch.tensor(labels), labels=torch.tensor(labels))
    out.loss.backward()
    tgrads = {n: p.grad.detach().numpy() for n, p in pm.named_parameters() if p.requires_grad}

    def loss(ad, base_):
        logits = apply(jlora.combine(ad, base_), ids)[0, :-1]
        tgt = jnp.asarray(labels[0, 1:])
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(tgt.shape[0]), tgt])

    ad, bs = jlora.split(params)
    np.testing.assert_allclose(float(loss(ad, bs)), out.loss.item(), rtol=1e-5)
    g = jax.grad(loss)(ad, bs)
    checked = 0
    for i in range(2):
        for group, names in (("self_attn", PROJ[:4]), ("mlp", PROJ[4:])):
            for n in names:
                k = g["params"][f"layers_{i}"][group][n]["kernel"]
                pre = f"base_model.model.model.layers.{i}.{group}.{n}"
                np.testing.assert_allclose(k.a.T, tgrads[f"{pre}.lora_A.default.weight"], rtol=2e-3, atol=2e-6)
                np.testing.assert_allclose(k.b.T, tgrads[f"{pre}.lora_B.default.weight"], rtol=2e-3, atol=2e-6)
                np.testing.assert_allclose(k.m, tgrads[f"{pre}.lora_magnitude_vector.default.weight"], rtol=2e-3,
                                           atol=2e-6)
                checked += 1
    assert checked == 14


# ------------------------------------------------------------------------------------------------
# PiSSA / OLoRA: the init itself, and the converted export
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_tiny_init_matches_peft_and_converted_export_loads(tiny, tmp_path, init):
    torch, peft = tiny["torch"], tiny["peft"]
    model, base, ids, params, apply = _inject(tiny, False, rank=4, alpha=8.0, init=init)
    np.testing.assert_allclose(np.asarray(apply(params, ids)), np.asarray(model.apply(base, ids)), rtol=1e-4,
                               atol=1e-4)
    # PEFT's own init moves the same part of W into the adapter: W - W_res == s·B0·A0 (jlora's s·A0·B0 transposed)
    pm = peft.get_peft_model(copy.deepcopy(tiny["hf"]), peft.LoraConfig(r=4, lora_alpha=8, target_modules=PROJ,
                                                                        init_lora_weights=init))
    hf_sd = tiny["hf"].state_dict()
    for n in ("q_proj", "down_proj"):
        group = "self_attn" if n == "q_proj" else "mlp"
        k = params["params"]["layers_1"][group][n]["kernel"]
        moved = hf_sd[f"model.layers.1.{group}.{n}.weight"].numpy() - \
            pm.state_dict()[f"base_model.model.model.layers.1.{group}.{n}.base_layer.weight"].numpy()
        np.testing.assert_allclose(k.scale * np.asarray(k.a0 @ k.b0).T, moved, rtol=1e-3, atol=1e-4)
    # "trained", then exported converted: PEFT loads it onto the original model
    trained = _randomize(params, seed=5, b_std=0.2)  # A and B moved away from A0, B0
    d = export_peft(tmp_path / "conv", trained)
    cfg = _cfg(d)
    assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == (8, 16, True)
    want, _ = _peft_logits(tiny, d)
    got = np.asarray(apply(trained, ids))
    assert np.abs(want - np.asarray(model.apply(base, ids))).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # ... and PEFT -> jlora: the converted adapter imports as a rank-8 standard LoRA, same logits
    back = import_peft(d, base)
    assert back["params"]["layers_0"]["mlp"]["up_proj"]["kernel"].rank == 8
    np.testing.assert_allclose(np.asarray(apply(back, ids)), want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# rank / alpha patterns with rsLoRA, task_type
# ------------------------------------------------------------------------------------------------
def test_tiny_rank_alpha_patterns_rslora_export(tiny, tmp_path):
    model, base, ids, params, apply = _inject(tiny, False, rank={"q_proj|v_proj": 8, ".*": 4},
                                              alpha={"down_proj": 16.0, ".*": 8.0}, rslora=True)
    params = _randomize(params, seed=2, b_std=0.2)
    d = export_peft(tmp_path / "p", params, task_type="FEATURE_EXTRACTION")
    cfg = _cfg(d)
    assert cfg["use_rslora"] is True and cfg["task_type"] == "FEATURE_EXTRACTION"
    assert (cfg["r"], cfg["lora_alpha"]) == (4, 8)
    assert cfg["rank_pattern"] == {f"model.layers.{i}.self_attn.{n}": 8 for i in range(2) for n in ("q_proj", "v_proj")}
    assert cfg["alpha_pattern"] == {f"model.layers.{i}.mlp.down_proj": 16 for i in range(2)}
    d2 = export_peft(tmp_path / "p2", params)  # task_type for PeftModel's CAUSAL_LM wrapper
    want, _ = _peft_logits(tiny, d2)
    np.testing.assert_allclose(np.asarray(apply(params, ids)), want, rtol=1e-4, atol=1e-4)
    back = import_peft(d2, base)
    k = back["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert k.rslora and k.rank == 8 and k.scale == pytest.approx(8 / math.sqrt(8))
    again = export_peft(tmp_path / "p3", back)  # round trip writes the same config values
    assert {k: _cfg(again)[k] for k in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")} == \
        {k: _cfg(d2)[k] for k in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")}


# ------------------------------------------------------------------------------------------------
# Embedding LoRA
# ------------------------------------------------------------------------------------------------
def test_tiny_embedding_lora_both_ways(tiny, tmp_path):
    torch, peft = tiny["torch"], tiny["peft"]
    model, base, ids, params, apply = _inject(tiny, False, rank=4, alpha=8.0, targets=PROJ + ["embed_tokens"])
    emb = params["params"]["embed_tokens"]["embedding"]
    assert emb.layout == jlora.Layout((), (0,), (1,), gather=True)
    params = _randomize(params, seed=4, b_std=0.2)
    d = export_peft(tmp_path / "e", params)
    st = _load(d)
    assert st["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, 97)
    assert st["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (32, 4)
    assert "embed_tokens" in _cfg(d)["target_modules"]
    want, _ = _peft_logits(tiny, d)
    np.testing.assert_allclose(np.asarray(apply(params, ids)), want, rtol=1e-4, atol=1e-4)

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], task_type="CAUSAL_LM")
    pm = peft.get_peft_model(copy.deepcopy(tiny["hf"]), config)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_embedding_A" in name or "lora_B" in name:
                p.normal_(0.0, 0.2)
    pm.save_pretrained(str(tmp_path / "i"))
    pm.eval()
    want2 = _torch_logits(torch, pm, tiny["ids"])
    back = import_peft(tmp_path / "i", base)
    assert back["params"]["embed_tokens"]["embedding"].layout.gather
    assert np.abs(want2 - np.asarray(model.apply(base, ids))).max() > 0.1
    np.testing.assert_allclose(np.asarray(apply(back, ids)), want2, rtol=1e-4, atol=1e-4)
    # PEFT saved the table itself too (save_embedding_layers); an adapter over another table is refused
    from safetensors.numpy import save_file

    t = _load(tmp_path / "i")
    t["base_model.model.model.embed_tokens.base_layer.weight"] = t["base_model.model.model.embed_tokens.base_layer.weight"] + 1
    save_file(t, str(tmp_path / "i" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="differs from the base's"):
        import_peft(tmp_path / "i", base)


def test_tiny_dora_embedding_export(tiny, tmp_path):
    """DoRA on an Embedding: PEFT's magnitude is per feature, its norm over the vocabulary."""
    model, base, ids, params, apply = _inject(tiny, False, rank=4, alpha=8.0, dora=True,
                                              targets=["embed_tokens", "v_proj"])
    assert params["params"]["embed_tokens"]["embedding"].m.shape == (32,)
    params = _randomize(params, seed=6, b_std=0.2)
    want, _ = _peft_logits(tiny, export_peft(tmp_path / "e", params))
    np.testing.assert_allclose(np.asarray(apply(params, ids)), want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# The real SmolLM2-135M (slow)
# ------------------------------------------------------------------------------------------------
def _smol_inject(smol, **kw):
    from jlora.models.llama import Llama  # noqa: F401

    params, apply = jlora.inject(smol["params"], smol["model"].apply, example_args=(smol["ids_j"],),
                                 key=jax.random.key(0), **kw)
    return params, jax.jit(apply)


def _smol_check(smol, tmp_path, params, apply, name, **export_kw):
    d = export_peft(tmp_path / name, params, **export_kw)
    pm = _peft_load(smol["peft"], copy.deepcopy(smol["hf"]), d)
    want = _torch_logits(smol["torch"], pm, smol["ids"])
    got = np.asarray(apply(params, smol["ids_j"]))
    err = _report(f"{name} (jlora -> PEFT)", got, want, smol["base_logits"])
    assert np.abs(want - smol["base_logits"]).max() > 0.5  # the adapters matter
    assert err < 2e-3 * max(1.0, float(np.abs(want).max()))
    return d, want


def test_smollm2_dora_with_patterns_both_ways(smol, tmp_path):
    params, apply = _smol_inject(smol, rank={"q_proj|v_proj": 8, ".*": 4}, alpha={"down_proj": 16.0, ".*": 8.0},
                                 targets=PROJ, dora=True, rslora=True)
    params = _randomize(params, seed=2, b_std=0.02)
    d, want = _smol_check(smol, tmp_path, params, apply, "dora")
    cfg = _cfg(d)
    assert cfg["use_dora"] and cfg["use_rslora"] and cfg["rank_pattern"] and cfg["alpha_pattern"]
    back = import_peft(d, smol["params"])
    err = _report("dora (PEFT -> jlora)", np.asarray(apply(back, smol["ids_j"])), want, smol["base_logits"])
    assert err < 2e-3 * max(1.0, float(np.abs(want).max()))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_smollm2_converted_init_export(smol, tmp_path, init):
    params, apply = _smol_inject(smol, rank=4, alpha=8.0, targets=["q_proj", "v_proj", "down_proj"], init=init)
    start = np.asarray(apply(params, smol["ids_j"]))
    np.testing.assert_allclose(start, smol["base_logits"], atol=2e-3 * max(1.0, float(np.abs(start).max())))
    rng = np.random.default_rng(0)
    trained = jax.tree.map(lambda x: x.replace(b=x.b + 0.02 * rng.standard_normal(x.b.shape).astype(np.float32))
                           if isinstance(x, LoraKernel) else x, params, is_leaf=LORA_NODE)
    _smol_check(smol, tmp_path, trained, apply, init)


def test_conv_dora_both_ways(tmp_path):
    """DoRA on torch Conv2d layers: PEFT's magnitude is (1, out, 1, 1), its norm over (in, kh, kw)."""
    from test_peft import _conv_net, _peft_adapter, _torch_out, _torch_stack

    torch, _, peft = _torch_stack()
    net, f, base = _conv_net(torch)
    x = np.random.default_rng(0).standard_normal((2, 7, 7, 3)).astype(np.float32)
    torch_out = lambda model: _torch_out(torch, model, x.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)  # noqa: E731
    mm = lambda p: p.split("/")[0]  # noqa: E731
    params, apply = jlora.inject(base, f, rank=2, alpha=3.0, example_args=(jnp.asarray(x),), dora=True)
    params = _randomize(params, b_std=0.5)
    d = export_peft(tmp_path / "e", params, module_map=mm)
    assert _load(d)["base_model.model.c1.lora_magnitude_vector"].shape == (1, 4, 1, 1)
    pm = _peft_load(peft, copy.deepcopy(net), d)
    got = np.asarray(apply(params, jnp.asarray(x)))
    assert np.abs(got - f(base, x)).max() > 0.1
    np.testing.assert_allclose(got, torch_out(pm), rtol=1e-4, atol=1e-4)
    pm2 = _peft_adapter(torch, peft, net, tmp_path / "i", ["c1", "c2"], r=3, lora_alpha=6, use_dora=True)
    back = import_peft(tmp_path / "i", params, module_map=mm)
    assert back["c2"]["kernel"].m.shape == (5,)
    np.testing.assert_allclose(np.asarray(apply(back, jnp.asarray(x))), torch_out(pm2), rtol=1e-4, atol=1e-4)


def test_multi_axis_dora_against_peft(tmp_path):
    """DoRA on kernels with grouped axes (D, H, K) / (H, K, D) against torch Linear(D, H*K) / (H*K, D):
    the magnitude of a multi-axis output flattens like lora_B's rows; the norm is over all input axes."""
    from test_peft import _torch_stack

    torch, _, peft = _torch_stack()
    D, H, Kd = 8, 2, 3
    rng = np.random.default_rng(0)
    wq = rng.standard_normal((D, H, Kd)).astype(np.float32)
    wo = rng.standard_normal((H, Kd, D)).astype(np.float32)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(D, H * Kd, bias=False)
            self.o = torch.nn.Linear(H * Kd, D, bias=False)

        def forward(self, x):
            return self.o(torch.tanh(self.q(x)))

    net = Net()
    with torch.no_grad():
        net.q.weight.copy_(torch.from_numpy(wq.reshape(D, H * Kd).T.copy()))
        net.o.weight.copy_(torch.from_numpy(wo.reshape(H * Kd, D).T.copy()))

    def f(p, x):
        h = jnp.tanh(jnp.einsum("bd,dhk->bhk", x, p["q"]["kernel"]))
        return jnp.einsum("bhk,hkd->bd", h, p["o"]["kernel"])

    x = rng.standard_normal((5, D)).astype(np.float32)
    base = {"q": {"kernel": jnp.asarray(wq)}, "o": {"kernel": jnp.asarray(wo)}}
    params, apply = jlora.inject(base, f, rank=2, example_args=(jnp.asarray(x),), dora=True)
    assert params["q"]["kernel"].m.shape == (H, Kd) and params["o"]["kernel"].m.shape == (D,)
    params = _randomize(params, b_std=0.5)
    mm = lambda path: path.split("/")[0]  # noqa: E731
    pm = _peft_load(peft, copy.deepcopy(net), export_peft(tmp_path / "e", params, module_map=mm))
    with torch.no_grad():
        want = pm(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(apply(params, jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)
    back = import_peft(tmp_path / "e", base, module_map=mm, apply_fn=f, example_args=(jnp.asarray(x),))
    np.testing.assert_allclose(np.asarray(apply(back, jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)
