"""Mixing callbacks for fastai: MixUp, CutMix, ManifoldMix, ResizeMix, FMix and RandomMix.

All of them derive from :class:`MixCallback`, which owns what they share: λ
from Beta(α, α), pairing by a random permutation, the per-batch probability
``p``, switching mixing off for the end of training, and mixing targets or
losses. Each variant only says how inputs are mixed and what λ means for it;
the maths lives in :mod:`fastai_tricks.mix_ops`.

Nothing is left to restore. Unlike fastai's ``MixHandler``, these callbacks
never swap ``learn.loss_func``: the mixed loss is computed in ``after_loss``
from the loss function the learner already has. ManifoldMix's hooks exist only
for the forward pass of one training batch, are removed by an always-called
hook on the model, and are removed again whenever the callback is detached (so
also when ``fit(cbs=...)`` unwinds after any exception).

The names fastai's ``MixHandler`` subclasses expose are here too: ``lam`` (λ of
the last training batch, per sample, on the batch's device) and ``yb1`` (the
partner targets of that batch). ``lam`` is a record that outlives the fit;
``yb1`` holds a batch of targets and is dropped when the fit ends. Like
fastai's, the callbacks mix ``lr_find``'s batches too (``mix_in_lr_find``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from fastai.callback.core import Callback
from fastai.layers import NoneReduce
from fastai.torch_core import TensorMask
from torch import Tensor, nn

from . import mix_ops
from ._checks import (
    check_fraction,
    check_non_negative_int,
    check_positive,
    check_positive_int,
    check_probabilities,
)
from ._fastai_utils import ReleaseOnDetach, is_gathering_preds, is_lr_finding, is_training_batch
from .data import IMAGENETTE_CLASSES

__all__ = [
    "MIX_IN_LR_FIND",
    "CutMix",
    "Drawn",
    "FMix",
    "ManifoldMix",
    "MixCallback",
    "MixUp",
    "RandomMix",
    "ResizeMix",
    "show_mix_batch",
]

Alpha = float | Callable[[float], float]


@dataclass
class _BatchMix:
    """What one mixed batch needs later on: partners, weights and how targets are handled."""

    perm: Tensor
    lam: Tensor
    target_kind: str  # 'loss' (mix per-sample losses), 'target' (targets already mixed) or 'dense' (pasted)
    source: MixCallback  # the variant that mixed the batch (a child of RandomMix, or the callback itself)


@dataclass
class Drawn:
    """What :meth:`MixCallback.draw` returns: the mixed input, the partners, λ, and how to paste dense targets.

    Attributes:
        x: The mixed batch, same shape and type as the input; None when the mix happens inside the model.
        perm: Long tensor ``(B,)``: sample ``i`` was mixed with sample ``perm[i]``.
        lam: Float32 tensor ``(B,)``: the weight of each sample's own image and target.
        paste_dense: For mask-pasting mixes, a function that pastes a segmentation target the same
            way; None when the mix cannot paste per-pixel targets.
    """

    x: Tensor | None
    perm: Tensor
    lam: Tensor
    paste_dense: Callable[[Tensor], Tensor] | None = None

    @classmethod
    def pasted(cls, res: mix_ops.MixResult) -> Drawn:
        """A mask-pasting mix (CutMix, FMix); dense targets are pasted through the same mask."""
        perm, mask = res.perm, res.mask
        return cls(res.x, perm, res.lam, lambda y: mix_ops.paste(y, perm, mask))


def _check_alpha(alpha: Any) -> Alpha:
    if callable(alpha):
        return alpha
    return check_positive("alpha", alpha)


def _retain_type(new: Tensor, old: Tensor) -> Tensor:
    """Keep fastai's tensor subclass (TensorImage, TensorMask...) and its metadata."""
    if type(new) is not type(old) and isinstance(old, Tensor):
        new = new.as_subclass(type(old))
    if hasattr(old, "__dict__") and old.__dict__:
        new.__dict__.update(old.__dict__)
    return new


def _is_dense(x: Tensor, y: Tensor) -> bool:
    """Whether ``y`` is a per-pixel target for image batch ``x`` (segmentation)."""
    if isinstance(y, TensorMask):
        return True
    return not y.is_floating_point() and y.dim() >= 3 and tuple(y.shape[-2:]) == tuple(x.shape[-2:])


#: Whether the mixing callbacks mix ``lr_find``'s batches by default (``mix_in_lr_find``): yes, as fastai's do.
#: Measured on real digits (``benchmarks/bench_lr_find_mix.py``, results in
#: ``benchmarks/results/lr_find_mix_digits.md``): the fits at the two suggestions tied within noise.
MIX_IN_LR_FIND = True


def _check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


class MixCallback(ReleaseOnDetach, Callback):
    """Base class of the mixing callbacks.

    Subclasses implement :meth:`draw`, which mixes one input batch and returns
    the partners and λ. The base class decides whether a batch is mixed, mixes
    the targets (float targets), pastes dense targets (segmentation) or mixes
    per-sample losses (integer targets with a ``y_int`` loss), and keeps the
    learner untouched.

    Args:
        alpha: Beta(α, α) concentration, a float > 0 (an int is accepted) or a
            callable of ``learn.pct_train`` returning one. Stays a settable
            attribute, validated on assignment, so that other callbacks (e.g.
            progressive resizing) can drive it.
        p: Probability that a training batch is mixed at all.
        off_pct: Fraction of training, at its end, during which nothing is mixed.
        off_epochs: Number of final epochs during which nothing is mixed (timm's
            ``mixup_off_epoch`` counted from the end).
        mix_in_lr_find: Mix ``lr_find``'s batches too (with probability ``p``;
            ``off_pct`` and ``off_epochs`` count training epochs and do not apply
            there), as fastai's ``MixUp`` and ``CutMix`` do. ``lr_find`` prints
            one line saying which. The default was measured on scikit-learn's
            real digits (half-width xresnet18 at 32 px, ``lr_find`` valley, then
            6 epochs of ``fit_one_cycle`` at the suggestion, seeds 0-2): a mixed
            ``lr_find`` suggested higher rates (geometric mean 1.5e-3 against
            1.1e-3 for MixUp, 2.8e-3 against 1.1e-3 for CutMix), and the fits
            ended tied within noise, mixed minus unmixed +0.0 ± 0.0 points for
            MixUp and +1.2 ± 1.6 for CutMix. A tie keeps fastai's behaviour.

    The names fastai's mixing callbacks expose are here too: :attr:`lam` and :attr:`yb1`.

    Note:
        Only the first input ``learn.xb[0]`` is mixed. Validation, ``get_preds``,
        ``predict`` and TTA see unmixed batches, and ``lr_find`` does unless
        ``mix_in_lr_find``. A batch of one is left unmixed (λ = 1).

    """

    run_valid = False
    #: Whether the variant can paste segmentation masks exactly as it pastes pixels.
    supports_dense = False
    # Runtime state that must not be pickled with an exported Learner.
    _stateattrs = ("_batch", "_partners", "_yb1")

    def __init__(
        self,
        alpha: Alpha = 1.0,
        p: float = 1.0,
        *,
        off_pct: float = 0.0,
        off_epochs: int = 0,
        mix_in_lr_find: bool = MIX_IN_LR_FIND,
    ):
        self.alpha = alpha
        self.p = check_fraction("p", p)
        self.off_pct = check_fraction("off_pct", off_pct, high_inclusive=False)
        self.off_epochs = check_non_negative_int("off_epochs", off_epochs)
        self.mix_in_lr_find = _check_flag("mix_in_lr_find", mix_in_lr_find)
        self._batch: _BatchMix | None = None
        self.__dict__.update(_lam=None, _partners=None, _yb1=None)

    # --- the settable, validated alpha -----------------------------------------------------------

    @property
    def alpha(self) -> Alpha:
        """Beta(α, α) concentration: a float > 0, or a callable of ``pct_train``."""
        return self._alpha

    @alpha.setter
    def alpha(self, value: Alpha) -> None:
        self._alpha = _check_alpha(value)

    def current_alpha(self) -> float:
        """α for the current batch, calling ``alpha(pct_train)`` when it is a schedule."""
        if callable(self._alpha):
            pct = float(getattr(self.learn, "pct_train", 0.0) or 0.0) if self.learn is not None else 0.0
            return check_positive("alpha(pct_train)", self._alpha(pct))
        return self._alpha

    # --- fastai's names: lam and yb1 -------------------------------------------------------------

    @property
    def lam(self) -> Tensor | None:
        """λ of the last training batch, per sample: a float32 tensor ``(B,)`` on the batch's device.

        It is the weight of each sample's own image and target. Variants with one λ per batch (CutMix and
        FMix without ``per_sample``, ResizeMix, ManifoldMix) repeat it B times. A training batch left unmixed
        (``p``, ``off_pct``, a batch of one) has λ = 1. None before the first training batch. A record: kept
        through ``validate``, ``get_preds``, ``predict``, TTA and detaching, replaced by the next training
        batch (``lr_find``'s too when it mixes them).
        """
        return self.__dict__.get("_lam")

    @property
    def yb1(self) -> tuple[Any, ...] | None:
        """The partner targets of the last training batch of this fit, a tuple like ``learn.yb``; None if none.

        The targets before mixing, in partner order, computed when read. It holds a batch of targets (whole
        masks for segmentation), so it is dropped when the fit ends and when the callback is detached: read it
        during the fit, e.g. in a callback's ``after_loss`` or ``after_batch``.
        """
        partners = self.__dict__.get("_partners")
        if partners is None:
            return None
        perm, yb = partners
        if perm is None:  # not mixed: every sample is its own partner
            return yb
        cached = self.__dict__.get("_yb1")
        if cached is None:  # an index on the device: no host sync
            cached = tuple(y[perm] if isinstance(y, Tensor) else y for y in yb)
            self.__dict__["_yb1"] = cached
        return cached

    def _remember(self, lam: Tensor, perm: Tensor | None, yb: tuple) -> None:
        """Keep λ and what ``yb1`` is computed from; nothing is copied or read back."""
        self.__dict__.update(_lam=lam.detach(), _partners=(perm, tuple(yb)), _yb1=None)

    def _forget_partners(self) -> None:
        self.__dict__.update(_partners=None, _yb1=None)

    # `learn` is a property (ReleaseOnDetach), so detaching the callback always releases what it holds.

    @property
    def learn(self) -> Any:
        """The Learner this callback is attached to (None when detached)."""
        return ReleaseOnDetach.learn.fget(self)

    @learn.setter
    def learn(self, value: Any) -> None:
        if value is not self.__dict__.get("_learn"):
            self._forget_partners()  # a batch of targets; ``lam`` (B floats) is a record and stays
        ReleaseOnDetach.learn.fset(self, value)

    def _release(self) -> None:
        """Drop per-batch state; subclasses that hold hooks remove them here."""
        self.__dict__["_batch"] = None

    # --- what a variant implements ---------------------------------------------------------------

    def draw(self, x: Tensor) -> Drawn:
        """Mix the input batch ``x`` (B >= 2) and return a :class:`Drawn`: the mixed batch, the partners and λ.

        Each variant implements this, and a new mix only needs this method (docs/mixing.md, "Writing
        your own mix"). The base class decides whether the batch is mixed, mixes the targets or the
        losses, and records ``lam`` and ``yb1``. Draw on ``x``'s device and read nothing back to the host.
        """
        raise NotImplementedError

    # --- the training loop -----------------------------------------------------------------------

    def _in_scope(self) -> bool:
        """Whether this batch is one the callback may mix: a training batch, or ``lr_find``'s if ``mix_in_lr_find``."""
        learn = self.learn
        if is_training_batch(learn):
            return True
        return (
            self.mix_in_lr_find
            and bool(getattr(learn, "training", False))
            and is_lr_finding(learn)
            and not is_gathering_preds(learn)
        )

    def _mixing_now(self) -> bool:
        learn = self.learn
        if not self._in_scope():
            return False
        if not is_lr_finding(learn):  # lr_find's mock epochs are not the training's: no switching off
            if self.off_pct and float(getattr(learn, "pct_train", 0.0)) >= 1.0 - self.off_pct:
                return False
            n_epoch = getattr(learn, "n_epoch", None)
            if self.off_epochs and n_epoch is not None and getattr(learn, "epoch", 0) >= n_epoch - self.off_epochs:
                return False
        return self.p >= 1.0 or random.random() < self.p

    def lr_find_line(self) -> str:
        """The one line printed when ``lr_find`` runs with this callback attached: what it does to lr_find's batches."""
        name = type(self).__name__
        if self.mix_in_lr_find:
            return f"{name}: mixing lr_find's batches too, as in training (mix_in_lr_find=True)"
        return f"{name}: lr_find's batches are left unmixed (mix_in_lr_find=False)"

    def before_fit(self) -> None:
        """Forget per-batch state left from an earlier fit; under ``lr_find``, say whether it mixes."""
        self._release()
        learn = self.learn
        if is_lr_finding(learn) and any(cb is self for cb in getattr(learn, "cbs", ())):
            print(self.lr_find_line())

    def before_batch(self) -> None:
        """Mix ``learn.xb`` and, for float or dense targets, ``learn.yb``; remember λ for the loss."""
        self._release()
        if not self._in_scope():
            return
        mixing = self._mixing_now()
        xb, yb = self.learn.xb, self.learn.yb
        if not xb or not isinstance(xb[0], Tensor):
            return
        x = xb[0]
        if not mixing or x.shape[0] < 2:
            # A training batch left as it is: λ = 1 and every sample is its own partner.
            self._remember(torch.ones(x.shape[0], device=x.device), None, yb)
            return
        kind = self._target_kind(x, yb)
        if kind == "dense" and not self._can_paste_dense():
            raise ValueError(
                f"{type(self).__name__} cannot mix segmentation targets (TensorMask): blending or hidden-layer "
                "mixing has no per-pixel label. Use CutMix, ResizeMix or FMix for segmentation."
            )
        source, drawn = self._draw_for_batch(x)
        if drawn.x is not None:
            self.learn.xb = (_retain_type(drawn.x, x), *xb[1:])
        if kind == "target":
            self.learn.yb = tuple(_retain_type(mix_ops.mix_targets(y, drawn.perm, drawn.lam), y) for y in yb)
        elif kind == "dense":
            if drawn.paste_dense is None:  # pragma: no cover - guarded by _can_paste_dense
                raise ValueError(f"{type(source).__name__} cannot paste dense targets")
            self.learn.yb = tuple(_retain_type(drawn.paste_dense(y), y) for y in yb)
        self.__dict__["_batch"] = _BatchMix(drawn.perm, drawn.lam, kind, source)
        self._remember(drawn.lam, drawn.perm, yb)

    def _draw_for_batch(self, x: Tensor) -> tuple[MixCallback, Drawn]:
        return self, self.draw(x)

    def _can_paste_dense(self) -> bool:
        return self.supports_dense

    def _target_kind(self, x: Tensor, yb: tuple) -> str:
        if not yb:
            raise ValueError(f"{type(self).__name__} needs targets to mix, but the batch has none")
        if all(isinstance(y, Tensor) and _is_dense(x, y) for y in yb):
            return "dense"
        if all(isinstance(y, Tensor) and y.is_floating_point() for y in yb):
            return "target"
        if all(isinstance(y, Tensor) and not y.is_floating_point() and y.dim() == 1 for y in yb):
            lf = self.learn.loss_func
            if not getattr(lf, "y_int", False):
                raise ValueError(
                    f"{type(self).__name__} mixes integer class targets by mixing per-sample losses, which needs a "
                    f"loss with y_int=True that accepts reduction='none', but loss_func {lf!r} has no y_int. "
                    "Fix: use CrossEntropyLossFlat or LabelSmoothingCrossEntropy, set loss_func.y_int = True if it "
                    "supports reduction='none', or give float one-hot targets."
                )
            return "loss"
        shapes = [(type(y).__name__, tuple(getattr(y, "shape", ())), getattr(y, "dtype", None)) for y in yb]
        raise ValueError(
            f"{type(self).__name__} cannot mix targets {shapes}: expected integer class targets (B,), float "
            "targets (B, ...) or segmentation masks (B, H, W) matching the image"
        )

    def after_pred(self) -> None:
        """Do nothing by default; variants that mix inside the model check their hooks here."""

    def after_loss(self) -> None:
        """Replace the loss by the λ-mix of per-sample losses against both targets (integer targets only)."""
        batch = self.__dict__.get("_batch")
        if batch is None or batch.target_kind != "loss" or not self.learn.training:
            return
        learn = self.learn
        lf = learn.loss_func
        reduction = getattr(lf, "reduction", "mean")
        partner_yb = self._partner_targets(batch.perm, learn.yb)
        # NoneReduce sets reduction='none' only inside the with-block and restores it on any exit.
        with NoneReduce(lf) as unreduced:
            own = unreduced(learn.pred, *learn.yb)
            partner = unreduced(learn.pred, *partner_yb)
        loss = mix_ops.mix_losses(own, partner, batch.lam, reduction)
        learn.loss_grad = loss
        learn.loss = loss.detach().clone()

    def _partner_targets(self, perm: Tensor, yb: tuple) -> tuple:
        """``yb`` in partner order; the same tensors as ``yb1`` (computed once) when ``yb`` is the batch's."""
        partners = self.__dict__.get("_partners")
        if partners is not None and partners[0] is perm and len(partners[1]) == len(yb):
            if all(a is b for a, b in zip(partners[1], yb, strict=True)):
                return self.yb1  # type: ignore[return-value]
        return tuple(y[perm] for y in yb)

    def after_batch(self) -> None:
        """Forget the batch's mixing state (``lam`` and ``yb1`` stay until the next training batch)."""
        self._release()

    def after_cancel_batch(self) -> None:
        """Forget the batch's mixing state."""
        self._release()

    def after_fit(self) -> None:
        """Forget everything held during fit but the record ``lam``: ``yb1`` goes, with its batch of targets."""
        self._release()
        self._forget_partners()

    def after_cancel_fit(self) -> None:
        """Forget everything held during fit but the record ``lam``."""
        self._release()
        self._forget_partners()


class MixUp(MixCallback):
    """MixUp: blend every image with a partner, one λ per sample.

    Zhang et al. 2017, "mixup: Beyond Empirical Risk Minimization", arXiv 1710.09412.
    λ is the weight of each sample's own image and target.

    Args:
        alpha: Beta(α, α) concentration (float, int or callable of ``pct_train``).
        p: Probability a training batch is mixed.
        off_pct: Final fraction of training without mixing.
        off_epochs: Final number of epochs without mixing.
        mix_in_lr_find: Mix ``lr_find``'s batches too (see :class:`MixCallback`).

    """

    def __init__(
        self,
        alpha: Alpha = 0.4,
        p: float = 1.0,
        *,
        off_pct: float = 0.0,
        off_epochs: int = 0,
        mix_in_lr_find: bool = MIX_IN_LR_FIND,
    ):
        super().__init__(alpha, p, off_pct=off_pct, off_epochs=off_epochs, mix_in_lr_find=mix_in_lr_find)

    def draw(self, x: Tensor) -> Drawn:
        """Blend ``x`` with a permutation of itself, λ per sample."""
        res = mix_ops.mixup(x, self.current_alpha())
        return Drawn(res.x, res.perm, res.lam)


class CutMix(MixCallback):
    """CutMix: paste a box cut from the partner image.

    Yun et al. 2019, "CutMix: Regularization Strategy to Train Strong Classifiers
    with Localizable Features", arXiv 1905.04899. λ is corrected to the exact
    kept fraction ``1 - area / (H * W)`` after the box is clipped to the image.
    Segmentation masks are pasted with the same box.

    Args:
        alpha: Beta(α, α) concentration of the box's target area.
        per_sample: Draw one box per sample (vectorised) instead of one per batch.
        p: Probability a training batch is mixed.
        off_pct: Final fraction of training without mixing.
        off_epochs: Final number of epochs without mixing.
        mix_in_lr_find: Mix ``lr_find``'s batches too (see :class:`MixCallback`).

    """

    supports_dense = True

    def __init__(
        self,
        alpha: Alpha = 1.0,
        per_sample: bool = False,
        p: float = 1.0,
        *,
        off_pct: float = 0.0,
        off_epochs: int = 0,
        mix_in_lr_find: bool = MIX_IN_LR_FIND,
    ):
        super().__init__(alpha, p, off_pct=off_pct, off_epochs=off_epochs, mix_in_lr_find=mix_in_lr_find)
        self.per_sample = bool(per_sample)

    def draw(self, x: Tensor) -> Drawn:
        """Paste one box per batch (or per sample) from the partners."""
        return Drawn.pasted(mix_ops.cutmix(x, self.current_alpha(), per_sample=self.per_sample))


class FMix(MixCallback):
    """FMix: paste the partner through a binary mask made from low-frequency Fourier noise.

    Harris et al. 2020, "FMix: Enhancing Mixed Sample Data Augmentation",
    arXiv 2002.12047. λ is the exact kept fraction of the mask. Segmentation
    masks are pasted through the same mask.

    Args:
        alpha: Beta(α, α) concentration of the mask's target area.
        decay_power: Spectral decay; larger values give smoother, blobbier masks.
        per_sample: One mask per sample instead of one per batch (costs a sort per sample).
        p: Probability a training batch is mixed.
        off_pct: Final fraction of training without mixing.
        off_epochs: Final number of epochs without mixing.
        mix_in_lr_find: Mix ``lr_find``'s batches too (see :class:`MixCallback`).

    """

    supports_dense = True

    def __init__(
        self,
        alpha: Alpha = 1.0,
        decay_power: float = 3.0,
        per_sample: bool = False,
        p: float = 1.0,
        *,
        off_pct: float = 0.0,
        off_epochs: int = 0,
        mix_in_lr_find: bool = MIX_IN_LR_FIND,
    ):
        super().__init__(alpha, p, off_pct=off_pct, off_epochs=off_epochs, mix_in_lr_find=mix_in_lr_find)
        self.decay_power = check_positive("decay_power", decay_power)
        self.per_sample = bool(per_sample)

    def draw(self, x: Tensor) -> Drawn:
        """Paste through a Fourier mask drawn on ``x``'s device."""
        return Drawn.pasted(mix_ops.fmix(x, self.current_alpha(), self.decay_power, per_sample=self.per_sample))


class ResizeMix(MixCallback):
    """ResizeMix: paste a shrunken copy of the whole partner image.

    Qin et al. 2020, "ResizeMix: Mixing Data with Preserved Object Information
    and True Labels", arXiv 2012.11101. The patch's side ratio is drawn in
    ``scale`` (uniformly for ``alpha=1``, the paper's choice) and
    ``λ = 1 - patch area / (H * W)``. Segmentation masks are resized by nearest
    neighbour and pasted at the same place.

    Args:
        scale: ``(lo, hi)`` range of the patch's side ratio, ``0 < lo <= hi <= 1``.
        alpha: Beta(α, α) concentration of the ratio inside ``scale``.
        p: Probability a training batch is mixed.
        off_pct: Final fraction of training without mixing.
        off_epochs: Final number of epochs without mixing.
        mix_in_lr_find: Mix ``lr_find``'s batches too (see :class:`MixCallback`).

    """

    supports_dense = True

    def __init__(
        self,
        scale: tuple[float, float] = (0.1, 0.8),
        alpha: Alpha = 1.0,
        p: float = 1.0,
        *,
        off_pct: float = 0.0,
        off_epochs: int = 0,
        mix_in_lr_find: bool = MIX_IN_LR_FIND,
    ):
        super().__init__(alpha, p, off_pct=off_pct, off_epochs=off_epochs, mix_in_lr_find=mix_in_lr_find)
        self.scale = mix_ops._check_scale(scale)

    def draw(self, x: Tensor) -> Drawn:
        """Paste the partners, resized, at one place drawn for the batch."""
        h, w = mix_ops.check_spatial_batch(x)
        geometry = mix_ops.resizemix_geometry(h, w, self.scale, self.current_alpha())
        res = mix_ops.resizemix(x, geometry=geometry)
        perm = res.perm
        return Drawn(res.x, perm, res.lam, lambda y: mix_ops.resize_paste(y, perm, geometry))


# --- ManifoldMix -----------------------------------------------------------------------------------

_RESIDUAL_BLOCKS = ("ResBlock", "BasicBlock", "Bottleneck")


def find_residual_stages(model: nn.Module) -> list[nn.Module]:
    """Find the top-level residual stages of fastai xresnet, torchvision resnet and timm models.

    A timm model lists its stages in ``feature_info``; its stem (reduction < 4)
    is skipped. Otherwise a stage is a container whose children are all residual
    blocks (fastai ``ResBlock``, torchvision ``BasicBlock``/``Bottleneck``), not
    nested in another such stage.

    Args:
        model: The model to search.

    Returns:
        The stage modules in forward order (empty if none is recognised).

    """
    for module in model.modules():
        info = getattr(module, "feature_info", None)
        if isinstance(info, (list, tuple)) and info and all(isinstance(i, dict) and "module" in i for i in info):
            stages = [module.get_submodule(i["module"]) for i in info if i.get("reduction", 4) >= 4]
            if stages:
                return stages
    stages: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        children = list(module.children())
        if children and all(type(c).__name__ in _RESIDUAL_BLOCKS for c in children):
            stages.append(module)
            inside.update(id(m) for m in module.modules())
    return stages


class ManifoldMix(MixCallback):
    """Manifold Mixup: blend hidden activations at a layer drawn per batch.

    Verma et al. 2019, "Manifold Mixup: Better Representations by Interpolating
    Hidden States", arXiv 1806.05236. Each batch draws one λ and one candidate:
    the input, or the output of one residual stage (found automatically for
    fastai xresnet, torchvision resnet and timm models, or given as
    ``modules``). The hook that mixes a stage's output exists only during that
    batch's forward pass.

    Args:
        alpha: Beta(α, α) concentration (the paper uses 2.0).
        modules: Modules (or their dotted names in ``learn.model``) whose outputs
            may be mixed; the input is always a candidate too. None finds the
            residual stages.
        p: Probability a training batch is mixed.
        off_pct: Final fraction of training without mixing.
        off_epochs: Final number of epochs without mixing.
        mix_in_lr_find: Mix ``lr_find``'s batches too (see :class:`MixCallback`).

    """

    _stateattrs = (*MixCallback._stateattrs, "_handles", "_candidates", "_token", "_fired")

    def __init__(
        self,
        alpha: Alpha = 2.0,
        modules: Sequence[nn.Module | str] | None = None,
        p: float = 1.0,
        *,
        off_pct: float = 0.0,
        off_epochs: int = 0,
        mix_in_lr_find: bool = MIX_IN_LR_FIND,
    ):
        super().__init__(alpha, p, off_pct=off_pct, off_epochs=off_epochs, mix_in_lr_find=mix_in_lr_find)
        if modules is not None:
            modules = list(modules)
            if not modules:
                raise ValueError(f"modules must name at least one module, or be None to find stages, got {modules!r}")
            for m in modules:
                if not isinstance(m, (nn.Module, str)):
                    raise TypeError(f"modules must hold nn.Module or str names, got {m!r} ({type(m).__name__})")
        self.modules = modules
        self.__dict__.update(_handles=[], _candidates=None, _token=None, _fired=False)

    def _release(self) -> None:
        super()._release()
        for handle in self.__dict__.get("_handles", ()):
            handle.remove()
        self.__dict__.update(_handles=[], _token=None, _fired=False)

    def _resolve(self) -> list[nn.Module]:
        model = self.learn.model
        if self.modules is None:
            found = find_residual_stages(model)
            if not found:
                raise ValueError(
                    f"ManifoldMix found no residual stages in {type(model).__name__}; pass modules=[...] "
                    "(modules or dotted names of learn.model) to choose where to mix"
                )
            return found
        owned = {id(m) for m in model.modules()}
        out = []
        for m in self.modules:
            if isinstance(m, str):
                try:
                    mod = model.get_submodule(m)
                except AttributeError as err:
                    raise ValueError(
                        f"modules must name submodules of learn.model ({type(model).__name__}), got {m!r}: {err}"
                    ) from None
            else:
                mod = m
            if id(mod) not in owned:
                raise ValueError(f"modules must be submodules of learn.model, got {type(mod).__name__} {mod!r:.80}")
            out.append(mod)
        return out

    def before_fit(self) -> None:
        """Find the candidate layers of this fit's model."""
        super().before_fit()
        self.__dict__["_candidates"] = self._resolve()

    def after_fit(self) -> None:
        """Remove hooks and forget the candidate layers."""
        super().after_fit()
        self.__dict__["_candidates"] = None

    def _draw_pair(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Partners and one λ for the whole batch (one layer is mixed, so one λ, as in the paper)."""
        b = x.shape[0]
        perm = mix_ops.sample_permutation(b, device=x.device)
        return perm, mix_ops.sample_lambda(1, self.current_alpha(), device=x.device).expand(b)

    def draw(self, x: Tensor) -> Drawn:
        """Draw λ and a layer; mix the input now, or arm a one-shot hook on the chosen stage."""
        perm, lam = self._draw_pair(x)
        candidates = self.__dict__.get("_candidates")
        if candidates is None:
            candidates = self._resolve()
            self.__dict__["_candidates"] = candidates
        k = random.randrange(len(candidates) + 1)
        if k == 0:
            return Drawn(mix_ops.lerp_batch(x, perm, lam), perm, lam)
        self._arm(candidates[k - 1], perm, lam)
        return Drawn(None, perm, lam)

    def _arm(self, module: nn.Module, perm: Tensor, lam: Tensor) -> None:
        token = object()

        def mix_output(mod: nn.Module, args: Any, output: Any) -> Any:
            # Inert unless this exact training batch armed it; a stale hook removes itself.
            if self.__dict__.get("_token") is not token or self.learn is None or not self.learn.training:
                self._release()
                return None
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"ManifoldMix can only mix a tensor output, {type(mod).__name__} returned {type(output)}"
                )
            self.__dict__["_fired"] = True
            for handle in self.__dict__["_handles"][:1]:
                handle.remove()
            return mix_ops.lerp_batch(output, perm, lam)

        def release_after_forward(mod: nn.Module, args: Any, output: Any) -> None:
            for handle in self.__dict__.get("_handles", ()):
                handle.remove()

        self.__dict__["_token"] = token
        self.__dict__["_handles"] = [
            module.register_forward_hook(mix_output),
            # always_call: runs even when the forward raises, so no hook outlives the forward pass.
            self.learn.model.register_forward_hook(release_after_forward, always_call=True),
        ]

    def after_pred(self) -> None:
        """Check the armed layer really ran, then remove the hooks."""
        armed = self.__dict__.get("_token") is not None
        fired = self.__dict__.get("_fired", False)
        for handle in self.__dict__.get("_handles", ()):
            handle.remove()
        self.__dict__.update(_handles=[], _token=None)
        if armed and not fired:
            raise ValueError(
                "ManifoldMix armed a module that the model's forward never called; pass modules=[...] "
                "that are used in learn.model's forward"
            )


# --- RandomMix -------------------------------------------------------------------------------------


class RandomMix(MixCallback):
    """Pick one of several mixing callbacks per batch, like timm's ``switch_prob`` or fastxtend's CutMixUp.

    The children are never attached to the learner: only their mixing recipe
    (``draw`` and their own ``alpha``) is used. This callback's ``p``,
    ``off_pct``, ``off_epochs`` and ``mix_in_lr_find`` decide whether a batch
    is mixed; the children's are ignored. ``lam`` and ``yb1`` are this
    callback's, whichever child mixed the batch.

    Args:
        mixes: The mixing callbacks to choose from, e.g. ``[MixUp(), CutMix()]``.
        probs: Relative weights of the choices (normalised); None means equal.
        p: Probability a training batch is mixed.
        off_pct: Final fraction of training without mixing.
        off_epochs: Final number of epochs without mixing.
        mix_in_lr_find: Mix ``lr_find``'s batches too (see :class:`MixCallback`).

    Note:
        Assigning ``alpha`` assigns it to every child; reading it returns the
        value last assigned (None until then).

    """

    def __init__(
        self,
        mixes: Sequence[MixCallback],
        probs: Sequence[float] | None = None,
        p: float = 1.0,
        *,
        off_pct: float = 0.0,
        off_epochs: int = 0,
        mix_in_lr_find: bool = MIX_IN_LR_FIND,
    ):
        mixes = list(mixes)
        if not mixes:
            raise ValueError(f"mixes must hold at least one mixing callback, got {mixes!r}")
        for m in mixes:
            if not isinstance(m, MixCallback):
                raise TypeError(f"mixes must hold MixCallback instances, got {m!r} ({type(m).__name__})")
        probs = check_probabilities("probs", [1.0] * len(mixes) if probs is None else probs, len(mixes))
        # Before `mixes` exists the alpha setter assigns nothing, so the children keep their own alpha.
        super().__init__(1.0, p, off_pct=off_pct, off_epochs=off_epochs, mix_in_lr_find=mix_in_lr_find)
        self.mixes = mixes
        self.probs = probs

    @property
    def alpha(self) -> Alpha | None:
        """The α last assigned to every child (None until assigned)."""
        return self.__dict__.get("_alpha")

    @alpha.setter
    def alpha(self, value: Alpha) -> None:
        value = _check_alpha(value)
        for m in self.__dict__.get("mixes", ()):
            m.alpha = value
        self.__dict__["_alpha"] = value if "mixes" in self.__dict__ else None

    @MixCallback.learn.setter
    def learn(self, value: Any) -> None:  # noqa: D102 - documented on ReleaseOnDetach.learn
        MixCallback.learn.fset(self, value)
        for m in self.__dict__.get("mixes", ()):
            m.learn = value

    def _release(self) -> None:
        super()._release()
        for m in self.__dict__.get("mixes", ()):
            m._release()

    def _can_paste_dense(self) -> bool:
        return all(m._can_paste_dense() for m in self.mixes)

    def _choose(self) -> MixCallback:
        """One child, drawn by ``probs``."""
        return random.choices(self.mixes, weights=self.probs)[0]

    def _draw_for_batch(self, x: Tensor) -> tuple[MixCallback, Drawn]:
        child = self._choose()
        return child, child.draw(x)

    def draw(self, x: Tensor) -> Drawn:
        """Mix ``x`` with one child drawn by ``probs``."""
        return self._draw_for_batch(x)[1]

    def before_fit(self) -> None:
        """Prepare every child (e.g. ManifoldMix finds its layers)."""
        super().before_fit()
        for m in self.mixes:
            m.before_fit()

    def after_pred(self) -> None:
        """Let the child that mixed this batch check and remove its hooks."""
        batch = self.__dict__.get("_batch")
        if batch is not None and batch.source is not self:
            batch.source.after_pred()

    def after_fit(self) -> None:
        """Let every child forget what it held."""
        super().after_fit()
        for m in self.mixes:
            m.after_fit()


# --- pictures --------------------------------------------------------------------------------------


def show_mix_batch(dls: Any, mix: MixCallback, n: int = 9, *, figsize: tuple[float, float] | None = None) -> Any:
    """Draw a mixed training batch with each image's two labels and λ.

    Like the mixup figure of the fastbook, each title reads
    ``own label λ / partner label 1-λ``. ManifoldMix mixes hidden layers, so its
    picture shows input-level mixing with its λ. For segmentation data the
    pasted region is outlined by the mixed mask drawn over the image.

    Args:
        dls: fastai ``DataLoaders``; one training batch is drawn from ``dls.train``.
        mix: Any mixing callback of this module.
        n: Number of images to show (at most the batch size).
        figsize: Matplotlib figure size; chosen from ``n`` when None.

    Returns:
        The matplotlib figure.

    """
    import math

    import matplotlib.pyplot as plt

    if not isinstance(mix, MixCallback):
        raise TypeError(f"mix must be a MixCallback, got {mix!r} ({type(mix).__name__})")
    n = check_positive_int("n", n)
    batch = dls.train.one_batch()
    n_inp = getattr(dls.train, "n_inp", 1)
    x, yb = batch[0], batch[n_inp:]
    child = mix._choose() if isinstance(mix, RandomMix) else mix
    if x.shape[0] < 2:
        drawn = Drawn(x, torch.arange(x.shape[0], device=x.device), torch.ones(x.shape[0], device=x.device))
    elif isinstance(child, ManifoldMix):
        perm, lam = child._draw_pair(x)
        drawn = Drawn(mix_ops.lerp_batch(x, perm, lam), perm, lam)
    else:
        drawn = child.draw(x)
    y = yb[0] if yb else None
    dense = y is not None and _is_dense(x, y)
    y_mixed = _retain_type(drawn.paste_dense(y), y) if dense and drawn.paste_dense is not None else y
    decoded = dls.train.decode((_retain_type(drawn.x, x), y_mixed) if y is not None else (_retain_type(drawn.x, x),))
    images = decoded[0]
    vocab = getattr(dls, "vocab", None)

    def label(i: int) -> str:
        if y is None or dense:
            return ""
        yi = y[i]
        if yi.dim() == 0 and not yi.is_floating_point():
            idx = int(yi)
            name = str(vocab[idx]) if vocab is not None and idx < len(vocab) else str(idx)
            return IMAGENETTE_CLASSES.get(name, name)
        on = (yi > 0.5).nonzero().flatten().tolist()
        names = [str(vocab[j]) if vocab is not None and j < len(vocab) else str(j) for j in on]
        return ",".join(names) or "-"

    n = min(n, images.shape[0])
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=figsize or (3 * cols, 3 * rows), squeeze=False)
    perm, lam = drawn.perm.cpu().tolist(), drawn.lam.float().cpu().tolist()
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        img = images[i].float().cpu()
        img = img.permute(1, 2, 0) if img.dim() == 3 else img
        ax.imshow(img.clamp(0, 1).squeeze().numpy() if img.max() <= 1 else img.squeeze().numpy().astype("uint8"))
        if dense:
            ax.imshow(y_mixed[i].cpu().numpy(), alpha=0.4, cmap="tab10", interpolation="nearest")
            ax.set_title(f"λ={lam[i]:.2f}", fontsize=9)
        else:
            ax.set_title(f"{label(i)} {lam[i]:.2f} / {label(perm[i])} {1 - lam[i]:.2f}", fontsize=9)
    fig.suptitle(f"{type(child).__name__}", fontsize=11)
    fig.tight_layout()
    return fig
