"""Pixels and bytes: a scene drawn with PIL, and the damaged files the web serves.

Every function here is a pure function of its arguments (random bytes come
from a seed passed in), so any process can produce any file of the pool and
two runs with the same seed write identical bytes.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw

from curate.demo.scene import Scene, Shape
from curate.demo.vocab import RGB

Point = tuple[float, float]


def _mix(a: tuple[int, ...], b: tuple[int, ...], t: float) -> tuple[int, ...]:
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b))


def _accent(rgb: tuple[int, ...]) -> tuple[int, ...]:
    """The second colour of a stripe, dot or gradient: lighter on dark colours, darker on light."""
    light = sum(rgb) / 3 > 170
    return _mix(rgb, (0, 0, 0) if light else (255, 255, 255), 0.3 if light else 0.4)


def _background(scene: Scene) -> Image.Image:
    w, h = scene.width, scene.height
    base, accent = RGB[scene.background], _accent(RGB[scene.background])
    if scene.pattern == "gradient":
        t = np.linspace(0.0, 1.0, w if scene.variant else h, dtype=np.float32)[:, None]
        ramp = np.asarray(base, np.float32) + t * np.subtract(accent, base)
        ramp = ramp.round().astype(np.uint8)
        pixels = np.broadcast_to(ramp[None] if scene.variant else ramp[:, None], (h, w, 3))
        return Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    image = Image.new("RGB", (w, h), base)
    draw = ImageDraw.Draw(image)
    step = max(4.0, scene.period * min(w, h))
    if scene.pattern == "striped":
        for k in range(int((w if scene.variant else h) / step) + 1):
            a, b = k * step, k * step + step / 2
            box = (a, 0, b, h) if scene.variant else (0, a, w, b)
            draw.rectangle(box, fill=accent)
    elif scene.pattern == "dotted":
        r = step * 0.2
        for i in range(int(w / step) + 1):
            for j in range(int(h / step) + 1):
                x, y = (i + 0.5) * step, (j + 0.5) * step
                draw.ellipse((x - r, y - r, x + r, y + r), fill=accent)
    return image


def _regular(n: int, radius: float, start: float = -90.0) -> list[Point]:
    return [
        (radius * math.cos(math.radians(start + 360 * k / n)),
         radius * math.sin(math.radians(start + 360 * k / n)))
        for k in range(n)
    ]  # fmt: skip


def _crescent(r: float) -> list[Point]:
    """A disc of radius r minus a disc of radius 0.85 r shifted right by 0.55 r."""
    r2, d = 0.85 * r, 0.55 * r
    x = (r * r - r2 * r2 + d * d) / (2 * d)  # where the two circles cross
    y = math.sqrt(r * r - x * x)
    outer_from = math.atan2(y, x)
    inner_from = math.atan2(y, x - d)
    outer = np.linspace(outer_from, 2 * math.pi - outer_from, 40)
    inner = np.linspace(2 * math.pi - inner_from, inner_from, 40)
    return [(r * math.cos(t), r * math.sin(t)) for t in outer] + [
        (d + r2 * math.cos(t), r2 * math.sin(t)) for t in inner
    ]


def _outline(shape: str, r: float) -> list[Point]:
    """The shape's polygon around (0, 0), unrotated, fitting in a disc of radius r."""
    if shape == "square":
        return [(-0.75 * r, -0.75 * r), (0.75 * r, -0.75 * r), (0.75 * r, 0.75 * r),
                (-0.75 * r, 0.75 * r)]  # fmt: skip
    if shape == "triangle":
        return _regular(3, r)
    if shape == "pentagon":
        return _regular(5, r)
    if shape == "hexagon":
        return _regular(6, r, start=0.0)
    if shape == "diamond":
        return [(0, -r), (0.6 * r, 0), (0, r), (-0.6 * r, 0)]
    if shape == "star":
        outer, inner = _regular(5, r), _regular(5, 0.42 * r, start=-54.0)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "cross":
        a, b = 0.3 * r, 0.9 * r
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b),
                (-a, a), (-b, a), (-b, -a), (-a, -a)]  # fmt: skip
    if shape == "arrow":
        return [(-r, -0.22 * r), (0.15 * r, -0.22 * r), (0.15 * r, -0.65 * r), (r, 0),
                (0.15 * r, 0.65 * r), (0.15 * r, 0.22 * r), (-r, 0.22 * r)]  # fmt: skip
    if shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 60, endpoint=False)
        s = r / 17
        return [(s * 16 * math.sin(t) ** 3,
                 -s * (13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t)
                       - math.cos(4 * t)) + 0.1 * r)
                for t in ts]  # fmt: skip
    if shape == "crescent":
        return _crescent(r)
    raise ValueError(f"no outline for shape {shape!r}")


def _draw_shape(draw: ImageDraw.ImageDraw, o: Shape) -> None:
    fill = RGB[o.colour]
    box = (o.x - o.radius, o.y - o.radius, o.x + o.radius, o.y + o.radius)
    if o.shape == "circle":
        draw.ellipse(box, fill=fill)
        return
    if o.shape == "ring":
        draw.ellipse(box, outline=fill, width=max(1, round(0.3 * o.radius)))
        return
    c, s = math.cos(math.radians(o.angle)), math.sin(math.radians(o.angle))
    points = [
        (o.x + c * px - s * py, o.y + s * px + c * py) for px, py in _outline(o.shape, o.radius)
    ]
    draw.polygon(points, fill=fill)


def render(scene: Scene) -> Image.Image:
    """The scene's pixels: background, then each object in order."""
    image = _background(scene)
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        _draw_shape(draw, o)
    return image


def jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def thumbnail(image: Image.Image, short: int) -> Image.Image:
    """``image`` scaled down (box filter, as a CMS's thumbnailer) to a shorter side of ``short``."""
    w, h = image.size
    scale = short / min(w, h)
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX)


def near_duplicate(
    source: bytes, edit: str, amount: float, quality: int
) -> tuple[bytes, tuple[int, int]]:
    """``source`` (JPEG bytes) decoded, edited a little and re-encoded at ``quality``.

    ``edit`` is "reencode" (only the quality changes), "resize" (both sides
    times ``amount``) or "crop" (a border of ``amount`` of each side removed),
    the everyday ways one picture reaches the web twice. Returns the bytes and
    their (width, height).
    """
    image = Image.open(io.BytesIO(source)).convert("RGB")
    w, h = image.size
    if edit == "resize":
        image = image.resize((round(w * amount), round(h * amount)), Image.Resampling.BILINEAR)
    elif edit == "crop":
        dx, dy = round(w * amount), round(h * amount)
        image = image.crop((dx, dy, w - dx, h - dy))
    elif edit != "reencode":
        raise ValueError(f"unknown near-duplicate edit {edit!r}")
    return jpeg(image, quality), image.size


def truncated(source: bytes, fraction: float) -> bytes:
    """The first part of a JPEG, cut before its scan data: no decoder can show any pixel.

    Cutting inside the scan would leave a file that OpenCV (img2dataset's
    decoder) still decodes into a half-grey image; cutting before the
    start-of-scan marker makes every decoder fail, as "corrupt" promises.
    """
    scan = source.index(b"\xff\xda")
    return source[: max(4, int(scan * fraction))]


def random_bytes(seed: int, n: int) -> bytes:
    """``n`` bytes of noise that no sniffer takes for an image or a page (first byte 0x00)."""
    noise = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    return b"\x00" + noise[1:]
