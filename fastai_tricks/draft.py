"""Decode JPEGs at the size the pipeline needs: libjpeg's DCT-domain scaling, through ``Image.draft``.

A JPEG holds 8x8 blocks of DCT coefficients, and libjpeg can decode them straight to 1/2, 1/4 or
1/8 of the stored size by keeping only the low-frequency coefficients. Pillow exposes this as
``Image.draft``. It is several times cheaper than decoding at full size and resizing afterwards,
and the pixels are a box-filtered downscale, so nothing is lost at the size that is finally used.

fastai's ``PILImage.create`` always decodes at full size. Here:

- the pure functions say how far a JPEG may be reduced: :func:`draft_reduction` (the largest DCT
  reduction that still covers a needed size) and the needed size of each of fastai's size-fixing
  item transforms (:func:`resize_need`, :func:`random_resized_crop_need`);
- :class:`DraftImage` is a ``PILImage`` whose ``create`` applies the reduction;
- :class:`DraftDL` is the ``TfmdDL`` that tells it the size, read from the loader's own first item
  transform each time an item is made, so a per-fit copy of the loader with a smaller ``Resize``
  (what :class:`fastai_tricks.ProgressiveResize` makes) decodes smaller too;
- :func:`DraftImageBlock` puts the two in a ``DataBlock``.

Outside a :class:`DraftDL` (``dls.train_ds[0]``, ``PILImage``-style use), or when the first item
transform is not a size-fixing ``Resize`` or ``RandomResizedCrop``, a :class:`DraftImage` is
decoded exactly as ``PILImage`` decodes it.
"""

# No ``from __future__ import annotations`` here: fastai's type dispatch reads ``DraftImage.create``'s
# annotations at run time, and string annotations would make the DataLoaders unpicklable.
import io
import math
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastai.data.block import TransformBlock
from fastai.data.core import TfmdDL
from fastai.vision.core import PILImage, TensorBBox, TensorMask, TensorPoint
from PIL import Image

__all__ = [
    "DCT_REDUCTIONS",
    "DraftDL",
    "DraftImage",
    "DraftImageBlock",
    "decoded_size",
    "draft_reduction",
    "item_need",
    "open_image",
    "random_resized_crop_need",
    "resize_need",
]

#: Pixel sizes are ``(width, height)`` here, as in Pillow and fastai's item transforms.
Size = tuple[int, int]
#: Maps a stored JPEG size to the smallest decoded size the item transforms need, or None for "full size".
NeedFn = Callable[[Size], Size | None]

#: The scale reductions libjpeg's DCT decoder offers through ``Image.draft``, largest first.
DCT_REDUCTIONS: tuple[int, ...] = (8, 4, 2, 1)

# The need of the loader that is making the current item; set by DraftDL.create_item only.
_NEED: ContextVar[NeedFn | None] = ContextVar("fastai_tricks_draft_need", default=None)


def _current_need() -> NeedFn | None:
    """The need of the DraftDL making the current item (None outside one).

    A function rather than a global read in ``DraftImage.create``: cloudpickle (fastai's export)
    pickles that method by value, with the globals it reads, and a ContextVar cannot be pickled.
    """
    return _NEED.get()


# --- pure maths ------------------------------------------------------------------------------------


def decoded_size(image_size: Size, reduction: int) -> Size:
    """Return the size libjpeg decodes a ``(width, height)`` JPEG to at ``1/reduction`` scale (rounded up)."""
    w, h = image_size
    return (-(-w // reduction), -(-h // reduction))


def draft_reduction(image_size: Size, needed: Size | None) -> int:
    """Return the largest DCT reduction (8, 4, 2 or 1) whose decoded image still covers ``needed``.

    Args:
        image_size: The stored ``(width, height)`` of the JPEG.
        needed: The smallest ``(width, height)`` the decoded image may have, or None (full size).

    Returns:
        ``r`` such that :func:`decoded_size` ``(image_size, r)`` is at least ``needed`` in both
        sides, and no larger reduction is (1 when even the full size is smaller than ``needed``:
        the decoder never upscales). A reduction larger than the short side is never taken.
    """
    if needed is None:
        return 1
    w, h = image_size
    for r in DCT_REDUCTIONS:
        dw, dh = decoded_size(image_size, r)
        if r <= min(w, h) and dw >= needed[0] and dh >= needed[1]:
            return r
    return 1


def resize_need(image_size: Size, target: Size, method: str = "crop") -> Size:
    """Return the smallest decoded size from which fastai's ``Resize(target, method)`` only shrinks.

    ``'crop'`` cuts the largest region of the target's aspect ratio and ``'squish'`` takes the whole
    image: both need the target in both sides. ``'pad'`` fits the whole image inside the target, so
    it needs the fitted image's size, which equals the target in one side only.

    Args:
        image_size: The stored ``(width, height)``.
        target: The transform's output ``(width, height)`` (fastai's ``Resize.size``).
        method: ``'crop'``, ``'squish'`` or ``'pad'``.

    Returns:
        The needed ``(width, height)``.
    """
    (w, h), (tw, th) = image_size, target
    if method == "pad":
        return (min(tw, -(-w * th // h)), min(th, -(-h * tw // w)))
    return (tw, th)


def random_resized_crop_need(
    image_size: Size,
    target: Size,
    min_scale: float,
    ratio: tuple[float, float],
    val_xtra: float,
    training: bool,
) -> Size:
    """Return the smallest decoded size from which fastai's item-level ``RandomResizedCrop`` only shrinks.

    In training the crop covers at least ``min_scale`` of the image's area with a width/height ratio
    in ``ratio``, and is resized to ``target``: the smallest such crop must still cover the target,
    so a small ``min_scale`` leaves little room for reduction. In validation the whole image is
    resized to the target plus fastai's ``val_xtra`` margin and centre-cropped.

    Args:
        image_size: The stored ``(width, height)``.
        target: The output ``(width, height)`` (fastai's ``RandomResizedCrop.size``).
        min_scale: The smallest crop area, as a fraction of the image's area.
        ratio: The range of crop width/height ratios.
        val_xtra: fastai's validation margin, a fraction of the target's long side.
        training: Whether the transform is in its training mode (a random crop).

    Returns:
        The needed ``(width, height)``.
    """
    (w, h), (tw, th) = image_size, target
    if not training:
        xtra = math.ceil(max(tw, th) * val_xtra / 8) * 8  # fastai's own margin rule
        return (tw + xtra, th + xtra)
    area = min_scale * w * h
    # The largest factor the image may shrink by: the smallest crop, shrunk by it, still covers the target.
    factor = min(math.sqrt(area * ratio[0]) / tw, math.sqrt(area / ratio[1]) / th)
    if factor <= 1:
        return (w, h)
    return (math.ceil(w / factor), math.ceil(h / factor))


# --- fastai item transforms ------------------------------------------------------------------------


def item_need(tfm: Any, split_idx: int | None) -> NeedFn | None:
    """Return the need of a size-fixing item transform, or None when it is not one this module knows.

    Known: fastai's ``Resize`` and ``RandomResizedCrop`` applied with probability 1. Anything else
    (a custom transform, a ``RandomCrop`` that needs every stored pixel, a transform applied only
    sometimes) means no reduction.
    """
    from fastai.vision.augment import RandomResizedCrop, Resize

    if type(tfm) not in (Resize, RandomResizedCrop) or getattr(tfm, "p", 1.0) < 1.0:
        return None
    if tfm.split_idx is not None and split_idx is not None and tfm.split_idx != split_idx:
        return None  # the transform is off for this split: the next one would see the decoded image
    target = (int(tfm.size[0]), int(tfm.size[1]))  # fastai stores (width, height)
    if type(tfm) is Resize:
        method = str(tfm.method)
        return lambda size: resize_need(size, target, method)
    ratio = (float(tfm.ratio[0]), float(tfm.ratio[1]))
    training = not split_idx
    return lambda size: random_resized_crop_need(size, target, tfm.min_scale, ratio, tfm.val_xtra, training)


def _pipeline_need(pipeline: Any) -> NeedFn | None:
    """The need of the first item transform of ``pipeline`` (fastai sorts them by ``order``)."""
    fs = getattr(pipeline, "fs", None)
    if not fs:
        return None
    return item_need(fs[0], getattr(pipeline, "split_idx", None))


# --- decoding --------------------------------------------------------------------------------------


def open_image(fn: str | Path | io.BytesIO, mode: str | None = "RGB", need: NeedFn | None = None) -> Image.Image:
    """Open and decode an image like fastai's ``load_image``, reducing a JPEG to what ``need`` asks.

    Args:
        fn: A path or a file-like object.
        mode: The Pillow mode to convert to (fastai's ``PILImage`` uses ``'RGB'``), or None.
        need: Maps the stored ``(width, height)`` to the smallest decoded size that is needed; None
            decodes at full size.

    Returns:
        The decoded image, converted to ``mode``.

    Raises:
        PIL.UnidentifiedImageError: ``fn`` is not an image (Pillow's message names the file).
        OSError: A truncated or corrupt file; the message names the file.
    """
    try:
        im = Image.open(fn)
        if need is not None and im.format == "JPEG":
            r = draft_reduction(im.size, need(im.size))
            if r > 1:
                im.draft(None, (im.size[0] // r, im.size[1] // r))
        im.load()
    except Image.UnidentifiedImageError:
        raise
    except (OSError, SyntaxError) as err:
        name = str(fn) if isinstance(fn, (str, Path)) else getattr(fn, "name", "<bytes>")
        if name in str(err):
            raise
        raise type(err)(f"{err}: {name}") from err
    im = im._new(im.im)  # as fastai's load_image: a plain Image, detached from the file
    return im.convert(mode) if mode else im


class DraftImage(PILImage):
    """A fastai ``PILImage`` whose JPEGs are decoded at the smallest size the loader's item transforms need.

    Inside a :class:`DraftDL` whose first item transform is a ``Resize`` or ``RandomResizedCrop``,
    ``create`` decodes a JPEG with ``Image.draft`` at the largest DCT reduction (1/2, 1/4 or 1/8)
    that keeps the image at or above what that transform needs, so the transform still only
    shrinks. Everywhere else, and for every other format (PNG, WebP, ...), it is ``PILImage``.
    """

    @classmethod
    def create(cls, fn: Path | str | torch.Tensor | np.ndarray | bytes | Image.Image, **kwargs: Any):  # noqa: ANN206
        """Return a DraftImage from a path, bytes, array, tensor or Pillow image, as ``PILImage.create`` does.

        It has no return annotation, like fastai's own ``create``: fastai's transforms cast to it.
        """
        need = _current_need()
        if isinstance(fn, bytes):
            fn = io.BytesIO(fn)
        if not isinstance(fn, (str, Path, io.BytesIO)):
            return super().create(fn, **kwargs)
        mode = {**cls._open_args, **kwargs}.get("mode")
        return cls(open_image(fn, mode=mode, need=need))


def _spatial_items(item: Sequence[Any]) -> int:
    """Count the parts of a sample that carry pixel geometry (images, masks, points, boxes)."""
    return sum(isinstance(o, (Image.Image, TensorMask, TensorPoint, TensorBBox)) for o in item)


class DraftDL(TfmdDL):
    """A ``TfmdDL`` that has its :class:`DraftImage` items decoded at the size its item transforms need.

    The size is read from the loader's own first item transform each time an item is made, so a
    copy of the loader with a smaller ``Resize`` decodes smaller. A sample with more than one part
    that carries geometry (an image and its mask, points or boxes) is always decoded at full size:
    their transforms assume the stored size of the first one.
    """

    def create_item(self, s: int | None) -> Any:
        """Make the item at index ``s``, its JPEG reduced to what the first item transform needs."""
        need = _pipeline_need(self.after_item) if self.indexed else None
        if need is None or self.__dict__.get("_draft_off", False):
            return super().create_item(s)
        token = _NEED.set(need)
        try:
            item = super().create_item(s)
        finally:
            _NEED.reset(token)
        if isinstance(item, tuple) and _spatial_items(item) > 1:
            self._draft_off = True  # this data set's samples need their stored geometry
            return super().create_item(s)
        return item


def DraftImageBlock(cls: type[DraftImage] = DraftImage) -> TransformBlock:  # noqa: N802 (fastai's block naming)
    """A ``DataBlock`` block like fastai's ``ImageBlock``, whose JPEGs are decoded at the size that is needed.

    Args:
        cls: The image type, :class:`DraftImage` or a subclass.

    Returns:
        A ``TransformBlock`` with ``cls.create`` as its type transform and :class:`DraftDL` as its loader.
    """
    from fastai.data.transforms import IntToFloatTensor

    if not (isinstance(cls, type) and issubclass(cls, DraftImage)):
        raise TypeError(f"cls must be DraftImage or a subclass of it, got {cls!r}")
    return TransformBlock(type_tfms=cls.create, batch_tfms=IntToFloatTensor, dl_type=DraftDL)
