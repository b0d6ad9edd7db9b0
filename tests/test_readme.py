"""The README's quickstart runs as written, and stays short."""

import pathlib
import re

import jax.numpy as jnp
import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _block(section: str) -> str:
    text = README.read_text()
    body = text.split(f"## {section}", 1)[1]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def test_quickstart_runs_and_is_short():
    code = _block("Quickstart")
    assert len(code.strip().splitlines()) <= 22  # ≤ 15 lines of code plus blank lines
    ns: dict = {}
    exec(compile(code, str(README), "exec"), ns)
    params, merged, x = ns["params"], ns["merged"], ns["x"]
    # the trained adapters moved, and the merged model computes what apply computes
    np.testing.assert_allclose(ns["apply"](params, x), ns["model"].apply(merged, x), rtol=1e-5, atol=1e-5)
    assert np.isfinite(float(ns["loss"]))
