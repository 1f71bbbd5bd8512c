"""How many rows of the pool share each row's caption (``text_count``).

ALIGN drops alt-texts shared by more than 10 images: boilerplate such as
"image" or a shop's fixed product text. That needs a global view, so ``fit``
counts exact caption equality over every row of the stage's input ledger with
DuckDB (which spills to disk at web scale) and keeps only the captions seen
more than once, usually a small fraction of the pool. ``setup`` loads that
artifact once per worker; ``annotate`` is then a hash lookup per batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.operators import Annotator, FitContext, register_annotator
from curate.stats import write_query

ARTIFACT = "caption_counts.parquet"


@register_annotator("text_count")
@dataclass
class TextCountAnnotator(Annotator):
    """``text_count``: rows in the pool with this exact caption (null for a null caption)."""

    needs = ("caption",)
    provides = ("text_count",)

    # Set by fit; a path, not the data, so the fitted object pickles small to Ray workers.
    artifact: Path | None = field(default=None, init=False, compare=False)
    _captions: pa.Array | None = field(default=None, init=False, repr=False, compare=False)
    _counts: pa.Array | None = field(default=None, init=False, repr=False, compare=False)

    def fit(self, ctx: FitContext) -> None:
        self.artifact = write_query(
            "SELECT caption, count(*) AS n FROM read_parquet({files}, union_by_name = true) "
            "WHERE caption IS NOT NULL GROUP BY caption HAVING count(*) > 1 ORDER BY caption",
            ctx.ledger_files,
            Path(ctx.stats_dir) / ARTIFACT,
            empty=pa.table({"caption": pa.array([], pa.string()), "n": pa.array([], pa.int64())}),
        )

    def setup(self) -> None:
        if self.artifact is None:
            raise RuntimeError("text_count: fit() must run over the pool before setup()")
        table = pq.read_table(self.artifact)
        self._captions = table["caption"].combine_chunks()
        self._counts = table["n"].combine_chunks().cast(pa.int32())

    def annotate(self, batch: pa.Table) -> dict[str, pa.Array]:
        if self._captions is None:
            self.setup()
        captions = batch["caption"]
        where = pc.index_in(captions, value_set=self._captions.cast(captions.type))
        counts = pc.coalesce(self._counts.take(where), pa.scalar(1, pa.int32()))
        counts = pc.if_else(pc.is_null(captions), pa.scalar(None, pa.int32()), counts)
        return {"text_count": counts}
