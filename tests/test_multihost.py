"""Multi-process runs on JAX's own runtime (rlsoft.distributed): the flags in process; a Countdown run
over 2 processes on localhost (gloo collectives, 4 forced CPU devices each) in subprocesses, against
1 process with 1 device, and its checkpoint resumed by 1 process with 8 devices.
"""
import os
import pathlib
import shutil
import socket
import subprocess
import sys

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


# ---- 2 processes x 4 devices == 1 process x 1 device; resumed by 1 process x 8 devices -----------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(flags, devices: int, process_flags=((),)) -> list[str]:
    """Run `python -m experiments.countdown` once per entry of `process_flags`, all at once; their stderr."""
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


@pytest.mark.slow  # three Countdown runs (4 processes, each compiling the sampler and both updates): minutes
def test_two_processes_train_like_one_device_and_resume_in_one_process(tmp_path):
    # smoke: 2 warm-start steps then 2 RL steps, checkpoints at steps 2 and 4. The RL learning rate is
    # raised (no warmup) so the RL steps move the params ~1e-3, far above the tolerance; Adam's eps
    # 1e-4 as in tests/test_mesh_sharding.py (an entry whose gradient is rounding noise, such as a
    # k_proj bias, otherwise turns a 1e-9 gradient difference into a 1e-6 step difference).
    flags = ["--preset=smoke", f"--cache_dir={tmp_path / 'cache'}", "--policy.eps=1e-4", "--learning_rate=2e-3",
             "--warmup_steps=0"]
    mesh = ["--mesh.data=2", "--mesh.fsdp=2", "--mesh.tensor=2"]
    # 1 process, 1 device (first: it also caches the tokenizer the others load).
    _launch([*flags, f"--logdir={tmp_path / 'one'}", "--run_name=run"], devices=1)
    # 2 processes on localhost, 4 devices each: one (2, 2, 2) mesh over both.
    port = _free_port()
    multi = tmp_path / "multi"
    outs = _launch([*flags, *mesh, f"--logdir={multi}", "--run_name=run"], devices=4, process_flags=[
        [f"--distributed.coordinator=localhost:{port}", "--distributed.num_processes=2",
         f"--distributed.process_id={i}"] for i in range(2)])
    # Results printed and TensorBoard written by process 0 only.
    assert "eval success after RL" in outs[0][0] and "eval success" not in outs[1][0]
    assert len(list((multi / "run").glob("events.out.tfevents.*"))) == 1
    one, two = tmp_path / "one" / "run", multi / "run"
    # The same responses sampled and scored on both: identical host rewards at every RL step.
    r_one, r_two = read_scalars(str(one)), read_scalars(str(two))
    for tag in ("train/reward", "train/reward_std", "train/completions/mean_length"):
        assert r_two[tag] == r_one[tag] and len(r_one[tag]) == 2, tag
    assert min(v for _, v in r_one["train/reward_std"]) > 0  # rewards that differ: the weights matter

    # Same state (params, Adam moments, counts) after the warm start and after RL, to float32
    # summation-order rounding: the programs sum gradients over devices / processes in another order.
    for step in (2, 4):
        worst, diff = _max_diff(_state(two, step), _state(one, step))
        assert diff <= 1e-6, (step, worst, diff)
    policy = lambda s: {k: v for k, v in s.items() if "['policy']['params']" in k}
    assert _max_diff(policy(_state(two, 4)), policy(_state(two, 2)))[1] > 1e-3  # RL moved the params

    # The 2-process checkpoint at step 2, resumed by 1 process with 8 devices, reaches step 4's state.
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed / "run")
    shutil.rmtree(resumed / "run" / "checkpoints" / "4")
    (_, err), = _launch([*flags, *mesh, f"--logdir={resumed}", "--run_name=run", "--resume"], devices=8)
    assert f"resumed {resumed / 'run'} at step 2" in err
    worst, diff = _max_diff(_state(resumed / "run", 4), _state(two, 4))
    assert diff <= 1e-6, (worst, diff)
