"""The balance stage: MetaCLIP's concept balancing, so head concepts stop crowding out the tail.

MetaCLIP (Xu et al. 2023, "Demystifying CLIP Data", Algorithm 1;
facebookresearch/MetaCLIP ``metaclip/metaclip1/balancing.py``): match every
caption against a concept list (``curate.text.concepts``), count the rows matching
each concept over the whole pool, and give concept c the sampling probability
``p(c) = t / max(count(c), t)``. Each concept a row matches draws once; the row
is kept when any draw passes, so its keep probability is ``1 - ∏(1 - p(c))``.
A concept matched by at most ``t`` rows keeps all of them; a head concept keeps
about ``t`` rows by its own draws, plus the rows that a rarer concept in the same
caption keeps. A row that matches no concept is dropped (MetaCLIP curates only
what its metadata describes).

The count is global: ``plan`` has the engine match the alive rows of every input
file (a task each; the driver adds up one count per concept and file) and writes
``concept_counts.csv`` into the stage folder (concept, matches before, p, rows
kept after). The per-batch ``__call__``
matches again and decides. MetaCLIP draws with ``random.random()`` in file
order; here a row's draw for concept c is a hash of (seed, uid, concept), so the
decision does not depend on batch boundaries, file order or the engine.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv
import pyarrow.parquet as pq

from curate.core.config import ConfigError, Count
from curate.core.layout import CONCEPT_COUNTS, STATS
from curate.core.runfolder import scratch
from curate.core.schema import alive_mask, set_column
from curate.core.stage import MapStage, StageContext, register_stage
from curate.text.concepts import Matcher, load_concepts, matchable_captions

#: Each concept's keep probability ``p`` and the run's seed: what every worker's draws use.
DRAWS = "draws.npz"


def _hash64(data: bytes, key: bytes = b"") -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, key=key).digest(), "little")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that spreads every input bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@register_stage("balance")
@dataclass
class BalanceStage(MapStage):
    """Keep a row with probability 1 - ∏(1 - t / max(count, t)) over the concepts it matches."""

    concepts: str  # a bundled list (imagenet1k, demo) or the path of a file, one entry per line
    t: Count = 20_000  # MetaCLIP: 20,000 for its 400M-pair set, 170,000 for 2.5B
    lowercase: bool = False  # MetaCLIP matches case-sensitively

    def __post_init__(self) -> None:
        self._matcher = Matcher(load_concepts(self.concepts), self.lowercase)
        self._concept_keys = np.array(
            [_hash64(name.encode()) for name in self._matcher.names], np.uint64
        )

    def columns_after(self, columns: set[str]) -> set[str]:
        if "caption" not in columns:
            raise ConfigError(f"stage {self.name}: the ledger has no caption column to match")
        return columns | {"concepts"}

    # --- driver: count, then decide once to report what was kept ---------------------------

    def plan(self, ctx: StageContext) -> None:
        self.columns_after(set(ctx.input_schema.names) if ctx.input_schema else set())
        n_concepts = len(self._matcher)
        # Two rounds of one task per ledger file: count the matches, then, once p is known,
        # decide (the matches are kept in scratch files meanwhile) to report what is kept.
        with scratch(ctx.out_dir, "_matches-") as work:
            saved = [work / f"{i:06d}.npz" for i in range(len(ctx.input_files))]
            jobs = [(self, path, keep) for path, keep in zip(ctx.input_files, saved)]
            counted = ctx.engine.map_items(_count_file, jobs, f"{self.name}: count")
            matches = np.sum([c for c, _, _ in counted], axis=0, dtype=np.int64)
            matches = matches if len(counted) else np.zeros(n_concepts, np.int64)
            rows, matched = sum(r for _, r, _ in counted), sum(m for _, _, m in counted)
            p = self.t / np.maximum(matches, self.t)
            (self.output_dir / STATS).mkdir()
            np.savez(self.output_dir / STATS / DRAWS, p=p, seed=ctx.seed)
            decided = ctx.engine.map_items(_kept_in_file, jobs, f"{self.name}: decide")
            kept = np.sum(decided, axis=0, dtype=np.int64) if decided else np.zeros(n_concepts)
        table = pa.table({"concept": self._matcher.names, "matches": matches, "p": p, "kept": kept})
        pyarrow.csv.write_csv(table, ctx.out_dir / CONCEPT_COUNTS)
        ctx.counters.update(
            concepts=n_concepts,
            t=self.t,
            rows_alive=rows,  # entering the stage
            rows_matched=matched,
            rows_without_concept=rows - matched,
            concepts_matched=int(np.count_nonzero(matches)),
            concepts_capped=int(np.count_nonzero(matches > self.t)),
            counts_file=CONCEPT_COUNTS,
        )

    # --- per batch ---------------------------------------------------------------------------

    def draws(self) -> tuple[np.ndarray, bytes]:
        """What the plan wrote: each concept's keep probability, and the seed as a hash key."""
        with np.load(self.output_dir / STATS / DRAWS) as draws:
            return draws["p"], int(draws["seed"]).to_bytes(8, "little", signed=True)

    def setup(self) -> None:
        self._draws = self.draws()

    def _match(self, batch: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Matches of the rows alive entering this stage (the others match nothing)."""
        alive = alive_mask(batch)
        captions = pc.if_else(pa.array(alive), matchable_captions(batch), None)
        return (*self._matcher.match(captions), alive)

    def _decide(
        self, uids: pa.ChunkedArray, offsets: np.ndarray, ids: np.ndarray, draws: tuple
    ) -> np.ndarray:
        """Per row: does any of its concepts' draws pass? (False for a row with none.)

        The draw of row r for concept c is uniform in [0, 1): the top 53 bits of
        splitmix64(blake2b-64(uid, key=seed) XOR blake2b-64(concept name)), both
        digests read little-endian, the seed as 8 little-endian bytes.
        """
        n = len(offsets) - 1
        pair_rows = np.repeat(np.arange(n), np.diff(offsets))
        p, seed_key = draws
        pair_p = p[ids]
        keep = np.zeros(n, bool)
        keep[pair_rows[pair_p >= 1]] = True  # a concept at or under t keeps all its rows
        draw = (pair_p < 1) & ~keep[pair_rows]
        rows = np.unique(pair_rows[draw])
        if len(rows):
            row_keys = np.zeros(n, np.uint64)
            row_keys[rows] = [
                _hash64(uid.encode(), seed_key) for uid in uids.take(rows).to_pylist()
            ]
            bits = _mix(row_keys[pair_rows[draw]] ^ self._concept_keys[ids[draw]])
            uniform = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
            keep[pair_rows[draw][uniform < pair_p[draw]]] = True
        return keep

    def __call__(self, batch: pa.Table) -> pa.Table:
        offsets, ids, alive = self._match(batch)
        names = pa.array(self._matcher.names, pa.string()).take(pa.array(ids))
        concepts = pa.ListArray.from_arrays(
            pa.array(offsets, pa.int32()), names, mask=pa.array(~alive)
        )
        dropped = alive & ~self._decide(batch["uid"], offsets, ids, self._draws)
        reasons = pc.if_else(pa.array(dropped), self.name, pa.scalar(None, pa.string()))
        batch = set_column(batch, "concepts", concepts)
        batch = set_column(batch, "dropped_by", pc.coalesce(batch["dropped_by"], reasons))
        return set_column(batch, "keep", pa.array(alive & ~dropped, pa.bool_()))


def _count_file(job: tuple[BalanceStage, Path, Path]) -> tuple[np.ndarray, int, int]:
    """One ledger file's matches per concept, alive rows and rows matching any; its matches
    saved for ``_kept_in_file``."""
    stage, path, saved = job
    ledger = pq.read_table(path, columns=["caption", "caption_error", "keep"])
    offsets, ids, alive = stage._match(ledger)
    np.savez(saved, offsets=offsets, ids=ids)
    counts = np.bincount(ids, minlength=len(stage._matcher))
    return counts, int(alive.sum()), int(np.count_nonzero(np.diff(offsets)))


def _kept_in_file(job: tuple[BalanceStage, Path, Path]) -> np.ndarray:
    """Rows of one ledger file kept per concept, once the stage knows p."""
    stage, path, saved = job
    with np.load(saved) as matched:
        offsets, ids = matched["offsets"], matched["ids"]
    keep = stage._decide(pq.read_table(path, columns=["uid"])["uid"], offsets, ids, stage.draws())
    return np.bincount(ids[np.repeat(keep, np.diff(offsets))], minlength=len(stage._matcher))
