"""Minimum shorter side of the original image.

DataComp basic filtering keeps ``min(original_width, original_height) >= 200``
(Gadre et al. 2023, mlfoundations/datacomp ``baselines/apply_filter.py``).
ALIGN (Jia et al. 2021) keeps images "whose shorter dimension is larger than
200 pixels", i.e. ``> 200``, written ``min_side: 201`` in ``filters/align.yaml``.
Sizes are the originals reported by the download, not the resized ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from curate.core.config import NonNegative
from curate.core.operators import Filter, register_filter


@register_filter("image_size")
@dataclass
class ImageSize(Filter):
    """Keep ``min(original_width, original_height) >= min_side``; an unknown size drops."""

    min_side: NonNegative = 200  # 0 keeps every image whose size is known

    needs = ("original_width", "original_height")

    def keep(self, batch: pa.Table) -> pa.Array:
        # Not pc.min_element_wise: it skips nulls, so a row with one known side would pass.
        return pc.and_(
            pc.greater_equal(batch["original_width"], self.min_side),
            pc.greater_equal(batch["original_height"], self.min_side),
        )
