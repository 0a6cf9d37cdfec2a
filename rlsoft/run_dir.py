"""Run directories: where a run writes, and the checks a resume must pass before anything compiles.

Each run writes under `<logdir>/<run name>`, named from the experiment, scheme, tau, seed and a
time stamp (or `--run_name`), so two runs never overlay curves or replace checkpoints. `--resume`
continues the newest run there (or the named one) and refuses a config field that changed since
its checkpoint unless `--resume_override=field,...` names it. `prepare_run` does every check that
can fail on bad input (a directory that cannot be written, a changed config, nothing to resume)
right after flag parsing; its errors are `RunError`s (one line; the experiment exits 2).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Mapping, Optional

from rlsoft import compile_cache, distributed
from rlsoft.config import config_diff, config_to_dict

# Fields that steer a run rather than define it: they may change on resume without an override
# (a run saved by 2 processes may resume in 1: orbax reshards the state onto the new devices).
RUN_CONTROL = ("logdir", "run_name", "resume", "resume_override", "progress", "distributed", "compile_cache",
               "compile_ahead")
CHECKPOINTS = "checkpoints"



@dataclasses.dataclass
class RunDir:
    """Where a run writes (empty `path`: nowhere), and what a resume starts from."""

    path: str = ""
    resume_step: Optional[int] = None
    overridden: dict = dataclasses.field(default_factory=dict)

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.path, CHECKPOINTS) if self.path else ""


class RunError(ValueError):
    """A run directory, resume or override problem (one line; the experiment exits 2)."""


def default_run_name(cfg: Any, experiment: str) -> str:
    """`<experiment>-<scheme>-tau<tau>-seed<seed>-<YYYYmmdd-HHMMSS>` from the fields `cfg` has."""
    parts = [experiment]
    for field, fmt in (("scheme", "{}"), ("tau", "tau{}"), ("seed", "seed{}")):
        if hasattr(cfg, field):
            parts.append(fmt.format(getattr(cfg, field)))
    parts.append(time.strftime("%Y%m%d-%H%M%S"))
    return "-".join(str(p).replace(os.sep, "_") for p in parts)


def _writable(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise RunError(f"logdir={path} is not writable: {e.strerror or e}") from None


def _newest_run(logdir: str) -> Optional[str]:
    """The run directory in `logdir` whose newest checkpoint or event file was written last."""
    best, best_time = None, -math.inf
    for name in os.listdir(logdir):
        path = os.path.join(logdir, name)
        if not os.path.isdir(path):
            continue
        stamps = [os.path.getmtime(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files]
        if stamps and max(stamps) > best_time:
            best, best_time = name, max(stamps)
    return best


def prepare_run(cfg: Any, experiment: str) -> RunDir:
    """Pick and check the run directory of `cfg` (a config with `RunConfig`'s fields). Raises RunError.

    Nothing is built or compiled here: this runs right after flag parsing. In a multi-process run
    process 0 picks the directory (names carry a time stamp, and creating one changes what the
    others would see) and every process gets its choice, or its error; a resume's checkpoint is then
    read by all of them together (orbax's reads are collective across processes). The persistent
    compilation cache is switched on (or off) here, before the first compile.
    """
    try:
        compile_cache.enable(cfg.compile_cache)
    except OSError as e:
        raise RunError(f"compile_cache={cfg.compile_cache} is invalid; {e.strerror or e}") from None
    if not distributed.is_multiprocess():
        return _prepare_run(cfg, experiment)
    run = RunDir(distributed.on_primary(lambda: _prepare_run(cfg, experiment, read_checkpoint=False).path, RunError))
    if run.path and cfg.resume:
        _check_resume(run, cfg)
    return run


def _prepare_run(cfg: Any, experiment: str, read_checkpoint: bool = True) -> RunDir:
    if not cfg.logdir:
        return RunDir()
    _writable(cfg.logdir)
    if cfg.resume:
        name = cfg.run_name or _newest_run(cfg.logdir)
        if name is None or not os.path.isdir(os.path.join(cfg.logdir, name)):
            where = f"run_name={cfg.run_name}" if cfg.run_name else f"logdir={cfg.logdir}"
            raise RunError(f"resume is invalid; {where} has no run to resume")
        run = RunDir(os.path.join(cfg.logdir, name))
        if read_checkpoint:
            _check_resume(run, cfg)
        _writable(run.path)
        return run
    name = cfg.run_name or default_run_name(cfg, experiment)
    path = os.path.join(cfg.logdir, name)
    if cfg.run_name and os.path.exists(path):
        raise RunError(f"run_name={name} already exists in {cfg.logdir}; pass --resume to continue it "
                       f"or choose another --run_name")
    suffix = 1
    while os.path.exists(path):  # two runs started in the same second
        path = os.path.join(cfg.logdir, f"{name}-{suffix}")
        suffix += 1
    _writable(path)
    return RunDir(path)


def _check_resume(run: RunDir, cfg: Any) -> None:
    """Read the newest checkpoint's metadata and refuse config fields that changed without override."""
    from rlsoft.checkpoint import Checkpointer

    if not os.path.isdir(run.checkpoints):
        return  # the run was stopped before its first checkpoint: it starts afresh
    with Checkpointer(run.checkpoints, read_only=True) as ckpt:
        try:
            meta = ckpt.read_metadata()
        except (RuntimeError, ValueError, OSError) as e:
            raise RunError(f"resume is invalid; {str(e).splitlines()[0]}") from None
    if meta is None:
        return
    saved = meta.get("config", {})
    every = config_diff(saved, config_to_dict(cfg))
    diff = {k: v for k, v in every.items() if k.split(".")[0] not in RUN_CONTROL}
    allowed = set(cfg.resume_override)
    unknown = sorted(allowed - set(every) - _all_fields(saved))
    if unknown:
        raise RunError(f"resume_override={','.join(unknown)} is invalid; no such config field")
    refused = [k for k in diff if k not in allowed]
    if refused:
        k = refused[0]
        more = f" (and {len(refused) - 1} more: {', '.join(refused[1:4])})" if len(refused) > 1 else ""
        raise RunError(f"resume is refused; {k} differs from the checkpoint ({diff[k][0]!r} -> {diff[k][1]!r})"
                       f"{more}; pass --resume_override={','.join(refused)} to accept")
    run.resume_step = meta.get("step")
    run.overridden = diff


def _all_fields(saved: Mapping, prefix: str = "") -> set[str]:
    out = set()
    for k, v in saved.items():
        name = f"{prefix}{k}"
        out.add(name)
        if isinstance(v, Mapping):
            out |= _all_fields(v, name + ".")
    return out
