"""Adapted matmuls' inputs inside a scan body: recomputed in the backward instead of stacked.

A frozen base's backward does not need a matmul's input; LoRA's ``dA`` does. Inside ``lax.scan``
JAX would stack every such input across iterations; ``jlora._rules.recompute`` rebuilds the ones
that cheap elementwise equations make (an RMS norm, ``silu(gate)·up``) from values the base keeps
anyway. These tests check the values and gradients against the same model with the switch off and
against the merged model in float32, and count the stacked residuals.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jlora
from jlora._rules import recompute
from helpers import randomize

F32 = jnp.float32
D, H, L = 32, 64, 3


def _rms(x, w):
    x32 = x.astype(F32)
    return (x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + 1e-6)).astype(x.dtype) * w


def block(h, w):
    """A Llama-like layer: the q/k/v-style matmuls read an RMS norm, ``down`` reads silu(gate)·up."""
    x = _rms(h, w["ln1"])
    h = h + jnp.tanh(x @ w["q"]) @ w["o"] + x @ w["v"]
    x = _rms(h, w["ln2"])
    return h + (jax.nn.silu(x @ w["gate"]) * (x @ w["up"])) @ w["down"]


def model(p, h):
    return jax.lax.scan(lambda h, w: (block(h, w), None), h, p["layers"])[0]


def _params(dtype=F32):
    ks = iter(jax.random.split(jax.random.key(0), 8))
    n = lambda shape: (jax.random.normal(next(ks), (L, *shape)) / shape[0] ** 0.5).astype(dtype)
    return {"layers": {"ln1": 1 + 0.1 * n((D,)), "ln2": 1 + 0.1 * n((D,)), "q": n((D, D)), "v": n((D, D)),
                       "o": n((D, D)), "gate": n((D, H)), "up": n((D, H)), "down": n((H, D))}}


def _h(dtype=F32):
    return jax.random.normal(jax.random.key(1), (4, 8, D)).astype(dtype)


TARGETS = ["q", "v", "o", "gate", "up", "down"]


def _grads(apply, params, h):
    ad, base = jlora.split(params)
    loss = lambda ad: jnp.sum(jnp.square(apply(jlora.combine(ad, base), h).astype(F32)))
    return jax.jit(jax.value_and_grad(loss))(ad), jax.make_jaxpr(jax.grad(loss))(ad).jaxpr


def _stacked(jaxpr) -> list[str]:
    """The forward scan's stacked outputs (its residuals for the backward loop), as avals."""
    return sorted(str(v.aval) for v in _stacked_vars(jaxpr))


def _stacked_vars(jaxpr):
    fwd = next(e for e in jaxpr.eqns if e.primitive.name == "scan")
    return [v for v in fwd.outvars if v.aval.shape[:1] == (L,)]


def _stacked_bytes(jaxpr) -> int:
    return sum(v.aval.size * v.aval.dtype.itemsize for v in _stacked_vars(jaxpr))


def _rel(a, b):
    a, b = jnp.asarray(a, F32), jnp.asarray(b, F32)
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


def _merged_grads(params, h, fn=model):
    """dLoss/dA and dLoss/dB by hand: the merged model W0 + s·A·B differentiated in float32."""
    ad, base = jlora.split(params)

    def loss(ad):
        merged = jlora.merge(jlora.combine(ad, base))
        return jnp.sum(jnp.square(fn(jax.tree.map(lambda t: t.astype(F32), merged), h.astype(F32))))

    return jax.jit(jax.value_and_grad(loss))(ad)


def test_regions_hold_the_cheap_equations_only():
    """The norm's arithmetic and silu(gate)·up are recomputable; no matmul, reduction or kernel is."""
    w = jax.tree.map(lambda t: t[0], _params()["layers"])
    j = jax.make_jaxpr(block)(_h(), w).jaxpr
    kernels = {v for v, (name, _) in zip(j.invars[1:], sorted(w.items())) if name in TARGETS}
    chain = recompute.recomputable(j, kernels)
    made = {e.primitive.name for e in j.eqns if set(e.outvars) & chain}
    assert made and made <= recompute.CHEAP | {"pjit", "jit"}
    assert not any(e.primitive.name in ("dot_general", "reduce_sum") for e in j.eqns if set(e.outvars) & chain)
    regions = recompute.regions(j, chain)
    # the norms feed q, v, gate and up; silu(gate)·up feeds down; tanh(x·q) feeds o
    assert len(regions) == 6
    for r in regions.values():
        assert r.x in chain and not (set(r.roots) & chain)


@pytest.mark.parametrize("matmul", ["xla", "shared_xa"])
def test_scan_gradients_unchanged_and_fewer_residuals(monkeypatch, matmul):
    params, apply = jlora.inject(_params(), model, rank=4, alpha=8.0, targets=TARGETS, example_args=(_h(),),
                                 matmul=matmul)
    params = randomize(params, scale=0.1)
    h = _h()
    monkeypatch.setenv(recompute.ENV, "0")
    (l0, g0), j0 = _grads(apply, params, h)
    monkeypatch.setenv(recompute.ENV, "1")
    (l1, g1), j1 = _grads(apply, params, h)
    lr, gr = _merged_grads(params, h)
    assert abs(float(l1) - float(l0)) <= 1e-6 * abs(float(l0))
    assert abs(float(l1) - float(lr)) <= 1e-4 * abs(float(lr))
    for a, b, r in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), jax.tree.leaves(gr)):
        assert _rel(a, b) < 1e-5 and _rel(a, r) < 1e-3
    s0, s1 = _stacked(j0), _stacked(j1)
    # off: the norms' outputs (D wide, three of them: ln1 feeds q and v, ln2 gate and up, tanh feeds o)
    # and silu(gate)·up (H wide) are stacked; on: none of them, while the roots are stacked anyway
    assert len(s1) < len(s0)
    grown = lambda s, shape: s.count(f"float32[{L},4,8,{shape}]")
    assert grown(s1, D) < grown(s0, D) and grown(s1, H) < grown(s0, H)


def test_bf16_model_close_to_switched_off(monkeypatch):
    """bf16 activations: the recomputed backward sums the three inputs' gradients after the norm
    (in float32) instead of before it (in bf16); both stay within bf16 rounding of the merged model."""
    params, apply = jlora.inject(_params(jnp.bfloat16), model, rank=4, alpha=8.0, targets=TARGETS,
                                 example_args=(_h(jnp.bfloat16),))
    params = randomize(params, scale=0.1)
    h = _h(jnp.bfloat16)
    monkeypatch.setenv(recompute.ENV, "0")
    (l0, g0), _ = _grads(apply, params, h)
    monkeypatch.delenv(recompute.ENV)  # on by default
    (l1, g1), j1 = _grads(apply, params, h)
    _, gr = _merged_grads(params, h)
    assert abs(float(l1) - float(l0)) <= 1e-2 * abs(float(l0))
    for a, b, r in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), jax.tree.leaves(gr)):
        assert _rel(a, r) < 5e-2 and _rel(b, r) < 5e-2


@pytest.mark.parametrize("value", ["2", "maybe"])
def test_misspelt_switch_raises(monkeypatch, value):
    monkeypatch.setenv(recompute.ENV, value)
    params, apply = jlora.inject(_params(), model, rank=4, targets=TARGETS, example_args=(_h(),))
    with pytest.raises(ValueError, match=f"JLORA_RECOMPUTE_IN_LOOPS='{value}' is not a switch"):
        apply(params, _h())


def _on_off(monkeypatch, apply, params, h, rng=None):
    """Loss, adapter gradients and the stacked residuals with the switch off, then on."""
    ad, base = jlora.split(params)
    loss = lambda ad: jnp.sum(jnp.square(apply(jlora.combine(ad, base), h, lora_rng=rng).astype(F32)))
    out = []
    for value in ("0", "1"):
        monkeypatch.setenv(recompute.ENV, value)
        j = jax.make_jaxpr(jax.grad(loss))(ad).jaxpr
        out.append((jax.jit(jax.value_and_grad(loss))(ad), _stacked(j), _stacked_bytes(j)))
    return out


def _assert_same(off, on, *, fewer=True, merged=None):
    """The same loss and gradients (and, given ``merged``, those of the merged float32 model within
    1e-3); ``fewer``: fewer stacked arrays and bytes, else no more bytes."""
    ((l0, g0), s0, b0), ((l1, g1), s1, b1) = off, on
    assert abs(float(l1) - float(l0)) <= 1e-6 * abs(float(l0))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        assert _rel(a, b) < 1e-5
    if merged is not None:
        lr, gr = merged
        assert abs(float(l1) - float(lr)) <= 1e-4 * abs(float(lr))
        for a, r in zip(jax.tree.leaves(g1), jax.tree.leaves(gr), strict=True):
            assert _rel(a, r) < 1e-3
    assert (len(s1) < len(s0) and b1 < b0) if fewer else b1 <= b0, (s0, s1)


def test_dora_kernels_in_regions(monkeypatch):
    """DoRA's matmul (gain on the output units) evaluated inside a region: the same loss and
    gradients, magnitudes included, as the stacked path."""
    params, apply = jlora.inject(_params(), model, rank=4, alpha=8.0, targets=TARGETS, example_args=(_h(),),
                                 dora=True)
    params = randomize(params, scale=0.1)
    _assert_same(*_on_off(monkeypatch, apply, params, _h()), merged=_merged_grads(params, _h()))


def test_dropout_in_regions_draws_the_same_masks(monkeypatch):
    """Adapter dropout inside a region (its key drawn inside jax.checkpoint): the same masks as the
    stacked path, so the same loss and gradients; and dropout is really on (the loss differs)."""
    params, apply = jlora.inject(_params(), model, rank=4, alpha=8.0, targets=TARGETS, example_args=(_h(),),
                                 dropout=0.3)
    params = randomize(params, scale=0.3)
    off, on = _on_off(monkeypatch, apply, params, _h(), rng=jax.random.key(7))
    _assert_same(off, on)
    ((l_plain, _), _, _), _ = _on_off(monkeypatch, apply, params, _h())
    assert abs(float(on[0][0]) - float(l_plain)) > 1e-4 * abs(float(l_plain))


def test_quantized_base_stays_out_of_regions(monkeypatch):
    """QLoRA: a quantized base dequantizes inside a checkpoint that saves nothing; nested in a
    region's checkpoint, JAX would apply the region's policy to it and stack the dense dequantized
    kernel per layer. Its matmul keeps the stacked input instead; the other matmuls still get regions."""
    q = jlora.quantize(_params(), method="nf4", targets=lambda path, leaf: "down" in str(path), min_size=0)
    assert jlora.is_quantized(q["layers"]["down"]) and not jlora.is_quantized(q["layers"]["up"])
    params, apply = jlora.inject(q, model, rank=4, alpha=8.0, targets=TARGETS, example_args=(_h(),))
    params = randomize(params, scale=0.1)
    off, on = _on_off(monkeypatch, apply, params, _h())
    _assert_same(off, on, merged=_merged_grads(params, _h()))  # merged: the dequantized base + s·A·B
    dense = {f"float32[{L},{H * D}]", f"float32[{L},{H},{D}]"}  # down's dequantized kernel, flat or not
    assert not dense & set(on[1]), on[1]
    assert f"float32[{L},4,8,{H}]" in on[1]  # silu(gate)·up, down's input, is stacked as before


def _tiny_scan(block, names, dtype=F32):
    ks = iter(jax.random.split(jax.random.key(0), len(names)))
    p = {"layers": {n: (jax.random.normal(next(ks), (L, D, D)) / D ** 0.5).astype(dtype) for n in names}}
    return p, lambda p, h: jax.lax.scan(lambda h, w: (block(h, w), None), h, p["layers"])[0]


@pytest.mark.parametrize("case", ["sum_of_frozen_matmuls", "narrowing_cast"])
def test_no_region_that_keeps_more_than_its_input(monkeypatch, case):
    """A region whose roots the stacked path would not keep (two frozen matmuls' outputs summed into
    x; a float32 product cast to the bfloat16 x) would stack more bytes than x itself: none is made."""
    if case == "sum_of_frozen_matmuls":
        block = lambda h, w: h + jnp.tanh((h @ w["f1"] + h @ w["f2"]) @ w["q"])
        dtype = F32
    else:
        block = lambda h, w: h + jnp.tanh(jnp.einsum("bsd,de->bse", h, w["f1"], preferred_element_type=F32)
                                          .astype(jnp.bfloat16) @ w["q"])
        dtype = jnp.bfloat16
    p, fn = _tiny_scan(block, ["f1", "f2", "q"], dtype)
    params, apply = jlora.inject(p, fn, rank=2, targets=["q"], example_args=(_h(dtype),))
    params = randomize(params, scale=0.3)
    off, on = _on_off(monkeypatch, apply, params, _h(dtype))
    _assert_same(off, on, fewer=False, merged=_merged_grads(params, _h(dtype), fn) if dtype == F32 else None)
    assert on[1] == off[1]  # the input is stacked as before, nothing else


def test_dora_region_keeps_the_output_not_its_two_terms(monkeypatch):
    """DoRA's gain needs x·W0 + s·(x·A)·B in the backward: the region keeps that sum (named
    jlora_dora_out), not both terms, so it stacks no more activations than the stacked path."""
    block = lambda h, w: h + jnp.tanh((h * 2.0) @ w["q"]) + jnp.tanh((h * 2.0) @ w["v"])
    p, fn = _tiny_scan(block, ["q", "v"])
    params, apply = jlora.inject(p, fn, rank=2, targets=["q", "v"], example_args=(_h(),), dora=True)
    params = randomize(params, scale=0.3)
    off, on = _on_off(monkeypatch, apply, params, _h())
    _assert_same(off, on, fewer=False, merged=_merged_grads(params, _h(), fn))
    act = f"float32[{L},4,8,{D}]"
    assert on[1].count(act) <= off[1].count(act)
