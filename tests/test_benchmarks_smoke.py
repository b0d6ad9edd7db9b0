"""Smoke tests of the benchmarks at tiny shapes on the CPU: lora_step.py prints every row,
fused_matmul.py and sharded_step.py (8 simulated devices, in its own process) run.

Nothing here asserts a timing. lora_step.py's two configurations (layers as a Python list, and ``--scan``)
run as two concurrent subprocesses. XLA:CPU compile time dominates at this size, so the
subprocesses compile with LLVM optimisations off (``--xla_backend_optimization_level=0``) and
without the new CPU fusion emitters, which cuts that time by about two thirds.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "lora_step.py")
TINY = ["--d", "64", "--layers", "2", "--heads", "4", "--ffn", "128", "--vocab", "256", "--seq", "32",
        "--batch", "2", "--rank", "4", "--steps", "2", "--warmup", "0"]
VARIANTS = ("floor", "handwritten", "merged", "full", "jlora", "jlora_f32", "jlora_fused")
JLORA_VARIANTS = ("jlora", "jlora_f32", "jlora_fused")
CONFIGS = {"list": [], "scan": ["--scan"]}
FAST_CPU_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def _run(extra: list[str], json_path: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + FAST_CPU_COMPILE).strip()
    return subprocess.run(
        [sys.executable, SCRIPT, *TINY, *extra, "--json", json_path],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    with concurrent.futures.ThreadPoolExecutor(len(CONFIGS)) as pool:
        futs = {name: (pool.submit(_run, extra, str(out / f"{name}.json")), out / f"{name}.json")
                for name, extra in CONFIGS.items()}
        return {name: (f.result(), path) for name, (f, path) in futs.items()}


def _row(stdout: str, variant: str) -> str | None:
    for line in stdout.splitlines():
        if line.startswith(f"| {variant} |"):
            return line
    return None


@pytest.mark.parametrize("config", list(CONFIGS))
def test_lora_step_runs_every_variant(runs, config):
    proc, json_path = runs[config]
    log = f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    for v in VARIANTS:
        row = _row(proc.stdout, v)
        assert row is not None, f"no table row for {v}\n{log}"
        # a measured row: trace, lower, compile seconds then a median step time, all numbers
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(re.fullmatch(r"[\d.,]+", c) for c in cells[1:5]), f"{v} did not run: {row}\n{log}"
    assert proc.returncode == 0, f"lora_step.py exited {proc.returncode}\n{log}"

    res = json.loads(json_path.read_text())
    assert res["env"]["jax"] and res["env"]["device_kind"] and res["env"]["date"]
    for v in ("handwritten", "merged", "full"):
        assert res["results"][v]["status"] == "ok"
        assert res["results"][v]["step_ms"] > 0 and res["results"][v]["pipelined_ms"] > 0
    # floor and full run the unadapted model: the same loss
    for v in ("floor", "full", *JLORA_VARIANTS, "merged"):
        assert res["results"][v]["check"]["ok"], (v, res["results"][v]["check"])


def test_fused_matmul_smoke(tmp_path):
    """fused_matmul.py at a tiny shape with the custom VJP in plain jnp (the kernel needs sm_90)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = tmp_path / "fused.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "fused_matmul.py"), "--impl", "xla", "--m", "128",
         "--shapes", "256x512", "--tiles", "default", "--iters", "1", "--reps", "1", "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"base", "xla", "fused[default]"}
    for v in ("xla", "fused[default]"):  # against the float32 reference x·W0 + s·(x·A)·B
        assert rows[v]["err_fwd"] < 1e-2 and rows[v]["err_bwd"] < 1e-2, rows[v]
        assert rows[v]["fwd_ms"] > 0 and rows[v]["fwdbwd_ms"] > 0


def test_sharded_benchmark_smoke():
    """benchmarks/sharded_step.py, FSDP on 8 simulated CPU devices (its own process), one tiny unrolled layer."""
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"  # compile fast
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "sharded_step.py"), "--mode", "fsdp", "--tiny",
           "--no-scan", "--layers", "1", "--steps", "2", "--warmup", "1"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "devices 8" in r.stdout and "tokens/s/device" in r.stdout and "memory/device" in r.stdout, r.stdout
    assert "A ('fsdp', None), B (None, None)" in r.stdout, r.stdout  # adapters follow the FSDP kernels


def test_profile_step_smoke(tmp_path):
    """benchmarks/profile_step.py at a tiny scanned shape on the CPU: the HLO census and the profile
    (host events: no device line on a CPU) of plain and fused steps, the fused one inside lax.scan
    with the kernel call replaced by plain jnp, and the diff between them."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_CPU_COMPILE)
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "profile_step.py"), "--tiny", "--layers", "1",
           "--modes", "scan", "--variants", "jlora,jlora_fused", "--hlo", "--profile", "--steps", "1",
           "--top", "5", "--out", str(tmp_path)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = r.stdout[-6000:] + r.stderr[-3000:]
    assert r.returncode == 0, log
    assert "7 of 7 adapted matmuls fused" in r.stdout, log  # taken inside the scan (the default)
    assert "first step vs scan:jlora: ok" in r.stdout, log
    for row in ("| scan:jlora |", "| scan:jlora_fused |"):
        assert row in r.stdout, log
    assert "no device events in the trace" in r.stdout, log
    assert "## diff: scan:jlora_fused − scan:jlora" in r.stdout, log
    assert (tmp_path / "scan_jlora_fused.hlo.txt").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["census"]) == {"scan:jlora", "scan:jlora_fused"}


def test_kernel_launches_smoke():
    """benchmarks/kernel_launches.py at the tiny scanned shape on the CPU: it builds, compiles and
    profiles both variants, and says that a CPU trace has no GPU kernels to list."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_CPU_COMPILE)
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "kernel_launches.py"), "--tiny", "--layers", "1"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = r.stdout[-4000:] + r.stderr[-3000:]
    assert r.returncode == 0, log
    for v in ("jlora_fused", "jlora"):
        assert f"== {v}: 0 device events in one step" in r.stdout, log
    assert r.stdout.count("no GPU kernels in the trace") == 2, log


def test_fused_wt_check_smoke():
    """benchmarks/fused_wt_check.py on the CPU: it imports, and says why the kernel cannot run."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "fused_wt_check.py")]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "the kernel cannot run here: no sm_90 GPU" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("scan", [False, True])
def test_qwix_step_smoke(scan):
    """benchmarks/qwix_step.py at its tiny shape on the CPU, unrolled and scanned: every variant runs,
    and qwix's first loss and adapter gradients (from the same A and a random B) agree with jlora's."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_CPU_COMPILE)
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "qwix_step.py"), "--tiny", "--steps", "2",
           "--warmup", "0", "--b-init", "0.01"] + (["--scan"] if scan else [])
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = r.stdout[-5000:] + r.stderr[-3000:]
    assert r.returncode == 0, log
    for v in ("floor", "qwix", "qwix_nnx", "jlora", "jlora_fused"):
        assert f"| {v} |" in r.stdout, log
    for v in ("qwix", "qwix_nnx"):
        row = next(line for line in r.stdout.splitlines() if line.startswith(f"| {v} |"))
        assert row.rstrip(" |").split("| ")[-1].startswith("ok (loss"), log


def test_hlo_census_counts_loop_bodies_by_trip_count():
    """profile_step.hlo_census: an op in a scan body counts once per iteration, with its bytes."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import jax
    import jax.numpy as jnp
    from profile_step import hlo_census

    def f(ws, x):  # per layer: a stacked residual of the tanh output, written by dynamic-update-slice
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0].sum()

    text = jax.jit(jax.grad(f)).lower(jnp.ones((5, 16, 16)), jnp.ones((4, 16))).compile().as_text()
    c = hlo_census(text)
    fwd = [one for _, trips, one in c["loops"] if trips == 5 and one["dynamic-update-slice"][0]]
    assert fwd, c["loops"]
    dus = c["categories"]["dynamic-update-slice"]
    assert dus["n"] >= 5 and dus["n"] % 5 == 0 and dus["bytes"] >= 5 * 4 * 16 * 4, dus


# ----------------------------------------------------------------------------------------------
# llama_step.py (jlora.models.llama at a named shape) and unsloth_step.py.

LLAMA_SCRIPT = os.path.join(REPO, "benchmarks", "llama_step.py")
LLAMA_TINY_VARIANTS = ("floor-unroll-none-plain", "lora-unroll-none-plain", "lora-unroll-none-chunk",
                       "floor-scan-auto-chunk", "lora-scan-none-plain", "lora-scan-auto-chunk",
                       "lora-scan-full-chunk", "lora-scan-attention-chunk-mb2", "qlora-scan-full-chunk")


def _cpu_env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + FAST_CPU_COMPILE).strip()
    return env


def test_llama_step_tiny(tmp_path):
    """Every kind of variant (floor, LoRA, QLoRA over layer-by-layer NF4 stacks; unrolled and
    scanned; remat none/auto/full; plain and chunked loss) runs and reports its row."""
    out = tmp_path / "llama.json"
    proc = subprocess.run([sys.executable, LLAMA_SCRIPT, "--shape", "tiny", "--steps", "1", "--warmup", "0",
                           "--json", str(out)], cwd=REPO, env=_cpu_env(), capture_output=True, text=True, timeout=900)
    log = f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, log
    for v in LLAMA_TINY_VARIANTS:
        row = _row(proc.stdout, v)
        assert row is not None, f"no table row for {v}\n{log}"
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(re.fullmatch(r"[\d.,]+", c) for c in cells[1:6]), f"{v} did not run: {row}\n{log}"
    res = json.loads(out.read_text())
    assert set(res["results"]) == set(LLAMA_TINY_VARIANTS)
    for v, row in res["results"].items():
        assert row["status"] == "ok" and row["step_ms"] > 0 and row["mfu"] > 0, (v, row)
        assert row["cudnn_fmha_calls"] == 0 and row["attention"] == "xla"  # CPU: XLA's attention
    assert res["results"]["lora-scan-auto-chunk"]["remat_policy"] == "dots"
    assert res["extra"]["first_loss_check"]["dense"]["ok"], res["extra"]["first_loss_check"]
    assert res["extra"]["attention"]["default_implementation"] == "xla"
    assert res["extra"]["attention"]["forced_cudnn"] != "ok"  # no cuDNN here: reported, not fatal
    assert "first-loss check (dense): ok" in proc.stdout


def test_llama_step_microbatches_give_the_whole_batch_gradient(monkeypatch):
    """llama_step.value_and_grad over M microbatches equals jax.value_and_grad of the whole batch's
    masked mean (a toy loss), with masks of unequal weight per microbatch and an all-padding one."""
    monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
    # importing llama_step sets XLA_PYTHON_CLIENT_MEM_FRACTION if unset: undone after the test
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
    import jax
    import jax.numpy as jnp
    import numpy as np
    from llama_step import Variant, value_and_grad

    def loss_of(p, tokens, labels, mask):  # a masked mean, as the model's losses are
        nll = jnp.tanh(tokens.astype(jnp.float32) @ p["w"] + p["b"] * labels) ** 2
        return jnp.sum(nll * mask) / jnp.sum(mask)

    rng = np.random.default_rng(0)
    p = {"w": jnp.asarray(rng.normal(size=(6, 6)), jnp.float32), "b": jnp.asarray(0.3, jnp.float32)}
    tokens = jnp.asarray(rng.integers(0, 5, (8, 6)), jnp.int32)
    labels = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
    mask = jnp.asarray(rng.random((8, 6)) < 0.7, jnp.float32).at[0].set(0.0).at[1, :2].set(1.0)
    want_loss, want = jax.value_and_grad(loss_of)(p, tokens, labels, mask)
    for m in (2, 4, 8):
        got_loss, got = jax.jit(value_and_grad(loss_of, m))(p, tokens, labels, mask)
        assert abs(float(got_loss) - float(want_loss)) < 1e-5, m
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    assert Variant.parse("lora-scan-attention-chunk-mb8").microbatches == 8
    with pytest.raises(ValueError, match="mbM"):
        Variant.parse("lora-scan-attention-chunk-mb0")


def test_llama_step_find_batch(tmp_path):
    out = tmp_path / "fb.json"
    proc = subprocess.run([sys.executable, LLAMA_SCRIPT, "--shape", "tiny", "--variants", "lora-scan-full-chunk",
                           "--find-batch", "4,2", "--json", str(out)],
                          cwd=REPO, env=_cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(out.read_text())["largest"] == 4
    assert "batch 4: fits" in proc.stdout


def test_unsloth_step_needs_cuda_and_runs_its_peft_row_on_cpu(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    script = os.path.join(REPO, "benchmarks", "unsloth_step.py")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, script, "--shape", "tiny"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr, proc.stdout + proc.stderr
    out = tmp_path / "u.json"
    proc = subprocess.run([sys.executable, script, "--shape", "tiny", "--device", "cpu", "--variants", "peft",
                           "--steps", "1", "--warmup", "0", "--grad-accum", "1,2", "--json", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    row = res["peft"]
    assert row["status"] == "ok" and row["batch"] == 2 and row["trainable"] == 2 * 16 * (
        (64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)  # r 16 on 7 projections of 2 layers
    # two microbatches of one row: their summed gradient is the one-pass gradient of the same batch
    ga = res["peft-ga2"]
    assert ga["status"] == "ok" and ga["grad_accum"] == 2 and ga["grad_rel_err"] < 1e-4, ga
    assert row["grad_rel_err"] is None


def test_dora_step_smoke(tmp_path):
    """benchmarks/dora_step.py at a tiny shape: PEFT's DoRA (subprocess), floor, jlora LoRA and DoRA
    steps, and every init's one-off cost, with a table row each and the JSON record."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + FAST_CPU_COMPILE).strip()
    out = tmp_path / "dora.json"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "dora_step.py"), *TINY[:-4], "--steps", "2", "--warmup", "0",
           "--init-d", "64", "--init-kv", "32", "--init-ffn", "128", "--init-layers", "2", "--init-rank", "4",
           "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    for row in ("floor", "jlora", "jlora_dora", "peft_dora_eager", "pissa", "pissa_niter_4", "olora", "loftq",
                "dora_magnitude"):
        assert _row(proc.stdout, row) is not None, f"no row for {row}\n{log}"
    res = json.loads(out.read_text())
    assert res["steps"]["jlora_dora"]["check_ok"] and res["steps"]["jlora"]["check_ok"]
    assert res["steps"]["peft_dora_eager"]["step_ms"] > 0 and res["extra"]["dora_over_lora"] > 0
    assert all(r["model_s"] > 0 for r in res["inits"].values())


def test_decode_profile_smoke():
    """benchmarks/decode_profile.py with a tiny model on the CPU: both steps run and are timed, the
    census has a row for each, and the profile (host events on a CPU) gives the dense − one diff."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_CPU_COMPILE)
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "decode_profile.py"), "--tiny"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = r.stdout[-6000:] + r.stderr[-3000:]
    assert r.returncode == 0, log
    assert re.search(r"^one: median [0-9.]+ ms$", r.stdout, re.M) and re.search(r"^dense: median", r.stdout, re.M), log
    assert "| one |" in r.stdout and "| dense |" in r.stdout, log
    assert "## diff: dense − one" in r.stdout, log


def test_host_timeline_of_a_gpu_shaped_trace(tmp_path):
    """profile_step.host_timeline on a hand-made trace in the GPU profiler's shape: each launch's delay
    to its first kernel, the idle gaps between kernels inside a step, and the host events per launch."""
    import gzip
    import json

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from profile_step import host_timeline

    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "thread_name", "pid": 2, "tid": 7, "args": {"name": "Stream #1(Compute)"}}]
    host = [{"ph": "X", "pid": 1, "tid": 1, "name": "[0] PjRtStreamExecutorRawLoadedExecutable::Execute",
             "ts": t, "dur": 50} for t in (0, 1000)]
    host += [{"ph": "X", "pid": 1, "tid": 1, "name": "PjRtCApiLoadedExecutable::Execute", "ts": t, "dur": 60}
             for t in (0, 1000)]  # the C API's wrapper of the same launch: not a second one
    dev = [{"ph": "X", "pid": 2, "tid": 7, "name": n, "ts": ts, "dur": d}
           for n, ts, d in (("gemm_1", 100, 200), ("fusion_2", 305, 195), ("gemm_1", 1200, 200))]
    path = tmp_path / "t.trace.json.gz"
    with gzip.open(path, "wt") as fh:
        json.dump({"traceEvents": meta + host + dev}, fh)
    tl = host_timeline(str(path))
    assert tl["launches"] == 2
    assert tl["first_kernel_delay_ms"] == pytest.approx([0.1, 0.2])
    assert tl["gaps_ms_per_step"] == pytest.approx(0.005 / 2)
    assert dict(tl["host_top"])["PjRtCApiLoadedExecutable::Execute"] == pytest.approx(0.06)


def test_fused_parts_smoke():
    """fused_parts.py at a tiny shape on the CPU (the kernel call in its plain-XLA form): every part is
    timed, and both kernel calls and the one-pass dy products (in Pallas' interpreter) match their float32
    references."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "fused_parts.py"), "--m", "256", "--shapes", "256x512",
         "--calls", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("OK"), log
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| part")]
    assert len([r for r in rows if "---" not in r]) == 12, log
    assert proc.stdout.count("rel. error") == 4, log  # the two kernel calls and the one-pass products
