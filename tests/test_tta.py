"""Tests for fastai_tricks.tta: exact crops, hand-computed merges, and the callback on real Learners."""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_dls, seed_everything, tiny_cnn
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.learner import Learner, load_learner
from fastai.losses import BCEWithLogitsLossFlat, CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat, MSELossFlat
from fastai.vision.core import PILImageBW
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fastai_tricks.tta as tta_module
import fastai_tricks.tta_views as tta_views_module
from fastai_tricks.host_syncs import HostSyncCounter, counting_host_syncs
from fastai_tricks.tta import (
    FourCornerTTA,
    _activation_kind,
    _chunk,
    expand_views,
    four_corner_crops,
    merge_views,
    view_names,
)

# --- four_corner_crops -----------------------------------------------------------------------------


def test_one_pixel_crops_of_5x5_arange_are_pixels_0_4_20_24_12():
    x = torch.arange(25.0).view(1, 1, 5, 5)
    crops = four_corner_crops(x, 1)
    assert crops.shape == (5, 1, 1, 1, 1)
    assert crops.flatten().tolist() == [0.0, 4.0, 20.0, 24.0, 12.0]


def test_crops_of_non_square_image_are_the_hand_derived_windows():
    # 4x6 image, 3x3 crops: corners at rows 0/1 and cols 0/3; center offset rounds (0.5, 1.5) to (0, 2).
    x = torch.arange(24.0).view(1, 1, 4, 6)
    tl, tr, bl, br, c = (crop[0, 0] for crop in four_corner_crops(x, 3))
    assert tl.tolist() == [[0, 1, 2], [6, 7, 8], [12, 13, 14]]
    assert tr.tolist() == [[3, 4, 5], [9, 10, 11], [15, 16, 17]]
    assert bl.tolist() == [[6, 7, 8], [12, 13, 14], [18, 19, 20]]
    assert br.tolist() == [[9, 10, 11], [15, 16, 17], [21, 22, 23]]
    assert c.tolist() == [[2, 3, 4], [8, 9, 10], [14, 15, 16]]


def test_float_size_is_a_fraction_of_the_short_side():
    x = torch.rand(2, 3, 8, 12)
    assert four_corner_crops(x, 0.5).shape == (5, 2, 3, 4, 4)
    full = four_corner_crops(x[..., :8], 1.0)
    assert all(torch.equal(v, x[..., :8]) for v in full)


def test_crop_bigger_than_image_raises_naming_both_sizes():
    with pytest.raises(ValueError, match=r"7x7 crop, bigger than the 6x8 image"):
        four_corner_crops(torch.rand(1, 3, 6, 8), 7)


@pytest.mark.parametrize(
    ("size", "error"), [(0, ValueError), (-2, ValueError), (0.0, ValueError), (1.5, ValueError), (True, TypeError)]
)
def test_bad_crop_size_raises(size, error):
    with pytest.raises(error, match=r"^size must be"):
        four_corner_crops(torch.rand(1, 3, 8, 8), size)


def test_crops_need_a_4d_batch():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\).*\(3, 8, 8\)"):
        four_corner_crops(torch.rand(3, 8, 8), 4)


@given(
    b=st.integers(1, 3),
    c=st.integers(1, 4),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    frac=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16),
)
def test_crops_are_the_corner_windows_for_any_shape(b, c, h, w, frac, seed):
    x = torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))
    crops = four_corner_crops(x, frac)
    s = crops.shape[-1]
    assert crops.shape == (5, b, c, s, s) and 1 <= s <= min(h, w)
    assert torch.equal(crops[0], x[..., :s, :s])
    assert torch.equal(crops[1], x[..., :s, w - s :])
    assert torch.equal(crops[2], x[..., h - s :, :s])
    assert torch.equal(crops[3], x[..., h - s :, w - s :])


# --- expand_views -------------------------------------------------------------------------------------


def test_views_follow_view_names_and_flips_mirror_each_view():
    x = torch.rand(2, 3, 8, 8)
    views = expand_views(x, 4, flip=True, full=True, resize=False)
    names = view_names(flip=True, full=True)
    assert len(views) == len(names) == 12
    assert names[:6] == ["top_left", "top_right", "bottom_left", "bottom_right", "center", "full"]
    assert torch.equal(views[0], x[..., :4, :4]) and views[5] is x
    for v, flipped in zip(views[:6], views[6:], strict=True):
        assert torch.equal(flipped, v.flip(-1))


def test_resize_brings_crops_back_to_the_short_side_and_keeps_full_view_shape():
    x = torch.rand(2, 3, 8, 12)
    views = expand_views(x, 0.5, full=True)
    assert [tuple(v.shape) for v in views] == [(2, 3, 8, 8)] * 5 + [(2, 3, 8, 12)]
    # A crop of a constant image resizes to the same constant.
    ones = expand_views(torch.ones(1, 1, 6, 6), 3)
    assert all(torch.allclose(v, torch.ones(1, 1, 6, 6)) for v in ones)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.uint8])
def test_views_keep_dtype_and_channels_last(dtype):
    x = (torch.rand(2, 3, 8, 8) * 200).to(dtype).contiguous(memory_format=torch.channels_last)
    for v in expand_views(x, 0.5, flip=True):
        assert v.dtype == dtype and v.shape == (2, 3, 8, 8)
        assert v.is_contiguous(memory_format=torch.channels_last)


def test_default_views_are_the_five_crops_in_view_names_order():
    names = ["top_left", "top_right", "bottom_left", "bottom_right", "center"]
    assert view_names() == names
    assert view_names(center=False) == names[:4]
    assert view_names(crop=False, full=True) == ["full"]
    assert view_names(center=False, flip=True) == [*names[:4], *(f"{n}_flipped" for n in names[:4])]
    x = torch.arange(64.0).view(1, 1, 8, 8)
    assert len(expand_views(x)) == 5
    corners = expand_views(x, 4, center=False, resize=False)
    assert len(corners) == 4
    assert all(torch.equal(v, c) for v, c in zip(corners, four_corner_crops(x, 4)[:4], strict=True))


def test_default_crop_is_seven_eighths_of_the_short_side_resized_bilinearly_back():
    x = torch.rand(2, 3, 16, 20, generator=torch.Generator().manual_seed(0))
    views = expand_views(x)
    # round(0.875 * 16) = 14 px crops, resized to 16 x 16 with half-pixel centres (align_corners=False).
    for v, crop in zip(views, four_corner_crops(x, 14), strict=True):
        expected = F.interpolate(crop, size=(16, 16), mode="bilinear", align_corners=False)
        assert torch.equal(v, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_views_of_a_contiguous_batch_stay_contiguous(dtype):
    x = (torch.rand(2, 3, 8, 8) * 200).to(dtype)
    for v in expand_views(x, 0.5, flip=True):
        assert v.is_contiguous() and not v.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_integer_views_keep_the_extremes_of_their_type_without_wrapping(dtype):
    info = torch.iinfo(dtype)
    for value in (info.min, info.max):
        view = expand_views(torch.full((1, 1, 6, 6), value, dtype=dtype), 3)[0]
        assert view.dtype == dtype
        # Resizing goes through float32: exact below 2**24, within float32's rounding of the value above it.
        assert ((view.double() - value).abs() <= abs(value) * 2**-23).all(), (value, view.unique().tolist())


def test_no_views_left_raises():
    with pytest.raises(ValueError, match="no views left"):
        expand_views(torch.rand(1, 3, 4, 4), None)


# --- merge_views: hand-computed numbers ---------------------------------------------------------------

# Two views of one image with two classes: p1 = softmax([0, 0]) = (1/2, 1/2), p2 = softmax([log 3, 0]) = (3/4, 1/4).
_Z = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]])


def test_softmax_mean_is_log_of_mean_probability():
    out = merge_views(_Z, "mean")
    assert torch.allclose(out.exp(), torch.tensor([[0.625, 0.375]]))
    # Log-probabilities: log_softmax (inside cross-entropy) leaves them unchanged.
    assert torch.allclose(out.log_softmax(-1), out)


def test_logits_mode_is_mean_of_raw_outputs():
    assert torch.allclose(merge_views(_Z, "logits"), torch.tensor([[math.log(3.0) / 2, 0.0]]))


def test_softmax_gmean_is_renormalised_geometric_mean():
    # sqrt(1/2 * 3/4) : sqrt(1/2 * 1/4) = sqrt(3) : 1.
    expected = torch.tensor([[math.sqrt(3) / (1 + math.sqrt(3)), 1 / (1 + math.sqrt(3))]])
    assert torch.allclose(merge_views(_Z, "gmean").exp(), expected)


def test_softmax_max_is_renormalised_max_probability():
    # max = (3/4, 1/2), renormalised to (0.6, 0.4).
    assert torch.allclose(merge_views(_Z, "max").exp(), torch.tensor([[0.6, 0.4]]))


def test_sigmoid_modes_on_hand_computed_numbers():
    # One output, two views: sigmoid(0) = 1/2, sigmoid(log 3) = 3/4.
    z = torch.tensor([[[0.0]], [[math.log(3.0)]]])
    assert torch.allclose(merge_views(z, "mean", "sigmoid").sigmoid(), torch.tensor([[0.625]]))
    assert torch.allclose(merge_views(z, "max", "sigmoid"), torch.tensor([[math.log(3.0)]]))
    assert torch.allclose(merge_views(z, "gmean", "sigmoid"), torch.tensor([[math.log(3.0) / 2]]))
    assert torch.allclose(merge_views(z, "logits", "sigmoid"), torch.tensor([[math.log(3.0) / 2]]))


@given(v=st.integers(1, 4), b=st.integers(1, 3), k=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_merging_identical_views_gives_the_single_view(v, b, k, seed):
    z = torch.randn(1, b, k, generator=torch.Generator().manual_seed(seed)) * 3
    same = z.expand(v, b, k)
    for mode in ("mean", "gmean", "max"):
        assert torch.allclose(merge_views(same, mode), z[0].log_softmax(-1), atol=1e-5)
    assert torch.allclose(merge_views(same, "mean", "sigmoid"), z[0], atol=1e-4)
    assert torch.allclose(merge_views(same, "logits", None), z[0], atol=1e-6)


@given(v=st.integers(2, 5), k=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_mean_probability_lies_between_the_views(v, k, seed):
    z = torch.randn(v, 2, k, generator=torch.Generator().manual_seed(seed)) * 4
    p = z.softmax(-1)
    merged = merge_views(z, "mean").exp()
    assert torch.all(merged >= p.min(0).values - 1e-6) and torch.all(merged <= p.max(0).values + 1e-6)
    assert torch.allclose(merged.sum(-1), torch.ones(2))


def test_merge_upcasts_half_precision_outputs():
    assert merge_views(_Z.half(), "mean").dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "median"}, "mode must be one of"),
        ({"activation": "tanh"}, "activation must be one of"),
        ({"mode": "mean", "activation": None}, "only be merged with mode='logits'"),
    ],
)
def test_merge_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        merge_views(_Z, **kwargs)


def test_merge_needs_views_first():
    with pytest.raises(ValueError, match=r"\(V, B, \.\.\.\)"):
        merge_views(torch.zeros(3), "logits")
    with pytest.raises(ValueError, match=r"\(V, B, \.\.\.\) with the views first, got list"):
        merge_views([[0.0, 1.0]], "logits")


def test_one_output_per_sample_merges_over_the_views():
    # Regression, or one binary logit per sample: preds of shape (V, B).
    z = torch.tensor([[0.0, 1.0], [math.log(3.0), 3.0]])
    assert torch.allclose(merge_views(z, "logits", None), torch.tensor([math.log(3.0) / 2, 2.0]))
    assert torch.allclose(merge_views(z, "mean", "sigmoid").sigmoid(), z.sigmoid().mean(0))


@pytest.mark.parametrize("mode", ["mean", "gmean", "max"])
def test_dense_outputs_are_merged_over_the_classes_on_the_last_axis(mode):
    # (V, B, S, K): S positions (pixels, tokens), each with K classes; every position merges on its own.
    z = torch.randn(3, 2, 4, 5, generator=torch.Generator().manual_seed(0)) * 3
    merged = merge_views(z, mode)
    assert merged.shape == (2, 4, 5)
    torch.testing.assert_close(merged.exp().sum(-1), torch.ones(2, 4))
    for s in range(4):
        torch.testing.assert_close(merged[:, s], merge_views(z[:, :, s], mode))


@pytest.mark.parametrize(
    ("loss", "kind"),
    [
        (CrossEntropyLossFlat(), "softmax"),
        (nn.CrossEntropyLoss(), "softmax"),
        (F.cross_entropy, "softmax"),
        (LabelSmoothingCrossEntropyFlat(), "softmax"),
        (BCEWithLogitsLossFlat(), "sigmoid"),
        (nn.BCEWithLogitsLoss(), "sigmoid"),
        (MSELossFlat(), None),
    ],
)
def test_activation_is_found_from_the_loss(loss, kind):
    assert _activation_kind(loss) == kind


# --- the callback: construction -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"crop": 0}, ValueError, "crop must be >= 1"),
        ({"crop": -0.5}, ValueError, r"crop must be in \(0, 1\]"),
        ({"crop": 1.2}, ValueError, r"crop must be in \(0, 1\]"),
        ({"crop": "big"}, TypeError, "crop must be"),
        ({"merge": "median"}, ValueError, "merge must be one of"),
        ({"crop": None}, ValueError, "no views left"),
        ({"max_views_per_batch": 0}, ValueError, "max_views_per_batch must be >= 1"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        FourCornerTTA(**kwargs)


def test_views_property_counts_ten_crop():
    assert len(FourCornerTTA(flip=True).views) == 10
    assert FourCornerTTA(crop=None, full=True, flip=True).views == ["full", "full_flipped"]


# --- the callback on real Learners -------------------------------------------------------------------


def _manual_tta(learn, x, **kw):
    """Reference: expand, run the model once per view, merge, softmax."""
    learn.model.eval()
    with torch.no_grad():
        views = expand_views(x, kw.get("crop", 0.875), flip=kw.get("flip", False), full=kw.get("full", False))
        out = torch.stack([learn.model(v) for v in views])
    return merge_views(out, kw.get("merge", "mean")).softmax(-1)


@pytest.mark.parametrize("kw", [{}, {"flip": True, "merge": "max"}, {"full": True, "merge": "logits"}])
def test_get_preds_returns_merged_predictions_aligned_with_plain_targets(tiny_learner, kw):
    plain, targs = tiny_learner.get_preds()
    inp, preds, targs_tta = tiny_learner.get_preds(cbs=FourCornerTTA(**kw), with_input=True)
    assert preds.shape == plain.shape == (20, 10)
    assert torch.equal(targs_tta, targs)
    # with_input records the original batch, not the views.
    assert inp.shape == (20, 3, 32, 32)
    assert torch.allclose(preds, _manual_tta(tiny_learner, inp, **kw), atol=1e-5)
    assert not torch.allclose(preds, plain, atol=1e-5)
    assert not any(isinstance(cb, FourCornerTTA) for cb in tiny_learner.cbs)


def test_validate_reports_loss_and_metrics_of_the_merged_prediction(tiny_learner):
    tiny_learner.fit(1, 1e-2)
    loss, acc = tiny_learner.validate(cbs=FourCornerTTA(flip=True))
    preds, targs = tiny_learner.get_preds(cbs=FourCornerTTA(flip=True))
    assert loss == pytest.approx(F.nll_loss(preds.log(), targs).item(), rel=1e-4)
    assert acc == pytest.approx((preds.argmax(1) == targs).float().mean().item())


def test_full_view_only_reproduces_plain_predictions(tiny_learner):
    plain, _ = tiny_learner.get_preds()
    same, _ = tiny_learner.get_preds(cbs=FourCornerTTA(crop=None, full=True, merge="logits"))
    assert torch.allclose(same, plain, atol=1e-6)


class _Recorder(Callback):
    """Records the shapes the model sees and returns, after FourCornerTTA's own events."""

    order = 20

    def __init__(self):
        self.seen = []

    def after_pred(self):
        self.seen.append((self.learn.training, tuple(self.learn.xb[0].shape), tuple(self.learn.pred.shape)))


class _CountingModel(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.batch_sizes = inner, []

    def forward(self, x):
        self.batch_sizes.append(x.shape[0])
        return self.inner(x)


def test_chunked_views_give_the_same_predictions(tiny_learner):
    whole, _ = tiny_learner.get_preds(cbs=FourCornerTTA(max_views_per_batch=5))
    counting = _CountingModel(tiny_learner.model)
    tiny_learner.model = counting
    chunked, _ = tiny_learner.get_preds(cbs=FourCornerTTA(max_views_per_batch=2))
    assert torch.allclose(chunked, whole, atol=1e-6)
    # 20 validation images in batches of 8, 8, 4; five views in chunks of 2, 2 and 1.
    assert counting.batch_sizes == [16, 16, 8, 16, 16, 8, 8, 8, 4]


def _views(bs, side, device="cpu", n=5):
    return [torch.empty(bs, 3, side, side, device=device) for _ in range(n)]


@pytest.mark.parametrize(
    ("bs", "side", "expected"),
    [
        (64, 64, 1),  # the benchmark's batch: one view per forward, the DataLoader's batch size
        (16, 64, 1),  # 16 x 64 x 64 = 2**16 pixels: at the budget
        (8, 64, 2),
        (1, 64, 16),  # predict's single image: every view in one forward
        (1, 128, 4),
        (1, 224, 1),  # over the budget: still at least one view
    ],
)
def test_auto_views_per_forward_on_the_cpu_fill_the_pixel_budget(bs, side, expected):
    assert tta_views_module._auto_max_views(_views(bs, side)) == expected


def test_auto_views_per_forward_off_the_cpu_is_every_view_at_once():
    # Any device but the CPU (CUDA, MPS); the meta device stands in for one, with no memory.
    assert tta_views_module._auto_max_views(_views(64, 64, device="meta")) is None


def test_auto_budget_counts_the_largest_view():
    # A full 64x96 view next to 64x64 crops: the budget is counted on the larger one.
    views = [*_views(4, 64), torch.empty(4, 3, 64, 96)]
    assert tta_views_module._auto_max_views(views) == 2**16 // (4 * 64 * 96)


@pytest.mark.parametrize("kw", [{}, {"flip": True, "full": True}])
def test_default_fills_the_cpu_budget_and_every_path_gives_the_same_predictions(tiny_learner, monkeypatch, kw):
    counting = _CountingModel(tiny_learner.model)
    tiny_learner.model = counting
    # One batch of 8 images of 16 x 16 px, in memory: nothing to decode.
    g = torch.Generator().manual_seed(0)
    ds = list(zip(torch.rand(8, 3, 16, 16, generator=g), torch.randint(0, 2, (8,), generator=g), strict=True))
    dl = DataLoaders.from_dsets(ds, ds, bs=8, device=torch.device("cpu")).valid
    n_views = len(FourCornerTTA(**kw).views)

    def preds_and_forwards(budget, **extra):
        monkeypatch.setattr(tta_views_module, "_CPU_PIXELS_PER_FORWARD", budget)
        counting.batch_sizes = []
        preds, _ = tiny_learner.get_preds(dl=dl, cbs=FourCornerTTA(**kw, **extra))
        return preds, counting.batch_sizes

    def forwards(k):
        return [8 * min(k, n_views - i) for i in range(0, n_views, k)]

    batch = 8 * 16 * 16
    one, sizes = preds_and_forwards(batch)  # the batch fills the budget: one view per forward
    assert sizes == forwards(1)
    every, sizes = preds_and_forwards(2**20)  # a budget of 512 batches: every view in one forward
    assert sizes == [8 * n_views]
    assert torch.allclose(one, every, atol=1e-6)
    # An explicit value is kept whatever the budget, below it and above it.
    for budget, k in ((2**20, 1), (batch, 3)):
        explicit, sizes = preds_and_forwards(budget, max_views_per_batch=k)
        assert sizes == forwards(k)
        assert torch.allclose(explicit, every, atol=1e-6)


def test_no_effect_at_all_during_training(fake_imagenette):
    def trained(cbs):
        seed_everything(0)
        learn = Learner(make_tiny_dls(fake_imagenette), tiny_cnn(), loss_func=CrossEntropyLossFlat(), cbs=cbs)
        learn.fit(1, 1e-2)
        return learn

    rec = _Recorder()
    with_tta = trained([FourCornerTTA(), rec])
    without = trained([])
    for p, q in zip(with_tta.model.parameters(), without.model.parameters(), strict=True):
        assert torch.equal(p, q)
    train_seen = [s for s in rec.seen if s[0]]
    valid_seen = [s for s in rec.seen if not s[0]]
    assert train_seen and all(xs[1:] == (3, 32, 32) and ps[0] == xs[0] for _, xs, ps in train_seen)
    # During validation the model sees five views, but everything after sees the original batch and one pred each.
    assert [(xs[0], ps[0]) for _, xs, ps in valid_seen] == [(8, 8), (8, 8), (4, 4)]


def test_test_dl_without_labels(tiny_learner, fake_imagenette):
    files = sorted((fake_imagenette / "val").rglob("*.JPEG"))[:5]
    dl = tiny_learner.dls.test_dl(files)
    preds, targs = tiny_learner.get_preds(dl=dl, cbs=FourCornerTTA(flip=True))
    assert preds.shape == (5, 10) and targs is None
    preds2, targs2 = tiny_learner.four_corner_tta(dl=dl, flip=True, beta=0.5)
    assert preds2.shape == (5, 10) and targs2 is None


def test_attached_callback_survives_export_and_load_learner(tiny_learner, tmp_path, fake_imagenette):
    files = sorted((fake_imagenette / "val").rglob("*.JPEG"))[:6]
    tiny_learner.add_cb(FourCornerTTA(flip=True))
    before, _ = tiny_learner.get_preds(dl=tiny_learner.dls.test_dl(files))
    tiny_learner.export(tmp_path / "export.pkl")
    loaded = load_learner(tmp_path / "export.pkl")
    assert any(isinstance(cb, FourCornerTTA) for cb in loaded.cbs)
    after, _ = loaded.get_preds(dl=loaded.dls.test_dl(files))
    assert torch.allclose(after, before, atol=1e-6)
    # The patched method is not shadowed by the attached callback, which it sets aside and puts back.
    (again, _), _ = loaded.four_corner_tta(dl=loaded.dls.test_dl(files), flip=True, beta=None)
    assert torch.allclose(again, before, atol=1e-6)
    assert sum(isinstance(cb, FourCornerTTA) for cb in loaded.cbs) == 1
    # predict goes through get_preds too, so a single item gets the TTA prediction.
    _, _, probs = loaded.predict(files[0])
    assert torch.allclose(probs, before[0], atol=1e-5)


def test_four_corner_tta_blends_with_plain_prediction_like_learn_tta(tiny_learner, monkeypatch):
    import fastai.callback.progress as progress

    bars = []
    original = progress.progress_bar
    monkeypatch.setattr(progress, "progress_bar", lambda gen, **kw: bars.append(len(gen)) or original(gen, **kw))
    plain, targs = tiny_learner.get_preds()
    tta, _ = tiny_learner.get_preds(cbs=FourCornerTTA())
    bars.clear()
    blended, targs2 = tiny_learner.four_corner_tta(beta=0.25)
    assert torch.allclose(blended, torch.lerp(tta, plain, 0.25), atol=1e-6)
    assert torch.equal(targs2, targs)
    assert bars == [3]  # one fastprogress bar over the 3 validation batches
    # With full=True the plain prediction is the full view: no extra forward pass is needed.
    blended_full, _ = tiny_learner.four_corner_tta(beta=1.0, full=True)
    assert torch.allclose(blended_full, plain, atol=1e-6)


def test_bad_beta_raises(tiny_learner):
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        tiny_learner.four_corner_tta(beta=1.5)


def test_crop_bigger_than_image_raises_at_first_batch_and_leaves_learner_usable(tiny_learner):
    cbs_before = list(tiny_learner.cbs)
    cb = FourCornerTTA(crop=40)  # constructing is fine: the image size is not known yet
    with pytest.raises(ValueError, match=r"40x40 crop, bigger than the 32x32 image"):
        tiny_learner.get_preds(cbs=cb)
    assert list(tiny_learner.cbs) == cbs_before
    assert tiny_learner.get_preds()[0].shape == (20, 10)


def test_two_attached_callbacks_raise(tiny_learner):
    tiny_learner.add_cb(FourCornerTTA())
    with pytest.raises(ValueError, match="more than one FourCornerTTA"):
        tiny_learner.validate(cbs=FourCornerTTA())


def test_probability_merge_on_regression_loss_raises(tiny_dls):
    learn = Learner(tiny_dls, tiny_cnn(), loss_func=MSELossFlat())
    with pytest.raises(ValueError, match="use merge='logits'"):
        learn.get_preds(cbs=FourCornerTTA())


def test_non_square_inputs(fake_imagenette):
    from fastai.vision.augment import Resize

    learn = Learner(
        make_tiny_dls(fake_imagenette, item_tfms=Resize((24, 40))), tiny_cnn(), loss_func=CrossEntropyLossFlat()
    )
    inp, preds, _ = learn.get_preds(cbs=FourCornerTTA(full=True, flip=True), with_input=True)
    assert inp.shape[-2:] == (24, 40) and preds.shape == (20, 10)
    assert torch.allclose(preds, _manual_tta(learn, inp, full=True, flip=True), atol=1e-5)


def test_grayscale_images(fake_imagenette):
    learn = Learner(
        make_tiny_dls(fake_imagenette, img_cls=PILImageBW), tiny_cnn(n_in=1), loss_func=CrossEntropyLossFlat()
    )
    inp, preds, _ = learn.get_preds(cbs=FourCornerTTA(), with_input=True)
    assert inp.shape[1] == 1 and preds.shape == (20, 10)
    assert torch.allclose(preds, _manual_tta(learn, inp), atol=1e-5)


def _tensor_learner(channels=4, dtype=torch.float32, target_shape=(), model=None, loss=None):
    """A Learner over random tensors: n-channel, any dtype, optionally spatial targets."""
    g = torch.Generator().manual_seed(0)
    xs = torch.rand(12, channels, 16, 16, generator=g).to(dtype)
    ys = torch.randint(0, 3, (12, *target_shape), generator=g)
    ds = list(zip(xs, ys, strict=True))
    dls = DataLoaders.from_dsets(ds[:8], ds[8:], bs=4, device=torch.device("cpu"))
    model = model if model is not None else tiny_cnn(channels, 3).to(dtype)
    return Learner(dls, model, loss_func=loss or CrossEntropyLossFlat())


def test_n_channel_inputs():
    learn = _tensor_learner(channels=4)
    inp, preds, _ = learn.get_preds(cbs=FourCornerTTA(flip=True), with_input=True)
    assert preds.shape == (4, 3)
    assert torch.allclose(preds, _manual_tta(learn, inp, flip=True), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_keeps_its_dtype(dtype):
    learn = _tensor_learner(channels=3, dtype=dtype)
    plain, _ = learn.get_preds()
    preds, _ = learn.get_preds(cbs=FourCornerTTA())
    assert preds.dtype == plain.dtype == dtype and preds.shape == plain.shape
    reference = _tensor_learner(channels=3)
    reference.model.load_state_dict({k: v.float() for k, v in learn.model.state_dict().items()})
    ref, _ = reference.get_preds(cbs=FourCornerTTA())
    assert torch.allclose(preds.float(), ref, atol=0.03)


def test_channels_last_model_gives_the_same_predictions(tiny_learner):
    contiguous, _ = tiny_learner.get_preds(cbs=FourCornerTTA(flip=True))
    tiny_learner.to_channelslast(use_amp=False)
    channels_last, _ = tiny_learner.get_preds(cbs=FourCornerTTA(flip=True))
    assert torch.allclose(channels_last, contiguous, atol=1e-5)


def test_segmentation_outputs_get_a_clear_error():
    learn = _tensor_learner(channels=3, model=nn.Conv2d(3, 3, 1), loss=CrossEntropyLossFlat(axis=1))
    with pytest.raises(ValueError, match=r"spatial targets \(segmentation"):
        _tensor_learner(channels=3, target_shape=(16, 16), model=nn.Conv2d(3, 3, 1)).get_preds(cbs=FourCornerTTA())
    with pytest.raises(ValueError, match=r"dense outputs \(segmentation\)"):
        learn.get_preds(cbs=FourCornerTTA())


@given(h=st.integers(1, 40), w=st.integers(1, 40), side=st.integers(1, 40))
def test_center_crop_offset_is_torchvision_rounding_of_half_the_margin(h, w, side):
    # torchvision's center_crop starts at int(round((H - s) / 2)): round half to even, so a margin of 1 starts at 0.
    side = min(side, h, w)
    x = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)
    top, left = int(round((h - side) / 2.0)), int(round((w - side) / 2.0))
    assert torch.equal(four_corner_crops(x, side)[4], x[..., top : top + side, left : left + side])


def test_integer_views_are_the_rounded_float_views():
    x = torch.randint(0, 256, (2, 3, 9, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for as_int, as_float in zip(expand_views(x, 0.5), expand_views(x.float(), 0.5), strict=True):
        assert torch.equal(as_int, as_float.round().clamp(0, 255).to(torch.uint8))


def test_chunks_join_equal_views_and_pass_a_lone_view_through_uncopied():
    a, b, c = torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 4)
    chunks = _chunk([a, b, c], None)
    assert [t.shape for t in chunks] == [(4, 3), (2, 4)]
    assert torch.equal(chunks[0], torch.cat([a, b])) and chunks[1] is c
    assert [t.shape[0] for t in _chunk([a, b, a], 2)] == [4, 2]


# --- learn.four_corner_tta: learn.tta's contract -----------------------------------------------------


def _structure(preds):
    """The nesting and shapes of a ``(preds, targs)`` return, with tensors replaced by their shapes."""
    if isinstance(preds, tuple):
        return tuple(_structure(p) for p in preds)
    return None if preds is None else tuple(preds.shape)


def _tensors(preds):
    return list(preds) if isinstance(preds, tuple) else [preds]


@pytest.mark.parametrize(
    "kw", [{}, {"beta": None}, {"beta": 0.5}, {"use_max": True}, {"use_max": True, "beta": None}, {"ds_idx": 0}]
)
def test_returns_what_learn_tta_returns_for_the_same_arguments(tiny_learner, kw):
    with tiny_learner.no_bar():
        fastai_preds, fastai_targs = tiny_learner.tta(**kw)
        preds, targs = tiny_learner.four_corner_tta(**kw)
    assert _structure(preds) == _structure(fastai_preds)
    assert torch.equal(targs, fastai_targs)
    # The same dtype, and probabilities in [0, 1] like fastai's.
    for ours, theirs in zip(_tensors(preds), _tensors(fastai_preds), strict=True):
        assert ours.dtype == theirs.dtype and 0.0 <= ours.min() and ours.max() <= 1.0


def test_beta_none_returns_the_tta_and_the_plain_prediction_unblended(tiny_learner):
    plain, targs = tiny_learner.get_preds()
    tta, _ = tiny_learner.get_preds(cbs=FourCornerTTA(flip=True))
    (aug_preds, preds), targs2 = tiny_learner.four_corner_tta(beta=None, flip=True)
    assert torch.allclose(aug_preds, tta, atol=1e-6)
    assert torch.allclose(preds, plain, atol=1e-6)
    assert torch.equal(targs2, targs)


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.7, 1.0])
def test_beta_blends_the_pair_with_torch_lerp_like_learn_tta(tiny_learner, beta):
    (aug_preds, preds), _ = tiny_learner.four_corner_tta(beta=None)
    blended, _ = tiny_learner.four_corner_tta(beta=beta)
    # fastai: torch.lerp(aug_preds, preds, beta), the weight beta on the plain prediction.
    assert torch.allclose(blended, torch.lerp(aug_preds, preds, beta), atol=1e-6)
    assert torch.allclose(blended, (1 - beta) * aug_preds + beta * preds, atol=1e-6)


def test_default_beta_is_fastais_quarter(tiny_learner):
    (aug_preds, preds), _ = tiny_learner.four_corner_tta(beta=None)
    default, _ = tiny_learner.four_corner_tta()
    assert torch.allclose(default, torch.lerp(aug_preds, preds, 0.25), atol=1e-6)
    assert not torch.allclose(default, aug_preds, atol=1e-4)


def test_use_max_is_the_max_merge_and_the_max_with_the_plain_prediction_whatever_beta(tiny_learner):
    plain, targs = tiny_learner.get_preds()
    max_merged, _ = tiny_learner.get_preds(cbs=FourCornerTTA(merge="max"))
    for beta in (0.25, None):
        preds, targs2 = tiny_learner.four_corner_tta(use_max=True, beta=beta)
        # fastai: torch.stack([preds, aug_preds], 0).max(0)[0], a tensor even with beta=None.
        assert torch.allclose(preds, torch.maximum(max_merged, plain), atol=1e-6)
        assert torch.equal(targs2, targs)
    assert torch.allclose(tiny_learner.four_corner_tta(use_max=True, merge="max")[0], preds)
    with pytest.raises(ValueError, match=r"four_corner_tta\(use_max=True\).*merge='mean'"):
        tiny_learner.four_corner_tta(use_max=True, merge="mean")


def test_ds_idx_and_dl_choose_the_data_read_in_order(tiny_learner):
    # The training set (its Resize crops at random, so only the shapes and targets can be compared), in order.
    plain0, targs0 = tiny_learner.get_preds(ds_idx=0)
    (aug0, preds0), t0 = tiny_learner.four_corner_tta(ds_idx=0, beta=None)
    assert aug0.shape == preds0.shape == plain0.shape == (60, 10) and torch.equal(t0, targs0)
    # A shuffled DataLoader that drops its last batch is read in order, every item once.
    dl = tiny_learner.dls.valid.new(shuffle=True, drop_last=True)
    from_dl, targs_dl = tiny_learner.four_corner_tta(dl=dl)
    from_idx, targs_idx = tiny_learner.four_corner_tta(ds_idx=1)
    assert torch.equal(targs_dl, targs_idx) and torch.allclose(from_dl, from_idx, atol=1e-6)


@pytest.mark.parametrize(
    ("kw", "instead"),
    [
        ({"n": 4}, r"learn\.tta\(n=4\)"),
        ({"n": 8}, r"learn\.tta\(n=8\)"),
        ({"item_tfms": "Resize"}, r"dl=learn\.dls\[ds_idx\]\.new\(after_item="),
        ({"batch_tfms": "Flip"}, r"dl=learn\.dls\[ds_idx\]\.new\(after_batch="),
    ],
)
def test_learn_tta_keywords_that_mean_nothing_here_are_refused_saying_what_to_use(tiny_learner, kw, instead):
    (name,) = kw
    with pytest.raises(ValueError, match="four_corner_tta") as err:
        tiny_learner.four_corner_tta(**kw)
    assert f"has no {name}" in str(err.value)
    assert re.search(instead, str(err.value))
    assert "FourCornerTTA" not in str(err.value)  # not the constructor the user never called


def test_learn_tta_positional_order_is_kept(tiny_learner):
    # learn.tta(ds_idx, dl, n, item_tfms, batch_tfms, beta, use_max): the third positional is n, refused.
    with pytest.raises(ValueError, match="four_corner_tta has no n"):
        tiny_learner.four_corner_tta(1, None, 4)
    dl = tiny_learner.dls.valid
    blended, _ = tiny_learner.four_corner_tta(1, dl, None, None, None, 0.5)
    assert torch.allclose(blended, tiny_learner.four_corner_tta(dl=dl, beta=0.5)[0], atol=1e-6)


@pytest.mark.parametrize("kw", [{"betta": 0.25}, {"with_input": True}, {"cbs": []}])
def test_other_unknown_keywords_raise_a_type_error_naming_four_corner_tta(tiny_learner, kw):
    with pytest.raises(TypeError, match=r"four_corner_tta\(\) got an unexpected keyword argument"):
        tiny_learner.four_corner_tta(**kw)


# --- no device-to-host sync per batch ---------------------------------------------------------------


class SyncRecorder:
    """The package's host-sync counter (:mod:`fastai_tricks.host_syncs`), counting only inside ``with`` blocks.

    On a CPU the syncs it sees are cheap, but the same calls are syncs on a GPU, so counting them here keeps the
    GPU path free of them. ``seen`` is what synced, by name, with its count.
    """

    def __init__(self, monkeypatch=None):
        self.seen: Counter[str] = Counter()
        self._open: list = []  # (context, counter) of each nested ``with``

    def __enter__(self):
        counter = HostSyncCounter()
        ctx = counting_host_syncs(counter)
        ctx.__enter__()
        self._open.append((ctx, counter))
        return self

    def __exit__(self, *exc):
        ctx, counter = self._open.pop()
        try:
            return ctx.__exit__(*exc)
        finally:
            self.seen.update(counter.counts)


class _RecordedTTA(FourCornerTTA):
    """FourCornerTTA whose per-batch events run under a :class:`SyncRecorder`."""

    recorder: SyncRecorder | None = None

    def before_batch(self):
        with type(self).recorder:
            super().before_batch()

    def after_pred(self):
        with type(self).recorder:
            super().after_pred()


def test_sync_recorder_sees_the_syncs_it_is_for(monkeypatch):
    rec = SyncRecorder(monkeypatch)
    x = torch.rand(4, 3)
    with rec:
        x.sum().item(), x[x > 0.5], x.cpu(), x.to("cpu"), x.to(torch.float64), torch.equal(x, x)
    assert rec.seen == Counter(
        {"_local_scalar_dense": 1, "boolean indexing": 1, "Tensor.cpu": 1, "Tensor.to": 1, "equal": 1}
    )


@pytest.mark.parametrize("kw", [{}, {"flip": True, "full": True, "max_views_per_batch": 4}])
def test_four_corner_tta_reads_nothing_back_from_the_device_per_batch(tiny_learner, monkeypatch, kw):
    _RecordedTTA.recorder = rec = SyncRecorder(monkeypatch)
    monkeypatch.setattr(tta_module, "FourCornerTTA", _RecordedTTA)
    blended, _ = tiny_learner.four_corner_tta(beta=0.25, **kw)
    assert blended.shape == (20, 10)
    # The plain prediction stays on the model's device until the pass ends; no batch copies it to the host.
    assert rec.seen == Counter(), rec.seen
