"""The clip stage on CUDA: GPU actors on Ray, bf16 autocast, against the CPU's float32;
nvJPEG decoding against Pillow's.

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


def _scores(run: Path, engine, device: str, decode: str = "auto") -> dict[str, float]:
    from curate.core.stage import StageContext
    from curate.stages.clip import ClipStage

    stage = ClipStage(model="ViT-B-32", pretrained="random", device=device, batch_size=64,
                      decode=decode)  # fmt: skip
    stage.name = "clip"
    out = run / f"out_{engine.name}_{device}_{decode}"
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


def test_gpu_decoding_matches_pillow_on_the_same_gpu(tmp_path):
    """decode: gpu (nvJPEG, resize on the GPU) against decode: cpu, both bf16 on the GPU:
    the same rows, scores within 1e-2 (the CPU test bounds the resize alone far tighter)."""
    from bench_clip import write_run

    from curate.engine import open_engine

    write_run(tmp_path, 300, per_shard=128)
    engine = open_engine("local")
    on_gpu = _scores(tmp_path, engine, "cuda", decode="gpu")
    pillow = _scores(tmp_path, engine, "cuda", decode="cpu")
    assert on_gpu.keys() == pillow.keys() and len(on_gpu) == 300
    diff = np.array([abs(on_gpu[u] - pillow[u]) for u in pillow])
    print(f"nvJPEG vs Pillow decoding: max |Δscore| {diff.max():.2e}, mean {diff.mean():.2e}")
    assert diff.max() < 1e-2


def test_nvjpeg_crops_match_pillow_within_a_few_levels():
    """The device decoder on CUDA against Pillow + open_clip's steps, pixel by pixel."""
    import io

    from PIL import Image

    from curate.clip.embed import DeviceDecoder, decode_image
    from curate.clip.model import Preprocess
    from curate.io.image_guard import DEFAULT_MAX_PIXELS

    rng = np.random.default_rng(0)
    blobs = []
    for w, h in [(683, 512), (512, 768), (300, 200), (1024, 700)]:
        pixels = rng.integers(0, 255, (h // 8, w // 8, 3), np.uint8)
        image = Image.fromarray(pixels).resize((w, h), Image.BICUBIC)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=90)
        blobs.append(out.getvalue())
    preprocess = Preprocess(224, (0.5,) * 3, (0.5,) * 3, "bicubic", "shortest")
    for blob, crop in zip(blobs, DeviceDecoder(preprocess, torch.device("cuda"))(blobs)):
        want, _ = decode_image(blob, preprocess.pil_steps(), DEFAULT_MAX_PIXELS)
        want = np.frombuffer(want, np.uint8).reshape(224, 224, 3).astype(int)
        diff = np.abs(crop.permute(1, 2, 0).cpu().numpy().astype(int) - want)
        print(f"nvJPEG crop vs Pillow: max {diff.max()}, mean {diff.mean():.3f}")
        assert diff.mean() < 1.0 and diff.max() <= 16
