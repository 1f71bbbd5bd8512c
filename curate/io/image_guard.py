"""Checks on downloaded bytes before img2dataset's resizer decodes them.

img2dataset decodes with OpenCV, which happily allocates gigabytes for a small
PNG that declares 30000 × 30000 pixels (a decompression bomb), and reports HTML
pages and empty bodies as a bare "Image decoding error". Reading only the header
with Pillow is cheap and gives each of these a drop reason of its own
(``curate.download.crawler.CheckedResizer`` asks before decoding). What passes
is decoded by img2dataset unchanged (OpenCV handles CMYK, 16-bit, alpha, palette
and animated images: the first frame, alpha matted on white).
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

#: Pillow's own decompression-bomb threshold (about 89.5 megapixels).
DEFAULT_MAX_PIXELS = 89_478_485

_HTML_STARTS = (b"<!doctype", b"<html", b"<?xml", b"<head", b"<body", b"<!--")


def image_problem(data: bytes, max_pixels: int) -> str | None:
    """Why ``data`` must not be decoded (None: go ahead), from its first bytes and header."""
    if not data:
        return "decode: empty body (0 bytes)"
    head = data[:256].lstrip().lower()
    if head.startswith(_HTML_STARTS):
        return "decode: an HTML page, not an image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
    except Image.DecompressionBombError:
        return "too large: declared size beyond Pillow's decompression-bomb limit"
    except UnidentifiedImageError:
        return "decode: not a recognised image format"
    except Exception as exc:  # a broken header: Pillow raises many kinds
        return f"decode: {type(exc).__name__}: {exc}"
    if width * height > max_pixels:
        return f"too large: declared size {width}x{height} exceeds {max_pixels} pixels"
    return None
