"""The clip stage on real downloads of the demo pool, with real open_clip models on CPU.

The pool is downloaded once (module fixture); each test copies that run and
adds its own clip stage, so the download stage is found done and skipped.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from conftest import accept_as_written
from PIL import Image

from curate.core.config import ConfigError
from curate.core.layout import EMBEDDINGS, IMAGES
from curate.core.recipe import recipe_from_data
from curate.io.images import image_shards
from curate.runner import run_recipe

DOWNLOAD = {"stage": "download", "allow_private_networks": True, "image_size": 128}


def _recipe(*stages: dict, name: str = "clip_test"):
    data = {"name": name, "stages": [{"stage": "ingest"}, DOWNLOAD, *stages]}
    return recipe_from_data(data, {}, "inline")


@pytest.fixture(scope="module")
def downloaded(served_pool, tmp_path_factory) -> Path:
    """A run folder whose ingest and download stages are done."""
    run = tmp_path_factory.mktemp("clip") / "base"
    run_recipe(_recipe(), served_pool.urls_path, run, engine="local")
    return run


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """A randomly initialised curate-tiny saved as a local safetensors file."""
    import open_clip
    from safetensors.torch import save_file

    from curate.clip.model_configs import register_model_configs

    register_model_configs()
    torch.manual_seed(123)
    model = open_clip.create_model("curate-tiny")
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def run_clip(start: Path, tmp_path: Path, served_pool, engine="local", name="run", **clip):
    """Copy a run and run ingest → download (done: skipped) → clip (+ the stages in ``then``)."""
    extra = clip.pop("then", [])
    run = tmp_path / name
    shutil.copytree(start, run)
    params = {"stage": "clip", "batch_size": 32, **clip}
    result = run_recipe(_recipe(params, *extra), served_pool.urls_path, run, engine=engine)
    assert result.stages[1].skipped, "the download should have been reused"
    return run, result


@pytest.fixture(scope="module")
def scored(downloaded, tmp_path_factory, served_pool, tiny_weights):
    """The downloaded run scored in-process with the saved tiny model; (run, clip result)."""
    tmp = tmp_path_factory.mktemp("scored")
    run, result = run_clip(
        downloaded, tmp, served_pool, model="curate-tiny", pretrained=str(tiny_weights)
    )
    return run, result.stages[2]


def embeddings(run: Path) -> pa.Table:
    table = pq.read_table(run / EMBEDDINGS)
    return table.sort_by("uid")


def vectors(column) -> np.ndarray:
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), -1)


def direct_scores(run: Path, weights: Path, uids: list[str]) -> dict[str, tuple]:
    """open_clip's own loading, transform and tokenizer on the downloaded bytes."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(
        "curate-tiny", pretrained=str(weights)
    )
    model.eval()
    tokenizer = open_clip.get_tokenizer("curate-tiny")
    images = pa.concat_tables(
        pq.read_table(f, columns=["uid", "jpg"]) for f in image_shards(run / IMAGES)
    )
    ledger = pq.read_table(run / "ledger", columns=["uid", "caption"])
    jpg = dict(zip(images["uid"].to_pylist(), images["jpg"].to_pylist()))
    caption = dict(zip(ledger["uid"].to_pylist(), ledger["caption"].to_pylist()))
    x = torch.stack([preprocess(Image.open(io.BytesIO(jpg[u]))) for u in uids])
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
        txt = torch.nn.functional.normalize(
            model.encode_text(tokenizer([caption[u] for u in uids])), dim=-1
        )
    score = (img * txt).sum(-1)
    return {u: (img[i].numpy(), txt[i].numpy(), float(score[i])) for i, u in enumerate(uids)}


def test_scores_match_a_direct_open_clip_computation(scored, tiny_weights):
    run, stage = scored
    table = embeddings(run)
    scores = table["clip_score"].to_numpy()
    assert table.num_rows == stage.counters["embedded"] > 400
    assert np.all(np.abs(scores) <= 1.0)
    norms = np.linalg.norm(vectors(table["image_embedding"]).astype(np.float32), axis=1)
    assert np.allclose(norms, 1.0, atol=2e-3)
    assert table.schema.field("image_embedding").type == pa.list_(pa.float16(), 128)
    sample = table["uid"].to_pylist()[::23]
    direct = direct_scores(run, tiny_weights, sample)
    by_uid = {u: i for i, u in enumerate(table["uid"].to_pylist())}
    for uid, (img, txt, score) in direct.items():
        i = by_uid[uid]
        assert abs(scores[i] - score) < 1e-3
        assert np.abs(vectors(table["image_embedding"])[i].astype(np.float32) - img).max() < 1e-3
        assert np.abs(vectors(table["text_embedding"])[i].astype(np.float32) - txt).max() < 1e-3
    ledger = pq.read_table(run / "ledger")
    ledger_scores = dict(zip(ledger["uid"].to_pylist(), ledger["clip_score"].to_pylist()))
    assert all(ledger_scores[u] == pytest.approx(scores[by_uid[u]], abs=0) for u in sample)


def test_ray_gives_the_same_bytes_as_in_process(
    downloaded, scored, tmp_path, served_pool, ray_local, tiny_weights
):
    local, _ = scored
    on_ray, result = run_clip(
        downloaded,
        tmp_path,
        served_pool,
        engine="ray",
        model="curate-tiny",
        pretrained=str(tiny_weights),
    )
    assert result.stages[2].counters["embedded"] > 400
    assert embeddings(on_ray).equals(embeddings(local))
    columns = ["uid", "clip_score", "keep", "dropped_by"]
    assert pq.read_table(on_ray / "ledger", columns=columns).equals(
        pq.read_table(local / "ledger", columns=columns)
    )


def test_top_fraction_keeps_exactly_datacomps_count(scored, tmp_path, served_pool, tiny_weights):
    then = [{"stage": "filter", "filters": [{"clip_score_top_fraction": {"fraction": 0.3}}]}]
    run, result = run_clip(
        scored[0], tmp_path, served_pool, model="curate-tiny", pretrained=str(tiny_weights),
        then=then,
    )  # fmt: skip
    assert result.stages[2].skipped
    ledger = pq.read_table(run / "ledger")
    scored = pq.read_table(run / "stages" / "02_clip")
    alive = scored.filter(pc.fill_null(scored["keep"], False))["clip_score"].to_numpy()
    n = int(len(alive) * 0.3)
    threshold = -np.sort(-alive)[n]
    assert pc.sum(ledger["keep"]).as_py() == int((alive >= threshold).sum()) == n + 1
    dropped = pc.equal(ledger["dropped_by"], "clip_score_top_fraction")
    assert pc.sum(dropped).as_py() == len(alive) - n - 1


def _corrupt_images(run: Path) -> dict[str, str]:
    """Damage some downloaded images in place; return uid → how."""
    shard = image_shards(run / IMAGES)[0]
    table = pq.read_table(shard)
    ok = pc.is_valid(table["jpg"]).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(ok)[:4]
    jpg = table["jpg"].to_pylist()
    uids = table["uid"].to_pylist()
    damage = {
        rows[0]: jpg[rows[0]][: len(jpg[rows[0]]) // 3],  # truncated
        rows[1]: b"\xff\xd8\xff\xe0" + b"\x00" * 200,  # a JPEG header and nothing
        rows[2]: b"<html><body>not an image</body></html>",
        rows[3]: b"",
    }
    for row, data in damage.items():
        jpg[row] = data
    table = table.set_column(table.schema.get_field_index("jpg"), "jpg", pa.array(jpg, pa.binary()))
    pq.write_table(table, shard, row_group_size=100)
    return {uids[r]: data for r, data in damage.items()}


def test_corrupt_bytes_are_recorded_drops(downloaded, tmp_path, served_pool):
    run = tmp_path / "corrupt"
    shutil.copytree(downloaded, run)
    damaged = _corrupt_images(run)
    accept_as_written(run, "stages/01_download", IMAGES)  # as if these bytes had come in
    params = {"stage": "clip", "model": "curate-tiny", "pretrained": "random", "batch_size": 16}
    result = run_recipe(_recipe(params), served_pool.urls_path, run, engine="local")
    ledger = pq.read_table(run / "ledger").to_pylist()
    by_uid = {r["uid"]: r for r in ledger}
    for uid in damaged:
        row = by_uid[uid]
        assert row["keep"] is False and row["dropped_by"] == "clip"
        assert row["clip_error"].startswith("decode") and row["clip_score"] is None
    counters = result.stages[2].counters
    assert counters["failed"] == len(damaged)
    assert result.stages[2].rows_in == result.stages[2].rows_out == len(ledger)
    kept = [r for r in ledger if r["keep"]]
    assert kept and all(r["clip_error"] is None and r["clip_score"] is not None for r in kept)


def test_a_saved_checkpoint_folder_loads_and_scores_identically(
    downloaded, scored, tmp_path, served_pool, tiny_weights
):
    """The trainer's layout: open_clip_config.json + weights in a folder."""
    import json

    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copy(tiny_weights, folder / "open_clip_model.safetensors")
    import open_clip

    from curate.clip.model_configs import register_model_configs

    register_model_configs()
    config = {"model_cfg": open_clip.get_model_config("curate-tiny"), "preprocess_cfg": {}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    by_folder, _ = run_clip(downloaded, tmp_path, served_pool, model=str(folder))
    assert embeddings(by_folder).equals(embeddings(scored[0]))


# --- model resolution: fail at start-up, with a way out ----------------------------------------


def test_unknown_architecture_suggests_names():
    from curate.clip.model import resolve_model

    with pytest.raises(ConfigError, match="did you mean: ViT-B-32"):
        resolve_model("ViT-B-33", "random")


def test_missing_weights_fail_before_any_stage_runs(tmp_path, served_pool):
    """An open_clip tag whose weights are not here: the run stops before ingest."""
    recipe = _recipe({"stage": "clip", "model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"})
    with pytest.raises(ConfigError) as info:
        run_recipe(recipe, served_pool.urls_path, tmp_path / "run", engine="local")
    message = str(info.value)
    assert "cannot get the weights of ViT-B-32 / laion2b_s34b_b79k" in message
    assert "pretrained:" in message and ".safetensors" in message
    assert not (tmp_path / "run" / "stages").exists()


def test_cli_reports_missing_weights(tmp_path, served_pool, capsys):
    from curate.cli import main

    code = main(
        ["run", "pipelines/laion.yaml", "--input", str(served_pool.urls_path),
         "--output", str(tmp_path / "run"), "--engine", "local"]
    )  # fmt: skip
    assert code == 2
    assert "cannot get the weights of ViT-B-32" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("model", "pretrained", "message"),
    [
        ("ViT-B-32", None, "needs weights"),
        ("ViT-B-32", "no_such_tag", "not a tag of ViT-B-32"),
        ("ViT-B-32", "/nonexistent/weights.safetensors", "no such weights file"),
        ("weights.safetensors", "random", "looks like a weights file"),
    ],
)
def test_bad_model_settings_say_what_to_do(model, pretrained, message):
    from curate.clip.model import resolve_model

    with pytest.raises(ConfigError, match=message):
        resolve_model(model, pretrained)


def test_a_folder_needs_its_config(tmp_path):
    from curate.clip.model import resolve_model

    with pytest.raises(ConfigError, match=r"open_clip_config\.json"):
        resolve_model(str(tmp_path), None)


class Payload:
    """Not a tensor: unpickling this would run arbitrary code."""


def test_a_torch_file_with_pickled_objects_is_refused(tmp_path, tiny_weights):
    from safetensors.torch import load_file

    from curate.clip.model import load_model, resolve_model

    state = load_file(str(tiny_weights))
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save(state, good)
    torch.save({**state, "payload": Payload()}, bad)
    model = load_model(resolve_model("curate-tiny", str(good)))
    assert torch.equal(model.state_dict()["logit_scale"], state["logit_scale"])
    with pytest.raises(ConfigError, match="cannot load the model"):
        load_model(resolve_model("curate-tiny", str(bad)))


# --- checkpoints load what they say: every tensor from the file, or an error -------------------


def _tiny_folder(folder: Path, state: dict, name: str = "open_clip_model.safetensors", **cfg):
    """A local-dir folder: curate-tiny's config (``vision_cfg`` overrides in ``cfg``) + weights."""
    import json

    import open_clip
    from safetensors.torch import save_file

    from curate.clip.model_configs import register_model_configs

    register_model_configs()
    model_cfg = open_clip.get_model_config("curate-tiny")
    model_cfg["vision_cfg"].update(cfg)
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    if name.endswith(".safetensors"):
        save_file(state, folder / name)
    else:
        torch.save(state, folder / name)
    return folder


def test_a_folder_whose_weights_open_clip_does_not_read_is_refused(tmp_path, tiny_weights):
    """open_clip's local-dir loader skips model.pt and would build a random model instead."""
    from safetensors.torch import load_file

    from curate.clip.model import resolve_model
    from curate.clip.pool import prepare_model

    folder = _tiny_folder(tmp_path / "ckpt", load_file(str(tiny_weights)), "model.pt")
    for load in (resolve_model, prepare_model):
        with pytest.raises(ConfigError) as info:
            load(str(folder), None)
        message = str(info.value)
        assert str(folder) in message and "model.pt" in message
        assert "open_clip_model.safetensors" in message and "*.bin" in message


def test_a_weights_file_missing_a_key_is_refused(tmp_path, tiny_weights):
    from safetensors.torch import load_file, save_file

    from curate.clip.model import load_model, resolve_model
    from curate.clip.pool import prepare_model

    state = load_file(str(tiny_weights))
    del state["text_projection"]
    path = tmp_path / "partial.safetensors"
    save_file(state, path)
    with pytest.raises(ConfigError, match=r"missing key.*text_projection") as info:
        load_model(resolve_model("curate-tiny", str(path)))
    assert str(path) in str(info.value)
    folder = _tiny_folder(tmp_path / "ckpt", state)
    with pytest.raises(ConfigError, match=r"missing key.*text_projection") as info:
        prepare_model(str(folder), None)
    assert str(folder) in str(info.value)


def test_a_weights_file_with_unexpected_keys_is_refused(tmp_path, tiny_weights):
    """Extra keys are an error too, named a few at a time: another architecture never half-loads."""
    from safetensors.torch import load_file, save_file

    from curate.clip.model import load_model, resolve_model
    from curate.clip.pool import prepare_model

    state = load_file(str(tiny_weights))
    path = tmp_path / "extra.safetensors"
    save_file({**state, "extra_head.weight": torch.zeros(2)}, path)
    with pytest.raises(ConfigError, match=r"unexpected key.*extra_head\.weight"):
        load_model(resolve_model("curate-tiny", str(path)))
    # A 2-layer vision tower given the 3-layer file: the third block's 12 tensors are left over.
    folder = _tiny_folder(tmp_path / "ckpt", state, layers=2)
    with pytest.raises(ConfigError, match=r"12 unexpected keys") as info:
        prepare_model(str(folder), None)
    message = str(info.value)
    assert "visual.transformer.resblocks.2." in message and "and 9 more" in message
    assert len(message) < 600


def test_full_weights_load_every_tensor_from_the_file(tmp_path, tiny_weights, caplog):
    from safetensors.torch import load_file

    from curate.clip.model import load_model, resolve_model

    state = load_file(str(tiny_weights))
    folder = _tiny_folder(tmp_path / "ckpt", state)
    for model, pretrained in (("curate-tiny", str(tiny_weights)), (str(folder), None)):
        loaded = load_model(resolve_model(model, pretrained)).state_dict()
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert "initialized randomly" not in caplog.text  # open_clip's warning would be false here
    random = [load_model(resolve_model("curate-tiny", "random")).state_dict() for _ in range(2)]
    assert torch.equal(random[0]["text_projection"], random[1]["text_projection"])
    assert not torch.equal(random[0]["text_projection"], state["text_projection"])


# --- decode and embed, unit level ---------------------------------------------------------------


def test_null_and_huge_captions_and_bad_images(tmp_path, tiny_weights):
    """decode_chunk + Embedder on a hand-made shard: every row comes back, with its reason."""
    from curate.clip.embed import DecodeSpec, Embedder, decode_chunk
    from curate.clip.model import Preprocess, load_model, resolve_model

    buffer = io.BytesIO()
    Image.new("RGB", (90, 40), (200, 30, 30)).save(buffer, "PNG")
    png = buffer.getvalue()
    shard = tmp_path / "00000.parquet"
    uids = [f"{i:032x}" for i in range(5)]
    jpg = [png, png, png[:40], None, png]
    pq.write_table(pa.table({"uid": uids, "jpg": pa.array(jpg, pa.binary())}), shard)
    todo = tmp_path / "todo.parquet"
    captions = ["a red square", None, "a red square", "x", "word " * 200_000]
    pq.write_table(
        pa.table(
            {"uid": uids, "caption": captions, "shard": [str(shard)] * 5, "column": ["jpg"] * 5,
             "row": list(range(5))}
        ),
        todo,
    )  # fmt: skip
    resolved = resolve_model("curate-tiny", str(tiny_weights))
    model = load_model(resolved)
    preprocess = Preprocess.of(model)
    item = {"chunk": 0, "file": 0, "todo": str(todo), "start": 0}
    decoded = decode_chunk(
        pa.Table.from_pylist([{**item, "stop": 5}]), DecodeSpec(resolved, preprocess)
    )
    out = Embedder(resolved, preprocess, 128, "cpu", "bf16")(decoded).to_pylist()
    assert [r["uid"] for r in out] == uids
    assert out[0]["clip_score"] is not None and out[0]["clip_error"] is None
    assert out[1]["clip_score"] is None and out[1]["text_embedding"] is None  # no caption
    assert out[1]["image_embedding"] is not None
    assert out[2]["clip_error"].startswith("decode") and out[2]["image_embedding"] is None
    assert out[3]["clip_error"] == "decode: no image bytes"
    assert out[4]["clip_score"] is not None  # a 1 MB caption is cut, not choked on


def test_a_model_that_knows_the_pool_drops_mismatched_captions(
    downloaded, tmp_path, served_pool, fixture_model
):
    """The demo manifest's ground truth: mismatched pairs fall to the top-fraction filter."""
    from curate.demo import load_manifest

    then = [{"stage": "filter", "filters": [{"clip_score_top_fraction": {"fraction": 0.5}}]}]
    run, _ = run_clip(downloaded, tmp_path, served_pool, model=str(fixture_model), then=then)
    ledger = pq.read_table(run / "ledger", columns=["uid", "dropped_by"]).to_pylist()
    defect = {r["uid"]: r["defect"] for r in load_manifest(served_pool.pool_dir)["rows"]}
    rates = {}
    for kind in ("mismatched", None):
        rows = [r for r in ledger if defect[r["uid"]] == kind
                and r["dropped_by"] in (None, "clip_score_top_fraction")]  # fmt: skip
        dropped = sum(r["dropped_by"] == "clip_score_top_fraction" for r in rows)
        rates[kind] = dropped / len(rows)
        assert len(rows) >= 20
    assert rates["mismatched"] >= 0.9 and rates[None] <= 0.4, rates


# --- DataComp's layout: precomputed vectors in, export out -------------------------------------


def _datacomp_run(pool: Path, run: Path, prefix: str):
    stages = [
        {"stage": "ingest", "format": "datacomp"},
        {"stage": "clip", "precomputed": prefix},
    ]
    return run_recipe(recipe_from_data({"name": "pre", "stages": stages}, {}, "inline"), pool, run,
                      engine="local")  # fmt: skip


def test_precomputed_vectors_give_their_cosine_without_a_model(tmp_path):
    from pools import write_datacomp_pool

    from curate.io.datacomp import read_npz_embeddings

    write_datacomp_pool(tmp_path / "pool", 300, n_files=2)
    result = _datacomp_run(tmp_path / "pool", tmp_path / "run", "b32")
    assert result.stages[1].counters["model"]["precomputed"] == "b32"
    table = embeddings(tmp_path / "run")
    ingest = tmp_path / "run" / "stages" / "00_ingest"
    img = pa.concat_tables(read_npz_embeddings(ingest, "b32_img")).sort_by("uid")
    txt = pa.concat_tables(read_npz_embeddings(ingest, "b32_txt")).sort_by("uid")
    assert table["uid"].equals(img["uid"]) and table.num_rows == 300
    assert table["image_embedding"].equals(img["embedding"])
    a = vectors(img["embedding"]).astype(np.float32)
    b = vectors(txt["embedding"]).astype(np.float32)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert np.allclose(table["clip_score"].to_numpy(), cosine, atol=1e-6)


def test_export_is_datacomp_metadata_that_reads_back(scored, tmp_path):
    from curate.cli import main

    run, _ = scored
    out = tmp_path / "export"
    assert main(["export-embeddings", str(run), "--output", str(out), "--prefix", "tiny"]) == 0
    original = embeddings(run)
    with np.load(sorted(out.glob("*.npz"))[0]) as arrays:
        assert arrays["tiny_img"].dtype == np.float16 and arrays["tiny_img"].shape[1] == 128
    meta = pq.read_table(sorted(out.glob("*.parquet"))[0])
    assert set(meta.column_names) == {"uid", "url", "text", "clip_tiny_similarity_score"}
    _datacomp_run(out, tmp_path / "again", "tiny")
    again = embeddings(tmp_path / "again")
    assert again["uid"].equals(original["uid"])
    assert again["image_embedding"].equals(original["image_embedding"])
    assert again["text_embedding"].equals(original["text_embedding"])
    # Scores from the stored fp16 vectors, not the float32 ones: close, not equal.
    diff = np.abs(again["clip_score"].to_numpy() - original["clip_score"].to_numpy())
    assert diff.max() < 2e-3
