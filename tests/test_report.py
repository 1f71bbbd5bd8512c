"""The run report: report.md + PNGs and a self-contained report.html, on real runs.

One downloaded, filtered, CLIP-scored (a seeded random curate-tiny), deduplicated,
balanced and sharded run of the demo pool, made once per session and shared with
test_notebook.py, plus small metadata-only runs (no images/) with hostile captions,
scores that are NaN, null or infinite, and nothing kept or nothing dropped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.cli import main
from curate.core.layout import IMAGES
from curate.core.recipe import recipe_from_data
from curate.io.images import image_shards
from curate.report.build import write_report
from curate.report.data import (
    clean_text,
    concept_counts,
    dup_groups,
    read_images,
    score_histogram,
)
from curate.report.plots import (
    clip_score_figure,
    concept_figure,
    dedup_figure,
    image_grid,
    png_bytes,
    thumbnail,
)
from curate.runner import run_recipe

STAGES = [
    {"stage": "ingest"},
    {"stage": "download", "allow_private_networks": True, "image_size": 128},
    {"stage": "filter", "filters": "datacomp_basic"},
    {"stage": "clip", "model": "curate-tiny", "pretrained": "random", "batch_size": 32},
    {"stage": "dedup_exact"},
    {"stage": "filter", "name": "score_filter", "filters": [{"clip_score": {"min": 0.0}}]},
    {"stage": "balance", "concepts": "demo", "t": 20},
    {"stage": "shard"},
]
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
_RUNS: dict[str, tuple[Path, dict]] = {}


def demo_run(served_pool, tmp_path_factory) -> tuple[Path, dict]:
    """(run folder, report) of every kind of stage on the demo pool, made once per session.

    Download → DataComp basic → clip (seeded random curate-tiny) → exact dedup →
    score filter → balance → shard. tests/test_notebook.py opens the same run: module
    fixtures are not shared between test modules, this memo is.
    """
    if "demo" not in _RUNS:
        run = tmp_path_factory.mktemp("report") / "run"
        recipe = recipe_from_data({"name": "report_test", "stages": STAGES}, {}, "inline")
        result = run_recipe(recipe, served_pool.urls_path, run, engine="local")
        _RUNS["demo"] = run, write_report(recipe, result)
    return _RUNS["demo"]


@pytest.fixture
def full_run(served_pool, tmp_path_factory) -> tuple[Path, dict]:
    return demo_run(served_pool, tmp_path_factory)


def ledger_sql(run: Path, query: str) -> list[tuple]:
    """``query`` over the run's ledger (as the view ``ledger``)."""
    con = duckdb.connect()
    con.execute(f"CREATE VIEW ledger AS SELECT * FROM read_parquet('{run}/ledger/*.parquet')")
    return con.execute(query).fetchall()


def inline_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in DATA_URI.findall(page)]


def check_page(run: Path, report: dict) -> str:
    """What every report.html must be: self-contained, every figure inline, every drop there."""
    page = (run / "report.html").read_text(encoding="utf-8")
    md = (run / "report.md").read_text(encoding="utf-8")
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert page.count("src=") == len(DATA_URI.findall(page))  # every image inline
    assert "url(" not in page and "href=" not in page
    files = sorted((run / "report").glob("*.png"))
    assert sorted(inline_pngs(page)) == sorted(f.read_bytes() for f in files)
    for f in files:
        assert f"](report/{f.name})" in md
        with Image.open(f) as image:
            image.verify()
    row = '<tr><td>{}</td><td class="r">{:,}</td>'
    for reason, n in report["dropped"].items():
        assert row.format(reason, n) in page, reason
    total = '<tr class="total"><td>rows out</td><td class="r"></td><td class="r">{:,}</td>'
    assert total.format(report["rows_out"]) in page
    return page


# --- a full run ----------------------------------------------------------------------------


def test_the_report_of_a_full_run(full_run):
    run, report = full_run
    page = check_page(run, report)
    assert {"rows_in", "rows_out", "dropped", "funnel", "download", "stages"} <= set(report)
    assert report["dropped"]["clip_score"] > 0 and report["dropped"]["dedup_exact"] > 0
    names = {f.name for f in (run / "report").glob("*.png")}
    assert {"funnel.png", "score_clip_score.png", "concepts.png", "duplicates.png"} <= names
    assert "examples_00_kept.png" in names
    reasons = [r for r, n in report["dropped"].items() if n]
    assert len([n for n in names if n.startswith("examples_")]) == 1 + len(reasons)
    for title in ("Score: clip_score", "Concept balancing", "Duplicates", "rows/s"):
        assert title in page
    # Each reason's examples: its heading, then the captions of its first rows by uid.
    query = "SELECT caption FROM ledger WHERE dropped_by = '{}' ORDER BY uid LIMIT 6"
    for reason in reasons:
        heading = f"<h3>dropped by {reason} ({report['dropped'][reason]:,} rows)</h3>"
        section = page.split(heading)[1].split("<h3>")[0]
        first = ledger_sql(run, query.format(reason))
        assert all(html.escape(clean_text(c, 300)) in section for (c,) in first if c), reason
        assert section.count("<tr>") == 1 + len(first)  # the header row and one per example
    # Per-stage throughput: the rows each stage handled over its seconds.
    clip = next(s for s in report["stages"] if s["kind"] == "clip")
    rate = f"{max(clip['rows_in'], clip['rows_out']) / clip['seconds']:,.0f}"
    assert f'<td class="r">{clip["seconds"]:.2f}</td><td class="r">{rate}</td>' in page


def test_the_score_histogram_counts_every_scored_row(full_run):
    run, _ = full_run
    hist = score_histogram(run)
    ((scored, kept),) = ledger_sql(
        run, "SELECT count(*), count(*) FILTER (WHERE keep) FROM ledger WHERE isfinite(clip_score)"
    )
    assert scored > 300
    assert hist.rows == scored and int(hist.kept.sum()) == kept
    assert len(hist.edges) == len(hist.kept) + 1 == len(hist.dropped) + 1
    ((lo, hi),) = ledger_sql(run, "SELECT min(clip_score), max(clip_score) FROM ledger")
    assert hist.edges[0] == pytest.approx(lo) and hist.edges[-1] == pytest.approx(hi)
    # The score filter keeps scores >= 0: no kept row in a bin wholly below 0.
    assert hist.edges[0] < 0 < hist.edges[-1]
    assert all(k == 0 for k, right in zip(hist.kept, hist.edges[1:]) if right < 0)
    fig = clip_score_figure(run)
    drawn = [p.get_data().values for p in fig.axes[0].patches]  # the kept and dropped stairs
    assert sorted(v.sum() for v in drawn) == sorted([kept, scored - kept])
    assert clip_score_figure(run, "no_such_column") is None


def test_concept_counts_are_the_balance_stage_s(full_run):
    run, _ = full_run
    counts = concept_counts(run, top=5)
    table = pyarrow.csv.read_csv(next(run.glob("stages/*_balance/concept_counts.csv")))
    rows = sorted(table.to_pylist(), key=lambda r: (-r["matches"], r["concept"]))[:5]
    assert counts.names == [r["concept"] for r in rows]
    assert counts.before.tolist() == [r["matches"] for r in rows]
    assert counts.after.tolist() == [r["kept"] for r in rows]
    assert counts.t == 20 and (counts.after <= counts.before).all()
    assert concept_figure(run) is not None


def test_duplicate_groups_show_kept_members_first(full_run):
    run, _ = full_run
    groups = dup_groups(run)
    assert groups
    for group in groups:
        assert len({r["dup_group"] for r in group}) == 1 and len(group) >= 2
        # One survivor (a later filter may still drop it), the others dropped by the dedup.
        assert sum(r["dropped_by"] != "dedup_exact" for r in group) == 1
        assert [r["keep"] for r in group] == sorted((r["keep"] for r in group), reverse=True)
    ((n_groups,),) = ledger_sql(run, "SELECT count(DISTINCT dup_group) FROM ledger")
    assert f"{n_groups:,} groups of duplicates" in (run / "report.html").read_text()
    assert dedup_figure(run) is not None


def test_read_images_returns_the_downloaded_bytes_by_uid(full_run):
    run, _ = full_run
    query = "SELECT uid FROM ledger WHERE status {} 'success' ORDER BY uid LIMIT 5"
    ok = [u for (u,) in ledger_sql(run, query.format("="))]
    failed = [u for (u,) in ledger_sql(run, query.format("<>"))]
    images = read_images(run, ok + failed + ["f" * 32])
    assert sorted(images) == sorted(ok)
    stored = pa.concat_tables(
        pq.read_table(f, columns=["uid", "jpg"]) for f in image_shards(run / IMAGES)
    )
    jpg = dict(zip(stored["uid"].to_pylist(), stored["jpg"].to_pylist()))
    assert all(images[u] == jpg[u] for u in ok)
    assert all(thumbnail(images[u]).size[0] <= 160 for u in ok)


def test_curate_report_writes_the_same_report_again(full_run, tmp_path, capsys):
    run, report = full_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    for name in ("report.json", "report.md", "report.html"):
        (copy / name).unlink()
    shutil.rmtree(copy / "report")
    assert main(["report", str(copy)]) == 0
    again = json.loads((copy / "report.json").read_text())
    assert {k: again[k] for k in ("rows_in", "rows_out", "dropped", "funnel", "download")} == {
        k: report[k] for k in ("rows_in", "rows_out", "dropped", "funnel", "download")
    }
    assert [s["name"] for s in again["stages"]] == [s["name"] for s in report["stages"]]
    assert [s["seconds"] for s in again["stages"]] == pytest.approx(
        [s["seconds"] for s in report["stages"]], abs=1e-3
    )
    assert sorted(p.name for p in (copy / "report").glob("*.png")) == sorted(
        p.name for p in (run / "report").glob("*.png")
    )
    check_page(copy, again)
    assert f"| {report['rows_out']:,}" in capsys.readouterr().out.replace("**", "")
    assert main(["report", str(tmp_path / "nothing")]) == 2


# --- images that cannot be shown -----------------------------------------------------------


def jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


def bomb_png() -> bytes:
    """A valid PNG header declaring 40000 x 40000 pixels (1.6 GP), and no pixels."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = (40_000).to_bytes(4, "big") * 2  # IHDR width, height
    return bytes(data)


def test_thumbnails_and_grids_survive_any_bytes():
    big = jpeg(4000, 3000)
    bad = {
        "empty": b"",
        "html": b"<!doctype html><html>not an image</html>",
        "noise": bytes(range(256)) * 8,
        "truncated": big[: len(big) // 3],
        "bomb": bomb_png(),
    }
    for name, data in bad.items():
        assert thumbnail(data) is None, name
    small = thumbnail(big)
    assert small.size == (160, 120) and small.mode == "RGB"
    rows = [{"uid": name, "caption": f"{name} <b>$x$</b>\x00"} for name in [*bad, "big", "gone"]]
    rows.insert(2, None)
    fig = image_grid(rows, {**bad, "big": big}, columns=4, title="hostile $bytes$")
    with Image.open(io.BytesIO(png_bytes(fig))) as image:
        assert image.size[0] == 4 * 168 and image.format == "PNG"


def test_clean_text_shows_what_a_caption_hides():
    assert clean_text("a\nb\x07c\u202ed\ufffd") == "a\\nb\\x07c\\u202ed\ufffd"
    assert clean_text("x" * 500, 10) == "x" * 9 + "…"
    assert clean_text(None) == "None"


# --- runs without images -------------------------------------------------------------------

HOSTILE = "<script>alert(1)</script> a dog & a cat | on a beach\x07\u202egnp.exe\ufffd"


def metadata_pool(folder: Path) -> Path:
    """Six rows, no images: a hostile caption, a null one, a 100 kB one; scores of every kind."""
    captions = [HOSTILE, "a red car", None, "y" * 100_000, "$x^2$ and {braces}", "two dogs"]
    scores = [0.31, float("nan"), None, float("inf"), 0.12, -0.05]
    path = folder / "pool.parquet"
    pq.write_table(
        pa.table({
            "url": [f"http://127.0.0.1:1/{i}.jpg" for i in range(6)],
            "caption": captions,
            "original_width": [300, 300, 300, 300, 100, 300],
            "original_height": [300] * 6,
            "clip_score": pa.array(scores, pa.float32()),
        }),
        path,
    )  # fmt: skip
    return path


def metadata_run(tmp_path: Path, filters: list[dict] | None) -> tuple[Path, dict]:
    stages = [{"stage": "ingest"}]
    if filters is not None:
        stages.append({"stage": "filter", "filters": filters})
    recipe = recipe_from_data({"name": "metadata", "stages": stages}, {}, "inline")
    result = run_recipe(recipe, metadata_pool(tmp_path), tmp_path / "run", engine="local")
    return tmp_path / "run", write_report(recipe, result)


def test_a_metadata_run_with_hostile_captions(tmp_path):
    run, report = metadata_run(tmp_path, [{"caption_valid": {}}, {"image_size": {"min_side": 200}}])
    assert report["download"] is None and not (run / IMAGES).exists()
    assert report["dropped"] == {"caption_valid": 1, "image_size": 1} and report["rows_out"] == 4
    page = check_page(run, report)
    assert (
        "&lt;script&gt;alert(1)&lt;/script&gt; a dog &amp; a cat | on a beach\\x07\\u202egnp"
        in page
    )
    assert "\x07" not in page and "\u202e" not in page and "\ufffd" in page
    assert "y" * 301 not in page and "y" * 299 + "…" in page  # cut at 300 characters
    md = (run / "report.md").read_text(encoding="utf-8")
    assert "<script" not in md and "\\| on a beach" in md
    # Scores: 0.31, 0.12 and -0.05 are finite; NaN, null and inf are not counted.
    hist = score_histogram(run)
    assert hist.rows == 3 and int(hist.kept.sum()) == 2 and int(hist.dropped.sum()) == 1
    assert "3 rows have a score: 2 kept, 1 dropped" in page
    assert read_images(run, [HOSTILE]) == {}
    assert "Concept balancing" not in page and "Duplicates" not in page


def test_a_broken_run_folder_is_a_clear_error(tmp_path, capsys):
    """A ledger file cut short or a recipe.yaml that is not a run's: status 2 and the file
    named, from `curate report` and `curate inspect`, never a DuckDB or YAML traceback."""
    run, _ = metadata_run(tmp_path, [{"caption_words": {}}])
    (run / "recipe.yaml").write_text("stages: [\n")
    assert main(["report", str(run)]) == 2
    assert "recipe.yaml: not the YAML a run writes" in capsys.readouterr().err
    (run / "recipe.yaml").write_bytes(b"\xff\xfe- a")
    assert main(["report", str(run)]) == 2
    assert "recipe.yaml: not the YAML a run writes" in capsys.readouterr().err
    (ledger,) = (run / "ledger").glob("*.parquet")
    ledger.write_bytes(ledger.read_bytes()[:100])
    for command in ("report", "inspect"):
        assert main([command, str(run)]) == 2
        assert f"{ledger}: not a readable Parquet file" in capsys.readouterr().err
    ledger.unlink()
    assert main(["inspect", str(run)]) == 2
    assert "holds no Parquet file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "filters, kept",
    [(None, 6), ([{"image_size": {"min_side": 10_000}}], 0)],
    ids=["nothing-dropped", "nothing-kept"],
)
def test_runs_that_keep_everything_or_nothing(tmp_path, filters, kept):
    run, report = metadata_run(tmp_path, filters)
    assert report["rows_out"] == kept and report["rows_in"] == 6
    page = check_page(run, report)
    shown = sorted(p.name for p in (run / "report").glob("examples_*.png"))
    assert shown == (["examples_00_kept.png"] if kept else ["examples_01_image_size.png"])
    hist = score_histogram(run)
    assert (int(hist.kept.sum()), int(hist.dropped.sum())) == ((3, 0) if kept else (0, 3))
    assert "Score: clip_score" in page


def score_run(folder: Path, scores: list) -> Path:
    """An ingest-only run of a pool with a ``clip_score`` column (reported)."""
    folder.mkdir()
    n = len(scores)
    pq.write_table(
        pa.table({
            "url": [f"http://127.0.0.1:1/{i}.jpg" for i in range(n)],
            "caption": [f"caption {i}" for i in range(n)],
            "clip_score": pa.array(scores, pa.float32()),
        }),
        folder / "pool.parquet",
    )  # fmt: skip
    recipe = recipe_from_data({"name": "scores", "stages": [{"stage": "ingest"}]}, {}, "inline")
    write_report(recipe, run_recipe(recipe, folder / "pool.parquet", folder / "run", "local"))
    return folder / "run"


def test_a_score_column_with_one_value_or_none(tmp_path):
    one = score_run(tmp_path / "one", [0.5, 0.5, None])
    hist = score_histogram(one)
    assert hist.rows == 2 and hist.kept.tolist() == [2] and hist.edges[0] < 0.5 < hist.edges[1]
    none = score_run(tmp_path / "none", [None, float("nan"), float("-inf")])
    assert score_histogram(none) is None and clip_score_figure(none) is None
    assert "Score:" not in (none / "report.html").read_text()
