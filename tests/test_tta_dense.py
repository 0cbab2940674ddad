"""Tests for dense (segmentation) four-corner TTA: view geometry, coverage, paste_views and the callback."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import make_segmentation_dls, seed_everything
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import BCEWithLogitsLossFlat, CrossEntropyLossFlat
from fastai.torch_core import TensorImage, TensorMask
from fastai.vision.core import TensorBBox, TensorPoint
from hypothesis import given
from hypothesis import strategies as st
from test_tta import SyncRecorder, _RecordedTTA
from torch import nn

import fastai_tricks.tta as tta_module
import fastai_tricks.tta_views as tta_views_module
from fastai_tricks.tta import (
    FourCornerTTA,
    ViewBox,
    expand_views,
    merge_views,
    paste_views,
    view_boxes,
    view_coverage,
    view_names,
)

# --- strategies ------------------------------------------------------------------------------------

_settings = st.fixed_dictionaries(
    {
        "crop": st.one_of(st.none(), st.floats(0.05, 1.0), st.integers(1, 4)),
        "center": st.booleans(),
        "flip": st.booleans(),
        "full": st.booleans(),
    }
)


def _valid(h: int, w: int, kw: dict) -> bool:
    """Settings that give at least one view and a crop that fits the image."""
    crop = kw["crop"]
    return (crop is not None or kw["full"]) and not (isinstance(crop, int) and crop > min(h, w))


def _covered(h: int, w: int, kw: dict) -> bool:
    return bool((view_coverage(h, w, **kw) > 0).all())


def _pixel_model(c_in: int, c_out: int, seed: int) -> nn.Conv2d:
    """A 1x1 convolution: it works pixel by pixel, so it commutes with crops and flips."""
    torch.manual_seed(seed)
    return nn.Conv2d(c_in, c_out, 1)


# --- geometry ----------------------------------------------------------------------------------------


def test_view_boxes_of_a_4x6_image_are_the_hand_derived_windows():
    boxes = view_boxes(4, 6, 3, flip=True, full=True)
    assert [b.name for b in boxes] == view_names(flip=True, full=True)
    assert [tuple(b[1:5]) for b in boxes[:6]] == [
        (0, 0, 3, 3),
        (0, 3, 3, 3),
        (1, 0, 3, 3),
        (1, 3, 3, 3),
        (0, 2, 3, 3),  # center offset (0.5, 1.5) rounds like torchvision to (0, 2)
        (0, 0, 4, 6),
    ]
    assert [b.view_height for b in boxes] == [4] * 5 + [4] + [4] * 5 + [4]
    assert all(b.flipped for b in boxes[6:]) and not any(b.flipped for b in boxes[:6])
    assert boxes[6] == ViewBox("top_left_flipped", 0, 0, 3, 3, True, 4, 4)


@given(h=st.integers(1, 9), w=st.integers(1, 9), kw=_settings, resize=st.booleans(), seed=st.integers(0, 2**16))
def test_expand_views_cuts_exactly_the_boxes(h, w, kw, resize, seed):
    if not _valid(h, w, kw):
        return
    x = torch.rand(2, 1, h, w, generator=torch.Generator().manual_seed(seed))
    views = expand_views(x, **kw, resize=False)
    boxes = view_boxes(h, w, **kw, resize=False)
    assert len(views) == len(boxes)
    for v, b in zip(views, boxes, strict=True):
        window = x[..., b.top : b.top + b.height, b.left : b.left + b.width]
        assert torch.equal(v, window.flip(-1) if b.flipped else window)
    sized = view_boxes(h, w, **kw, resize=resize)
    assert [tuple(v.shape[-2:]) for v in expand_views(x, **kw, resize=resize)] == [
        (b.view_height, b.view_width) for b in sized
    ]


@given(h=st.integers(1, 9), w=st.integers(1, 9), kw=_settings)
def test_coverage_counts_the_views_that_contain_each_pixel(h, w, kw):
    if not _valid(h, w, kw):
        return
    # Cut the views from an image of pixel indices: each view holds the indices of the pixels it contains.
    index = torch.arange(h * w).view(1, 1, h, w)
    count = torch.zeros(h * w, dtype=torch.int64)
    for v in expand_views(index, **kw, resize=False):
        count[v.flatten()] += 1
    assert torch.equal(view_coverage(h, w, **kw), count.view(h, w))


def test_coverage_of_five_crop_and_ten_crop():
    five = view_coverage(5, 5, 3)
    assert five[2].tolist() == [2, 3, 5, 3, 2] and five.max() == 5 and five.min() == 1
    assert torch.equal(view_coverage(5, 5, 3, flip=True), 2 * five)
    assert torch.equal(view_coverage(5, 7, None, full=True, flip=True), torch.full((5, 7), 2))


# --- paste_views: the equivariance property -----------------------------------------------------------


@given(
    b=st.integers(1, 3),
    h=st.integers(1, 10),
    w=st.integers(1, 10),
    kw=_settings,
    seed=st.integers(0, 2**16),
)
def test_identity_model_gives_back_the_image_exactly(b, h, w, kw, seed):
    if not _valid(h, w, kw):
        return
    x = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))
    views = expand_views(x, **kw, resize=False)
    if not _covered(h, w, kw):
        with pytest.raises(ValueError, match="in no view"):
            paste_views(views, (h, w), **kw, resize=False, mode="logits", activation=None)
        return
    out = paste_views(views, (h, w), **kw, resize=False, mode="logits", activation=None)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.allclose(out, x, atol=1e-6)


@given(
    b=st.integers(1, 3),
    h=st.integers(2, 10),
    w=st.integers(2, 10),
    kw=_settings,
    mode=st.sampled_from(["mean", "gmean", "max", "logits"]),
    activation=st.sampled_from(["softmax", "sigmoid"]),
    seed=st.integers(0, 2**16),
)
def test_pixelwise_model_gives_the_plain_prediction_for_every_mode(b, h, w, kw, mode, activation, seed):
    if not _valid(h, w, kw) or not _covered(h, w, kw):
        return
    model = _pixel_model(3, 4, seed)
    x = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        plain = model(x)
        outs = [model(v) for v in expand_views(x, **kw, resize=False)]
    merged = paste_views(outs, (h, w), **kw, resize=False, mode=mode, activation=activation)
    # The merge's scale: log-probabilities for the softmax probability modes, raw scores otherwise.
    expected = plain.log_softmax(1) if activation == "softmax" and mode != "logits" else plain
    assert torch.allclose(merged, expected, atol=1e-5)


def test_resize_round_trip_is_close_on_a_smooth_image_and_exact_without_rescaling():
    # Bilinear down- and up-sampling is not invertible, so with resize=True the property holds
    # only approximately (smooth images), and exactly when the crop is not rescaled.
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 40), indexing="ij")
    x = torch.stack([torch.sin(3 * xx + yy), torch.cos(2 * yy - xx), xx * yy])[None]
    out = paste_views(expand_views(x, flip=True), (32, 40), flip=True, mode="logits", activation=None)
    assert (out - x).abs().max() < 0.02
    full = paste_views(expand_views(x, 1.0), (32, 40), 1.0, mode="logits", activation=None)
    assert torch.allclose(full, x, atol=1e-6)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("mode", ["mean", "gmean", "max", "logits"])
def test_paste_agrees_with_merge_views_where_every_view_covers_the_pixel(mode, activation):
    # Full view and its flip: every pixel is in both views, so the pixel merge is merge_views per pixel.
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 4, 5, 6, generator=g) * 3
    pasted = paste_views([z[0], z[1]], (5, 6), None, full=True, flip=True, mode=mode, activation=activation)
    stacked = torch.stack([z[0], z[1].flip(-1)]).movedim(2, -1)  # classes last for merge_views
    expected = merge_views(stacked, mode, activation).movedim(-1, 1)
    assert torch.allclose(pasted, expected, atol=1e-5)


def test_softmax_mean_is_the_mean_probability_over_the_covering_views():
    z = torch.tensor([[0.0, 0.0], [1.0, -1.0]]).view(2, 1, 2, 1, 1)  # (V=2, B=1, K=2, 1, 1)
    out = paste_views([z[0], z[1]], (1, 1), None, full=True, flip=True)
    p = (z[0].softmax(1) + z[1].softmax(1)) / 2
    assert torch.allclose(out.exp(), p, atol=1e-6)
    # 1x3 image, 1-pixel corner crops without center: the middle pixel is in no view.
    with pytest.raises(ValueError, match=r"crop=1, center=False, full=False leaves 1 of the 1x3 pixels in no view"):
        paste_views([torch.zeros(1, 2, 1, 1)] * 4, (1, 3), 1, center=False)


def test_five_crop_of_a_3x3_image_weights_each_pixel_by_its_views():
    # Constant outputs per view: view v outputs v everywhere; with 2x2 crops the center pixel is in all 5 views.
    outs = [torch.full((1, 1, 2, 2), float(v)) for v in range(5)]
    out = paste_views(outs, (3, 3), 2, resize=False, mode="logits", activation=None)
    cov = view_coverage(3, 3, 2)
    assert cov.tolist() == [[2, 3, 1], [3, 5, 2], [1, 2, 1]]  # center crop at (0, 0): round(0.5) == 0
    assert out[0, 0, 1, 1] == pytest.approx(2.0)  # (0 + 1 + 2 + 3 + 4) / 5
    assert out[0, 0, 0, 0] == pytest.approx(2.0)  # top_left and center: (0 + 4) / 2
    assert out[0, 0, 2, 2] == pytest.approx(3.0)  # bottom_right only


def test_outputs_smaller_than_the_views_are_resized_to_the_crop():
    # A model with output stride 2: each view's (B, K, h/2, w/2) output is resized to its crop's size.
    outs = [torch.full((2, 3, 4, 4), float(v)) for v in range(5)]
    out = paste_views(outs, (10, 10), 8, resize=False, mode="logits", activation=None)
    assert out.shape == (2, 3, 10, 10)
    assert out[0, 0, 0, 0] == pytest.approx(0.0) and out[0, 0, 9, 9] == pytest.approx(3.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_and_channels_last_outputs(dtype):
    x = torch.randn(2, 3, 8, 8)
    outs = [v.to(dtype).contiguous(memory_format=torch.channels_last) for v in expand_views(x, 0.75, flip=True)]
    before = [o.clone() for o in outs]
    out = paste_views(outs, (8, 8), 0.75, flip=True)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    ref = paste_views([o.float() for o in outs], (8, 8), 0.75, flip=True)
    assert torch.allclose(out, ref, atol=1e-6)
    assert all(torch.equal(o, b) and o.dtype == dtype for o, b in zip(outs, before, strict=True))


def test_stacked_outputs_are_accepted():
    x = torch.randn(1, 2, 6, 6)
    views = torch.stack(expand_views(x, 4, resize=False))
    assert torch.allclose(paste_views(views, (6, 6), 4, resize=False, mode="logits", activation=None), x)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (([torch.zeros(1, 2, 4, 4)] * 4, (4, 4)), {}, ValueError, "outputs has 4 views, but the view settings give 5"),
        (([torch.zeros(1, 2, 4)] * 5, (4, 4)), {}, ValueError, r"view 'top_left' has \(1, 2, 4\)"),
        (
            ([torch.zeros(1, 2, 4, 4)] * 4 + [torch.zeros(1, 3, 4, 4)], (4, 4)),
            {},
            ValueError,
            "B and K of the first view",
        ),
        (([torch.zeros(1, 2, 4, 4)] * 5, (4.0, 4)), {}, TypeError, "image_size must be a pair of ints"),
        (([torch.zeros(1, 2, 4, 4)] * 5, (4, 4)), {"mode": "median"}, ValueError, "mode must be one of"),
        (
            ([torch.zeros(1, 2, 4, 4)] * 5, (4, 4)),
            {"activation": None},
            ValueError,
            "only be merged with mode='logits'",
        ),
        (([torch.zeros(1, 2, 4, 4)] * 5, (4, 4)), {"crop": 9}, ValueError, "bigger than the 4x4 image"),
    ],
)
def test_paste_rejects_bad_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        paste_views(*args, **kwargs)


# --- the callback on dense learners ------------------------------------------------------------------


class _CastTargets(Callback):
    """Give the targets a fastai type, as a typed pipeline would (a list dataset's batches lose it)."""

    order = 5  # before FourCornerTTA's before_batch

    def __init__(self, cls):
        self.cls = cls

    def before_batch(self):
        self.learn.yb = (self.cls(self.learn.yb[0]),)


def _dense_learner(
    model=None, bs=4, n=10, size=16, dtype=torch.float32, target_cls=TensorMask, loss=None, target_shape=None
):
    """A Learner over random images and ``target_cls`` masks (3 classes); the default model is a 1x1 convolution."""
    g = torch.Generator().manual_seed(0)
    xs = TensorImage(torch.rand(n, 3, size, size, generator=g).to(dtype))
    shape = target_shape or (size, size)
    ys = target_cls(torch.randint(0, 3, (n, *shape), generator=g))
    ds = list(zip(xs, ys, strict=True))
    dls = DataLoaders.from_dsets(ds[: n // 2], ds[n // 2 :], bs=bs, device=torch.device("cpu"))
    model = model if model is not None else _pixel_model(3, 3, 0).to(dtype)
    return Learner(dls, model, loss_func=loss or CrossEntropyLossFlat(axis=1), cbs=_CastTargets(target_cls))


@pytest.mark.parametrize("bs", [1, 2])
@pytest.mark.parametrize(
    "kw", [{"flip": True}, {"crop": 10, "center": False}, {"crop": None, "full": True, "flip": True}]
)
def test_pixelwise_learner_gets_its_plain_prediction_and_untouched_targets(bs, kw):
    learn = _dense_learner(bs=bs)
    inp, plain, targs = learn.get_preds(with_input=True)
    inp_tta, preds, targs_tta = learn.get_preds(cbs=FourCornerTTA(resize=False, **kw), with_input=True)
    assert preds.shape == plain.shape == (5, 3, 16, 16)
    assert torch.allclose(preds, plain, atol=1e-5)
    assert torch.equal(inp_tta, inp) and torch.equal(targs_tta, targs)


@pytest.mark.parametrize("budget", [None, 4 * 16 * 16])
def test_dense_default_path_gives_what_every_explicit_path_gives(monkeypatch, budget):
    # None: the tiny batches fit the CPU budget, all views at once; 4 * 16 * 16: one view per forward.
    if budget is not None:
        monkeypatch.setattr(tta_views_module, "_CPU_PIXELS_PER_FORWARD", budget)
    learn = _dense_learner(model=nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1)))
    auto, _ = learn.get_preds(cbs=FourCornerTTA(flip=True))
    for k in (1, 10):
        explicit, _ = learn.get_preds(cbs=FourCornerTTA(flip=True, max_views_per_batch=k))
        assert torch.allclose(explicit, auto, atol=1e-6)


def test_callback_matches_a_manual_paste_and_never_modifies_the_batch():
    learn = _dense_learner(model=nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1)))
    inp, _, targs = learn.get_preds(with_input=True)
    # with_input records the batch after FourCornerTTA put it back: modified in place, it would differ.
    inp_tta, preds, targs_tta = learn.get_preds(cbs=FourCornerTTA(flip=True), with_input=True)
    assert torch.equal(inp_tta, inp) and torch.equal(targs_tta, targs)
    with torch.no_grad():
        outs = [learn.model(v) for v in expand_views(inp, flip=True)]
    ref = paste_views(outs, (16, 16), flip=True).softmax(1)
    assert torch.allclose(preds, ref, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_dense_model_keeps_its_dtype(dtype):
    learn = _dense_learner(dtype=dtype)
    plain, _ = learn.get_preds()
    preds, _ = learn.get_preds(cbs=FourCornerTTA(resize=False, flip=True))
    assert preds.dtype == plain.dtype == dtype and preds.shape == plain.shape
    assert torch.allclose(preds.float(), plain.float(), atol=0.02)


def test_channels_last_dense_model_keeps_its_memory_format():
    learn = _dense_learner()
    seen = []

    class Probe(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x).contiguous(memory_format=torch.channels_last)

    class Record(Callback):  # runs after FourCornerTTA's after_pred
        order = 20

        def after_pred(self):
            seen.append(self.learn.pred.is_contiguous(memory_format=torch.channels_last))

    learn.model = Probe(learn.model)
    contiguous, _ = _dense_learner().get_preds(cbs=FourCornerTTA(flip=True))
    channels_last, _ = learn.get_preds(cbs=[FourCornerTTA(flip=True), Record()])
    assert seen and all(seen)
    assert torch.allclose(channels_last, contiguous, atol=1e-5)


def test_sigmoid_loss_and_strided_outputs():
    # Multi-label masks (B, K, H, W) with BCE; a model with output stride 2 gives (B, K, 8, 8).
    model = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(3, 3, 1))
    learn = _dense_learner(
        model=model,
        target_cls=lambda t: TensorMask((t > 0).float()),
        loss=BCEWithLogitsLossFlat(),
        target_shape=(3, 8, 8),
    )
    plain, _ = learn.get_preds()
    preds, targs = learn.get_preds(cbs=FourCornerTTA(crop=8, resize=False))
    assert preds.shape == plain.shape == targs.shape == (5, 3, 8, 8)
    assert ((preds > 0) & (preds < 1)).all()
    # Bilinear up to the crop and area down again is close to, not exactly, the plain prediction.
    assert (preds - plain).abs().max() < 0.1


def test_points_and_boxes_are_refused_with_the_reason():
    for cls in (TensorPoint, TensorBBox):
        learn = _dense_learner(target_cls=lambda t, cls=cls: cls(t[..., :2].float()), target_shape=(4, 4))
        with pytest.raises(ValueError, match="points and boxes are coordinates, not per-pixel scores"):
            learn.get_preds(cbs=FourCornerTTA())


def test_uncovered_pixels_raise_at_the_first_batch_with_the_settings():
    learn = _dense_learner()
    with pytest.raises(ValueError, match=r"crop=4, center=False, full=False leaves \d+ of the 16x16 pixels"):
        learn.get_preds(cbs=FourCornerTTA(crop=4, center=False))


def test_output_of_an_unpasteable_size_is_refused():
    learn = _dense_learner(model=nn.Conv2d(3, 3, 3), target_shape=(14, 14))  # no padding: 16 -> 14
    with pytest.raises(ValueError, match="integer stride"):
        learn.get_preds(cbs=FourCornerTTA())


# --- unet_learner on generated segmentation data -----------------------------------------------------


@pytest.fixture(scope="module")
def fake_segmentation(tmp_path_factory):
    from fastai_tricks.data import make_fake_segmentation

    return make_fake_segmentation(tmp_path_factory.mktemp("seg"), n_train=8, n_valid=6, size=32, seed=0)


def _tiny_encoder(pretrained=False):
    from fastai.vision.all import ConvLayer

    return nn.Sequential(
        ConvLayer(3, 8, stride=2), ConvLayer(8, 16, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2)
    )


def test_unet_learner_validates_and_predicts_with_dense_tta(fake_segmentation):
    from fastai.vision.all import DiceMulti, foreground_acc, unet_learner

    seed_everything(0)
    dls, codes = make_segmentation_dls(fake_segmentation)
    learn = unet_learner(dls, _tiny_encoder, pretrained=False, n_out=len(codes), metrics=[DiceMulti(), foreground_acc])
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2)
        loss, dice, fg = learn.validate(cbs=FourCornerTTA(flip=True))
        (preds, _), targs = learn.four_corner_tta(flip=True, beta=None)
        plain, plain_targs = learn.get_preds()
        blended, _ = learn.four_corner_tta(beta=0.5)
        five, _ = learn.get_preds(cbs=FourCornerTTA())
    n = len(dls.valid_ds)
    assert preds.shape == (n, len(codes), 32, 32) and targs.shape == (n, 32, 32)
    assert torch.allclose(preds.sum(1), torch.ones(n, 32, 32), atol=1e-5)
    assert torch.equal(targs, plain_targs)
    assert loss == pytest.approx(F.nll_loss(preds.log(), targs.long()).item(), rel=1e-4)
    fg_mask = targs != 0  # one validation batch, so fastai's per-batch mean is this pooled one
    assert fg == pytest.approx((preds.argmax(1)[fg_mask] == targs[fg_mask]).float().mean().item(), abs=1e-6)
    assert 0.0 <= dice <= 1.0
    assert torch.allclose(blended, torch.lerp(five, plain, 0.5), atol=1e-6)
    assert not any(isinstance(cb, FourCornerTTA) for cb in learn.cbs)


# --- learn.four_corner_tta on dense outputs, and no device-to-host sync per batch ------------------------


def test_dense_four_corner_tta_returns_learn_tta_pair_and_blend():
    learn = _dense_learner()
    plain, targs = learn.get_preds()
    (aug_preds, preds), targs2 = learn.four_corner_tta(beta=None, flip=True, resize=False)
    assert aug_preds.shape == preds.shape == (5, 3, 16, 16) and torch.equal(targs2, targs)
    # A pixelwise model commutes with the views: the pasted TTA prediction is the plain one.
    assert torch.allclose(preds, plain, atol=1e-6) and torch.allclose(aug_preds, plain, atol=1e-5)
    blended, _ = learn.four_corner_tta(beta=0.5, flip=True, resize=False)
    assert torch.allclose(blended, torch.lerp(aug_preds, preds, 0.5), atol=1e-6)


@pytest.mark.parametrize(
    ("mode", "activation"), [("mean", "softmax"), ("mean", "sigmoid"), ("gmean", "softmax"), ("max", "softmax")]
)
def test_paste_views_reads_nothing_back_from_the_device(monkeypatch, mode, activation):
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    outs = expand_views(x, 8, flip=True)
    rec = SyncRecorder(monkeypatch)
    with rec:
        merged = paste_views(outs, (12, 12), 8, flip=True, mode=mode, activation=activation)
    assert merged.shape == (2, 3, 12, 12)
    # The coverage is built where the outputs are, and the uncovered-pixel check runs on NumPy.
    assert rec.seen == Counter(), rec.seen


def test_dense_four_corner_tta_with_beta_reads_nothing_back_per_batch(monkeypatch):
    model = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(3, 3, 1))  # output stride 2
    learn = _dense_learner(model=model, target_shape=(8, 8))
    _RecordedTTA.recorder = rec = SyncRecorder(monkeypatch)
    monkeypatch.setattr(tta_module, "FourCornerTTA", _RecordedTTA)
    blended, targs = learn.four_corner_tta(beta=0.25, flip=True, crop=8)
    assert blended.shape == (5, 3, 8, 8) and targs.shape == (5, 8, 8)
    assert rec.seen == Counter(), rec.seen
