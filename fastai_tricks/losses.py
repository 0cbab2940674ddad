"""Label smoothing: soft targets and a cross-entropy that accepts integer or soft targets.

Szegedy, Vanhoucke, Ioffe, Shlens and Wojna, "Rethinking the Inception
Architecture for Computer Vision", CVPR 2016, arXiv:1512.00567, section 7:
replace the one-hot target by ``(1 - eps) * one_hot + eps / K``, so the true
class gets ``1 - eps + eps/K`` and every other class ``eps/K``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_choice, check_fraction, check_positive_int

__all__ = ["LabelSmoothingCE", "smooth_targets"]

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


class LabelSmoothingCE(nn.Module):
    """Cross-entropy with label smoothing, for integer or soft targets (arXiv:1512.00567, section 7).

    The loss of one sample is ``(1 - eps) * CE(p, y) + eps * CE(p, uniform)``,
    which equals the cross-entropy against :func:`smooth_targets`. On integer
    targets it equals fastai's ``LabelSmoothingCrossEntropy``; soft targets
    (shape ``(N, K)``, rows summing to 1, as produced by mixing) are smoothed
    the same way.

    It fits fastai's loss protocol:

    * ``y_int = True``: targets are class indices, so the mixing callbacks
      (MixUp, CutMix) mix losses rather than targets;
    * ``reduction`` is a settable attribute; the mixing callbacks and
      ``get_preds(with_loss=True)`` set it to ``'none'`` through fastai's
      ``NoneReduce`` to get one loss per sample;
    * ``activation`` (softmax) and ``decodes`` (argmax) make ``predict``,
      ``get_preds(with_decoded=True)`` and ``ClassificationInterpretation`` work;
    * it pickles, so ``learn.export`` works (fastai#3532).

    Args:
        eps: Smoothing in [0, 1); 0 gives the plain cross-entropy.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    """

    y_int = True

    def __init__(self, eps: float = 0.1, reduction: str = "mean"):
        super().__init__()
        self.eps = check_fraction("eps", eps, high_inclusive=False)
        self.reduction = reduction

    @property
    def reduction(self) -> str:
        """How per-sample losses are reduced: ``'mean'``, ``'sum'`` or ``'none'``."""
        return self._reduction

    @reduction.setter
    def reduction(self, value: str) -> None:
        self._reduction = check_choice("reduction", value, _REDUCTIONS)

    def extra_repr(self) -> str:
        """Show the settings in ``repr``."""
        return f"eps={self.eps}, reduction={self.reduction!r}"

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        """Return the smoothed cross-entropy of logits ``output`` ``(N, K, ...)`` against ``target``.

        Args:
            output: Logits with the class axis at 1.
            target: Class indices of shape ``(N, ...)`` or soft targets of ``output``'s shape.

        Returns:
            The loss, reduced as ``self.reduction`` says.

        """
        if output.ndim < 2:
            raise ValueError(f"output must be logits of shape (N, K, ...), got {tuple(output.shape)}")
        n_classes = output.shape[1]
        log_p = F.log_softmax(output, dim=1)
        # Cross-entropy against the uniform distribution, times K: the smoothing term.
        uniform = -log_p.sum(dim=1)
        if target.ndim == output.ndim and target.is_floating_point():
            if target.shape != output.shape:
                raise ValueError(
                    f"soft targets must have the shape of output {tuple(output.shape)}, got {tuple(target.shape)}"
                )
            ce = -(target * log_p).sum(dim=1)
        elif target.ndim == output.ndim - 1:
            ce = F.nll_loss(log_p, target.long(), reduction="none")
        else:
            raise ValueError(
                f"target must be class indices of shape {(output.shape[0], *output.shape[2:])} or soft targets of "
                f"shape {tuple(output.shape)}, got {tuple(target.shape)}"
            )
        loss = (1 - self.eps) * ce + (self.eps / n_classes) * uniform
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss

    def activation(self, out: Tensor) -> Tensor:
        """Softmax over the class axis: the probabilities ``predict`` and ``get_preds`` report."""
        return F.softmax(out, dim=1)

    def decodes(self, out: Tensor) -> Tensor:
        """Argmax over the class axis: the predicted class index."""
        return out.argmax(dim=1)
