"""CLIP-score filters: a fixed threshold (LAION) and a top fraction of the pool (DataComp).

Both reproduce mlfoundations/datacomp ``baselines/apply_filter.py`` uid for uid.
``load_uids_with_clip_score_helper`` reads one metadata parquet with pandas and keeps::

    df[df[key] >= threshold]["uid"]

``clip_score`` is that rule with a fixed ``min``: DataComp's
``--name clip_score --arch b32 --threshold 0.25``, and its ``laion2b`` baseline,
``load_uids_with_clip_score(metadata_dir, "b32", 0.28, None, ...,
gcld3_en_filter=True)`` (B/32 score >= 0.28 among gcld3-English captions).

``clip_score_top_fraction`` is ``--fraction``: when ``threshold is None``,
``get_threshold`` loads the key column of every parquet and converts the
fraction into a threshold, which is then applied file by file as above::

    n = int(len(df) * fraction)
    threshold = -np.sort(-df[key].values)[n]

``fit`` computes the same number with DuckDB over the ledger files (an
out-of-core sort of one column), and ``keep`` applies it per batch. What that
code does, and therefore what this module does:

* ``len(df)`` counts every row of the pool, including rows whose score is
  null or NaN (pandas reads a null float as NaN). Here the pool is the rows
  alive (``keep`` true) in the filter stage's input: filters earlier in the same
  set do not shrink it, as DataComp's pool is the whole metadata; put the filter
  in a later stage to take a fraction of what they kept.
* ``n`` is ``int(len * fraction)`` in float64, truncated: ``int(100 * 0.29)``
  is 28, not 29.
* ``-np.sort(-x)`` is a descending sort with NaN last (DuckDB sorts NaN above
  every number, so ``fit`` leaves NaN and null out and counts them; DuckDB's
  optimizer is off for it, see ``top_fraction``). When index
  ``n`` lands on a NaN, the threshold is NaN, ``x >= NaN`` is False everywhere,
  and DataComp keeps NOTHING; this filter then keeps nothing too, on purpose.
* Every row tied with the threshold is kept, so ``n + 1`` rows or more survive.
* ``fraction: 1.0`` makes ``n == len`` and DataComp raises ``IndexError``;
  here it keeps every row that has a (non-NaN) score. An empty pool keeps nothing.
* Comparisons happen in the column's own dtype. DataComp's scores are float32
  (pandas reads a float32 parquet column as float32); the threshold taken from
  them is a float32 and ``fit`` stores it exactly (``float.hex``). A Python
  float such as LAION's 0.28 is converted to float32 before comparing (NumPy's
  rules for a Python scalar against a float32 array), so a score equal to
  ``float32(0.26)``, which is slightly below 0.26, passes ``min: 0.26``, as in
  DataComp; a float64 comparison would drop it. ``keep`` therefore compares the
  scores as NumPy arrays of the column's dtype with the Python float, exactly
  DataComp's expression; float64 columns compare in float64.

A null or NaN score always drops. A column the ledger lacks fails the run
before the filter stage starts (through ``needs``), so nothing is fitted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.config import Cosine, Range
from curate.operators import Filter, FitContext, register_filter
from curate.runfolder import scratch
from curate.stats import sql_paths

ARTIFACT = "threshold.json"
#: The artifact's ``decision``: compare with ``threshold``, keep no row, keep every scored row.
THRESHOLD, KEEP_NONE, KEEP_ALL = "threshold", "keep_none", "keep_all"


def score_values(scores: pa.Array | pa.ChunkedArray, column: str) -> np.ndarray:
    """Scores as NumPy in the column's own dtype, null as NaN (what pandas reads)."""
    kind = scores.type
    if not (pa.types.is_floating(kind) or pa.types.is_integer(kind)):
        raise TypeError(f"column {column!r} holds {kind}, not numeric scores")
    return scores.to_numpy(zero_copy_only=False)  # integers with nulls come back as float64


def _at_least(values: np.ndarray, bound: float) -> np.ndarray:
    """``values >= bound`` as DataComp's pandas computes it (NaN is False)."""
    with np.errstate(over="ignore", invalid="ignore"):  # a bound beyond float32 becomes inf
        return np.asarray(values >= bound, dtype=bool)


def _identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _check_numeric(files: list[Path], column: str) -> None:
    kind = pq.read_schema(files[0]).field(column).type
    if not (pa.types.is_floating(kind) or pa.types.is_integer(kind)):
        raise TypeError(f"column {column!r} holds {kind}, not numeric scores")


def top_fraction(files: list[Path], column: str, fraction: float, tmp: Path) -> dict:
    """DataComp's ``get_threshold`` over the alive rows of ``files``, as the artifact's fields
    (DuckDB spills its sort to a scratch folder in ``tmp``)."""
    alive = scored = n = 0
    threshold = None
    if files:
        _check_numeric(files, column)
        col = _identifier(column)
        source = f"read_parquet({sql_paths(files)})"
        with scratch(tmp, ".duckdb-") as spill:
            con = duckdb.connect(config={"temp_directory": str(spill)})
            try:
                # Parquet writers (pyarrow included) leave NaN out of a column's min/max, and
                # DuckDB's optimizer trusts those statistics: with it on, isnan() on a NaN can
                # fold to false (duckdb/duckdb#7803, #25521). Off, the answers are NumPy's; the
                # sort still reads one column and spills to ``spill``.
                con.execute("PRAGMA disable_optimizer")
                alive, scored = con.execute(
                    f"SELECT count(*), count(*) FILTER (WHERE NOT isnan({col})) "
                    f"FROM {source} WHERE keep"
                ).fetchone()
                n = int(alive * fraction)  # DataComp: n = int(len(df) * fraction)
                if n < scored:  # the n-th largest, 0-based, NaN and null left out
                    (threshold,) = con.execute(
                        f"SELECT {col} FROM {source} WHERE keep AND NOT isnan({col}) "
                        f"ORDER BY {col} DESC LIMIT 1 OFFSET {n}"
                    ).fetchone()
            finally:
                con.close()
    if n >= alive:
        decision = KEEP_ALL  # fraction 1.0 (DataComp: IndexError), or an empty pool
    elif threshold is None:
        decision = KEEP_NONE  # sorted[n] is NaN: DataComp keeps nothing
    else:
        decision = THRESHOLD
    value = None if threshold is None else float(threshold)
    return {
        "column": column,
        "fraction": fraction,
        "alive_rows": int(alive),
        "scored_rows": int(scored),
        "n": n,
        "decision": decision,
        "threshold": None if value is None else value.hex(),  # exact
        "threshold_decimal": None if value is None else repr(value),  # for people
    }


@register_filter("clip_score")
@dataclass
class ClipScore(Filter):
    """Keep ``column >= min`` (DataComp ``--threshold``, LAION-2B's 0.28); null/NaN drops."""

    min: Cosine  # a CLIP score is a cosine: -1 keeps every scored row (score_threshold: any)
    column: str = "clip_score"

    def __post_init__(self) -> None:
        if not self.column:
            raise ValueError("column must name a numeric ledger column")
        self.min = float(self.min)  # a Python float: NumPy compares it in the column's dtype

    @property
    def needs(self) -> tuple[str, ...]:
        return (self.column,)

    def keep(self, batch: pa.Table) -> np.ndarray:
        return _at_least(score_values(batch[self.column], self.column), self.min)


@register_filter("clip_score_top_fraction")
@dataclass
class ClipScoreTopFraction(Filter):
    """Keep the top ``fraction`` of the pool by ``column``, ties included (DataComp --fraction)."""

    fraction: Annotated[float, Range(0, 1, low_open=True, why="the share of the pool to keep")]
    column: str = "clip_score"

    # Set by fit; a path, not the data, so the fitted object pickles small to Ray workers.
    artifact: Path | None = field(default=None, init=False, compare=False)
    _rule: tuple[str, float | None] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if not self.column:
            raise ValueError("column must name a numeric ledger column")
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, int | float):
            raise ValueError(f"fraction must be a number in (0, 1], got {self.fraction!r}")
        self.fraction = float(self.fraction)

    @property
    def needs(self) -> tuple[str, ...]:
        return (self.column,)

    def fit(self, ctx: FitContext) -> None:
        stats = Path(ctx.stats_dir)
        fitted = top_fraction(
            [Path(f) for f in ctx.ledger_files], self.column, self.fraction, stats
        )
        out = stats / ARTIFACT
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(fitted, indent=2) + "\n")
        os.replace(tmp, out)
        self.artifact = out
        self._rule = None

    def setup(self) -> None:
        if self.artifact is None:
            raise RuntimeError(f"{self.name}: fit() must run over the pool before setup()")
        fitted = json.loads(Path(self.artifact).read_text())
        if fitted["column"] != self.column or fitted["fraction"] != self.fraction:
            raise RuntimeError(f"{self.artifact}: fitted for other parameters than {self}")
        hexed = fitted["threshold"]
        self._rule = (fitted["decision"], None if hexed is None else float.fromhex(hexed))

    def keep(self, batch: pa.Table) -> np.ndarray:
        if self._rule is None:
            self.setup()
        decision, threshold = self._rule
        values = score_values(batch[self.column], self.column)
        if decision == KEEP_NONE:
            return np.zeros(len(values), dtype=bool)
        if decision == KEEP_ALL:
            return ~np.isnan(values) if values.dtype.kind == "f" else np.ones(len(values), bool)
        return _at_least(values, threshold)
