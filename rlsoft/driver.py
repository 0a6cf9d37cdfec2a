"""The one driver of every testbed: step counter, data position, eval, logs, checkpoints, resume.

A testbed (Countdown, char, thinking tokens, ...) is a `Testbed`: it builds the initial training
state and advances it with its jitted step `(state, batch, key) -> (state, metrics)`; a compiled
testbed may scan several steps in one call. The driver owns everything around that, the same for
every testbed:

  * the step counter; the data position is a pure function of the step (the testbed's
    `data_position(step)`), so resuming at step t reads exactly the data an uninterrupted run reads;
  * PRNG streams: one root key per seed, split once into the testbed's named `streams`; each step
    uses `fold_in(stream, step)`;
  * eval every `eval_every` steps and at the end; logging every `log_every` steps to TensorBoard
    (non-finite values are logged as NaN and counted, never dropped); a progress bar with the
    metrics the testbed names;
  * checkpoints every `checkpoint_every` steps (orbax, atomic; `rlsoft.checkpoint`) holding the
    state and, as metadata, the step, the data position and the full config;
  * run directories: each run writes under `<logdir>/<run name>`, named from the experiment,
    scheme, tau, seed and a time stamp (or `--run_name`), so two runs never overlay curves or
    replace checkpoints. `--resume` continues the newest run there (or the named one), refuses a
    changed config field unless `--resume_override=field,...` names it, and purges any logged
    step past the checkpoint (tensorboardX's `purge_step`), so no step is logged twice;
  * a clean stop on SIGINT / SIGTERM: the step in flight finishes, a checkpoint is written, and
    `run` returns with `stopped` set.

The run directory and the resume checks (`prepare_run`, `rlsoft.run_dir`) come first: every check that
can fail on bad input runs before the experiment builds or compiles anything.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import threading
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

import jax
import numpy as np

from rlsoft import compile_cache, distributed
from rlsoft.config import check, config_to_dict
from rlsoft.run_dir import RunDir, RunError

@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The driver's fields, shared by every experiment config (flat flags: --logdir, --resume, ...)."""

    seed: int = 0
    eval_every: int = 10  # 0: only at the end
    log_every: int = 1
    checkpoint_every: int = 10  # 0: never (a stop signal still writes one)
    logdir: str = ""
    run_name: str = ""
    resume: bool = False
    resume_override: tuple[str, ...] = ()
    progress: bool = True
    # JAX's persistent compilation cache (rlsoft.compile_cache): a second run of the same config loads
    # its compiled programs instead of compiling them; empty: off.
    compile_cache: str = compile_cache.DEFAULT_DIR
    # Compile the testbed's programs (`Testbed.lower`) concurrently before the first step, rather
    # than one by one at their first calls (rlsoft.compile_cache.compile_ahead).
    compile_ahead: bool = True

    def __post_init__(self):
        for name in ("eval_every", "log_every", "checkpoint_every"):
            check(getattr(self, name) >= 0, f"{name}={getattr(self, name)} is invalid; need >= 0")
        check(not self.run_name or (os.sep not in self.run_name and self.run_name not in (".", "..")),
              f"run_name={self.run_name!r} is invalid; need a plain directory name")
        check(not (self.resume or self.run_name or self.resume_override) or self.logdir,
              "resume, run_name and resume_override need --logdir")


class Testbed(Protocol):
    """What the driver needs from a testbed (built by an experiment from models/ and envs/)."""

    total_steps: int
    streams: tuple[str, ...]  # named PRNG streams, e.g. ("data", "rollout", "eval")
    progress_keys: tuple[str, ...]  # metrics shown on the progress bar

    def init_state(self) -> Any:
        """The state at step 0 (a pytree; also the restore target)."""

    def train(self, state: Any, step: int, num_steps: int, keys: Mapping[str, jax.Array]) -> tuple[Any, dict]:
        """Advance `num_steps` steps from `step`. Metrics: {name: scalar} for one step, or
        {name: [num_steps]} for several. Optional "text/<tag>" entries are logged as text."""

    def steps_per_call(self) -> int:
        """The most steps one `train` call may take (1, or a compiled testbed's scan length)."""

    def evaluate(self, state: Any, keys: Mapping[str, jax.Array]) -> dict:
        """Held-out metrics, named "eval/..."."""

    def data_position(self, step: int) -> int:
        """How many training examples steps 0 .. step-1 consumed."""

    def lower(self, state: Any, step: int, num_steps: int, keys: Mapping[str, jax.Array]) -> Sequence[Any]:
        """The programs a run from `step` calls (its first `train` call takes `num_steps` steps),
        lowered (`jitted.lower(...)`) on the arguments those calls will pass. The driver compiles
        them concurrently before the first step (`--compile_ahead`). Optional: a testbed without
        it compiles each program at its first call."""


def stream_keys(seed: int, streams: Sequence[str]) -> dict[str, jax.Array]:
    """The named PRNG streams of a run: its root key PRNGKey(seed) split once, one key per stream.
    (A population testbed derives each member's streams with this from the member's own seed.)"""
    return dict(zip(streams, jax.random.split(jax.random.PRNGKey(seed), len(streams))))


@dataclasses.dataclass
class RunResult:
    history: list[dict]
    stopped: Optional[int] = None  # the signal number that stopped the run early, if any


class Driver:
    """Runs a `Testbed` under `cfg` (RunConfig fields) in `run_dir` (from `prepare_run`)."""

    def __init__(self, testbed: Testbed, cfg: Any, run_dir: RunDir, state: Any = None):
        self.testbed, self.cfg, self.run_dir = testbed, cfg, run_dir
        self.keys = stream_keys(cfg.seed, testbed.streams)
        self.state = testbed.init_state() if state is None else state
        self.step = 0
        self.checkpointer = self.logger = None
        self.nonfinite_logged = 0
        self.stopped: Optional[int] = None  # the signal that stopped the run, if one did
        self.signalled: Optional[int] = None  # a signal this process received (stops at the step's end)
        self.start_step = 0  # where this process started: 0, or the step a resume restored
        self.compile_seconds: Optional[list[float]] = None  # each program compiled ahead (`Testbed.lower`)
        if run_dir.path:
            from rlsoft.checkpoint import Checkpointer

            self.checkpointer = Checkpointer(run_dir.checkpoints)
            if cfg.resume:
                self._restore()

    # ---- checkpoints ------------------------------------------------------------------------
    def save(self) -> None:
        if self.checkpointer is None:
            return
        meta = {"step": self.step, "data_position": int(self.testbed.data_position(self.step)),
                "config": config_to_dict(self.cfg)}
        self.checkpointer.save(self.step, self.state, meta, force=True)

    def _restore(self) -> None:
        try:
            restored = self.checkpointer.restore(target=self.state)
        except (RuntimeError, ValueError) as e:
            raise RunError(f"resume is invalid; {str(e).splitlines()[0]}") from None
        if restored is None:
            print(f"resume: no checkpoint in {self.run_dir.path} yet; starting at step 0", file=sys.stderr)
            return
        self.state, meta = restored
        self.step = self.start_step = int(meta["step"])
        for k, (old, new) in self.run_dir.overridden.items():
            print(f"resume: {k} overridden ({old!r} -> {new!r})", file=sys.stderr)
        print(f"resumed {self.run_dir.path} at step {self.step}", file=sys.stderr)

    # ---- logging ----------------------------------------------------------------------------
    def _open_logger(self):
        # One writer per run: process 0 (every process holds the same metrics).
        if self.logger is None and self.run_dir.path and distributed.is_primary():
            from rlsoft.logger import TensorBoardLogger

            # purge_step drops events a killed run logged after its last checkpoint.
            self.logger = TensorBoardLogger(self.run_dir.path, purge_step=self.start_step if self.cfg.resume else None)
        return self.logger

    def _log(self, step: int, metrics: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in metrics.items() if not k.startswith("text/")}
        self.nonfinite_logged += sum(not math.isfinite(v) for v in scalars.values())
        logger = self._open_logger()
        has_eval = any(k.startswith("eval/") for k in scalars)
        if logger is None or (self.cfg.log_every and step % self.cfg.log_every and not has_eval):
            return
        logger.scalars(step, scalars)
        for k, text in metrics.items():
            if k.startswith("text/"):
                logger.text(step, k[len("text/"):], text)

    # ---- the loop ---------------------------------------------------------------------------
    def evaluate(self) -> dict:
        return {k: float(v) for k, v in self.testbed.evaluate(self.state, self.keys).items()}

    def _due(self, every: int, start: int, end: int) -> bool:
        return bool(every) and (end // every) > (start // every)

    def _call_length(self, start: int, end: int) -> int:
        """Steps the `train` call at `start` takes: at most the testbed's, and none past `end`, the
        next eval or the next checkpoint."""
        return min(self.testbed.steps_per_call(), end - start,
                   *(_to_boundary(start, e) for e in (self.cfg.eval_every, self.cfg.checkpoint_every) if e))

    def _compile_ahead(self, end: int) -> None:
        lower = getattr(self.testbed, "lower", None)
        if self.compile_seconds is not None or lower is None or not self.cfg.compile_ahead or self.step >= end:
            return
        lowered = lower(self.state, self.step, self._call_length(self.step, end), self.keys)
        self.compile_seconds = compile_cache.compile_ahead(lowered)
        distributed.barrier("compiled")  # the first step's collectives start together (rlsoft.distributed)

    def run(self, until: Optional[int] = None) -> RunResult:
        """Train to step `until` (default: the testbed's total); returns each step's metrics."""
        total = self.testbed.total_steps
        end = total if until is None else min(until, total)
        history: list[dict] = []
        bar = _progress(total, self.step, self.cfg.progress and distributed.is_primary(), self.testbed.progress_keys)
        # Python delivers signals to the main thread only; elsewhere (a worker thread) keep the defaults.
        main_thread = threading.current_thread() is threading.main_thread()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
        try:
            self._compile_ahead(end)
            while self.step < end and self.stopped is None:
                start = self.step
                n = self._call_length(start, end)
                self.state, metrics = self.testbed.train(self.state, start, n, self.keys)
                self.step = start + n
                rows = _per_step(distributed.to_host(metrics), start, n)
                if self._due(self.cfg.eval_every, start, self.step) or self.step == total:
                    rows[-1].update(self.evaluate())
                for row in rows:
                    self._log(row["step"], row)
                    history.append(row)
                    bar(row)
                if self._due(self.cfg.checkpoint_every, start, self.step) or self.step == total:
                    self.save()
                # A signal that reached any process stops all of them after the same step (the
                # checkpoint below is a collective write).
                self.stopped = distributed.largest(self.signalled or 0) or None
            if self.stopped is not None:
                self.save()
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
            bar(None)
            if self.logger is not None:
                self.logger.flush()
        return RunResult(history, self.stopped)

    def _on_signal(self, signum, frame) -> None:
        if self.signalled is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signalled = signum
        print(f"\nsignal {signal.Signals(signum).name}: stopping after this step and writing a checkpoint",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.nonfinite_logged:
            print(f"warning: {self.nonfinite_logged} non-finite metric values were logged (as NaN)",
                  file=sys.stderr)
        if self.checkpointer is not None:
            self.checkpointer.close()
        if self.logger is not None:
            self.logger.close()


def _to_boundary(step: int, every: int) -> int:
    return every - step % every


def _per_step(metrics: Mapping[str, Any], start: int, n: int) -> list[dict]:
    """{name: [n] or scalar} -> one row per step, each with "step" (the step index, 0-based).

    A scalar of a multi-step call (a summary such as health monitors) belongs to its last step."""
    rows = [{"step": start + i} for i in range(n)]
    for k, v in metrics.items():
        if isinstance(v, str):
            rows[-1][k] = v
            continue
        v = np.asarray(v, np.float64)
        if v.ndim and v.shape[0] == n:
            for row, x in zip(rows, v):
                row[k] = float(x)
        else:
            rows[-1][k] = float(v)
    return rows


def _progress(total: int, start: int, enabled: bool, keys: Sequence[str]) -> Callable[[Optional[dict]], None]:
    """A tqdm bar on stderr with the testbed's metrics; called with None to close."""
    if not enabled:
        return lambda row: None
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, file=sys.stderr, dynamic_ncols=True)

    def update(row: Optional[dict]) -> None:
        if row is None:
            bar.close()
            return
        shown = {k.split("/")[-1]: f"{row[k]:.3f}" for k in keys if k in row and math.isfinite(row[k])}
        bar.set_postfix(shown)
        bar.update(1)

    return update
