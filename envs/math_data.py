"""Rows of the public math-word-problem files (GSM8K, MATH) from parquet or JSONL, with one-line errors.

The format follows the file name: `.parquet`, or `.jsonl` / `.json` (one JSON object a line, as in
openai/grade-school-math `data/test.jsonl` and MATH-500 `test.jsonl`). The caller names the columns
it needs; each must hold strings (`optional` columns may be absent, or hold strings or integers).
Every problem with the input raises `MathDataError` (a ValueError) with ONE line naming the file:
`data=/x.jsonl is invalid; line 3 is not a JSON object (Expecting value)`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

PARQUET, JSONL = (".parquet",), (".jsonl", ".json")


class MathDataError(ValueError):
    """A data file that cannot be read or lacks the columns a task needs (one-line message)."""


def read_records(path: str | Path, columns: Sequence[str], optional: Sequence[str] = (), *,
                 name: str = "data") -> list[dict]:
    """The rows of `path` as dicts holding `columns` (strings) and those of `optional` it has."""
    path = Path(path)

    def bad(problem: str) -> MathDataError:
        return MathDataError(f"{name}={path} is invalid; {problem}")

    if not path.exists():
        raise bad("no such file")
    if path.is_dir():
        raise bad("it is a directory; need a .parquet or .jsonl file (the split is chosen by the file)")
    suffix = path.suffix.lower()
    if suffix in PARQUET:
        rows = _parquet_rows(path, bad)
    elif suffix in JSONL:
        rows = _jsonl_rows(path, bad)
    else:
        raise bad(f"unknown extension {suffix or '(none)'!r}; need .parquet, .jsonl or .json")
    if not rows:
        raise bad("it has no rows")
    out = []
    for i, row in enumerate(rows):
        for c in columns:
            if c not in row:
                raise bad(f"row {i} has no field {c!r} (has: {', '.join(map(str, row))})")
            if not isinstance(row[c], str):
                raise bad(f"row {i} field {c!r} is {type(row[c]).__name__}; need a string")
        for c in optional:
            if row.get(c) is not None and (isinstance(row[c], bool) or not isinstance(row[c], (str, int))):
                raise bad(f"row {i} field {c!r} is {type(row[c]).__name__}; need a string or an integer")
        out.append({c: row[c] for c in (*columns, *optional) if row.get(c) is not None})
    return out


def _parquet_rows(path: Path, bad) -> list[dict]:
    import pyarrow as pa  # only parquet input needs pyarrow
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        raise bad(f"it is not a readable parquet file ({lines[0]})") from None


def _jsonl_rows(path: Path, bad) -> list[dict]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise bad(f"line {n} is not a JSON object ({e.msg})") from None
                if not isinstance(row, dict):
                    raise bad(f"line {n} is not a JSON object (a {type(row).__name__})")
                rows.append(row)
    except UnicodeDecodeError:
        raise bad("it is not UTF-8 text") from None
    except OSError as e:
        raise bad(f"it cannot be read ({e.strerror or type(e).__name__})") from None
    return rows
