"""negCLIPLoss and NormSim (Wang et al., 2024): each score against a direct implementation of
the paper's formula and against the reference code's own function, the batch seeding, and the
stages and recipes on DataComp-format metadata, on both engines."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from pools import write_datacomp_pool

from curate.clip import pair_scores
from curate.clip.pair_scores import batches, neg_clip_loss, norm_sim
from curate.core.config import ConfigError
from curate.core.recipe import load_recipe, recipe_from_data
from curate.report.build import write_report
from curate.runner import run_recipe

ROOT = Path(__file__).resolve().parent.parent


def _pairs(n: int, dim: int = 64, seed: int = 0) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """Unit image and text vectors, each text near its image (as CLIP pairs are)."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, dim))
    texts = images + rng.normal(scale=1.5, size=(n, dim))
    unit = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in (images, texts)]
    uids = pa.array([f"{u:032x}" for u in rng.integers(0, 2**62, n)])
    return uids, unit[0].astype(np.float16), unit[1].astype(np.float16)


def _formula(f: np.ndarray, g: np.ndarray, tau: float) -> np.ndarray:
    """negCLIPLoss of one batch, as the paper writes it, in float64."""
    s = f.astype(np.float64) @ g.astype(np.float64).T
    lse = lambda x, axis: np.log(np.exp(x - x.max()).sum(axis=axis)) + x.max()  # noqa: E731
    return np.diag(s) - tau / 2 * lse(s / tau, 1) - tau / 2 * lse(s / tau, 0)


def cal_new_clip_score(image_embedding, text_embedding, batch_size, temperature, indices):
    """ypwang61/negCLIPLoss_NormSim ``baselines/vas2.py``'s function, on the CPU, with the
    batch order passed in where it calls ``torch.randperm``."""
    img_emb_gpu, txt_emb_gpu = image_embedding.float(), text_embedding.float()
    num_batches = math.ceil(img_emb_gpu.shape[0] / batch_size)
    final_css = torch.zeros(img_emb_gpu.shape[0])
    final_norm1 = torch.zeros(img_emb_gpu.shape[0])
    final_norm2 = torch.zeros(img_emb_gpu.shape[0])
    for i in range(num_batches):
        start, end = i * batch_size, min((i + 1) * batch_size, img_emb_gpu.shape[0])
        batch_idx = indices[start:end]
        sim_scores = img_emb_gpu[batch_idx] @ txt_emb_gpu[batch_idx].T
        exp_sim_scores = torch.exp(sim_scores / temperature)
        final_css[batch_idx] = torch.diag(sim_scores)
        final_norm1[batch_idx] = 0.5 * temperature * torch.log(torch.sum(exp_sim_scores, dim=1))
        final_norm2[batch_idx] = 0.5 * temperature * torch.log(torch.sum(exp_sim_scores, dim=0))
    return final_css, final_norm1, final_norm2


def test_one_batch_is_the_papers_formula():
    uids, f, g = _pairs(50)
    for tau in (0.01, 0.07):
        ours = neg_clip_loss(uids, f, g, batch_size=64, repeats=3, temperature=tau, seed=0)
        np.testing.assert_allclose(ours, _formula(f, g, tau), atol=1e-5)


def test_random_batches_average_as_the_reference_code_does():
    """Repeats × batches of at most 16 of 70 rows (five of 14): the reference's function on
    each of our batches, averaged over repeats as its ``average_num`` loop does."""
    uids, f, g = _pairs(70)
    repeats, size, tau = 4, 16, 0.07
    ours = neg_clip_loss(uids, f, g, batch_size=size, repeats=repeats, temperature=tau, seed=5)
    css, norms = torch.zeros(70), torch.zeros(70)
    for repeat in range(repeats):
        order = batches(uids, size, seed=5, repeat=repeat)
        assert [len(b) for b in order] == [14] * 5
        for rows in order:
            index = torch.from_numpy(rows)
            c, n1, n2 = cal_new_clip_score(
                torch.from_numpy(f[rows]), torch.from_numpy(g[rows]), len(rows), tau,
                torch.arange(len(rows)),
            )  # fmt: skip
            css[index], norms[index] = css[index] + c, norms[index] + n1 + n2
    np.testing.assert_allclose(ours, ((css - norms) / repeats).numpy(), atol=1e-5)
    assert [len(b) for b in batches(uids, 35, 0, 0)] == [35, 35]
    assert [len(b) for b in batches(uids, 69, 0, 0)] == [35, 35]  # not 69 and 1


def test_batches_are_seeded_and_blind_to_row_order():
    uids, f, g = _pairs(90)
    first = batches(uids, 32, seed=1, repeat=0)
    assert sorted(np.concatenate(first).tolist()) == list(range(90))  # a partition of the rows
    again = [uids.take(pa.array(b)).to_pylist() for b in batches(uids, 32, seed=1, repeat=0)]
    assert again == [uids.take(pa.array(b)).to_pylist() for b in first]
    other = batches(uids, 32, seed=1, repeat=1)
    assert [b.tolist() for b in other] != [b.tolist() for b in first]

    score = neg_clip_loss(uids, f, g, 32, 3, 0.01, seed=1)
    shuffled = np.random.default_rng(9).permutation(90)
    moved = neg_clip_loss(uids.take(pa.array(shuffled)), f[shuffled], g[shuffled], 32, 3, 0.01, 1)
    np.testing.assert_allclose(moved, score[shuffled], atol=1e-6)  # the same score per uid
    assert not np.allclose(neg_clip_loss(uids, f, g, 32, 3, 0.01, seed=2), score)


def test_a_generic_caption_scores_lower_than_a_specific_one_of_equal_clip_score():
    """The point of the score: of two pairs with the same CLIP score, the one whose caption
    is near every image (the images' mean direction) is discounted more."""
    uids, f, g = _pairs(40)
    f, g = f.astype(np.float32), g.astype(np.float32)
    rng = np.random.default_rng(3)

    def pair(text: np.ndarray, cosine: float) -> tuple[np.ndarray, np.ndarray]:
        text = text / np.linalg.norm(text)
        other = rng.normal(size=len(text))
        other -= (other @ text) * text
        image = cosine * text + np.sqrt(1 - cosine**2) * other / np.linalg.norm(other)
        return image, text

    f[0], g[0] = pair(f[2:].mean(axis=0), 0.4)  # generic: the mean of the images
    f[1], g[1] = pair(rng.normal(size=f.shape[1]), 0.4)  # specific: a direction of its own
    score = neg_clip_loss(uids, f, g, 64, 1, 0.07, 0)
    assert (f[0] @ g[0]) == pytest.approx(f[1] @ g[1], abs=1e-6)
    assert score[0] < score[1] - 0.01


def test_norm_sim_is_the_p_norm_of_cosines_to_the_targets(monkeypatch):
    _, f, _ = _pairs(30, seed=1)
    _, targets, _ = _pairs(7, seed=2)
    cos = f.astype(np.float64) @ targets.astype(np.float64).T
    two, inf = np.sqrt((cos**2).sum(1)), np.abs(cos).max(1)
    np.testing.assert_allclose(norm_sim(f, targets, 2.0), two, atol=1e-5)
    np.testing.assert_allclose(norm_sim(f, targets, math.inf), inf, atol=1e-5)
    # Blocks of 4 rows and 3 targets: the same numbers.
    monkeypatch.setattr(pair_scores, "ROW_BLOCK", 8)
    monkeypatch.setattr(pair_scores, "TARGET_BLOCK", 3)
    np.testing.assert_allclose(norm_sim(f, targets, 2.0), two, atol=1e-5)
    np.testing.assert_allclose(norm_sim(f, targets, math.inf), inf, atol=1e-5)


# --- the stages and recipes ------------------------------------------------------------------


@pytest.fixture(scope="module")
def metadata(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("negclip") / "metadata"
    write_datacomp_pool(folder, 600, n_files=3, seed=3)
    return folder


def _targets(folder: Path) -> Path:
    """A target set as a Parquet of L/14-shaped vectors (12 wide in these pools)."""
    rng = np.random.default_rng(4)
    vectors = rng.normal(size=(5, 12)).astype(np.float32)
    path = folder / "targets.parquet"
    pq.write_table(pa.table({"name": list("abcde"), "image_embedding": vectors.tolist()}), path)
    return path


def _vectors(run: Path, column: str) -> dict[str, np.ndarray]:
    table = pq.read_table(run / "embeddings", columns=["uid", column])
    return dict(zip(table["uid"].to_pylist(), np.array(table[column].to_pylist(), np.float16)))


def _expected(run: Path, score) -> dict[str, float]:
    """The score of every alive row, computed here ledger file by ledger file."""
    out = {}
    embeddings = pq.read_table(run / "embeddings")
    for index in sorted(set(embeddings["file"].to_pylist())):
        rows = embeddings.filter(pc.equal(embeddings["file"], index))
        f = np.array(rows["image_embedding"].to_pylist(), np.float16)
        g = np.array(rows["text_embedding"].to_pylist(), np.float16)
        out.update(zip(rows["uid"].to_pylist(), score(rows["uid"].combine_chunks(), f, g)))
    return out


def _top(uids: list[str], scores: np.ndarray, fraction: float) -> set[str]:
    """DataComp's top fraction: the score at index int(N × fraction), and every row at least it."""
    threshold = np.sort(scores)[::-1][int(len(scores) * fraction)]
    return {u for u, s in zip(uids, scores) if s >= threshold}


@pytest.mark.parametrize("engine", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_the_datacomp_normsim_recipe(metadata, tmp_path, engine, request):
    if engine == "ray":
        request.getfixturevalue("ray_local")
    target = _targets(tmp_path)
    overrides = [f"norm_sim.target={target}", "neg_clip_loss.batch_size=64"]
    recipe = load_recipe(str(ROOT / "pipelines" / "datacomp_normsim.yaml"), overrides)
    run = tmp_path / "run"
    result = run_recipe(recipe, metadata, run, engine=engine)
    ledger = {r["uid"]: r for r in pq.read_table(run / "ledger").to_pylist()}
    assert len(ledger) == 600 and result.stages[2].counters["scored"] == 600

    def negclip(uids, f, g):  # the recipe's stage: batches of at most 64, 10 repeats
        return neg_clip_loss(uids, f, g, 64, 10, 0.01, seed=0)

    expected = _expected(run, negclip)
    uids = list(expected)
    got = np.array([ledger[u]["neg_clip_loss"] for u in uids])
    np.testing.assert_allclose(got, list(expected.values()), atol=1e-6)

    targets = np.array(pq.read_table(target)["image_embedding"].to_pylist(), np.float32)
    targets /= np.linalg.norm(targets, axis=1, keepdims=True)
    images = _vectors(run, "image_embedding")
    norms = np.array([ledger[u]["norm_sim"] for u in uids])
    direct = [np.abs(targets @ images[u].astype(np.float32)).max() for u in uids]
    np.testing.assert_allclose(norms, direct, atol=1e-5)

    first = _top(uids, got, 0.3)
    inside = [u for u in uids if u in first]
    second = _top(inside, np.array([ledger[u]["norm_sim"] for u in inside]), 0.6667)
    assert {u for u, r in ledger.items() if r["keep"]} == second
    assert len(first) == 181 and len(second) == 121  # 30 %, then 20 % of the pool (+ the cut)
    assert all(r["dropped_by"] in (None, "clip_score_top_fraction") for r in ledger.values())
    # Both cuts drop under one filter name: the report counts them once, all of them.
    report = write_report(recipe, result)
    assert report["dropped"]["clip_score_top_fraction"] == 600 - 121
    assert report["funnel"][-1]["remaining"] == report["rows_out"] == 121


def test_zero_target_vectors_are_left_out(metadata, tmp_path):
    """A zero vector has no direction: counted unusable, not a NaN in every row's score."""
    path = tmp_path / "zeros.parquet"
    vectors = [[0.0] * 12, [1.0] + [0.0] * 11]
    pq.write_table(pa.table({"name": ["zero", "x"], "image_embedding": vectors}), path)
    overrides = [f"norm_sim.target={path}", "neg_clip_loss.batch_size=64"]
    recipe = load_recipe(str(ROOT / "pipelines" / "datacomp_normsim.yaml"), overrides)
    result = run_recipe(recipe, metadata, tmp_path / "run", engine="local")
    assert result.stages[3].counters == {
        "targets": 1, "targets_unusable": 1, "scored": 600, "no_vectors": 0
    }  # fmt: skip
    ledger = pq.read_table(tmp_path / "run" / "ledger")
    assert not np.isnan(ledger["norm_sim"].to_numpy()).any()
    pq.write_table(pa.table({"name": ["zero"], "image_embedding": vectors[:1]}), path)
    with pytest.raises(ConfigError, match="every vector is zero"):
        run_recipe(recipe, metadata, tmp_path / "again", engine="local")


def test_the_stages_need_a_clip_stage_and_a_target(metadata, tmp_path):
    data = {"name": "x", "stages": [{"stage": "ingest"}, {"stage": "neg_clip_loss"}]}
    with pytest.raises(ConfigError, match="neg_clip_loss: needs the pool's CLIP vectors"):
        run_recipe(recipe_from_data(data, {}, "inline"), metadata, tmp_path / "a", engine="local")
    data["stages"][1] = {"stage": "norm_sim"}
    with pytest.raises(ConfigError, match="target is required"):
        recipe_from_data(data, {}, "inline")
