"""Train the fastbook chapter's Imagenette recipe on your own images: a plain script for long runs.

This is the chapter's further-research item 3 ("use the Imagenette training script as an example
to build a script for a long training on your own project"), written out step by step instead of
going through :func:`fastai_tricks.recipe.run_recipe`:

1. DataLoaders built with fastai's DataBlock: presized random crops, flips and warps on the batch;
2. exact dataset normalization statistics (:func:`fastai_tricks.normalization.ensure_normalized`);
3. an xresnet trained from scratch with label smoothing (:class:`fastai_tricks.losses.LabelSmoothingCE`),
   a mixing callback (:class:`fastai_tricks.MixUp` by default) and progressive resizing
   (:class:`fastai_tricks.ProgressiveResize`);
4. evaluation without and with four-corner test-time augmentation (``learn.four_corner_tta``);
5. ``export.pkl`` for ``load_learner``, and ``metrics.csv`` with one row per epoch.

The data is any ImageNet-style folder: ``train/<class>/*.jpg`` with ``val/<class>/*.jpg`` (or
``valid/``), or just ``<class>/*.jpg``, in which case ``--valid-pct`` of the images are held out at
random. Without ``--data`` it trains on Imagenette 160 px, downloaded by fastai.

Mixup and label smoothing pay off only over many epochs (the Imagenette leaderboard uses mixup for
runs of 80 epochs and more), so give this script a long budget: for example
``python examples/train_imagenette.py --data ~/data/cells --epochs 80 --size 128 --out runs/cells``.
A quick check that everything runs: ``--epochs 1 --size 32 --arch xresnet18``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from fastai.vision.all import (
    CategoryBlock,
    CSVLogger,
    DataBlock,
    GrandparentSplitter,
    ImageBlock,
    Learner,
    RandomSplitter,
    Resize,
    accuracy,
    aug_transforms,
    get_image_files,
    parent_label,
    set_seed,
)
from fastai.vision.models import xresnet

import fastai_tricks.tta  # noqa: F401 - adds Learner.four_corner_tta
from fastai_tricks import CutMix, FMix, ManifoldMix, MixUp, ProgressiveResize, RandomMix, ResizeMix, imagenette_path
from fastai_tricks.losses import LabelSmoothingCE
from fastai_tricks.normalization import ensure_normalized

MIXES = {
    "none": None,
    "mixup": lambda: MixUp(alpha=0.4),
    "cutmix": lambda: CutMix(alpha=1.0),
    "fmix": lambda: FMix(alpha=1.0),
    "resizemix": lambda: ResizeMix(),
    "manifold": lambda: ManifoldMix(alpha=2.0),
    "random": lambda: RandomMix([MixUp(alpha=0.4), CutMix(alpha=1.0)]),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="ImageNet-style folder (default: download Imagenette 160 px)")
    p.add_argument("--valid-pct", type=float, default=0.2, help="held-out fraction when there is no val/ folder")
    p.add_argument("--size", type=int, default=128, help="final image size in pixels")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--arch", default="xresnet50", help="a fastai xresnet: xresnet18, xresnet34, xresnet50, ...")
    p.add_argument("--bs", type=int, default=64, help="batch size")
    p.add_argument("--lr", type=float, default=8e-3, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--mix", choices=sorted(MIXES), default="mixup", help="mixing callback")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing epsilon")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: fastai's)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=Path, default=Path("runs/train_imagenette"), help="output folder")
    return p.parse_args(argv)


def get_dls(path: Path, size: int, bs: int, valid_pct: float, seed: int, workers: int | None):
    """DataLoaders with the chapter's presizing: decode a little larger, crop and warp on the batch."""
    valid = next((v for v in ("val", "valid") if (path / v).is_dir()), None)
    if valid is not None and (path / "train").is_dir():
        splitter = GrandparentSplitter(train_name="train", valid_name=valid)
    else:
        splitter = RandomSplitter(valid_pct, seed=seed)
    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock),
        get_items=get_image_files,
        get_y=parent_label,
        splitter=splitter,
        item_tfms=Resize(int(size * 1.25)),
        batch_tfms=aug_transforms(size=size, min_scale=0.75),
    )
    kwargs = {} if workers is None else {"num_workers": workers}
    dls = block.dataloaders(path, bs=bs, **kwargs)
    # A model trained from scratch should see inputs with mean 0 and std 1: use the exact
    # statistics of this training set (one pass over it), added once to every loader.
    return ensure_normalized(dls, "dataset")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not hasattr(xresnet, args.arch) or not args.arch.startswith("xres"):
        raise SystemExit(f"--arch must be a fastai xresnet name such as xresnet50, got {args.arch!r}")
    args.out = args.out.expanduser().resolve()  # one absolute folder: the Learner's path and every file under it
    args.out.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed)

    path = args.data.expanduser() if args.data is not None else imagenette_path(size=160)
    dls = get_dls(path, args.size, args.bs, args.valid_pct, args.seed, args.workers)
    print(f"{len(dls.train_ds)} training and {len(dls.valid_ds)} validation images, {dls.c} classes")

    model = getattr(xresnet, args.arch)(n_out=dls.c)
    loss = LabelSmoothingCE(eps=args.label_smoothing)
    learn = Learner(dls, model, loss_func=loss, metrics=accuracy, path=args.out, model_dir=".")
    if torch.cuda.is_available():
        learn = learn.to_fp16()

    # Training-only callbacks go to fit(), not to the Learner, so the exported learner carries none.
    cbs = [ProgressiveResize(initial_size=0.5, final_size=args.size), CSVLogger(fname="metrics.csv")]
    if MIXES[args.mix] is not None:
        cbs.insert(0, MIXES[args.mix]())
    start = time.perf_counter()
    learn.fit_one_cycle(args.epochs, args.lr, cbs=cbs)
    train_s = time.perf_counter() - start

    _, acc = learn.validate()
    preds, targs = learn.four_corner_tta()
    acc_tta = float(accuracy(preds, targs))
    learn.export(args.out / "export.pkl")
    print(f"trained {args.epochs} epochs in {train_s:.0f} s")
    print(f"accuracy {acc:.4f}, with four-corner TTA {acc_tta:.4f}")
    print(f"wrote {args.out / 'metrics.csv'} and {args.out / 'export.pkl'}")


if __name__ == "__main__":
    main()
