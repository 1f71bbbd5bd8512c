"""Where a pool's image vectors are, and one task's read of them.

Two places hold them: the clip stage's embeddings files (``RUN/embeddings/``,
``image_embedding``), or, for DataComp metadata, the ``.npz`` beside each
metadata parquet (``l14_img``, ``b32_img``), read without any model. A *source*
is one file of either kind, named by a small dict a task can carry; the
operators that read the pool's image vectors themselves (semantic dedup,
``datacomp_image``) read one source per task.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.core.config import ConfigError
from curate.core.layout import EMBEDDINGS


def vector_sources(
    embeddings: str, who: str, run_dir: Path | None, ingest_dir: Path | None, has_clip: bool
) -> tuple[list[dict], str]:
    """The sources of the pool's image vectors, and what they are (for manifests: ``clip``
    or the .npz key).

    ``embeddings`` is ``clip`` (the clip stage's files), a DataComp .npz prefix (``l14``,
    ``b32``), or ``auto``: the clip stage's when the ledger has its ``clip_score``
    (``has_clip``) and its files exist, else ``l14`` when ingest read DataComp's .npz.
    """
    from curate.io.datacomp import MANIFEST, npz_sources

    clip_files = sorted((Path(run_dir) / EMBEDDINGS).glob("*.parquet")) if run_dir else []
    has_npz = ingest_dir is not None and (Path(ingest_dir) / MANIFEST).is_file()
    source = embeddings
    if source == "auto":
        source = "clip" if has_clip and clip_files else "l14" if has_npz else None
    if source == "clip" and clip_files:
        return [{"path": f, "column": "image_embedding"} for f in clip_files], "clip"
    if source not in (None, "clip") and has_npz:
        key = f"{source}_img"
        count = len(npz_sources(ingest_dir))
        return [{"ingest": ingest_dir, "index": i, "key": key} for i in range(count)], key
    raise ConfigError(
        f"{who} needs the pool's image embeddings (embeddings: {embeddings}): run a clip "
        "stage before it, or ingest DataComp metadata with its .npz files (embeddings: l14)"
    )


def read_vector_source(source: dict) -> pa.Table:
    """(uid, vector) of one source's rows that have a vector."""
    from curate.io.datacomp import read_npz_source

    if "path" in source:
        table = pq.read_table(source["path"], columns=["uid", source["column"]])
    else:
        table = read_npz_source(source["ingest"], source["index"], source["key"])
    table = table.rename_columns(["uid", "vector"])
    return table.filter(pc.is_valid(table["vector"]))
