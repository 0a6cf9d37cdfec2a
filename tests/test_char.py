"""The char testbed: the regularised exhaustive loop and the experiment end to end."""
import dataclasses
import os
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import char as char_exp
from rlsoft import exhaustive, exhaustive_loop as xl, monitors, optim

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
V, C, B = 7, 3, 5


def _task(kl=False):
    def logits_fn(params, contexts):
        return params["table"][contexts[:, -1]] + params["bias"]

    def batch_fn(key):  # the next token is a function of the last one, so there is something to learn
        ctx = jax.random.randint(key, (B, C), 0, V)
        return ctx, (ctx[:, -1] * 3 + 1) % V

    def reward_fn(contexts, targets, probs):
        return jax.nn.one_hot(targets, V) + 0.1 * jnp.cos(contexts[:, -1:] + jnp.arange(V))

    ref = (lambda contexts: jax.nn.log_softmax(jnp.sin(contexts[:, -1:] * 1.0 + jnp.arange(V)))) if kl else None
    return xl.NextTokenFns(logits_fn, batch_fn, reward_fn, ref)


def _params():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return {"table": jax.random.normal(k1, (V, V)), "bias": jax.random.normal(k2, (V,))}


@pytest.mark.parametrize("mixing", ["pi", "uniform"])
def test_clipped_objective_has_the_exhaustive_gradient_at_the_lagged_policy(mixing):
    logits = jax.random.normal(jax.random.PRNGKey(1), (V,))
    w = jax.random.normal(jax.random.PRNGKey(2), (V,))
    g_clip = jax.grad(lambda z: xl.clipped_objective(z, logits, w, mixing, 0.2))(logits)
    g_ex = jax.grad(lambda z: exhaustive.exhaustive_objective(z, w, mixing))(logits)
    np.testing.assert_allclose(g_clip, g_ex, rtol=1e-5, atol=1e-7)


def test_clipping_stops_the_gradient_outside_the_trust_region():
    lag = jnp.zeros((V,))
    logits = lag.at[0].set(2.0)  # pi(0) / pi_lag(0) >> 1.2
    w = jnp.zeros((V,)).at[0].set(1.0)
    g = jax.grad(lambda z: xl.clipped_objective(z, lag, w, "uniform", 0.2))(logits)
    np.testing.assert_allclose(g, 0.0, atol=1e-7)


def _adam(rate):
    return optim.OptimizerConfig(name="adam", learning_rate=rate)


def test_chunk_equals_step_by_step_and_does_not_recompile(count_compiles):
    cfg = xl.ExhaustiveConfig(scheme="softmax", tau=0.5, policy=_adam(0.05), lag_every=2, kl_coef=0.1,
                              entropy_coef=0.01)
    mcfg = monitors.MonitorConfig(window=4, min_steps=1)
    task = _task(kl=True)
    data_key, explore_key = jax.random.PRNGKey(7), jax.random.PRNGKey(8)
    run = xl.make_train_chunk(task, cfg, mcfg, chunk=5)
    state, metrics = run(xl.init_state(_params(), cfg, mcfg), data_key, explore_key)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(s, batch, k):
        return xl.train_step(s, batch, k, task=task, cfg=cfg, monitor_cfg=mcfg)

    ref = xl.init_state(_params(), cfg, mcfg)
    for t in range(5):
        ref, m = step(ref, task.batch_fn(jax.random.fold_in(data_key, t)), jax.random.fold_in(explore_key, t))
        np.testing.assert_allclose(metrics["train/loss"][t], m["train/loss"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(metrics["train/kl_ref"][t], m["train/kl_ref"], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(state.params("policy")), jax.tree.leaves(ref.params("policy"))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with count_compiles() as compiled:
        state, _ = run(state, data_key, explore_key)
    assert compiled == [] and int(state.step) == 10
    # lag_every=2: after 10 steps the lagged policy equals the current one.
    for a, b in zip(jax.tree.leaves(state.params("policy")), jax.tree.leaves(state.params("lagged"))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", ["exhaustive", "sampled"])
def test_training_raises_the_expected_reward(mode):
    cfg = xl.ExhaustiveConfig(scheme="softmax", tau=0.3, mode=mode, mixing="pi", policy=_adam(0.1), clip_eps=0.0)
    mcfg = monitors.MonitorConfig()
    run = xl.make_train_chunk(_task(), cfg, mcfg, chunk=60)
    _, metrics = run(xl.init_state(_params(), cfg, mcfg), jax.random.PRNGKey(3), jax.random.PRNGKey(4))
    r = np.asarray(metrics["train/expected_reward"])
    assert r[-10:].mean() > r[:10].mean() + 0.1


@pytest.mark.parametrize("field,value", [("mode", "greedy"), ("mixing", "beta"), ("clip_eps", 1.5),
                                         ("lag_every", 0), ("scheme", "nope"), ("tau", 0.0)])
def test_invalid_config(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(xl.ExhaustiveConfig(), **{field: value})


@dataclasses.dataclass(frozen=True)
class _PopCfg(xl.ExhaustiveConfig):
    seed: int = 0
    population: int = 1
    batch_size: int = B
    chunk: int = 3
    eval_chars: int = 8
    eval_batch: int = 4


def _init_params(seed):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {"table": jax.random.normal(k1, (V, V)), "bias": jax.random.normal(k2, (V,))}


def _windows(limit):
    rng = np.random.default_rng(0)
    ctx = rng.integers(0, V, (limit or 8, C))
    tgt = (ctx[:, -1] * 3 + 1) % V
    return [(ctx[i:i + 4], tgt[i:i + 4]) for i in range(0, len(tgt), 4)]


def _population_run(population, seed=0, calls=2):
    cfg = _PopCfg(scheme="softmax", tau=0.5, policy=_adam(0.05), lag_every=2, population=population, seed=seed,
                  kl_coef=0.1)
    testbed = xl.NextTokenTestbed(cfg, _task(kl=True), _init_params, _windows, total_steps=9)
    from rlsoft.driver import stream_keys

    state, keys, metrics = testbed.init_state(), stream_keys(seed, testbed.streams), []
    for c in range(calls):
        state, m = testbed.train(state, c * cfg.chunk, cfg.chunk, keys)
        metrics.append(m)
    return testbed, state, metrics


def test_population_equals_separate_runs():
    """Member p of a population of 3 is the run of seed p: parameters, metrics and eval."""
    testbed, state, metrics = _population_run(3)
    evals = testbed.evaluate(state)
    for p in range(3):
        single, single_state, single_metrics = _population_run(1, seed=p)
        chex.assert_trees_all_close(testbed.member_params(state, p), single.member_params(single_state),
                                    rtol=1e-6, atol=1e-6)
        for m, sm in zip(metrics, single_metrics):
            np.testing.assert_allclose(m[f"train/member{p}/loss"], sm["train/loss"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(m[f"train/member{p}/weights/effective_n"], sm["train/weights/effective_n"],
                                       rtol=1e-5)
        single_eval = single.evaluate(single_state)
        for k in ("cross_entropy", "top1", "perplexity"):
            np.testing.assert_allclose(evals[f"eval/member{p}/{k}"], single_eval[f"eval/{k}"], rtol=1e-5)
    np.testing.assert_allclose(metrics[-1]["train/loss"],
                               np.mean([metrics[-1][f"train/member{p}/loss"] for p in range(3)], axis=0), rtol=1e-6)


def test_population_has_no_recompiles_after_the_first_call(count_compiles):
    testbed, state, _ = _population_run(2, calls=1)
    testbed.evaluate(state)
    with count_compiles() as seen:
        state, _ = testbed.train(state, 3, 3, None)
        testbed.evaluate(state)
    assert seen == []


SMOKE = ["--preset=smoke", f"--text_file={TEXT}"]


@pytest.mark.skipif(not TEXT.exists(), reason="shared tinyshakespeare file absent")
def test_experiment_smoke(tmp_path, capsys):
    result = char_exp.main([*SMOKE, f"--logdir={tmp_path}", "--kl_coef=0.05", "--entropy_coef=0.01"])
    out = capsys.readouterr().out
    assert "n-gram reference" in out and "char GPT, RL" in out and "sample:" in out and "perplexity" in out
    assert np.isfinite(result["final"]["eval/cross_entropy"])
    np.testing.assert_allclose(result["final"]["eval/perplexity"], np.exp(result["final"]["eval/cross_entropy"]))
    assert len(result["sample"]) == 40
    assert [h["step"] for h in result["history"]] == list(range(20))
    assert [h["step"] for h in result["history"] if "eval/top1" in h] == [9, 19]
    from tensorboard_events import read_scalars

    run_dirs = os.listdir(tmp_path)
    assert len(run_dirs) == 1 and run_dirs[0].startswith("char-softmax-tau0.5-seed0-")
    tags = read_scalars(str(tmp_path / run_dirs[0]))
    for tag in ("train/loss", "train/entropy", "train/kl_ref", "train/weights/effective_n", "train/skipped_updates",
                "health/calibration_error", "health/collapse_share", "health/grad_norm_var", "eval/top1",
                "eval/cross_entropy", "eval/perplexity"):
        assert tag in tags, tag
    assert [s for s, _ in tags["train/loss"]] == list(range(20))


@pytest.mark.parametrize("flag", ["--scheme=nope", "--mode=x", "--context=0", "--text_file=/nonexistent/file.txt",
                                  "--bogus=1", "--model_preset=huge", "--smoothing=nan", "--smoothing=-1",
                                  "--learning_rate=nan", "--policy.b1=1.0", "--resume", "--chunk=0",
                                  "--population=0", "--tau=hot"])
def test_bad_flags_exit_2_with_one_line(flag, capsys):
    with pytest.raises(SystemExit) as e:
        char_exp.main(["--preset=smoke", f"--text_file={TEXT}", flag])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m experiments.char: error:"), err


def test_text_shorter_than_a_context_exits_2(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("abc\n" * 3)
    with pytest.raises(SystemExit) as e:
        char_exp.main(["--preset=smoke", f"--text_file={short}", "--context=32"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0], err


def _subprocess(flags, mode, out, *extra):
    import json
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, str(ROOT / "tests" / "run_experiment.py"), "char", json.dumps(flags), mode,
                           str(out), *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # a subprocess run (or several); minutes on a 2-core machine
@pytest.mark.skipif(not TEXT.exists(), reason="shared tinyshakespeare file absent")
def test_killed_and_resumed_run_ends_with_bit_identical_params(tmp_path):
    flags = [*SMOKE, "--steps=20", "--chunk=5", "--checkpoint_every=5", "--eval_every=0", "--kl_coef=0.05"]
    ref = _subprocess(flags, "full", tmp_path / "ref.npz")
    assert ref.returncode == 0, ref.stderr[-2000:]
    run_flags = flags + [f"--logdir={tmp_path / 'runs'}", "--run_name=r"]
    killed = _subprocess(run_flags, "kill", tmp_path / "unused.npz", "10")
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = _subprocess(run_flags + ["--resume"], "full", tmp_path / "resumed.npz")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "at step 10" in resumed.stderr
    with np.load(tmp_path / "ref.npz") as a, np.load(tmp_path / "resumed.npz") as b:
        assert sorted(a.files) == sorted(b.files) and int(b["step"]) == 20
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.skipif(not TEXT.exists(), reason="shared tinyshakespeare file absent")
def test_sigterm_writes_a_checkpoint_and_exits_143(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "experiments.char", *SMOKE, "--steps=100000", "--chunk=5", "--checkpoint_every=0",
           "--eval_every=0", f"--logdir={tmp_path}", "--run_name=r"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    events = tmp_path / "r"
    deadline = time.time() + 300
    while time.time() < deadline and not (events.exists() and any(p.name.startswith("events") for p in events.iterdir())):
        time.sleep(0.5)  # the event file appears once the first chunk is logged
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err and "resume with --resume" in err
    steps = [int(p.name) for p in (events / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and steps[0] % 5 == 0 and steps[0] > 0


@pytest.mark.skipif(not TEXT.exists(), reason="shared tinyshakespeare file absent")
def test_compile_ahead_leaves_the_run_nothing_to_compile(tmp_path, count_compiles):
    cfg = char_exp.parse_flags(char_exp.CharConfig, [*SMOKE, "--compile_cache="], presets=char_exp.PRESETS)
    driver, _ = char_exp.make_driver(cfg)
    with count_compiles() as seen:
        driver._compile_ahead(driver.testbed.total_steps)
    assert len(driver.compile_seconds) == 2 and {"jit(run)", "jit(evaluate)"} <= set(seen)
    with count_compiles() as seen:
        driver.run()
    assert not {"jit(run)", "jit(evaluate)"} & set(seen)
