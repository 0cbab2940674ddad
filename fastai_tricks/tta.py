"""Four-corner (five-crop and ten-crop) test-time augmentation that decodes each image once.

The fastbook chapter on training a state-of-the-art model ends with a research
exercise: crop an image to a square in each of its four corners, average the
predictions on those crops and on a center crop, and compare with fastai's own
``learn.tta``. This is that tool, built so that it costs as little as possible,
in three modules:

* :mod:`fastai_tricks.tta_views`, the view geometry: :func:`~fastai_tricks.four_corner_crops`
  and :func:`~fastai_tricks.expand_views` turn a batch into its views, and
  :func:`~fastai_tricks.view_boxes` is the one geometry that the views are cut with and
  pasted back with (:func:`~fastai_tricks.view_coverage` counts the views per pixel);
* :mod:`fastai_tricks.tta_merge`, the merging: :func:`~fastai_tricks.merge_views` turns
  per-view outputs back into one prediction per image, and :func:`~fastai_tricks.paste_views`
  does the same for dense (segmentation) outputs: it undoes each view's flip and resize, pastes
  it at its crop's place and merges every pixel over the views that contain it;
* this module, the fastai side: :class:`~fastai_tricks.FourCornerTTA` is a thin callback that
  expands a validation batch in ``before_batch`` and merges in ``after_pred``, so the DataLoader
  decodes and augments every image once, whatever the number of views, and the loss and
  metrics see the merged prediction; ``Learner.four_corner_tta`` is the drop-in for
  ``learn.tta``: the same arguments where they mean something here, and the same return.

Every public name of the two pure modules is importable from here too
(``from fastai_tricks.tta import merge_views``), and from ``fastai_tricks``.

Multi-crop evaluation goes back to Krizhevsky et al., "ImageNet Classification
with Deep Convolutional Neural Networks" (NeurIPS 2012, ten-crop) and Simonyan &
Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition"
(arXiv:1409.1556); the exercise is from Howard & Gugger, "Deep Learning for
Coders with fastai and PyTorch", chapter 7 (fastai: arXiv:2002.04688).
"""

from __future__ import annotations

from collections.abc import Sequence

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
from .tta_merge import MERGE_MODES, merge_views, paste_views
from .tta_views import (
    ViewBox,
    _auto_max_views,
    _check_batch,
    _check_crop,
    _chunk,
    expand_views,
    four_corner_crops,
    view_boxes,
    view_coverage,
    view_names,
)

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


# --- the loss's activation -------------------------------------------------------------------------


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
    mirror image of each if ``flip`` (``flip=True`` with the defaults is ten-crop). The views go
    through the model in chunks of at most ``max_views_per_batch`` views (by default chosen for
    the device, see below), and ``after_pred`` merges them back to one prediction per image with :func:`merge_views`.
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
        max_views_per_batch: At most this many views of a batch go through the model at once.
            None (auto) picks by the device of the batch. On a GPU (any device but the CPU): all
            views together, one forward pass of V times the batch, which fills the device; lower
            it when that does not fit in memory. On the CPU: one view per forward, so each forward
            has the batch size the DataLoader gives, unless that batch is under 2**16 input pixels
            (images x height x width): then as many views as fit in 2**16 (``predict``'s single
            64x64 image: all five at once, 3 times faster than five forwards of one). A CPU gains
            nothing from a batch five times larger and loses cache: in ``benchmarks/bench_tta.py
            --quick`` (64 px, AMD EPYC, 1 thread, CPU time, median of 3) five views as one batch
            took 1.09 times the ideal D + 5*M (one decode, five model passes) for xresnet18 and
            1.51 times for a small unet, one view per forward 0.95 and 1.01 times; fastai's
            ``learn.tta`` 1.19 and 1.17. Every value gives the same predictions (to float
            rounding, 1e-6); only the time and the memory change.

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
        # Set by Learner.four_corner_tta: also keep the plain (uncropped) prediction.
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
        """Raw outputs on the uncropped inputs of the last run, if ``keep_plain`` was set.

        They stay on the model's device (detached, and gathered across processes under DDP) until
        read here, so keeping them copies nothing to the host per batch.
        """
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
        max_views = self.max_views_per_batch
        chunks = _chunk(views, _auto_max_views(views) if max_views is None else max_views)
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
                self._plain.append(self.learn.to_detach(out[state["plain_idx"]], cpu=False))
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
            self._plain.append(self.learn.to_detach(per_view[state["plain_idx"]], cpu=False))
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


# --- the learn.tta drop-in -------------------------------------------------------------------------

#: ``learn.tta``'s arguments that mean nothing here, and what to use instead.
_REFUSED = {
    "n": (
        "four_corner_tta has no n: its views are fixed, not n passes of random training augmentation; they are the "
        "four corner crops and the center crop (flip=True adds their mirror images, ten-crop; full=True the whole "
        "image). Drop n, or use learn.tta(n={value!r}) for fastai's random passes"
    ),
    "item_tfms": (
        "four_corner_tta has no item_tfms: it cuts its views from the batches of the DataLoader as they are. Pass a "
        "DataLoader with those transforms instead, dl=learn.dls[ds_idx].new(after_item=item_tfms), which is what "
        "learn.tta(item_tfms=...) predicts on"
    ),
    "batch_tfms": (
        "four_corner_tta has no batch_tfms: it cuts its views from the batches of the DataLoader as they are. Pass a "
        "DataLoader with those transforms instead, dl=learn.dls[ds_idx].new(after_batch=batch_tfms), which is what "
        "learn.tta(batch_tfms=...) predicts on"
    ),
}


def four_corner_tta(
    self: Learner,
    ds_idx: int = 1,
    dl: DataLoader | None = None,
    n: int | None = None,
    item_tfms: object = None,
    batch_tfms: object = None,
    beta: float | None = 0.25,
    use_max: bool = False,
    *,
    crop: int | float | None = 0.875,
    flip: bool = False,
    center: bool = True,
    full: bool = False,
    resize: bool = True,
    merge: str | None = None,
    max_views_per_batch: int | None = None,
) -> tuple[Tensor | tuple[Tensor, Tensor], Tensor | None]:
    """Predictions on ``ds_idx`` or ``dl`` with :class:`~fastai_tricks.FourCornerTTA`, a drop-in for ``learn.tta``.

    ``learn.tta(...)`` becomes ``learn.four_corner_tta(...)`` with the same arguments and the same
    return, fastai's ``Learner.tta`` (fastai 2.8): ``aug_preds`` is the merged prediction over the
    views (fastai's: the mean over ``n`` randomly augmented passes), ``preds`` the plain prediction
    on the un-augmented input, and

    * ``beta`` a float: ``(torch.lerp(aug_preds, preds, beta), targs)``, that is
      ``(1 - beta) * aug_preds + beta * preds``;
    * ``beta=None``: ``((aug_preds, preds), targs)``, both predictions, unblended;
    * ``use_max=True``: the views are merged by their maximum (``merge='max'``) and
      ``(torch.maximum(aug_preds, preds), targs)`` is returned, whatever ``beta``, as fastai does
      (not renormalised).

    Predictions are probabilities after the loss's activation, as ``get_preds`` gives them;
    ``targs`` is None for an unlabelled ``test_dl``. One pass over the data: each image is decoded
    once, and its views and its plain input go through the model in the same step (with ``full=True`` the
    whole-image view is the plain prediction, so no extra view is needed). The plain predictions
    stay on the model's device until the pass ends, then go to the host in one copy: no batch
    waits for the device. A fastprogress bar runs over the batches when the learner has its
    ``ProgressCallback`` (hide it with ``learn.no_bar()``).

    The default ``beta=0.25`` is fastai's, kept because blending did not measurably lose on real
    data. On scikit-learn's handwritten digits (``fastai_tricks.make_digits``: 1,347 training and
    450 validation scans at 32 px), the recipe's model (``digits_config()``: xresnet18 from
    scratch, 4 epochs of ``fit_one_cycle``) was trained once per seed, seeds 0, 1 and 2, and each
    prediction scored on the validation set; mean ± std over the seeds, CPU (AMD EPYC, 1 thread),
    ``benchmarks/bench_tta_beta.py``:

    ======================================  ===============  ===============
    prediction                              accuracy         NLL
    ======================================  ===============  ===============
    plain (``get_preds``)                   0.9793 ± 0.0046  0.0602 ± 0.0054
    ``beta=None``: ``aug_preds``            0.9852 ± 0.0034  0.0616 ± 0.0030
    ``beta=0.25`` (the default)             0.9844 ± 0.0022  0.0579 ± 0.0031
    ``beta=0.5``                            0.9822 ± 0.0022  0.0557 ± 0.0040
    ``use_max=True``                        0.9800 ± 0.0038  0.0935 ± 0.0060
    fastai ``learn.tta()`` (n=4, 0.25)      0.9815 ± 0.0051  0.0625 ± 0.0029
    ======================================  ===============  ===============

    Against pure TTA, the blend gave up one image of 450 on one seed (-0.07 points on average) and
    lowered the mean negative log-likelihood of the true class (NLL) from 0.0616 to 0.0579.

    Args:
        self: The Learner (this is a method patched onto ``Learner``).
        ds_idx: Which of ``self.dls`` to predict on when ``dl`` is None (1: validation); it is read
            in order, with no batch dropped.
        dl: A DataLoader to predict on, e.g. ``learn.dls.test_dl(files)``; it is read in order.
        n: Refused (ValueError): the views are fixed. ``learn.tta``'s number of random passes.
        item_tfms: Refused (ValueError): pass ``dl=learn.dls[ds_idx].new(after_item=...)`` instead.
        batch_tfms: Refused (ValueError): pass ``dl=learn.dls[ds_idx].new(after_batch=...)`` instead.
        beta: Weight of the plain prediction in ``torch.lerp(aug_preds, preds, beta)``, in [0, 1];
            None returns both predictions.
        use_max: Merge the views by their maximum and return the elementwise maximum of the merged
            and the plain prediction.
        crop: Side of the square crops, as in :class:`~fastai_tricks.FourCornerTTA`.
        flip: Add the mirror image of every view (ten-crop with the defaults).
        center: Add the center crop to the four corners.
        full: Add the whole, uncropped input as a view.
        resize: Resize the crops back to the short side of the input.
        merge: How to merge the views, one of :data:`~fastai_tricks.MERGE_MODES`; None: ``'mean'``,
            or ``'max'`` with ``use_max``.
        max_views_per_batch: At most this many views of a batch go through the model at once;
            None (auto) picks by device, as in :class:`~fastai_tricks.FourCornerTTA`.

    Returns:
        ``(preds, targs)`` as above; with ``beta=None``, ``preds`` is the pair ``(aug_preds, preds)``.

    Raises:
        ValueError: ``n``, ``item_tfms`` or ``batch_tfms`` is given (the message says what to use
            instead), ``beta`` is outside [0, 1], ``use_max`` with a ``merge`` other than ``'max'``,
            or a view setting is invalid (see :class:`~fastai_tricks.FourCornerTTA`).
        TypeError: any other keyword (Python names ``four_corner_tta`` in the message).

    """
    for name, value in (("n", n), ("item_tfms", item_tfms), ("batch_tfms", batch_tfms)):
        if value is not None:
            raise ValueError(_REFUSED[name].format(value=value))
    if beta is not None:
        beta = check_fraction("beta", beta)
    if use_max:
        if merge not in (None, "max"):
            raise ValueError(
                f"four_corner_tta(use_max=True) merges the views by their maximum, but merge={merge!r} was also "
                "given; drop merge, or use_max"
            )
        merge = "max"
    cb = FourCornerTTA(
        crop=crop,
        flip=flip,
        center=center,
        full=full,
        resize=resize,
        merge="mean" if merge is None else merge,
        max_views_per_batch=max_views_per_batch,
    )
    cb.keep_plain = True
    if dl is None:
        dl = self.dls[ds_idx].new(shuffle=False, drop_last=False)
    elif isinstance(dl, DataLoader) and (dl.shuffle or dl.drop_last):
        # The plain predictions are gathered in batch order, so read the data in dataset order.
        dl = dl.new(shuffle=False, drop_last=False)
    attached = [c for c in self.cbs if isinstance(c, FourCornerTTA)]
    with self.removed_cbs(attached):
        aug_preds, targs = self.get_preds(dl=dl, cbs=cb)
    # The plain outputs stayed on the model's device during the pass: one copy here, none per batch.
    act = getcallable(self.loss_func, "activation")
    preds = act(cb.plain_preds.to(aug_preds.device).float()).to(aug_preds.dtype)
    if use_max:
        return torch.maximum(aug_preds, preds), targs
    if beta is None:
        return (aug_preds, preds), targs
    return torch.lerp(aug_preds, preds, beta), targs


# Learner.four_corner_tta. Not the @patch decorator, which would leave this module's name unbound (fastcore returns the
# name's previous value): as a plain function it is importable from here too, and the API reference documents it.
patch(four_corner_tta)
