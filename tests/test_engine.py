"""The engine: the one place Ray is imported, and the same lifecycle on every path."""

from __future__ import annotations

import ast
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curate.engine.local import LocalEngine
from curate.engine.ray_cluster import RayEngine
from curate.stages import MapStage

ROOT = Path(__file__).resolve().parent.parent


def test_only_the_engine_imports_ray():
    found = []
    for path in sorted((ROOT / "curate").rglob("*.py")):
        if path.parent.name == "engine":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            found += [
                f"{path.relative_to(ROOT)}:{node.lineno} {n}"
                for n in names
                if n == "ray" or n.startswith("ray.")
            ]
    assert found == []


def test_setup_runs_once_per_worker_on_every_path(tmp_path, ray_local):
    class CountSetups(MapStage):  # defined here: Ray workers get it by value, not by import
        """Records, on each row, its process and how often it was set up."""

        name = "count"

        def setup(self) -> None:
            self.setups = getattr(self, "setups", 0) + 1

        def __call__(self, batch: pa.Table) -> pa.Table:
            n = batch.num_rows
            return pa.table({"pid": [os.getpid()] * n, "setups": [self.setups] * n})

    files = []
    (tmp_path / "in").mkdir()
    for i in range(6):  # more files than workers: a worker serves several
        files.append(tmp_path / "in" / f"part-{i}.parquet")
        pq.write_table(pa.table({"x": list(range(10))}), files[-1])
    for engine in (LocalEngine(), RayEngine()):
        out = tmp_path / engine.name
        out.mkdir()
        engine.map_files(CountSetups(), files, out)
        engine.close()
        rows = pa.concat_tables(pq.read_table(f) for f in sorted(out.glob("*.parquet")))
        assert rows.num_rows == 60
        assert set(rows["setups"].to_pylist()) == {1}, engine.name
    shutil.rmtree(tmp_path / "in")


def test_items_come_back_in_order_on_both_engines(ray_local):
    def square(i: int) -> int:
        return i * i

    items = list(range(20))
    for engine in (LocalEngine(), RayEngine()):
        assert engine.map_items(square, items, "square") == [i * i for i in items]
        engine.close()
