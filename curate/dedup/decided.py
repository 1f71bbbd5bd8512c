"""The shape of the stages that decide in tasks and apply the decisions batch by batch.

``plan`` has engine tasks write decisions (and group renames) under the stage's
``_stats/`` folder; ``setup`` loads them once per worker; ``__call__`` applies
them. The stage carries only the folder's path to the workers, never the tables.
Dedup and decontamination share it, and ``scatter_alive``, which splits each
ledger file's alive rows by a hash of their uid for the tasks that decide.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from curate.core.config import ConfigError
from curate.core.layout import STATS
from curate.core.stage import MapStage, StageContext
from curate.dedup.decisions import alive_sql, apply_decisions, read_decisions
from curate.io.stats import connect, scatter

ALIVE = pa.schema([("uid", pa.string()), ("score", pa.float32())])


class DecidedStage(MapStage):
    """A stage whose ``plan`` has engine tasks write decisions under ``_stats/``, which
    ``setup`` loads once per worker and ``__call__`` applies to each batch."""

    #: The column that ranks the rows of a group (a dataclass field in stages that have one).
    score = "clip_score"

    def setup(self) -> None:
        self._decisions, self._regroup = read_decisions(self._decisions_dir())

    def __call__(self, batch: pa.Table) -> pa.Table:
        return apply_decisions(batch, self._decisions, self.name, self._regroup)

    def columns_after(self, columns: set[str]) -> set[str]:
        if self.score != "clip_score" and self.score not in columns:
            raise ConfigError(f"stage {self.name}: no column {self.score!r} to rank survivors by")
        return columns | {"dup_group"}

    def _decisions_dir(self) -> Path:
        """Where the plan's tasks write the decisions and statistics, and workers read them."""
        return self.output_dir / STATS

    def _map(self, ctx: StageContext, fn, jobs: list, label: str) -> list:
        return ctx.engine.map_items(fn, jobs, f"{self.name}: {label}", ctx.progress)


def scatter_alive(job: tuple[Path, str, Path, int]) -> int:
    """One ledger file's alive (uid, score), split by the uid's hash; returns how many."""
    path, score, folder, parts = job
    with connect() as con:
        alive = con.sql(alive_sql(path, score)).to_arrow_table()
        con.register("alive", alive)
        scatter(con, "SELECT * FROM alive", "uid", folder, parts)
    return alive.num_rows
