"""The test CLIP model (tests/clip_fixture.py): it separates true from mismatched captions,
the same seed trains the same weights, and its saved folder reloads to the same bits."""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch
from clip_fixture import MODEL, load_images, save_local_dir, train_clip

from curate.clip.model_configs import register_model_configs
from curate.demo import load_manifest


def load_local_dir(path: Path):
    model = open_clip.create_model("local-dir:" + str(path))
    return model.eval(), open_clip.get_tokenizer("local-dir:" + str(path))


@torch.no_grad()
def pair_scores(model, tokenizer, pool_dir: Path, rows: list[dict]) -> torch.Tensor:
    """Cosine similarity of each row's image with its own caption."""
    images = model.encode_image(load_images(model, pool_dir, rows), normalize=True)
    texts = model.encode_text(tokenizer([row["caption"] for row in rows]), normalize=True)
    return (images * texts).sum(-1)


def auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(a random positive scores above a random negative), ties counting half."""
    above = (positive[:, None] > negative[None, :]).double().mean()
    ties = (positive[:, None] == negative[None, :]).double().mean()
    return float(above + ties / 2)


def test_register_model_configs_is_idempotent():
    register_model_configs()
    register_model_configs()
    assert MODEL in open_clip.list_models()
    assert open_clip.get_model_config(MODEL)["text_cfg"]["vocab_size"] == 49408


def test_fixture_model_separates_mismatched_captions(fixture_model: Path, demo_pool: Path):
    rows = load_manifest(demo_pool)["rows"]
    clean = [row for row in rows if row["defect"] is None]
    mismatched = [row for row in rows if row["defect"] == "mismatched"]
    assert len(clean) > 200 and len(mismatched) >= 20
    model, tokenizer = load_local_dir(fixture_model)
    score = auc(
        pair_scores(model, tokenizer, demo_pool, clean),
        pair_scores(model, tokenizer, demo_pool, mismatched),
    )
    print(f"clean vs mismatched AUC: {score:.4f}")
    assert score > 0.9


def test_training_is_deterministic_and_reloads_bitwise(demo_pool: Path, tmp_path: Path):
    model, again = (train_clip(demo_pool, seed=0, steps=2) for _ in range(2))
    first, second = model.state_dict(), again.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)

    reloaded, tokenizer = load_local_dir(save_local_dir(model, tmp_path / "model"))
    rows = [row for row in load_manifest(demo_pool)["rows"][:16] if row["defect"] is None]
    images = load_images(model, demo_pool, rows)
    assert torch.equal(images, load_images(reloaded, demo_pool, rows))
    texts = tokenizer([row["caption"] for row in rows])
    assert torch.equal(texts, open_clip.get_tokenizer(MODEL)([row["caption"] for row in rows]))
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), reloaded.encode_image(images))
        assert torch.equal(model.encode_text(texts), reloaded.encode_text(texts))
