"""The bundled trainer on real shards of the demo pool: losses, data stream, checkpoints.

The pool is downloaded (64 px) and sharded once (module fixture): 100 rows a
file in row groups of 50, so two workers share about ten row groups.

The models are ``test-micro``, a config registered here: ``curate-tiny`` takes
0.4 s a step at batch 32 on two shared CPU cores, and a few hundred steps of it
would take most of a minute and a half; this one is 32 px, two layers a tower
(4x fewer image tokens, half the width), about four times faster.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import curate.train.shards as shard_stage
from curate.core.config import ConfigError
from curate.core.layout import EMBEDDINGS
from curate.core.recipe import recipe_from_data
from curate.runner import run_recipe
from curate.train.dataset import ShardDataset, crop_steps, find_shards, normalise, row_groups
from curate.train.losses import clip_loss, siglip_loss
from curate.train.trainer import TrainConfig, model_name, train

DOWNLOAD = {"stage": "download", "allow_private_networks": True, "image_size": 64}
SHARD = {"stage": "shard", "rows_per_shard": 100}
ROWS_PER_GROUP = 50
MICRO = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
STEPS = 200
#: The loss-curve run: enough steps for the loss to fall well below ln(32) ≈ 3.47 (to
#: about 0.8: 13 epochs of 473 rows). One worker: the other core trains.
LONG = TrainConfig(model="test-micro", samples_seen=32 * STEPS, batch_size=32, warmup=20, workers=1)
#: Short runs: reproducibility, SigLIP.
SHORT = TrainConfig(model="test-micro", samples_seen=16 * 8, batch_size=16, warmup=2)


def _recipe(*stages: dict):
    data = {"name": "trainer_test", "stages": [{"stage": "ingest"}, DOWNLOAD, *stages]}
    return recipe_from_data(data, {}, "inline")


@pytest.fixture(scope="module", autouse=True)
def micro_model(tmp_path_factory) -> None:
    """Make open_clip know ``test-micro`` (the trainer takes any registered architecture)."""
    import open_clip

    folder = tmp_path_factory.mktemp("model_configs")
    (folder / "test-micro.json").write_text(json.dumps(MICRO))
    open_clip.add_model_config(folder)


@pytest.fixture(scope="module")
def run(served_pool, tmp_path_factory) -> Path:
    """A run folder of the demo pool: ingested, downloaded at 64 px, sharded."""
    run = tmp_path_factory.mktemp("trainer") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shard_stage, "ROWS_PER_GROUP", ROWS_PER_GROUP)
        run_recipe(_recipe(SHARD), served_pool.urls_path, run, engine="local")
    return run


@pytest.fixture(scope="module")
def trained(run, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("trained") / "ckpt"
    return out, train(run / "shards", out, LONG)


# --- the losses --------------------------------------------------------------------------------


def _numpy_features(seed: int = 0, n: int = 6, d: int = 8):
    rng = np.random.default_rng(seed)
    image, text = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    return image, text


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def test_losses_match_a_direct_numpy_computation():
    import open_clip.loss

    image, text = _numpy_features()
    scale, bias = 14.3, -3.5
    logits = scale * image @ text.T
    want_clip = -(np.diag(_log_softmax(logits)).mean() + np.diag(_log_softmax(logits.T)).mean()) / 2
    labels = 2 * np.eye(len(image)) - 1
    want_siglip = np.log1p(np.exp(-labels * (logits + bias))).sum() / len(image)

    t_image, t_text = torch.tensor(image), torch.tensor(text)
    t_scale, t_bias = torch.tensor(scale, dtype=torch.float64), torch.tensor(bias)
    assert clip_loss(t_image, t_text, t_scale).item() == pytest.approx(want_clip, rel=1e-12)
    assert siglip_loss(t_image, t_text, t_scale, t_bias).item() == pytest.approx(
        want_siglip, rel=1e-12
    )
    # ... and open_clip's own classes agree.
    theirs = open_clip.loss.ClipLoss()(t_image, t_text, t_scale)
    assert theirs.item() == pytest.approx(want_clip, rel=1e-12)
    theirs = open_clip.loss.SigLipLoss()(t_image, t_text, t_scale, t_bias)
    assert theirs.item() == pytest.approx(want_siglip, rel=1e-12)


# --- the data stream ---------------------------------------------------------------------------


class UidDataset(ShardDataset):
    """The trainer's dataset with each sample replaced by its uid: which rows arrive, where."""

    def sample(self, row: dict) -> str:
        return row["uid"]


def _epoch(dataset: UidDataset, epoch: int, workers: int) -> list[str]:
    dataset.epoch = epoch
    return list(DataLoader(dataset, batch_size=None, num_workers=workers))


def test_workers_never_repeat_rows_within_an_epoch(run):
    groups = row_groups(find_shards(run))  # the run folder: its shards/ is found
    assert len(groups) >= 8
    everyone = pq.read_table(run / "shards", columns=["uid"])["uid"].to_pylist()
    dataset = UidDataset(groups, None, None, seed=0)
    epochs = [_epoch(dataset, epoch, workers=2) for epoch in (0, 1)]
    for seen in epochs:
        assert len(seen) == len(everyone) and sorted(seen) == sorted(everyone)
    assert epochs[0] != epochs[1], "each epoch reshuffles"
    assert _epoch(dataset, 0, workers=2) == epochs[0], "the same seed gives the same order"
    # Each (epoch, row group) goes to one worker: the two workers' groups split the list.
    dataset.epoch = 0
    first, second = dataset.assigned(0, 2), dataset.assigned(1, 2)
    assert sorted(first + second) == list(range(len(groups))) and not set(first) & set(second)
    assert UidDataset(groups, None, None, seed=1).assigned(0, 2) != first


def test_samples_are_open_clips_train_transform(run):
    """uint8 crops from the workers, normalised on the device: open_clip's floats, bit for bit."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = open_clip.get_model_preprocess_cfg(open_clip.create_model("test-micro"))
    full = image_transform_v2(PreprocessCfg(**cfg), is_train=True)
    mean, std = (torch.tensor(cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    rows = pq.read_table(run / "shards", columns=["image"])["image"].to_pylist()[:20]
    for seed, row in enumerate(rows):
        image = Image.open(io.BytesIO(row["bytes"])).convert("RGB")
        torch.manual_seed(seed)
        want = full(image)
        torch.manual_seed(seed)
        crop = torch.from_numpy(np.array(crop_steps(cfg)(image)))
        assert torch.equal(normalise(crop[None], mean, std)[0], want)


def test_jpeg_draft_decodes_at_a_reduced_scale_and_trains(run, tmp_path):
    """Draft crops have the model's shape, differ from full decoding's only for JPEGs, and
    a run with them records the choice."""
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(open_clip.create_model("test-micro"))
    groups = row_groups(find_shards(run / "shards"))
    full, draft = (ShardDataset(groups, crop_steps(cfg), open_clip.get_tokenizer("test-micro"),
                                0, d) for d in (0, 16))  # fmt: skip
    rows = list(full.group_rows(0))[:10]
    png = io.BytesIO()
    Image.open(io.BytesIO(rows[0]["image"])).save(png, "PNG")
    differ = []
    for row in [*rows, {**rows[0], "image": png.getvalue()}]:
        torch.manual_seed(0)
        a, _ = full.sample(row)
        torch.manual_seed(0)
        b, _ = draft.sample(row)
        assert a.shape == b.shape == (32, 32, 3)
        differ.append(not torch.equal(a, b))
    # the downloads are 64 px on the long side, so ≥ 16 px halves every one; the PNG is untouched
    assert all(differ[:-1]) and not differ[-1]
    metrics = train(run / "shards", tmp_path / "ckpt", replace(SHORT, jpeg_draft=True))
    assert metrics["config"]["jpeg_draft"] and metrics["steps"] == 8


def test_device_decoding_draws_the_same_boxes_and_crops_within_rounding(run):
    """decode: gpu's data path, run here on the CPU (TorchCodec's CPU decoder): workers ship
    JPEG bytes with the box RandomResizedCrop would draw, the same boxes as decoding in the
    worker, and the device's crops match the workers' within resize rounding."""
    import open_clip

    from curate.train.dataset import DeviceCrops, Encoded, collate

    cfg = open_clip.get_model_preprocess_cfg(open_clip.create_model("test-micro"))
    groups = row_groups(find_shards(run / "shards"))
    tokenizer = open_clip.get_tokenizer("test-micro")
    worker = ShardDataset(groups, crop_steps(cfg), tokenizer, 0)
    device = ShardDataset(groups, crop_steps(cfg), tokenizer, 0, on_device=True)
    rows = list(worker.group_rows(0))[:16]
    png = io.BytesIO()
    Image.open(io.BytesIO(rows[0]["image"])).save(png, "PNG")
    rows.append({**rows[0], "image": png.getvalue()})  # decoded by the worker either way
    torch.manual_seed(7)
    want = torch.stack([worker.sample(row)[0] for row in rows])
    torch.manual_seed(7)
    shipped = [device.sample(row) for row in rows]
    assert [isinstance(image, Encoded) for image, _ in shipped] == [True] * 16 + [False]
    got = DeviceCrops(device.crop, torch.device("cpu"))(collate(shipped))
    diff = (got.int() - want.int()).abs()
    assert got.shape == want.shape and diff.float().mean() < 0.3 and diff.max() <= 8
    assert torch.equal(got[-1], want[-1])  # the PNG's crop is the worker's own

    broken = {**rows[0], "image": rows[0]["image"][:300] + b"\x00" * 64 + b"\xff\xd9"}
    with pytest.raises(ValueError, match=f"row {rows[0]['uid']}: bad image"):
        DeviceCrops(device.crop, torch.device("cpu"))(collate([device.sample(broken)]))


def test_decode_gpu_needs_a_gpu(run, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="decode gpu"):
        train(run / "shards", tmp_path / "ckpt", replace(SHORT, decode="gpu"))


# --- training ----------------------------------------------------------------------------------


def test_a_few_hundred_steps_reduce_the_loss(trained):
    out, metrics = trained
    assert metrics["steps"] == STEPS and metrics["samples_seen"] == 32 * STEPS
    curve = [loss for _, loss in metrics["loss_curve"]]
    assert len(curve) == STEPS
    first, last = np.mean(curve[:20]), np.mean(curve[-20:])
    assert first > 3.0 and last < first - 1.0, (first, last)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    with Image.open(out / "loss.png") as png:
        assert png.format == "PNG" and png.size[0] > 300


def test_training_is_reproducible_from_the_seed(run, tmp_path, capsys):
    from curate.cli import main

    first = train(run / "shards", tmp_path / "a", SHORT)
    argv = ["train", "--shards", str(run), "--out", str(tmp_path / "b"), "--config", "test-micro",
            "--samples-seen", "128", "--batch-size", "16", "--warmup", "2"]  # fmt: skip
    assert main(argv) == 0
    assert "8 steps" in capsys.readouterr().out
    other = train(run / "shards", tmp_path / "c", replace(SHORT, seed=1))
    weights = [(tmp_path / n / "open_clip_model.safetensors").read_bytes() for n in "abc"]
    assert weights[0] == weights[1], "same shards, same config: the same weights"
    assert weights[0] != weights[2], "another seed: other weights"
    assert first["final_loss"] != other["final_loss"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_trains_under_autocast(run, tmp_path, precision):
    import open_clip

    config = replace(SHORT, device="cuda", precision=precision)
    metrics = train(run / "shards", tmp_path / "gpu", config)
    assert metrics["device"] == "cuda" and metrics["precision"] == precision
    assert np.isfinite([loss for _, loss in metrics["loss_curve"]]).all()
    model = open_clip.create_model(f"local-dir:{tmp_path / 'gpu'}")  # float32 weights, on CPU
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_siglip_trains_and_saves_its_bias(run, tmp_path):
    import open_clip

    metrics = train(run / "shards", tmp_path / "s", replace(SHORT, loss="siglip"))
    state = load_file(tmp_path / "s" / "open_clip_model.safetensors")
    assert "logit_bias" in state
    assert float(state["logit_bias"]) == pytest.approx(metrics["logit_bias"])
    assert metrics["logit_bias"] != -10.0, "the bias is learned"
    model = open_clip.create_model(f"local-dir:{tmp_path / 's'}")  # strict: every key matches
    assert torch.equal(model.logit_bias.detach(), state["logit_bias"])


# --- checkpoints -------------------------------------------------------------------------------


def test_the_checkpoint_scores_identically_through_the_clip_stage(trained, run, tmp_path,
                                                                  served_pool):  # fmt: skip
    import open_clip

    ckpt, _ = trained
    scored = tmp_path / "scored"
    shutil.copytree(run, scored)
    clip = {"stage": "clip", "model": str(ckpt), "batch_size": 64}
    result = run_recipe(_recipe(clip), served_pool.urls_path, scored, engine="local")
    assert result.stages[1].skipped, "the download should have been reused"
    table = pq.read_table(scored / EMBEDDINGS, columns=["uid", "clip_score"])
    by_stage = dict(zip(table["uid"].to_pylist(), table["clip_score"].to_pylist()))

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{ckpt}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{ckpt}")
    rows = pq.read_table(run / "shards", columns=["uid", "caption", "image"]).to_pylist()[::7]
    images = torch.stack([preprocess(Image.open(io.BytesIO(r["image"]["bytes"]))) for r in rows])
    with torch.no_grad():
        image = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
        text = torch.nn.functional.normalize(
            model.encode_text(tokenizer([r["caption"] for r in rows])), dim=-1
        )
    direct = (image * text).sum(-1).tolist()
    assert len(rows) > 50
    for row, score in zip(rows, direct):
        assert by_stage[row["uid"]] == pytest.approx(score, abs=1e-3)
    matched = np.mean(direct)
    shuffled = (image * text.roll(1, 0)).sum(-1).mean().item()
    assert matched > shuffled + 0.1, "the trained model tells matched pairs from others"


# --- errors ------------------------------------------------------------------------------------


def test_shards_without_images_are_refused(tmp_path, capsys):
    from curate.cli import main

    shards = tmp_path / "shards"
    shards.mkdir()
    with pytest.raises(ConfigError, match="no shard-"):
        train(shards, tmp_path / "out", SHORT)
    table = pa.table({"uid": ["0" * 32], "caption": ["a red square"]})
    pq.write_table(table, shards / "shard-00000.parquet")
    with pytest.raises(ConfigError, match=r"no image column.*no download stage"):
        train(shards, tmp_path / "out", SHORT)
    assert main(["train", "--shards", str(shards), "--out", str(tmp_path / "out")]) == 2
    assert "no image column" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    schema = pa.schema([*table.schema, pa.field("image", shard_stage.IMAGE_TYPE)])
    pq.write_table(schema.empty_table(), shards / "shard-00000.parquet")
    with pytest.raises(ConfigError, match="hold no rows"):
        train(shards, tmp_path / "out", SHORT)


def test_a_checkpoint_is_never_overwritten(run, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "open_clip_model.safetensors").write_bytes(b"earlier")
    with pytest.raises(ConfigError, match="not an empty folder"):
        train(run / "shards", tmp_path / "out", SHORT)


def test_config_names():
    assert model_name("tiny") == "curate-tiny"
    assert model_name("ViT-B-32") == "ViT-B-32"
    with pytest.raises(ConfigError, match="curate-tiny"):
        TrainConfig(model="ViT-B-33").check()
    with pytest.raises(ConfigError, match="less than one batch"):
        TrainConfig(samples_seen=10, batch_size=16).check()
    # A bad seed or learning rate is refused before training, not by numpy mid-run.
    for seed in (-1, 2**63):
        with pytest.raises(ConfigError, match=f"seed {seed}: expected an integer"):
            TrainConfig(seed=seed).check()
    for bad in ({"lr": 0.0}, {"lr": float("nan")}, {"weight_decay": -1.0}):
        with pytest.raises(ConfigError, match="lr must be > 0"):
            TrainConfig(**bad).check()
