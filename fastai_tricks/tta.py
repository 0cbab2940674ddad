"""Four-corner (five-crop and ten-crop) test-time augmentation that decodes each image once.

The fastbook chapter on training a state-of-the-art model ends with a research
exercise: crop an image to a square in each of its four corners, average the
predictions on those crops and on a center crop, and compare with fastai's own
``learn.tta``. This module is that tool, built so that it costs as little as
possible:

* :func:`four_corner_crops` and :func:`expand_views` are pure tensor functions
  that turn a batch into its views;
* :func:`merge_views` is the pure function that turns per-view outputs back into
  one prediction per image;
* :func:`paste_views` does the same for dense (segmentation) outputs: it undoes each
  view's flip and resize, pastes it at its crop's place and merges every pixel over
  the views that contain it; :func:`view_boxes` is the one geometry that
  :func:`expand_views` cuts with and :func:`paste_views` pastes with, and
  :func:`view_coverage` counts the views per pixel;
* :class:`FourCornerTTA` is a thin fastai callback that expands a validation
  batch in ``before_batch`` and merges in ``after_pred``, so the DataLoader
  decodes and augments every image once, whatever the number of views, and the
  loss and metrics see the merged prediction;
* ``Learner.four_corner_tta`` is the ``learn.tta``-style convenience method.

Multi-crop evaluation goes back to Krizhevsky et al., "ImageNet Classification
with Deep Convolutional Neural Networks" (NeurIPS 2012, ten-crop) and Simonyan &
Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition"
(arXiv:1409.1556); the exercise is from Howard & Gugger, "Deep Learning for
Coders with fastai and PyTorch", chapter 7 (fastai: arXiv:2002.04688).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import NamedTuple

import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.vision.core import TensorPoint
from fastcore.basics import getcallable, patch
from torch import Tensor, nn

from ._checks import check_choice, check_fraction, check_positive_int

__all__ = [
    "MERGE_MODES",
    "FourCornerTTA",
    "ViewBox",
    "expand_views",
    "four_corner_crops",
    "merge_views",
    "paste_views",
    "view_boxes",
    "view_coverage",
    "view_names",
]

#: The ways :func:`merge_views` can combine the outputs of the views of one image.
MERGE_MODES: tuple[str, ...] = ("mean", "logits", "gmean", "max")

_ACTIVATIONS = ("softmax", "sigmoid", None)
_CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


# --- pure functions --------------------------------------------------------------------------------


def _crop_side(size: int | float, height: int, width: int) -> int:
    """Side in pixels of the square crop ``size`` (int pixels or float fraction) on a ``height`` x ``width`` image."""
    short = min(height, width)
    if isinstance(size, int):
        side = size
    else:
        # A fraction of the short side; at least one pixel so tiny images still give a crop.
        side = max(1, int(round(size * short)))
    if side > short:
        raise ValueError(
            f"crop size {size!r} gives a {side}x{side} crop, bigger than the {height}x{width} image "
            f"(the crop side must be at most the short side, {short} px)"
        )
    return side


def _check_crop(name: str, size: object) -> int | float:
    """Validate a crop size: an int >= 1 (pixels) or a float in (0, 1] (fraction of the short side)."""
    if isinstance(size, bool) or not isinstance(size, Real):
        raise TypeError(f"{name} must be an int (pixels) or a float in (0, 1], got {size!r} ({type(size).__name__})")
    if isinstance(size, int):
        return check_positive_int(name, size)
    if not 0.0 < size <= 1.0:
        raise ValueError(
            f"{name} must be in (0, 1] as a fraction of the short side, or an int crop size in pixels, got {size!r}"
        )
    return float(size)


def _check_batch(x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor of shape (B, C, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"x must be a batch of images of shape (B, C, H, W), got shape {tuple(x.shape)}")
    return x


def four_corner_crops(x: Tensor, size: int | float) -> Tensor:
    """Crop every image of a batch to a square in each of its four corners and in its center.

    Args:
        x: A batch of images, shape :math:`(B, C, H, W)`; any dtype, device and memory format.
        size: Side of the square crops: an ``int`` number of pixels, or a ``float`` in (0, 1]
            giving the side as a fraction of ``min(H, W)`` (rounded, at least one pixel).

    Returns:
        A tensor of shape :math:`(5, B, C, s, s)` holding, in torchvision's ``five_crop`` order,
        the top-left, top-right, bottom-left, bottom-right and center crops. The center crop's
        offset is rounded like torchvision's ``center_crop``.

    Raises:
        ValueError: ``x`` is not 4-D, ``size`` is out of range, or the crop is bigger than the image
            (the message names both sizes).

    Example:
        >>> x = torch.arange(25.0).view(1, 1, 5, 5)
        >>> four_corner_crops(x, 1).flatten().tolist()
        [0.0, 4.0, 20.0, 24.0, 12.0]

    """
    x = _check_batch(x)
    height, width = x.shape[-2], x.shape[-1]
    side = _crop_side(_check_crop("size", size), height, width)
    return torch.stack([x[..., t : t + side, left : left + side] for t, left in _crop_origins(height, width, side)])


def _crop_origins(height: int, width: int, side: int) -> list[tuple[int, int]]:
    """``(top, left)`` of the top-left, top-right, bottom-left, bottom-right and center crops.

    The center offset is rounded like torchvision's ``center_crop`` (Python's ``round``).
    """
    bottom, right = height - side, width - side
    return [(0, 0), (0, right), (bottom, 0), (bottom, right), (int(round(bottom / 2)), int(round(right / 2)))]


def view_names(*, crop: bool = True, center: bool = True, flip: bool = False, full: bool = False) -> list[str]:
    """Names of the views :func:`expand_views` returns, in the same order.

    Args:
        crop: Whether the crop views (four corners, and center if ``center``) are present.
        center: Whether the center crop is present.
        flip: Whether every view is followed, after all the unflipped views, by its mirror image.
        full: Whether the whole image is a view.

    Returns:
        For example ``['top_left', 'top_right', 'bottom_left', 'bottom_right', 'center']``.

    """
    names = [*_CORNERS, *(["center"] if center else [])] if crop else []
    names += ["full"] if full else []
    return names + [f"{n}_flipped" for n in names] if flip else names


class ViewBox(NamedTuple):
    """Where one view of :func:`expand_views` comes from, and the size at which the model sees it.

    The view is the window ``[top : top + height, left : left + width]`` of the image, mirrored
    left-right if ``flipped``, then resized to ``view_height x view_width``.
    """

    name: str
    top: int
    left: int
    height: int
    width: int
    flipped: bool
    view_height: int
    view_width: int


def view_boxes(
    height: int,
    width: int,
    crop: int | float | None = 0.875,
    *,
    center: bool = True,
    flip: bool = False,
    full: bool = False,
    resize: bool = True,
) -> list[ViewBox]:
    """The geometry of the views :func:`expand_views` cuts from a ``height`` x ``width`` image.

    This is the one place where crop windows are computed: :func:`expand_views` cuts the views
    with it and :func:`paste_views` puts their outputs back with it.

    Args:
        height: Image height in pixels.
        width: Image width in pixels.
        crop: Crop side as in :func:`expand_views` (int pixels, float fraction of the short side,
            or None for no crops).
        center: Include the center crop.
        flip: Follow the unflipped views with the mirror image of each.
        full: Include the whole image.
        resize: Crops are resized to ``min(height, width)`` square.

    Returns:
        One :class:`ViewBox` per view, in the order of :func:`view_names`.

    Raises:
        ValueError: no view is left, a size is not positive, or the crop is bigger than the image.

    Example:
        >>> [tuple(b[1:5]) for b in view_boxes(4, 6, 3)]
        [(0, 0, 3, 3), (0, 3, 3, 3), (1, 0, 3, 3), (1, 3, 3, 3), (0, 2, 3, 3)]

    """
    check_positive_int("height", height)
    check_positive_int("width", width)
    if crop is None and not full:
        raise ValueError("no views left: crop is None (no corner or center crops) and full is False")
    boxes: list[ViewBox] = []
    if crop is not None:
        side = _crop_side(_check_crop("crop", crop), height, width)
        out = min(height, width) if resize else side
        origins = _crop_origins(height, width, side)[: 5 if center else 4]
        names = [*_CORNERS, "center"]
        boxes += [
            ViewBox(n, t, left, side, side, False, out, out) for n, (t, left) in zip(names, origins, strict=False)
        ]
    if full:
        boxes.append(ViewBox("full", 0, 0, height, width, False, height, width))
    if flip:
        boxes += [b._replace(name=f"{b.name}_flipped", flipped=True) for b in boxes]
    return boxes


def view_coverage(
    height: int,
    width: int,
    crop: int | float | None = 0.875,
    *,
    center: bool = True,
    flip: bool = False,
    full: bool = False,
) -> Tensor:
    """How many views contain each pixel of a ``height`` x ``width`` image.

    This is the weight each pixel gets in :func:`paste_views`. Flipped views cover the same
    pixels as their unflipped twins, so ``flip=True`` doubles every count.

    Args:
        height: Image height in pixels.
        width: Image width in pixels.
        crop: Crop side as in :func:`expand_views`.
        center: Include the center crop.
        flip: Include the mirror image of every view.
        full: Include the whole image.

    Returns:
        An int64 tensor of shape :math:`(H, W)`.

    Example:
        >>> view_coverage(4, 4, 2, center=False).tolist()
        [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]
        >>> view_coverage(5, 5, 3)[2].tolist()  # the middle row
        [2, 3, 5, 3, 2]

    """
    boxes = view_boxes(height, width, crop, center=center, flip=flip, full=full, resize=False)
    return _coverage(boxes, height, width)


def _coverage(boxes: Sequence[ViewBox], height: int, width: int) -> Tensor:
    count = torch.zeros(height, width, dtype=torch.int64)
    for b in boxes:
        count[b.top : b.top + b.height, b.left : b.left + b.width] += 1
    return count


def expand_views(
    x: Tensor,
    crop: int | float | None = 0.875,
    *,
    center: bool = True,
    flip: bool = False,
    full: bool = False,
    resize: bool = True,
) -> list[Tensor]:
    """Expand a batch of images into its test-time views.

    Args:
        x: A batch of images, shape :math:`(B, C, H, W)`.
        crop: Side of the square corner and center crops (see :func:`four_corner_crops`), or None
            for no crops.
        center: Include the center crop.
        flip: Follow the unflipped views with the horizontal mirror of each (ten-crop with ``center``).
        full: Include the whole image, unchanged.
        resize: Resize each crop to :math:`(m, m)` with ``m = min(H, W)`` (bilinear), so the model
            sees objects at the scale of the crop but images at its input resolution. For a
            square input this is the input size.

    Returns:
        One tensor per view, each :math:`(B, C, h, w)`, in the order of :func:`view_names`. The crops
        share one shape; the full view keeps :math:`(H, W)`, so on non-square inputs (or with
        ``resize=False``) it has a shape of its own.

    Raises:
        ValueError: no view is left, ``x`` is not 4-D, or the crop is bigger than the image.

    """
    x = _check_batch(x)
    boxes = view_boxes(x.shape[-2], x.shape[-1], crop, center=center, full=full, resize=resize)
    crops = [b for b in boxes if b.name != "full"]
    views: list[Tensor] = []
    if crops:
        stacked = torch.stack([x[..., b.top : b.top + b.height, b.left : b.left + b.width] for b in crops])
        n, bs, c, s, _ = stacked.shape
        out = crops[0].view_height
        if out != s:
            stacked = _resize(stacked.reshape(n * bs, c, s, s), out).reshape(n, bs, c, out, out)
        views += list(stacked.unbind(0))
    if full:
        views.append(x)
    if flip:
        views += [v.flip(-1) for v in views]
    return views


def _resize(x: Tensor, side: int) -> Tensor:
    """Bilinear resize of a batch to ``side`` x ``side``, keeping dtype and memory format."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    # interpolate has no bilinear kernel for integer images; go through float and come back.
    y = x if x.is_floating_point() else x.float()
    y = F.interpolate(y, size=(side, side), mode="bilinear", align_corners=False)
    if not x.is_floating_point():
        info = torch.iinfo(x.dtype)
        # float32 rounds the maxima of int32 and int64 up to a power of two, which would wrap around: stay below.
        high = torch.tensor(info.max, dtype=torch.float32)
        if high.item() > info.max:
            high = torch.nextafter(high, torch.zeros(()))
        y = y.round().clamp(info.min, high.item()).to(x.dtype)
    return y.contiguous(memory_format=torch.channels_last) if channels_last else y


def _check_merge(mode: str, activation: str | None) -> None:
    """Validate a merge mode and activation pair (shared by :func:`merge_views` and :func:`paste_views`)."""
    check_choice("mode", mode, MERGE_MODES)
    check_choice("activation", activation, _ACTIVATIONS)
    if activation is None and mode != "logits":
        raise ValueError(
            f"mode={mode!r} merges probabilities, which needs activation='softmax' or 'sigmoid'; "
            "raw outputs (regression) can only be merged with mode='logits'"
        )


def merge_views(preds: Tensor, mode: str = "mean", activation: str | None = "softmax") -> Tensor:
    """Merge the outputs of the views of each image into one prediction per image.

    Every mode returns raw scores (logits) on the scale the loss function expects, so a
    cross-entropy or BCE-with-logits loss and fastai's ``get_preds`` activation work unchanged:

    * ``'mean'``: mean of the probabilities. Softmax: ``log(mean_v softmax(z_v))`` (log-probabilities,
      which ``log_softmax`` leaves unchanged); sigmoid: ``logit(mean_v sigmoid(z_v))``.
    * ``'logits'``: mean of the raw outputs, ``mean_v z_v``. The only mode without an activation
      (regression).
    * ``'gmean'``: geometric mean of the probabilities, renormalised: ``log_softmax(mean_v log_softmax(z_v))``,
      which is the same distribution as ``'logits'`` gives after the softmax; for a sigmoid the
      renormalised geometric mean of ``p`` and ``1 - p`` is again ``mean_v z_v``.
    * ``'max'``: per class, the largest probability over the views, renormalised (softmax) or
      ``max_v z_v`` (sigmoid, which is monotonic).

    Args:
        preds: Outputs of shape :math:`(V, B, ...)`, view first; classes on the last dimension.
        mode: One of :data:`MERGE_MODES`.
        activation: The activation that turns outputs into probabilities: ``'softmax'``
            (single-label), ``'sigmoid'`` (multi-label) or None (raw outputs: only ``'logits'``).

    Returns:
        A float32 tensor of shape :math:`(B, ...)`.

    Raises:
        ValueError: unknown ``mode`` or ``activation``, a probability mode without an activation,
            or ``preds`` with fewer than 2 dimensions.

    """
    _check_merge(mode, activation)
    if not isinstance(preds, Tensor) or preds.ndim < 2:
        shape = tuple(preds.shape) if isinstance(preds, Tensor) else type(preds).__name__
        raise ValueError(f"preds must have shape (V, B, ...) with the views first, got {shape}")
    # Low-precision outputs would lose the small differences between views; merge in float32.
    z = preds.float()
    n_views = z.shape[0]
    if mode == "logits" or (mode == "gmean" and activation == "sigmoid"):
        return z.mean(0)
    if activation == "softmax":
        logp = z.log_softmax(-1)
        if mode == "mean":
            return logp.logsumexp(0) - math.log(n_views)
        if mode == "gmean":
            return logp.mean(0).log_softmax(-1)
        return logp.max(0).values.log_softmax(-1)
    # Sigmoid: logit(mean p) = log(mean p) - log(mean (1 - p)), each a stable logsumexp of logsigmoids.
    if mode == "mean":
        return F.logsigmoid(z).logsumexp(0) - F.logsigmoid(-z).logsumexp(0)
    return z.max(0).values


def paste_views(
    outputs: Tensor | Sequence[Tensor],
    image_size: tuple[int, int],
    crop: int | float | None = 0.875,
    *,
    center: bool = True,
    flip: bool = False,
    full: bool = False,
    resize: bool = True,
    mode: str = "mean",
    activation: str | None = "softmax",
) -> Tensor:
    """Put dense per-view outputs back in place and merge them per pixel: segmentation TTA.

    ``outputs`` are a model's outputs on the views that :func:`expand_views` cut with the same
    settings from images of size ``image_size``. Each view's output is mirrored back if its view
    was flipped, resized (bilinear, on the raw scores) to its crop's size in the image when it is
    not that size already (``resize=True``, or a model whose output is smaller than its input),
    and pasted at its crop's place. Every pixel is then merged over the views that contain it,
    with the merge of :func:`merge_views`, on the class axis 1 instead of the last axis:

    * ``'mean'``: ``log(mean_v softmax(z_v))`` (softmax over the classes) or
      ``logit(mean_v sigmoid(z_v))``;
    * ``'logits'``: ``mean_v z_v``;
    * ``'gmean'``: ``log_softmax(mean_v log_softmax(z_v))``, or ``mean_v z_v`` for a sigmoid;
    * ``'max'``: ``log_softmax(max_v log_softmax(z_v))``, or ``max_v z_v`` for a sigmoid.

    Each pixel's mean is over its own number of views, :func:`view_coverage`. For a model that
    commutes with the views (one that works pixel by pixel, such as a 1x1 convolution) and
    ``resize=False``, the result is the model's output on the whole image, in the merge's scale.

    Args:
        outputs: One tensor :math:`(B, K, h_v, w_v)` per view in the order of :func:`view_names`,
            or one tensor :math:`(V, B, K, h, w)` when all views have the same shape.
        image_size: ``(H, W)`` of the images the views were cut from.
        crop: Crop side, as given to :func:`expand_views`.
        center: As given to :func:`expand_views`.
        flip: As given to :func:`expand_views`.
        full: As given to :func:`expand_views`.
        resize: As given to :func:`expand_views`.
        mode: One of :data:`MERGE_MODES`.
        activation: ``'softmax'`` (over axis 1), ``'sigmoid'`` (per channel) or None
            (only with ``mode='logits'``).

    Returns:
        A float32 tensor of shape :math:`(B, K, H, W)`, channels-last when the outputs are.

    Raises:
        ValueError: the number or shapes of the outputs do not match the views, a mode or an
            activation is unknown, or some pixel is in no view (corner crops smaller than half
            the image without ``full=True``; the message gives the settings and the count).

    Example:
        >>> x = torch.rand(2, 3, 8, 8)
        >>> views = expand_views(x, 6, flip=True, resize=False)
        >>> same = paste_views(views, (8, 8), 6, flip=True, resize=False, mode="logits", activation=None)
        >>> torch.allclose(same, x)
        True

    """
    _check_merge(mode, activation)
    if not (
        isinstance(image_size, Sequence)
        and len(image_size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in image_size)
    ):
        raise TypeError(f"image_size must be a pair of ints (H, W), got {image_size!r}")
    height, width = image_size
    boxes = view_boxes(height, width, crop, center=center, flip=flip, full=full, resize=resize)
    outs = list(outputs.unbind(0)) if isinstance(outputs, Tensor) else list(outputs)
    if len(outs) != len(boxes):
        raise ValueError(
            f"outputs has {len(outs)} views, but the view settings give {len(boxes)}: {[b.name for b in boxes]}"
        )
    first = outs[0]
    for out, box in zip(outs, boxes, strict=True):
        if not isinstance(out, Tensor) or out.ndim != 4 or out.shape[:2] != first.shape[:2]:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"each view's output must have shape (B, K, h, w) with the B and K of the first view, "
                f"{tuple(first.shape[:2])}; view {box.name!r} has {shape}"
            )
    count = _coverage(boxes, height, width)
    uncovered = int((count == 0).sum())
    if uncovered:
        raise ValueError(
            f"crop={crop!r}, center={center}, full={full} leaves {uncovered} of the {height}x{width} pixels in no "
            "view, so they get no prediction; use full=True, a larger crop (corner crops of at least half the "
            "long side cover the image), or center=True with crops of at least a third of it"
        )
    merger = _PixelMerge(mode, activation, (first.shape[0], first.shape[1], height, width), first.device)
    for out, box in zip(outs, boxes, strict=True):
        z = out.float()
        if box.flipped:
            z = z.flip(-1)
        if z.shape[-2:] != (box.height, box.width):
            z = F.interpolate(z, size=(box.height, box.width), mode="bilinear", align_corners=False)
        merger.add(
            z, (slice(None), slice(None), slice(box.top, box.top + box.height), slice(box.left, box.left + box.width))
        )
    merged = merger.result(count.to(first.device))
    channels_last = first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous()
    return merged.contiguous(memory_format=torch.channels_last) if channels_last else merged


class _PixelMerge:
    """Running per-pixel merge of :func:`paste_views`: the modes of :func:`merge_views`, class axis 1.

    Sums, running ``logaddexp`` and running maxima keep the memory at one or two ``(B, K, H, W)``
    accumulators, whatever the number of views.
    """

    def __init__(self, mode: str, activation: str | None, shape: tuple[int, ...], device: torch.device):
        self.mode, self.act = mode, activation
        # Sums: raw outputs ('logits', sigmoid 'gmean') or log-probabilities (softmax 'gmean').
        self.linear = mode in ("logits", "gmean")
        fill = 0.0 if self.linear else -math.inf
        self.acc = torch.full(shape, fill, device=device)
        # The sigmoid mean needs log(mean p) and log(mean (1 - p)).
        self.acc_neg = (
            torch.full(shape, -math.inf, device=device) if (mode, activation) == ("mean", "sigmoid") else None
        )

    def add(self, z: Tensor, region: tuple[slice, ...]) -> None:
        acc = self.acc[region]
        if self.mode == "logits" or (self.act == "sigmoid" and self.mode in ("gmean", "max")):
            t = z
        elif self.act == "softmax":
            t = z.log_softmax(1)
        else:  # sigmoid mean
            t = F.logsigmoid(z)
            neg = self.acc_neg[region]
            neg.copy_(torch.logaddexp(neg, F.logsigmoid(-z)))
        if self.linear:
            acc.add_(t)
        elif self.mode == "max":
            acc.copy_(torch.maximum(acc, t))
        else:
            acc.copy_(torch.logaddexp(acc, t))

    def result(self, count: Tensor) -> Tensor:
        if self.acc_neg is not None:
            return self.acc - self.acc_neg
        if self.linear:
            mean = self.acc / count
            return mean.log_softmax(1) if (self.mode, self.act) == ("gmean", "softmax") else mean
        if self.mode == "max":
            return self.acc.log_softmax(1) if self.act == "softmax" else self.acc
        return self.acc - count.log()  # softmax mean: logsumexp over the views minus log V


def _activation_kind(loss_func: object) -> str | None:
    """'softmax', 'sigmoid' or None: the activation that turns the model's outputs into probabilities."""
    base = getattr(loss_func, "func", loss_func)  # fastai's BaseLoss wraps the torch loss as .func
    if isinstance(base, nn.CrossEntropyLoss) or base is F.cross_entropy:
        return "softmax"
    if isinstance(base, nn.BCEWithLogitsLoss) or base is F.binary_cross_entropy_with_logits:
        return "sigmoid"
    act = getcallable(loss_func, "activation")
    # Other losses (label smoothing, focal, ...) declare their activation; probe it once, on a tiny tensor.
    probe = torch.tensor([[0.3, -1.2, 2.0], [1.0, 0.5, -0.5]])
    try:
        out = act(probe)
    except Exception:  # noqa: BLE001 - an activation that cannot take a (2, 3) batch is not one we know.
        return None
    if not isinstance(out, Tensor) or out.shape != probe.shape:
        return None
    if torch.allclose(out, probe.softmax(-1), atol=1e-5):
        return "softmax"
    if torch.allclose(out, probe.sigmoid(), atol=1e-5):
        return "sigmoid"
    return None


def _dense_activation_kind(loss_func: object) -> str | None:
    """Like :func:`_activation_kind` for :math:`(B, K, H, W)` outputs: a softmax counts only over axis 1."""
    kind = _activation_kind(loss_func)
    if kind != "softmax":
        return kind
    axis = getattr(loss_func, "axis", None)
    if isinstance(axis, int):  # fastai's flattened losses name their class axis
        return kind if axis in (1, -3) else None
    base = getattr(loss_func, "func", loss_func)
    if isinstance(base, nn.CrossEntropyLoss) or base is F.cross_entropy:
        return kind  # torch's cross-entropy takes the classes on axis 1
    probe = torch.linspace(-2.0, 2.0, 120).reshape(2, 3, 4, 5)
    try:
        out = getcallable(loss_func, "activation")(probe)
    except Exception:  # noqa: BLE001 - an activation that cannot take a 4-D batch is not one we know.
        return None
    ok = isinstance(out, Tensor) and out.shape == probe.shape and torch.allclose(out, probe.softmax(1), atol=1e-5)
    return kind if ok else None


# --- the callback ----------------------------------------------------------------------------------


class FourCornerTTA(Callback):
    """Test-time augmentation over four corner crops, the center crop and their flips, in one pass.

    Outside training (``validate``, ``get_preds``, ``predict``, and the validation phase of ``fit``
    if it is attached to the learner), each batch is expanded in ``before_batch`` into its views:
    the four corner crops, the center crop if ``center``, the whole image if ``full``, and the
    mirror image of each if ``flip`` (``flip=True`` with the defaults is ten-crop). All views go
    through the model as one larger batch, or in chunks of at most ``max_views_per_batch`` views,
    and ``after_pred`` merges them back to one prediction per image with :func:`merge_views`.
    Because the views are cut from the decoded batch, each image is opened and augmented once,
    where fastai's ``learn.tta(n=4)`` runs the DataLoader five times. The loss and the metrics
    see the merged prediction and the untouched targets, so ``learn.validate(cbs=FourCornerTTA())``
    reports TTA metrics and ``learn.get_preds(cbs=FourCornerTTA())`` returns merged predictions
    of the usual shape. Training batches are never touched.

    The probability modes (``'mean'``, ``'gmean'``, ``'max'``) need a loss whose activation is a
    softmax (cross-entropy, label smoothing, focal) or a sigmoid (BCE with logits); for a
    regression model use ``merge='logits'``.

    Segmentation: when the model's output is dense, :math:`(B, K, h, w)` with the view's size or
    that size divided by an integer stride, each view's output is mirrored back, resized to its
    crop and pasted in place, and every pixel is merged over the views that contain it
    (:func:`paste_views`; a softmax must be over the class axis 1, as in ``unet_learner``'s
    ``CrossEntropyLossFlat(axis=1)``). The targets (``TensorMask``) are not touched, so the loss
    and the segmentation metrics see the merged :math:`(B, K, H, W)` prediction. Settings that
    leave some pixel in no view (corner crops under half the image without ``full``) raise a
    ValueError at the first batch, where the image size is known. Points and boxes
    (``TensorPoint``, ``TensorBBox`` targets) are refused with a ValueError.

    Multi-crop evaluation: Krizhevsky et al., NeurIPS 2012 (ten-crop); Simonyan & Zisserman,
    arXiv:1409.1556. The exercise: Howard & Gugger, fastbook chapter 7 (arXiv:2002.04688).

    Args:
        crop: Side of the square crops: a float in (0, 1] is a fraction of the short side of the
            input, an int is pixels. None switches the corner and center crops off (then ``full``
            must be True, e.g. flip-only TTA). A crop bigger than the input raises at the first batch.
        flip: Add the horizontal mirror of every view.
        center: Add the center crop to the four corners.
        full: Add the whole, uncropped input.
        resize: Resize the crops back to the short side of the input, which is the input size
            for square inputs, so the model sees its training resolution.
        merge: How to merge the views, one of :data:`MERGE_MODES` (see :func:`merge_views`).
        max_views_per_batch: At most this many views of a batch go through the model at once
            (None: all together). Lower it when the expanded batch does not fit in memory.

    """

    # After GatherPredsCallback (order 0), so get_preds(with_input=True) records the original batch,
    # and before MixedPrecision (order 10), so the extra chunks run inside its autocast region.
    order = MixedPrecision.order - 1
    run_train = False
    _stateattrs = ("_batch", "_plain")

    def __init__(
        self,
        crop: int | float | None = 0.875,
        flip: bool = False,
        center: bool = True,
        full: bool = False,
        resize: bool = True,
        merge: str = "mean",
        max_views_per_batch: int | None = None,
    ):
        super().__init__()
        self.crop = None if crop is None else _check_crop("crop", crop)
        self.flip, self.center, self.full, self.resize = bool(flip), bool(center), bool(full), bool(resize)
        if self.crop is None and not self.full:
            raise ValueError("no views left: crop=None switches the corner and center crops off, and full=False")
        self.merge = check_choice("merge", merge, MERGE_MODES)
        if max_views_per_batch is not None:
            check_positive_int("max_views_per_batch", max_views_per_batch)
        self.max_views_per_batch = max_views_per_batch
        # Set by Learner.four_corner_tta(beta=...): also keep the plain (uncropped) prediction.
        self.keep_plain = False
        self._init_state()

    def _init_state(self) -> None:
        super()._init_state()
        self._batch: dict | None = None
        self._plain: list[Tensor] = []
        self._act: str | None = None
        self._dense_act: str | None = None

    @property
    def name(self) -> str:
        """Attribute name on the learner; not ``four_corner_tta``, which is the patched method."""
        return "four_corner_tta_cb"

    @property
    def views(self) -> list[str]:
        """Names of the views, in the order they go through the model."""
        return view_names(crop=self.crop is not None, center=self.center, flip=self.flip, full=self.full)

    @property
    def plain_preds(self) -> Tensor | None:
        """Raw outputs on the uncropped inputs of the last run, if ``keep_plain`` was set."""
        return torch.cat(self._plain) if self._plain else None

    def before_validate(self) -> None:
        """Check the learner once per validation pass; find the loss's activation."""
        others = [cb for cb in self.learn.cbs if isinstance(cb, FourCornerTTA) and cb is not self]
        if others:
            raise ValueError("more than one FourCornerTTA is attached to the learner; each would expand the batch")
        self._act = _activation_kind(self.learn.loss_func)
        if self._act is None and self.merge != "logits":
            raise ValueError(
                f"merge={self.merge!r} averages probabilities, but learn.loss_func ({self.learn.loss_func!r}) has no "
                "softmax or sigmoid activation; use merge='logits' (mean of raw outputs) for regression"
            )
        self._dense_act = _dense_activation_kind(self.learn.loss_func)
        self._batch, self._plain = None, []

    def before_batch(self) -> None:
        """Replace the batch by its views (the first chunk of them when chunked)."""
        self._batch = None
        xb = self.learn.xb
        if len(xb) != 1:
            raise ValueError(f"FourCornerTTA needs a model with a single image input, got {len(xb)} inputs")
        x = xb[0]
        _check_batch(x)
        yb = self.learn.yb
        point_type = _point_type(yb, getattr(self.learn, "dl", None))
        if point_type is not None:
            raise ValueError(
                f"FourCornerTTA cannot merge {point_type.__name__} targets: points and "
                "boxes are coordinates, not per-pixel scores; each view's predictions would have to be mapped back "
                "through its crop, resize and flip and matched across views (non-maximum suppression for boxes), "
                "which it does not do"
            )
        if len(yb) and isinstance(yb[0], Tensor) and yb[0].ndim >= 3 and self.merge != "logits":
            if self._dense_act is None:
                raise ValueError(
                    f"spatial targets (segmentation masks) of shape {tuple(yb[0].shape)} need a (B, K, H, W) output "
                    f"whose classes are on axis 1, but learn.loss_func ({self.learn.loss_func!r}) has no softmax over "
                    "axis 1 nor a sigmoid; use CrossEntropyLossFlat(axis=1), as unet_learner does, or merge='logits'"
                )
        views = expand_views(x, self.crop, center=self.center, flip=self.flip, full=self.full, resize=self.resize)
        n_merged = len(views)
        plain_idx = None
        if self.keep_plain:
            if self.full:
                plain_idx = self.views.index("full")
            else:
                plain_idx = len(views)
                views.append(x)
        chunks = _chunk(views, self.max_views_per_batch)
        self._batch = {"xb": xb, "bs": x.shape[0], "rest": chunks[1:], "n_merged": n_merged, "plain_idx": plain_idx}
        self.learn.xb = (chunks[0],)

    def after_pred(self) -> None:
        """Run the remaining chunks, merge the views (or paste them back), and put the original batch back."""
        state, self._batch = self._batch, None
        if state is None:
            return
        pred = self.learn.pred
        if not isinstance(pred, Tensor):
            raise TypeError(f"FourCornerTTA needs a model returning one tensor, got {type(pred).__name__}")
        if pred.ndim > 2:
            self._check_dense(pred, state)
        outs = [pred, *(self.learn.model(chunk) for chunk in state["rest"])]
        if pred.ndim > 2:
            merged = self._paste(outs, state)
        else:
            out = torch.cat(outs) if len(outs) > 1 else pred
            out = out.reshape(-1, state["bs"], *pred.shape[1:])
            if state["plain_idx"] is not None:
                self._plain.append(self.learn.to_detach(out[state["plain_idx"]]))
            merged = merge_views(out[: state["n_merged"]], self.merge, self._act)
        self.learn.pred = merged.to(pred.dtype)
        self.learn.xb = state["xb"]

    def _check_dense(self, pred: Tensor, state: dict) -> None:
        """Refuse outputs that are neither one prediction per image nor one per pixel."""
        x, yb = state["xb"][0], self.learn.yb
        view = self.learn.xb[0]
        if pred.ndim != 4:
            raise ValueError(
                f"FourCornerTTA merges one prediction per image (B, K) or pastes back dense outputs (segmentation) "
                f"of shape (B, K, h, w), but the model output has shape {tuple(pred.shape)} for views of shape "
                f"{tuple(view.shape)}"
            )
        if len(yb) and isinstance(yb[0], Tensor) and yb[0].ndim < 3:
            raise ValueError(
                f"the model gives dense outputs (segmentation) of shape {tuple(pred.shape[1:])} per view, but the "
                f"targets have shape {tuple(yb[0].shape)}, one per image; FourCornerTTA pastes dense outputs back "
                "only for per-pixel targets (segmentation masks)"
            )
        if self.merge != "logits" and self._dense_act is None:
            raise ValueError(
                f"merge={self.merge!r} averages probabilities per pixel, but learn.loss_func "
                f"({self.learn.loss_func!r}) has no softmax over the class axis 1 of the dense outputs "
                f"{tuple(pred.shape)} nor a sigmoid; use CrossEntropyLossFlat(axis=1) or merge='logits'"
            )
        _output_stride(view.shape[-2:], pred.shape[-2:], x.shape[-2:])

    def _paste(self, outs: list[Tensor], state: dict) -> Tensor:
        """Paste the dense outputs of the views back in place and merge them per pixel."""
        bs, x = state["bs"], state["xb"][0]
        per_view = [o for out in outs for o in out.split(bs)]
        boxes = view_boxes(
            *x.shape[-2:], self.crop, center=self.center, flip=self.flip, full=self.full, resize=self.resize
        )
        # One output stride for every view: the model's output is its input divided by `stride`.
        strides = {
            _output_stride((b.view_height, b.view_width), o.shape[-2:], x.shape[-2:])
            for b, o in zip(boxes, per_view, strict=False)  # the plain view, if kept, is last
        }
        if len(strides) != 1:
            shapes = [tuple(o.shape[-2:]) for o in per_view]
            raise ValueError(
                f"the views' dense outputs {shapes} do not share one output stride (found {sorted(strides)})"
            )
        stride = strides.pop()
        if state["plain_idx"] is not None:
            self._plain.append(self.learn.to_detach(per_view[state["plain_idx"]]))
        act = self._dense_act if self.merge != "logits" else None
        merged = paste_views(
            per_view[: state["n_merged"]],
            (x.shape[-2], x.shape[-1]),
            self.crop,
            center=self.center,
            flip=self.flip,
            full=self.full,
            resize=self.resize,
            mode=self.merge,
            activation=act,
        )
        if stride > 1:
            # Back to the model's own output size; the views were merged at the input's resolution.
            merged = F.avg_pool2d(merged, stride)
        pred = outs[0]
        channels_last = pred.is_contiguous(memory_format=torch.channels_last) and not pred.is_contiguous()
        return merged.contiguous(memory_format=torch.channels_last) if channels_last else merged.contiguous()

    def after_cancel_validate(self) -> None:
        """Drop any half-processed batch."""
        self._batch = None


def _point_type(yb: tuple, dl: object) -> type | None:
    """``TensorPoint`` or ``TensorBBox`` if the targets are points or boxes, else None.

    fastai's ``CastToTensor`` callback, which runs before this one, turns the batch into plain
    tensors, so the types are also read from the DataLoader's record of its batch types.
    """
    found = [type(y) for y in yb if isinstance(y, TensorPoint)]
    stack = [getattr(dl, "_types", None)]
    while stack:
        t = stack.pop()
        if isinstance(t, dict):
            stack += [*t.keys(), *t.values()]
        elif isinstance(t, (list, tuple)):
            stack += list(t)
        elif isinstance(t, type) and issubclass(t, TensorPoint):
            found.append(t)
    return found[0] if found else None


def _output_stride(in_size: Sequence[int], out_size: Sequence[int], image_size: Sequence[int]) -> int:
    """The integer ``s`` with ``out_size * s == in_size``, which must also divide ``image_size``; else a ValueError."""
    (ih, iw), (oh, ow), (h, w) = in_size, out_size, image_size
    stride = ih // oh if oh else 0
    if not (oh and ow and stride * oh == ih and stride * ow == iw and h % stride == 0 and w % stride == 0):
        raise ValueError(
            f"the model maps views of size {ih}x{iw} to dense outputs of size {oh}x{ow}: FourCornerTTA pastes back "
            "outputs of the view's size or of that size divided by an integer stride that also divides the "
            f"{h}x{w} image (use an input size that is a multiple of the model's output stride)"
        )
    return stride


def _chunk(views: list[Tensor], max_views: int | None) -> list[Tensor]:
    """Concatenate consecutive views of equal shape, at most ``max_views`` at a time, along the batch."""
    chunks: list[list[Tensor]] = []
    for v in views:
        last = chunks[-1] if chunks else None
        if last is not None and last[0].shape == v.shape and (max_views is None or len(last) < max_views):
            last.append(v)
        else:
            chunks.append([v])
    return [torch.cat(c) if len(c) > 1 else c[0] for c in chunks]


# --- convenience method ----------------------------------------------------------------------------


@patch
def four_corner_tta(
    self: Learner,
    ds_idx: int = 1,
    dl: DataLoader | None = None,
    beta: float | None = None,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """Predictions on ``ds_idx`` or ``dl`` with :class:`FourCornerTTA`, like ``learn.tta``.

    One pass over the data: each image is decoded once, and its views (and, with ``beta``, the
    plain uncropped input) go through the model together. A fastprogress bar runs over the
    batches when the learner has its ``ProgressCallback`` (hide it with ``learn.no_bar()``).

    Args:
        self: The Learner (this is a method patched onto ``Learner``).
        ds_idx: Which of ``self.dls`` to predict on when ``dl`` is None (1: validation).
        dl: A DataLoader to predict on, e.g. ``learn.dls.test_dl(files)``; it is read in order.
        beta: None returns the TTA prediction. A float in [0, 1] blends it with the plain
            prediction as ``learn.tta`` does: ``torch.lerp(tta, plain, beta)``.
        **kwargs: Passed to :class:`FourCornerTTA` (``crop``, ``flip``, ``center``, ``full``,
            ``resize``, ``merge``, ``max_views_per_batch``).

    Returns:
        ``(preds, targs)`` as ``get_preds`` returns them: probabilities after the loss's
        activation, and the targets (None for an unlabelled ``test_dl``).

    """
    cb = FourCornerTTA(**kwargs)
    if beta is not None:
        beta = check_fraction("beta", beta)
        cb.keep_plain = True
    if dl is None:
        dl = self.dls[ds_idx].new(shuffle=False, drop_last=False)
    elif isinstance(dl, DataLoader) and (dl.shuffle or dl.drop_last):
        # The plain predictions are gathered in batch order, so read the data in dataset order.
        dl = dl.new(shuffle=False, drop_last=False)
    attached = [c for c in self.cbs if isinstance(c, FourCornerTTA)]
    with self.removed_cbs(attached):
        preds, targs = self.get_preds(dl=dl, cbs=cb)
    if beta is not None:
        act = getcallable(self.loss_func, "activation")
        plain = act(cb.plain_preds.float()).to(preds.dtype)
        preds = torch.lerp(preds, plain, beta)
    return preds, targs
