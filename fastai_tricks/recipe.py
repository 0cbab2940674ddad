"""The Imagenette from-scratch recipe of the fastbook chapter on training a state-of-the-art model.

The chapter trains xresnet50 from scratch and adds, in order, normalization,
progressive resizing, test-time augmentation, mixup and label smoothing.
:class:`RecipeConfig` says which of those a run uses; :func:`run_recipe` builds
the data and the learner, trains, evaluates with and without TTA and writes
everything a user needs into ``out``; :func:`run_ablation` runs the chapter's
sequence, one trick at a time, with the same seed and budget.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import itertools
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._checks import check_choice, check_fraction, check_non_negative_int, check_positive, check_positive_int
from .data import DataUnavailableError, imagenette_path, make_digits, make_fake_imagenette

__all__ = [
    "ABLATION_BASELINE",
    "ABLATION_STEPS",
    "ABLATION_TRICKS",
    "EVAL_ONLY",
    "MIX_CHOICES",
    "NORMALIZE_CHOICES",
    "TTA_CHOICES",
    "RecipeConfig",
    "build_dls",
    "ablation_plan",
    "build_learner",
    "check_test_size",
    "demo_config",
    "describe_test_size",
    "digits_config",
    "eval_parent",
    "find_data",
    "run_ablation",
    "run_recipe",
    "train_plain_fastai",
]

NORMALIZE_CHOICES = ("dataset", "imagenet", "none")
MIX_CHOICES = ("none", "mixup", "cutmix", "manifold", "resizemix", "fmix", "random")
TTA_CHOICES = ("none", "fastai", "four-corner", "ten-crop")
IMAGENETTE_CHOICES = ("160", "320", "full")

# The demo draws this many images per class: enough for a small xresnet to learn in a few epochs.
_DEMO_TRAIN, _DEMO_VALID = 60, 20


@dataclass
class RecipeConfig:
    """Everything that decides one run of the recipe.

    Args:
        data: A local ImageNet-style folder (class subfolders, optionally split into
            train/ and val/ folders). None means real Imagenette, or the demo data with ``demo``.
        imagenette: Which Imagenette to download when ``data`` is None: '160', '320' or 'full'.
        demo: Train on generated offline data (:func:`fastai_tricks.make_fake_imagenette`).
        digits: Train on scikit-learn's real handwritten digits, written as a folder
            (:func:`fastai_tricks.make_digits`): real images, offline.
        valid: Name of the validation folder; None means 'val' or 'valid' if present, else a random split.
        valid_pct: Fraction of images held out when the folder has no validation split.
        arch: A fastai xresnet name (``xresnet50``) or a torchvision resnet name (``resnet18``).
        size: Final training (and validation) image size in pixels.
        epochs: Number of epochs of ``fit_one_cycle``.
        bs: Batch size.
        lr: Peak learning rate of the one-cycle schedule.
        normalize: 'dataset' (exact statistics of the training set), 'imagenet' or 'none'.
        progressive: Train with :class:`fastai_tricks.ProgressiveResize`. None (the default) turns it
            on only for budgets where it measured no accuracy loss
            (:func:`fastai_tricks.resizing.schedule_pays_off`); True forces it on, False off.
        initial_size: Initial size of progressive resizing, a fraction of ``size`` or pixels.
        resize_start: Fraction of training at which the size starts to grow.
        resize_finish: Fraction of training at which it reaches ``size``.
        flip: Random horizontal flips in the training augmentation. None (the default) flips
            Imagenette and the demo data, whose labels survive mirroring, and does not flip
            ``digits`` or a ``data`` folder: digits, text and road signs change meaning when
            mirrored, and plain fastai does not flip either. Pass True for your own photos.
        draft: Decode JPEGs at the size the item transforms need
            (:class:`fastai_tricks.DraftImageBlock`), which shrinks with progressive resizing.
            False decodes every image at full size, as fastai's ``ImageBlock`` does.
        mix: Which mixing callback to train with.
        alpha: α of the mixing callback; None uses the callback's default.
        label_smoothing: ε of :class:`fastai_tricks.LabelSmoothingCE`; 0 (the default) trains with plain
            cross-entropy: at short budgets on real digits label smoothing did not pay off (docs/recipe.md).
        tta: Test-time augmentation for the final evaluation.
        test_size: Also evaluate at another size (:class:`fastai_tricks.TestSize`, FixRes): 'off' (the
            default), 'auto' (the size that matches training's apparent object size), an int (pixels)
            or a float (a factor of ``size``). ``accuracy`` stays the one at the training size; on
            real digits every larger test size lost accuracy (docs/test_size.md).
        recalibrate_bn: Batches of training images to recompute the BatchNorm statistics from at the
            test size for that evaluation (0: keep the trained ones); needs a ``test_size``
            (``test_size=1.0`` recalibrates at the training size).
        fp16: Mixed precision (needs CUDA; ignored with a warning on CPU).
        channels_last: Train in the channels_last memory format.
        seed: Seed of every random generator.
        workers: DataLoader worker processes; None uses fastai's default.
        out: Output folder.
    """

    data: Path | None = None
    imagenette: str = "160"
    demo: bool = False
    digits: bool = False
    valid: str | None = None
    valid_pct: float = 0.2
    arch: str = "xresnet50"
    size: int = 128
    epochs: int = 5
    bs: int = 64
    lr: float = 8e-3
    normalize: str = "dataset"
    progressive: bool | None = None
    initial_size: float = 0.5
    resize_start: float = 0.25
    resize_finish: float = 0.5
    flip: bool | None = None
    draft: bool = True
    mix: str = "none"
    alpha: float | None = None
    label_smoothing: float = 0.0
    tta: str = "four-corner"
    test_size: str | int | float = "off"
    recalibrate_bn: int = 0
    fp16: bool = False
    channels_last: bool = False
    seed: int = 0
    workers: int | None = None
    out: Path = field(default_factory=lambda: Path("runs/recipe"))

    def __post_init__(self) -> None:
        check_choice("imagenette", self.imagenette, IMAGENETTE_CHOICES)
        check_fraction("valid_pct", self.valid_pct, low_inclusive=False, high_inclusive=False)
        check_positive_int("size", self.size)
        check_positive_int("epochs", self.epochs)
        check_positive_int("bs", self.bs)
        check_positive("lr", self.lr)
        check_choice("normalize", self.normalize, NORMALIZE_CHOICES)
        check_positive("initial_size", self.initial_size)
        check_fraction("resize_start", self.resize_start)
        check_fraction("resize_finish", self.resize_finish)
        if self.resize_finish < self.resize_start:
            raise ValueError(
                f"resize_finish must be >= resize_start, got resize_finish={self.resize_finish!r} "
                f"and resize_start={self.resize_start!r}"
            )
        check_choice("mix", self.mix, MIX_CHOICES)
        if self.alpha is not None:
            check_positive("alpha", self.alpha)
        check_fraction("label_smoothing", self.label_smoothing, high_inclusive=False)
        check_choice("tta", self.tta, TTA_CHOICES)
        self.test_size = check_test_size(self.test_size)
        check_non_negative_int("recalibrate_bn", self.recalibrate_bn)
        if self.recalibrate_bn and self.test_size == "off":
            raise ValueError(
                f"recalibrate_bn needs a test_size other than 'off' (test_size=1.0 recalibrates at the training "
                f"size), got recalibrate_bn={self.recalibrate_bn!r} and test_size='off'"
            )
        _arch(self.arch)
        if self.workers is not None:
            check_non_negative_int("workers", self.workers)
        if self.demo and self.digits:
            raise ValueError("demo and digits are two data sources: choose one, got demo=True and digits=True")
        if self.flip is None:
            # Mirroring keeps the label of a photo, not of a digit, a letter or a road sign: flip only
            # the data known to be photos (Imagenette, the demo shapes); a user's own folder opts in.
            self.flip = not self.digits and (self.data is None or self.demo)
        # Resolved once, here: the Learner's path, CSVLogger, export and every plot then agree on one
        # absolute folder, whatever the working directory and however ``out`` was written.
        self.out = Path(self.out).expanduser().resolve()
        self.data = None if self.data is None else Path(self.data).expanduser()

    @property
    def uses_progressive(self) -> bool:
        """Whether this run trains with progressive resizing, once the budget guard has decided."""
        from .resizing import schedule_pays_off

        return self.progressive if self.progressive is not None else schedule_pays_off(self.epochs)

    def effective(self, **changes: Any) -> RecipeConfig:
        """This configuration with every automatic choice made explicit (two runs that train alike compare equal)."""
        return dataclasses.replace(self, progressive=self.uses_progressive, **changes)

    def tricks(self) -> dict[str, str]:
        """What this run turns on, and why where a default decided: for logs and ``results.json``."""
        from .resizing import MIN_EPOCHS

        if self.progressive is None:
            rel = ">=" if self.uses_progressive else "<"
            progressive = (
                f"{'on' if self.uses_progressive else 'off'} (budget guard: {self.epochs} {rel} {MIN_EPOCHS} epochs)"
            )
        else:
            progressive = "on" if self.progressive else "off"
        return {
            "normalize": self.normalize,
            "progressive resizing": progressive,
            "flips": "on" if self.flip else "off",
            "draft decoding": "on" if self.draft else "off",
            "mix": self.mix,
            "label smoothing": f"{self.label_smoothing:g}",
            "tta": self.tta,
            "test size": describe_test_size(self.test_size, self.recalibrate_bn),
        }

    def to_json(self) -> dict[str, Any]:
        """The configuration as JSON-ready values."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


def check_test_size(value: Any) -> str | int | float:
    """Return a valid ``test_size``: 'off', or what :class:`fastai_tricks.TestSize` accepts as ``size``.

    Raises:
        ValueError: A string other than 'off' and 'auto', a size <= 0 or not finite.
        TypeError: Another type (a bool, a list).
    """
    from .fixres import _check_size

    if isinstance(value, str) and value == "off":
        return "off"
    try:
        return _check_size(value)
    except (ValueError, TypeError) as err:
        raise type(err)(
            "test_size must be 'off', 'auto', an int > 0 (pixels) or a float > 0 (a factor of the training size), "
            f"got {value!r}"
        ) from err


def describe_test_size(test_size: str | int | float, recalibrate_bn: int = 0, px: Sequence[int] | None = None) -> str:
    """Say which test size a run evaluates at: 'off', 'auto', '20 px' or '1.15x', with the pixels once known."""
    if test_size == "off":
        return "off"
    text = f"{test_size} px" if isinstance(test_size, int) else "auto" if test_size == "auto" else f"{test_size:g}x"
    if px is not None and not isinstance(test_size, int):
        text += f" ({'x'.join(map(str, dict.fromkeys(px)))} px)"  # one number for a square size
    if recalibrate_bn:
        text += f", BatchNorm recalibrated on {recalibrate_bn} batches"
    return text


def _test_size_cb(cfg: RecipeConfig) -> Any:
    """The :class:`fastai_tricks.TestSize` of an evaluation of ``cfg``, or None when ``test_size`` is 'off'.

    Only ever attached around an evaluation (``learn.added_cbs``), never passed to ``fit``, so the
    exported learner does not carry it.
    """
    from .fixres import TestSize

    if cfg.test_size == "off":
        return None
    return TestSize(cfg.test_size, recalibrate_bn=cfg.recalibrate_bn)


def digits_config(**overrides: Any) -> RecipeConfig:
    """A :class:`RecipeConfig` for scikit-learn's real digits: xresnet18, 4 epochs at 32 px, no flips."""
    values: dict[str, Any] = dict(digits=True, arch="xresnet18", size=32, epochs=4, bs=64, lr=8e-3, workers=0)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return RecipeConfig(**values)


def demo_config(**overrides: Any) -> RecipeConfig:
    """A :class:`RecipeConfig` for the offline demo: a small model that trains in minutes on 2 CPU cores."""
    values: dict[str, Any] = dict(demo=True, arch="xresnet18", size=64, epochs=4, bs=32, lr=1e-2, workers=0)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return RecipeConfig(**values)


# --- data ------------------------------------------------------------------------------------------

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _valid_folder(root: Path, valid: str | None) -> str | None:
    if valid is not None:
        if not (root / valid).is_dir():
            raise DataUnavailableError(f"data folder {str(root)!r} has no validation folder {valid!r}")
        return valid
    return next((v for v in ("val", "valid") if (root / v).is_dir()), None)


def find_data(cfg: RecipeConfig) -> Path:
    """Return the data folder of a run: generated demo data, a checked local folder, or Imagenette.

    Raises:
        DataUnavailableError: the folder is missing, holds no class folders of images, or lacks the
            named validation folder; or Imagenette cannot be downloaded.
    """
    if cfg.demo:
        return make_fake_imagenette(cfg.out / "data", n_train=_DEMO_TRAIN, n_valid=_DEMO_VALID, size=72, seed=cfg.seed)
    if cfg.digits:
        # The split is fixed (seed 0) whatever the training seed, so seeds vary the training, not the data.
        return make_digits(cfg.out / "data", size=32, valid_pct=0.25, seed=0)
    if cfg.data is None:
        return imagenette_path(size="full" if cfg.imagenette == "full" else int(cfg.imagenette))
    root = cfg.data
    if not root.is_dir():
        raise DataUnavailableError(f"data folder {str(root)!r} does not exist or is not a folder")
    if _valid_folder(root, cfg.valid) in ("val", "valid"):
        return imagenette_path(root)
    # Images sit in <class>/ folders, or one level deeper in <split>/<class>/ folders.
    candidates = itertools.chain(root.glob("*/*"), root.glob("*/*/*"))
    if not any(f.suffix.lower() in _IMAGE_SUFFIXES for f in candidates):
        raise DataUnavailableError(
            f"data folder {str(root)!r} holds no class folders of images; expected <class>/*.jpg "
            "or train/<class>/*.jpg with val/<class>/*.jpg"
        )
    return root


def build_dls(path: Path, cfg: RecipeConfig) -> Any:
    """Build the recipe's DataLoaders: presized random crops on the CPU, flips and warps on the batch.

    With a train/ and val/ (or ``cfg.valid``) folder the split follows the folders; otherwise
    ``cfg.valid_pct`` of the images are held out at random (seeded).
    """
    from fastai.vision.all import (
        CategoryBlock,
        DataBlock,
        GrandparentSplitter,
        ImageBlock,
        RandomSplitter,
        Resize,
        aug_transforms,
        get_image_files,
        parent_label,
    )

    from .draft import DraftImageBlock
    from .normalization import ensure_normalized

    valid = _valid_folder(path, cfg.valid)
    if valid is not None:
        splitter = GrandparentSplitter(train_name="train", valid_name=valid)
    else:
        splitter = RandomSplitter(cfg.valid_pct, seed=cfg.seed)
    # Presize: decode to a little more than the final size on the CPU (JPEGs straight to the nearest DCT
    # scale above it), then crop/warp in one batched step.
    block = DataBlock(
        blocks=(DraftImageBlock if cfg.draft else ImageBlock, CategoryBlock),
        get_items=get_image_files,
        get_y=parent_label,
        splitter=splitter,
        item_tfms=Resize(int(cfg.size * 1.25)),
        batch_tfms=aug_transforms(size=cfg.size, min_scale=0.75, do_flip=cfg.flip),
    )
    kwargs: dict[str, Any] = {"bs": cfg.bs}
    if cfg.workers is not None:
        kwargs["num_workers"] = cfg.workers
    dls = block.dataloaders(path, **kwargs)
    if len(dls.train_ds) == 0 or len(dls.valid_ds) == 0:
        raise DataUnavailableError(
            f"data folder {str(path)!r} gave {len(dls.train_ds)} training and {len(dls.valid_ds)} validation images"
        )
    if cfg.normalize != "none":
        ensure_normalized(dls, cfg.normalize)
    return dls


# --- model and callbacks ---------------------------------------------------------------------------


def _arch(name: str) -> Callable[..., torch.nn.Module]:
    from fastai.vision.models import xresnet
    from torchvision import models as tv_models

    if name.startswith("xres") and hasattr(xresnet, name):
        return getattr(xresnet, name)
    if name.startswith("res") and hasattr(tv_models, name):
        fn = getattr(tv_models, name)
        return lambda n_out: fn(num_classes=n_out)
    raise ValueError(f"arch must be a fastai xresnet or torchvision resnet name, got {name!r}")


def _mix_callback(cfg: RecipeConfig) -> Any:
    from . import mixing

    kwargs = {} if cfg.alpha is None else {"alpha": cfg.alpha}
    simple = {
        "mixup": mixing.MixUp,
        "cutmix": mixing.CutMix,
        "manifold": mixing.ManifoldMix,
        "fmix": mixing.FMix,
        "resizemix": mixing.ResizeMix,
    }
    if cfg.mix in simple:
        return simple[cfg.mix](**kwargs)
    return mixing.RandomMix([mixing.MixUp(**kwargs), mixing.CutMix(**kwargs)])


def training_callbacks(cfg: RecipeConfig) -> list[Any]:
    """The callbacks that act only while training: passed to ``fit``, so the exported learner carries none."""
    from .resizing import ProgressiveResize

    cbs: list[Any] = []
    if cfg.mix != "none":
        cbs.append(_mix_callback(cfg))
    if cfg.uses_progressive:
        # The recipe has already applied the budget guard (or the user forced resizing on).
        cbs.append(
            ProgressiveResize(
                initial_size=cfg.initial_size,
                start=cfg.resize_start,
                finish=cfg.resize_finish,
                final_size=cfg.size,
                min_epochs=0,
            )
        )
    return cbs


def build_learner(dls: Any, cfg: RecipeConfig) -> Any:
    """A from-scratch Learner for the recipe: the arch, the loss (label smoothing or not), accuracy."""
    from fastai.vision.all import CrossEntropyLossFlat, Learner, accuracy

    from .losses import LabelSmoothingCE

    model = _arch(cfg.arch)(n_out=dls.c)
    loss = LabelSmoothingCE(eps=cfg.label_smoothing) if cfg.label_smoothing > 0 else CrossEntropyLossFlat()
    learn = Learner(dls, model, loss_func=loss, metrics=accuracy, path=cfg.out, model_dir=".")
    if cfg.fp16:
        if torch.cuda.is_available():
            learn = learn.to_fp16()
        else:
            warnings.warn("--fp16 needs a CUDA device; training in fp32 on the CPU", stacklevel=2)
    if cfg.channels_last:
        # fastai's default also adds CUDA-only MixedPrecision; --fp16 decides that separately.
        learn = learn.to_channelslast(use_amp=False)
    return learn


# --- evaluation ------------------------------------------------------------------------------------


def _accuracy(preds: torch.Tensor, targs: torch.Tensor) -> float:
    return float((preds.argmax(dim=-1) == targs).float().mean())


def evaluate(learn: Any, tta: str, test_size: Any = None) -> tuple[float, float]:
    """Validation accuracy of ``learn`` with the given TTA, and the seconds it took.

    Args:
        learn: The trained learner.
        tta: One of :data:`TTA_CHOICES`.
        test_size: A :class:`fastai_tricks.TestSize` to evaluate at another size, or None. It is
            attached for this evaluation only (``learn.added_cbs``) and detached afterwards, however
            the evaluation ends; its ``evaluated_size`` and ``auto_found`` then record what it did.
    """
    from .tta import FourCornerTTA

    start = time.perf_counter()
    with contextlib.nullcontext() if test_size is None else learn.added_cbs(test_size):
        if tta == "none":
            preds, targs = learn.get_preds(ds_idx=1)
        elif tta == "fastai":
            preds, targs = learn.tta(ds_idx=1)
        else:
            # The views' merged prediction alone (four_corner_tta's aug_preds), unblended, as the recipe has always
            # measured it, with no plain view to run. The callback picks views per forward for the device itself.
            cb = FourCornerTTA(flip=tta == "ten-crop")
            preds, targs = learn.get_preds(ds_idx=1, cbs=cb)
    return _accuracy(preds, targs), time.perf_counter() - start


# --- the run ---------------------------------------------------------------------------------------


def _plot_curves(learn: Any, path: Path) -> None:
    """Plot the training loss per batch, the validation loss and accuracy per epoch (call right after fit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = learn.recorder
    names = list(rec.metric_names[1:-1])  # drop 'epoch' and 'time'
    values = [dict(zip(names, v, strict=False)) for v in rec.values]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(range(len(rec.losses)), [float(v) for v in rec.losses], label="train (per batch)")
    ax_loss.plot(list(rec.iters), [v.get("valid_loss") for v in values], "o-", label="valid (per epoch)")
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_acc.plot(range(1, len(values) + 1), [v.get("accuracy") for v in values], "o-")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("validation accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_sizes(sizes: Sequence[Sequence[int]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(len(sizes)), [s[0] for s in sizes], label="height")
    ax.plot(range(len(sizes)), [s[-1] for s in sizes], "--", label="width")
    ax.set_xlabel("training iteration")
    ax.set_ylabel("image size (px)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(cfg: RecipeConfig, path: Path | None = None, *, dls: Any = None) -> tuple[Any, dict[str, Any]]:
    """Train one recipe run; return the learner, its timings and sizes. Writes metrics.csv and curves.png."""
    from fastai.vision.all import CSVLogger, set_seed

    cfg.out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    start = time.perf_counter()
    path = find_data(cfg) if path is None else path
    times["data"] = time.perf_counter() - start
    set_seed(cfg.seed, reproducible=True)
    start = time.perf_counter()
    dls = build_dls(path, cfg) if dls is None else dls
    times["dataloaders"] = time.perf_counter() - start
    learn = build_learner(dls, cfg)
    cbs = training_callbacks(cfg)
    set_seed(cfg.seed, reproducible=True)
    start = time.perf_counter()
    learn.fit_one_cycle(cfg.epochs, cfg.lr, cbs=[*cbs, CSVLogger(fname="metrics.csv")])
    times["train"] = time.perf_counter() - start
    _plot_curves(learn, cfg.out / "curves.png")
    sizes = next((list(cb.sizes) for cb in cbs if hasattr(cb, "sizes")), None)
    return learn, {"times": times, "sizes": sizes, "path": str(path)}


def train_plain_fastai(cfg: RecipeConfig, path: Path) -> tuple[Any, float]:
    """Train what a fastai user writes without this package: the anchor every trick is measured against.

    ``ImageDataLoaders.from_folder`` with fastai's defaults (no augmentation beyond a ``Resize`` to
    ``cfg.size``, no normalization), a from-scratch ``cfg.arch``, plain cross-entropy and
    ``fit_one_cycle(cfg.epochs, cfg.lr)``: the same data, split, arch, budget and seed as the recipe.

    Returns:
        The trained learner and the seconds ``fit_one_cycle`` took.
    """
    from fastai.vision.all import ImageDataLoaders, Learner, Resize, accuracy, set_seed

    set_seed(cfg.seed, reproducible=True)
    valid = _valid_folder(path, cfg.valid)
    kwargs: dict[str, Any] = {"bs": cfg.bs, "item_tfms": Resize(cfg.size), "seed": cfg.seed}
    if cfg.workers is not None:
        kwargs["num_workers"] = cfg.workers
    if valid is not None:
        dls = ImageDataLoaders.from_folder(path, train="train", valid=valid, **kwargs)
    else:
        dls = ImageDataLoaders.from_folder(path, valid_pct=cfg.valid_pct, **kwargs)
    learn = Learner(dls, _arch(cfg.arch)(n_out=dls.c), metrics=accuracy, path=cfg.out, model_dir=".")
    set_seed(cfg.seed, reproducible=True)
    start = time.perf_counter()
    learn.fit_one_cycle(cfg.epochs, cfg.lr)
    return learn, time.perf_counter() - start


def run_recipe(cfg: RecipeConfig) -> dict[str, Any]:
    """Train, evaluate with and without TTA, and write the run's files into ``cfg.out``.

    Files: ``metrics.csv`` (per-epoch metrics), ``results.json`` (accuracy with and
    without TTA, at the training size; ``accuracy_test_size``, without TTA at ``cfg.test_size``, or
    None when it is 'off', and ``test_size``: the setting, the pixels evaluated, what 'auto' read
    and ``recalibrate_bn``; time per phase, the resize schedule, the configuration),
    ``curves.png`` (loss and accuracy), ``schedule.png`` (image size per iteration,
    with progressive resizing) and ``export.pkl`` (the learner, for ``load_learner``).

    Returns:
        The contents of ``results.json``.
    """
    learn, info = train(cfg)
    times = info["times"]
    accuracy, times["eval"] = evaluate(learn, "none")
    results: dict[str, Any] = {"accuracy": accuracy, "accuracy_tta": None, "tta": cfg.tta}
    if cfg.tta != "none":
        results["accuracy_tta"], times["tta"] = evaluate(learn, cfg.tta)
    tricks = cfg.tricks()
    # The test size changes the evaluation only: attached around it, never passed to fit, so never exported.
    cb = _test_size_cb(cfg)
    results["accuracy_test_size"] = None
    results["test_size"] = {"setting": cfg.test_size, "px": None, "auto_found": None, "recalibrate_bn": 0}
    if cb is not None:
        results["accuracy_test_size"], times["test_size"] = evaluate(learn, "none", cb)
        px = cb.evaluated_size
        results["test_size"].update(
            px=None if px is None else (px[0] if px[0] == px[1] else list(px)),
            auto_found=list(cb.auto_found) if cfg.test_size == "auto" else None,
            recalibrate_bn=cfg.recalibrate_bn,
        )
        tricks["test size"] = describe_test_size(cfg.test_size, cfg.recalibrate_bn, px)
    results.update(
        tricks=tricks,
        times=times,
        schedule=info["sizes"],
        data=info["path"],
        n_train=len(learn.dls.train_ds),
        n_valid=len(learn.dls.valid_ds),
        classes=list(map(str, learn.dls.vocab)),
        config=cfg.to_json(),
    )
    if info["sizes"]:
        _plot_sizes(info["sizes"], cfg.out / "schedule.png")
    learn.export(cfg.out / "export.pkl")
    (cfg.out / "results.json").write_text(json.dumps(results, indent=2))
    return results


# --- ablation --------------------------------------------------------------------------------------

#: The recipe without any trick: the row every trick is added to.
ABLATION_BASELINE: dict[str, Any] = dict(
    normalize="none", progressive=False, mix="none", label_smoothing=0.0, tta="none", test_size="off", recalibrate_bn=0
)

#: The chapter's tricks, in the chapter's order, each as the change it makes to a configuration.
ABLATION_TRICKS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("normalization", dict(normalize="dataset")),
    ("progressive resizing", dict(progressive=True)),
    ("four-corner TTA", dict(tta="four-corner")),
    ("mixup", dict(mix="mixup")),
    ("label smoothing", dict(label_smoothing=0.1)),
    # Not in the chapter: FixRes (docs/test_size.md). 'auto' unless the run names a test size; last, so that
    # cumulatively no trained row is evaluated at it.
    ("test size", dict(test_size="auto")),
)

#: Settings that change only how a trained model is evaluated: a row that differs from an earlier
#: row only in these re-uses that row's model instead of training its own.
EVAL_ONLY = ("tta", "test_size", "recalibrate_bn")

#: The chapter's cumulative sequence: each step adds one trick to the step before it.
ABLATION_STEPS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("baseline", ABLATION_BASELINE),
    *((f"+ {name}", change) for name, change in ABLATION_TRICKS),
)

PLAIN_FASTAI = "plain fastai"
RECIPE_DEFAULTS = "recipe defaults"


def ablation_plan(cfg: RecipeConfig, one_at_a_time: bool = False) -> list[tuple[str, dict[str, Any] | None]]:
    """Return the rows of an ablation as ``(name, overrides of cfg)``; ``None`` marks the plain-fastai row.

    The plan starts with plain fastai and the recipe's baseline. Cumulatively (the chapter's
    order), each row adds one trick to the row before it; with ``one_at_a_time`` each trick is
    added alone to the baseline, so a loss can never be masked by a later gain. Both end with the
    recipe's defaults for ``cfg``'s budget. The test-size row evaluates at ``cfg.test_size`` (with
    ``cfg.recalibrate_bn``) when it is not 'off', else at 'auto'; like the TTA row it trains
    nothing (see :func:`eval_parent`).
    """
    rows: list[tuple[str, dict[str, Any] | None]] = [(PLAIN_FASTAI, None), ("baseline", dict(ABLATION_BASELINE))]
    current = dict(ABLATION_BASELINE)
    for name, change in ABLATION_TRICKS:
        if "test_size" in change and cfg.test_size != "off":
            change = {**change, "test_size": cfg.test_size, "recalibrate_bn": cfg.recalibrate_bn}
        if one_at_a_time:
            rows.append((f"baseline + {name}", {**ABLATION_BASELINE, **change}))
        else:
            current = {**current, **change}
            rows.append((f"+ {name}", dict(current)))
    defaults = {f.name: f.default for f in dataclasses.fields(RecipeConfig) if f.name in ABLATION_BASELINE}
    rows.append((RECIPE_DEFAULTS, defaults))
    return rows


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def run_ablation(cfg: RecipeConfig, *, seeds: int = 1, one_at_a_time: bool = False) -> list[dict[str, Any]]:
    """Measure each trick against plain fastai and the recipe's baseline, over several seeds.

    Every row trains with ``cfg``'s data, split, arch, size, epochs, batch size and learning rate.
    The first row is plain fastai (:func:`train_plain_fastai`): what a user writes without this
    package. A row whose only change is TTA or the test size re-uses the model of the row it
    changes (:func:`eval_parent`), since those change only the evaluation; every row is evaluated
    both without TTA (``accuracy``) and with four-corner TTA (``tta_accuracy``), at its own test
    size, so TTA is measured on the baseline model as well as on the trained one, and a training
    loss is never hidden behind the TTA gain. Seeds are
    ``cfg.seed``, ``cfg.seed + 1``, ... Writes ``ablation.md``, ``ablation.csv`` and
    ``ablation.png`` into ``cfg.out``.

    Args:
        cfg: The run's data and budget; the rows override only the tricks.
        seeds: Number of seeds per row (>= 1); rows report mean and sample standard deviation.
        one_at_a_time: Add each trick alone to the baseline instead of the chapter's cumulative order.

    Returns:
        One dict per row: ``step``, ``accuracy`` and ``accuracy_std`` (the row's own evaluation:
        with TTA for the TTA row, without otherwise; at the test size for the test-size row),
        ``tta_accuracy`` and ``tta_accuracy_std``, ``test_px`` (the test size's short side in
        pixels, for a row evaluated at one),
        ``delta`` (to the row it changes), ``vs_plain`` (to plain fastai), ``train_s``, ``eval_s``,
        and ``per_seed`` accuracies.
    """
    check_positive_int("seeds", seeds)
    cfg.out.mkdir(parents=True, exist_ok=True)
    path = find_data(cfg)
    plan = ablation_plan(cfg, one_at_a_time)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in plan}
    for k in range(seeds):
        seed = cfg.seed + k
        learners: dict[str, Any] = {}
        # Rows whose tricks resolve to the same training (e.g. the defaults row, once the budget
        # guard has turned progressive resizing off) share one model rather than train it twice.
        trained: list[tuple[RecipeConfig, Any, float]] = []
        for i, (name, change) in enumerate(plan):
            out = cfg.out / f"seed{seed}" / f"step{i}"
            step_cfg = dataclasses.replace(
                cfg, **(change or {}), seed=seed, out=out, demo=False, digits=False, data=path
            )
            parent = eval_parent(plan, i)
            # The row's own evaluation: TTA when TTA is what it changes, otherwise its model alone.
            by_tta = parent is not None and change.get("tta") != dict(plan)[parent].get("tta")
            run: dict[str, Any] = {}
            if change is None:
                learn, run["train_s"] = train_plain_fastai(step_cfg, path)
            elif parent is not None:
                learn, run["train_s"] = learners[parent], 0.0
            else:
                key = step_cfg.effective(tta="none", test_size="off", recalibrate_bn=0, out=cfg.out)
                twin = next(((lrn, secs) for seen, lrn, secs in trained if seen == key), None)
                if twin is None:
                    learn, info = train(dataclasses.replace(step_cfg, tta="none"), path)
                    twin = (learn, info["times"]["train"])
                    trained.append((key, *twin))
                learn, run["train_s"] = twin
            learners[name] = learn
            # Attached around each evaluation only (never to the learner's fit), as in run_recipe.
            size_cb = None if change is None else _test_size_cb(step_cfg)
            run["plain_accuracy"], run["eval_s"] = evaluate(learn, "none", size_cb)
            run["tta_accuracy"], run["tta_s"] = evaluate(learn, "four-corner", size_cb)
            if size_cb is not None and size_cb.evaluated_size is not None:
                run["test_px"] = min(size_cb.evaluated_size)
            run["accuracy"] = run["tta_accuracy"] if by_tta else run["plain_accuracy"]
            if by_tta:
                run["eval_s"] = run["tta_s"]
                run["fastai_tta_accuracy"], run["fastai_tta_s"] = evaluate(learn, "fastai", size_cb)
            runs[name].append(run)
    rows = _summarise(plan, runs, one_at_a_time)
    _write_ablation(rows, cfg, seeds, one_at_a_time)
    return rows


def _trained_part(change: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in change.items() if k not in EVAL_ONLY}


def eval_parent(plan: Sequence[tuple[str, dict[str, Any] | None]], i: int) -> str | None:
    """The row whose model row ``i`` re-uses instead of training, or None when it trains its own.

    That is the nearest earlier row that trained a model (not plain fastai) and differs from row
    ``i`` only in :data:`EVAL_ONLY` settings: TTA, the test size and its BatchNorm recalibration.
    """
    change = plan[i][1]
    if change is None:
        return None
    for j in range(i - 1, 0, -1):
        prev = plan[j][1]
        if prev is not None and _trained_part(prev) == _trained_part(change) and eval_parent(plan, j) is None:
            return plan[j][0]
    return None


def _reference(plan: Sequence[tuple[str, dict[str, Any] | None]], i: int, one_at_a_time: bool) -> str | None:
    """The row that row ``i`` is compared with: the row whose model it re-uses, the baseline, or the previous trained row."""
    name = plan[i][0]
    if name in (PLAIN_FASTAI, "baseline"):
        return None
    parent = eval_parent(plan, i)
    if parent is not None:
        return parent
    if one_at_a_time or name == RECIPE_DEFAULTS:
        return "baseline"
    return _previous_trained(plan, i)


def _mean_gap(runs: Sequence[dict[str, Any]], refs: Sequence[dict[str, Any]]) -> float:
    """Mean over seeds of a row's accuracy minus its reference's accuracy without TTA (same seed)."""
    return _mean_std([r["accuracy"] - p["plain_accuracy"] for r, p in zip(runs, refs, strict=True)])[0]


def _summarise(
    plan: Sequence[tuple[str, dict[str, Any] | None]], runs: dict[str, list[dict[str, Any]]], one_at_a_time: bool
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for i, (name, _) in enumerate(plan):
        per_seed = runs[name]
        row: dict[str, Any] = {"step": name, "per_seed": [r["accuracy"] for r in per_seed]}
        keys = ["accuracy", "tta_accuracy"] + (["fastai_tta_accuracy"] if "fastai_tta_accuracy" in per_seed[0] else [])
        for key in keys:
            row[key], row[f"{key}_std"] = _mean_std([r[key] for r in per_seed])
        for key in ("train_s", "eval_s", "fastai_tta_s", "test_px"):
            if key in per_seed[0]:
                row[key] = sum(r[key] for r in per_seed) / len(per_seed)
        ref = _reference(plan, i, one_at_a_time)
        row["delta"] = 0.0 if ref is None else _mean_gap(per_seed, runs[ref])
        row["vs_plain"] = _mean_gap(per_seed, runs[PLAIN_FASTAI])
        rows.append(row)
    return rows


def _previous_trained(plan: Sequence[tuple[str, dict[str, Any] | None]], i: int) -> str:
    """The nearest earlier row that trained a model of the recipe (not plain fastai, not evaluation-only)."""
    for j in range(i - 1, 0, -1):
        if plan[j][1] is not None and eval_parent(plan, j) is None:
            return plan[j][0]
    return plan[1][0]


def _fmt(mean: float, std: float, seeds: int) -> str:
    return f"{mean:.4f} ± {std:.4f}" if seeds > 1 else f"{mean:.4f}"


def _write_ablation(rows: list[dict[str, Any]], cfg: RecipeConfig, seeds: int, one_at_a_time: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = [
        "step", "accuracy", "accuracy_std", "tta_accuracy", "tta_accuracy_std", "delta", "vs_plain", "train_s",
        "eval_s", "fastai_tta_accuracy", "fastai_tta_accuracy_std", "fastai_tta_s", "test_px", "per_seed",
    ]  # fmt: skip
    with open(cfg.out / "ablation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "per_seed": " ".join(f"{a:.4f}" for a in r["per_seed"])})
    source = "digits" if cfg.digits else "demo data" if cfg.demo else str(cfg.data or "Imagenette " + cfg.imagenette)
    seed_text = f"seed {cfg.seed}" if seeds == 1 else f"mean ± std over seeds {cfg.seed}-{cfg.seed + seeds - 1}"
    mode = "each trick alone on the baseline" if one_at_a_time else "cumulative, in the chapter's order"
    lines = [
        f"Ablation on {source} ({mode}): {cfg.arch}, {cfg.epochs} epochs at {cfg.size} px, lr {cfg.lr:g}, {seed_text}.",
        "",
        "| step | accuracy | with four-corner TTA | change | vs plain fastai | train (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        change = "" if r["step"] in (PLAIN_FASTAI, "baseline") else f"{100 * r['delta']:+.1f}"
        vs_plain = "" if r["step"] == PLAIN_FASTAI else f"{100 * r['vs_plain']:+.1f}"
        lines.append(
            f"| {r['step']} | {_fmt(r['accuracy'], r['accuracy_std'], seeds)} "
            f"| {_fmt(r['tta_accuracy'], r['tta_accuracy_std'], seeds)} | {change} | {vs_plain} | {r['train_s']:.1f} |"
        )
    lines += [
        "",
        "Changes are in points of accuracy, against the row each step changes (the baseline when one at a time; "
        "the same model without TTA for a TTA row, at the training size for a test-size row), averaged over seeds.",
    ]
    sized = [r for r in rows if r.get("test_px") is not None]
    if sized:
        lines += [
            "",
            "Evaluated at another test size (FixRes, docs/test_size.md; the training size is "
            f"{cfg.size} px): " + ", ".join(f"{r['step']} at {r['test_px']:g} px" for r in sized) + ".",
        ]
    tta_row = next((r for r in rows if "fastai_tta_accuracy" in r), None)
    if tta_row is not None:
        lines += [
            "",
            f"fastai's `learn.tta()` on the same model: accuracy {tta_row['fastai_tta_accuracy']:.4f} "
            f"in {tta_row['fastai_tta_s']:.1f} s (four-corner TTA: {tta_row['accuracy']:.4f} in {tta_row['eval_s']:.1f} s).",
        ]
    worse = [r["step"] for r in rows if r["step"] not in (PLAIN_FASTAI, "baseline") and r["delta"] < 0]
    if worse:
        lines += ["", f"Lost accuracy on this budget: {', '.join(worse)}."]
    (cfg.out / "ablation.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(9, 4))
    x = range(len(rows))
    ax.bar(x, [r["accuracy"] for r in rows], yerr=[r["accuracy_std"] for r in rows], capsize=4, color="tab:blue")
    ax.axhline(rows[0]["accuracy"], color="tab:orange", linestyle="--", label=PLAIN_FASTAI)
    ax.set_xticks(list(x), [r["step"] for r in rows], rotation=20, ha="right")
    ax.set_ylabel("validation accuracy")
    low = min(r["accuracy"] - r["accuracy_std"] for r in rows)
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.legend(loc="lower right")
    ax.set_title(f"{source}: {cfg.epochs} epochs, {seed_text}", fontsize=10)
    fig.tight_layout()
    fig.savefig(cfg.out / "ablation.png", dpi=100)
    plt.close(fig)
