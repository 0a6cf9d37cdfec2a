"""Metric logging: TensorBoard event files (tensorboardX, no TensorFlow needed) and the console."""
from __future__ import annotations

import os
import time
from typing import Mapping

import numpy as np


class TensorBoardLogger:
    """Scalars and text under `logdir`, readable by tensorboard's event reader.

    One directory per run (`logdir/run_name`) so that TensorBoard overlays runs on one chart.
    """

    def __init__(self, logdir: str, run_name: str | None = None, purge_step: int | None = None):
        from tensorboardX import SummaryWriter  # imported lazily: only runs that log pay for it

        self.path = os.path.join(logdir, run_name) if run_name else logdir
        os.makedirs(self.path, exist_ok=True)
        # purge_step: a resumed run hides the events its killed predecessor wrote at steps >= it.
        # A suffix unique to this writer: a resumed run in the same second must not overwrite the file.
        suffix = f".{os.getpid()}.{time.time_ns()}"
        self._writer = SummaryWriter(self.path, flush_secs=30, purge_step=purge_step, filename_suffix=suffix)
        self.nonfinite = 0  # non-finite scalars written (as NaN)

    def scalars(self, step: int, metrics: Mapping[str, float], prefix: str = "") -> None:
        """Every scalar, non-finite ones as NaN (counted in `nonfinite`): a curve never hides a blow-up."""
        for name, value in metrics.items():
            value = np.asarray(value)
            if value.ndim != 0:
                continue
            value = float(value)
            if not np.isfinite(value):
                self.nonfinite += 1
                value = float("nan")
            self._writer.add_scalar(f"{prefix}{name}", value, int(step))

    def scalar_series(self, series: Mapping[str, np.ndarray], prefix: str = "", every: int = 1) -> None:
        """Write whole curves `{name: [T]}` at steps 0, every, 2 * every, ... (for compiled runs)."""
        for name, values in series.items():
            values = np.asarray(values)
            for t in range(0, values.shape[0], every):
                self.scalars(t, {name: values[t]}, prefix)

    def text(self, step: int, tag: str, text: str) -> None:
        self._writer.add_text(tag, text, int(step))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def format_table(rows: list[Mapping[str, object]], columns: list[str] | None = None) -> str:
    """A markdown table; floats to 3 decimals."""
    if not rows:
        return ""
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return f"{v:.3f}" if np.isfinite(v) else str(v)
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
