"""DataComp's image-based filter: keep images in the k-means clusters a reference set lands in.

DataComp (Gadre et al., 2023, "DataComp: In search of the next generation of
multimodal datasets"), mlfoundations/datacomp ``baselines/``. Its image-based
baseline keeps pool images whose nearest cluster centre is the nearest centre
of some ImageNet-1k training image; intersected with the CLIP-score top 30 %
it is DataComp's best baseline at medium scale and above (DataComp-1B). Three
steps, each followed here:

1. Caption pre-filter (``apply_filter.py``, ``caption_filter``)::

       caption_num_words = df.text.apply(lambda x: len(fasttext.tokenize(x)))
       caption_num_chars = df.text.apply(len)
       fasttext_en = [x[0].replace("__label__", "") == "en" for x in lang_preds]
       mask = fasttext_en & (caption_num_words > 1) & (caption_num_chars > 5)

   Not this filter: the recipe's first filter stage (``caption_words: {min_words:
   2, min_chars: 6}``, ``language: {languages: [en]}``).
2. k-means on the pre-filtered pool (``image_based_clustering.py``: the npz's
   ``l14_img``, ``caption_filter`` on, ``embeddings.astype(np.float32)``, not
   normalised; ``faiss.Clustering(d, k)``, ``niter = 20``, ``seed``,
   ``max_points_per_centroid = 10000000`` so nothing is sub-sampled, trained with
   a ``GpuIndexFlatL2``: plain L2 k-means, not spherical). ``fit`` trains on the
   rows alive when this filter's stage starts, so the pre-filter must be an
   earlier filter stage, not an earlier filter of the same set.
3. Assignment (``get_centroid_ids_gpu``)::

       similarity = torch.einsum("ik, jk -> ij", features[i : i + batch_size, :].float(), centroids)
       matches = torch.argmax(similarity, dim=1)

   "Nearest" is the largest inner product with the (unnormalised) centroids,
   for the reference images (``target_centroid_ids = torch.unique(...)``) and the
   pool rows alike; a row is kept when its centroid is one of the targets.
   Here: ``curate.dedup.semdedup.assign`` (float32, fixed blocks, ties to the lowest
   index as ``argmax``).

With the CLIP score (``load_uids_with_image_filter(..., arch, threshold,
fraction)``), ``threshold = get_threshold(metadata_dir_path, key, fraction)``
is taken over the whole pool, then each file keeps ``df[key] >= threshold``
before the caption filter and the clusters, whose centres were trained on the
caption-filtered pool, before any score cut. So ``clip_score_top_fraction``
goes in the first filter stage (its fit sees the whole pool), last in it, and
``kmeans_also_dropped_by: [clip_score_top_fraction]`` lets k-means train on the
rows it dropped too: alive ∪ those = the caption-filtered pool.

Differences that could not be avoided:

* Tokens are ``len(text.split())`` (the ``n_words`` column), not
  ``len(fasttext.tokenize(text))``. They differ at the "> 1" boundary only for
  captions with a newline or NUL (fastText counts each ``\\n`` as a ``</s>``
  token: ``"dog\\n"`` passes in DataComp) or words split only by non-ASCII
  spaces (U+00A0, U+3000: one fastText token). fastText is ``lid.176.ftz``,
  DataComp's ``lid.176.bin``.
* k-means runs on the CPU (``IndexFlatL2``), on rows sorted by uid (the same
  input whatever the file layout; DataComp: file order), so centroids are not
  DataComp's bit for bit. For uid-for-uid parity give DataComp's own centroids
  (``centroids:``, its ``{scale}_centroids_l14.pt`` saved as ``.npy``).
  ``max_train_rows`` is a seeded sample without replacement; DataComp's
  ``--sample_ratio`` (large, xlarge) is ``np.random.choice`` with replacement.
* A row alive here without a usable vector cannot be judged: it is dropped
  (every DataComp metadata row has one).

Mechanics (fit → artifact → apply). ``fit`` (driver, once): the reference
vectors (a Parquet of vectors, or images embedded with the pool's model by
``embed_images``, read as decontaminate reads ``eval_set``), k-means (or the
given centroids), then one streaming pass that assigns every alive row and
writes ``assignments.parquet`` (uid, cluster, match); also ``centroids.npy``,
``reference.parquet`` (each reference item's cluster) and ``fit.json``.
Vectors never leave the driver: they are not in the ledger, and looking them up
per batch would read the vector files once per batch. ``load`` reads only the
kept uids, as a sorted array of 32-byte keys, and ``keep`` is a binary search.
Memory: the training vectors (rows × D × 4 bytes; ``max_train_rows`` bounds
it), one vector file at a time, 32 bytes per kept row in each worker.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.clip.pool import set_vectors
from curate.core.config import ConfigError, Count
from curate.core.operators import Filter, FitContext, Fitted, register_filter
from curate.core.runfolder import scratch
from curate.core.schema import alive_mask
from curate.dedup.semdedup import assign
from curate.io.image_sets import find_beside_input
from curate.io.readers import IngestError
from curate.io.submission import UidSet
from curate.io.uids import hashed_sample
from curate.io.vector_sources import read_vector_source, vector_sources
from curate.io.vectors import embedding_matrix

ASSIGNMENTS = "assignments.parquet"
CENTROIDS = "centroids.npy"
REFERENCE = "reference.parquet"
FIT_JSON = "fit.json"
#: DataComp's value: "otherwise the kmeans implementation sub-samples the training set".
MAX_POINTS_PER_CENTROID = 10_000_000
#: Rows per batch read from RUN/embeddings.
READ_BATCH = 65_536
ASSIGNMENTS_SCHEMA = pa.schema(
    [("uid", pa.string()), ("cluster", pa.int32()), ("match", pa.bool_())]
)

Batches = Callable[[], Iterator[tuple[pa.Array, pa.Array]]]


def train_kmeans(x: np.ndarray, k: int, iterations: int, seed: int) -> np.ndarray:
    """DataComp's ``train_kmeans`` on the CPU: faiss L2 k-means over every row, (k, D) float32."""
    import faiss

    d = x.shape[1]
    clustering = faiss.Clustering(d, k)
    clustering.niter = iterations
    clustering.seed = seed
    clustering.max_points_per_centroid = MAX_POINTS_PER_CENTROID
    clustering.train(np.ascontiguousarray(x, np.float32), faiss.IndexFlatL2(d))
    return faiss.vector_float_to_array(clustering.centroids).reshape(k, d)


def usable(uids: pa.Array, vectors: pa.Array, wanted: UidSet) -> tuple[pa.Array, np.ndarray]:
    """The rows of a batch whose uid is in ``wanted`` and whose vector is finite."""
    take = wanted.contains(uids) & vectors.is_valid().to_numpy(zero_copy_only=False)
    x = embedding_matrix(vectors.filter(pa.array(take))).astype(np.float32)
    finite = np.isfinite(x).all(axis=1)
    return uids.filter(pa.array(take)).filter(pa.array(finite)), x[finite]


@register_filter("datacomp_image")
@dataclass
class DataCompImage(Fitted, Filter):
    """Keep rows whose nearest k-means centroid is nearest to some ``reference`` image."""

    reference: str  # folder of images, Parquet of images, or Parquet of vectors
    clusters: Count | None = None  # k (DataComp: 100,000); or give `centroids`
    centroids: str | None = None  # a (k, D) .npy of precomputed centroids: no k-means
    iterations: Count = 20
    max_train_rows: Count | None = None  # k-means on a seeded sample of this many uids
    embeddings: str = "auto"  # "clip" (RUN/embeddings) or a DataComp .npz prefix (l14, b32)
    # k-means also trains on the rows these filters dropped (the CLIP-score cut, see above)
    kmeans_also_dropped_by: list[str] = field(default_factory=list)
    model: str | None = None  # embeds reference images; default: the clip stage's model
    pretrained: str | None = None

    needs = ("uid",)

    _kept: UidSet | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.reference:
            raise ValueError("reference must name a folder or Parquet file of reference images")
        if (self.clusters is None) == (self.centroids is None):
            raise ValueError("give exactly one of clusters (k-means here) and centroids (a .npy)")
        if None not in (self.clusters, self.max_train_rows) and self.max_train_rows < self.clusters:
            raise ValueError(
                f"max_train_rows {self.max_train_rows} < clusters {self.clusters}: k-means needs "
                "at least one training row per cluster"
            )
        if not self.embeddings:
            raise ValueError("embeddings must be auto, clip, or a DataComp .npz prefix (l14, b32)")

    # --- fit -----------------------------------------------------------------------------

    def fit(self, ctx: FitContext) -> None:
        stats = Path(ctx.stats_dir)
        stats.mkdir(parents=True, exist_ok=True)
        alive, extra, also = _pool(ctx.ledger_files, self.kmeans_also_dropped_by)
        source, batches = self._vectors(ctx)
        names, ref = self._reference(ctx, stats)
        about = {"embeddings": source, "alive": len(alive), "also_dropped_by": also}
        if not len(alive):  # every row was dropped before this stage: nothing to judge
            pq.write_table(ASSIGNMENTS_SCHEMA.empty_table(), stats / ASSIGNMENTS)
            self._fitted(stats, about, kept=0)
            return
        if self.centroids is not None:
            centroids = self._given_centroids(ctx)
        else:
            centroids = self._train(alive, extra, batches, ctx.seed, about)
        if ref.shape[1] != centroids.shape[1]:
            raise ConfigError(
                f"filter {self.name}: reference vectors have {ref.shape[1]} dimensions, the "
                f"pool's {centroids.shape[1]}: they must come from the same model"
            )
        ref_clusters = assign(ref, centroids)[0]
        targets = np.unique(ref_clusters)
        wanted = UidSet.of(alive)
        assigned, kept = _write_assignments(
            stats / ASSIGNMENTS, batches, wanted, centroids, targets
        )
        np.save(stats / CENTROIDS, centroids)
        pq.write_table(pa.table({"name": names, "cluster": ref_clusters}), stats / REFERENCE)
        about.update(
            centroids=self.centroids or "k-means",
            clusters=len(centroids),
            reference_items=len(ref),
            reference_clusters=len(targets),
            assigned=assigned,
            no_embedding=len(alive) - assigned,
        )
        self._fitted(stats, about, kept=kept)

    def _fitted(self, stats: Path, about: dict, kept: int) -> None:
        """``fit.json``, for people."""
        about.update(kept=kept, rule="keep when argmax(x @ centroids.T) is a reference item's")
        (stats / FIT_JSON).write_text(json.dumps(about, indent=1) + "\n")

    def _train(self, alive, extra, batches: Batches, seed: int, about: dict) -> np.ndarray:
        """k-means on the alive rows and the ``kmeans_also_dropped_by`` rows (or a sample)."""
        train = pa.concat_arrays([alive, extra])
        if self.max_train_rows is not None:
            train = hashed_sample(train, self.max_train_rows, seed)
        x = _training_rows(batches, UidSet.of(train))
        if len(x) < self.clusters:
            raise ConfigError(
                f"filter {self.name}: clusters={self.clusters}, but only {len(x)} rows have an "
                f"image embedding to train k-means on ({about['embeddings']}); set a smaller k"
            )
        about["trained_on"] = len(x)
        return train_kmeans(x, self.clusters, self.iterations, seed)

    def _vectors(self, ctx: FitContext) -> tuple[str, Batches]:
        """Where the pool's image vectors are, and a function iterating (uid, vector) batches."""
        files = ctx.ledger_files
        has_clip = bool(files) and "clip_score" in pq.read_schema(files[0]).names
        who = f"filter {self.name}"
        sources, what = vector_sources(self.embeddings, who, ctx.run_dir, ctx.ingest_dir, has_clip)

        def batches():
            for source in sources:
                try:
                    table = read_vector_source(source)
                except IngestError as exc:
                    raise ConfigError(f"{who}: {exc}") from exc
                for batch in table.to_batches(READ_BATCH):
                    yield batch.column(0), batch.column(1)

        return what, batches

    def _path(self, value: str, what: str, ctx: FitContext) -> Path:
        try:
            return find_beside_input(value, ctx.input_path)
        except ConfigError:
            raise ConfigError(
                f"filter {self.name}: {what} {value!r}: no such file or folder (a relative path "
                "is looked up beside the run's input, then in the working directory)"
            ) from None

    def _given_centroids(self, ctx: FitContext) -> np.ndarray:
        path = self._path(self.centroids, "centroids", ctx)
        try:
            centroids = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"filter {self.name}: centroids {path}: not a .npy array") from exc
        if centroids.ndim != 2 or not np.isfinite(centroids).all():
            raise ConfigError(f"filter {self.name}: centroids {path}: expected finite (k, D)")
        return np.ascontiguousarray(centroids, np.float32)

    def _reference(self, ctx: FitContext, tmp: Path) -> tuple[list[str], np.ndarray]:
        """The reference items' names and float32 vectors (images embedded first, in a
        scratch folder in ``tmp``)."""
        path = self._path(self.reference, "reference", ctx)
        with scratch(tmp, "_embed-") as work:
            names, vectors, _ = set_vectors(
                path, work, ctx.engine, who=f"filter {self.name}", what="reference",
                run_dir=ctx.run_dir, model=self.model, pretrained=self.pretrained,
            )  # fmt: skip
        return names, vectors

    # --- apply ---------------------------------------------------------------------------

    def load(self, stats_dir: Path) -> None:
        table = pq.read_table(stats_dir / ASSIGNMENTS, columns=["uid", "match"])
        self._kept = UidSet.of(table["uid"].filter(table["match"]))

    def keep(self, batch: pa.Table) -> np.ndarray:
        return self._kept.contains(batch["uid"])


def _pool(files: list[Path], also: list[str]) -> tuple[pa.Array, pa.Array, dict]:
    """Alive uids, the uids an ``also`` filter dropped, and how many each of those dropped."""
    alive, extra = [pa.array([], pa.string())], [pa.array([], pa.string())]
    counts = dict.fromkeys(also, 0)
    for path in files:
        table = pq.read_table(path, columns=["uid", "keep", "dropped_by"])
        live = alive_mask(table)
        alive.append(table["uid"].filter(pa.array(live)).combine_chunks().cast(pa.string()))
        reason = table["dropped_by"].to_numpy(zero_copy_only=False)
        for name in also:
            chosen = ~live & (reason == name)
            counts[name] += int(chosen.sum())
            extra.append(table["uid"].filter(pa.array(chosen)).combine_chunks().cast(pa.string()))
    return pa.concat_arrays(alive), pa.concat_arrays(extra), counts


def _training_rows(batches: Batches, wanted: UidSet) -> np.ndarray:
    """The vectors of the ``wanted`` uids, float32, in uid order (whatever the file layout)."""
    keys, parts = [], []
    for uids, vectors in batches():
        found, x = usable(uids, vectors, wanted)
        keys.append(UidSet.keys_of(found))
        parts.append(x)
    if not parts:
        return np.zeros((0, 1), np.float32)
    return np.concatenate(parts)[np.argsort(np.concatenate(keys), kind="stable")]


def _write_assignments(
    out: Path, batches: Batches, alive: UidSet, centroids: np.ndarray, targets: np.ndarray
) -> tuple[int, int]:
    """Stream every alive row's cluster and decision to ``out``; (rows assigned, rows kept)."""
    tmp = out.with_name(out.name + ".tmp")
    assigned = kept = 0
    with pq.ParquetWriter(tmp, ASSIGNMENTS_SCHEMA) as writer:
        for uids, vectors in batches():
            found, x = usable(uids, vectors, alive)
            if not len(found):
                continue
            cluster = assign(x, centroids)[0]
            match = np.isin(cluster, targets)
            table = pa.table({"uid": found, "cluster": cluster, "match": match}).cast(
                ASSIGNMENTS_SCHEMA
            )
            writer.write_table(table)
            assigned += len(found)
            kept += int(match.sum())
    os.replace(tmp, out)
    return assigned, kept
