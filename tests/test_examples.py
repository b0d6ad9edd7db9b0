"""The demo and the notebook on the real SmolLM2-135M (CPU; a few steps)."""

import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytest.importorskip("flax")
pytestmark = pytest.mark.usefixtures("gguf_path")  # skips without the SmolLM2 GGUF file


def test_demo_short_run_writes_files_and_loss_falls(tmp_path, smollm2_scanned):
    sys.path.insert(0, str(ROOT / "examples"))
    import finetune_smollm2

    out = tmp_path / "demo"
    result = finetune_smollm2.main(["--steps", "6", "--batch", "4", "--eval-size", "4", "--out", str(out)])
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "adapter" / "config" / "jlora_config.json").is_file()
    # the merged model, written for serving beside the adapter
    assert result["merged"] == str(out / "merged") and result["gguf"] == str(out / "smollm2-dates.gguf")
    assert (out / "merged" / "config.json").is_file() and (out / "merged" / "tokenizer.json").is_file()
    assert (out / "smollm2-dates.gguf").stat().st_size > 200e6  # 135M params in f16
    saved = json.loads((out / "result.json").read_text())
    assert saved == {k: v for k, v in result.items() if k not in ("params", "apply")}
    assert result["losses"][-1] < 0.5 * result["losses"][0]
    # the saved adapter loads back onto the base as exactly the trained params
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jlora
    from jlora.models.llama import Llama

    cfg, variables, _ = smollm2_scanned
    restored = jlora.load_adapters(out / "adapter", variables)
    trained, apply = result["params"], result["apply"]
    want, got = jlora.split(trained)[0], jlora.split(restored)[0]
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    tokens = jnp.asarray([[1, 2, 3, 4]])
    y = apply(restored, tokens)
    np.testing.assert_array_equal(y, apply(trained, tokens))
    assert not np.allclose(y, Llama(cfg).apply(variables, tokens))  # the adapter changes the model


def test_notebook_executes():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "adapted 2 kernels" in text  # q_proj and v_proj, each a stack of 30 layers
