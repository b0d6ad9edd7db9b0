"""Does XLA keep ``remat='offload'``'s layer inputs on the host? A small Llama, several forms.

Issue 13's 8B target needs the layer inputs (4 GiB) off the device. ``remat='offload'`` names
each layer's input and lets ``jax.checkpoint`` offload it (``save_and_offload_only_these_names``).
This script compiles the training gradient of a 6-layer model (d 2048, 4 × 2048 tokens, bf16) in
each form and prints XLA's plan: device temp, host temp (what was offloaded: 6 × 32 MiB = 0.19
GiB when every input is), the optimized HLO's host-memory shapes (``S(5)``) and async copies, and
the step time. Forms:

* ``unroll-full`` / ``scan-full``: ``remat='full'``, unrolled / scanned (the references);
* ``scan-offload``: ``remat='offload'`` (what jlora.models.llama allows);
* ``unroll-offload-cse``: the offload policy on unrolled layers (jax.checkpoint's default
  ``prevent_cse=True``: its optimization barrier sits between the copy to the host and the copy back);
* ``unroll-offload-nocse``: the same with ``prevent_cse=False``;
* ``unroll-offload-hostnobar``: ``prevent_cse=True`` but the barrier leaves out host-memory operands
  (a patch of JAX's private remat lowering, for this measurement only).

``XLA_FLAGS`` passes through (e.g. ``--xla_gpu_enable_latency_hiding_scheduler=false``). Optimized
HLO goes to ``$OUT/hlo_<form>.txt`` when ``OUT`` is set. GPU only in any meaningful sense (a CPU's
device memory is the host's). Usage: ``python benchmarks/offload_probe.py [form,form,...]``.

``results/offload_probe.txt`` came from a one-off version of this script that also printed the
optimized HLO's ``opt-barrier`` count and laid out its rows differently; forms and numbers as here.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jlora.models import llama  # noqa: E402

SMALL = "--small" in sys.argv  # a CPU check of the script
CFG = llama.LlamaConfig(vocab_size=32000 if not SMALL else 64, hidden_size=2048 if not SMALL else 64,
                        intermediate_size=5632 if not SMALL else 128, num_layers=6 if not SMALL else 2,
                        num_heads=16 if not SMALL else 4, num_kv_heads=16 if not SMALL else 4,
                        head_dim=128 if not SMALL else 16, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
TOKENS = jnp.zeros((4, 2048) if not SMALL else (2, 16), jnp.int32)


def _host_free_lowering():
    """JAX's remat lowering with host-memory operands left out of its optimization barrier."""
    from jax._src import ad_checkpoint as adc
    from jax._src import core

    orig = adc._remat_lowering

    def lowering(ctx, *args, jaxpr, prevent_cse, differentiated, policy):
        if isinstance(prevent_cse, bool):
            prevent_cse = (prevent_cse,) * len(ctx.avals_in)
        prevent_cse = tuple(p and getattr(a, "memory_space", None) != core.MemorySpace.Host
                            for p, a in zip(prevent_cse, ctx.avals_in))
        return orig(ctx, *args, jaxpr=jaxpr, prevent_cse=prevent_cse, differentiated=differentiated, policy=policy)

    return adc.remat_p, lowering, orig


def run(form: str, *, scan: bool, offload: bool, prevent_cse=None, host_free_barrier: bool = False) -> None:
    from jax._src.interpreters import mlir

    policies = dict(llama.REMAT_POLICIES)
    orig_remat = nn.remat
    prim = lowering = orig_lowering = None
    try:  # every patch below is undone in ``finally``, even when one of them fails
        if offload and not scan:  # the model refuses remat='offload' unrolled: give 'full' its policy
            llama.REMAT_POLICIES["full"] = llama.REMAT_POLICIES["offload"]
        if prevent_cse is not None:
            llama.nn.remat = lambda cls, **kw: orig_remat(cls, **dict(kw, prevent_cse=prevent_cse))
        if host_free_barrier:
            prim, lowering, orig_lowering = _host_free_lowering()
            mlir.register_lowering(prim, lowering)
        cfg = CFG.replace(scan_layers=scan, remat="offload" if offload and scan else "full")
        model = llama.Llama(cfg)
        shapes = jax.eval_shape(model.init, jax.random.key(0), TOKENS)
        params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        f = jax.jit(jax.grad(lambda p: model.apply(p, TOKENS, labels=TOKENS)))
        compiled = f.lower(params).compile()
        ma = compiled.memory_analysis()
        txt = compiled.as_text()
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], f"hlo_{form}.txt"), "w") as fh:
                fh.write(txt)
        jax.block_until_ready(f(params))
        t0 = time.perf_counter()
        for _ in range(3):
            g = f(params)
        jax.block_until_ready(g)
        ms = (time.perf_counter() - t0) / 3 * 1e3
        print(f"| {form} | {ma.temp_size_in_bytes / 2**30:.2f} | {getattr(ma, 'host_temp_size_in_bytes', 0) / 2**30:.2f} "
              f"| {txt.count('S(5)')} | {txt.count('copy-start')} | {ms:.1f} |", flush=True)
    except Exception as e:  # a form that does not compile is a result too
        print(f"| {form} | FAILED: {type(e).__name__}: {str(e)[:200]} | | | | |", flush=True)
    finally:
        llama.REMAT_POLICIES.clear()
        llama.REMAT_POLICIES.update(policies)
        llama.nn.remat = orig_remat
        if prim is not None:
            mlir.register_lowering(prim, orig_lowering)


FORMS = {
    "unroll-full": dict(scan=False, offload=False),
    "unroll-offload-hostnobar": dict(scan=False, offload=True, prevent_cse=True, host_free_barrier=True),
    "unroll-offload-cse": dict(scan=False, offload=True, prevent_cse=True),
    "unroll-offload-nocse": dict(scan=False, offload=True, prevent_cse=False),
    "scan-full": dict(scan=True, offload=False),
    "scan-offload": dict(scan=True, offload=True),
}

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    chosen = args[0].split(",") if args else list(FORMS)
    print(f"# offload_probe  jax {jax.__version__}  {jax.devices()[0].device_kind}  XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")
    print("| form | device temp GiB | host temp GiB | S(5) in HLO | copy-start | step ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in chosen:
        run(name, **FORMS[name])
