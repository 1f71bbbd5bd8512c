"""Threshold any numeric score column (CLIP score, language score, …).

Scores are never thresholds: an annotator or stage writes the
score, this filter decides, so a run can be re-thresholded without rescoring.
A null or NaN score drops, as in pandas, where ``NaN >= x`` is False.

Comparisons happen in the column's own dtype, as DataComp's pandas expression
``df[key] >= threshold`` does: a Python float bound meets a float32 column as a
float32 (NumPy's rule for a scalar against an array), so a score equal to
``float32(0.26)``, slightly below 0.26, passes ``min: 0.26``; a float64
comparison would drop it. ``clip_score`` is this filter with DataComp's and
LAION's defaults.

DataComp's early ``no_filter`` baseline (mlfoundations/datacomp, first
``baselines/utils.py``) is ``df[df["clip_b32_similarity_score"] >= float("-inf")]``,
which keeps every row that has a score: ``column: clip_b32_similarity_score,
min: -.inf``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np
import pyarrow as pa

from curate.core.config import Range
from curate.core.operators import Filter, register_filter


def score_values(scores: pa.Array | pa.ChunkedArray, column: str) -> np.ndarray:
    """Scores as NumPy in the column's own dtype, null as NaN (what pandas reads)."""
    kind = scores.type
    if not (pa.types.is_floating(kind) or pa.types.is_integer(kind)):
        raise TypeError(f"column {column!r} holds {kind}, not numeric scores")
    return scores.to_numpy(zero_copy_only=False)  # integers with nulls come back as float64


def at_least(values: np.ndarray, bound: float) -> np.ndarray:
    """``values >= bound`` as DataComp's pandas computes it (NaN is False)."""
    with np.errstate(over="ignore", invalid="ignore"):  # a bound beyond float32 becomes inf
        return np.asarray(values >= bound, dtype=bool)


def at_most(values: np.ndarray, bound: float) -> np.ndarray:
    """``values <= bound`` in the values' dtype (NaN is False)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(values <= bound, dtype=bool)


def scored(values: np.ndarray) -> np.ndarray:
    """The rows that have a score (not null, not NaN)."""
    return ~np.isnan(values) if values.dtype.kind == "f" else np.ones(len(values), bool)


@register_filter("score_threshold")
@dataclass
class ScoreThreshold(Filter):
    """Keep ``min <= column <= max`` (a missing bound is open); null/NaN drops."""

    column: str
    # Any column, so any bound; an infinite one only where it keeps rows (min: -.inf).
    min: Annotated[float, Range(high=float("inf"), high_open=True, finite=False)] | None = None
    max: Annotated[float, Range(low=float("-inf"), low_open=True, finite=False)] | None = None

    def __post_init__(self) -> None:
        if not self.column:
            raise ValueError("column must name a numeric ledger column")
        if self.min is not None and self.max is not None and self.max < self.min:
            raise ValueError(f"max {self.max} < min {self.min}")
        # Python floats: NumPy compares them in the column's dtype
        self.min = None if self.min is None else float(self.min)
        self.max = None if self.max is None else float(self.max)

    @property
    def needs(self) -> tuple[str, ...]:
        return (self.column,)

    def keep(self, batch: pa.Table) -> np.ndarray:
        values = score_values(batch[self.column], self.column)
        mask = scored(values)
        if self.min is not None:
            mask &= at_least(values, self.min)
        if self.max is not None:
            mask &= at_most(values, self.max)
        return mask
