"""Multi-process runs on JAX's own runtime (rlsoft.distributed): the flags in process; a Countdown run
over 2 processes on localhost (gloo collectives, 4 forced CPU devices each) in subprocesses, against
1 process with 1 device, and its checkpoint resumed by 1 process with 8 devices.
"""
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import countdown
from rlsoft import distributed
from rlsoft.checkpoint import Checkpointer
from rlsoft.config import build_config, parse_flags
from rlsoft.train_loop import TrainConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from tensorboard_events import read_scalars  # noqa: E402


# ---- the flags --------------------------------------------------------------------------------
def test_distributed_flags_default_off_and_all_three_set_together():
    assert not TrainConfig().distributed.enabled  # a single process: jax.distributed is never called
    distributed.initialize(TrainConfig().distributed)
    assert not jax.distributed.is_initialized()
    cfg = build_config(TrainConfig, ["--distributed.coordinator=10.0.0.1:1234", "--distributed.num_processes=2",
                                     "--distributed.process_id=1"]).distributed
    assert cfg.enabled and (cfg.coordinator, cfg.num_processes, cfg.process_id) == ("10.0.0.1:1234", 2, 1)
    # auto: jax.distributed.initialize fills the rest from $JAX_COORDINATOR_ADDRESS or the cluster.
    assert build_config(TrainConfig, ["--distributed.auto"]).distributed.enabled


@pytest.mark.parametrize("flags, says", [
    (["--distributed.num_processes=2", "--distributed.process_id=0"], "distributed.coordinator is missing"),
    (["--distributed.coordinator=a:1", "--distributed.process_id=0"], "distributed.num_processes is missing"),
    (["--distributed.coordinator=localhost", "--distributed.num_processes=2", "--distributed.process_id=0"],
     "distributed.coordinator=localhost is invalid; need host:port"),
    (["--distributed.coordinator=a:1", "--distributed.num_processes=2", "--distributed.process_id=2"],
     "distributed.process_id=2 is invalid; need < num_processes=2"),
    (["--distributed.num_processes=-1"], "distributed.num_processes=-1 is invalid"),
])
def test_bad_distributed_flags_exit_2_with_one_line(flags, says, capsys, monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    with pytest.raises(SystemExit) as e:
        parse_flags(TrainConfig, flags, prog="prog")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prog: error: ") and says in err[0], err


def test_coordinator_from_jax_environment_variable(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    cfg = build_config(TrainConfig, ["--distributed.num_processes=2", "--distributed.process_id=0"]).distributed
    assert cfg.enabled and cfg.coordinator == ""  # jax.distributed.initialize reads the variable itself


# ---- 2 processes x 4 devices == 1 process x 1 device; resumed by 1 process x 8 devices or 2 processes --
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(flags, devices: int, process_flags=((),)) -> list[tuple[str, str]]:
    """Run `python -m experiments.countdown` once per entry of `process_flags`, all at once; each
    process's (stdout, stderr), after all exited with code 0."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    procs = [subprocess.Popen([sys.executable, "-m", "experiments.countdown", *flags, *extra], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for extra in process_flags]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=900)
            assert p.returncode == 0, err[-4000:]
            outs.append((out, err))
    finally:
        for p in procs:  # a process that failed leaves its peer waiting on the coordinator
            if p.poll() is None:
                p.kill()
    return outs


def _state(run: pathlib.Path, step: int) -> dict[str, np.ndarray]:
    with Checkpointer(run / "checkpoints", read_only=True) as ckpt:
        state, meta = ckpt.restore(step)
    assert meta["step"] == step
    return {jax.tree_util.keystr(k): np.asarray(v, np.float64) for k, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def _max_diff(a: dict, b: dict) -> tuple[str, float]:
    assert sorted(a) == sorted(b)
    diff = {k: float(np.max(np.abs(a[k] - b[k]), initial=0.0)) for k in a}
    worst = max(diff, key=diff.get)
    return worst, diff[worst]


# smoke: 2 warm-start steps then 2 RL steps, checkpoints at steps 2 and 4. The RL learning rate is
# raised (no warmup) so the RL steps move the params ~1e-3, far above the tolerance; Adam's eps 1e-4 as
# in tests/test_mesh_sharding.py (an entry whose gradient is rounding noise, such as a k_proj bias,
# otherwise turns a 1e-9 gradient difference into a 1e-6 step difference).
FLAGS = ["--preset=smoke", "--policy.eps=1e-4", "--learning_rate=2e-3", "--warmup_steps=0"]
MESH = ["--mesh.data=2", "--mesh.fsdp=2", "--mesh.tensor=2"]


def _two_processes(flags) -> list[tuple[str, str]]:
    """2 processes on localhost, 4 CPU devices each: one (2, 2, 2) mesh over both."""
    port = _free_port()
    return _launch([*flags, *MESH], devices=4, process_flags=[
        [f"--distributed.coordinator=localhost:{port}", "--distributed.num_processes=2", f"--distributed.process_id={i}"]
        for i in range(2)])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same Countdown run by 1 process with 1 device and by 2 processes with 4 devices each."""
    tmp = tmp_path_factory.mktemp("multihost")
    flags = [*FLAGS, f"--cache_dir={tmp / 'cache'}"]
    # 1 process first: it also caches the tokenizer the others load.
    _launch([*flags, f"--logdir={tmp / 'one'}", "--run_name=run"], devices=1)
    outs = _two_processes([*flags, f"--logdir={tmp / 'multi'}", "--run_name=run"])
    return dict(tmp=tmp, flags=flags, one=tmp / "one" / "run", two=tmp / "multi" / "run", outs=outs)


def _resume_from_step_2(runs, name: str) -> pathlib.Path:
    """A copy of the 2-process run with only its step-2 checkpoint, to resume."""
    run = runs["tmp"] / name / "run"
    shutil.copytree(runs["two"], run)
    shutil.rmtree(run / "checkpoints" / "4")
    return run


@pytest.mark.slow  # 3 processes, each compiling the sampler and both updates: minutes
def test_two_processes_train_like_one_device(runs):
    one, two, outs = runs["one"], runs["two"], runs["outs"]
    # Results printed and TensorBoard written by process 0 only.
    assert "eval success after RL" in outs[0][0] and "eval success" not in outs[1][0]
    assert len(list(two.glob("events.out.tfevents.*"))) == 1
    # The same responses sampled and scored on both: identical host rewards at every RL step.
    r_one, r_two = read_scalars(str(one)), read_scalars(str(two))
    for tag in ("train/reward", "train/reward_std", "train/completions/mean_length"):
        assert r_two[tag] == r_one[tag] and len(r_one[tag]) == 2, tag
    assert min(v for _, v in r_one["train/reward_std"]) > 0  # rewards that differ: the weights matter
    # Same state (params, Adam moments, counts) after the warm start and after RL, to float32
    # summation-order rounding: the programs sum gradients over devices / processes in another order.
    # (The 2-process checkpoints are read here by this one process, on one device.)
    for step in (2, 4):
        worst, diff = _max_diff(_state(two, step), _state(one, step))
        assert diff <= 1e-6, (step, worst, diff)
    policy = lambda s: {k: v for k, v in s.items() if "['policy']['params']" in k}
    assert _max_diff(policy(_state(two, 4)), policy(_state(two, 2)))[1] > 1e-3  # RL moved the params


@pytest.mark.slow  # a Countdown run on 8 devices after the module's runs: minutes
def test_two_process_checkpoint_resumes_in_one_process_with_8_devices(runs):
    run = _resume_from_step_2(runs, "resumed_one")
    (_, err), = _launch([*runs["flags"], *MESH, f"--logdir={run.parent}", "--run_name=run", "--resume"], devices=8)
    assert f"resumed {run} at step 2" in err
    worst, diff = _max_diff(_state(run, 4), _state(runs["two"], 4))
    assert diff <= 1e-6, (worst, diff)


@pytest.mark.slow  # 2 processes after the module's runs: minutes
def test_two_process_run_resumes_in_two_processes(runs):
    # Every process reads the checkpoint's metadata and state together (orbax's reads are collective).
    run = _resume_from_step_2(runs, "resumed_two")
    outs = _two_processes([*runs["flags"], f"--logdir={run.parent}", "--run_name=run", "--resume"])
    assert all(f"resumed {run} at step 2" in err for _, err in outs)
    worst, diff = _max_diff(_state(run, 4), _state(runs["two"], 4))
    assert diff <= 1e-6, (worst, diff)


@pytest.mark.slow  # 2 processes: minutes
def test_a_signal_to_one_process_stops_both_after_the_same_step_with_a_checkpoint(tmp_path):
    # The checkpoint is a collective write: a process that stopped alone would leave the other waiting.
    port, run = _free_port(), tmp_path / "runs" / "run"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    logs = [(tmp_path / f"out{i}.txt", tmp_path / f"err{i}.txt") for i in range(2)]
    procs = []
    for i, (out, err) in enumerate(logs):
        with open(out, "w") as o, open(err, "w") as e:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "experiments.countdown", *FLAGS, *MESH, f"--cache_dir={tmp_path / 'cache'}",
                 "--steps=100", f"--logdir={run.parent}", "--run_name=run", f"--distributed.coordinator=localhost:{port}",
                 "--distributed.num_processes=2", f"--distributed.process_id={i}"], cwd=ROOT, env=env, stdout=o, stderr=e))
    try:
        # The driver catches signals while it runs steps: wait for the RL phase (process 0 prints the
        # eval before it; both processes pass it together), then a few seconds into its first step.
        deadline = time.time() + 900
        while "eval success before RL" not in logs[0][0].read_text():
            assert time.time() < deadline and all(p.poll() is None for p in procs), logs[0][1].read_text()[-2000:]
            time.sleep(1)
        time.sleep(5)
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=900) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    errs = [err.read_text() for _, err in logs]
    assert codes == [128 + signal.SIGTERM] * 2, errs[0][-2000:]
    stops = {line for err in errs for line in err.splitlines() if line.startswith("stopped at step")}
    assert len(stops) == 1, stops  # the same step on both
    step = int(stops.pop().split()[3].rstrip(";"))
    assert 2 < step < 102 and (run / "checkpoints" / str(step) / "commit_success.txt").exists()
