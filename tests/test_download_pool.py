"""The whole download recipe on the served demo pool, on a real local Ray cluster.

Ground truth comes from the pool's manifest: each injected defect must end with
the decision curation exists to make, and every row must be accounted for.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import pyarrow.parquet as pq
import pytest

from curate.cli import main
from curate.demo import load_manifest

# defect → (the stage or filter that must drop it, the download status it must have)
DROPPED = {
    "broken_url": ("download", "http_404"),
    "server_error": ("download", "http_500"),
    "corrupt": ("download", "decode"),
    "html": ("download", "decode"),
    "tiny": ("image_size", "success"),
    "banner": ("aspect_ratio", "success"),
    "short_caption": ("caption_words", "success"),
    "boilerplate": ("caption_words", "success"),
    "non_english": ("language", "success"),
}
# Basic filtering cannot see these: CLIP scores and dedup can (later stages).
KEPT = ("clean", "mismatched", "long_caption", "exact_duplicate", "near_duplicate")


@pytest.fixture(scope="module")
def pool_run(served_pool, tmp_path_factory, ray_local):
    run = tmp_path_factory.mktemp("download_basic") / "run"
    code = main(
        [
            "run",
            "pipelines/download_basic.yaml",
            "--input",
            str(served_pool.urls_path),
            "--output",
            str(run),
            "--set",
            "download.allow_private_networks=true",
            "--quiet",
        ]
    )
    assert code == 0
    manifest = load_manifest(served_pool.pool_dir)
    ledger = {r["uid"]: r for r in pq.read_table(run / "ledger").to_pylist()}
    return manifest, ledger, run


def test_every_row_is_accounted_for(pool_run):
    manifest, ledger, run = pool_run
    assert set(ledger) == {row["uid"] for row in manifest["rows"]}
    for row in ledger.values():
        assert row["keep"] or row["dropped_by"]
    report = json.loads((run / "report.json").read_text())
    assert report["rows_in"] == len(manifest["rows"])
    assert report["rows_in"] == report["rows_out"] + sum(report["dropped"].values())
    shards = pq.read_table(run / "shards")
    assert sorted(shards["uid"].to_pylist()) == sorted(u for u, r in ledger.items() if r["keep"])


@pytest.mark.parametrize("defect", sorted(DROPPED))
def test_each_defect_is_dropped_by_the_filter_made_for_it(pool_run, defect):
    manifest, ledger, _ = pool_run
    rows = [ledger[r["uid"]] for r in manifest["rows"] if r["defect"] == defect]
    assert rows, f"the pool has no {defect} rows"
    reason, status = DROPPED[defect]
    decisions = Counter((r["dropped_by"], r["status"]) for r in rows)
    share = decisions[(reason, status)] / len(rows)
    assert share >= 0.95, f"{defect}: {dict(decisions)}"


def test_what_basic_filtering_cannot_see_is_kept(pool_run):
    manifest, ledger, _ = pool_run
    by_defect = defaultdict(list)
    for r in manifest["rows"]:
        by_defect[r["defect"] or "clean"].append(ledger[r["uid"]]["keep"])
    for defect in KEPT:
        kept = by_defect[defect]
        assert kept and sum(kept) / len(kept) >= 0.95, defect


def test_downloaded_sizes_are_the_images_real_sizes(pool_run):
    manifest, ledger, _ = pool_run
    for r in manifest["rows"]:
        row = ledger[r["uid"]]
        if row["status"] == "success":
            assert (row["original_width"], row["original_height"]) == (r["width"], r["height"])
            assert max(row["width"], row["height"]) <= 512  # keep_ratio_largest, 512


def test_the_report_shows_the_download_success_rate(pool_run):
    manifest, _, run = pool_run
    download = json.loads((run / "report.json").read_text())["download"]
    no_image = {"broken_url", "server_error", "corrupt", "html"}
    expected_failures = sum(1 for r in manifest["rows"] if r["defect"] in no_image)
    assert download["attempted"] == len(manifest["rows"])
    assert download["success"] == len(manifest["rows"]) - expected_failures
    assert "## Download" in (run / "report.md").read_text()
