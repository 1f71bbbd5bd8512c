"""Recipes and filter sets: loading, validation errors that name the place, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from curate.config import ConfigError
from curate.recipe import RECIPE_DIRS, load_recipe, recipe_from_data
from curate.stages.filter import FilterStage

PIPELINES = sorted((Path(__file__).parent.parent / "pipelines").glob("*.yaml"))


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.stem)
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(str(path))
    assert recipe.stages[0].kind == "ingest"
    assert recipe.name == path.stem


def test_datacomp_basic_resolves_to_datacomp_rules():
    recipe = load_recipe("datacomp_basic")
    (stage,) = [s for s in recipe.stages if isinstance(s, FilterStage)]
    params = {f.name: f for f in stage.filters}
    assert list(params) == [
        "caption_valid",
        "image_size",
        "aspect_ratio",
        "caption_words",
        "language",
    ]
    assert params["image_size"].min_side == 200
    assert params["aspect_ratio"].max_ratio == 3.0 and params["aspect_ratio"].inclusive
    assert params["caption_words"].min_words == 3 and params["caption_words"].min_chars == 6
    assert params["language"].languages == ["en"]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_unknown_stage_key_names_the_line(tmp_path):
    path = write(tmp_path, "stages:\n  - stage: ingest\n  - stage: shard\n    rows_per_shrd: 5\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml:4: .*unknown key 'rows_per_shrd'"):
        load_recipe(str(path))


def test_unknown_filter_parameter_names_filter_and_key(tmp_path):
    path = write(
        tmp_path,
        "stages:\n  - stage: ingest\n  - stage: filter\n"
        "    filters:\n      - image_size: {min_sid: 3}\n",
    )
    with pytest.raises(ConfigError, match=r"recipe.yaml:4.*image_size: unknown key 'min_sid'"):
        load_recipe(str(path))


def test_wrong_type_is_rejected(tmp_path):
    path = write(
        tmp_path,
        "stages:\n  - stage: ingest\n  - stage: filter\n"
        "    filters:\n      - image_size: {min_side: big}\n",
    )
    with pytest.raises(ConfigError, match=r"min_side: expected an integer, got 'big'"):
        load_recipe(str(path))


@pytest.mark.parametrize(
    "text, message",
    [
        ("stages: []\n", "non-empty list"),
        ("stages:\n  - stage: filter\n    filters: []\n", "first stage must be 'ingest'"),
        ("stages:\n  - stage: ingest\n  - stage: teleport\n", "unknown stage 'teleport'"),
        (
            "stages:\n  - stage: ingest\n  - stage: filter\n    filters: nope\n",
            "no filter set named 'nope'",
        ),
        (
            "stages:\n  - stage: ingest\n  - stage: filter\n    filters: [warp]\n",
            "unknown filter 'warp'",
        ),
        (
            "stages:\n  - stage: ingest\n  - stage: shard\n  - stage: shard\n",
            "two stages are named",
        ),
        ("stagez: []\n", "unknown key 'stagez'"),
        ("stages: [\n", "not valid YAML"),
        ("seed: x\nstages:\n  - stage: ingest\n", "seed must be an integer"),
        ("seed: -1\nstages:\n  - stage: ingest\n", "seed must be an integer from 0"),
        ("seed: 2147483648\nstages:\n  - stage: ingest\n", "seed must be an integer from 0"),
        (  # checked when the recipe loads, not after the download before the training
            "stages:\n  - stage: ingest\n  - stage: bootstrap\n    lr: -0.1\n",
            r"yaml:3: stage bootstrap: lr must be > 0",
        ),
        (
            "stages:\n  - stage: ingest\n  - stage: bootstrap\n    loss: hinge\n",
            "loss 'hinge': expected one of",
        ),
    ],
)
def test_bad_recipes_fail_clearly(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(str(write(tmp_path, text)))


def test_overrides_reach_filters_stages_and_seed():
    recipe = load_recipe(
        "datacomp_basic",
        [
            "filter.image_size.min_side=150",
            "shard.rows_per_shard=7",
            "seed=3",
            "filter.language.languages=[en, fr]",
        ],
    )
    stage = recipe.stages[1]
    assert {f.name: f for f in stage.filters}["image_size"].min_side == 150
    assert {f.name: f for f in stage.filters}["language"].languages == ["en", "fr"]
    assert recipe.stages[2].rows_per_shard == 7
    assert recipe.seed == 3


def test_override_can_swap_the_filter_set():
    recipe = load_recipe("datacomp_basic", ["filter.filters=align"])
    names = [f.name for f in recipe.stages[1].filters]
    assert "rare_tokens" in names and "language" not in names


@pytest.mark.parametrize(
    "override, message",
    [
        ("filter.image_size.min_side=wide", "expected an integer"),
        ("nostage.x=1", "no stage named 'nostage'"),
        ("filter.nofilter.x=1", "has no filter 'nofilter'"),
        ("filter.image_size", "expected STAGE.KEY=VALUE"),
        ("bogus=1", "unknown top-level key"),
    ],
)
def test_bad_overrides_fail_clearly(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("datacomp_basic", [override])


def test_resolved_recipe_round_trips():
    recipe = load_recipe("align")
    again = recipe_from_data(recipe.resolved(), {}, "resolved")
    assert again.resolved() == recipe.resolved()


def test_recipe_is_found_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_recipe("align").name == "align"
    assert any(d.is_dir() for d in RECIPE_DIRS)
