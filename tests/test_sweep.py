"""experiments.sweep / rlsoft.sweep: arms x seeds, run files, resume, tables from the files."""
import json
import os
import pathlib

import numpy as np
import pytest

from experiments import sweep as sweep_exp
from rlsoft import stats
from rlsoft import sweep as sw

TEXT = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"

ARMS = "grpo: --scheme=linear; soft: --scheme=softmax --tau=0.5"
COMMON = "--preset=tiny --steps=20"


def bandit_sweep(tmp_path, *extra, name="t"):
    return sweep_exp.main(["bandit", f"--name={name}", f"--out={tmp_path}", "--seeds=3", f"--arms={ARMS}",
                           f"--common={COMMON}", *extra])


def test_parse_arms():
    arms = sw.parse_arms(" base: ; b: --tau=0.5 --lr=3 ;")
    assert arms == [sw.Arm("base", ()), sw.Arm("b", ("--tau=0.5", "--lr=3"))]
    for bad, match in [("x --tau=1", "name: --flag"), ("a b: --x=1", "name"), ("a: tau=1", "not a flag"),
                       ("a: ; a: --x=1", "named twice"), (" ; ", "empty")]:
        with pytest.raises(sw.SweepError, match=match):
            sw.parse_arms(bad)


def test_history_scores_finals_and_curves():
    history = [{"step": s, "train/reward": float(s)} for s in range(20)]
    history[9]["eval/acc"] = 0.25
    history[19]["eval/acc"] = 0.75
    final, curves = sweep_exp.history_scores(history)
    # train/*@end: the mean of the last 10% (steps 18, 19); @mean: of the whole run
    assert final == {"eval/acc": 0.75, "train/reward@end": 18.5, "train/reward@mean": 9.5}
    assert curves["eval/acc"] == [[9.0, 0.25], [19.0, 0.75]]
    assert len(curves["train/reward"]) == 20
    final, curves = sweep_exp.history_scores(history, lambda k: k.replace("eval/", ""), train=False)
    assert final == {"acc": 0.75} and set(curves) == {"acc"}


def test_bandit_sweep_writes_runs_and_a_table_from_them(tmp_path):
    bandit_sweep(tmp_path)
    out = tmp_path / "bandit" / "t"
    records = sw.load_runs(str(out))
    assert sorted((r.arm, r.seed) for r in records) == [(a, s) for a in ("grpo", "soft") for s in range(3)]
    assert all(r.program == "one program of 2 arms x 3 seeds" for r in records)
    text = (out / "table.md").read_text()
    soft = np.array([r.final["eval/p_best@mean"] for r in sorted(records, key=lambda r: r.seed) if r.arm == "soft"])
    grpo = np.array([r.final["eval/p_best@mean"] for r in sorted(records, key=lambda r: r.seed) if r.arm == "grpo"])
    row = next(l for l in text.splitlines() if l.startswith("| soft | 3 |"))
    assert stats.interval(soft).format(3) in row and stats.interval(soft, "iqm").format(3) in row
    assert stats.paired_difference(soft, grpo).format(3) in row
    assert stats.probability_of_improvement(soft, grpo).format(2) in row
    assert "Only 3 seed(s)" in text  # fewer than 5 seeds is said, not hidden
    assert (out / "curves.png").stat().st_size > 0
    assert sorted(os.listdir(out / "tb" / "soft")) == ["seed0", "seed1", "seed2"]
    assert "[bandit/t](bandit/t/table.md)" in (tmp_path / "index.md").read_text()
    # The one-program population equals each arm run alone (--population=false).
    bandit_sweep(tmp_path, "--population=false", name="alone")
    alone = {(r.arm, r.seed): r for r in sw.load_runs(str(tmp_path / "bandit" / "alone"))}
    assert {r.program for r in alone.values()} == {"one program of 1 arms x 3 seeds"}
    for r in records:
        a = alone[r.arm, r.seed]
        for k in ("eval/p_best", "eval/p_best@mean", "train/reward@end"):
            np.testing.assert_allclose(a.final[k], r.final[k], rtol=1e-5, atol=1e-7)


def test_killed_sweep_resumes_without_rerunning(tmp_path, monkeypatch, capsys):
    real = sweep_exp.RUNNERS["bandit"]

    def dies_after_two(cfg, todo):
        for i, record in enumerate(real(cfg, todo)):
            if i == 2:
                raise KeyboardInterrupt
            yield record

    monkeypatch.setitem(sweep_exp.RUNNERS, "bandit", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        bandit_sweep(tmp_path)
    out = tmp_path / "bandit" / "t"
    first = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("seed*.json")}
    assert len(first) == 2 and not list((out / "runs").rglob("*.tmp"))
    monkeypatch.setitem(sweep_exp.RUNNERS, "bandit", real)
    capsys.readouterr()
    bandit_sweep(tmp_path)
    assert "4 runs to do, 2 already done" in capsys.readouterr().out
    assert len(list((out / "runs").rglob("seed*.json"))) == 6
    assert all(p.stat().st_mtime_ns == t for p, t in first.items())  # finished runs are never rerun
    capsys.readouterr()
    bandit_sweep(tmp_path, "--seeds=4")  # more seeds: only the new ones run
    assert "2 runs to do, 6 already done" in capsys.readouterr().out


def test_changed_arm_is_refused_unless_allowed(tmp_path, capsys):
    bandit_sweep(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sweep_exp.main(["bandit", "--name=t", f"--out={tmp_path}", "--seeds=3", f"--common={COMMON}",
                        "--arms=grpo: --scheme=linear --lr=10; soft: --scheme=softmax --tau=0.5"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "arm grpo changed" in err
    spec = json.loads((tmp_path / "bandit" / "t" / "sweep.json").read_text())
    assert spec["arms"]["grpo"] == ["--scheme=linear"]  # the refused spec was not written


@pytest.mark.parametrize("argv, match", [
    (["bandit", "--arms=a: --scheme=nope"], "nope"),
    (["bandit", "--arms=a: --taus=1,2"], "set by the sweep"),
    (["bandit", "--arms=a: --scheme=linear", "--first_seed=3"], "first_seed"),
    (["char", "--arms=a: --bogus=1"], "bogus"),
    (["think", "--arms=a: --modulus=1"], "modulus"),
    (["think", "--arms=a: --clean", "--baseline=b"], "baseline=b"),
    (["nothing", "--arms=a:"], "testbed"),
    (["char", "--arms=a: --tau=0.5", "--population=maybe"], "population='maybe'"),
    (["char", "--arms=a: --population=0"], "population=0"),
])
def test_bad_input_exits_2_before_anything_runs(tmp_path, capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        sweep_exp.main(argv + [f"--out={tmp_path}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and match in err
    assert not list(tmp_path.rglob("seed*.json"))


def test_update_readme_fills_blocks_from_files(tmp_path):
    (tmp_path / "results" / "x").mkdir(parents=True)
    (tmp_path / "results" / "x" / "table.md").write_text("# title\n| a |\n|---|\n\n![m](curves.png)\n")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results: x/table.md -->\nold, typed by hand\n<!-- /results -->\nend\n")
    assert sw.update_readme(str(readme), str(tmp_path / "results")) == ["x/table.md"]
    text = readme.read_text()
    assert "typed by hand" not in text and "| a |" in text and "**title**" in text and "# title" not in text
    assert f"![m]({tmp_path}/results/x/curves.png)" in text
    readme.write_text("<!-- results: y/table.md -->\n<!-- /results -->\n")
    with pytest.raises(sw.SweepError, match="does not exist"):
        sw.update_readme(str(readme), str(tmp_path / "results"))


def test_bandit_root_seed_in_common_draws_new_bandits(tmp_path):
    bandit_sweep(tmp_path, name="s0")
    sweep_exp.main(["bandit", "--name=s1", f"--out={tmp_path}", "--seeds=3", f"--arms={ARMS}",
                    f"--common={COMMON} --seed=1"])
    s0 = {(r.arm, r.seed): r.final["eval/p_best@mean"] for r in sw.load_runs(str(tmp_path / "bandit" / "s0"))}
    s1 = {(r.arm, r.seed): r.final["eval/p_best@mean"] for r in sw.load_runs(str(tmp_path / "bandit" / "s1"))}
    assert s0.keys() == s1.keys() and all(s0[k] != s1[k] for k in s0)


def test_every_study_is_a_valid_sweep_of_valid_command_lines():
    from experiments.studies import STUDIES
    from rlsoft.config import parse_flags

    for name in STUDIES:
        cfg = parse_flags(sweep_exp.SweepConfig, [f"--preset={name}"], presets=STUDIES)
        sweep_exp.validate_arms(cfg)  # exits 2 on a bad flag


def test_comparisons_are_paired_differences_from_the_files():
    recs = [sw.RunRecord(arm=a, seed=s, flags=[], final={"m": v, "n": 2 * v}, curves={}, wall_s=0, load_average=0)
            for a, vals in (("a", [0.1, 0.2, 0.3]), ("b", [0.2, 0.2, 0.5]), ("c", [0.0, 0.1, 0.1]))
            for s, v in enumerate(vals)]
    comps = sw.parse_comparisons("b - c; c - b [n]", ["a", "b", "c"])
    text = sw.summary_table(recs, ["a", "b", "c"], "a", "m", comparisons=comps)
    d = stats.paired_difference([0.2, 0.2, 0.5], [0.0, 0.1, 0.1])
    assert f"| b - c | m | 3 | {d.format(3)} |" in text
    assert f"| c - b | n | 3 | {stats.paired_difference([0.0, 0.2, 0.2], [0.4, 0.4, 1.0]).format(3)} |" in text
    with pytest.raises(sw.SweepError, match="not an arm"):
        sw.parse_comparisons("b - z", ["a", "b"])
    with pytest.raises(sw.SweepError, match="invalid"):
        sw.parse_comparisons("b minus c", ["b", "c"])


@pytest.mark.slow
def test_countdown_sweep_smoke_records_before_and_after(tmp_path):
    sweep_exp.main(["countdown", "--name=s", f"--out={tmp_path}", "--seeds=1",
                    "--arms=grpo: --scheme=linear; soft: --scheme=softmax --tau=0.5",
                    f"--common=--preset=smoke --cache_dir={tmp_path}/cache --checkpoint_every=0"])
    recs = sw.load_runs(str(tmp_path / "countdown" / "s"))
    assert sorted(r.arm for r in recs) == ["grpo", "soft"]
    for r in recs:
        assert {"eval/success", "eval/mean_at_k", "eval/success_before", "eval/success_gain"} <= set(r.final)
        assert r.final["eval/success_gain"] == pytest.approx(r.final["eval/success"] - r.final["eval/success_before"])
        assert "eval/success" in r.curves and "train/reward" in r.curves


def test_before_after_gain_is_over_the_same_problems():
    before = {"success": np.array([0.0, 1.0, 0.0, 0.0]), "mean_at_k": np.array([0.25, 0.5, 0.0, 0.0])}
    after = {"success": np.array([1.0, 1.0, 0.0, 1.0]), "mean_at_k": np.array([0.5, 0.75, 0.25, 0.5])}
    out = sweep_exp.before_after(before, after)
    assert out == {"eval/success_before": 0.25, "eval/success_gain": 0.5,
                   "eval/mean_at_k_before": 0.1875, "eval/mean_at_k_gain": 0.3125}
    assert sweep_exp.before_after(None, after) == {}


def _population_and_alone(out, args, pop_flags, alone_flags):
    """The same sweep of 2 seeds as one population and as one run per seed: {seed: record} each."""
    sweep_exp.main(args + ["--name=pop", *pop_flags])
    sweep_exp.main(args + ["--name=alone", *alone_flags])
    pop, alone = ({r.seed: r for r in sw.load_runs(str(out / name))} for name in ("pop", "alone"))
    assert {r.program for r in pop.values()} == {"population of 2 seeds"}
    assert {r.program for r in alone.values()} == {"one run"}
    return pop, alone


@pytest.mark.slow
def test_think_sweep_population_equals_separate_runs(tmp_path):
    args = ["think", f"--out={tmp_path}", "--seeds=2", "--arms=clean: --clean",
            "--common=--preset=smoke --steps=20 --chunk=10 --eval_every=10"]
    pop, alone = _population_and_alone(tmp_path / "think", args, [], ["--population=false"])
    for s in (0, 1):
        assert pop[s].final.keys() == alone[s].final.keys()
        for k in pop[s].final:
            np.testing.assert_allclose(pop[s].final[k], alone[s].final[k], rtol=1e-5, atol=1e-6)
        # member s's eval curve in the population is its own run's curve
        assert [p[0] for p in pop[s].curves["accuracy"]] == [p[0] for p in alone[s].curves["accuracy"]]
        np.testing.assert_allclose([p[1] for p in pop[s].curves["accuracy"]],
                                   [p[1] for p in alone[s].curves["accuracy"]], atol=1e-6)


@pytest.mark.slow  # three char runs (one a population): about a minute on 2 cores
@pytest.mark.skipif(not TEXT.exists(), reason="shared tinyshakespeare file absent")
def test_char_sweep_population_scores_each_member_as_its_own_run(tmp_path):
    """--population=true runs both seeds in one program; every score and curve of each member equals
    its own run's (--population=false), train metrics included."""
    args = ["char", f"--out={tmp_path}", "--seeds=2", "--arms=soft: --scheme=softmax --tau=0.5",
            f"--common=--preset=smoke --text_file={TEXT} --checkpoint_every=0 --compile_cache="]
    # --population=auto: one run per seed on a CPU
    pop, alone = _population_and_alone(tmp_path / "char", args, ["--population=true"], [])
    for s in (0, 1):
        assert pop[s].final.keys() == alone[s].final.keys()
        assert {"eval/cross_entropy", "train/weights/effective_n@end", "train/loss@mean"} <= set(pop[s].final)
        for k in pop[s].final:
            np.testing.assert_allclose(pop[s].final[k], alone[s].final[k], rtol=1e-5, atol=1e-6, err_msg=k)
        assert pop[s].curves.keys() == alone[s].curves.keys()
        for k in pop[s].curves:
            np.testing.assert_allclose(pop[s].curves[k], alone[s].curves[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert pop[0].final["eval/cross_entropy"] != pop[1].final["eval/cross_entropy"]


def test_member_names_map_a_population_history_to_single_run_names():
    rename = sweep_exp.member_names(1, 3)
    assert rename("eval/member1/top1") == "eval/top1"
    assert rename("train/member1/weights/effective_n") == "train/weights/effective_n"
    assert rename("eval/member0/top1") is None and rename("eval/top1") is None and rename("train/loss") is None
    assert sweep_exp.member_names(0, 1)("train/loss") == "train/loss"
