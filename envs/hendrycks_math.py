"""MATH (Hendrycks et al. 2021, "Measuring Mathematical Problem Solving With the MATH Dataset").

Data: the public layout, one file a split (the split is the file: `hendrycks/competition_math`
`data/{train,test}-*.parquet`, MATH-500 `test.jsonl`, ...), rows `problem` and `solution` (LaTeX,
its final answer in `\\boxed{}`), with `level` ("Level 5", or 5) and `type` ("Algebra"; MATH-500
names it `subject`). The gold answer is the solution's last \\boxed{} (envs.math_verify_reward.boxed).
`levels` / `types` keep the rows of those levels and types; rows with no level ("Level ?") only
when no level filter is set. (Named hendrycks_math so that `import math` stays the standard library.)
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Sequence

from envs.math_data import MathDataError, read_records
from envs.math_verify_reward import boxed

LAST_NUMBER_FALLBACK = False  # a MATH answer is an expression: only \boxed{} or the <answer> block count


class Problem(NamedTuple):
    question: str
    reasoning: str  # the worked solution (LaTeX), the warm-start reasoning
    gold: str  # the solution's last \boxed{} content, e.g. "\frac{1}{2}"
    level: int | None  # 1..5; None for "Level ?"
    type: str  # e.g. "Algebra", "Counting & Probability"; "" when the file has none


def parse_level(value) -> int | None:
    """5 from 5, "5" or "Level 5"; None from "Level ?" or a missing level."""
    if isinstance(value, int):
        return value
    text = str(value or "").strip()
    text = text[len("Level"):].strip() if text.lower().startswith("level") else text
    return int(text) if text.isdigit() else None


def load(path: str | Path, *, levels: Sequence[int] = (), types: Sequence[str] = (),
         name: str = "data") -> list[Problem]:
    """The problems of one MATH file (.parquet or .jsonl) with a level in `levels` and a type in `types`
    (empty: all); MathDataError (one line) on bad input, or when the filters leave no row."""
    problems = []
    for i, row in enumerate(read_records(path, ("problem", "solution"), ("level", "type", "subject"), name=name)):
        gold = boxed(row["solution"])
        if gold is None or not gold.strip():
            raise MathDataError(f"{name}={path} is invalid; row {i} has no \\boxed{{}} answer in 'solution'")
        kind = str(row.get("type", row.get("subject", "")))
        problems.append(Problem(row["problem"], row["solution"], gold.strip(), parse_level(row.get("level")), kind))
    kept = [p for p in problems if (not levels or p.level in levels) and (not types or p.type in types)]
    if not kept:
        have_types = sorted({p.type for p in problems})
        raise MathDataError(f"{name}={path} is invalid; no row has level in {list(levels) or 'any'} and type in "
                            f"{list(types) or 'any'} (types: {', '.join(have_types)})")
    return kept
