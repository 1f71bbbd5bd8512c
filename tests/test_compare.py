"""`curate compare` on two real runs of the demo pool: no filter, and English captions of 4+ words.

The pool is downloaded once at 64 px (module fixture); each run copies that
folder and adds its own stages, so the download is found done and skipped. The
budget is tiny (512 samples, batch 32): these tests check the plumbing and the
table, not which run wins.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curate.cli import main
from curate.core.config import ConfigError
from curate.core.recipe import recipe_from_data
from curate.runner import run_recipe
from curate.train.compare import compare
from curate.train.trainer import TrainConfig

DOWNLOAD = {"stage": "download", "allow_private_networks": True, "image_size": 64}
SHARD = {"stage": "shard", "rows_per_shard": 200}
FILTER = {
    "stage": "filter",
    "filters": [
        {"caption_valid": {}},
        {"caption_words": {"min_words": 4}},
        {"language": {"languages": ["en"], "min_score": 0.5}},
    ],
}
CONFIG = TrainConfig(samples_seen=512, batch_size=32, warmup=4, workers=0)
REQUIRED = {"run", "recipe", "pool", "kept", "samples_seen", "scores", "average"}
TASKS = ["shape", "colour", "background", "colour_head", "colour_tail", "retrieval"]


def _run(name: str, stages: list[dict], urls: Path, folder: Path) -> Path:
    data = {"name": name, "stages": [{"stage": "ingest"}, DOWNLOAD, *stages]}
    run_recipe(recipe_from_data(data, {}, "inline"), urls, folder, engine="local")
    return folder


@pytest.fixture(scope="module")
def runs(served_pool, tmp_path_factory) -> dict[str, Path]:
    """A downloaded run, and two sharded copies of it: unfiltered and filtered."""
    root = tmp_path_factory.mktemp("compare")
    urls = served_pool.urls_path
    downloaded = _run("download_only", [], urls, root / "downloaded")
    shutil.copytree(downloaded, root / "raw")
    shutil.copytree(downloaded, root / "english")
    return {
        "downloaded": downloaded,
        "raw": _run("raw", [SHARD], urls, root / "raw"),
        "english": _run("english", [FILTER, SHARD], urls, root / "english"),
    }


@pytest.fixture(scope="module")
def compared(runs, demo_pool, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("compared")
    return out, compare([runs["raw"], runs["english"]], demo_pool / "eval", CONFIG, out)


@pytest.mark.slow
def test_one_row_per_run_with_the_required_keys(compared):
    out, rows = compared
    assert json.loads((out / "compare.json").read_text()) == rows
    assert [r["run"] for r in rows] == [r["recipe"] for r in rows] == ["raw", "english"]
    raw, english = rows
    for row in rows:
        assert set(row) >= REQUIRED
        assert row["pool"] == 500 and row["samples_seen"] == 512 and row["seeds"] == [0]
        assert list(row["scores"]) == TASKS and all(0 <= v <= 1 for v in row["scores"].values())
        assert row["average"] == pytest.approx(sum(row["scores"].values()) / len(TASKS), abs=1e-4)
        assert row["average_std"] is None and set(row["scores_std"].values()) == {None}
        assert (out / row["run"] / "ckpt" / "open_clip_config.json").is_file()
        assert (out / row["run"] / "eval.json").is_file()
    assert 0 < english["kept"] < raw["kept"] < 500


@pytest.mark.slow
def test_the_markdown_table_has_a_line_per_run(compared):
    out, rows = compared
    table = (out / "compare.md").read_text()
    lines = table.splitlines()
    head = (
        "| run | recipe | pool | kept | samples seen | shape | colour | background "
        "| colour_head | colour_tail | retrieval"
    )
    assert lines[0] == head + " | average |"
    for row in rows:
        assert any(line.startswith(f"| {row['run']} | {row['recipe']} | 500 |") for line in lines)
    assert "shape acc1 (chance 0.083), colour acc1 (chance 0.091)" in table
    assert "retrieval mean_recall@1 (chance 0.008)." in table


@pytest.mark.slow
def test_several_seeds_give_mean_and_spread(runs, demo_pool, tmp_path, capsys):
    argv = ["compare", str(runs["english"]), "--tasks", str(demo_pool / "eval")]
    argv += ["--out", str(tmp_path), "--samples-seen", "256", "--batch-size", "32"]
    argv += ["--warmup", "2", "--workers", "0", "--seeds", "0", "1"]
    assert main(argv) == 0
    assert "± " in capsys.readouterr().out
    (row,) = json.loads((tmp_path / "compare.json").read_text())
    assert row["seeds"] == [0, 1] and [s["seed"] for s in row["per_seed"]] == [0, 1]
    averages = [s["average"] for s in row["per_seed"]]
    assert row["average"] == pytest.approx(sum(averages) / 2, abs=1e-4)
    assert row["average_std"] is not None and row["average_std"] >= 0
    colour = [s["scores"]["colour"] for s in row["per_seed"]]
    assert row["scores"]["colour"] == pytest.approx(sum(colour) / 2, abs=1e-4)
    for seed in (0, 1):
        assert (tmp_path / "english" / f"seed-{seed}" / "ckpt" / "metrics.json").is_file()


def test_runs_that_cannot_train_are_named_before_any_training(runs, demo_pool, tmp_path, capsys):
    eval_set = demo_pool / "eval"
    with pytest.raises(ConfigError, match=f"run {runs['downloaded']}: no Parquet shards"):
        compare([runs["raw"], runs["downloaded"]], eval_set, CONFIG, tmp_path / "a")
    assert not (tmp_path / "a").exists()

    textonly = tmp_path / "textonly"
    (textonly / "shards").mkdir(parents=True)
    shutil.copy(next((runs["raw"] / "shards").glob("*.parquet")), textonly / "shards")
    shard = next((textonly / "shards").glob("*.parquet"))
    pq.write_table(pq.read_table(shard).drop_columns(["image"]), shard)
    with pytest.raises(ConfigError, match=f"run {textonly}: its shards hold no images"):
        compare([textonly], eval_set, CONFIG, tmp_path / "b")

    twin = tmp_path / "twin" / "raw"
    shutil.copytree(runs["raw"], twin)
    with pytest.raises(ConfigError, match="runs named raw twice"):
        compare([runs["raw"], twin], eval_set, CONFIG, tmp_path / "c")
    with pytest.raises(ConfigError, match="did you mean"):
        compare([runs["raw"]], demo_pool, CONFIG, tmp_path / "d")
    # The last seed is checked before the first one trains.
    with pytest.raises(ConfigError, match="seed -2: expected"):
        compare([runs["raw"]], eval_set, CONFIG, tmp_path / "f", seeds=[0, -2])
    with pytest.raises(ConfigError, match="seeds 1 1: each seed once"):
        compare([runs["raw"]], eval_set, CONFIG, tmp_path / "f", seeds=[1, 1])
    assert not (tmp_path / "f").exists()

    argv = ["compare", str(runs["downloaded"]), "--tasks", str(eval_set)]
    assert main([*argv, "--out", str(tmp_path / "e")]) == 2
    assert "no Parquet shards" in capsys.readouterr().err
