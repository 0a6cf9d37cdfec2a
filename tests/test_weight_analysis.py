"""experiments.weight_analysis: seed 001's Phase 2 numbers, the sweeps' shape, outputs, bad flags."""
import os

import pytest

from experiments import weight_analysis as wa

# Seed 001, Phase 2 (2 decimals): softmax weight on correct / effective N, and linear's weight.
SEED_SOFTMAX = {1.0: (2.33, 6.38), 0.5: (4.33, 3.10), 0.1: (8.0, 1.0)}
SEED_LINEAR = 2.62
GROUPS = (4, 8, 16)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("weight_analysis")
    # A coarse sweep and three group sizes keep this fast; the defaults are checked elsewhere.
    return wa.main(["--sweep_points=5", f"--group_sizes={','.join(map(str, GROUPS))}", f"--out={out}"])


def _row(rows, scheme, **keys):
    (row,) = [r for r in rows if r["scheme"] == scheme and all(r[k] == v for k, v in keys.items())]
    return row


def test_seed_numbers(result):
    for tau, (w, n_eff) in SEED_SOFTMAX.items():
        row = _row(result["seed"], "softmax", tau=tau)
        assert row["weight_on_correct"] == pytest.approx(w, abs=0.005)
        assert row["effective_n"] == pytest.approx(n_eff, abs=0.005)
    linear = _row(result["seed"], "linear")
    assert linear["weight_on_correct"] == pytest.approx(SEED_LINEAR, abs=0.005)
    assert linear["vs_linear"] == pytest.approx(1.0)
    soft = _row(result["seed"], "softmax", tau=0.5)
    assert soft["vs_linear"] == pytest.approx(soft["weight_on_correct"] / linear["weight_on_correct"])


def test_every_scheme_and_tau_in_main_table(result):
    for name in wa.SCHEMES:
        n_rows = len([r for r in result["seed"] if r["scheme"] == name])
        assert n_rows == (3 if name in wa.TAU_SCHEMES else 1), name


def test_files_written_with_seed_numbers(result):
    md, png = result["paths"]["md"], result["paths"]["png"]
    assert os.path.getsize(png) > 10_000
    text = open(md).read()
    assert "| softmax | 1.00 | 2.33 | 6.38 |" in text
    assert "| softmax | 0.50 | 4.33 | 3.10 |" in text
    assert "| softmax | 0.10 | 8.00 | 1.00 |" in text
    assert "| linear | - | 2.62 |" in text


def test_tau_sweep_and_auto(result):
    soft = [r for r in result["tau_sweep"] if r["scheme"] == "softmax"]
    assert len(soft) == 5
    # Lower tau concentrates weight on the correct sample: weight up, effective N down.
    ws = [r["weight_on_correct"] for r in soft]
    ns = [r["effective_n"] for r in soft]
    assert ws == sorted(ws, reverse=True) and ns == sorted(ns)
    auto = _row(result["tau_auto"], "softmax")
    assert auto["tau"] == pytest.approx(0.55)  # (1.1 - 0) / 2


def test_sparsity_sweep(result):
    rows = result["sparsity"]
    for name in wa.SCHEMES:
        assert [r["G"] for r in rows if r["scheme"] == name] == list(GROUPS)
    for g in GROUPS:
        assert _row(rows, "best_of_n", G=g)["weight_on_correct"] == pytest.approx(g)
        assert _row(rows, "raw", G=g)["weight_on_correct"] == pytest.approx(1.1)
    # Softmax's weight on the lone correct sample grows with G but never reaches best_of_n's G.
    soft = [_row(rows, "softmax", G=g)["weight_on_correct"] for g in GROUPS]
    assert all(a < b for a, b in zip(soft, soft[1:]))
    assert all(1.0 < w < g for w, g in zip(soft, GROUPS))
    # G = 8 is exactly the seed's group (as a multiset), so it must match the main table.
    assert _row(rows, "softmax", G=8)["weight_on_correct"] == pytest.approx(
        _row(result["seed"], "softmax", tau=0.5)["weight_on_correct"], rel=1e-5)


def test_no_plot(tmp_path):
    res = wa.main(["--preset=tiny", "--plot=false", f"--out={tmp_path}"])
    assert "png" not in res["paths"] and os.path.exists(res["paths"]["md"])
    assert not os.path.exists(tmp_path / "weight_analysis.png")


@pytest.mark.parametrize("flag", ["--taus=-1", "--nope=1", "--group_sizes=1,8", "--taus=", "--sweep_points=1",
                                  "--sweep_min=5", "--sparsity_tau=inf", "--taus=abc",
                                  # every numeric field's domain: NaN, infinities, negatives, zero, bounds
                                  "--taus=nan", "--taus=1,inf", "--taus=0", "--taus=1,1", "--sweep_min=nan",
                                  "--sweep_min=-inf", "--sweep_min=0", "--sweep_max=nan", "--sweep_max=inf",
                                  "--sweep_max=-1", "--sweep_points=-3", "--sweep_points=1001",
                                  "--group_sizes=-4", "--group_sizes=2048", "--group_sizes=4,4",
                                  "--sparsity_tau=nan", "--sparsity_tau=-inf", "--sparsity_tau=0", "--out="])
def test_bad_flags_exit_2(flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        wa.main([f"--out={tmp_path}", flag])  # the flag comes last, so --out= wins
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error" in err
    assert flag[2:].split("=")[0] in err  # the line names the flag
    assert not os.listdir(tmp_path)  # rejected before anything is computed or written
