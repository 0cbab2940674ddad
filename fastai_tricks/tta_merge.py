"""Merging the views of four-corner test-time augmentation back into one prediction per image.

Pure tensor functions, no fastai. :func:`~fastai_tricks.merge_views` merges the outputs of the
views of each image (one prediction per image, classes on the last axis);
:func:`~fastai_tricks.paste_views` does the same for dense (segmentation) outputs: it undoes each
view's flip and resize, pastes it at its crop's place (:func:`~fastai_tricks.view_boxes`) and
merges every pixel over the views that contain it, with a running merge that holds one or two
image-sized accumulators whatever the number of views.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_choice
from .tta_views import ViewBox, _coverage, view_boxes

__all__ = ["MERGE_MODES", "merge_views", "paste_views"]

#: The ways :func:`merge_views` can combine the outputs of the views of one image.
MERGE_MODES: tuple[str, ...] = ("mean", "logits", "gmean", "max")

_ACTIVATIONS = ("softmax", "sigmoid", None)


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

    ``outputs`` are a model's outputs on the views that :func:`~fastai_tricks.expand_views`
    cut with the same settings from images of size ``image_size``. Each view's output is mirrored
    back if its view was flipped, resized (bilinear, on the raw scores) to its crop's size in the
    image when it is not that size already (``resize=True``, or a model whose output is smaller
    than its input), and pasted at its crop's place. Every pixel is then merged over the views that contain it,
    with the merge of :func:`merge_views`, on the class axis 1 instead of the last axis:

    * ``'mean'``: ``log(mean_v softmax(z_v))`` (softmax over the classes) or
      ``logit(mean_v sigmoid(z_v))``;
    * ``'logits'``: ``mean_v z_v``;
    * ``'gmean'``: ``log_softmax(mean_v log_softmax(z_v))``, or ``mean_v z_v`` for a sigmoid;
    * ``'max'``: ``log_softmax(max_v log_softmax(z_v))``, or ``max_v z_v`` for a sigmoid.

    Each pixel's mean is over its own number of views,
    :func:`~fastai_tricks.view_coverage`. For a model that commutes with the views (one
    that works pixel by pixel, such as a 1x1 convolution) and ``resize=False``, the result is the
    model's output on the whole image, in the merge's scale.

    Args:
        outputs: One tensor :math:`(B, K, h_v, w_v)` per view in the order of
            :func:`~fastai_tricks.view_names`, or one tensor :math:`(V, B, K, h, w)` when
            all views have the same shape.
        image_size: ``(H, W)`` of the images the views were cut from.
        crop: Crop side, as given to :func:`~fastai_tricks.expand_views`.
        center: As given to :func:`~fastai_tricks.expand_views`.
        flip: As given to :func:`~fastai_tricks.expand_views`.
        full: As given to :func:`~fastai_tricks.expand_views`.
        resize: As given to :func:`~fastai_tricks.expand_views`.
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
        >>> from fastai_tricks.tta_views import expand_views
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
    uncovered = _uncovered_pixels(tuple(boxes), height, width)
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
    # Built where the outputs are, from the boxes alone: no host tensor goes to the device, no sync.
    merged = merger.result(_coverage(boxes, height, width, device=first.device))
    channels_last = first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous()
    return merged.contiguous(memory_format=torch.channels_last) if channels_last else merged


@functools.lru_cache(maxsize=64)
def _uncovered_pixels(boxes: tuple[ViewBox, ...], height: int, width: int) -> int:
    """How many pixels of a ``height`` x ``width`` image are in none of ``boxes``.

    Counted on the host with NumPy, once per geometry (every batch of a validation pass has the
    same one): the check reads nothing back from the device and runs no tensor operation.
    """
    covered = np.zeros((height, width), dtype=bool)
    for b in boxes:
        covered[b.top : b.top + b.height, b.left : b.left + b.width] = True
    return int(covered.size - covered.sum())


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
