"""Drop rows whose caption could not be read as text.

Ingest stores a null caption, or sets ``caption_error`` (e.g. "invalid utf-8")
when the source bytes were not UTF-8. Nothing else is judged here: an empty
caption or one with U+FFFD replacement characters is still a caption, and
DataComp's basic filter keeps such rows when its other rules pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from curate.core.operators import Filter, register_filter


@register_filter("caption_valid")
@dataclass
class CaptionValid(Filter):
    """Keep rows with a non-null caption and a null ``caption_error``."""

    needs = ("caption", "caption_error")

    def keep(self, batch: pa.Table) -> pa.Array:
        return pc.and_(pc.is_valid(batch["caption"]), pc.is_null(batch["caption_error"]))
