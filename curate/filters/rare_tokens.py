"""Drop captions that contain a rare unigram or bigram.

ALIGN (Jia et al. 2021, §3): "We also remove alt-texts that contain any rare
token (outside of 100 million most frequent unigrams and bigrams from the raw
dataset)". ``vocab_size`` is that K; 100 million fits ALIGN's billions of raw
pairs, the default 100 000 fits pools of a few million. Tokens are
``caption.split()`` words (lower-cased by default), bigrams are adjacent pairs
joined by one space, and unigrams and bigrams compete for the same K slots.

``fit`` streams the captions of the whole input ledger, counts n-grams per
ledger file with ``pc.value_counts`` (partial counts written beside the
artifact), merges them with DuckDB (which spills to disk), and keeps the K
most frequent, ties broken by the n-gram's byte order, so the vocabulary is
deterministic. ``keep`` tests every n-gram of a batch at once (``pc.is_in``)
and counts misses per row with ``np.bincount``. A caption with no tokens has
no rare token and passes; the word-count filter is what drops it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.config import Count
from curate.operators import Filter, FitContext, register_filter
from curate.runfolder import scratch
from curate.stats import write_query
from curate.text import bigrams, words

ARTIFACT = "vocabulary.parquet"
NO_COUNTS = pa.table({"gram": pa.array([], pa.string()), "n": pa.array([], pa.int64())})


def ngrams(captions: pa.Array | pa.ChunkedArray, lower: bool) -> tuple[pa.Array, np.ndarray]:
    """Every unigram and bigram of every caption, flat, with the row each comes from."""
    unigrams = words(captions, lower=lower)
    pairs = bigrams(unigrams)
    grams = pa.concat_arrays([unigrams.flatten(), pairs.flatten()])
    rows = np.concatenate(
        [pc.list_parent_indices(unigrams).to_numpy(), pc.list_parent_indices(pairs).to_numpy()]
    )
    return grams, rows


def _count_file(path: Path, lower: bool, out: Path) -> None:
    """Write (gram, n) for one ledger file."""
    parts = []
    for rb in pq.ParquetFile(path).iter_batches(batch_size=65536, columns=["caption"]):
        grams, _ = ngrams(rb.column(0), lower)
        counts = pc.value_counts(grams)
        parts.append(pa.table({"gram": counts.field("values"), "n": counts.field("counts")}))
    if parts:
        merged = pa.concat_tables(parts).group_by("gram").aggregate([("n", "sum")])
        table = pa.table({"gram": merged["gram"], "n": merged["n_sum"]})
    else:
        table = NO_COUNTS
    pq.write_table(table, out)


@register_filter("rare_tokens")
@dataclass
class RareTokens(Filter):
    """Keep captions whose unigrams and bigrams are all among the pool's top ``vocab_size``."""

    vocab_size: Count = 100_000
    lowercase: bool = True

    needs = ("caption",)

    artifact: Path | None = field(default=None, init=False, compare=False)
    _vocab: pa.Array | None = field(default=None, init=False, repr=False, compare=False)

    def fit(self, ctx: FitContext) -> None:
        stats = Path(ctx.stats_dir)
        stats.mkdir(parents=True, exist_ok=True)
        with scratch(stats, "_counts-") as partial:
            files = []
            for i, path in enumerate(ctx.ledger_files):
                files.append(partial / f"{i:06d}.parquet")
                _count_file(Path(path), self.lowercase, files[-1])
            self.artifact = write_query(
                "SELECT gram, sum(n)::BIGINT AS n FROM read_parquet({files}) GROUP BY gram "
                f"ORDER BY n DESC, gram LIMIT {int(self.vocab_size)}",
                files,
                stats / ARTIFACT,
                empty=NO_COUNTS,
            )

    def setup(self) -> None:
        if self.artifact is None:
            raise RuntimeError("rare_tokens: fit() must run over the pool before setup()")
        self._vocab = pq.read_table(self.artifact, columns=["gram"])["gram"].combine_chunks()

    def keep(self, batch: pa.Table) -> np.ndarray:
        if self._vocab is None:
            self.setup()
        captions = batch["caption"]
        grams, rows = ngrams(captions, self.lowercase)
        vocab = self._vocab.cast(grams.type)
        known = pc.is_in(grams, value_set=vocab).to_numpy(zero_copy_only=False)
        misses = np.bincount(rows[~known], minlength=batch.num_rows)
        return (misses == 0) & pc.is_valid(captions).to_numpy(zero_copy_only=False)
