"""The LoRA rule of every primitive an adapted kernel can reach, in one table for both passes.

``RULES[primitive name]`` is an :class:`~jlora._rules.table.OpRule` whose ``discover`` (used by
``inject`` to read a kernel's layout off the trace) and ``evaluate`` (used by ``apply`` to compute
unmerged) sit side by side in one module, with the preconditions both call:

* :mod:`~jlora._rules.views` — the ops between a kernel and its use (dtype conversion, copy,
  sharding constraints, transpose, reshape, squeeze, unit-axis broadcast, slices, flips);
* :mod:`~jlora._rules.compute` — the ops that consume it (``dot_general``,
  ``conv_general_dilated``, ``gather``);
* :mod:`~jlora._rules.control` — higher-order primitives (jit, custom_jvp/vjp, remat, scan,
  while, cond), entered recursively.

A primitive that is not in the table has no rule: discovery records it as an unsupported use, and
evaluation raises :class:`~jlora.UnsupportedOpError` naming it (or, with ``fallback='merge'``,
computes it on ``W0 + s·A·B``). ``docs/architecture.md`` says how to add a rule.
"""

from jlora._rules import compute, control, recompute, views
from jlora._rules.table import Context, NoRule, OpRule, Probe, Use, expand

__all__ = ["RULES", "Context", "NoRule", "OpRule", "Probe", "Use", "recompute"]

RULES: dict[str, OpRule] = expand({**views.RULES, **compute.RULES, **control.RULES})
