"""Scores of image-text pairs from the CLIP vectors a pool already has: negCLIPLoss and NormSim.

Wang et al., 2024, "CLIPLoss and Norm-Based Data Selection Methods for Multimodal
Contrastive Learning" (arXiv 2405.19547; code: ypwang61/negCLIPLoss_NormSim,
``baselines/vas2.py``). Both need no model beyond the one that made the vectors.

**negCLIPLoss.** A caption that matches everything ("a photo") gets a high CLIP
score with its own image and with every other one. CLIP's loss discounts that:
it scores a pair against the other pairs of its batch. For pair ``i`` of a batch
``B`` of pairs (image vectors ``f``, text vectors ``g``, ``s_ij = f_i · g_j``)::

    negCLIPLoss_B(i) = s_ii − τ/2 · log Σ_{j∈B} exp(s_ij / τ) − τ/2 · log Σ_{j∈B} exp(s_ji / τ)

averaged over ``repeats`` random batches holding ``i`` (``cal_new_clip_score``:
``final_css − final_norm1 − final_norm2``, ``average_num`` times). The paper's
defaults: batches of 32,768, 10 repeats, τ = 0.01 (OpenAI CLIP's learned
temperature; 0.07 for DFN's). The sums are taken as ``logsumexp``: the same
number, without ``exp(s / τ)`` overflowing float32 when ``s / τ`` > 88.

The random batches: the reference shuffles the rows of each DataComp metadata file
with ``torch.randperm`` and cuts them into batches of ``batch_size``, the last one
shorter. Here the rows of one ledger file are ordered by a seeded 64-bit hash
of their uid, one seed per repeat, and cut into ``ceil(n / batch_size)`` batches
of equal size (within one row): the normaliser grows with the batch (by τ/2 ·
log of its size, on each side), so the reference's short last batch lifts its
rows' scores — by 0.015 at τ = 0.01 for a batch of 1,700 beside 32,768 — and
equal batches do not. The scores depend on the seed and on which rows share a
file, never on the order of files or rows, the engine or the machine. A file of
at most ``batch_size`` rows is one batch.

**NormSim.** How close an image is to a target set (a downstream task's images,
ImageNet's): the p-norm of its cosines to the target vectors
(``cal_similarity_scores_norm``: ``torch.norm(f @ G.T, p, dim=1)``), p = 2 or
∞ (the largest absolute cosine).

Vectors are used as stored (float16, unit length from the clip stage or DataComp),
in float32, as the reference reads its ``.npz``. On a GPU when the process sees one.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from curate.io.uids import sample_keys

#: Rows of a batch whose similarities are taken at once: 2,048 × 32,768 floats is 256 MB.
ROW_BLOCK = 2048
#: NormSim's targets per block: 1,024 rows × 65,536 targets is 256 MB.
TARGET_BLOCK = 65_536


def batch_seed(seed: int, repeat: int) -> int:
    """The hash seed of one repeat's batches: a well-mixed 64-bit number of (seed, repeat)."""
    return int(np.random.SeedSequence([seed, repeat]).generate_state(1, np.uint64)[0])


def batches(uids: pa.Array, batch_size: int, seed: int, repeat: int) -> list[np.ndarray]:
    """One repeat's batches: row indices in the order of the rows' seeded uid hashes, cut
    into the fewest batches of at most ``batch_size``, equal within one row."""
    order = np.argsort(sample_keys(uids, batch_seed(seed, repeat)), kind="stable")
    return np.array_split(order, max(1, -(-len(order) // batch_size)))


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _normalisers(f, g, temperature: float):
    """τ/2 · logsumexp over each row (image i against every text) and each column (text j
    against every image) of ``f @ g.T / τ``, a block of rows at a time."""
    import torch

    rows = torch.empty(len(f), device=f.device)
    columns = torch.full((len(g),), -torch.inf, device=f.device)
    for start in range(0, len(f), ROW_BLOCK):
        logits = f[start : start + ROW_BLOCK] @ g.T / temperature
        rows[start : start + ROW_BLOCK] = torch.logsumexp(logits, dim=1)
        columns = torch.logaddexp(columns, torch.logsumexp(logits, dim=0))
    return 0.5 * temperature * rows, 0.5 * temperature * columns


def neg_clip_loss(
    uids: pa.Array,
    images: np.ndarray,
    texts: np.ndarray,
    batch_size: int,
    repeats: int,
    temperature: float,
    seed: int,
) -> np.ndarray:
    """negCLIPLoss of every row (float32), its batches drawn as the module says."""
    import torch

    with torch.inference_mode():
        device = _device()
        f = torch.from_numpy(np.ascontiguousarray(images, np.float32)).to(device)
        g = torch.from_numpy(np.ascontiguousarray(texts, np.float32)).to(device)
        normaliser = torch.zeros(len(f), dtype=torch.float64, device=device)
        for repeat in range(repeats):
            for rows in batches(uids, batch_size, seed, repeat):
                index = torch.from_numpy(rows).to(device)
                by_image, by_text = _normalisers(f[index], g[index], temperature)
                normaliser[index] += (by_image + by_text).double()
        score = (f * g).sum(dim=1).double() - normaliser / repeats
    return score.float().cpu().numpy()


def norm_sim(images: np.ndarray, targets: np.ndarray, p: float) -> np.ndarray:
    """NormSim_p of every row (float32): the p-norm (2 or ∞) of its cosines to ``targets``,
    taken over blocks of rows and targets, so a target set of ImageNet's 1.28 M images
    needs 256 MB at a time, not a row's cosines to all of them at once."""
    import torch

    with torch.inference_mode():
        device = _device()
        out = []
        for start in range(0, len(images), ROW_BLOCK // 2):
            rows = np.ascontiguousarray(images[start : start + ROW_BLOCK // 2], np.float32)
            f = torch.from_numpy(rows).to(device)
            total = torch.zeros(len(f), dtype=torch.float64, device=device)
            for first in range(0, len(targets), TARGET_BLOCK):
                block = np.ascontiguousarray(targets[first : first + TARGET_BLOCK], np.float32)
                cosines = (f @ torch.from_numpy(block).to(device).T).abs()
                if p == math.inf:
                    total = torch.maximum(total, cosines.max(dim=1).values.double())
                else:
                    total += (cosines.double() ** 2).sum(dim=1)
            out.append((total if p == math.inf else total.sqrt()).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)
