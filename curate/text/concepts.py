"""Concept lists and MetaCLIP's substring matching of captions against them.

MetaCLIP (Xu et al. 2023, "Demystifying CLIP Data"; facebookresearch/MetaCLIP
``metaclip/substr_matching.py``) pads the caption with one space on each side,
puts a space on both sides of ``, . ; : ? !`` and the backtick, turns tabs and
line breaks into spaces, and says an entry matches when ``" entry "`` occurs in
that text. So a match starts and ends at a word boundary ("cat" is not found in
"concatenate") and a multi-word entry matches only as the same words in a row.
It is case-sensitive. ``metaclip/substr_matching_ahocorasick.py`` does the
same with one Aho-Corasick automaton instead of a loop over the entries, and so
does this module.

Differences from MetaCLIP, each on purpose:

* An entry is spaced like a caption (``spacing``), not only padded, so an
  entry with punctuation, like ImageNet's "St. Bernard", can match at all
  (MetaCLIP's key " St. Bernard " never occurs in a spaced caption).
* ``lowercase=True`` lower-cases entries and captions (Arrow's ``utf8_lower``)
  for filters that follow DataComp, whose WordNet look-ups ignore case.
  MetaCLIP does not lower-case, and balancing keeps that default.
* A caption that is null or could not be decoded (``caption_error``) matches
  nothing; MetaCLIP's records always carry text.

Speed: the whole batch is spaced with Arrow kernels, joined into one string
(captions separated by NUL, which no key contains, so no match spans two
captions) and scanned by the automaton once; each match's end position is
mapped back to its row with a binary search over the captions' start positions.
No Python code runs per caption, only per match.

The bundled lists (``curate/concept_lists/``): ``imagenet1k`` holds the 1,000
ImageNet class names of ``open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES``,
made matchable: a parenthesised gloss is dropped ("kite (bird of prey)" →
"kite"), alternatives are split ("baluster / handrail" → "baluster",
"handrail") and repeats kept once ("missile", "sunglasses" name two classes
each), 1,003 entries. ``demo`` is the demo pool's vocabulary (``curate.demo.vocab``:
shapes, colours, background patterns), spelled as its English captions spell it.
"""

from __future__ import annotations

from pathlib import Path

import ahocorasick
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.core.config import ConfigError

BUNDLED_DIR = Path(__file__).resolve().parent / "concept_lists"
#: MetaCLIP's ``puncts_to_wrap`` and ``chars_to_space``.
WRAPPED = ",.;:?!`"
SPACED = "\t\n\r"
#: Between captions in the scanned text; never part of a key (checked when loading).
SEPARATOR = "\x00"
_WRAP = str.maketrans({c: f" {c} " for c in WRAPPED} | {c: " " for c in SPACED})
_WRAP_PATTERN = f"([{WRAPPED}])"  # none of them is special inside a character class


def bundled_lists() -> list[str]:
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.txt"))


def concept_file(name: str) -> Path:
    """A bundled list's file (``imagenet1k``, ``demo``) or the path of a user's file."""
    if name in bundled_lists():
        return BUNDLED_DIR / f"{name}.txt"
    path = Path(name).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"no concept list {name!r}: not a bundled list ({', '.join(bundled_lists())}) "
            "and no such file"
        )
    return path


def load_concepts(name: str) -> list[str]:
    """The entries of a concept list: one per line, stripped, blank lines skipped."""
    path = concept_file(name)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"concept list {path}: cannot read: {exc}") from exc
    entries = [line.strip() for line in lines if line.strip()]
    if not entries:
        raise ConfigError(f"concept list {path} is empty")
    bad = next((e for e in entries if SEPARATOR in e), None)
    if bad is not None:
        raise ConfigError(f"concept list {path}: entry {bad!r} holds a NUL character")
    return entries


def spacing(text: str) -> str:
    """MetaCLIP's ``spacing``: pad with spaces, space out punctuation, tabs/breaks to spaces."""
    return f" {text} ".translate(_WRAP)


def matchable_captions(batch: pa.Table) -> pa.ChunkedArray | pa.Array:
    """The captions, null where the caption could not be decoded (it must match nothing)."""
    return pc.if_else(pc.is_null(batch["caption_error"]), batch["caption"], None)


class Matcher:
    """Which entries of a concept list occur in each caption.

    Concepts are numbered in list order; entries that normalise to the same key
    (equal after lower-casing, say) are one concept, named by the first. The
    automaton is built on first use and never pickled, so a stage holding a
    matcher travels to Ray workers as a list of strings.
    """

    def __init__(self, entries: list[str], lowercase: bool = False):
        self.lowercase = lowercase
        if lowercase:
            entries = pc.utf8_lower(pa.array(entries, pa.string())).to_pylist()
        keys: dict[str, str] = {}
        for entry in entries:
            keys.setdefault(spacing(entry), entry)
        self.keys = list(keys)  # what the automaton looks for, as MetaCLIP spaces them
        self.names = list(keys.values())
        self._automaton = None

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_automaton": None}

    def _build(self) -> ahocorasick.Automaton:
        automaton = ahocorasick.Automaton()
        for i, key in enumerate(self.keys):
            automaton.add_word(key, i)
        automaton.make_automaton()
        return automaton

    def match(self, captions: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
        """CSR form of the matches: row i's concept ids are ``ids[offsets[i]:offsets[i+1]]``.

        Each concept appears once per row however often it occurs, ids ascending.
        """
        if self._automaton is None:
            self._automaton = self._build()
        if isinstance(captions, pa.ChunkedArray):
            captions = captions.combine_chunks()
        n = len(captions)
        if n == 0:
            return np.zeros(1, np.int64), np.zeros(0, np.int64)
        text = pc.fill_null(captions, "").cast(pa.string())  # 32-bit offsets, for ``_joined``
        if self.lowercase:
            text = pc.utf8_lower(text)
        text = pc.replace_substring_regex(text, _WRAP_PATTERN, r" \1 ")
        text = pc.binary_join_element_wise(" ", text, " " + SEPARATOR, "")
        starts = np.zeros(n + 1, np.int64)
        np.cumsum(pc.utf8_length(text).to_numpy(), out=starts[1:])
        scanned = _joined(text)
        for char in SPACED:  # length-preserving, so ``starts`` still hold
            scanned = scanned.replace(char, " ")
        hits = np.fromiter(
            (v for hit in self._automaton.iter(scanned) for v in hit), np.int64
        ).reshape(-1, 2)
        rows = np.searchsorted(starts, hits[:, 0], side="right") - 1
        pairs = np.unique(rows * len(self.keys) + hits[:, 1])
        rows, ids = np.divmod(pairs, len(self.keys))
        return np.searchsorted(rows, np.arange(n + 1)), ids


def _joined(text: pa.StringArray) -> str:
    """All values of a string array as one Python string (no copy per value)."""
    offsets = np.frombuffer(text.buffers()[1], np.int32, len(text) + 1, text.offset * 4)
    data = memoryview(text.buffers()[2])[offsets[0] : offsets[-1]]
    return str(data, "utf-8")
