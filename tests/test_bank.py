"""Banks of adapters (issue 16): stack/select/add/remove, mixed-batch apply against each example run
alone with its own adapter, training several adapters in one step, weighted combination against the
dense formulas, and the inputs that are refused.

Every mixed-batch reference is independent of the bank machinery: the example alone (batch of one)
through ``apply`` with ``select_adapter``'s single adapter, or through the plain base model for -1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import jlora
from jlora._rules import compute
K = jax.random.key


def normal(seed, shape, std=1.0):
    """Test data from numpy: jax.random would compile a sampler per shape (seconds on a busy CPU)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * std, jnp.float32)


def randomize(params, seed, std=0.5):
    """Every adapter with nonzero A and B (B starts at zero, which would hide bugs)."""
    rng = np.random.default_rng(seed)
    is_lk = lambda x: isinstance(x, jlora.LoraKernel)  # noqa: E731

    def one(x):
        if not is_lk(x):
            return x
        a, b = (jnp.asarray(rng.standard_normal(np.shape(f)) * std, f.dtype) for f in (x.a, x.b))
        return jlora.LoraKernel(x.w0, a, b, layout=x.layout, scale=x.scale, dropout=x.dropout)

    return jax.tree.map(one, params, is_leaf=is_lk)


def close(a, b, tol=2e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# -- a plain JAX MLP: two adapters of different ranks, targets and scales -----------------------------------


def mlp(p, x):
    h = jax.nn.gelu(x @ p["l1"]["kernel"] + p["l1"]["bias"])
    return h @ p["l2"]["kernel"]


def mlp_params():
    return {"l1": {"kernel": normal(100, (6, 10), 1 / 3), "bias": normal(101, (10,))},
            "l2": {"kernel": normal(102, (10, 7), 1 / 3)}}


X = normal(1, (5, 6))
IDS = np.array([0, 1, -1, 1, 0], np.int32)


def two_adapters():
    """"a": rank 2 on both kernels, scale 1; "b": rank 3 on l1 only, scale 1/3."""
    p = mlp_params()
    pa, apply = jlora.inject(p, mlp, rank=2, example_args=(X,), key=K(2))
    pb, _ = jlora.inject(p, mlp, rank=3, alpha=1.0, targets=["l1"], example_args=(X,), key=K(3))
    return p, randomize(pa, 4), randomize(pb, 5), apply


def per_example(apply, fn, base, singles, x, ids):
    """Each example alone (a batch of one), with its own adapter, or the base model for -1
    (jitted: one compile per adapter, not one per op)."""
    one, plain = jax.jit(apply), jax.jit(fn)
    rows = []
    for e, i in enumerate(np.asarray(ids).tolist()):
        xe = jax.tree.map(lambda v: v[e:e + 1], x)
        rows.append(plain(base, xe) if i < 0 else one(singles[i], xe))
    return jnp.concatenate(rows)


@pytest.fixture(params=["dense", "gather"])
def form(request, monkeypatch):
    """Both ways a mixed batch computes each example's adapter (chosen per matmul by its size,
    :func:`jlora._rules.compute.mixed_form`): all adapters masked, or the example's gathered."""
    monkeypatch.setenv(compute.MIXED_FORM_ENV, request.param)
    return request.param


def test_mixed_form_choice():
    assert compute.mixed_form(1, 64) == "dense"  # a decode step: one row per example
    assert compute.mixed_form(2048, 8) == "gather"  # a prefill
    assert compute.mixed_form(1, compute.MIXED_DENSE_MAX + 1) == "gather"  # a huge bank


def test_stack_select_round_trip_with_different_ranks_and_targets():
    p, pa, pb, _ = two_adapters()
    bank = jlora.stack_adapters({"a": pa, "b": jlora.split(pb)[0]})  # injected params or split's adapters
    l1, l2 = bank["l1"]["kernel"], bank["l2"]["kernel"]
    assert isinstance(l1, jlora.LoraBank) and l1.w0 is None and bank["l1"]["bias"] is None
    assert l1.ranks == (2, 3) and l1.a.shape == (6, 2, 3) and l1.b.shape == (2, 3, 10)  # (in, N, r), (N, r, out)
    assert l2.ranks == (2, 0) and l2.a.shape == (10, 2, 2)
    np.testing.assert_array_equal(l1.a[:, 0, 2], 0)  # rank-2 adapter padded with zeros to rank 3
    np.testing.assert_array_equal(l1.b[0, 2], 0)
    np.testing.assert_array_equal(l2.a[:, 1], 0) and np.testing.assert_array_equal(l2.b[1], 0)  # "b" leaves l2 alone
    assert l1.scales == (1.0, pytest.approx(1 / 3))
    assert jlora.adapter_names(bank) == ("a", "b")
    # select gives back exactly what was stacked: adapters form, then params form
    sa, sb = jlora.select_adapter(bank, "a"), jlora.select_adapter(bank, "b")
    assert sb["l2"]["kernel"] is None and sa["l1"]["bias"] is None
    for got, want in ((sa, jlora.split(pa)[0]), (sb, jlora.split(pb)[0])):
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(g, w)
        assert jax.tree.structure(got) == jax.tree.structure(want)
    params = jlora.combine(bank, p)
    assert params["l1"]["kernel"].w0 is p["l1"]["kernel"]
    sb = jlora.select_adapter(params, "b")
    assert sb["l2"]["kernel"] is p["l2"]["kernel"] and isinstance(sb["l1"]["kernel"], jlora.LoraKernel)
    close(mlp(jlora.merge(sb), X), mlp(jlora.merge(pb), X), 0)
    # split/combine of params holding a bank
    ad, base = jlora.split(params)
    assert base["l1"]["kernel"] is p["l1"]["kernel"] and ad["l1"]["kernel"].w0 is None
    assert jax.tree.structure(jlora.combine(ad, base)) == jax.tree.structure(params)
    # labels/optimizer see A and B of the bank as trainable
    lab = jlora.labels(params)
    assert (lab["l1"]["kernel"].a, lab["l1"]["kernel"].w0, lab["l1"]["bias"]) == ("lora", "frozen", "frozen")
    assert "2/3" in jlora.summary(bank) and "2/0" in jlora.summary(bank)


def test_rslora_flag_survives_the_bank(tmp_path):
    """An rsLoRA adapter (scale alpha/√r) keeps its flag through stack, select, add and remove,
    so its PEFT export still writes use_rslora (with the same alpha), like the adapter alone."""
    import json

    p = mlp_params()
    pr, _ = jlora.inject(p, mlp, rank=4, alpha=8.0, rslora=True, example_args=(X,), key=K(7))
    _, pa, _, _ = two_adapters()
    bank = jlora.stack_adapters({"a": pa, "r": pr})
    assert bank["l1"]["kernel"].rslora == (False, True)
    bank = jlora.add_adapter(jlora.remove_adapter(bank, "a"), "a2", pa)
    assert bank["l1"]["kernel"].rslora == (True, False)
    got = jlora.select_adapter(bank, "r")["l1"]["kernel"]
    assert got.rslora and got.scale == pr["l1"]["kernel"].scale == 4.0
    for name, tree in (("alone", pr), ("from_bank", jlora.select_adapter(jlora.combine(bank, p), "r"))):
        jlora.export_peft(tmp_path / name, tree, module_map={r"(l\d)/kernel": r"\1"})
    alone, from_bank = (json.loads((tmp_path / n / "adapter_config.json").read_text()) for n in ("alone", "from_bank"))
    assert from_bank["use_rslora"] is True and from_bank["lora_alpha"] == alone["lora_alpha"] == 8.0


def test_add_and_remove_adapters_are_pure():
    p, pa, pb, _ = two_adapters()
    pc, _ = jlora.inject(p, mlp, rank=5, targets=["l2"], example_args=(X,), key=K(6))
    pc = randomize(pc, 7)
    bank = jlora.stack_adapters({"a": pa})
    assert bank["l1"]["kernel"].ranks == (2,)
    bank2 = jlora.add_adapter(bank, "b", pb)
    assert jlora.adapter_names(bank) == ("a",) and jlora.adapter_names(bank2) == ("a", "b")  # input unchanged
    bank3 = jlora.add_adapter(bank2, "c", pc)
    assert bank3["l2"]["kernel"].ranks == (2, 0, 5) and bank3["l2"]["kernel"].a.shape == (10, 3, 5)
    np.testing.assert_array_equal(bank3["l1"]["kernel"].a[:, 2], 0)  # "c" leaves l1 alone
    # the same bank, stacked at once
    want = jlora.stack_adapters({"a": pa, "b": pb, "c": pc})
    for g, w in zip(jax.tree.leaves(bank3), jax.tree.leaves(want)):
        np.testing.assert_array_equal(g, w)
    small = jlora.remove_adapter(bank3, "c")  # rank padding shrinks back
    assert small["l2"]["kernel"].a.shape == (10, 2, 2)
    only_b = jlora.remove_adapter(small, "a")
    assert only_b["l2"]["kernel"] is None and only_b["l1"]["kernel"].ranks == (3,)
    # params form keeps the base where no adapter is left
    params = jlora.combine(small, p)
    assert jlora.remove_adapter(params, "a")["l2"]["kernel"] is p["l2"]["kernel"]
    added = jlora.add_adapter(jlora.combine(only_b, p), "c", pc)
    assert added["l2"]["kernel"].w0 is p["l2"]["kernel"] and added["l2"]["kernel"].ranks == (0, 5)
    with pytest.raises(ValueError, match="already holds an adapter named 'a'"):
        jlora.add_adapter(bank, "a", pb)
    with pytest.raises(ValueError, match="only adapter"):
        jlora.remove_adapter(bank, "a")
    with pytest.raises(ValueError, match="no adapter named 'z'"):
        jlora.select_adapter(bank, "z")
    np.testing.assert_array_equal(jlora.adapter_ids(bank3, ["c", None, "__base__", "a"]), [2, -1, -1, 0])
    with pytest.raises(ValueError, match="no adapter named 'd'"):
        jlora.adapter_ids(bank3, ["d"])


# -- mixed batches ------------------------------------------------------------------------------------------


def test_mixed_batch_equals_each_example_alone(form):
    p, pa, pb, apply = two_adapters()
    params = jlora.combine(jlora.stack_adapters({"a": pa, "b": pb}), p)
    got = jax.jit(lambda prm, x, ids: apply(prm, x, adapter_ids=ids))(params, X, IDS)
    want = per_example(apply, mlp, p, [pa, pb], X, IDS)
    close(got, want)
    assert not np.allclose(want[0], mlp(p, X[:1])) and not np.allclose(want[1], mlp(p, X[1:2]))  # adapters matter
    close(got[2], mlp(p, X[2:3])[0], 1e-6)  # -1: the base model
    # names work too, and changing the ids does not recompile
    close(apply(params, X, adapter_ids=["a", "b", None, "b", "a"]), want)
    f = jax.jit(lambda prm, x, ids: apply(prm, x, adapter_ids=ids))
    f(params, X, IDS)
    with jax.log_compiles():
        n = f._cache_size()
        f(params, X, IDS[::-1].copy())
        assert f._cache_size() == n


def _all_eqns(jaxpr):
    from jlora import _compat as jax_compat

    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for j in (v if isinstance(v, (tuple, list)) else [v]):
                if isinstance(j, jax_compat.ClosedJaxpr):
                    yield from _all_eqns(j.jaxpr)
                elif isinstance(j, jax_compat.Jaxpr):
                    yield from _all_eqns(j)


def test_base_matmul_once_for_the_batch_and_nothing_kernel_sized(form):
    """The jaxpr has one dot_general per base kernel, over the whole batch. The rank-r parts are,
    in the dense form (few rows per example), two plain dot_generals per kernel over the whole
    batch against all adapters side by side; in the gather form, batched dot_generals (batch
    dimension = the examples). Never an (in, out)-sized product per example."""
    p, pa, pb, apply = two_adapters()
    # three adapters (N·r = 9 at l1, 3 × rank 2 = 6 at l2): no factor shape is a kernel's (6, 10) or (10, 7)
    params = jlora.combine(jlora.stack_adapters({"a": pa, "b": pb, "c": randomize(pa, 9)}), p)
    f = lambda prm, x, ids: apply(prm, x, adapter_ids=ids)  # noqa: E731
    jaxpr = jax.make_jaxpr(f)(params, X, IDS)
    eqns = list(_all_eqns(jaxpr.jaxpr))
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    n = len(IDS)
    for kshape in [(6, 10), (10, 7)]:
        base_dots = [e for e in dots if tuple(e.invars[1].aval.shape) == kshape]
        assert len(base_dots) == 1, base_dots
        lhs = base_dots[0].invars[0].aval.shape
        assert lhs[0] == n and np.prod(lhs) == n * kshape[0]  # every example's rows in one matmul
        (lb, rb) = base_dots[0].params["dimension_numbers"][1]
        assert lb == () and rb == ()
    rank_dots = [e for e in dots if tuple(e.invars[1].aval.shape) not in [(6, 10), (10, 7)]]
    assert len(rank_dots) == 4
    if form == "dense":  # x·[A_1 A_2 A_3] and t·[B_1; B_2; B_3]: plain matmuls over the whole batch
        assert {tuple(e.invars[1].aval.shape) for e in rank_dots} == {(6, 9), (9, 10), (10, 6), (6, 7)}
        assert all(e.params["dimension_numbers"][1] == ((), ()) and e.invars[0].aval.shape[0] == n
                   for e in rank_dots)
    else:
        assert all(e.params["dimension_numbers"][1] == ((0,), (0,)) for e in rank_dots)
    sizes = {tuple(v.aval.shape) for e in eqns for v in e.outvars}
    for bad in [(n, 6, 10), (n, 10, 7), (n, 10, 6), (n, 7, 10)]:
        assert bad not in sizes, bad
    # and in the HLO that XLA runs
    hlo = jax.jit(f).lower(params, X, IDS).compile().as_text()
    for bad in ("f32[5,6,10]", "f32[5,10,7]", "f32[5,10,6]", "f32[5,7,10]"):
        assert bad not in hlo, bad


def test_dense_form_keeps_kernels_that_share_an_input_apart():
    """Two kernels reading the same x: in the dense form their x·[A_1 … A_N] products take x through
    separate optimization barriers, so XLA does not merge them into one matmul against the two banks
    concatenated (a copy of both every step); the result is still each example's own."""
    w = {"q": normal(20, (6, 5)), "k": normal(21, (6, 5))}
    fn = lambda p, x: jnp.tanh(x @ p["q"]) * (x @ p["k"])  # noqa: E731
    p1, apply = jlora.inject(w, fn, rank=2, example_args=(X,), key=K(1))
    p2, _ = jlora.inject(w, fn, rank=2, example_args=(X,), key=K(2))
    p1, p2 = randomize(p1, 11), randomize(p2, 12)
    params = jlora.combine(jlora.stack_adapters({"a": p1, "b": p2}), w)
    jaxpr = jax.make_jaxpr(lambda prm, x, i: apply(prm, x, adapter_ids=i))(params, X, IDS)
    eqns = list(_all_eqns(jaxpr.jaxpr))
    x_a = [e for e in eqns if e.primitive.name == "dot_general" and tuple(e.invars[1].aval.shape) == (6, 4)]
    assert len(x_a) == 2 and x_a[0].invars[0] is not x_a[1].invars[0]
    assert sum(e.primitive.name == "optimization_barrier" for e in eqns) == 2
    close(apply(params, X, adapter_ids=IDS), per_example(apply, fn, w, [p1, p2], X, IDS), 1e-5)


def test_mixed_batch_flax_linen_embed_conv_attention(form):
    """Embedding (gather), 1-D convolution, multi-axis DenseGeneral attention kernels, all adapted."""
    nn = pytest.importorskip("flax.linen")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, tok):
            h = nn.Embed(20, 8)(tok)
            h = jax.nn.gelu(nn.Conv(8, (3,))(h))
            h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(h, h)
            return nn.Dense(5)(h)

    m = Net()
    tok = jnp.asarray(np.random.default_rng(0).integers(0, 20, (4, 6)), jnp.int32)
    v = jax.jit(m.init)(K(10), tok)
    targets = ["Embed_0", "Conv_0", "query", "key", "value", "out", "Dense_0"]
    pa, apply = jlora.inject(v, m.apply, rank=2, targets=targets, example_args=(tok,), key=K(11))
    pb, _ = jlora.inject(v, m.apply, rank=3, alpha=6.0, targets=["Conv_0", "query", "out"], example_args=(tok,),
                         key=K(12))
    pa, pb = randomize(pa, 13, 0.3), randomize(pb, 14, 0.3)
    params = jlora.combine(jlora.stack_adapters({"a": pa, "b": pb}), v)
    ids = np.array([1, 0, -1, 1], np.int32)
    got = jax.jit(lambda prm, t, i: apply(prm, t, adapter_ids=i))(params, tok, ids)
    close(got, per_example(apply, m.apply, v, [pa, pb], tok, ids), 1e-4)


def test_mixed_batch_flax_nnx_functional(form):
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(5, 8, rngs=rngs)
            self.b = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.b(jax.nn.relu(self.a(x)))

    graphdef, state = nnx.split(Model(nnx.Rngs(0)))
    fn = lambda state, x: nnx.merge(graphdef, state)(x)  # noqa: E731
    x = normal(20, (3, 5))
    pa, apply = jlora.inject(state, fn, rank=2, example_args=(x,), key=K(21))
    pb, _ = jlora.inject(state, fn, rank=1, targets=["b"], example_args=(x,), key=K(22))
    pa, pb = randomize(pa, 23), randomize(pb, 24)
    bank = jlora.stack_adapters({"a": jlora.split(pa)[0], "b": jlora.split(pb)[0]})
    params = jlora.combine(bank, state)
    ids = np.array([1, -1, 0], np.int32)
    got = jax.jit(lambda prm, x, i: apply(prm, x, adapter_ids=i))(params, x, ids)
    close(got, per_example(apply, fn, state, [pa, pb], x, ids), 1e-5)


def test_mixed_batch_over_a_quantized_base(form):
    """QLoRA serving: the base stays NF4 (dequantized where used), the bank's adapters per example."""
    p = {"l1": {"kernel": normal(110, (64, 32), 0.2), "bias": normal(111, (32,))}, "l2": {"kernel": normal(112, (32, 64), 0.2)}}
    q = jlora.quantize(p, method="nf4", min_size=0)
    x = normal(113, (3, 64))
    pa, apply = jlora.inject(q, mlp, rank=2, example_args=(x,), key=K(114))
    pb, _ = jlora.inject(q, mlp, rank=3, targets=["l2"], example_args=(x,), key=K(115))
    pa, pb = randomize(pa, 116, 0.2), randomize(pb, 117, 0.2)
    params = jlora.combine(jlora.stack_adapters({"a": pa, "b": pb}), q)
    assert jlora.is_quantized(params["l1"]["kernel"].w0)
    ids = np.array([1, 0, -1], np.int32)
    got = jax.jit(lambda prm, x, i: apply(prm, x, adapter_ids=i))(params, x, ids)
    close(got, per_example(apply, lambda b, x: mlp(jlora.dequantize(b), x), q, [pa, pb], x, ids), 1e-4)


def scan_model(p, x):
    def layer(h, w):
        return jax.nn.relu(h @ w["up"]) @ w["down"] + h, None

    h, _ = lax.scan(layer, x @ p["embed_in"], p["layers"])
    return h


def test_mixed_batch_scanned_stack(form):
    L, d, f = 3, 6, 10
    p = {"embed_in": normal(30, (5, d)), "layers": {"up": normal(31, (L, d, f), 1 / 3), "down": normal(32, (L, f, d), 1 / 3)}}
    x = normal(33, (4, 5))
    pa, apply = jlora.inject(p, scan_model, rank=2, targets="layers", example_args=(x,), key=K(32))
    pb, _ = jlora.inject(p, scan_model, rank=4, targets="layers/up", example_args=(x,), key=K(33))
    pa, pb = randomize(pa, 34, 0.3), randomize(pb, 35, 0.3)
    params = jlora.combine(jlora.stack_adapters({"a": pa, "b": pb}), p)
    assert params["layers"]["up"].a.shape == (L, d, 2, 4)  # (layers, in, adapters, r)
    ids = np.array([0, 1, 1, -1], np.int32)
    got = jax.jit(lambda prm, x, i: apply(prm, x, adapter_ids=i))(params, x, ids)
    close(got, per_example(apply, scan_model, p, [pa, pb], x, ids), 1e-4)


def test_batch_axes_and_out_axes():
    """An argument batched on axis 1, one shared by every example, and outputs with their own axes."""
    p, pa, pb, apply = two_adapters()

    def fn(params, xt, shift, *, scale):  # xt: (features, batch); shift: shared; returns (y.T, y, total)
        y = mlp(params, xt.T * scale + shift)
        return {"yt": y.T, "y": y, "const": jnp.sum(shift)}

    lp, apply2 = jlora.inject(p, fn, rank=2, example_args=(X.T, jnp.zeros(6)), example_kwargs={"scale": 1.0},
                              key=K(2))
    params = jlora.combine(jlora.stack_adapters({"a": jlora.split(pa)[0], "b": jlora.split(pb)[0]}), p)
    shift = jnp.linspace(0, 1, 6)
    out = apply2(params, X.T, shift, scale=2.0, adapter_ids=IDS, batch_axes={0: 1, 1: None},
                 out_axes={"yt": 1, "y": 0, "const": None})
    want = per_example(apply, mlp, p, [pa, pb], X * 2.0 + shift, IDS)
    close(out["y"], want)
    close(out["yt"], want.T)
    close(out["const"], jnp.sum(shift))
    # the default axis 0 does not fit xt (6 features, 5 examples): refused, naming the argument
    with pytest.raises(ValueError, match=r"argument 0 has size 6 on its batch axis 0 .* adapter_ids has 5"):
        apply2(params, X.T, shift, scale=2.0, adapter_ids=IDS)
    with pytest.raises(ValueError, match=r"argument 1 has size 6 on its batch axis 0"):
        apply2(params, X.T, shift, scale=2.0, adapter_ids=IDS, batch_axes={0: 1})
    with pytest.raises(ValueError, match=r"output \['yt'\] has shape \(7, 1\).*axis 0 is not the batch"):
        apply2(params, X.T, shift, scale=2.0, adapter_ids=IDS, batch_axes={0: 1, 1: None})
    with pytest.raises(ValueError, match="neither a positional argument"):
        apply2(params, X.T, shift, scale=2.0, adapter_ids=IDS, batch_axes={"shfit": None})


def test_training_several_adapters_in_one_step(form):
    """Each adapter gets exactly its own examples' gradients; padding and unused slots get none."""
    p, pa, pb, apply = two_adapters()
    ad, base = jlora.split(jlora.combine(jlora.stack_adapters({"a": pa, "b": pb}), p))
    y = normal(40, (5, 7))
    ids = np.array([0, 1, -1, 1, 1], np.int32)

    def loss(ad, x, y, ids):
        return jnp.sum((apply(jlora.combine(ad, base), x, adapter_ids=ids) - y) ** 2)

    g = jax.jit(jax.grad(loss))(ad, X, y, ids)
    for i, (name, single) in enumerate([("a", pa), ("b", pb)]):
        own = [e for e in range(5) if ids[e] == i]
        sad, sbase = jlora.split(single)

        def loss1(sad):
            return sum(jnp.sum((apply(jlora.combine(sad, sbase), X[e:e + 1]) - y[e:e + 1]) ** 2) for e in own)

        want = jax.jit(jax.grad(loss1))(sad)
        got = jlora.select_adapter(g, name)
        for gw, ww in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            close(gw, ww, 1e-4)
    np.testing.assert_array_equal(g["l1"]["kernel"].a[:, 0, 2], 0)  # rank padding gets no gradient
    np.testing.assert_array_equal(g["l2"]["kernel"].a[:, 1], 0)  # nor does "b"'s empty slot at l2
    # one optimizer step over the bank: an adapter with no example in the batch does not move
    tx = jlora.optimizer(optax.adam(1e-2), ad)
    st = tx.init(ad)

    @jax.jit
    def step(ad, st, ids):
        upd, st = tx.update(jax.grad(loss)(ad, X, y, ids), st, ad)
        return optax.apply_updates(ad, upd), st

    new, st = step(ad, st, np.array([1, 1, -1, 1, 1], np.int32))
    np.testing.assert_array_equal(new["l2"]["kernel"].a, ad["l2"]["kernel"].a)  # "a" unused, "b" absent
    np.testing.assert_array_equal(new["l1"]["kernel"].a[:, 0], ad["l1"]["kernel"].a[:, 0])
    assert not np.allclose(new["l1"]["kernel"].a[:, 1, :3], ad["l1"]["kernel"].a[:, 1, :3])
    np.testing.assert_array_equal(new["l1"]["kernel"].a[:, 0, 2], 0)



def test_lora_plus_over_a_bank():
    """LoRA+ (lr_ratio) groups a bank's factors like a kernel's: B's SGD update is λ × A-rate's,
    computed by hand from the same gradients; the base gets none."""
    p, pa, pb, apply = two_adapters()
    params = jlora.combine(jlora.stack_adapters({"a": pa, "b": pb}), p)
    ad, base = jlora.split(params)
    ids = np.array([0, 1, -1, 1, 0], np.int32)
    g = jax.grad(lambda ad: jnp.sum(apply(jlora.combine(ad, base), X, adapter_ids=ids) ** 2))(ad)
    tx = jlora.optimizer(optax.sgd(0.1), ad, lr_ratio=4)
    upd, _ = tx.update(g, tx.init(ad), ad)
    for k in ("l1", "l2"):
        close(upd[k]["kernel"].a, -0.1 * g[k]["kernel"].a, 1e-6)
        close(upd[k]["kernel"].b, -0.4 * g[k]["kernel"].b, 1e-6)
    assert float(jnp.abs(g["l1"]["kernel"].b).max()) > 0  # the check is not vacuous
    full = jlora.optimizer(optax.sgd(0.1), params, lr_ratio=4)
    u, _ = full.update(jax.tree.map(jnp.ones_like, params), full.init(params), params)
    assert float(jnp.abs(u["l1"]["kernel"].w0).max()) == 0.0 and float(u["l1"]["kernel"].b.max()) == pytest.approx(-0.4)
    # an embedding table's factors are their own group (lr_embedding), banked or not
    q = {"emb": normal(80, (20, 8)), "w": normal(81, (8, 4))}
    emb_fn = lambda p, t: p["emb"][t] @ p["w"]  # noqa: E731
    tok = np.array([[1, 5, 7]], np.int32)
    pe, _ = jlora.inject(q, emb_fn, rank=2, targets=["emb", "w"], example_args=(tok,), key=K(9))
    bank = jlora.split(jlora.combine(jlora.stack_adapters({"e": randomize(pe, 11)}), q))[0]
    ones = jax.tree.map(jnp.ones_like, bank)
    tx = jlora.loraplus(optax.sgd, bank, lr=0.1, lr_ratio=4, lr_embedding=0.01)
    u, _ = tx.update(ones, tx.init(bank))
    np.testing.assert_allclose(np.asarray(u["emb"].a), -0.01, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(u["emb"].b), -0.01, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(u["w"].b), -0.4, rtol=1e-6)

def _with_dropout(params, rate):
    is_lk = lambda k: isinstance(k, jlora.LoraKernel)  # noqa: E731
    return jax.tree.map(lambda k: jlora.LoraKernel(k.w0, k.a, k.b, layout=k.layout, scale=k.scale, dropout=rate)
                        if is_lk(k) else k, params, is_leaf=is_lk)


def test_dropout_in_a_mixed_batch(form):
    p, pa, pb, apply = two_adapters()
    params = jlora.combine(jlora.stack_adapters({"a": _with_dropout(pa, 0.5), "b": _with_dropout(pb, 0.5)}), p)
    f = jax.jit(lambda prm, x, i, key: apply(prm, x, adapter_ids=i, lora_rng=key))
    y0 = apply(params, X, adapter_ids=IDS)
    y1, y2 = f(params, X, IDS, K(50)), f(params, X, IDS, K(51))
    assert not np.allclose(y0, y1) and not np.allclose(y1, y2)
    close(y0[2], y1[2]), close(y1[2], y2[2])  # the base example has no adapter path to drop
    params = jlora.combine(jlora.stack_adapters({"a": _with_dropout(pa, 0.5), "b": pb}), p)
    with pytest.raises(ValueError, match="'l1/kernel' have different dropout rates"):
        apply(params, X, adapter_ids=IDS, lora_rng=K(50))  # l1: "a" 0.5, "b" 0.0


# -- bad inputs ---------------------------------------------------------------------------------------------


def test_bad_ids_are_refused():
    p, pa, pb, apply = two_adapters()
    params = jlora.combine(jlora.stack_adapters({"a": pa, "b": pb}), p)
    with pytest.raises(ValueError, match=r"adapter_ids\[3\] = 2 is out of range: the bank holds 2 adapters"):
        apply(params, X, adapter_ids=[0, 1, -1, 2, 0])
    with pytest.raises(ValueError, match=r"adapter_ids\[0\] = -2 is out of range"):
        apply(params, X, adapter_ids=[-2, 1, -1, 1, 0])
    with pytest.raises(ValueError, match=r"argument 0 has size 5 on its batch axis 0 .* adapter_ids has 4 entries"):
        apply(params, X, adapter_ids=[0, 1, -1, 1])
    with pytest.raises(ValueError, match="1-D"):
        apply(params, X, adapter_ids=IDS[None])
    with pytest.raises(ValueError, match="integers"):
        apply(params, X, adapter_ids=IDS.astype(np.float32))
    with pytest.raises(ValueError, match="pass adapter_ids="):
        apply(params, X)
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        apply(params, X, adapter_ids=["a", "c", None, "a", "a"])
    with pytest.raises(ValueError, match="hold none"):
        apply(pa, X, adapter_ids=IDS)
    # under jit an out-of-range id cannot raise: that example (only) comes out NaN
    y = jax.jit(lambda prm, x, i: apply(prm, x, adapter_ids=i))(params, X, np.array([0, 7, -1, 1, 0], np.int32))
    assert np.isnan(np.asarray(y[1])).all() and np.isfinite(np.asarray(y)[[0, 2, 3, 4]]).all()
    # ... and no NaN reaches any adapter's gradient through the other rows (it reached the last slot's)
    ad, base = jlora.split(params)
    good = np.array([0, 2, 3, 4])

    def loss(ad, ids):
        return jnp.sum(apply(jlora.combine(ad, base), X, adapter_ids=ids)[good] ** 2)

    grad = jax.jit(jax.grad(loss))
    g_bad, g_ref = grad(ad, np.array([0, 7, -1, 1, 0], np.int32)), grad(ad, np.array([0, -1, -1, 1, 0], np.int32))
    for x, r in zip(jax.tree.leaves(g_bad), jax.tree.leaves(g_ref)):
        np.testing.assert_array_equal(x, r)
    assert float(jnp.abs(g_ref["l1"]["kernel"].b[1]).max()) > 0  # the last slot does get gradients


def test_bad_id_nan_is_written_per_row_not_over_whole_outputs():
    """A step's state (a KV cache: an output of the size of an input, updated in place) must not be
    read and rewritten whole to mark bad ids: no select over any whole output, and no marking at all
    where the ids are known (out-of-range ones are refused there). The bad example's rows are NaN in
    every output, the others exact."""
    p, pa, pb, _ = two_adapters()
    params = jlora.combine(jlora.stack_adapters({"a": pa, "b": pb}), p)
    step = lambda prm, x, state: (mlp(prm, x), state * 2.0 + 1.0)  # noqa: E731
    _, apply = jlora.inject(p, step, rank=2, example_args=(X, jnp.zeros((5, 100))))
    state = normal(9, (5, 100))
    f = lambda prm, x, st, i: apply(prm, x, st, adapter_ids=i)  # noqa: E731
    jaxpr = jax.make_jaxpr(f)(params, X, state, IDS)
    selects = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "select_n"]
    assert not any(tuple(e.outvars[0].aval.shape) in [(5, 100), (5, 7)] for e in selects), selects
    bad = np.array([0, 2, -1, 1, 0], np.int32)
    y, st = jax.jit(f)(params, X, state, bad)
    assert np.isnan(np.asarray(y[1])).all() and np.isnan(np.asarray(st[1])).all()
    rows = [0, 2, 3, 4]
    np.testing.assert_array_equal(np.asarray(st)[rows], np.asarray(state * 2.0 + 1.0)[rows])
    want, _ = jax.jit(f)(params, X, state, np.where(bad == 2, -1, bad).astype(np.int32))  # checked per example above
    np.testing.assert_array_equal(np.asarray(y)[rows], np.asarray(want)[rows])
    # forward mode too (jvp), the bad row's tangent zero
    _, (ty, _) = jax.jvp(lambda x: jax.jit(f)(params, x, state, bad), (X,), (jnp.ones_like(X),))
    assert np.all(np.asarray(ty[1]) == 0) and np.abs(np.asarray(ty)[rows]).max() > 0
    assert not any(e.primitive.name == "while" for e in _all_eqns(jax.make_jaxpr(
        lambda prm, x, st: apply(prm, x, st, adapter_ids=IDS))(params, X, state).jaxpr))  # known ids: nothing to mark


def test_pissa_adapter_in_a_bank_and_dora_refused():
    """A PiSSA adapter (frozen A0, B0 over the user's weights) is banked as its rank-2r LoRA and gives
    the same outputs as served alone; DoRA and LoftQ adapters are refused, naming the kernel."""
    p, pa, _, apply = two_adapters()
    pp, _ = jlora.inject(p, mlp, rank=2, init="pissa", example_args=(X,), key=K(6))
    rng = np.random.default_rng(7)
    pp = jax.tree.map(lambda x: x.replace(a=x.a + jnp.asarray(rng.standard_normal(x.a.shape) * 0.3, x.a.dtype))
                      if isinstance(x, jlora.LoraKernel) else x, pp, is_leaf=lambda x: isinstance(x, jlora.LoraKernel))
    params = jlora.combine(jlora.stack_adapters({"a": pa, "p": pp}), p)
    ids = np.array([1, 0, 1, -1, 1], np.int32)
    got = jax.jit(lambda prm, x, i: apply(prm, x, adapter_ids=i))(params, X, ids)
    want = per_example(apply, mlp, p, [pa, pp], X, ids)
    close(got, want, 1e-4)
    assert not np.allclose(want[0], mlp(p, X[:1])[0], atol=1e-3)  # the trained PiSSA adapter matters
    pd, _ = jlora.inject(p, mlp, rank=2, dora=True, example_args=(X,))
    with pytest.raises(ValueError, match="adapter 'd' has a DoRA magnitude at 'l1/kernel'"):
        jlora.stack_adapters({"a": pa, "d": pd})


def test_bad_banks_are_refused():
    p, pa, pb, apply = two_adapters()
    # adapters trained on a different base (other shapes): stacking, or putting onto this base, is refused
    q = {"l1": {"kernel": jnp.ones((6, 12)), "bias": jnp.zeros(12)}, "l2": {"kernel": jnp.ones((12, 7))}}
    pq, _ = jlora.inject(q, mlp, rank=2, example_args=(X,))
    with pytest.raises(ValueError, match=r"kernel 'l1/kernel' is \[6, 10\] in adapter 'a' but \[6, 12\] in adapter 'q'"):
        jlora.stack_adapters({"a": pa, "q": pq})
    with pytest.raises(ValueError, match="combine: the adapter at 'l1/kernel' does not fit"):
        jlora.combine(jlora.stack_adapters({"q": pq}), p)
    with pytest.raises(ValueError, match="add_adapter: kernel 'l1/kernel' is .* different base models"):
        jlora.add_adapter(jlora.combine(jlora.stack_adapters({"a": pa}), p), "q", pq)
    # another model altogether
    with pytest.raises(ValueError, match="adapter 'z' has a different tree structure .* lacks 'l2/kernel'"):
        jlora.stack_adapters({"a": pa, "z": {"l1": {"kernel": None, "bias": None}}})
    # one kernel contracted differently (its layout) in two adapters
    k = pa["l1"]["kernel"]
    flipped = {**pa, "l1": {**pa["l1"], "kernel": jlora.LoraKernel(
        k.w0, jnp.ones((10, 2)), jnp.ones((2, 6)), layout=jlora.Layout((), (1,), (0,)), scale=1.0)}}
    with pytest.raises(ValueError, match=r"kernel 'l1/kernel' has layout \(in=\[0\] out=\[1\]\) in adapter 'a' but "
                                         r"\(in=\[1\] out=\[0\]\) in adapter 'f'"):
        jlora.stack_adapters({"a": pa, "f": flipped})
    # leaves trained in full have no place in a bank
    pf, _ = jlora.inject(p, mlp, rank=2, bias="all", example_args=(X,))
    with pytest.raises(ValueError, match="trains 'l1/bias' in full"):
        jlora.stack_adapters({"f": pf})
    with pytest.raises(ValueError, match="non-empty mapping"):
        jlora.stack_adapters({})
    with pytest.raises(ValueError, match="other than '__base__'"):
        jlora.stack_adapters({"__base__": pa})
    # single-adapter functions refuse a bank, naming it
    params = jlora.combine(jlora.stack_adapters({"a": pa, "b": pb}), p)
    with pytest.raises(ValueError, match="merge one adapter"):
        jlora.merge(params)
    with pytest.raises(ValueError, match="'l1/kernel' holds an adapter bank"):
        jlora.save_adapters("/tmp/never-written", params)
    with pytest.raises(ValueError, match="export_peft: 'l1/kernel' holds an adapter bank"):
        jlora.export_peft("/tmp/never-written", params, module_map={".*": "m"})
    from jlora.models.hf import check_plain  # what save_pretrained and save_gguf check first

    with pytest.raises(ValueError, match="'l1/kernel' holds an adapter bank"):
        check_plain(params)


def test_save_and_load_each_adapter_of_a_bank(tmp_path):
    """The documented composition: save each name with select_adapter, stack what load_adapters gives."""
    p, pa, pb, apply = two_adapters()
    bank = jlora.stack_adapters({"a": pa, "b": pb})
    for name in jlora.adapter_names(bank):
        jlora.save_adapters(tmp_path / name, jlora.select_adapter(bank, name))
    back = jlora.stack_adapters({name: jlora.load_adapters(tmp_path / name, p) for name in ("a", "b")})
    assert jax.tree.structure(back) == jax.tree.structure(bank)
    for g, w in zip(jax.tree.leaves(back), jax.tree.leaves(bank)):
        np.testing.assert_array_equal(g, w)


# -- weighted combination: against the dense formulas ---------------------------------------------------------


def _dense(k):
    """s·ΔW of one LoraKernel, in the kernel's layout (reference only)."""
    from jlora._value import delta

    return k.scale * delta(k.a, k.b, k.layout)


def test_combine_cat_and_svd_are_the_weighted_sum():
    p, pa, pb, _ = two_adapters()
    bank = jlora.stack_adapters({"a": pa, "b": pb})
    w = {"a": 0.7, "b": -0.4}
    want = {k: w["a"] * _dense(pa[k]["kernel"]) + (w["b"] * _dense(pb[k]["kernel"]) if k == "l1" else 0.0)
            for k in ("l1", "l2")}
    cat = jlora.combine_adapters(bank, w, method="cat")
    assert cat["l1"]["kernel"].rank == 5 and cat["l2"]["kernel"].rank == 2 and cat["l1"]["kernel"].scale == 1.0
    for k in ("l1", "l2"):
        close(_dense(cat[k]["kernel"]), want[k], 1e-5)
    # svd at the largest rank (3) of a rank-5 sum: the best rank-3 approximation
    svd = jlora.combine_adapters(bank, w, method="svd")
    assert svd["l1"]["kernel"].rank == 3 and svd["l2"]["kernel"].rank == 3
    u, s, vt = np.linalg.svd(np.asarray(want["l1"], np.float64))
    close(_dense(svd["l1"]["kernel"]), (u[:, :3] * s[:3]) @ vt[:3], 1e-5)
    close(_dense(svd["l2"]["kernel"]), want["l2"], 1e-5)  # rank 2 < 3: exact, padded with zeros
    full = jlora.combine_adapters(bank, w, method="svd", rank=5)
    close(_dense(full["l1"]["kernel"]), want["l1"], 1e-5)
    # params form keeps the base kernels; sequence weights follow the bank's order
    params = jlora.combine_adapters(jlora.combine(bank, p), [0.7, -0.4], method="cat")
    assert params["l1"]["kernel"].w0 is p["l1"]["kernel"] and params["l1"]["bias"] is p["l1"]["bias"]


def test_combine_linear_mixes_factors():
    p = mlp_params()
    pa, _ = jlora.inject(p, mlp, rank=2, example_args=(X,), key=K(60))
    pb, _ = jlora.inject(p, mlp, rank=2, alpha=4.0, example_args=(X,), key=K(61))
    pa, pb = randomize(pa, 62), randomize(pb, 63)
    bank = jlora.stack_adapters({"a": pa, "b": pb})
    lin = jlora.combine_adapters(bank, {"a": 0.5, "b": -0.3})["l1"]["kernel"]
    ka, kb = pa["l1"]["kernel"], pb["l1"]["kernel"]
    wa, wb = 0.5 * ka.scale, -0.3 * kb.scale  # PEFT: sign on A only, √|w·s| on both
    close(lin.a, np.sqrt(abs(wa)) * ka.a - np.sqrt(abs(wb)) * kb.a)
    close(lin.b, np.sqrt(abs(wa)) * ka.b + np.sqrt(abs(wb)) * kb.b)
    assert lin.rank == 2 and lin.scale == 1.0
    one = jlora.combine_adapters(bank, {"b": 2.0}, method="svd", rank=1)["l1"]["kernel"]  # one adapter: linear
    assert one.rank == 2
    close(_dense(one), 2.0 * _dense(kb), 1e-5)


def test_combine_svd_of_a_scanned_stack_per_layer():
    L, d, f = 3, 6, 10
    p = {"embed_in": normal(70, (5, d)), "layers": {"up": normal(71, (L, d, f)), "down": normal(72, (L, f, d))}}
    x = normal(73, (2, 5))
    pa, _ = jlora.inject(p, scan_model, rank=2, targets="layers", example_args=(x,), key=K(72))
    pb, _ = jlora.inject(p, scan_model, rank=3, targets="layers", example_args=(x,), key=K(73))
    pa, pb = randomize(pa, 74), randomize(pb, 75)
    bank = jlora.stack_adapters({"a": pa, "b": pb})
    svd = jlora.combine_adapters(bank, [1.0, 0.5], method="svd", rank=2)["layers"]["up"]
    assert svd.a.shape == (L, d, 2) and svd.b.shape == (L, 2, f)
    dense = np.asarray(_dense(pa["layers"]["up"]) + 0.5 * _dense(pb["layers"]["up"]), np.float64)
    for layer in range(L):
        u, s, vt = np.linalg.svd(dense[layer])
        close(svd.a[layer] @ svd.b[layer], (u[:, :2] * s[:2]) @ vt[:2], 1e-4)


def test_combine_refusals():
    p, pa, pb, _ = two_adapters()
    bank = jlora.stack_adapters({"a": pa, "b": pb})
    with pytest.raises(ValueError, match=r"'linear' needs one rank per kernel, but at 'l1/kernel' .*'a' \(r=2\)"):
        jlora.combine_adapters(bank, {"a": 1.0, "b": 1.0}, method="linear")
    with pytest.raises(ValueError, match="method must be one of"):
        jlora.combine_adapters(bank, {"a": 1.0}, method="ties")
    with pytest.raises(ValueError, match="rank= is only for method='svd'"):
        jlora.combine_adapters(bank, {"a": 1.0, "b": 1.0}, method="cat", rank=2)
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        jlora.combine_adapters(bank, {"c": 1.0})
    with pytest.raises(ValueError, match="3 weights for 2 adapters"):
        jlora.combine_adapters(bank, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="not a finite number"):
        jlora.combine_adapters(bank, {"a": float("nan")})


# -- the README's example -------------------------------------------------------------------------------------


def test_readme_serving_example_runs():
    from test_readme import README, _block

    code = _block("Serving many adapters")
    assert len([line for line in code.splitlines() if line.strip()]) <= 15
    ns: dict = {}
    exec(compile(code, str(README), "exec"), ns)
    bank, params, y, apply, x = ns["bank"], ns["params"], ns["y"], ns["apply"], ns["x"]
    assert jlora.adapter_names(bank) == ("en", "de") and list(ns["ids"]) == [1, -1, 0]
    assert bank["params"]["layers_0"]["kernel"].ranks == (4, 8) and bank["params"]["layers_2"]["kernel"].ranks == (4, 0)
    model, base = ns["model"], ns["base"]
    want = [apply(jlora.select_adapter(params, "de"), x[:1]), model.apply(base, x[1:2]),
            apply(jlora.select_adapter(params, "en"), x[2:])]
    close(y, jnp.concatenate(want), 1e-5)
    mix = ns["mix"]["params"]["layers_0"]["kernel"]
    assert mix.rank == 4 and mix.scale == 1.0
