"""The rule table's types: what a rule is, what the two passes hand it, and how names are grouped.

A rule serves two passes over the same jaxpr:

* **discover** (``inject``, static): ``discover(analysis, eqn, ins) -> outs``. ``ins`` holds a
  :class:`Probe` for every operand that is (a view of) a parameter leaf, None for the others;
  the rule returns the probes of the outputs (None where the kernel does not flow on), and
  records a :class:`Use` with ``analysis.add`` when the op consumes the kernel (a matmul, a
  convolution, a gather) or ``analysis.other`` when the op has no LoRA rule in this form.
* **evaluate** (``apply``): ``evaluate(eqn, invals, ctx) -> outs``. ``invals`` holds a
  :class:`~jlora._value.LoraValue` for every adapted-kernel operand; the rule computes the
  outputs unmerged, or raises :class:`NoRule` with the reason, which becomes the user's error
  (or, with ``fallback='merge'``, the op runs on ``W0 + s·A·B``).

A precondition that decides whether an op has a rule at all is one function both passes call,
so they never disagree.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp

__all__ = ["Context", "NoRule", "OpRule", "Probe", "Use", "expand", "union"]


class NoRule(Exception):
    """This equation has no LoRA rule in the form it takes here; the message says why."""


@dataclasses.dataclass(frozen=True)
class Use:
    """How one op consumes a parameter leaf (the discovery pass's record)."""

    kind: str  # 'dot' | 'conv' | 'gather' | 'other' | 'operand' (both operands are params)
    op: str
    where: str
    stack: frozenset = frozenset()
    in_: frozenset = frozenset()
    out: frozenset = frozenset()
    conv: tuple | None = None  # a convolution's kernel axes (in-feature, *spatial); () if not one each


@dataclasses.dataclass(frozen=True)
class Probe:
    """A view of parameter leaf ``leaf`` during discovery."""

    leaf: int
    tags: tuple  # per view axis: frozenset of original kernel axes (empty: an inserted unit axis)
    removed: frozenset  # original axes sliced away (scan over a stack, squeeze of an index)
    exact: bool = True  # no element moved or dropped on the way (no flip, slice, merge or split)


def union(tags: tuple, axes: Iterable[int]) -> frozenset:
    """The kernel axes behind some view axes of a probe."""
    out = frozenset()
    for a in axes:
        out |= tags[a]
    return out


@dataclasses.dataclass(frozen=True)
class OpRule:
    """The LoRA rule of one primitive: its discovery and its evaluation."""

    discover: Callable[[Any, Any, list], list]
    evaluate: Callable[[Any, list, "Context"], list]


def expand(rules: Mapping[Any, OpRule]) -> dict[str, OpRule]:
    """``{name or iterable of names: rule}`` -> ``{name: rule}`` (one dict access per lookup)."""
    out: dict[str, OpRule] = {}
    for names, rule in rules.items():
        for name in [names] if isinstance(names, str) else names:
            if name in out:
                raise ValueError(f"two LoRA rules for primitive {name!r}")
            out[name] = rule
    return out


@dataclasses.dataclass
class Context:
    """Per-call state of the interpreter: merge fallback, dropout keys, matmul path choices.

    ``run(jaxpr, consts, args, ctx)`` is the interpreter itself, for the rules of higher-order
    primitives.
    """

    run: Callable
    fallback: str | None = None
    rng: jax.Array | None = None
    counter: int = 0
    shared_xa: bool = False  # one x·[A_1 … A_n] for adapted kernels that share an input
    shared: dict = dataclasses.field(default_factory=dict)  # id(eqn) -> precomputed x·A
    pallas: bool = False  # the epilogue-fused Hopper kernel where it applies
    in_loop: bool = False  # inside a scan/while body
    recompute: Any = None  # a scan body's recompute.Plan, set by the scan rule for that body
    fused_log: list = dataclasses.field(default_factory=list)  # (kernel path, None | why not fused)

    def next_key(self) -> jax.Array:
        self.counter += 1
        return jax.random.fold_in(self.rng, self.counter)

    def maybe_key(self) -> jax.Array | None:
        return self.next_key() if self.rng is not None else None

    def child(self, rng: jax.Array | None, *, in_loop: bool = False) -> "Context":
        return Context(self.run, self.fallback, rng, 0, self.shared_xa, pallas=self.pallas,
                       in_loop=self.in_loop or in_loop, fused_log=self.fused_log)

    def dropout(self, x: jax.Array, rate: float) -> jax.Array:
        """Adapter input dropout (inverted), only when ``apply`` got ``lora_rng``."""
        if rate <= 0.0 or self.rng is None:
            return x
        keep = jax.random.bernoulli(self.next_key(), 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)
