"""Faults inside fit: every callback, alone and all together, leaves the Learner exactly reusable.

For each configuration (each callback alone, and all of them on one Learner) a small raising
callback throws from inside a training event, a KeyboardInterrupt arrives mid-epoch, or fastai's
own CancelFit/CancelEpoch/CancelBatch exceptions are raised. Afterwards:

* ``learn.loss_func`` is the same object;
* every submodule's forward hooks and forward pre-hooks are the ones it had before;
* the DataLoaders pipelines turn the same items into batches of the same shape and values as
  before, under the same seed (the "before" batches are computed once per session);
* predictions equal those of a fresh Learner holding the same weights;
* fit runs again, with the callback and without it.

The raising callback runs after every feature callback on the same event (``order=20``), so a
fault arrives when each of them has done its work: a batch mixed, a ManifoldMix hook armed, a
resized batch in ``learn.xb``, mixing alphas changed by ProgressiveResize, a batch expanded into
TTA views. FourCornerTTA acts outside training, so it is attached to the Learner (validation in
fit runs with it) and also gets faults raised during validation.

Finally, a Learner with every callback attached is exported and loaded in a fresh Python
process, whose predictions must equal the plain model's: nothing is mixed or resized.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import seed_everything, tiny_cnn
from fastai.callback.core import Callback, CancelBatchException, CancelEpochException, CancelFitException
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.vision.all import ImageDataLoaders, Normalize, Resize, aug_transforms, get_image_files, imagenet_stats

from fastai_tricks import (
    CutMix,
    FMix,
    FourCornerTTA,
    ManifoldMix,
    MixCallback,
    MixUp,
    NormalizationCheck,
    NormalizationWarning,
    ProgressiveResize,
    RandomMix,
    ResizeMix,
)
from fastai_tricks.data import make_fake_imagenette

REPO = Path(__file__).resolve().parents[1]
# Outputs of tiny_cnn's ReLUs: ManifoldMix needs named candidates on a model without residual stages.
STAGES = ["2", "5"]

pytestmark = pytest.mark.filterwarnings("ignore", category=NormalizationWarning)


def _all_training_cbs() -> list[Callback]:
    return [
        MixUp(),
        CutMix(per_sample=True),
        ManifoldMix(modules=STAGES),
        ResizeMix(),
        FMix(),
        RandomMix([MixUp(), CutMix(), ManifoldMix(modules=STAGES), ResizeMix(), FMix()]),
        ProgressiveResize(min_epochs=0, start=0.0, finish=1.0, mix_alpha=(0.2, 0.4)),
        NormalizationCheck(),
    ]


# name -> (callbacks passed to fit(cbs=...), callbacks attached to the Learner): fresh instances each call.
CONFIGS = {
    "mixup": lambda: ([MixUp()], []),
    "cutmix": lambda: ([CutMix(per_sample=True)], []),
    "manifoldmix": lambda: ([ManifoldMix(modules=STAGES)], []),
    "resizemix": lambda: ([ResizeMix()], []),
    "fmix": lambda: ([FMix()], []),
    "randommix": lambda: ([RandomMix([MixUp(), CutMix(), ManifoldMix(modules=STAGES), ResizeMix(), FMix()])], []),
    # start=0 so that the first (faulted) epoch already trains below full size.
    "progressive_resize": lambda: ([ProgressiveResize(min_epochs=0, start=0.0, finish=1.0)], []),
    "four_corner_tta": lambda: ([], [FourCornerTTA()]),
    "normalization_check": lambda: ([NormalizationCheck()], []),
    # ProgressiveResize changes the mixing callbacks' alpha at every batch: a fault must not leave it changed.
    "resize_drives_alpha": lambda: (
        [
            MixUp(),
            ManifoldMix(modules=STAGES),
            ProgressiveResize(min_epochs=0, mix_alpha=(0.2, 0.4), start=0.0, finish=1.0),
        ],
        [],
    ),
    "all": lambda: (_all_training_cbs(), [FourCornerTTA(flip=True)]),
}

# (event, exception, phase): raised at the second training batch (mid-epoch), or at the first
# validation event for the validation phase.
FAULTS = [
    ("before_batch", RuntimeError, "train"),
    ("after_pred", RuntimeError, "train"),
    ("after_loss", RuntimeError, "train"),
    ("after_backward", RuntimeError, "train"),
    ("before_validate", RuntimeError, "valid"),
    ("before_batch", KeyboardInterrupt, "train"),
    ("before_batch", CancelFitException, "train"),
    ("before_batch", CancelEpochException, "train"),
    ("before_batch", CancelBatchException, "train"),
]
# FourCornerTTA only acts in validation: fault it while a batch is expanded into views, and after merging.
VALID_FAULTS = [
    ("before_batch", RuntimeError, "valid"),
    ("after_pred", KeyboardInterrupt, "valid"),
]
# The fast tier runs every fault on "all" (every callback at once) and one fault on each callback alone; the slow
# tier runs the rest of the matrix.
_FAST_FAULT = ("before_batch", RuntimeError, "train")
CASES = [
    pytest.param(
        name,
        *fault,
        id=f"{name}-{fault[0]}-{fault[1].__name__}-{fault[2]}",
        marks=() if name == "all" or fault == _FAST_FAULT else (pytest.mark.slow,),
    )
    for name in CONFIGS
    for fault in FAULTS + (VALID_FAULTS if name in ("four_corner_tta", "all") else [])
]
# fastai handles its cancel exceptions itself: fit returns normally.
CANCELS = (CancelFitException, CancelEpochException, CancelBatchException)


class Fault(Callback):
    """Raise ``exc`` from ``event`` at the second training batch, or at the first validation event."""

    order = 20  # after every feature callback (ProgressiveResize -5, mixing 0, FourCornerTTA 9)

    def __init__(self, event: str, exc: type[BaseException], phase: str):
        self.event, self.exc, self.phase, self.seen, self.fired = event, exc, phase, 0, False
        setattr(self, event, self._maybe_raise)

    def _maybe_raise(self) -> None:
        if self.fired or bool(self.learn.training) != (self.phase == "train"):
            return
        self.seen += 1
        if self.seen == (2 if self.phase == "train" and self.event != "before_validate" else 1):
            self.fired = True
            raise self.exc(f"fault injected in {self.event}")


# --- data, learners and snapshots ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fault_data(tmp_path_factory) -> Path:
    """20 training and 10 validation images of 32 px: two training batches of 8 and two validation batches."""
    return make_fake_imagenette(tmp_path_factory.mktemp("faults"), n_train=2, n_valid=1, size=32, seed=0)


def make_dls(path: Path):
    """Loaders with a size-fixing random augmentation and a Normalize, so every pipeline kind is exercised."""
    seed_everything(0)
    return ImageDataLoaders.from_folder(
        path,
        valid="val",
        bs=8,
        num_workers=0,
        seed=0,
        item_tfms=Resize(32),
        batch_tfms=[*aug_transforms(size=32, min_scale=0.75), Normalize.from_stats(*imagenet_stats)],
    )


def make_learner(path: Path, attached=(), state: dict | None = None) -> Learner:
    seed_everything(0)
    model = tiny_cnn()
    if state is not None:
        model.load_state_dict(state)
    return Learner(make_dls(path), model, loss_func=CrossEntropyLossFlat(), cbs=list(attached))


def quiet_fit(learn: Learner, **kw) -> None:
    with learn.no_logging(), learn.no_bar(), warnings.catch_warnings():
        warnings.simplefilter("ignore", NormalizationWarning)
        learn.fit(1, 1e-3, **kw)


def hooks(model: torch.nn.Module) -> dict:
    """Every submodule's forward hooks and pre-hooks, as (hook id, function) pairs."""
    return {
        name: (
            list(m._forward_hooks.items()),
            list(m._forward_pre_hooks.items()),
            sorted(m._forward_hooks_always_called),
        )
        for name, m in model.named_modules()
    }


def pipeline_batches(dls) -> list:
    """One batch from each loader, through all its pipelines, with the loader's shuffle and the RNGs seeded."""
    out = []
    for dl in dls.loaders:
        saved = dl.rng
        dl.rng = random.Random(0)  # the loader's own shuffling RNG advances every epoch; seed it too
        seed_everything(0)
        try:
            out.append(tuple(t.clone() for t in dl.one_batch()))
        finally:
            dl.rng = saved
    return out


def quiet_preds(learn: Learner) -> torch.Tensor:
    with learn.no_bar():
        return learn.get_preds(ds_idx=1)[0]


@pytest.fixture(scope="module")
def before(fault_data) -> list:
    """The pipeline batches of a Learner no callback ever touched, computed once."""
    return pipeline_batches(make_dls(fault_data))


def assert_same_batches(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for b_got, b_exp in zip(got, expected, strict=True):
        for t_got, t_exp in zip(b_got, b_exp, strict=True):
            assert t_got.shape == t_exp.shape
            assert torch.equal(t_got, t_exp)


# --- the matrix ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("config", "event", "exc", "phase"), CASES)
def test_learner_is_exactly_reusable_after_a_fault_inside_fit(fault_data, before, config, event, exc, phase):
    fit_cbs, attached = CONFIGS[config]()
    learn = make_learner(fault_data, attached)
    loss_func, model_hooks = learn.loss_func, hooks(learn.model)
    alphas = [(cb, cb.alpha) for cb in fit_cbs if isinstance(cb, MixCallback)]
    fault = Fault(event, exc, phase)

    if exc in CANCELS:
        quiet_fit(learn, cbs=[*fit_cbs, fault])
    else:
        with pytest.raises(exc, match="fault injected"):
            quiet_fit(learn, cbs=[*fit_cbs, fault])
    assert fault.fired

    assert learn.loss_func is loss_func
    assert hooks(learn.model) == model_hooks
    assert all(cb.alpha == alpha for cb, alpha in alphas)  # ProgressiveResize(mix_alpha=...) put them back
    assert learn.dl is None or any(learn.dl is dl for dl in learn.dls.loaders)  # no per-fit copy left
    assert_same_batches(pipeline_batches(learn.dls), before)

    fresh = make_learner(fault_data, CONFIGS[config]()[1], state=learn.model.state_dict())
    assert torch.equal(quiet_preds(learn), quiet_preds(fresh))

    quiet_fit(learn, cbs=CONFIGS[config]()[0])
    quiet_fit(learn)
    assert learn.loss_func is loss_func
    assert hooks(learn.model) == model_hooks
    assert torch.isfinite(torch.tensor(learn.recorder.values[-1][0]))


def test_fault_matrix_covers_every_callback_every_event_and_every_exception():
    fit_cbs, attached = CONFIGS["all"]()
    names = {type(cb).__name__ for cb in [*fit_cbs, *attached]}
    assert names == {
        "MixUp",
        "CutMix",
        "ManifoldMix",
        "ResizeMix",
        "FMix",
        "RandomMix",
        "ProgressiveResize",
        "FourCornerTTA",
        "NormalizationCheck",
    }
    assert {e for e, _, _ in FAULTS} == {
        "before_batch",
        "after_pred",
        "after_loss",
        "after_backward",
        "before_validate",
    }
    assert {x for _, x, _ in FAULTS} == {RuntimeError, KeyboardInterrupt, *CANCELS}


def test_progressive_resize_mix_alpha_gives_randommix_children_their_own_alpha_back(fault_data):
    mix = RandomMix([MixUp(alpha=0.4), CutMix(alpha=1.0)])
    learn = make_learner(fault_data)
    quiet_fit(learn, cbs=[mix, ProgressiveResize(min_epochs=0, mix_alpha=(0.2, 0.4), start=0.0, finish=1.0)])
    assert [m.alpha for m in mix.mixes] == [0.4, 1.0]
    assert mix.alpha is None


@pytest.mark.parametrize("config", list(CONFIGS))
def test_two_fits_under_the_same_seed_give_identical_weights_and_losses(fault_data, config):
    runs = []
    for _ in range(2):
        fit_cbs, attached = CONFIGS[config]()
        learn = make_learner(fault_data, attached)  # seeds Python, NumPy and torch
        learn.dls.train.rng = random.Random(0)  # and the loader's own shuffling RNG
        quiet_fit(learn, cbs=fit_cbs)
        runs.append((learn.model.state_dict(), [float(v) for v in learn.recorder.losses]))
    (w1, l1), (w2, l2) = runs
    assert l1 == l2
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


# --- export, then load in a fresh process ---------------------------------------------------------------

_LOAD_AND_PREDICT = r"""
import json, sys, warnings
import torch
from fastai.learner import load_learner
from fastai.vision.all import get_image_files

path, data, out = sys.argv[1:4]
warnings.simplefilter("ignore")
learn = load_learner(path)
files = sorted(get_image_files(data))[:6]
seen = []
learn.model.register_forward_pre_hook(lambda m, args: seen.append(list(args[0].shape)))
with learn.no_bar():
    preds, _ = learn.get_preds(dl=learn.dls.test_dl(files))
    single = learn.predict(files[0])[2]
json.dump({
    "preds": preds.tolist(),
    "single": single.tolist(),
    "shapes": seen,
    "cbs": sorted(type(cb).__name__ for cb in learn.cbs),
    "loss": type(learn.loss_func).__name__,
}, open(out, "w"))
"""


@pytest.mark.slow
def test_export_then_load_learner_in_a_fresh_process_predicts_without_mixing_or_resizing(fault_data, tmp_path):
    cbs = _all_training_cbs()
    learn = make_learner(fault_data, cbs)
    quiet_fit(learn)  # every callback has run: ProgressiveResize trained below 32 px, mixing happened
    assert min(h for h, _ in learn.progressive_resize.sizes) < 32
    learn.export(tmp_path / "learner.pkl")

    files = sorted(get_image_files(fault_data / "val"))[:6]
    plain = make_learner(fault_data, state=learn.model.state_dict())
    with plain.no_bar():
        expected = plain.get_preds(dl=plain.dls.test_dl(files))[0]

    script = tmp_path / "load_and_predict.py"
    script.write_text(_LOAD_AND_PREDICT)
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "learner.pkl"), str(fault_data / "val"), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())

    # The callbacks travelled with the Learner, and did nothing at prediction time.
    assert {type(cb).__name__ for cb in cbs} <= set(got["cbs"])
    assert got["loss"] == type(learn.loss_func).__name__
    assert all(shape[-2:] == [32, 32] for shape in got["shapes"])
    torch.testing.assert_close(torch.tensor(got["preds"]), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(got["single"]), expected[0], rtol=1e-5, atol=1e-6)
