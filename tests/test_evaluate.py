"""Zero-shot and retrieval evaluation on the demo pool's eval set (120 images), on CPU.

The session's fixture model (``curate-tiny``, 60 steps on the pool's clean rows)
has learned colours and enough to retrieve captions, not yet shapes: measured
shape 0.092 (chance 0.083), colour 0.242 (chance 0.091), background 0.267
(chance 0.25), recall@1 0.317 image→text and 0.258 text→image (chance 0.008).
The floors below sit well under those numbers and well above chance; a
randomly initialised model is measured at chance.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from clip_fixture import MODEL, save_local_dir
from safetensors.torch import load_file, save_file

from curate.cli import main
from curate.clip.model_configs import register_model_configs
from curate.core.config import ConfigError
from curate.demo.vocab import VOCABULARY
from curate.engine.local import LocalEngine
from curate.io.vectors import embedding_matrix
from curate.train.evaluate import TEMPLATES, evaluate, prompts, recalls


@pytest.fixture(scope="module")
def result(fixture_model, demo_pool) -> dict:
    return evaluate(fixture_model, demo_pool / "eval")


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    register_model_configs()
    torch.manual_seed(0)
    return save_local_dir(open_clip.create_model(MODEL), tmp_path_factory.mktemp("random") / "m")


def _numbers(result: dict) -> list[float]:
    zeroshot = [z[k] for z in result["zeroshot"].values() for k in ("accuracy", "chance")]
    retrieval = [v for r in result["retrieval"].values() for v in r.values()]
    return [*zeroshot, *retrieval, result["zeroshot_acc"], result["recall_at_1"]]


def test_the_fixture_model_beats_chance_where_it_has_learned(result):
    zeroshot = result["zeroshot"]
    assert list(zeroshot) == list(VOCABULARY) and result["images"] == 120
    assert zeroshot["colour"]["accuracy"] >= 0.17 > 1.5 * zeroshot["colour"]["chance"]
    assert result["retrieval"]["image_to_text"]["recall_at_1"] >= 0.15
    assert result["retrieval"]["text_to_image"]["recall_at_1"] >= 0.15
    assert result["zeroshot_acc"] == pytest.approx(
        np.mean([z["accuracy"] for z in zeroshot.values()])
    )


def test_numbers_are_fractions_and_recall_grows_with_k(result):
    assert all(0 <= x <= 1 for x in _numbers(result))
    assert {a: z["chance"] for a, z in result["zeroshot"].items()} == {
        "shape": 1 / 12,
        "colour": 1 / 11,
        "background": 1 / 4,
    }
    for direction in ("image_to_text", "text_to_image"):
        r = result["retrieval"][direction]
        assert r["recall_at_1"] <= r["recall_at_5"]
    assert result["recall_at_1"] <= result["recall_at_5"]


def test_evaluation_is_deterministic(result, fixture_model, demo_pool):
    assert evaluate(fixture_model, demo_pool / "eval") == result


def test_a_random_model_is_at_chance(random_model, demo_pool):
    random = evaluate(random_model, demo_pool / "eval")
    for z in random["zeroshot"].values():
        assert z["accuracy"] <= z["chance"] + 0.1
    assert random["zeroshot_acc"] < 0.2
    assert random["recall_at_1"] < 0.05 and random["recall_at_5"] < 0.15


def test_eval_images_get_the_clip_stages_vectors(fixture_model, demo_pool, tmp_path):
    from curate.clip.pool import embed_images, prepare_model
    from curate.train.evaluate import _embed_pairs, read_labels

    eval_set = demo_pool / "eval"
    labels, _ = read_labels(eval_set)
    prepared = prepare_model(str(fixture_model), None)
    images, _, _ = _embed_pairs(labels, eval_set, prepared, "cpu", 128)
    paths = labels["path"].to_pylist()
    table = pa.table({"uid": paths, "image": [(eval_set / p).read_bytes() for p in paths]})
    stage = embed_images(table, tmp_path, prepared, LocalEngine())
    np.testing.assert_array_equal(images, embedding_matrix(stage["image_embedding"]))


def test_ties_are_not_hits_and_equal_captions_are_the_same_caption():
    scores = np.array([[0.5, 0.5, 0.1], [0.9, 0.4, 0.2], [0.1, 0.2, 0.3]])
    distinct = np.eye(3, dtype=bool)
    r = recalls(scores, distinct)
    assert r["recall_at_1"] == pytest.approx(1 / 3)  # row 0 ties with a wrong item, row 1 loses
    assert r["recall_at_5"] == 1.0
    captions = np.array(["a red star", "a red star", "a blue ring"], dtype=object)
    assert recalls(scores, captions[:, None] == captions[None, :])["recall_at_1"] == 1.0


def test_prompts_cover_every_attribute_with_articles():
    assert set(TEMPLATES) == set(VOCABULARY)
    assert "an orange shape" in prompts("colour", "orange")
    assert "a drawing of an arrow" in prompts("shape", "arrow")
    assert "a dotted background" in prompts("background", "dotted")


def test_cli_prints_the_table_and_writes_json(fixture_model, demo_pool, tmp_path, capsys, result):
    out = tmp_path / "eval.json"
    argv = ["eval", "--ckpt", str(fixture_model), "--eval-set", str(demo_pool / "eval")]
    assert main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| colour | 11 |" in printed and "| image → text |" in printed
    assert json.loads(out.read_text()) == result


def test_errors_name_what_is_wrong(fixture_model, demo_pool, tmp_path, capsys):
    eval_set = demo_pool / "eval"
    with pytest.raises(
        ConfigError, match=re.escape(f"no labels.parquet (did you mean {eval_set}?)")
    ):
        evaluate(fixture_model, demo_pool)
    with pytest.raises(ConfigError, match="no such folder"):
        evaluate(tmp_path / "missing", eval_set)
    with pytest.raises(ConfigError, match="not a checkpoint folder"):
        evaluate(eval_set, eval_set)
    unweighted = tmp_path / "unweighted"
    shutil.copytree(fixture_model, unweighted)
    next(unweighted.glob("*.safetensors")).unlink()
    with pytest.raises(ConfigError, match="no weights file"):
        evaluate(unweighted, eval_set)

    relabelled = tmp_path / "relabelled"
    shutil.copytree(eval_set, relabelled)
    labels = pq.read_table(eval_set / "labels.parquet")
    shapes = ["blob", *labels["shape"].to_pylist()[1:]]
    pq.write_table(labels.set_column(1, "shape", pa.array(shapes)), relabelled / "labels.parquet")
    with pytest.raises(ConfigError, match="shape labels outside the vocabulary"):
        evaluate(fixture_model, relabelled)
    path = labels.column_names.index("path")
    pq.write_table(labels.set_column(path, "path", pa.array(range(labels.num_rows))),
                   relabelled / "labels.parquet")  # fmt: skip
    with pytest.raises(ConfigError, match="column path must hold text in every row"):
        evaluate(fixture_model, relabelled)
    captions = [None, *labels["caption"].to_pylist()[1:]]
    caption = labels.column_names.index("caption")
    pq.write_table(labels.set_column(caption, "caption", pa.array(captions, pa.string())),
                   relabelled / "labels.parquet")  # fmt: skip
    with pytest.raises(ConfigError, match="column caption must hold text in every row"):
        evaluate(fixture_model, relabelled)
    (relabelled / "labels.parquet").write_bytes(b"PAR1")
    with pytest.raises(ConfigError, match=r"labels\.parquet: not a readable Parquet file"):
        evaluate(fixture_model, relabelled)

    assert main(["eval", "--ckpt", str(tmp_path), "--eval-set", str(eval_set)]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err


def test_cli_refuses_a_checkpoint_open_clip_would_load_randomly(
    random_model, demo_pool, tmp_path, capsys
):
    """Weights under a name open_clip's loader skips: an error, never a table of a random model."""
    renamed = tmp_path / "renamed"
    shutil.copytree(random_model, renamed)
    (renamed / "open_clip_model.safetensors").rename(renamed / "model.pt")
    argv = ["eval", "--ckpt", str(renamed), "--eval-set", str(demo_pool / "eval")]
    assert main(argv) == 2
    printed = capsys.readouterr()
    assert printed.out == ""
    assert str(renamed) in printed.err and "model.pt" in printed.err
    assert "open_clip_model.safetensors" in printed.err


def test_a_checkpoint_missing_a_tensor_is_refused(random_model, demo_pool, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(random_model, partial)
    weights = partial / "open_clip_model.safetensors"
    state = load_file(weights)
    del state["visual.proj"]
    save_file(state, weights)
    with pytest.raises(ConfigError, match=r"missing key.*visual\.proj"):
        evaluate(partial, demo_pool / "eval")
