"""Multi-process runs on JAX's own runtime (multi-controller JAX): one process per host, one program.

    --distributed.coordinator=10.0.0.1:1234 --distributed.num_processes=2 --distributed.process_id=0
    --distributed.auto      # jax.distributed.initialize() with no arguments: it reads the cluster itself

`initialize` calls `jax.distributed.initialize` before anything touches a device; process 0 also runs
the coordinator service. Afterwards `jax.devices()` lists every process's devices, so the
rlsoft.mesh mesh spans all hosts, and every process runs the same program (JAX's "multi-host and
multi-process environments" guide):

  * host data (prompts, rewards) is computed identically on every process (same keys, same
    question indices, same host verifiers), and each process places only the shards on its own
    devices (`rlsoft.mesh.shard_rows`, jax.make_array_from_callback);
  * arrays come back to the host with `to_host`: a global array sharded over processes is gathered
    (multihost_utils.process_allgather), so each process sees the whole array;
  * orbax checkpoints are written and read by every process, coordinated through the same runtime;
    logs, TensorBoard and printed results come from process 0 only (`is_primary`);
  * a signal to any process stops them all after the same step, with a checkpoint (rlsoft.driver
    agrees on it with `largest` after every step).

JAX reads the coordinator from $JAX_COORDINATOR_ADDRESS when --distributed.coordinator is not given.
With `auto` it fills whatever else is not given from a cluster it detects (Slurm, Open MPI,
Kubernetes, Cloud TPU);
$JAX_LOCAL_DEVICE_IDS restricts the devices a process uses (several processes on one host).
Multi-process collectives on CPU run over gloo (jax_cpu_collectives_implementation). Gloo gives a
collective's first use 30 s for every process to arrive; on a loaded machine two processes' compiles
can end further apart than that, so the host-side gathers here and the driver's first step wait at
a `barrier` of the coordination service first (no deadline short of `BARRIER_TIMEOUT_S`).
"""
from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from rlsoft.config import check


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-process run; the default (nothing set) is a single process."""

    coordinator: str = ""  # host:port of process 0's coordinator; empty: $JAX_COORDINATOR_ADDRESS (auto)
    num_processes: int = 0  # 0: not set
    process_id: int = -1  # -1: not set
    auto: bool = False  # let jax.distributed.initialize fill unset fields from the environment / cluster

    def __post_init__(self):
        if self.coordinator:
            host, _, port = self.coordinator.rpartition(":")
            check(bool(host) and port.isdigit() and 0 < int(port) < 65536,
                  f"coordinator={self.coordinator} is invalid; need host:port")
        check(self.num_processes >= 0, f"num_processes={self.num_processes} is invalid; need >= 1")
        check(self.process_id >= -1, f"process_id={self.process_id} is invalid; need >= 0")
        if self.num_processes and self.process_id >= 0:
            check(self.process_id < self.num_processes,
                  f"process_id={self.process_id} is invalid; need < num_processes={self.num_processes}")
        if self.enabled and not self.auto:
            # jax.distributed.initialize reads the coordinator from $JAX_COORDINATOR_ADDRESS itself.
            missing = [n for n, unset in (
                ("coordinator", not self.coordinator and not os.environ.get("JAX_COORDINATOR_ADDRESS")),
                ("num_processes", not self.num_processes), ("process_id", self.process_id < 0)) if unset]
            check(not missing, f"{missing[0] if missing else ''} is missing; set coordinator (or "
                               f"$JAX_COORDINATOR_ADDRESS), num_processes and process_id together, or auto")

    @property
    def enabled(self) -> bool:
        return self.auto or bool(self.coordinator) or self.num_processes > 0 or self.process_id >= 0


def initialize(cfg: DistributedConfig) -> None:
    """`jax.distributed.initialize` from `cfg` (nothing when it is not enabled, or already done).
    Must run before any JAX call that touches a device (jax.devices, device_put, a computation)."""
    if not cfg.enabled or jax.distributed.is_initialized():
        return
    if jax.config.jax_cpu_collectives_implementation is None:  # the default in jax 0.10 is gloo already
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=cfg.coordinator or None,
                               num_processes=cfg.num_processes or None,
                               process_id=cfg.process_id if cfg.process_id >= 0 else None)


def is_multiprocess() -> bool:
    """True after `initialize` joined a run (reads no device, so it is safe before the backend starts)."""
    return jax.distributed.is_initialized() and jax.process_count() > 1


def is_primary() -> bool:
    """Process 0, the one that writes logs and prints results (every process in a single-process run)."""
    return not jax.distributed.is_initialized() or jax.process_index() == 0


def to_host(tree: Any) -> Any:
    """NumPy copies of the arrays in `tree` (other leaves as they are). An array spread over
    several processes is gathered first, so every process gets the whole array."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return multihost_utils.process_allgather(x, tiled=True)
        return jax.device_get(x) if isinstance(x, jax.Array) else x

    if any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in jax.tree.leaves(tree)):
        barrier("to_host")  # every process holds the same tree, so all of them take this branch
    return jax.tree.map(one, tree)


def broadcast_text(text: Optional[str]) -> str:
    """Process 0's `text` on every process (other processes pass anything; a single process gets
    its own). Two broadcasts: the UTF-8 length, then the bytes (shapes must agree on all processes)."""
    if not is_multiprocess():
        return text or ""
    barrier("broadcast_text")
    data = np.frombuffer((text or "").encode() if is_primary() else b"", np.uint8)
    n = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
    data = data if is_primary() else np.zeros(n, np.uint8)
    return bytes(multihost_utils.broadcast_one_to_all(data).astype(np.uint8)).decode()


def on_primary(fn: Callable[[], str], error: type[Exception] = ValueError) -> str:
    """`fn()` run on process 0 only and its result given to every process; an `error` it raises
    is raised on every process with the same message (so no process waits for the others)."""
    if not is_multiprocess():
        return fn()
    out = "ok:"
    if is_primary():
        try:
            out = "ok:" + fn()
        except error as e:
            out = "error:" + str(e)
    out = broadcast_text(out)
    if out.startswith("error:"):
        raise error(out[len("error:"):])
    return out[len("ok:"):]


def largest(x: int) -> int:
    """The largest of every process's `x` (one small all-gather; `x` itself in a single process)."""
    if not is_multiprocess():
        return x
    barrier("largest")
    return int(np.max(multihost_utils.process_allgather(np.int32(x))))


BARRIER_TIMEOUT_S = 600  # a peer that died is also noticed by the service's heartbeats
_barrier_count = itertools.count()


def barrier(name: str) -> None:
    """Wait until every process reaches `name` (nothing in a single-process run). On jax.distributed's
    coordination service (its key-value server, as jax's own array serialization does), not a device
    collective: no gloo deadline. Every process calls the same barriers in the same order (the
    running count makes each id unique)."""
    if not is_multiprocess():
        return
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is None:  # pragma: no cover - initialized by another runtime: a device collective
        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(f"rlsoft-{next(_barrier_count)}-{name}", timeout_in_ms=BARRIER_TIMEOUT_S * 1000)
