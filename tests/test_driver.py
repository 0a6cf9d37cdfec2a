"""rlsoft.driver on a toy testbed: run directories, resume and its refusals, logs, signals, chunks."""
import dataclasses
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlsoft import optim, roles
from rlsoft.driver import Driver, RunConfig
from rlsoft.run_dir import RunError, prepare_run
from tensorboard_events import read_scalars


@dataclasses.dataclass(frozen=True)
class ToyConfig(RunConfig):
    scheme: str = "softmax"
    tau: float = 0.5
    rate: float = 1.0
    steps: int = 10
    chunk: int = 1
    width: int = 1  # the "model size": the shape of the parameters
    checkpoint_every: int = 3
    eval_every: int = 4
    progress: bool = False


class ToyTestbed:
    """params += rate per step; a step's metric is its own index (so logged curves are checkable)."""

    streams = ("data", "eval")
    progress_keys = ("train/x",)

    def __init__(self, cfg, signal_at=None, nan_at=None):
        self.cfg, self.total_steps, self.signal_at, self.nan_at = cfg, cfg.steps, signal_at, nan_at
        self.calls = []

    def init_state(self):
        tx = optim.make_optimizer(optim.OptimizerConfig(name="sgd", learning_rate=1.0))
        return roles.TrainState.create({"policy": roles.trainable({"w": jnp.zeros(()), "v": jnp.zeros(self.cfg.width)}, tx)})

    def steps_per_call(self):
        return self.cfg.chunk

    def data_position(self, step):
        return 2 * step

    def train(self, state, step, n, keys):
        self.calls.append((step, n))
        policy = state.roles["policy"]
        policy = policy._replace(params={**policy.params, "w": policy.params["w"] + self.cfg.rate * n})
        x = np.arange(step, step + n, dtype=np.float64)
        if self.nan_at is not None and step <= self.nan_at < step + n:
            x[self.nan_at - step] = np.nan
        if self.signal_at is not None and step <= self.signal_at < step + n:
            os.kill(os.getpid(), signal.SIGTERM)
        return state.replace_role("policy", policy)._replace(step=state.step + n), {"train/x": x}

    def evaluate(self, state, keys):
        return {"eval/w": float(state.params("policy")["w"])}


def _driver(cfg, **kw):
    return Driver(ToyTestbed(cfg, **kw), cfg, prepare_run(cfg, "toy"))


def _run_three_steps(tmp_path):
    """A run named "r" stopped after the checkpoint of step 3; returns its config."""
    cfg = ToyConfig(logdir=str(tmp_path), run_name="r")
    d = _driver(cfg)
    d.run(until=3)
    d.close()
    return cfg


def test_two_runs_in_one_logdir_get_their_own_directories(tmp_path):
    cfg = ToyConfig(logdir=str(tmp_path))
    a, b = _driver(cfg), _driver(cfg)
    assert a.run_dir.path != b.run_dir.path
    assert os.path.basename(a.run_dir.path).startswith("toy-softmax-tau0.5-seed0-")
    for d in (a, b):
        d.run()
        d.close()
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(d.run_dir.path) for d in (a, b))
    scalars = read_scalars(a.run_dir.path)
    assert [s for s, _ in scalars["train/x"]] == list(range(10))
    assert [s for s, _ in scalars["eval/w"]] == [3, 7, 9]


def test_resume_continues_the_newest_run_and_logs_no_step_twice(tmp_path):
    cfg = ToyConfig(logdir=str(tmp_path), run_name="r")
    first = _driver(cfg)
    first.run(until=5)  # checkpoints at steps 3 (cadence); steps 3 and 4 are logged past it
    first.logger.flush()
    del first  # a killed run: nothing closed
    resumed = _driver(dataclasses.replace(ToyConfig(logdir=str(tmp_path)), resume=True))
    assert resumed.run_dir.path == str(tmp_path / "r") and resumed.step == 3
    result = resumed.run()
    resumed.close()
    assert [h["step"] for h in result.history] == list(range(3, 10))
    assert float(resumed.state.params("policy")["w"]) == 10.0
    scalars = read_scalars(str(tmp_path / "r"))
    assert [s for s, _ in scalars["train/x"]] == list(range(10))  # purge_step dropped the old 3 and 4


def test_resume_refuses_a_changed_field_unless_overridden(tmp_path, capsys):
    cfg = _run_three_steps(tmp_path)
    changed = dataclasses.replace(cfg, resume=True, tau=1.0)
    with pytest.raises(RunError, match=r"tau differs from the checkpoint \(0.5 -> 1.0\).*--resume_override=tau"):
        prepare_run(changed, "toy")
    with pytest.raises(RunError, match="no such config field"):
        prepare_run(dataclasses.replace(changed, resume_override=("nope",)), "toy")
    ok = _driver(dataclasses.replace(changed, resume_override=("tau",)))
    assert ok.step == 3
    assert "tau overridden (0.5 -> 1.0)" in capsys.readouterr().err
    ok.close()
    # Fields that steer the run (logdir, run_name, progress, ...) may change freely.
    prepare_run(dataclasses.replace(cfg, resume=True, progress=True), "toy")


def test_run_directory_errors_are_one_line_run_errors(tmp_path):
    with pytest.raises(RunError, match="has no run to resume"):
        prepare_run(ToyConfig(logdir=str(tmp_path), resume=True), "toy")
    os.makedirs(tmp_path / "taken")
    with pytest.raises(RunError, match="already exists"):
        prepare_run(ToyConfig(logdir=str(tmp_path), run_name="taken"), "toy")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RunError, match="not writable"):
        prepare_run(ToyConfig(logdir=str(blocker / "sub")), "toy")
    with pytest.raises(ValueError, match="need --logdir"):
        ToyConfig(resume=True)


def test_checkpoint_metadata_holds_step_data_position_and_config(tmp_path):
    from rlsoft.checkpoint import Checkpointer

    d = _driver(ToyConfig(logdir=str(tmp_path), run_name="r", rate=2.0))
    d.run()
    d.close()
    with Checkpointer(tmp_path / "r" / "checkpoints", read_only=True) as ckpt:
        meta = ckpt.read_metadata()
    assert meta["step"] == 10 and meta["data_position"] == 20
    assert meta["config"]["rate"] == 2.0 and meta["config"]["scheme"] == "softmax"


def test_sigterm_stops_cleanly_after_the_step_with_a_checkpoint(tmp_path):
    cfg = ToyConfig(logdir=str(tmp_path), run_name="r")
    d = _driver(cfg, signal_at=4)
    result = d.run()
    d.close()
    assert result.stopped == signal.SIGTERM and d.step == 5
    resumed = _driver(dataclasses.replace(cfg, resume=True))
    assert resumed.step == 5
    resumed.run()
    resumed.close()
    assert float(resumed.state.params("policy")["w"]) == 10.0
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


def test_non_finite_metrics_are_logged_as_nan_and_counted(tmp_path, capsys):
    d = _driver(ToyConfig(logdir=str(tmp_path), run_name="r"), nan_at=6)
    d.run()
    d.close()
    assert "1 non-finite metric values" in capsys.readouterr().err
    values = dict(read_scalars(str(tmp_path / "r"))["train/x"])
    assert np.isnan(values[6]) and values[5] == 5.0


def test_compiled_chunks_stop_at_eval_and_checkpoint_boundaries():
    cfg = ToyConfig(chunk=4, checkpoint_every=3, eval_every=0, steps=10)
    bed = ToyTestbed(cfg)
    result = Driver(bed, cfg, prepare_run(cfg, "toy")).run()
    assert bed.calls == [(0, 3), (3, 3), (6, 3), (9, 1)]
    assert [h["step"] for h in result.history] == list(range(10))
    assert [h["step"] for h in result.history if "eval/w" in h] == [9]


def test_keys_are_named_streams_of_the_seed():
    cfg = ToyConfig(seed=3)
    d = Driver(ToyTestbed(cfg), cfg, prepare_run(cfg, "toy"))
    want = jax.random.split(jax.random.PRNGKey(3), 2)
    np.testing.assert_array_equal(d.keys["data"], want[0])
    np.testing.assert_array_equal(d.keys["eval"], want[1])


def test_resume_with_another_model_size_is_one_line_naming_the_field(tmp_path):
    cfg = _run_three_steps(tmp_path)
    bigger = dataclasses.replace(cfg, resume=True, width=4)
    with pytest.raises(RunError, match=r"width differs from the checkpoint \(1 -> 4\)"):
        prepare_run(bigger, "toy")
    with pytest.raises(RunError) as e:  # overridden, the parameters themselves cannot be restored
        _driver(dataclasses.replace(bigger, resume_override=("width",)))
    assert "\n" not in str(e.value) and "shape" in str(e.value) and "v" in str(e.value)
