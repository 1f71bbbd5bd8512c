"""Recipes and filter sets: loading, validation errors that name the place, overrides."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
import types
import typing
from pathlib import Path
from typing import Annotated, Optional

import pytest

from curate.core.config import ConfigError, Range, build
from curate.core.operators import FILTERS, load_registry
from curate.core.recipe import (
    RECIPE_DIRS,
    build_filters,
    load_filter_set,
    load_recipe,
    recipe_from_data,
    stage_params,
)
from curate.stages import STAGES
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


def test_bootstrap_training_filters_are_a_filter_list_of_the_recipe():
    """Inlined from the default set, hashed with the stage, reachable by ``--set``."""
    recipe = load_recipe("bootstrap")
    (stage,) = [s for s in recipe.stages if s.kind == "bootstrap"]
    basic = load_recipe("datacomp_basic").stages[1].filters
    assert stage.train_filters == basic
    (params,) = [p for p in recipe.resolved()["stages"] if p["stage"] == "bootstrap"]
    assert params["train_filters"][1] == {"image_size": {"min_side": 200}}

    edited = load_recipe("bootstrap", ["bootstrap.train_filters.image_size.min_side=150"])
    (changed,) = [s for s in edited.stages if s.kind == "bootstrap"]
    assert {f.name: f for f in changed.train_filters}["image_size"].min_side == 150
    assert stage_params(changed) != stage_params(stage)

    swapped = load_recipe("bootstrap", ["bootstrap.train_filters=align"])
    (align,) = [s for s in swapped.stages if s.kind == "bootstrap"]
    assert "rare_tokens" in [f.name for f in align.train_filters]


@pytest.mark.parametrize(
    "override, message",
    [
        ("bootstrap.train_filters.nofilter.x=1", "has no filter 'nofilter' in train_filters"),
        ("bootstrap.image_size.min_side=1", "no filter list .filters. .its filter lists: train_f"),
        ("shard.image_size.min_side=1", "too many key components"),
        ("filter.nolist.image_size.min_side=1", "has no filter list 'nolist'"),
        ("bootstrap.train_filters.image_size.min_side=-1", "min_side must be at least 0"),
        ("bootstrap.train_filters=nosuchset", "no filter set named 'nosuchset'"),
    ],
)
def test_bad_training_filter_overrides_fail_clearly(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("bootstrap", [override])


def test_resolved_recipe_round_trips():
    recipe = load_recipe("align")
    again = recipe_from_data(recipe.resolved(), {}, "resolved")
    assert again.resolved() == recipe.resolved()


def test_recipe_is_found_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_recipe("align").name == "align"
    assert any(d.is_dir() for d in RECIPE_DIRS)


# --- the whole recipe is checked before any work ("Run folders are safe") -------------------

FILTER_SETS = sorted((Path(__file__).parent.parent / "filters").glob("*.yaml"))


@pytest.mark.parametrize("path", FILTER_SETS, ids=lambda p: p.stem)
def test_every_shipped_filter_set_builds(path):
    entries, where = load_filter_set(str(path))
    assert where.startswith(str(path))
    assert [f.name for f in build_filters(entries, where)] == [next(iter(e)) for e in entries]


def failure(text: str, tmp_path: Path, overrides: list[str] = ()) -> str:
    """The message of the ConfigError that loading the recipe ``text`` raises."""
    with pytest.raises(ConfigError) as info:
        load_recipe(str(write(tmp_path, text)), overrides)
    return str(info.value)


def test_an_alias_bomb_fails_fast_naming_the_line(tmp_path):
    """A billion laughs: nine levels of nine aliases each, a few hundred bytes."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 10):
        lines.append(f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * 9)}]")
    text = "stages:\n  - stage: ingest\n  - stage: filter\n    filters:\n      - language:\n"
    text += "".join(f"          {line}\n" for line in lines)
    assert len(text) < 1000
    started = time.perf_counter()
    message = failure(text, tmp_path)
    assert time.perf_counter() - started < 1
    assert re.match(r".*recipe\.yaml:\d+: .*alias", message), message


def test_few_aliases_expanding_to_many_nodes_fail_fast(tmp_path):
    """Each level adds one alias and doubles the size: 15 aliases, 2**15 copies of a list."""
    value = "&a0 [x, x]"
    for level in range(1, 16):
        value = f"&a{level} [{value}, *a{level - 1}]"
    text = f"name: bomb\ndescription: {value}\nstages:\n  - stage: ingest\n"
    started = time.perf_counter()
    message = failure(text, tmp_path)
    assert time.perf_counter() - started < 1
    assert message.startswith(f"{tmp_path / 'recipe.yaml'}:2: ") and "alias" in message


def test_a_recursive_alias_is_refused(tmp_path):
    message = failure("name: &n [*n]\nstages:\n  - stage: ingest\n", tmp_path)
    assert message.startswith(f"{tmp_path / 'recipe.yaml'}:1: ") and "alias" in message


def test_a_few_plain_aliases_still_load(tmp_path):
    path = write(
        tmp_path,
        "stages:\n  - stage: ingest\n"
        "  - stage: filter\n    name: first\n"
        "    filters: &basic [caption_valid, {image_size: {min_side: 10}}]\n"
        "  - stage: filter\n    name: second\n    filters: *basic\n",
    )
    first, second = load_recipe(str(path)).stages[1:]
    assert [f.name for f in first.filters] == [f.name for f in second.filters]
    assert second.filters[1].min_side == 10


@pytest.mark.parametrize(
    "text, line, tag",
    [
        ("name: !!python/tuple [a, b]\n", 1, "!!python/tuple"),  # a list, not a recipe name
        ("description: !!set {a, b}\n", 1, "!!set"),
        ("description: !!omap [{a: 1}]\n", 1, "!!omap"),
        ("description: !custom {a: 1}\n", 1, "!custom"),
        ("description: !custom [a]\n", 1, "!custom"),
        ("description: !custom text\n", 1, "!custom"),
        ("description: !!python/name:os.system\n", 1, "!!python/name:os.system"),
        ("description: !!binary aGVsbG8=\n", 1, "!!binary"),
        ("seed: 0\ndescription: x\nname: !!python/object/apply:os.getcwd []\n", 3, "!!python"),
        ("description: !!str [a]\n", 1, "!!str"),  # a core tag on the wrong kind of node
    ],
)
def test_tags_other_than_plain_yaml_are_refused(tmp_path, text, line, tag):
    message = failure(text + "stages:\n  - stage: ingest\n", tmp_path)
    assert message.startswith(f"{tmp_path / 'recipe.yaml'}:{line}: "), message
    assert tag in message


def test_a_tag_inside_a_stage_or_filter_is_refused(tmp_path):
    text = "stages:\n  - stage: ingest\n  - stage: filter\n    filters:\n"
    text += "      - language: {languages: !!python/tuple [en]}\n"
    assert failure(text, tmp_path).startswith(f"{tmp_path / 'recipe.yaml'}:5: ")
    message = failure("stages:\n  - !!set {stage: ingest}\n", tmp_path)
    assert message.startswith(f"{tmp_path / 'recipe.yaml'}:2: ") and "!!set" in message


def test_core_tags_are_allowed(tmp_path):
    path = write(tmp_path, 'name: !!str 5\nseed: !!int "3"\nstages: !!seq\n  - stage: ingest\n')
    recipe = load_recipe(str(path))
    assert (recipe.name, recipe.seed) == ("5", 3)


def test_a_tag_in_a_filter_set_is_refused(tmp_path):
    bad = tmp_path / "bad_set.yaml"
    bad.write_text("filters:\n  - image_size: {min_side: 10}\n  - language: !!set {en}\n")
    text = f"stages:\n  - stage: ingest\n  - stage: filter\n    filters: {bad}\n"
    message = failure(text, tmp_path)
    assert message.startswith(f"{bad}:3: ") and "!!set" in message


def test_a_tag_in_an_override_is_refused():
    with pytest.raises(ConfigError, match=r"^--set filter\.language\.languages=.*!!python"):
        load_recipe("datacomp_basic", ["filter.language.languages=!!python/tuple [en]"])


STAGE_HEAD = "stages:\n  - stage: ingest\n"  # stage parameters start on line 4


def filter_recipe(name: str, params: str) -> str:
    return f"{STAGE_HEAD}  - stage: filter\n    filters:\n      - {name}: {{{params}}}\n"


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("aspect_ratio", "max_ratio: -1", "max_ratio must be at least 1"),
        ("aspect_ratio", "max_ratio: .nan", "max_ratio must be at least 1.*NaN"),
        ("aspect_ratio", "max_ratio: 0.5", "max_ratio must be at least 1"),
        ("aspect_ratio", "max_ratio: .inf", "max_ratio must be a finite number"),
        ("aspect_ratio", "max_ratio: 1, inclusive: false", "drop every row"),
        ("image_size", "min_side: -1", "min_side must be at least 0"),
        ("language", "min_score: .inf", r"min_score must be in \[0, 1\]"),
        ("language", "min_score: -0.5", r"min_score must be in \[0, 1\]"),
        ("language", "min_score: .nan", r"min_score must be in \[0, 1\].*NaN"),
        ("caption_words", "min_words: -1", "min_words must be at least 0"),
        ("caption_words", "max_chars: 0", "max_chars must be at least 1"),
        ("alt_text_frequency", "max_count: 0", "max_count must be at least 1"),
        ("rare_tokens", "vocab_size: 0", "vocab_size must be at least 1"),
        ("clip_score", "min: 1.5", r"min must be in \[-1, 1\]"),
        ("clip_score", "min: -.inf", r"min must be in \[-1, 1\]"),
        ("clip_score_top_fraction", "fraction: 0", r"fraction must be in \(0, 1\]"),
        ("clip_score_top_fraction", "fraction: .nan", r"fraction must be in \(0, 1\]"),
        ("score_threshold", "column: x, min: .nan", "min must not be NaN"),
        ("score_threshold", "column: x, min: .inf", "min must be less than inf"),
        ("score_threshold", "column: x, max: -.inf", "max must be greater than -inf"),
        ("clip_concepts", "unwanted: [x], margin: 2", r"margin must be in \(-2, 2\)"),
        ("clip_concepts", "unwanted: [x], margin: -.inf", r"margin must be in \(-2, 2\)"),
        ("datacomp_image", "reference: r, clusters: 5, iterations: 0", "iterations must be at"),
        ("datacomp_image", "reference: r, clusters: 5, max_train_rows: 4", "max_train_rows 4"),
    ],
)
def test_filter_parameters_out_of_range_are_refused(tmp_path, name, params, message):
    text = failure(filter_recipe(name, params), tmp_path)
    assert text.startswith(f"{tmp_path / 'recipe.yaml'}:4: filter {name}"), text
    assert re.search(message, text), text


@pytest.mark.parametrize(
    "stage, params, message",
    [
        ("shard", "rows_per_shard: 0", "rows_per_shard must be at least 1"),
        ("download", "timeout: 0", "timeout must be greater than 0"),
        ("download", "timeout: .inf", "timeout must be a finite number"),
        ("download", "timeout: .nan", "timeout must be greater than 0, got NaN"),
        ("download", "retries: -1", "retries must be at least 0"),
        ("download", "encode_quality: 101", r"encode_quality must be in \[0, 100\]"),
        ("download", "encode_format: png, encode_quality: 10", "compression level, 0 to 9"),
        ("download", "image_size: 0", "image_size must be at least 1"),
        ("download", "max_image_pixels: 0", "max_image_pixels must be at least 1"),
        ("download", "processes_count: 0", "processes_count must be at least 1"),
        ("clip", "batch_size: 0", "batch_size must be at least 1"),
        ("clip", "concurrency: -2", "concurrency must be at least 1"),
        ("dedup_semantic", "epsilon: 0", r"epsilon must be in \(0, 2\)"),
        ("dedup_semantic", "epsilon: .nan", r"epsilon must be in \(0, 2\)"),
        ("dedup_semantic", "clusters: 0", "clusters must be at least 1"),
        ("dedup_semantic", "sample_per_cluster: 0", "sample_per_cluster must be at least 1"),
        ("decontaminate", "eval_set: e, threshold: 1.5", r"threshold must be in \(-1, 1\]"),
        ("decontaminate", "eval_set: e, threshold: -1", r"threshold must be in \(-1, 1\]"),
        ("balance", "concepts: demo, t: 0", "t must be at least 1"),
        ("ingest", "rows_per_file: 0", "rows_per_file must be at least 1"),
        ("bootstrap", "lr: .inf", "lr: expected a finite number, got inf"),
    ],
)
def test_stage_parameters_out_of_range_are_refused(tmp_path, stage, params, message):
    head, line = ("stages:\n", 2) if stage == "ingest" else (STAGE_HEAD, 3)
    text = failure(f"{head}  - {{stage: {stage}, {params}}}\n", tmp_path)
    assert text.startswith(f"{tmp_path / 'recipe.yaml'}:{line}: stage {stage}"), text
    assert re.search(message, text), text


def test_values_at_the_edges_of_their_ranges_are_accepted(tmp_path):
    text = (
        f"{STAGE_HEAD}  - stage: filter\n    filters:\n"
        "      - image_size: {min_side: 0}\n"
        "      - aspect_ratio: {max_ratio: 1}\n"
        "      - language: {min_score: 1}\n"
        "      - score_threshold: {column: s, min: -.inf, max: .inf}\n"
        "      - clip_score_top_fraction: {fraction: 1}\n"
        "      - clip_score: {min: -1}\n"
        "  - stage: dedup_semantic\n    epsilon: 1.99\n"
        "  - stage: decontaminate\n    eval_set: e\n    threshold: 1\n"
        "  - stage: download\n    encode_format: png\n    encode_quality: 9\n    retries: 0\n"
    )
    recipe = load_recipe(str(write(tmp_path, text)))
    threshold = recipe.stages[1].filters[3]
    assert (threshold.min, threshold.max) == (-math.inf, math.inf)


@pytest.mark.parametrize(
    "override, message",
    [
        ("filter.aspect_ratio.max_ratio=-1", "max_ratio must be at least 1"),
        ("filter.aspect_ratio.max_ratio=.nan", "max_ratio must be at least 1"),
        ("filter.image_size.min_side=-5", "min_side must be at least 0"),
        ("filter.language.min_score=.inf", r"min_score must be in \[0, 1\]"),
        ("filter.image_size.min_side=wide", "expected an integer"),
        ("filter.image_size.min_sid=3", "unknown key 'min_sid'"),
        ("filter.caption_words.max_words=1", "max_words 1 < min_words 3"),
        ("shard.rows_per_shard=0", "rows_per_shard must be at least 1"),
        ("shard.rows_per_shrd=5", "unknown key 'rows_per_shrd'"),
        ("shard.name=../victim", "stage name '../victim'"),
        ("shard.stage=teleport", "unknown stage 'teleport'"),
        ("filter.filters=[warp]", "unknown filter 'warp'"),
        ("filter.filters=[{image_size: {min_side: -1}}]", "min_side must be at least 0"),
        ("filter.filters=nope", "no filter set named 'nope'"),
        ("seed=-1", "seed must be an integer from 0"),
    ],
)
def test_override_errors_name_the_flag(override, message):
    with pytest.raises(ConfigError) as info:
        load_recipe("datacomp_basic", ["seed=1", override])
    text = str(info.value)
    assert text.startswith(f"--set {override}: "), text
    assert re.search(message, text), text


def test_file_errors_still_name_the_file_when_overrides_are_given(tmp_path):
    text = filter_recipe("image_size", "min_side: -1") + "  - stage: shard\n"
    message = failure(text, tmp_path, ["shard.rows_per_shard=5", "seed=2"])
    assert message.startswith(f"{tmp_path / 'recipe.yaml'}:4: filter image_size"), message


@pytest.mark.parametrize("after", ["filter\n    filters: []", "download", "shard\n    name: again"])
def test_nothing_may_follow_the_shard_stage(tmp_path, after):
    text = f"{STAGE_HEAD}  - stage: shard\n  - stage: {after}\n"
    message = failure(text, tmp_path)
    assert message.startswith(f"{tmp_path / 'recipe.yaml'}:4: "), message
    assert "shard must be the last stage" in message


def test_ingest_is_only_the_first_stage(tmp_path):
    message = failure(f"{STAGE_HEAD}  - stage: ingest\n    name: again\n", tmp_path)
    assert message.startswith(f"{tmp_path / 'recipe.yaml'}:3: ") and "first stage" in message


@pytest.mark.parametrize(
    "name",
    ["../../victim", "a/b", "a\\b", ".hidden", "", ".", "..", "a b", "a\0b", "-x", "é", 5, None],
)
def test_stage_names_must_be_plain_identifiers(tmp_path, name):
    text = f"{STAGE_HEAD}  - stage: shard\n    name: {json.dumps(name)}\n"
    message = failure(text, tmp_path)
    assert message.startswith(f"{tmp_path / 'recipe.yaml'}:4: "), message
    assert f"stage name {name!r}" in message


def test_a_stage_kind_that_is_not_a_name_is_refused(tmp_path):
    message = failure(f"{STAGE_HEAD}  - stage: [shard]\n", tmp_path)
    assert message.startswith(f"{tmp_path / 'recipe.yaml'}:3: ") and "unknown stage" in message


def test_plain_stage_names_are_accepted(tmp_path):
    text = (
        f"{STAGE_HEAD}  - stage: filter\n    name: caption_filter\n    filters: []\n"
        "  - stage: filter\n    name: Image-based2\n    filters: []\n"
    )
    assert [s.name for s in load_recipe(str(write(tmp_path, text))).stages] == [
        "ingest",
        "caption_filter",
        "Image-based2",
    ]


def numeric(tp) -> bool:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(numeric(a) for a in args)
    return base in (int, float)


def has_range(tp) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return all(has_range(a) for a in typing.get_args(tp) if a is not type(None))
    return typing.get_origin(tp) is Annotated and any(
        isinstance(m, Range) for m in typing.get_args(tp)[1:]
    )


#: Checked by TrainConfig.check, the trainer's one copy of these rules (lr > 0, ...).
TRAINER_CHECKED = {"bootstrap": {"samples_seen", "batch_size", "lr", "workers"}}


def test_every_numeric_parameter_declares_its_range():
    load_registry()
    missing = []
    for kind, classes in (("stage", STAGES), ("filter", FILTERS)):
        for name, cls in classes.items():
            hints = typing.get_type_hints(cls, include_extras=True)
            for f in dataclasses.fields(cls):
                tp = hints[f.name]
                exempt = f.name in TRAINER_CHECKED.get(name, ())
                if f.init and numeric(tp) and not has_range(tp) and not exempt:
                    missing.append(f"{kind} {name}.{f.name}")
    assert not missing


def test_ranges_through_build_and_optional_fields():
    @dataclasses.dataclass
    class Params:
        count: Annotated[int, Range(1)] | None = None
        share: Optional[Annotated[float, Range(0, 1, low_open=True)]] = None  # noqa: UP045
        plain: float = 0.0

    assert build(Params, {"count": None, "share": None}, "p").count is None
    assert build(Params, {"count": 3, "share": 1}, "p").share == 1.0
    for params, message in [
        ({"count": 0}, r"^p\.count must be at least 1, got 0$"),
        ({"share": 0.0}, r"^p\.share must be in \(0, 1\], got 0\.0$"),
        ({"share": "x"}, r"^p\.share: expected a number"),
        ({"plain": math.nan}, r"^p\.plain: expected a finite number, got NaN$"),
        ({"plain": -math.inf}, r"^p\.plain: expected a finite number, got -inf$"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build(Params, params, "p")
