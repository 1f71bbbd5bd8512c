"""The report's figures, as matplotlib ``Figure`` objects usable from a notebook too.

Figures are built with ``matplotlib.figure.Figure`` directly, never ``pyplot``:
no global state, no interactive backend, safe in worker threads and in library
code (``savefig`` picks the Agg canvas for PNG by itself). In a notebook a
returned Figure displays as itself.

Captions and image bytes come from the web and are hostile: text is cleaned
(``clean_text``: control characters escaped, length bounded; in chart labels
``$`` is escaped so matplotlib never parses mathtext) and thumbnails are decoded
defensively (``thumbnail``: header checked first, JPEG draft decoding, any
failure gives a placeholder tile instead of an exception).
"""

from __future__ import annotations

import io
import textwrap
import warnings
from functools import lru_cache
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from curate.io.image_guard import DEFAULT_MAX_PIXELS, image_problem
from curate.report.data import (
    ScoreHistogram,
    clean_text,
    concept_counts,
    dup_groups,
    read_images,
    score_histogram,
)

#: Thumbnail side in pixels; grid cells are this many pixels wide at DPI.
THUMB = 160
DPI = 80
KEPT, DROPPED = "#2a7ab9", "#d9622b"


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes (glyphs missing from the font draw as boxes, silently)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Glyph … missing from font(s)"
        fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _mpl(text: str) -> str:
    """Text that matplotlib draws literally: ``$`` would start mathtext."""
    return text.replace("$", r"\$")


# --- images --------------------------------------------------------------------------------


def thumbnail(data: bytes | None, size: int = THUMB) -> Image.Image | None:
    """An RGB image at most ``size`` pixels a side, or None when the bytes cannot be shown.

    The header is checked before decoding (empty bodies, HTML, decompression
    bombs: ``curate.io.image_guard``); JPEGs decode at a reduced scale (``draft``).
    """
    if not data or image_problem(data, DEFAULT_MAX_PIXELS):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF, palette and bomb chatter
            with Image.open(io.BytesIO(data)) as image:
                image.draft("RGB", (size, size))
                image.thumbnail((size, size))
                return image.convert("RGB")
    except Exception:  # truncated or corrupt bytes: Pillow raises many kinds
        return None


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.FreeTypeFont:
    """DejaVu Sans, which matplotlib ships: the charts' face, and no system font needed."""
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    return ImageFont.truetype(str(path), size)


def _fit(text: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    """``text`` cut (with "…") to at most ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _tile_label(row: dict) -> str:
    """The decision and score when the row has them, then the uid (cut first when too long)."""
    parts = []
    if "dropped_by" in row:
        parts.append("kept" if row["dropped_by"] is None else f"dropped: {row['dropped_by']}")
    if row.get("clip_score") is not None:
        parts.append(f"score {row['clip_score']:.3f}")
    parts.append(str(row.get("uid") or "")[:8])
    return clean_text(" · ".join(parts), 80)


def _caption_lines(caption: object, font: ImageFont.FreeTypeFont, lines: int = 3) -> str:
    if caption is None:
        return "(no caption)"
    text = clean_text(caption, 40 * lines)
    wrapped = textwrap.wrap(text, 27, break_long_words=True, max_lines=lines, placeholder=" …")
    return "\n".join(_fit(line, font, THUMB) for line in wrapped)


def image_grid(
    rows: list[dict | None],
    images: dict[str, bytes],
    columns: int = 6,
    title: str | None = None,
) -> Figure:
    """Thumbnails with their captions, ``columns`` per line, in the order of ``rows``.

    A row is a dict with ``uid`` and ``caption`` (and, when present, ``dropped_by``
    and ``clip_score``, shown above the image); ``images`` maps uids to image bytes
    (``curate.report.data.read_images``). A uid without bytes shows a "no image"
    tile, bytes that do not decode an "unreadable image" tile; a None row leaves
    its cell empty (to start a new line of the grid).

    The grid is drawn with Pillow into one canvas, shown at one pixel per pixel:
    a matplotlib Axes or Text per tile cost seconds per report.
    """
    columns = max(1, min(columns, len(rows) or 1))
    lines = max(1, -(-len(rows) // columns))
    cell_w, cell_h, head = THUMB + 8, THUMB + 58, 22 if title else 4
    canvas = Image.new("RGB", (columns * cell_w, head + lines * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    small, font = _font(9), _font(10)
    if title:
        draw.text(
            (4, 3), _fit(clean_text(title, 120), _font(13), canvas.width - 8), "black", _font(13)
        )
    for i, row in enumerate(rows):
        if row is None:
            continue
        x, y = 4 + (i % columns) * cell_w, head + (i // columns) * cell_h
        draw.text((x, y), _fit(_tile_label(row), small, THUMB), "#555555", small)
        top = y + 13
        data = images.get(row.get("uid"))
        tile = thumbnail(data)
        if tile is None:
            draw.rectangle((x, top, x + THUMB - 1, top + THUMB - 1), fill=(235, 235, 235))
            note = "no image" if data is None else "unreadable image"
            draw.text((x + THUMB // 2, top + THUMB // 2), note, "#666666", font, anchor="mm")
        else:
            canvas.paste(tile, (x + (THUMB - tile.width) // 2, top + (THUMB - tile.height) // 2))
        draw.multiline_text(
            (x, top + THUMB + 3), _caption_lines(row.get("caption"), font), "black", font, spacing=2
        )
    fig = Figure(figsize=(canvas.width / DPI, canvas.height / DPI), dpi=DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.imshow(np.asarray(canvas), interpolation="none")
    return fig


def groups_grid(groups: list[list[dict]], images: dict[str, bytes]) -> Figure:
    """``image_grid`` with one line per group of rows (``curate.report.data.dup_groups``)."""
    width = max(len(g) for g in groups)
    rows = [r for g in groups for r in [*g, *[None] * (width - len(g))]]
    return image_grid(rows, images, columns=width, title="duplicate groups, one per line")


def dedup_figure(run_dir: Path, groups: int = 4, members: int = 6) -> Figure | None:
    """A run's largest duplicate groups, one line each, kept members first (None: no groups)."""
    found = dup_groups(run_dir, groups, members)
    if not found:
        return None
    return groups_grid(found, read_images(run_dir, [r["uid"] for g in found for r in g]))


# --- charts --------------------------------------------------------------------------------


def funnel_figure(summary: dict) -> Figure:
    """Rows remaining after each step (``curate.report.build.funnel``), drops marked beside."""
    steps = summary["funnel"]
    labels = ["rows in", *(s["step"] for s in steps), "rows out"]
    remaining = [summary["rows_in"], *(s["remaining"] for s in steps), summary["rows_out"]]
    dropped = [0, *(s["dropped"] for s in steps), 0]
    fig = Figure(figsize=(8, 0.32 * len(labels) + 1.0))
    ax = fig.add_axes((0.22, 0.6 / fig.get_figheight(), 0.6, 1 - 0.9 / fig.get_figheight()))
    y = np.arange(len(labels))
    ax.barh(y, remaining, color=KEPT, label="remaining")
    ax.barh(y, dropped, left=remaining, color=DROPPED, alpha=0.6, label="dropped here")
    top = max(summary["rows_in"], 1)
    for yi, rest, gone in zip(y, remaining, dropped):
        note = f"{rest:,}" + (f"  (−{gone:,})" if gone else "")
        ax.text(rest + gone + top * 0.01, yi, note, va="center", fontsize=8)
    ax.set_yticks(y, [_mpl(clean_text(label, 40)) for label in labels], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, top * 1.05)
    ax.set_xlabel("rows")
    ax.legend(fontsize=8, loc="lower right", frameon=False)
    ax.set_title("funnel: rows remaining after each filter or stage", fontsize=10)
    return fig


def score_figure(hist: ScoreHistogram) -> Figure:
    """A score histogram (``curate.report.data.score_histogram``), kept and dropped overlaid."""
    fig = Figure(figsize=(7, 3.4))
    ax = fig.add_axes((0.1, 0.15, 0.87, 0.75))
    for counts, alpha, color, label in (
        (hist.dropped, 0.45, DROPPED, "dropped"),
        (hist.kept, 0.6, KEPT, "kept"),
    ):
        label = f"{label} ({int(counts.sum()):,})"
        ax.stairs(counts, hist.edges, fill=True, alpha=alpha, color=color, label=label)
    ax.set_xlabel(hist.column)
    ax.set_ylabel("rows")
    ax.legend(fontsize=8, frameon=False)
    ax.set_title(f"{hist.column} of the {hist.rows:,} rows with a score", fontsize=10)
    return fig


def clip_score_figure(run_dir: Path, column: str = "clip_score") -> Figure | None:
    """The histogram of ``column`` in a run's ledger, kept vs dropped (None: no scores)."""
    hist = score_histogram(run_dir, column)
    return score_figure(hist) if hist is not None else None


def concept_figure(run_dir: Path, top: int = 30) -> Figure | None:
    """Rows matching each of the ``top`` concepts before and after balancing, with the cap t.

    None when the run has no balance stage.
    """
    counts = concept_counts(run_dir, top)
    if counts is None:
        return None
    n = max(len(counts.names), 1)
    fig = Figure(figsize=(7, 0.22 * n + 1.2))
    ax = fig.add_axes((0.25, 0.7 / fig.get_figheight(), 0.7, 1 - 1.1 / fig.get_figheight()))
    y = np.arange(len(counts.names))
    ax.barh(y - 0.2, counts.before, height=0.4, color=DROPPED, alpha=0.6, label="before")
    ax.barh(y + 0.2, counts.after, height=0.4, color=KEPT, label="after")
    if counts.t is not None:
        ax.axvline(
            counts.t, color="#444444", linestyle="--", linewidth=1, label=f"t = {counts.t:,}"
        )
    ax.set_yticks(y, [_mpl(clean_text(c, 30)) for c in counts.names], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("rows matching the concept")
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    ax.set_title(
        f"balance ({counts.stage}): top {len(counts.names)} of {counts.matched:,} matched "
        f"concepts ({counts.concepts:,} listed)",
        fontsize=10,
    )
    return fig
