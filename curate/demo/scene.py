"""What one demo image shows: a few coloured shapes on a patterned background.

A ``Scene`` is the exact ground truth of an image (its pixels are a pure
function of it, see ``draw.py``) and the source of its captions (see
``captions.py``). Scenes are sampled in the parent process from one seeded
generator, so the pool does not depend on how rendering is spread over
processes.

Shapes and object colours are drawn with Zipf-like weights (``SHAPE_ZIPF``,
``COLOUR_ZIPF``): the head shape appears in most images, the head colour on
most objects, and each tail concept in a few percent or less — the concept
imbalance MetaCLIP-style balancing exists for. Background patterns and colours
are uniform, and captions name a background's pattern, never its colour, so a
colour word always means an object's colour. The evaluation set draws shapes
and colours uniformly, so a model trained on the imbalanced pool is tested on
every concept alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from curate.demo.vocab import COLOURS, PATTERNS, SHAPES

#: Weight of the k-th shape (k = 1, 2, …) is k ** -SHAPE_ZIPF; 1.4 puts the head shape in ~2/3
#: of the images and each of the last ones in ~3 %.
SHAPE_ZIPF = 1.4
#: Weight of the k-th colour of ``COLOURS`` for objects: 2.0 gives the head colour ~55 % of
#: the objects and each of the last five 0.7-1.8 % (an object never takes its background's
#: colour, which flattens the head a little). A colour is a concept the small model
#: learns within the demo's budget (shape is not), so the long tail that balancing is
#: measured on is the colours'.
COLOUR_ZIPF = 2.0
#: Object radius as a fraction of the image's shorter side, per size word.
RADIUS = {"small": (0.08, 0.12), "medium": (0.13, 0.18), "large": (0.2, 0.26)}
#: How many objects an image has: 1, 2 or 3, with these probabilities.
N_OBJECTS = (0.35, 0.4, 0.25)


@dataclass(frozen=True)
class Shape:
    """One object: its concept words and where it is drawn (pixels, degrees)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    radius: float
    angle: float


@dataclass(frozen=True)
class Scene:
    """An image's content; ``variant`` picks stripe/gradient direction, ``period`` their scale."""

    width: int
    height: int
    pattern: str
    background: str  # the background's colour
    objects: tuple[Shape, ...]
    variant: int = 0
    period: float = 0.1

    def concepts(self) -> list[dict]:
        """The objects' concept words, as the manifest records them."""
        return [{"shape": o.shape, "colour": o.colour, "size": o.size} for o in self.objects]

    def backdrop(self) -> dict:
        """The background's concept words, as the manifest records them."""
        return {"pattern": self.pattern, "colour": self.background}


def zipf(n: int, exponent: float) -> np.ndarray:
    """Probabilities proportional to k ** -exponent for k = 1 .. n."""
    weights = np.arange(1, n + 1, dtype=float) ** -exponent
    return weights / weights.sum()


SHAPE_WEIGHTS = zipf(len(SHAPES), SHAPE_ZIPF)
COLOUR_WEIGHTS = zipf(len(COLOURS), COLOUR_ZIPF)
#: The colours the eval reports apart: the three most drawn and the five least.
HEAD_COLOURS, TAIL_COLOURS = COLOURS[:3], COLOURS[-5:]
# Inverse-CDF sampling: Generator.choice(p=...) re-validates p on every call.
_SHAPE_CDF = np.cumsum(SHAPE_WEIGHTS)[:-1]
_N_CDF = np.cumsum(N_OBJECTS)[:-1]


def clean_size(rng: np.random.Generator) -> tuple[int, int]:
    """A clean image's size: both sides in [224, 512], aspect ratio at most 2."""
    while True:
        w, h = (int(v) for v in rng.integers(224, 513, size=2))
        if max(w, h) <= 2 * min(w, h):
            return w, h


def _colour(rng: np.random.Generator, weights: np.ndarray, avoid: set[str]) -> str:
    """A colour drawn with ``weights`` (over ``COLOURS``), never one of ``avoid``."""
    allowed = np.array([c not in avoid for c in COLOURS])
    cdf = np.cumsum(np.where(allowed, weights, 0.0))  # flat over the colours not allowed
    return COLOURS[int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))]


def sample_scene(
    rng: np.random.Generator,
    width: int,
    height: int,
    shapes: list[str] | None = None,
    sizes: tuple[str, ...] = ("small", "medium", "large"),
    colours: list[str] | None = None,
) -> Scene:
    """A random scene on a ``width`` x ``height`` canvas.

    ``shapes`` and ``colours`` fix the objects' shapes and colours (the evaluation
    set balances them); otherwise they are drawn with ``SHAPE_WEIGHTS`` and
    ``COLOUR_WEIGHTS``. The background's colour is uniform. No two objects share
    both shape and colour, and no object has the background's colour.
    """
    if shapes is None:
        n = int(np.searchsorted(_N_CDF, rng.random(), side="right")) + 1
        shapes = [SHAPES[i] for i in np.searchsorted(_SHAPE_CDF, rng.random(n), side="right")]
    background = _colour(rng, np.ones(len(COLOURS)), set(colours or ()))
    short = min(width, height)
    objects: list[Shape] = []
    seen: set[tuple[str, str]] = set()
    for k, shape in enumerate(shapes):
        if colours is not None:
            colour = colours[k]
        else:
            taken = {c for s, c in seen if s == shape}
            colour = _colour(rng, COLOUR_WEIGHTS, {background} | taken)
        seen.add((shape, colour))
        size = sizes[rng.integers(len(sizes))]
        radius = float(rng.uniform(*RADIUS[size])) * short
        # A few tries for a spot that does not cover an earlier object; then take the last.
        for _ in range(20):
            x = float(rng.uniform(radius, width - radius))
            y = float(rng.uniform(radius, height - radius))
            if all(math.hypot(x - o.x, y - o.y) > 0.9 * (radius + o.radius) for o in objects):
                break
        angle = float(rng.uniform(-20, 20))
        if shape == "arrow":  # arrows point any of four ways
            angle += 90.0 * int(rng.integers(4))
        objects.append(Shape(shape, colour, size, x, y, radius, angle))
    return Scene(
        width=width,
        height=height,
        pattern=PATTERNS[rng.integers(len(PATTERNS))],
        background=background,
        objects=tuple(objects),
        variant=int(rng.integers(2)),
        period=float(rng.uniform(0.06, 0.14)),
    )
