"""How many rows of the pool share each row's caption (``text_count``).

ALIGN drops alt-texts shared by more than 10 images: boilerplate such as
"image" or a shop's fixed product text. That needs a global view, so ``fit``
counts exact caption equality over every row of the stage's input ledger on the
cluster (``curate.io.stats``: counts per ledger file, split by a hash of the
caption, summed per partition) and keeps only the captions seen more than once,
usually a small fraction of the pool. ``load`` reads that artifact (a file per
partition) once per worker; ``annotate`` is then a hash lookup per batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.core.operators import Annotator, FitContext, Fitted, register_annotator
from curate.core.runfolder import scratch
from curate.io.stats import (
    connect,
    partition_files,
    partitions_for,
    scatter,
    sql_string,
    write_query,
)

ARTIFACT = "caption_counts"  # a folder: one Parquet file per partition
COUNTS = pa.schema([("caption", pa.string()), ("n", pa.int64())])


@register_annotator("text_count")
@dataclass
class TextCountAnnotator(Fitted, Annotator):
    """``text_count``: rows in the pool with this exact caption (null for a null caption)."""

    needs = ("caption",)
    provides = ("text_count",)

    _captions: pa.Array | None = field(default=None, init=False, repr=False, compare=False)
    _counts: pa.Array | None = field(default=None, init=False, repr=False, compare=False)

    def fit(self, ctx: FitContext) -> None:
        stats = Path(ctx.stats_dir)
        out = stats / ARTIFACT
        out.mkdir(parents=True, exist_ok=True)
        parts = partitions_for(ctx.ledger_files)
        with scratch(stats, "_counts-") as work:
            jobs = [(Path(f), work / f"{i:06d}", parts) for i, f in enumerate(ctx.ledger_files)]
            ctx.engine.map_items(_count_captions, jobs, "text_count: count")
            merges = [
                (partition_files(work, p), out / f"part-{p:04d}.parquet") for p in range(parts)
            ]
            ctx.engine.map_items(_merge_counts, merges, "text_count: merge")

    def load(self, stats_dir: Path) -> None:
        table = pq.read_table(stats_dir / ARTIFACT)
        self._captions = table["caption"].combine_chunks()
        self._counts = table["n"].combine_chunks().cast(pa.int32())

    def annotate(self, batch: pa.Table) -> dict[str, pa.Array]:
        captions = batch["caption"]
        where = pc.index_in(captions, value_set=self._captions.cast(captions.type))
        counts = pc.coalesce(self._counts.take(where), pa.scalar(1, pa.int32()))
        counts = pc.if_else(pc.is_null(captions), pa.scalar(None, pa.int32()), counts)
        return {"text_count": counts}


def _count_captions(job: tuple[Path, Path, int]) -> None:
    """One ledger file's caption counts, split by the caption's hash."""
    path, folder, parts = job
    sql = (
        f"SELECT caption, count(*)::BIGINT AS n FROM read_parquet({sql_string(path)}) "
        "WHERE caption IS NOT NULL GROUP BY caption"
    )
    with connect() as con:
        scatter(con, sql, "caption", folder, parts)


def _merge_counts(job: tuple[list[Path], Path]) -> None:
    """One partition's counts summed over every file; only the captions seen twice or more."""
    files, out = job
    query = (
        "SELECT caption, sum(n)::BIGINT AS n FROM {files} GROUP BY caption HAVING sum(n) > 1 "
        "ORDER BY caption"
    )
    write_query(query, files, out, COUNTS.empty_table())
