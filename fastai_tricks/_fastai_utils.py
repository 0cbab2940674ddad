"""Small helpers over fastai internals that several callbacks share."""

from __future__ import annotations

from typing import Any

__all__ = [
    "ReleaseOnDetach",
    "batch_size_fixers",
    "is_gathering_preds",
    "is_lr_finding",
    "is_training_batch",
    "item_size_fixers",
]


def is_lr_finding(learn: Any) -> bool:
    """Whether ``learn`` is inside ``lr_find`` (fastai attaches its ``LRFinder`` as ``learn.lr_finder``)."""
    return getattr(learn, "lr_finder", None) is not None


def is_gathering_preds(learn: Any) -> bool:
    """Whether ``learn`` is inside ``get_preds``/``predict``/``tta`` (``GatherPredsCallback`` is attached)."""
    return getattr(learn, "gather_preds", None) is not None


def is_training_batch(learn: Any) -> bool:
    """Whether the current batch is an ordinary training batch: not validation, lr_find or prediction."""
    return bool(getattr(learn, "training", False)) and not is_lr_finding(learn) and not is_gathering_preds(learn)


class ReleaseOnDetach:
    """Mixin for callbacks that hold per-fit state: ``_release()`` runs whenever ``learn`` changes.

    fastai sets ``cb.learn = None`` when it removes a callback, and ``fit(cbs=...)`` removes its
    callbacks in a ``finally`` block, so releasing on that assignment undoes a callback's per-fit
    changes even when fit unwinds on an exception for which fastai fires no ``after_*`` event
    (a RuntimeError, a KeyboardInterrupt). ``_release`` runs while ``self.learn`` is still the old
    learner. Put this class before ``Callback`` in the bases so its ``learn`` property wins.
    """

    @property
    def learn(self) -> Any:
        """The Learner this callback is attached to (None when detached)."""
        return self.__dict__.get("_learn")

    @learn.setter
    def learn(self, value: Any) -> None:
        if value is not self.__dict__.get("_learn"):
            self._release()
        self.__dict__["_learn"] = value

    def _release(self) -> None:
        """Undo per-fit changes and drop per-fit state; subclasses override."""


def batch_size_fixers(pipeline: Any) -> list[Any]:
    """List the batch transforms with a fixed output size: RandomResizedCropGPU, or an affine one with a size."""
    from fastai.vision.augment import AffineCoordTfm, RandomResizedCropGPU

    return [
        t
        for t in getattr(pipeline, "fs", [])
        if isinstance(t, RandomResizedCropGPU)
        or (isinstance(t, AffineCoordTfm) and getattr(t, "size", None) is not None)
    ]


def item_size_fixers(pipeline: Any) -> list[Any]:
    """List the item transforms that fix the size: fastai's Resize and RandomResizedCrop (their size is (w, h))."""
    from fastai.vision.augment import RandomResizedCrop, Resize

    return [t for t in getattr(pipeline, "fs", []) if isinstance(t, (Resize, RandomResizedCrop))]
