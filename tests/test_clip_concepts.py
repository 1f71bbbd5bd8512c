"""The clip_concepts filter: exact decisions on a hand-built run, then the real runner on the
demo pool with the small CLIP trained on it (tests/clip_fixture.py)."""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from test_clip_stage import downloaded, run_clip  # noqa: F401  (a module fixture, reused)

from curate.clip.model_configs import register_model_configs
from curate.core.config import ConfigError, build
from curate.core.filtering import apply_filters
from curate.core.operators import FILTERS, FitContext, load_registry
from curate.demo import VOCABULARY, load_manifest
from curate.engine.local import LocalEngine
from curate.filters.clip_concepts import (
    ARTIFACT,
    DEFAULT_REFERENCE,
    PROMPTS_JSON,
    PROMPTS_NPZ,
    ClipConcepts,
)

load_registry()
FILTER_SETS = Path(__file__).resolve().parent.parent / "filters"
UNWANTED = ["a photo of a watermark", "an nsfw photo"]


# --- unit: a run folder built by hand -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, open_clip.CLIP]:
    """A randomly initialised curate-tiny saved as safetensors, and the model itself."""
    from safetensors.torch import save_file

    register_model_configs()
    torch.manual_seed(123)
    model = open_clip.create_model("curate-tiny").eval()
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model


def text_embeddings(model, prompts: list[str]) -> np.ndarray:
    """open_clip's own tokenizer and text tower, L2-normalised."""
    with torch.no_grad():
        out = model.encode_text(open_clip.get_tokenizer("curate-tiny")(prompts), normalize=True)
    return out.numpy().astype(np.float32)


def fp16_column(rows: list[np.ndarray | None], dim: int) -> pa.Array:
    """As the clip stage stores vectors: fp16 fixed_size_list, null where there is none."""
    valid = np.array([r is not None for r in rows])
    dense = np.stack([np.zeros(dim) if r is None else r for r in rows]).astype(np.float16)
    return pa.FixedSizeListArray.from_arrays(pa.array(dense.ravel()), dim, mask=pa.array(~valid))


def uid(i: int) -> str:
    return f"{i:032x}"


@pytest.fixture
def hand_run(tmp_path, tiny) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """RUN/embeddings/ (two files) + _model.json, and a ledger file; uid → image vector."""
    weights, model = tiny
    u = text_embeddings(model, UNWANTED)
    r = text_embeddings(model, list(DEFAULT_REFERENCE))
    images = {uid(0): u[0], uid(1): u[1], uid(2): r[0], uid(3): r[2], uid(4): None}
    emb = tmp_path / "run" / "embeddings"
    emb.mkdir(parents=True)
    (emb / "_model.json").write_text(
        json.dumps({"model": "curate-tiny", "pretrained": str(weights), "embed_dim": 128})
    )
    keys = list(images)
    for part, chunk in enumerate((keys[:2], keys[2:])):
        table = pa.table(
            {
                "uid": chunk,
                "image_embedding": fp16_column([images[k] for k in chunk], 128),
                "text_embedding": fp16_column([None] * len(chunk), 128),
            }
        )
        pq.write_table(table, emb / f"part-{part:05d}.parquet")
    ledger = pa.table(
        {
            "uid": [uid(i) for i in range(6)],  # uid 5 is not in embeddings/
            "keep": [True] * 6,
            "dropped_by": pa.nulls(6, pa.string()),
        }
    )
    ledger_file = tmp_path / "run" / "ledger.parquet"
    pq.write_table(ledger, ledger_file)
    return tmp_path / "run", ledger_file, images


def fitted(run: Path, ledger_file: Path, stats: Path, **params) -> ClipConcepts:
    flt = build(FILTERS["clip_concepts"], params, "test")
    stats.mkdir(parents=True)
    flt.fit(FitContext([ledger_file], stats, 0, run, engine=LocalEngine()))
    flt = pickle.loads(pickle.dumps(flt))  # as shipped to a Ray worker
    flt.load(stats)  # as each worker does, from the folder the stage declares
    return flt


def oracle_margin(image: np.ndarray, u: np.ndarray, r: np.ndarray) -> float:
    e = image.astype(np.float16).astype(np.float64)
    e /= np.linalg.norm(e)
    return float((u @ e).max() - (r @ e).max())


def test_exact_decisions_concepts_and_margins(hand_run, tiny, tmp_path):
    run, ledger_file, images = hand_run
    flt = fitted(run, ledger_file, tmp_path / "stats", unwanted=UNWANTED)
    assert flt.reference == list(DEFAULT_REFERENCE) and flt.margin == 0.0
    batch = pq.read_table(ledger_file)
    assert flt.keep(batch.select(["uid"])).tolist() == [False, False, True, True, False, False]
    out = apply_filters(batch, [flt], {})
    assert (
        out["dropped_by"].to_pylist() == ["clip_concepts"] * 2 + [None] * 2 + ["clip_concepts"] * 2
    )

    art = pq.read_table(tmp_path / "stats" / ARTIFACT)
    assert art.schema.field("concept_margin").type == pa.float32()
    assert art["uid"].to_pylist() == [uid(i) for i in range(5)]
    assert art["concept"].to_pylist()[:2] == UNWANTED and art["concept"][4].as_py() is None
    _, model = tiny
    u = text_embeddings(model, UNWANTED).astype(np.float64)
    r = text_embeddings(model, list(DEFAULT_REFERENCE)).astype(np.float64)
    margins = art["concept_margin"].to_pylist()
    assert margins[4] is None
    for i in range(4):
        assert margins[i] == pytest.approx(oracle_margin(images[uid(i)], u, r), abs=1e-5)
    assert margins[0] > 0.05 and margins[1] > 0.05 and margins[2] < -0.05 and margins[3] < -0.05

    saved = np.load(tmp_path / "stats" / PROMPTS_NPZ)
    assert np.abs(saved["unwanted"] - u).max() < 1e-5 and saved["reference"].shape == (4, 128)
    info = json.loads((tmp_path / "stats" / PROMPTS_JSON).read_text())
    assert info["unwanted"] == UNWANTED and info["model"]["model"] == "curate-tiny"

    # The margins do not depend on `margin`: the same artifact, re-read with a larger one,
    # keeps every row whose margin is at most it (the boundary is kept), and still drops
    # the rows it cannot judge.
    loose = ClipConcepts(UNWANTED, margin=max(margins[:4]))
    loose.load(tmp_path / "stats")
    assert loose.keep(batch).tolist() == [True, True, True, True, False, False]
    just_below = ClipConcepts(UNWANTED, margin=float(np.nextafter(np.float32(margins[1]), -1)))
    just_below.load(tmp_path / "stats")
    assert just_below.keep(batch).tolist()[:4] == [margins[0] < margins[1], False, True, True]


def test_needs_a_clip_stage_and_a_prompt_model(hand_run, tmp_path):
    run, ledger_file, _ = hand_run
    with pytest.raises(ConfigError, match="a clip stage must run before this filter"):
        fitted(tmp_path / "elsewhere", ledger_file, tmp_path / "a", unwanted=UNWANTED)
    (run / "embeddings" / "_model.json").write_text(
        json.dumps({"precomputed": "b32", "model": "ViT-B-32", "pretrained": None})
    )
    with pytest.raises(ConfigError, match="Set `model` and `pretrained` on the clip stage"):
        fitted(run, ledger_file, tmp_path / "b", unwanted=UNWANTED)


@pytest.mark.parametrize(
    "params, message",
    [
        ({}, "missing required key 'unwanted'"),
        ({"unwanted": []}, "at least one prompt"),
        ({"unwanted": "an nsfw photo"}, "expected a list"),
        ({"unwanted": ["a photo"]}, "both unwanted and reference"),
        ({"unwanted": ["x", " "]}, "non-empty string"),
        ({"unwanted": ["x"], "margin": float("nan")}, "NaN"),
    ],
)
def test_parameters_are_checked(params, message):
    with pytest.raises(ConfigError, match=message):
        build(FILTERS["clip_concepts"], params, "test")


def test_unwanted_concepts_set_builds():
    data = yaml.safe_load((FILTER_SETS / "unwanted_concepts.yaml").read_text())
    assert set(data) == {"description", "filters"} and len(data["description"]) > 80
    ((name, params),) = data["filters"][0].items()
    flt = build(FILTERS[name], params, name)
    assert name == "clip_concepts" and flt.margin == 0.0 and flt.needs == ("uid",)
    assert any("watermark" in p for p in flt.unwanted) and any("nsfw" in p for p in flt.unwanted)
    assert pickle.loads(pickle.dumps(flt)) == flt


# --- integration: the runner, the demo pool and a CLIP trained on it ---------------------------

COLOUR = "green"  # one the fixture model tells well; red and white it barely separates
PROMPT = "a picture of a {} shape"


def colours(row: dict) -> tuple[set[str], str]:
    """The manifest's colours of a row's objects, and of its background."""
    return {c["colour"] for c in row["concepts"] or []}, (row["background"] or {}).get("colour")


def drop_rate(rows: list[dict]) -> float:
    return float(np.mean([r["dropped_by"] == "clip_concepts" for r in rows]))


def test_drops_a_colour_through_the_runner(downloaded, fixture_model, tmp_path, served_pool):  # noqa: F811
    """Unwanted "a picture of a green shape" against the ten other colours, through the runner:
    rows with a green object are dropped far more often than the others, and the others that
    are dropped have a green background (the image is green there too)."""
    if not (Path(fixture_model) / "open_clip_config.json").is_file():
        pytest.skip("fixture_model did not produce an open_clip folder")
    others = [c for c in VOCABULARY["colour"] if c != COLOUR]
    concepts = {
        "unwanted": [PROMPT.format(COLOUR)],
        "reference": [PROMPT.format(c) for c in others],
    }
    then = [{"stage": "filter", "filters": [{"clip_concepts": concepts}]}]
    start = time.perf_counter()
    run, result = run_clip(downloaded, tmp_path, served_pool, model=str(fixture_model), then=then)
    seconds = time.perf_counter() - start
    assert result.stages[3].rows_in == result.stages[3].rows_out

    ledger = pq.read_table(run / "ledger", columns=["uid", "keep", "dropped_by"]).to_pylist()
    manifest = {row["uid"]: row for row in load_manifest(served_pool.pool_dir)["rows"]}
    judged = [r for r in ledger if r["keep"] or r["dropped_by"] == "clip_concepts"]
    shown = {r["uid"]: colours(manifest[r["uid"]]) for r in judged}
    has = [r for r in judged if COLOUR in shown[r["uid"]][0]]
    other = [r for r in judged if COLOUR not in shown[r["uid"]][0]]
    nowhere = [r for r in other if shown[r["uid"]][1] != COLOUR]
    rates = drop_rate(has), drop_rate(other), drop_rate(nowhere)
    print(
        f"clip_concepts {COLOUR!r}: dropped {rates[0]:.3f} of {len(has)} rows with a {COLOUR} "
        f"object, {rates[1]:.3f} of {len(other)} others, {rates[2]:.3f} of {len(nowhere)} with "
        f"no {COLOUR} at all ({seconds:.1f} s)"
    )
    assert len(has) >= 30 and len(nowhere) >= 100
    assert rates[0] >= 0.3
    assert rates[0] >= 3 * rates[1]
    assert rates[0] >= 10 * rates[2]
    (artifact,) = (run / "stages").glob(f"*_filter/_stats/filter-clip_concepts/{ARTIFACT}")
    margins = pq.read_table(artifact)
    assert set(margins["concept"].to_pylist()) == {PROMPT.format(COLOUR)}
    assert margins.num_rows == len(judged)  # every row the clip stage embedded
