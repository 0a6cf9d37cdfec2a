"""rlsoft.checkpoint: bit-exact round trips of a training state, retention, and recovery from
partial, corrupt and killed-mid-save checkpoints (newest valid step wins, one-line warnings)."""
import glob
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from rlsoft.checkpoint import COMMIT_MARKER, TMP_SUFFIX, Checkpointer
from rlsoft.sharding import make_mesh, replicate

ROOT = pathlib.Path(__file__).resolve().parents[1]


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, hidden: int = 8):
        self.l1 = nnx.Linear(4, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, 2, rngs=rngs)


def _train_state(seed: int = 0, updates: int = 2, hidden: int = 8) -> dict:
    """nnx params + adamw/clip state after a few real updates, step, raw and typed PRNG keys."""
    _, params = nnx.split(MLP(nnx.Rngs(seed), hidden))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=1e-2))
    opt_state = tx.init(params)
    x = jax.random.normal(jax.random.PRNGKey(seed), (16, 4))

    def loss(p):  # the MLP's forward on its state (no nnx.merge: eager merges are slow)
        h = jax.nn.relu(x @ p["l1"]["kernel"][...] + p["l1"]["bias"][...])
        return jnp.mean((h @ p["l2"]["kernel"][...] + p["l2"]["bias"][...]) ** 2)

    for _ in range(updates):
        upd, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
        params = optax.apply_updates(params, upd)
    return {
        "params": params,
        "opt_state": opt_state,
        "step": updates,
        "rng": jax.random.PRNGKey(seed + 1),  # raw uint32[2]
        "sample_keys": jax.random.split(jax.random.key(seed + 2), 3),  # typed key<fry>[3]
    }


def _assert_identical(a, b) -> None:
    """Same pytree structure (node types included), leaf types, dtypes and bits."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert type(x) is type(y)
        if isinstance(x, jax.Array):
            assert x.dtype == y.dtype and x.shape == y.shape
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                x, y = jax.random.key_data(x), jax.random.key_data(y)
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
        else:
            assert x == y


def _abstract(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, jax.Array) else x


def _adam_states(opt_state) -> list:
    is_adam = lambda n: isinstance(n, optax.ScaleByAdamState)  # noqa: E731
    return [n for n in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(n)]


def _small(step: int) -> dict:
    return {"w": jnp.arange(1000, dtype=jnp.float32) + step, "b": jnp.full((3,), step, jnp.int32)}


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "rlsoft.checkpoint"]


# --------------------------------------------------------------------------------------------


def test_round_trip_of_a_training_state_is_bit_exact(tmp_path):
    state = _train_state()
    meta = {"data_position": 1234, "epoch": 2, "config": {"lr": 0.01, "name": "tiny", "widths": [4, 8, 2]}}
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() is None and ckpt.restore(target=state) is None
        assert ckpt.save(7, state, meta)
        assert ckpt.all_steps() == [7] and ckpt.latest_step() == 7

    with Checkpointer(tmp_path) as ckpt:  # a fresh process would do this
        restored, restored_meta = ckpt.restore(target=state)
        assert ckpt.last_restored_step == 7
        _assert_identical(restored, state)
        assert restored_meta == meta
        assert isinstance(restored["params"], nnx.State)
        [adam] = _adam_states(restored["opt_state"])
        assert int(adam.count) == 2 and isinstance(adam.mu, nnx.State)
        assert restored["sample_keys"].dtype == state["sample_keys"].dtype  # typed keys re-wrapped

        # An abstract target (no arrays allocated) gives the same values as jax.Arrays.
        abstract, _ = ckpt.restore(7, target=jax.tree.map(_abstract, state))
        _assert_identical(abstract, state)

        # Without a target: the saved structure as plain containers; orbax re-wraps typed keys itself.
        raw, _ = ckpt.restore()
        assert raw["sample_keys"].dtype == state["sample_keys"].dtype
        assert np.array_equal(jax.random.key_data(raw["sample_keys"]), jax.random.key_data(state["sample_keys"]))


def test_restore_or_init_and_shardings_of_the_target(tmp_path):
    mesh = make_mesh()
    init = lambda: replicate(_train_state(seed=3, updates=0), mesh)  # noqa: E731
    with Checkpointer(tmp_path) as ckpt:
        state, meta, step = ckpt.restore_or_init(init)
        assert step is None and meta == {}
        _assert_identical(state, init())
        trained = replicate(_train_state(seed=3, updates=1), mesh)
        ckpt.save(1, trained, {"data_position": 64})

    with Checkpointer(tmp_path) as ckpt:
        state, meta, step = ckpt.restore_or_init(init)
    assert step == 1 and meta == {"data_position": 64}
    _assert_identical(state, trained)
    for x, t in zip(jax.tree.leaves(state), jax.tree.leaves(init())):
        if isinstance(t, jax.Array):
            assert x.sharding == t.sharding


def test_max_to_keep_and_save_interval(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=2) as ckpt:
        saved = [ckpt.save(s, _small(s), {"pos": s}) for s in range(7)]
        assert saved == [True, False, True, False, True, False, True]
        assert ckpt.all_steps() == [4, 6]
        assert ckpt.save(7, _small(7), force=True)  # e.g. the final step of a run
        assert ckpt.all_steps() == [6, 7]
    assert sorted(os.listdir(tmp_path)) == ["6", "7"]
    with Checkpointer(tmp_path, read_only=True) as reader:  # e.g. an evaluator process
        assert reader.latest_step() == 7
        with pytest.raises(ValueError, match="read-only"):
            reader.save(8, _small(8))


def test_partial_checkpoints_are_skipped_with_a_warning(tmp_path, caplog):
    with Checkpointer(tmp_path) as ckpt:
        for s in (1, 2):
            ckpt.save(s, _small(s), {"pos": s})
    # What a save killed before its rename leaves (orbax's tmp name) ...
    shutil.copytree(tmp_path / "2", tmp_path / f"3{TMP_SUFFIX}")
    os.remove(tmp_path / f"3{TMP_SUFFIX}" / COMMIT_MARKER)
    # ... and a step directory without the commit marker (e.g. an interrupted copy).
    shutil.copytree(tmp_path / "2", tmp_path / "4")
    os.remove(tmp_path / "4" / COMMIT_MARKER)

    caplog.set_level(logging.WARNING)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 2 and ckpt.all_steps() == [1, 2]
        state, meta = ckpt.restore(target=_small(0))
        assert ckpt.last_restored_step == 2 and meta == {"pos": 2}
        _assert_identical(state, _small(2))
        msgs = _warnings(caplog)
        assert len(msgs) == 2 and all("\n" not in m and "partial" in m for m in msgs)
        assert any("step 3" in m and TMP_SUFFIX in m for m in msgs)
        assert any("step 4" in m and COMMIT_MARKER in m for m in msgs)

        # Resuming writes over both partial steps.
        ckpt.save(3, _small(3), {"pos": 3})
        ckpt.save(4, _small(4), {"pos": 4})
        assert ckpt.all_steps() == [2, 3, 4]
        state, meta = ckpt.restore(target=_small(0))
        _assert_identical(state, _small(4))
    assert sorted(os.listdir(tmp_path)) == ["2", "3", "4"]


def _damage(step_dir: pathlib.Path, how: str) -> None:
    data = glob.glob(str(step_dir / "state" / "ocdbt.process_0" / "d" / "*"))
    assert data, "no array data files where orbax 0.12 writes them"
    biggest = max(data, key=os.path.getsize)
    if how == "truncate":
        for f in data:
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)
    elif how == "delete":
        for f in data:
            os.remove(f)
    elif how == "flip_a_byte":
        raw = bytearray(pathlib.Path(biggest).read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        pathlib.Path(biggest).write_bytes(bytes(raw))
    elif how == "delete_metadata":
        os.remove(step_dir / "metadata" / "metadata")


@pytest.mark.parametrize("how", ["truncate", "delete", "flip_a_byte", "delete_metadata"])
def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, how):
    with Checkpointer(tmp_path) as ckpt:
        for s in (1, 2, 3):
            ckpt.save(s, _small(s), {"pos": s})
    _damage(tmp_path / "3", how)

    caplog.set_level(logging.WARNING)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 3  # damage is only seen when the step is read
        state, meta = ckpt.restore(target=_small(0))
        assert ckpt.last_restored_step == 2 and meta == {"pos": 2}
        _assert_identical(state, _small(2))
        [msg] = _warnings(caplog)
        assert "step 3" in msg and "\n" not in msg
        assert ckpt.latest_step() == 2  # remembered for this process
        with pytest.raises(RuntimeError, match="step 3") as e:
            ckpt.restore(step=3, target=_small(0))
        assert "\n" not in str(e.value)
        ckpt.save(3, _small(30), {"pos": 30})  # a resumed run replaces the damaged step
        state, meta = ckpt.restore(target=_small(0))
        assert meta == {"pos": 30}
        _assert_identical(state, _small(30))


def test_all_checkpoints_corrupt_raises_one_line(tmp_path, caplog):
    with Checkpointer(tmp_path) as ckpt:
        for s in (1, 2):
            ckpt.save(s, _small(s), {"pos": s})
    for s in (1, 2):
        _damage(tmp_path / str(s), "delete")
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(RuntimeError, match=r"no readable checkpoint .*tried steps \[2, 1\]") as e:
            ckpt.restore_or_init(lambda: _small(0))  # must not silently start from scratch
    assert "\n" not in str(e.value)
    assert len(_warnings(caplog)) == 2


def test_target_with_a_different_structure_raises_one_line_value_error(tmp_path):
    state = _train_state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, {})
        cases = {
            "['extra']": {**state, "extra": jnp.zeros(2)},
            "['rng']": {k: v for k, v in state.items() if k != "rng"},
            "shape differs (checkpoint vs target): ['opt_state'][1][0].mu['l1']['bias'].value [8] vs [9]": (
                _train_state(hidden=9, updates=0)
            ),
            "['params']['l1']['bias']": {**state, "params": nnx.to_pure_dict(state["params"])},
        }
        for named, target in cases.items():
            with pytest.raises(ValueError, match="does not match checkpoint step 1") as e:
                ckpt.restore(target=target)
            assert named in str(e.value) and "\n" not in str(e.value)


def test_metadata_is_json_and_bad_arguments_raise_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer(tmp_path, max_to_keep=0)
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match="JSON-able"):
            ckpt.save(1, _small(1), {"when": object()})
        with pytest.raises(FileNotFoundError, match="step 5"):
            ckpt.restore(step=5)
        ckpt.save(1, _small(1), {"data_position": np.int64(7), "loss": jnp.float32(0.5), "shape": (1, 2)})
        _, meta = ckpt.restore(target=_small(0))
    assert meta == {"data_position": 7, "loss": 0.5, "shape": [1, 2]}


def test_typed_keys_from_a_checkpoint_that_stored_their_key_data(tmp_path):
    keys = jax.random.split(jax.random.key(3), 4)
    with Checkpointer(tmp_path) as ckpt:  # what rlsoft wrote before orbax stored typed keys itself
        ckpt.save(1, {"keys": jax.random.key_data(keys)})
        state, _ = ckpt.restore(target={"keys": keys})
    _assert_identical(state, {"keys": keys})


def test_read_metadata_reads_only_the_json_of_the_newest_step(tmp_path, caplog):
    config = {"model": {"widths": [4, 8, 2], "act": "relu"}, "lr": 0.01, "runs": [{"seed": 1}, {}], "x": None}
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.read_metadata() is None
        for s in (1, 2):
            ckpt.save(s, _small(s), {"pos": s, "config": {**config, "seed": s}})
    _damage(tmp_path / "2", "delete")  # no array is read: step 2's metadata still comes back
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        assert ckpt.read_metadata() == {"pos": 2, "config": {**config, "seed": 2}}
        assert ckpt.read_metadata(step=1) == {"pos": 1, "config": {**config, "seed": 1}}
        with pytest.raises(FileNotFoundError, match="step 5"):
            ckpt.read_metadata(step=5)
    os.remove(tmp_path / "2" / "metadata" / "metadata")
    caplog.set_level(logging.WARNING)
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        assert ckpt.read_metadata()["pos"] == 1  # falls back like restore, with one warning line
        [msg] = _warnings(caplog)
        assert "step 2" in msg and "\n" not in msg


def test_a_checkpoint_reads_with_plain_orbax(tmp_path):
    state, meta = _train_state(), {"pos": 3, "config": {"lr": 0.01, "widths": [4, 8]}}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, state, meta)
    with ocp.CheckpointManager(tmp_path) as mngr:  # the README's snippet: no rlsoft code
        step = mngr.latest_step()
        plain = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                           metadata=ocp.args.JsonRestore()))
        # With the abstract state as target: the same pytree types, bit for bit.
        typed = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(jax.tree.map(_abstract, state))))
    assert step == 3 and plain["metadata"] == meta
    assert plain["state"]["params"]["l1"]["kernel"]["value"].shape == (4, 8)  # nested dicts
    assert len(jax.tree.leaves(plain["state"])) == len(jax.tree.leaves(state))
    _assert_identical(typed["state"], state)


# A trainer resuming over a damaged newest step. Orbax abandons its other reads when one fails, and
# collecting those later printed dozens of tracebacks; stderr must hold one line per skipped step.
_DAMAGED_CHILD = """
import gc, glob, os, sys
import jax
from rlsoft.checkpoint import Checkpointer
directory, how, steps = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
# Random values: orbax stores small or compressible arrays inline in its b-tree, not in data files.
state = lambda s: {f"x{i}": jax.random.normal(jax.random.key(100 * s + i), (1000 + i,)) for i in range(24)}
with Checkpointer(directory) as ckpt:
    [ckpt.save(s, state(s), {"pos": s}) for s in (1, 2)]
for s in steps:  # the biggest data file holds the arrays; other reads are in flight when one fails
    f = max(glob.glob(f"{directory}/{s}/state/ocdbt.process_0/d/*"), key=os.path.getsize)
    os.truncate(f, os.path.getsize(f) // 2) if how == "truncate" else os.remove(f)
for _ in range(2):  # twice, as a resume check and then the resume would
    try:
        with Checkpointer(directory) as ckpt:
            _, meta = ckpt.restore(target=state(0))
    except RuntimeError as e:  # what a trainer does: one line, exit 2
        print(e, file=sys.stderr)
        sys.exit(2)
    gc.collect()  # where the abandoned reads used to print their tracebacks
    print(ckpt.last_restored_step, meta["pos"], flush=True)
"""


@pytest.mark.parametrize("how, damaged", [("truncate", "2"), ("delete", "2"), ("delete", "2,1")])
def test_a_damaged_step_costs_one_stderr_line(tmp_path, how, damaged):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _DAMAGED_CHILD, str(tmp_path), how, damaged], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.splitlines()
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-3000:]
    if damaged == "2":
        assert proc.returncode == 0 and proc.stdout.split() == ["1", "1", "1", "1"], proc.stderr[-3000:]
        assert len(lines) == 2 and all("skipping unreadable step 2" in line for line in lines), lines
    else:  # nothing readable: one line per step tried, then the refusal
        assert proc.returncode == 2 and len(lines) == 3, lines
        assert "step 2" in lines[0] and "step 1" in lines[1]
        assert lines[2].startswith("no readable checkpoint") and "tried steps [2, 1]" in lines[2]


# --------------------------------------------------------------------------------------------
# A trainer killed with SIGKILL in the middle of saving a ~20 MB state.

_CHILD = """
import sys
import jax.numpy as jnp
from rlsoft.checkpoint import Checkpointer
ckpt = Checkpointer(sys.argv[1], max_to_keep=2)
for step in range(1, 10_000):
    state = {"w": jnp.full((5_000_000,), step, jnp.float32), "step": step}  # 20 MB
    ckpt.save(step, state, {"data_position": 10 * step})
    print("saved", step, flush=True)
"""


def _run_and_kill_mid_save(directory: pathlib.Path, deadline: float) -> str:
    """Start the child, wait for its first save, SIGKILL it once a later save's tmp dir appears."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(directory)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().split() == ["saved", "1"], "child failed before its first save"
        while time.monotonic() < deadline:
            tmp = [n for n in os.listdir(directory) if TMP_SUFFIX in n]
            if tmp:
                os.kill(proc.pid, signal.SIGKILL)
                return tmp[0]
            time.sleep(0.001)
        raise AssertionError("no save in progress was seen before the deadline")
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_process_killed_while_saving_leaves_a_restorable_directory(tmp_path, caplog):
    deadline = time.monotonic() + 90
    for attempt in range(3):  # the kill lands mid-save almost always; retry the rare miss
        directory = tmp_path / f"run{attempt}"
        directory.mkdir()
        _run_and_kill_mid_save(directory, deadline)
        left = [n for n in os.listdir(directory) if TMP_SUFFIX in n]
        if left:
            break
    assert left, "the kill never landed during a save"
    killed_step = int(left[0].split(".")[0])

    target = {"w": jax.ShapeDtypeStruct((5_000_000,), jnp.float32), "step": 0}
    caplog.set_level(logging.WARNING)
    with Checkpointer(directory, max_to_keep=2) as ckpt:
        state, meta = ckpt.restore(target=target)
        step = ckpt.last_restored_step
        assert step == killed_step - 1 == ckpt.latest_step()
        assert meta == {"data_position": 10 * step} and state["step"] == step
        assert np.all(np.asarray(state["w"]) == step)
        assert any(f"step {killed_step}" in m and "partial" in m for m in _warnings(caplog))

        # The resumed run saves the killed step again over orbax's stale tmp directory.
        ckpt.save(killed_step, {"w": jnp.zeros((5_000_000,)), "step": killed_step}, {"data_position": 0})
        assert ckpt.latest_step() == killed_step
    assert not [n for n in os.listdir(directory) if TMP_SUFFIX in n]
