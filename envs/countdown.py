"""Countdown (as in TinyZero / GRPO-Zero): combine 3-4 numbers with + - * / into an expression equal to a target.

GRPO-Zero compatible (github.com/policy-gradient/GRPO-Zero, `countdown_task.py`):
  * Prompt: SYSTEM_MESSAGE and USER_TEMPLATE as chat messages, then the assistant turn is started
    with RESPONSE_PROMPT, which ends in "<think>". The completion is what the model writes after it.
  * Reward of a completion c: 0.1 * format_reward("<think>" + c) + answer_reward(c), with
      format_reward = 1 if the text is exactly `^<think>.*?</think>\\n<answer>.*?</answer>$` (DOTALL),
                      else 0.1 [a <think>..</think> block] + 0.5 [an <answer>..</answer> block];
      answer_reward = 1 if the first <answer> block holds an expression over `^[0-9+\\-*/() ]+$`
                      whose integer literals are the numbers as a multiset and whose value is
                      within 1e-5 of the target, else 0.
    So rewards lie in {0, 0.01, 0.05, 0.06, 0.1, 1, 1.01, 1.05, 1.06, 1.1}.
  * Data: the `Countdown-Tasks-3to4` parquet (columns nums, target); the LAST 128 rows are the
    test set (GRPO-Zero's config `test_size: 128`), the rest train.
Differences, all on inputs no honest answer produces: the answer is evaluated by envs.safe_arith
(no eval) with its bounds (<= 200 characters, literals of <= 9 digits, no `**` or `//`).

Without the dataset: a seeded generator of problems solvable by construction (`make_splits`), and
an exhaustive exact solver (`solve`) that finds a solution or proves there is none.
For tiny models: a compact prompt "nums 3 5 7 target 22\\n<think>" and warm-start targets
"solve</think>\\n<answer>(3*5)+7</answer>" (the same reward applies).
"""
from __future__ import annotations

import itertools
import random
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from envs.countdown_data import CountdownDataError, MissingDataError, read_rows  # noqa: F401
from envs.safe_arith import evaluate

SYSTEM_MESSAGE = (
    "You are a helpful assistant. You first think about the reasoning process in your mind "
    "and then provide the user with the answer."
)
USER_TEMPLATE = (
    "Using the numbers {numbers}, create an equation that equals {target}. "
    "You can use basic arithmetic operations (+, -, *, /) and each number can only be used once. "
    "Show your work in <think> </think> tags. "
    "And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
)
RESPONSE_PROMPT = "Let me solve this step by step.\n<think>"
THINK_PREFIX = "<think>"  # what the prompt ends with; the reward sees THINK_PREFIX + completion
TINY_TEMPLATE = "nums {numbers} target {target}\n"

FORMAT_WEIGHT = 0.1
TOLERANCE = 1e-5
TEST_SIZE = 128
TRAIN_STREAM, TEST_STREAM = 0, 1
MAX_MISSES = 100_000  # rejected draws in a row before the generator gives up (~3 s)

_THINK, _THINK_END = "<think>", "</think>"
_ANSWER, _ANSWER_END = "<answer>", "</answer>"
_SEPARATOR = "</think>\n<answer>"


class Problem(NamedTuple):
    nums: tuple[int, ...]
    target: int
    solution: str | None  # an expression using each number once; None if not computed (parquet)


def problem_key(p: Problem) -> tuple[tuple[int, ...], int]:
    """Identity of a problem for de-duplication: the numbers as a multiset, and the target."""
    return tuple(sorted(p.nums)), p.target


# --------------------------------------------------------------------------------------------
# Exhaustive exact solver.


def _splits(mask: int) -> Iterator[tuple[int, int]]:
    """Each split of a set of indices into two non-empty parts, once (the first part holds the lowest index)."""
    low = mask & -mask
    sub = (mask - 1) & mask
    while sub:
        if sub & low:
            yield sub, mask ^ sub
        sub = (sub - 1) & mask


def _reach(mask: int, vals: list[Fraction], memo: dict) -> dict[Fraction, str]:
    """Every value some expression over the numbers in `mask` (each once) takes, with one such expression."""
    if mask in memo:
        return memo[mask]
    if mask & (mask - 1) == 0:
        v = vals[mask.bit_length() - 1]
        out = {v: str(v)}
    else:
        out = {}
        for am, bm in _splits(mask):
            rb = _reach(bm, vals, memo)
            for a, ea in _reach(am, vals, memo).items():
                for b, eb in rb.items():
                    out.setdefault(a + b, f"({ea}+{eb})")
                    out.setdefault(a * b, f"({ea}*{eb})")
                    out.setdefault(a - b, f"({ea}-{eb})")
                    out.setdefault(b - a, f"({eb}-{ea})")
                    if b:
                        out.setdefault(a / b, f"({ea}/{eb})")
                    if a:
                        out.setdefault(b / a, f"({eb}/{ea})")
    memo[mask] = out
    return out


def _combine_to(a: Fraction, ea: str, rb: dict[Fraction, str], t: Fraction) -> str | None:
    """An expression `a op b` or `b op a` equal to t with b reachable in rb, by solving for b."""
    if (b := t - a) in rb:
        return f"{ea}+{rb[b]}"
    if (b := a - t) in rb:
        return f"{ea}-{rb[b]}"
    if (b := t + a) in rb:
        return f"{rb[b]}-{ea}"
    if a:
        if (b := t / a) in rb:
            return f"{ea}*{rb[b]}"
        if (b := t * a) in rb:
            return f"{rb[b]}/{ea}"
    elif t == 0:
        return f"{ea}*{next(iter(rb.values()))}"  # 0 * anything
    if t and a and (b := a / t) in rb:
        return f"{ea}/{rb[b]}"
    return None


def solve(nums: Sequence[int], target: int) -> str | None:
    """One expression using each number exactly once that equals target, or None if none exists.

    Exhaustive over all binary trees with + - * / (exact Fractions): the values reachable from each
    subset are built bottom-up (memoised by bitmask); at the root, for each split and each value a
    of one side, the other side must hold t - a, a - t, t + a, t / a, t * a or a / t.
    A 4-number problem costs ~600 Fraction operations (~1 ms).
    """
    if len(nums) == 0:
        raise ValueError("solve needs at least one number")
    vals = [Fraction(int(x)) for x in nums]
    t = Fraction(int(target))
    if len(vals) == 1:
        return str(vals[0]) if vals[0] == t else None
    memo: dict = {}
    for am, bm in _splits((1 << len(vals)) - 1):
        ra, rb = _reach(am, vals, memo), _reach(bm, vals, memo)
        if len(ra) > len(rb):
            ra, rb = rb, ra  # loop over the smaller side, look up in the larger
        for a, ea in ra.items():
            if (expr := _combine_to(a, ea, rb, t)) is not None:
                return expr
    return None


# --------------------------------------------------------------------------------------------
# Problems: a seeded generator and the public parquet.


def iter_problems(seed: int = 0, *, stream: int = TRAIN_STREAM, sizes: Sequence[int] = (3, 4),
                  min_number: int = 1, max_number: int = 99, min_target: int = 1, max_target: int = 100,
                  exclude: Iterable[tuple] = ()) -> Iterator[Problem]:
    """Endless distinct problems, solvable by construction.

    Per problem: k ~ U(sizes); then draw k numbers ~ U[min_number, max_number] and combine two
    random items with a random op of + - * / until one value is left (exact Fractions), the solver's
    own search space. The draw is kept iff that value is an integer in [min_target, max_target] and
    its problem_key is new and not in `exclude`; the combination is the solution. (Uniform targets
    filtered by the solver would cost 3-8 ms a problem: only ~4% of 3-number and ~14% of 4-number
    draws are solvable, against ~12% and ~6% acceptance here at ~30 us a draw.)
    Deterministic in (seed, stream): `random.Random` seeded with a string, stable across versions.
    """
    if not sizes or any(not 2 <= k <= 6 for k in sizes):
        raise ValueError(f"sizes={tuple(sizes)} is invalid; need a non-empty list of counts in 2..6")
    if not 0 <= min_number <= max_number < 10**9:
        raise ValueError(f"numbers {min_number}..{max_number} are invalid; need 0 <= min <= max < 10^9")
    if not 1 <= min_target <= max_target:
        raise ValueError(f"targets {min_target}..{max_target} are invalid; need 1 <= min <= max")
    return _problems(random.Random(f"countdown/{seed}/{stream}"), tuple(sizes), min_number, max_number,
                     min_target, max_target, set(exclude))


def _random_combination(rng: random.Random, nums: list[int]) -> tuple[Fraction, str] | None:
    """Value and expression of a random binary tree over nums with random ops; None on x / 0."""
    items = [(Fraction(n), str(n)) for n in nums]
    while len(items) > 1:
        i, j = rng.sample(range(len(items)), 2)
        (a, ea), (b, eb) = items[i], items[j]
        op = rng.choice("+-*/")
        if op == "/" and b == 0:
            return None
        v = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a / b
        items = [x for n, x in enumerate(items) if n != i and n != j] + [(v, f"({ea}{op}{eb})")]
    v, e = items[0]
    return v, (e[1:-1] if len(nums) > 1 else e)  # drop the outermost parentheses


def _problems(rng: random.Random, sizes, lo, hi, tlo, thi, seen: set) -> Iterator[Problem]:
    while True:
        k = rng.choice(sizes)  # fixed before the retries, so sizes stay uniform
        for _ in range(MAX_MISSES):
            nums = [rng.randint(lo, hi) for _ in range(k)]
            found = _random_combination(rng, nums)
            if found is None or found[0].denominator != 1 or not tlo <= found[0] <= thi:
                continue
            key = (tuple(sorted(nums)), int(found[0]))
            if key not in seen:
                break
        else:
            raise ValueError(f"no new {k}-number problem in {MAX_MISSES} draws; widen the number or target range")
        seen.add(key)
        yield Problem(tuple(nums), key[1], found[1])


def generate_problems(n: int, seed: int = 0, **kwargs) -> list[Problem]:
    """The first n problems of iter_problems(seed, **kwargs); a longer list extends a shorter one."""
    return list(itertools.islice(iter_problems(seed, **kwargs), n))


def make_splits(num_train: int, seed: int = 0, *, num_test: int = TEST_SIZE, test_seed: int = 0,
                **kwargs) -> tuple[list[Problem], list[Problem]]:
    """(train, test). The test set comes from its own stream and depends on test_seed only, so runs
    with different `seed`s share it; training problems never repeat a test problem_key."""
    test = generate_problems(num_test, test_seed, stream=TEST_STREAM, **kwargs)
    exclude = {problem_key(p) for p in test}
    return generate_problems(num_train, seed, stream=TRAIN_STREAM, exclude=exclude, **kwargs), test


def load_parquet(path: str | Path, test_size: int = TEST_SIZE,
                 with_solutions: bool = False, *, name: str = "data") -> tuple[list[Problem], list[Problem]]:
    """(train, test) from the Countdown-Tasks-3to4 layout: columns nums (list of ints), target (int).

    `path` is the dataset root (GRPO-Zero reads `<root>/data`), a directory of parquet files, or one
    file. As in GRPO-Zero the LAST test_size rows are the test set. with_solutions runs the solver
    on every row (~1 ms each); otherwise solution is None. Bad data raises CountdownDataError (a
    ValueError) with one line `<name>=<file> is invalid; <problem>` (envs.countdown_data).
    """
    if isinstance(test_size, bool) or not isinstance(test_size, int) or test_size < 1:
        raise ValueError(f"test_size={test_size!r} is invalid; need an integer >= 1")
    source, rows = read_rows(path, name=name)
    if len(rows) <= test_size:
        raise CountdownDataError(f"{name}={source} is invalid; it has {len(rows)} rows, need more than "
                                 f"test_size={test_size}")
    problems = [Problem(nums, target, solve(nums, target) if with_solutions else None) for nums, target in rows]
    return problems[:-test_size], problems[-test_size:]


# --------------------------------------------------------------------------------------------
# Prompts.


def chat_prompt(problem: Problem) -> tuple[list[dict[str, str]], str]:
    """(messages, generation prefix): render messages with a chat template and an open assistant
    turn, then append the prefix (RESPONSE_PROMPT, ending in "<think>"). Numbers print as a Python
    list, "[44, 19, 35]", as in GRPO-Zero's README."""
    user = USER_TEMPLATE.format(numbers=[int(x) for x in problem.nums], target=int(problem.target))
    return [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": user}], RESPONSE_PROMPT


def tiny_prompt(problem: Problem) -> str:
    """Compact prompt for tiny models, ending in THINK_PREFIX like RESPONSE_PROMPT: "nums 3 5 7 target 22\\n<think>"."""
    numbers = " ".join(str(int(x)) for x in problem.nums)
    return TINY_TEMPLATE.format(numbers=numbers, target=int(problem.target)) + THINK_PREFIX


def sft_completion(problem: Problem, think: str = "solve") -> str:
    """Warm-start target written after either prompt: "solve</think>\\n<answer>(3*5)+7</answer>" (reward 1.1)."""
    solution = problem.solution if problem.solution is not None else solve(problem.nums, problem.target)
    if solution is None:
        raise ValueError(f"problem {problem.nums} -> {problem.target} has no solution")
    return f"{think}{_THINK_END}\n{_ANSWER}{solution}{_ANSWER_END}"


# --------------------------------------------------------------------------------------------
# Rewards. str.find replaces GRPO-Zero's regexes: the same matches, linear time on any input.


def _block(text: str, open_tag: str, close_tag: str) -> str | None:
    """Content of the first open_tag ... close_tag block, as `re.search(open(.*?)close, DOTALL)`."""
    i = text.find(open_tag)
    if i < 0:
        return None
    j = text.find(close_tag, i + len(open_tag))
    return None if j < 0 else text[i + len(open_tag):j]


def _exact_format(text: str) -> bool:
    """re.match(r"^<think>.*?</think>\\n<answer>.*?</answer>$", text, DOTALL): `$` also matches
    before one final newline, so the text may end in "</answer>" or "</answer>\\n"."""
    if not text.startswith(_THINK):
        return False
    if text.endswith(_ANSWER_END):
        end = len(text) - len(_ANSWER_END)
    elif text.endswith(_ANSWER_END + "\n"):
        end = len(text) - len(_ANSWER_END) - 1
    else:
        return False
    return text.find(_SEPARATOR, len(_THINK), end) >= 0  # "</think>\n<answer>" between the two


def format_reward(text: str, end_token: str | None = None) -> float:
    """1.0 for the exact shape, else 0.1 [think block] + 0.5 [answer block]. `text` includes the
    "<think>" the prompt ended with; a trailing end_token is removed first. Never raises."""
    if not isinstance(text, str):
        return 0.0
    if end_token and text.endswith(end_token):
        text = text[:-len(end_token)]
    if _exact_format(text):
        return 1.0
    r = 0.0
    if _block(text, _THINK, _THINK_END) is not None:
        r += 0.1
    if _block(text, _ANSWER, _ANSWER_END) is not None:
        r += 0.5
    return r


def _digit_runs(s: str) -> list[int]:
    """re.findall(r"\\d+", s) as ints, for an s already restricted to ASCII digits, signs, dots, space."""
    return [int(x) for x in "".join(c if "0" <= c <= "9" else " " for c in s).split()]


def answer_reward(text: str, nums: Sequence[int], target: float, *, lenient: bool = False) -> float:
    """1.0 if the first answer block uses each of nums once and equals target within 1e-5, else 0.0.

    `lenient` accepts decimals and any ASCII whitespace (see envs.safe_arith). Never raises on `text`.
    """
    if not isinstance(text, str):
        return 0.0
    content = _block(text, _ANSWER, _ANSWER_END)
    if not content:
        return 0.0
    if not lenient and content.endswith("\n"):
        content = content[:-1]  # GRPO-Zero's `^[...]+$` lets `$` match before one final newline
    value = evaluate(content, lenient=lenient)
    if value is None or sorted(_digit_runs(content)) != sorted(int(n) for n in nums):
        return 0.0
    return 1.0 if abs(value - float(target)) < TOLERANCE else 0.0


def reward_parts(completion: str, nums: Sequence[int], target: float, *, end_token: str | None = None,
                 prefix: str = THINK_PREFIX, lenient: bool = False) -> tuple[float, float, float]:
    """(reward, format, answer) of one completion; reward = 0.1 * format + answer, and the format is
    judged on prefix + completion (the prompt ended with "<think>")."""
    if not isinstance(completion, str):
        return 0.0, 0.0, 0.0
    fmt = format_reward(prefix + completion, end_token)
    ans = answer_reward(completion, nums, target, lenient=lenient)
    return fmt * FORMAT_WEIGHT + ans, fmt, ans


def reward(completion: str, nums: Sequence[int], target: float, **kwargs) -> float:
    """GRPO-Zero's `reward_function(...)["reward"]`; kwargs as in reward_parts."""
    return reward_parts(completion, nums, target, **kwargs)[0]


class Rewards(NamedTuple):
    reward: np.ndarray  # [B] float32, 0.1 * format + answer
    format: np.ndarray  # [B] in {0, 0.1, 0.5, 0.6, 1}
    answer: np.ndarray  # [B] in {0, 1}


def batch_rewards(completions: Sequence[str], nums: Sequence[Sequence[int]], targets: Sequence[float],
                  **kwargs) -> Rewards:
    """Rewards of B completions, the i-th for problem (nums[i], targets[i]); kwargs as in reward_parts."""
    if not len(completions) == len(nums) == len(targets):
        raise ValueError(f"batch sizes differ: {len(completions)} completions, {len(nums)} nums, {len(targets)} targets")
    parts = [reward_parts(c, n, t, **kwargs) for c, n, t in zip(completions, nums, targets)]
    arr = np.asarray(parts, np.float32).reshape(len(parts), 3)
    return Rewards(arr[:, 0], arr[:, 1], arr[:, 2])
