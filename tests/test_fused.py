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
from helpers import eqns_where, randomize

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


def test_custom_vjp_under_vmap():
    """``jax.vmap`` over activations folds the batch into the kernel's rows; over B (a batch of
    adapters) the call takes the plain form. Both against the hand-written reference."""
    k = jax.random.split(jax.random.key(7), 4)
    x, w0 = jax.random.normal(k[0], (3, 4, 8)), jax.random.normal(k[1], (8, 16))
    a, b = jax.random.normal(k[2], (8, 2)), jax.random.normal(k[3], (2, 16))
    fused = lambda x, a, b: jnp.sum(_fused.lora_matmul(x, w0, a, b, scale=0.5, impl="xla") ** 2)
    ref = lambda x, a, b: jnp.sum((x @ (w0 + 0.5 * a @ b)) ** 2)
    bs = jnp.stack([b, 2 * b, 3 * b])
    for axes, args in (((0, None, None), (x, a, b)), ((None, None, 0), (x, a, bs))):
        got = jax.vmap(jax.grad(fused, argnums=(0, 1, 2)), in_axes=axes)(*args)
        want = jax.vmap(jax.grad(ref, argnums=(0, 1, 2)), in_axes=axes)(*args)
        for g, r in zip(got, want):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-3)


def test_remat_policy_keeps_x_a_of_the_fused_path():
    """Under ``jax.checkpoint(policy=save_only_these_names(..., "jlora_xa"))`` the backward does not
    run x·A again (it did while x·A was a residual of the custom VJP, invisible to policies): the
    compiled gradient has as many matmuls as without remat, and the gradients are the reference's."""
    import re

    from jax.ad_checkpoint import checkpoint_name

    k = jax.random.split(jax.random.key(3), 4)
    x, w0 = jax.random.normal(k[0], (64, 32)), jax.random.normal(k[1], (32, 48))
    a, b = jax.random.normal(k[2], (32, 4)), jax.random.normal(k[3], (4, 48))

    def layer(x, a, b, fused=True):
        h = jnp.sin(x)  # what a remat'd layer re-computes: the matmul's input
        y = _fused.lora_matmul(h, w0, a, b, scale=0.5, impl="xla") if fused else h @ w0 + 0.5 * (h @ a) @ b
        return jnp.sum(jnp.cos(checkpoint_name(y, "proj")))

    policy = jax.checkpoint_policies.save_only_these_names("proj", "jlora_xa")
    kept = jax.checkpoint(layer, policy=policy)
    want = jax.grad(lambda *v: layer(*v, fused=False), argnums=(0, 1, 2))(x, a, b)
    for g, r in zip(jax.grad(kept, argnums=(0, 1, 2))(x, a, b), want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4)

    def dots(f):
        return len(re.findall(r" dot\(", jax.jit(jax.grad(f, argnums=(1, 2))).lower(x, a, b).compile().as_text()))

    assert dots(kept) == dots(layer)


def test_lora_matmul_rejects_unknown_impl():
    x = jnp.ones((2, 4))
    with pytest.raises(ValueError, match="impl must be"):
        _fused.lora_matmul(x, jnp.eye(4), jnp.ones((4, 1)), jnp.ones((1, 4)), scale=1.0, impl="cuda")


@pytest.mark.parametrize("cluster", [0, 3])
def test_bad_cluster_raises(cluster):
    x, w, a, b = jnp.ones((256, 256)), jnp.ones((256, 256)), jnp.ones((256, 4)), jnp.ones((4, 256))
    with pytest.raises(ValueError, match=f"Tiles.cluster={cluster}: use 1"):
        _fused.lora_matmul(x, w, a, b, scale=1.0, impl="xla", tiles=_fused.Tiles(cluster=cluster))


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


class KernelCalls(list):
    """The (x, w) shapes the stand-in kernel was traced with (each block shape once per trace), and
    :meth:`count`: how many kernel calls a program holds."""

    @staticmethod
    def count(closed_jaxpr) -> int:
        """Kernel calls in a jaxpr, nested calls followed (each reference to a sub-jaxpr counts)."""
        return len(eqns_where(closed_jaxpr.jaxpr, lambda e: e.params.get("name") == "fake_kernel"))


@jax.jit
def fake_kernel(x, w, u, v):
    out = jnp.dot(x, w, preferred_element_type=F32) + jnp.dot(u, v, preferred_element_type=F32)
    return out.astype(x.dtype)


@pytest.fixture
def fake_hopper(monkeypatch):
    """Pretend to be on an H100/H200: the kernel call becomes ``x·w + u·v`` in float32."""
    calls = KernelCalls()
    calls.read_as_stored = []  # the stored shapes of the w's the kernel multiplied by their transpose
    calls.v_t = []  # per call: whether v was read as stored (N, r)

    def fake_call(x, w, u, v, *, tiles, w_t=False, v_t=None):
        assert u.shape[1] % tiles.r_align == 0  # rank padded
        v_t = w_t if v_t is None else v_t
        calls.v_t.append(v_t)
        if w_t:  # the kernel reads w (N, K) as stored and multiplies by its transpose
            calls.read_as_stored.append(w.shape)
            w = w.T
        if v_t:  # and v (N, r) too
            v = v.T
        assert v.shape[0] == u.shape[1]
        calls.append((x.shape, w.shape))
        return fake_kernel(x, w, u, v)

    monkeypatch.setattr(_fused, "unavailable", lambda: None)
    monkeypatch.setattr(_fused, "_mosaic_call", fake_call)
    _fused.clear_caches()  # traced once per shape: retrace with the fake call
    yield calls
    _fused.clear_caches()


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


def _grad_jaxpr(apply, params, x):
    adapters, base = jlora.split(params)
    loss = lambda ad: jnp.mean(jnp.square(apply(jlora.combine(ad, base), x).astype(F32)))
    return jax.make_jaxpr(jax.value_and_grad(loss))(adapters)


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
    assert set(fake_hopper) == {((128, D), (D, H)), ((128, H), (H, D))}
    assert fake_hopper.count(jax.make_jaxpr(apply)(params, x)) == 2
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


@pytest.mark.parametrize("rank", [4, 20])
def test_fused_gradients_equal_plain_path(fake_hopper, rank):
    """The forward and backward kernel calls against the plain path. Rank 4 pads to 16, where the dx
    call reads A as stored; rank 20 pads to 32, where it is handed Aᵀ (the transposed low-rank tile
    is checked on the GPU at 16 only)."""
    base_params = _mlp_params()
    params, plain = jlora.inject(base_params, mlp, rank=rank, alpha=8.0, targets=["up", "down"])
    _, fused = jlora.inject(base_params, mlp, rank=rank, alpha=8.0, targets=["up", "down"], matmul="pallas")
    params = randomize(params, scale=0.05)
    x = _x()
    l0, g0 = _loss_and_grads(plain, params, x)
    assert not fake_hopper
    l1, g1 = _loss_and_grads(fused, params, x)
    # forward 2 calls, backward 2 more (dx = dy·W0ᵀ + s·(dy·Bᵀ)·Aᵀ through the same kernel)
    assert fake_hopper.count(_grad_jaxpr(fused, params, x)) == 4
    assert ((128, D), (D, H)) in fake_hopper and ((128, H), (H, D)) in fake_hopper  # the dx calls
    # ... which read W0 as stored (no transposed copy of a kernel is made for the backward pass)
    assert sorted(fake_hopper.read_as_stored) == sorted([(D, H), (H, D)])
    assert fake_hopper.v_t.count(True) == (2 if rank == 4 else 0)  # forward calls never transpose v
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
    assert set(fake_hopper) == {((128, D), (D, H))}


def _scanned_stack():
    stack = {"w": (jax.random.normal(jax.random.key(4), (3, D, D)) / D ** 0.5).astype(jnp.bfloat16)}

    def scanned(p, x):
        def body(h, w):
            return jnp.tanh(h @ w), None

        return jax.lax.scan(body, x, p["w"])[0]

    return stack, scanned


@pytest.mark.parametrize("off", ["0", "false", "OFF"])
def test_fused_path_off_inside_scan_when_switched_off(fake_hopper, monkeypatch, off):
    """``JLORA_FUSED_IN_LOOPS=0``: the scan body keeps the plain path, and the report says why."""
    monkeypatch.setenv(_fused.IN_LOOPS_ENV, off)
    stack, scanned = _scanned_stack()
    params, apply = jlora.inject(stack, scanned, rank=4, alpha=8.0, example_args=(_x(),), matmul="pallas")
    params = randomize(params, scale=0.05)
    x = _x()
    out = apply(params, x)
    assert not fake_hopper
    assert apply.fused_report.matmuls == [("w", "inside a lax.scan/while body, and JLORA_FUSED_IN_LOOPS=0 is set")]
    merged = jlora.merge(params)
    assert _rel(out.astype(F32), scanned(jax.tree.map(lambda t: t.astype(F32), merged), x.astype(F32))) < 2e-2


@pytest.mark.parametrize("value", ["flase", "2", "of"])
def test_misspelt_in_loops_switch_raises_before_tracing(fake_hopper, monkeypatch, value):
    """A value of ``JLORA_FUSED_IN_LOOPS`` that is neither on nor off is an error naming the
    variable, raised by ``inject`` itself (not read as "on")."""
    monkeypatch.setenv(_fused.IN_LOOPS_ENV, value)
    stack, scanned = _scanned_stack()
    with pytest.raises(ValueError, match=f"JLORA_FUSED_IN_LOOPS='{value}' is not a switch"):
        jlora.inject(stack, scanned, rank=4, example_args=(_x(),), matmul="pallas")
    jlora.inject(stack, scanned, rank=4, example_args=(_x(),))  # the plain path does not read it
    assert not fake_hopper


@pytest.mark.parametrize("on", ["", "1", "On", "yes"])
def test_fused_path_inside_scan_when_switched_on(fake_hopper, monkeypatch, on):
    """Every spelling of "on" (and the empty value) takes the kernel in the scan body."""
    monkeypatch.setenv(_fused.IN_LOOPS_ENV, on)
    stack, scanned = _scanned_stack()
    params, apply = jlora.inject(stack, scanned, rank=4, alpha=8.0, example_args=(_x(),), matmul="pallas")
    apply(randomize(params, scale=0.05), _x())
    assert apply.fused_report.matmuls == [("w", None)] and fake_hopper


def test_fused_path_inside_scan_by_default(fake_hopper, monkeypatch):
    """The scan body's matmul takes the kernel (the default), forward and dx, one call each in the
    loop body; value and adapter gradients as on the plain path."""
    monkeypatch.delenv(_fused.IN_LOOPS_ENV, raising=False)
    stack, scanned = _scanned_stack()
    params, plain = jlora.inject(stack, scanned, rank=4, alpha=8.0, example_args=(_x(),))
    _, fused = jlora.inject(stack, scanned, rank=4, alpha=8.0, example_args=(_x(),), matmul="pallas")
    params = randomize(params, scale=0.05)
    x = _x()
    l0, g0 = _loss_and_grads(plain, params, x)
    assert not fake_hopper
    l1, g1 = _loss_and_grads(fused, params, x)
    assert fused.fused_report.matmuls == [("w", None)]
    assert set(fake_hopper) == {((128, D), (D, D))}
    assert fake_hopper.count(_grad_jaxpr(fused, params, x)) == 2  # the forward's and the dx's, in the loop bodies
    assert abs(float(l1) - float(l0)) < 1e-2 * abs(float(l0))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        assert _rel(a, b) < 3e-2


def test_kernel_output_behind_a_barrier_inside_scan(fake_hopper, monkeypatch):
    """Each kernel call's output goes straight into an optimization barrier: inside a loop body
    XLA:GPU otherwise duplicated the (dynamic-slice-fused) call into its consumers and ran the
    kernel twice for 3 of a layer's 7 projections (H200, benchmarks/RESULTS.md); CPUs do not
    show it, so this checks the program JAX hands XLA."""
    monkeypatch.delenv(_fused.IN_LOOPS_ENV, raising=False)
    stack, scanned = _scanned_stack()
    params, fused = jlora.inject(stack, scanned, rank=4, alpha=8.0, example_args=(_x(),), matmul="pallas")
    params = randomize(params, scale=0.05)

    def walk(jaxpr) -> tuple[int, int]:
        barriered = {id(v) for e in jaxpr.eqns if e.primitive.name == "optimization_barrier" for v in e.invars}
        calls = guarded = 0
        for eqn in jaxpr.eqns:
            if eqn.params.get("name") == "fake_kernel":
                calls += 1
                guarded += all(id(v) in barriered for v in eqn.outvars)
                continue
            for v in eqn.params.values():
                for sub in v if isinstance(v, (tuple, list)) else [v]:
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        c, g = walk(inner)
                        calls, guarded = calls + c, guarded + g
        return calls, guarded

    calls, guarded = walk(_grad_jaxpr(fused, params, _x()).jaxpr)
    assert calls == 2 and guarded == calls  # the forward's and the dx's call, both behind a barrier


def test_matmul_option_and_its_deprecated_spellings():
    with pytest.raises(ValueError, match="pass one of matmul="):
        jlora.inject(_mlp_params(), mlp, rank=4, fuse_shared_inputs=True, matmul="pallas")
    with pytest.raises(ValueError, match="matmul must be one of"):
        jlora.inject(_mlp_params(), mlp, rank=4, matmul="fused")
    with pytest.warns(DeprecationWarning, match="matmul='pallas'"):
        _, apply = jlora.inject(_mlp_params(), mlp, rank=4, fused_matmul=True)
    assert apply.matmul == "pallas"


def test_several_devices_are_fine(monkeypatch):
    """The kernel call is partitioned under SPMD (each device runs it on its own blocks), so several
    visible sm_90 devices no longer keep the option off."""

    class FakeH200:
        platform, compute_capability, device_kind = "gpu", "9.0", "NVIDIA H200"

    _fused.unavailable.cache_clear()
    try:
        monkeypatch.setattr(jax, "devices", lambda *a: [FakeH200(), FakeH200()])
        why = _fused.unavailable()
    finally:
        monkeypatch.undo()
        _fused.unavailable.cache_clear()
    assert why is None or why.startswith("Pallas Mosaic GPU unavailable")  # never the device count


# -- under SPMD sharding (8 simulated CPU devices, conftest) ----------------------------------------------

from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from helpers import collectives  # noqa: E402

needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
AUTO = jax.sharding.AxisType.Auto


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AUTO,) * len(names))


# (mesh, x spec, W0 spec, A spec, B spec): A and B placed as jlora places them (they follow W0)
SHARDED = {
    "data-parallel": (((8,), ("data",)), P("data"), P(), P(), P()),
    "fsdp": (((8,), ("fsdp",)), P("fsdp"), P("fsdp", None), P("fsdp", None), P()),
    "column-parallel": (((2, 4), ("data", "model")), P("data"), P(None, "model"), P(), P(None, "model")),
    "row-parallel": (((2, 4), ("data", "model")), P("data", None, "model"), P("model", None), P("model", None), P()),
}
BT, T, K, N, R = 8, 8, 32, 48, 4  # x (8, 8, 32): 2048 elements; W0 (32, 48): 1536


@needs8
@pytest.mark.parametrize("case", sorted(SHARDED))
def test_partitioned_kernel_call_matches_unsharded(case):
    """``lora_matmul`` (the XLA stand-in, through the partitioned call) on sharded operands: value and
    gradients (x, A, B) equal the unsharded call's and ``x·(W0 + s·A·B)``'s; the activations stay
    split (no all-gather as large as x or dy); an FSDP kernel is gathered once, forward and backward."""
    (shape, names), xs, ws, as_, bs = SHARDED[case]
    m = _mesh(shape, names)
    rng = np.random.default_rng(0)
    x, w0, a, b, g = (rng.standard_normal(s).astype(np.float32)
                      for s in ((BT, T, K), (K, N), (K, R), (R, N), (BT, T, N)))
    s = 0.7
    fused = lambda x, w0, a, b: _fused.lora_matmul(x, w0, a, b, scale=s, impl="xla")
    merged = lambda x, w0, a, b: x @ (w0 + s * a @ b)

    def value_and_grads(f, *args):
        return jax.value_and_grad(lambda x, w0, a, b, g: jnp.sum(f(x, w0, a, b) * g), argnums=(0, 2, 3))(*args)

    want_loss, want_grads = jax.jit(lambda *t: value_and_grads(fused, *t))(x, w0, a, b, g)  # one device
    ref_loss, ref_grads = value_and_grads(merged, x, w0, a, b, g)
    put = lambda v, spec: jax.device_put(v, NamedSharding(m, spec))
    args = (put(x, xs), put(w0, ws), put(a, as_), put(b, bs), put(g, xs))
    step = jax.jit(lambda *t: value_and_grads(fused, *t)).lower(*args).compile()
    loss, grads = step(*args)
    for got_l, got_g in ((want_loss, want_grads), (loss, grads)):
        np.testing.assert_allclose(float(got_l), float(ref_loss), rtol=1e-5)
        for got, ref in zip(got_g, ref_grads):
            np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4)
    y = jax.jit(fused)(*args[:4])
    assert y.sharding.spec[0] == xs[0], y.sharding  # rows follow x's batch split
    gathers = collectives(step.as_text())["all-gather"]
    assert all(n < BT * T * K for _, n in gathers), f"activations gathered: {gathers}"
    if case == "fsdp":  # W0 gathered once (the backward's dx call reuses the forward's gather)
        assert [n for _, n in gathers if n == K * N] == [K * N], gathers


D_SH = 256  # one block per device needs 128-row and 256-column tiles


def _sharded_mlp_params(m, up_spec, down_spec):
    k = jax.random.split(jax.random.key(5), 2)
    w_up = (jax.random.normal(k[0], (D_SH, 2 * D_SH)) / D_SH ** 0.5).astype(jnp.bfloat16)
    w_down = (jax.random.normal(k[1], (2 * D_SH, D_SH)) / (2 * D_SH) ** 0.5).astype(jnp.bfloat16)
    return {"up": {"kernel": jax.device_put(w_up, NamedSharding(m, up_spec))},
            "down": {"kernel": jax.device_put(w_down, NamedSharding(m, down_spec))}}


def sharded_mlp(p, x):
    return jax.nn.gelu(x @ p["up"]["kernel"]) @ p["down"]["kernel"]


# (mesh, up spec, down spec, x spec, per-device (x, w) block shapes the kernel sees)
MLP_SHARDED = {
    "data-parallel": (((8,), ("data",)), P(), P(), P("data"),
                      {((128, 256), (256, 512)), ((128, 512), (512, 256))}),
    "fsdp": (((8,), ("data",)), P("data", None), P("data", None), P("data"),
             {((128, 256), (256, 512)), ((128, 512), (512, 256))}),
    # up column-parallel, down row-parallel (its K split: blocks summed), batch over 'data'
    "tensor-parallel": (((4, 2), ("data", "model")), P(None, "model"), P("model", None), P("data"),
                        {((256, 256), (256, 256))}),
}


def _one_pass_backward(monkeypatch, dy: str) -> list:
    """With ``dy="interpret"``, the fused backward's one-pass dy products run the Triton kernel's body
    in Pallas' interpreter (as ``"auto"`` takes the kernel on an H200); returns the list of dy blocks
    the kernel is traced with."""
    from jlora import _dy_pass

    blocks, kernel = [], _dy_pass._triton_products

    def recording(dy_, b, xa, **kw):
        blocks.append(dy_.shape)
        return kernel(dy_, b, xa, **kw)

    monkeypatch.setattr(_dy_pass, "_triton_products", recording)
    monkeypatch.setattr(_fused, "DEFAULT_TILES", _fused.Tiles(dy_pass=dy))
    return blocks


@needs8
@pytest.mark.parametrize("dy", ["xla", "interpret"])
@pytest.mark.parametrize("case", sorted(MLP_SHARDED))
def test_fused_path_on_a_mesh(fake_hopper, monkeypatch, case, dy):
    """``inject(..., matmul="pallas")`` on sharded params and inputs: every adapted matmul takes the
    kernel, each device calls it on its own blocks (and, with ``dy="interpret"``, the backward's
    one-pass dy products too); loss and adapter gradients equal the plain path's on the same mesh, and
    the step gathers no activations."""
    dy_blocks = _one_pass_backward(monkeypatch, dy)
    (shape, names), up, down, xs, blocks = MLP_SHARDED[case]
    m = _mesh(shape, names)
    base = _sharded_mlp_params(m, up, down)
    x = jax.device_put(jax.random.normal(jax.random.key(6), (8, 128, D_SH)).astype(jnp.bfloat16),
                       NamedSharding(m, xs))  # M = 1024 rows
    params, plain = jlora.inject(base, sharded_mlp, rank=4, alpha=8.0, example_args=(x,))
    _, fused = jlora.inject(base, sharded_mlp, rank=4, alpha=8.0, example_args=(x,), matmul="pallas")
    params = randomize(params, scale=0.05)
    adapters, frozen = jlora.split(params)

    def loss(apply):  # x and the base are arguments: a closed-over array would lose its sharding
        return lambda ad, frozen, x: jnp.mean(jnp.square(apply(jlora.combine(ad, frozen), x).astype(F32)))

    l0, g0 = jax.jit(jax.value_and_grad(loss(plain)))(adapters, frozen, x)
    assert not fake_hopper
    step = jax.jit(jax.value_and_grad(loss(fused))).lower(adapters, frozen, x).compile()
    l1, g1 = step(adapters, frozen, x)
    assert fused.fused_report.fused == 2, fused.fused_report
    # traced whole when the call is staged out, then per device block when XLA partitions it
    assert blocks <= set(fake_hopper), set(fake_hopper)
    # the one-pass call per device block: dy's rows split by the batch (the kernel's x blocks' rows)
    assert {r for r, _ in dy_blocks} >= ({m for (m, _), _ in blocks} if dy == "interpret" else set()), dy_blocks
    assert abs(float(l1) - float(l0)) < 1e-2 * abs(float(l0))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        assert _rel(a, b) < 3e-2
    gathers = collectives(step.as_text())["all-gather"]
    assert all(n < x.size for _, n in gathers), f"activations gathered: {gathers}"  # W0: half x's size


@needs8
@pytest.mark.parametrize("dy", ["xla", "interpret"])
@pytest.mark.parametrize("case", ["data-parallel", "fsdp"])
def test_fused_path_inside_scan_on_a_mesh(fake_hopper, monkeypatch, case, dy):
    """A scanned stack on a mesh (the default takes the kernel inside loop bodies): the partitioned
    call runs per device block inside the scan body (so does the one-pass dy call with
    ``dy="interpret"``), loss and adapter gradients equal the plain path's on the same mesh and the
    merged model's, and no activation is gathered."""
    dy_blocks = _one_pass_backward(monkeypatch, dy)
    monkeypatch.delenv(_fused.IN_LOOPS_ENV, raising=False)
    m = _mesh((8,), ("data",))
    stack, scanned = _scanned_stack()
    w_spec = P(None, "data", None) if case == "fsdp" else P()
    stack = {"w": jax.device_put(stack["w"], NamedSharding(m, w_spec))}
    x = jax.device_put(jax.random.normal(jax.random.key(7), (8, 128, D)).astype(jnp.bfloat16),
                       NamedSharding(m, P("data")))  # one 128-row block per device
    params, plain = jlora.inject(stack, scanned, rank=4, alpha=8.0, example_args=(x,))
    _, fused = jlora.inject(stack, scanned, rank=4, alpha=8.0, example_args=(x,), matmul="pallas")
    params = randomize(params, scale=0.05)
    adapters, frozen = jlora.split(params)

    def loss(apply):
        return lambda ad, frozen, x: jnp.mean(jnp.square(apply(jlora.combine(ad, frozen), x).astype(F32)))

    l0, g0 = jax.jit(jax.value_and_grad(loss(plain)))(adapters, frozen, x)
    assert not fake_hopper
    step = jax.jit(jax.value_and_grad(loss(fused))).lower(adapters, frozen, x).compile()
    l1, g1 = step(adapters, frozen, x)
    assert fused.fused_report.matmuls == [("w", None)]
    assert ((128, D), (D, D)) in fake_hopper  # a device's block, inside the loop body
    assert ((128, D) in dy_blocks) == (dy == "interpret"), dy_blocks  # and the one-pass call's
    assert abs(float(l1) - float(l0)) < 1e-2 * abs(float(l0))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        assert _rel(a, b) < 3e-2
    gathers = collectives(step.as_text())["all-gather"]
    assert all(n < x.size for _, n in gathers), f"activations gathered: {gathers}"
    # an independent reference: the merged model W0 + s·A·B (no interpreter), in float32
    merged = lambda ad: jnp.mean(jnp.square(scanned(  # noqa: E731
        jax.tree.map(lambda t: t.astype(F32), jlora.merge(jlora.combine(ad, frozen))), x.astype(F32))))
    l2, g2 = jax.jit(jax.value_and_grad(merged))(adapters)
    assert abs(float(l1) - float(l2)) < 1e-2 * abs(float(l2))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert _rel(a, b) < 3e-2


def test_fused_path_in_scan_recomputes_the_normed_input(fake_hopper, monkeypatch):
    """Inside a scan, the input the kernel's dA needs (here an RMS norm of the carry) is rebuilt in the
    backward from the norm's float32 input (which the norm's own backward keeps) instead of being
    stacked per iteration; gradients as with the switch off (jlora._rules.recompute)."""
    stack = {"w": (jax.random.normal(jax.random.key(4), (3, D, D)) / D ** 0.5).astype(jnp.bfloat16)}

    def scanned(p, x):
        def body(h, w):
            h32 = h.astype(F32)
            x = (h32 * jax.lax.rsqrt(jnp.mean(h32 * h32, -1, keepdims=True) + 1e-6)).astype(h.dtype)
            return h + jnp.tanh(x @ w), None

        return jax.lax.scan(body, x, p["w"])[0]

    params, fused = jlora.inject(stack, scanned, rank=4, alpha=8.0, example_args=(_x(),), matmul="pallas")
    params = randomize(params, scale=0.05)
    x = _x()
    stacked = lambda j: sorted(str(v.aval) for v in next(e for e in j.jaxpr.eqns if e.primitive.name == "scan").outvars
                               if v.aval.shape[:1] == (3,))
    monkeypatch.setenv("JLORA_RECOMPUTE_IN_LOOPS", "0")
    l0, g0 = _loss_and_grads(fused, params, x)
    s0 = stacked(_grad_jaxpr(fused, params, x))
    monkeypatch.setenv("JLORA_RECOMPUTE_IN_LOOPS", "1")
    l1, g1 = _loss_and_grads(fused, params, x)
    j1 = _grad_jaxpr(fused, params, x)
    s1 = stacked(j1)
    assert fused.fused_report.matmuls == [("w", None)] and set(fake_hopper) == {((128, D), (D, D))}
    assert abs(float(l1) - float(l0)) < 1e-3 * abs(float(l0))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        assert _rel(a, b) < 2e-2
    # off: the normed bf16 input is stacked; on: it is not (the float32 carry is, for the norm)
    assert s0.count("bfloat16[3,2,64,256]") == s1.count("bfloat16[3,2,64,256]") + 1
    assert fake_hopper.count(j1) == 2  # the forward's and the dx's: the checkpoint re-runs no kernel


# -- the real kernel, built and lowered for a CUDA GPU on this CPU ------------------------------------------


def _lower_for_cuda(monkeypatch, m, k, n, r, *, w_t, v_t, tiles):
    """The Mosaic GPU kernel lowered (not run) for an H200 (132 SMs): Pallas builds the whole kernel
    here, tiles, transforms, pipeline and epilogue, so a configuration it cannot build fails."""
    pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
    from jax.extend import backend

    class H200:
        core_count = 132

    monkeypatch.setattr(backend, "get_default_device", lambda: H200())
    bf = jnp.bfloat16
    shapes = ((m, k), (n, k) if w_t else (k, n), (m, r), (n, r) if v_t else (r, n))
    f = jax.jit(lambda x, w, u, v: _fused._mosaic_fused(x, w, u, v, tiles=tiles, w_t=w_t, v_t=v_t))
    traced = f.trace(*(jax.ShapeDtypeStruct(s, bf) for s in shapes))
    assert traced.out_info.shape == (m, n)
    return traced.lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("lowering", ["lane", "warpgroup"])
@pytest.mark.parametrize("m,k,n,r,w_t,v_t", [
    (512, 256, 512, 16, False, False),  # the forward, two CTAs a cluster
    (384, 256, 256, 32, False, False),  # rows not whole cluster tiles: one CTA
    (512, 512, 256, 16, True, True),  # the backward's dx: W0 and A read as stored
    (256, 256, 512, 64, True, False),  # dx at a rank where v is handed over transposed, one store buffer
])
def test_kernel_lowers_for_cuda(monkeypatch, lowering, m, k, n, r, w_t, v_t):
    tiles = _fused.fitted(_fused.DEFAULT_TILES._replace(lowering=lowering), r)
    assert tiles is not None and tiles.slots == (1 if r == 64 else 2)
    try:
        text = _lower_for_cuda(monkeypatch, m, k, n, r, w_t=w_t, v_t=v_t, tiles=tiles)
    except (ImportError, AttributeError, NotImplementedError) as e:  # a JAX whose Pallas lacks this API
        pytest.skip(f"this JAX cannot lower Mosaic GPU kernels here: {type(e).__name__}: {e}")
    assert "mosaic_gpu" in text and "jlora_fused_matmul" in text


def test_shared_memory_count_is_mosaics(monkeypatch):
    """``smem_bytes`` against Mosaic GPU's own count: at padded rank 64 the default tiles ask for
    more than sm_90 has, and Mosaic refuses them with exactly that number; 48 still fits."""
    t = _fused.DEFAULT_TILES
    assert _fused.smem_bytes(t, 48) <= _fused.SMEM_BYTES < _fused.smem_bytes(t, 64)
    try:
        _lower_for_cuda(monkeypatch, 256, 256, 256, 48, w_t=False, v_t=False, tiles=t)
        with pytest.raises(ValueError, match=f"smem_bytes={_fused.smem_bytes(t, 64)} > max_smem_bytes={_fused.SMEM_BYTES}"):
            _lower_for_cuda(monkeypatch, 256, 256, 256, 64, w_t=False, v_t=False, tiles=t)
    except (ImportError, AttributeError, NotImplementedError) as e:
        pytest.skip(f"this JAX cannot lower Mosaic GPU kernels here: {type(e).__name__}: {e}")
    assert _fused.max_rank() == 64 and _fused.fitted(t, 80) is None


def test_rank_too_large_for_the_kernel(fake_hopper, monkeypatch):
    """Rank 128 fits no tiles: the dispatch says so and runs the general rule (values still those of
    the merged model); ``lora_matmul`` itself refuses it before tracing. Rank 64 takes the kernel with
    one epilogue store buffer."""
    params, apply = jlora.inject(_mlp_params(), mlp, rank=128, alpha=8.0, targets=["up", "down"], matmul="pallas")
    params = randomize(params, scale=0.05)
    x = _x()
    out = jax.jit(apply)(params, x)
    assert not fake_hopper and apply.fused_report.fused == 0
    assert all("rank 128" in why and "up to 64" in why for _, why in apply.fused_report.matmuls)
    assert _rel(out.astype(F32), _reference(params, x)) < 2e-2
    with pytest.raises(ValueError, match=r"rank 128 \(padded to 128\).*impl='xla'"):
        _fused.lora_matmul(x, jnp.eye(D, dtype=x.dtype), jnp.ones((D, 128), x.dtype), jnp.ones((128, D), x.dtype),
                           scale=1.0)
    seen = []
    fake = _fused._mosaic_call
    monkeypatch.setattr(_fused, "_mosaic_call",
                        lambda *a, tiles, **kw: (seen.append(tiles.slots), fake(*a, tiles=tiles, **kw))[1])
    params, apply = jlora.inject(_mlp_params(), mlp, rank=64, targets=["up"], matmul="pallas")
    jax.jit(apply)(params, x)
    assert apply.fused_report.fused == 1 and seen == [1]


def test_bad_lowering_raises():
    x = jnp.ones((4, 8))
    with pytest.raises(ValueError, match="Tiles.lowering='lanes'"):
        _fused.lora_matmul(x, jnp.eye(8), jnp.ones((8, 2)), jnp.ones((2, 8)), scale=1.0, impl="xla",
                           tiles=_fused.DEFAULT_TILES._replace(lowering="lanes"))
