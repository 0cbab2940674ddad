"""The Imagenette from-scratch recipe of the fastbook chapter on training a state-of-the-art model.

The chapter trains xresnet50 from scratch and adds, in order, normalization,
progressive resizing, test-time augmentation, mixup and label smoothing.
:class:`RecipeConfig` says which of those a run uses; :func:`run_recipe` builds
the data and the learner, trains, evaluates with and without TTA and writes
everything a user needs into ``out``; :func:`run_ablation` runs the chapter's
sequence, one trick at a time, with the same seed and budget.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._checks import check_choice, check_fraction, check_non_negative_int, check_positive, check_positive_int
from .data import DataUnavailableError, imagenette_path, make_fake_imagenette

__all__ = [
    "ABLATION_STEPS",
    "MIX_CHOICES",
    "NORMALIZE_CHOICES",
    "TTA_CHOICES",
    "RecipeConfig",
    "build_dls",
    "build_learner",
    "demo_config",
    "find_data",
    "run_ablation",
    "run_recipe",
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
        valid: Name of the validation folder; None means 'val' or 'valid' if present, else a random split.
        valid_pct: Fraction of images held out when the folder has no validation split.
        arch: A fastai xresnet name (``xresnet50``) or a torchvision resnet name (``resnet18``).
        size: Final training (and validation) image size in pixels.
        epochs: Number of epochs of ``fit_one_cycle``.
        bs: Batch size.
        lr: Peak learning rate of the one-cycle schedule.
        normalize: 'dataset' (exact statistics of the training set), 'imagenet' or 'none'.
        progressive: Train with :class:`fastai_tricks.ProgressiveResize`.
        initial_size: Initial size of progressive resizing, a fraction of ``size`` or pixels.
        resize_start: Fraction of training at which the size starts to grow.
        resize_finish: Fraction of training at which it reaches ``size``.
        mix: Which mixing callback to train with.
        alpha: α of the mixing callback; None uses the callback's default.
        label_smoothing: ε of :class:`fastai_tricks.LabelSmoothingCE`; 0 trains with plain cross-entropy.
        tta: Test-time augmentation for the final evaluation.
        fp16: Mixed precision (needs CUDA; ignored with a warning on CPU).
        channels_last: Train in the channels_last memory format.
        seed: Seed of every random generator.
        workers: DataLoader worker processes; None uses fastai's default.
        out: Output folder.
    """

    data: Path | None = None
    imagenette: str = "160"
    demo: bool = False
    valid: str | None = None
    valid_pct: float = 0.2
    arch: str = "xresnet50"
    size: int = 128
    epochs: int = 5
    bs: int = 64
    lr: float = 8e-3
    normalize: str = "dataset"
    progressive: bool = True
    initial_size: float = 0.5
    resize_start: float = 0.5
    resize_finish: float = 0.75
    mix: str = "none"
    alpha: float | None = None
    label_smoothing: float = 0.1
    tta: str = "four-corner"
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
        _arch(self.arch)
        if self.workers is not None:
            check_non_negative_int("workers", self.workers)
        self.out = Path(self.out)
        self.data = None if self.data is None else Path(self.data).expanduser()

    def to_json(self) -> dict[str, Any]:
        """The configuration as JSON-ready values."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


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

    from .normalization import ensure_normalized

    valid = _valid_folder(path, cfg.valid)
    if valid is not None:
        splitter = GrandparentSplitter(train_name="train", valid_name=valid)
    else:
        splitter = RandomSplitter(cfg.valid_pct, seed=cfg.seed)
    # Presize: decode to a little more than the final size on the CPU, then crop/warp in one batched step.
    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock),
        get_items=get_image_files,
        get_y=parent_label,
        splitter=splitter,
        item_tfms=Resize(int(cfg.size * 1.25)),
        batch_tfms=aug_transforms(size=cfg.size, min_scale=0.75),
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
    if cfg.progressive:
        cbs.append(
            ProgressiveResize(
                initial_size=cfg.initial_size, start=cfg.resize_start, finish=cfg.resize_finish, final_size=cfg.size
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


def evaluate(learn: Any, tta: str) -> tuple[float, float]:
    """Validation accuracy of ``learn`` with the given TTA, and the seconds it took."""
    from . import tta as _tta  # noqa: F401 - registers Learner.four_corner_tta

    start = time.perf_counter()
    if tta == "none":
        preds, targs = learn.get_preds(ds_idx=1)
    elif tta == "fastai":
        preds, targs = learn.tta(ds_idx=1)
    else:
        # On a CPU, batches of one view at a time run faster than one batch of all views (benchmarks page).
        on_cpu = next(learn.model.parameters()).device.type == "cpu"
        preds, targs = learn.four_corner_tta(
            ds_idx=1, flip=tta == "ten-crop", max_views_per_batch=1 if on_cpu else None
        )
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
    learn.fit_one_cycle(cfg.epochs, cfg.lr, cbs=[*cbs, CSVLogger(fname=str(cfg.out / "metrics.csv"))])
    times["train"] = time.perf_counter() - start
    _plot_curves(learn, cfg.out / "curves.png")
    sizes = next((list(cb.sizes) for cb in cbs if hasattr(cb, "sizes")), None)
    return learn, {"times": times, "sizes": sizes, "path": str(path)}


def run_recipe(cfg: RecipeConfig) -> dict[str, Any]:
    """Train, evaluate with and without TTA, and write the run's files into ``cfg.out``.

    Files: ``metrics.csv`` (per-epoch metrics), ``results.json`` (accuracy with and
    without TTA, time per phase, the resize schedule, the configuration),
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
    results.update(
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

#: The chapter's sequence: each step adds one trick to the one before.
ABLATION_STEPS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("baseline", dict(normalize="none", progressive=False, mix="none", label_smoothing=0.0, tta="none")),
    ("+ normalization", dict(normalize="dataset")),
    ("+ progressive resizing", dict(progressive=True)),
    ("+ four-corner TTA", dict(tta="four-corner")),
    ("+ mixup", dict(mix="mixup")),
    ("+ label smoothing", dict(label_smoothing=0.1)),
)


def run_ablation(cfg: RecipeConfig) -> list[dict[str, Any]]:
    """Run the chapter's sequence of tricks with ``cfg``'s data, seed and budget.

    Each step adds one trick to the step before it. The TTA step re-uses the model of the
    progressive-resizing step (TTA changes only the evaluation) and also reports fastai's
    ``learn.tta`` on that model for comparison. Writes ``ablation.md``, ``ablation.csv``
    and ``ablation.png`` into ``cfg.out``.

    Returns:
        One row per step: step, accuracy, delta to the previous step, train and eval seconds.
    """
    cfg.out.mkdir(parents=True, exist_ok=True)
    path = find_data(cfg)
    rows: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    learn = None
    for i, (name, change) in enumerate(ABLATION_STEPS):
        current.update(change)
        step_cfg = dataclasses.replace(cfg, **current, out=cfg.out / f"step{i}", demo=False, data=path)
        if name == "+ four-corner TTA" and learn is not None:
            train_s = 0.0  # TTA changes only the evaluation: the previous step's model is reused.
        else:
            learn, info = train(step_cfg, path)
            train_s = info["times"]["train"]
        acc, eval_s = evaluate(learn, step_cfg.tta)
        row = {"step": name, "accuracy": acc, "train_s": train_s, "eval_s": eval_s}
        if name == "+ four-corner TTA":
            row["fastai_tta_accuracy"], row["fastai_tta_s"] = evaluate(learn, "fastai")
        row["delta"] = acc - rows[-1]["accuracy"] if rows else 0.0
        rows.append(row)
    _write_ablation(rows, cfg)
    return rows


def _write_ablation(rows: list[dict[str, Any]], cfg: RecipeConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = ["step", "accuracy", "delta", "train_s", "eval_s", "fastai_tta_accuracy", "fastai_tta_s"]
    with open(cfg.out / "ablation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"Ablation on {'demo data' if cfg.demo else str(cfg.data or 'Imagenette ' + cfg.imagenette)}: "
        f"{cfg.arch}, {cfg.epochs} epochs at {cfg.size} px, seed {cfg.seed}.",
        "",
        "| step | accuracy | change | train (s) | eval (s) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['step']} | {r['accuracy']:.4f} | {r['delta']:+.4f} | {r['train_s']:.1f} | {r['eval_s']:.1f} |"
        )
    tta_row = next((r for r in rows if "fastai_tta_accuracy" in r), None)
    if tta_row is not None:
        lines += [
            "",
            f"fastai's `learn.tta()` on the same model: accuracy {tta_row['fastai_tta_accuracy']:.4f} "
            f"in {tta_row['fastai_tta_s']:.1f} s (four-corner TTA: {tta_row['accuracy']:.4f} in {tta_row['eval_s']:.1f} s).",
        ]
    worse = [r["step"] for r in rows[1:] if r["delta"] < 0]
    if worse:
        lines += ["", f"Did not help on this budget: {', '.join(worse)}. Mixup in particular needs many epochs."]
    (cfg.out / "ablation.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(range(len(rows)), [r["accuracy"] for r in rows], color="tab:blue")
    ax.set_xticks(range(len(rows)), [r["step"] for r in rows], rotation=20, ha="right")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(cfg.out / "ablation.png", dpi=100)
    plt.close(fig)
