"""The README's quickstart runs as written, and stays short."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _block(section: str) -> str:
    text = README.read_text()
    body = text.split(f"## {section}", 1)[1]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def test_quickstart_runs_and_is_short():
    code = _block("Quickstart")
    assert len([line for line in code.splitlines() if line.strip()]) <= 15  # blank lines not counted
    ns: dict = {}
    exec(compile(code, str(README), "exec"), ns)
    params, merged, x, apply, model = ns["params"], ns["merged"], ns["x"], ns["apply"], ns["model"]
    # the trained adapters moved, and the merged model computes what apply computes
    assert not np.allclose(apply(params, x), model.apply(ns["variables"], x))
    np.testing.assert_allclose(apply(params, x), model.apply(merged, x), rtol=1e-5, atol=1e-5)
    assert np.isfinite(float(ns["loss"]))
