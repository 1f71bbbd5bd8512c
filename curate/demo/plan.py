"""Which row gets which defect, caption and file: the whole pool decided before a pixel is drawn.

Planning runs in one process from one seeded generator, in row order; what it
decides for each row is a ``Row`` whose ``job`` says how to write its file
(see ``pool.write_file``). Rendering can then be spread over any number of
processes without changing a byte.

Each defect has an exact count, ``round(rate * size)``, placed at random rows;
the rest are clean. A row has at most one defect. Duplicates copy a clean
row's image and mismatched rows borrow a clean row's caption, so both point
back at that row (``duplicate_of``, ``caption_of``). Duplicates copy a few
scenes many times (``COPIES`` each on average), as reposted memes, logos and
stock photos over-weight a few pictures on the web.

A tiny image is a thumbnail of a whole scene and a banner a strip cut across a
larger one, so both hold less of what their caption names than a clean image
does: a thumbnail's objects are a few pixels wide, a strip cuts most of them off.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from curate.demo import captions
from curate.demo.scene import Scene, clean_size, sample_scene, zipf
from curate.demo.vocab import BOILERPLATE, COLOURS, HTML_PAGES, SHAPES

LANGUAGES = ("fr", "de", "es")
#: Rows per duplicated scene, on average (the copies and their clean source).
COPIES = 10


@dataclass(frozen=True)
class DefectRates:
    """Fraction of the pool's rows with each defect (each row has at most one)."""

    mismatched: float = 0.05  # the caption of another image (one sharing no shape)
    boilerplate: float = 0.04  # "IMG_0423.JPG", "image", "click here", a bare url
    non_english: float = 0.04  # the caption in French, German or Spanish
    short_caption: float = 0.03  # 1–2 words
    long_caption: float = 0.03  # over 20 words, still English
    tiny: float = 0.03  # a thumbnail of a scene: shorter side 32–96 px, JPEG quality 40–70
    banner: float = 0.02  # a strip across a scene, aspect ratio 3.2–4.5, shorter side 200–260
    exact_duplicate: float = 0.03  # a clean row's bytes at another url
    near_duplicate: float = 0.03  # a clean row's image re-encoded, resized or cropped
    broken_url: float = 0.02  # nothing at the url: 404
    corrupt: float = 0.02  # a JPEG cut before its pixels, or noise
    html: float = 0.01  # an HTML page at an image url
    server_error: float = 0.005  # the server answers 500 (a rule in _rules.json)

    def __post_init__(self) -> None:
        for name, rate in self.as_dict().items():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"defect rate {name}={rate} is not in [0, 1]")
        # Duplicates and mismatches need clean rows to copy from.
        if sum(self.as_dict().values()) > 0.9:
            raise ValueError("defect rates add up to more than 0.9: too few clean rows left")

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def counts(self, size: int) -> dict[str, int]:
        return {name: round(rate * size) for name, rate in self.as_dict().items()}


#: The defect names, as the manifest spells them.
DEFECTS = tuple(f.name for f in fields(DefectRates))
#: Defects whose url serves no decodable image.
NO_IMAGE = frozenset({"broken_url", "corrupt", "html"})


@dataclass
class Row:
    """One pair of the pool. ``job`` is ``(kind, *args)`` for ``pool.write_file``; None: no file."""

    path: str
    caption: str
    defect: str | None
    scene: Scene | None  # what the image at ``path`` shows; None when it shows nothing
    job: tuple | None
    language: str | None = None
    duplicate_of: int | None = None  # row index
    caption_of: int | None = None  # row index


def _own_scene(defect: str | None, rng: np.random.Generator) -> Scene:
    if defect == "banner":  # the scene a strip is cut from: as wide as the strip, 2-3x as tall
        width = round(int(rng.integers(200, 261)) * float(rng.uniform(3.2, 4.5)))
        return sample_scene(rng, width, round(width * float(rng.uniform(0.5, 0.75))))
    return sample_scene(rng, *clean_size(rng))


def _caption(defect: str | None, scene: Scene, rng: np.random.Generator) -> tuple[str, str | None]:
    """The row's caption and, for a translation, its language."""
    if defect == "boilerplate":
        return BOILERPLATE[rng.choice(len(BOILERPLATE), p=zipf(len(BOILERPLATE), 1.0))], None
    if defect == "non_english":
        language = LANGUAGES[rng.integers(len(LANGUAGES))]
        return captions.translated(scene, language, rng), language
    if defect == "short_caption":
        return captions.short_caption(scene, rng), None
    if defect == "long_caption":
        return captions.long_caption(scene, rng), None
    return captions.english(scene, rng), None


def _defect_job(defect: str | None, scene: Scene, quality: int, rng: np.random.Generator):
    if defect == "broken_url":
        return None
    if defect == "tiny":
        return ("thumbnail", scene, int(rng.integers(40, 71)), int(rng.integers(32, 97)))
    if defect == "banner":
        # an aspect ratio in [3.2, 4.5] that gives a height in [200, 260] for this width
        ratio = float(rng.uniform(max(3.2, scene.width / 260), min(4.5, scene.width / 200)))
        height = round(scene.width / ratio)
        return ("strip", scene, quality, int(rng.integers(scene.height - height + 1)), height)
    if defect == "html":
        return ("html", int(rng.integers(len(HTML_PAGES))))
    if defect == "corrupt":
        if rng.random() < 0.5:
            return ("truncated", scene, quality, float(rng.uniform(0.3, 0.9)))
        return ("noise", int(rng.integers(2**31)), int(rng.integers(2_000, 20_000)))
    return ("jpeg", scene, quality)


def _near_job(scene: Scene, quality: int, rng: np.random.Generator) -> tuple:
    """How a near duplicate differs from its source; its shorter side stays >= 205 px."""
    edit = ("reencode", "resize", "crop")[rng.integers(3)]
    short = min(scene.width, scene.height)
    if edit == "reencode":
        return ("near", scene, quality, edit, 1.0, int(rng.integers(55, 76)))
    if edit == "resize":
        amount = float(rng.uniform(max(0.8, 205 / short), 0.95))
    else:
        amount = float(rng.uniform(0.02, min(0.04, (short - 205) / (2 * short))))
    return ("near", scene, quality, edit, amount, quality)


def _disjoint_donor(row: Row, clean: np.ndarray, rows: list[Row], rng) -> int:
    """A clean row whose image shares no shape with this one (any clean row after 50 tries)."""
    shapes = {o.shape for o in row.scene.objects}
    donor = int(rng.choice(clean))
    for _ in range(50):
        if not shapes & {o.shape for o in rows[donor].scene.objects}:
            break
        donor = int(rng.choice(clean))
    return donor


def plan_pool(size: int, rates: DefectRates, rng: np.random.Generator) -> list[Row]:
    """Every row of a pool of ``size`` pairs, in url order."""
    counts = rates.counts(size)
    if sum(counts.values()) > size:
        raise ValueError(f"a pool of {size} rows cannot hold {sum(counts.values())} defects")
    labels: list[str | None] = [d for d, n in counts.items() for _ in range(n)]
    labels += [None] * (size - len(labels))
    defects = [labels[i] for i in rng.permutation(size)]

    rows, qualities = [], []
    for i, defect in enumerate(defects):
        scene = _own_scene(defect, rng)
        quality = int(rng.integers(85, 96))
        caption, language = _caption(defect, scene, rng)
        job = _defect_job(defect, scene, quality, rng)
        shown = None if defect in NO_IMAGE else scene
        rows.append(Row(f"images/{i:06d}.jpg", caption, defect, shown, job, language))
        qualities.append(quality)

    clean = np.flatnonzero([d is None for d in defects])
    if len(clean) == 0 and size > 0:
        raise ValueError("the pool has no clean row to copy duplicates and captions from")
    copies = sum(d in ("exact_duplicate", "near_duplicate") for d in defects)
    sources = rng.choice(clean, min(len(clean), -(-copies // (COPIES - 1))), replace=False)
    for row in rows:
        if row.defect in ("exact_duplicate", "near_duplicate"):
            source = int(rng.choice(sources))
            scene, quality = rows[source].scene, qualities[source]
            row.scene, row.duplicate_of = scene, source
            row.caption = captions.english(scene, rng)  # the same picture, its own alt-text
            if row.defect == "exact_duplicate":
                row.job = ("jpeg", scene, quality)
            else:
                row.job = _near_job(scene, quality, rng)
        elif row.defect == "mismatched":
            row.caption_of = _disjoint_donor(row, clean, rows, rng)
            row.caption = rows[row.caption_of].caption
    return rows


def plan_eval(size: int, rng: np.random.Generator) -> list[tuple[Scene, str]]:
    """The evaluation set: one medium or large object per image, every shape equally often
    and every colour equally often (the pool's long tails are not the eval's).

    One object, so each image has one true label per attribute of ``VOCABULARY``.
    """
    shapes = [SHAPES[i % len(SHAPES)] for i in rng.permutation(size)]
    colours = [COLOURS[i % len(COLOURS)] for i in rng.permutation(size)]
    scenes = []
    for shape, colour in zip(shapes, colours):
        scene = sample_scene(
            rng, *clean_size(rng), shapes=[shape], sizes=("medium", "large"), colours=[colour]
        )
        scenes.append((scene, captions.english(scene, rng)))
    return scenes
