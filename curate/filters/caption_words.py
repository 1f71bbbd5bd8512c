"""Caption length bounds, in words and in characters.

Words are ``len(caption.split())`` (the ``n_words`` column from the ``text``
annotator); characters are Python's ``len(caption)``, i.e. Unicode code points
(``pc.utf8_length``), so an emoji counts 1 and "e" + combining accent counts 2.

- DataComp basic filtering (Gadre et al. 2023): ``len(text.split()) > 2`` and
  ``len(text) > 5`` → ``min_words: 3, min_chars: 6``.
- ALIGN (Jia et al. 2021): drop texts "too short (<3 unigrams) or too long
  (>20 unigrams)" → ``min_words: 3, max_words: 20``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from curate.core.config import Count, NonNegative
from curate.core.operators import Filter, register_filter


@register_filter("caption_words")
@dataclass
class CaptionWords(Filter):
    """Keep ``min_words <= n_words <= max_words`` and ``min_chars <= len(caption) <= max_chars``."""

    min_words: NonNegative = 0
    max_words: Count | None = None  # 0 would keep only captions without a word
    min_chars: NonNegative = 0
    max_chars: Count | None = None

    def __post_init__(self) -> None:
        if self.max_words is not None and self.max_words < self.min_words:
            raise ValueError(f"max_words {self.max_words} < min_words {self.min_words}")
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ValueError(f"max_chars {self.max_chars} < min_chars {self.min_chars}")

    @property
    def needs(self) -> tuple[str, ...]:
        # Always the caption: a null caption drops even when no bound is set.
        words = self.min_words > 0 or self.max_words is not None
        return ("caption", "n_words") if words else ("caption",)

    def keep(self, batch: pa.Table) -> pa.Array:
        mask = pc.is_valid(batch["caption"])
        if "n_words" in self.needs:
            mask = pc.and_(mask, _between(batch["n_words"], self.min_words, self.max_words))
        if self.min_chars > 0 or self.max_chars is not None:
            chars = pc.utf8_length(batch["caption"])
            mask = pc.and_(mask, _between(chars, self.min_chars, self.max_chars))
        return mask


def _between(values: pa.ChunkedArray, low: int, high: int | None) -> pa.ChunkedArray:
    mask = pc.greater_equal(values, low)
    return mask if high is None else pc.and_(mask, pc.less_equal(values, high))
