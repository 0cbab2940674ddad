"""Tests for test-size resizing (FixRes): the maths, the callback on every evaluation path, BatchNorm recalibration."""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch
from conftest import make_segmentation_dls, make_tiny_dls, seed_everything, tiny_cnn
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fastai_tricks.tta  # noqa: F401 - patches Learner.four_corner_tta
from fastai_tricks import (
    FourCornerTTA,
    TestSize,
    crop_magnification,
    fixres_test_size,
    recalibrate_batchnorm,
    zoom_magnification,
)
from fastai_tricks.fixres import _CallLoader, _snap, _val_margin

RATIOS = st.sampled_from([(3 / 4, 4 / 3), (1.0, 1.0), (1 / 2, 2.0), (0.9, 1.1)])
SCALES = st.floats(0.01, 1.0, allow_nan=False)


# --- the maths ---------------------------------------------------------------------------------------


@given(
    a=SCALES,
    b=SCALES,
    train=st.integers(8, 512),
    ratio=RATIOS,
    image_ratio=st.sampled_from([1.0, 4 / 3, 0.5, 3.0]),
    val_xtra=st.sampled_from([0.0, 0.14]),
    multiple_of=st.sampled_from([1, 4, 8, 32]),
)
def test_test_size_never_grows_with_min_scale(a, b, train, ratio, image_ratio, val_xtra, multiple_of):
    lo, hi = sorted((a, b))
    kw = dict(ratio=ratio, image_ratio=image_ratio, val_xtra=val_xtra, multiple_of=multiple_of)
    # A smaller min_scale shows smaller crops, so larger objects in training: a larger test size.
    assert (
        crop_magnification(lo, ratio=ratio, image_ratio=image_ratio)
        >= crop_magnification(hi, ratio=ratio, image_ratio=image_ratio) - 1e-9  # closed forms in floating point
    )
    assert fixres_test_size(train, lo, **kw) >= fixres_test_size(train, hi, **kw)


@given(train=st.integers(1, 2048), ratio=RATIOS, multiple_of=st.integers(1, 64))
def test_no_crop_means_the_training_size(train, ratio, multiple_of):
    assert crop_magnification(1.0, 1.0, ratio) == 1.0
    assert fixres_test_size(train, 1.0, ratio=ratio, multiple_of=multiple_of) == train


@given(a=SCALES, b=SCALES)
def test_square_crops_have_the_closed_form(a, b):
    lo, hi = sorted((a, b))
    # aug_transforms' RandomResizedCropGPU: ratio (1, 1) on a square image never rejects: E[s^-1/2] = 2 / (√a + √b).
    assert crop_magnification(lo, hi, (1, 1)) == pytest.approx(2 / (math.sqrt(lo) + math.sqrt(hi)), rel=1e-9)
    assert crop_magnification(lo, hi, (1, 1)) >= 1.0


@given(
    train=st.integers(8, 400),
    target_factor=st.floats(0.5, 3.0),
    val_xtra=st.sampled_from([0.0, 0.14, 0.3]),
    valid_scale=st.sampled_from([1.0, 0.875]),
    multiple_of=st.sampled_from([1, 8]),
)
def test_snapped_size_is_the_closest_candidate(train, target_factor, val_xtra, valid_scale, multiple_of):
    target = train * target_factor
    t = _snap(target, train, val_xtra, valid_scale, multiple_of)

    def err(side):
        return abs((side + _val_margin(side, val_xtra)) / valid_scale - target)

    assert t == train or t % multiple_of == 0
    candidates = [train, *range(multiple_of, 8 * train + 64, multiple_of)]
    assert err(t) <= min(err(c) for c in candidates) + 1e-9


@pytest.mark.parametrize(
    ("image", "min_scale", "ratio"),
    [((400, 400), 0.08, (3 / 4, 4 / 3)), ((600, 400), 0.35, (3 / 4, 4 / 3)), ((800, 200), 0.5, (3 / 4, 4 / 3))],
)
def test_crop_magnification_matches_fastais_item_sampler(image, min_scale, ratio):
    from fastai.vision.augment import RandomResizedCrop
    from PIL import Image

    random.seed(0)
    tfm, img, n = RandomResizedCrop(32, min_scale=min_scale, ratio=ratio), Image.new("RGB", image), 20_000
    total = 0.0
    for _ in range(n):
        tfm.before_call(img, 0)
        total += math.sqrt(image[0] * image[1] / (tfm.cp_size[0] * tfm.cp_size[1]))
    exact = crop_magnification(min_scale, 1.0, ratio, image_ratio=image[0] / image[1])
    assert total / n == pytest.approx(exact, rel=0.01)


def test_crop_magnification_matches_fastais_batch_sampler():
    from fastai.vision.augment import RandomResizedCropGPU

    random.seed(0)
    tfm, x, n = RandomResizedCropGPU(32, min_scale=0.2, ratio=(3 / 4, 4 / 3)), torch.zeros(1, 3, 300, 300), 20_000
    total = 0.0
    for _ in range(n):
        tfm.before_call(x, 0)
        total += math.sqrt(300 * 300 / (tfm.cp_size[0] * tfm.cp_size[1]))
    assert total / n == pytest.approx(crop_magnification(0.2), rel=0.01)


def test_zoom_magnification_matches_fastais_zoom():
    from fastai.vision.augment import zoom_mat

    torch.manual_seed(0)
    mat = zoom_mat(torch.zeros(50_000, 1), min_zoom=1.0, max_zoom=1.2, p=0.75)
    assert float((1 / mat[:, 0, 0]).mean()) == pytest.approx(zoom_magnification(1.0, 1.2, 0.75), rel=2e-3)
    assert zoom_magnification(1.0, 1.0, 1.0) == 1.0 and zoom_magnification(1.0, 1.1, 0.0) == 1.0


def test_validation_margin_lowers_the_test_size():
    # fastai's item RandomResizedCrop centre-crops 32 of 40 px in validation: objects look larger there.
    assert fixres_test_size(32, 1.0, val_xtra=0.14) == 24
    assert fixres_test_size(224, 0.08, val_xtra=0.14) < fixres_test_size(224, 0.08)
    assert fixres_test_size(224, 0.08, multiple_of=32) % 32 == 0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(train_size=0, min_scale=0.5), "train_size"),
        (dict(train_size=32, min_scale=0.0), "min_scale"),
        (dict(train_size=32, min_scale=1.5), "min_scale"),
        (dict(train_size=32, min_scale=float("nan")), "min_scale"),
        (dict(train_size=32, min_scale=0.5, max_scale=0.4), "max_scale"),
        (dict(train_size=32, min_scale=0.5, ratio=(4 / 3, 3 / 4)), "ratio"),
        (dict(train_size=32, min_scale=0.5, ratio=(0.0, 1.0)), "ratio"),
        (dict(train_size=32, min_scale=0.5, zoom=0.0), "zoom"),
        (dict(train_size=32, min_scale=0.5, val_xtra=-0.1), "val_xtra"),
        (dict(train_size=32, min_scale=0.5, valid_scale=1.5), "valid_scale"),
        (dict(train_size=32, min_scale=0.5, image_ratio=float("inf")), "image_ratio"),
        (dict(train_size=32, min_scale=0.5, multiple_of=0), "multiple_of"),
    ],
)
def test_fixres_test_size_rejects_bad_input(kwargs, name):
    with pytest.raises(ValueError, match=name):
        fixres_test_size(**kwargs)


def test_zoom_magnification_rejects_bad_input():
    with pytest.raises(ValueError, match="max_zoom"):
        zoom_magnification(1.2, 1.1)
    with pytest.raises(ValueError, match="p"):
        zoom_magnification(1.0, 1.1, 1.5)


# --- the callback's arguments ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, -3, 0.0, -1.5, float("nan"), float("inf"), "big"])
def test_bad_size_is_a_value_error_naming_size(size):
    with pytest.raises(ValueError, match="size"):
        TestSize(size)


@pytest.mark.parametrize("size", [True, [32, 32], None])
def test_size_of_another_type_is_a_type_error(size):
    with pytest.raises(TypeError, match="size"):
        TestSize(size)


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="recalibrate_bn"):
        TestSize(1.1, recalibrate_bn=-1)
    with pytest.raises(ValueError, match="mode"):
        TestSize(1.1, mode="cubic")


# --- helpers -----------------------------------------------------------------------------------------


class ShapeRecorder(nn.Module):
    """Wraps a model and records the shape of every input it sees."""

    def __init__(self, model: nn.Module, fail_at: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.model, self.fail_at, self.shapes = model, fail_at, []

    def forward(self, x):
        self.shapes.append(tuple(x.shape[-2:]))
        if self.fail_at is not None and tuple(x.shape[-len(self.fail_at) :]) == self.fail_at:
            raise RuntimeError("the model broke")
        return self.model(x)


def _learner(dls, fail_at=None):
    from fastai.vision.all import CrossEntropyLossFlat, Learner, accuracy

    seed_everything(0)
    return Learner(dls, ShapeRecorder(tiny_cnn(), fail_at), loss_func=CrossEntropyLossFlat(), metrics=accuracy)


def loader_state(dls):
    """Everything about the loaders' pipelines that TestSize could change: the objects and their sizes."""
    state = []
    for dl in (dls.train, dls.valid):
        for name in ("after_item", "after_batch"):
            pipeline = getattr(dl, name)
            state.append((name, id(pipeline), pipeline.split_idx))
            # fastai's own passes set a shared transform's split_idx; its settings (repr) are what must not change.
            state += [(id(t), repr(t), repr(getattr(t, "size", None))) for t in pipeline.fs]
    return state


def model_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(before, model):
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k


@pytest.fixture
def learn(tiny_dls):
    return _learner(tiny_dls)


# --- every evaluation path ---------------------------------------------------------------------------


def test_size_one_is_plain_evaluation(learn):
    with learn.no_bar(), learn.no_logging():
        plain, targs = learn.get_preds()
        same, same_targs = learn.get_preds(cbs=TestSize(1.0))
    assert torch.equal(plain, same) and torch.equal(targs, same_targs)


@pytest.mark.parametrize(("size", "expected"), [(40, (40, 40)), (1.5, (48, 48)), (0.75, (24, 24))])
def test_get_preds_and_validate_run_at_the_test_size(learn, size, expected):
    before = loader_state(learn.dls)
    cb = TestSize(size)
    with learn.no_bar(), learn.no_logging():
        preds, targs = learn.get_preds(cbs=cb)
        assert set(learn.model.shapes) == {expected}
        learn.model.shapes.clear()
        learn.validate(cbs=TestSize(size))
    assert set(learn.model.shapes) == {expected}
    assert cb.evaluated_size == expected and cb.plain_size == (32, 32)
    assert preds.shape == (len(learn.dls.valid_ds), learn.dls.c)
    assert loader_state(learn.dls) == before
    assert not isinstance(learn.dl, _CallLoader) and cb not in learn.cbs


def test_predict_tta_and_four_corner_tta_run_at_the_test_size(learn):
    before = loader_state(learn.dls)
    with learn.no_bar(), learn.no_logging(), learn.added_cbs(TestSize(40)):
        learn.predict(learn.dls.valid_ds.items[0])
        assert set(learn.model.shapes) == {(40, 40)}
        learn.model.shapes.clear()
        preds, _ = learn.tta(n=2)
        assert set(learn.model.shapes) == {(40, 40)}
        learn.model.shapes.clear()
        # The views are cut from the 40 px image and resized back to its side.
        (aug, plain), _ = learn.four_corner_tta(beta=None)
        assert set(learn.model.shapes) == {(40, 40)}
        learn.model.shapes.clear()
        learn.validate(cbs=FourCornerTTA(crop=32, resize=False))
        assert set(learn.model.shapes) == {(32, 32)}
    assert aug.shape == plain.shape == preds.shape
    assert loader_state(learn.dls) == before


def test_loader_without_size_fixing_transform_is_interpolated(fake_imagenette):
    from fastai.vision.all import RandomCrop

    seed_everything(0)
    dls = make_tiny_dls(fake_imagenette, item_tfms=RandomCrop(32))  # fixes the size, but is not a resize
    learn = _learner(dls)
    cb = TestSize(1.25)
    with learn.no_bar(), learn.no_logging():
        learn.get_preds(cbs=cb)
        assert set(learn.model.shapes) == {(40, 40)}
        b = dls.valid.one_batch()
        learn.model.shapes.clear()
        learn.get_preds(dl=[b], cbs=TestSize(0.5))  # a list of batches, as show_results passes
    assert set(learn.model.shapes) == {(16, 16)}
    assert cb.plain_size == (32, 32) and cb.evaluated_size == (40, 40)


def test_draft_decoding_follows_the_copied_item_transform(fake_imagenette, monkeypatch):
    from fastai.vision.all import CategoryBlock, DataBlock, GrandparentSplitter, Resize, get_image_files, parent_label

    import fastai_tricks.draft as draft
    from fastai_tricks import DraftImageBlock

    needs = []
    real = draft.draft_reduction
    monkeypatch.setattr(draft, "draft_reduction", lambda size, needed: needs.append(needed) or real(size, needed))
    block = DataBlock(
        blocks=(DraftImageBlock, CategoryBlock),
        get_items=get_image_files,
        get_y=parent_label,
        splitter=GrandparentSplitter(valid_name="val"),
        item_tfms=Resize(16),
    )
    learn = _learner(block.dataloaders(fake_imagenette, bs=8, num_workers=0))
    with learn.no_bar(), learn.no_logging():
        learn.get_preds()
        assert set(needs) == {(16, 16)}
        needs.clear()
        learn.get_preds(cbs=TestSize(0.5))
    assert set(needs) == {(8, 8)} and set(learn.model.shapes) == {(16, 16), (8, 8)}


def test_presized_batch_pipeline_scales_item_and_batch_sizes(fake_imagenette):
    from fastai.vision.all import Resize, aug_transforms

    seed_everything(0)
    dls = make_tiny_dls(fake_imagenette, item_tfms=Resize(40), batch_tfms=aug_transforms(size=32, min_scale=0.75))
    learn = _learner(dls)
    before = loader_state(dls)
    cb = TestSize("auto")
    with learn.no_bar(), learn.no_logging():
        learn.get_preds(cbs=cb)
    expected = fixres_test_size(32, 0.75, ratio=(1, 1), zoom=zoom_magnification(1.0, 1.1, 0.75))
    assert cb.evaluated_size == (expected, expected) and expected > 32
    assert set(learn.model.shapes) == {(expected, expected)}
    assert any("RandomResizedCropGPU" in f for f in cb.auto_found) and any("Zoom" in f for f in cb.auto_found)
    assert loader_state(dls) == before


def test_auto_reads_an_item_random_resized_crop(fake_imagenette):
    from fastai.vision.all import RandomResizedCrop

    seed_everything(0)
    dls = make_tiny_dls(fake_imagenette, item_tfms=RandomResizedCrop(32, min_scale=0.35))
    learn = _learner(dls)
    cb = TestSize()
    with learn.no_bar(), learn.no_logging():
        learn.get_preds(cbs=cb)
    expected = fixres_test_size(32, 0.35, val_xtra=0.14)
    assert cb.evaluated_size == (expected, expected)
    assert set(learn.model.shapes) == {(expected, expected)}


def test_auto_without_crop_settings_warns_and_uses_the_training_size(learn):
    with learn.no_bar(), learn.no_logging(), pytest.warns(UserWarning, match="found no RandomResizedCrop"):
        plain, _ = learn.get_preds()
        cb = TestSize("auto")
        same, _ = learn.get_preds(cbs=cb)
    assert torch.equal(plain, same) and cb.evaluated_size == (32, 32) and cb.auto_found == []


def test_attached_during_fit_only_validation_changes_size(learn):
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3, cbs=TestSize(40, recalibrate_bn=1))
    n_train = len(learn.dls.train)
    assert set(learn.model.shapes[:n_train]) == {(32, 32)}
    assert set(learn.model.shapes[n_train:]) == {(40, 40)}


# --- bad input at evaluation time --------------------------------------------------------------------


def test_test_size_below_a_tta_crop_is_refused(learn):
    before = loader_state(learn.dls)
    with learn.no_bar(), learn.no_logging(), learn.added_cbs(TestSize(24)):
        with pytest.raises(ValueError, match="size=24.*crop=28"):
            learn.four_corner_tta(crop=28)
        learn.four_corner_tta(crop=20)  # a crop inside the test size is fine
    assert loader_state(learn.dls) == before and not isinstance(learn.dl, _CallLoader)


def test_size_under_one_pixel_is_refused(learn):
    with learn.no_bar(), learn.no_logging(), pytest.raises(ValueError, match="size=0.01"):
        learn.get_preds(cbs=TestSize(0.01))


def test_dense_output_is_refused(tiny_dls):
    from fastai.vision.all import CrossEntropyLossFlat, Learner

    dense = nn.Sequential(nn.Conv2d(3, tiny_dls.c, 1))  # one score map per class: (B, K, H, W)
    learn = Learner(tiny_dls, dense, loss_func=CrossEntropyLossFlat(axis=1))
    before = loader_state(tiny_dls)
    with learn.no_bar(), learn.no_logging(), pytest.raises(ValueError, match="dense outputs"):
        learn.get_preds(cbs=TestSize(1.25))
    assert loader_state(tiny_dls) == before and not isinstance(learn.dl, _CallLoader)


def test_segmentation_masks_are_refused(tmp_path):
    from fastai.vision.all import CrossEntropyLossFlat, Learner

    from fastai_tricks import make_fake_segmentation

    dls, codes = make_segmentation_dls(make_fake_segmentation(tmp_path, n_train=4, n_valid=4, size=32, seed=0))
    learn = Learner(dls, nn.Conv2d(3, len(codes), 1), loss_func=CrossEntropyLossFlat(axis=1))
    with learn.no_bar(), learn.no_logging(), pytest.raises(ValueError, match="dense targets"):
        learn.validate(cbs=TestSize(1.25))


# --- exceptions leave nothing behind -----------------------------------------------------------------


def test_an_exception_mid_evaluation_leaves_loaders_and_model_untouched(tiny_dls):
    learn = _learner(tiny_dls, fail_at=(40, 40))
    before, weights = loader_state(tiny_dls), model_state(learn.model)
    with learn.no_bar(), learn.no_logging():
        with pytest.raises(RuntimeError, match="the model broke"):  # while recalibrating
            learn.get_preds(cbs=TestSize(40, recalibrate_bn=2))
        learn.model.fail_at = (4, 3, 40, 40)  # at the last validation batch, after recalibrating
        with pytest.raises(RuntimeError, match="the model broke"):
            learn.get_preds(cbs=TestSize(40, recalibrate_bn=1))
        learn.model.fail_at = (40, 40)
        with pytest.raises(RuntimeError, match="the model broke"), learn.added_cbs(TestSize(40)):
            learn.tta(n=1)
    assert loader_state(tiny_dls) == before and not isinstance(learn.dl, _CallLoader)
    assert_same_state(weights, learn.model)
    assert not any(isinstance(cb, TestSize) for cb in learn.cbs)


def test_an_attached_callback_puts_state_back_at_the_next_evaluation(learn):
    from fastai.callback.core import Callback

    class Snapshot(Callback):
        order = 100

        def after_train(self):
            self.state = model_state(self.learn.model)

    # A training fit whose validation raises fires neither after_fit nor a removal: the next before_fit cleans up.
    snap, cb = Snapshot(), TestSize(40, recalibrate_bn=1)
    learn.add_cbs([snap, cb])
    learn.model.fail_at = (4, 3, 40, 40)  # the last validation batch (20 images, bs 8), not the calibration batch
    with learn.no_bar(), learn.no_logging():
        with pytest.raises(RuntimeError, match="the model broke"):
            learn.fit(1, 1e-2)
        bn = next(k for k in snap.state if k.endswith("running_mean"))
        assert not torch.equal(learn.model.state_dict()[bn], snap.state[bn])  # left recalibrated by the crash
        learn.model.fail_at = None
        learn.validate()
    assert_same_state(snap.state, learn.model)
    learn.remove_cbs([snap, cb])


# --- BatchNorm recalibration -------------------------------------------------------------------------


def test_recalibration_changes_only_running_statistics_and_puts_them_back(learn):
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2)
    weights = model_state(learn.model)
    bn = next(m for m in learn.model.modules() if isinstance(m, nn.BatchNorm2d))
    trained_mean, seen = bn.running_mean.clone(), []
    with learn.no_bar(), learn.no_logging():
        plain, _ = learn.get_preds(cbs=TestSize(1.25))
        hook = learn.model.register_forward_pre_hook(lambda m, a: seen.append(bn.running_mean.clone()))
        recal, _ = learn.get_preds(cbs=TestSize(1.25, recalibrate_bn=2))
        hook.remove()
    assert not torch.equal(seen[-1], trained_mean)  # the last batch was scored with recalibrated statistics
    assert not torch.allclose(plain, recal)
    assert_same_state(weights, learn.model)  # every parameter and buffer bit-identical afterwards


def test_recalibrate_batchnorm_is_a_cumulative_average_and_restores_modes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.Dropout(0.5), nn.Linear(4, 4))
    model.train()
    model[3].eval()
    modes = [m.training for m in model.modules()]
    params = [p.detach().clone() for p in model.parameters()]
    batches = [torch.randn(4, 2, 4, 4) + i for i in range(3)]
    assert recalibrate_batchnorm(model, iter(batches), max_batches=2) == 2
    with torch.no_grad():
        feats = [model[0](b) for b in batches[:2]]
    expected = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    assert torch.allclose(model[1].running_mean, expected, atol=1e-6)
    assert model[1].momentum == 0.1 and [m.training for m in model.modules()] == modes
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters(), strict=True))


def test_recalibrate_batchnorm_leaves_no_state_behind_on_an_exception():
    class Breaks(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.calls = nn.BatchNorm2d(2), 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("broke on the second batch")
            return self.bn(x)

    model = Breaks().eval()
    model.bn.running_mean.fill_(3.0)
    saved = model_state(model)
    with pytest.raises(RuntimeError, match="second batch"):
        recalibrate_batchnorm(model, [torch.randn(2, 2, 3, 3) for _ in range(3)])
    assert_same_state(saved, model)
    assert not model.training and not model.bn.training and model.bn.momentum == 0.1
    with pytest.raises(ValueError, match="batches"):
        recalibrate_batchnorm(nn.BatchNorm2d(2), [])
    with pytest.raises(ValueError, match="max_batches"):
        recalibrate_batchnorm(nn.BatchNorm2d(2), [], max_batches=0)


def test_recalibration_without_batchnorm_warns(tiny_dls):
    from fastai.vision.all import CrossEntropyLossFlat, Learner

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, tiny_dls.c))
    learn = Learner(tiny_dls, model, loss_func=CrossEntropyLossFlat())
    with learn.no_bar(), learn.no_logging(), pytest.warns(UserWarning, match="no BatchNorm"):
        learn.get_preds(cbs=TestSize(1.25, recalibrate_bn=1))


def test_export_with_the_callback_attached(learn, tmp_path):
    from fastai.learner import load_learner

    learn.add_cb(TestSize(40))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learn.export(tmp_path / "export.pkl")
        loaded = load_learner(tmp_path / "export.pkl")
    cb = next(c for c in loaded.cbs if isinstance(c, TestSize))
    assert cb.size == 40 and cb.recalibrate_bn == 0
