"""Progressive resizing: train at a small image size and grow to the full size during each fit.

The schedule is pure maths (:func:`resize_schedule`, :func:`size_at`, :func:`schedule_progress`)
and depends only on the step counters, so it is identical on every rank. The callback
:class:`ProgressiveResize` is thin: it asks the schedule for a size and makes the training batch
that size, either by changing the output size of the augmentation that already fixes it (so the
small batch is produced directly) or by interpolating the batch on its device. Between epochs it
also shrinks the item-level ``Resize``, so the CPU's item work shrinks too, and with
:class:`fastai_tricks.DraftImageBlock` the JPEG decoding follows it.

Nothing on the learner's ``DataLoaders`` is ever changed. When a size-fixing batch transform is
found, the callback works on a per-fit shallow copy of the training ``DataLoader`` that owns its
own copies of those transforms. For each epoch ``learn.dl`` is a stand-in that iterates the copy
and points ``learn.dl`` back at the learner's own loader the moment iteration starts, before the
first batch is loaded. Validation, ``predict``, ``get_preds``, ``lr_find`` and TTA therefore see
exactly the pipelines they saw before, whether the fit ended normally, was cancelled or raised;
removing the callback (as ``fit(cbs=...)`` does on any exception) also undoes what is left of an
interrupted epoch, and the per-fit copy is never pickled with an exported Learner.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from fastai.callback.core import Callback

from ._checks import check_choice, check_fraction, check_non_negative_int, check_positive, check_positive_int
from ._fastai_utils import (
    ReleaseOnDetach,
    batch_size_fixers,
    is_gathering_preds,
    is_lr_finding,
    item_size_fixers,
)

__all__ = [
    "MIN_EPOCHS",
    "ProgressiveResize",
    "initial_pixels",
    "mix_alpha_at",
    "resize_schedule",
    "schedule_pays_off",
    "schedule_progress",
    "size_at",
]

Size = tuple[int, int]
SizeLike = int | Sequence[int]
InitialSize = float | int | Sequence[int]

_MODES = ("bilinear", "bicubic", "nearest", "nearest-exact", "area")
_SCHEDULES = ("batch", "epoch")


# --- pure schedule -----------------------------------------------------------------------------------


def _as_size(name: str, value: Any) -> Size:
    """Return a pixel size as ``(height, width)``; an int means a square."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a (height, width) pair of ints, got {value!r}")
    if isinstance(value, int):
        check_positive_int(name, value)
        return (value, value)
    if (
        isinstance(value, Sequence)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        if min(value) < 1:
            raise ValueError(f"{name} must be > 0 in both dimensions, got {tuple(value)!r}")
        return (int(value[0]), int(value[1]))
    raise TypeError(f"{name} must be an int or a (height, width) pair of ints, got {value!r}")


def _check_initial(value: Any) -> InitialSize:
    """Validate ``initial_size`` on its own: a fraction in (0, 1] or a pixel size."""
    if isinstance(value, float):
        return check_fraction("initial_size", value, low=0.0, low_inclusive=False)
    return _as_size("initial_size", value)


def initial_pixels(initial_size: InitialSize, final_size: SizeLike, increase_by: int = 4) -> Size:
    """Resolve ``initial_size`` against the final size, in pixels.

    Args:
        initial_size: A float is a fraction of ``final_size`` in (0, 1]. An int is the short side in
            pixels (the aspect ratio of ``final_size`` is kept). A pair is ``(height, width)``.
        final_size: The full size, an int (square) or ``(height, width)``.
        increase_by: Each side is rounded to the nearest multiple of this, at least one multiple,
            and at most the final side.

    Returns:
        The initial ``(height, width)``.

    Raises:
        ValueError: ``initial_size`` is larger than ``final_size`` in some dimension, or not positive.

    """
    final = _as_size("final_size", final_size)
    check_positive_int("increase_by", increase_by)
    initial = _check_initial(initial_size)
    if isinstance(initial, float):
        target = (final[0] * initial, final[1] * initial)
    elif isinstance(initial_size, int):
        scale = initial_size / min(final)
        if scale > 1:
            raise ValueError(f"initial_size must not be larger than final_size {final}, got {initial_size!r}")
        target = (final[0] * scale, final[1] * scale)
    else:
        if initial[0] > final[0] or initial[1] > final[1]:
            raise ValueError(f"initial_size must not be larger than final_size {final}, got {initial!r}")
        target = (float(initial[0]), float(initial[1]))
    # A side asked at full size stays exactly full size even when it is not a multiple of increase_by.
    return tuple(
        f if t >= f else min(f, max(increase_by, round(t / increase_by) * increase_by))
        for t, f in zip(target, final, strict=True)
    )  # type: ignore[return-value]


def schedule_progress(step: int, total: int) -> float:
    """Return the progress in [0, 1] of step ``step`` (0-based) out of ``total``: the last step is at 1.

    A one-step schedule is at progress 1, so it runs at the final size.
    """
    if total <= 1:
        return 1.0
    return min(1.0, max(0.0, step / (total - 1)))


def size_at(progress: float, initial: Size, final: Size, start: float, finish: float, increase_by: int) -> Size:
    """Return the image size at ``progress`` (a fraction of training in [0, 1]).

    The size is ``initial`` up to ``start``, grows linearly to ``final`` between ``start`` and
    ``finish``, rounding each side down to a multiple of ``increase_by`` (never below
    ``initial``), and is exactly ``final`` from ``finish`` on.

    Args:
        progress: Fraction of training done.
        initial: Initial ``(height, width)``, as returned by :func:`initial_pixels`.
        final: Final ``(height, width)``.
        start: Progress at which growth starts.
        finish: Progress at which the final size is reached.
        increase_by: Granularity of the intermediate sizes in pixels.

    Returns:
        ``(height, width)``.

    """
    if progress >= finish:
        return final
    t = 0.0 if progress <= start else (progress - start) / (finish - start)
    out = []
    for i, f in zip(initial, final, strict=True):
        grown = math.floor((i + (f - i) * t) / increase_by) * increase_by
        out.append(min(f, max(i, grown)))
    return (out[0], out[1])


def resize_schedule(
    n_epoch: int,
    n_iter: int,
    final_size: SizeLike,
    *,
    initial_size: InitialSize = 0.5,
    start: float = 0.25,
    finish: float = 0.5,
    increase_by: int = 4,
    schedule: Literal["batch", "epoch"] = "batch",
) -> list[Size]:
    """Return the training image size at every iteration of a fit, as :class:`ProgressiveResize` uses it.

    With ``schedule='batch'`` the progress of iteration ``k`` of ``N = n_epoch * n_iter`` is
    ``k / (N - 1)``; with ``schedule='epoch'`` every iteration of epoch ``e`` has progress
    ``e / (n_epoch - 1)``, so the size only changes between epochs and the last epoch is at full
    size (a one-epoch fit in epoch mode trains at the final size throughout).

    Args:
        n_epoch: Number of epochs of the fit.
        n_iter: Training iterations per epoch.
        final_size: The full size, an int (square) or ``(height, width)``.
        initial_size: See :func:`initial_pixels`.
        start: Fraction of training at which the size starts to grow, in [0, 1].
        finish: Fraction of training at which the final size is reached, in [start, 1].
        increase_by: Sizes are multiples of this, except the final size if it is not one.
        schedule: ``'batch'`` or ``'epoch'``.

    Returns:
        A list of ``n_epoch * n_iter`` ``(height, width)`` pairs.

    """
    check_positive_int("n_epoch", n_epoch)
    check_positive_int("n_iter", n_iter)
    start, finish = _check_window(start, finish)
    check_choice("schedule", schedule, _SCHEDULES)
    final = _as_size("final_size", final_size)
    initial = initial_pixels(initial_size, final, increase_by)
    sizes = []
    for epoch in range(n_epoch):
        for it in range(n_iter):
            p = _progress(schedule, epoch, it, n_epoch, n_iter)
            sizes.append(size_at(p, initial, final, start, finish, increase_by))
    return sizes


def _progress(schedule: str, epoch: int, it: int, n_epoch: int, n_iter: int) -> float:
    if schedule == "epoch":
        return schedule_progress(epoch, n_epoch)
    return schedule_progress(epoch * n_iter + it, n_epoch * n_iter)


def _check_window(start: Any, finish: Any) -> tuple[float, float]:
    start = check_fraction("start", start)
    finish = check_fraction("finish", finish)
    if finish < start:
        raise ValueError(f"finish must be >= start ({start!r}), got {finish!r}")
    return start, finish


#: The shortest fit, in epochs, for which the default :class:`ProgressiveResize` resizes at all.
#: Measured on real data (scikit-learn's digits at 32 px, xresnet18, 3 seeds; the tables are in
#: docs/progressive_resize.md): at 4 epochs every schedule tried lost 1.0 to 5.1 points against a
#: fixed-size fit, at 8 epochs the default schedule gained 0.3.
MIN_EPOCHS = 8


def schedule_pays_off(n_epoch: int, min_epochs: int = MIN_EPOCHS) -> bool:
    """Whether a fit of ``n_epoch`` epochs is long enough for progressive resizing to run.

    The budget is counted in epochs, passes over the training set, not in optimizer steps. With the
    default window the model sees the images at full size only in the second half of the fit, and
    it needs enough passes over them at that size to adapt its weights to the full-size statistics;
    more, smaller batches over the same passes do not make up for it. Measured on real digits
    (issue 21, docs "Steps or epochs? What the guard counts"): at the same 168 optimizer steps a
    2-epoch fit (bs 16) lost 1.3 points against a fixed-size fit, a 4-epoch fit (bs 32) 0.3 and an
    8-epoch fit (bs 64) nothing, while at 4 epochs 84 and 168 steps changed alike. The threshold in
    epochs depends on the data-set size (half the digits still lost at 8 epochs), so 8 is a budget
    measured on small data, not a law. Below ``min_epochs`` the callback trains at full size instead.

    Args:
        n_epoch: Epochs of the fit.
        min_epochs: The shortest fit that resizes; 0 always resizes.

    Returns:
        ``n_epoch >= min_epochs``.
    """
    check_positive_int("n_epoch", n_epoch)
    check_non_negative_int("min_epochs", min_epochs)
    return n_epoch >= min_epochs


def mix_alpha_at(size: Size, initial: Size, final: Size, low: float, high: float) -> float:
    """Return the mixing strength for the current image size (progressive regularisation).

    EfficientNetV2's progressive learning (Tan & Le 2021, arXiv:2104.00298) strengthens
    regularisation as the images grow.

    Grows linearly from ``low`` at ``initial`` to ``high`` at ``final``, measured on the side that
    grows the most; it is ``high`` when the two sizes are equal.
    """
    spans = [(s - i, f - i) for s, i, f in zip(size, initial, final, strict=True)]
    done, span = max(spans, key=lambda p: p[1])
    frac = 1.0 if span <= 0 else min(1.0, max(0.0, done / span))
    return low + (high - low) * frac


# --- batch resizing ----------------------------------------------------------------------------------


def _interpolate(x: torch.Tensor, size: Size, mode: str) -> torch.Tensor:
    """Resize a 4-D batch on its device; antialias when shrinking with a filter that supports it."""
    if tuple(x.shape[-2:]) == size:
        return x
    shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    kw: dict[str, Any] = {}
    if mode in ("bilinear", "bicubic"):
        kw = {"align_corners": False, "antialias": shrinking}
    # CPU kernels (antialiased ones especially) exist only for float32/float64: resize there and cast back.
    needs_float32 = not x.is_floating_point() or (x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16))
    out = F.interpolate(x.float() if needs_float32 else x, size=size, mode=mode, **kw)
    if out.dtype == x.dtype:
        return out
    return out.to(x.dtype) if x.is_floating_point() else out.round().to(x.dtype)


def _resize_target(y: Any, x_hw: tuple[int, int], size: Size, mode: str) -> Any:
    """Resize a dense target that has the image's spatial size; masks (integer targets) use nearest."""
    if not isinstance(y, torch.Tensor) or y.ndim < 3 or tuple(y.shape[-2:]) != x_hw:
        return y
    is_mask = not y.is_floating_point() or type(y).__name__ == "TensorMask"
    if is_mask:
        added = y.ndim == 3
        m = y[:, None] if added else y
        out = F.interpolate(m.float(), size=size, mode="nearest").to(y.dtype)
        return out[:, 0] if added else out
    if y.ndim == 4:
        return _interpolate(y, size, mode)
    return _interpolate(y[:, None], size, mode)[:, 0]


# --- fastai plumbing -----------------------------------------------------------------------------------


def _tfm_size(t: Any) -> Size:
    s = t.size
    return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))


def _is_plain_tfmd_dl(dl: Any) -> bool:
    """Tell whether ``dl`` is a fastai TfmdDL that is not a wrapper (DistributedDL keeps the real one in ``.dl``)."""
    from fastai.data.core import TfmdDL

    return isinstance(dl, TfmdDL) and "DistributedDL" not in {c.__name__ for c in type(dl).__mro__}


def _copy_pipeline(pipeline: Any, targets: list[Any]) -> tuple[Any, list[Any]]:
    """Return a new Pipeline like ``pipeline`` where each transform in ``targets`` is a shallow copy."""
    from fasttransform import Pipeline

    copies = {id(t): copy.copy(t) for t in targets}
    fs = [copies.get(id(t), t) for t in pipeline.fs]
    return Pipeline(fs, split_idx=pipeline.split_idx), [copies[id(t)] for t in targets]


def _clone_loader(dl: Any, batch: bool, item: bool) -> tuple[Any, list[Any], list[Any]]:
    """Return a shallow copy of ``dl`` that owns copies of its size-fixing transforms.

    The copy shares the dataset, sampler settings and random generator of ``dl``, so it shuffles
    exactly as ``dl`` would; ``dl`` itself and its pipelines are untouched.
    """
    clone = copy.copy(dl)
    fake = copy.copy(dl.fake_l)
    fake.d, fake.default, fake.dataset = clone, clone, fake
    clone.fake_l = fake
    batch_tfms: list[Any] = []
    item_tfms: list[Any] = []
    if batch:
        clone.after_batch, batch_tfms = _copy_pipeline(dl.after_batch, batch_size_fixers(dl.after_batch))
    if item:
        clone.after_item, item_tfms = _copy_pipeline(dl.after_item, item_size_fixers(dl.after_item))
    return clone, batch_tfms, item_tfms


class _EpochLoader:
    """Stands in for ``learn.dl`` for one training epoch, iterating the per-fit copy of the loader.

    Starting the iteration points ``learn.dl`` back at the learner's own loader, so an exception
    while the first batch loads (a KeyboardInterrupt, a broken transform) cannot leave the copy in
    ``learn.dl``. Attribute reads go to the copy, for callbacks that inspect ``learn.dl`` in
    ``before_train``.
    """

    def __init__(self, learn: Any, own: Any, clone: Any) -> None:
        self.learn, self.own, self.clone = learn, own, clone

    def __len__(self) -> int:
        return len(self.clone)

    def __iter__(self) -> Any:
        self.hand_back()
        return iter(self.clone)

    def hand_back(self) -> None:
        """Point ``learn.dl`` back at the learner's own loader if it still points here."""
        if getattr(self.learn, "dl", None) is self:
            self.learn.dl = self.own

    def __getattr__(self, name: str) -> Any:
        if name in ("learn", "own", "clone"):  # not set yet (e.g. while copying): no delegation loop
            raise AttributeError(name)
        return getattr(self.clone, name)


def _is_compiled(model: torch.nn.Module) -> bool:
    """Whether ``model`` went through ``torch.compile`` (wrapper) or ``Module.compile`` (in place)."""
    return getattr(model, "_orig_mod", None) is not None or getattr(model, "_compiled_call_impl", None) is not None


class ProgressiveResize(ReleaseOnDetach, Callback):
    """Train at a small image size and grow it to the full size during each fit.

    Progressive resizing (fast.ai's DAWNBench entry; Howard & Gugger, *Deep Learning for Coders*,
    2020) trains the early part of a fit on downscaled images, which is cheaper, and the end at
    full size. The size follows :func:`resize_schedule`: ``initial_size`` until ``start``, a
    linear growth in steps of ``increase_by`` pixels until ``finish``, the final size after.

    When the training ``after_batch`` pipeline has a transform that fixes the output size (the
    affine transform or ``RandomResizedCropGPU`` made by ``aug_transforms(size=...)``), the
    callback sets that transform's output size so augmentation produces the small batch directly;
    it does so on a per-fit copy, never on ``learn.dls``. Otherwise the batch is interpolated on
    its device (antialiased when shrinking); targets with the image's spatial size are resized
    too, masks with nearest. Validation runs at full size (training small and testing large is
    helped by the train-test resolution discrepancy: Touvron et al., *Fixing the train-test
    resolution discrepancy*, NeurIPS 2019, arXiv:1906.06423) unless ``resize_valid=True``.

    Every fit runs its own schedule, including each of ``fine_tune``'s two fits. The callback
    does nothing during ``lr_find``, ``validate``, ``get_preds``, ``predict``, TTA and
    ``show_results``. Sizes used at every training iteration of the last training fit are in
    :attr:`sizes`, learning rates in :attr:`lrs`. This record is reset only when a training fit
    starts: it survives ``validate``, ``get_preds``, ``predict``, ``tta``, ``four_corner_tta``,
    ``show_results``, ``lr_find`` (a mock fit, not the user's training), removal from the learner,
    ``export`` and ``load_learner``. A fit shorter than ``min_epochs`` leaves it empty.

    Args:
        initial_size: A float in (0, 1] is a fraction of the final size; an int is the short side
            in pixels; a pair is ``(height, width)``. Rounded to a multiple of ``increase_by``.
        final_size: The full size, an int or ``(height, width)``. ``None`` takes it from the
            size-fixing batch transform, else from the first training batch. Non-square sizes
            keep their aspect ratio.
        start: Fraction of training at which growth starts, in [0, 1].
        finish: Fraction of training at which the final size is reached, in [start, 1].
        increase_by: Intermediate sizes are multiples of this many pixels (>= 1).
        mode: Interpolation mode for images: ``'bilinear'``, ``'bicubic'``, ``'nearest'``,
            ``'nearest-exact'`` or ``'area'``.
        schedule: ``'batch'`` changes the size at every iteration; ``'epoch'`` once per epoch.
        resize_valid: Validate at the current training size instead of the full size.
        mix_alpha: ``(low, high)``: set the ``alpha`` of every mixing callback
            (:class:`fastai_tricks.mixing.MixCallback`) on the learner from ``low`` at the initial
            size to ``high`` at the final size (progressive regularisation: Tan & Le, 2021,
            *EfficientNetV2*, arXiv:2104.00298). Set for each training batch and restored after it.
        resize_items: Also shrink the item-level ``Resize`` or ``RandomResizedCrop`` (on the
            per-fit copy), so that CPU work shrinks too: the item transform, and with
            :class:`fastai_tricks.DraftImageBlock` the JPEG decoding itself. Items change size
            only between epochs (loader workers hold a copy of the item pipeline during one), so
            with ``schedule='batch'`` each epoch's items have the largest size of that epoch
            and the batch is brought down to each iteration's size.
        reserve_memory: Run one full-size forward and backward pass on zeros before the first
            small batch, so the allocator reserves the peak memory up front (useful on GPU).
            Batch-norm statistics and gradients are left as they were.
        min_epochs: The shortest fit that is resized, in epochs whatever the batch size (the
            budget guard, see :func:`schedule_pays_off`). A shorter fit trains at full size
            throughout, with a warning, because on real data it lost accuracy against a fixed-size
            fit with every schedule tried; the loss followed the epochs of the fit, not its
            optimizer steps. 0 resizes every fit.

    Raises:
        ValueError: A size <= 0, an initial size larger than the final size, ``finish < start``,
            fractions outside [0, 1], or ``increase_by <= 0``. At the first training batch, when
            the input is not a 4-D ``(N, C, H, W)`` tensor.

    """

    order = -5  # after TrainEvalCallback, before mixing callbacks (0), MixedPrecision and DistributedTrainer
    run_valid = True
    # Per-fit state: never pickled with an exported Learner (the loader copy holds the dataset).
    _stateattrs = ("_clone", "_epoch_dl", "_batch_tfms", "_item_tfms", "_saved_alphas")

    def __init__(
        self,
        initial_size: InitialSize = 0.5,
        final_size: SizeLike | None = None,
        start: float = 0.25,
        finish: float = 0.5,
        increase_by: int = 4,
        mode: str = "bilinear",
        schedule: Literal["batch", "epoch"] = "batch",
        resize_valid: bool = False,
        mix_alpha: tuple[float, float] | None = None,
        resize_items: bool = True,
        reserve_memory: bool = False,
        min_epochs: int = MIN_EPOCHS,
    ) -> None:
        _check_initial(initial_size)
        self.initial_size = initial_size
        self.final_size = None if final_size is None else _as_size("final_size", final_size)
        if self.final_size is not None:
            initial_pixels(initial_size, self.final_size, 1)  # raises when initial > final
        self.start, self.finish = _check_window(start, finish)
        self.increase_by = check_positive_int("increase_by", increase_by)
        self.mode = check_choice("mode", mode, _MODES)
        self.schedule = check_choice("schedule", schedule, _SCHEDULES)
        self.resize_valid = bool(resize_valid)
        if mix_alpha is not None:
            if not isinstance(mix_alpha, Sequence) or len(mix_alpha) != 2:
                raise ValueError(f"mix_alpha must be None or a (low, high) pair, got {mix_alpha!r}")
            mix_alpha = (check_positive("mix_alpha[0]", mix_alpha[0]), check_positive("mix_alpha[1]", mix_alpha[1]))
        self.mix_alpha = mix_alpha
        self.resize_items = bool(resize_items)
        self.reserve_memory = bool(reserve_memory)
        self.min_epochs = check_non_negative_int("min_epochs", min_epochs)
        self.sizes: list[Size] = []
        self.lrs: list[float] = []
        self._saved_alphas: dict[int, tuple[Any, float]] = {}
        self._reset()

    def _init_state(self) -> None:
        """Recreate the per-fit state left out of the pickle (``_stateattrs``) when a Learner is loaded."""
        super()._init_state()
        self._saved_alphas = {}
        self._reset()

    # -- per-fit state ---------------------------------------------------------------------------------

    def _reset(self) -> None:
        self._started = False  # the first training epoch of this fit has been seen
        self._active = False  # this fit is a real training fit (not lr_find / get_preds)
        self._checked = False
        self._clone: Any = None
        self._epoch_dl: _EpochLoader | None = None
        self._batch_tfms: list[Any] = []
        self._item_tfms: list[Any] = []
        self._item_base: list[Size] = []
        self._final: Size | None = None
        self._initial: Size | None = None
        self._current: Size | None = None

    def before_fit(self) -> None:
        """Start fresh per-fit state; put back mixing alphas a crashed fit may have left changed.

        fastai fires ``before_fit`` for ``validate``, ``get_preds``, ``predict``, TTA and ``lr_find``
        too, so the record (:attr:`sizes`, :attr:`lrs`) is not cleared here: only when a training fit
        reaches its first training epoch (:meth:`_start_fit`).
        """
        self._restore_alphas()
        self._reset()

    def after_fit(self) -> None:
        """Drop the per-fit copy and restore mixing alphas."""
        self._restore_alphas()
        self._reset()

    after_cancel_fit = after_fit

    def _release(self) -> None:
        """On detach (``fit(cbs=...)`` unwinding after any exception): undo what an interrupted fit left."""
        if self.__dict__.get("_epoch_dl") is not None:
            self._epoch_dl.hand_back()
        if "_saved_alphas" in self.__dict__:
            self._restore_alphas()
            self._reset()

    # -- training --------------------------------------------------------------------------------------

    def _start_fit(self) -> None:
        """First training epoch of a fit: decide whether to act, find transforms, warn."""
        self._started = True
        self._active = not is_lr_finding(self.learn) and not is_gathering_preds(self.learn)
        if not self._active:
            return  # lr_find is not the user's training: the last training fit's record stays
        # A training fit: the record now describes this fit (empty if the budget guard below keeps it full size).
        self.sizes.clear()
        self.lrs.clear()
        if not schedule_pays_off(self.learn.n_epoch, self.min_epochs):
            self._active = False
            warnings.warn(
                f"ProgressiveResize: a {self.learn.n_epoch}-epoch fit is shorter than min_epochs={self.min_epochs}, "
                "the budget below which progressive resizing lost accuracy on real data (counted in epochs: more, "
                "smaller batches did not make up for fewer passes); training at full size. "
                "Pass min_epochs=0 to resize anyway.",
                UserWarning,
                stacklevel=2,
            )
            return
        if torch.backends.cudnn.benchmark:
            warnings.warn(
                "ProgressiveResize: torch.backends.cudnn.benchmark is on, so cuDNN re-tunes its kernels for every "
                "new image size; turn it off or expect a pause at each size change.",
                UserWarning,
                stacklevel=2,
            )
        if _is_compiled(self.learn.model):
            warnings.warn(
                "ProgressiveResize: the model is torch.compile'd, so every new image size triggers a recompile; "
                "compile with torch.compile(model, dynamic=True).",
                UserWarning,
                stacklevel=2,
            )
        dl = self.learn.dl
        if _is_plain_tfmd_dl(dl):
            batch = bool(batch_size_fixers(dl.after_batch))
            item = self.resize_items and bool(item_size_fixers(dl.after_item))
            if batch or item:
                self._clone, self._batch_tfms, self._item_tfms = _clone_loader(dl, batch, item)
                self._item_base = [_tfm_size(t)[::-1] for t in self._item_tfms]  # (w, h) -> (h, w)
        final = self.final_size
        if final is None and self._batch_tfms:
            final = _tfm_size(self._batch_tfms[-1])
        if final is None and self._item_tfms and not self._batch_tfms:
            final = self._item_base[-1]
        if final is not None:
            self._set_final(final)

    def _set_final(self, final: Size) -> None:
        self._final = final
        self._initial = initial_pixels(self.initial_size, final, self.increase_by)

    def _target(self, epoch: int, it: int, n_iter: int) -> Size:
        """Return the scheduled size of iteration ``it`` of ``epoch`` (final and initial are known by now)."""
        p = _progress(self.schedule, epoch, it, self.learn.n_epoch, max(1, n_iter))
        return size_at(p, self._initial, self._final, self.start, self.finish, self.increase_by)

    def _prepare(self, epoch: int, it: int, n_iter: int) -> None:
        """Set the copied transforms so the next batch the loader yields has the scheduled size."""
        if self._final is None or not (self._batch_tfms or self._item_tfms):
            return
        size = self._target(epoch, it, n_iter)
        for t in self._batch_tfms:
            t.size = size
        if it == 0:  # items are only re-sized between epochs: workers hold a copy during one
            # The schedule never shrinks, so the epoch's last iteration has its largest size.
            largest = self._target(epoch, max(0, n_iter - 1), n_iter)
            scale = (largest[0] / self._final[0], largest[1] / self._final[1])
            for t, (h, w) in zip(self._item_tfms, self._item_base, strict=True):
                t.size = type(t.size)((max(1, round(w * scale[1])), max(1, round(h * scale[0]))))

    def before_train(self) -> None:
        """Hand ``learn.dl`` the per-fit copy with the first batch's size set."""
        if not self._started:
            self._start_fit()
        if not self._active:
            return
        if self._clone is not None and self.learn.dl is self.learn.dls.train:
            self._prepare(self.learn.epoch, 0, len(self._clone))
            self._epoch_dl = _EpochLoader(self.learn, self.learn.dl, self._clone)
            self.learn.dl = self._epoch_dl

    def before_batch(self) -> None:
        """Make the training batch the scheduled size (or the current size in validation)."""
        if not self._active:
            return
        if not self.learn.training:
            if self.resize_valid and self._current is not None:
                self._resize_batch(self._current)
            return
        if not self._checked:
            self._first_batch()
        size = self._target(self.learn.epoch, self.learn.iter, self.learn.n_iter)
        self._resize_batch(size)
        self._current = size
        self.sizes.append(tuple(self.learn.xb[0].shape[-2:]))
        if self.mix_alpha is not None:
            self._set_alphas(size)

    def after_batch(self) -> None:
        """Record the learning rate, set the copied transforms' size for the next batch, restore alphas."""
        self._restore_alphas()
        if not (self._active and self.learn.training):
            return
        self.lrs.append(float(self.learn.opt.hypers[-1]["lr"]))
        nxt = self.learn.iter + 1
        if nxt < self.learn.n_iter:
            self._prepare(self.learn.epoch, nxt, self.learn.n_iter)

    def after_cancel_batch(self) -> None:
        """Restore the mixing alphas set for the cancelled batch."""
        self._restore_alphas()

    def after_train(self) -> None:
        """Put ``learn.dl`` back if the epoch never started iterating (e.g. cancelled in ``before_train``)."""
        if self._epoch_dl is not None:
            self._epoch_dl.hand_back()
            self._epoch_dl = None

    after_cancel_train = after_train

    def _first_batch(self) -> None:
        self._checked = True
        x = self.learn.xb[0] if len(self.learn.xb) else None
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"ProgressiveResize needs 4-D image batches (N, C, H, W) as the first input, got {shape}")
        if self._final is None:
            self._set_final((int(x.shape[-2]), int(x.shape[-1])))
        if self.reserve_memory and self._target(self.learn.epoch, self.learn.iter, self.learn.n_iter) != self._final:
            self._reserve(x)

    def _resize_batch(self, size: Size) -> None:
        x = self.learn.xb[0]
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        if hw == size:
            return
        self.learn.xb = (_interpolate(x, size, self.mode), *self.learn.xb[1:])
        self.learn.yb = tuple(_resize_target(y, hw, size, self.mode) for y in self.learn.yb)

    def _reserve(self, x: torch.Tensor) -> None:
        """One full-size forward/backward so the peak memory is reserved; model state is put back."""
        model = self.learn.model
        saved = [b.detach().clone() for b in model.buffers()]
        grads = [p.grad for p in model.parameters()]
        try:
            full = x.new_zeros((x.shape[0], x.shape[1], *self._final))
            out = model(full)
            out = out[0] if isinstance(out, (tuple, list)) else out
            out.float().sum().backward()
        finally:
            with torch.no_grad():
                for b, s in zip(model.buffers(), saved, strict=True):
                    b.copy_(s)
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g

    # -- mixing ----------------------------------------------------------------------------------------

    def _mix_callbacks(self) -> list[Any]:
        """The mixing callbacks whose own ``alpha`` is used: RandomMix's children rather than RandomMix itself."""
        from .mixing import MixCallback

        def leaves(cb: Any) -> list[Any]:
            children = cb.__dict__.get("mixes")
            return [leaf for child in children for leaf in leaves(child)] if children is not None else [cb]

        return [leaf for cb in self.learn.cbs if isinstance(cb, MixCallback) for leaf in leaves(cb)]

    def _set_alphas(self, size: Size) -> None:
        low, high = self.mix_alpha  # type: ignore[misc]
        alpha = mix_alpha_at(size, self._initial, self._final, low, high)  # type: ignore[arg-type]
        for cb in self._mix_callbacks():
            self._saved_alphas.setdefault(id(cb), (cb, cb.alpha))
            cb.alpha = alpha

    def _restore_alphas(self) -> None:
        for cb, alpha in self._saved_alphas.values():
            cb.alpha = alpha
        self._saved_alphas.clear()

    # -- reporting -------------------------------------------------------------------------------------

    def plot_schedule(self, figsize: tuple[float, float] = (8, 3.5)) -> Any:
        """Plot the image size and the learning rate at every training iteration of the last training fit.

        Returns:
            The matplotlib figure.

        Raises:
            RuntimeError: No training iteration has been recorded yet.

        """
        if not self.sizes:
            raise RuntimeError(
                "ProgressiveResize.plot_schedule needs a fit first: no size has been recorded (lr_find, validate "
                "and get_preds record nothing, and a fit shorter than min_epochs trains at full size)"
            )
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=figsize)
        steps = range(len(self.sizes))
        ax.plot(steps, [h for h, _ in self.sizes], color="C0", label="height")
        if any(h != w for h, w in self.sizes):
            ax.plot(steps, [w for _, w in self.sizes], color="C0", linestyle="--", label="width")
        ax.set_xlabel("training iteration")
        ax.set_ylabel("image size (px)", color="C0")
        if self.lrs:
            ax2 = ax.twinx()
            ax2.plot(range(len(self.lrs)), self.lrs, color="C1")
            ax2.set_ylabel("learning rate", color="C1")
        ax.set_title("ProgressiveResize schedule")
        fig.tight_layout()
        return fig
