"""No callback of the package adds a device-to-host synchronisation per batch.

A sync stalls the host until the GPU has caught up, so one per batch costs throughput on every step. They
are counted on the CPU with :func:`fastai_tricks.host_syncs.counting_host_syncs`: a ``TorchDispatchMode`` that
sees the aten ops reading a device value on the host (``_local_scalar_dense`` behind ``.item()``, ``bool()``
and ``int()``, ``nonzero``, ``masked_select``, boolean indexing), plus wrapped ``Tensor.cpu``, ``.tolist``,
``.numpy`` and ``.to(device)``, which reach no aten op on the CPU.

Each check fits (or predicts) twice, with ``n`` and ``2n`` batches in training and in validation, with the
callback and without it. The syncs added per batch are the difference of the two slopes; they must be 0.
Syncs made once per fit (a first-batch check) cancel out in a slope, per-batch ones cannot.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import torch
from conftest import seed_everything, tiny_cnn
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropy
from fastai.torch_core import TensorCategory, TensorImage, TensorMask
from torch import nn

from fastai_tricks import (
    CutMix,
    FMix,
    FourCornerTTA,
    LabelSmoothingCE,
    ManifoldMix,
    MixUp,
    NormalizationCheck,
    ProgressiveResize,
    RandomMix,
    ResizeMix,
)
from fastai_tricks.host_syncs import counting_host_syncs


def _image_learner(n_batches: int, *, bs: int = 4, size: int = 16, model: nn.Module | None = None, **kwargs) -> Learner:
    """A Learner on seeded random images in 4 classes, with ``n_batches`` batches in training and validation."""
    g = torch.Generator().manual_seed(0)
    n = bs * n_batches
    xs = TensorImage(torch.rand(2 * n, 3, size, size, generator=g))
    ys = TensorCategory(torch.randint(0, 4, (2 * n,), generator=g))
    ds = list(zip(xs, ys, strict=True))
    dls = DataLoaders.from_dsets(ds[:n], ds[n:], bs=bs, drop_last=True, device=torch.device("cpu"))
    seed_everything(0)
    model = model if model is not None else tiny_cnn(n_out=4)
    return Learner(dls, model, loss_func=kwargs.pop("loss_func", CrossEntropyLossFlat()), **kwargs)


def _residual_cnn() -> nn.Module:
    """A two-stage CNN with residual blocks, for ManifoldMix (which mixes at a residual stage's output)."""
    from fastai.layers import ResBlock

    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(ResBlock(1, 8, 8)), nn.Sequential(ResBlock(1, 8, 8, stride=2)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip


def _syncs(run: Callable[[int], None], n: int) -> int:
    with counting_host_syncs() as counter:
        run(n)
    return counter.total


def syncs_per_batch(run: Callable[[int], None], n: int = 1) -> float:
    """Host syncs per batch of ``run``: the slope between runs of ``n`` and ``2n`` batches."""
    return (_syncs(run, 2 * n) - _syncs(run, n)) / n


def added_syncs_per_batch(run_with: Callable[[int], None], run_without: Callable[[int], None]) -> float:
    """Syncs per batch that ``run_with`` makes beyond ``run_without``."""
    return syncs_per_batch(run_with) - syncs_per_batch(run_without)


def _fit(make_cbs: Callable[[], list], epochs: int = 1, **learner_kwargs) -> Callable[[int], None]:
    def run(n: int) -> None:
        learn = _image_learner(n, **learner_kwargs)
        learn.fit(epochs, 1e-3, cbs=make_cbs())

    return run


TRAINING_CALLBACKS = {
    "MixUp": lambda: [MixUp()],
    "CutMix": lambda: [CutMix()],
    "CutMix per sample": lambda: [CutMix(per_sample=True)],
    "FMix": lambda: [FMix()],
    "ResizeMix": lambda: [ResizeMix()],
    "ManifoldMix": lambda: [ManifoldMix()],
    "RandomMix": lambda: [RandomMix([MixUp(), CutMix(), FMix(), ResizeMix()])],
    "MixUp p=0.5": lambda: [MixUp(p=0.5)],
    "ProgressiveResize": lambda: [ProgressiveResize(min_epochs=0)],
    "ProgressiveResize epoch schedule, mix alpha": lambda: [
        ProgressiveResize(min_epochs=0, schedule="epoch", mix_alpha=(0.1, 0.4)),
        MixUp(),
    ],
    "NormalizationCheck": lambda: [NormalizationCheck(warn=False)],
}


# The fast tier counts a blend, a box mix and the resizer; the slow tier every callback and option.
_FAST_TRAINING = {"MixUp", "CutMix", "ProgressiveResize"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=() if n in _FAST_TRAINING else pytest.mark.slow) for n in TRAINING_CALLBACKS]
)
def test_training_callback_adds_no_host_sync_per_batch(name):
    # One epoch has n training and n validation batches; the epoch schedule needs two epochs to resize.
    epochs = 2 if "epoch schedule" in name else 1
    model = _residual_cnn if "Manifold" in name else lambda: None
    run_with = _fit(TRAINING_CALLBACKS[name], epochs, model=model())
    run_without = _fit(list, epochs, model=model())
    assert added_syncs_per_batch(run_with, run_without) == 0


@pytest.mark.slow
def test_label_smoothing_loss_adds_no_host_sync_per_batch_over_fastais():
    # Against fastai's own label-smoothing loss, the one it replaces (both are plain modules, no BaseLoss).
    ours = _fit(list, loss_func=LabelSmoothingCE())
    fastais = _fit(list, loss_func=LabelSmoothingCrossEntropy())
    assert added_syncs_per_batch(ours, fastais) == 0


class _PlantedItem(Callback):
    """Reads the loss on the host at every training batch: the kind of sync the counter must catch."""

    run_valid = False

    def after_loss(self) -> None:
        self.learn.loss_grad.item()


class _PlantedBoolIndex(Callback):
    """Selects pixels with a boolean mask at every training batch."""

    run_valid = False

    def before_batch(self) -> None:
        x = self.learn.xb[0]
        _ = x[x > 0.5]


def test_counter_catches_a_planted_item_and_a_boolean_index():
    # The same measurement as the tests above, on callbacks that do sync once per training batch.
    assert added_syncs_per_batch(_fit(lambda: [_PlantedItem()]), _fit(list)) == 1
    assert added_syncs_per_batch(_fit(lambda: [_PlantedBoolIndex()]), _fit(list)) == 1


# ---------------------------------------------------------------------------------------------------------------
# Test-time augmentation: the same count over prediction passes, against the plain ``get_preds`` of the same data.


def _predict(call: Callable[[Learner], object], dense: bool = False) -> Callable[[int], None]:
    def run(n: int) -> None:
        learn = _dense_learner(n) if dense else _image_learner(n)
        learn.model.eval()
        call(learn)

    return run


def _dense_learner(n_batches: int, bs: int = 4, size: int = 16) -> Learner:
    """A segmentation Learner: random images, 3-class masks, a 3x3 convolution that keeps the spatial size."""
    g = torch.Generator().manual_seed(0)
    n = bs * n_batches
    xs = TensorImage(torch.rand(2 * n, 3, size, size, generator=g))
    ys = TensorMask(torch.randint(0, 3, (2 * n, size, size), generator=g))
    dls = DataLoaders.from_dsets(
        list(zip(xs[:n], ys[:n], strict=True)), list(zip(xs[n:], ys[n:], strict=True)), bs=bs, device="cpu"
    )
    seed_everything(0)
    return Learner(dls, nn.Conv2d(3, 3, 3, padding=1), loss_func=CrossEntropyLossFlat(axis=1))


TTA_CALLS = {
    "FourCornerTTA": lambda learn: learn.get_preds(cbs=FourCornerTTA()),
    "FourCornerTTA ten-crop, max merge": lambda learn: learn.get_preds(cbs=FourCornerTTA(flip=True, merge="max")),
    "FourCornerTTA one view per forward": lambda learn: learn.get_preds(cbs=FourCornerTTA(max_views_per_batch=1)),
    "FourCornerTTA full image, no resize": lambda learn: learn.get_preds(
        cbs=FourCornerTTA(crop=12, full=True, resize=False)
    ),
    "validate with FourCornerTTA": lambda learn: learn.validate(cbs=FourCornerTTA()),
    "four_corner_tta": lambda learn: learn.four_corner_tta(),
    "four_corner_tta beta=None": lambda learn: learn.four_corner_tta(beta=None),
    "four_corner_tta beta=0.5": lambda learn: learn.four_corner_tta(beta=0.5),
    "four_corner_tta use_max": lambda learn: learn.four_corner_tta(use_max=True),
    "four_corner_tta flip, full": lambda learn: learn.four_corner_tta(flip=True, full=True),
    "four_corner_tta ds_idx=0": lambda learn: learn.four_corner_tta(ds_idx=0),
    "four_corner_tta dl=": lambda learn: learn.four_corner_tta(dl=learn.dls.valid.new(shuffle=False)),
    "four_corner_tta one view per forward": lambda learn: learn.four_corner_tta(max_views_per_batch=1),
}
PLAIN = {
    "four_corner_tta ds_idx=0": lambda learn: learn.get_preds(ds_idx=0),
    "validate with FourCornerTTA": lambda learn: learn.validate(),
}


_FAST_TTA = {"FourCornerTTA", "four_corner_tta"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in _FAST_TTA else pytest.mark.slow) for n in TTA_CALLS])
def test_tta_adds_no_host_sync_per_batch(name):
    plain = PLAIN.get(name, lambda learn: learn.get_preds())
    assert added_syncs_per_batch(_predict(TTA_CALLS[name]), _predict(plain)) == 0


@pytest.mark.parametrize(
    "name",
    [
        "FourCornerTTA",
        *(
            pytest.param(n, marks=pytest.mark.slow)
            for n in ("four_corner_tta", "four_corner_tta beta=None", "four_corner_tta use_max")
        ),
    ],
)
def test_dense_tta_adds_no_host_sync_per_batch(name):
    plain = _predict(lambda learn: learn.get_preds(), dense=True)
    assert added_syncs_per_batch(_predict(TTA_CALLS[name], dense=True), plain) == 0


@pytest.mark.slow
def test_fastais_own_mixes_do_sync_every_batch():
    # The contrast of docs/coming_from_fastai.md: fastai's MixUp copies its λ to the device (2 per batch) and its
    # CutMix reads the box back to the host (15 per batch, counted on torch 2.14 and fastai 2.8.12).
    from fastai.callback.mixup import CutMix as FastaiCutMix
    from fastai.callback.mixup import MixUp as FastaiMixUp

    assert added_syncs_per_batch(_fit(lambda: [FastaiMixUp()]), _fit(list)) == 2
    assert added_syncs_per_batch(_fit(lambda: [FastaiCutMix()]), _fit(list)) == 15


def test_counter_catches_host_copies():
    with counting_host_syncs() as counter:
        t = torch.ones(3)
        t.cpu(), t.tolist(), t.numpy(), t.to("cpu"), t.to(torch.float64)
    assert counter.counts == Counter({"Tensor.cpu": 1, "Tensor.tolist": 1, "Tensor.numpy": 1, "Tensor.to": 1})
