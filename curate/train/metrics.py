"""Zero-shot classification and retrieval metrics, as DataComp reports them through
``clip_benchmark`` (``zeroshot_classification.evaluate``, ``zeroshot_retrieval.evaluate``).

Every metric comes from one rule, the **rank** of a query's best correct item among
all items by score, highest first, where equal scores go to the lower index, as
``argmax`` breaks them. Top-k accuracy and recall@k are "rank < k"; the predicted
class is rank 0. A model that scores everything alike therefore scores as chance
would, never perfectly. ``clip_benchmark`` leaves ties to ``torch.topk``, so the two
can differ only where scores are exactly equal.
"""

from __future__ import annotations

import numpy as np

#: Rows of a score matrix ranked at a time: COCO's 25,000 captions × 5,000 images
#: would otherwise need several full-size temporaries at once.
BLOCK = 1024
RECALL_AT = (1, 5, 10)


def best_ranks(scores: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Per row of ``scores`` (queries × items): the rank of its best ``correct`` item."""
    out = np.empty(len(scores), np.int64)
    index = np.arange(scores.shape[1])
    for start in range(0, len(scores), BLOCK):
        s, c = scores[start : start + BLOCK], correct[start : start + BLOCK]
        j = np.where(c, s, -np.inf).argmax(axis=1)  # the best correct item, lowest index on ties
        best = s[np.arange(len(s)), j][:, None]
        above = (s > best) | ((s == best) & (index < j[:, None]))
        out[start : start + BLOCK] = above.sum(axis=1)
    return out


def classification(logits: np.ndarray, target: np.ndarray) -> dict[str, float | None]:
    """Top-1 and top-5 accuracy (top-5 only with ≥ 5 classes, as DataComp) and mean
    per-class recall: the recall of each class the targets hold, averaged (sklearn's
    ``balanced_accuracy_score``)."""
    classes = logits.shape[1]
    rank = best_ranks(logits, target[:, None] == np.arange(classes))
    hit = rank == 0
    recalls = [hit[target == c].mean() for c in np.unique(target)]
    return {
        "acc1": float(hit.mean()),
        "acc5": float((rank < 5).mean()) if classes >= 5 else None,
        "mean_per_class_recall": float(np.mean(recalls)),
    }


def retrieval(texts_by_images: np.ndarray, image_of_text: np.ndarray) -> dict[str, float]:
    """Recall@1, 5 and 10 both ways over ``texts_by_images`` (one row per caption, one
    column per image): image retrieval asks each caption for its image, text retrieval
    each image for any of its captions. ``mean_recall@1`` is their mean at 1, DataComp's
    main retrieval metric."""
    correct = image_of_text[:, None] == np.arange(texts_by_images.shape[1])
    image_rank = best_ranks(texts_by_images, correct)
    text_rank = best_ranks(texts_by_images.T, correct.T)
    out = {}
    for k in RECALL_AT:
        out[f"image_retrieval_recall@{k}"] = float((image_rank < k).mean())
        out[f"text_retrieval_recall@{k}"] = float((text_rank < k).mean())
    out["mean_recall@1"] = (out["image_retrieval_recall@1"] + out["text_retrieval_recall@1"]) / 2
    return out
