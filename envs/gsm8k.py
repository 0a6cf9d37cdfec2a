"""GSM8K (Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems"): grade-school word problems.

Data: the public layout, one file a split (the split is the file: openai/grade-school-math
`data/train.jsonl` / `data/test.jsonl`, or the Hugging Face `main/{train,test}-*.parquet`), rows
`question` and `answer`, the answer being a worked solution whose last line is `#### <number>`.
The gold answer is that number without thousands commas; the worked solution, less its calculator
annotations `<<48/2=24>>`, is the warm-start reasoning.
Prompt and reward: envs.math_prompts (the chat prompt ends in "<think>") and envs.math_verify_reward
with the last-number fallback: "... so she earns 18 dollars" answers 18 when there is no \\boxed{}.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from envs.math_data import MathDataError, read_records

_CALCULATOR = re.compile(r"<<[^<>]*>>")
LAST_NUMBER_FALLBACK = True  # the reward takes the last number when the answer has no \boxed{}


class Problem(NamedTuple):
    question: str
    reasoning: str  # the worked solution before "####", calculator annotations removed
    gold: str  # the final answer, e.g. "18" or "-3.5"


def gold_answer(answer: str) -> str | None:
    """The text after the last "####", without thousands commas or spaces; None when there is none."""
    if "####" not in answer:
        return None
    gold = answer.rsplit("####", 1)[1].strip().replace(",", "")
    return gold or None


def load(path: str | Path, *, name: str = "data") -> list[Problem]:
    """The problems of one GSM8K file (.parquet or .jsonl); MathDataError (one line) on bad input."""
    problems = []
    for i, row in enumerate(read_records(path, ("question", "answer"), name=name)):
        gold = gold_answer(row["answer"])
        if gold is None:
            raise MathDataError(f"{name}={path} is invalid; row {i} has no final answer after '####' in 'answer'")
        reasoning = _CALCULATOR.sub("", row["answer"].rsplit("####", 1)[0]).strip()
        problems.append(Problem(row["question"], reasoning, gold))
    return problems
