"""Pure tensor maths behind the mixing callbacks: λ, partners, boxes, Fourier masks and target mixing.

Everything here works on plain tensors, draws its randomness on the batch's own
device (or from an explicit generator) and never reads a value back to the
host, so the callbacks in :mod:`fastai_tricks.mixing` cost no
host-device synchronisation. The functions are testable without a Learner.

Conventions shared by every function:

- ``lam`` is a float32 tensor of shape ``(B,)``: the weight of each sample's
  *own* image and label, in ``[0, 1]``. ``1 - lam`` goes to its partner.
- ``perm`` is a long tensor of shape ``(B,)``: sample ``i`` is mixed with
  sample ``perm[i]``.
- A *paste mask* is a bool tensor of shape ``(n, H, W)`` with ``n`` equal to 1
  (one region for the whole batch) or ``B`` (one per sample); ``True`` marks the
  pixels taken from the partner. Its exact kept fraction is the λ of a box or
  mask variant.

References:
    Zhang et al. 2017, "mixup: Beyond Empirical Risk Minimization", arXiv 1710.09412.
    Yun et al. 2019, "CutMix", arXiv 1905.04899.
    Qin et al. 2020, "ResizeMix", arXiv 2012.11101.
    Harris et al. 2020, "FMix: Enhancing Mixed Sample Data Augmentation", arXiv 2002.12047.

"""

from __future__ import annotations

import random
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_fraction, check_positive

__all__ = [
    "check_spatial_batch",
    "MixResult",
    "box_masks",
    "cutmix",
    "fmix",
    "fmix_masks",
    "fourier_noise",
    "kept_fraction",
    "lerp_batch",
    "mix_losses",
    "mix_targets",
    "mixup",
    "one_hot",
    "paste",
    "resize_paste",
    "resizemix",
    "resizemix_geometry",
    "sample_boxes",
    "sample_lambda",
    "sample_permutation",
]


class MixResult(NamedTuple):
    """What a mixing function returns.

    Attributes:
        x: The mixed batch, same shape, dtype, device, memory format and tensor type as the input.
        perm: Long tensor ``(B,)``; sample ``i`` was mixed with sample ``perm[i]``.
        lam: Float32 tensor ``(B,)``; the weight of each sample's own image, in ``[0, 1]``.
        mask: Bool paste mask ``(n, H, W)`` (``True`` = partner pixel), or None for MixUp.

    """

    x: Tensor
    perm: Tensor
    lam: Tensor
    mask: Tensor | None


# --- random draws ----------------------------------------------------------------------------------


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is not None and generator.device.type != torch.device(device).type:
        raise ValueError(f"generator must live on the batch's device {device}, got a generator on {generator.device}")


def sample_lambda(
    n: int,
    alpha: float,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw ``n`` values of λ from Beta(α, α) on ``device``.

    The draw is the first coordinate of a two-class Dirichlet, which is exactly
    Beta(α, α) and, unlike the ratio of two gammas, stays finite for a tiny α
    (torch clamps the gamma draws away from zero).

    Args:
        n: How many values to draw.
        alpha: Concentration α > 0 (an int is accepted).
        device: Where to draw; defaults to the generator's device, else CPU.
        generator: Optional torch generator on ``device`` for reproducible draws.

    Returns:
        Float32 tensor of shape ``(n,)`` with values in ``[0, 1]``.

    """
    alpha = check_positive("alpha", alpha)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    _check_generator(generator, device)
    conc = torch.full((n, 2), alpha, dtype=torch.float32, device=device)
    # torch.distributions.Beta draws through the same kernel but cannot take a generator.
    lam = torch._sample_dirichlet(conc, generator=generator)[:, 0]
    return lam.clamp_(0.0, 1.0)


def sample_permutation(
    n: int, *, device: torch.device | str | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Return a random permutation of ``range(n)`` drawn on ``device`` (a partner for every sample)."""
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    _check_generator(generator, device)
    return torch.randperm(n, device=device, generator=generator)


# --- applying a mix to tensors ---------------------------------------------------------------------


def _bcast(lam: Tensor, like: Tensor) -> Tensor:
    """Reshape per-sample ``lam`` ``(B,)`` to broadcast over ``like`` ``(B, ...)``."""
    return lam.view(lam.shape[0], *([1] * (like.dim() - 1)))


def _keep_layout(out: Tensor, like: Tensor) -> Tensor:
    """Give ``out`` the memory format of ``like`` (gather and where may return contiguous tensors)."""
    if like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
        return out.contiguous(memory_format=torch.channels_last)
    return out


def lerp_batch(x: Tensor, perm: Tensor, lam: Tensor) -> Tensor:
    """Blend each sample with its partner: ``lam * x + (1 - lam) * x[perm]``.

    Args:
        x: Batch ``(B, ...)`` of any floating dtype.
        perm: Partner indices ``(B,)``.
        lam: Weights of the own sample ``(B,)`` (or ``(1,)`` for one weight per batch).

    Returns:
        A new tensor like ``x``; ``x`` itself is not modified.

    """
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor to be blended, got dtype {x.dtype}")
    weight = _bcast(lam.to(x.dtype), x)
    return _keep_layout(torch.lerp(x[perm], x, weight), x)


def paste(x: Tensor, perm: Tensor, mask: Tensor) -> Tensor:
    """Copy the partner's pixels where ``mask`` is True: ``where(mask, x[perm], x)``.

    Works for images ``(B, C, H, W)`` and for dense targets ``(B, H, W)`` of any
    dtype, so a segmentation mask gets exactly the same pixels as its image.

    Args:
        x: Batch ``(B, ..., H, W)``.
        perm: Partner indices ``(B,)``.
        mask: Bool paste mask ``(n, H, W)`` with ``n`` 1 or B.

    Returns:
        A new tensor like ``x``.

    """
    if mask.dim() != 3 or tuple(mask.shape[-2:]) != tuple(x.shape[-2:]):
        raise ValueError(f"mask must have shape (n, H, W) matching x {tuple(x.shape)}, got {tuple(mask.shape)}")
    m = mask.view(mask.shape[0], *([1] * (x.dim() - 3)), *mask.shape[-2:])
    return _keep_layout(torch.where(m, x[perm], x), x)


def kept_fraction(mask: Tensor) -> Tensor:
    """Exact fraction of pixels *not* pasted, per mask: ``1 - mask.mean((-2, -1))`` as float32 ``(n,)``."""
    return 1.0 - mask.flatten(1).float().mean(1)


# --- MixUp -----------------------------------------------------------------------------------------


def mixup(x: Tensor, alpha: float, *, generator: torch.Generator | None = None) -> MixResult:
    """MixUp with one λ per sample (Zhang et al. 2017, arXiv 1710.09412).

    Args:
        x: Floating batch ``(B, ...)``.
        alpha: Beta(α, α) concentration.
        generator: Optional generator on ``x``'s device.

    Returns:
        A :class:`MixResult` with ``mask=None``.

    """
    b = x.shape[0]
    perm = sample_permutation(b, device=x.device, generator=generator)
    lam = sample_lambda(b, alpha, device=x.device, generator=generator)
    return MixResult(lerp_batch(x, perm, lam), perm, lam, None)


# --- CutMix ----------------------------------------------------------------------------------------


def sample_boxes(n: int, height: int, width: int, lam: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """Draw CutMix boxes whose area is about ``1 - lam`` of the image (Yun et al. 2019, arXiv 1905.04899).

    Each box has sides ``round(H * sqrt(1 - lam))`` by ``round(W * sqrt(1 - lam))``,
    a centre drawn uniformly over the image and is clipped to the image, so the
    pasted area can be smaller than asked: use :func:`kept_fraction` of
    :func:`box_masks` for the exact λ.

    Args:
        n: Number of boxes.
        height: Image height H >= 1.
        width: Image width W >= 1.
        lam: Float tensor ``(n,)`` of target kept fractions, on the device to draw on.
        generator: Optional generator on ``lam``'s device.

    Returns:
        Long tensor ``(n, 4)`` of ``(top, bottom, left, right)`` with half-open
        ranges ``[top, bottom)`` and ``[left, right)``.

    """
    _check_generator(generator, lam.device)
    cut = torch.sqrt((1.0 - lam.float()).clamp(0.0, 1.0))
    cut_h = torch.round(cut * height).long()
    cut_w = torch.round(cut * width).long()
    centre = torch.rand(n, 2, device=lam.device, generator=generator)
    cy = (centre[:, 0] * height).long().clamp_(max=height - 1)
    cx = (centre[:, 1] * width).long().clamp_(max=width - 1)
    top, left = cy - cut_h // 2, cx - cut_w // 2
    bottom, right = top + cut_h, left + cut_w
    return torch.stack(
        [top.clamp(0, height), bottom.clamp(0, height), left.clamp(0, width), right.clamp(0, width)], dim=1
    )


def box_masks(boxes: Tensor, height: int, width: int) -> Tensor:
    """Turn ``(n, 4)`` boxes ``(top, bottom, left, right)`` into bool paste masks ``(n, H, W)``, without a loop."""
    rows = torch.arange(height, device=boxes.device).view(1, height, 1)
    cols = torch.arange(width, device=boxes.device).view(1, 1, width)
    b = boxes.view(-1, 4, 1, 1)
    return (rows >= b[:, 0]) & (rows < b[:, 1]) & (cols >= b[:, 2]) & (cols < b[:, 3])


def check_spatial_batch(x: Tensor, name: str = "x") -> tuple[int, int]:
    """Return ``(H, W)`` of a batch with spatial axes, ``(B, ..., H, W)``; raise ValueError naming the shape.

    Box and mask variants paste regions of ``H x W``: a ``(B, F)`` feature batch has no such plane, and taking
    ``B`` as the height would cut across samples.
    """
    if not isinstance(x, Tensor) or x.ndim < 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a batch of images (B, C, H, W) or maps (B, H, W), got shape {shape}")
    return int(x.shape[-2]), int(x.shape[-1])


def cutmix(x: Tensor, alpha: float, *, per_sample: bool = False, generator: torch.Generator | None = None) -> MixResult:
    """CutMix: paste a box of the partner image (Yun et al. 2019, arXiv 1905.04899).

    Args:
        x: Batch ``(B, ..., H, W)``.
        alpha: Beta(α, α) concentration for the box area.
        per_sample: One box per sample instead of one for the whole batch.
        generator: Optional generator on ``x``'s device.

    Returns:
        A :class:`MixResult` whose ``lam`` is the exact kept fraction ``1 - area / (H * W)``.

    """
    b, (h, w) = x.shape[0], check_spatial_batch(x)
    perm = sample_permutation(b, device=x.device, generator=generator)
    n = b if per_sample else 1
    target = sample_lambda(n, alpha, device=x.device, generator=generator)
    mask = box_masks(sample_boxes(n, h, w, target, generator=generator), h, w)
    return MixResult(paste(x, perm, mask), perm, kept_fraction(mask).expand(b), mask)


# --- FMix ------------------------------------------------------------------------------------------


def fourier_noise(
    n: int,
    height: int,
    width: int,
    decay_power: float = 3.0,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Low-frequency grey images: complex Gaussian noise scaled by ``1 / f**decay_power``, back to pixels.

    Follows Harris et al. 2020 (arXiv 2002.12047): frequencies below
    ``1 / max(H, W)`` are clamped to it so the DC term stays finite.

    Args:
        n: Number of images.
        height: H >= 1.
        width: W >= 1.
        decay_power: How fast high frequencies are damped; larger gives smoother blobs.
        device: Where to draw.
        generator: Optional generator on ``device``.

    Returns:
        Float32 tensor ``(n, H, W)``.

    """
    decay_power = check_positive("decay_power", decay_power)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    _check_generator(generator, device)
    fy = torch.fft.fftfreq(height, device=device).view(-1, 1)
    fx = torch.fft.rfftfreq(width, device=device).view(1, -1)
    freq = torch.sqrt(fy * fy + fx * fx).clamp_(min=1.0 / max(height, width))
    scale = freq.pow_(-decay_power)
    parts = torch.randn(2, n, height, width // 2 + 1, device=device, generator=generator) * scale
    return torch.fft.irfft2(torch.complex(parts[0], parts[1]), s=(height, width))


def fmix_masks(
    lam: Tensor, height: int, width: int, decay_power: float = 3.0, *, generator: torch.Generator | None = None
) -> Tensor:
    """Binary FMix masks: the ``round((1 - lam) * H * W)`` highest pixels of Fourier noise come from the partner.

    Args:
        lam: Float tensor ``(n,)`` of target kept fractions.
        height: H >= 1.
        width: W >= 1.
        decay_power: See :func:`fourier_noise`.
        generator: Optional generator on ``lam``'s device.

    Returns:
        Bool paste mask ``(n, H, W)``.

    """
    n = lam.shape[0]
    noise = fourier_noise(n, height, width, decay_power, device=lam.device, generator=generator).flatten(1)
    k = torch.round((1.0 - lam.float()) * (height * width)).long().view(n, 1)
    # The k-th largest value per row is the threshold; a gather keeps per-sample k vectorised.
    ordered = noise.sort(dim=1, descending=True).values
    thresh = ordered.gather(1, (k - 1).clamp(min=0))
    mask = (noise >= thresh) & (k > 0)
    return mask.view(n, height, width)


def fmix(
    x: Tensor,
    alpha: float,
    decay_power: float = 3.0,
    *,
    per_sample: bool = False,
    generator: torch.Generator | None = None,
) -> MixResult:
    """FMix: paste the partner through a low-frequency Fourier mask (Harris et al. 2020, arXiv 2002.12047).

    Args:
        x: Batch ``(B, ..., H, W)``.
        alpha: Beta(α, α) concentration for the mask area.
        decay_power: Smoothness of the mask, see :func:`fourier_noise`.
        per_sample: One mask per sample instead of one for the whole batch.
        generator: Optional generator on ``x``'s device.

    Returns:
        A :class:`MixResult` whose ``lam`` is the exact kept fraction of the mask.

    """
    b, (h, w) = x.shape[0], check_spatial_batch(x)
    perm = sample_permutation(b, device=x.device, generator=generator)
    n = b if per_sample else 1
    target = sample_lambda(n, alpha, device=x.device, generator=generator)
    mask = fmix_masks(target, h, w, decay_power, generator=generator)
    return MixResult(paste(x, perm, mask), perm, kept_fraction(mask).expand(b), mask)


# --- ResizeMix -------------------------------------------------------------------------------------


def resizemix_geometry(
    height: int,
    width: int,
    scale: tuple[float, float] = (0.1, 0.8),
    alpha: float = 1.0,
    *,
    rng: random.Random | None = None,
) -> tuple[int, int, int, int]:
    """Draw where and how large the partner's thumbnail is pasted (Qin et al. 2020, arXiv 2012.11101).

    The side ratio is ``tau = lo + (hi - lo) * Beta(alpha, alpha)``; ``alpha=1``
    gives the paper's uniform ``tau``. The geometry is drawn on the host because
    the resize needs Python sizes; no device value is read.

    Args:
        height: H >= 1.
        width: W >= 1.
        scale: ``(lo, hi)`` side ratios with ``0 < lo <= hi <= 1``.
        alpha: Beta concentration of the ratio between ``lo`` and ``hi``.
        rng: Host random generator (defaults to the module-level :mod:`random`).

    Returns:
        ``(top, left, patch_height, patch_width)`` in pixels; the patch fits inside the image.

    """
    lo, hi = _check_scale(scale)
    alpha = check_positive("alpha", alpha)
    r = rng if rng is not None else random
    tau = lo + (hi - lo) * r.betavariate(alpha, alpha)
    ph = min(height, max(1, round(tau * height)))
    pw = min(width, max(1, round(tau * width)))
    return r.randint(0, height - ph), r.randint(0, width - pw), ph, pw


def _check_scale(scale: tuple[float, float]) -> tuple[float, float]:
    try:
        lo, hi = scale
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a pair (lo, hi), got {scale!r}") from None
    lo = check_fraction("scale[0]", lo, low=0.0, low_inclusive=False)
    hi = check_fraction("scale[1]", hi, low=0.0, low_inclusive=False)
    if lo > hi:
        raise ValueError(f"scale must satisfy scale[0] <= scale[1], got {scale!r}")
    return lo, hi


def resize_paste(x: Tensor, perm: Tensor, geometry: tuple[int, int, int, int]) -> Tensor:
    """Paste each partner, shrunk to the geometry's patch size, into a copy of ``x``.

    Floating batches are resized bilinearly with antialiasing; integer batches
    (segmentation masks ``(B, H, W)``) by nearest neighbour, which picks the same
    source pixel grid so labels stay exact.

    Args:
        x: Batch ``(B, ..., H, W)``.
        perm: Partner indices ``(B,)``.
        geometry: ``(top, left, patch_height, patch_width)`` from :func:`resizemix_geometry`.

    Returns:
        A new tensor like ``x``.

    """
    top, left, ph, pw = geometry
    h, w = x.shape[-2:]
    partner = x[perm]
    if x.is_floating_point() and x.dim() == 4:
        src = partner if partner.dtype in (torch.float32, torch.float64) else partner.float()
        patch = F.interpolate(src, size=(ph, pw), mode="bilinear", align_corners=False, antialias=True)
        patch = patch.to(x.dtype)
    else:
        rows = (torch.arange(ph, device=x.device) * h) // ph
        cols = (torch.arange(pw, device=x.device) * w) // pw
        patch = partner[..., rows[:, None], cols[None, :]]
    out = x.clone(memory_format=torch.preserve_format)
    out[..., top : top + ph, left : left + pw] = patch
    return out


def resizemix(
    x: Tensor,
    scale: tuple[float, float] = (0.1, 0.8),
    alpha: float = 1.0,
    *,
    rng: random.Random | None = None,
    generator: torch.Generator | None = None,
    geometry: tuple[int, int, int, int] | None = None,
) -> MixResult:
    """ResizeMix: paste a shrunken copy of the whole partner (Qin et al. 2020, arXiv 2012.11101).

    Args:
        x: Batch ``(B, ..., H, W)``.
        scale: Range of the patch's side ratio.
        alpha: Beta concentration of the ratio inside ``scale``.
        rng: Host random generator for the geometry.
        generator: Optional torch generator for the pairing.
        geometry: A ``(top, left, height, width)`` from :func:`resizemix_geometry` to use
            instead of drawing one (so a caller can paste targets at the same place).

    Returns:
        A :class:`MixResult` with ``lam = 1 - patch area / (H * W)`` and the patch's paste mask.

    """
    b, (h, w) = x.shape[0], check_spatial_batch(x)
    if geometry is None:
        geometry = resizemix_geometry(h, w, scale, alpha, rng=rng)
    perm = sample_permutation(b, device=x.device, generator=generator)
    top, left, ph, pw = geometry
    # Compare against Python ints: no host-built tensor is copied to the device.
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    mask = (rows >= top) & (rows < top + ph) & (cols >= left) & (cols < left + pw)
    lam = torch.full((b,), 1.0 - ph * pw / (h * w), dtype=torch.float32, device=x.device)
    return MixResult(resize_paste(x, perm, geometry), perm, lam, mask)


# --- targets and losses ----------------------------------------------------------------------------


def one_hot(y: Tensor, n_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """One-hot encode integer class targets ``(B,)`` into ``(B, n_classes)`` of ``dtype``."""
    if y.is_floating_point():
        raise TypeError(f"y must hold integer class indices, got dtype {y.dtype}")
    return F.one_hot(y.long(), n_classes).to(dtype)


def mix_targets(y: Tensor, perm: Tensor, lam: Tensor) -> Tensor:
    """Mix float (one-hot, soft or multi-label) targets: ``lam * y + (1 - lam) * y[perm]``.

    Rows that sum to 1 still sum to 1, because the weights are convex.
    """
    if not y.is_floating_point():
        raise TypeError(f"mix_targets needs float targets (one-hot, soft or multi-label), got dtype {y.dtype}")
    return torch.lerp(y[perm], y, _bcast(lam.to(y.dtype), y))


def mix_losses(loss: Tensor, loss_partner: Tensor, lam: Tensor, reduction: str = "mean") -> Tensor:
    """Mix unreduced losses against the own and the partner's targets, then reduce.

    Args:
        loss: Unreduced loss against each sample's own target, ``(B,)`` or ``(B * k,)``.
        loss_partner: The same against the partner's target.
        lam: Weights of the own target ``(B,)``.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``, as the wrapped loss would reduce.

    Returns:
        The mixed loss, reduced as asked.

    """
    b = lam.shape[0]
    if loss.shape != loss_partner.shape:
        raise ValueError(f"loss and loss_partner must have the same shape, got {loss.shape} and {loss_partner.shape}")
    if loss.dim() == 0 or loss.numel() % b:
        raise ValueError(f"unreduced loss of shape {tuple(loss.shape)} cannot be split into {b} samples")
    flat, flat_p = loss.reshape(b, -1), loss_partner.reshape(b, -1)
    mixed = torch.lerp(flat_p, flat, lam.to(flat.dtype).view(b, 1)).view_as(loss)
    if reduction == "mean":
        return mixed.mean()
    if reduction == "sum":
        return mixed.sum()
    if reduction == "none":
        return mixed
    raise ValueError(f"reduction must be one of 'mean', 'sum', 'none', got {reduction!r}")
