"""The shard stage: kept rows as Parquet shards of a fixed row count.

Shards are what the trainer and users consume: plain Parquet, readable by
pyarrow, DuckDB, Ray Data and HF ``datasets``. Rows keep the ledger's order, so
the same ledger always gives byte-identical shards. The decision columns
(``keep``, ``dropped_by``, ``caption_error``) are dropped: every shard row is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.stages.base import Stage, StageContext, register_stage

DECISION_COLUMNS = ("keep", "dropped_by", "caption_error")


@register_stage("shard")
@dataclass
class ShardStage(Stage):
    rows_per_shard: int = 10_000

    produces_ledger: ClassVar[bool] = False
    output_dir: ClassVar[str] = "shards"

    def __post_init__(self):
        if self.rows_per_shard < 1:
            raise ValueError("rows_per_shard must be at least 1")

    def run(self, ctx: StageContext) -> int:
        pending: list[pa.Table] = []
        pending_rows = written = shard = 0
        for path in ctx.input_files:  # one ledger file (~10^5 rows) in memory at a time
            table = pq.read_table(path)
            table = table.filter(pc.fill_null(table["keep"], False))
            table = table.drop_columns([c for c in DECISION_COLUMNS if c in table.column_names])
            if table.num_rows:
                pending.append(table)
                pending_rows += table.num_rows
            while pending_rows >= self.rows_per_shard or (
                path == ctx.input_files[-1] and pending_rows
            ):
                rows = min(pending_rows, self.rows_per_shard)
                merged = pa.concat_tables(pending, promote_options="permissive")
                pq.write_table(merged.slice(0, rows), ctx.out_dir / f"shard-{shard:05d}.parquet")
                pending = [merged.slice(rows)]
                pending_rows -= rows
                written += rows
                shard += 1
        return written
