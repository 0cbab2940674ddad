"""Benchmark data loading that shrinks with the image: JPEG draft decoding against fastai's presizing pipeline.

On generated JPEGs with the dimensions of Imagenette's full-size images
(``make_fake_imagenette(full_size=True)``: mostly 500 px on the long side, one in ten up to 4000 px),
prints as Markdown tables:

1. the training loader alone (no model): images per second at the final size and at half size,
   for fastai's presizing pipeline (``ImageBlock``, ``Resize(final * 1.25)`` items,
   ``aug_transforms(size=...)`` batches) and for this package's (``DraftImageBlock``). At half
   size each is what ``ProgressiveResize`` makes of it: fastai's items stay at full size (only the
   batch transform shrinks), this package's item ``Resize`` shrinks and the decoder follows it;
2. a profile: milliseconds per image of each stage (decode, item transforms, collate and batch
   transforms) for the same four loaders, to say where the remaining time goes;
3. a data-bound fit: a model so small that the loader is the whole cost (as on a GPU), fixed size
   against a default ``ProgressiveResize`` fit, with and without draft decoding;
4. with ``--accuracy``: the recipe (xresnet18) trained with and without draft decoding on the same
   data and seeds.

Targets (issue 13): half-size loader epoch <= 0.35x the full-size one; data-bound default
``ProgressiveResize`` fit <= 0.65x the fixed-size fit; the draft loader at full size >= 0.98x fastai's
throughput.

Usage::

    python benchmarks/bench_loader.py                 # 224 px, 400 training images, 8-epoch fits
    python benchmarks/bench_loader.py --accuracy      # and the recipe's accuracy with and without draft
    python benchmarks/bench_loader.py --quick         # a smoke run on a few images
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from fastai.callback.core import Callback
from fastai.vision.all import (
    CategoryBlock,
    CrossEntropyLossFlat,
    DataBlock,
    GrandparentSplitter,
    ImageBlock,
    Learner,
    PILImage,
    Resize,
    aug_transforms,
    get_image_files,
    parent_label,
)
from torch import nn

from fastai_tricks import DraftImageBlock, ProgressiveResize, make_fake_imagenette
from fastai_tricks.draft import _pipeline_need, open_image


def build_dls(path: Path, size: int, item_size: int, draft: bool, bs: int, workers: int) -> Any:
    """fastai's presizing pipeline: ``Resize(item_size)`` items, ``aug_transforms(size=size)`` batches."""
    block = DataBlock(
        blocks=(DraftImageBlock if draft else ImageBlock, CategoryBlock),
        get_items=get_image_files,
        get_y=parent_label,
        splitter=GrandparentSplitter(valid_name="val"),
        item_tfms=Resize(item_size),
        batch_tfms=aug_transforms(size=size, min_scale=0.75),
    )
    return block.dataloaders(path, bs=bs, num_workers=workers, seed=0)


def epoch_seconds(dl: Any, repeats: int) -> float:
    """Median seconds of one pass over ``dl`` (after one warm-up pass)."""
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        for _ in dl:
            pass
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def loader_table(path: Path, size: int, bs: int, workers: int, repeats: int) -> dict[str, float]:
    presize = round(size * 1.25)
    half = size // 2
    cases = {
        "fastai ImageBlock, final size": (size, presize, False),
        "fastai ImageBlock, half size (items at full size)": (half, presize, False),
        "DraftImageBlock, final size": (size, presize, True),
        "DraftImageBlock, half size (items at half size)": (half, round(half * 1.25), True),
        "ImageBlock, half size, items at half size (no draft)": (half, round(half * 1.25), False),
    }
    seconds = {}
    n = None
    for name, (batch_size, item_size, draft) in cases.items():
        dl = build_dls(path, batch_size, item_size, draft, bs, workers).train
        n = len(dl) * dl.bs
        seconds[name] = epoch_seconds(dl, repeats)
    base = seconds["fastai ImageBlock, final size"]
    print(f"\n### Training loader alone: {n} images per epoch, final {size} px, batch {bs}, {workers} workers\n")
    print("| loader | epoch (s) | images/s | vs fastai final size |")
    print("|---|---:|---:|---:|")
    for name, s in seconds.items():
        print(f"| {name} | {s:.2f} | {n / s:.0f} | {s / base:.2f}x |")
    return seconds


def profile_table(path: Path, size: int, bs: int, n_images: int) -> None:
    """Milliseconds per image of each loader stage, measured stage by stage on the same files."""
    presize, half = round(size * 1.25), size // 2
    cases = {
        "fastai, final size": (size, presize, False),
        "fastai, half size": (half, presize, False),
        "draft, final size": (size, presize, True),
        "draft, half size": (half, round(half * 1.25), True),
    }
    print(f"\n### Where the time goes: ms per image ({n_images} images, one thread)\n")
    print("| loader | decode | item transforms | collate + batch transforms | total | decoded size (median) |")
    print("|---|---:|---:|---:|---:|---|")
    for name, (batch_size, item_size, draft) in cases.items():
        dl = build_dls(path, batch_size, item_size, draft, bs, 0).train
        files = [dl.dataset.items[i] for i in range(min(n_images, len(dl.dataset)))]
        need = _pipeline_need(dl.after_item) if draft else None
        start = time.perf_counter()
        images = [PILImage(open_image(f, need=need)) for f in files]
        t_decode = time.perf_counter() - start
        start = time.perf_counter()
        items = [dl.after_item((img, 0)) for img in images]
        t_item = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(0, len(items), bs):
            dl.after_batch(dl.create_batch(items[i : i + bs]))
        t_batch = time.perf_counter() - start
        per = [1000 * t / len(files) for t in (t_decode, t_item, t_batch)]
        sizes = sorted(img.size for img in images)
        print(
            f"| {name} | {per[0]:.2f} | {per[1]:.2f} | {per[2]:.2f} | {sum(per):.2f} | "
            f"{sizes[len(sizes) // 2][0]}x{sizes[len(sizes) // 2][1]} |"
        )


class TinyModel(nn.Module):
    """A model that costs almost nothing, so the fit time is the loader's time (as on a fast GPU)."""

    def __init__(self, n_out: int) -> None:
        super().__init__()
        self.head = nn.Linear(3, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean((2, 3)))


class TrainTimer(Callback):
    """Seconds of each training epoch, validation excluded."""

    order = 100

    def before_fit(self) -> None:
        self.times: list[float] = []

    def before_train(self) -> None:
        self._t = time.perf_counter()

    def after_train(self) -> None:
        self.times.append(time.perf_counter() - self._t)


def data_bound_fit(path: Path, size: int, bs: int, workers: int, epochs: int, min_epochs: int) -> None:
    presize = round(size * 1.25)
    runs = {
        "fixed size, fastai ImageBlock": (False, None),
        "fixed size, DraftImageBlock": (True, None),
        "ProgressiveResize(), fastai ImageBlock": (False, {}),
        "ProgressiveResize(), DraftImageBlock": (True, {}),
        "ProgressiveResize(start=0.5, finish=0.75), DraftImageBlock": (True, {"start": 0.5, "finish": 0.75}),
    }
    totals: dict[str, float] = {}
    ideals: dict[str, float] = {}
    for name, (draft, pr_kwargs) in runs.items():
        dls = build_dls(path, size, presize, draft, bs, workers)
        learn = Learner(dls, TinyModel(dls.c), loss_func=CrossEntropyLossFlat())
        timer = TrainTimer()
        cbs: list[Any] = [timer]
        pr = None
        if pr_kwargs is not None:
            pr = ProgressiveResize(min_epochs=min_epochs, **pr_kwargs)
            cbs.append(pr)
        with learn.no_bar(), learn.no_logging():
            learn.fit_one_cycle(epochs, 1e-2, cbs=cbs)
        totals[name] = sum(timer.times)
        if pr is not None:
            n_iter = len(dls.train)
            # Items follow each epoch's largest size: the ideal cost is the mean of those areas.
            per_epoch = [max(h * w for h, w in pr.sizes[e * n_iter : (e + 1) * n_iter]) for e in range(epochs)]
            ideals[name] = sum(per_epoch) / (epochs * size * size)
    base = totals["fixed size, fastai ImageBlock"]
    print(f"\n### Data-bound fit: {epochs} epochs, a near-free model, final {size} px, {workers} workers\n")
    print("| fit | training time (s) | vs fixed-size fastai | ideal (mean item area / full) |")
    print("|---|---:|---:|---:|")
    for name, t in totals.items():
        ideal = f"{ideals[name]:.2f}" if name in ideals else "1.00"
        print(f"| {name} | {t:.1f} | {t / base:.2f}x | {ideal} |")
    fixed_draft = totals["fixed size, DraftImageBlock"]
    prog = totals["ProgressiveResize(), DraftImageBlock"]
    print(f"\nProgressiveResize() vs fixed size, both with draft decoding: {prog / fixed_draft:.2f}x")


def accuracy_table(path: Path, size: int, epochs: int, seeds: range, bs: int) -> None:
    from fastai_tricks.recipe import RecipeConfig, evaluate, train

    print(f"\n### Recipe accuracy with and without draft decoding (xresnet18, {size} px, {epochs} epochs)\n")
    print("| seed | draft decoding | ImageBlock (full decode) | difference (points) |")
    print("|---:|---:|---:|---:|")
    diffs = []
    for seed in seeds:
        acc = {}
        for draft in (True, False):
            cfg = RecipeConfig(
                data=path, arch="xresnet18", size=size, epochs=epochs, bs=bs, seed=seed, draft=draft, tta="none",
                workers=0, out=Path(tempfile.mkdtemp()),
            )  # fmt: skip
            sink = io.StringIO()
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):  # the progress bars
                learn, _ = train(cfg)
                acc[draft] = evaluate(learn, "none")[0]
        diffs.append(100 * (acc[True] - acc[False]))
        print(f"| {seed} | {acc[True]:.4f} | {acc[False]:.4f} | {diffs[-1]:+.1f} |")
    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    print(f"\nmean difference: {statistics.mean(diffs):+.2f} ± {sd:.2f} points over {len(diffs)} seed(s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run on a few images")
    parser.add_argument("--size", type=int, default=None, help="final image size (default 224, quick 128)")
    parser.add_argument("--n-train", type=int, default=None, help="training images per class (default 40, quick 3)")
    parser.add_argument("--bs", type=int, default=None, help="batch size (default 32, quick 8)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0: one process)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of the data-bound fits (default 8, quick 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes per loader (default 3, quick 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--accuracy", action="store_true", help="also train the recipe with and without draft")
    parser.add_argument("--accuracy-size", type=int, default=128, help="image size of the accuracy runs")
    parser.add_argument("--accuracy-epochs", type=int, default=8, help="epochs of the accuracy runs")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the accuracy runs")
    parser.add_argument("--first-seed", type=int, default=0, help="first seed of the accuracy runs")
    parser.add_argument("--skip-speed", action="store_true", help="only the accuracy runs (with --accuracy)")
    args = parser.parse_args()
    size = args.size or (128 if args.quick else 224)
    n_train = args.n_train or (3 if args.quick else 40)
    epochs = args.epochs or (2 if args.quick else 8)
    repeats = args.repeats or (1 if args.quick else 3)
    bs = args.bs or (8 if args.quick else 32)
    torch.set_num_threads(args.threads)

    path = make_fake_imagenette(tempfile.mkdtemp(), n_train=n_train, n_valid=max(2, n_train // 4), full_size=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), data: {len(get_image_files(path))} JPEGs")
    if not args.skip_speed:
        loader_table(path, size, bs, args.workers, repeats)
        profile_table(path, size, bs, n_images=min(10 * n_train, 200))
        # --quick's short fits are below ProgressiveResize's budget guard: resize them anyway.
        data_bound_fit(path, size, bs, args.workers, epochs, min_epochs=0 if args.quick else 8)
    if args.accuracy:
        seeds = range(args.first_seed, args.first_seed + (1 if args.quick else args.seeds))
        accuracy_table(path, args.accuracy_size, 2 if args.quick else args.accuracy_epochs, seeds, bs)


if __name__ == "__main__":
    main()
