"""Keep captions in the wanted languages (fastText lid.176 top-1 label).

DataComp basic filtering (Gadre et al. 2023, mlfoundations/datacomp
``baselines/apply_filter.py``) keeps rows whose fastText top-1 label is
``en``, with no confidence threshold: ``languages: [en], min_score: 0.0``.
``lang``/``lang_score`` come from the ``language`` annotator; a caption the
model could not label (null ``lang``) drops.

The parameter is ``languages``, not ``keep``: a dataclass field named ``keep``
would shadow the ``Filter.keep`` method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import pyarrow as pa
import pyarrow.compute as pc

from curate.core.config import Range
from curate.core.operators import Filter, register_filter


@register_filter("language")
@dataclass
class Language(Filter):
    """Keep ``lang in languages`` and ``lang_score >= min_score``."""

    languages: list[str] = field(default_factory=lambda: ["en"])
    min_score: Annotated[float, Range(0, 1, why="the probability of the top label")] = 0.0

    needs = ("lang", "lang_score")

    def __post_init__(self) -> None:
        if not self.languages:
            raise ValueError("languages is empty: the filter would drop every row")

    def keep(self, batch: pa.Table) -> pa.Array:
        wanted = pc.is_in(batch["lang"], value_set=pa.array(self.languages, pa.string()))
        return pc.and_(wanted, pc.greater_equal(batch["lang_score"], self.min_score))
