"""Checkpoints with orbax-checkpoint: a state pytree (params, optimizer state, PRNG keys, ...) plus a
small JSON dict (data position, config), one directory per step, newest-valid-first restore.

What orbax 0.12 writes on a local file system, and how this module reads it:

    <dir>/<step>.orbax-checkpoint-tmp/   a save in progress, or one killed part-way
    <dir>/<step>/                        a finished save: the tmp directory renamed (atomic)
        commit_success.txt               written into the tmp directory just before that rename
        _CHECKPOINT_METADATA             orbax step metadata (timestamps)
        state/                           the arrays (tensorstore OCDBT: manifest.ocdbt,
                                         ocdbt.process_0/d/<hash>, d/<hash>), _METADATA, _sharding
        metadata/metadata                the caller's JSON dict
        layout/metadata                  key path, shape, dtype and CRC-32 of every state leaf

A step counts as valid when its directory has the plain step name AND commit_success.txt; orbax
only checks the name on a local disk, so a step directory without the marker (an interrupted copy,
or a commit-file file system) is skipped here too. Partial steps are skipped with a one-line
warning. Damage inside a committed step shows up only when it is read: tensorstore fails on
truncated or deleted files, and a CRC-32 per array (checked when restoring into a target) catches
changed bytes. `restore` then warns in one line naming the step and the error and tries the next
older step. The layout also lets a target of the wrong structure fail with a one-line ValueError.

No valid checkpoint: `restore` returns None when no committed step exists (an empty run, or one
killed during its first save) and raises a one-line RuntimeError when committed steps exist but
none can be read, so that a trainer never silently restarts from scratch over a damaged run.

Typed PRNG keys (`jax.random.key`) are stored as their raw uint32 key data and re-wrapped with the
target's key implementation on restore. Arrays come back with the target's shardings.

One writer per directory, on one host: a writable Checkpointer replaces partial or stale step
directories at the step it saves. Readers in other processes should pass `read_only=True`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import zlib
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

COMMIT_MARKER = ocp.path.atomicity.COMMIT_SUCCESS_FILE  # "commit_success.txt"
TMP_SUFFIX = ocp.step.TMP_DIR_SUFFIX  # ".orbax-checkpoint-tmp"
_MAX_LISTED = 3  # paths named in one mismatch message


# --------------------------------------------------------------------------------------------
# Pytree helpers: typed PRNG keys <-> raw key data, and the layout of a tree (paths, shapes, CRCs).


def _is_typed_key(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _raw_keys(tree: Any) -> Any:
    """`tree` with every typed PRNG key array replaced by its uint32 key data (what is stored)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, tree)


def _crc32(leaf: Any) -> int | None:
    """CRC-32 of an array leaf's bytes; None for Python scalars and arrays not all on this host."""
    if isinstance(leaf, jax.Array):
        if not leaf.is_fully_addressable:
            return None
        leaf = np.asarray(leaf)
    elif not isinstance(leaf, (np.ndarray, np.generic)):
        return None
    return zlib.crc32(np.ascontiguousarray(leaf).reshape(-1).view(np.uint8))


def _layout(tree: Any, checksums: bool = False) -> dict:
    """Key paths, shapes, dtypes (and CRC-32s) of the leaves of `tree` as stored, i.e. typed PRNG
    keys counted as their raw key data. Works on concrete and abstract trees (no checksums)."""
    out = {"paths": [], "shapes": [], "dtypes": [], "crc32": []}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if _is_typed_key(leaf):
            leaf = jax.random.key_data(leaf) if checksums else jax.eval_shape(jax.random.key_data, leaf)
        out["paths"].append(jax.tree_util.keystr(path))
        out["shapes"].append(list(np.shape(leaf)))
        out["dtypes"].append(str(getattr(leaf, "dtype", type(leaf).__name__)))
        out["crc32"].append(_crc32(leaf) if checksums else None)
    return out


def _verify(restored: Any, layout: dict) -> None:
    """Raise ValueError at the first restored array whose bytes differ from what was saved.

    Only leaves restored with their saved dtype are checked (a target may ask for a cast)."""
    saved = dict(zip(layout["paths"], zip(layout["dtypes"], layout.get("crc32") or [])))
    for path, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]:
        dtype, crc = saved.get(jax.tree_util.keystr(path), (None, None))
        if crc is not None and str(getattr(leaf, "dtype", "")) == dtype and _crc32(leaf) != crc:
            raise ValueError(f"checksum mismatch at {jax.tree_util.keystr(path)}: array data is damaged")


def _mismatch(saved: dict, wanted: dict) -> str:
    """One-line description of how two layouts differ ('' when paths and shapes agree)."""
    have = dict(zip(saved["paths"], map(tuple, saved["shapes"])))
    want = dict(zip(wanted["paths"], map(tuple, wanted["shapes"])))

    def named(paths):
        more = f" (+{len(paths) - _MAX_LISTED} more)" if len(paths) > _MAX_LISTED else ""
        return ", ".join(paths[:_MAX_LISTED]) + more

    parts = []
    if missing := [p for p in have if p not in want]:
        parts.append(f"in checkpoint but not in target: {named(missing)}")
    if extra := [p for p in want if p not in have]:
        parts.append(f"in target but not in checkpoint: {named(extra)}")
    shaped = [f"{p} {list(have[p])} vs {list(want[p])}" for p in want if p in have and have[p] != want[p]]
    if shaped:
        parts.append(f"shape differs (checkpoint vs target): {named(shaped)}")
    return "; ".join(parts)


def _abstract_target(target: Any) -> Any:
    """The restore item for orbax: leaves as ShapeDtypeStructs with a sharding, keys as key data.

    jax.Arrays keep their own sharding; abstract leaves without one go to the default device (orbax
    would otherwise return numpy arrays); numpy arrays and Python scalars are left as they are.
    """

    def sharding(x):
        own = getattr(x, "sharding", None)
        return own if own is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def leaf_target(x):
        if _is_typed_key(x):
            data = jax.eval_shape(jax.random.key_data, x)
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding(x))
        if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding(x))
        if isinstance(x, np.generic):  # orbax restores 0-d numpy arrays, not numpy scalars
            return np.asarray(x)
        return x

    return jax.tree.map(leaf_target, target)


def _like_target(restored: Any, target: Any) -> Any:
    """Typed PRNG keys (with the target's key implementation) and numpy scalars where `target` has them."""

    def leaf(x, t):
        if isinstance(t, np.generic):
            return t.dtype.type(np.asarray(x)[()])
        if not _is_typed_key(t):
            return x
        impl = jax.random.key_impl(t) if isinstance(t, jax.Array) else t.dtype._impl  # abstract key
        return jax.random.wrap_key_data(x, impl=impl)

    return jax.tree.map(leaf, restored, target)


def _jsonable(metadata: Any) -> dict:
    """`metadata` as it will come back from JSON: numpy/jax scalars as Python numbers, tuples as lists."""
    if not isinstance(metadata, dict):
        raise ValueError(f"checkpoint metadata must be a dict, got {type(metadata).__name__}")

    def scalar(x):
        if isinstance(x, (np.generic, np.ndarray, jax.Array)) and np.ndim(x) == 0:
            return np.asarray(x).item()
        raise TypeError(f"{type(x).__name__} is not JSON serializable")

    try:
        return json.loads(json.dumps(metadata, default=scalar))
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint metadata must be a JSON-able dict: {_one_line(e)}") from None


def _one_line(e: BaseException, limit: int = 400) -> str:
    """`Type: message` on one line, with the chain of causes (orbax wraps tensorstore's errors)."""
    parts = []
    while e is not None and len(parts) < 3:
        text = " ".join(str(e).split()).split(" See full TensorStore details")[0]
        parts.append(f"{type(e).__name__}: {text}")
        e = e.__cause__
    text = " <- ".join(parts)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------


class Checkpointer:
    """Save and restore training state under `directory`, keeping the newest `max_to_keep` steps.

    Usage in a trainer:
        ckpt = Checkpointer(run_dir, max_to_keep=3, save_interval_steps=100)
        state, meta, step = ckpt.restore_or_init(init_fn)   # step is None on a fresh start
        for step in range(0 if step is None else step + 1, total):
            ...
            ckpt.save(step, state, {"data_position": pos})
        ckpt.close()

    `state` is any pytree of arrays and scalars: nnx.State or its pure dict, optax states
    (NamedTuples, EmptyState), raw or typed PRNG keys, Python ints. `metadata` is a JSON-able dict
    (tuples come back as lists).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        read_only: bool = False,
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be None or >= 1, got {max_to_keep}")
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_interval_steps = save_interval_steps
        self.read_only = read_only
        self.last_restored_step: int | None = None
        self._corrupt: set[int] = set()  # committed steps that failed to restore (this process)
        self._warned: set[str] = set()
        if read_only and not os.path.isdir(self.directory):
            raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep,
            save_interval_steps=0 if read_only else 1,  # save() checks the interval itself
            # Listing requires the commit marker as well as the final name (see module docstring);
            # writing still uses orbax's default atomic rename of <step>.orbax-checkpoint-tmp.
            step_name_format=ocp.step.standard_name_format(
                temporary_path_cls=ocp.path.atomicity.CommitFileTemporaryPath
            ),
            enable_async_checkpointing=False,  # save() returns once the step is committed
            read_only=read_only,
            create=not read_only,
        )
        self._mgr = ocp.CheckpointManager(self.directory, options=options)

    # ---- listing ---------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Committed steps, oldest first, without those this process found corrupt. Re-reads disk."""
        self._mgr.reload()
        self._warn_partial()
        return sorted(s for s in self._mgr.all_steps() if s not in self._corrupt)

    def latest_step(self) -> int | None:
        """The newest committed step not known to be corrupt, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _warn_partial(self) -> None:
        """One warning per partial step directory: an orbax tmp dir or a step dir without marker."""
        if not os.path.isdir(self.directory):
            return
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name)
            if not os.path.isdir(path) or path in self._warned:
                continue
            if TMP_SUFFIX in name and name.split(TMP_SUFFIX)[0].isdigit():
                problem = "unfinished save (orbax tmp directory)"
            elif name.isdigit() and not os.path.exists(os.path.join(path, COMMIT_MARKER)):
                problem = f"no {COMMIT_MARKER}"
            else:
                continue
            self._warned.add(path)
            log.warning("checkpoint: skipping partial step %s at %s: %s", name.split(".")[0], path, problem)

    # ---- saving ----------------------------------------------------------------------------

    def save(self, step: int, state: Any, metadata: dict | None = None, *, force: bool = False) -> bool:
        """Write `state` and `metadata` as checkpoint `step`; returns False when the interval skips it.

        Blocks until the step directory is committed, so a kill right after save() returns leaves
        a complete checkpoint. A partial directory, or a stale one at the same step (e.g. after a
        restore fell back past a corrupt step), is replaced with a warning. Steps beyond the
        newest `max_to_keep` are then deleted.
        """
        if self.read_only:
            raise ValueError(f"checkpointer for {self.directory} is read-only; cannot save step {step}")
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if not force and step % self.save_interval_steps:
            return False
        metadata = _jsonable({} if metadata is None else metadata)

        self._mgr.reload()
        if step in self._mgr.all_steps():
            log.warning("checkpoint: replacing existing step %d in %s", step, self.directory)
            self._mgr.delete(step)
        elif os.path.isdir(self._step_dir(step)):
            path = self._step_dir(step)
            log.warning("checkpoint: removing partial step %d at %s (no %s)", step, path, COMMIT_MARKER)
            shutil.rmtree(path)
        # A stale <step>.orbax-checkpoint-tmp is removed by orbax itself before it writes.

        raw = _raw_keys(state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(raw),
            metadata=ocp.args.JsonSave(metadata),
            layout=ocp.args.JsonSave(_layout(raw, checksums=True)),
        )
        self._mgr.save(step, args=args, force=True)  # force: orbax would skip steps <= its latest
        self._mgr.wait_until_finished()
        self._corrupt.discard(step)
        self._warned.discard(self._step_dir(step))
        return True

    # ---- restoring -------------------------------------------------------------------------

    def restore(self, step: int | None = None, target: Any = None) -> tuple[Any, dict] | None:
        """(state, metadata) of `step`, or of the newest readable step when `step` is None.

        `target` (concrete or abstract, e.g. from jax.eval_shape) fixes the returned pytree types
        (optax NamedTuples, nnx.State), dtypes and shardings; a target whose key paths or shapes
        differ from the checkpoint raises a one-line ValueError. Without a target the state comes
        back as nested dicts/lists of arrays, with typed keys as raw key data.

        With step=None, a step that fails to read is skipped with a one-line warning and the next
        older one is tried; skipped steps then drop out of `latest_step()` in this process, and the
        step used is left in `self.last_restored_step`. Returns None when there is no committed
        step; raises a one-line RuntimeError when there are some but none can be restored, and
        when an explicit `step` cannot be (FileNotFoundError when it is not committed).
        """
        steps = self.all_steps()
        if step is not None:
            step = int(step)
            if step not in self._mgr.all_steps():
                raise FileNotFoundError(f"no committed step {step} in {self.directory} (have {steps})")
            candidates = [step]
        else:
            candidates = steps[::-1]
        if not candidates:
            return None
        failed = {}
        for s in candidates:
            try:
                out = self._restore_step(s, target)
            except _ReadError as e:
                failed[s] = str(e)
                log.warning("checkpoint: skipping unreadable step %d in %s: %s", s, self.directory, e)
                continue
            self._corrupt.update(failed)
            self.last_restored_step = s
            return out
        # Every step failed: more likely a problem with the target than damage to all of them, so
        # nothing is marked corrupt. The newest step's error is the one to look at.
        s = candidates[0]
        raise RuntimeError(
            f"no readable checkpoint in {self.directory} (tried steps {candidates}); step {s}: {failed[s]}"
        )

    def _restore_step(self, step: int, target: Any) -> tuple[Any, dict]:
        """Restore one step; read errors become _ReadError, target mismatches ValueError."""
        try:
            info = self._mgr.restore(
                step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore(), layout=ocp.args.JsonRestore())
            )
            metadata, layout = info["metadata"], info["layout"]
            if not isinstance(layout, dict) or "paths" not in layout:
                raise ValueError(f"layout item is {type(layout).__name__}, not a layout dict")
        except Exception as e:  # noqa: BLE001 - any failure to read a committed step = damaged
            raise _ReadError(_one_line(e)) from e
        if target is not None and (why := _mismatch(layout, _layout(target))):
            raise ValueError(f"restore target does not match checkpoint step {step}: {why}")
        item = None if target is None else _abstract_target(target)
        try:
            restored = self._mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(item)))
            state = restored["state"]
            if target is not None:
                _verify(state, layout)
                state = _like_target(state, target)
        except Exception as e:  # noqa: BLE001
            raise _ReadError(_one_line(e)) from e
        return state, metadata

    def restore_or_init(self, init_fn: Callable[[], Any]) -> tuple[Any, dict, int | None]:
        """(state, metadata, step) of the newest readable checkpoint, else (init_fn(), {}, None).

        `init_fn()` is always called: its result is the restore target (pytree types, dtypes and
        shardings). Raises like `restore` when committed steps exist but none is readable.
        """
        fresh = init_fn()
        out = self.restore(target=fresh)
        if out is None:
            return fresh, {}, None
        state, metadata = out
        return state, metadata, self.last_restored_step

    def close(self) -> None:
        self._mgr.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _ReadError(Exception):
    """A committed step whose files could not be read back (truncated, deleted, garbled)."""
