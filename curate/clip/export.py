"""``curate export-embeddings``: a run's embeddings in DataComp's layout.

DataComp ships each metadata shard as ``X.parquet`` (uid, url, text, scores)
with ``X.npz`` beside it, whose fp16 arrays (``b32_img``, ``b32_txt``,
``l14_img``, ``l14_txt``) are aligned row for row with the parquet. Its
baselines (image-based filtering, SemDeDup-style tools) read that layout, so
an export lets a run's embeddings go where DataComp's would. The export is
itself valid DataComp metadata: ``curate run`` ingests it with
``format: datacomp`` and ``clip: {precomputed: PREFIX}`` reads the vectors back.

Rows whose image could not be embedded are left out; a row without a caption
gets a NaN text vector.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.core.config import ConfigError
from curate.core.layout import EMBEDDINGS, LEDGER, MODEL_FILE
from curate.core.runfolder import check_shared
from curate.io.vectors import embedding_matrix

#: DataComp's array names for the models it used.
PREFIXES = {"ViT-B-32": "b32", "ViT-L-14": "l14"}


def default_prefix(run_dir: Path) -> str:
    """b32 / l14 for DataComp's models, else the architecture's name in lower case."""
    described = json.loads((Path(run_dir) / EMBEDDINGS / MODEL_FILE).read_text())
    if described.get("precomputed"):
        return described["precomputed"]
    model = str(described.get("model", "clip"))
    return PREFIXES.get(model, Path(model).name.lower().replace("-", "_"))


def export_embeddings(run_dir: Path, out_dir: Path, prefix: str | None = None) -> list[Path]:
    """Write one ``NNNNNNNN.parquet`` + ``.npz`` pair per embeddings file; return the parquets."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    check_shared(run_dir)
    folder = run_dir / EMBEDDINGS
    if not (folder / MODEL_FILE).is_file():
        raise ConfigError(f"{run_dir}: no {EMBEDDINGS}/ (run a recipe with a clip stage first)")
    prefix = prefix or default_prefix(run_dir)
    ledger = pq.read_table(run_dir / LEDGER, columns=["uid", "url", "caption"])
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, path in enumerate(sorted(folder.glob("*.parquet"))):
        table = pq.read_table(path)
        table = table.filter(pc.is_valid(table["image_embedding"]))
        if not table.num_rows:
            continue
        rows = ledger.take(pc.index_in(table["uid"], value_set=ledger["uid"]))
        meta = pa.table(
            {
                "uid": table["uid"],
                "url": rows["url"],
                "text": rows["caption"],
                f"clip_{prefix}_similarity_score": table["clip_score"],
            }
        )
        stem = out_dir / f"{i:08d}"
        pq.write_table(meta, stem.with_suffix(".parquet"))
        np.savez(
            stem.with_suffix(".npz"),
            **{
                f"{prefix}_img": embedding_matrix(table["image_embedding"]),
                f"{prefix}_txt": embedding_matrix(table["text_embedding"]),
            },
        )
        written.append(stem.with_suffix(".parquet"))
    return written
