"""A fastai user swaps an import and changes nothing else.

Three sources of habits, rewritten here in our own words on generated data:

* fastbook's chapter 7 (``07_sizing_and_tta.ipynb``): its DataBlock, its normalization, its progressive
  resizing by swapping ``learn.dls`` between fits, ``learn.tta()``, ``MixUp()`` and
  ``LabelSmoothingCrossEntropy()``, each with the package's equivalent put in its place;
* fastai's own checks of ``MixUp``/``CutMix`` (``nbs/19_callback.mixup.ipynb``: fire the events by hand
  inside ``with Learner(...)``, then read the mixed batch from the callback) and of ``Learner.tta``
  (the same number of predictions and targets, targets in the loader's order);
* the everyday ``Learner`` paths with every callback attached both ways, ``Learner(cbs=)`` and
  ``fit(cbs=)``: ``lr_find``, ``fine_tune``, ``show_results``, export then ``load_learner`` then
  ``predict``, ``get_preds(with_loss=True)``, ``ClassificationInterpretation`` and fitting twice.

Each test checks results, not only that nothing raised.
"""

from __future__ import annotations

import matplotlib
import pytest
import torch
from conftest import seed_everything, tiny_cnn
from fastai.callback.mixup import MixUp as FastaiMixUp
from fastai.interpret import ClassificationInterpretation
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropy
from fastai.metrics import accuracy
from fastai.vision.all import (
    CategoryBlock,
    DataBlock,
    ImageBlock,
    Normalize,
    Resize,
    aug_transforms,
    get_image_files,
    imagenet_stats,
    parent_label,
    xresnet18,
)
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
    ensure_normalized,
)

matplotlib.use("Agg")


def _small_xresnet(n_out: int) -> nn.Module:
    # The chapter's xresnet50, shrunk (xresnet18 at a quarter of the width) so a fit takes a second.
    return xresnet18(n_out=n_out, widen=0.25, stem_szs=(8, 8, 64))  # the last stem width is fixed at 64


def get_dls(path, bs: int, size: int, normalize: bool = True):
    """The chapter's ``get_dls``: presize with Resize, augment on the batch, ImageNet statistics (scaled down)."""
    batch_tfms = [*aug_transforms(size=size, min_scale=0.75)]
    if normalize:
        batch_tfms.append(Normalize.from_stats(*imagenet_stats))
    dblock = DataBlock(
        blocks=(ImageBlock, CategoryBlock),
        get_items=get_image_files,
        get_y=parent_label,
        item_tfms=Resize(48),
        batch_tfms=batch_tfms,
    )
    return dblock.dataloaders(path, bs=bs, num_workers=0, seed=0)


@pytest.fixture(scope="module")
def chapter_path(fake_imagenette):
    return fake_imagenette


def test_chapter_normalization_swapped_for_ensure_normalized(chapter_path):
    # The chapter appends Normalize.from_stats(*imagenet_stats) by hand; ensure_normalized puts exactly one.
    seed_everything(0)
    dls = ensure_normalized(get_dls(chapter_path, 16, 32, normalize=False), "dataset")
    x, _ = dls.one_batch()
    assert sum(type(t).__name__ == "Normalize" for t in dls.train.after_batch.fs) == 1
    # A batch normalized with the training set's own statistics has mean near 0 and std near 1 per channel.
    assert x.mean(dim=[0, 2, 3]).abs().max() < 0.5
    assert ((x.std(dim=[0, 2, 3]) - 1).abs() < 0.5).all()
    again = ensure_normalized(dls, "dataset")
    assert sum(type(t).__name__ == "Normalize" for t in again.train.after_batch.fs) == 1


@pytest.mark.slow
def test_chapter_progressive_resizing_by_swapping_dls_and_with_the_callback(chapter_path):
    # The chapter: fit at 16 px, then learn.dls = get_dls(..., 32) and fine_tune. With ProgressiveResize attached
    # all the way through, each fit resizes its own loaders (the swapped ones too) and learn.dls is never changed.
    seed_everything(0)
    small, full = get_dls(chapter_path, 16, 16), get_dls(chapter_path, 16, 32)
    resize = ProgressiveResize(min_epochs=0)
    learn = Learner(small, _small_xresnet(small.c), loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=resize)
    learn.fit_one_cycle(2, 3e-3)
    assert resize.sizes[-1] == (16, 16) and resize.sizes[0] < (16, 16)
    learn.dls = full
    learn.fine_tune(2, 1e-3)
    assert learn.dls is full
    assert resize.sizes[-1] == (32, 32) and resize.sizes[0] < (32, 32)
    # The record of the last training fit survives evaluation (issue #19: validate() used to wipe it).
    record = list(resize.sizes)
    loss, acc = learn.validate()
    preds, targs = learn.get_preds()
    assert resize.sizes == record
    assert 0 <= acc <= 1 and preds.shape == (len(full.valid_ds), full.c)
    resize.plot_schedule()


def test_chapter_tta_swapped_for_four_corner_tta(chapter_path):
    seed_everything(0)
    dls = get_dls(chapter_path, 16, 32)
    learn = Learner(dls, _small_xresnet(dls.c), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    learn.fit_one_cycle(1, 3e-3)
    fastai_preds, fastai_targs = learn.tta()
    preds, targs = learn.four_corner_tta()
    # The same contract: one probability row per validation item, targets in the loader's order.
    assert preds.shape == fastai_preds.shape == (len(dls.valid_ds), dls.c)
    assert torch.equal(targs, fastai_targs)
    assert torch.allclose(preds.sum(dim=1), torch.ones(len(preds)), atol=1e-5)
    assert 0 <= accuracy(preds, targs).item() <= 1


@pytest.mark.slow
@pytest.mark.parametrize(
    ("theirs", "ours"),
    [
        (lambda: {"cbs": FastaiMixUp()}, lambda: {"cbs": MixUp()}),
        (lambda: {"loss_func": LabelSmoothingCrossEntropy()}, lambda: {"loss_func": LabelSmoothingCE()}),
    ],
    ids=["MixUp", "LabelSmoothingCrossEntropy"],
)
def test_chapter_mixup_and_label_smoothing_swapped(chapter_path, theirs, ours):
    # Each line of the chapter runs with our class in place of fastai's, and trains to the same kind of result.
    results = {}
    for name, make in (("fastai", theirs), ("ours", ours)):
        seed_everything(0)
        dls = get_dls(chapter_path, 16, 32)
        kwargs = {"loss_func": CrossEntropyLossFlat(), **make()}
        learn = Learner(dls, _small_xresnet(dls.c), metrics=accuracy, **kwargs)
        learn.fit_one_cycle(2, 3e-3)
        results[name] = learn.recorder.values[-1]
    for name, (train_loss, valid_loss, acc) in results.items():
        assert torch.isfinite(torch.tensor([train_loss, valid_loss])).all(), name
        assert 0 <= acc <= 1, name
    if "loss_func" in ours():
        # The same numbers as fastai's loss, the same seed and data: the same training, to float rounding.
        assert torch.allclose(torch.tensor(results["ours"]), torch.tensor(results["fastai"]), rtol=1e-4, atol=1e-5)


# fastai's mixup notebook: fire the training events by hand, then read the mixed batch from the callback.
@pytest.mark.parametrize("make", [lambda: MixUp(0.5), lambda: CutMix(1.0)], ids=["MixUp", "CutMix"])
def test_fastai_notebook_manual_events_give_a_mixed_batch_and_lam(tiny_dls, make):
    mix = make()
    with Learner(tiny_dls, tiny_cnn(), loss_func=CrossEntropyLossFlat(), cbs=mix) as learn:
        learn.epoch, learn.training = 0, True
        learn.dl = tiny_dls.train
        b = tiny_dls.one_batch()
        learn._split(b)
        learn("before_train")
        learn("before_batch")
        x, y = mix.x, mix.y
        assert x.shape == b[0].shape and not torch.equal(x, b[0])  # mixed in place of the original
        assert y is learn.y
        assert mix.lam is not None and mix.lam.shape == (len(b[0]),)
        assert mix.yb1 is not None and len(mix.yb1) == 1 and mix.yb1[0].shape == b[1].shape
        # Every mixed target is one of the batch's own labels.
        assert set(mix.yb1[0].tolist()) <= set(b[1].tolist())


def test_fastai_tta_check_same_number_of_predictions_and_targets(tiny_learner):
    tiny_learner.fit(1)
    preds, targs = tiny_learner.four_corner_tta()
    plain, plain_targs = tiny_learner.get_preds()
    assert len(preds) == len(targs) == len(plain)
    assert torch.equal(targs, plain_targs)


# ---------------------------------------------------------------------------------------------------------------
# Every callback, attached both ways, through the everyday Learner paths.

CALLBACKS = {
    "MixUp": lambda: MixUp(),
    "CutMix": lambda: CutMix(),
    "FMix": lambda: FMix(),
    "ResizeMix": lambda: ResizeMix(),
    "ManifoldMix": lambda: ManifoldMix(),
    "RandomMix": lambda: RandomMix([MixUp(), CutMix()]),
    "ProgressiveResize": lambda: ProgressiveResize(min_epochs=0),
    "NormalizationCheck": lambda: NormalizationCheck(warn=False),
    "FourCornerTTA": lambda: FourCornerTTA(),
}
# The fast tier runs one mix attached to the Learner and the resizer passed to fit; the slow tier runs the rest.
FAST = {("MixUp", "Learner(cbs=)"), ("ProgressiveResize", "fit(cbs=)")}


def _params():
    for name in CALLBACKS:
        for attach in ("Learner(cbs=)", "fit(cbs=)"):
            marks = () if (name, attach) in FAST else (pytest.mark.slow,)
            yield pytest.param(name, attach, marks=marks, id=f"{name}-{attach}")


def _residual_model(n_out: int) -> nn.Module:
    return _small_xresnet(n_out)


@pytest.mark.parametrize(("name", "attach"), list(_params()))
def test_everyday_learner_paths_with_every_callback(name, attach, tiny_dls, tmp_path):
    seed_everything(0)
    cb = CALLBACKS[name]()
    model = _residual_model(tiny_dls.c) if name == "ManifoldMix" else tiny_cnn(n_out=tiny_dls.c)
    learn = Learner(
        tiny_dls,
        model,
        loss_func=CrossEntropyLossFlat(),
        metrics=accuracy,
        cbs=[cb] if attach == "Learner(cbs=)" else None,
        path=tmp_path,
    )
    fit_cbs = [cb] if attach == "fit(cbs=)" else None

    suggestion = learn.lr_find(num_it=8, show_plot=False)
    assert suggestion.valley > 0
    assert len(learn.recorder.lrs) > 0

    learn.fine_tune(1, 1e-3, freeze_epochs=1, cbs=fit_cbs)
    assert len(learn.recorder.values) == 1  # fine_tune's second fit
    learn.fit_one_cycle(1, 1e-3, cbs=fit_cbs)  # fitting twice
    assert len(learn.recorder.values) == 1 and all(torch.isfinite(torch.tensor(learn.recorder.values[-1])))

    preds, targs, losses = learn.get_preds(with_loss=True)
    n = len(tiny_dls.valid_ds)
    assert preds.shape == (n, tiny_dls.c) and targs.shape == (n,) and losses.shape == (n,)
    assert torch.allclose(preds.sum(dim=1), torch.ones(n), atol=1e-5)
    # The per-item losses are the plain loss of the plain predictions: nothing of training leaked into evaluation.
    assert torch.allclose(losses, nn.functional.nll_loss(preds.log(), targs, reduction="none"), atol=1e-4)

    interp = ClassificationInterpretation.from_learner(learn)
    assert interp.confusion_matrix().sum() == n

    learn.show_results(max_n=2)

    learn.export(tmp_path / "export.pkl")
    loaded = load_learner(tmp_path / "export.pkl")
    item = tiny_dls.valid_ds.items[0]
    label, idx, probs = loaded.predict(item)
    assert probs.shape == (tiny_dls.c,) and label == tiny_dls.vocab[idx]
    assert torch.allclose(probs, preds[0], atol=1e-5)
