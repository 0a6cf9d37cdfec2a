"""Smoke runs of the speed benchmarks at toy sizes (the figures themselves are not tested: speed
targets are reported as ratios by the scripts, never asserted in timed tests)."""
import json
import pathlib
import subprocess
import sys

import pytest

TEXT = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"

SMALL_WORKLOAD = ["--config=tiny", "--repeats=1", "--prompt_len=16", "--new_tokens=8"]


def _run(module, *flags):
    out = subprocess.run([sys.executable, "-m", module, *flags], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.slow  # a subprocess run (or several); minutes on a 2-core machine
def test_train_step_benchmark_runs_and_compares_with_torch():
    try:
        import transformers  # noqa: F401
        torch_side = True
    except ImportError:  # the dev extra brings it; without it the JAX side still runs
        torch_side = False
    stdout = _run("benchmarks.train_step", *SMALL_WORKLOAD, "--questions=2", "--group_size=2", "--micro_batches=2",
                  "--sweep=1", f"--torch={torch_side}", "--torch_1thread=false")
    assert "| tiny | update |" in stdout and "| tiny | per_row |" in stdout and "| tiny | rl_step |" in stdout
    if torch_side:  # same weights, batch and loss: the first step's pre-clip gradient norms agree
        import json

        norms = json.loads(stdout.splitlines()[0])["tiny"]["grad_norm_first_step"]
        assert norms["jax"] == pytest.approx(norms["torch"], rel=1e-4)


@pytest.mark.slow  # a subprocess run (or several); minutes on a 2-core machine
@pytest.mark.skipif(not TEXT.exists(), reason="shared tinyshakespeare file absent")
def test_char_benchmark_times_the_experiments_step_against_the_per_candidate_baseline():
    import json

    stdout = _run("benchmarks.char", f"--text_file={TEXT}", "--model_preset=tiny", "--context=8", "--batch=8",
                  "--chunk=2", "--rounds=1", "--candidates_per_pass=13", "--population=2")
    figures = json.loads(stdout.splitlines()[0])
    assert set(figures["seconds_per_step"]) == {"exhaustive", "per_candidate_k13", "population_2"}
    assert figures["check"]["grad_rel_diff"] < 1e-5  # the baseline takes the testbed's gradient
    assert figures["population_vs_separate"] > 0
    assert "experiments.char step (2 steps / call)" in stdout and "population of 2 (per member-step)" in stdout


@pytest.mark.slow  # a subprocess run (or several); minutes on a 2-core machine
def test_rollout_benchmark_runs():
    stdout = _run("benchmarks.rollout", *SMALL_WORKLOAD, "--batch=4", "--group_size=2", "--chunk=4", "--hf=false")
    assert "jax" in stdout and "generic" in stdout


def test_benchmark_flags_are_checked():
    out = subprocess.run([sys.executable, "-m", "benchmarks.train_step", "--sweep=3"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "sweep" in out.stderr


# Every numeric flag is checked for its domain in-process: one line on stderr, exit 2, nothing run.
BAD_FLAGS = [
    ("benchmarks.bandit", "--lr=inf"), ("benchmarks.bandit", "--lr=nan"), ("benchmarks.bandit", "--lr=0"),
    ("benchmarks.bandit", "--seed=-1"), ("benchmarks.bandit", "--seed=99999999999999999999"),
    ("benchmarks.bandit", "--seeds=1"), ("benchmarks.bandit", "--loop_steps=-3"),
    ("benchmarks.char", "--learning_rate=inf"), ("benchmarks.char", "--learning_rate=nan"),
    ("benchmarks.char", "--learning_rate=-1e-3"), ("benchmarks.char", "--tau=inf"), ("benchmarks.char", "--tau=nan"),
    ("benchmarks.char", "--tau=0"), ("benchmarks.char", "--seed=-1"), ("benchmarks.char", "--batch=0"),
    ("benchmarks.char", "--text_file=/nonexistent/tiny.txt"), ("benchmarks.char", "--population=1"),
    ("benchmarks.rollout", "--seed=-1"), ("benchmarks.rollout", "--threads=-1"), ("benchmarks.rollout", "--chunk=0"),
    ("benchmarks.train_step", "--learning_rate=inf"), ("benchmarks.train_step", "--learning_rate=nan"),
    ("benchmarks.train_step", "--learning_rate=-1e-5"), ("benchmarks.train_step", "--seed=-1"),
    ("benchmarks.train_step", "--repeats=0"),
    ("benchmarks.countdown_population", "--population=1"), ("benchmarks.countdown_population", "--repeats=0"),
]


@pytest.mark.parametrize("module,flag", BAD_FLAGS, ids=[f"{m.split('.')[1]}{f}" for m, f in BAD_FLAGS])
def test_benchmark_numeric_flags_exit_2(module, flag, capsys, monkeypatch):
    import importlib
    import os

    # benchmarks.bandit sets XLA_FLAGS on import (setdefault); keep it out of later subprocesses.
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as e:
        main([flag])
    assert e.value.code == 2
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0] and flag[2:].split("=")[0] in err[0], err
    assert out.out == ""


@pytest.mark.slow  # two compiles of the Countdown testbed: ~40 s of CPU
def test_countdown_population_benchmark_times_the_experiments_step(tmp_path, capsys):
    from benchmarks import countdown_population

    out = countdown_population.main(["--population=2", "--questions=2", "--repeats=2",
                                     f"--out={tmp_path / 'pop.json'}"])
    assert json.loads((tmp_path / "pop.json").read_text()) == json.loads(json.dumps(out))
    assert out["time_ratio_batch_over_one"] > 0 and out["population_bound"] == pytest.approx(
        2 / out["time_ratio_batch_over_one"])
    # Every part was timed on every round of both steps (the wrappers saw the real calls).
    assert all(v > 0 for parts in out["part_s"].values() for v in parts.values())
    assert "could at best run" in capsys.readouterr().out


@pytest.fixture
def think_bench(monkeypatch):
    """benchmarks.think (its configs need torch), imported with its OMP_WAIT_POLICY default kept out
    of later subprocesses."""
    import os

    pytest.importorskip("torch")
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    from benchmarks import think

    return think


@pytest.mark.slow  # one compile of the experiment's population step: ~45 s of CPU
def test_think_benchmark_times_the_population_against_torch(tmp_path, capsys, think_bench):
    # In-process, toy sizes, one compile (no P = 1 member): the figures' keys and that they are finite.
    import json
    import math

    think = think_bench
    out = tmp_path / "think.json"
    figures = think.main(["--batch_size=4", "--group_size=2", "--d_model=8", "--n_layer=1", "--n_head=2",
                          "--population=2", "--chunk=1", "--rounds=1", "--torch_steps=1", "--member=false",
                          "--threads=1", "--matmul_n=64", f"--out={out}"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(figures))
    stdout = capsys.readouterr().out
    assert json.loads(stdout.splitlines()[0]) == json.loads(json.dumps(figures))
    assert "| JAX population, P=2 (1 steps / call) |" in stdout and "| PyTorch, original style" in stdout
    assert set(figures["seed_steps_per_s"]) == {"jax_population", "torch"}
    assert figures["speedup_member_vs_torch"] is None
    rates = [*figures["seed_steps_per_s"].values(), *figures["gflop_per_s"].values(),
             *figures["matmul_gflop_per_s"].values(), figures["speedup_population_vs_torch"]]
    assert all(math.isfinite(v) and v > 0 for v in rates), rates
    assert figures["steps_per_s"]["jax_population"] == pytest.approx(figures["seed_steps_per_s"]["jax_population"] / 2,
                                                                     rel=1e-3)
    for flops in figures["flops_per_seed_step"].values():
        assert flops["total"] == sum(v for k, v in flops.items() if k != "total") > 0
    for losses in figures["losses"].values():
        assert all(math.isfinite(x) for x in losses["first_call"] + losses["after_rounds"])
    assert figures["torch_threads"] == 1 and figures["jax_devices"] and len(figures["loadavg_start"]) == 3


def test_think_benchmark_flops_per_step_by_hand(think_bench):
    think = think_bench
    cfg = think.BenchConfig(batch_size=2, group_size=3, d_model=4, n_layer=1, n_head=2, modulus=10,
                            thought_vocab=10, max_thoughts=1, num_operands=1)
    # thinker: n = k + T - 1 = 1 token, h = 1 head position, W = 10 + 10 + 2 = 22; rows = 6
    th = 6 * (1 * 1 * (24 * 16 + 4 * 1 * 4) + 1 * 2 * 4 * 22)
    # answerer: n = T + 1 = 2 tokens, h = 1
    ans = lambda rows: rows * (2 * 1 * (24 * 16 + 4 * 2 * 4) + 2 * 4 * 22)
    assert think.flops_per_step(cfg) == {"sample": th, "thinker_fwd_bwd": 3 * th, "reward": ans(6),
                                         "answerer_fwd_bwd": 3 * ans(2), "total": 4 * th + ans(6) + 3 * ans(2)}
    # JAX: the first thought from one pass per question (2 rows, not 6); V^T = 10 > 6 / 2: no reward table
    jax_th = th // 3
    assert think.flops_per_step(cfg, "jax") == {"sample": jax_th, "thinker_fwd_bwd": 3 * th, "reward": ans(6),
                                                "answerer_fwd_bwd": 3 * ans(2),
                                                "total": jax_th + 3 * th + ans(6) + 3 * ans(2)}


@pytest.mark.parametrize("flag", ["--chunk=0", "--population=0", "--rounds=0", "--torch_steps=0", "--threads=-1",
                                  "--learning_rate=nan", "--seed=-1", "--max_thoughts=1", "--group_size=1"])
def test_think_benchmark_flags_exit_2(flag, capsys, think_bench):
    with pytest.raises(SystemExit) as e:
        think_bench.main([flag])
    assert e.value.code == 2
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0] and out.out == "", err
