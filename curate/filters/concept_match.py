"""Keep captions that name a concept of a list: DataComp's text-based filtering, by names.

DataComp (Gadre et al. 2023, §3.4 "text-based filtering"; mlfoundations/datacomp
``baselines/apply_filter.py``, ``load_uids_with_text_entity_helper``) keeps a
sample when its caption is English (fastText, the ``language`` filter) and one
of its whitespace tokens (``text.split()``) has, as its first WordNet synset
(``nltk.corpus.wordnet.synsets(word)[0]``, which lower-cases and lemmatises the
word), one of the ImageNet-21k classes. WordNet's data cannot be had here, so
this filter matches concept *names* instead, the MetaCLIP way
(``curate.text.concepts``): an entry of the list occurring as whole words in the
caption, lower-cased on both sides by default as WordNet's look-up is. So a
plural ("sharks") or an inflection does not match its name, a multi-word name
("great white shark") does, and the bundled ``imagenet1k`` list names 1,000
classes where DataComp used the ~21,000 of ImageNet-21k: the filter keeps
fewer rows than DataComp's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from curate.core.operators import Filter, register_filter
from curate.text.concepts import Matcher, load_concepts, matchable_captions


@register_filter("concept_match")
@dataclass
class ConceptMatch(Filter):
    """Keep rows whose caption contains at least one entry of the ``concepts`` list."""

    concepts: str = "imagenet1k"  # a bundled list or the path of a file, one entry per line
    lowercase: bool = True

    needs = ("caption", "caption_error")

    def __post_init__(self) -> None:
        self._matcher = Matcher(load_concepts(self.concepts), self.lowercase)

    def keep(self, batch: pa.Table) -> np.ndarray:
        offsets, _ = self._matcher.match(matchable_captions(batch))
        return np.diff(offsets) > 0
