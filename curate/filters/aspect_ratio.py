"""Maximum aspect ratio (longer side / shorter side) of the original image.

DataComp basic filtering (mlfoundations/datacomp ``baselines/apply_filter.py``)
computes ``np.maximum(w, h) / np.minimum(w, h)`` in float64 and keeps
``<= 3.0``; ALIGN (Jia et al. 2021) keeps "aspect ratio smaller than 3", i.e.
``< 3`` (``inclusive: false``). The ratio is computed the same way here, so
values like 600/200 compare exactly as in DataComp. A zero or unknown side
has no ratio and drops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np
import pyarrow as pa

from curate.core.config import Range
from curate.core.operators import Filter, register_filter


def _sides(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A size column as float64, null as NaN."""
    return column.cast(pa.float64()).to_numpy(zero_copy_only=False)


@register_filter("aspect_ratio")
@dataclass
class AspectRatio(Filter):
    """Keep ``max(w, h) / min(w, h) <= max_ratio`` (``<`` when not ``inclusive``)."""

    max_ratio: Annotated[float, Range(1, why="the longer side over the shorter")] = 3.0
    inclusive: bool = True

    def __post_init__(self) -> None:
        if self.max_ratio == 1 and not self.inclusive:
            raise ValueError("max_ratio 1 with inclusive: false would drop every row")

    needs = ("original_width", "original_height")

    def keep(self, batch: pa.Table) -> np.ndarray:
        w = _sides(batch["original_width"])
        h = _sides(batch["original_height"])
        shorter = np.minimum(w, h)
        longer = np.maximum(w, h)
        ok = shorter > 0  # False for NaN (unknown) and for zero or negative sides
        ratio = np.full(len(w), np.inf)
        np.divide(longer, shorter, out=ratio, where=ok)
        within = ratio <= self.max_ratio if self.inclusive else ratio < self.max_ratio
        return ok & within
