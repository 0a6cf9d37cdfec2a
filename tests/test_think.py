"""experiments.think: the thinking-token command line (smoke learning, searches, bad input)."""
import numpy as np
import pytest

from experiments import think

TINY = ["--modulus=10", "--thought_vocab=4", "--max_thoughts=3", "--fixed_length=false", "--batch_size=8",
        "--group_size=4", "--steps=4", "--chunk=2", "--eval_every=0", "--checkpoint_every=0", "--progress=false",
        "--test_questions=16", "--train_questions=16"]


def test_smoke_blind_super_clean_rises_well_above_chance(capsys):
    """M = 10 (chance 0.1): the thinker learns to spell the answer on the training questions."""
    result = think.main(["--preset=smoke"])
    final = result["final"]
    assert final["train_accuracy"][0] >= 0.4, final
    assert final["hand_accuracy"][0] >= 0.9, final  # super: the answerer reads the hand-made digits
    assert "hand_accuracy" in capsys.readouterr().out
    entropies = [row["train/thought_entropy"] for row in result["history"]]
    assert entropies[-1] < entropies[0]


@pytest.mark.slow  # two compiles of a population with a search: over a minute each on 2 cores
@pytest.mark.parametrize("search", ["enumerate", "mctx"])
def test_searches_run_end_to_end_with_a_population(search):
    flags = TINY + [f"--search={search}", "--population=2", "--num_simulations=4", "--blind"]
    final = think.main(flags)["final"]
    for name in ("accuracy", "hand_accuracy", "shuffled_accuracy", "thought_entropy", "mutual_information",
                 "hand_match", "train_accuracy"):
        assert final[name].shape == (2,) and np.all(np.isfinite(final[name])), name


def test_no_think_baseline_reads_the_question():
    result = think.main(TINY + ["--no_think", "--steps=2"])
    assert set(result["final"]) == {"accuracy", "train_accuracy"}
    assert "train/thinker_loss" not in result["history"][-1]


@pytest.mark.parametrize("flag, message", [
    ("--modulus=1", "modulus=1"),
    ("--max_thoughts=1", "max_thoughts=1"),
    ("--search=tree", "search='tree' is unknown"),
    ("--population=0", "population=0"),
    ("--thinker.b1=1.5", "thinker.b1=1.5"),
    ("--token_epsilon=nan", "token_epsilon=nan"),
])
def test_bad_flags_exit_2_with_one_line(flag, message, capsys):
    with pytest.raises(SystemExit) as e:
        think.main([flag])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_exclusive_and_too_large_settings_exit_2_before_compiling(capsys):
    for flags, message in ((["--no_think", "--blind"], "exclusive"),
                           (["--search=enumerate", "--thought_vocab=100"], "use --search=mctx")):
        with pytest.raises(SystemExit) as e:
            think.main(flags)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
