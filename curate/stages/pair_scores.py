"""Stages that score every alive pair from the pool's CLIP vectors: ``neg_clip_loss`` and
``norm_sim`` (``curate.clip.pair_scores``, Wang et al., 2024).

Each adds its score as a ledger column, for a filter stage after it to cut on
(``clip_score_top_fraction: {column: neg_clip_loss, fraction: 0.3}``) and for
reports and notebooks to show. The vectors are the clip stage's
(``RUN/embeddings/``): a model's, or DataComp's own with ``clip: {precomputed:
l14}``, which reads the ``.npz`` beside each metadata parquet and needs no model.

One engine task per ledger file reads that file's alive rows and their vectors
(the embeddings files that hold them, by their ``file`` column) and writes the
file again with the score: null where a row is not alive, or alive without a
vector (counted as ``no_vectors``; a top-fraction filter drops a null score).
When the cluster has GPUs, each task asks Ray for one and scores there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.clip.pair_scores import neg_clip_loss, norm_sim
from curate.clip.pool import embeddings_by_file, set_vectors
from curate.core.config import ConfigError, Count, Positive
from curate.core.layout import EMBEDDINGS, STATS, count_rows
from curate.core.runfolder import scratch
from curate.core.schema import alive_mask, set_column
from curate.core.stage import Stage, StageContext, register_stage
from curate.io.image_sets import find_beside_input
from curate.io.vectors import embedding_matrix, unit_rows

TARGETS = "targets.npy"


class PairScoreStage(Stage):
    """A stage that adds one score column, computed per ledger file by ``_score``."""

    column = ""  # the ledger column it adds
    reads = ("image_embedding",)  # the embeddings columns ``_score`` reads

    def columns_after(self, columns: set[str]) -> set[str]:
        if "clip_score" not in columns:
            raise ConfigError(
                f"stage {self.name}: needs the pool's CLIP vectors: a clip stage before it "
                "(for DataComp metadata, `clip: {precomputed: l14}` reads its .npz, no model)"
            )
        return columns | {self.column}

    def run(self, ctx: StageContext) -> int:
        holding = embeddings_by_file(ctx.run_dir / EMBEDDINGS, len(ctx.input_files))
        jobs = [
            (self, i, path, holding[i], ctx.out_dir / path.name, ctx.seed)
            for i, path in enumerate(ctx.input_files)
        ]
        gpus = 1 if ctx.engine.resources()["GPU"] >= 1 else 0  # a task per GPU, when any
        counts = ctx.engine.map_items(_score_file, jobs, self.name, ctx.progress, gpus=gpus)
        ctx.counters.update(
            scored=sum(c["scored"] for c in counts),
            no_vectors=sum(c["no_vectors"] for c in counts),
        )
        return count_rows([ctx.out_dir / p.name for p in ctx.input_files])

    def _score(self, uids: pa.Array, vectors: pa.Table, seed: int) -> np.ndarray:
        """The scores of ``vectors``' rows (``reads`` columns), aligned with ``uids``."""
        raise NotImplementedError


def _score_file(job: tuple) -> dict[str, int]:
    """One ledger file with its alive rows' scores."""
    stage, index, path, holding, out, seed = job
    ledger = pq.read_table(path)
    alive = alive_mask(ledger)
    columns = ["uid", *stage.reads]
    parts = [pq.read_table(f, columns=columns, filters=[("file", "==", index)]) for f in holding]
    vectors = pa.concat_tables(parts) if parts else None
    scores = pa.nulls(ledger.num_rows, pa.float32())
    scored = 0
    if vectors is not None and vectors.num_rows:
        for column in stage.reads:
            vectors = vectors.filter(pc.is_valid(vectors[column]))
        alive_uids = ledger["uid"].filter(pa.array(alive))
        vectors = vectors.filter(pc.is_in(vectors["uid"], value_set=alive_uids))
        if vectors.num_rows:
            values = stage._score(vectors["uid"].combine_chunks(), vectors, seed)
            at = pc.index_in(ledger["uid"], value_set=vectors["uid"])
            scores = pa.array(values, pa.float32()).take(at)
            scored = vectors.num_rows
    ledger = set_column(ledger, stage.column, scores)
    pq.write_table(ledger, out)
    return {"scored": scored, "no_vectors": int(alive.sum()) - scored}


@register_stage("neg_clip_loss")
@dataclass
class NegClipLossStage(PairScoreStage):
    """``neg_clip_loss``: the CLIP score minus CLIP's loss normaliser over random batches."""

    batch_size: Count = 32_768  # the paper's
    repeats: Count = 10  # random batches per pair, averaged (the paper's K)
    temperature: Positive = 0.01  # OpenAI CLIP's learned τ; 0.07 for DFN's vectors

    column = "neg_clip_loss"
    reads = ("image_embedding", "text_embedding")

    def _score(self, uids: pa.Array, vectors: pa.Table, seed: int) -> np.ndarray:
        images = embedding_matrix(vectors["image_embedding"])
        texts = embedding_matrix(vectors["text_embedding"])
        return neg_clip_loss(
            uids, images, texts, self.batch_size, self.repeats, self.temperature, seed
        )


@register_stage("norm_sim")
@dataclass
class NormSimStage(PairScoreStage):
    """``norm_sim``: the p-norm of an image's cosines to a target set's images."""

    target: str | None = None  # folder of images, Parquet of images, or Parquet of vectors
    norm: Literal["2", "inf"] = "inf"  # NormSim_2 or NormSim_∞ (the paper's best with ImageNet)
    model: str | None = None  # embeds target images; default: the clip stage's model
    pretrained: str | None = None

    column = "norm_sim"

    def __post_init__(self) -> None:
        if not self.target:
            raise ValueError("target is required: a folder or Parquet file of target images")

    def plan(self, ctx: StageContext) -> None:
        """The target set's unit vectors, for every task to read (``_stats/targets.npy``)."""
        who = f"stage {self.name}"
        try:
            path = find_beside_input(self.target, ctx.input_path)
        except ConfigError as exc:
            raise ConfigError(f"{who}: target: {exc}") from exc
        with scratch(ctx.out_dir) as work:
            _, vectors, unusable = set_vectors(
                path, work, ctx.engine, who=who, what="target", run_dir=ctx.run_dir,
                model=self.model, pretrained=self.pretrained,
            )  # fmt: skip
        unit = unit_rows(vectors)
        usable = np.isfinite(unit).all(axis=1)  # a zero vector has no direction
        if not usable.any():
            raise ConfigError(f"{who}: target {path}: every vector is zero")
        stats = self.output_dir / STATS
        stats.mkdir(parents=True, exist_ok=True)
        np.save(stats / TARGETS, unit[usable])
        ctx.counters.update(
            targets=int(usable.sum()), targets_unusable=unusable + int((~usable).sum())
        )

    def _score(self, uids: pa.Array, vectors: pa.Table, seed: int) -> np.ndarray:
        targets = np.load(self.output_dir / STATS / TARGETS, mmap_mode="r")  # one copy per node
        images = embedding_matrix(vectors["image_embedding"])
        if images.shape[1] != targets.shape[1]:
            raise ConfigError(
                f"stage {self.name}: target vectors have {targets.shape[1]} dimensions, the "
                f"pool's {images.shape[1]}: they must come from the same model"
            )
        return norm_sim(images, targets, math.inf if self.norm == "inf" else 2.0)
