"""The bootstrap recipe on the served demo pool: train on trusted rows, score, keep the top."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pyarrow.parquet as pq
import pytest

from curate.core.config import ConfigError
from curate.core.recipe import load_recipe
from curate.runner import run_recipe

pytestmark = pytest.mark.slow
SMALL = [
    "download.allow_private_networks=true",
    "download.image_size=64",
    "bootstrap.samples_seen=256",
    "bootstrap.batch_size=32",
    "bootstrap.workers=1",
    "clip.batch_size=64",
]


@pytest.fixture(scope="module")
def bootstrapped(served_pool, tmp_path_factory) -> tuple[Path, object]:
    recipe = load_recipe(Path("pipelines/bootstrap.yaml"), SMALL)
    run = tmp_path_factory.mktemp("bootstrap") / "run"
    return run, run_recipe(recipe, served_pool.urls_path, run, engine="local")


def test_trains_on_trusted_rows_and_keeps_the_top_of_the_pool(bootstrapped):
    run, result = bootstrapped
    stages = {s.name: s for s in result.stages}
    assert all(s.rows_in == s.rows_out for s in result.stages[1:-1])
    checkpoint = run / stages["bootstrap"].counters["checkpoint"]
    assert (checkpoint / "open_clip_config.json").is_file()
    open_clip.create_model("local-dir:" + str(checkpoint))  # loads as an open_clip model
    assert stages["bootstrap"].counters["samples_seen"] == 256

    ledger = pq.read_table(run / "ledger").to_pylist()
    assert 0 < stages["bootstrap"].counters["training_rows"] < len(ledger)
    scored = [r for r in ledger if r["clip_score"] is not None]
    downloaded = [r for r in ledger if r["status"] == "success" and r["clip_error"] is None]
    assert len(scored) == len([r for r in downloaded if r["caption"] is not None])
    kept = [r for r in ledger if r["keep"]]
    assert kept and len(kept) <= 0.3 * len(scored) + 2
    assert min(r["clip_score"] for r in kept) >= max(
        r["clip_score"] for r in scored if not r["keep"]
    )
    model = json.loads((run / "embeddings" / "_model.json").read_text())
    assert model["model"].endswith("checkpoints/bootstrap")


def test_a_seed_set_without_shards_is_a_clear_error(served_pool, tmp_path):
    (tmp_path / "empty").mkdir()
    recipe = load_recipe(
        Path("pipelines/bootstrap.yaml"), [*SMALL, f"bootstrap.seed_set={tmp_path / 'empty'}"]
    )
    with pytest.raises(ConfigError, match="no Parquet shards"):
        run_recipe(recipe, served_pool.urls_path, tmp_path / "run", engine="local")


def test_editing_the_training_filter_set_runs_bootstrap_again(served_pool, tmp_path):
    """The training filters are part of the recipe: inlined, hashed with the stage, and
    reachable by ``--set``; a finished bootstrap stage is not reused after its set changed."""
    trusted = tmp_path / "trusted.yaml"
    trusted.write_text("filters:\n  - caption_words: {min_words: 2}\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "stages:\n"
        "  - stage: ingest\n"
        "  - stage: download\n"
        "    image_size: 64\n"
        "    allow_private_networks: true\n"
        "  - stage: bootstrap\n"
        f"    train_filters: {trusted}\n"
        "    samples_seen: 64\n"
        "    batch_size: 32\n"
        "    workers: 1\n"
    )
    run = tmp_path / "run"

    def ran() -> dict[str, bool]:
        result = run_recipe(load_recipe(str(recipe)), served_pool.urls_path, run, engine="local")
        return {s.name: not s.skipped for s in result.stages}

    first = ran()
    assert first == {"ingest": True, "download": True, "bootstrap": True}
    saved = (run / "recipe.yaml").read_text()
    assert "min_words: 2" in saved  # the set is inlined in what runs
    assert ran() == {"ingest": False, "download": False, "bootstrap": False}

    trusted.write_text("filters:\n  - caption_words: {min_words: 3}\n")
    assert ran() == {"ingest": False, "download": False, "bootstrap": True}
    assert "min_words: 3" in (run / "recipe.yaml").read_text()

    override = "bootstrap.train_filters.caption_words.min_words=4"
    edited = load_recipe(str(recipe), [override])
    (bootstrap,) = [s for s in edited.stages if s.name == "bootstrap"]
    assert bootstrap.train_filters[0].min_words == 4
