"""Side-by-side timing shared by the benchmarks: first calls, then interleaved rounds.

Implementations are timed interleaved, one call of each per round, so that load from other
processes on a shared machine hits every implementation alike; a ratio of two implementations is
best read per round (`paired`).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

import numpy as np


def first_calls(runs: dict[str, Callable[[], Any]]) -> tuple[dict[str, Any], dict[str, float]]:
    """Call each once (compile for jax, warm up for torch): (outputs, seconds) by name."""
    outputs, seconds = {}, {}
    for name, run in runs.items():
        start = time.perf_counter()
        outputs[name] = run()
        seconds[name] = time.perf_counter() - start
    return outputs, seconds


def interleaved(runs: dict[str, Callable[[], Any]], repeats: int,
                after_round: Optional[Callable[[], None]] = None) -> dict[str, list[float]]:
    """`repeats` rounds of one call of each implementation; seconds per call by name.
    `after_round` runs after each round (e.g. machine probes that should see the same load)."""
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
        if after_round is not None:
            after_round()
    return times


def paired(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of time(b) / time(a): the calls of one round ran under similar load."""
    return float(np.median(np.asarray(times[b]) / np.asarray(times[a])))


def write_json(figures: dict, path: str) -> None:
    """The figures as indented JSON at `path` (its folder created), when a path is given."""
    import json
    import os

    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(figures, f, indent=1)
