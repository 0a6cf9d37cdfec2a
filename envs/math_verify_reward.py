"""Rewards of free-form math answers (GSM8K, MATH): a format reward and math-verify's equivalence check.

Reward of a completion c (the prompt ends in "<think>", as in envs.countdown):
    reward = 0.1 * format(c) + correct(c)
  * format: envs.countdown.format_reward on "<think>" + c (1 for exactly
    `<think>...</think>\\n<answer>...</answer>`, else 0.1 [a think block] + 0.5 [an answer block]),
    where a `\\boxed{...}` counts as an answer block when there is no <answer> block;
  * correct: 1 if the answer equals the gold answer by math-verify (huggingface/Math-Verify: both
    parsed from LaTeX to SymPy, then compared as strings, numbers to 6 decimals, or symbolically), else 0.
    The answer is the last `\\boxed{}` (or `\\fbox{}`; one not closed within MAX_ANSWER_CHARS counts
    as none) of the first <answer> block, else of the whole
    completion; else, with `last_number` (GSM8K), the last number there; else the <answer> block itself.
    Answers over MAX_ANSWER_CHARS score 0 unparsed.

Bounded time anywhere: math-verify's own timeouts use signal.alarm, which works only in a main thread,
so each comparison runs in a pebble ProcessPool worker with a per-call timeout; a worker that runs
past it is killed and replaced, and the answer scores 0 (as does one whose worker dies). Extraction
in the caller is linear in the text: a 1 MB completion costs a few ms, ~0.3 s at worst (1 MB of
unclosed `\\boxed{{}`, measured on 2 busy cores).
"""
from __future__ import annotations

import atexit
import bisect
import multiprocessing
import os
import re
from concurrent.futures import TimeoutError as FutureTimeout
from typing import NamedTuple, Sequence

import numpy as np

from envs.countdown import FORMAT_WEIGHT, THINK_PREFIX
from envs.countdown import format_reward as tag_format_reward

MAX_ANSWER_CHARS = 1000  # longer extracted answers score 0 without a parse (no honest answer is longer)
_BOX = re.compile(r"\\(?:boxed|fbox)\{")
_ANSWER, _ANSWER_END = "<answer>", "</answer>"
# A number as people write it: optional sign, digits with thousands commas, optional decimals.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_NUMBER_SCAN_CHARS = 10_000  # the last number is searched in the text's tail (a linear regex, bounded)


def boxed(text: str, max_chars: int | None = None) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` with balanced braces (and at most max_chars
    characters), else None. The box that starts last wins, as the MATH reference code's rfind.

    Linear time: when the last box never closes, no earlier box can close after it starts (the
    braces after it never return to its opening depth), so each earlier box is scanned only up to
    the start of the box after it (and max_chars past its own); boxes after the last "}" before
    that point cannot close and are skipped unscanned."""
    starts = [m.start() for m in _BOX.finditer(text)]
    limit, n = len(text), len(starts)  # boxes starts[:n] are left to try
    while n:
        close = text.rfind("}", 0, limit)
        n = bisect.bisect_left(starts, close, 0, n) - 1  # the last box that starts before that "}"
        if close < 0 or n < 0:
            return None
        i = starts[n]
        begin = text.index("{", i) + 1
        end = limit if max_chars is None else min(limit, begin + max_chars + 1)
        depth = 1
        for j in range(begin, end):
            c = text[j]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[begin:j]
        limit = i
    return None


def answer_block(text: str) -> str | None:
    """Content of the first <answer>...</answer> block, as envs.countdown's `_block`."""
    i = text.find(_ANSWER)
    if i < 0:
        return None
    j = text.find(_ANSWER_END, i + len(_ANSWER))
    return None if j < 0 else text[i + len(_ANSWER):j]


def last_number(text: str) -> str | None:
    """The last number in the text (commas dropped): "So she pays $1,250.50." -> "1250.50"."""
    found = _NUMBER.findall(text[-_NUMBER_SCAN_CHARS:])
    return found[-1].replace(",", "") if found else None


def extract_answer(completion: str, last_number_fallback: bool = False) -> str | None:
    """The answer string the module docstring describes, or None."""
    block = answer_block(completion)
    scope = completion if block is None else block
    found = boxed(scope, MAX_ANSWER_CHARS)
    if found is None and last_number_fallback:
        found = last_number(scope)
    if found is None and block is not None:
        found = block
    found = None if found is None else found.strip()
    return found or None


def format_reward(completion: str, prefix: str = THINK_PREFIX) -> float:
    """envs.countdown.format_reward of prefix + completion, a \\boxed{} standing in for a missing answer block."""
    text = prefix + completion
    r = tag_format_reward(text)
    if r < 1.0 and answer_block(text) is None and boxed(text, MAX_ANSWER_CHARS) is not None:
        r += 0.5
    return r


def normalize(answer: str) -> str:
    """The plain string match's view of an answer: no spaces, no `$`, no thousands commas in numbers."""
    s = "".join(answer.split()).strip("$").strip(".")
    return s.replace(",", "") if re.fullmatch(r"-?[\d,]+(\.\d+)?", s) else s


def equivalent(gold: str, answer: str, timeout_s: int = 5) -> bool:
    """math-verify: gold and answer, each parsed as LaTeX (or a plain expression) inside `$...$`, equal?
    Runs math-verify's own signal timeouts (main thread only: call it in a pool worker, or the main thread)."""
    import logging

    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its per-timeout warnings would flood the run's log
    configs = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    g = parse(f"${gold}$", configs, parsing_timeout=timeout_s)
    a = parse(f"${answer}$", configs, parsing_timeout=timeout_s)
    return bool(g and a and verify(g, a, timeout_seconds=timeout_s))


def _warm_up():
    """A worker's initializer: imports sympy and math-verify and compiles its regexes (one comparison)."""
    equivalent("\\frac{1}{2}", "0.5")


class Rewards(NamedTuple):
    reward: np.ndarray  # [B] float32, 0.1 * format + correct
    format: np.ndarray  # [B] in {0, 0.1, 0.5, 0.6, 1}
    correct: np.ndarray  # [B] in {0, 1}


class AnswerChecker:
    """math-verify comparisons in a pool of worker processes, each call bounded by `timeout_s`.

    A pebble.ProcessPool (forkserver: workers do not inherit the caller's threads, e.g. JAX's) runs
    `equivalent`; pebble kills a worker whose task runs past its timeout and starts a new one.
    Answers equal to the gold under `normalize` score 1 without a worker; results are cached by
    (gold, answer), since a group often repeats an answer. Workers start on first use. `compare`
    replaces `equivalent` (a module-level function; tests give one that hangs).
    """

    def __init__(self, workers: int = 0, timeout_s: float = 5.0, cache_size: int = 100_000, compare=None,
                 shortcut: bool = True):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} is invalid; need > 0")
        self.workers = workers or min(4, os.cpu_count() or 1)
        self.timeout_s = timeout_s
        self.cache_size = cache_size
        self.cache: dict[tuple[str, str], bool] = {}
        self.timeouts = self.failures = 0  # calls that ran out of time / whose worker died or raised
        self.compare = equivalent if compare is None else compare  # (gold, answer, timeout_s) -> bool, picklable
        self.shortcut = shortcut  # False: every answer goes to math-verify (benchmarks.math_verify_agreement)
        self._pool = None

    def _get_pool(self):
        if self._pool is None:
            from pebble import ProcessPool

            # The initializer runs before a worker's first task, outside its timeout: without it the first
            # comparison of each (re)started worker would pay the imports (~1-3 s) and could time out.
            self._pool = ProcessPool(self.workers, initializer=_warm_up,
                                     context=multiprocessing.get_context("forkserver"))
            atexit.register(self.close)
        return self._pool

    def close(self):
        if self._pool is not None:
            self._pool.stop()
            self._pool.join()
            self._pool = None

    def _schedule(self, pairs):
        """One future per (gold, answer); a pool that broke (e.g. a worker failed to start) is replaced once."""
        # math-verify's own alarms (whole seconds, in the worker's main thread) at half the budget: its parse
        # of the answer and its verify then usually give up in time (False), and the kill at timeout_s,
        # which costs a worker restart, stays the backstop.
        inner = max(1, int(self.timeout_s / 2))
        for attempt in range(2):
            try:
                pool = self._get_pool()
                return {k: pool.schedule(self.compare, args=(*k, inner), timeout=self.timeout_s) for k in pairs}
            except RuntimeError:
                self.close()
                if attempt:
                    raise

    def check(self, golds: Sequence[str], answers: Sequence[str | None]) -> np.ndarray:
        """[B] float32: 1 where answers[i] (None: no answer) is equivalent to golds[i]."""
        if len(golds) != len(answers):
            raise ValueError(f"batch sizes differ: {len(golds)} golds, {len(answers)} answers")
        out = np.zeros(len(golds), np.float32)
        pending: dict[tuple[str, str], list[int]] = {}
        for i, (g, a) in enumerate(zip(golds, answers)):
            if a is None or len(a) > MAX_ANSWER_CHARS:
                continue
            if self.shortcut and normalize(a) == normalize(g):
                out[i] = 1.0
            elif (g, a) in self.cache:
                out[i] = self.cache[(g, a)]
            else:
                pending.setdefault((g, a), []).append(i)
        if pending:
            futures = self._schedule(list(pending))
            for key, future in futures.items():
                ok = False
                try:
                    ok = bool(future.result())
                except FutureTimeout:
                    self.timeouts += 1
                except Exception:  # noqa: BLE001  (a worker that died or raised: the answer scores 0)
                    self.failures += 1
                out[pending[key]] = float(ok)
                if len(self.cache) < self.cache_size:
                    self.cache[key] = ok
        return out

    def rewards(self, completions: Sequence[str], golds: Sequence[str], last_number_fallback: bool = False,
                prefix: str = THINK_PREFIX) -> Rewards:
        """0.1 * format + correct of B completions, the i-th against golds[i] (module docstring)."""
        if len(completions) != len(golds):
            raise ValueError(f"batch sizes differ: {len(completions)} completions, {len(golds)} golds")
        fmt = np.asarray([format_reward(c, prefix) for c in completions], np.float32)
        correct = self.check(golds, [extract_answer(c, last_number_fallback) for c in completions])
        return Rewards(FORMAT_WEIGHT * fmt + correct, fmt, correct)
