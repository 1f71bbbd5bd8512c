"""Writers of small on-disk pools for tests and benchmarks: DataComp metadata, CSV, JSONL.

DataComp ships its pool metadata as ``X.parquet`` shards with an ``X.npz``
beside each one holding fp16 CLIP embeddings whose rows are aligned with the
parquet's rows. ``write_datacomp_pool`` writes the same layout (vectorised, so
a 10^6-row pool takes about a second) with embeddings that are a deterministic
function of the row's global index, so a test can recompute the vector it
expects for any uid.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)

#: Embedding width per DataComp key prefix; tiny so tests stay fast.
SMALL_DIMS = {"b32": 8, "l14": 12}


def random_hex(rng: np.random.Generator, n: int, n_bytes: int = 16) -> pa.Array:
    """``n`` random lowercase hex strings of ``2 * n_bytes`` digits, built without a Python loop."""
    raw = rng.integers(0, 256, size=(n, n_bytes), dtype=np.uint8)
    digits = np.empty((n, 2 * n_bytes), np.uint8)
    digits[:, 0::2] = _HEX[raw >> 4]
    digits[:, 1::2] = _HEX[raw & 15]
    offsets = np.arange(n + 1, dtype=np.int32) * (2 * n_bytes)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(digits.tobytes()))


def embedding(row: np.ndarray | int, dim: int, salt: int) -> np.ndarray:
    """The fp16 vector(s) stored for global row index ``row`` (any shape of indices)."""
    rows = np.asarray(row, dtype=np.float32)[..., None]
    cols = np.arange(dim, dtype=np.float32)
    return np.sin(rows * 0.37 + cols * 1.3 + salt).astype(np.float16)


def datacomp_table(start: int, n: int, rng: np.random.Generator) -> pa.Table:
    """Rows ``start .. start+n`` of a DataComp-like metadata table."""
    idx = np.arange(start, start + n)
    return pa.table(
        {
            "uid": random_hex(rng, n),
            "url": pa.array([f"https://img{i % 97}.example.com/photo/{i}.jpg" for i in idx]),
            "text": pa.array([f"a photo of item {i} on a table" for i in idx]),
            "original_width": pa.array(rng.integers(50, 2000, n), pa.int64()),
            "original_height": pa.array(rng.integers(50, 2000, n), pa.int64()),
            "sha256": random_hex(rng, n, 32),
            "clip_b32_similarity_score": pa.array(rng.random(n, dtype=np.float32)),
            "clip_l14_similarity_score": pa.array(rng.random(n, dtype=np.float32)),
        }
    )


def write_datacomp_pool(
    folder: Path,
    n_rows: int,
    n_files: int = 1,
    *,
    seed: int = 0,
    npz: bool = True,
    dims: dict[str, int] | None = None,
) -> pa.Table:
    """Write ``n_files`` shards ``0000000.parquet`` (+ ``.npz``) and return the whole table."""
    folder.mkdir(parents=True, exist_ok=True)
    dims = SMALL_DIMS if dims is None else dims
    rng = np.random.default_rng(seed)
    bounds = np.linspace(0, n_rows, n_files + 1).astype(int)
    tables = []
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        table = datacomp_table(int(lo), int(hi - lo), rng)
        pq.write_table(table, folder / f"{i:07d}.parquet")
        if npz:
            rows = np.arange(lo, hi)
            arrays = {
                f"{model}_{kind}": embedding(rows, dim, salt)
                for salt, (model, dim) in enumerate(dims.items())
                for kind in ("img", "txt")
            }
            # Distinguish img from txt so a test catches a swapped key.
            arrays = {k: (-v if k.endswith("txt") else v) for k, v in arrays.items()}
            np.savez(folder / f"{i:07d}.npz", **arrays)
        tables.append(table)
    return pa.concat_tables(tables)


def write_bytes(path: Path, data: bytes) -> Path:
    """Write raw bytes (hostile CSV/JSONL inputs are easiest to state as bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def run_ingest(input_path: Path, tmp_path: Path, **params):
    """Run the ingest stage in-process; return (ledger table, rows returned, context)."""
    from curate.core.stage import StageContext
    from curate.engine.local import LocalEngine
    from curate.stages.ingest import IngestStage

    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)  # a fresh stage folder, as the runner gives
    out.mkdir(parents=True)
    ctx = StageContext(
        run_dir=tmp_path,
        out_dir=out,
        input_files=[],
        input_schema=None,
        input_path=input_path,
        engine=LocalEngine(),
    )
    stage = IngestStage(**params)
    stage.name = "ingest"
    ctx.plan = stage.plan(ctx)  # as the runner does
    rows = stage.run(ctx)
    parts = sorted(out.glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts]), rows, ctx
