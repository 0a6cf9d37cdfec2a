"""Countdown: exact solver vs brute force, generator, parquet, prompts, and the reward checked against
GRPO-Zero's own regex + eval reward as an oracle, on tables, on random inputs and on hostile ones."""
import ast
import random
import re
import time
import warnings
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

from envs import countdown as cd
from envs.safe_arith import evaluate

FAST = settings(max_examples=300, deadline=None)
REWARD_VALUES = {f * 0.1 + a for f in (0.0, 0.1, 0.5, 0.6, 1.0) for a in (0.0, 1.0)}


# --------------------------------------------------------------------------------------------
# Oracles.


def exact_value(expr: str) -> Fraction:
    """Exact value of an expression over + - * / and parentheses, via Python's own parser."""
    ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b}

    def ev(node):
        if isinstance(node, ast.Constant):
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp):
            return -ev(node.operand) if isinstance(node.op, ast.USub) else ev(node.operand)
        return ops[type(node.op)](ev(node.left), ev(node.right))
    return ev(ast.parse(expr, mode="eval").body)


def python_value(expr: str):
    """float(eval(expr)) or None, for short strings over digits, + - * / ( ) and space, without ** or //."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "'int' object is not callable" SyntaxWarning for "2(3)"
            return float(eval(expr, {"__builtins__": None}, {}))
    except Exception:
        return None


def digit_runs(expr: str) -> list[int]:
    return sorted(int(x) for x in re.findall(r"\d+", expr))


def brute_reachable(nums, target) -> bool:
    """Textbook search: replace any two numbers by a combination until one is left."""
    t = Fraction(target)

    def rec(vs):
        if len(vs) == 1:
            return vs[0] == t
        for i in range(len(vs)):
            for j in range(i + 1, len(vs)):
                a, b = vs[i], vs[j]
                rest = [v for k, v in enumerate(vs) if k not in (i, j)]
                outs = [a + b, a - b, b - a, a * b] + ([a / b] if b else []) + ([b / a] if a else [])
                if any(rec(rest + [o]) for o in outs):
                    return True
        return False
    return rec([Fraction(n) for n in nums])


def grpo_zero_format(response):
    """GRPO-Zero's format_reward_function, verbatim semantics."""
    if re.match(r"^<think>.*?<\/think>\n<answer>.*?<\/answer>$", response, re.DOTALL):
        return 1.0
    return (0.1 if re.search(r"<think>.*?<\/think>", response, re.DOTALL) else 0.0) + (
        0.5 if re.search(r"<answer>.*?<\/answer>", response, re.DOTALL) else 0.0)


def grpo_zero_answer(response, numbers, target):
    """GRPO-Zero's answer_reward_function, eval and all. Only called on short strings without ** or //."""
    m = re.search(r"<answer>(.*?)<\/answer>", response, re.DOTALL)
    if not m or not m.group(1) or not re.match(r"^[0-9+\-*/() ]+$", m.group(1)):
        return 0.0
    if sorted(int(n) for n in re.findall(r"\d+", m.group(1))) != sorted(numbers):
        return 0.0
    value = python_value(m.group(1))
    return 1.0 if value is not None and abs(value - float(target)) < 1e-5 else 0.0


# --------------------------------------------------------------------------------------------
# Solver.


@pytest.mark.parametrize("nums,target", [((3, 5, 7), 22), ((44, 19, 35), 98), ((3, 3, 8, 8), 24),
                                         ((1, 5, 5, 5), 24), ((70, 14, 4, 13), 13), ((9,), 9), ((2, 3), 1)])
def test_solver_finds_a_solution_using_each_number_once(nums, target):
    sol = cd.solve(nums, target)
    assert sol is not None and exact_value(sol) == target and digit_runs(sol) == sorted(nums)
    assert cd.answer_reward(f"<answer>{sol}</answer>", nums, target) == 1.0


@pytest.mark.parametrize("nums,target", [((1, 1, 1), 100), ((1, 1, 1, 1), 100), ((2, 3), 7), ((9,), 8)])
def test_solver_proves_unreachable(nums, target):
    assert cd.solve(nums, target) is None and not brute_reachable(nums, target)


@FAST
@given(st.lists(st.integers(0, 13), min_size=2, max_size=3), st.integers(-5, 60))
def test_solver_agrees_with_brute_force(nums, target):
    sol = cd.solve(nums, target)
    assert (sol is not None) == brute_reachable(nums, target)
    if sol is not None:
        assert exact_value(sol) == target and digit_runs(sol) == sorted(nums)


def test_solver_agrees_with_brute_force_on_four_numbers():
    rng = random.Random(1)
    for _ in range(12):
        nums, target = [rng.randint(1, 30) for _ in range(4)], rng.randint(1, 100)
        assert (cd.solve(nums, target) is not None) == brute_reachable(nums, target)


def test_solver_rejects_no_numbers():
    with pytest.raises(ValueError, match="at least one number"):
        cd.solve((), 3)


# --------------------------------------------------------------------------------------------
# Generator and splits.


def test_generated_problems_are_valid_and_solvable():
    train, test = cd.make_splits(200)
    assert len(train) == 200 and len(test) == cd.TEST_SIZE == 128
    for p in train + test:
        assert len(p.nums) in (3, 4) and all(1 <= n <= 99 for n in p.nums) and 1 <= p.target <= 100
        assert isinstance(p.target, int) and all(isinstance(n, int) for n in p.nums)
        assert exact_value(p.solution) == p.target and digit_runs(p.solution) == sorted(p.nums)
        assert cd.reward(cd.sft_completion(p), p.nums, p.target) == pytest.approx(1.1)
    assert cd.solve(test[0].nums, test[0].target) is not None
    sizes = [len(p.nums) for p in train]
    assert 60 < sizes.count(3) < 140  # sizes drawn uniformly


def test_generator_is_deterministic_per_seed_and_extends():
    a, b = cd.generate_problems(50, seed=3), cd.generate_problems(80, seed=3)
    assert a == b[:50]
    assert a != cd.generate_problems(50, seed=4)
    assert cd.generate_problems(5, seed=3, stream=cd.TEST_STREAM) != a[:5]


def test_splits_are_disjoint_and_test_does_not_depend_on_seed():
    train0, test0 = cd.make_splits(300, seed=0)
    train1, test1 = cd.make_splits(300, seed=1)
    assert test0 == test1 and train0 != train1
    keys = [cd.problem_key(p) for p in train0 + test0]
    assert len(set(keys)) == len(keys)


def test_exclusion_holds_in_a_tiny_space(monkeypatch):
    """Two numbers in 1..3, targets 1..6: few problems exist, so the test keys must be skipped."""
    kw = dict(sizes=(2,), min_number=1, max_number=3, min_target=1, max_target=6)
    train, test = cd.make_splits(6, num_test=5, **kw)
    assert not {cd.problem_key(p) for p in train} & {cd.problem_key(p) for p in test}
    monkeypatch.setattr(cd, "MAX_MISSES", 2000)
    with pytest.raises(ValueError, match="no new 2-number problem"):
        cd.generate_problems(100, **kw)


@pytest.mark.parametrize("kw,match", [(dict(sizes=(1,)), "sizes"), (dict(sizes=()), "sizes"),
                                      (dict(min_number=5, max_number=4), "numbers"),
                                      (dict(min_target=0), "targets")])
def test_generator_rejects_bad_ranges(kw, match):
    with pytest.raises(ValueError, match=match):
        cd.iter_problems(**kw)


# --------------------------------------------------------------------------------------------
# Parquet.


def _write(path, problems, **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = {"nums": pa.array([list(p.nums) for p in problems], pa.list_(pa.int64())),
            "target": pa.array([p.target for p in problems], pa.int64()), **extra}
    pq.write_table(pa.table(cols), path)


def test_parquet_round_trip_takes_the_last_rows_as_test(tmp_path):
    problems = cd.generate_problems(140, seed=7)
    root = tmp_path / "Countdown-Tasks-3to4"
    _write(root / "data" / "train-00000-of-00001.parquet", problems)
    train, test = cd.load_parquet(root)  # GRPO-Zero's layout: <root>/data
    assert len(train) == 12 and len(test) == 128
    assert [(p.nums, p.target) for p in train + test] == [(p.nums, p.target) for p in problems]
    assert test[-1].target == problems[-1].target and all(p.solution is None for p in train + test)
    train2, test2 = cd.load_parquet(root / "data" / "train-00000-of-00001.parquet", test_size=40,
                                    with_solutions=True)
    assert len(test2) == 40 and test2[0].nums == problems[100].nums
    assert all(exact_value(p.solution) == p.target for p in train2 + test2)
    assert cd.reward(cd.sft_completion(test[0]), test[0].nums, test[0].target) == pytest.approx(1.1)


# Bad parquet input (one-line CountdownDataError for every class of problem): test_countdown_data.py.


# --------------------------------------------------------------------------------------------
# Prompts.


def test_chat_prompt_is_grpo_zeros():
    messages, prefix = cd.chat_prompt(cd.Problem(tuple(np.array([44, 19, 35])), np.int64(98), None))
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == ("You are a helpful assistant. You first think about the reasoning "
                                      "process in your mind and then provide the user with the answer.")
    assert messages[1]["content"] == (
        "Using the numbers [44, 19, 35], create an equation that equals 98. You can use basic arithmetic "
        "operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> "
        "tags. And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>.")
    assert prefix == "Let me solve this step by step.\n<think>"


def test_tiny_prompt_and_sft_target():
    p = cd.Problem((3, 5, 7), 22, "(3*5)+7")
    assert cd.tiny_prompt(p) + cd.sft_completion(p) == "nums 3 5 7 target 22\n<think>solve</think>\n<answer>(3*5)+7</answer>"
    assert cd.reward(cd.sft_completion(p, think=""), p.nums, p.target) == pytest.approx(1.1)
    assert cd.sft_completion(p._replace(solution=None)).endswith("</answer>")  # solved on demand
    with pytest.raises(ValueError, match="has no solution"):
        cd.sft_completion(cd.Problem((1, 1, 1), 100, None))


# --------------------------------------------------------------------------------------------
# Rewards: the table.

N, T = (3, 5, 7), 22


@pytest.mark.parametrize("completion,expected", [
    ("I multiply</think>\n<answer>(3*5)+7</answer>", (1.1, 1.0, 1.0)),           # exact + correct
    ("x</think>\n<answer> ( 3 * 5 ) + 7 </answer>", (1.1, 1.0, 1.0)),           # spaces are fine
    ("x</think>\n<answer>(3*5)+7</answer>\n", (1.1, 1.0, 1.0)),                 # `$` before a final newline
    ("x</think>\n<answer>(3*5)+7\n</answer>", (1.1, 1.0, 1.0)),                 # ... also in the answer's `$`
    ("x</think><answer>(3*5)+7</answer>", (0.1 * 0.6 + 1, 0.6, 1.0)),           # no newline between blocks
    ("x</think>\n<answer>(3*5)+7</answer> done", (0.1 * 0.6 + 1, 0.6, 1.0)),    # text after </answer>
    ("x <answer>(3*5)+7</answer>", (0.1 * 0.5 + 1, 0.5, 1.0)),                  # think never closed
    ("x</think>\n<answer>3+5+7</answer>", (0.1, 1.0, 0.0)),                     # format only: wrong value
    ("x</think>\n<answer>7+7+3+5</answer>", (0.1, 1.0, 0.0)),                   # 22, but 7 used twice
    ("x</think>\n<answer>3*5+7+0</answer>", (0.1, 1.0, 0.0)),                   # an extra number
    ("x</think>\n<answer>(3*5)+7 = 22</answer>", (0.1, 1.0, 0.0)),              # '=' is not allowed
    ("x</think>\n<answer>\n(3*5)+7</answer>", (0.1, 1.0, 0.0)),                 # GRPO-Zero's set has no \n
    ("x</think>\n<answer>3**2+13</answer>", (0.1, 1.0, 0.0)),                   # no exponent
    ("x</think>\n<answer></answer>", (0.1, 1.0, 0.0)),                          # empty answer
    ("x</think>\n", (0.1 * 0.1, 0.1, 0.0)),                                     # missing answer block
    ("<answer>1</answer><answer>(3*5)+7</answer>", (0.05, 0.5, 0.0)),           # the first block counts
    ("", (0.0, 0.0, 0.0)),
    ("(3*5)+7", (0.0, 0.0, 0.0)),
])
def test_reward_table(completion, expected):
    got = cd.reward_parts(completion, N, T)
    assert got == pytest.approx(expected) and got[0] in REWARD_VALUES
    assert got[1] == grpo_zero_format("<think>" + completion) and got[2] == grpo_zero_answer(completion, N, T)


def test_think_prefix_and_end_token_semantics():
    c = "I multiply</think>\n<answer>(3*5)+7</answer>"
    assert cd.format_reward(c) == 0.5 and cd.format_reward("<think>" + c) == 1.0
    assert cd.reward(c, N, T) == pytest.approx(1.1)  # the prompt's "<think>" is prepended
    assert cd.reward("<think>" + c, N, T) == pytest.approx(1.1)  # a repeated <think> is still content
    assert cd.reward(c, N, T, prefix="") == pytest.approx(1.05)
    assert cd.reward(c + "<|im_end|>", N, T, end_token="<|im_end|>") == pytest.approx(1.1)
    assert cd.reward(c + "<|im_end|>", N, T) == pytest.approx(1.06)


def test_fractional_intermediates_and_lenient_mode():
    assert cd.answer_reward("<answer>8/(3-8/3)</answer>", (3, 3, 8, 8), 24) == 1.0
    assert cd.answer_reward("<answer>(3*5.)+7</answer>", N, T) == 0.0
    assert cd.answer_reward("<answer>(3*5.)+7</answer>", N, T, lenient=True) == 1.0
    assert cd.answer_reward("<answer>\n(3*5)\t+7\n</answer>", N, T, lenient=True) == 1.0
    assert cd.answer_reward("<answer>07+15</answer>", (7, 15), 22) == 0.0  # SyntaxError under eval


def test_batch_rewards():
    comps = ["x</think>\n<answer>(3*5)+7</answer>", "x</think><answer>1+1</answer>", None]
    r = cd.batch_rewards(comps, [N, (1, 1), N], [T, 2, T])
    assert r.reward.dtype == np.float32 and r.reward.shape == (3,)
    np.testing.assert_allclose(r.reward, [1.1, 1.06, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(r.format, np.float32([1.0, 0.6, 0.0]))
    np.testing.assert_array_equal(r.answer, [1.0, 1.0, 0.0])
    assert cd.batch_rewards([], [], []).reward.shape == (0,)
    with pytest.raises(ValueError, match="batch sizes differ"):
        cd.batch_rewards(comps, [N], [T])


# --------------------------------------------------------------------------------------------
# Rewards vs GRPO-Zero's regex + eval on random inputs.

TAGS = st.lists(st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "\n", "x", " ", "<", ">",
                                 "</", "think>", "answer>", "1+2"]), max_size=12).map("".join)
ARITH = st.text(alphabet="0123456789+-*/() \n", max_size=14)
ARITH = st.one_of(ARITH, ARITH.map(lambda s: s + "\n"))


@FAST
@given(TAGS)
def test_format_reward_matches_grpo_zero_regexes(text):
    assert cd.format_reward(text) == grpo_zero_format(text)
    assert cd.format_reward(text, end_token="\n") == grpo_zero_format(text[:-1] if text.endswith("\n") else text)


@FAST
@given(ARITH)
def test_answer_reward_matches_grpo_zero_eval(content):
    runs = re.findall(r"\d+", content)
    if "**" in content or "//" in content or any(len(r) > 9 for r in runs):
        return  # deliberate differences: eval would allow them (and hang on 9**9**9)
    nums = [int(r) for r in runs]
    core = content[:-1] if content.endswith("\n") else content
    ref = python_value(core)
    if "\n" not in core:
        assert evaluate(core) == ref, content  # bit-identical to eval, None where eval fails
    text = f"x</think>\n<answer>{content}</answer>"
    target = round(ref) if ref is not None else 1
    for t in (target, target + 1):
        assert cd.answer_reward(text, nums, t) == grpo_zero_answer(text, nums, t), (content, t)


# --------------------------------------------------------------------------------------------
# Hostile inputs: never raise, stay fast.

NASTY = ["9" * 10000, "(" * 10000 + "1" + ")" * 10000, "1/0", "1/(2-2)", "2**99999", "7//2",
         "__import__('os').system('x')", "1e308*1e308", "-" * 150 + "1", "(" * 40 + "1" + ")" * 40,
         "999999999*999999999*999999999", "1" + "/3" * 90, "٣+٤", "１+２", "3\u00a0+4", "\x00", "\ud800",
         "<answer>" * 3000, "<think>" * 2000 + "</answer>" * 2000, "</think>\n<answer>" * 2000, "", " ", "()"]


def test_evaluator_refuses_hostile_expressions():
    for s in NASTY:
        assert evaluate(s) is None, s
    assert evaluate("(" * 30 + "1" + ")" * 30) == 1.0 and evaluate("-(-(+3))") == 3.0
    assert evaluate("999999*999999") == 999998000001.0
    assert evaluate(None) is None and evaluate(12) is None


def _all_entry_points(s):
    for text in (s, f"x</think>\n<answer>{s}</answer>", f"{s}</think>\n<answer>{s}</answer>{s}"):
        yield cd.reward(text, N, T)
        yield cd.reward(text, N, T, lenient=True)
        yield cd.format_reward(text)
        yield cd.answer_reward(text, N, T)


def test_hostile_inputs_are_safe_and_fast():
    for s in NASTY + [None, 12, b"<answer>1</answer>"]:
        values = list(_all_entry_points(s))  # warm-up, and no exception
        assert all(isinstance(v, float) for v in values) and values[0] in REWARD_VALUES
        reps = 20
        t0 = time.perf_counter()
        for _ in range(reps):
            for _ in _all_entry_points(s):
                pass
        per_call = (time.perf_counter() - t0) / (reps * 12)
        assert per_call < 1e-3, (s[:20] if isinstance(s, str) else s, per_call)


def test_random_strings_are_fast():
    rng = random.Random(0)
    pieces = ["<think>", "</think>", "<answer>", "</answer>", "\n", "(", ")", "+", "-", "*", "/", "7", "3", "5", " ", "é"]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 400))) for _ in range(500)]
    t0 = time.perf_counter()
    for text in texts:
        assert cd.reward(text, N, T) in REWARD_VALUES
    assert (time.perf_counter() - t0) / len(texts) < 1e-3


@FAST
@given(st.one_of(st.text(), st.text(alphabet="0123456789+-*/(). <>\n", max_size=300),
                 st.builds(lambda a, b: f"{a}</think>\n<answer>{b}</answer>", st.text(max_size=50), st.text())))
def test_any_string_gives_a_reward_in_the_table(text):
    fmt, ans = cd.format_reward(text), cd.answer_reward(text, N, T)
    assert fmt in (0.0, 0.1, 0.5, 0.6, 1.0) and ans in (0.0, 1.0)
    assert cd.reward(text, N, T) in REWARD_VALUES
    v = evaluate(text, lenient=True)
    assert v is None or (isinstance(v, float) and abs(v) <= 1e15)
