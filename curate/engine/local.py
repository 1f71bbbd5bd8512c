"""The local engine: every piece of work in this process, in order (tests, debugging).

The same functions as on Ray, so both engines give the same files. Work that asks
for processes of its own (downloads) runs in a pool whose processes die with this
one (``curate.engine.processes``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from curate.core.progress import Progress
from curate.engine.base import Engine, Item, Result

if TYPE_CHECKING:
    from curate.stages import MapStage


class LocalEngine(Engine):
    name = "local"

    def __init__(self):
        self._tasks = 0

    def map_files(
        self, stage: MapStage, files: list[Path], out_dir: Path, progress: Progress | None = None
    ) -> None:
        stage.setup()
        for f in files:
            self._tasks += 1
            table = stage(pq.read_table(f))
            pq.write_table(table, out_dir / f.name)
            if progress:
                progress.add(table.num_rows)

    def map_items(
        self,
        fn: Callable[[Item], Result],
        items: Sequence[Item],
        label: str,
        progress: bool = False,
        processes: int | None = None,
        gpus: float = 0,
    ) -> list[Result]:
        self._tasks += len(items)
        with Progress(label, len(items), unit="tasks", enabled=progress and bool(items)) as shown:
            if processes:
                from curate.engine.processes import dying_pool

                with dying_pool(processes) as pool:
                    results = []
                    for result in pool.imap(fn, items):
                        results.append(result)
                        shown.update(len(results))
                    return results
            results = []
            for item in items:
                results.append(fn(item))
                shown.update(len(results))
            return results

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
        worker = model(*model_args)
        pending, rows, part = [], 0, 0
        for i, item in enumerate(items):
            done = worker(prepare(pa.Table.from_pylist([item]), **prepare_args))
            pending.append(done)
            rows += done.num_rows
            if rows >= rows_per_file or i == len(items) - 1:
                pq.write_table(pa.concat_tables(pending), out_dir / f"part-{part:05d}.parquet")
                pending, rows, part = [], 0, part + 1
            if progress:
                progress.add(done.num_rows)

    def tasks_per_node(self) -> dict[str, int]:
        return {"local": self._tasks} if self._tasks else {}

    def resources(self) -> dict[str, float]:
        import torch

        return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
