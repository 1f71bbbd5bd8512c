"""Caption word counts (``n_words``), the column the word-count filters read.

Words are ``caption.split()`` words, counted by ``curate.text.words.word_counts``
without a Python loop; that is the count DataComp's basic filter uses
(``len(text.split())``), so thresholds over ``n_words`` reproduce it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from curate.core.operators import Annotator, register_annotator
from curate.text.words import word_counts


@register_annotator("text")
@dataclass
class TextAnnotator(Annotator):
    """``n_words`` = ``len(caption.split())`` (int32; null for a null caption)."""

    needs = ("caption",)
    provides = ("n_words",)

    def annotate(self, batch: pa.Table) -> dict[str, pa.Array]:
        return {"n_words": word_counts(batch["caption"])}
