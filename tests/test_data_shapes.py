"""Odd data: every callback and function on the shapes, sizes, dtypes and layouts users feed them.

Grayscale and 4-channel images; non-square images; images smaller than the crop or size;
bs=1 and an odd bs; a last batch of 1; fp16 and bf16; channels_last; an empty DataLoader; a
DataLoader of non-image tensors. Each case ends in correct behaviour or a clear error that
names the problem. Learners here run on in-memory tensors (a few 32-px images) to stay fast.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import seed_everything, tiny_cnn
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from torch import nn

from fastai_tricks import (
    CutMix,
    FMix,
    FourCornerTTA,
    LabelSmoothingCE,
    ManifoldMix,
    MixCallback,
    MixUp,
    NormalizationCheck,
    ProgressiveResize,
    RandomMix,
    ResizeMix,
    batch_moments,
    check_normalization,
    dataset_stats,
    expand_views,
    four_corner_crops,
    merge_views,
    mix_ops,
    smooth_targets,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

MIXERS = {
    "mixup": lambda: MixUp(),
    "cutmix": lambda: CutMix(per_sample=True),
    "manifoldmix": lambda: ManifoldMix(modules=["2"]),
    "resizemix": lambda: ResizeMix(),
    "fmix": lambda: FMix(),
    "randommix": lambda: RandomMix([MixUp(), CutMix(), ResizeMix(), FMix()]),
}
TRAINING = {
    **MIXERS,
    "progressive_resize": lambda: ProgressiveResize(min_epochs=0, start=0.0, finish=1.0),
    "normalization_check": lambda: NormalizationCheck(),
}
ALL = {**TRAINING, "four_corner_tta": lambda: FourCornerTTA()}


def tensor_dls(shape=(3, 32, 32), n_train=16, n_valid=8, bs=4, drop_last=True, valid_bs=None) -> DataLoaders:
    """fastai DataLoaders over random tensors of ``shape`` with integer labels 0..9."""
    g = torch.Generator().manual_seed(0)

    def items(n):
        return [(torch.rand(*shape, generator=g), torch.tensor(i % 10)) for i in range(n)]

    train = DataLoader(items(n_train), bs=bs, shuffle=True, drop_last=drop_last)
    valid = DataLoader(items(n_valid), bs=valid_bs or bs)
    return DataLoaders(train, valid)


class Convert(Callback):
    """Turn every input batch into ``dtype`` and/or channels_last before any other callback sees it."""

    order = -20

    def __init__(self, dtype=None, channels_last=False):
        self.dtype, self.channels_last = dtype, channels_last

    def before_batch(self):
        x = self.learn.xb[0]
        if self.dtype is not None:
            x = x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.learn.xb = (x,)


class Spy(Callback):
    """Record the input batch the model receives, after every feature callback (training and validation)."""

    order = 15

    def __init__(self):
        self.train, self.valid = [], []

    def before_batch(self):
        (self.train if self.learn.training else self.valid).append(self.learn.xb[0].detach().clone())


def float_model() -> nn.Module:
    """tiny_cnn taking half-precision inputs on CPU (no fp16 convolution kernel there); indices unchanged."""
    model = tiny_cnn()
    model.register_forward_pre_hook(lambda module, args: (args[0].float(), *args[1:]))
    return model


def learner(dls, n_in=3, model=None) -> Learner:
    seed_everything(0)  # every random draw below (pairing, λ, boxes, RandomMix's choice) is fixed
    return Learner(dls, model or tiny_cnn(n_in=n_in), loss_func=CrossEntropyLossFlat())


def run(learn: Learner, name: str, *extra: Callback) -> Spy:
    """Fit one epoch with the callback (TTA: attached, so validation runs with it), then get_preds."""
    spy = Spy()
    cb = ALL[name]()
    with learn.no_bar(), learn.no_logging():
        if name == "four_corner_tta":
            learn.add_cb(cb)
            learn.fit(1, 1e-3, cbs=[spy, *extra])
        else:
            learn.fit(1, 1e-3, cbs=[cb, spy, *extra])
        preds, _ = learn.get_preds(cbs=list(extra))
    assert torch.isfinite(torch.tensor(learn.recorder.values[-1][0]))
    assert preds.shape == (len(learn.dls.valid.dataset), 10)
    return spy


# --- channels and aspect ratio -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 32, 32), (4, 32, 32), (3, 24, 40)], ids=["grayscale", "4-channel", "24x40"])
@pytest.mark.parametrize("name", list(ALL))
def test_every_callback_fits_on_grayscale_4_channel_and_non_square_images(name, shape):
    c, h, w = shape
    spy = run(learner(tensor_dls(shape, n_train=8, n_valid=4), n_in=c), name)
    assert all(x.shape[1] == c for x in spy.train + spy.valid)
    if name == "progressive_resize":  # smaller, same aspect ratio (to the rounding step), never larger
        assert all(x.shape[-2] <= h and x.shape[-1] <= w for x in spy.train)
        assert all(abs(x.shape[-1] / x.shape[-2] - w / h) < 0.25 for x in spy.train)
        assert spy.train[0].shape[-2:] != (h, w)
    else:
        assert all(tuple(x.shape[-2:]) == (h, w) for x in spy.train)
    if name == "four_corner_tta":  # square crops from the short side, resized back to it
        assert all(tuple(x.shape[-2:]) == (min(h, w), min(h, w)) for x in spy.valid)
    else:
        assert all(tuple(x.shape[-2:]) == (h, w) for x in spy.valid)


# --- images smaller than the crop or size ----------------------------------------------------------------


@pytest.mark.parametrize("hw", [(1, 1), (2, 3)])
@pytest.mark.parametrize("name", [*MIXERS, "progressive_resize", "four_corner_tta"])
def test_callbacks_work_on_images_of_one_or_a_few_pixels(name, hw):
    spy = run(learner(tensor_dls((3, *hw), n_train=8, n_valid=4)), name)
    assert all(tuple(x.shape[-2:]) <= hw for x in spy.train)


def test_a_crop_bigger_than_the_images_raises_naming_both_sizes():
    learn = learner(tensor_dls((3, 32, 32)))
    with pytest.raises(ValueError, match=r"crop size 40 .*32x32"):
        learn.get_preds(cbs=FourCornerTTA(crop=40))
    with pytest.raises(ValueError, match=r"size 40 .*32x32"):
        four_corner_crops(torch.rand(2, 3, 32, 32), 40)
    with pytest.raises(ValueError, match=r"24x40"):
        expand_views(torch.rand(2, 3, 24, 40), 32)  # bigger than the short side only


def test_an_initial_size_bigger_than_the_images_raises_at_the_first_batch_naming_both():
    learn = learner(tensor_dls((3, 32, 32)))
    with pytest.raises(ValueError, match=r"initial_size must not be larger than final_size \(32, 32\), got 48"):
        learn.fit(1, cbs=ProgressiveResize(min_epochs=0, initial_size=48))
    learn.fit(1)  # and the learner is still usable


def test_a_final_size_bigger_than_the_images_grows_them_to_that_size():
    spy = Spy()
    learn = learner(tensor_dls((3, 16, 16), n_train=16))
    learn.fit(2, cbs=[ProgressiveResize(min_epochs=0, initial_size=16, final_size=32, start=0.0, finish=1.0), spy])
    assert tuple(spy.train[0].shape[-2:]) == (16, 16) and tuple(spy.train[-1].shape[-2:]) == (32, 32)
    assert all(tuple(x.shape[-2:]) == (16, 16) for x in spy.valid)  # validation keeps the data's size


# --- batch sizes ---------------------------------------------------------------------------------------


class Before(Callback):
    """Keep a copy of the training input batch before the mixing callbacks (order 0) see it."""

    order = -1

    def __init__(self):
        self.xs = []

    def before_batch(self):
        if self.learn.training:
            self.xs.append(self.learn.xb[0].clone())


@pytest.mark.parametrize("name", list(ALL))
def test_batch_of_one_is_left_unmixed_and_every_callback_runs(name):
    before = Before()
    spy = run(learner(tensor_dls(n_train=4, n_valid=3, bs=1)), name, before)
    assert len(spy.train) == 4 and all(x.shape[0] == 1 for x in spy.train)
    if name in MIXERS:
        assert all(torch.equal(a, b) for a, b in zip(before.xs, spy.train, strict=True))


@pytest.mark.parametrize("name", list(ALL))
def test_odd_batch_size_and_a_last_batch_of_one_with_drop_last_false(name):
    # 7 training images in batches of 3: 3, 3, 1. 5 validation images: 3, 2.
    before = Before()
    spy = run(learner(tensor_dls(n_train=7, n_valid=5, bs=3, drop_last=False)), name, before)
    assert [x.shape[0] for x in spy.train] == [3, 3, 1]
    if name in MIXERS and name != "manifoldmix":  # ManifoldMix may mix a hidden layer instead
        assert not torch.equal(before.xs[0], spy.train[0])
        assert torch.equal(before.xs[2], spy.train[2])  # the batch of one is left alone


# --- precision and memory format -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "name",
    [
        *TRAINING,
        "four_corner_tta",
    ],
)
def test_half_precision_batches_keep_their_dtype_through_every_callback(name, dtype):
    spy = run(learner(tensor_dls(n_train=8, n_valid=4), model=float_model()), name, Convert(dtype=dtype))
    assert all(x.dtype == dtype for x in spy.train + spy.valid)


@pytest.mark.parametrize("name", list(ALL))
def test_channels_last_batches_stay_channels_last_through_every_callback(name):
    spy = run(learner(tensor_dls(n_train=8, n_valid=4)), name, Convert(channels_last=True))
    checked = spy.train + (spy.valid if name != "four_corner_tta" else [])
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x in checked)


def test_channels_last_and_half_precision_give_the_same_tta_predictions_and_stats():
    learn = learner(tensor_dls(n_train=8, n_valid=4))
    plain, _ = learn.get_preds(cbs=FourCornerTTA(flip=True))
    cl, _ = learn.get_preds(cbs=[FourCornerTTA(flip=True), Convert(channels_last=True)])
    torch.testing.assert_close(cl, plain, rtol=1e-4, atol=1e-5)
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ref = dataset_stats([x], progress=False)
    for variant in (x.to(torch.bfloat16).float(), x.contiguous(memory_format=torch.channels_last)):
        got = dataset_stats([variant], progress=False)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=5e-3, rtol=0)
    for dtype in (torch.float16, torch.bfloat16):
        views = expand_views(x.to(dtype), 0.5, flip=True)
        assert all(v.dtype == dtype for v in views)
        soft = smooth_targets(torch.tensor([0, 2]), 3, 0.1, dtype=dtype)
        assert soft.dtype == dtype
    loss = LabelSmoothingCE()(torch.randn(4, 10).to(torch.bfloat16), torch.tensor([0, 1, 2, 3]))
    assert torch.isfinite(loss.float())


# --- empty and non-image loaders -----------------------------------------------------------------------


def _outcome(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the outcome is what is compared
        return type(err)
    return None


@pytest.mark.parametrize("name", list(ALL))
def test_an_empty_training_loader_behaves_exactly_as_without_the_callback(name):
    # 3 images in batches of 4 with drop_last: no training batch at all.
    def fit(with_cb):
        learn = learner(tensor_dls(n_train=3, n_valid=4))
        cbs = [ALL[name]()] if with_cb else []
        with learn.no_bar(), learn.no_logging():
            learn.fit(1, cbs=cbs)
        return learn

    assert _outcome(lambda: fit(True)) is _outcome(lambda: fit(False))


def test_an_empty_loader_gives_clear_errors_from_the_functions():
    empty = DataLoader([], bs=4)
    with pytest.raises(ValueError, match="source yielded no data"):
        dataset_stats(empty, progress=False)
    learn = learner(tensor_dls(n_train=3, n_valid=4))
    plain = _outcome(lambda: learn.get_preds(dl=empty))
    assert _outcome(lambda: learn.get_preds(dl=empty, cbs=FourCornerTTA())) is plain


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("mixup", None),  # blending works on any float tensor
        ("manifoldmix", None),
        ("cutmix", r"\(B, C, H, W\) or maps \(B, H, W\), got shape \(4, 5\)"),
        ("resizemix", r"\(B, C, H, W\) or maps \(B, H, W\), got shape \(4, 5\)"),
        ("fmix", r"\(B, C, H, W\) or maps \(B, H, W\), got shape \(4, 5\)"),
        ("progressive_resize", r"4-D image batches .*\(4, 5\)"),
        ("normalization_check", r"image batch .*\(4, 5\)"),
        ("four_corner_tta", r"\(B, C, H, W\), got shape \(4, 5\)"),
    ],
)
def test_a_loader_of_non_image_tensors_raises_naming_the_shape_or_works(name, error):
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 10))
    learn = learner(tensor_dls((5,), n_train=8, n_valid=4), model=model)
    if name == "manifoldmix":
        cb = ManifoldMix(modules=["1"])
    else:
        cb = ALL[name]()

    def go():
        with learn.no_bar(), learn.no_logging():
            if name == "four_corner_tta":
                learn.get_preds(cbs=cb)
            else:
                learn.fit(1, cbs=cb)

    if error is None:
        go()
        assert torch.isfinite(torch.tensor(learn.recorder.values[-1][0]))
    else:
        with pytest.raises(ValueError, match=error):
            go()
        learn.fit(1)  # still usable
    if isinstance(cb, MixCallback):
        assert learn.loss_func.reduction == "mean"


def test_non_image_batches_get_clear_errors_from_the_functions():
    with pytest.raises(ValueError, match=r"source must yield image batches.*\(4, 5\)"):
        dataset_stats([torch.rand(4, 5)], progress=False)
    learn = learner(tensor_dls((5,), n_train=8, n_valid=4), model=nn.Linear(5, 10))
    with pytest.raises(ValueError, match=r"xb must hold an image batch.*\(4, 5\)"):
        check_normalization(learn, torch.rand(4, 5), warn=False)
    with pytest.raises(ValueError, match=r"got shape \(4, 5\)"):
        four_corner_crops(torch.rand(4, 5), 2)
    for box_mix in (mix_ops.cutmix, mix_ops.fmix):
        with pytest.raises(ValueError, match=r"x must be a batch of images .*got shape \(4, 5\)"):
            box_mix(torch.rand(4, 5), 1.0)
    with pytest.raises(ValueError, match=r"x must be a batch of images .*got shape \(4, 5\)"):
        mix_ops.resizemix(torch.rand(4, 5))


def test_manifold_mix_naming_a_module_the_model_lacks_raises_at_fit_naming_modules():
    learn = learner(tensor_dls((5,), n_train=8, n_valid=4), model=nn.Sequential(nn.Linear(5, 10)))
    with pytest.raises(ValueError, match=r"modules must name submodules of learn.model \(Sequential\), got 'body'"):
        with learn.no_bar(), learn.no_logging():
            learn.fit(1, cbs=ManifoldMix(modules=["body"]))


def test_grayscale_and_4_channel_statistics_have_one_value_per_channel():
    for c in (1, 4):
        x = torch.rand(3, c, 8, 8, generator=torch.Generator().manual_seed(c))
        mean, std = dataset_stats([x], progress=False)
        assert len(mean) == len(std) == c
        torch.testing.assert_close(torch.tensor(mean), x.double().mean((0, 2, 3)).float(), atol=1e-6, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = check_normalization(learner(tensor_dls((4, 16, 16)), n_in=4), warn=False)
    # input_channels is None for plain (non-fastai-Tfmd) loaders: the channel probe is best effort.
    assert report.input_channels in (None, 4) and report.model_channels == 4 and len(report.mean) == 4


# --- inputs are never changed in place ---------------------------------------------------------------


class Keep(Callback):
    """Keep each batch tensor the loader produced, and a copy, before any other callback runs."""

    order = -20

    def __init__(self):
        self.kept = []

    def before_batch(self):
        x, y = self.learn.xb[0], self.learn.yb[0]
        self.kept.append((x, x.clone(), y, y.clone()))


@pytest.mark.parametrize("name", list(ALL))
def test_no_callback_changes_the_batch_tensors_it_received_in_place(name):
    keep = Keep()
    run(learner(tensor_dls(n_train=8, n_valid=4)), name, keep)
    assert len(keep.kept) >= 4
    for x, x0, y, y0 in keep.kept:
        assert torch.equal(x, x0) and torch.equal(y, y0)


def test_no_function_changes_its_input_tensors_in_place():
    g = torch.Generator().manual_seed(0)
    x, logits, y = torch.rand(4, 3, 16, 16, generator=g), torch.randn(5, 4, 10, generator=g), torch.tensor([0, 1, 2, 3])
    soft = torch.softmax(torch.randn(4, 10, generator=g), -1)
    originals = [t.clone() for t in (x, logits, y, soft)]
    four_corner_crops(x, 8)
    expand_views(x, 0.5, flip=True, full=True)
    merge_views(logits, "mean")
    batch_moments(x)
    dataset_stats([x], progress=False)
    smooth_targets(y, 10, 0.1)
    smooth_targets(soft, 10, 0.1)
    LabelSmoothingCE()(logits[0], y)
    LabelSmoothingCE()(logits[0], soft)
    check_normalization(learner(tensor_dls((3, 16, 16))), x, warn=False)
    for t, t0 in zip((x, logits, y, soft), originals, strict=True):
        assert torch.equal(t, t0)
