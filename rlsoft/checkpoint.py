"""Checkpoints over orbax's CheckpointManager: per step, the state pytree (item "state") and a JSON
dict, e.g. data position and run config (item "metadata"); plain orbax reads both back.

Orbax saves atomically, keeps the newest steps, lists them, records each array's shape and restores
with shardings. Added here, as orbax does not do it: commit_success.txt is required too, with one
warning line per partial step directory; a CRC-32 per array (tensorstore catches truncated or
deleted files, not a flipped byte in a zstd chunk); a step that fails to read is skipped with one
warning line, and when none reads a one-line RuntimeError, so a run never silently restarts from
scratch; a target whose key paths or shapes differ (e.g. --resume with another model size) is a
one-line ValueError naming them; numpy scalars come back as numpy scalars.
One writer per directory; readers in other processes pass `read_only=True`. In a multi-process run
(rlsoft.distributed) every process calls `save` and `restore` and orbax coordinates them: each
writes and reads the shards on its own devices, process 0 the JSON and the commit.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import sys
import time
import types
import warnings
import zlib
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from rlsoft import distributed

log = logging.getLogger(__name__)

COMMIT_MARKER = ocp.path.atomicity.COMMIT_SUCCESS_FILE  # "commit_success.txt"
TMP_SUFFIX = ocp.step.TMP_DIR_SUFFIX  # ".orbax-checkpoint-tmp"
_MAX_LISTED = 3  # paths named in one mismatch message


def _is_key(x: Any) -> bool:
    return getattr(x, "dtype", None) is not None and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _data(x: Any) -> Any:
    """Typed PRNG keys as their raw key data, which is what orbax stores (for shapes and CRCs)."""
    if not _is_key(x):
        return x
    return jax.random.key_data(x) if isinstance(x, jax.Array) else jax.eval_shape(jax.random.key_data, x)


def _flat(tree: Any) -> dict[str, tuple[str, Any]]:
    """Leaves by orbax's parameter name ('opt.1.0.mu'): (jax key path, for messages; leaf)."""
    return {".".join(ocp.tree.str_keypath(p)): (jax.tree_util.keystr(p), x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _crc32(x: Any) -> int | None:
    """CRC-32 of an array's bytes; None for Python scalars and arrays not all on this host."""
    if not hasattr(x := _data(x), "dtype") or isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    return zlib.crc32(np.ascontiguousarray(x).reshape(-1).view(np.uint8))


def _mismatch(saved: Any, target: Any) -> str:
    """One line on how the key paths and shapes of `target` differ from orbax's metadata tree."""
    have, want = _flat(saved), _flat(target)

    def named(what: str, paths: list[str]) -> str:
        more = f" (+{len(paths) - _MAX_LISTED} more)" if len(paths) > _MAX_LISTED else ""
        return f"{what}: {', '.join(paths[:_MAX_LISTED])}{more}" if paths else ""

    shaped = [f"{p} {list(have[k][1].shape)} vs {list(np.shape(_data(x)))}" for k, (p, x) in want.items()
              if k in have and tuple(have[k][1].shape) != np.shape(_data(x))]
    parts = [named("in checkpoint but not in target", [p for k, (p, _) in have.items() if k not in want]),
             named("in target but not in checkpoint", [p for k, (p, _) in want.items() if k not in have]),
             named("shape differs (checkpoint vs target)", shaped)]
    return "; ".join(part for part in parts if part)


def _like_target(x: Any, t: Any) -> Any:
    """A restored leaf `x` as the target leaf `t` has it: orbax gives numpy scalars back as 0-d arrays,
    and typed keys as key data from older rlsoft checkpoints (which stored only their key data)."""
    if isinstance(t, np.generic):
        return t.dtype.type(x[()])
    if _is_key(t) and not _is_key(x):
        return jax.random.wrap_key_data(x, impl=jax.random.key_impl(t) if isinstance(t, jax.Array) else t.dtype._impl)
    return x


def _jsonable(metadata: Any) -> dict:
    """`metadata` as JSON gives it back: numpy/jax scalars as Python numbers, tuples as lists."""
    def scalar(x):  # json's fallback for what it cannot write
        if getattr(x, "ndim", None) == 0:
            return x.item()
        raise TypeError(f"{type(x).__name__} is not JSON serializable")
    try:
        if not isinstance(metadata, dict):
            raise TypeError(f"got {type(metadata).__name__}")
        return json.loads(json.dumps(metadata, default=scalar))
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint metadata must be a JSON-able dict: {_one_line(e)}") from None


def _one_line(e: BaseException | None, limit: int = 400) -> str:
    """`Type: message` on one line, with the chain of causes (orbax wraps tensorstore's errors)."""
    parts = []
    while e is not None and len(parts) < 3:
        parts.append(f"{type(e).__name__}: " + " ".join(str(e).split()).split(" See full TensorStore details")[0])
        e = e.__cause__
    text = " <- ".join(parts)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _ReadError(Exception):
    """A committed step whose files could not be read back (truncated, deleted, changed)."""


def _quietly(read: Callable[[], Any]) -> Any:
    """read(), or _ReadError with its error on one line and nothing else on stderr.

    When one array read fails, orbax closes its event loop with the other reads in flight; as they
    finish and are collected, each prints a traceback ("Event loop is closed", "Exception ignored in
    <coroutine>", "Task was destroyed", "never awaited"), at any later time. So reads run with those
    reports muted, and after a failure until no orbax coroutine is left (ms; at most about 5 s)."""
    hook, sys.unraisablehook = sys.unraisablehook, lambda _: None
    asyncio_log = logging.getLogger("asyncio")
    was_disabled, asyncio_log.disabled = asyncio_log.disabled, True
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
            try:
                return read()
            except Exception as e:  # noqa: BLE001 - any failure to read a committed step = damaged
                error = _one_line(e)
            for _ in range(500):
                gc.collect()
                if not any(type(o) is types.CoroutineType and "/orbax/" in o.cr_code.co_filename
                           for o in gc.get_objects()):
                    break
                time.sleep(0.01)
    finally:
        asyncio_log.disabled, sys.unraisablehook = was_disabled, hook
    raise _ReadError(error)


class Checkpointer:
    """Training state under `directory`, the newest `max_to_keep` steps. `state`: any pytree of arrays
    and scalars (nnx.State, optax states, typed PRNG keys, ints); `metadata`: a JSON-able dict.

        state, meta, step = ckpt.restore_or_init(init_fn)   # step is None on a fresh start
        ckpt.save(step, state, {"data_position": pos, "config": config_dict})"""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3,
                 save_interval_steps: int = 1, read_only: bool = False):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be None or >= 1, got {max_to_keep}")
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        self.directory = os.path.abspath(os.fspath(directory))
        if read_only and not os.path.isdir(self.directory):
            raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
        self.save_interval_steps, self.read_only = save_interval_steps, read_only
        self.last_restored_step: int | None = None
        self._corrupt: set[int] = set()  # committed steps that failed to read in this process
        self._warned: set[str] = set()  # partial step directories reported
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep,
            save_interval_steps=0 if read_only else 1,  # save() checks the interval itself
            # Listing also requires the commit marker; writing keeps orbax's atomic rename.
            step_name_format=ocp.step.standard_name_format(
                temporary_path_cls=ocp.path.atomicity.CommitFileTemporaryPath),
            enable_async_checkpointing=False,  # save() returns once the step is committed
            read_only=read_only, create=not read_only)
        # Handlers named up front, so that a fresh manager reads item metadata before any restore;
        # "layout" (paths, shapes, CRCs) is only in older rlsoft checkpoints, named so orbax need not warn.
        handlers = {"state": ocp.StandardCheckpointHandler(), "metadata": ocp.JsonCheckpointHandler(),
                    "layout": ocp.JsonCheckpointHandler()}
        self._mgr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def all_steps(self) -> list[int]:
        """Committed steps, oldest first, without those this process found corrupt. Re-reads disk."""
        self._mgr.reload()
        for name in sorted(os.listdir(self.directory)) if os.path.isdir(self.directory) else []:
            path, step = os.path.join(self.directory, name), name.split(".")[0]
            marker = os.path.join(path, COMMIT_MARKER)
            problem = ("unfinished save (orbax tmp directory)" if name.startswith(step + TMP_SUFFIX) else
                       f"no {COMMIT_MARKER}" if name == step and not os.path.exists(marker) else "")
            if problem and step.isdigit() and path not in self._warned and os.path.isdir(path):
                self._warned.add(path)
                log.warning("checkpoint: skipping partial step %s at %s: %s", step, path, problem)
        return sorted(s for s in self._mgr.all_steps() if s not in self._corrupt)

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, metadata: dict | None = None, *, force: bool = False) -> bool:
        """Write `state` and `metadata` as checkpoint `step`, blocking until it is committed; False
        when the interval skips it. A partial or stale directory at `step` is replaced with a warning."""
        if self.read_only:
            raise ValueError(f"checkpointer for {self.directory} is read-only; cannot save step {step}")
        if (step := int(step)) < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if not force and step % self.save_interval_steps:
            return False
        metadata = _jsonable({} if metadata is None else metadata)
        self._mgr.reload()
        path = os.path.join(self.directory, str(step))
        if step in self._mgr.all_steps():  # e.g. a step that a restore fell back past
            log.warning("checkpoint: replacing existing step %d in %s", step, self.directory)
            self._mgr.delete(step)
        elif os.path.isdir(path):  # orbax could not rename its tmp directory onto it
            log.warning("checkpoint: removing partial step %d at %s (no %s)", step, path, COMMIT_MARKER)
            if distributed.is_primary():  # every process saves; one removes, the others wait for it
                shutil.rmtree(path)
            distributed.barrier(f"checkpoint-rmtree-{step}")
        crcs = {k: c for k, (_, x) in _flat(state).items() if (c := _crc32(x)) is not None}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state, custom_metadata={"crc32": crcs}),
                                  metadata=ocp.args.JsonSave(metadata))
        self._mgr.save(step, args=args, force=True)  # force: orbax skips steps <= its latest
        self._mgr.wait_until_finished()
        self._corrupt.discard(step)
        self._warned.discard(path)
        return True

    def restore(self, step: int | None = None, target: Any = None) -> tuple[Any, dict] | None:
        """(state, metadata) of `step`, or of the newest readable step; None when none is committed.

        `target` (concrete or abstract) fixes the returned pytree types, dtypes and shardings; without
        one the state comes back as nested dicts/lists. Skipped steps drop out of `latest_step()` in
        this process; the step used is left in `last_restored_step`."""
        found = self._first_readable(step, lambda s: self._restore_step(s, target))
        if found is None:
            return None
        self.last_restored_step, out = found
        return out

    def read_metadata(self, step: int | None = None) -> dict | None:
        """The JSON metadata of `step`, or of the newest committed step whose JSON reads, without
        reading any array (e.g. to compare configs before building a model). Fails like `restore`."""
        args = ocp.args.Composite(metadata=ocp.args.JsonRestore())
        found = self._first_readable(step, lambda s: _quietly(lambda: self._mgr.restore(s, args=args)["metadata"]))
        return None if found is None else found[1]

    def _first_readable(self, step: int | None, read: Callable[[int], Any]) -> tuple[int, Any] | None:
        """(step, read(step)) for `step` or the newest step that reads, one warning line per step
        skipped. A wrong target (ValueError) is not a read error and propagates."""
        steps = self.all_steps()
        if step is not None:
            if int(step) not in self._mgr.all_steps():
                raise FileNotFoundError(f"no committed step {step} in {self.directory} (have {steps})")
            steps = [int(step)]
        failed = {}
        for s in reversed(steps):
            try:
                out = read(s)
            except _ReadError as e:
                failed[s] = str(e)
                log.warning("checkpoint: skipping unreadable step %d in %s: %s", s, self.directory, e)
                continue
            self._corrupt.update(failed)
            return s, out
        if not steps:
            return None
        # Every step failed: more likely a problem here than damage to all of them, so none is
        # marked corrupt. The newest step's error is the one to look at.
        raise RuntimeError(f"no readable checkpoint in {self.directory} (tried steps {steps[::-1]}); "
                           f"step {steps[-1]}: {failed[steps[-1]]}")

    def _restore_step(self, step: int, target: Any) -> tuple[Any, dict]:
        saved = _quietly(lambda: self._mgr.item_metadata(step)["state"])
        if target is not None and (why := _mismatch(saved.tree, target)):
            raise ValueError(f"restore target does not match checkpoint step {step}: {why}")
        # Abstract leaves get the saved sharding from orbax, or this device when those are not here.
        fallback = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        # Orbax rejects numpy scalars in a target; 0-d arrays stand in for them (see _like_target).
        item = None if target is None else jax.tree.map(
            lambda x: np.asarray(x) if isinstance(x, np.generic) else x, target)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(item, fallback_sharding=fallback),
                                  metadata=ocp.args.JsonRestore())
        out = _quietly(lambda: self._mgr.restore(step, args=args))
        crcs = (saved.custom_metadata or {}).get("crc32", {})
        dtypes = {k: getattr(m, "dtype", None) for k, (_, m) in _flat(saved.tree).items()}
        for k, (path, x) in _flat(out["state"]).items():
            # Only leaves restored with their saved dtype can be checked (a target may ask for a cast).
            if k in crcs and getattr(_data(x), "dtype", None) == dtypes.get(k) and _crc32(x) != crcs[k]:
                raise _ReadError(f"checksum mismatch at {path}: array data is damaged")
        return out["state"] if target is None else jax.tree.map(_like_target, out["state"], target), out["metadata"]

    def restore_or_init(self, init_fn: Callable[[], Any]) -> tuple[Any, dict, int | None]:
        """(state, metadata, step) of the newest readable step, else (init_fn(), {}, None); init_fn()
        is always called, as the restore target."""
        fresh = init_fn()
        out = self.restore(target=fresh)
        return (fresh, {}, None) if out is None else (*out, self.last_restored_step)

    def close(self) -> None:
        self._mgr.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
