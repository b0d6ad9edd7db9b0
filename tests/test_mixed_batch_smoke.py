"""Smoke test of benchmarks/mixed_batch.py at a tiny shape on the CPU (jlora and the PEFT subprocess):
every row is printed and measured, the JSON holds every variant, and the built-in checks pass.
Nothing here asserts a timing. Compiles with LLVM optimisations off, as test_benchmarks_smoke.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "mixed_batch.py")
TINY = ["--d", "64", "--layers", "2", "--heads", "4", "--ffn", "128", "--vocab", "256", "--rank", "4",
        "--prefill-seq", "16", "--prefill-batch", "2", "--decode-batch", "4", "--decode-ctx", "8", "--bank", "4",
        "--distinct", "1,2,4", "--steps", "2", "--warmup", "0"]


def test_mixed_batch_benchmark_smoke(tmp_path):
    pytest.importorskip("peft")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0 "
                        "--xla_cpu_use_fusion_emitters=false").strip()
    out = tmp_path / "mixed.json"
    proc = subprocess.run([sys.executable, SCRIPT, *TINY, "--json", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    log = f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, log
    res = json.loads(out.read_text())
    want = {"prefill": ["base", "one", "mixed1", "mixed2"], "decode": ["base", "one", "mixed1", "mixed2", "mixed4"]}
    from jlora._rules.compute import mixed_form

    other = lambda rows: "gather" if mixed_form(rows, 4) == "dense" else "dense"  # noqa: E731  (bank 4)
    forced = {"prefill": f"mixed2-{other(16)}", "decode": f"mixed4-{other(1)}"}  # jlora only: the other form
    for who in ("jlora", "peft"):
        for mode, variants in want.items():
            got = res[who]["results"][mode]["variants"]
            if who == "jlora":
                variants = variants + [forced[mode]]
            assert list(got) == variants, (who, mode, list(got))
            for v in variants:
                assert got[v]["ms"] > 0 and got[v]["x_one"] > 0, (who, mode, v)
                row = re.search(rf"^\| {'jlora' if who == 'jlora' else 'PEFT'} \| {mode} \| {v} \|.*$", proc.stdout, re.M)
                assert row, f"no table row for {who} {mode} {v}\n{log}"
    jl = res["jlora"]["results"]
    assert jl["prefill"]["variants"]["mixed1"]["check_vs_one"] < 1e-2  # the same adapter through the bank
    assert jl["decode"]["variants"]["mixed1"]["check_vs_one"] < 1e-2
    assert jl["prefill"]["variants"]["mixed2"]["check_row_vs_one"] < 1e-2  # a row with its own adapter
    assert jl["decode"]["variants"]["mixed4"]["distinct"] == 4
    for mode, name in forced.items():  # both forms give the same logits
        assert jl[mode]["variants"][name]["check_vs_auto"] < 1e-2, (mode, name)
    assert res["jlora"]["env"]["jax"] and res["peft"]["env"]["peft"]
