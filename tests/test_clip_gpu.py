"""The clip stage on CUDA: GPU actors on Ray, bf16 autocast, against the CPU's float32.

Skipped without a CUDA device (CI has none); run on a GPU machine with
``pytest tests/test_clip_gpu.py``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def _scores(run: Path, engine, device: str) -> dict[str, float]:
    from curate.core.stage import StageContext
    from curate.stages.clip import ClipStage

    stage = ClipStage(model="ViT-B-32", pretrained="random", device=device, batch_size=64)
    stage.name = "clip"
    out = run / f"out_{engine.name}_{device}"
    out.mkdir()
    ledger = [run / "ledger_in" / "part-00000.parquet"]
    counters = StageContext(run, out, ledger, None, engine=engine)  # a started engine
    counters.plan = stage.plan(counters)
    stage.run(counters)
    table = pq.read_table(run / "embeddings", columns=["uid", "clip_score"])
    shutil.rmtree(run / "embeddings")
    assert counters.counters["model"]["device"] == device
    return dict(zip(table["uid"].to_pylist(), table["clip_score"].to_pylist()))


def test_gpu_actors_match_cpu_float32(tmp_path):
    from bench_clip import write_run

    from curate.engine import open_engine

    write_run(tmp_path, 300, per_shard=128)
    cpu = _scores(tmp_path, open_engine("local"), "cpu")
    on_ray = open_engine("ray")
    try:
        gpu = _scores(tmp_path, on_ray, "cuda")
    finally:
        on_ray.close()
    assert gpu.keys() == cpu.keys() and len(gpu) == 300
    diff = np.array([abs(gpu[u] - cpu[u]) for u in cpu])
    print(f"bf16 GPU vs fp32 CPU: max |Δscore| {diff.max():.2e}, mean {diff.mean():.2e}")
    assert diff.max() < 2e-2
