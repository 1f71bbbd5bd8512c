"""The shard stage: the run's kept rows as shards in ``RUN/shards/`` (``curate.train.shards``).

After a download stage each row carries its image, joined by uid from
``RUN/images/``. ``format: webdataset`` writes tar shards and ``sizes.json``, what
open_clip's trainer reads (``src/open_clip_train/data.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from curate.core.config import ConfigError, Count
from curate.core.layout import IMAGES, SHARDS
from curate.core.stage import Stage, StageContext, register_stage
from curate.train.shards import write_shards


@register_stage("shard")
@dataclass
class ShardStage(Stage):
    rows_per_shard: Count = 10_000
    format: Literal["parquet", "webdataset"] = "parquet"

    produces_ledger: ClassVar[bool] = False
    folder: ClassVar[str] = SHARDS

    def columns_after(self, columns: set[str]) -> set[str]:
        if self.format == "webdataset" and "status" not in columns:
            raise ConfigError(f"stage {self.name}: webdataset shards need a download stage")
        return columns

    def run(self, ctx: StageContext) -> int:
        downloaded = ctx.input_schema is not None and "status" in ctx.input_schema.names
        return write_shards(
            ctx.input_files,
            ctx.out_dir,
            ctx.run_dir / IMAGES if downloaded else None,
            self.rows_per_shard,
            self.format == "webdataset",
            ctx.engine,
            self.name,
            ctx.progress,
        )
