"""Countdown rows from parquet (the Countdown-Tasks-3to4 layout: columns nums, a list of ints, and
target, an int), with one-line errors for bad input. `envs.countdown.load_parquet` builds on it.

Every problem with the input raises `CountdownDataError` (a ValueError) with ONE line that names
the file and the problem, e.g. `data=/x.parquet is invalid; it has no column 'target' (has: a, b)`:
a path that does not exist (`MissingDataError`, also a FileNotFoundError), a file that is not
parquet, missing or mistyped columns, no rows, null cells, or a row that is no Countdown problem
(2..6 numbers in 0..10^9 - 1, envs.safe_arith's literal bound).
"""
from __future__ import annotations

from pathlib import Path

NUM_COUNT = (2, 6)  # numbers per problem, as envs.countdown.iter_problems' sizes
MAX_NUMBER = 10**9 - 1  # 9-digit literals (envs.safe_arith)


class CountdownDataError(ValueError):
    """Countdown data that cannot be read or is not a list of problems (one-line message)."""


class MissingDataError(CountdownDataError, FileNotFoundError):
    """A data path that does not exist."""


def source_of(path: str | Path) -> Path:
    """The parquet file or directory under `path`: GRPO-Zero's `<root>/data` when it exists."""
    path = Path(path)
    return path / "data" if (path / "data").is_dir() else path


def read_rows(path: str | Path, *, name: str = "data") -> tuple[Path, list[tuple[tuple[int, ...], int]]]:
    """(source, [(nums, target), ...]) in file order; raises CountdownDataError (see the module)."""
    source = source_of(path)

    def bad(problem: str, cls: type = CountdownDataError) -> CountdownDataError:
        return cls(f"{name}={source} is invalid; {problem}")

    if not source.exists():
        raise bad("no such file or directory", MissingDataError)
    import pyarrow as pa  # only this loader needs pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(source)
    except (pa.ArrowException, OSError) as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        raise bad(f"it is not a readable parquet file or directory ({lines[0]})") from None
    if table.num_columns == 0:
        raise bad("it holds no parquet columns (an empty directory?)")
    for column, need, ok in (("nums", "a list of integers", _int_list), ("target", "integers", pa.types.is_integer)):
        if column not in table.column_names:
            raise bad(f"it has no column {column!r} (has: {', '.join(table.column_names)})")
        typ = table.schema.field(column).type
        if not ok(typ):
            raise bad(f"column {column!r} has type {typ}; need {need}")
    if table.num_rows == 0:
        raise bad("it has no rows")
    rows = []
    for i, (nums, target) in enumerate(zip(table.column("nums").to_pylist(), table.column("target").to_pylist())):
        if nums is None or target is None or None in nums:
            raise bad(f"row {i} has an empty (null) cell: nums={nums}, target={target}")
        lo, hi = NUM_COUNT
        if not lo <= len(nums) <= hi or not all(0 <= x <= MAX_NUMBER for x in nums):
            raise bad(f"row {i} has nums={nums}; need {lo}..{hi} numbers in 0..{MAX_NUMBER}")
        rows.append((tuple(int(x) for x in nums), int(target)))
    return source, rows


def _int_list(typ) -> bool:
    import pyarrow as pa

    lists = (pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ))
    return lists and pa.types.is_integer(typ.value_type)
