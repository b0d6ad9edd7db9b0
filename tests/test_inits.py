"""PiSSA, OLoRA, LoftQ inits; per-kernel rank/alpha; LoRA+ — against hand computations.

PEFT's own PiSSA/OLoRA inits are the reference in tests/test_peft_family.py.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import jlora
from helpers import randomize

K = jax.random.key


def _mlp():
    p = {"w1": jax.random.normal(K(0), (8, 12)) / 3, "w2": jax.random.normal(K(1), (12, 5)) / 3}
    f = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]  # noqa: E731
    return p, f, jax.random.normal(K(2), (3, 8))


def _stacked():
    """A scanned stack (L, in, out) and a 3-D kernel with two output axes."""
    p = {"layers": jax.random.normal(K(3), (2, 6, 6)) / 3, "q": jax.random.normal(K(4), (6, 2, 3)) / 3}

    def f(p, x):
        h = lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["layers"])[0]
        return jnp.einsum("bd,dhk->bhk", h, p["q"])

    return p, f, jax.random.normal(K(5), (3, 6))


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3", "olora"])
@pytest.mark.parametrize("model", [_mlp, _stacked], ids=["mlp", "stacked"])
def test_weight_moving_inits_start_as_the_base_model(init, model):
    p, f, x = model()
    for dora in (False, True):
        lp, apply = jlora.inject(p, f, rank=2, alpha=4.0, example_args=(x,), init=init, dora=dora)
        np.testing.assert_allclose(apply(lp, x), f(p, x), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(jlora.merge(lp)[next(iter(p))], p[next(iter(p))], rtol=1e-5, atol=1e-5)
        for path, k in jlora._tree.iter_kernels(lp):
            assert k.init == init and k.a0 is not None and len(k.base_sha256) == 64
            np.testing.assert_array_equal(k.w0, p[path])  # the base is the user's, unmodified
            np.testing.assert_array_equal(k.a, k.a0)
            assert np.abs(np.asarray(k.a)).max() > 0 and np.abs(np.asarray(k.b)).max() > 0


def test_pissa_is_the_best_rank_r_approximation():
    w = np.asarray(jax.random.normal(K(0), (9, 7)))
    p, f = {"w": jnp.asarray(w)}, (lambda p, x: x @ p["w"])
    lp, _ = jlora.inject(p, f, rank=3, alpha=6.0, init="pissa")
    k = lp["w"]
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    np.testing.assert_allclose(k.scale * np.asarray(k.a0 @ k.b0), (u[:, :3] * s[:3]) @ vh[:3], rtol=1e-4, atol=1e-5)
    # A and B share the singular values equally (PEFT's split): A = U√(S/s)
    np.testing.assert_allclose(np.linalg.norm(k.a, axis=0), np.sqrt(s[:3] / k.scale), rtol=1e-5)
    # the randomised SVD finds the same subspace on a matrix of rank 3
    low = jnp.asarray((u[:, :3] * s[:3]) @ vh[:3])
    lr, _ = jlora.inject({"w": low}, f, rank=3, init="pissa_niter_2")
    np.testing.assert_allclose(lr["w"].scale * lr["w"].a0 @ lr["w"].b0, low, rtol=1e-4, atol=1e-4)


def test_olora_is_qr():
    w = np.asarray(jax.random.normal(K(0), (9, 7)))  # (in, out); the torch weight is w.T
    lp, _ = jlora.inject({"w": jnp.asarray(w)}, lambda p, x: x @ p["w"], rank=3, init="olora")
    k = lp["w"]
    q, r = np.linalg.qr(w.T)
    np.testing.assert_allclose(np.asarray(k.b0 @ k.b0.T), np.eye(3), atol=1e-5)  # orthonormal rows of B
    np.testing.assert_allclose(np.asarray(k.a0 @ k.b0), (q[:, :3] @ r[:3]).T, rtol=1e-4, atol=1e-5)


def test_loftq_error_is_below_plain_nf4():
    w = jax.random.normal(K(0), (128, 64)) / 8
    p, f = {"w": w}, (lambda p, x: x @ p["w"])
    plain = float(jnp.linalg.norm(w - jlora.NF4Tensor.from_array(w).dequantize()))
    errs = []
    for init in ("loftq", "loftq_iter_4"):
        lp, apply = jlora.inject(p, f, rank=8, alpha=16.0, init=init)
        k = lp["w"]
        assert isinstance(k.w0, jlora.NF4Tensor) and k.init == init and k.a0 is None
        errs.append(float(jnp.linalg.norm(w - jlora.merge(lp)["w"])))
        x = jax.random.normal(K(1), (2, 128))
        np.testing.assert_allclose(apply(lp, x), x @ jlora.merge(lp)["w"], rtol=1e-4, atol=1e-4)
    assert errs[0] < plain and errs[1] < errs[0], (plain, errs)
    with pytest.raises(ValueError, match="already quantized"):
        jlora.inject({"w": jlora.NF4Tensor.from_array(w)}, f, rank=8, init="loftq", example_args=(jnp.ones((1, 128)),))


def test_converted_pissa_on_the_original_base_equals_the_trained_model(tmp_path):
    p, f, x = _mlp()
    lp, apply = jlora.inject(p, f, rank=2, example_args=(x,), init="pissa", dora=True)
    trained = randomize(lp, scale=0.3)  # "training" moves A, B and m; A0, B0 stay
    trained = jax.tree.map(lambda t, s: t, trained, trained)
    conv = jlora.convert_to_lora(trained)
    k = conv["w1"]
    assert k.rank == 4 and k.init is None and k.a0 is None and k.m is not None
    np.testing.assert_array_equal(k.w0, p["w1"])  # over the original base
    np.testing.assert_allclose(apply(conv, x), apply(trained, x), rtol=1e-6, atol=1e-6)
    # saved and loaded over the original base, both forms give the trained model
    jlora.save_adapters(tmp_path / "t", trained)
    jlora.save_adapters(tmp_path / "c", conv)
    for d in ("t", "c"):
        np.testing.assert_allclose(apply(jlora.load_adapters(tmp_path / d, p), x), apply(trained, x), rtol=1e-6)
    cfg = json.loads((tmp_path / "t" / "config" / "jlora_config.json").read_text())
    assert sorted(cfg["adapters"]["w1"]["sha256"]) == ["a", "a0", "b", "b0", "m"] and cfg["adapters"]["w1"]["init"] == "pissa"


def test_weight_modifying_adapter_refuses_the_wrong_base(tmp_path):
    p, f, x = _mlp()
    lp, _ = jlora.inject(p, f, rank=2, example_args=(x,), init="olora")
    jlora.save_adapters(tmp_path / "o", lp)
    residual = dict(p, w1=jlora.merge(jlora.split(lp)[1])["w1"] - lp["w1"].scale * lp["w1"].a0 @ lp["w1"].b0)
    with pytest.raises(jlora.CheckpointError, match=r"'w1' is not the base this olora adapter.*original weights"):
        jlora.load_adapters(tmp_path / "o", residual)  # PEFT's residual base: refused
    jlora.load_adapters(tmp_path / "o", p)  # the original: fine
    # LoftQ: only over its own quantized base (with one iteration Q is plain NF4(W); with more it is not)
    lq, _ = jlora.inject(p, f, rank=2, example_args=(x,), init="loftq_iter_3", targets=["w1"])
    jlora.save_adapters(tmp_path / "q", lq)
    with pytest.raises(jlora.CheckpointError, match="LoftQ's NF4-quantized weights"):
        jlora.load_adapters(tmp_path / "q", dict(p, w1=jlora.NF4Tensor.from_array(p["w1"])))
    again, _ = jlora.inject(p, f, rank=2, example_args=(x,), init="loftq_iter_3", targets=["w1"])  # deterministic
    jlora.load_adapters(tmp_path / "q", jlora.split(again)[1])
    with pytest.raises(ValueError, match="LoftQ"):
        jlora.convert_to_lora(lq)
    with pytest.raises(ValueError, match=r"export_peft: 'w1' was initialised with 'loftq_iter_3'.*LoftQ"):
        jlora.export_peft(tmp_path / "peft", lq, module_map={"w1": "w1"})
    assert not (tmp_path / "peft").exists()


def test_init_errors():
    p, f, x = _mlp()
    with pytest.raises(ValueError, match="init must be one of"):
        jlora.inject(p, f, rank=2, init="pissa_niter_0")
    with pytest.raises(ValueError, match=r"rank <= min\(in, out\) = 5"):
        jlora.inject(p, f, rank=6, init="olora")
    lp, _ = jlora.inject(p, f, rank=2, init="gaussian")
    assert float(jnp.std(lp["w1"].a)) == pytest.approx(0.5, rel=0.35) and not np.any(lp["w1"].b)


def test_rank_and_alpha_patterns():
    p = {"q_proj": jax.random.normal(K(0), (6, 6)), "v_proj": jax.random.normal(K(1), (6, 6)),
         "o_proj": jax.random.normal(K(2), (6, 4))}
    f = lambda p, x: (x @ p["q_proj"] + x @ p["v_proj"]) @ p["o_proj"]  # noqa: E731
    lp, apply = jlora.inject(p, f, rank={"q_proj|v_proj": 4, ".*": 2}, alpha={"v_proj": 8.0, "^o": 1.0})  # re.search: "o" alone would match "q_proj"
    assert [lp[n].rank for n in ("q_proj", "v_proj", "o_proj")] == [4, 4, 2]
    assert [lp[n].scale for n in ("q_proj", "v_proj", "o_proj")] == [1.0, 2.0, 0.5]
    assert "per module" in str(apply.report) and "r=4" in str(apply.report)
    lr, _ = jlora.inject(p, f, rank={".*": 4}, alpha=8.0, rslora=True)
    assert lr["q_proj"].scale == 4.0 and lr["q_proj"].rslora and lr["q_proj"].alpha == 8.0
    with pytest.raises(ValueError, match="no rank pattern matches adapted kernel 'o_proj'"):
        jlora.inject(p, f, rank={"q_proj|v_proj": 4})
    with pytest.raises(ValueError, match="not a valid regular expression"):
        jlora.inject(p, f, rank={"(": 4})
    with pytest.raises(ValueError, match=r"rank\['q'\] must be a positive integer"):
        jlora.inject(p, f, rank={"q": 0})


def test_loraplus_matches_a_hand_computed_adam_step():
    """LoRA+ (ηB = λ·ηA) with AdamW: the first step moves each entry by lr·(g/(|g|+ε) + wd·p)."""
    p = {"w": jax.random.normal(K(0), (5, 4)), "norm": jnp.ones(4)}
    f = lambda p, x: (x @ p["w"]) * p["norm"]  # noqa: E731
    x = jax.random.normal(K(1), (3, 5))
    lp, apply = jlora.inject(p, f, rank=2, full=["norm"], dora=True, targets=["w"])
    lp = randomize(lp)
    g = jax.grad(lambda lp: jnp.sum(apply(lp, x) ** 2))(lp)
    lr, lam, wd, eps = 1e-2, 16.0, 0.1, 1e-8

    def want(param, grad, rate):
        return -rate * (np.asarray(grad) / (np.abs(np.asarray(grad)) + eps) + wd * np.asarray(param))

    for tx in (jlora.optimizer(optax.adamw(lr, eps=eps, weight_decay=wd), lp, lr_ratio=lam),
               jlora.loraplus(optax.adamw, lp, lr=lr, lr_ratio=lam, weight_decay=wd, eps=eps)):
        u, _ = tx.update(g, tx.init(lp), lp)
        k, gk, uk = lp["w"], g["w"], u["w"]
        np.testing.assert_allclose(uk.a, want(k.a, gk.a, lr), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(uk.b, want(k.b, gk.b, lam * lr), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(uk.m, want(k.m, gk.m, lam * lr), rtol=1e-5, atol=1e-7)  # 1-D: B's group
        np.testing.assert_allclose(u["norm"].value, want(lp["norm"].value, g["norm"].value, lam * lr), rtol=1e-5)
        assert not np.any(uk.w0)
    with pytest.raises(ValueError, match="lr_ratio must be a positive number"):
        jlora.optimizer(optax.adam(1e-3), lp, lr_ratio=0)


def test_loraplus_embedding_group():
    p = {"embed": jax.random.normal(K(0), (10, 4)), "w": jax.random.normal(K(1), (4, 3))}
    f = lambda p, t: p["embed"][t] @ p["w"]  # noqa: E731
    t = jnp.array([[1, 2]])
    lp, apply = jlora.inject(p, f, rank=2, targets=["embed", "w"], example_args=(t,))
    lp = randomize(lp)
    g = jax.grad(lambda lp: jnp.sum(apply(lp, t) ** 2))(lp)
    tx = jlora.loraplus(optax.sgd, lp, lr=0.1, lr_ratio=4.0, lr_embedding=1e-3)
    u, _ = tx.update(g, tx.init(lp))
    np.testing.assert_allclose(u["embed"].b, -1e-3 * g["embed"].b, rtol=1e-6)
    np.testing.assert_allclose(u["w"].b, -0.4 * g["w"].b, rtol=1e-6)
    np.testing.assert_allclose(u["w"].a, -0.1 * g["w"].a, rtol=1e-6)
