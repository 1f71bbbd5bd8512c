"""Run one function over a list of work items: as Ray tasks, or in this process.

Stages with a global view (dedup, decontamination) split their work into
independent items (an embeddings file, a bucket of clusters) and need the
results back on the driver. On the ray engine each item is a task with one
CPU; with ``--engine local`` the same function runs item after item here, so
both engines compute the same thing with the same code.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def map_items(
    fn: Callable[[Item], Result],
    items: Sequence[Item],
    engine: str,
    label: str,
    progress: bool = False,
) -> list[Result]:
    """``[fn(item) for item in items]``, in order; on Ray tasks when ``engine == "ray"``.

    ``progress`` prints ``label: done/total`` on stderr every two seconds.
    """
    shown = _Progress(label, len(items), progress)
    if engine != "ray":
        results = []
        for item in items:
            results.append(fn(item))
            shown.update(len(results))
        shown.close()
        return results
    import ray

    remote = ray.remote(num_cpus=1, max_retries=1)(fn)
    refs = [remote.remote(item) for item in items]
    pending = list(refs)
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=2.0)
        shown.update(len(refs) - len(pending))
    shown.close()
    return ray.get(refs)


class _Progress:
    def __init__(self, label: str, total: int, enabled: bool):
        self.label, self.total, self.enabled = label, total, enabled and total > 0
        self.shown = 0.0

    def update(self, done: int) -> None:
        if self.enabled and (time.monotonic() - self.shown > 2 or done == self.total):
            print(f"\r  {self.label}: {done}/{self.total}", end="", file=sys.__stderr__)
            self.shown = time.monotonic()

    def close(self) -> None:
        if self.enabled:
            print(file=sys.__stderr__)
