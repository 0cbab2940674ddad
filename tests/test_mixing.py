"""The mixing callbacks on real tiny Learners with generated data."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest
import torch
from conftest import make_tiny_dls, seed_everything, tiny_cnn
from fastai.callback.core import Callback
from fastai.learner import Learner, load_learner
from fastai.losses import BCEWithLogitsLossFlat, CrossEntropyLossFlat, LabelSmoothingCrossEntropy
from fastai.vision.all import (
    ConvLayer,
    DataBlock,
    GrandparentSplitter,
    ImageBlock,
    MaskBlock,
    MultiCategoryBlock,
    ResBlock,
    Resize,
    get_image_files,
)
from PIL import Image
from torch import nn

from fastai_tricks.mixing import (
    MIX_IN_LR_FIND,
    CutMix,
    FMix,
    ManifoldMix,
    MixCallback,
    MixUp,
    RandomMix,
    ResizeMix,
    find_residual_stages,
    show_mix_batch,
)

matplotlib.use("Agg")

try:  # Our own label-smoothing loss, written alongside this module, when it is there.
    from fastai_tricks.losses import LabelSmoothingCE
except ImportError:  # pragma: no cover - depends on another feature landing
    LabelSmoothingCE = None

VARIANTS = {
    "mixup": lambda: MixUp(),
    "cutmix": lambda: CutMix(),
    "cutmix_per_sample": lambda: CutMix(per_sample=True),
    "manifold": lambda: ManifoldMix(),
    "resizemix": lambda: ResizeMix(),
    "fmix": lambda: FMix(),
    "randommix": lambda: RandomMix([MixUp(), CutMix(), ManifoldMix(), FMix()]),
}
BOX_VARIANTS = {k: VARIANTS[k] for k in ("cutmix", "cutmix_per_sample", "resizemix", "fmix")}
BOX_VARIANTS["randommix_boxes"] = lambda: RandomMix([CutMix(), ResizeMix(), FMix(per_sample=True)])


def tiny_xresnet(n_out: int = 10) -> nn.Module:
    """An xresnet-style model with two one-block residual stages of 8 and 16 channels: real stages, tiny cost."""
    return nn.Sequential(
        ConvLayer(3, 8, stride=2),
        nn.Sequential(ResBlock(1, 8, 8)),
        nn.Sequential(ResBlock(1, 8, 16, stride=2)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, n_out),
    )


def quiet_fit(learn: Learner, n: int = 1, **kw) -> None:
    with learn.no_logging(), learn.no_bar():
        learn.fit(n, 1e-3, **kw)


def hooks_of(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class Probe(Callback):
    """Records the batch as the model sees it, after the mixing callbacks (order 0) ran."""

    order = 5

    def __init__(self):
        self.seen = []

    def before_batch(self):
        if self.learn.training:
            self.seen.append((self.learn.xb[0].detach().clone(), self.learn.yb[0].detach().clone()))


class Boom(Callback):
    """Raises ``exc`` at ``event`` on the second training batch (after the mixing callbacks' own work)."""

    order = 1

    def __init__(self, event: str, exc: type[BaseException]):
        self.event, self.exc, self.count = event, exc, 0

    def before_batch(self):
        if self.learn.training:
            self.count += 1
        self._hit("before_batch")

    def after_pred(self):
        self._hit("after_pred")

    def after_loss(self):
        self._hit("after_loss")

    def before_backward(self):
        self._hit("before_backward")

    def _hit(self, event):
        if event == self.event and self.learn.training and self.count >= 2:
            raise self.exc("boom")


@pytest.fixture(scope="module")
def dls(fake_imagenette):
    seed_everything(0)
    return make_tiny_dls(fake_imagenette)


@pytest.fixture(scope="module")
def multilabel_dls(fake_imagenette):
    def labels(p):
        return [p.parent.name, "even" if int(p.stem[-1]) % 2 == 0 else "odd"]

    block = DataBlock(
        blocks=(ImageBlock, MultiCategoryBlock),
        get_items=get_image_files,
        get_y=labels,
        splitter=GrandparentSplitter(valid_name="val"),
        item_tfms=Resize(32),
    )
    return block.dataloaders(fake_imagenette, bs=8, num_workers=0)


@pytest.fixture(scope="module")
def seg_dls(tmp_path_factory):
    """Generated segmentation data: noisy images with a bright rectangle labelled 1 and a disc labelled 2."""
    root = tmp_path_factory.mktemp("seg")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        img = rng.integers(0, 80, (32, 32, 3)).astype(np.uint8)
        lab = np.zeros((32, 32), np.uint8)
        t, left = rng.integers(0, 16, 2)
        img[t : t + 12, left : left + 12] += 150
        lab[t : t + 12, left : left + 12] = 1
        yy, xx = np.mgrid[:32, :32]
        cy, cx = rng.integers(6, 26, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 25
        img[disc, 2] = 250
        lab[disc] = 2
        Image.fromarray(img).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(lab).save(root / "labels" / f"{i:03d}.png")
    block = DataBlock(
        blocks=(ImageBlock, MaskBlock(codes=["bg", "rect", "disc"])),
        get_items=get_image_files,
        get_y=lambda p: root / "labels" / p.name,
        splitter=lambda items: (list(range(18)), list(range(18, 24))),
    )
    return block.dataloaders(root / "images", bs=6, num_workers=0)


class TinyUNet(nn.Module):
    """A two-level U-Net: enough to prove per-pixel losses and pasted masks work end to end."""

    def __init__(self, n_out: int = 3):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.mid = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2)
        self.out = nn.Conv2d(24, n_out, 1)

    def forward(self, x):
        d = self.down(x)
        return self.out(torch.cat([d, self.up(self.mid(d))], 1))


def make_learner(dls, variant: str | None = None, loss_func=None, cbs=None):
    seed_everything(0)
    model = tiny_xresnet(len(dls.vocab)) if variant in ("manifold", "randommix") else tiny_cnn(n_out=len(dls.vocab))
    return Learner(dls, model, loss_func=loss_func or CrossEntropyLossFlat(), cbs=cbs)


# --- fitting ---------------------------------------------------------------------------------------


LOSSES = {"ce": CrossEntropyLossFlat, "fastai_label_smoothing": LabelSmoothingCrossEntropy}
if LabelSmoothingCE is not None:
    LOSSES["our_label_smoothing"] = LabelSmoothingCE


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_fits_an_epoch_with_integer_targets_and_a_y_int_loss(dls, variant, loss):
    lf = LOSSES[loss]()
    learn = make_learner(dls, variant, lf)
    probe = Probe()
    quiet_fit(learn, cbs=[VARIANTS[variant](), probe])
    assert math.isfinite(learn.recorder.values[-1][0])
    assert learn.loss_func is lf and lf.reduction == "mean"
    # Integer targets are never blended: the loss is mixed instead.
    assert all(not y.is_floating_point() for _, y in probe.seen)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_fits_multilabel_bce_by_mixing_float_targets(multilabel_dls, variant):
    learn = make_learner(multilabel_dls, variant, BCEWithLogitsLossFlat())
    probe = Probe()
    quiet_fit(learn, cbs=[VARIANTS[variant](), probe])
    assert math.isfinite(learn.recorder.values[-1][0])
    ys = torch.cat([y for _, y in probe.seen])
    assert ys.is_floating_point() and bool(((ys >= 0) & (ys <= 1)).all())
    assert bool(((ys > 0) & (ys < 1)).any()), "some targets should be mixed, not 0/1"


def test_mixed_loss_equals_lambda_mix_of_per_sample_losses_and_loss_func_is_untouched():
    lf = LabelSmoothingCrossEntropy()
    x, y = torch.rand(6, 3, 5, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    learn = SimpleNamespace(xb=(x,), yb=(y,), training=True, pct_train=0.0, epoch=0, n_epoch=1, loss_func=lf)
    cb = MixUp(alpha=1.0)
    cb.learn = learn
    cb.before_batch()
    batch = cb.__dict__["_batch"]
    learn.pred = torch.randn(6, 3)
    learn.loss_grad = lf(learn.pred, y)
    cb.after_loss()
    per = LabelSmoothingCrossEntropy(reduction="none")
    expected = (batch.lam * per(learn.pred, y) + (1 - batch.lam) * per(learn.pred, y[batch.perm])).mean()
    assert torch.allclose(learn.loss_grad, expected)
    assert learn.loss_func is lf and lf.reduction == "mean"
    assert learn.yb[0] is y


@pytest.mark.parametrize("variant", list(BOX_VARIANTS))
def test_box_variants_paste_masks_on_segmentation_with_a_tiny_unet(seg_dls, variant):
    seed_everything(0)
    learn = Learner(seg_dls, TinyUNet(), loss_func=CrossEntropyLossFlat(axis=1))
    probe = Probe()
    quiet_fit(learn, cbs=[BOX_VARIANTS[variant](), probe])
    assert math.isfinite(learn.recorder.values[-1][0])
    for _, y in probe.seen:
        assert not y.is_floating_point() and set(y.unique().tolist()) <= {0, 1, 2}


def test_cutmix_pastes_mask_pixels_exactly_where_image_pixels_are_pasted(seg_dls):
    x, y = seg_dls.one_batch()
    learn = SimpleNamespace(xb=(x,), yb=(y,), training=True, pct_train=0.0, epoch=0, n_epoch=1, loss_func=None)
    cb = CutMix(per_sample=True)
    cb.learn = learn
    torch.manual_seed(3)
    cb.before_batch()
    batch = cb.__dict__["_batch"]
    assert batch.target_kind == "dense"
    mx, my = learn.xb[0], learn.yb[0]
    changed = (mx != x).any(1)  # pixels whose image came from the partner (and differ)
    assert torch.equal(my[changed], y[batch.perm][changed])
    kept = ~(mx != x[batch.perm]).any(1)
    assert torch.equal(my[~kept], y[~kept])
    assert type(my).__name__ == "TensorMask" and type(mx).__name__ == "TensorImage"


@pytest.mark.parametrize("variant", ["mixup", "manifold"])
def test_blending_variants_refuse_segmentation_masks_with_a_clear_error(seg_dls, variant):
    learn = Learner(seg_dls, TinyUNet(), loss_func=CrossEntropyLossFlat(axis=1))
    with pytest.raises(ValueError, match="CutMix, ResizeMix or FMix"):
        quiet_fit(learn, cbs=VARIANTS[variant]() if variant == "mixup" else ManifoldMix(modules=["mid"]))
    assert hooks_of(learn.model) == 0


def test_integer_targets_with_a_loss_without_y_int_raise_and_name_the_fix(dls):
    learn = make_learner(dls, "mixup", nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="y_int.*CrossEntropyLossFlat"):
        quiet_fit(learn, cbs=MixUp())
    quiet_fit(learn)  # the learner is still usable


@pytest.mark.slow
def test_odd_batch_size_fits_every_variant(fake_imagenette):
    odd = make_tiny_dls(fake_imagenette, bs=5)
    for name, make in VARIANTS.items():
        learn = make_learner(odd, name)
        quiet_fit(learn, cbs=make())
        assert math.isfinite(learn.recorder.values[-1][0]), name


# --- nothing mixed outside training ----------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_validation_and_get_preds_are_never_mixed(dls, variant):
    learn = make_learner(dls, variant)
    plain = learn.get_preds(dl=dls.valid)[0]
    learn.add_cb(VARIANTS[variant]())
    mixed = learn.get_preds(dl=dls.valid)[0]
    assert torch.equal(plain, mixed)


def test_off_pct_and_off_epochs_stop_mixing_for_the_end_of_training():
    x, y = torch.rand(4, 3, 6, 6), torch.tensor([0, 1, 2, 3])
    cases = [
        (MixUp(off_pct=0.25), dict(pct_train=0.8), False),
        (MixUp(off_pct=0.25), dict(pct_train=0.7), True),
        (CutMix(off_epochs=2), dict(epoch=8, n_epoch=10), False),
        (CutMix(off_epochs=2), dict(epoch=7, n_epoch=10), True),
    ]
    for cb, state, mixes in cases:
        learn = SimpleNamespace(xb=(x,), yb=(y,), training=True, pct_train=0.0, epoch=0, n_epoch=10)
        learn.loss_func = CrossEntropyLossFlat()
        vars(learn).update(state)
        cb.learn = learn
        cb.before_batch()
        assert (cb.__dict__["_batch"] is not None) is mixes, (cb, state)


def test_alpha_can_be_a_schedule_of_pct_train():
    seen = []

    def schedule(pct):
        seen.append(pct)
        return 0.1 + pct

    cb = MixUp(alpha=schedule)
    cb.learn = SimpleNamespace(pct_train=0.5)
    assert cb.current_alpha() == pytest.approx(0.6) and seen == [0.5]


# --- the settable alpha that ProgressiveResize drives ---------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_alpha_is_a_validated_settable_attribute(variant):
    cb = VARIANTS[variant]()
    assert isinstance(cb, MixCallback)
    cb.alpha = 0.7
    assert cb.alpha == 0.7
    cb.alpha = 2  # an int is accepted
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alpha"):
            cb.alpha = bad
    with pytest.raises(TypeError, match="alpha"):
        cb.alpha = "big"


def test_setting_randommix_alpha_sets_every_child():
    mixes = [MixUp(alpha=0.2), CutMix(alpha=1.0)]
    rm = RandomMix(mixes)
    assert rm.alpha is None and [m.alpha for m in mixes] == [0.2, 1.0]
    rm.alpha = 0.5
    assert rm.alpha == 0.5 and [m.alpha for m in mixes] == [0.5, 0.5]


def test_randommix_with_zero_weight_never_picks_that_mix():
    rm = RandomMix([CutMix(), MixUp()], probs=[1, 0])
    x, y = torch.rand(4, 3, 6, 6), torch.tensor([0, 1, 2, 3])
    for _ in range(10):
        rm.learn = SimpleNamespace(xb=(x,), yb=(y,), training=True, pct_train=0.0, epoch=0, n_epoch=1)
        rm.learn.loss_func = CrossEntropyLossFlat()
        rm.before_batch()
        assert isinstance(rm.__dict__["_batch"].source, CutMix)


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: MixUp(alpha=0), "alpha"),
        (lambda: MixUp(alpha=-0.5), "alpha"),
        (lambda: CutMix(alpha=float("nan")), "alpha"),
        (lambda: FMix(alpha=float("inf")), "alpha"),
        (lambda: MixUp(p=1.5), "p"),
        (lambda: CutMix(p=-0.1), "p"),
        (lambda: RandomMix([]), "mixes"),
        (lambda: RandomMix([MixUp(), CutMix()], probs=[-1, 2]), "probs"),
        (lambda: RandomMix([MixUp(), CutMix()], probs=[0, 0]), "probs"),
        (lambda: RandomMix([MixUp()], probs=[1, 1]), "probs"),
        (lambda: ResizeMix(scale=(0.0, 0.5)), "scale"),
        (lambda: ResizeMix(scale=(0.5, 1.2)), "scale"),
        (lambda: ResizeMix(scale=(0.8, 0.2)), "scale"),
        (lambda: FMix(decay_power=0), "decay_power"),
        (lambda: MixUp(off_pct=1.0), "off_pct"),
        (lambda: MixUp(off_epochs=-1), "off_epochs"),
        (lambda: ManifoldMix(modules=[]), "modules"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_parameter(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_randommix_refuses_things_that_are_not_mix_callbacks():
    with pytest.raises(TypeError, match="mixes"):
        RandomMix([MixUp(), "cutmix"])


# --- ManifoldMix -----------------------------------------------------------------------------------


def test_residual_stages_are_found_in_xresnet_torchvision_resnet_and_timm_like_models():
    from fastai.vision.models.xresnet import xresnet18
    from torchvision.models import resnet18

    x = xresnet18()
    assert find_residual_stages(x) == [x[4], x[5], x[6], x[7]]
    tv = resnet18()
    assert find_residual_stages(tv) == [tv.layer1, tv.layer2, tv.layer3, tv.layer4]
    timm_like = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.Conv2d(4, 4, 3)), nn.Sequential(nn.Conv2d(4, 4, 3)))
    timm_like.feature_info = [
        {"module": "0", "reduction": 2},
        {"module": "1", "reduction": 4},
        {"module": "2", "reduction": 8},
    ]
    assert find_residual_stages(timm_like) == [timm_like[1], timm_like[2]]
    assert find_residual_stages(tiny_cnn()) == []


def test_manifoldmix_mixes_the_chosen_stage_output_once_and_leaves_no_hook(monkeypatch):
    seed_everything(0)
    model = tiny_xresnet().train()
    stage = find_residual_stages(model)[0]
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    learn = SimpleNamespace(xb=(x,), yb=(y,), training=True, pct_train=0.0, epoch=0, n_epoch=1, model=model)
    learn.loss_func = CrossEntropyLossFlat()
    cb = ManifoldMix()
    cb.learn = learn
    cb.before_fit()
    monkeypatch.setattr(random, "randrange", lambda n: 1)  # choose the first stage
    seen = {}
    probe = stage.register_forward_hook(lambda m, a, out: seen.setdefault("out", out.detach().clone()))
    torch.manual_seed(1)
    cb.before_batch()
    assert learn.xb[0] is x  # the input is untouched: mixing happens inside the model
    after = {}
    nxt = model[list(model).index(stage) + 1]
    probe2 = nxt.register_forward_pre_hook(lambda m, a: after.setdefault("in", a[0].detach().clone()))
    model(x)
    cb.after_pred()
    probe.remove()
    probe2.remove()
    batch = cb.__dict__["_batch"]
    lam = batch.lam.view(-1, 1, 1, 1)
    assert torch.allclose(after["in"], lam * seen["out"] + (1 - lam) * seen["out"][batch.perm], atol=1e-6)
    assert hooks_of(model) == 0


def test_a_stale_manifold_hook_is_inert_and_removes_itself():
    model = tiny_xresnet().eval()
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        expected = model(x)
    learn = SimpleNamespace(xb=(x,), yb=(y,), training=True, pct_train=0.0, epoch=0, n_epoch=1, model=model)
    learn.loss_func = CrossEntropyLossFlat()
    cb = ManifoldMix(modules=["1"])
    cb.learn = learn
    random.seed(1)
    while cb.__dict__.get("_token") is None:  # draw until the hidden stage is chosen
        cb.before_batch()
    assert hooks_of(model) == 2
    learn.training = False  # e.g. an exception skipped the rest of the batch, then get_preds runs
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert hooks_of(model) == 0


# --- state hygiene under exceptions ----------------------------------------------------------------


# KeyboardInterrupt after the loss is only tried on ManifoldMix (the variant with hooks): for the others the
# RuntimeError case covers the same code path, and tests/test_faults.py runs the full matrix.
_EXCEPTION_CASES = [
    (variant, event, exc)
    for variant in ["mixup", "cutmix", "manifold", "resizemix", "fmix", "randommix"]
    for event in ["before_batch", "after_pred", "after_loss", "before_backward"]
    for exc in [RuntimeError, KeyboardInterrupt]
    if not (exc is KeyboardInterrupt and event in ("after_loss", "before_backward") and variant != "manifold")
]


@pytest.mark.parametrize(("variant", "event", "exc"), _EXCEPTION_CASES)
def test_exception_mid_fit_leaves_the_learner_as_if_the_callback_was_never_attached(dls, variant, event, exc):
    learn = make_learner(dls, variant)
    lf, n_hooks = learn.loss_func, hooks_of(learn.model)
    with pytest.raises(exc):
        quiet_fit(learn, cbs=[VARIANTS[variant](), Boom(event, exc)])
    assert learn.loss_func is lf and lf.reduction == "mean"
    assert hooks_of(learn.model) == n_hooks
    quiet_fit(learn)
    assert math.isfinite(learn.recorder.values[-1][0])
    preds, _ = learn.get_preds(dl=dls.valid)
    assert preds.shape == (len(dls.valid_ds), 10)


def test_a_callback_attached_to_the_learner_releases_its_hooks_when_removed(dls):
    learn = make_learner(dls, "manifold")
    cb = ManifoldMix(modules=["1"])
    learn.add_cb(cb)
    random.seed(0)
    with pytest.raises(KeyboardInterrupt):
        # Raising in a later callback's before_batch leaves the armed hook in place for a moment...
        quiet_fit(learn, cbs=Boom("before_batch", KeyboardInterrupt))
    learn.remove_cb(cb)  # ...and detaching the callback removes it.
    assert hooks_of(learn.model) == 0
    quiet_fit(learn)


# --- export, precision, pictures -------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_then_load_learner_then_predict(dls, fake_imagenette, tmp_path, variant):
    learn = make_learner(dls, variant, cbs=VARIANTS[variant]())
    quiet_fit(learn)
    learn.export(tmp_path / "model.pkl")
    loaded = load_learner(tmp_path / "model.pkl")
    img = get_image_files(fake_imagenette / "val")[0]
    label, idx, probs = loaded.predict(img)
    assert label in dls.vocab and probs.shape == (10,)
    assert hooks_of(loaded.model) == 0


class FloatOut(nn.Module):
    def forward(self, x):
        return x.float()


class ToBF16(Callback):
    """Feeds the model bfloat16 images, before the mixing callbacks run."""

    order = -1

    def before_batch(self):
        self.learn.xb = (self.learn.xb[0].to(torch.bfloat16),)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bf16_batches_stay_bf16_through_mixing_and_fit(dls, variant):
    learn = make_learner(dls, variant)
    # bf16 weights and activations, float32 logits (as autocast's to_float gives fastai's Recorder).
    learn.model = nn.Sequential(learn.model.to(torch.bfloat16), FloatOut())
    probe = Probe()
    quiet_fit(learn, cbs=[ToBF16(), VARIANTS[variant](), probe])
    assert all(x.dtype == torch.bfloat16 for x, _ in probe.seen)
    assert math.isfinite(learn.recorder.values[-1][0])


def test_fastai_mixed_precision_callback_runs_with_mixing(dls):
    learn = make_learner(dls, "cutmix").to_bf16()
    with pytest.warns(UserWarning):  # autocast('cuda') is disabled on a CPU-only machine
        quiet_fit(learn, cbs=CutMix())
    assert math.isfinite(learn.recorder.values[-1][0])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_show_mix_batch_draws_titles_with_both_labels_and_lambda(dls, variant):
    import matplotlib.pyplot as plt

    fig = show_mix_batch(dls, VARIANTS[variant](), n=4)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 4 and all(" / " in t for t in titles)
    plt.close(fig)


def test_show_mix_batch_draws_segmentation_masks(seg_dls):
    import matplotlib.pyplot as plt

    fig = show_mix_batch(seg_dls, CutMix(), n=4)
    assert sum(bool(ax.get_title()) for ax in fig.axes) == 4
    plt.close(fig)


def test_mixing_is_applied_to_every_training_batch_with_p_one(dls):
    learn = make_learner(dls, "mixup")
    seed_everything(0)
    plain = [x for x, _ in _record(learn, [Probe()])]
    seed_everything(0)
    mixed = [x for x, _ in _record(learn, [MixUp(), Probe()])]
    assert len(plain) == len(mixed) and all(not torch.equal(a, b) for a, b in zip(plain, mixed, strict=True))


def _record(learn, cbs):
    quiet_fit(learn, cbs=cbs)
    return cbs[-1].seen


# --- fastai's names: lam and yb1 -------------------------------------------------------------------


def _fake_learn(x, y, lf=None):
    """The attributes a mixing callback reads, for one training batch without a training loop."""
    return SimpleNamespace(
        xb=(x,), yb=(y,), training=True, pct_train=0.0, epoch=0, n_epoch=1, loss_func=lf or CrossEntropyLossFlat()
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lam_and_yb1_are_none_before_the_first_batch_not_forwarded_to_the_model(dls, variant):
    cb = VARIANTS[variant]()
    assert cb.lam is None and cb.yb1 is None
    learn = make_learner(dls, variant)
    learn.add_cb(cb)  # Callback.__getattr__ forwards unknown names to the model ('Linear' has no 'lam')
    assert cb.lam is None and cb.yb1 is None


def test_mixup_lam_is_the_per_sample_weight_actually_used_and_yb1_the_partner_targets():
    seed_everything(0)
    x, y = torch.rand(6, 3, 5, 5), torch.arange(6)  # distinct targets: yb1 names each partner
    cb = MixUp(alpha=1.0)
    cb.learn = learn = _fake_learn(x, y)
    cb.before_batch()
    (partner,) = cb.yb1
    lam = cb.lam
    assert lam.shape == (6,) and lam.dtype == torch.float32 and lam.device == x.device
    assert sorted(partner.tolist()) == list(range(6)) and not torch.equal(partner, y)
    w = lam.view(6, 1, 1, 1)
    assert torch.allclose(learn.xb[0], w * x + (1 - w) * x[partner], atol=1e-6)
    assert len(set(lam.tolist())) == 6  # one λ per sample


@pytest.mark.parametrize(
    "make", [lambda: CutMix(), lambda: CutMix(per_sample=True), lambda: FMix(), lambda: ResizeMix()]
)
def test_box_variants_lam_is_the_kept_fraction_of_each_mixed_image(make):
    seed_everything(1)
    b = 6
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, 16, 16).clone()  # image i is all i
    cb = make()
    cb.learn = learn = _fake_learn(x, torch.arange(b))
    cb.before_batch()
    (partner,) = cb.yb1
    kept = (learn.xb[0] == x).float().mean(dim=(1, 2, 3))
    moved = partner != torch.arange(b)
    assert cb.lam.shape == (b,)
    assert torch.allclose(cb.lam[moved], kept[moved])  # λ = fraction of each image's own pixels


def test_mixed_loss_is_the_lambda_mix_against_yb1_in_a_real_fit(dls):
    """Read during the fit, lam and yb1 give back the loss the learner trained on."""

    class LossCheck(Callback):
        order = 1  # after the mixing callback's after_loss

        def __init__(self):
            self.checked = 0

        def after_loss(self):
            if not self.learn.training:
                return
            per = CrossEntropyLossFlat(reduction="none")
            lam, (y1,) = mix.lam, mix.yb1
            expected = (lam * per(self.learn.pred, *self.learn.yb) + (1 - lam) * per(self.learn.pred, y1)).mean()
            assert torch.allclose(self.learn.loss, expected)
            self.checked += 1

    learn = make_learner(dls, "mixup")
    mix, check = MixUp(), LossCheck()
    quiet_fit(learn, cbs=[mix, check])
    assert check.checked == len(dls.train)


def test_a_training_batch_left_unmixed_has_lam_one_and_is_its_own_partner():
    x, y = torch.rand(4, 3, 5, 5), torch.tensor([0, 1, 2, 3])
    cb = MixUp(p=0.0)
    cb.learn = _fake_learn(x, y)
    cb.before_batch()
    assert torch.equal(cb.lam, torch.ones(4)) and cb.yb1[0] is y
    one = MixUp()
    one.learn = _fake_learn(x[:1], y[:1])
    one.before_batch()
    assert torch.equal(one.lam, torch.ones(1))


def test_manifold_and_randommix_expose_lam_and_yb1_on_the_attached_callback():
    x, y = torch.rand(4, 3, 8, 8), torch.arange(4)
    manifold = ManifoldMix(modules=[nn.Identity()])
    manifold.learn = SimpleNamespace(**vars(_fake_learn(x, y)), model=nn.Identity())
    manifold.__dict__["_candidates"] = [manifold.learn.model]
    manifold.before_batch()
    assert manifold.lam.shape == (4,) and len(set(manifold.lam.tolist())) == 1  # one λ per batch, repeated
    children = [MixUp(), CutMix()]
    rm = RandomMix(children)
    rm.learn = _fake_learn(x, y)
    rm.before_batch()
    assert rm.lam.shape == (4,) and sorted(rm.yb1[0].tolist()) == [0, 1, 2, 3]
    assert all(c.lam is None for c in children)


def test_lam_is_a_record_that_outlives_the_fit_and_yb1_is_dropped_with_its_targets(dls, tmp_path):
    learn = make_learner(dls, "cutmix")
    cb = CutMix()
    learn.add_cb(cb)
    seen = []

    class Reader(Callback):
        order = 1

        def after_batch(self):
            if self.learn.training:
                seen.append((cb.lam, cb.yb1))

    quiet_fit(learn, cbs=Reader())
    last_lam = seen[-1][0]
    assert all(yb1 is not None and yb1[0].shape == lam.shape for lam, yb1 in seen)  # readable during the fit
    assert cb.lam is last_lam and cb.yb1 is None  # after the fit: λ stays, the batch of targets goes
    with learn.no_bar(), learn.no_logging():
        learn.validate()
        learn.get_preds()
    assert cb.lam is last_lam
    learn.export(tmp_path / "model.pkl")
    assert torch.equal(load_learner(tmp_path / "model.pkl").cut_mix.lam, last_lam)
    learn.remove_cb(cb)
    assert cb.lam is last_lam and cb.yb1 is None


def test_yb1_is_dropped_when_fit_cbs_unwinds_after_an_exception(dls):
    learn = make_learner(dls, "mixup")
    cb = MixUp()
    with pytest.raises(RuntimeError):
        quiet_fit(learn, cbs=[cb, Boom("after_loss", RuntimeError)])
    assert cb.yb1 is None and cb.lam is not None and cb.learn is None


# Ops that read a device value back on the host (.item(), bool(), nonzero, boolean-mask indexing).
_HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero"}


@pytest.mark.parametrize("variant", ["mixup", "cutmix", "fmix", "resizemix"])
def test_lam_and_yb1_add_no_host_sync(variant):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            indices = args[1] if name in ("index", "index_put", "index_put_") and len(args) > 1 else ()
            masked = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
            if name in _HOST_READS or masked:
                self.seen.append(name)
            return func(*args, **(kwargs or {}))

    seed_everything(0)
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    cb = VARIANTS[variant]()
    cb.learn = learn = _fake_learn(x, y)
    with Reads() as reads:
        cb.before_batch()
        learn.pred = torch.randn(6, 3)
        learn.loss_grad = learn.loss_func(learn.pred, y)
        cb.after_loss()
        cb.after_batch()
        lam, yb1 = cb.lam, cb.yb1
    assert reads.seen == [] and lam.shape == (6,) and yb1[0].shape == (6,)


# --- lr_find ---------------------------------------------------------------------------------------


class _Pair(Callback):
    """Runs after the mixing callbacks and compares with what ``first`` (before them) stored."""

    order = 1

    def __init__(self, first):
        self.first, self.mixed, self.batches = first, 0, 0

    def before_batch(self):
        if self.learn.training:
            self.batches += 1
            self.mixed += int(not torch.equal(self.learn.xb[0], self.first.stored))


class _Store(Callback):
    order = -1

    def before_batch(self):
        self.stored = self.learn.xb[0].clone()


def _lr_find_mixed(dls, mix):
    """How many of lr_find's 6 batches ``mix`` changed, and how many there were."""
    learn = make_learner(dls, "mixup")
    store = _Store()
    pair = _Pair(store)
    learn.add_cbs([store, mix, pair])
    with learn.no_bar(), learn.no_logging():
        learn.lr_find(num_it=6, stop_div=False, show_plot=False)
    return pair.mixed, pair.batches


@pytest.mark.parametrize("variant", ["mixup", "cutmix", "randommix"])
def test_lr_find_mixes_its_batches_as_the_default_says_and_as_the_flag_says(dls, variant):
    # Input-level mixes only, so that a mixed batch is one whose input changed.
    make = {"mixup": MixUp, "cutmix": CutMix}.get(variant, lambda **kw: RandomMix([MixUp(), CutMix()], **kw))
    default = make()
    assert default.mix_in_lr_find is MIX_IN_LR_FIND
    assert _lr_find_mixed(dls, default) == ((6, 6) if MIX_IN_LR_FIND else (0, 6))
    assert _lr_find_mixed(dls, make(mix_in_lr_find=True)) == (6, 6)
    assert _lr_find_mixed(dls, make(mix_in_lr_find=False)) == (0, 6)


def test_the_default_follows_the_lr_find_benchmark():
    # benchmarks/results/lr_find_mix_digits.md: the fits at the mixed and the unmixed suggestion tied within
    # noise on real digits, so fastai's behaviour (mix lr_find's batches) is the default.
    assert MIX_IN_LR_FIND is True


def test_fastai_mixup_mixes_every_lr_find_batch_like_mix_in_lr_find_true(dls):
    from fastai.callback.mixup import MixUp as FastaiMixUp

    assert _lr_find_mixed(dls, FastaiMixUp()) == _lr_find_mixed(dls, MixUp(mix_in_lr_find=True)) == (6, 6)


def test_lr_find_under_mixing_leaves_training_and_validation_as_before(dls):
    learn = make_learner(dls, "mixup")
    cb = MixUp(mix_in_lr_find=True, off_pct=0.5)  # off_pct counts training, not lr_find's mock epochs
    learn.add_cb(cb)
    with learn.no_bar(), learn.no_logging():
        learn.lr_find(num_it=6, stop_div=False, show_plot=False)
    assert cb.lam is not None and cb.yb1 is None  # lr_find's last batch was mixed; its targets are gone
    plain = make_learner(dls, "mixup").get_preds(dl=dls.valid)[0]
    assert torch.equal(learn.get_preds(dl=dls.valid)[0], plain)  # lr_find put the weights back; no mixing


@pytest.mark.parametrize("flag", [True, False])
def test_lr_find_prints_exactly_one_line_saying_what_it_does(dls, capsys, flag):
    learn = make_learner(dls, "randommix")
    learn.add_cb(RandomMix([MixUp(), CutMix()], mix_in_lr_find=flag))  # the children print nothing
    capsys.readouterr()
    with learn.no_bar(), learn.no_logging():
        learn.lr_find(num_it=3, show_plot=False)
        quiet_fit(learn)
        learn.validate()
    out = capsys.readouterr().out.splitlines()
    if flag:
        assert out == ["RandomMix: mixing lr_find's batches too, as in training (mix_in_lr_find=True)"]
    else:
        assert out == ["RandomMix: lr_find's batches are left unmixed (mix_in_lr_find=False)"]
    assert out == [learn.random_mix.lr_find_line()]


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_mix_in_lr_find_must_be_a_bool(bad):
    with pytest.raises(TypeError, match=r"mix_in_lr_find must be True or False, got"):
        MixUp(mix_in_lr_find=bad)
