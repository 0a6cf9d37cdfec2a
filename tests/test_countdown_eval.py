"""The Countdown eval as an instrument: standard errors, mean@k bookkeeping, the printed intervals."""
import dataclasses
import math
import re

import jax
import numpy as np
import pytest

from experiments import countdown
from rlsoft import eval_stats, rollout
from rlsoft.driver import stream_keys
from rlsoft.train_loop import LanguageTestbed


def _flags(tmp_path, *extra):
    return ["--preset=smoke", f"--cache_dir={tmp_path / 'cache'}", *extra]


def test_standard_errors_match_hand_values():
    # Greedy: p = 1/4 over n = 4 problems -> sqrt(0.25 * 0.75 / 4).
    assert eval_stats.binomial_se([1, 0, 0, 0]) == pytest.approx(math.sqrt(0.25 * 0.75 / 4), abs=1e-12)
    assert eval_stats.binomial_se([1, 1]) == 0.0 and math.isnan(eval_stats.binomial_se([]))
    # mean@k: per-problem means 0, 1/2, 1, 1/4: mean 0.4375, squared deviations sum 0.546875,
    # sample variance 0.546875 / 3, SE sqrt(0.18229167) / 2.
    assert eval_stats.mean_se([0, 0.5, 1, 0.25]) == pytest.approx(math.sqrt(0.546875 / 3) / 2, abs=1e-12)
    assert math.isnan(eval_stats.mean_se([0.5]))
    # Paired: differences 1, 0, 0, 1 -> mean 0.5, sample std sqrt(1/3), SE sqrt(1/3) / 2.
    d, se = eval_stats.paired([1, 1, 0, 1], [0, 1, 0, 0])
    assert d == 0.5 and se == pytest.approx(math.sqrt(1 / 3) / 2, abs=1e-12)
    low, high = eval_stats.interval(d, se)
    assert (low, high) == pytest.approx((0.5 - 1.96 * se, 0.5 + 1.96 * se), abs=1e-12)
    assert eval_stats.format_interval(0.25, 0.1) == "0.250 [0.054, 0.446]"
    assert eval_stats.format_interval(-0.05, 0.02, signed=True) == "-0.050 [-0.089, -0.011]"
    assert eval_stats.format_interval(0.0002, 0.0002) == "0.000 [0.000, 0.001]"  # never "-0.000"
    with pytest.raises(ValueError, match="0 or 1"):
        eval_stats.binomial_se([0.5, 1])
    with pytest.raises(ValueError, match="same problems"):
        eval_stats.paired([1, 0], [1])
    m = eval_stats.summarize({"success": np.array([1.0, 0, 0, 0]), "mean_at_k": np.array([0, 0.5, 1, 0.25]),
                              "reward": np.array([1.1, 0.1, 0, 0])})
    assert m == pytest.approx({"eval/success": 0.25, "eval/success_se": math.sqrt(0.25 * 0.75 / 4), "eval/mean_at_k": 0.4375,
                               "eval/mean_at_k_se": math.sqrt(0.546875 / 3) / 2, "eval/reward": 0.3})


class OddFirstToken:
    """The Countdown task with a success that a near-random model hits about half the time: the
    response's first token is odd. The eval's bookkeeping is then checked on varied outcomes."""

    def __init__(self, task):
        self.task = task

    def __getattr__(self, name):
        return getattr(self.task, name)

    def score(self, indices, split, responses):
        s = np.array([r[0] % 2 if len(r) else 0 for r in responses], np.float64)
        return {"reward": s, "success": s}


def test_mean_at_k_is_the_mean_of_the_sampled_rows_and_greedy_the_greedy_decode(tmp_path):
    k, batch = 3, 5  # 8 questions in batches of 5: a padded last batch
    cfg = countdown.parse_flags(countdown.CountdownConfig, _flags(tmp_path, f"--eval_k={k}", f"--eval_batch={batch}"),
                                presets=countdown.PRESETS)
    policy, params, task = countdown.build(cfg)
    bed = LanguageTestbed(cfg, policy, params, OddFirstToken(task))
    state, keys = bed.init_state(), stream_keys(cfg.seed, bed.streams)
    got = bed.eval_outcomes(state, keys)
    assert set(got) == {"success", "reward", "mean_at_k"} and len(got["success"]) == cfg.eval_questions == 8

    # Independently: a greedy decode, and k samples per question from a plain temperature-1 sampler
    # (rows 1..k of a group of 1 + k, the same draws; tests/test_rollout.py), scored one row at a time.
    sampling = dataclasses.replace(cfg.sampling, stop_ids=task.stop_ids, pad_id=task.pad_id, temperature=1.0)
    plain = rollout.make_sampler(policy.decode, sampling, 1 + k)
    greedy = rollout.make_sampler(policy.decode, dataclasses.replace(sampling, temperature=0.0), 1)
    params = state.params("policy")
    want_greedy, want_mean = [], []
    for lo in range(0, 8, batch):
        idx = list(range(lo, min(lo + batch, 8)))
        toks, mask = bed._prompts(idx, "eval")
        g_out = greedy(params, toks, mask, keys["eval"])
        s_out = plain(params, toks, mask, jax.random.fold_in(keys["eval"], lo))
        for i in range(len(idx)):
            want_greedy.append(list(np.asarray(g_out.tokens[i])[np.asarray(g_out.mask[i])])[0] % 2)
            rows = [list(np.asarray(s_out.tokens[i * (1 + k) + j])[np.asarray(s_out.mask[i * (1 + k) + j])])
                    for j in range(1, 1 + k)]
            want_mean.append(np.mean([bed.task.score([idx[i]], "eval", [r])["success"][0] for r in rows]))
    np.testing.assert_array_equal(got["success"], want_greedy)
    np.testing.assert_array_equal(got["mean_at_k"], want_mean)
    assert 0 < np.mean(got["mean_at_k"]) < 1 and len(set(got["mean_at_k"])) > 1  # varied outcomes


def test_printed_lines_carry_the_intervals_and_the_eval_compiles_once(tmp_path, capsys, count_compiles):
    result = countdown.main(_flags(tmp_path, "--eval_k=2"))
    out = capsys.readouterr().out
    num, signed = r"-?\d\.\d{3}", r"[+-]\d\.\d{3}"
    ci = rf"{num} \[{num}, {num}\]"
    assert re.search(rf"^eval success before RL: {ci}  mean@2: {ci}  \(95% CIs, 8 problems\)$", out, re.M), out
    assert re.search(rf"^eval success after RL:  {ci}  mean@2: {ci}  \(95% CIs, 8 problems\)$", out, re.M), out
    assert re.search(rf"^eval success after - before \(paired\): {signed} \[{signed}, {signed}\]  "
                     rf"mean@2: {signed} \[{signed}, {signed}\]$", out, re.M), out
    before, after = result["eval_before"], result["eval_after"]
    assert countdown.eval_line("before RL:", before) in out and countdown.eval_line("after RL: ", after) in out
    assert countdown.change_line(after, before) in out
    assert result["before"] == before["success"].mean() and len(after["mean_at_k"]) == 8
    # By hand: 1 of 4 solved greedily, sampled means 0, 1/2, 1, 1/4.
    hand = {"success": np.array([1.0, 0, 0, 0]), "mean_at_k": np.array([0, 0.5, 1, 0.25]), "k": 2}
    assert countdown.eval_line("before RL:", hand) == (
        "eval success before RL: 0.250 [-0.174, 0.674]  mean@2: 0.438 [0.019, 0.856]  (95% CIs, 4 problems)")
    assert countdown.change_line(hand, dict(hand, success=np.zeros(4), mean_at_k=np.zeros(4))) == (
        "eval success after - before (paired): +0.250 [-0.240, +0.740]  mean@2: +0.438 [+0.019, +0.856]")
    driver = result["driver"]
    with count_compiles() as compiled:  # a later eval reuses the compiled eval sampler
        driver.evaluate()
    assert compiled == []


def test_bad_eval_flags_exit_2(tmp_path, capsys):
    for flag in ("--eval_k=-1", "--eval_questions=0"):
        with pytest.raises(SystemExit) as e:
            countdown.main(_flags(tmp_path, flag))
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flag[2:].split("=")[0] in err[0], err
