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
from tensorboard_events import read_scalars

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _flags(tmp_path, *extra):
    return ["--preset=smoke", f"--cache_dir={tmp_path / 'cache'}", *extra]


def test_smoke_run_logs_every_metric(tmp_path, capsys):
    logdir = tmp_path / "run"
    result = countdown.main(_flags(tmp_path, f"--logdir={logdir}", "--eval_every=2", "--inject_gt=true",
                                   "--sl_weight=0.5", "--kl_coef=0.01", "--entropy_coef=0.001"))
    out = capsys.readouterr().out
    assert "eval success before RL" in out and "eval success after RL" in out
    assert [h["step"] for h in result["history"]] == [0, 1, 2, 3]
    assert [h["step"] for h in result["history"] if "eval/success" in h] == [1, 3]
    assert result["after"] == result["driver"].evaluate()["eval/success"]  # greedy eval is deterministic
    scalars = read_scalars(result["run_dir"])
    for tag in ("train/reward", "train/success", "train/format", "train/reward_std", "train/loss", "train/grad_norm",
                "train/entropy", "train/kl", "train/sl_loss", "train/completions/mean_length", "train/tau",
                "train/tokens_per_s", "eval/success", "eval/success_se", "eval/mean_at_k", "eval/mean_at_k_se",
                "train/weights/effective_n", "train/frac_reward_zero_std",
                "train/clip_ratio/region_mean", "train/skipped_updates", "diag/linear/max_weight",
                "diag/softmax_tau0.5/effective_n", "diag/softmax_tau0.5/weight_on_best", "diag/linear/entropy",
                "sft/loss", "sft/grad_norm"):
        assert tag in scalars, tag
    assert [s for s, _ in scalars["train/reward"]] == [2, 3]  # RL steps follow the two warm-start steps
    assert [s for s, _ in scalars["sft/loss"]] == [0, 1]
    assert all(np.isfinite(v) for _, v in scalars["train/loss"])


@pytest.mark.parametrize("flag", ["--scheme=nope", "--tau=0", "--tau=hot", "--group_size=1", "--bogus=1",
                                  "--model=/nonexistent", "--micro_batches=3", "--tau_schedule=cubic",
                                  "--steps=-1", "--sizes=7", "--learning_rate=nan", "--adam_b1=1.0",
                                  "--policy.b2=1.5", "--policy.bogus=1", "--temperature=-1", "--resume",
                                  "--resume_override=tau", "--logdir=/proc/forbidden", "--rl_weight=0",
                                  "--rl_weight=-1"])
def test_bad_flags_exit_2_with_one_line(flag, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        countdown.main(_flags(tmp_path, flag))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m experiments.countdown: error:"), err


def _subprocess(flags, mode, out, *extra, devices=1, experiment="countdown"):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, str(ROOT / "tests" / "run_experiment.py"), experiment, json.dumps(flags),
                           mode, str(out), *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _load(path):
    with np.load(path) as z:
        return [z[k] for k in sorted(z.files, key=lambda k: (k != "step", k))]


@pytest.mark.slow  # a subprocess run (or several); minutes on a 2-core machine
def test_killed_and_resumed_run_ends_with_the_same_params(tmp_path):
    flags = _flags(tmp_path, "--steps=3", "--sft_steps=2", "--checkpoint_every=1", "--eval_every=0")
    ref = _subprocess(flags, "full", tmp_path / "ref.npz")
    assert ref.returncode == 0, ref.stderr[-2000:]
    run_flags = flags + [f"--logdir={tmp_path / 'runs'}", "--run_name=r"]
    killed = _subprocess(run_flags, "kill", tmp_path / "unused.npz", "3")
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL
    resumed = _subprocess(run_flags + ["--resume"], "full", tmp_path / "resumed.npz")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "at step 3" in resumed.stderr
    a, b = _load(tmp_path / "ref.npz"), _load(tmp_path / "resumed.npz")
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow  # a subprocess run (or several); minutes on a 2-core machine
def test_same_metrics_on_1_and_8_devices(tmp_path):
    flags = _flags(tmp_path, "--steps=2", "--sft_steps=2", "--questions_per_step=8", "--eval_every=0",
                   "--checkpoint_every=0")
    one = _subprocess(flags, "full", tmp_path / "one.npz", devices=1)
    eight = _subprocess(flags, "full", tmp_path / "eight.npz", devices=8)
    assert one.returncode == 0 and eight.returncode == 0, (one.stderr[-1500:], eight.stderr[-1500:])
    assert json.loads(eight.stdout.strip().splitlines()[-1])["devices"] == 8
    for x, y in zip(_load(tmp_path / "one.npz"), _load(tmp_path / "eight.npz")):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_compile_ahead_leaves_every_step_and_eval_nothing_to_compile(tmp_path, count_compiles):
    # The ground truth injected, a KL reference and an SL term: every optional input of the update.
    cfg = countdown.parse_flags(countdown.CountdownConfig, _flags(tmp_path, "--kl_coef=0.01", "--inject_gt",
                                                                  "--sl_weight=0.1", "--compile_cache="),
                                presets=countdown.PRESETS)
    driver = countdown.make_driver(cfg)
    with count_compiles() as compiled:
        driver._compile_ahead(driver.testbed.total_steps)
    # The warm-start update, the sampler, the RL update and the eval sampler, compiled at once.
    assert len(driver.compile_seconds) == 4
    assert {"jit(sft_update)", "jit(sampler)", "jit(update)"} <= set(compiled)
    with count_compiles() as compiled:
        result = driver.run()  # 2 warm-start steps, 2 RL steps (the reference set between), an eval
    assert compiled == []
    assert len(result.history) == 4 and "eval/success" in result.history[-1]
