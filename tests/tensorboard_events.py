"""Reading a run's TensorBoard scalars back, for the tests (tensorboard's own event reader)."""
from __future__ import annotations


def read_scalars(path: str) -> dict[str, list[tuple[int, float]]]:
    """Tag -> [(step, value), ...] of every scalar in the event files under `path`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(path, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
