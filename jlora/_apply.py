"""``apply``: evaluate ``apply_fn`` with every adapted kernel kept unmerged."""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax import lax

from jlora._bank import LoraBank, bank_problem, has_bank
from jlora._interpret import interpret
from jlora import _dora
from jlora._node import LoraKernel, Trainable, effective_factors, factor_problem
from jlora._quant import dequantized
from jlora._report import FusedReport, Report
from jlora._trace import Flat, shape_of, trace
from jlora._value import LoraValue, layout_tags

__all__ = ["Apply", "MATMUL_PATHS"]

#: ``inject(..., matmul=...)``: how an adapted matmul is computed.
MATMUL_PATHS = ("xla", "shared_xa", "pallas")


class Apply:
    """``apply(params, *args, **kwargs)``: ``apply_fn`` with every adapted kernel unmerged.

    Has ``apply_fn``'s signature. Works with any injected params whose base structure matches the
    one ``inject`` saw (params restored from a checkpoint included). Frozen leaves are wrapped in
    ``lax.stop_gradient``, so no gradient of the base is ever computed.

    Extra keywords, consumed here and not passed on: ``lora_rng`` — a PRNG key that turns on
    adapter dropout (``B·A·dropout(x)``, as PEFT); without it dropout is off (evaluation).
    ``adapter_ids`` (with ``batch_axes``, ``out_axes``) — for params holding an adapter bank
    (:func:`jlora.stack_adapters`): one adapter index per example, -1 for the base model; each
    example is computed as if alone with its own adapter (see :func:`jlora._mixed.mixed_apply`).

    Attributes:
      report: what ``inject`` adapted and skipped, and why (a :class:`Report`).
      fused_report: with ``matmul="pallas"``, after each traced call, which adapted matmuls took
        the fused kernel and why the others did not (a :class:`FusedReport`).
    """

    def __init__(self, apply_fn: Callable, base_paths: list[str], base_shapes: list, fallback: str | None,
                 report: Report, matmul: str = "xla"):
        if matmul not in MATMUL_PATHS:
            raise ValueError(f"matmul must be one of {MATMUL_PATHS}, got {matmul!r}.")
        self.apply_fn = apply_fn
        self._paths = base_paths
        self._shapes = base_shapes
        self.fallback = fallback
        self.report = report
        self.matmul = matmul
        self.fused_report: FusedReport | None = None
        self.__wrapped__ = apply_fn
        self.__name__ = getattr(apply_fn, "__name__", "apply") + "_lora"
        self.__doc__ = Apply.__doc__

    def __call__(self, params: Any, *args: Any, lora_rng: jax.Array | None = None, adapter_ids: Any = None,
                 batch_axes: Any = None, out_axes: Any = None, **kwargs: Any) -> Any:
        flat = Flat.of(params)
        _check_nodes(flat)
        self._check_structure(flat)
        if adapter_ids is not None or batch_axes is not None or out_axes is not None or has_bank(flat.leaves):
            from jlora._mixed import mixed_apply

            return mixed_apply(self, flat, args, kwargs, adapter_ids, batch_axes=batch_axes, out_axes=out_axes,
                               rng=lora_rng)
        traced = trace(self.apply_fn, flat.plain_leaves(), flat.treedef, args, kwargs)
        inputs = [_entry_value(flat.paths[i], flat.leaves[i]) for i in traced.params_in]
        outs, fused_log = interpret(traced.jaxpr, inputs + traced.args, fallback=self.fallback, rng=lora_rng,
                                    matmul=self.matmul)
        if self.matmul == "pallas":  # a loop body may be traced more than once: one entry per choice
            self.fused_report = FusedReport(list(dict.fromkeys(fused_log)))
        return jax.tree.unflatten(traced.out_tree, outs)

    def _check_structure(self, flat: Flat) -> None:
        if flat.paths != self._paths:
            raise ValueError(_structure_message(flat.paths, self._paths))
        for p, x, shape in zip(flat.paths, flat.plain_leaves(), self._shapes):
            if x is not None and shape_of(x) != shape:
                raise ValueError(
                    f"apply: params leaf '{p}' has shape {shape_of(x)}, but inject saw {shape}. Pass "
                    f"params made by inject (or load_adapters) over the same base model.")


def _structure_message(paths: list[str], want_paths: list[str]) -> str:
    have, want = set(paths), set(want_paths)
    missing = [p for p in want_paths if p not in have]
    extra = [p for p in paths if p not in want]
    first = (f"missing '{missing[0]}'" if missing else f"unexpected '{extra[0]}'") if (missing or extra) \
        else "leaves in a different order"
    return (f"apply: params have a different structure from the ones inject saw ({first}; "
            f"{len(missing)} missing, {len(extra)} unexpected). Pass the params returned by inject "
            f"(or by load_adapters / combine) for this model.")


def _check_nodes(flat: Flat) -> None:
    """Refuse, naming the path, params that would compute something other than the adapted model."""
    kernels = [(p, x) for p, x in zip(flat.paths, flat.leaves) if isinstance(x, (LoraKernel, LoraBank))]
    trained = [(p, x) for p, x in zip(flat.paths, flat.leaves) if isinstance(x, Trainable)]
    if not kernels and not trained:
        raise ValueError(
            "apply: params hold no adapters (no LoraKernel or Trainable node), e.g. split(params)[1], "
            "the plain base. Pass jlora.combine(adapters, base); to run the base model alone, call "
            "apply_fn(base, ...) directly.")
    for p, x in kernels:
        if x.w0 is None:
            raise ValueError(
                f"apply: '{p}' holds an adapter without its base kernel (split(params)[0], the adapters "
                f"alone). Pass jlora.combine(adapters, base).")
        why = bank_problem(x) if isinstance(x, LoraBank) else factor_problem(x)
        if why is not None:
            raise ValueError(f"apply: adapted kernel '{p}': {why}.")
    for p, x in trained:
        if x.value is None:
            raise ValueError(f"apply: '{p}' is trained in full but holds no value (Trainable(None)).")


def _entry_value(path: str, x: Any) -> Any:
    """The interpreter's value for one params input: a LoraValue for an adapted kernel, the plain
    value (behind stop_gradient unless trained in full) for every other leaf."""
    if isinstance(x, LoraKernel):
        return _lora_value(path, x)
    if isinstance(x, Trainable):
        return x.value
    return lax.stop_gradient(dequantized(x))


def _lora_value(path: str, k: LoraKernel) -> LoraValue:
    w0 = jax.tree.map(lax.stop_gradient, k.w0)
    a, b = effective_factors(k)  # PiSSA/OLoRA: [A, A0], [B; -B0] (rank 2r, A0 and B0 frozen)
    g = None if k.m is None else _dora.gain(w0, a, b, k.m, k.scale, k.layout)  # DoRA's m / ‖W0 + s·ΔW‖
    return LoraValue(w0=w0, a=a, b=b, tags=layout_tags(k.layout), scale=k.scale, dropout=k.dropout, path=path,
                     gain=g)
