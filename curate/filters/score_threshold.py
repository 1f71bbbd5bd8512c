"""Threshold any numeric score column (CLIP score, language score, …).

Scores are never thresholds: an annotator or stage writes the
score, this filter decides, so a run can be re-thresholded without rescoring.
A null or NaN score drops, as in pandas, where ``NaN >= x`` is False.

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

    @property
    def needs(self) -> tuple[str, ...]:
        return (self.column,)

    def keep(self, batch: pa.Table) -> np.ndarray:
        values = batch[self.column].cast(pa.float64()).to_numpy(zero_copy_only=False)
        mask = ~np.isnan(values)  # nulls became NaN above
        if self.min is not None:
            mask &= values >= self.min
        if self.max is not None:
            mask &= values <= self.max
        return mask
