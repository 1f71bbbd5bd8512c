"""Filter sets: run filters over ledger batches, recording the first failing filter.

Filters run in the order of the set, each on the rows still alive, so the cheap
ones (sizes, word counts) go first and the expensive annotations (language ID)
are computed only for rows that survived them. A row dropped by an earlier
stage is never re-examined and keeps its ``dropped_by``.

``FilterSet`` is the batch function the filter stage runs and the one the
bootstrap stage uses to choose its training rows. Operators that need the whole
pool (``Fitted``) write their artifacts under the set's output folder at plan
time, one folder per operator; each worker reads them from there by path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.core.config import ConfigError
from curate.core.layout import STATS
from curate.core.operators import ANNOTATORS, Annotator, Filter, FitContext, Fitted, Operator
from curate.core.schema import alive_mask, set_column
from curate.core.stage import MapStage, StageContext


def _scatter(values: pa.Array | pa.ChunkedArray, rows: np.ndarray, n: int) -> pa.Array:
    """Spread ``values`` (one per index in ``rows``) over ``n`` rows, null elsewhere."""
    positions = np.full(n, -1, dtype=np.int64)
    positions[rows] = np.arange(len(rows))
    return values.take(pa.array(positions, mask=positions < 0))


def _mask_to_numpy(mask: pa.Array | pa.ChunkedArray | np.ndarray) -> np.ndarray:
    if isinstance(mask, np.ndarray):
        return mask.astype(bool)
    return pc.fill_null(mask, False).to_numpy(zero_copy_only=False).astype(bool)


def _alive_columns(batch: pa.Table, columns: tuple[str, ...], rows: np.ndarray) -> pa.Table:
    """The columns an operator reads, on the alive rows only (no copy of the rest)."""
    sub = batch.select(list(columns))
    return sub.take(pa.array(rows, pa.int64())) if len(rows) < batch.num_rows else sub


def annotate_rows(annotator: Annotator, batch: pa.Table, rows: np.ndarray) -> pa.Table:
    """Add the annotator's columns, computed on ``rows`` only (null elsewhere)."""
    columns = annotator.annotate(_alive_columns(batch, annotator.needs, rows))
    for name in annotator.provides:
        values = columns[name]
        if len(rows) < batch.num_rows:
            values = _scatter(values, rows, batch.num_rows)
        batch = set_column(batch, name, values)
    return batch


def apply_filters(
    batch: pa.Table, filters: list[Filter], annotators: dict[str, Annotator]
) -> pa.Table:
    """Evaluate ``filters`` in order on alive rows; set ``keep`` and ``dropped_by``.

    ``annotators`` maps a column to the (set-up) annotator that provides it;
    a column missing from the batch is computed just before the first filter
    that needs it — all null when no row is left, so every batch of a stage
    comes out with the same columns.
    """
    n = batch.num_rows
    alive = alive_mask(batch)
    failed_at = np.full(n, -1, dtype=np.int32)
    for i, flt in enumerate(filters):
        rows = np.flatnonzero(alive)
        for column in flt.needs:
            if column not in batch.column_names and column in annotators:
                batch = annotate_rows(annotators[column], batch, rows)
        if len(rows) == 0:
            continue
        keep = _mask_to_numpy(flt.keep(_alive_columns(batch, flt.needs, rows)))
        if len(keep) != len(rows):
            raise RuntimeError(
                f"filter {flt.name} returned {len(keep)} decisions for {len(rows)} rows"
            )
        dropped = rows[~keep]
        alive[dropped] = False
        failed_at[dropped] = i
    names = pa.array([f.name for f in filters], pa.string())
    reasons = names.take(pa.array(failed_at, mask=failed_at < 0))
    previous = batch["dropped_by"]
    batch = set_column(batch, "dropped_by", pc.coalesce(previous, reasons))
    return set_column(batch, "keep", pa.array(alive, pa.bool_()))


@dataclass
class FilterSet(MapStage):
    """A filter set as a map stage: ``filters`` are built by the recipe loader."""

    filters: list[Filter] = field(default_factory=list)

    def _annotators(self) -> list[Annotator]:
        """One instance of every annotator whose columns the filters read."""
        needed: dict[str, Annotator] = {}
        for flt in self.filters:
            for column in flt.needs:
                cls = ANNOTATORS.get(column)
                if cls is not None and cls.name not in needed:
                    needed[cls.name] = cls()
        return list(needed.values())

    def _stats_dir(self, op: Operator) -> Path:
        """The folder where ``op``'s fitted artifact lives: declared by the set's output."""
        kind = "annotator" if isinstance(op, Annotator) else "filter"
        return self.output_dir / STATS / f"{kind}-{op.name}"

    def columns_after(self, columns: set[str]) -> set[str]:
        provided = {c for a in self._annotators() for c in a.provides}
        for flt in self.filters:
            missing = [c for c in flt.needs if c not in columns and c not in provided]
            if missing:
                raise ConfigError(
                    f"stage {self.name}: filter {flt.name} needs column(s) {', '.join(missing)}, "
                    "which the ledger does not have and no annotator provides "
                    f"(ledger columns: {', '.join(sorted(columns))})"
                )
        return columns | provided

    def plan(self, ctx: StageContext) -> None:
        self.columns_after(set(ctx.input_schema.names) if ctx.input_schema else set())
        for op in [*self._annotators(), *self.filters]:
            if isinstance(op, Fitted):
                stats_dir = self._stats_dir(op)
                stats_dir.mkdir(parents=True, exist_ok=True)
                op.fit(
                    FitContext(
                        ctx.input_files,
                        stats_dir,
                        ctx.seed,
                        ctx.run_dir,
                        ctx.ingest_dir,
                        ctx.input_path,
                        ctx.engine,
                    )
                )

    def setup(self) -> None:
        annotators = self._annotators()
        for op in [*annotators, *self.filters]:
            if isinstance(op, Fitted):
                op.load(self._stats_dir(op))
            else:
                op.setup()
        self._ready = {c: a for a in annotators for c in a.provides}

    def __call__(self, batch: pa.Table) -> pa.Table:
        return apply_filters(batch, self.filters, self._ready)
