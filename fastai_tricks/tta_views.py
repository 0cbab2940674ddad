"""The view geometry of four-corner test-time augmentation: crops, view names and boxes, coverage.

Pure tensor functions, no fastai. :func:`~fastai_tricks.four_corner_crops` cuts the five crops
of a batch; :func:`~fastai_tricks.expand_views` turns a batch into all of its test-time views
(crops, resized back or not, the whole image, their mirror images), in the order that
:func:`~fastai_tricks.view_names` names them; :func:`~fastai_tricks.view_boxes` is the one
geometry that :func:`~fastai_tricks.expand_views` cuts with and
:func:`~fastai_tricks.paste_views` pastes back with; :func:`~fastai_tricks.view_coverage` counts
the views that contain each pixel. :class:`~fastai_tricks.FourCornerTTA` is the callback built
on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_positive_int

__all__ = [
    "ViewBox",
    "expand_views",
    "four_corner_crops",
    "view_boxes",
    "view_coverage",
    "view_names",
]

_CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


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
    with it and :func:`~fastai_tricks.paste_views` puts their outputs back with it.

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

    This is the weight each pixel gets in :func:`~fastai_tricks.paste_views`. Flipped
    views cover the same pixels as their unflipped twins, so ``flip=True`` doubles every count.

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


def _coverage(boxes: Sequence[ViewBox], height: int, width: int, device: torch.device | None = None) -> Tensor:
    """Views per pixel, built on ``device``: no host tensor is copied there, so a GPU run does not sync."""
    count = torch.zeros(height, width, dtype=torch.int64, device=device)
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
        y = y.round().clamp(info.min, _float32_at_most(info.max)).to(x.dtype)
    return y.contiguous(memory_format=torch.channels_last) if channels_last else y


def _float32_at_most(n: int) -> float:
    """The largest float32 that is at most ``n``, as a Python float (no tensor, so no ``.item()``).

    float32 rounds the maxima of int32 and int64 up to a power of two, which would wrap around
    when cast back: stay below.
    """
    high = np.float32(n)
    if float(high) > n:
        high = np.nextafter(high, np.float32(0))
    return float(high)


#: Input pixels (images x height x width) per forward pass up to which ``max_views_per_batch=None``
#: groups the views of a small batch on a CPU. Measured per image, 1 thread, AMD EPYC: the tiny unet
#: of ``benchmarks/bench_tta.py`` is fastest at 32k to 65k pixels (8 to 16 images of 64x64 px, 2 to 4
#: of 128x128) and slower past that (+58% at 64 images of 64x64, +70% at 16 of 128x128); xresnet18
#: is flat from 65k to 262k pixels at 64 px. Below the budget a forward pays its fixed cost: one
#: 64x64 image through xresnet18 takes 4.6 times the time per image of a batch of 64.
_CPU_PIXELS_PER_FORWARD = 2**16


def _auto_max_views(views: Sequence[Tensor]) -> int | None:
    """The ``max_views_per_batch`` that None (auto) picks for these views.

    Off the CPU (CUDA, MPS, ...): None, every view in one forward pass, where a bigger batch
    fills the accelerator. On the CPU: one view per forward, the batch size the user chose, or
    for a batch under :data:`_CPU_PIXELS_PER_FORWARD` input pixels as many views as fit in that
    budget. A batch of 64 (or 16) images of 64x64 px: one view per forward; ``predict``'s one
    64x64 image: all five views at once.
    """
    if views[0].device.type != "cpu":
        return None
    pixels = max(v.shape[0] * v.shape[-2] * v.shape[-1] for v in views)
    return max(1, _CPU_PIXELS_PER_FORWARD // pixels)


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
