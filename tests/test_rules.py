"""The rule table: one row per registered primitive, each checked against the merged model.

Every row is a tiny function whose jaxpr carries the kernel through that primitive; ``apply`` must
equal ``apply_fn`` on ``merge(params)`` (W0 + s·A·B materialised, an independent computation) in
value and in the adapters' gradient. The table must cover every name in ``RULES`` except the
spellings older or newer JAX releases use for the same primitive.
"""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

import jlora
from helpers import randomize
from jlora._rules import RULES
from jlora._value import Role, Tag, subscripts

K = jax.random.key


# apply's paths run under strict dtype promotion (conftest's fixture; optax-using tests opt out).
pytestmark = pytest.mark.strict_promotion
README = Path(__file__).resolve().parents[1] / "README.md"

# Registered names no row here produces: the names other JAX releases give the same primitives
# (jlora/_compat.py groups them), and `reshard`, which only explicit-sharding mode emits
# (tests/test_sharding.py checks it against the unsharded model).
ELSEWHERE = {"copy", "copy_p", "xla_call", "core_call", "closed_call", "jit", "pjit", "remat", "remat2", "checkpoint",
             "custom_jvp_call", "custom_jvp_call_jaxpr", "custom_vjp_call", "custom_vjp_call_jaxpr", "reshard"}


def _w(*shape, key=0):
    return jax.random.normal(K(key), shape) / 3


@jax.custom_jvp
def _cj(w, x):
    return x @ w


_cj.defjvp(lambda primals, tangents: (_cj(*primals), tangents[1] @ primals[0] + primals[1] @ tangents[0]))


@jax.custom_vjp
def _cv(w, x):
    return x @ w


_cv.defvjp(lambda w, x: (x @ w, (w, x)), lambda res, g: (res[1].T @ g, g @ res[0].T))


def _mesh():
    return jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))


def _while(p, x):
    def body(c):
        i, h = c
        return i + 1, jnp.tanh(h @ p["w"])
    return lax.while_loop(lambda c: c[0] < x.shape[0], body, (0, x))[1]


# name -> (params, fn(p, x), x); the primitive `name` must appear in fn's jaxpr.
ROWS = {
    "dot_general": ({"w": _w(4, 3)}, lambda p, x: x @ p["w"], _w(2, 4, key=1)),
    "convert_element_type": ({"w": _w(4, 3)}, lambda p, x: x.astype(jnp.bfloat16) @ p["w"].astype(jnp.bfloat16),
                             _w(2, 4, key=1)),
    "copy": ({"w": _w(4, 3)}, lambda p, x: x @ jnp.array(p["w"], copy=True), _w(2, 4, key=1)),
    "transpose": ({"w": _w(3, 4)}, lambda p, x: x @ p["w"].T, _w(2, 4, key=1)),
    "reshape": ({"w": _w(4, 6)}, lambda p, x: jnp.einsum("bi,ihd->bhd", x, p["w"].reshape(4, 2, 3)), _w(2, 4, key=1)),
    "squeeze": ({"w": _w(1, 4, 3)}, lambda p, x: x @ p["w"][0], _w(2, 4, key=1)),
    "broadcast_in_dim": ({"w": _w(4, 3)}, lambda p, x: jnp.einsum("bi,zio->bzo", x, p["w"][None]), _w(2, 4, key=1)),
    "slice": ({"w": _w(4, 6)}, lambda p, x: x @ p["w"][:, 1:4], _w(2, 4, key=1)),
    "dynamic_slice": ({"w": _w(3, 4, 5)}, lambda p, x: x @ lax.dynamic_index_in_dim(p["w"], x.shape[0] - 1, 0, False),
                      _w(2, 4, key=1)),
    "rev": ({"w": _w(4, 3)}, lambda p, x: x @ jnp.flip(p["w"], 1), _w(2, 4, key=1)),
    "sharding_constraint": ({"w": _w(4, 3)}, lambda p, x: x @ lax.with_sharding_constraint(
        p["w"], NamedSharding(_mesh(), PartitionSpec(None, "d"))), _w(2, 4, key=1)),
    "conv_general_dilated": ({"w": _w(3, 3, 2, 4)}, lambda p, x: lax.conv_general_dilated(
        x, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")), _w(1, 5, 5, 2, key=1)),
    "gather": ({"w": _w(10, 4)}, lambda p, t: p["w"][t], jnp.array([[1, 7], [3, 0]])),
    "pjit": ({"w": _w(4, 3)}, lambda p, x: jax.jit(lambda w, x: jnp.tanh(x @ w))(p["w"], x), _w(2, 4, key=1)),
    "custom_jvp_call": ({"w": _w(4, 3)}, lambda p, x: _cj(p["w"], x), _w(2, 4, key=1)),
    "custom_vjp_call": ({"w": _w(4, 3)}, lambda p, x: _cv(p["w"], x), _w(2, 4, key=1)),
    "checkpoint": ({"w": _w(4, 3)}, lambda p, x: jax.checkpoint(lambda w, x: jnp.sin(x @ w))(p["w"], x),
                   _w(2, 4, key=1)),
    "scan": ({"w": _w(3, 4, 4)}, lambda p, x: lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0],
             _w(2, 4, key=1)),
    "while": ({"w": _w(4, 4)}, _while, _w(2, 4, key=1)),
    "cond": ({"w": _w(4, 3)}, lambda p, x: lax.cond(x.sum() > 0, lambda w, x: x @ w, lambda w, x: -(x @ w), p["w"], x),
             _w(2, 4, key=1)),
}


def _primitives(jaxpr) -> set[str]:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else [v]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    names |= _primitives(inner)
    return names


def test_the_table_covers_every_registered_rule():
    present = {n for n in ROWS if n in RULES}
    assert present == set(ROWS), set(ROWS) - present  # every row names a registered rule
    assert set(RULES) - set(ROWS) <= ELSEWHERE, set(RULES) - set(ROWS) - ELSEWHERE


@pytest.mark.parametrize("name", sorted(ROWS))
def test_rule_matches_the_merged_model(name):
    params, fn, x = ROWS[name]
    seen = _primitives(jax.make_jaxpr(fn)(params, x).jaxpr)
    aliases = {"pjit": {"pjit", "jit"}, "checkpoint": {"checkpoint", "remat", "remat2"},
               "custom_jvp_call": {"custom_jvp_call"}, "custom_vjp_call": {"custom_vjp_call", "custom_vjp_call_jaxpr"}}
    assert seen & aliases.get(name, {name}), f"{name} not in {sorted(seen)}"
    lp, apply = jlora.inject(params, fn, rank=2, targets=["w"], example_args=(x,))
    lp = randomize(lp, scale=0.4)
    tol = 2e-2 if name == "convert_element_type" else 1e-5
    f32 = lambda y: np.asarray(y, np.float32)
    np.testing.assert_allclose(f32(jax.jit(apply)(lp, x)), f32(fn(jlora.merge(lp), x)), rtol=tol, atol=tol)
    adapters, base = jlora.split(lp)
    loss_u = lambda ad: jnp.sum(jnp.sin(apply(jlora.combine(ad, base), x).astype(jnp.float32)))
    loss_m = lambda ad: jnp.sum(jnp.sin(fn(jlora.merge(jlora.combine(ad, base)), x).astype(jnp.float32)))
    if name == "while":  # lax.while_loop has no reverse mode: compare a directional derivative
        t = jax.tree.map(lambda a: jax.random.normal(K(3), a.shape, a.dtype), adapters)
        gu, gm = jax.jvp(loss_u, (adapters,), (t,))[1], jax.jvp(loss_m, (adapters,), (t,))[1]
    else:
        gu, gm = jax.grad(loss_u)(adapters), jax.grad(loss_m)(adapters)
    for a, b in zip(jax.tree.leaves(gu), jax.tree.leaves(gm)):
        np.testing.assert_allclose(f32(a), f32(b), rtol=5 * tol, atol=5 * tol)


def test_readme_lists_exactly_the_registered_primitives():
    text = README.read_text()
    section = text.split("## Supported primitives", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "primitives |" not in line]
    listed = set(re.findall(r"`([a-z_0-9]+)`", "\n".join(rows)))
    assert listed == set(RULES), (listed - set(RULES), set(RULES) - listed)


# -- the einsum bookkeeping, from a table -------------------------------------------------------------------

S, I, O, U = Role.STACK, Role.IN, Role.OUT, Role.UNIT
SUBSCRIPT_ROWS = [  # (view tags, view shape) -> A's and B's shapes with rank 2
    ([Tag(I), Tag(O)], (4, 3), (4, 2), (2, 3)),
    ([Tag(O), Tag(I)], (3, 4), (4, 2), (2, 3)),
    ([Tag(S), Tag(I), Tag(O)], (5, 4, 3), (5, 4, 2), (5, 2, 3)),
    ([Tag(O, 1), Tag(S), Tag(I), Tag(O, 0)], (6, 5, 4, 3), (5, 4, 2), (5, 2, 3, 6)),
    ([Tag(I, 1), Tag(I, 0), Tag(O)], (7, 4, 3), (4, 7, 2), (2, 3)),
]


@pytest.mark.parametrize("tags,view,a_shape,b_shape", SUBSCRIPT_ROWS)
def test_subscripts_put_every_view_axis_on_its_factor(tags, view, a_shape, b_shape):
    s = subscripts(tags)
    assert len(s.view) == len(view) and len(s.a) == len(a_shape) and len(s.b) == len(b_shape)
    out = jax.eval_shape(lambda a, b: jnp.einsum(f"{s.a},{s.b}->{s.view}", a, b),
                         jax.ShapeDtypeStruct(a_shape, jnp.float32), jax.ShapeDtypeStruct(b_shape, jnp.float32))
    assert out.shape == view


def test_subscripts_leave_unit_axes_out_of_the_factors():
    s = subscripts([Tag(U), Tag(I), Tag(O)])
    assert s.view[0] not in s.a + s.b and s.a[-1] == s.rank == s.b[0]
