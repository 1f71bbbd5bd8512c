"""Drop alt-texts shared by many images of the pool.

ALIGN (Jia et al. 2021, "Scaling Up Visual and Vision-Language Representation
Learning With Noisy Text Supervision", §3): "We exclude alt-texts that are
shared by more than 10 images. These alt-texts are often irrelevant to the
content of the images (e.g., '1920x1080', 'alt_img', 'cristina')." So keep
``text_count <= max_count`` with ``max_count: 10``. ``text_count`` counts exact
caption equality over the whole input ledger (the ``text_count`` annotator).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from curate.core.config import Count
from curate.core.operators import Filter, register_filter


@register_filter("alt_text_frequency")
@dataclass
class AltTextFrequency(Filter):
    """Keep rows whose caption occurs at most ``max_count`` times in the pool."""

    max_count: Count = 10  # 0 would drop every row: a caption counts itself

    needs = ("text_count",)

    def keep(self, batch: pa.Table) -> pa.Array:
        return pc.less_equal(batch["text_count"], self.max_count)
