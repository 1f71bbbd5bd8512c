"""Zero-shot removal of unwanted concepts (watermarks, NSFW, …) with the pool's CLIP embeddings.

ALIGN removed pornographic images; LAION-5B tagged NSFW content and watermarks
with CLIP embeddings. ``clip_concepts`` does that zero-shot: it compares each
image embedding with the text embeddings of prompts naming what to drop
(``unwanted``) and of prompts naming ordinary content (``reference``), both
embedded by the same model that embedded the images.

Rule, for a row's L2-normalised image embedding ``e`` and the L2-normalised
prompt embeddings ``u_i`` (unwanted) and ``r_j`` (reference)::

    concept_margin = max_i cos(e, u_i) - max_j cos(e, r_j)
    drop the row when concept_margin > margin        (float32, as stored)

A margin exactly equal to ``margin`` is kept. The best-matching unwanted prompt
is recorded as the row's ``concept``. Comparing with reference prompts instead
of a fixed cosine threshold makes the rule independent of a model's cosine
scale: a row is dropped when it looks more like an unwanted concept than like
anything ordinary. The default ``reference`` (``DEFAULT_REFERENCE``) is a few
neutral descriptions of "some picture" ("a photo", "an image", "a picture of
something", "a photo of an object"): an unwanted prompt must beat every one of
them. Add prompts of the pool's ordinary content to make the filter stricter
about what counts as unwanted.

A row that is alive in the filter stage but has no image embedding (absent
from ``embeddings/``, or a null or non-finite vector) cannot be judged: it is
dropped, with this filter's name in ``dropped_by``, never silently kept. The
clip stage already drops rows whose image it could not embed, so this only
happens when the ledger and ``embeddings/`` disagree.

Mechanics (fit → artifact → apply):

* ``fit`` (driver, once) reads ``RUN/embeddings/_model.json``, builds that model
  with ``resolve_model`` + ``load_model`` (on CPU: a few prompts only), embeds
  the prompts; then one task per embeddings file streams it (uid and
  image_embedding only, batch by batch) and writes its rows of
  ``concept_margins/`` (uid, concept_margin float32, concept) in the stats
  folder, beside ``prompts.json`` and ``prompts.npz`` (the prompts and their
  embeddings) for inspection. For DataComp's precomputed vectors
  (``precomputed: b32``), ``_model.json``'s ``model`` / ``pretrained`` are the
  clip stage's: set them to the model that made the vectors (ViT-B-32 /
  openai for b32) so the prompts land in the same space.
* ``load`` (per worker) reads the uids whose margin passes;
* ``keep`` looks each batch's uids up in that set (``UidSet``: a binary search per row).

The margins do not depend on ``margin``, so the artifact can be re-read with
another threshold. Scores are computed for every row in ``embeddings/``, also
rows an earlier filter has since dropped (a matrix product is cheaper than a
lookup of the alive uids); ``keep`` only sees alive rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.clip.model import (
    load_model,
    resolve_model,
    tokenizer_for,
)
from curate.clip.pool import pool_model
from curate.core.config import ConfigError, Range
from curate.core.layout import EMBEDDINGS
from curate.core.operators import Filter, FitContext, Fitted, register_filter
from curate.io.submission import UidSet
from curate.io.vectors import embedding_matrix, unit_rows

ARTIFACT = "concept_margins"  # a folder: one Parquet file per embeddings file
PROMPTS_JSON = "prompts.json"
PROMPTS_NPZ = "prompts.npz"
#: Neutral descriptions of ordinary content: an unwanted prompt has to beat all of them.
DEFAULT_REFERENCE = ("a photo", "an image", "a picture of something", "a photo of an object")
#: Rows scored per matrix product while streaming the embeddings.
READ_BATCH = 65_536

ARTIFACT_SCHEMA = pa.schema(
    [("uid", pa.string()), ("concept_margin", pa.float32()), ("concept", pa.string())]
)


def _check_prompts(prompts: list[str], what: str) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, list | tuple):
        raise ValueError(f"{what} must be a list of prompts, got {prompts!r}")
    if not prompts:
        raise ValueError(f"{what} must name at least one prompt")
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{what}: every prompt must be a non-empty string, got {prompt!r}")
    if len(set(prompts)) != len(prompts):
        raise ValueError(f"{what}: a prompt appears twice")
    return list(prompts)


def prompt_model(described: dict):
    """The (resolved, loaded) model whose text tower embeds the prompts."""
    resolved = resolve_model(described["model"], described.get("pretrained"))
    return resolved, load_model(resolved)


def embed_prompts(resolved, model, prompts: list[str]) -> np.ndarray:
    """L2-normalised float32 text embeddings, computed as the clip stage computes captions'."""
    import torch

    tokens = tokenizer_for(resolved)(prompts)
    with torch.inference_mode():
        out = model.encode_text(tokens).float()
    return unit_rows(out.cpu().numpy())


def margins_of(
    image: np.ndarray, unwanted: np.ndarray, reference: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per row: max cos with ``unwanted`` − max cos with ``reference``, and the best unwanted."""
    image = unit_rows(image)
    to_unwanted = image @ unwanted.T
    best = np.argmax(to_unwanted, axis=1)
    top = np.take_along_axis(to_unwanted, best[:, None], axis=1)[:, 0]
    return (top - (image @ reference.T).max(axis=1)).astype(np.float32), best


def score_batch(
    batch: pa.RecordBatch, unwanted: np.ndarray, reference: np.ndarray, prompts: pa.Array
) -> pa.Table:
    """The artifact's rows for one batch of uid + image_embedding (null when not judged)."""
    column = batch.column("image_embedding")
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    margin = np.full(len(column), np.nan, dtype=np.float32)
    best = np.zeros(len(column), dtype=np.int64)
    if valid.any():
        dense = column.filter(pa.array(valid)) if not valid.all() else column
        vectors = embedding_matrix(dense).astype(np.float32)
        if vectors.shape[1] != unwanted.shape[1]:
            raise ConfigError(
                f"filter clip_concepts: image embeddings have {vectors.shape[1]} dimensions, "
                f"the prompt model's text embeddings {unwanted.shape[1]}: not the same model"
            )
        with np.errstate(invalid="ignore", over="ignore"):
            margin[valid], best[valid] = margins_of(vectors, unwanted, reference)
    judged = np.isfinite(margin)
    concept = prompts.take(pa.array(best, pa.int64(), mask=~judged))
    return pa.table(
        {
            "uid": batch.column("uid").cast(pa.string()),
            "concept_margin": pa.array(margin, pa.float32(), mask=~judged),
            "concept": concept,
        },
        schema=ARTIFACT_SCHEMA,
    )


@register_filter("clip_concepts")
@dataclass
class ClipConcepts(Fitted, Filter):
    """Drop images nearer an ``unwanted`` prompt than every ``reference`` prompt (zero-shot)."""

    unwanted: list[str]
    reference: list[str] = field(default_factory=lambda: list(DEFAULT_REFERENCE))
    # A difference of two cosines, so in [-2, 2]: -2 would drop every row, 2 none.
    margin: Annotated[float, Range(-2, 2, low_open=True, high_open=True)] = 0.0

    needs = ("uid",)

    _kept: UidSet | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.unwanted = _check_prompts(self.unwanted, "unwanted")
        self.reference = _check_prompts(self.reference, "reference")
        both = sorted(set(self.unwanted) & set(self.reference))
        if both:
            raise ValueError(f"prompt {both[0]!r} is both unwanted and reference")
        if isinstance(self.margin, bool) or not isinstance(self.margin, int | float):
            raise ValueError(f"margin must be a number, got {self.margin!r}")
        self.margin = float(self.margin)

    def fit(self, ctx: FitContext) -> None:
        described = pool_model(
            ctx.run_dir, "filter clip_concepts", "a clip stage must run before this filter"
        )
        resolved, model = prompt_model(described)
        unwanted = embed_prompts(resolved, model, self.unwanted)
        reference = embed_prompts(resolved, model, self.reference)
        del model
        stats = Path(ctx.stats_dir)
        stats.mkdir(parents=True, exist_ok=True)
        self._write_prompts(stats, described, unwanted, reference)

        files = sorted((Path(ctx.run_dir) / EMBEDDINGS).glob("*.parquet"))
        out = stats / ARTIFACT
        out.mkdir()
        jobs = [(f, out / f"{i:05d}.parquet", unwanted, reference, self.unwanted)
                for i, f in enumerate(files)]  # fmt: skip
        ctx.engine.map_items(_score_file, jobs, f"{self.name}: score")

    def _write_prompts(
        self, stats: Path, described: dict, unwanted: np.ndarray, reference: np.ndarray
    ) -> None:
        """prompts.json (for people) and prompts.npz (the embeddings, row i = prompt i)."""
        np.savez(
            stats / PROMPTS_NPZ,
            unwanted=unwanted,
            reference=reference,
            unwanted_prompts=np.array(self.unwanted),
            reference_prompts=np.array(self.reference),
        )
        info = {
            "model": described,
            "rule": "drop when max cos(image, unwanted) - max cos(image, reference) > margin",
            "margin": self.margin,
            "unwanted": self.unwanted,
            "reference": self.reference,
            "embeddings": PROMPTS_NPZ,
            "margins": ARTIFACT,
        }
        (stats / PROMPTS_JSON).write_text(json.dumps(info, indent=1) + "\n")

    def load(self, stats_dir: Path) -> None:
        table = pq.read_table(
            stats_dir / ARTIFACT, columns=["uid", "concept_margin"], schema=ARTIFACT_SCHEMA
        )
        margins = table["concept_margin"]
        passes = pc.less_equal(margins, pa.scalar(np.float32(self.margin), pa.float32()))
        self._kept = UidSet.of(table["uid"].filter(pc.fill_null(passes, False)))

    def keep(self, batch: pa.Table) -> np.ndarray:
        return self._kept.contains(batch["uid"])


def _score_file(job: tuple[Path, Path, np.ndarray, np.ndarray, list[str]]) -> None:
    """One embeddings file's margins, batch by batch (bounded memory), to one artifact file."""
    path, out, unwanted, reference, names = job
    prompts = pa.array(names, pa.string())
    with pq.ParquetWriter(out, ARTIFACT_SCHEMA) as writer:
        source = pq.ParquetFile(path)
        for batch in source.iter_batches(READ_BATCH, columns=["uid", "image_embedding"]):
            writer.write_table(score_batch(batch, unwanted, reference, prompts))
