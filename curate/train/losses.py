"""The two contrastive losses the trainer offers, as open_clip defines them (single device).

Both take L2-normalised image and text features of one batch, where row i of
each is a matched pair, and the model's learned temperature already
exponentiated (``logit_scale`` = exp of the parameter, what an open_clip model's
forward returns).

* ``clip_loss`` — CLIP's symmetric InfoNCE (Radford et al. 2021): cross-entropy
  over the N×N scaled cosine similarities, image→text and text→image, averaged
  (open_clip ``loss.ClipLoss``).
* ``siglip_loss`` — SigLIP's pairwise sigmoid loss (Zhai et al. 2023,
  arXiv:2303.15343): every pair is an independent binary classification,
  label +1 on the diagonal and −1 elsewhere, logits ``scale · cos + bias``,
  summed over pairs and divided by N (open_clip ``loss.SigLipLoss``).

Their arguments are what an open_clip model's forward returns — (image, text,
scale) or, for a model built with a bias, (image, text, scale, bias) — so
``loss.fn(*model(images, texts))`` works for either. ``LOSSES`` names them for
the trainer, with how open_clip initialises the model's logit parameters for
each: SigLIP starts at temperature 10 and bias −10 (``open_clip_train/main.py``,
``--siglip``), which keeps the N² − N negatives from swamping the first steps;
CLIP keeps the model's own 1/0.07.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """Symmetric InfoNCE: mean of the image→text and text→image cross-entropies."""
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
) -> torch.Tensor:
    """Sigmoid loss: −Σ log σ(label · (scale · cos + bias)) / N, label +1 matched, −1 not."""
    logits = logit_scale * image_features @ text_features.T + logit_bias
    n = len(logits)
    labels = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / n


@dataclass(frozen=True)
class Loss:
    """A loss and the open_clip ``create_model`` keyword arguments the model needs for it."""

    fn: Callable[..., torch.Tensor]
    model_kwargs: dict = field(default_factory=dict)


LOSSES: dict[str, Loss] = {
    "clip": Loss(clip_loss),
    "siglip": Loss(siglip_loss, {"init_logit_scale": math.log(10), "init_logit_bias": -10.0}),
}
