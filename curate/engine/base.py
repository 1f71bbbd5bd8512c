"""The engine interface every stage talks to (``ctx.engine``); see ``curate.engine``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
        gpus: float = 0,
    ) -> list[Result]:
        """``[fn(item) for item in items]``, in order, each item a task of one CPU.

        ``processes``: on the local engine, run in that many processes of their own
        (work that needs its own processes to go fast, like downloads); else here.
        ``gpus``: on Ray, what each task asks for besides its CPU, so the GPU work of
        a task (negCLIPLoss) lands where a GPU is; the local engine's tasks run in
        this process, which uses its GPU when it has one.
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
