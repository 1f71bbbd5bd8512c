"""The engine: where a run's row work happens. The only code that imports Ray.

A stage never asks which engine it is on. It asks ``ctx.engine`` to

* map a ``MapStage`` over ledger files, one output file per input file
  (``map_files``; the stage's ``setup`` runs once per worker);
* map a function over work items and return the results in order
  (``map_items``; a file each, a partition each, a shard each);
* feed prepared items to a pool of model workers, GPUs when there are any
  (``map_with_models``);
* say what the cluster has (``resources``).

``LocalEngine`` does all of it in this process (unit tests, debugging); items
that ask for processes (downloads) run in a pool whose processes die with this
one. ``RayEngine`` does it on a Ray cluster: one started here on 127.0.0.1 when
no address is given, or the one at ``--address`` / ``RAY_ADDRESS``.

Both give the same results: every function the engine runs is pure in its
inputs and writes its output files under names that do not depend on where or
in which order it ran.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

import pyarrow as pa

from curate.core.progress import Progress

if TYPE_CHECKING:
    from curate.stages import MapStage

Kind = Literal["ray", "local"]
Item = TypeVar("Item")
Result = TypeVar("Result")


class Engine:
    """What stages may ask of the place their work runs (see the module docstring)."""

    name: str

    def map_files(
        self, stage: MapStage, files: list[Path], out_dir: Path, progress: Progress | None = None
    ) -> None:
        """``stage`` over each ledger file, written under the same name in ``out_dir``."""
        raise NotImplementedError

    def map_items(
        self,
        fn: Callable[[Item], Result],
        items: Sequence[Item],
        label: str,
        progress: bool = False,
        processes: int | None = None,
    ) -> list[Result]:
        """``[fn(item) for item in items]``, in order, each item a task of one CPU.

        ``processes``: on the local engine, run in that many processes of their own
        (work that needs its own processes to go fast, like downloads); else here.
        ``progress`` draws a line: ``label``, items done of all.
        """
        raise NotImplementedError

    def map_with_models(
        self,
        items: list[dict],
        prepare: Callable[..., pa.Table],
        prepare_args: dict,
        model: type,
        model_args: tuple,
        workers: int,
        gpus: float,
        out_dir: Path,
        rows_per_file: int,
        progress: Progress | None = None,
    ) -> None:
        """Each item (a one-row table) through ``prepare(table, **prepare_args)`` on CPU
        workers, then through ``model(*model_args)`` (built once per model worker, called
        on each prepared table), written as Parquet parts of about ``rows_per_file`` rows.

        ``workers`` model workers, each with one CPU and ``gpus`` GPUs (0: on CPUs).
        """
        raise NotImplementedError

    def resources(self) -> dict[str, float]:
        """What the cluster has: ``{"CPU": n, "GPU": m}``."""
        raise NotImplementedError

    def tasks_per_node(self) -> dict[str, int]:
        """How many tasks ran on each node so far (by node id; ``local``: this process)."""
        raise NotImplementedError

    def wait_ready(self) -> None:
        """Block until the engine can take work at full speed (workers warmed)."""

    def close(self) -> None:
        """Stop what this engine started."""


def open_engine(kind: Kind, address: str | None = None, verbose: bool = False) -> Engine:
    """A started engine of ``kind``; ``close()`` it when the run ends."""
    if kind == "local":
        from curate.engine.local import LocalEngine

        return LocalEngine()
    from curate.engine.ray_cluster import RayEngine

    return RayEngine(address, verbose)


def cluster(kind: Kind, verbose: bool = False) -> AbstractContextManager[None]:
    """A context in which every run shares one cluster (``curate demo``'s four runs).

    Starts a local Ray cluster for ``kind == "ray"`` unless one is already up, and
    stops it at the end if it started it; nothing for ``local``.
    """
    from curate.engine.ray_cluster import shared_cluster

    return shared_cluster(kind == "ray", verbose)


__all__ = ["Engine", "Kind", "cluster", "open_engine"]
