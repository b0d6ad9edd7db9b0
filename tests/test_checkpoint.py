"""save_adapters / load_adapters / TrainCheckpointer (Orbax)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora import Layout, LoraKernel, Trainable
from jlora._checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    TrainCheckpointer,
    load_adapters,
    save_adapters,
)

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# A small tree with every kind of adapter: 2-D, stacked (scan), multi-axis, bf16, Trainable.
# ------------------------------------------------------------------------------------------------
def _base(seed: int = 0) -> dict:
    r = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)
    return {
        "params": {
            "dense": {"kernel": f(6, 5), "bias": jnp.zeros(5)},
            "layers": {"attn": {"kernel": f(3, 6, 4)}},  # stacked: (L, in, out)
            "query": {"kernel": f(6, 2, 4)},  # (D, heads, head_dim): in=(0,), out=(1, 2)
            "bf16": {"kernel": f(5, 7).astype(jnp.bfloat16)},
            "norm": {"scale": jnp.ones(5)},
        }
    }


def _inject(base: dict, seed: int = 1) -> dict:
    r = np.random.default_rng(seed)
    f = lambda *s, dt=jnp.float32: jnp.asarray(r.standard_normal(s), dt)
    p = jax.tree.map(lambda x: x, base)
    q = p["params"]
    q["dense"]["kernel"] = LoraKernel(
        q["dense"]["kernel"], f(6, 2), f(2, 5), layout=Layout((), (0,), (1,)), scale=2.0, dropout=0.1
    )
    q["layers"]["attn"]["kernel"] = LoraKernel(
        q["layers"]["attn"]["kernel"], f(3, 6, 4), f(3, 4, 4), layout=Layout((0,), (1,), (2,)), scale=0.5
    )
    q["query"]["kernel"] = LoraKernel(
        q["query"]["kernel"], f(6, 3), f(3, 2, 4), layout=Layout((), (0,), (1, 2)), scale=1.0
    )
    q["bf16"]["kernel"] = LoraKernel(
        q["bf16"]["kernel"], f(5, 2, dt=jnp.bfloat16), f(2, 7, dt=jnp.bfloat16),
        layout=Layout((), (0,), (1,)), scale=4.0,
    )
    q["norm"]["scale"] = Trainable(f(5))
    return p


def _nodes(params):
    return dict(jlora._tree.iter_kernels(params))


def _assert_same_adapters(got, want):
    g, w = _nodes(got), _nodes(want)
    assert sorted(g) == sorted(w)
    for path in w:
        if isinstance(w[path], LoraKernel):
            assert isinstance(g[path], LoraKernel), path
            assert g[path].layout == w[path].layout
            assert g[path].scale == w[path].scale and g[path].dropout == w[path].dropout
            for name in ("w0", "a", "b"):
                x, y = getattr(g[path], name), getattr(w[path], name)
                assert x.dtype == y.dtype, (path, name)
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        else:
            assert isinstance(g[path], Trainable), path
            np.testing.assert_array_equal(np.asarray(g[path].value), np.asarray(w[path].value))


# ------------------------------------------------------------------------------------------------
def test_roundtrip_over_plain_base(tmp_path):
    base = _base()
    params = _inject(base)
    out = save_adapters(tmp_path / "ck", params, metadata={"step": 7, "note": "hi"})
    assert out == (tmp_path / "ck").absolute()
    restored = load_adapters(tmp_path / "ck", base)
    _assert_same_adapters(restored, params)
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    # The restored adapters act as W0 + s·A·B with the saved A, B and scale (written out by hand),
    # which differs from the base (the test is not vacuous).
    k = params["params"]["dense"]["kernel"]
    w0 = np.asarray(base["params"]["dense"]["kernel"])
    want = w0 + 2.0 * np.asarray(k.a) @ np.asarray(k.b)
    got = np.asarray(jlora.merge(restored)["params"]["dense"]["kernel"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, w0)


def test_directory_contents_and_config(tmp_path):
    params = _inject(_base())
    save_adapters(tmp_path / "ck", params, metadata={"step": 7})
    names = set(os.listdir(tmp_path / "ck"))
    assert {"adapters", "config", "_CHECKPOINT_METADATA"} <= names
    assert os.listdir(tmp_path) == ["ck"]  # no temporary siblings left behind
    cfg = json.loads((tmp_path / "ck" / "config" / "jlora_config.json").read_text())
    assert cfg["format"] == "jlora-adapters"
    assert cfg["format_version"] == 1  # plain LoRA stays in format 1 (older jlora reads it); DoRA etc. write 2
    assert cfg["jlora_version"] == jlora.__version__
    assert cfg["metadata"] == {"step": 7}
    dense = cfg["adapters"]["params/dense/kernel"]
    assert dense["kind"] == "lora"
    assert dense["layout"] == {"stack": [], "in": [0], "out": [1]}
    assert (dense["rank"], dense["scale"], dense["dropout"], dense["dtype"]) == (2, 2.0, 0.1, "float32")
    assert cfg["adapters"]["params/layers/attn/kernel"]["layout"] == {"stack": [0], "in": [1], "out": [2]}
    assert cfg["adapters"]["params/bf16/kernel"]["dtype"] == "bfloat16"
    assert cfg["adapters"]["params/norm/scale"]["kind"] == "full"
    assert cfg["base_fingerprint"]["params/bf16/kernel"] == {"shape": [5, 7], "dtype": "bfloat16"}
    assert cfg["base_fingerprint"]["params/layers/attn/kernel"] == {"shape": [3, 6, 4], "dtype": "float32"}
    # Only trainable leaves are stored: A, B and the Trainable value, keyed by path.
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointer().metadata(tmp_path / "ck" / "adapters")
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    assert sorted(tree) == sorted(
        [f"params/{k}/kernel/{ab}" for k in ("dense", "layers/attn", "query", "bf16") for ab in "ab"]
        + ["params/norm/scale/value"]
    )


def test_load_over_injected_base_replaces_adapters(tmp_path):
    base = _base()
    saved = _inject(base, seed=1)
    # Drop one adapter from what is saved; the injected base still has it.
    saved_minus = jax.tree.map(lambda x: x, saved, is_leaf=lambda x: isinstance(x, LoraKernel))
    saved_minus["params"]["query"]["kernel"] = base["params"]["query"]["kernel"]
    save_adapters(tmp_path / "ck", saved_minus)
    other = _inject(base, seed=5)
    restored = load_adapters(tmp_path / "ck", other)
    _assert_same_adapters(restored, saved_minus)
    assert not isinstance(restored["params"]["query"]["kernel"], LoraKernel)


def test_refuses_existing_unless_overwrite(tmp_path):
    base = _base()
    save_adapters(tmp_path / "ck", _inject(base, 1))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_adapters(tmp_path / "ck", _inject(base, 2))
    _assert_same_adapters(load_adapters(tmp_path / "ck", base), _inject(base, 1))
    save_adapters(tmp_path / "ck", _inject(base, 2), overwrite=True)
    _assert_same_adapters(load_adapters(tmp_path / "ck", base), _inject(base, 2))
    assert os.listdir(tmp_path) == ["ck"]
    # An existing empty directory holds nothing to lose.
    (tmp_path / "empty").mkdir()
    save_adapters(tmp_path / "empty", _inject(base, 3))
    _assert_same_adapters(load_adapters(tmp_path / "empty", base), _inject(base, 3))


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    from jlora import _checkpoint as C

    real = C._composite_checkpointer

    class Failing:
        def __init__(self):
            self.inner = real()

        def save(self, path, args):
            self.inner.save(path, args=args)  # a complete write into the temporary directory...
            raise OSError("disk full")  # ...and then a failure before the rename

        def close(self):
            self.inner.close()

    base = _base()
    save_adapters(tmp_path / "ck", _inject(base, 1))
    monkeypatch.setattr(C, "_composite_checkpointer", Failing)
    with pytest.raises(OSError, match="disk full"):
        save_adapters(tmp_path / "ck", _inject(base, 2), overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        save_adapters(tmp_path / "new", _inject(base, 2))
    assert os.listdir(tmp_path) == ["ck"]
    monkeypatch.undo()
    _assert_same_adapters(load_adapters(tmp_path / "ck", base), _inject(base, 1))


def test_no_adapters_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no adapters"):
        save_adapters(tmp_path / "ck", _base())
    assert not (tmp_path / "ck").exists()


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        save_adapters(tmp_path / "ck", _inject(_base()), metadata={"x": object()})
    assert not (tmp_path / "ck").exists()


# ------------------------------------------------------------------------------------------------
# Refusals, each naming the first mismatch.
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    base = _base()
    d = tmp_path / "ck"
    save_adapters(d, _inject(base))
    return d, base


def test_path_missing_in_base(saved):
    d, base = saved
    del base["params"]["query"]
    with pytest.raises(CheckpointError, match=r"'params/query/kernel' is not in base"):
        load_adapters(d, base)


def test_shape_mismatch(saved):
    d, base = saved
    base["params"]["dense"]["kernel"] = jnp.zeros((6, 6))
    with pytest.raises(CheckpointError, match=r"'params/dense/kernel' has shape \(6, 6\).*\(6, 5\)"):
        load_adapters(d, base)


def test_dtype_mismatch(saved):
    d, base = saved
    base["params"]["bf16"]["kernel"] = base["params"]["bf16"]["kernel"].astype(jnp.float32)
    with pytest.raises(CheckpointError, match=r"'params/bf16/kernel' has dtype float32.*bfloat16"):
        load_adapters(d, base)


def test_trainable_shape_mismatch(saved):
    d, base = saved
    base["params"]["norm"]["scale"] = jnp.ones(4)
    with pytest.raises(CheckpointError, match=r"'params/norm/scale' has shape \(4,\)"):
        load_adapters(d, base)


def test_newer_format_version(saved):
    d, base = saved
    f = d / "config" / "jlora_config.json"
    cfg = json.loads(f.read_text())
    cfg["format_version"] = FORMAT_VERSION + 1
    cfg["jlora_version"] = "99.0"
    f.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"jlora 99.0 in format version {FORMAT_VERSION + 1}.*Upgrade"):
        load_adapters(d, base)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        load_adapters(tmp_path / "nope", _base())


def test_missing_config(saved):
    d, base = saved
    (d / "config" / "jlora_config.json").unlink()
    with pytest.raises(CheckpointError, match="jlora_config.json is missing"):
        load_adapters(d, base)


def test_corrupt_config(saved):
    d, base = saved
    (d / "config" / "jlora_config.json").write_text('{"format": "jlora-adapters", "format_')
    with pytest.raises(CheckpointError, match="corrupt"):
        load_adapters(d, base)


def test_missing_arrays(saved):
    import shutil

    d, base = saved
    shutil.rmtree(d / "adapters")
    with pytest.raises(CheckpointError, match="adapters/ is missing"):
        load_adapters(d, base)


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_corrupt_arrays(saved, how):
    d, base = saved
    files = [p for p in (d / "adapters").rglob("*") if p.is_file() and p.stat().st_size > 0]
    data = [p for p in files if p.parent.name == "d"]  # OCDBT data files
    assert data
    for p in data:
        b = bytearray(p.read_bytes())
        if how == "truncate":
            b = b[: len(b) // 2]
        else:
            for i in range(len(b) // 3, len(b), 7):
                b[i] ^= 0x5A
        p.write_bytes(bytes(b))
    # TensorStore notices unreadable files before the digests are compared.
    with pytest.raises(CheckpointError, match=r"adapters could not be read \(missing or corrupt files\)"):
        load_adapters(d, base)


def test_wrong_arrays_fail_the_digest_check(tmp_path):
    """Readable arrays of the right shapes that are not the ones saved (another checkpoint's files
    copied in) are caught by the sha256 in the config."""
    import shutil

    base = _base()
    save_adapters(tmp_path / "one", _inject(base, seed=1))
    save_adapters(tmp_path / "two", _inject(base, seed=2))
    shutil.rmtree(tmp_path / "one" / "adapters")
    shutil.copytree(tmp_path / "two" / "adapters", tmp_path / "one" / "adapters")
    _assert_same_adapters(load_adapters(tmp_path / "two", base), _inject(base, seed=2))  # readable
    with pytest.raises(CheckpointError, match=r"array '.*' is corrupt \(its sha256 does not match the config\)"):
        load_adapters(tmp_path / "one", base)


# ------------------------------------------------------------------------------------------------
# Crash safety: SIGKILL a writer midway; the previous checkpoint must still load.
# ------------------------------------------------------------------------------------------------
_WRITER = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np, jax.numpy as jnp
    from jlora import _atomic as A, _checkpoint as C
    from jlora import Layout, LoraKernel, Trainable

    directory, seed, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
    from crash_tree import big_tree
    params = big_tree(seed, adapters=True)
    if mode == "before_commit":
        def hang(*a, **k):
            print("COMMIT", flush=True)
            time.sleep(1000)
        A.commit = hang
    elif mode == "between_renames":
        A.exchange = lambda a, b: False   # as on a platform without renameat2
        real = os.rename
        def rename(a, b):
            real(a, b)
            if ".jlora-old-" in os.fspath(b):  # the old checkpoint was just moved aside
                print("RENAMED", flush=True)
                time.sleep(1000)
        A.os.rename = rename
    print("START", flush=True)
    C.save_adapters(directory, params, overwrite=True)
    print("DONE", flush=True)
    """
)

_TREE = textwrap.dedent(
    """
    import numpy as np, jax.numpy as jnp
    from jlora import Layout, LoraKernel, Trainable

    def big_tree(seed, adapters):
        # ~100 MB of trainable leaves, so that the write takes a while.
        r = np.random.default_rng(seed)
        p = {}
        for i in range(24):
            v = jnp.asarray(r.standard_normal((1024, 1024), dtype=np.float32))
            p[f"block_{i}"] = {"w": Trainable(v) if adapters else jnp.zeros((1024, 1024))}
        w0 = jnp.zeros((64, 32))
        p["dense"] = {"kernel": LoraKernel(w0, jnp.full((64, 4), float(seed)), jnp.ones((4, 32)),
                                           layout=Layout((), (0,), (1,)), scale=1.0)
                      if adapters else w0}
        return p
    """
)


def _big_tree(tmp_path):
    """``big_tree(seed, adapters)`` of _TREE, also written to ``tmp_path`` for the writer process."""
    (tmp_path / "crash_tree.py").write_text(_TREE)
    namespace = {}
    exec(_TREE, namespace)
    return namespace["big_tree"]


def _spawn(tmp_path, directory, seed, mode):
    """The writer process (after ``_big_tree(tmp_path)``), saving ``big_tree(seed)`` to ``directory``."""
    (tmp_path / "writer.py").write_text(_WRITER)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, str(tmp_path / "writer.py"), str(directory), str(seed), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def _wait_for(proc, word, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"writer exited before {word!r} (rc={proc.poll()})")
        if line.strip() == word:
            return
    raise AssertionError(f"writer did not reach {word!r}")


def _partial_data(work: Path) -> bool:
    for entry in os.listdir(work):
        if entry.startswith(".ckpt.jlora-tmp-"):
            for root, _, files in os.walk(work / entry):
                if any(os.path.getsize(os.path.join(root, f)) > 0 for f in files if Path(root).name == "d"):
                    return True
    return False


def _kill_after(proc, wait):
    """SIGKILL the writer once ``wait()`` returns; it must have died of it, before finishing."""
    try:
        wait()
        proc.kill()  # SIGKILL
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert "DONE" not in proc.stdout.read()


def _old_ok(directory, big_tree):
    """``directory`` holds the previous checkpoint, ``big_tree(0)``."""
    got = load_adapters(directory, big_tree(0, adapters=False))
    want = big_tree(0, adapters=True)
    np.testing.assert_array_equal(got["dense"]["kernel"].a, want["dense"]["kernel"].a)
    for i in (0, 23):
        np.testing.assert_array_equal(got[f"block_{i}"]["w"].value, want[f"block_{i}"]["w"].value)


@pytest.mark.parametrize("mode", ["during_write", "before_commit"])
def test_sigkill_midway_keeps_previous_checkpoint(tmp_path, mode):
    work = tmp_path / "work"
    work.mkdir()
    target = work / "ckpt"
    # The previous checkpoint (seed 0), written normally.
    big_tree = _big_tree(tmp_path)
    save_adapters(target, big_tree(0, adapters=True))

    def during_write():
        _wait_for(proc, "START")
        # Kill as soon as array data has started to land in the temporary directory, i.e.
        # while Orbax is writing into it.
        t0 = time.time()
        while not _partial_data(work):
            assert proc.poll() is None and time.time() - t0 < 60, "writer finished or stalled"
            time.sleep(0.001)

    proc = _spawn(tmp_path, target, 1, "plain" if mode == "during_write" else mode)
    _kill_after(proc, during_write if mode == "during_write" else lambda: _wait_for(proc, "COMMIT"))

    # The previous checkpoint is intact, and nothing half-written is visible under the name.
    _old_ok(target, big_tree)
    visible = [n for n in os.listdir(work) if not n.startswith(".")]
    assert visible == ["ckpt"]
    leftovers = [n for n in os.listdir(work) if n.startswith(".")]
    assert all(n.startswith(".ckpt.jlora-tmp-") for n in leftovers)
    if mode == "before_commit":
        assert leftovers  # the complete-but-uncommitted new checkpoint was never renamed in

    # The next save to the same directory removes the dead writer's leftovers.
    save_adapters(target, big_tree(2, adapters=True), overwrite=True)
    assert os.listdir(work) == ["ckpt"]
    got = load_adapters(target, big_tree(2, adapters=False))
    np.testing.assert_array_equal(got["dense"]["kernel"].a, big_tree(2, adapters=True)["dense"]["kernel"].a)


def test_sigkill_between_fallback_renames_recovers_old(tmp_path):
    """Without RENAME_EXCHANGE an overwrite is two renames; a kill between them leaves the old
    checkpoint aside, and load_adapters finds it."""
    work = tmp_path / "work"
    work.mkdir()
    target = work / "ckpt"
    big_tree = _big_tree(tmp_path)
    save_adapters(target, big_tree(0, adapters=True))
    proc = _spawn(tmp_path, target, 1, "between_renames")
    _kill_after(proc, lambda: _wait_for(proc, "RENAMED"))
    assert not target.exists()
    with pytest.warns(UserWarning, match="interrupted overwrite"):
        _old_ok(target, big_tree)
    save_adapters(target, big_tree(2, adapters=True))
    assert os.listdir(work) == ["ckpt"]



def test_recovery_never_reads_another_checkpoints_backup(tmp_path):
    """A missing checkpoint whose name has glob characters is not "recovered" from another one's
    moved-aside backup (``run[1]`` matched ``.run1.jlora-old-*`` before)."""
    from jlora import _atomic as A

    backup = tmp_path / ".run1.jlora-old-abc"
    backup.mkdir()
    (backup / "f").write_text("run1")
    with pytest.raises(FileNotFoundError, match=r"run\[1\]"):
        A.resolve(tmp_path / "run[1]")
    with pytest.warns(UserWarning, match="interrupted overwrite"):
        assert A.resolve(tmp_path / "run1") == backup

def test_overwrite_uses_atomic_exchange_on_linux(tmp_path, monkeypatch):
    if sys.platform != "linux":
        pytest.skip("renameat2 is Linux-only")
    from jlora import _atomic as A

    results = []
    real = A.exchange

    def exchange(a, b):
        results.append(real(a, b))
        return results[-1]

    monkeypatch.setattr(A, "exchange", exchange)
    base = _base()
    save_adapters(tmp_path / "ck", _inject(base, 1))
    save_adapters(tmp_path / "ck", _inject(base, 2), overwrite=True)
    assert results == [True]  # renameat2 swapped them (False would be the two-rename fallback)
    _assert_same_adapters(load_adapters(tmp_path / "ck", base), _inject(base, 2))


# ------------------------------------------------------------------------------------------------
# Training-loop checkpoints: an interrupted run resumes bitwise.
# ------------------------------------------------------------------------------------------------
def _tiny_problem():
    r = np.random.default_rng(0)
    base = {
        "l1": {"kernel": jnp.asarray(r.standard_normal((8, 16)) / 3, jnp.float32), "bias": jnp.zeros(16)},
        "l2": {"kernel": jnp.asarray(r.standard_normal((16, 3)) / 4, jnp.float32)},
    }
    batches = [
        (jnp.asarray(r.standard_normal((32, 8)), jnp.float32), jnp.asarray(r.standard_normal((32, 3)), jnp.float32))
        for _ in range(6)
    ]
    return base, batches


def _model(p, x):
    h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
    return h @ p["l2"]["kernel"]


def _fresh_params(base, seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    p = jax.tree.map(lambda x: x, base)
    p["l1"]["kernel"] = LoraKernel(base["l1"]["kernel"], jax.random.normal(k1, (8, 4)) * 0.1,
                                   jnp.zeros((4, 16)), layout=Layout((), (0,), (1,)), scale=2.0)
    p["l2"]["kernel"] = LoraKernel(base["l2"]["kernel"], jax.random.normal(k2, (16, 2)) * 0.1,
                                   jnp.zeros((2, 3)), layout=Layout((), (0,), (1,)), scale=0.5)
    p["l1"]["bias"] = Trainable(base["l1"]["bias"])
    return p


def _make_step(tx):
    def loss_fn(p, x, y):
        forward = jlora.merge(p)  # the reference forward until jlora.inject's apply is used
        return jnp.mean((_model(forward, x) - y) ** 2)

    @jax.jit
    def step(p, opt_state, x, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        updates, opt_state = tx.update(g, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    return step


def test_resume_from_step_3_is_bitwise(tmp_path):
    base, batches = _tiny_problem()

    # Uninterrupted run, checkpointing every 3 steps.
    params = _fresh_params(base, 0)
    tx = jlora.optimizer(optax.adam(3e-2), params)
    opt_state = tx.init(params)
    step = _make_step(tx)
    losses = []
    with TrainCheckpointer(tmp_path / "run", every=3, keep=5) as ckpt:
        for i in range(1, 7):
            params, opt_state, loss = step(params, opt_state, *batches[i - 1])
            losses.append(np.asarray(loss))
            wrote = ckpt.save(i, params, opt_state)
            assert wrote == (i % 3 == 0)
        assert ckpt.all_steps() == [3, 6]
    # It trains: the 6 steps lower the loss over all the batches.
    total = lambda p: sum(float(jnp.mean((_model(jlora.merge(p), x) - y) ** 2)) for x, y in batches)
    assert total(params) < total(_fresh_params(base, 0))
    w0 = params["l1"]["kernel"].w0
    np.testing.assert_array_equal(w0, base["l1"]["kernel"])  # frozen stays frozen

    # A fresh process: new checkpointer object, new adapters (different seed), new optimizer.
    fresh = _fresh_params(base, 123)
    tx2 = jlora.optimizer(optax.adam(3e-2), fresh)
    with TrainCheckpointer(tmp_path / "run", every=3, keep=5) as ckpt2:
        assert ckpt2.latest_step() == 6
        restored = ckpt2.restore(base, tx2.init(fresh), step=3)
    assert restored.step == 3
    p2, s2 = restored.params, restored.opt_state
    step2 = _make_step(tx2)
    resumed = []
    for i in range(4, 7):
        p2, s2, loss = step2(p2, s2, *batches[i - 1])
        resumed.append(np.asarray(loss))
    for i, (a, b) in enumerate(zip(losses[3:], resumed), start=4):
        assert a.tobytes() == b.tobytes(), f"step {i}: {a!r} != {b!r}"
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), p2, params)


def test_train_checkpointer_keeps_last_k_and_restores_latest(tmp_path):
    base, batches = _tiny_problem()
    params = _fresh_params(base, 0)
    tx = jlora.optimizer(optax.adam(1e-2), params)
    # The state after real updates (every moment nonzero, count 2), not tx.init's zeros.
    step = _make_step(tx)
    p, opt_state, _ = step(params, tx.init(params), *batches[0])
    _, opt_state, _ = step(p, opt_state, *batches[1])
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), opt_state, tx.init(params))
    assert all(jax.tree.leaves(moved))
    with TrainCheckpointer(tmp_path / "run", every=1, keep=2) as ckpt:
        for i in range(1, 6):
            p = jax.tree.map(lambda x: x, params, is_leaf=lambda x: isinstance(x, LoraKernel))
            k = p["l2"]["kernel"]
            p["l2"]["kernel"] = LoraKernel(k.w0, k.a, k.b + i, layout=k.layout, scale=k.scale)
            ckpt.save(i, p, opt_state)
        assert ckpt.all_steps() == [4, 5]
        got = ckpt.restore(base, tx.init(params))  # restored into a fresh state
        assert got.step == 5
        np.testing.assert_array_equal(got.params["l2"]["kernel"].b, np.full((2, 3), 5.0))
        assert jax.tree.structure(got.opt_state) == jax.tree.structure(opt_state)
        jax.tree.map(np.testing.assert_array_equal, got.opt_state, opt_state)
        # Adapters only.
        assert ckpt.restore(base).opt_state is None
    # Each step directory is complete and self-describing.
    cfg = json.loads((tmp_path / "run" / "5" / "config" / "jlora_config.json").read_text())
    assert cfg["step"] == 5 and cfg["format_version"] == 1  # plain LoRA: format 1


def test_train_checkpointer_refuses_mismatched_opt_state(tmp_path):
    base, _ = _tiny_problem()
    params = _fresh_params(base, 0)
    tx = jlora.optimizer(optax.adam(1e-2), params)
    with TrainCheckpointer(tmp_path / "run") as ckpt:
        ckpt.save(1, params, tx.init(params))
        other = jlora.optimizer(optax.sgd(1e-2, momentum=0.9), params).init(params)
        with pytest.raises(CheckpointError, match="optimizer state has"):
            ckpt.restore(base, other)
        with pytest.raises(FileNotFoundError, match="step 9"):
            ckpt.restore(base, step=9)
    with TrainCheckpointer(tmp_path / "empty") as ckpt:
        with pytest.raises(FileNotFoundError, match="No checkpoint"):
            ckpt.restore(base)


def test_async_train_checkpointer(tmp_path):
    base, _ = _tiny_problem()
    params = _fresh_params(base, 0)
    tx = jlora.optimizer(optax.adam(1e-2), params)
    adapters, frozen = jlora.split(params)

    def at(i):  # params and optimizer state that differ at every step
        state = jax.tree.map(lambda x: x + i, tx.init(params))
        return jlora.combine(jax.tree.map(lambda x: x + i, adapters), frozen), state

    with TrainCheckpointer(tmp_path / "run", every=2, keep=1, async_save=True) as ckpt:
        for i in range(1, 5):
            p, s = at(i)
            ckpt.save(i, p, s)
            # The arrays were copied to host before save returned: freeing them now (as a donating
            # train step would) must not change what is written in the background.
            for x in jax.tree.leaves((jlora.split(p)[0], s)):
                x.delete()
        got = ckpt.restore(base, tx.init(params))
    assert got.step == 4
    want_params, want_state = at(4)
    _assert_same_adapters(got.params, want_params)
    jax.tree.map(np.testing.assert_array_equal, got.opt_state, want_state)


# ------------------------------------------------------------------------------------------------
# With jlora.inject: save, load, and the restored params run in `apply`.
# ------------------------------------------------------------------------------------------------
def test_with_inject_and_apply(tmp_path):
    base, batches = _tiny_problem()
    params, apply = jlora.inject(base, _model, rank=4, key=jax.random.key(0), example_args=(batches[0][0],))
    # Make B nonzero so that the adapters matter.
    params = jax.tree.map(
        lambda x: LoraKernel(x.w0, x.a, x.b + 0.1, layout=x.layout, scale=x.scale, dropout=x.dropout)
        if isinstance(x, LoraKernel) else x,
        params,
        is_leaf=lambda x: isinstance(x, LoraKernel),
    )
    save_adapters(tmp_path / "ck", params)
    restored = load_adapters(tmp_path / "ck", base)
    x = batches[0][0]
    want = _model(jlora.merge(params), x)
    np.testing.assert_allclose(jax.jit(apply)(restored, x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(jax.jit(apply)(restored, x), jax.jit(apply)(params, x))


# ------------------------------------------------------------------------------------------------
# The adapters tree (`jlora.split(params)[0]`) is accepted wherever injected params are.
# ------------------------------------------------------------------------------------------------
def _injected_tiny(seed=0):
    """A tiny model injected by ``jlora.inject``, with random nonzero A and B."""
    base, batches = _tiny_problem()
    x = batches[0][0]
    params, apply = jlora.inject(base, _model, rank=4, key=jax.random.key(seed), example_args=(x,))
    r = np.random.default_rng(seed + 10)
    params = jax.tree.map(
        lambda k: LoraKernel(k.w0, k.a, jnp.asarray(r.standard_normal(k.b.shape), jnp.float32),
                             layout=k.layout, scale=k.scale) if isinstance(k, LoraKernel) else k,
        params,
        is_leaf=lambda k: isinstance(k, LoraKernel),
    )
    return base, params, apply, x


def _check_loaded_tiny(loaded, base, params, apply, x):
    merged = jlora.merge(loaded)
    for name in ("l1", "l2"):
        k = params[name]["kernel"]
        want = np.asarray(base[name]["kernel"]) + k.scale * (np.asarray(k.a) @ np.asarray(k.b))
        np.testing.assert_allclose(np.asarray(merged[name]["kernel"]), want, rtol=1e-5, atol=1e-6)
    got = jax.jit(apply)(loaded, x)
    np.testing.assert_array_equal(got, jax.jit(apply)(params, x))
    assert not np.allclose(got, _model(base, x), atol=1e-3)  # the adapters matter


def test_adapters_tree_roundtrip_save_adapters_and_train_checkpointer(tmp_path):
    base, params, apply, x = _injected_tiny()
    adapters = jlora.split(params)[0]
    save_adapters(tmp_path / "ck", adapters)
    cfg = json.loads((tmp_path / "ck" / "config" / "jlora_config.json").read_text())
    assert cfg["base_fingerprint"]["l1/kernel"] == {"shape": [8, 16], "dtype": None}
    _check_loaded_tiny(load_adapters(tmp_path / "ck", base), base, params, apply, x)

    tx = jlora.optimizer(optax.adam(1e-2), adapters)
    grads = jax.tree.map(jnp.ones_like, adapters)
    _, state = tx.update(grads, tx.init(adapters), adapters)  # a moved state, not tx.init's zeros
    with TrainCheckpointer(tmp_path / "run") as ckpt:
        assert ckpt.save(1, adapters, state)
        got = ckpt.restore(base, tx.init(adapters))
    _check_loaded_tiny(got.params, base, params, apply, x)
    assert jax.tree.structure(got.opt_state) == jax.tree.structure(state)
    jax.tree.map(np.testing.assert_array_equal, got.opt_state, state)


def test_adapters_tree_of_every_kind(tmp_path):
    """Stacked, multi-axis and bf16 kernels and a Trainable: the kernel shape comes from the layout
    and the A/B shapes alone."""
    base = _base()
    params = _inject(base)
    save_adapters(tmp_path / "ck", jlora.split(params)[0])
    cfg = json.loads((tmp_path / "ck" / "config" / "jlora_config.json").read_text())
    for path, want in [("layers/attn", [3, 6, 4]), ("query", [6, 2, 4]), ("bf16", [5, 7])]:
        assert cfg["base_fingerprint"][f"params/{path}/kernel"] == {"shape": want, "dtype": None}
    loaded = load_adapters(tmp_path / "ck", base)
    _assert_same_adapters(loaded, params)
    merged = jlora.merge(loaded)["params"]
    q, s = params["params"], base["params"]
    a, b = np.asarray(q["layers"]["attn"]["kernel"].a), np.asarray(q["layers"]["attn"]["kernel"].b)
    want = np.asarray(s["layers"]["attn"]["kernel"]) + 0.5 * np.stack([a[i] @ b[i] for i in range(3)])
    np.testing.assert_allclose(np.asarray(merged["layers"]["attn"]["kernel"]), want, rtol=1e-5, atol=1e-5)
    a, b = np.asarray(q["query"]["kernel"].a), np.asarray(q["query"]["kernel"].b)
    want = np.asarray(s["query"]["kernel"]) + (a @ b.reshape(3, 8)).reshape(6, 2, 4)
    np.testing.assert_allclose(np.asarray(merged["query"]["kernel"]), want, rtol=1e-5, atol=1e-5)


def test_recorded_dtype_is_still_checked_when_w0_was_present(tmp_path):
    base = _base()
    save_adapters(tmp_path / "ck", _inject(base))  # injected params: the base dtype is recorded
    base["params"]["bf16"]["kernel"] = base["params"]["bf16"]["kernel"].astype(jnp.float32)
    with pytest.raises(CheckpointError, match=r"'params/bf16/kernel' has dtype float32.*bfloat16"):
        load_adapters(tmp_path / "ck", base)


def _k(w0=(6, 5), a=(6, 2), b=(2, 5), scale=1.0, dropout=0.0, dtype=jnp.float32):
    return LoraKernel(None if w0 is None else jnp.zeros(w0), jnp.ones(a, dtype), jnp.ones(b, dtype),
                      layout=Layout((), (0,), (1,)), scale=scale, dropout=dropout)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"w": _k(a=(7, 2))}, r"'w'.*A\(7, 2\) and B\(2, 5\).*\(6, 5\)"),  # A does not fit W0
        ({"w": _k(w0=None, b=(3, 5))}, r"'w'.*A\(6, 2\) and B\(3, 5\)"),  # ranks disagree
        ({"w": _k(scale=float("nan"))}, r"'w'.*scale nan"),
        ({"w": _k(scale=0.0)}, r"'w'.*scale 0.0"),
        ({"w": _k(dropout=1.0)}, r"'w'.*dropout 1.0"),
        ({"w": _k(dtype=jnp.int32)}, r"'w'.*dtype 'int32'"),
        ({"a/b": _k(), "a": {"b": _k()}}, r"'a/b'.*two leaves"),  # one path for two leaves
    ],
    ids=["a-misfit", "rank", "nan-scale", "zero-scale", "dropout", "int-adapter", "same-path"],
)
def test_save_refuses_what_load_would_refuse(tmp_path, params, match):
    with pytest.raises(ValueError, match=match):
        save_adapters(tmp_path / "ck", params)
    with TrainCheckpointer(tmp_path / "run") as ckpt, pytest.raises(ValueError, match=match):
        ckpt.save(1, params)
    assert not (tmp_path / "ck").exists()
    assert not (tmp_path / "run").exists() or os.listdir(tmp_path / "run") == []


# ------------------------------------------------------------------------------------------------
# overwrite=True replaces a checkpoint, never other files.
# ------------------------------------------------------------------------------------------------
def test_overwrite_refuses_a_directory_that_is_not_a_checkpoint(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    (d / "tokenizer.json").write_text("{}")
    (d / "args").mkdir()
    with pytest.raises(FileExistsError, match=r"out.*holds args/, tokenizer.json.*not a jlora checkpoint.*another directory"):
        save_adapters(d, _inject(_base()), overwrite=True)
    assert sorted(os.listdir(d)) == ["args", "tokenizer.json"]
    assert os.listdir(tmp_path) == ["out"]


def test_overwrite_refuses_a_checkpoint_holding_other_files(tmp_path):
    base = _base()
    save_adapters(tmp_path / "ck", _inject(base, 1))
    (tmp_path / "ck" / "tokenizer.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"tokenizer.json"):
        save_adapters(tmp_path / "ck", _inject(base, 2), overwrite=True)
    assert (tmp_path / "ck" / "tokenizer.json").read_text() == "{}"
    _assert_same_adapters(load_adapters(tmp_path / "ck", base), _inject(base, 1))


def test_overwrite_keeps_siblings(tmp_path):
    base = _base()
    run = tmp_path / "run"
    save_adapters(run / "step_1", _inject(base, 1))
    save_adapters(run / "step_2", _inject(base, 2))
    (run / "step_10").mkdir()
    (run / "step_10" / "notes.txt").write_text("mine")
    (run / "tokenizer.json").write_text("{}")
    save_adapters(run / "step_1", _inject(base, 3), overwrite=True)
    assert sorted(os.listdir(run)) == ["step_1", "step_10", "step_2", "tokenizer.json"]
    assert (run / "step_10" / "notes.txt").read_text() == "mine"
    _assert_same_adapters(load_adapters(run / "step_1", base), _inject(base, 3))
    _assert_same_adapters(load_adapters(run / "step_2", base), _inject(base, 2))
    # The parent of checkpoints is not a checkpoint: refused, everything stays.
    with pytest.raises(FileExistsError, match="not a jlora checkpoint"):
        save_adapters(run, _inject(base, 4), overwrite=True)
    assert sorted(os.listdir(run)) == ["step_1", "step_10", "step_2", "tokenizer.json"]


# ------------------------------------------------------------------------------------------------
# A malformed config is a CheckpointError naming the adapter and the field.
# ------------------------------------------------------------------------------------------------
_D = "params/dense/kernel"


def _set(*keys, value):
    def change(cfg):
        node = cfg
        for k in keys[:-1]:
            node = node[k]
        if value is _DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value

    return change


_DELETE = object()


@pytest.mark.parametrize(
    "change, match",
    [
        (_set("adapters", _D, "layout", value=_DELETE), "has no 'layout'"),
        (_set("adapters", _D, "a_shape", value=_DELETE), "has no 'a_shape'"),
        (_set("adapters", _D, "scale", value=_DELETE), "has no 'scale'"),
        (_set("adapters", _D, "kind", value=_DELETE), "has no 'kind'"),
        (_set("adapters", _D, "sha256", value=_DELETE), "has no 'sha256'"),
        (_set("adapters", _D, "scale", value="2"), "scale '2'"),
        (_set("adapters", _D, "scale", value=float("nan")), "scale nan"),
        (_set("adapters", _D, "scale", value=float("inf")), "scale inf"),
        (_set("adapters", _D, "scale", value=-2.0), r"scale -2.0"),
        (_set("adapters", _D, "dropout", value=1.0), "dropout 1.0"),
        (_set("adapters", _D, "dropout", value=-0.1), "dropout -0.1"),
        (_set("adapters", _D, "layout", value={"stack": [], "in": [0], "out": [0]}), "layout"),
        (_set("adapters", _D, "layout", value=[[0], [1]]), "layout"),
        (_set("adapters", _D, "layout", value={"stack": [], "in": [True], "out": [0]}), "layout"),
        (_set("adapters", _D, "rank", value=0), "rank 0"),
        (_set("adapters", _D, "rank", value=True), "rank True"),
        (_set("adapters", _D, "rank", value=3), r"rank 3.*A\(6, 2\)"),
        (_set("adapters", _D, "dtype", value="int32"), "dtype 'int32'"),
        (_set("adapters", _D, "dtype", value="floaty"), "dtype 'floaty'"),
        (_set("adapters", _D, "a_shape", value=[6, 2, 1]), r"A\(6, 2, 1\)"),
        (_set("adapters", _D, "b_shape", value="2x5"), "b_shape '2x5'"),
        (_set("adapters", _D, "kind", value="dora"), "kind 'dora'"),
        (_set("adapters", _D, value=[1, 2]), "not a mapping"),
        (_set("adapters", "params/norm/scale", "shape", value=_DELETE), "has no 'shape'"),
        (_set("base_fingerprint", _D, value=_DELETE), "no base_fingerprint"),
        (_set("base_fingerprint", _D, "shape", value=[6, 6]), r"base_fingerprint shape \[6, 6\].*\(6, 5\)"),
        (_set("base_fingerprint", _D, "dtype", value=7), "base_fingerprint dtype 7"),
    ],
)
def test_malformed_config_is_a_checkpoint_error(saved, change, match):
    d, base = saved
    f = d / "config" / "jlora_config.json"
    cfg = json.loads(f.read_text())
    change(cfg)
    f.write_text(json.dumps(cfg))
    path = "params/norm/scale" if "'shape'" in match else _D
    with pytest.raises(CheckpointError, match=rf"jlora_config.json: adapter '{path}'.*{match}"):
        load_adapters(d, base)


def test_malformed_train_config_is_a_checkpoint_error(tmp_path):
    base, _ = _tiny_problem()
    params = _fresh_params(base, 0)
    tx = jlora.optimizer(optax.adam(1e-2), params)
    with TrainCheckpointer(tmp_path / "run") as ckpt:
        ckpt.save(1, params, tx.init(params))
    f = tmp_path / "run" / "1" / "config" / "jlora_config.json"
    cfg = json.loads(f.read_text())
    cfg["opt_state"]["shapes"] = cfg["opt_state"]["shapes"][:-1]
    f.write_text(json.dumps(cfg))
    with TrainCheckpointer(tmp_path / "run") as ckpt:
        with pytest.raises(CheckpointError, match=r"jlora_config.json: opt_state.*shapes"):
            ckpt.restore(base, tx.init(params))


# ------------------------------------------------------------------------------------------------
# Disk full: a short ENOSPC error, the previous checkpoint intact, nothing left behind.
# ------------------------------------------------------------------------------------------------
# What TensorStore (under Orbax) raises on a full disk (its text, measured on a 64 KiB tmpfs).
_TENSORSTORE_ENOSPC = (
    'RESOURCE_EXHAUSTED: Error writing "w/value/0.0" in OCDBT database at local file "{d}/ocdbt.process_0/": '
    'Failed writing: "{d}/ocdbt.process_0/d/f8f4ab2e962bb1cc5f9052e498b1666d": Failed to write 193355 '
    "bytes to file 14: No space left on device [os_error_code='28']"
)


def _assert_no_space_error(err, directory, code=None):
    import errno

    code = errno.ENOSPC if code is None else code
    assert isinstance(err, OSError) and err.errno == code
    msg = str(err)
    assert os.strerror(code).lower() in msg.lower() and str(directory) in msg
    assert len(msg) < 250 + len(str(directory)), msg
    assert err.__cause__ is not None  # the original, for whoever needs its details


@pytest.mark.parametrize("failure", ["tensorstore", "quota", "oserror"])
def test_disk_full_during_save_adapters(tmp_path, monkeypatch, failure):
    import errno

    from jlora import _checkpoint as C

    real = C._composite_checkpointer
    code = errno.EDQUOT if failure == "quota" else errno.ENOSPC

    class Full:
        def __init__(self):
            self.inner = real()

        def save(self, path, args):
            self.inner.save(path, args=args)  # files written into the temporary directory...
            if failure == "oserror":  # ...then the disk is full (as Python's own writes report it)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            text = _TENSORSTORE_ENOSPC.format(d=path)  # ...as TensorStore reports it
            raise ValueError(text if failure == "tensorstore" else text.replace("No space left on device", os.strerror(code)))

        def close(self):
            self.inner.close()

    base = _base()
    save_adapters(tmp_path / "ck", _inject(base, 1))
    monkeypatch.setattr(C, "_composite_checkpointer", Full)
    with pytest.raises(OSError) as info:
        save_adapters(tmp_path / "ck", _inject(base, 2), overwrite=True)
    _assert_no_space_error(info.value, tmp_path / "ck", code)
    assert os.listdir(tmp_path) == ["ck"]
    monkeypatch.undo()
    _assert_same_adapters(load_adapters(tmp_path / "ck", base), _inject(base, 1))


@pytest.fixture
def tiny_fs(tmp_path):
    """A 256 KiB tmpfs (skips where mounting is not permitted)."""
    d = tmp_path / "fs"
    d.mkdir()
    try:
        rc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(d)],
                            capture_output=True).returncode
    except OSError:
        rc = 1
    if rc != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def _big(seed):  # 1 MiB of adapters: more than tiny_fs holds
    w = jnp.asarray(np.random.default_rng(seed).standard_normal((512, 512)), jnp.float32)
    return {"w": Trainable(w)}


def test_disk_full_for_real(tiny_fs):
    small = {"w": Trainable(jnp.arange(4.0))}
    save_adapters(tiny_fs / "ck", small)
    with pytest.raises(OSError) as info:
        save_adapters(tiny_fs / "ck", _big(0), overwrite=True)
    _assert_no_space_error(info.value, tiny_fs / "ck")
    assert os.listdir(tiny_fs) == ["ck"]
    np.testing.assert_array_equal(load_adapters(tiny_fs / "ck", {"w": jnp.zeros(4)})["w"].value, np.arange(4.0))

    with TrainCheckpointer(tiny_fs / "run") as ckpt:
        ckpt.save(1, small)
        with pytest.raises(OSError) as info:
            ckpt.save(2, _big(1))
        _assert_no_space_error(info.value, tiny_fs / "run")
        assert os.listdir(tiny_fs / "run") == ["1"]
        assert ckpt.restore({"w": jnp.zeros(4)}).step == 1


# ------------------------------------------------------------------------------------------------
# TrainCheckpointer's arguments.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"every": "2"}, TypeError, "every must be a positive int, got '2'"),
        ({"every": 2.5}, TypeError, "every must be a positive int, got 2.5"),
        ({"every": True}, TypeError, "every must be a positive int, got True"),
        ({"every": 0}, ValueError, "every must be a positive int, got 0"),
        ({"keep": 1.5}, TypeError, "keep must be a positive int or None, got 1.5"),
        ({"keep": True}, TypeError, "keep must be a positive int or None, got True"),
        ({"keep": 0}, ValueError, "keep must be a positive int or None, got 0"),
    ],
)
def test_train_checkpointer_arguments(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        TrainCheckpointer(tmp_path / "run", **kwargs)


@pytest.mark.parametrize(
    "step, error, match",
    [(2.5, TypeError, "step must be an int >= 0, got 2.5"), (-1, ValueError, "step must be an int >= 0, got -1"),
     (True, TypeError, "step must be an int >= 0, got True"), ("3", TypeError, "step must be an int >= 0, got '3'")],
)
def test_train_checkpointer_step_must_be_a_natural_number(tmp_path, step, error, match):
    params = {"w": _k()}
    with TrainCheckpointer(tmp_path / "run") as ckpt:
        with pytest.raises(error, match=match):
            ckpt.save(step, params, force=True)
        assert ckpt.all_steps() == []
        assert ckpt.save(np.int64(4), params)  # numpy (and 0-d jax) integers are ints
        assert ckpt.all_steps() == [4]


def test_train_checkpointer_opt_state_with_bool_and_int_leaves(tmp_path):
    """optax.apply_if_finite keeps a bool and int counters in its state: saved and restored as they are."""
    base, batches = _tiny_problem()
    params = _fresh_params(base, 0)
    tx = jlora.optimizer(optax.apply_if_finite(optax.adam(1e-2), 3), params)
    p, state, _ = _make_step(tx)(params, tx.init(params), *batches[0])
    assert {str(x.dtype) for x in jax.tree.leaves(state)} >= {"bool", "int32", "float32"}
    with TrainCheckpointer(tmp_path / "run") as ckpt:
        ckpt.save(1, p, state)
        got = ckpt.restore(base, tx.init(params))
    assert jax.tree.structure(got.opt_state) == jax.tree.structure(state)
    jax.tree.map(lambda a, b: (np.testing.assert_array_equal(a, b), a.dtype == b.dtype or pytest.fail()), got.opt_state, state)


def test_load_refuses_a_base_with_two_leaves_on_one_path(saved):
    d, base = saved
    base["params/dense"] = {"kernel": base["params"]["dense"]["kernel"]}  # also spells params/dense/kernel
    with pytest.raises(CheckpointError, match=r"2 base leaves have the path 'params/dense/kernel'"):
        load_adapters(d, base)


def test_load_over_an_adapters_tree_names_the_mistake(saved):
    d, base = saved
    adapters = jlora.split(_inject(base))[0]
    with pytest.raises(CheckpointError, match=r"base leaf 'params/\w+/kernel' is None; load over the plain params"):
        load_adapters(d, adapters)


@pytest.mark.parametrize(
    "change, match",
    [
        (_set("format_version", value=0), "format_version 0 is not a format version"),
        (_set("format_version", value="1"), "format_version '1' is not"),
        (_set("adapters", value={}), "config lists no adapters"),
        (_set("adapters", value=[]), "config has no 'adapters' mapping"),
        (_set("base_fingerprint", value=_DELETE), "config has no 'base_fingerprint' mapping"),
        (_set("step", value=-3), "step -3 is not an int >= 0"),
    ],
)
def test_malformed_config_top_level(saved, change, match):
    d, base = saved
    f = d / "config" / "jlora_config.json"
    cfg = json.loads(f.read_text())
    change(cfg)
    f.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"jlora_config.json: {match}"):
        load_adapters(d, base)


def test_swapped_optimizer_state_fails_the_digest_check(tmp_path):
    """Readable optimizer-state files of the right shapes that are another step's are caught (like
    the adapters' arrays), not restored silently."""
    import shutil

    base, batches = _tiny_problem()
    params = _fresh_params(base, 0)
    tx = jlora.optimizer(optax.adam(1e-2), params)
    step = _make_step(tx)
    p1, s1, _ = step(params, tx.init(params), *batches[0])
    p2, s2, _ = step(p1, s1, *batches[1])
    with TrainCheckpointer(tmp_path / "run") as ckpt:
        ckpt.save(1, p1, s1)
        ckpt.save(2, p2, s2)
    shutil.rmtree(tmp_path / "run" / "1" / "opt_state")
    shutil.copytree(tmp_path / "run" / "2" / "opt_state", tmp_path / "run" / "1" / "opt_state")
    with TrainCheckpointer(tmp_path / "run") as ckpt:
        got = ckpt.restore(base, tx.init(params), step=2)  # readable
        jax.tree.map(np.testing.assert_array_equal, got.opt_state, s2)
        with pytest.raises(CheckpointError, match=r"opt_state leaf 0 .*count.* is corrupt \(its sha256"):
            ckpt.restore(base, tx.init(params), step=1)
        # A step saved before the optimizer state's digests were recorded still restores.
        f = tmp_path / "run" / "2" / "config" / "jlora_config.json"
        cfg = json.loads(f.read_text())
        del cfg["opt_state"]["sha256"]
        f.write_text(json.dumps(cfg))
        jax.tree.map(np.testing.assert_array_equal, ckpt.restore(base, tx.init(params), step=2).opt_state, s2)
