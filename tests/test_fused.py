"""The epilogue-fused LoRA matmul (``inject(..., matmul="pallas")``).

The Hopper kernel itself only runs on an sm_90 GPU; it is checked there by
benchmarks/fused_matmul.py (relative error against a float32 reference) and by the first-step check
of benchmarks/lora_step.py. Here, on the CPU, everything around it is checked against independent
references: the custom VJP (``impl="xla"``) against ``x·W0 + s·(x·A)·B`` written by hand, and the
interpreter's dispatch with the kernel call replaced by a plain ``x·w + u·v``, so that rank padding,
scale folding, the transposed backward, and which matmuls take the path are all exercised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import _fused
from helpers import randomize

F32 = jnp.float32


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_custom_vjp_matches_hand_written_lora():
    k = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(k[0], (2, 5, 24))
    w0 = jax.random.normal(k[1], (24, 40))
    a = jax.random.normal(k[2], (24, 3))
    b = jax.random.normal(k[3], (3, 40))
    g = jax.random.normal(k[4], (2, 5, 40))
    s = 0.7

    def ref(x, w0, a, b):  # the independent reference: W0 + s·A·B applied to x
        return x @ (w0 + s * a @ b)

    y, vjp = jax.vjp(lambda *t: _fused.lora_matmul(*t, scale=s, impl="xla"), x, w0, a, b)
    y_ref, vjp_ref = jax.vjp(ref, x, w0, a, b)
    assert y.shape == (2, 5, 40)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-4)
    (dx, dw0, da, db), (dx_r, _, da_r, db_r) = vjp(g), vjp_ref(g)
    for got, want in ((dx, dx_r), (da, da_r), (db, db_r)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
    assert not np.any(np.asarray(dw0))  # the base is frozen


def test_lora_matmul_rejects_unknown_impl():
    x = jnp.ones((2, 4))
    with pytest.raises(ValueError, match="impl must be"):
        _fused.lora_matmul(x, jnp.eye(4), jnp.ones((4, 1)), jnp.ones((1, 4)), scale=1.0, impl="cuda")


def test_supported_shapes():
    bf = jnp.bfloat16
    assert _fused.supported(16384, 2048, 5632, bf)
    assert not _fused.supported(16384, 2048, 5632, jnp.float32)  # the kernel is bf16/f16 only
    assert not _fused.supported(100, 2048, 2048, bf)  # M not a multiple of the 128-row tile
    assert not _fused.supported(128, 2048, 200, bf)


def test_no_hopper_here():
    # CI and this suite run on CPUs: the option must then leave every matmul on the plain path.
    assert jax.devices()[0].platform == "cpu"
    assert _fused.unavailable().startswith("no sm_90 GPU")


# -- the interpreter's dispatch, with the kernel replaced by plain jnp -----------------------------


@pytest.fixture
def fake_hopper(monkeypatch):
    """Pretend to be on an H100/H200: the kernel call becomes ``x·w + u·v`` in float32."""
    calls = []

    def fake_call(x, w, u, v, *, tiles):
        assert u.shape[1] % tiles.r_align == 0 and v.shape[0] == u.shape[1]  # rank padded
        calls.append((x.shape, w.shape))
        out = jnp.dot(x, w, preferred_element_type=F32) + jnp.dot(u, v, preferred_element_type=F32)
        return out.astype(x.dtype)

    monkeypatch.setattr(_fused, "unavailable", lambda: None)
    monkeypatch.setattr(_fused, "_mosaic_call", fake_call)
    return calls


D, H = 256, 512  # divisible by the kernel's tiles (the dispatch checks _fused.supported)


def _mlp_params(dtype=jnp.bfloat16):
    k = jax.random.split(jax.random.key(1), 3)
    return {
        "up": {"kernel": (jax.random.normal(k[0], (D, H)) / D ** 0.5).astype(dtype)},
        "down": {"kernel": (jax.random.normal(k[1], (H, D)) / H ** 0.5).astype(dtype)},
        "head": {"kernel": (jax.random.normal(k[2], (D, 8)) / D ** 0.5).astype(dtype)},
    }


def mlp(p, x):
    h = jax.nn.gelu(x @ p["up"]["kernel"])
    return (h @ p["down"]["kernel"]) @ p["head"]["kernel"]


def _x(dtype=jnp.bfloat16):
    return jax.random.normal(jax.random.key(2), (2, 64, D)).astype(dtype)  # M = 128 rows


def _loss_and_grads(apply, params, x):
    adapters, base = jlora.split(params)

    def loss(ad):
        return jnp.mean(jnp.square(apply(jlora.combine(ad, base), x).astype(F32)))

    return jax.jit(jax.value_and_grad(loss))(adapters)


def _reference(params, x):
    """The merged model in float32: W0 + s·A·B for every adapted kernel, applied to the same x."""
    merged = jlora.merge(params)
    return mlp(jax.tree.map(lambda t: t.astype(F32), merged), x.astype(F32))


def test_fused_path_equals_merged_model(fake_hopper):
    params, apply = jlora.inject(_mlp_params(), mlp, rank=4, alpha=8.0, targets=["up", "down"], matmul="pallas")
    params = randomize(params, scale=0.05)
    x = _x()
    out = jax.jit(apply)(params, x)
    # forward: both adapted matmuls took the path; the 8-wide head is not a multiple of the tiles
    assert sorted(fake_hopper) == sorted([((128, D), (D, H)), ((128, H), (H, D))])
    assert _rel(out.astype(F32), _reference(params, x)) < 2e-2  # bf16 activations
    rep = apply.fused_report
    assert rep.fused == 2 and rep.matmuls == [("up/kernel", None), ("down/kernel", None)]
    assert "2 of 2 adapted matmuls fused" in str(rep)


def test_fused_report_says_why_not(fake_hopper):
    params, apply = jlora.inject(_mlp_params(), mlp, rank=4, matmul="pallas")  # head too
    apply(params, _x())
    (path, why), = [m for m in apply.fused_report.matmuls if m[1] is not None]
    assert path == "head/kernel" and "(128, 256) @ (256, 8)" in why and "multiples of 256" in why
    assert "2 of 3" in str(apply.fused_report) and "head/kernel" in str(apply.fused_report)


def test_fused_report_on_cpu():
    params, apply = jlora.inject(_mlp_params(), mlp, rank=4, matmul="pallas")
    apply(params, _x())
    assert apply.fused_report.fused == 0
    assert all("no sm_90 GPU" in why for _, why in apply.fused_report.matmuls)
    _, plain = jlora.inject(_mlp_params(), mlp, rank=4)
    assert plain.fused_report is None


def test_fused_gradients_equal_plain_path(fake_hopper):
    base_params = _mlp_params()
    params, plain = jlora.inject(base_params, mlp, rank=4, alpha=8.0, targets=["up", "down"])
    _, fused = jlora.inject(base_params, mlp, rank=4, alpha=8.0, targets=["up", "down"], matmul="pallas")
    params = randomize(params, scale=0.05)
    x = _x()
    l0, g0 = _loss_and_grads(plain, params, x)
    assert not fake_hopper
    l1, g1 = _loss_and_grads(fused, params, x)
    # forward 2 calls, backward 2 more (dx = dy·W0ᵀ + s·(dy·Bᵀ)·Aᵀ through the same kernel)
    assert len(fake_hopper) == 4
    assert ((128, D), (D, H)) in fake_hopper and ((128, H), (H, D)) in fake_hopper  # the dx calls
    assert abs(float(l1) - float(l0)) < 1e-2 * abs(float(l0))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        assert _rel(a, b) < 3e-2  # bf16 rounding differs: the kernel adds in float32 before rounding


def test_fused_path_not_taken_where_it_does_not_apply(fake_hopper):
    # float32 model: the kernel is bf16/f16 only
    params, apply = jlora.inject(_mlp_params(F32), mlp, rank=4, targets=["up"], matmul="pallas")
    apply(params, _x(F32))
    assert not fake_hopper
    assert "float32" in apply.fused_report.matmuls[0][1]
    # adapter dropout in training: the plain path applies it
    params, apply = jlora.inject(_mlp_params(), mlp, rank=4, targets=["up"], dropout=0.1,
                                 matmul="pallas")
    apply(params, _x(), lora_rng=jax.random.key(3))
    assert not fake_hopper
    assert apply.fused_report.matmuls == [("up/kernel", "adapter dropout is on")]
    apply(params, _x())  # no key: dropout off, the path applies
    assert len(fake_hopper) == 1


def test_fused_path_off_inside_scan(fake_hopper):
    stack = {"w": (jax.random.normal(jax.random.key(4), (3, D, D)) / D ** 0.5).astype(jnp.bfloat16)}

    def scanned(p, x):
        def body(h, w):
            return jnp.tanh(h @ w), None

        return jax.lax.scan(body, x, p["w"])[0]

    params, apply = jlora.inject(stack, scanned, rank=4, alpha=8.0, example_args=(_x(),), matmul="pallas")
    params = randomize(params, scale=0.05)
    x = _x()
    out = apply(params, x)
    assert not fake_hopper  # measured slower inside lax.scan on the H200: left to XLA there
    assert apply.fused_report.matmuls == [("w", "inside a lax.scan/while body (measured slower there)")]
    merged = jlora.merge(params)
    assert _rel(out.astype(F32), scanned(jax.tree.map(lambda t: t.astype(F32), merged), x.astype(F32))) < 2e-2


def test_matmul_option_and_its_deprecated_spellings():
    with pytest.raises(ValueError, match="pass one of matmul="):
        jlora.inject(_mlp_params(), mlp, rank=4, fuse_shared_inputs=True, matmul="pallas")
    with pytest.raises(ValueError, match="matmul must be one of"):
        jlora.inject(_mlp_params(), mlp, rank=4, matmul="fused")
    with pytest.warns(DeprecationWarning, match="matmul='pallas'"):
        _, apply = jlora.inject(_mlp_params(), mlp, rank=4, fused_matmul=True)
    assert apply.matmul == "pallas"


def test_kernel_refuses_several_devices(monkeypatch):
    """Under sharding XLA would replicate the custom call: the kernel is for one visible device."""

    class FakeH200:
        platform, compute_capability, device_kind = "gpu", "9.0", "NVIDIA H200"

    _fused.unavailable.cache_clear()
    try:
        monkeypatch.setattr(jax, "devices", lambda *a: [FakeH200(), FakeH200()])
        why = _fused.unavailable()
    finally:
        monkeypatch.undo()
        _fused.unavailable.cache_clear()
    assert why.startswith("2 devices visible") and "CUDA_VISIBLE_DEVICES" in why
