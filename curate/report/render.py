"""The report's sections rendered twice: Markdown (figures linked) and one HTML page.

``curate.report.build`` describes the report once, as a list of ``Section`` (a title,
a paragraph, a table, a figure); this module only renders. The HTML page is
self-contained so it can be mailed or archived alone: figures inlined as
base64 ``data:`` URIs, plain CSS, no script, no external resource, and a
Content-Security-Policy that forbids loading anything else. Every piece of text
(captions, uids, error messages, names) is cleaned of control characters
(``clean_text``) and escaped with ``html.escape`` here, at the last moment, so
no caller can forget.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field

from curate.report.data import clean_text

CELL_LIMIT = 300


@dataclass
class Table:
    header: list[str]
    rows: list[list[object]]
    right: set[int] = field(default_factory=set)  # right-aligned (numeric) columns
    total: bool = False  # the last row is a total: bold


@dataclass
class Section:
    title: str
    level: int = 2
    text: str = ""
    table: Table | None = None
    figure: str | None = None  # a PNG's file name in the report's figure folder


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return clean_text(value, CELL_LIMIT)


# --- Markdown ------------------------------------------------------------------------------


def markdown_table(table: Table) -> str:
    """A Markdown table; cells cleaned, HTML-escaped (renderers pass raw HTML) and ``|``-safe."""

    def cell(value: object, bold: bool) -> str:
        text = html.escape(_cell(value), quote=False).replace("|", "\\|")
        return f"**{text}**" if bold and text else text

    rule = ["---:" if i in table.right else "---" for i in range(len(table.header))]
    lines = [
        "| " + " | ".join(cell(h, False) for h in table.header) + " |",
        "| " + " | ".join(rule) + " |",
    ]
    for n, row in enumerate(table.rows):
        bold = table.total and n == len(table.rows) - 1
        lines.append("| " + " | ".join(cell(v, bold) for v in row) + " |")
    return "\n".join(lines)


def render_markdown(title: str, sections: list[Section], figure_dir: str) -> str:
    """The report as Markdown; figures are links to ``figure_dir/NAME`` (relative)."""
    out = [f"# {clean_text(title, CELL_LIMIT)}", ""]
    for s in sections:
        out += ["#" * s.level + " " + clean_text(s.title, CELL_LIMIT), ""]
        if s.text:
            out += [html.escape(s.text, quote=False), ""]
        if s.figure:
            out += [f"![{html.escape(clean_text(s.title, 80))}]({figure_dir}/{s.figure})", ""]
        if s.table:
            out += [markdown_table(s.table), ""]
    return "\n".join(out)


# --- HTML ----------------------------------------------------------------------------------

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
h3 { margin-top: 1.5em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 12px; }
th, td { border: 1px solid #ddd; padding: 2px 6px; vertical-align: top; text-align: left; }
th { background: #f4f4f4; } td.r, th.r { text-align: right; }
tr.total td { font-weight: bold; }
td { max-width: 480px; overflow-wrap: anywhere; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
"""
#: Nothing but inline style and data: images, whatever a caption manages to smuggle in.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _text(value: object) -> str:
    return html.escape(_cell(value))


def html_table(table: Table) -> str:
    def row(values: list[object], tag: str, css: str = "") -> str:
        align = [' class="r"' if i in table.right else "" for i in range(len(values))]
        cells = "".join(f"<{tag}{a}>{_text(v)}</{tag}>" for a, v in zip(align, values))
        return f"<tr{css}>{cells}</tr>"

    body = [
        row(r, "td", ' class="total"' if table.total and n == len(table.rows) - 1 else "")
        for n, r in enumerate(table.rows)
    ]
    return f"<table><thead>{row(table.header, 'th')}</thead><tbody>{''.join(body)}</tbody></table>"


def render_html(title: str, sections: list[Section], figures: dict[str, bytes]) -> str:
    """One self-contained page; ``figures`` maps each section's figure name to PNG bytes."""
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        f"<title>{_text(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_text(title)}</h1>",
    ]
    for s in sections:
        out.append(f"<h{s.level}>{_text(s.title)}</h{s.level}>")
        if s.text:
            out.append(f"<p>{html.escape(s.text)}</p>")
        if s.figure:
            data = base64.b64encode(figures[s.figure]).decode("ascii")
            out.append(f'<img alt="{_text(s.title)}" src="data:image/png;base64,{data}">')
        if s.table:
            out.append(html_table(s.table))
    out.append("</body></html>\n")
    return "\n".join(out)
