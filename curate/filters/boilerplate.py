"""Drop alt-texts that describe nothing: file names, generic words, URLs, bare numbers.

Web alt-text is often filled in by a CMS or a camera rather than a person
("IMG_1234.jpg", "image", "click here", "https://…", "1920x1080"). Such
captions teach a CLIP model nothing about the image; ALIGN (Jia et al. 2021)
removes part of them through alt-text frequency, this filter removes them by
form. Every pattern but the file-extension one must match the *whole*
caption (ignoring case and surrounding whitespace), so a real sentence that
merely contains "photo" or "logo" is kept.

Patterns are RE2 (``pc.match_substring_regex``); ``\\s`` in RE2 is ASCII
only, so ``WS`` below spells out every code point ``str.isspace()`` accepts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from curate.core.operators import Filter, register_filter

#: Python's whitespace: ASCII \s, \v, the information separators, NEL and Unicode Z*.
WS = r"[\t\n\x0b\x0c\r \x1c-\x1f\x85\p{Z}]"
#: Punctuation and symbols that may surround a generic word ("Image:", "[logo]", "icon »").
EDGE = rf"(?:[\pP\pS]|{WS})*"
#: What may follow a camera prefix: "_1234", "-0042 (2)", "_20190512_123456".
NUMBERING = rf"(?:[\d_\-().]|{WS})"
IMAGE_EXTENSIONS = "jpe?g|jfif|png|gif|webp|bmp|tiff?|svg|heic|heif|avif|ico"
#: Lone words and phrases that name a placeholder, not a picture's content.
GENERIC = [
    "image", "images", "img", "photo", "photos", "picture", "pic", "pics", "untitled",
    "placeholder", "thumbnail", "thumb", "logo", "icon", "banner", "spacer", "null",
    "undefined", "none", "n/a", "blank", "default", "alt", "alt text", "no alt",
    "click here", "click", "read more", "more", "learn more", "see more", "download",
    "advertisement", "ad", "loading", "no image", "no image available", "image not available",
    "image not found", "no photo", "no photo available", "photo not available",
    "coming soon", "image coming soon", "featured image", "product image",
]  # fmt: skip


def _phrase(words: str) -> str:
    """A phrase with any run (or absence) of whitespace between its words."""
    return f"{WS}*".join(re.escape(w) for w in words.split())


#: (name, RE2 pattern) — a caption matching any of them is boilerplate.
PATTERNS: list[tuple[str, str]] = [
    # Anything ending in an image file extension: "IMG_1234.JPG", "hero banner.png".
    ("file_name", rf"\.(?:{IMAGE_EXTENSIONS}){WS}*$"),
    # Camera and screenshot names without extension: "DSC00042", "IMG_20190512_123456".
    (
        "camera_name",
        rf"^{WS}*(?:img|dsc[fn]?|dcim|pict?|pxl|mvimg|gopr|dji|screenshot|screen{WS}*shot)"
        rf"{NUMBERING}*\d{NUMBERING}*$",
    ),
    # A lone generic word or phrase, optionally numbered: "Image", "photo 3", "Click here!".
    ("generic", rf"^{EDGE}(?:{'|'.join(_phrase(g) for g in GENERIC)})(?:{EDGE}\d+)?{EDGE}$"),
    # A URL or a bare domain: "https://x.org/a.html", "www.shop.com", "example.co.uk/item".
    ("url", rf"^{WS}*(?:[a-z][a-z0-9+.\-]*://|www\.|data:)\S*{WS}*$"),
    ("domain", rf"^{WS}*(?:[a-z0-9\-]+\.)+[a-z]{{2,24}}(?:[/?#]\S*)?{WS}*$"),
    # Image dimensions: "1920x1080", "800 × 600 px".
    ("dimensions", rf"^{WS}*\d+{WS}*[x×]{WS}*\d+{WS}*(?:px|pixels)?{WS}*$"),
    # Only digits, punctuation, math/currency symbols and whitespace: "2019-05-12", "#1",
    # "$ 19.99", "" and "   ". Emoji (\p{So}) are not in the class.
    ("no_letters", rf"^(?:[\pN\pP\p{{Sm}}\p{{Sc}}\p{{Sk}}]|{WS})*$"),
]


def boilerplate_mask(captions: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """True where a caption matches any pattern (null for a null caption)."""
    hit = None
    for _, pattern in PATTERNS:
        match = pc.match_substring_regex(captions, pattern, ignore_case=True)
        hit = match if hit is None else pc.or_(hit, match)
    return hit


@register_filter("boilerplate")
@dataclass
class Boilerplate(Filter):
    """Keep captions that match none of ``PATTERNS``; a null caption drops."""

    needs = ("caption",)

    def keep(self, batch: pa.Table) -> pa.ChunkedArray | pa.Array:
        return pc.invert(boilerplate_mask(batch["caption"]))
