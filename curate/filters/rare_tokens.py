"""Drop captions that contain a rare unigram or bigram.

ALIGN (Jia et al. 2021, §3): "We also remove alt-texts that contain any rare
token (outside of 100 million most frequent unigrams and bigrams from the raw
dataset)". ``vocab_size`` is that K; 100 million fits ALIGN's billions of raw
pairs, the default 100 000 fits pools of a few million. Tokens are
``caption.split()`` words (lower-cased by default), bigrams are adjacent pairs
joined by one space, and unigrams and bigrams compete for the same K slots.

``fit`` counts n-grams per ledger file with ``pc.value_counts`` in engine
tasks, split by a hash of the n-gram; merges each partition in a task and keeps
its K most frequent (a gram lives in one partition, so the pool's top K is among
the partitions' tops); then one task keeps the K most frequent of those, ties
broken by the n-gram's byte order, so the vocabulary is deterministic. ``keep``
tests every n-gram of a batch at once (``pc.is_in``) and counts misses per row
with ``np.bincount``. A caption with no tokens has
no rare token and passes; the word-count filter is what drops it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.core.config import Count
from curate.core.operators import Filter, FitContext, Fitted, register_filter
from curate.core.runfolder import scratch
from curate.io.stats import connect, partition_files, partitions_for, scatter, write_query
from curate.text.words import bigrams, words

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


def _count_grams(job: tuple[Path, bool, Path, int]) -> None:
    """One ledger file's (gram, n), split by the gram's hash."""
    path, lower, folder, parts = job
    counted = []
    for rb in pq.ParquetFile(path).iter_batches(batch_size=65536, columns=["caption"]):
        counts = pc.value_counts(ngrams(rb.column(0), lower)[0])
        counted.append(pa.table({"gram": counts.field("values"), "n": counts.field("counts")}))
    with connect() as con:
        con.register("grams", pa.concat_tables(counted) if counted else NO_COUNTS)
        sql = "SELECT gram, sum(n)::BIGINT AS n FROM grams GROUP BY gram"
        scatter(con, sql, "gram", folder, parts)


def _top_grams(job: tuple[list[Path], Path, int]) -> None:
    """The ``k`` most frequent grams of ``files``, ties by the gram's bytes: of one partition
    (counts summed over every file), then of the partitions' tops (each gram is in one)."""
    files, out, k = job
    query = "SELECT gram, sum(n)::BIGINT AS n FROM {files} GROUP BY gram ORDER BY n DESC, gram "
    write_query(query + f"LIMIT {k}", files, out, NO_COUNTS)


@register_filter("rare_tokens")
@dataclass
class RareTokens(Fitted, Filter):
    """Keep captions whose unigrams and bigrams are all among the pool's top ``vocab_size``."""

    vocab_size: Count = 100_000
    lowercase: bool = True

    needs = ("caption",)

    _vocab: pa.Array | None = field(default=None, init=False, repr=False, compare=False)

    def fit(self, ctx: FitContext) -> None:
        stats = Path(ctx.stats_dir)
        stats.mkdir(parents=True, exist_ok=True)
        parts = partitions_for(ctx.ledger_files)
        k = int(self.vocab_size)
        with scratch(stats, "_counts-") as work:
            jobs = [(Path(f), self.lowercase, work / f"{i:06d}", parts)
                    for i, f in enumerate(ctx.ledger_files)]  # fmt: skip
            ctx.engine.map_items(_count_grams, jobs, f"{self.name}: count")
            tops = [work / f"top-{p:04d}.parquet" for p in range(parts)]
            merges = [(partition_files(work, p), top, k) for p, top in enumerate(tops)]
            ctx.engine.map_items(_top_grams, merges, f"{self.name}: merge")
            ctx.engine.map_items(_top_grams, [(tops, stats / ARTIFACT, k)], f"{self.name}: top")

    def load(self, stats_dir: Path) -> None:
        self._vocab = pq.read_table(stats_dir / ARTIFACT, columns=["gram"])["gram"].combine_chunks()

    def keep(self, batch: pa.Table) -> np.ndarray:
        captions = batch["caption"]
        grams, rows = ngrams(captions, self.lowercase)
        vocab = self._vocab.cast(grams.type)
        known = pc.is_in(grams, value_set=vocab).to_numpy(zero_copy_only=False)
        misses = np.bincount(rows[~known], minlength=batch.num_rows)
        return (misses == 0) & pc.is_valid(captions).to_numpy(zero_copy_only=False)
