"""Captions written from a scene: clean English, too short, too long, French, German, Spanish.

Clean captions are what a careful person writes as alt-text: 4–15 words that
name every object and, usually, the background's pattern, never its colour
("a large red circle and a small blue star on a striped background"). The
defective kinds differ from them in exactly one way, so a filter that drops
them is seen dropping that and nothing else: short
ones are 1–2 words, long ones are still English but over 20 words, and the
translations say the same thing in another language.
"""

from __future__ import annotations

import numpy as np

from curate.demo import vocab
from curate.demo.scene import Scene, Shape

CLEAN_MIN_WORDS = 4
CLEAN_MAX_WORDS = 15
LONG_MIN_WORDS = 21

_EN_PREFIXES = ("", "a picture of ", "an illustration of ", "a drawing of ", "an image of ")
_EN_BACKGROUND = {
    "plain": "a plain background",
    "striped": "a striped background",
    "dotted": "a dotted background",
    "gradient": "a gradient background",
}
_LONG_OPENERS = (
    "this simple flat illustration shows",
    "in this colourful drawing we can see",
    "the picture below contains",
    "here is an image made of",
)
_LONG_FILLERS = (
    "drawn in a clean and simple flat style",
    "with sharp edges and bright colours",
    "and there is nothing else in the picture",
    "like a page from a book that teaches children about shapes and colours",
)


def with_article(phrase: str) -> str:
    """'a' or 'an' before ``phrase``, by its first letter (the demo's words need no more)."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: list[str], conjunction: str) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + f" {conjunction} " + items[-1]


def _words(text: str) -> int:
    return len(text.split())


def _en_object(o: Shape, with_size: bool) -> str:
    size = f"{o.size} " if with_size and o.size != "medium" else ""
    return with_article(f"{size}{o.colour} {o.shape}")


def _position(o: Shape, scene: Scene) -> str:
    """Where an object sits, in words: "in the top left", "on the right", "in the middle"."""
    col = ("left", "centre", "right")[min(2, int(3 * o.x / scene.width))]
    row = ("top", "middle", "bottom")[min(2, int(3 * o.y / scene.height))]
    if row == "middle":
        return "in the middle" if col == "centre" else f"on the {col}"
    return f"at the {row}" if col == "centre" else f"in the {row} {col}"


def english(scene: Scene, rng: np.random.Generator) -> str:
    """A clean caption: every object, usually the background, 4–15 words.

    Size words and a prefix make captions varied; they are dropped again when
    three objects would push the caption over ``CLEAN_MAX_WORDS``.
    """
    sizes = [bool(rng.random() < 0.6) for _ in scene.objects]
    prefix = _EN_PREFIXES[rng.integers(len(_EN_PREFIXES))]
    background = " on " + _EN_BACKGROUND[scene.pattern]
    with_background = bool(rng.random() < 0.85)
    for use_sizes, use_prefix in ((True, True), (False, True), (False, False)):
        objects = [_en_object(o, s and use_sizes) for o, s in zip(scene.objects, sizes)]
        text = (prefix if use_prefix else "") + _join(objects, "and")
        if with_background or _words(text) < CLEAN_MIN_WORDS:  # "a red circle" is too short
            text += background
        if _words(text) <= CLEAN_MAX_WORDS:
            return text
    raise AssertionError(f"no caption of at most {CLEAN_MAX_WORDS} words for {scene}")


def long_caption(scene: Scene, rng: np.random.Generator) -> str:
    """An English caption of more than 20 words: positions, sizes and filler clauses."""
    objects = [f"{_en_object(o, True)} {_position(o, scene)}" for o in scene.objects]
    opener = _LONG_OPENERS[rng.integers(len(_LONG_OPENERS))]
    background = _EN_BACKGROUND[scene.pattern]
    text = f"{opener} {_join(objects, 'and')}, all on {background}"
    for i in rng.permutation(len(_LONG_FILLERS)):
        if _words(text) >= LONG_MIN_WORDS:
            break
        text += ", " + _LONG_FILLERS[i]
    return text


def short_caption(scene: Scene, rng: np.random.Generator) -> str:
    """One or two words about the first object: "star", "red star", "large star"."""
    o = scene.objects[0]
    choices = [o.shape, f"{o.colour} {o.shape}"]
    if o.size != "medium":
        choices.append(f"{o.size} {o.shape}")
    return choices[rng.integers(len(choices))]


def _fr_object(o: Shape) -> str:
    noun, g = vocab.FR_SHAPES[o.shape]
    female = g == "f"
    colour = vocab.FR_COLOURS[o.colour][female]
    size = vocab.FR_SIZES[o.size][female] + " " if o.size in vocab.FR_SIZES else ""
    return f"{'une' if female else 'un'} {size}{noun} {colour}"


def _de_object(o: Shape, case: str) -> str:
    noun, g = vocab.DE_SHAPES[o.shape]
    article, ending = vocab.DE_ARTICLE[case, g]
    size = vocab.DE_SIZES[o.size] + ending + " " if o.size in vocab.DE_SIZES else ""
    return f"{article} {size}{vocab.DE_COLOURS[o.colour]}{ending} {noun}"


def _es_object(o: Shape) -> str:
    noun, g = vocab.ES_SHAPES[o.shape]
    female = g == "f"
    colour = vocab.ES_COLOURS[o.colour][female]
    size = " " + vocab.ES_SIZES[o.size][female] if o.size in vocab.ES_SIZES else ""
    return f"{'una' if female else 'un'} {noun} {colour}{size}"


def translated(scene: Scene, language: str, rng: np.random.Generator) -> str:
    """The clean caption's content in French (``fr``), German (``de``) or Spanish (``es``)."""
    framed = bool(rng.random() < 0.4)  # "une image d'…", "Das Bild zeigt …", "un dibujo de …"
    if language == "fr":
        text = _join([_fr_object(o) for o in scene.objects], "et")
        text += f" sur un fond {vocab.FR_PATTERNS[scene.pattern]}"
        return ("une image d'" if framed else "") + text
    if language == "de":
        case = "acc" if framed else "nom"
        text = _join([_de_object(o, case) for o in scene.objects], "und")
        text += " " + vocab.DE_PATTERNS[scene.pattern]
        return ("Das Bild zeigt " if framed else "") + text
    if language == "es":
        text = _join([_es_object(o) for o in scene.objects], "y")
        text += f" sobre un fondo {vocab.ES_PATTERNS[scene.pattern]}"
        return ("un dibujo de " if framed else "") + text
    raise ValueError(f"no caption templates for language {language!r}")
