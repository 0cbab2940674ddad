"""Test-size resizing (FixRes): evaluate at the size that shows objects as large as training showed them.

Touvron, Vedaldi, Douze & Jégou, *Fixing the train-test resolution discrepancy*, NeurIPS 2019
(arXiv:1906.06423). A random-resized crop keeps a fraction ``s`` of the image's area and resizes it
to the training size, so an object is magnified by ``1 / sqrt(s)`` on average more than when the
whole image is resized to that size, as validation does. At the training size a model therefore
meets smaller objects at test time than it learned on. Evaluating at a somewhat larger size closes
that gap; recomputing the BatchNorm statistics at that size closes more of it.

The maths is pure (:func:`crop_magnification`, :func:`zoom_magnification`,
:func:`fixres_test_size`) and follows fastai's own samplers exactly. The callback
:class:`TestSize` is thin: it evaluates ``validate``, ``get_preds``, ``predict``, ``tta`` and
``four_corner_tta`` at another size on a per-call copy of the loader, so ``learn.dls`` is never
modified, and :func:`recalibrate_batchnorm` refreshes the running statistics, which the callback
puts back when the evaluation ends, however it ends.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import random
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from torch import Tensor, nn

from ._checks import (
    check_choice,
    check_fraction,
    check_non_negative_int,
    check_number,
    check_positive,
    check_positive_int,
)
from ._fastai_utils import ReleaseOnDetach, batch_size_fixers, is_lr_finding, item_size_fixers

__all__ = [
    "TestSize",
    "crop_magnification",
    "fixres_test_size",
    "recalibrate_batchnorm",
    "zoom_magnification",
]

#: ``(height, width)`` in pixels.
Size = tuple[int, int]
SizeArg = Literal["auto"] | int | float

_MODES = ("bilinear", "bicubic", "nearest", "nearest-exact", "area")
#: fastai's ``RandomResizedCrop`` and ``RandomResizedCropGPU`` draw at most this many crops before falling back.
FASTAI_ATTEMPTS = 10


# --- pure maths --------------------------------------------------------------------------------------


def _check_ratio(ratio: Any) -> tuple[float, float]:
    if not isinstance(ratio, Sequence) or len(ratio) != 2:
        raise ValueError(f"ratio must be a (low, high) pair of width/height ratios, got {ratio!r}")
    low, high = check_positive("ratio[0]", ratio[0]), check_positive("ratio[1]", ratio[1])
    if high < low:
        raise ValueError(f"ratio must be (low, high) with low <= high, got {tuple(ratio)!r}")
    return low, high


def _check_scales(min_scale: Any, max_scale: Any) -> tuple[float, float]:
    a = check_fraction("min_scale", min_scale, low_inclusive=False)
    b = check_fraction("max_scale", max_scale, low_inclusive=False)
    if b < a:
        raise ValueError(f"max_scale must be >= min_scale ({a!r}), got {b!r}")
    return a, b


def _log_integral(alpha: float, beta: float, lo: float, hi: float, half: bool) -> float:
    """Integrate ``(alpha + beta * log s) * s**k`` over ``[lo, hi]``, with ``k = -1/2`` if ``half`` else 0."""

    def antiderivative(s: float) -> float:
        log_s = math.log(s)
        if half:  # d/ds of 2 sqrt(s) is s^-1/2; d/ds of 2 sqrt(s) log s - 4 sqrt(s) is s^-1/2 log s
            r = math.sqrt(s)
            return alpha * 2 * r + beta * (2 * r * log_s - 4 * r)
        return alpha * s + beta * (s * log_s - s)

    return antiderivative(hi) - antiderivative(lo)


def _accepted_moments(a: float, b: float, u0: float, u1: float, lam: float) -> tuple[float, float]:
    """Return ``(P(accept), E[accept * s**-1/2])`` for one draw of ``s ~ U[a, b]`` and ``log r ~ U[u0, u1]``.

    A draw is accepted when the crop fits the image: with ``t = log s`` and ``lam`` the log of the
    image's width/height, ``lam + t <= log r <= lam - t``. For a given ``s`` the accepted
    log-ratios form an interval whose length is piecewise linear in ``log s``, so both moments are
    sums of closed-form integrals between the kinks.
    """
    if b - a <= 1e-6 * b:  # (nearly) a point mass: the closed forms below would cancel catastrophically
        a = b = 0.5 * (a + b)
    if a == b:
        if u1 > u0:
            acc = max(0.0, min(u1, lam - math.log(a)) - max(u0, lam + math.log(a))) / (u1 - u0)
        else:
            acc = 1.0 if lam + math.log(a) <= u0 <= lam - math.log(a) else 0.0
        return acc, acc / math.sqrt(a)
    if u1 == u0:  # one ratio: accepted while s <= exp(-|log r - lam|)
        hi = min(b, math.exp(-abs(u0 - lam)))
        if hi <= a:
            return 0.0, 0.0
        return (hi - a) / (b - a), 2 * (math.sqrt(hi) - math.sqrt(a)) / (b - a)
    kinks = sorted({lam - u1, u0 - lam, 0.0, u1 - lam, lam - u0})
    ts = [math.log(a), *(t for t in kinks if math.log(a) < t < math.log(b)), math.log(b)]
    p = m = 0.0
    for t_lo, t_hi in zip(ts, ts[1:], strict=False):
        mid = 0.5 * (t_lo + t_hi)
        # On this piece each min/max takes one branch: the accepted length is alpha + beta * t.
        beta = (-1.0 if lam - mid < u1 else 0.0) - (1.0 if lam + mid > u0 else 0.0)
        length = min(u1, lam - mid) - max(u0, lam + mid)
        if length <= 0:
            continue  # the length changes sign only at a kink, so it is <= 0 on the whole piece
        alpha = length - beta * mid
        lo, hi = math.exp(t_lo), math.exp(t_hi)
        p += _log_integral(alpha, beta, lo, hi, half=False)
        m += _log_integral(alpha, beta, lo, hi, half=True)
    scale = (b - a) * (u1 - u0)
    return max(0.0, p / scale), max(0.0, m / scale)


def crop_magnification(
    min_scale: float,
    max_scale: float = 1.0,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    *,
    image_ratio: float = 1.0,
    attempts: int = FASTAI_ATTEMPTS,
) -> float:
    """Return how much fastai's random-resized crop magnifies objects on average: ``E[1 / sqrt(s)]``.

    fastai's ``RandomResizedCrop`` (item) and ``RandomResizedCropGPU`` (batch, what
    ``aug_transforms(min_scale=...)`` adds, with ``ratio=(1, 1)``) draw an area fraction
    ``s ~ U[min_scale, max_scale]`` and a width/height ratio ``r`` log-uniform in ``ratio``, keep the
    crop if it fits in the image, draw again otherwise, and after ``attempts`` misses take the
    largest crop of an allowed ratio (the whole image when its ratio is allowed). The crop is then
    resized to the output size, so the objects in it appear ``1 / sqrt(s)`` times larger (the
    geometric mean of the two axes' magnifications ``1 / sqrt(s r)`` and ``sqrt(r / s)``) than when
    the whole image is resized to the same size. This returns the expectation of ``1 / sqrt(s)``
    under that exact sampler, rejections included, in closed form (no sampling). Pixel rounding of
    the crop is neglected.

    Args:
        min_scale: Smallest crop area, a fraction of the image's area in (0, 1].
        max_scale: Largest crop area, in [min_scale, 1].
        ratio: ``(low, high)`` width/height ratios of the crop; fastai's default is ``(3/4, 4/3)``,
            ``aug_transforms`` uses ``(1, 1)``.
        image_ratio: Width/height of the image the crop is cut from.
        attempts: Draws before the fallback crop (fastai: 10).

    Returns:
        ``E[1 / sqrt(s)]``, >= 1 when the image's ratio is allowed (1 exactly with ``min_scale=1``).

    Raises:
        ValueError: A scale outside (0, 1], ``max_scale < min_scale``, a ratio <= 0 or reversed,
            a non-finite or non-positive ``image_ratio``, or ``attempts < 1``.
    """
    a, b = _check_scales(min_scale, max_scale)
    r0, r1 = _check_ratio(ratio)
    rho = check_positive("image_ratio", image_ratio)
    check_positive_int("attempts", attempts)
    u0, u1, lam = math.log(r0), math.log(r1), math.log(rho)
    p, m = _accepted_moments(a, b, u0, u1, lam)
    # fastai's fallback: the largest crop of an allowed ratio, centred.
    s_fallback = rho / r0 if rho < r0 else r1 / rho if rho > r1 else 1.0
    fallback = 1.0 / math.sqrt(s_fallback)
    if p <= 0.0:
        return fallback
    p = min(1.0, p)
    missed = (1.0 - p) ** attempts
    return (1.0 - missed) * (m / p) + missed * fallback


def zoom_magnification(min_zoom: float = 1.0, max_zoom: float = 1.1, p: float = 0.5) -> float:
    """Return the mean magnification of fastai's ``Zoom`` (``aug_transforms``' zoom, ``p=p_affine``).

    ``zoom_mat`` zooms in by ``z ~ U[min_zoom, max_zoom]`` with probability ``p`` (1 otherwise), so
    objects appear ``p (min_zoom + max_zoom) / 2 + 1 - p`` times larger on average; in validation
    the affine transforms are the identity.

    Raises:
        ValueError: A zoom <= 0, ``max_zoom < min_zoom``, or ``p`` outside [0, 1].
    """
    lo, hi = check_positive("min_zoom", min_zoom), check_positive("max_zoom", max_zoom)
    if hi < lo:
        raise ValueError(f"max_zoom must be >= min_zoom ({lo!r}), got {hi!r}")
    p = check_fraction("p", p)
    return p * (lo + hi) / 2 + (1.0 - p)


def _val_margin(side: int, val_xtra: float) -> int:
    """The validation margin of fastai's ``RandomResizedCrop``: resize to ``side + xtra``, then centre-crop ``side``."""
    return math.ceil(side * val_xtra / 8) * 8 if val_xtra > 0 else 0


def _snap(target: float, train_side: int, val_xtra: float, valid_scale: float, multiple_of: int) -> int:
    """Return the candidate test side whose validation transform resizes the whole image closest to ``target``.

    The candidates are the multiples of ``multiple_of`` and ``train_side`` itself. With test side
    ``T`` the validation transform resizes the whole image to ``(T + xtra(T)) / valid_scale``, a
    strictly increasing function of ``T``; ties go to the smaller side. So the result is a
    non-decreasing function of ``target``.
    """

    def shown(t: int) -> float:
        return (t + _val_margin(t, val_xtra)) / valid_scale

    # Below k_lo every candidate is resized to at most target, above k_hi to more: the best lies between.
    k_lo = max(1, math.floor((target * valid_scale - 8) / ((1 + val_xtra) * multiple_of)))
    k_hi = max(k_lo, math.ceil(target * valid_scale / multiple_of) + 1)
    candidates = sorted({train_side, *(k * multiple_of for k in range(k_lo, k_hi + 1))})
    return min(candidates, key=lambda t: (abs(shown(t) - target), t))


def fixres_test_size(
    train_size: int,
    min_scale: float,
    max_scale: float = 1.0,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    *,
    zoom: float = 1.0,
    val_xtra: float = 0.0,
    valid_scale: float = 1.0,
    image_ratio: float = 1.0,
    multiple_of: int = 1,
) -> int:
    """Return the test size at which objects appear as large, on average, as they did in training.

    FixRes (Touvron et al., 2019, arXiv:1906.06423). Derivation, per image side, for an image of
    side ``W``:

    * training: a crop of area fraction ``s`` (see :func:`crop_magnification`), zoomed in by
      ``zoom`` on average, is resized to ``train_size``: an object of ``k`` pixels appears
      ``k * train_size * zoom / (sqrt(s) * W)`` pixels large, ``k * train_size * zoom * E / W`` on
      average with ``E = E[1 / sqrt(s)]``;
    * test at side ``T``: the validation transform resizes the whole image to
      ``(T + xtra(T)) / valid_scale`` and centre-crops ``T``, so the object appears
      ``k * (T + xtra(T)) / (valid_scale * W)`` large;
    * equal when ``(T + xtra(T)) / valid_scale = train_size * zoom * E``.

    ``xtra(T)`` is fastai's ``RandomResizedCrop`` margin ``ceil(T * val_xtra / 8) * 8`` (0 when
    ``val_xtra=0``); ``valid_scale`` is ``RandomResizedCropGPU``'s validation crop, a fraction of
    each side. Assumptions: the apparent size is matched in the mean of the linear magnification
    ``1 / sqrt(s)`` (not of the area, not the median); the crop scale and the zoom are independent;
    ``s`` follows fastai's sampler exactly (uniform in area on ``[min_scale, max_scale]``,
    log-uniform ratio, rejections and fallback); in validation the whole image, or its centre when
    ``val_xtra`` or ``valid_scale`` say so, is resized to the test size; rotation and warp do not
    change the scale on average; the network sees objects in pixels: its features are local and
    pooled globally over a final feature map of several cells (7x7 for a stride-32 ResNet at
    224 px). That last one fails at 32 px, where a stride-32 network ends on a 1x1 map: see
    :class:`TestSize`.

    Rounding: the side is an integer number of pixels; it is the multiple of ``multiple_of`` (or
    ``train_size`` itself) whose magnification is closest to the training one, ties to the smaller
    side. The default 1 keeps pixel precision, which matters at small sizes (a step of 8 px is 25 %
    of a 32 px digit); pass 8 or 32 for sizes that suit GPU kernels. So the result is exactly
    ``train_size`` when nothing magnifies (``min_scale=1``, ``zoom=1``, ``val_xtra=0``,
    ``valid_scale=1``), and it never increases when ``min_scale`` increases.

    Args:
        train_size: The training (and plain evaluation) side in pixels.
        min_scale: Smallest crop area of the training crop, in (0, 1] (1: no crop).
        max_scale: Largest crop area, in [min_scale, 1].
        ratio: Width/height range of the training crop; ``aug_transforms`` uses ``(1, 1)``.
        zoom: Mean extra magnification of the other training transforms, e.g.
            :func:`zoom_magnification` for ``aug_transforms``' zoom; 1 for none.
        val_xtra: fastai's item ``RandomResizedCrop`` validation margin (0.14 by default there); 0
            when the validation transform resizes the whole image.
        valid_scale: Side fraction of the image the validation transform keeps
            (``RandomResizedCropGPU(valid_scale=...)``), in (0, 1].
        image_ratio: Width/height of the images the training crop is cut from.
        multiple_of: The result is a multiple of this (or ``train_size``).

    Returns:
        The test side in pixels, >= 1.

    Raises:
        ValueError: Any argument out of range; the message names it.
    """
    check_positive_int("train_size", train_size)
    check_positive_int("multiple_of", multiple_of)
    zoom = check_positive("zoom", zoom)
    val_xtra = check_number("val_xtra", val_xtra)
    if val_xtra < 0:
        raise ValueError(f"val_xtra must be >= 0, got {val_xtra!r}")
    valid_scale = check_fraction("valid_scale", valid_scale, low_inclusive=False)
    magnification = crop_magnification(min_scale, max_scale, ratio, image_ratio=image_ratio)
    return _snap(train_size * zoom * magnification, train_size, val_xtra, valid_scale, multiple_of)


# --- BatchNorm recalibration -------------------------------------------------------------------------


def _bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _bn_snapshot(layers: Sequence[nn.modules.batchnorm._BatchNorm]) -> list[list[Tensor]]:
    return [[b.detach().clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in layers]


def _bn_restore(layers: Sequence[nn.modules.batchnorm._BatchNorm], snapshot: Sequence[Sequence[Tensor]]) -> None:
    with torch.no_grad():
        for m, saved in zip(layers, snapshot, strict=True):
            for buf, value in zip((m.running_mean, m.running_var, m.num_batches_tracked), saved, strict=True):
                buf.copy_(value)


def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Any], max_batches: int | None = None) -> int:
    """Recompute every BatchNorm layer's running statistics from ``batches``, in place.

    FixRes's cheap variant (Touvron et al., 2019, arXiv:1906.06423): at a new test size the
    activations' statistics change, so the running mean and variance learned at the training size
    no longer normalise them. This resets them and runs the model forward, without gradients, with
    only the BatchNorm layers in training mode (dropout and the rest stay in evaluation mode), and
    a cumulative average (``momentum=None``, as ``torch.optim.swa_utils.update_bn``), so the result
    is the plain average over the batches. Parameters are never touched; every module's
    train/eval mode and every BatchNorm's ``momentum`` are restored. On any exception the running
    statistics are put back as they were too.

    Args:
        model: The model; layers with ``track_running_stats=False`` are left alone.
        batches: Inputs: each a tensor, or a tuple of the model's positional inputs, on the model's device.
        max_batches: Use at most this many batches (None: all).

    Returns:
        The number of batches used (0 when the model has no BatchNorm layer: nothing runs).

    Raises:
        ValueError: ``max_batches < 1``, or ``batches`` is empty.
    """
    if max_batches is not None:
        check_positive_int("max_batches", max_batches)
    layers = _bn_layers(model)
    if not layers:
        return 0
    snapshot = _bn_snapshot(layers)
    modes = [(m, m.training) for m in model.modules()]
    momenta = [m.momentum for m in layers]
    used = 0
    try:
        model.eval()
        for m in layers:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for b in batches:
                if max_batches is not None and used >= max_batches:
                    break
                model(*(tuple(b) if isinstance(b, (tuple, list)) else (b,)))
                used += 1
        if used == 0:
            raise ValueError("batches gave no batch: the BatchNorm statistics cannot be recomputed from nothing")
    except BaseException:
        _bn_restore(layers, snapshot)
        raise
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        for m, training in modes:
            m.training = training
    return used


# --- fastai plumbing ---------------------------------------------------------------------------------


def _hw(size: Any) -> Size:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _is_plain_tfmd_dl(dl: Any) -> bool:
    """A fastai ``TfmdDL`` that is not a wrapper (``DistributedDL`` keeps the real one in ``.dl``)."""
    from fastai.data.core import TfmdDL

    return isinstance(dl, TfmdDL) and "DistributedDL" not in {c.__name__ for c in type(dl).__mro__}


def _loader_size(dl: Any) -> Size | None:
    """The ``(height, width)`` the loader's size-fixing transforms produce: the last batch one, else the last item one."""
    batch = batch_size_fixers(dl.after_batch)
    if batch:
        return _hw(batch[-1].size)
    item = item_size_fixers(dl.after_item)
    if item:
        return _hw(item[-1].size)[::-1]  # fastai's item sizes are (width, height)
    return None


def _sized_copy(dl: Any, plain: Size, size: Size) -> Any:
    """Return a shallow copy of ``dl`` whose own copies of its size-fixing transforms output ``size``, not ``plain``.

    The copy shares the dataset and sampler settings; ``dl`` and its pipelines are untouched. The
    batch transforms are set to ``size``; the item ones are scaled by the same factor as the final
    size, so presizing keeps its margin and a :class:`fastai_tricks.DraftDL` decodes at what the
    copied item transform needs.
    """
    from fasttransform import Pipeline

    clone = copy.copy(dl)
    fake = copy.copy(dl.fake_l)
    fake.d, fake.default, fake.dataset = clone, clone, fake
    clone.fake_l = fake
    scale = (size[0] / plain[0], size[1] / plain[1])
    for name, fixers in (("after_batch", batch_size_fixers), ("after_item", item_size_fixers)):
        pipeline = getattr(dl, name)
        targets = {id(t): copy.copy(t) for t in fixers(pipeline)}
        for original in fixers(pipeline):
            t = targets[id(original)]
            if name == "after_batch":
                t.size = size
            else:
                w, h = _hw(original.size)
                t.size = type(original.size)((max(1, round(w * scale[1])), max(1, round(h * scale[0]))))
        fs = [targets.get(id(t), t) for t in pipeline.fs]
        setattr(clone, name, Pipeline(fs, split_idx=pipeline.split_idx))
    return clone


class _CallLoader:
    """Stands in for ``learn.dl`` for one evaluation pass, iterating the sized copy.

    Starting the iteration points ``learn.dl`` back at the loader fastai gave, before the first
    batch loads, so an exception cannot leave the copy in ``learn.dl``.
    """

    def __init__(self, learn: Any, own: Any, clone: Any) -> None:
        self.learn, self.own, self.clone = learn, own, clone

    def __len__(self) -> int:
        return len(self.clone)

    def __iter__(self) -> Iterator[Any]:
        self.hand_back()
        return iter(self.clone)

    def hand_back(self) -> None:
        """Point ``learn.dl`` back at the loader fastai gave if it still points here."""
        if getattr(self.learn, "dl", None) is self:
            self.learn.dl = self.own

    def __getattr__(self, name: str) -> Any:
        if name in ("learn", "own", "clone"):  # not set yet (while copying): no delegation loop
            raise AttributeError(name)
        return getattr(self.clone, name)


def _interpolate(x: Tensor, size: Size, mode: str) -> Tensor:
    """Resize a 4-D batch on its device; antialias when shrinking with a filter that supports it."""
    if tuple(x.shape[-2:]) == size:
        return x
    kw: dict[str, Any] = {}
    if mode in ("bilinear", "bicubic"):
        kw = {"align_corners": False, "antialias": size[0] < x.shape[-2] or size[1] < x.shape[-1]}
    cast = not x.is_floating_point() or (x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16))
    out = F.interpolate(x.float() if cast else x, size=size, mode=mode, **kw)
    if out.dtype == x.dtype:
        return out
    return out.to(x.dtype) if x.is_floating_point() else out.round().to(x.dtype)


class _Auto:
    """What ``size='auto'`` read from the training pipelines: the magnification and the validation crop."""

    def __init__(self, magnification: float, val_xtra: float, valid_scale: float, found: list[str]) -> None:
        self.magnification, self.val_xtra, self.valid_scale, self.found = magnification, val_xtra, valid_scale, found


def _zoom_settings(f: Any) -> tuple[float, float, float] | None:
    """``(min_zoom, max_zoom, p)`` of an affine function made by fastai's ``Zoom``, else None."""
    from fastai.vision.augment import zoom_mat

    if not (isinstance(f, functools.partial) and f.func is zoom_mat):
        return None
    defaults = {k: v.default for k, v in inspect.signature(zoom_mat).parameters.items()}
    kw = {**defaults, **f.keywords}
    if kw.get("draw") is not None:
        return None  # a user-drawn zoom: its distribution is unknown
    return float(kw["min_zoom"]), float(kw["max_zoom"]), float(kw["p"])


def _read_training_pipeline(train_dl: Any) -> _Auto | None:
    """Read the crop and zoom settings of the training loader; None when it has none this module knows."""
    from fastai.vision.augment import AffineCoordTfm, RandomResizedCrop, RandomResizedCropGPU

    items = list(getattr(getattr(train_dl, "after_item", None), "fs", []))
    batch = list(getattr(getattr(train_dl, "after_batch", None), "fs", []))
    magnification, val_xtra, valid_scale, found = 1.0, 0.0, 1.0, []
    has_batch_fixer = bool(batch_size_fixers(getattr(train_dl, "after_batch", None)))
    for t in items:
        if isinstance(t, RandomResizedCrop) and getattr(t, "p", 1.0) == 1.0:
            magnification *= crop_magnification(t.min_scale, t.max_scale, tuple(t.ratio))
            if has_batch_fixer:  # its validation centre crop is then a constant fraction of the side
                side = max(_hw(t.size))
                valid_scale *= side / (side + _val_margin(side, t.val_xtra))
            else:
                val_xtra = float(t.val_xtra)
            found.append(f"RandomResizedCrop(min_scale={t.min_scale:g})")
    for t in batch:
        if isinstance(t, RandomResizedCropGPU):
            magnification *= crop_magnification(t.min_scale, t.max_scale, tuple(t.ratio))
            valid_scale *= float(t.valid_scale)
            found.append(f"RandomResizedCropGPU(min_scale={t.min_scale:g})")
        elif isinstance(t, AffineCoordTfm):
            for f in t.aff_fs:
                zoom = _zoom_settings(f)
                if zoom is not None and zoom != (1.0, 1.0, zoom[2]):
                    magnification *= zoom_magnification(*zoom)
                    found.append(f"Zoom(min_zoom={zoom[0]:g}, max_zoom={zoom[1]:g}, p={zoom[2]:g})")
    if not found:
        return None
    return _Auto(magnification, val_xtra, min(1.0, valid_scale), found)


def _check_size(size: Any) -> SizeArg:
    if isinstance(size, str):
        if size != "auto":
            raise ValueError(
                f"size must be 'auto', an int (pixels) or a float (a factor of the training size), got {size!r}"
            )
        return "auto"
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise TypeError(
            f"size must be 'auto', an int (pixels) or a float (a factor), got {size!r} ({type(size).__name__})"
        )
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"size must be > 0 pixels, got {size!r}")
        return size
    return check_positive("size", size)


class TestSize(ReleaseOnDetach, Callback):
    """Evaluate at the test size that matches the apparent object size of training (FixRes).

    Touvron et al., *Fixing the train-test resolution discrepancy*, NeurIPS 2019, arXiv:1906.06423.
    Training with random-resized crops magnifies objects (see :func:`crop_magnification`); at the
    training size the model meets smaller objects at test time than it learned on. This callback
    makes every evaluation batch (``validate``, ``get_preds``, ``predict``, ``tta``,
    ``four_corner_tta``, and a ``fit``'s validation if it is attached to the learner) the test
    size; training batches are never touched.

    How: when the loader being evaluated has a size-fixing transform (``Resize`` or
    ``RandomResizedCrop`` items, ``aug_transforms(size=...)``'s affine or ``RandomResizedCropGPU``
    batch transform), it evaluates a per-call shallow copy of that loader whose own copies of those
    transforms output the test size (item transforms scaled by the same factor, so presizing keeps
    its margin and :class:`fastai_tricks.DraftImageBlock` decodes at the size the copied item
    transform needs). ``learn.dl`` is handed back to fastai's loader before the first batch, and
    ``learn.dls`` and its pipelines are never modified. Without such a transform the batch is
    interpolated on its device (antialiased when shrinking). Order it before
    :class:`fastai_tricks.FourCornerTTA` (it is, by ``order``): the views are cut from the
    test-size image. In ``learn.tta`` the augmented passes run at the test size too.

    ``size='auto'`` reads the training pipelines (``learn.dls.train``): fastai's item
    ``RandomResizedCrop``, ``RandomResizedCropGPU`` (``aug_transforms(min_scale<1)``) and
    ``Zoom`` (``aug_transforms``' ``max_zoom``), and calls :func:`fixres_test_size` for each side;
    when it finds none of them it warns and evaluates at the training size.

    BatchNorm: with ``recalibrate_bn=n`` the running statistics are recomputed
    (:func:`recalibrate_batchnorm`) once per evaluation from ``n`` batches of training images
    (a fixed random subset, seed 0) put through the *validation* transforms at the test size, the
    distribution the model meets at test time. No weight changes; the statistics learned in
    training are put back when the evaluation ends (``after_fit``), after each validation of a
    training fit, when the callback is removed and when it raises. To keep recalibrated
    statistics (e.g. to export a model for test-size inference), call
    :func:`recalibrate_batchnorm` yourself.

    When it cannot help: a network that ends on a 1x1 feature map at the training size (a
    stride-32 xresnet at 32 px) gets a 2x2 map from any larger input, which it never saw. On
    scikit-learn's digits at 32 px (the recipe's xresnet18, 3 seeds,
    ``benchmarks/bench_test_size.py``) every test size from 1.1x to 2x lost 13 to 86 points of
    accuracy against plain evaluation, with or without recalibration (and in a one-off check, one
    row and column of background padding, no resizing, took a model from 97.8 % to 29.1 %); only
    ``TestSize(1.0, recalibrate_bn=10)`` gained (+0.7 points with the recipe's augmentation).
    Measure on your data before you use it.

    Dense outputs are refused: a segmentation model (targets with the image's spatial size, or an
    output with two spatial axes) raises a ValueError at the first batch, because the masks would
    be resampled with the image (the metrics would score resampled labels, not the labels) and
    there is no crop-scale argument for per-pixel outputs. Points and boxes, which fastai scales to
    [-1, 1], are size-independent and pass.

    Records (a later evaluation overwrites them; nothing else clears them): :attr:`evaluated_size`,
    the ``(height, width)`` of the last evaluation, and :attr:`plain_size`, the size the loader
    produces without the callback (the training size), which it was scaled from;
    :attr:`auto_found`, what ``'auto'`` read from the training pipelines.

    Args:
        size: ``'auto'``; an int, the short side in pixels (the aspect ratio is kept); or a float,
            a factor of the training size (1.15: 15 % larger).
        recalibrate_bn: Number of training batches to recompute BatchNorm statistics from at the
            test size; 0 (the default) keeps the training statistics.
        mode: Interpolation mode when the batch itself is resized: ``'bilinear'``, ``'bicubic'``,
            ``'nearest'``, ``'nearest-exact'`` or ``'area'``.

    Raises:
        ValueError: ``size`` <= 0, not finite, or a string other than ``'auto'``;
            ``recalibrate_bn < 0``. When evaluating: a test size smaller than an attached
            :class:`fastai_tricks.FourCornerTTA`'s crop in pixels, a test size under 1 pixel,
            a dense (segmentation) output or target, or an input that is not a 4-D image batch.
        TypeError: ``size`` of another type (a bool, a list).

    """

    __test__ = False  # a callback, not a pytest test class
    # Before FourCornerTTA (MixedPrecision.order - 1), which cuts its views from the resized batch.
    order = MixedPrecision.order - 2
    run_train = False
    _stateattrs = ("_call_dl", "_bn", "_auto")

    def __init__(self, size: SizeArg = "auto", recalibrate_bn: int = 0, mode: str = "bilinear") -> None:
        super().__init__()
        self.size = _check_size(size)
        self.recalibrate_bn = check_non_negative_int("recalibrate_bn", recalibrate_bn)
        self.mode = check_choice("mode", mode, _MODES)
        self.evaluated_size: Size | None = None
        self.plain_size: Size | None = None
        self.auto_found: list[str] = []
        self._reset()

    def _init_state(self) -> None:
        """Recreate the per-call state left out of the pickle (``_stateattrs``) when a Learner is loaded."""
        super()._init_state()
        self._reset()

    # -- state -----------------------------------------------------------------------------------------

    def _reset(self) -> None:
        self._call_dl: _CallLoader | None = None
        self._bn: tuple[list[Any], list[list[Tensor]]] | None = None
        self._auto: _Auto | None = None
        self._auto_read = False
        self._training_fit = False
        self._interp: Size | None = None  # the size to interpolate to, when the loader cannot produce it
        self._checked = False
        self._sized_by_loader = False

    def _restore(self) -> None:
        """Hand ``learn.dl`` back and put the BatchNorm statistics back; safe to call any number of times."""
        call_dl, self._call_dl = self.__dict__.get("_call_dl"), None
        if call_dl is not None:
            call_dl.hand_back()
        bn, self._bn = self.__dict__.get("_bn"), None
        if bn is not None:
            _bn_restore(*bn)

    def _fail(self, message: str) -> None:
        """Leave no state behind, then raise."""
        self._restore()
        raise ValueError(message)

    def before_fit(self) -> None:
        """Put back anything a crashed evaluation left, and start fresh per-call state."""
        self._restore()
        self._reset()

    def before_train(self) -> None:
        """Note a training fit: its model changes between validations, so calibration is per validation."""
        self._training_fit = True

    def after_fit(self) -> None:
        """Put the BatchNorm statistics back and drop the per-call copy."""
        self._restore()
        self._reset()

    after_cancel_fit = after_fit

    def _release(self) -> None:
        """On detach (``validate(cbs=...)`` and ``fit(cbs=...)`` unwinding, any exception): undo everything."""
        if "_bn" in self.__dict__:
            self._restore()
            self._reset()

    # -- sizes -----------------------------------------------------------------------------------------

    def _resolve(self, train: Size) -> Size:
        """The test size for an evaluation whose plain size is ``train``."""
        if self.size == "auto":
            auto = self._read_auto()
            if auto is None:
                test = train
            else:
                test = tuple(_snap(s * auto.magnification, s, auto.val_xtra, auto.valid_scale, 1) for s in train)
        elif isinstance(self.size, int):
            scale = self.size / min(train)
            test = tuple(self.size if s == min(train) else round(s * scale) for s in train)
        else:
            test = tuple(round(s * self.size) for s in train)
        if min(test) < 1:
            self._fail(
                f"size={self.size!r} makes the test size {tuple(test)} from the training size {train}: under 1 pixel"
            )
        self.plain_size, self.evaluated_size = train, (int(test[0]), int(test[1]))
        self._check_tta(self.evaluated_size)
        return self.evaluated_size

    def _read_auto(self) -> _Auto | None:
        if not self._auto_read:
            self._auto_read = True
            self._auto = _read_training_pipeline(getattr(getattr(self.learn, "dls", None), "train", None))
            self.auto_found = [] if self._auto is None else list(self._auto.found)
            if self._auto is None:
                warnings.warn(
                    "TestSize(size='auto') found no RandomResizedCrop, RandomResizedCropGPU or Zoom in the training "
                    "pipelines (learn.dls.train.after_item and after_batch), so it cannot tell how much training "
                    "magnified objects; evaluating at the training size. Pass size= a factor or pixels instead.",
                    UserWarning,
                    stacklevel=2,
                )
        return self._auto

    def _check_tta(self, test: Size) -> None:
        from .tta import FourCornerTTA

        for cb in getattr(self.learn, "cbs", []):
            crop = getattr(cb, "crop", None) if isinstance(cb, FourCornerTTA) else None
            if isinstance(crop, int) and crop > min(test):
                self._fail(
                    f"size={self.size!r} gives a test size of {test} px, smaller than FourCornerTTA's crop={crop} px; "
                    "pass a larger size, or a fractional crop (crop=0.875)"
                )

    # -- evaluation ------------------------------------------------------------------------------------

    def before_validate(self) -> None:
        """Recalibrate BatchNorm if asked, then hand ``learn.dl`` a copy of the loader at the test size."""
        self._restore_call_dl()
        self._interp, self._checked, self._sized_by_loader = None, False, False
        if is_lr_finding(self.learn):
            return
        if self.recalibrate_bn and self._bn is None:
            self._recalibrate()
        dl = self.learn.dl
        plain = _loader_size(dl) if _is_plain_tfmd_dl(dl) else None
        if plain is None:
            return  # the batch is interpolated in before_batch, once its size is known
        self._sized_by_loader = True
        test = self._resolve(plain)
        if test != plain:
            self._call_dl = _CallLoader(self.learn, dl, _sized_copy(dl, plain, test))
            self.learn.dl = self._call_dl

    def _restore_call_dl(self) -> None:
        call_dl, self._call_dl = self._call_dl, None
        if call_dl is not None:
            call_dl.hand_back()

    def before_batch(self) -> None:
        """Check the first batch; interpolate the batch when the loader could not produce the test size."""
        x = self.learn.xb[0] if len(self.learn.xb) else None
        if not self._checked:
            self._checked = True
            self._check_batch(x)
            if not self._sized_by_loader:
                self._interp = self._resolve((int(x.shape[-2]), int(x.shape[-1])))
        if self._interp is not None and tuple(x.shape[-2:]) != self._interp:
            self.learn.xb = (_interpolate(x, self._interp, self.mode), *self.learn.xb[1:])

    def _check_batch(self, x: Any) -> None:
        self._check_batch_shape(x)
        for y in self.learn.yb:
            if isinstance(y, Tensor) and (
                type(y).__name__ == "TensorMask" or (y.ndim >= 3 and tuple(y.shape[-2:]) == tuple(x.shape[-2:]))
            ):
                self._fail(
                    f"TestSize refuses dense targets (a mask of shape {tuple(y.shape)}): the masks would be resampled "
                    "with the image, so the metrics would score resampled labels; evaluate segmentation at its size"
                )

    def after_pred(self) -> None:
        """Refuse a dense (segmentation) output: TestSize evaluates one prediction per image."""
        pred = self.learn.pred
        if isinstance(pred, Tensor) and pred.ndim >= 4:
            self._fail(
                f"TestSize refuses dense outputs (the model returned {tuple(pred.shape)}, a map per image): a "
                "per-pixel prediction at the test size has no crop-scale argument and would be scored against "
                "masks resampled with the image; evaluate segmentation at its size"
            )

    def after_validate(self) -> None:
        """Drop the per-call copy; in a training fit, put the training BatchNorm statistics back."""
        self._restore_call_dl()
        if self._training_fit and self._bn is not None:
            _bn_restore(*self._bn)
            self._bn = None

    after_cancel_validate = after_validate

    # -- BatchNorm -------------------------------------------------------------------------------------

    def _calibration_loader(self) -> Any:
        """Training images through the validation transforms: a fixed random subset, ``recalibrate_bn`` batches."""
        dls = self.learn.dls
        train = dls.train
        items = getattr(getattr(dls, "train_ds", None), "items", None)
        if items is None or len(items) == 0:
            self._fail(
                "recalibrate_bn needs the training items (learn.dls.train_ds.items) to put them through the "
                "validation transforms; this learner has none (e.g. a load_learner export)"
            )
        bs = getattr(train, "bs", None) or 64
        n = min(len(items), self.recalibrate_bn * bs)
        picked = random.Random(0).sample(range(len(items)), n)
        try:
            return dls.test_dl([items[i] for i in picked], with_labels=False, bs=bs, shuffle=False, drop_last=False)
        except Exception as err:  # noqa: BLE001 - any failure of fastai's test_dl means the same thing here
            self._fail(
                "recalibrate_bn needs learn.dls.test_dl(learn.dls.train_ds.items) to put training images through the "
                f"validation transforms, which failed with {type(err).__name__}: {err}"
            )

    def _calibration_batches(self, dl: Any, size: Size | None) -> Iterator[tuple[Tensor, ...]]:
        """The calibration inputs on the model's device; resized to the test size when the loader could not."""
        from fastai.torch_core import to_device

        device = next(self.learn.model.parameters()).device
        n_inp = getattr(self.learn.dls, "n_inp", 1)
        for b in dl:
            xb = tuple(to_device(b, device))[:n_inp]
            x = xb[0]
            if size is None:
                self._check_batch_shape(x)
                size = self._resolve((int(x.shape[-2]), int(x.shape[-1])))
            yield (_interpolate(x, size, self.mode), *xb[1:])

    def _check_batch_shape(self, x: Any) -> None:
        if not isinstance(x, Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            self._fail(f"TestSize needs 4-D image batches (N, C, H, W) as the first input, got {shape}")

    def _recalibrate(self) -> None:
        model = self.learn.model
        layers = _bn_layers(model)
        if not layers:
            warnings.warn(
                "TestSize(recalibrate_bn=...) found no BatchNorm layer with running statistics in the model; "
                "nothing to recalibrate",
                UserWarning,
                stacklevel=2,
            )
            return
        dl = self._calibration_loader()
        plain = _loader_size(dl) if _is_plain_tfmd_dl(dl) else None
        test = None
        if plain is not None:
            test = self._resolve(plain)
            if test != plain:
                dl = _sized_copy(dl, plain, test)
        self._bn = (layers, _bn_snapshot(layers))
        try:
            recalibrate_batchnorm(model, self._calibration_batches(dl, test), self.recalibrate_bn)
        except BaseException:
            self._restore()
            raise
