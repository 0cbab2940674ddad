"""Label smoothing: soft targets and a cross-entropy that accepts integer or soft targets.

Szegedy, Vanhoucke, Ioffe, Shlens and Wojna, "Rethinking the Inception
Architecture for Computer Vision", CVPR 2016, arXiv:1512.00567, section 7:
replace the one-hot target by ``(1 - eps) * one_hot + eps / K``, so the true
class gets ``1 - eps + eps/K`` and every other class ``eps/K``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from fastai.losses import BaseLoss
from torch import Tensor, nn

from ._checks import check_choice, check_fraction, check_positive_int

__all__ = ["LabelSmoothingCE", "LabelSmoothingCEFlat", "smooth_targets"]

_REDUCTIONS = ("mean", "sum", "none")


def smooth_targets(y: Tensor, n_classes: int, eps: float, *, dtype: torch.dtype | None = None) -> Tensor:
    """Return label-smoothed targets (Szegedy et al. 2016, arXiv:1512.00567, section 7).

    With ``K = n_classes`` the true class gets ``1 - eps + eps/K`` and every
    other class ``eps/K``; for ``K = 5`` and ``eps = 0.1`` that is 0.92 and
    0.02. Soft targets are smoothed the same way, ``(1 - eps) * y + eps/K``,
    which keeps rows summing to 1 and commutes with mixing (the smoothed mix of
    two labels is the mix of the smoothed labels).

    Args:
        y: Integer class indices of shape ``(N, ...)``, or soft targets (floats)
            of shape ``(N, K, ...)`` whose class axis is 1.
        n_classes: Number of classes ``K``.
        eps: Smoothing in [0, 1).
        dtype: Floating dtype of the result for integer ``y`` (default:
            torch's default dtype); soft targets keep their own dtype.

    Returns:
        Soft targets of shape ``(N, K, ...)`` on ``y``'s device.

    """
    check_positive_int("n_classes", n_classes)
    eps = check_fraction("eps", eps, high_inclusive=False)
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    off = eps / n_classes
    if y.is_floating_point():
        if y.ndim < 2 or y.shape[1] != n_classes:
            raise ValueError(
                f"soft targets y must have shape (N, n_classes={n_classes}, ...), got {tuple(y.shape)}; "
                "pass integer class indices for hard labels"
            )
        return y * (1 - eps) + off
    if y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"y must hold integer class indices or float soft targets, got dtype {y.dtype}")
    if y.ndim < 1:
        raise ValueError(f"y must have a batch axis, got a tensor of shape {tuple(y.shape)}")
    out = torch.full(
        (y.shape[0], n_classes, *y.shape[1:]), off, dtype=dtype or torch.get_default_dtype(), device=y.device
    )
    return out.scatter_(1, y.long().unsqueeze(1), 1 - eps + off)


def _check_int_axis(axis: Any) -> int:
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"axis must be an int (the class axis), got {axis!r} ({type(axis).__name__})")
    return axis


def _check_weight(weight: Any) -> Tensor | None:
    """Return ``weight`` after checking it is ``None`` or a valid 1-D tensor of class weights."""
    if weight is None:
        return None
    if not isinstance(weight, Tensor):
        raise TypeError(
            f"weight must be None or a 1-D float torch.Tensor with one entry per class, got {weight!r} "
            f"({type(weight).__name__})"
        )
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a float tensor, got dtype {weight.dtype}: {weight!r}")
    if weight.ndim != 1 or weight.numel() == 0:
        raise ValueError(
            f"weight must be a non-empty 1-D tensor with one entry per class, got shape {tuple(weight.shape)}: "
            f"{weight!r}"
        )
    if weight.device.type != "meta":
        if not bool(torch.isfinite(weight).all()):
            raise ValueError(f"weight must be finite, got {weight!r}")
        if bool((weight < 0).any()):
            raise ValueError(f"weight must be non-negative, got {weight!r}")
        if not bool((weight > 0).any()):
            raise ValueError(f"weight must have at least one positive entry, got {weight!r}")
    return weight.detach()


class LabelSmoothingCE(nn.Module):
    """Cross-entropy with label smoothing, for integer or soft targets (arXiv:1512.00567, section 7).

    A drop-in for fastai's ``LabelSmoothingCrossEntropy``: the same arguments in
    the same order (``eps``, ``weight``, ``reduction``), and on integer targets
    the same numbers for every ``eps``, ``weight`` and ``reduction``. On top of
    that it takes soft targets, any class ``axis``, and checks its arguments.

    The loss of one sample with logits ``z``, ``log p = log_softmax(z)`` over
    ``K`` classes and class weights ``w`` (all ones when ``weight`` is None) is::

        (1 - eps) * NLL + (eps / K) * U,   U = -sum_c log p_c

    where ``NLL = -w_y log p_y`` for a class index ``y``. Without weights this
    is the cross-entropy against :func:`smooth_targets`. As in fastai, the
    class weights act on the NLL part only; the smoothing part ``U`` is never
    weighted.

    Soft targets ``t`` (the shape of the logits, e.g. a mixed label
    ``lam * one_hot(a) + (1 - lam) * one_hot(b)``) are smoothed the same way,
    and each class's weight scales that class's share of the target::

        NLL = -sum_c w_c t_c log p_c

    so a one-hot soft target gives exactly the loss of its class index, and the
    per-sample loss is linear in the target: with ``'none'`` the loss of a
    mixed target is the mix of the losses of its parts, with or without weights.

    Reductions (for dense logits every position counts as a sample):

    * ``'none'``: the per-sample losses above;
    * ``'sum'``: their sum;
    * ``'mean'``: ``(1 - eps) * sum(NLL) / sum(s) + (eps / K) * mean(U)``,
      where a sample counts in the NLL's denominator with its weight
      ``s = w_y`` (``s = sum_c w_c t_c / sum_c t_c``, the average class weight
      under a soft target; 0 for an all-zero target). Without weights
      ``s = 1`` and this is the plain mean. With weights it is the weighted
      mean of ``F.nll_loss`` (and fastai), so it is not the mean of the
      ``'none'`` losses, and it is nan for a batch whose targets all have
      weight 0, as there.

    It fits fastai's loss protocol:

    * ``y_int = True``: targets are class indices, so the mixing callbacks
      (MixUp, CutMix) mix losses rather than targets;
    * ``reduction`` is a settable attribute; the mixing callbacks and
      ``get_preds(with_loss=True)`` set it to ``'none'`` through fastai's
      ``NoneReduce`` to get one loss per sample;
    * ``activation`` (softmax) and ``decodes`` (argmax) over the class axis make
      ``predict``, ``get_preds(with_decoded=True)`` and
      ``ClassificationInterpretation`` work;
    * it pickles, so ``learn.export`` works (fastai#3532).

    For fastai's flattening (``LabelSmoothingCrossEntropyFlat``) use
    :class:`LabelSmoothingCEFlat`.

    Args:
        eps: Smoothing in [0, 1); 0 gives the plain cross-entropy.
        weight: Optional class weights, a 1-D float tensor of ``K``
            non-negative finite entries (at least one positive). It is kept as
            a buffer, so ``.to(device)`` moves it; ``forward`` also casts it to
            the logits' device and dtype.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``. The old call
            ``LabelSmoothingCE(eps, 'sum')``, with the reduction second, still
            works but warns (DeprecationWarning); pass ``reduction=`` instead.
        axis: The class axis of the logits (and of soft targets), 1 by
            default; integer targets have the logits' shape without it. With
            ``'none'`` the result has that shape too.

    Raises:
        TypeError: If ``eps``, ``weight`` or ``axis`` has the wrong type.
        ValueError: If ``eps`` is outside [0, 1), ``weight`` is not 1-D or has
            negative, non-finite or only zero entries, or ``reduction`` is
            unknown. ``forward`` raises ValueError when ``weight``'s length is
            not the number of classes or the target's shape does not fit.

    Example:
        Uniform logits over 3 classes cost ``log 3`` whatever the weights:

        >>> import torch
        >>> loss = LabelSmoothingCE(0.1, torch.tensor([1.0, 2.0, 0.5]))
        >>> round(float(loss(torch.zeros(2, 3), torch.tensor([0, 1]))), 4)
        1.0986

    """

    y_int = True

    def __init__(
        self, eps: float = 0.1, weight: Tensor | None = None, reduction: str = "mean", *, axis: int = 1
    ) -> None:
        super().__init__()
        self.eps = check_fraction("eps", eps, high_inclusive=False)
        if isinstance(weight, str) and weight in _REDUCTIONS:
            # The signature before fastai's order was (eps, reduction): keep that call working.
            if reduction != "mean":
                raise TypeError(
                    f"LabelSmoothingCE got two reductions, {weight!r} in the place of weight and "
                    f"reduction={reduction!r}; the order is (eps, weight, reduction)"
                )
            warnings.warn(
                f"LabelSmoothingCE(eps, {weight!r}): the second argument is now weight, as in fastai's "
                f"LabelSmoothingCrossEntropy; pass reduction={weight!r} by keyword",
                DeprecationWarning,
                stacklevel=2,
            )
            weight, reduction = None, weight
        self.register_buffer("weight", _check_weight(weight))
        self.reduction = reduction
        self.axis = _check_int_axis(axis)

    def __setstate__(self, state: dict) -> None:
        """Restore a pickle, also one made before ``weight`` and ``axis`` existed."""
        super().__setstate__(state)
        self._buffers.setdefault("weight", None)
        self.__dict__.setdefault("axis", 1)

    @property
    def reduction(self) -> str:
        """How per-sample losses are reduced: ``'mean'``, ``'sum'`` or ``'none'``."""
        return self._reduction

    @reduction.setter
    def reduction(self, value: str) -> None:
        self._reduction = check_choice("reduction", value, _REDUCTIONS)

    def extra_repr(self) -> str:
        """Show the settings in ``repr``."""
        weight = None if self.weight is None else [round(float(w), 6) for w in self.weight]
        axis = "" if self.axis == 1 else f", axis={self.axis}"
        return f"eps={self.eps}, weight={weight}, reduction={self.reduction!r}{axis}"

    def _class_axis(self, output: Tensor) -> int:
        if output.ndim < 2:
            raise ValueError(f"output must be logits of shape (N, K, ...), got {tuple(output.shape)}")
        if not -output.ndim <= self.axis < output.ndim:
            raise ValueError(f"axis={self.axis} is out of range for output of shape {tuple(output.shape)}")
        return self.axis % output.ndim

    def _weight_for(self, log_p: Tensor) -> Tensor | None:
        if self.weight is None:
            return None
        if self.weight.numel() != log_p.shape[1]:
            raise ValueError(
                f"weight has {self.weight.numel()} entries but output has {log_p.shape[1]} classes on axis "
                f"{self.axis} (weight shape {tuple(self.weight.shape)}, output shape {tuple(log_p.shape)} "
                "with the class axis at 1)"
            )
        return self.weight.to(device=log_p.device, dtype=log_p.dtype)

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        """Return the smoothed cross-entropy of logits ``output`` against ``target``.

        Args:
            output: Logits ``(N, K, ...)``, or with the class axis ``K`` where ``axis`` says.
            target: Class indices (the shape of ``output`` without the class
                axis) or float soft targets (the shape of ``output``).

        Returns:
            The loss, reduced as ``self.reduction`` says.

        Raises:
            ValueError: If the shapes of ``output``, ``target`` and ``weight`` do not fit.

        """
        axis = self._class_axis(output)
        soft = target.ndim == output.ndim and target.is_floating_point()
        indices_shape = output.shape[:axis] + output.shape[axis + 1 :]
        if soft and target.shape != output.shape:
            raise ValueError(
                f"soft targets must have the shape of output {tuple(output.shape)}, got {tuple(target.shape)}"
            )
        if not soft and target.shape != indices_shape:
            raise ValueError(
                f"target must be class indices of shape {tuple(indices_shape)} or soft targets of "
                f"shape {tuple(output.shape)}, got {tuple(target.shape)}"
            )
        if axis != 1:
            output = output.movedim(axis, 1)
            if soft:
                target = target.movedim(axis, 1)
        n_classes = output.shape[1]
        log_p = F.log_softmax(output, dim=1)
        weight = self._weight_for(log_p)
        # Cross-entropy against the uniform distribution, times K: the smoothing term, never weighted.
        uniform = -log_p.sum(dim=1)
        if not soft:
            # With weights, 'mean' divides by the summed weights of the targets (F.nll_loss's and fastai's rule).
            ce = F.nll_loss(log_p, target.long(), weight=weight, reduction=self.reduction)
        else:
            # Each class's weight scales its share of the target.
            shares = target if weight is None else target * weight.view(-1, *[1] * (target.ndim - 2))
            ce = -(shares * log_p).sum(dim=1)
            if self.reduction == "sum":
                ce = ce.sum()
            elif self.reduction == "mean" and weight is None:
                ce = ce.mean()
            elif self.reduction == "mean":
                # A sample counts with the average class weight under its target (w[y] for a one-hot target).
                mass = target.sum(dim=1)
                counts = shares.sum(dim=1) / torch.where(mass == 0, torch.ones_like(mass), mass)
                ce = ce.sum() / counts.sum()
        if self.reduction == "mean":
            uniform = uniform.mean()
        elif self.reduction == "sum":
            uniform = uniform.sum()
        return (1 - self.eps) * ce + (self.eps / n_classes) * uniform

    def activation(self, out: Tensor) -> Tensor:
        """Softmax over the class axis: the probabilities ``predict`` and ``get_preds`` report."""
        return F.softmax(out, dim=self.axis)

    def decodes(self, out: Tensor) -> Tensor:
        """Argmax over the class axis: the predicted class index."""
        return out.argmax(dim=self.axis)


class LabelSmoothingCEFlat(BaseLoss):
    """:class:`LabelSmoothingCE` behind fastai's flattening: a drop-in for ``LabelSmoothingCrossEntropyFlat``.

    Like every fastai ``...Flat`` loss (a ``fastai.losses.BaseLoss``), it swaps
    the class ``axis`` of the logits with the last one (``transpose(axis, -1)``),
    flattens logits to ``(-1, K)`` and integer targets to ``(-1,)``, and applies
    :class:`LabelSmoothingCE`. On integer targets it gives the numbers of
    fastai's ``LabelSmoothingCrossEntropyFlat`` for every ``eps``, ``weight``,
    ``reduction`` and ``axis``, including the order of the flat ``'none'``
    losses (for ``(N, K, H, W)`` logits and ``axis=1`` that is the order of
    ``(N, W, H)``, as in fastai).

    Where fastai's flattening breaks this one does not: fastai swaps the same
    axes of the target, which fits the logits only up to four axes and fails
    for ``(N, K)`` logits with ``axis=1``; here integer targets are put in the
    order of the swapped logits, for any number of axes. Float soft targets of
    the logits' shape (from mixing) are swapped and flattened like the logits,
    keeping their class axis; see :class:`LabelSmoothingCE` for what
    ``weight`` means for them.

    ``activation`` (softmax) and ``decodes`` (argmax) work over ``axis``, as
    ``get_preds``, ``predict`` and ``ClassificationInterpretation`` need, and
    ``reduction`` reads and sets the wrapped loss's, as ``NoneReduce`` needs.
    ``eps`` and ``weight`` read the wrapped loss's; ``eps`` can be set.

    Args:
        eps: Smoothing in [0, 1).
        weight: Optional 1-D float tensor of class weights, as in :class:`LabelSmoothingCE`.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.
        axis: The class axis, -1 by default as in fastai; use 1 for ``(N, K, H, W)`` logits.
        flatten: Flatten logits and targets (fastai's ``BaseLoss`` option);
            with False only the class axis is moved to the end.

    Raises:
        TypeError: If ``axis`` is not an int or ``flatten`` not a bool, or as
            :class:`LabelSmoothingCE` does.
        ValueError: As :class:`LabelSmoothingCE` does.

    """

    y_int = True

    def __init__(
        self,
        eps: float = 0.1,
        weight: Tensor | None = None,
        reduction: str = "mean",
        *,
        axis: int = -1,
        flatten: bool = True,
    ) -> None:
        axis = _check_int_axis(axis)
        if not isinstance(flatten, bool):
            raise TypeError(f"flatten must be a bool, got {flatten!r} ({type(flatten).__name__})")
        super().__init__(LabelSmoothingCE, eps, weight, reduction, axis=axis, flatten=flatten)
        # BaseLoss moves the class axis to the end, where the wrapped loss must look for it. BaseLoss also copies
        # the wrapped loss's attributes onto this object (functools.update_wrapper), its axis included: set ours last.
        self.func.axis = -1
        self.axis = axis

    @property
    def eps(self) -> float:
        """The smoothing of the wrapped :class:`LabelSmoothingCE`."""
        return self.func.eps

    @eps.setter
    def eps(self, value: float) -> None:
        self.func.eps = check_fraction("eps", value, high_inclusive=False)

    @property
    def weight(self) -> Tensor | None:
        """The class weights of the wrapped :class:`LabelSmoothingCE` (None for none)."""
        return self.func.weight

    def __call__(self, inp: Tensor, targ: Tensor, **kwargs: Any) -> Tensor:
        """Return the loss of logits ``inp`` against class indices or soft targets ``targ``.

        Args:
            inp: Logits with ``K`` classes on ``axis``.
            targ: Class indices (the shape of ``inp`` without ``axis``) or
                float soft targets (the shape of ``inp``).
            **kwargs: Passed on to :meth:`LabelSmoothingCE.forward`.

        Returns:
            The loss, reduced as ``self.reduction`` says; flat for ``'none'``
            unless ``flatten`` is False.

        Raises:
            ValueError: If ``axis`` does not fit the logits or the shapes do not fit.

        """
        if not (isinstance(inp, Tensor) and isinstance(targ, Tensor)):
            return super().__call__(inp, targ, **kwargs)
        soft = targ.is_floating_point() and targ.ndim == inp.ndim
        if not (soft or targ.ndim == inp.ndim - 1):
            return super().__call__(inp, targ, **kwargs)  # fastai's own handling, errors included
        if not -inp.ndim <= self.axis < inp.ndim:
            raise ValueError(f"axis={self.axis} is out of range for output of shape {tuple(inp.shape)}")
        axis = self.axis % inp.ndim
        if soft:
            if targ.shape != inp.shape:
                raise ValueError(
                    f"soft targets must have the shape of output {tuple(inp.shape)}, got {tuple(targ.shape)}"
                )
            targ = targ.transpose(axis, -1).contiguous()
        else:
            # The logits' axes after swapping the class axis with the last one, less the class axis, named by
            # the target's axes: the target in the order of the moved logits, for any number of axes.
            order = list(range(inp.ndim))
            order[axis], order[-1] = order[-1], order[axis]
            targ = targ.permute([d - (d > axis) for d in order[:-1]]).contiguous()
            if targ.dtype in (torch.int8, torch.int16, torch.int32, torch.uint8):
                targ = targ.long()
        # Unlike fastai's BaseLoss this keeps the tensors' type and dtype (TensorBase(x) makes float64 float32).
        inp = inp.transpose(axis, -1).contiguous()
        if self.flatten:
            inp = inp.view(-1, inp.shape[-1])
            targ = targ.view(-1, targ.shape[-1]) if soft else targ.view(-1)
        return self.func(inp, targ, **kwargs)

    def activation(self, out: Tensor) -> Tensor:
        """Softmax over ``axis``: the probabilities ``predict`` and ``get_preds`` report."""
        return F.softmax(out, dim=self.axis)

    def decodes(self, out: Tensor) -> Tensor:
        """Argmax over ``axis``: the predicted class index."""
        return out.argmax(dim=self.axis)
