"""The jlora LoRA training step on every device JAX sees: data-parallel or FSDP, JAX's own SPMD.

One 1-D mesh over all devices (``jax.devices()``, every process's), axis ``data`` (``--mode dp``:
weights replicated) or ``fsdp`` (``--mode fsdp``: every weight matrix split along one axis, the
rows of each kernel; A and B follow their kernel as jlora places them). The batch is split over the
same axis, ``--batch`` sequences per device, built per process with
``jax.make_array_from_process_local_data``. The model is the plain-JAX Llama-shaped decoder of
``benchmarks/lora_step.py``; adapters on
q, k, v, o, gate, up, down; AdamW on the adapters only (``jlora.split`` / ``combine``).

Prints, per run: compile time, median step time, tokens/s per device, and memory per device —
the allocator's peak where the backend reports one (GPU/TPU), XLA's static plan for the step
(``compiled.memory_analysis()``, per device), and the bytes of weights + adapters + optimizer
state resident on each device.

Runs on one device (a degenerate mesh) and on N simulated CPU devices::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python benchmarks/sharded_step.py --mode fsdp --tiny

Multi-host: start the same command on every host with ``--distributed`` (calls
``jax.distributed.initialize()``; on Cloud TPU / SLURM / Open MPI it finds its peers itself).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import statistics
import sys
import time
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
for _p in (_REPO, _HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jlora  # noqa: E402
import lora_step as L  # noqa: E402
from jlora._tree import iter_kernels  # noqa: E402

MIB = 2.0**20
TINY = {"d": 64, "layers": 2, "heads": 4, "ffn": 128, "vocab": 256, "seq": 16, "rank": 4}
PROJ = ("q", "k", "v", "o", "gate", "up", "down")


# ----------------------------------------------------------------------------------------------
# The model: lora_step.py's (one model for every benchmark, so the numbers compare).


def load_model():
    return L.Cfg, L.init_params, L.forward, L.xent, "benchmarks/lora_step.py"


# ----------------------------------------------------------------------------------------------
# Placement


def fsdp_spec(path: str, shape: tuple[int, ...], n: int, axis: str, stacked: bool) -> P:
    """Split a weight matrix along its first (non-layer) axis that ``n`` divides; else replicate."""
    first = 1 if stacked and path.startswith("layers") else 0
    if len(shape) - first < 2:
        return P()  # vectors (norm scales): replicated
    for ax in range(first, len(shape)):
        if shape[ax] % n == 0:
            spec: list[Any] = [None] * len(shape)
            spec[ax] = axis
            return P(*spec)
    return P()


def param_shardings(abstract, mesh, mode: str, axis: str, stacked: bool):
    n = mesh.size

    def one(path, x):
        if mode == "dp":
            return NamedSharding(mesh, P())
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        return NamedSharding(mesh, fsdp_spec(name, tuple(x.shape), n, axis, stacked))

    return jax.tree_util.tree_map_with_path(one, abstract)


def resident_bytes(tree) -> dict[Any, int]:
    """Bytes of ``tree``'s arrays held on each local device."""
    per: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            for s in leaf.addressable_shards:
                per[s.device] = per.get(s.device, 0) + s.data.nbytes
    return per


def allocator_peak() -> int | None:
    peaks = []
    for d in jax.local_devices():
        try:
            st = d.memory_stats()
        except Exception:
            st = None
        if st and "peak_bytes_in_use" in st:
            peaks.append(int(st["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("dp", "fsdp"), default="fsdp")
    g = p.add_argument_group("model shape (default: the reference 0.9 B Llama-shaped model)")
    g.add_argument("--d", type=int, default=2048)
    g.add_argument("--layers", type=int, default=16)
    g.add_argument("--heads", type=int, default=16)
    g.add_argument("--ffn", type=int, default=5632)
    g.add_argument("--vocab", type=int, default=32000)
    g.add_argument("--seq", type=int, default=2048)
    g.add_argument("--batch", type=int, default=1, help="sequences per device (global batch = batch × devices)")
    g.add_argument("--rank", type=int, default=16)
    g.add_argument("--no-scan", dest="scan", action="store_false", help="unrolled layers instead of lax.scan")
    g.add_argument("--tiny", action="store_true",
                   help=f"a tiny shape for smoke tests ({', '.join(f'--{k} {v}' for k, v in TINY.items())}; "
                        f"options given explicitly still apply)")
    m = p.add_argument_group("measurement")
    m.add_argument("--steps", type=int, default=10, help="timed steps")
    m.add_argument("--warmup", type=int, default=2)
    m.add_argument("--lr", type=float, default=1e-4)
    m.add_argument("--adapter-dtype", default="float32", choices=("float32", "bfloat16"))
    m.add_argument("--matmul", default="xla", choices=("xla", "shared_xa", "pallas"),
                   help="inject(..., matmul=...): 'pallas' is the fused Hopper kernel, partitioned per device "
                        "(inside lax.scan too unless JLORA_FUSED_IN_LOOPS=0; the run prints which matmuls took it)")
    m.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
    m.add_argument("--json", dest="json_path", default=None, help="write the results to this file")
    if p.parse_known_args(argv)[0].tiny:
        p.set_defaults(**TINY)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.distributed:
        jax.distributed.initialize()
    Cfg, init_params, forward, xent, model_src = load_model()
    n, axis = jax.device_count(), ("data" if a.mode == "dp" else "fsdp")
    auto = getattr(getattr(jax.sharding, "AxisType", None), "Auto", None)
    mesh = jax.make_mesh((n,), (axis,), **({"axis_types": (auto,)} if auto is not None else {}))
    attn = "cudnn" if jax.default_backend() == "gpu" else "xla"
    c = Cfg(d=a.d, layers=a.layers, heads=a.heads, ffn=a.ffn, vocab=a.vocab, seq=a.seq, batch=a.batch * n,
            rank=a.rank, alpha=2.0 * a.rank, scan=a.scan, attn=attn)
    lead = jax.process_index() == 0
    say = (lambda *s: print(*s, flush=True)) if lead else (lambda *s: None)
    say(f"# sharded_step  jax {jax.__version__}  {jax.default_backend()}:{jax.devices()[0].device_kind}  "
        f"devices {n} (processes {jax.process_count()})  mode {a.mode}  mesh {dict(mesh.shape)}")
    say(f"# model {model_src}: d={c.d} layers={c.layers} heads={c.heads} ffn={c.ffn} vocab={c.vocab} "
        f"seq={c.seq} batch={c.batch} ({a.batch}/device) rank={c.rank} scan={c.scan} attn={attn}")

    # Weights: the model's own init (host or one device), then split over the mesh; this is the
    # step that a real job replaces by restoring a sharded checkpoint straight onto the mesh.
    t0 = time.perf_counter()
    params = init_params(0, c)
    shardings = param_shardings(params, mesh, a.mode, axis, c.scan)
    params = jax.device_put(params, shardings)

    # Data: each process builds only its own rows of the global batch.
    batch_sharding = NamedSharding(mesh, P(axis, None))
    local_rows = a.batch * jax.local_device_count()
    rng = np.random.default_rng(1 + jax.process_index())
    local = rng.integers(0, c.vocab, (local_rows, c.seq)).astype(np.int32)
    tokens = jax.make_array_from_process_local_data(batch_sharding, local, (c.batch, c.seq))
    jax.block_until_ready((params, tokens))
    t_init = time.perf_counter() - t0

    # Adapters: placed by jlora next to their kernels.
    t0 = time.perf_counter()
    apply_fn = functools.partial(forward, c=c)
    lp, apply = jlora.inject(params, apply_fn, c.rank, alpha=c.alpha, targets=list(PROJ), key=jax.random.key(2),
                             example_args=(tokens,), adapter_dtype=jnp.dtype(a.adapter_dtype), matmul=a.matmul)
    jax.block_until_ready(lp)
    t_inject = time.perf_counter() - t0
    adapters, base = jlora.split(lp)
    tx = optax.adamw(a.lr)
    ad_shardings = jax.tree.map(lambda x: x.sharding, adapters)
    opt = jax.jit(tx.init)(adapters)  # moments are placed like the adapters (XLA propagates it)
    replicated = NamedSharding(mesh, P())
    opt = jax.tree.map(lambda x: x if x.sharding.device_set == replicated.device_set else jax.device_put(x, replicated),
                       opt)  # scalars (the step count) on all devices
    opt_shardings = jax.tree.map(lambda x: x.sharding, opt)

    jitted = jax.jit(L.jlora_step(apply, tx), donate_argnums=0,
                     out_shardings=((ad_shardings, opt_shardings), replicated, ad_shardings))
    t0 = time.perf_counter()
    lowered = jitted.lower((adapters, opt), base, tokens)
    t_lower = time.perf_counter() - t0
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0 - t_lower
    plan = L.xla_plan_bytes(compiled)

    state = (adapters, opt)
    losses = []
    for _ in range(max(a.warmup, 1)):
        state, loss, _ = compiled(state, base, tokens)
        losses.append(float(loss))
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        state, loss, _ = compiled(state, base, tokens)
        jax.block_until_ready((state, loss))
        times.append(time.perf_counter() - t0)
    losses.append(float(loss))

    med = statistics.median(times) if times else float("nan")
    tok_dev = c.batch * c.seq / med / n if times else float("nan")
    resident = resident_bytes((base, state))
    res_max = max(resident.values()) if resident else 0
    peak = allocator_peak()
    path, k = next((pth, x) for pth, x in iter_kernels(lp) if isinstance(x, jlora.LoraKernel))
    spec = lambda arr: tuple(arr.sharding.spec) if hasattr(arr.sharding, "spec") else arr.sharding
    say(f"# init {t_init:.2f} s, inject {t_inject:.2f} s, trace+lower {t_lower:.2f} s, compile {t_compile:.2f} s")
    say(f"# e.g. {path}: W0 {spec(k.w0)}, A {spec(k.a)}, B {spec(k.b)}")
    if apply.fused_report is not None:
        say(f"# matmul={a.matmul}: {apply.fused_report}".replace("\n", " "))
    say(f"mode {a.mode}  devices {n}  step {med * 1e3:.2f} ms (median of {len(times)})  "
        f"tokens/s/device {tok_dev:,.0f}  tokens/s {tok_dev * n:,.0f}")
    say(f"memory/device: allocator peak {'n/a' if peak is None else f'{peak / MIB:,.1f} MiB'}  "
        f"XLA plan {'n/a' if plan is None else f'{plan / MIB:,.1f} MiB'}  "
        f"resident weights+adapters+opt {res_max / MIB:,.2f} MiB  loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    if a.json_path and lead:
        L.write_json(a.json_path, {
            "env": L.environment(), "mode": a.mode, "devices": n, "processes": jax.process_count(),
            "backend": jax.default_backend(), "model": model_src, "shape": dataclasses.asdict(c),
            "step_ms": med * 1e3, "times_ms": [t * 1e3 for t in times], "tokens_per_s_per_device": tok_dev,
            "allocator_peak_bytes": peak, "xla_plan_bytes": plan, "resident_bytes_max": res_max,
            "lower_s": t_lower, "compile_s": t_compile, "inject_s": t_inject, "init_s": t_init, "losses": losses,
            "matmul": a.matmul, "fused_report": None if apply.fused_report is None else str(apply.fused_report)})
    if not all(math.isfinite(x) for x in losses):
        print("non-finite loss", losses, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
