"""Normalization helpers: exact dataset statistics, statistics that travel with the model, and checks.

The maths is a set of small pure functions over :class:`Moments` (count, mean and
sum of squared deviations per channel, in float64) that merge with the parallel
algorithm of Chan, Golub and LeVeque, the pairwise form of Welford's update:

* Welford, "Note on a method for calculating corrected sums of squares and
  products", Technometrics 4(3), 1962.
* Chan, Golub and LeVeque, "Updating formulae and a pairwise algorithm for
  computing sample variances", Stanford CS-TR-79-773, 1979.

On top of them sit :func:`dataset_stats` (one streaming pass over a
DataLoader, a DataLoaders' training set or a list of image files),
:func:`ensure_normalized` (exactly one ``Normalize`` per loader),
:func:`model_stats` (the statistics a pretrained model expects) and
:func:`check_normalization` with its :class:`NormalizationCheck` callback.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders, Datasets, Pipeline, TfmdDL, TfmdLists
from fastai.data.transforms import Normalize
from fastai.torch_core import to_device
from fastai.vision.core import imagenet_stats
from fastcore.basics import camel2snake
from fastcore.foundation import L
from PIL import Image
from torch import Tensor, nn
from torchvision.models import WeightsEnum, get_model_weights

from ._checks import check_positive_int
from .distributed import gather_objects, rank_and_world

__all__ = [
    "Moments",
    "NormalizationCheck",
    "NormalizationReport",
    "NormalizationWarning",
    "batch_moments",
    "check_normalization",
    "dataset_stats",
    "ensure_normalized",
    "merge_moments",
    "model_stats",
    "moments_to_stats",
]

#: ``(mean, std)``, one float per channel.
Stats = tuple[tuple[float, ...], tuple[float, ...]]


class NormalizationWarning(UserWarning):
    """Issued by :func:`check_normalization` when the input pipeline and the model disagree."""


# --- pure moment maths ---------------------------------------------------------------------------


class Moments(NamedTuple):
    """Per-channel moments of a set of values, mergeable without revisiting the data.

    Attributes:
        count: Number of values per channel (pixels times images).
        mean: Per-channel mean, float64, shape ``(C,)``.
        m2: Per-channel sum of squared deviations from ``mean``, float64, shape ``(C,)``.

    """

    count: int
    mean: Tensor
    m2: Tensor


def batch_moments(x: Tensor) -> Moments:
    """Return the per-channel moments of a batch ``(N, C, ...)``, every axis but the channel axis pooled.

    Each image's channels are summed in the batch's own precision (float32,
    or float64 for float64 input; torch sums with cascade summation), centred
    on that image's own mean, and the ``N`` per-image moments are then merged
    in float64 with Chan et al.'s formula for equal-sized groups. This is
    several times faster than a float64 copy of the batch. Against a float64
    two-pass reference the error is near 1e-8 of the data's spread (the std)
    and never above 1e-6 of it.

    Args:
        x: A batch of shape ``(N, C, ...)`` (``(N, C, H, W)`` for images), any real dtype.

    Returns:
        The :class:`Moments` of ``x``, float64, on ``x``'s device.

    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"x must be a batch of shape (N, C, ...), got a tensor of shape {tuple(x.shape)}")
    n, n_channels = x.shape[:2]
    per_image = math.prod(x.shape[2:])  # explicit: a reshape to -1 is ambiguous for an empty batch
    # A plain tensor skips fastai's __torch_function__ type dispatch, which costs more than the maths here.
    work = x.detach().as_subclass(Tensor)
    work = work.to(torch.float64 if work.dtype == torch.float64 else torch.float32).reshape(n, n_channels, per_image)
    if n == 0 or n_channels == 0 or per_image == 0:
        zeros = torch.zeros(n_channels, dtype=torch.float64, device=x.device)
        return Moments(0, zeros, zeros.clone())
    # Shift by the first image's mean first: values then straddle 0 with the spread of the data, so float32
    # rounding in the sums below is relative to the spread, not to a large common offset (loc >> std), and the
    # subtraction itself is exact when the offset dominates (Sterbenz).
    centre = work[:1].mean(2, keepdim=True)
    shifted = work - centre
    image_mean = shifted.sum(2).to(torch.float64) / per_image  # (N, C), relative to the centre
    rounded = image_mean.to(work.dtype)
    # Sum of squares around the rounded image mean c, made exact: S(x-c)^2 = S(x-m)^2 + L(m-c)^2.
    image_m2 = shifted.sub_(rounded.unsqueeze(2)).square_().sum(2).to(torch.float64)
    image_m2 = (image_m2 - per_image * (image_mean - rounded.to(torch.float64)).square()).clamp_(min=0)
    image_mean = image_mean + centre.reshape(1, n_channels).to(torch.float64)
    mean = image_mean.mean(0)
    m2 = image_m2.sum(0) + per_image * (image_mean - mean).square().sum(0)
    return Moments(n * per_image, mean, m2)


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Merge the moments of two disjoint sets of values (Chan et al. 1979).

    The update is exact in real arithmetic and numerically stable: it never
    subtracts large sums of squares, only means.

    Args:
        a: Moments of the first set; its count may be 0.
        b: Moments of the second set; its count may be 0.

    Returns:
        The moments of the union.

    """
    if b.count == 0:
        return a
    if a.count == 0:
        return b
    if a.mean.shape != b.mean.shape:
        raise ValueError(
            f"cannot merge moments of {a.mean.shape[0]} and {b.mean.shape[0]} channels; every image must have "
            "the same number of channels"
        )
    n = a.count + b.count
    delta = b.mean.to(a.mean.device) - a.mean
    mean = a.mean + delta * (b.count / n)
    m2 = a.m2 + b.m2.to(a.m2.device) + delta.square() * (a.count * b.count / n)
    return Moments(n, mean, m2)


def moments_to_stats(m: Moments) -> Stats:
    """Return ``(mean, std)`` as tuples of floats; std is the population std (divides by the count).

    Args:
        m: Moments with a positive count.

    Returns:
        Per-channel mean and std.

    """
    if m.count <= 0:
        raise ValueError("cannot compute stats of an empty set of values (count=0)")
    std = torch.sqrt(m.m2 / m.count)
    return tuple(m.mean.tolist()), tuple(std.tolist())


# --- dataset statistics --------------------------------------------------------------------------


@contextmanager
def _preserved_rng() -> Iterator[None]:
    """Restore Python's, numpy's and torch's global RNG states on exit.

    The check draws an item and maybe a batch through random transforms; without this, adding
    :class:`NormalizationCheck` would change every random draw of the training that follows.
    """
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _shard(items: Any, rank: int, world: int) -> Any:
    """Every ``world``-th item from ``rank``: disjoint shards that cover ``items`` exactly once, no padding."""
    return items if world == 1 else items[slice(rank, None, world)]


def _deterministic_dl(dl: TfmdDL, rank: int = 0, world: int = 1) -> TfmdDL:
    """Copy ``dl`` into a loader that reads its whole dataset in order, as the validation set is read.

    The dataset is rebuilt with ``split_idx=1`` so train-only random transforms
    (``RandomResizedCrop``, ``aug_transforms``) run in their deterministic
    validation mode, and every ``Normalize`` is left out. ``dl`` is not changed.
    """
    ds = dl.dataset
    if isinstance(ds, Datasets):
        ds = Datasets(tls=[tl._new(_shard(tl.items, rank, world), split_idx=1) for tl in ds.tls], n_inp=ds.n_inp)
    elif isinstance(ds, TfmdLists):
        ds = ds._new(_shard(ds.items, rank, world), split_idx=1)
    elif world > 1:
        ds = _shard(ds, rank, world)
    new = dl.new(ds, shuffle=False, drop_last=False)
    new.after_batch = Pipeline([t for t in dl.after_batch.fs if not isinstance(t, Normalize)])
    return new


def _image_tensor(batch: Any, where: str) -> Tensor:
    """Return the image tensor of a batch, checked to be ``(N, C, H, W)`` floats."""
    x = batch[0] if isinstance(batch, (tuple, list)) and len(batch) else batch
    if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
        got = f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"source must yield image batches of floats shaped (N, C, H, W), but {where} holds {got}; "
            "convert images to floats first (fastai: IntToFloatTensor, torchvision: ToTensor)"
        )
    return x


def _files_batches(files: Sequence[Any], mode: str | None) -> Iterator[Tensor]:
    """Yield each image file as a ``(1, C, H, W)`` float tensor in [0, 1]; sizes may differ."""
    for f in files:
        with Image.open(f) as img:
            arr = np.array(img.convert(mode) if mode else img)
        if arr.dtype != np.uint8:
            raise ValueError(f"file {str(f)!r} has PIL mode {img.mode!r} (not 8-bit); pass mode='RGB' or mode='L'")
        t = torch.from_numpy(arr if arr.ndim == 3 else arr[..., None])
        yield t.permute(2, 0, 1).unsqueeze(0).to(torch.float64).div_(255)


def _safe_len(obj: Any) -> int | None:
    try:
        return len(obj)
    except TypeError:
        return None


def _gather_across_ranks(local: Moments, first_bad: int) -> tuple[Moments, list[tuple[int, int]]]:
    """Merge every rank's moments in rank order, so each rank gets bit-identical global moments.

    Floats travel as Python floats (exact float64); ``all_gather_object`` works on gloo and NCCL.
    The bad-batch markers travel too, so that every rank raises together instead of one rank raising
    and the others waiting forever in the next collective.
    """
    gathered = gather_objects((local.count, local.mean.tolist(), local.m2.tolist(), first_bad))
    total = Moments(0, torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64))
    bad = []
    for rank, (count, mean, m2, rank_bad) in enumerate(gathered):
        if rank_bad >= 0:
            bad.append((rank, rank_bad))
        part = Moments(count, torch.tensor(mean, dtype=torch.float64), torch.tensor(m2, dtype=torch.float64))
        total = merge_moments(total, part)
    return total, bad


def dataset_stats(
    source: Any,
    max_batches: int | None = None,
    *,
    mode: str | None = "RGB",
    progress: bool = True,
) -> Stats:
    """Compute the exact per-channel mean and std of a data set in one streaming pass.

    Each batch's moments are computed by :func:`batch_moments` (per-image sums
    around the image's own mean, combined in float64) and accumulated in float64
    with Chan et al.'s pairwise update, so every pixel counts once and equally: images of
    different sizes are weighted by their pixel count, not averaged per image
    (averaging per-image stds is the bug of torchvision#3657, which gives
    0.2023 instead of 0.2470 for CIFAR-10). The std is the population std.

    Args:
        source: One of

            * a fastai ``DataLoaders``: its training set is read in order, with
              train-only random transforms in their validation (deterministic)
              mode, no ``Normalize``, no shuffling and no dropped last batch;
            * a fastai ``TfmdDL``: read the same way;
            * any other iterable of batches (a plain ``torch.utils.data.DataLoader``,
              a list of tensors), read as it is; a batch is an image tensor ``(N, C, H, W)`` or a
              tuple whose first element is one;
            * a list or tuple of image files (``str`` or ``Path``), read with PIL
              and scaled to [0, 1]; sizes may differ.
        max_batches: Stop after this many batches (files count one each). None reads everything.
        mode: PIL mode image files are converted to (``'RGB'`` like fastai's
            ``PILImage``, ``'L'`` for grey); None keeps each file's own mode.
            Ignored for loaders.
        progress: Show a fastprogress bar (on rank 0 only).

    Returns:
        ``(mean, std)``, one float per channel each.

    Raises:
        ValueError: a batch is not a float image batch, the data holds NaN or
            inf (the message names the batch, or file), or the source is empty.
        TypeError: ``source`` is none of the above.

    Note:
        Under an initialised ``torch.distributed`` group, a ``DataLoaders``,
        ``TfmdDL`` or file list is split into disjoint shards, one per rank,
        and the moments of all ranks are merged, so every rank returns the same
        global statistics. A plain DataLoader is read as it is on each rank:
        give it a ``DistributedSampler`` to share the work (its padding repeats
        a few samples); reading the full set on every rank still gives the
        right statistics, since identical copies leave mean and std unchanged.

    """
    # Random transforms in validation mode, and fastai's DataLoader construction, still draw from the global
    # RNGs; restoring them keeps a seeded training run the same with or without this call.
    with _preserved_rng():
        return _dataset_stats(source, max_batches, mode, progress)


def _dataset_stats(source: Any, max_batches: int | None, mode: str | None, progress: bool) -> Stats:
    if max_batches is not None:
        check_positive_int("max_batches", max_batches)
    rank, world = rank_and_world()
    names: Sequence[Any] | None = None
    if isinstance(source, (list, tuple)) and not source:
        raise ValueError("source is an empty list; cannot compute statistics of no data")
    if isinstance(source, DataLoaders):
        train = source.train
        batches: Iterable[Any] = _deterministic_dl(train, rank, world) if isinstance(train, TfmdDL) else train
    elif isinstance(source, TfmdDL):
        batches = _deterministic_dl(source, rank, world)
    elif isinstance(source, (list, tuple)) and source and all(isinstance(f, (str, Path)) for f in source):
        names = _shard(list(source), rank, world)
        batches = _files_batches(names, mode)
    elif isinstance(source, (str, Path)):
        raise TypeError(
            f"source must be a DataLoader, DataLoaders or list of image files, got the path {str(source)!r}; "
            "pass get_image_files(path) for a folder"
        )
    elif isinstance(source, Iterable):
        batches = source
    else:
        raise TypeError(
            "source must be a DataLoader, DataLoaders, iterable of batches or non-empty list of image files, "
            f"got {source!r}"
        )

    total_len = len(names) if names is not None else _safe_len(batches)
    if max_batches is not None and total_len is not None:
        total_len = min(total_len, max_batches)
    iterator: Iterable[Any] = batches
    if progress and rank == 0 and total_len:
        from fastprogress.fastprogress import progress_bar

        iterator = progress_bar(batches, total=total_len, leave=False)

    def where(i: int, r: int = rank) -> str:
        if names is not None:
            return f"file {str(names[i])!r}"
        return f"batch {i}" + (f" of rank {r}" if world > 1 else "")

    acc: Moments | None = None
    # NaN/inf are spotted on the C-sized batch moments, not the whole batch: a non-finite pixel makes its
    # channel's mean or m2 non-finite. Off the CPU (or across ranks) the index of the first bad batch is kept on
    # the device and read once at the end, so the loop never waits for the accelerator.
    first_bad: Tensor | None = None
    defer = world > 1
    n_seen = 0
    for i, batch in enumerate(iterator):
        if max_batches is not None and i >= max_batches:
            break
        m = batch_moments(_image_tensor(batch, where(i)))
        ok = torch.isfinite(m.mean).all() & torch.isfinite(m.m2).all()
        if not defer and ok.device.type == "cpu":
            if not bool(ok):
                raise ValueError(f"source holds NaN or inf values in {where(i)}; fix the data or the transforms")
        else:
            if first_bad is None:
                first_bad = torch.full((), -1, dtype=torch.long, device=ok.device)
            first_bad = torch.where((first_bad < 0) & ~ok, torch.full_like(first_bad, i), first_bad)
        try:
            acc = m if acc is None else merge_moments(acc, m)
        except ValueError as err:
            raise ValueError(f"source changes channel count at {where(i)}: {err}") from None
        n_seen += 1

    bad_index = int(first_bad) if first_bad is not None else -1
    if acc is None:
        acc = Moments(0, torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64))
    if world > 1:
        acc, bad = _gather_across_ranks(acc, bad_index)
        if bad:
            r, i = bad[0]
            raise ValueError(f"source holds NaN or inf values in {where(i, r)}; fix the data or the transforms")
    elif bad_index >= 0:
        raise ValueError(f"source holds NaN or inf values in {where(bad_index)}; fix the data or the transforms")
    if acc.count == 0:
        raise ValueError(f"source yielded no data ({n_seen} batches read); cannot compute statistics")
    return moments_to_stats(acc)


# --- stats validation and Normalize plumbing -----------------------------------------------------


def _as_float_tuple(name: str, values: Any) -> tuple[float, ...]:
    if isinstance(values, Tensor):
        values = values.detach().flatten().tolist()
    elif isinstance(values, np.ndarray):
        values = values.flatten().tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a sequence of numbers, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)):
            raise TypeError(f"{name} must be a sequence of numbers, got {values!r}")
        if not math.isfinite(float(v)):
            raise ValueError(f"{name} must be finite, got {values!r}")
        out.append(float(v))
    if not out:
        raise ValueError(f"{name} must not be empty, got {values!r}")
    return tuple(out)


def _check_stats(stats: Any) -> Stats:
    """Validate ``(mean, std)``: same lengths, finite, std strictly positive."""
    if not isinstance(stats, (tuple, list)) or len(stats) != 2:
        raise ValueError(f"stats must be a pair (mean, std), got {stats!r}")
    mean, std = _as_float_tuple("mean", stats[0]), _as_float_tuple("std", stats[1])
    if len(mean) != len(std):
        raise ValueError(f"mean and std must have the same length, got mean={mean!r} and std={std!r}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be > 0 in every channel, got std={std!r}")
    return mean, std


def _normalizes(dl: Any) -> list[Normalize]:
    pipe = getattr(dl, "after_batch", None)
    return [t for t in getattr(pipe, "fs", []) if isinstance(t, Normalize)]


def _normalize_stats(tfm: Normalize) -> Stats | None:
    if tfm.mean is None or tfm.std is None:
        return None
    return tuple(torch.as_tensor(tfm.mean).flatten().tolist()), tuple(torch.as_tensor(tfm.std).flatten().tolist())


def _input_channels(dl: Any) -> int | None:
    """Channels of the images before any ``Normalize``, from a single item sent through the pipeline.

    One item, not ``one_batch``: it is cheap and spawns no worker. ``Normalize`` is left out because its
    broadcasting is exactly what turns 1-channel images into 3 (fastai#3820).
    """
    try:
        b = dl.do_batch([dl.do_item(0)])
        if getattr(dl, "device", None) is not None:
            b = to_device(b, dl.device)
        b = Pipeline([t for t in dl.after_batch.fs if not isinstance(t, Normalize)], split_idx=1)(b)
    except Exception:  # noqa: BLE001 - best effort: loaders without indexed items simply skip the check.
        return None
    x = b[0] if isinstance(b, (tuple, list)) else b
    return int(x.shape[1]) if isinstance(x, Tensor) and x.ndim == 4 else None


def ensure_normalized(dls: DataLoaders, stats: Any) -> DataLoaders:
    """Make every loader of ``dls`` end with exactly one ``Normalize`` holding ``stats``.

    An existing ``Normalize`` is replaced, never doubled (fastai#3370), so
    calling this twice is the same as calling it once. The statistics are
    checked against the images' channel count before anything changes
    (fastai#3820 silently turned 1-channel images into 3).

    Args:
        dls: fastai ``DataLoaders`` of images.
        stats: ``'imagenet'``; ``'dataset'`` (computed by :func:`dataset_stats`
            over the training set); a pair ``(mean, std)``; or anything
            :func:`model_stats` accepts (an arch, a model, a timm name, torchvision
            weights, a Learner), whose pretrained statistics are used.

    Returns:
        ``dls``, changed in place.

    """
    if not isinstance(dls, DataLoaders):
        raise TypeError(f"dls must be a fastai DataLoaders, got {type(dls).__name__}")
    if not all(isinstance(getattr(dl, "after_batch", None), Pipeline) for dl in dls.loaders):
        raise TypeError("dls must hold fastai loaders with an after_batch pipeline (TfmdDL), not plain torch loaders")
    if isinstance(stats, str) and stats == "imagenet":
        resolved: Any = imagenet_stats
    elif isinstance(stats, str) and stats == "dataset":
        resolved = dataset_stats(dls, progress=False)
    elif isinstance(stats, (tuple, list)):
        resolved = stats
    else:
        resolved = model_stats(stats)
        if resolved is None:
            raise ValueError(
                f"stats={stats!r} names no pretrained statistics (a model trained from scratch?); "
                "pass 'imagenet', 'dataset' or (mean, std)"
            )
    mean, std = _check_stats(resolved)
    with _preserved_rng():
        n_in = _input_channels(dls.train)
    if n_in is not None and n_in != len(mean):
        raise ValueError(f"stats have {len(mean)} channels but the images have {n_in}: mean={mean!r}, std={std!r}")
    tfm = Normalize.from_stats(mean, std, cuda=False)
    device = getattr(dls, "device", None)
    if device is not None:
        tfm.mean, tfm.std = tfm.mean.to(device), tfm.std.to(device)
    for dl in dls.loaders:
        pipe = dl.after_batch
        old = [t for t in pipe.fs if isinstance(t, Normalize)]
        # A fresh list, so a pipeline that shares its transform list with another loader is not changed twice.
        pipe.fs = L([t for t in pipe.fs if not isinstance(t, Normalize)] + [tfm]).sorted(key="order")
        # Pipeline also exposes each transform as an attribute (``pipe.normalize``); keep those current.
        for t in old:
            pipe.__dict__.pop(camel2snake(type(t).__name__), None)
        pipe.normalize = tfm
    return dls


# --- statistics a pretrained model expects -------------------------------------------------------


def _cfg_stats(cfg: Any) -> Stats | None:
    """Stats from a timm ``pretrained_cfg``/``default_cfg``: a mapping or a ``PretrainedCfg`` dataclass."""
    if cfg is None:
        return None
    get = cfg.get if isinstance(cfg, Mapping) else lambda k: getattr(cfg, k, None)
    mean, std = get("mean"), get("std")
    if mean is None or std is None:
        return None
    return _check_stats((mean, std))


def _module_cfg_stats(obj: Any) -> Stats | None:
    """Stats of the first object in ``obj`` (or its submodules) carrying a timm-style pretrained config."""
    candidates = obj.modules() if isinstance(obj, nn.Module) else [obj]
    for m in candidates:
        for attr in ("pretrained_cfg", "default_cfg"):
            stats = _cfg_stats(getattr(m, attr, None))
            if stats is not None:
                return stats
    return None


def _timm_name_stats(name: str) -> Stats:
    try:
        import timm
    except ImportError:
        raise ImportError(
            f"model_stats({name!r}) looks {name!r} up as a timm model name, but timm is not installed; "
            "install timm, or pass the model, its arch, or (mean, std)"
        ) from None
    lookup = getattr(getattr(timm, "models", None), "get_pretrained_cfg", None)
    if lookup is None:
        raise ImportError(f"model_stats({name!r}) needs timm >= 0.9 (timm.models.get_pretrained_cfg)")
    try:
        cfg = lookup(name)
    except RuntimeError as err:  # timm raises for an unknown pretrained tag of a known arch
        raise ValueError(f"timm cannot resolve model name {name!r}: {err}") from None
    stats = _cfg_stats(cfg)
    if stats is None:
        raise ValueError(f"timm knows no pretrained config with mean and std for model name {name!r}")
    return stats


def _torchvision_arch_stats(arch: Any) -> Stats | None:
    if isinstance(arch, WeightsEnum):
        weights = arch
    else:
        try:
            weights = get_model_weights(arch).DEFAULT
        except (ValueError, KeyError, AttributeError, TypeError):
            return None
    tfm = weights.transforms()
    mean, std = getattr(tfm, "mean", None), getattr(tfm, "std", None)
    return None if mean is None or std is None else _check_stats((mean, std))


def model_stats(model_or_arch: Any) -> Stats | None:
    """Return the ``(mean, std)`` a pretrained model was trained with, or None for one trained from scratch.

    Lookup order:

    * a fastai ``Learner``: None if it was built with ``pretrained=False``;
      otherwise the stats of its model, else of its ``arch``;
    * an object with a timm ``pretrained_cfg`` (or ``default_cfg``) holding
      ``mean`` and ``std``, or a ``nn.Module`` containing one (fastai wraps
      timm models in ``TimmBody``);
    * a string: a timm model name, resolved with ``timm.models.get_pretrained_cfg``.
      timm is optional; without it this raises ``ImportError`` rather than
      returning None, because None would mean "no pretrained statistics"
      and silently skip normalization;
    * torchvision weights (``ResNet18_Weights.DEFAULT``);
    * an arch function: fastai's ``model_meta`` first, then torchvision's
      weight registry (so archs missing from ``model_meta``, which fastai
      leaves unnormalized, are covered).

    A bare ``nn.Module`` without a timm config gives None: its weights
    cannot tell whether they were pretrained. Note that timm attaches its
    config even to a model created with ``pretrained=False``.

    Args:
        model_or_arch: A Learner, model, arch function, timm name or torchvision weights.

    Returns:
        ``(mean, std)`` or None.

    """
    obj = model_or_arch
    if hasattr(obj, "model") and hasattr(obj, "dls"):  # a Learner, without importing fastai.learner's type
        if getattr(obj, "pretrained", None) is False:
            return None
        stats = _module_cfg_stats(obj.model)
        if stats is None and getattr(obj, "arch", None) is not None:
            stats = model_stats(obj.arch)
        return stats
    if isinstance(obj, str):
        return _timm_name_stats(obj)
    stats = _module_cfg_stats(obj)
    if stats is not None or isinstance(obj, nn.Module):
        return stats
    if isinstance(obj, WeightsEnum):
        return _torchvision_arch_stats(obj)
    if callable(obj):
        from fastai.vision.learner import model_meta

        meta = model_meta.get(obj)
        if meta is not None:
            return _check_stats(meta["stats"]) if meta.get("stats") is not None else None
        return _torchvision_arch_stats(obj)
    raise TypeError(f"model_or_arch must be a Learner, model, arch, timm name or weights, got {type(obj).__name__}")


# --- checking a Learner --------------------------------------------------------------------------


@dataclass(frozen=True)
class NormalizationReport:
    """What :func:`check_normalization` saw.

    Attributes:
        mean: Per-channel mean of the batch after the whole input pipeline.
        std: Per-channel std of that batch.
        pipeline_stats: ``(mean, std)`` of the training loader's (last) ``Normalize``, or None.
        n_normalize: Number of ``Normalize`` transforms per loader, e.g. ``{'train': 1, 'valid': 1}``.
        model_stats: The stats the model was pretrained with (:func:`model_stats`), or None.
        input_channels: Image channels before ``Normalize``, or None if unknown.
        model_channels: Input channels of the model's first convolution, or None if it has none.
        problems: The warning messages, empty when all is well.

    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    pipeline_stats: Stats | None
    n_normalize: dict[str, int]
    model_stats: Stats | None
    input_channels: int | None
    model_channels: int | None
    problems: tuple[str, ...]


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _model_in_channels(model: nn.Module) -> int | None:
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, Tensor) and w.ndim == 4 and isinstance(m, nn.modules.conv._ConvNd):
            return int(w.shape[1]) * m.groups
    return None


def _stats_close(a: Stats, b: Stats, tol: float = 1e-3) -> bool:
    return len(a[0]) == len(b[0]) and all(abs(x - y) <= tol for x, y in zip(a[0] + a[1], b[0] + b[1], strict=True))


def check_normalization(learn: Any, xb: Any = None, *, warn: bool = True) -> NormalizationReport:
    """Check that ``learn``'s input pipeline normalizes once, with the model's statistics, channel for channel.

    Issues one :class:`NormalizationWarning` per problem found:

    * **no normalization**: the training loader has no ``Normalize`` and its
      batches are not already standardized (some channel has ``|mean| > 0.5``
      or std outside [0.5, 2]), or another loader lacks the ``Normalize``
      the training loader has;
    * **normalization applied twice**: a loader has more than one ``Normalize``;
    * **stats mismatch**: the model is pretrained (:func:`model_stats`) and the
      pipeline's stats differ from its stats by more than 1e-3;
    * **channel mismatch**: the ``Normalize`` has a different number of
      channels from the images, or the model's first convolution expects a
      different number of channels from the batches.

    Args:
        learn: A fastai Learner.
        xb: The input batch to report on (a tensor or a tuple whose first item is
            one), already through the pipeline; by default ``learn.dls.train.one_batch()``.
        warn: Issue the warnings; the report lists the problems either way.

    Returns:
        A :class:`NormalizationReport`.

    """
    dls = learn.dls
    with _preserved_rng():
        if xb is None:
            xb = dls.train.one_batch()
        n_in = _input_channels(dls.train)
    x = xb[0] if isinstance(xb, (tuple, list)) else xb
    if not isinstance(x, Tensor) or x.ndim != 4:
        got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"xb must hold an image batch (N, C, H, W), got {got}")
    x = x.detach().as_subclass(Tensor).float()
    dims = [0, 2, 3]
    mean = tuple(x.mean(dims).tolist())
    std = tuple(x.std(dims, correction=0).tolist())

    names = [("train", "valid")[i] if i < 2 else f"loader {i}" for i in range(len(dls.loaders))]
    norms = {name: _normalizes(dl) for name, dl in zip(names, dls.loaders, strict=True)}
    n_normalize = {name: len(v) for name, v in norms.items()}
    train_norms = norms.get("train", [])
    pipe_stats = _normalize_stats(train_norms[-1]) if train_norms else None
    pretrained = model_stats(learn)
    model_ch = _model_in_channels(learn.model)

    problems = []
    standardized = all(abs(m) <= 0.5 for m in mean) and all(0.5 <= s <= 2 for s in std)
    if not train_norms and not standardized:
        fix = "ensure_normalized(dls, learn)" if pretrained else "ensure_normalized(dls, 'dataset')"
        target = (
            f"; the pretrained model expects mean={_fmt(pretrained[0])}, std={_fmt(pretrained[1])}"
            if pretrained
            else ""
        )
        problems.append(
            f"no normalization: dls.train has no Normalize and its batches have per-channel mean={_fmt(mean)}, "
            f"std={_fmt(std)}{target}. Add one with fastai_tricks.{fix}."
        )
    elif train_norms:
        missing = [name for name, v in norms.items() if not v]
        if missing:
            problems.append(
                f"no normalization in {', '.join('dls.' + n if n in ('train', 'valid') else n for n in missing)}, "
                "although dls.train has a Normalize: validation and inference see other inputs than training. "
                "Use fastai_tricks.ensure_normalized(dls, stats), which normalizes every loader."
            )
    twice = {name: n for name, n in n_normalize.items() if n > 1}
    if twice:
        where = ", ".join(f"{name} has {n}" for name, n in twice.items())
        problems.append(
            f"normalization applied twice: {where} Normalize transforms (fastai#3370), so inputs are normalized "
            f"more than once (per-channel mean={_fmt(mean)}, std={_fmt(std)}). "
            "fastai_tricks.ensure_normalized(dls, stats) keeps exactly one."
        )
    if pretrained is not None and pipe_stats is not None and len(pretrained[0]) == len(pipe_stats[0]):
        if not _stats_close(pretrained, pipe_stats):
            problems.append(
                f"stats mismatch: the model was pretrained with mean={_fmt(pretrained[0])}, "
                f"std={_fmt(pretrained[1])} but the pipeline normalizes with mean={_fmt(pipe_stats[0])}, "
                f"std={_fmt(pipe_stats[1])}. Use fastai_tricks.ensure_normalized(dls, learn)."
            )
    channel_issues = []
    if pipe_stats is not None and n_in is not None and len(pipe_stats[0]) != n_in:
        channel_issues.append(
            f"the Normalize has {len(pipe_stats[0])} channels but the images have {n_in} "
            f"(broadcasting turns them into {max(n_in, len(pipe_stats[0]))}, fastai#3820)"
        )
    if model_ch is not None and model_ch != x.shape[1]:
        channel_issues.append(
            f"the model's first convolution expects {model_ch} channels but batches have {x.shape[1]}"
        )
    if channel_issues:
        problems.append("channel mismatch: " + "; ".join(channel_issues) + ".")

    if warn:
        for msg in problems:
            warnings.warn(msg, NormalizationWarning, stacklevel=2)
    return NormalizationReport(
        mean=mean,
        std=std,
        pipeline_stats=pipe_stats,
        n_normalize=n_normalize,
        model_stats=pretrained,
        input_channels=n_in,
        model_channels=model_ch,
        problems=tuple(problems),
    )


class NormalizationCheck(Callback):
    """Run :func:`check_normalization` on the first training batch of each fit.

    It reads ``learn.xb`` before the mixing and resizing callbacks change it
    (``order=-5``), warns once per fit for each problem found, and keeps the
    last :class:`NormalizationReport` as ``self.report``. It changes nothing on
    the Learner. Validation and prediction batches are never checked.

    Args:
        warn: Issue the warnings (otherwise only ``report`` is filled).

    """

    order = -5
    run_valid = False

    def __init__(self, warn: bool = True):
        self.warn = warn
        self.report: NormalizationReport | None = None
        self._pending = True

    def before_fit(self) -> None:
        """Arm the check for this fit."""
        self._pending = True

    def before_batch(self) -> None:
        """Check the first training batch."""
        if not self._pending:
            return
        self._pending = False
        self.report = check_normalization(self.learn, self.learn.xb, warn=self.warn)
