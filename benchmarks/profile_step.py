"""Where one LoRA training step's time goes: a device-kernel profile and an HLO census, per variant.

Builds benchmarks/lora_step.py's model and steps (its functions, its reference shape by default) for
the chosen variants, unrolled (layers as a Python list) and/or scanned (``lax.scan`` over stacked
layers), compiles each step once, and then:

``--profile``  runs ``--steps`` steps under ``jax.profiler.trace(dir, create_perfetto_trace=True)``,
               reads the Chrome-trace JSON (gzip) that JAX writes and prints, per variant, the device
               kernel time per step aggregated by kernel name (top ``--top``), by kind of kernel
               (gemm, the fused LoRA kernel, copy/transpose, dynamic-update-slice, ...), and the busy
               time per step (the union of kernel intervals); then a diff table between two variants
               (``--diff``, default: fused vs plain in each layout): which kernels take the extra ms.
``--hlo``      counts, in each step's optimized HLO, custom-calls, copies, transposes, dynamic-slices
               and dynamic-update-slices, all-gathers and their bytes, each weighted by how often it
               runs in one step (a loop body's ops × its trip count), and lists the largest ones with
               the source line that made them. Each step's HLO text is written under ``--out``.

On a CPU there is no device line in the trace: the profile then aggregates the host threads' events
(XLA:CPU's thunks), and says so. ``matmul="pallas"`` needs an sm_90 GPU; elsewhere ``--stand-in``
replaces the kernel call: ``xla`` (plain jnp, as tests/test_fused.py does) or ``opaque`` (a host
callback: an opaque custom call, like the kernel, which XLA must feed with materialised operands;
only for ``--hlo``, it is slow to run). Inside loop bodies the fused path is taken (the
default) unless ``--no-fused-in-loops`` (which sets ``JLORA_FUSED_IN_LOOPS=0``).

On one H200 (the reference shape; about 2–3 minutes)::

    python benchmarks/profile_step.py --modes unrolled,scan --variants jlora,jlora_fused --hlo --profile \\
        --out $OUT/profile

A CPU smoke run::

    python benchmarks/profile_step.py --tiny --modes unrolled,scan --variants jlora,jlora_fused --hlo --profile
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import gc
import glob
import gzip
import json
import math
import os
import re
import sys
import time
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
for _p in (_REPO, _HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

VARIANTS = ("floor", "handwritten", "jlora", "jlora_fused")
TINY = {"d": 256, "layers": 2, "heads": 4, "ffn": 512, "vocab": 512, "seq": 64, "batch": 2, "rank": 4}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model shape (defaults: lora_step.py's reference shape)")
    for name, default in (("d", 2048), ("layers", 16), ("heads", 16), ("ffn", 5632), ("vocab", 32000),
                          ("seq", 2048), ("batch", 8), ("rank", 16)):
        g.add_argument(f"--{name}", type=int, default=default)
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2·rank)")
    g.add_argument("--attn", default="auto", choices=("auto", "cudnn", "xla", "manual"))
    g.add_argument("--tiny", action="store_true",
                   help=f"a CPU-sized shape ({', '.join(f'--{k} {v}' for k, v in TINY.items())}: bf16 shapes "
                        f"that fit the kernel's tiles); options given explicitly still apply")
    m = p.add_argument_group("what to run")
    m.add_argument("--variants", default="jlora,jlora_fused", help=f"comma-separated subset of {','.join(VARIANTS)}")
    m.add_argument("--modes", default="unrolled,scan", help="comma-separated: unrolled, scan")
    m.add_argument("--hlo", action="store_true", help="census of each step's optimized HLO")
    m.add_argument("--profile", action="store_true", help="device-kernel profile of --steps steps")
    m.add_argument("--steps", type=int, default=2, help="profiled steps per variant")
    m.add_argument("--host", action="store_true",
                   help="with --profile: the host's share (launch → first kernel, gaps inside steps, top host events)")
    m.add_argument("--top", type=int, default=25, help="rows of the per-kernel and diff tables")
    m.add_argument("--diff", default="auto",
                   help="'A,B' (e.g. scan:jlora_fused,scan:jlora), several separated by ';', or 'auto': "
                        "jlora_fused vs jlora per mode")
    m.add_argument("--stand-in", default="auto", choices=("auto", "none", "xla", "opaque"),
                   help="replace the fused kernel call (auto: none on an sm_90 GPU, else xla; opaque: a host "
                        "callback custom call, for --hlo)")
    m.add_argument("--no-fused-in-loops", action="store_true",
                   help="set JLORA_FUSED_IN_LOOPS=0 (the fused path then stays off inside lax.scan)")
    m.add_argument("--out", default=None, help="directory for traces and HLO text (default: a temporary one)")
    if p.parse_known_args(argv)[0].tiny:
        p.set_defaults(**TINY)
    a = p.parse_args(argv)
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    a.modes = [v.strip() for v in a.modes.split(",") if v.strip()]
    if a.diff != "auto" and any(len(d.split(",")) != 2 for d in a.diff.split(";")):
        p.error(f"--diff {a.diff!r}: give pairs 'A,B' (several separated by ';'), or 'auto'")
    if bad := [v for v in a.variants if v not in VARIANTS]:
        p.error(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    if bad := [v for v in a.modes if v not in ("unrolled", "scan")]:
        p.error(f"unknown mode(s) {bad}; choose from unrolled, scan")
    if not (a.hlo or a.profile):
        p.error("nothing to do: pass --hlo and/or --profile")
    return a


# ----------------------------------------------------------------------------------------------
# HLO census


_SHAPE = re.compile(r"\b(pred|s4|s8|s16|s32|s64|u4|u8|u16|u32|u64|f8e4m3fn|f8e5m2|bf16|f16|f32|f64|c64|c128)"
                    r"\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8,
          "u64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16}
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s([a-z][a-z0-9\-]*)\((.*)$")
_OPNAME = re.compile(r'op_name="([^"]*)"')
_SOURCE = re.compile(r'source_file="([^"]*)"\s+source_line=(\d+)')


def shape_bytes(type_text: str) -> int:
    """Bytes of an HLO type (a tuple: the sum of its elements)."""
    total = 0.0
    for dt, dims in _SHAPE.findall(type_text):
        total += _BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


@dataclasses.dataclass
class Instr:
    name: str
    type: str
    op: str
    rest: str  # operands and attributes

    def operands(self) -> list[str]:
        """Operand names (the text up to the closing parenthesis of the operand list)."""
        depth, out = 1, []
        for i, ch in enumerate(self.rest):
            depth += ch == "(" or -(ch == ")")
            if depth == 0:
                out = re.findall(r"%([\w.\-]+)", self.rest[:i])
                break
        return out

    def attr(self, key: str) -> str | None:
        m = re.search(rf"\b{key}=%?([\w.\-]+)", self.rest)
        return m.group(1) if m else None

    def where(self) -> str:
        m = _OPNAME.search(self.rest)
        s = _SOURCE.search(self.rest)
        src = f" ({os.path.basename(s.group(1))}:{s.group(2)})" if s else ""
        return (m.group(1) if m else "") + src


def parse_hlo(text: str) -> tuple[dict[str, list[Instr]], str | None]:
    """``({computation: [instructions]}, entry name)`` of an HLO module's text."""
    comps: dict[str, list[Instr]] = {}
    entry, cur = None, None
    for line in text.splitlines():
        line = re.sub(r"/\*.*?\*/", "", line)
        h = _HEADER.match(line)
        if h:
            cur = h.group(2)
            comps[cur] = []
            if h.group(1):
                entry = cur
            continue
        if line.strip() == "}":
            cur = None
            continue
        if cur is None:
            continue
        m = _INSTR.match(line)
        if m:
            comps[cur].append(Instr(m.group(1), m.group(2), m.group(3), m.group(4)))
    return comps, entry


def _trip_count(ins: Instr) -> int | None:
    m = re.search(r'known_trip_count[^0-9]*(\d+)', ins.rest)
    return int(m.group(1)) if m else None


def multiplicities(comps, entry) -> tuple[dict[str, int], set[str], bool]:
    """How often each non-fused computation runs in one execution of ``entry``; the fused
    computations; whether some loop's trip count was unknown (counted once)."""
    fused = set()
    mult: dict[str, int] = collections.defaultdict(int)
    unknown = False
    if entry is None:
        return {}, fused, unknown
    for instrs in comps.values():
        for ins in instrs:
            if ins.op == "fusion" and ins.attr("calls"):
                fused.add(ins.attr("calls"))
    stack = [(entry, 1)]
    while stack:
        comp, times = stack.pop()
        mult[comp] += times
        for ins in comps.get(comp, []):
            if ins.op == "while":
                n = _trip_count(ins)
                unknown |= n is None
                for key in ("body", "condition"):
                    if ins.attr(key):
                        stack.append((ins.attr(key), times * (n or 1)))
            elif ins.op in ("call", "async-start") and (ins.attr("to_apply") or ins.attr("calls")):
                stack.append((ins.attr("to_apply") or ins.attr("calls"), times))
            elif ins.op == "conditional":
                branches = re.search(r"branch_computations=\{([^}]*)\}", ins.rest)
                for c in re.findall(r"%?([\w.\-]+)", branches.group(1) if branches else ""):
                    stack.append((c, times))
    return dict(mult), fused, unknown


CATEGORIES = ("custom-call", "copy", "transpose", "dynamic-slice", "dynamic-update-slice", "all-gather")


def hlo_census(text: str, top: int = 10) -> dict:
    """Per category: executed count and bytes per step (ops in loop bodies × trip counts), static
    count, and the largest executed items ``(bytes × times, times, op name, where)``.

    Top-level ops count as they are; a fusion counts in every category of the ops inside it (a
    dynamic-slice feeding a transpose and a copy counts three times), with those ops' bytes: the
    result for copy/transpose/dynamic-slice/all-gather, the update for dynamic-update-slice."""
    comps, entry = parse_hlo(text)
    mult, fused, unknown = multiplicities(comps, entry)
    types = {ins.name: ins.type for instrs in comps.values() for ins in instrs}
    out = {c: {"n": 0, "bytes": 0, "static": 0, "items": []} for c in CATEGORIES}
    targets: collections.Counter = collections.Counter()

    def add(cat, nbytes, times, ins, label):
        row = out[cat]
        row["n"] += times
        row["bytes"] += nbytes * times
        row["static"] += 1
        row["items"].append((nbytes * times, times, label, ins.where() or outer.where()))

    outer = Instr("", "", "", "")  # the fusion being visited: its metadata stands for its ops'

    def visit(ins: Instr, times: int, label: str):
        op = ins.op
        if op == "custom-call":
            t = re.search(r'custom_call_target="([^"]*)"', ins.rest)
            targets[t.group(1) if t else "?"] += times
            add("custom-call", shape_bytes(ins.type), times, ins, f"{label} {t.group(1) if t else ''}")
        elif op in ("copy", "copy-start"):
            add("copy", shape_bytes(ins.type) // (2 if op == "copy-start" else 1), times, ins, label)
        elif op == "transpose":
            add("transpose", shape_bytes(ins.type), times, ins, label)
        elif op == "dynamic-slice":
            add("dynamic-slice", shape_bytes(ins.type), times, ins, label)
        elif op == "dynamic-update-slice":
            ops = ins.operands()
            upd = shape_bytes(types.get(ops[1], "")) if len(ops) > 1 else 0
            add("dynamic-update-slice", upd, times, ins, label)
        elif op in ("all-gather", "all-gather-start"):
            shapes = _SHAPE.findall(ins.type)
            if op == "all-gather-start":
                shapes = shapes[len(shapes) // 2:]
            nbytes = int(sum(_BYTES[d] * math.prod(int(x) for x in s.split(",") if x) for d, s in shapes))
            add("all-gather", nbytes, times, ins, label)

    def visit_fused(ins: Instr, times: int, label: str, depth: int = 0):
        for inner in comps[ins.attr("calls")]:
            if inner.op == "fusion" and inner.attr("calls") in comps and depth < 4:  # nested (GPU)
                visit_fused(inner, times, f"{label}/{inner.name}", depth + 1)
            else:
                visit(inner, times, f"{label}/{inner.name}")

    for comp, times in mult.items():
        for ins in comps.get(comp, []):
            outer = ins
            if ins.op == "fusion" and ins.attr("calls") in comps:
                visit_fused(ins, times, ins.name)
            else:
                visit(ins, times, ins.name)
    for row in out.values():
        row["items"] = sorted(row["items"], key=lambda t: -t[0])[:top]
    loops = []  # per loop body, one iteration: (body, trips, {category: (count, bytes)})
    for comp, times in mult.items():
        for ins in comps.get(comp, []):
            if ins.op == "while" and ins.attr("body") in comps:
                one = hlo_census_of(comps, types, [ins.attr("body")])
                loops.append((ins.attr("body"), _trip_count(ins), one))
    return {"categories": out, "custom_call_targets": dict(targets), "unknown_trip_count": unknown,
            "while_loops": len(loops), "loops": loops}


def hlo_census_of(comps, types, names) -> dict[str, tuple[int, int]]:
    """``{category: (count, bytes)}`` of the ops in computations ``names`` (one run of each, fusions
    looked into, nested loops not)."""
    res = {c: [0, 0] for c in CATEGORIES}
    for comp in names:
        for ins in comps.get(comp, []):
            inner, todo = [], [ins]
            while todo:  # fusions looked into, nested ones too
                i = todo.pop()
                if i.op == "fusion" and i.attr("calls") in comps:
                    todo.extend(comps[i.attr("calls")])
                else:
                    inner.append(i)
            for i in inner:
                cat = {"copy-start": "copy", "all-gather-start": "all-gather"}.get(i.op, i.op)
                if cat not in res:
                    continue
                if cat == "dynamic-update-slice":
                    ops = i.operands()
                    nbytes = shape_bytes(types.get(ops[1], "")) if len(ops) > 1 else 0
                else:
                    nbytes = shape_bytes(i.type) // (2 if i.op.endswith("-start") else 1)
                res[cat][0] += 1
                res[cat][1] += nbytes
    return {c: tuple(v) for c, v in res.items()}


def fmt_bytes(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def print_census_table(census: dict[str, dict]) -> None:
    print("\n## HLO census (per step: executed count, bytes; loop bodies × trip count)\n")
    print("| step | " + " | ".join(CATEGORIES) + " |")
    print("| --- |" + " ---: |" * len(CATEGORIES))
    for name, c in census.items():
        cells = [f"{c['categories'][k]['n']} / {fmt_bytes(c['categories'][k]['bytes'])}" for k in CATEGORIES]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nLoop bodies, one iteration each (count / bytes):\n")
    print("| step | body | trips | " + " | ".join(CATEGORIES) + " |")
    print("| --- | --- | ---: |" + " ---: |" * len(CATEGORIES))
    for name, c in census.items():
        for body, trips, one in c["loops"]:
            cells = [f"{one[k][0]} / {fmt_bytes(one[k][1])}" for k in CATEGORIES]
            print(f"| {name} | {body[:40]} | {trips if trips is not None else '?'} | " + " | ".join(cells) + " |")
    for name, c in census.items():
        print(f"\n{name}: custom-call targets {c['custom_call_targets']}; while loops {c['while_loops']}"
              + ("; some trip count unknown (counted once)" if c["unknown_trip_count"] else ""))
        for cat in ("copy", "transpose", "dynamic-slice", "dynamic-update-slice", "all-gather"):
            items = c["categories"][cat]["items"]
            if items:
                print(f"  largest {cat}:")
                for nbytes, times, label, where in items[:8]:
                    print(f"    {fmt_bytes(nbytes):>10}  ×{times:<4} {label}  {where[:150]}")


# ----------------------------------------------------------------------------------------------
# Trace aggregation


def find_trace(log_dir: str) -> str | None:
    """The newest Chrome-trace JSON (gzip) JAX wrote under ``log_dir``."""
    files = (glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "perfetto_trace.json.gz"))
             or glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "*.trace.json.gz")))
    return max(files, key=os.path.getmtime) if files else None


_KINDS = (
    ("fused LoRA kernel", re.compile(r"jlora_fused_matmul|mosaic", re.I)),  # _fused.py names the kernel
    ("attention", re.compile(r"cudnn|flash|fmha|sdpa|attention", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|cublas|xmma|cutlass|triton_gemm|matmul|ynn_fusion|\bdot", re.I)),
    ("dynamic-update-slice", re.compile(r"dynamic.update.slice|dynamic_update_slice", re.I)),
    ("dynamic-slice", re.compile(r"dynamic.slice", re.I)),
    ("transpose", re.compile(r"transpose", re.I)),
    ("copy/memcpy", re.compile(r"copy|memcpy|memset", re.I)),
    ("collective", re.compile(r"nccl|all.gather|all.reduce|reduce.scatter", re.I)),
    ("reduction", re.compile(r"reduce|reduction", re.I)),
)


def kernel_kind(name: str) -> str:
    for kind, pat in _KINDS:
        if pat.search(name):
            return kind
    return "other (elementwise/loop fusions, ...)"


def base_name(name: str) -> str:
    """A kernel name without the numbering that differs between compilations (``fusion.12`` →
    ``fusion``, ``loop_add_fusion_3`` → ``loop_add_fusion``)."""
    prev = None
    while prev != name:
        prev, name = name, re.sub(r"(?:[._]\d+|\.clone)$", "", name)
    return name


def trace_events(path: str) -> tuple[list[dict], bool, list[str]]:
    """``(events, device, processes)``: a Chrome trace's kernel events, whether they are the
    device's, and the names of the trace's processes.

    Device events are those of a process named ``/device:...`` on lines named ``Stream ...`` (the
    GPU's kernels and copies), or else on its ``XLA Ops`` line. Without any, the host threads'
    events other than Python's are returned instead (a CPU run), with ``device`` False."""
    return _device_events(_read_trace(path))


def _read_trace(path: str) -> list[dict]:
    with gzip.open(path, "rt") as fh:
        trace = json.load(fh)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def _device_events(events: list[dict]) -> tuple[list[dict], bool, list[str]]:
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e.get("pid")] = str(e.get("args", {}).get("name", ""))
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e.get("pid"), e.get("tid"))] = str(e.get("args", {}).get("name", ""))
    dev_pids = {pid for pid, n in procs.items() if n.startswith("/device:")}
    line = lambda e: threads.get((e.get("pid"), e.get("tid")), "")
    on_device = [e for e in events if e.get("ph") == "X" and e.get("pid") in dev_pids]
    # the GPU's own lines ("Stream #N ...": kernels, copies); else the derived "XLA Ops" line
    picked = [e for e in on_device if line(e).startswith("Stream")] or \
        [e for e in on_device if line(e) == "XLA Ops"]
    device = bool(picked)
    if not device:  # a CPU trace: XLA's thunks run on the host's worker threads
        picked = [e for e in events if e.get("ph") == "X" and e.get("pid") not in dev_pids
                  and not threads.get((e.get("pid"), e.get("tid")), "").startswith("python")
                  and not str(e.get("name", "")).startswith(("ThreadpoolListener", "ThunkExecutor", "end: "))]
    return picked, device, sorted(set(procs.values()))


def aggregate_trace(path: str, steps: int) -> dict:
    """Per-step device kernel time by kernel name and kind, and the busy time (interval union), of
    :func:`trace_events`' events (``device: False`` for a CPU run's host events)."""
    picked, device, processes = trace_events(path)
    by_name: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    intervals = []
    for e in picked:
        dur = float(e.get("dur", 0.0))
        name = str(e.get("name", "?"))
        by_name[name] += dur
        calls[name] += 1
        ts = float(e.get("ts", 0.0))
        intervals.append((ts, ts + dur))
    busy, end = 0.0, -math.inf
    for s, t in sorted(intervals):
        if t > end:
            busy += t - max(s, end)
            end = t
    per = 1e-3 / max(steps, 1)  # µs in the trace → ms per step
    kinds: collections.Counter = collections.Counter()
    bases: collections.Counter = collections.Counter()
    for n, us in by_name.items():
        kinds[kernel_kind(n)] += us * per
        bases[base_name(n)] += us * per
    return {"device": device, "events": len(picked), "busy_ms": busy * per,
            "total_ms": sum(by_name.values()) * per,
            "by_name": {n: (us * per, calls[n] / max(steps, 1)) for n, us in by_name.items()},
            "by_base": dict(bases), "by_kind": dict(kinds), "path": path,
            "processes": processes}


def host_timeline(path: str, top: int = 12) -> dict:
    """The host's share of the profiled steps (a GPU trace): for each launch of the step's executable
    (a host event named ``...LoadedExecutable::Execute``), the delay until the first device kernel
    after it; the idle gaps between device kernels inside steps (a step's kernels end where the next
    launch begins); and the host events that take the most time per launch (Python flattening of the
    arguments, the runtime's argument handling, graph launch). Empty where there is no device line."""
    events = _read_trace(path)
    dev, on_device, _ = _device_events(events)
    if not on_device:
        return {}
    dev_pids = {e.get("pid") for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and str(e.get("args", {}).get("name", "")).startswith("/device:")}
    host = [e for e in events if e.get("ph") == "X" and e.get("pid") not in dev_pids]
    launches = sorted(float(e["ts"]) for e in host if str(e.get("name", "")).endswith("LoadedExecutable::Execute")
                      and not str(e.get("name", "")).startswith("PjRtCApi"))
    if not launches:
        return {}
    dev = sorted(dev, key=lambda e: float(e["ts"]))
    starts = [float(e["ts"]) for e in dev]
    delays, gaps = [], 0.0
    for i, t in enumerate(launches):
        nxt = launches[i + 1] if i + 1 < len(launches) else math.inf
        step = [e for e, ts in zip(dev, starts) if t <= ts < nxt]
        if not step:
            continue
        delays.append((float(step[0]["ts"]) - t) / 1e3)
        end = float(step[0]["ts"])
        for e in step:
            ts = float(e["ts"])
            gaps += max(0.0, ts - end)
            end = max(end, ts + float(e.get("dur", 0.0)))
    per_name: collections.Counter = collections.Counter()
    for e in host:
        per_name[base_name(str(e.get("name", "?")))[:80]] += float(e.get("dur", 0.0))
    n = max(len(launches), 1)
    return {"launches": len(launches), "first_kernel_delay_ms": delays,
            "gaps_ms_per_step": gaps / 1e3 / max(len(delays), 1),
            "host_top": [(k, us / 1e3 / n) for k, us in per_name.most_common(top)]}


def print_host(name: str, tl: dict) -> None:
    if not tl:
        print(f"\n## {name}: no host timeline (no device kernels or no executable launch in the trace)")
        return
    d = ", ".join(f"{x:.2f}" for x in tl["first_kernel_delay_ms"])
    print(f"\n## {name}: host side, {tl['launches']} launches\n")
    print(f"launch → first device kernel: {d} ms; idle gaps between kernels inside a step: "
          f"{tl['gaps_ms_per_step']:.3f} ms/step")
    print("\n| host event (nested events overlap; under the profiler Python runs slower) | ms per launch |\n"
          "| --- | ---: |")
    for k, ms in tl["host_top"]:
        print(f"| {k} | {ms:.3f} |")


def print_profile(name: str, agg: dict, top: int) -> None:
    print(f"\n## {name}: kernel time per step ({agg['path']})\n")
    if not agg["events"]:
        print(f"no events in the trace (processes: {agg['processes']})")
        return
    if not agg["device"]:
        print(f"no device events in the trace (processes: {agg['processes']}): host threads' events instead "
              f"(a CPU run; they overlap, so the busy time is the wall time some thread was busy)")
    print(f"busy {agg['busy_ms']:.3f} ms/step (union of intervals); sum of kernel times {agg['total_ms']:.3f} ms/step; "
          f"{agg['events']} events\n")
    print("| kind | ms/step |\n| --- | ---: |")
    for k, ms in sorted(agg["by_kind"].items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {ms:.3f} |")
    print(f"\n| kernel (top {top}) | ms/step | calls/step |\n| --- | ---: | ---: |")
    for n, (ms, c) in sorted(agg["by_name"].items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"| {n[:110]} | {ms:.3f} | {c:g} |")


def print_diff(a_name: str, a: dict, b_name: str, b: dict, top: int) -> None:
    print(f"\n## diff: {a_name} − {b_name} (ms per step)\n")
    print(f"busy: {a['busy_ms']:.3f} − {b['busy_ms']:.3f} = {a['busy_ms'] - b['busy_ms']:+.3f} ms; "
          f"sum of kernels: {a['total_ms']:.3f} − {b['total_ms']:.3f} = {a['total_ms'] - b['total_ms']:+.3f} ms\n")
    for title, key in (("kind", "by_kind"), ("kernel name without its number", "by_base")):
        names = set(a[key]) | set(b[key])
        rows = sorted(((n, a[key].get(n, 0.0), b[key].get(n, 0.0)) for n in names), key=lambda r: -abs(r[1] - r[2]))
        print(f"| {title} | {a_name} | {b_name} | Δ |\n| --- | ---: | ---: | ---: |")
        for n, x, y in rows[:top]:
            print(f"| {n[:100]} | {x:.3f} | {y:.3f} | {x - y:+.3f} |")
        print()


# ----------------------------------------------------------------------------------------------
# The steps


def install_stand_in(kind: str) -> str:
    """Replace the fused kernel's call where it cannot run (or when asked); returns what ran."""
    import jax
    import numpy as np

    from jlora import _fused

    if kind == "auto":
        kind = "none" if _fused.unavailable() is None else "xla"
    if kind == "none":
        return f"the Mosaic GPU kernel ({_fused.unavailable() or 'available'})"

    def jnp_call(x, w, u, v, *, tiles, w_t=False, v_t=None):  # the plain-XLA form of the same call
        v = v.T if w_t and v_t is False else v  # (r, N) handed to a w_t call: the XLA form wants (N, r)
        return _fused._local_plus_low_rank(x, w, u, v, impl="xla", tiles=tiles, w_t=w_t)

    def host(x, w, u, v, *, w_t, v_t):
        f = lambda t: np.asarray(t, np.float32)
        return (f(x) @ (f(w).T if w_t else f(w)) + f(u) @ (f(v).T if v_t else f(v))).astype(x.dtype)

    def opaque_call(x, w, u, v, *, tiles, w_t=False, v_t=None):
        out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0] if w_t else w.shape[1]), x.dtype)
        return jax.pure_callback(functools.partial(host, w_t=w_t, v_t=w_t if v_t is None else v_t),
                                 out, x, w, u, v)

    _fused.unavailable = lambda: None
    _fused._mosaic_call = jnp_call if kind == "xla" else opaque_call
    _fused.clear_caches()
    return {"xla": "stand-in: plain jnp in place of the kernel call",
            "opaque": "stand-in: a host callback (an opaque custom call) in place of the kernel call"}[kind]


def build_mode(a, mode: str):
    """lora_step.py's config, params, tokens and injected jlora params for one layout."""
    import lora_step as L

    la = argparse.Namespace(d=a.d, layers=a.layers, heads=a.heads, ffn=a.ffn, vocab=a.vocab, seq=a.seq,
                            batch=a.batch, rank=a.rank, alpha=a.alpha, attn=a.attn, scan=mode == "scan",
                            variants=list(a.variants), jlora_fuse=False, b_init=1e-2)
    c, env, params, tokens, extra = L._setup(la)
    status: dict[str, str] = {}
    jl = L._inject_variants(la, c, params, tokens, extra, status)
    pairs = L._shared_pairs(la, c, jl, extra, status)
    return la, c, params, tokens, jl, pairs, status


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.no_fused_in_loops:
        os.environ["JLORA_FUSED_IN_LOOPS"] = "0"
    import jax
    import optax

    import lora_step as L

    out_dir = a.out or os.path.join("/tmp", f"profile_step_{os.getpid()}")
    os.makedirs(out_dir, exist_ok=True)
    what = install_stand_in(a.stand_in)
    print(f"# profile_step  jax {jax.__version__}  {jax.default_backend()}:{jax.devices()[0].device_kind}; "
          f"fused path: {what}; JLORA_FUSED_IN_LOOPS={os.environ.get('JLORA_FUSED_IN_LOOPS', '')}; out {out_dir}",
          flush=True)
    tx = optax.adamw(1e-4)
    census: dict[str, dict] = {}
    profiles: dict[str, dict] = {}
    hosts: dict[str, dict] = {}
    runs_first: dict[str, Any] = {}
    failed = []
    for mode in a.modes:
        la, c, params, tokens, jl, pairs, status = build_mode(a, mode)
        for v in a.variants:
            key = f"{mode}:{v}"
            if v in status:
                print(f"{key}: {status[v]}", flush=True)
                failed.append(key)
                continue
            try:
                run = L._build(v, c, tx, params, pairs, jl)
                L.compile_run(run, tokens)
                rep = jl[v][1].fused_report if v in jl else None
                r = run.res
                print(f"{key}: trace {r['trace_s']:.2f} s, lower {r['lower_s']:.2f} s, compile {r['compile_s']:.2f} s"
                      + (f"; {rep}".replace("\n", " ") if rep is not None else ""), flush=True)
                if a.hlo:
                    text = run.compiled.as_text()
                    with open(os.path.join(out_dir, f"{mode}_{v}.hlo.txt"), "w") as fh:
                        fh.write(text)
                    census[key] = hlo_census(text)
                if a.profile:
                    L.first_step(run, tokens)
                    runs_first[key] = run
                    L.call(run, tokens)  # warm-up
                    log_dir = os.path.join(out_dir, f"trace_{mode}_{v}")
                    t0 = time.perf_counter()
                    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
                        for _ in range(a.steps):
                            L.call(run, tokens)
                    path = find_trace(log_dir)
                    if path is None:
                        print(f"{key}: the profiler wrote no trace under {log_dir}", flush=True)
                    else:
                        profiles[key] = aggregate_trace(path, a.steps)
                        if a.host:
                            hosts[key] = host_timeline(path)
                        print(f"{key}: profiled {a.steps} steps in {time.perf_counter() - t0:.1f} s", flush=True)
                # free the device memory before the next variant (the first step's loss and grads stay)
                run.compiled, run.state, run.const, run.step, run.apply = None, None, None, None, None
            except Exception as e:  # one variant's failure must not lose the others' numbers
                failed.append(key)
                print(f"{key}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            gc.collect()
        # the first step of each jlora variant against plain jlora's (same adapters): the fused path is correct
        ref = runs_first.get(f"{mode}:jlora")
        for v in ("jlora_fused",):
            got = runs_first.get(f"{mode}:{v}")
            if ref is not None and got is not None:
                ch = L.check_against(got, ref, 5e-2)
                print(f"{mode}:{v} first step vs {mode}:jlora: {L.fmt_check(ch)}", flush=True)
                if not ch["ok"]:
                    failed.append(f"{mode}:{v} check")
        del params, jl, pairs
        gc.collect()
    if census:
        print_census_table(census)
    for key, agg in profiles.items():
        print_profile(key, agg, a.top)
        if key in hosts:
            print_host(key, hosts[key])
    if profiles:
        pairs_ = ([tuple(d.split(",")) for d in a.diff.split(";")] if a.diff != "auto"
                  else [(f"{m}:jlora_fused", f"{m}:jlora") for m in a.modes])
        if a.diff == "auto" and len(a.modes) > 1:
            pairs_ += [("scan:jlora", "unrolled:jlora")] if "jlora" in a.variants else []
        for x, y in pairs_:
            if x in profiles and y in profiles:
                print_diff(x, profiles[x], y, profiles[y], a.top)
    with open(os.path.join(out_dir, "summary.json"), "w") as fh:
        json.dump({"census": census, "profiles": {k: {kk: vv for kk, vv in p.items() if kk != "by_name"}
                                                   for k, p in profiles.items()}}, fh, indent=1, default=str)
    if failed:
        print(f"FAILED: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
