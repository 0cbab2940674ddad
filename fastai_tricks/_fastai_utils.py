"""Small helpers over fastai internals that several callbacks share."""

from __future__ import annotations

from typing import Any

__all__ = ["is_gathering_preds", "is_lr_finding", "is_training_batch"]


def is_lr_finding(learn: Any) -> bool:
    """Whether ``learn`` is inside ``lr_find`` (fastai attaches its ``LRFinder`` as ``learn.lr_finder``)."""
    return getattr(learn, "lr_finder", None) is not None


def is_gathering_preds(learn: Any) -> bool:
    """Whether ``learn`` is inside ``get_preds``/``predict``/``tta`` (``GatherPredsCallback`` is attached)."""
    return getattr(learn, "gather_preds", None) is not None


def is_training_batch(learn: Any) -> bool:
    """Whether the current batch is an ordinary training batch: not validation, lr_find or prediction."""
    return bool(getattr(learn, "training", False)) and not is_lr_finding(learn) and not is_gathering_preds(learn)
