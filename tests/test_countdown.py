"""The countdown experiment end to end: smoke run, TensorBoard tags, bad flags, exact resume, devices."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import countdown
from rlsoft.logger import read_scalars

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _flags(tmp_path, *extra):
    return ["--preset=smoke", f"--cache_dir={tmp_path / 'cache'}", *extra]


def test_smoke_run_logs_every_metric(tmp_path, capsys):
    logdir = tmp_path / "run"
    result = countdown.main(_flags(tmp_path, f"--logdir={logdir}", "--eval_every=2", "--inject_gt=true",
                                   "--sl_weight=0.5", "--kl_coef=0.01", "--entropy_coef=0.001"))
    out = capsys.readouterr().out
    assert "eval success before RL" in out and "eval success after RL" in out
    assert 0.0 <= result["after"] <= 1.0
    scalars = read_scalars(str(logdir))
    for tag in ("train/reward", "train/success", "train/format", "train/reward_std", "loss", "grad_norm",
                "entropy", "kl", "sl_loss", "response_length", "tau", "tokens_per_s", "eval/success",
                "weights/effective_n", "weights/zero_std_frac", "linear/max_weight", "softmax/effective_n",
                "softmax/weight_on_best", "linear/entropy"):
        assert tag in scalars, tag
    steps = [s for s, _ in scalars["train/reward"]]
    assert steps == [2, 3]  # RL steps follow the two warm-start steps
    assert all(np.isfinite(v) for _, v in scalars["loss"])


@pytest.mark.parametrize("flag", ["--scheme=nope", "--tau=0", "--tau=hot", "--group_size=1", "--bogus=1",
                                  "--model=/nonexistent", "--micro_batches=3", "--tau_schedule=cubic",
                                  "--steps=-1", "--sizes=7"])
def test_bad_flags_exit_2_with_one_line(flag, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        countdown.main(_flags(tmp_path, flag))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m experiments.countdown: error:"), err


_RUN = """
import os, signal, sys, json
import numpy as np, jax
from experiments import countdown
flags = json.loads(sys.argv[1]); mode = sys.argv[2]; out = sys.argv[3]
cfg = countdown.parse_flags(countdown.CountdownConfig, flags, presets=countdown.PRESETS)
policy, params, task = countdown.build(cfg)
loop = countdown.Loop(cfg, policy, params, task)
if mode == "kill":
    loop.run(until=int(sys.argv[4]))
    os.kill(os.getpid(), signal.SIGKILL)  # a hard stop right after a checkpoint
loop.run()
loop.close()
np.savez(out, *[np.asarray(x) for x in jax.tree.leaves(loop.state.params)], step=loop.step)
print(json.dumps({"devices": jax.device_count()}))
"""


def _subprocess(flags, mode, out, *extra, devices=1):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", _RUN, json.dumps(flags), mode, str(out), *extra], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def _load(path):
    with np.load(path) as z:
        return [z[k] for k in sorted(z.files, key=lambda k: (k != "step", k))]


def test_killed_and_resumed_run_ends_with_the_same_params(tmp_path):
    flags = _flags(tmp_path, "--steps=3", "--sft_steps=2", "--checkpoint_every=1", "--eval_every=0")
    ref = _subprocess(flags, "full", tmp_path / "ref.npz")
    assert ref.returncode == 0, ref.stderr[-2000:]
    run_flags = flags + [f"--logdir={tmp_path / 'resumed'}", "--resume=true"]
    killed = _subprocess(run_flags, "kill", tmp_path / "unused.npz", "3")
    assert killed.returncode == -9  # SIGKILL
    resumed = _subprocess(run_flags, "full", tmp_path / "resumed.npz")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step 3" in resumed.stderr
    a, b = _load(tmp_path / "ref.npz"), _load(tmp_path / "resumed.npz")
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_same_metrics_on_1_and_8_devices(tmp_path):
    flags = _flags(tmp_path, "--steps=2", "--sft_steps=2", "--questions_per_step=8", "--eval_every=0",
                   "--checkpoint_every=0")
    one = _subprocess(flags, "full", tmp_path / "one.npz", devices=1)
    eight = _subprocess(flags, "full", tmp_path / "eight.npz", devices=8)
    assert one.returncode == 0 and eight.returncode == 0, (one.stderr[-1500:], eight.stderr[-1500:])
    assert json.loads(eight.stdout.strip().splitlines()[-1])["devices"] == 8
    for x, y in zip(_load(tmp_path / "one.npz"), _load(tmp_path / "eight.npz")):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
