"""Run one function over a list of work items: as Ray tasks, or in this process.

Stages with a global view (dedup, decontamination) split their work into
independent items (an embeddings file, a bucket of clusters) and need the
results back on the driver. On the ray engine each item is a task with one
CPU; with ``--engine local`` the same function runs item after item here, so
both engines compute the same thing with the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from curate.progress import Progress

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

    ``progress`` draws a ``curate.progress`` line: ``label``, items done of all.
    """
    with Progress(label, len(items), unit="tasks", enabled=progress and bool(items)) as shown:
        if engine != "ray":
            results = []
            for item in items:
                results.append(fn(item))
                shown.update(len(results))
            return results
        import ray

        remote = ray.remote(num_cpus=1, max_retries=1)(fn)
        refs = [remote.remote(item) for item in items]
        pending = list(refs)
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
            shown.update(len(refs) - len(pending))
        return ray.get(refs)
