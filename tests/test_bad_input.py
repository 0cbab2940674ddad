"""Bad input: one table over every public constructor and function.

Every invalid value named in the feature issues (mixing #3, progressive resizing #4,
normalization and label smoothing #5, four-corner TTA #6), and a few more of the same kind,
must raise ValueError or TypeError whose message names the parameter and shows the value.
Each row gives the call, the exception type, the parameter name and the text of the value as
the message must show it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from fastai.vision.core import PILImage

from fastai_tricks import (
    CutMix,
    DraftImageBlock,
    FMix,
    FourCornerTTA,
    LabelSmoothingCE,
    ManifoldMix,
    MixUp,
    ProgressiveResize,
    RandomMix,
    ResizeMix,
    check_normalization,
    dataset_stats,
    ensure_normalized,
    expand_views,
    four_corner_crops,
    imagenette_path,
    initial_pixels,
    make_fake_imagenette,
    merge_views,
    mix_ops,
    resize_schedule,
    show_mix_batch,
    smooth_targets,
)
from fastai_tricks.recipe import RecipeConfig


class Ctx:
    """What a row may need, built only when a row asks for it (most rows need nothing)."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path):
        self.request, self.tmp_path = request, tmp_path

    @property
    def dls(self) -> Any:
        return self.request.getfixturevalue("tiny_dls")

    @property
    def learn(self) -> Any:
        return self.request.getfixturevalue("tiny_learner")


X = torch.rand(4, 3, 32, 32)
Y = torch.tensor([0, 1, 2, 3])
NAN, INF = math.nan, math.inf
MIX_VARIANTS = {"MixUp": MixUp, "CutMix": CutMix, "ManifoldMix": ManifoldMix, "ResizeMix": ResizeMix, "FMix": FMix}

Row = tuple[str, Callable[[Ctx], Any], type[Exception], str, str]
ROWS: list[Row] = []


def row(rid: str, call: Callable[[Ctx], Any], exc: type[Exception], name: str, value: str) -> None:
    ROWS.append((rid, call, exc, name, value))


# --- issue 3: mixing ---------------------------------------------------------------------------------
for cls_name, cls in MIX_VARIANTS.items():
    for bad, shown in [(0, "0"), (-1.0, "-1.0"), (NAN, "nan"), (INF, "inf")]:
        row(f"{cls_name}-alpha={shown}", lambda c, cls=cls, bad=bad: cls(alpha=bad), ValueError, "alpha", shown)
    row(f"{cls_name}-alpha=str", lambda c, cls=cls: cls(alpha="big"), TypeError, "alpha", "'big'")
    for bad in (-0.1, 1.5):
        row(f"{cls_name}-p={bad}", lambda c, cls=cls, bad=bad: cls(p=bad), ValueError, "p", str(bad))
    row(f"{cls_name}-p=nan", lambda c, cls=cls: cls(p=NAN), ValueError, "p", "nan")
    row(f"{cls_name}-off_pct=1.0", lambda c, cls=cls: cls(off_pct=1.0), ValueError, "off_pct", "1.0")
    row(f"{cls_name}-off_epochs=-1", lambda c, cls=cls: cls(off_epochs=-1), ValueError, "off_epochs", "-1")
    row(
        f"{cls_name}-set-alpha=0",
        lambda c, cls=cls: setattr(cls(), "alpha", 0),
        ValueError,
        "alpha",
        "0",
    )
row("RandomMix-mixes=[]", lambda c: RandomMix([]), ValueError, "mixes", "[]")
row("RandomMix-mixes=str", lambda c: RandomMix(["mixup"]), TypeError, "mixes", "'mixup'")
row("RandomMix-probs-negative", lambda c: RandomMix([MixUp(), CutMix()], probs=[-1, 2]), ValueError, "probs", "[-1, 2]")
row("RandomMix-probs-all-zero", lambda c: RandomMix([MixUp(), CutMix()], probs=[0, 0]), ValueError, "probs", "[0, 0]")
row("RandomMix-probs-length", lambda c: RandomMix([MixUp(), CutMix()], probs=[1]), ValueError, "probs", "[1]")
row("RandomMix-p=2", lambda c: RandomMix([MixUp()], p=2), ValueError, "p", "2")
row("RandomMix-set-alpha=-1", lambda c: setattr(RandomMix([MixUp()]), "alpha", -1), ValueError, "alpha", "-1")
row("ResizeMix-scale-lo=0", lambda c: ResizeMix(scale=(0.0, 0.5)), ValueError, "scale[0]", "0.0")
row("ResizeMix-scale-hi=1.5", lambda c: ResizeMix(scale=(0.2, 1.5)), ValueError, "scale[1]", "1.5")
row("ResizeMix-scale-lo>hi", lambda c: ResizeMix(scale=(0.8, 0.2)), ValueError, "scale", "(0.8, 0.2)")
row("ResizeMix-scale-not-pair", lambda c: ResizeMix(scale=0.5), ValueError, "scale", "0.5")
row("FMix-decay_power=0", lambda c: FMix(decay_power=0), ValueError, "decay_power", "0")
row("ManifoldMix-modules=[]", lambda c: ManifoldMix(modules=[]), ValueError, "modules", "[]")
row("ManifoldMix-modules=int", lambda c: ManifoldMix(modules=[3]), TypeError, "modules", "3")
row("mixup-alpha=0", lambda c: mix_ops.mixup(X, 0), ValueError, "alpha", "0")
row("cutmix-alpha=nan", lambda c: mix_ops.cutmix(X, NAN), ValueError, "alpha", "nan")
row("fmix-alpha=-1", lambda c: mix_ops.fmix(X, -1.0), ValueError, "alpha", "-1.0")
row("fmix-decay_power=inf", lambda c: mix_ops.fmix(X, 1.0, INF), ValueError, "decay_power", "inf")
row("resizemix-scale", lambda c: mix_ops.resizemix(X, (0.5, 2.0)), ValueError, "scale[1]", "2.0")
row("sample_lambda-alpha=0", lambda c: mix_ops.sample_lambda(4, 0.0), ValueError, "alpha", "0.0")
row("mix_losses-reduction", lambda c: mix_ops.mix_losses(X[:, 0, 0, 0], X[:, 0, 0, 1], X[:, 0, 0, 2], "avg"), ValueError, "reduction", "'avg'")  # fmt: skip
row("show_mix_batch-mix", lambda c: show_mix_batch(None, "mixup"), TypeError, "mix", "'mixup'")
row("show_mix_batch-n=0", lambda c: show_mix_batch(c.dls, MixUp(), n=0), ValueError, "n", "0")

# --- issue 4: progressive resizing -------------------------------------------------------------------
for kwargs, exc, name, shown in [
    ({"initial_size": 0}, ValueError, "initial_size", "0"),
    ({"initial_size": -8}, ValueError, "initial_size", "-8"),
    ({"initial_size": 0.0}, ValueError, "initial_size", "0.0"),
    ({"initial_size": 1.5}, ValueError, "initial_size", "1.5"),
    ({"initial_size": (16, 0)}, ValueError, "initial_size", "(16, 0)"),
    ({"initial_size": "half"}, TypeError, "initial_size", "'half'"),
    ({"final_size": 0}, ValueError, "final_size", "0"),
    ({"final_size": (32, -1)}, ValueError, "final_size", "(32, -1)"),
    ({"initial_size": 64, "final_size": 32}, ValueError, "initial_size", "64"),
    ({"initial_size": (16, 48), "final_size": (32, 32)}, ValueError, "initial_size", "(16, 48)"),
    ({"start": 0.8, "finish": 0.2}, ValueError, "finish", "0.2"),
    ({"start": -0.1}, ValueError, "start", "-0.1"),
    ({"start": 1.5}, ValueError, "start", "1.5"),
    ({"finish": 1.2}, ValueError, "finish", "1.2"),
    ({"finish": NAN}, ValueError, "finish", "nan"),
    ({"increase_by": 0}, ValueError, "increase_by", "0"),
    ({"increase_by": -4}, ValueError, "increase_by", "-4"),
    ({"increase_by": 2.5}, TypeError, "increase_by", "2.5"),
    ({"mode": "cubic"}, ValueError, "mode", "'cubic'"),
    ({"schedule": "step"}, ValueError, "schedule", "'step'"),
    ({"mix_alpha": (0, 1)}, ValueError, "mix_alpha[0]", "0"),
    ({"mix_alpha": 0.5}, ValueError, "mix_alpha", "0.5"),
]:
    rid = "ProgressiveResize-" + ",".join(f"{k}={v}" for k, v in kwargs.items())
    row(rid, lambda c, kw=kwargs: ProgressiveResize(**kw), exc, name, shown)
row("resize_schedule-n_epoch=0", lambda c: resize_schedule(0, 4, 32), ValueError, "n_epoch", "0")
row("resize_schedule-n_iter=-1", lambda c: resize_schedule(1, -1, 32), ValueError, "n_iter", "-1")
row("resize_schedule-final_size=0", lambda c: resize_schedule(1, 4, 0), ValueError, "final_size", "0")
row("resize_schedule-finish<start", lambda c: resize_schedule(1, 4, 32, start=0.9, finish=0.1), ValueError, "finish", "0.1")  # fmt: skip
row("resize_schedule-increase_by=0", lambda c: resize_schedule(1, 4, 32, increase_by=0), ValueError, "increase_by", "0")  # fmt: skip
row("resize_schedule-schedule", lambda c: resize_schedule(1, 4, 32, schedule="iter"), ValueError, "schedule", "'iter'")  # fmt: skip
row("initial_pixels-initial>final", lambda c: initial_pixels(48, 32), ValueError, "initial_size", "48")
row("initial_pixels-fraction>1", lambda c: initial_pixels(1.25, 32), ValueError, "initial_size", "1.25")

# --- issue 5: normalization and label smoothing -------------------------------------------------------
STD_ZERO = ((0.5, 0.5, 0.5), (0.2, 0.0, 0.2))
row("ensure_normalized-std-zero", lambda c: ensure_normalized(c.dls, STD_ZERO), ValueError, "std", "0.0")
row("ensure_normalized-std-negative", lambda c: ensure_normalized(c.dls, ((0.5,) * 3, (0.2, -0.1, 0.2))), ValueError, "std", "-0.1")  # fmt: skip
row("ensure_normalized-lengths", lambda c: ensure_normalized(c.dls, ((0.5, 0.5), (0.2, 0.2, 0.2))), ValueError, "mean", "(0.5, 0.5)")  # fmt: skip
row("ensure_normalized-nan-mean", lambda c: ensure_normalized(c.dls, ((0.5, NAN, 0.5), (0.2,) * 3)), ValueError, "mean", "nan")  # fmt: skip
row("ensure_normalized-channels", lambda c: ensure_normalized(c.dls, ((0.5,), (0.2,))), ValueError, "mean", "(0.5,)")  # fmt: skip
row("ensure_normalized-not-a-pair", lambda c: ensure_normalized(c.dls, [0.5, 0.2, 0.1]), ValueError, "stats", "[0.5, 0.2, 0.1]")  # fmt: skip
row("smooth_targets-eps=1", lambda c: smooth_targets(Y, 5, 1.0), ValueError, "eps", "1.0")
row("smooth_targets-eps=-0.1", lambda c: smooth_targets(Y, 5, -0.1), ValueError, "eps", "-0.1")
row("smooth_targets-eps=nan", lambda c: smooth_targets(Y, 5, NAN), ValueError, "eps", "nan")
row("smooth_targets-n_classes=0", lambda c: smooth_targets(Y, 0, 0.1), ValueError, "n_classes", "0")
row("LabelSmoothingCE-eps=1", lambda c: LabelSmoothingCE(eps=1.0), ValueError, "eps", "1.0")
row("LabelSmoothingCE-eps=1.5", lambda c: LabelSmoothingCE(eps=1.5), ValueError, "eps", "1.5")
row("LabelSmoothingCE-eps=-0.1", lambda c: LabelSmoothingCE(eps=-0.1), ValueError, "eps", "-0.1")
row("LabelSmoothingCE-eps=str", lambda c: LabelSmoothingCE(eps="0.1"), TypeError, "eps", "'0.1'")
row("LabelSmoothingCE-reduction", lambda c: LabelSmoothingCE(reduction="avg"), ValueError, "reduction", "'avg'")
row("dataset_stats-not-images", lambda c: dataset_stats([torch.rand(4, 3)], progress=False), ValueError, "source", "(4, 3)")  # fmt: skip
row("dataset_stats-int-images", lambda c: dataset_stats([torch.zeros(2, 3, 4, 4, dtype=torch.uint8)], progress=False), ValueError, "source", "torch.uint8")  # fmt: skip
row("dataset_stats-nan", lambda c: dataset_stats([X, X.clone().fill_(NAN)], progress=False), ValueError, "source", "batch 1")  # fmt: skip
row("dataset_stats-inf", lambda c: dataset_stats([X.clone().fill_(INF)], progress=False), ValueError, "source", "batch 0")  # fmt: skip
row("dataset_stats-empty-list", lambda c: dataset_stats([], progress=False), ValueError, "source", "empty list")
row("dataset_stats-path", lambda c: dataset_stats("some/folder", progress=False), TypeError, "source", "'some/folder'")  # fmt: skip
row("dataset_stats-max_batches=0", lambda c: dataset_stats([X], max_batches=0), ValueError, "max_batches", "0")
row("check_normalization-xb", lambda c: check_normalization(c.learn, torch.rand(4, 3), warn=False), ValueError, "xb", "(4, 3)")  # fmt: skip

# --- issue 6: four-corner TTA ----------------------------------------------------------------------------
for kwargs, exc, name, shown in [
    ({"crop": 0}, ValueError, "crop", "0"),
    ({"crop": -3}, ValueError, "crop", "-3"),
    ({"crop": 0.0}, ValueError, "crop", "0.0"),
    ({"crop": 1.5}, ValueError, "crop", "1.5"),
    ({"crop": NAN}, ValueError, "crop", "nan"),
    ({"crop": "center"}, TypeError, "crop", "'center'"),
    ({"merge": "median"}, ValueError, "merge", "'median'"),
    ({"crop": None, "full": False}, ValueError, "crop", "None"),
    ({"max_views_per_batch": 0}, ValueError, "max_views_per_batch", "0"),
]:
    rid = "FourCornerTTA-" + ",".join(f"{k}={v}" for k, v in kwargs.items())
    row(rid, lambda c, kw=kwargs: FourCornerTTA(**kw), exc, name, shown)
row("four_corner_crops-too-big", lambda c: four_corner_crops(X, 40), ValueError, "size", "40")
row("four_corner_crops-size=0", lambda c: four_corner_crops(X, 0), ValueError, "size", "0")
row("four_corner_crops-not-4d", lambda c: four_corner_crops(X[0], 8), ValueError, "x", "(3, 32, 32)")
row("expand_views-no-views", lambda c: expand_views(X, None, full=False), ValueError, "crop", "None")
row("expand_views-crop=2.0", lambda c: expand_views(X, 2.0), ValueError, "size", "2.0")
row("merge_views-mode", lambda c: merge_views(torch.rand(5, 2, 3), mode="median"), ValueError, "mode", "'median'")
row("merge_views-activation", lambda c: merge_views(torch.rand(5, 2, 3), activation="relu"), ValueError, "activation", "'relu'")  # fmt: skip
row("merge_views-preds-1d", lambda c: merge_views(torch.rand(5)), ValueError, "preds", "(5,)")
row("four_corner_tta-beta=1.5", lambda c: c.learn.four_corner_tta(beta=1.5), ValueError, "beta", "1.5")

# --- data and recipe ----------------------------------------------------------------------------------
row("make_fake_imagenette-n_train=0", lambda c: make_fake_imagenette(c.tmp_path, n_train=0), ValueError, "n_train", "0")  # fmt: skip
row("make_fake_imagenette-size=8", lambda c: make_fake_imagenette(c.tmp_path, size=8), ValueError, "size", "8")
row("make_fake_imagenette-seed", lambda c: make_fake_imagenette(c.tmp_path, seed="0"), TypeError, "seed", "'0'")
row("DraftImageBlock-cls", lambda c: DraftImageBlock(PILImage), TypeError, "cls", "PILImage")
row("imagenette_path-size", lambda c: imagenette_path(size=100), ValueError, "size", "100")
for kwargs, exc, name, shown in [
    ({"size": 0}, ValueError, "size", "0"),
    ({"epochs": -1}, ValueError, "epochs", "-1"),
    ({"bs": 2.5}, TypeError, "bs", "2.5"),
    ({"lr": 0}, ValueError, "lr", "0"),
    ({"valid_pct": 1.0}, ValueError, "valid_pct", "1.0"),
    ({"normalize": "auto"}, ValueError, "normalize", "'auto'"),
    ({"initial_size": -0.5}, ValueError, "initial_size", "-0.5"),
    ({"resize_start": 0.9, "resize_finish": 0.1}, ValueError, "resize_finish", "0.1"),
    ({"mix": "cutmixup"}, ValueError, "mix", "'cutmixup'"),
    ({"alpha": 0}, ValueError, "alpha", "0"),
    ({"label_smoothing": 1.0}, ValueError, "label_smoothing", "1.0"),
    ({"tta": "five"}, ValueError, "tta", "'five'"),
    ({"arch": "vgg16"}, ValueError, "arch", "'vgg16'"),
    ({"workers": -1}, ValueError, "workers", "-1"),
    ({"imagenette": "640"}, ValueError, "imagenette", "'640'"),
]:
    rid = "RecipeConfig-" + ",".join(f"{k}={v}" for k, v in kwargs.items())
    row(rid, lambda c, kw=kwargs: RecipeConfig(**kw), exc, name, shown)


@pytest.mark.parametrize(("call", "exc", "name", "value"), [pytest.param(*r[1:], id=r[0]) for r in ROWS])
def test_bad_input_raises_value_or_type_error_naming_the_parameter_and_showing_the_value(
    request, tmp_path, call, exc, name, value
):
    with pytest.raises(exc) as info:
        call(Ctx(request, tmp_path))
    message = str(info.value)
    assert name in message, f"parameter {name!r} not named in: {message}"
    assert value in message, f"value {value!r} not shown in: {message}"
