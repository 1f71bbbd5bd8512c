"""Zero-shot and retrieval evaluation on the demo pool's tasks (120 images each), on CPU.

The session's fixture model (``curate-tiny``, 60 steps on the pool's clean rows)
has learned colours and patterns, a little retrieval, not yet shapes: measured
shape 0.067 (chance 0.083), colour 0.283 (chance 0.091), background 0.375
(chance 0.25), recall@1 0.042 both ways (chance 0.008: captions name an object's
colour, shape and size and the background's pattern, and the model tells apart
only colours and patterns).
The floors below sit well under those numbers and well above chance; a
randomly initialised model is measured at chance. ``test_eval_parity.py`` checks
the numbers against ``clip_benchmark``'s, ``test_eval_tasks.py`` the layouts.
"""

from __future__ import annotations

import json
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
from curate.demo.tasks import COLOUR_GROUPS
from curate.demo.vocab import VOCABULARY
from curate.engine.local import LocalEngine
from curate.io.eval_tasks import read_task
from curate.io.vectors import embedding_matrix
from curate.train.evaluate import Scorer, evaluate


@pytest.fixture(scope="module")
def result(fixture_model, demo_pool) -> dict:
    return evaluate(str(fixture_model), demo_pool / "eval")


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    register_model_configs()
    torch.manual_seed(0)
    return save_local_dir(open_clip.create_model(MODEL), tmp_path_factory.mktemp("random") / "m")


def _numbers(result: dict) -> list[float]:
    return [v for r in result["tasks"].values() for v in r.values() if isinstance(v, float)] + [
        result["average"]
    ]


def test_the_fixture_model_beats_chance_where_it_has_learned(result):
    tasks = result["tasks"]
    assert list(tasks) == [*VOCABULARY, *COLOUR_GROUPS, "retrieval"]
    assert all(t["images"] == 120 for name, t in tasks.items() if name not in COLOUR_GROUPS)
    assert tasks["colour"]["acc1"] >= 0.17 > 1.5 * tasks["colour"]["chance"]
    assert tasks["retrieval"]["text_retrieval_recall@1"] >= 0.025
    assert tasks["retrieval"]["image_retrieval_recall@1"] >= 0.025
    assert result["average"] == pytest.approx(np.mean([t["score"] for t in tasks.values()]))


def test_numbers_are_fractions_and_recall_grows_with_k(result):
    assert all(0 <= x <= 1 for x in _numbers(result))
    tasks = result["tasks"]
    assert {a: tasks[a]["chance"] for a in VOCABULARY} == {
        "shape": 1 / 12,
        "colour": 1 / 11,
        "background": 1 / 4,
    }
    assert tasks["background"]["acc5"] is None  # 4 classes: no top-5, as DataComp
    for a in VOCABULARY:
        assert tasks[a]["score"] == tasks[a]["acc1"] and tasks[a]["metric"] == "acc1"
    retrieval = tasks["retrieval"]
    for direction in ("image", "text"):
        at = [retrieval[f"{direction}_retrieval_recall@{k}"] for k in (1, 5, 10)]
        assert at == sorted(at)
    assert retrieval["score"] == retrieval["mean_recall@1"]


def test_evaluation_is_deterministic(result, fixture_model, demo_pool):
    assert evaluate(str(fixture_model), demo_pool / "eval", batch_size=7) == result


def test_a_random_model_is_at_chance(random_model, demo_pool):
    random = evaluate(str(random_model), demo_pool / "eval")["tasks"]
    for a in VOCABULARY:
        assert random[a]["acc1"] <= random[a]["chance"] + 0.1
    assert random["retrieval"]["mean_recall@1"] < 0.05


def test_eval_images_get_the_clip_stages_vectors(fixture_model, demo_pool, tmp_path):
    """For RGB JPEGs (converting to RGB first changes nothing) an eval image's vector is
    the one the clip stage gives the same picture, which the ledger keeps in fp16."""
    from curate.clip.pool import embed_images, prepare_model

    task = read_task(demo_pool / "eval" / "colour")
    images, _ = Scorer(str(fixture_model), None, "cpu", 50).images(task, progress=False)
    samples = list(task.samples())
    table = pa.table({"uid": [s.source for s in samples], "image": [s.image for s in samples]})
    prepared = prepare_model(str(fixture_model), None)
    stage = embed_images(table, tmp_path, prepared, LocalEngine())
    stored = embedding_matrix(stage["image_embedding"]).astype(np.float16)  # the ledger's fp16
    np.testing.assert_array_equal(images.astype(np.float16), stored)


def test_cli_prints_the_table_and_writes_json(fixture_model, demo_pool, tmp_path, capsys, result):
    out = tmp_path / "eval.json"
    argv = ["eval", "--ckpt", str(fixture_model), "--tasks", str(demo_pool / "eval")]
    assert main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| colour | classification | 120 | acc1 |" in printed and "| **average** |" in printed
    assert "| retrieval | retrieval | 120 | mean_recall@1 |" in printed
    assert json.loads(out.read_text()) == result


def test_any_open_clip_architecture_with_local_weights(random_model, demo_pool, tmp_path):
    """``--model`` and ``--pretrained`` as the clip stage takes them: a weights file."""
    weights = tmp_path / "weights.safetensors"
    shutil.copyfile(random_model / "open_clip_model.safetensors", weights)
    register_model_configs()
    by_file = evaluate(MODEL, demo_pool / "eval" / "colour", pretrained=str(weights))
    by_folder = evaluate(str(random_model), demo_pool / "eval" / "colour")
    assert by_file["tasks"] == by_folder["tasks"]
    argv = ["eval", "--model", MODEL, "--pretrained", str(weights)]
    assert main([*argv, "--tasks", str(demo_pool / "eval" / "colour")]) == 0


def test_errors_name_what_is_wrong(fixture_model, demo_pool, tmp_path, capsys):
    tasks = demo_pool / "eval"
    assert main(["eval", "--ckpt", str(tmp_path / "missing"), "--tasks", str(tasks)]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["eval", "--ckpt", str(tasks), "--tasks", str(tasks)]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
    unweighted = tmp_path / "unweighted"
    shutil.copytree(fixture_model, unweighted)
    next(unweighted.glob("*.safetensors")).unlink()
    assert main(["eval", "--ckpt", str(unweighted), "--tasks", str(tasks)]) == 2
    assert "no weights file" in capsys.readouterr().err
    assert main(["eval", "--model", MODEL, "--tasks", str(tasks)]) == 2
    assert "needs weights" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=f"did you mean {tasks}"):
        evaluate(str(fixture_model), demo_pool)  # the pool, not its eval set


def test_an_unreadable_eval_image_is_an_error_naming_it(fixture_model, demo_pool, tmp_path):
    """Skipping an image would change the metric: it stops the evaluation instead."""
    images = tmp_path / "images"
    shutil.copytree(demo_pool / "eval" / "images", images)
    (images / "000003.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    table = pa.table({"image": ["images/000002.jpg", "images/000003.jpg"], "caption": ["a", "b"]})
    pq.write_table(table, tmp_path / "captions.parquet")
    with pytest.raises(ConfigError, match=r"000003\.jpg: cannot read the image"):
        evaluate(str(fixture_model), tmp_path / "captions.parquet")


def test_cli_refuses_a_checkpoint_open_clip_would_load_randomly(
    random_model, demo_pool, tmp_path, capsys
):
    """Weights under a name open_clip's loader skips: an error, never a table of a random model."""
    renamed = tmp_path / "renamed"
    shutil.copytree(random_model, renamed)
    (renamed / "open_clip_model.safetensors").rename(renamed / "model.pt")
    argv = ["eval", "--ckpt", str(renamed), "--tasks", str(demo_pool / "eval")]
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
        evaluate(str(partial), demo_pool / "eval")
