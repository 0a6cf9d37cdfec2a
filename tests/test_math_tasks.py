"""MATH: the public layouts and filters; the math-verify reward on right, wrong and equivalent forms;
the verifier under adversarial input (bounded time, no exceptions); a hung worker killed and replaced;
and a smoke run of `python -m experiments.math --task=math` on a tiny random Hugging Face Qwen2."""
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from envs import hendrycks_math
from envs.math_data import MathDataError
from envs.math_verify_reward import (MAX_ANSWER_CHARS, AnswerChecker, boxed, extract_answer, format_reward,
                                     last_number)
from math_fixtures import MATH_ROWS, prompt_corpus, write_checkpoint, write_rows

TIMEOUT_S = 2.0
# A call is the comparison (<= TIMEOUT_S, pebble kills past it) plus, after a kill, a worker's restart
# (a forkserver fork and imports: a few seconds on 2 busy cores).
CALL_BOUND_S = TIMEOUT_S + 10.0


@pytest.fixture(scope="module")
def checker():
    c = AnswerChecker(workers=2, timeout_s=TIMEOUT_S)
    c.check(["1"], ["2"])  # start the workers outside the timed calls
    yield c
    c.close()


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_load_both_layouts_and_filters(tmp_path, suffix):
    path = write_rows(tmp_path / f"test{suffix}", MATH_ROWS)
    problems = hendrycks_math.load(path)
    assert [p.gold for p in problems] == ["\\frac{1}{2}", "3", "\\frac{\\sqrt{3}}{2}", "8", "(-1, 1)"]
    assert [p.level for p in problems] == [1, 2, 4, 5, None]
    assert problems[3].type == "Counting & Probability"
    assert [p.gold for p in hendrycks_math.load(path, levels=(4, 5))] == ["\\frac{\\sqrt{3}}{2}", "8"]
    assert [p.gold for p in hendrycks_math.load(path, types=("Algebra",))] == ["3", "(-1, 1)"]
    assert [p.gold for p in hendrycks_math.load(path, levels=(2,), types=("Algebra", "Prealgebra"))] == ["3"]
    with pytest.raises(MathDataError, match=r"no row has level in \[4, 5\] and type in \['Algebra'\]"):
        hendrycks_math.load(path, levels=(4, 5), types=("Algebra",))


def test_math500_layout(tmp_path):
    """MATH-500's test.jsonl: an integer level and `subject` for the type."""
    rows = [{"problem": "p", "solution": "so $\\boxed{2}$", "answer": "2", "subject": "Algebra", "level": 3}]
    (p,) = hendrycks_math.load(write_rows(tmp_path / "m.jsonl", rows), levels=(3,), types=("Algebra",))
    assert (p.gold, p.level, p.type) == ("2", 3, "Algebra")


@pytest.mark.parametrize("row,message", [
    ({"problem": "p", "solution": "no box"}, "row 0 has no \\boxed{} answer in 'solution'"),
    ({"problem": "p", "solution": "\\boxed{}"}, "row 0 has no \\boxed{} answer"),
    ({"problem": "p"}, "row 0 has no field 'solution'"),
    ({"problem": "p", "solution": "\\boxed{1}", "level": [5]}, "field 'level' is list"),
])
def test_bad_rows_are_one_line(tmp_path, row, message):
    path = write_rows(tmp_path / "bad.jsonl", [row])
    with pytest.raises(MathDataError) as e:
        hendrycks_math.load(path)
    assert str(e.value).startswith(f"data={path} is invalid; ") and message in str(e.value), str(e.value)


@pytest.mark.parametrize("value,level", [("Level 5", 5), (5, 5), ("3", 3), ("Level ?", None), (None, None)])
def test_parse_level(value, level):
    assert hendrycks_math.parse_level(value) == level


def test_boxed_and_extraction():
    assert boxed("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert boxed("\\boxed{1} then \\boxed{2}") == "2"  # the last
    # The box that starts last, as the MATH reference code's last_boxed_only_string (rfind).
    assert boxed("\\boxed{a \\boxed{b} c}") == "b"
    assert boxed("\\boxed{2} and an open \\boxed{") == "2"
    assert boxed("\\fbox{3}") == "3" and boxed("none") is None and boxed("\\boxed{") is None
    assert extract_answer("<answer>so \\boxed{7}</answer> \\boxed{8}") == "7"  # the answer block first
    assert extract_answer("<answer> 3x+1 </answer>") == "3x+1"
    assert extract_answer("it is 12") is None  # MATH: no last-number fallback
    assert extract_answer("it is 12", last_number_fallback=True) == "12"
    assert last_number("-1,234.5 and then 7.") == "7" and last_number("paid -1,234.5") == "-1234.5"


@pytest.mark.parametrize("completion,fmt", [
    ("r</think>\n<answer>\\boxed{5}</answer>", 1.0),
    ("r</think>\n<answer>\\boxed{5}</answer>\n", 1.0),
    ("r</think> the answer is \\boxed{5}", 0.6),  # think block + a \boxed{} in place of the answer block
    ("the answer is \\boxed{5}", 0.5),
    ("r</think> <answer>5</answer> extra", 0.6),
    ("r</think> nothing", 0.1),
    ("nothing", 0.0),
])
def test_format_reward(completion, fmt):
    assert format_reward(completion) == pytest.approx(fmt)


@pytest.mark.parametrize("gold,answer,correct", [
    ("\\frac{1}{2}", "0.5", 1), ("0.5", "\\frac{1}{2}", 1), ("\\frac{1}{2}", "0.50", 1), ("\\dfrac{1}{2}", "\\frac12", 1),
    ("1000", "1,000", 1), ("1000", "1{,}000", 1), ("10", "10.0", 1), ("8", "2^3", 1), ("2\\sqrt{2}", "\\sqrt{8}", 1),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}", 1), ("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2", 1),
    ("(-1, 1)", "(-1,1)", 1), ("x^2+1", "1+x^2", 1), ("\\{1, 2\\}", "\\{2, 1\\}", 1), ("5", "x = 5", 1),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)", 1),
    ("\\frac{1}{2}", "\\frac{1}{3}", 0), ("(-1, 1)", "[-1, 1]", 0), ("3", "-3", 0), ("\\frac{1}{3}", "0.333", 0),
    ("1000", "1000.5", 0), ("\\pi", "3.14159", 0),
])
def test_equivalent_forms(checker, gold, answer, correct):
    r = checker.rewards([f"r</think>\n<answer>\\boxed{{{answer}}}</answer>"], [gold])
    assert r.correct[0] == correct and r.reward[0] == pytest.approx(0.1 + correct)


ONE_MB = 1 << 20
# Answers math-verify gives up on (its own alarm, or the pool's kill at TIMEOUT_S), huge numbers and deep
# nesting, or works on for seconds.
SLOW_ADVERSARIAL = [
    "10^{999999999}", "10^{10^{10^{10}}}", "2^{2^{2^{2^{2^{20}}}}}", "(10^{100})!", "9!!!!!!",
    "\\binom{10^{6}}{5\\cdot10^{5}}", "\\Gamma(10^{9})", "{" * 400 + "1" + "}" * 400, "(" * 400 + "1" + ")" * 400,
    "1e999999", "i^{i^{i}}", "x^{x^{x^{x}}}", "1" + "+1" * 450,  # ~1-2 s each
]
FAST_ADVERSARIAL = [
    "9" * 999, "\\frac{1}{0}", "0/0", "\\log_0 5", "\\frac{" * 150 + "1" + "}{2}" * 150,
    "\\sqrt{" * 150 + "2" + "}" * 150, "\\frac{1}{", "}}}{{{", "\\left(", "$$$$", "\\\\" * 400, "^" * 999, "_{" * 300,
    "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}",
    "½", "٣", "１０００", "∞", "π", "\u202e1", "\x00", "\ud800", "🙂" * 300,
]
MEGABYTE_COMPLETIONS = [
    "\\boxed{" + "1+" * (ONE_MB // 2) + "1}",  # a 1 MB answer: over MAX_ANSWER_CHARS, scored 0 unparsed
    "x" * ONE_MB + "\\boxed{1}",  # a 1 MB completion with a short answer at its end
    "\\boxed{" * (ONE_MB // 7), "\\boxed{{}" * (ONE_MB // 9),  # 1 MB of unclosed boxes
    "<answer>" * (ONE_MB // 8), "{" * ONE_MB, "9" * ONE_MB, "é" * ONE_MB,
]


def _fuzz(checker, completions) -> float:
    """Every completion against every gold: 0 exceptions, reward 0; returns the slowest call (seconds)."""
    golds = ["\\frac{1}{2}", "1000", "(-1, 1)"]
    worst = 0.0
    for c in completions:
        start = time.perf_counter()
        r = checker.rewards([c] * len(golds), golds, last_number_fallback=True)
        worst = max(worst, time.perf_counter() - start)
        assert np.all(r.correct == 0) and np.all(np.isfinite(r.reward)), c[:60]
    return worst


def _boxed_answers(answers):
    return [f"</think>\n<answer>\\boxed{{{a}}}</answer>" for a in answers]


def test_fuzz_adversarial_answers_never_raise(checker):
    worst = _fuzz(checker, _boxed_answers(FAST_ADVERSARIAL) + MEGABYTE_COMPLETIONS)
    assert worst <= 2 * CALL_BOUND_S, worst  # three comparisons on two workers: at most two rounds
    assert len(MEGABYTE_COMPLETIONS[0]) > MAX_ANSWER_CHARS


@pytest.mark.slow  # ~30 s: most of these run into a timeout
def test_fuzz_answers_that_time_out_are_bounded(checker):
    timeouts = checker.timeouts
    worst = _fuzz(checker, _boxed_answers(SLOW_ADVERSARIAL))
    assert worst <= 2 * CALL_BOUND_S, worst
    assert checker.failures == 0 and checker.timeouts >= timeouts  # killed workers are replaced, none failed


LATEX_ALPHABET = st.sampled_from(list("0123456789+-*/^_{}()[]=.,$ xyz\\") + [
    "\\frac", "\\sqrt", "\\boxed{", "\\left(", "\\right)", "\\pi", "\\infty", "\\cdot", "!", "<answer>",
    "</answer>", "</think>\n", "\\text{", "é", "½", "\x00"])


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(LATEX_ALPHABET, max_size=40).map("".join), st.sampled_from(["\\frac{1}{2}", "3", "x^2+1"]))
def test_fuzz_random_latex_never_raises(checker, text, gold):
    start = time.perf_counter()
    r = checker.rewards([text], [gold], last_number_fallback=True)
    assert time.perf_counter() - start <= CALL_BOUND_S
    assert r.correct[0] in (0.0, 1.0) and r.format[0] in (0.0, 0.1, 0.5, 0.6, 1.0)


def answer_yes_or_hang(gold, answer, timeout_s):
    """A comparison that never returns on "hang" (module level: the pool's workers import it)."""
    if answer == "hang":
        time.sleep(600)
    return answer.startswith("yes")


def test_hung_worker_is_killed_and_replaced():
    checker = AnswerChecker(workers=1, timeout_s=1.0, compare=answer_yes_or_hang)
    try:
        start = time.perf_counter()
        assert checker.check(["g"], ["hang"]).tolist() == [0.0]
        assert checker.timeouts == 1 and time.perf_counter() - start <= 1.0 + 10.0
        # The only worker was killed; a new one answers the next calls.
        assert checker.check(["g", "g", "g"], ["yes 1", "no", "yes 2"]).tolist() == [1.0, 0.0, 1.0]
        assert checker.failures == 0
    finally:
        checker.close()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("math")
    data = write_rows(d / "train.parquet", MATH_ROWS * 4)
    model = write_checkpoint(str(d / "tiny-qwen2"), prompt_corpus(hendrycks_math.load(data)))
    return model, data


@pytest.mark.slow  # ~60 s on 2 busy cores: the warm-start, RL and eval programs compile
def test_smoke_run_through_the_driver(ckpt, tmp_path, capsys):
    from experiments import math as math_experiment

    model, data = ckpt
    result = math_experiment.main([f"--model={model}", "--task=math", f"--data={data}", "--levels=1,2,4,5",
                                   "--eval_questions=4", "--preset=smoke", f"--logdir={tmp_path}", "--compile_cache="])
    out = capsys.readouterr().out
    assert "eval success before RL" in out and "eval success after RL" in out and "mean@2" in out
    task = result["driver"].testbed.task
    # 16 rows at levels 1, 2, 4, 5 (the "Level ?" rows dropped); the last 4 held out for eval.
    assert task.num_train == 12 and task.num_eval == 4
    assert all(np.isfinite(h.get("train/loss", h.get("sft/loss"))) for h in result["history"])
    ref = task.reference_tokens([0], "eval")[0]
    np.testing.assert_allclose(task.score([0], "eval", [ref])["reward"], [1.1], rtol=1e-6)


@pytest.mark.parametrize("flags,message", [
    (["--levels=4,5", "--types=Algebra"], "no row has level in [4, 5] and type in ['Algebra']"),
    (["--levels=7"], "levels=(7,) is invalid; MATH levels are 1..5"),
    (["--eval_questions=100"], "need more than eval_questions=100"),
    (["--eval_data=/nonexistent.parquet"], "eval_data=/nonexistent.parquet is invalid; no such file"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, flags, message):
    from experiments import math as math_experiment

    model = tmp_path / "model"  # the config checks only that these files exist; the data fails first
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text("{}")
    data = write_rows(tmp_path / "train.jsonl", MATH_ROWS * 4)
    with pytest.raises(SystemExit) as e:
        math_experiment.main([f"--model={model}", "--task=math", f"--data={data}", f"--logdir={tmp_path}", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("python -m experiments.math: error: ") and message in err[0], err
    assert not list(tmp_path.glob("math_*")), "a run directory was made before the data was read"
