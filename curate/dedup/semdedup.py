"""SemDeDup's three steps as plain numpy/FAISS functions (Abbas et al., 2023).

1. k-means (FAISS, spherical) on a sample of L2-normalised image embeddings;
2. every row goes to its nearest centroid (largest inner product);
3. within each cluster, rows in survivor order (best first) are kept unless
   their cosine similarity to an already-kept row exceeds ``1 − ε``.

A duplicate pair split by a cluster boundary is the approximation's blind
spot. Step 4 narrows it: each survivor of step 3 is also compared with the
survivors of its second-nearest cluster, and the pairs found there join a
graph on which the same rule runs (every survivor in order, kept unless a
kept row is too close). A row absorbed in step 3 follows its absorber.

Step 3 keeps one survivor per duplicate group. The reference SemDeDup code
drops every row with a similar row *anywhere* earlier in the order, kept or
not, which can drop a whole chain of near duplicates with nobody left to
stand for it; the paper keeps one, and so does this.

The decisions are exact and reproducible. Cosines are screened in float32
and every pair within ``SCREEN`` of the threshold is recomputed in float64
from the stored vectors, so a pair lands on the side of ``1 − ε`` its exact
cosine puts it. Rows are assigned to centroids in blocks of a fixed shape,
so a row's cluster does not depend on which batch or file it came in.
"""

from __future__ import annotations

import numpy as np

#: float32 screening margin: pairs above ``threshold − SCREEN`` are re-checked in float64.
#: The float32 error of a 512-d dot product of unit vectors is below 1e-5.
SCREEN = 1e-3
#: Rows per block when assigning to centroids (padded: every block has the same shape).
ASSIGN_BLOCK = 1024
#: Rows per block in the within-cluster pass, and kept rows compared per matrix product.
BLOCK = 512
KEPT_CHUNK = 8192


def train_centroids(sample: np.ndarray, k: int, iterations: int, seed: int) -> np.ndarray:
    """Spherical k-means centroids (k, D) float32 of unit-length ``sample`` rows."""
    import faiss

    sample = np.ascontiguousarray(sample, dtype=np.float32)
    k = max(1, min(k, len(sample)))
    if k == 1:
        centre = sample.mean(axis=0, keepdims=True)
        return (centre / max(np.linalg.norm(centre), 1e-12)).astype(np.float32)
    kmeans = faiss.Kmeans(
        sample.shape[1],
        k,
        niter=iterations,
        seed=seed,
        spherical=True,
        max_points_per_centroid=max(1, -(-len(sample) // k)),  # use the whole sample
        verbose=False,
    )
    kmeans.train(sample)
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


def assign(vectors: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest and second-nearest centroid (inner product; ties: lowest index).

    The second is -1 with a single centroid.
    """
    x = np.nan_to_num(np.asarray(vectors, dtype=np.float32), nan=0.0)
    first = np.empty(len(x), np.int32)
    second = np.full(len(x), -1, np.int32)
    block = np.zeros((ASSIGN_BLOCK, x.shape[1]), np.float32)
    for start in range(0, len(x), ASSIGN_BLOCK):
        rows = x[start : start + ASSIGN_BLOCK]
        block[: len(rows)] = rows
        block[len(rows) :] = 0
        sims = (block @ centroids.T)[: len(rows)]
        best = np.argmax(sims, axis=1)
        first[start : start + len(rows)] = best
        if centroids.shape[0] > 1:
            sims[np.arange(len(rows)), best] = -np.inf
            second[start : start + len(rows)] = np.argmax(sims, axis=1)
    return first, second


def _exact(a: np.ndarray, b: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """float64 cosines of the pairs (a[rows[i]], b[cols[i]]) of unit rows."""
    return np.einsum("ij,ij->i", a[rows], b[cols])


def _pairs_above(
    a32: np.ndarray, b32: np.ndarray, a: np.ndarray, b: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) with exact cosine(a[i], b[j]) > threshold: screened in float32, decided in float64."""
    with np.errstate(invalid="ignore"):
        rows, cols = np.nonzero(a32 @ b32.T > threshold - SCREEN)
    hit = _exact(a, b, rows, cols) > threshold
    return rows[hit], cols[hit]


def absorbers(x: np.ndarray, threshold: float) -> np.ndarray:
    """For unit rows in survivor order: -1 for a kept row, else the kept row that absorbs it.

    Row j is dropped when its cosine with some kept row i < j exceeds
    ``threshold``; it is absorbed by the first such i (the best survivor). No
    (n, n) matrix is built: blocks of ``BLOCK`` rows meet the kept rows so far.
    """
    x = np.asarray(x, dtype=np.float64)
    x32 = x.astype(np.float32)
    n = len(x)
    parent = np.full(n, -1, np.int64)
    kept = np.zeros(n, bool)
    for start in range(0, n, BLOCK):
        stop = min(n, start + BLOCK)
        blk, blk32 = x[start:stop], x32[start:stop]
        first = np.full(stop - start, n, np.int64)  # best earlier kept neighbour
        earlier = np.flatnonzero(kept[:start])
        for c in range(0, len(earlier), KEPT_CHUNK):
            ids = earlier[c : c + KEPT_CHUNK]
            rows, cols = _pairs_above(blk32, x32[ids], blk, x[ids], threshold)
            np.minimum.at(first, rows, ids[cols])
        rows, cols = _pairs_above(blk32, blk32, blk, blk, threshold)
        earlier_in_block = cols < rows
        rows, cols = rows[earlier_in_block], cols[earlier_in_block]
        absorbed = first < n
        parent[start:stop][absorbed] = first[absorbed]
        has_mate = np.zeros(stop - start, bool)
        has_mate[rows] = True
        kept[start:stop] = ~absorbed & ~has_mate
        # The rest depend on in-block rows before them, whose fate is settled by then.
        for local in np.flatnonzero(~absorbed & has_mate):
            mates = cols[rows == local]
            mates = mates[kept[start + mates]]
            if len(mates):
                parent[start + local] = start + mates.min()
            else:
                kept[start + local] = True
    return parent


def pairs_between(a: np.ndarray, b: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) with exact cosine(a[i], b[j]) > threshold, for unit rows, block by block."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    found_i, found_j = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for start in range(0, len(a), BLOCK):
        for c in range(0, len(b), KEPT_CHUNK):
            rows, cols = _pairs_above(
                a32[start : start + BLOCK],
                b32[c : c + KEPT_CHUNK],
                a[start : start + BLOCK],
                b[c : c + KEPT_CHUNK],
                threshold,
            )
            found_i.append(rows + start)
            found_j.append(cols + c)
    return np.concatenate(found_i), np.concatenate(found_j)


def absorb_on_graph(order: list[str], edges: list[tuple[str, str]]) -> dict[str, str]:
    """The same rule on a graph: nodes in survivor order, each absorbed by its best kept neighbour.

    Returns absorbed node → absorber. Used across cluster boundaries, where the
    candidate pairs are few and already known.
    """
    rank = {node: i for i, node in enumerate(order)}
    neighbours: dict[str, list[str]] = {}
    for u, v in edges:
        neighbours.setdefault(u, []).append(v)
        neighbours.setdefault(v, []).append(u)
    kept: set[str] = set()
    parent = {}
    for node in order:
        earlier = [m for m in neighbours.get(node, ()) if m in kept]
        if earlier:
            parent[node] = min(earlier, key=rank.__getitem__)
        else:
            kept.add(node)
    return parent
