"""Every device kernel of one profiled training step, in launch order: which matmuls ran, how often.

``profile_step.py`` sums kernel time by name; this script lists the launches themselves, so that a
kernel that runs more often than the program asks for shows up. It found that inside a scanned
layer XLA:GPU ran the fused LoRA kernel 17 times a layer where the jaxpr holds 14 (benchmarks/
RESULTS.md, "why the kernel lost inside a scan"). For each variant: ``lora_step.py``'s scanned model
(``--layers``, default 4, at the reference width), compiled, two warm-up steps, one profiled step;
then the launches of matmul-like kernels (fused LoRA, cuBLAS ``nvjet``, XLA gemm fusions, cuDNN
attention) longer than ``--min-us``, and the 12 largest kernels by total time with their counts.

GPU only (a CPU trace has no device lines: the script says so). ``jlora_fused`` takes the kernel
inside the scan (the default; ``JLORA_FUSED_IN_LOOPS=0`` in the environment would keep it out). ``--tiny`` runs the CPU-sized shape with
the kernel call replaced by plain ``jnp`` (a check of the script).

Usage: ``python benchmarks/kernel_launches.py [--variants jlora_fused,jlora] [--layers 4]``
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE), _HERE]

import jax  # noqa: E402
import optax  # noqa: E402

import lora_step as L  # noqa: E402
import profile_step as P  # noqa: E402

_MATMUL = re.compile(r"jlora|nvjet|gemm|cudnn|cublas", re.I)


def device_events(path: str) -> list[dict]:
    """The trace's GPU kernel and copy events in start order (none for a CPU trace)."""
    events, device, _ = P.trace_events(path)
    return sorted(events, key=lambda e: float(e.get("ts", 0.0))) if device else []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="jlora_fused,jlora", help="comma-separated lora_step variants")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--min-us", type=float, default=40.0, help="list matmul-like launches longer than this")
    p.add_argument("--tiny", action="store_true", help="CPU-sized shape, kernel call replaced by plain jnp")
    a = p.parse_args(argv)
    if a.tiny:
        P.install_stand_in("xla")
    for v in a.variants.split(","):
        pa = P.parse_args(["--layers", str(a.layers), "--variants", v, "--modes", "scan", "--profile"]
                          + (["--tiny"] if a.tiny else []))
        _, c, params, tokens, jl, pairs, status = P.build_mode(pa, "scan")
        if v in status:
            print(f"{v}: {status[v]}")
            return 1
        run = L._build(v, c, optax.adamw(1e-4), params, pairs, jl)
        L.compile_run(run, tokens)
        for _ in range(2):
            L.call(run, tokens)
        jax.block_until_ready(run.state)
        with tempfile.TemporaryDirectory() as log_dir:
            with jax.profiler.trace(log_dir, create_perfetto_trace=True):
                L.call(run, tokens)
                jax.block_until_ready(run.state)
            path = P.find_trace(log_dir)
            events = device_events(path) if path else []
        print(f"== {v}: {len(events)} device events in one step; "
              f"kernel time {sum(float(e.get('dur', 0)) for e in events) / 1e3:.2f} ms", flush=True)
        if not events:
            print("   (no GPU kernels in the trace: a CPU run)")
        for e in events:
            name, dur = str(e.get("name", "")), float(e.get("dur", 0.0))
            if _MATMUL.search(name) and dur > a.min_us:
                print(f"  {dur:8.1f} us  {name[:60]}")
        total: collections.Counter = collections.Counter()
        count: collections.Counter = collections.Counter()
        for e in events:
            base = re.sub(r"_\d+$", "", str(e.get("name", "")))
            total[base] += float(e.get("dur", 0.0))
            count[base] += 1
        for name, us in total.most_common(12):
            print(f"  total {us / 1e3:7.3f} ms  x{count[name]:4d}  {name[:80]}")
        run.compiled = run.state = run.const = run.step = run.apply = None
    return 0


if __name__ == "__main__":
    sys.exit(main())
