"""The clip stage: image and text embeddings and the CLIP score of every downloaded row.

With a model (``model`` + ``pretrained``, see ``curate.clip.model``) the
stage reads the download stage's images, decodes them on CPU workers and embeds
them on a pool of model workers — Ray Data tasks feeding an actor pool, one
model per actor, ``num_gpus=1`` each when the cluster has GPUs — or in this
process with ``--engine local``. With ``precomputed: b32`` (or ``l14``) it
reads the vectors DataComp ships beside its metadata (``b32_img`` /
``b32_txt`` in each ``.npz``) and runs no model at all.

Outputs:

* ``RUN/embeddings/*.parquet``: uid, ``image_embedding`` and
  ``text_embedding`` (L2-normalised, fp16 ``fixed_size_list``), ``clip_score``,
  ``clip_error``; ``_model.json`` says which model made them.
* the ledger: ``clip_score`` (cosine of the float32 embeddings, before they
  are stored as fp16) on every row still alive. A row whose image cannot be
  decoded is dropped by this stage with the reason in ``clip_error``; a row
  without a caption keeps a null score (a score filter then drops it).

Only rows still alive are embedded: a cheap filter before this stage saves
model time.

Decoding: ``decode: cpu`` is open_clip's own preprocessing, Pillow on the CPU
workers. ``decode: gpu`` (what ``auto`` means when the model is on CUDA) ships
baseline JPEGs undecoded and decodes them on the model's GPU with nvJPEG, then
resizes and crops there with the same torchvision steps; other formats, and any
JPEG the GPU refuses, still go through Pillow. ``jpeg_draft: true`` lets Pillow
decode JPEGs at a reduced DCT scale (at least the model's input size): faster
on CPUs, and not the exact pixels (the README has the measured differences).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.clip.model import Preprocess
from curate.clip.pool import embed, embeddings_by_file, prepare_model
from curate.core.config import ConfigError, Count
from curate.core.layout import EMBEDDINGS, IMAGES, MODEL_FILE, count_rows
from curate.core.progress import Progress
from curate.core.runfolder import remove_tree
from curate.core.schema import alive_mask, read_alive, set_column
from curate.core.stage import Stage, StageContext, register_stage
from curate.io.images import holding_images, images_by_file
from curate.io.vectors import embedding_matrix, unit_rows

if TYPE_CHECKING:
    from curate.engine import Engine

TODO = pa.schema([("uid", pa.string()), ("caption", pa.string()), ("shard", pa.string()),
                  ("column", pa.string()), ("row", pa.int64())])  # fmt: skip
SCORES = pa.schema(
    [("uid", pa.string()), ("clip_score", pa.float32()), ("clip_error", pa.string())]
)
#: ``model: run:PATH``: a model folder inside the run, written by an earlier stage.
RUN_PREFIX = "run:"


@register_stage("clip")
@dataclass
class ClipStage(Stage):
    model: str = "ViT-B-32"
    pretrained: str | None = None  # open_clip tag, weights file, or "random"
    precomputed: str | None = None  # DataComp .npz key prefix (b32, l14): no model is run
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"  # autocast on CUDA; CPU is fp32
    batch_size: Count = 256
    concurrency: Count | None = None  # model workers; default one per GPU, else one per CPU
    decode: Literal["auto", "cpu", "gpu"] = "auto"  # JPEGs decoded on the GPU; auto: if CUDA
    jpeg_draft: bool = False  # Pillow decodes JPEGs at a reduced DCT scale: faster, not exact

    def columns_after(self, columns: set[str]) -> set[str]:
        if self.decode == "gpu" and self.device == "cpu":
            raise ConfigError(f"stage {self.name}: decode: gpu needs device: cuda or auto")
        if self.precomputed is None and "sha256" not in columns:
            raise ConfigError(
                f"stage {self.name}: embedding images needs a download stage before it "
                "(or `precomputed: b32` / `l14` to use DataComp's .npz embeddings)"
            )
        return columns | {"clip_score", "clip_error"}

    def preflight(self) -> None:
        """Find the weights and build the model once before any stage runs, so weights
        that are missing or do not load stop the run now, not after the download.

        ``model: run:PATH`` names a folder inside the run that an earlier stage
        writes (the bootstrap stage's checkpoint): it is checked when this stage runs.
        """
        if self.precomputed is None and not self.model.startswith(RUN_PREFIX):
            prepare_model(self.model, self.pretrained)

    def plan(self, ctx: StageContext) -> tuple | None:
        """The prepared model (weights, preprocessing, width), or None for DataComp vectors."""
        if self.precomputed is not None:
            return None
        weights = self.model
        if weights.startswith(RUN_PREFIX):
            weights = str(ctx.run_dir / weights[len(RUN_PREFIX) :])
        return prepare_model(weights, self.pretrained)

    def outputs(self) -> tuple[str, ...]:
        return (EMBEDDINGS,)

    def run(self, ctx: StageContext) -> int:
        out = ctx.run_dir / EMBEDDINGS
        tmp = out.with_name(out.name + ".tmp")
        remove_tree(tmp, ctx.run_dir)
        tmp.mkdir(parents=True)
        start = time.perf_counter()
        if self.precomputed is not None:
            described = self._embed_precomputed(ctx, tmp)
        else:
            described = self._embed_images(ctx, tmp)
        seconds = time.perf_counter() - start
        (tmp / MODEL_FILE).write_text(json.dumps(described, indent=1) + "\n")
        remove_tree(tmp / "_work", ctx.run_dir)
        remove_tree(out, ctx.run_dir)
        tmp.rename(out)
        holding = embeddings_by_file(out, len(ctx.input_files))
        jobs = [(path, ctx.out_dir / path.name, i, holding[i], self.name)
                for i, path in enumerate(ctx.input_files)]  # fmt: skip
        counts = {"embedded": 0, "no_caption": 0, "failed": 0}
        for found in ctx.engine.map_items(_join_file, jobs, f"{self.name}: join"):
            for key, value in found.items():
                counts[key] += value
        embedded = counts["embedded"] + counts["no_caption"]
        ctx.counters.update(
            counts,
            model=described,
            embed_seconds=round(seconds, 3),
            images_per_second=round(embedded / seconds, 1) if seconds and embedded else None,
        )
        return count_rows([ctx.out_dir / p.name for p in ctx.input_files])

    # --- with a model --------------------------------------------------------------------

    def _embed_images(self, ctx: StageContext, out: Path) -> dict:
        resolved, preprocess, dim = ctx.plan
        device = self._device(ctx.engine)
        decode = self._decode(device, preprocess)
        work = _chunks(ctx, out / "_work", self.batch_size)
        images = sum(item["stop"] - item["start"] for item in work)
        with Progress(self.name, images, unit="images", enabled=ctx.progress) as progress:
            if work:
                have = ctx.engine.resources()["GPU" if device == "cuda" else "CPU"]
                embed(
                    ctx.engine,
                    work,
                    (resolved, preprocess, dim, device, self.precision),
                    self.concurrency or max(1, int(have)),
                    out,
                    progress,
                    jpeg_draft=self.jpeg_draft,
                    on_device=decode == "gpu",
                )
        return {
            **resolved.description,
            "embed_dim": dim,
            "image_size": preprocess.size,
            "device": device,
            "precision": self.precision if device == "cuda" else "fp32",
            "decode": decode,
            "jpeg_draft": self.jpeg_draft,
        }

    def _device(self, engine: Engine) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if engine.resources()["GPU"] >= 1 else "cpu"

    def _decode(self, device: str, preprocess: Preprocess) -> str:
        """Where JPEGs are decoded: ``gpu`` needs the model on CUDA and preprocessing that
        applies to tensors; ``auto`` is ``gpu`` where both hold."""
        able = device == "cuda" and preprocess.resize_mode != "longest"
        if self.decode == "gpu" and not able:
            why = (
                f"the model runs on {device}, not a GPU (set decode: cpu, or run where "
                "there are GPUs)"
                if device != "cuda"
                # open_clip's ResizeKeepRatio reads a PIL image's size: it takes no tensor
                else "the model's resize_mode longest has no GPU form (set decode: cpu)"
            )
            raise ConfigError(f"stage {self.name}: decode: gpu: {why}")
        if self.decode == "auto":
            return "gpu" if able else "cpu"
        return self.decode

    # --- DataComp's vectors ---------------------------------------------------------------

    def _embed_precomputed(self, ctx: StageContext, out: Path) -> dict:
        """DataComp's vectors: a task per source parquet reads its npz and the alive rows of
        the ledger files that source became (the ingest stage's parts, by place)."""
        from curate.io.datacomp import npz_sources

        places: dict[int, list[int]] = {}  # source → its ledger files, by place
        for j, part in enumerate(sorted(Path(ctx.ingest_dir).glob("part-*.parquet"))):
            places.setdefault(int(part.name.split("-")[1]), []).append(j)
        files = [[(j, ctx.input_files[j]) for j in places.get(s, [])]
                 for s in range(len(npz_sources(ctx.ingest_dir)))]  # fmt: skip
        jobs = [(ctx.ingest_dir, s, self.precomputed, f, out / f"part-{s:05d}.parquet")
                for s, f in enumerate(files)]  # fmt: skip
        dims = ctx.engine.map_items(_precomputed_source, jobs, f"{self.name}: {self.precomputed}")
        # model / pretrained name the text tower for prompts (clip_concepts), if set.
        return {
            "precomputed": self.precomputed,
            "embed_dim": next((d for d in dims if d), None),
            "model": self.model,
            "pretrained": self.pretrained,
        }


def _precomputed_source(job: tuple) -> int | None:
    """One DataComp source's image and text vectors and their cosine, for its alive rows,
    each with the ledger file (by place) it is in; the vectors' width."""
    from curate.io.datacomp import read_npz_source

    ingest_dir, source, key, files, out = job
    image = read_npz_source(ingest_dir, source, f"{key}_img")
    text = read_npz_source(ingest_dir, source, f"{key}_txt")
    ledgers = [pq.read_table(path, columns=["uid", "keep"]) for _, path in files]
    where = np.repeat([j for j, _ in files], [t.num_rows for t in ledgers]).astype(np.int32)
    alive = np.concatenate([alive_mask(t) for t in ledgers]) if ledgers else np.zeros(0, bool)
    if len(alive) != image.num_rows:  # stages keep every row: the files are the source's
        raise RuntimeError(
            f"the ledger files of source {source} hold {len(alive)} rows, not {image.num_rows}"
        )
    image, text, where = image.filter(alive), text.filter(alive), where[alive]
    img = unit_rows(embedding_matrix(image["embedding"]))
    txt = unit_rows(embedding_matrix(text["embedding"]))
    table = pa.table(
        {
            "uid": image["uid"],
            "image_embedding": image["embedding"],
            "text_embedding": text["embedding"],
            "clip_score": pa.array(np.einsum("ij,ij->i", img, txt), pa.float32()),
            "clip_error": pa.nulls(len(img), pa.string()),
            "file": pa.array(where, pa.int32()),
        }
    )
    pq.write_table(table, out)
    return int(img.shape[1]) if len(img) else None


def _chunks(ctx: StageContext, work: Path, batch_size: int) -> list[dict]:
    """Cut the rows to embed into chunks of ``batch_size`` rows (the last of each file: fewer).

    A task per ledger file writes ``todo-NNNNN.parquet``: the uid, caption, image shard
    and shard row of each of its alive rows whose image was downloaded, found in that
    file's own image shards (``images/_index.json``); a chunk names a slice of one file's
    todo. Equal chunks let Ray Data hand each model worker one whole chunk per batch.
    """
    work.mkdir(parents=True)
    images = ctx.run_dir / IMAGES
    jobs = [
        (path, images, names, work / f"todo-{i:05d}.parquet")
        for i, (path, names) in enumerate(zip(ctx.input_files, images_by_file(images)))
    ]
    rows = ctx.engine.map_items(_file_todo, jobs, "clip: images")  # fmt: skip
    slices = [(i, start, min(start + batch_size, n))
              for i, n in enumerate(rows) for start in range(0, n, batch_size)]  # fmt: skip
    return [{"chunk": k, "file": i, "todo": str(jobs[i][3]), "start": start, "stop": stop}
            for k, (i, start, stop) in enumerate(slices)]  # fmt: skip


def _file_todo(job: tuple[Path, Path, list[str], Path]) -> int:
    """One ledger file's rows to embed and where their images are; how many."""
    path, images, names, out = job
    table = read_alive(path, ["uid", "caption", "status"])
    wanted = table.filter(pc.equal(table["status"], "success")).select(["uid", "caption"])
    parts = []
    for shard, column in holding_images(images, names):
        uids = pq.read_table(shard, columns=["uid"])["uid"]
        index = pc.index_in(uids, value_set=wanted["uid"])
        rows = np.flatnonzero(index.is_valid().to_numpy(zero_copy_only=False))
        picked = wanted.take(index.filter(index.is_valid()))
        n = len(rows)
        parts.append(
            picked.append_column("shard", pa.array([str(shard)] * n, pa.string()))
            .append_column("column", pa.array([column] * n, pa.string()))
            .append_column("row", pa.array(rows, pa.int64()))
        )
    todo = pa.concat_tables(parts) if parts else TODO.empty_table()
    pq.write_table(todo, out)
    return todo.num_rows


def _join_file(job: tuple[Path, Path, int, list[Path], str]) -> dict[str, int]:
    """One ledger file with its rows' scores, from the embeddings files that hold them."""
    path, out, index, holding, stage = job
    columns = ["uid", "clip_score", "clip_error"]
    parts = [pq.read_table(f, columns=columns, filters=[("file", "==", index)]) for f in holding]
    results = pa.concat_tables(parts) if parts else SCORES.empty_table()
    counts = {"embedded": 0, "no_caption": 0, "failed": 0}
    pq.write_table(_join(pq.read_table(path), results.cast(SCORES), stage, counts), out)
    return counts


def _join(ledger: pa.Table, results: pa.Table, stage: str, counts: dict) -> pa.Table:
    """Scores onto a ledger file's alive rows; rows that could not be embedded are dropped."""
    alive = alive_mask(ledger)
    index = pc.index_in(ledger["uid"], value_set=results["uid"])
    found = results.take(index)
    missing = alive & ~index.is_valid().to_numpy(zero_copy_only=False)
    error = pc.if_else(
        pa.array(missing),
        pa.scalar("no downloaded image for this row in images/"),
        found["clip_error"],
    )
    error = pc.if_else(pa.array(alive), error, pa.scalar(None, pa.string()))
    failed = pc.is_valid(error).to_numpy(zero_copy_only=False)
    score = pc.if_else(pa.array(alive), found["clip_score"], pa.scalar(None, pa.float32()))
    counts["failed"] += int(failed.sum())
    has_score = pc.is_valid(score).to_numpy(zero_copy_only=False)
    counts["embedded"] += int(has_score.sum())
    counts["no_caption"] += int((alive & ~failed & ~has_score).sum())
    ledger = set_column(ledger, "clip_score", score)
    ledger = set_column(ledger, "clip_error", error)
    ledger = set_column(ledger, "keep", pa.array(alive & ~failed))
    dropped = pc.if_else(pa.array(failed), pa.scalar(stage), ledger["dropped_by"])
    return set_column(ledger, "dropped_by", dropped)
