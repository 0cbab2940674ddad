"""Benchmark ProgressiveResize on generated Imagenette-like data, on CPU.

Prints, as Markdown tables:

1. the training-epoch time at each size the default epoch schedule visits, next to the
   full-size epoch time and the ideal ratio (size / final)^2;
2. the total time and accuracy of a default ``ProgressiveResize`` fit next to a fixed-size fit
   with the same epochs, learning rate schedule and seed.

Targets (issue 4): a half-size epoch takes at most 0.4x the full-size epoch; a default-schedule fit
takes at most 0.75x the fixed-size fit; accuracy within 1 point of the fixed-size fit.

Usage::

    python benchmarks/bench_resize.py            # 128 px, 8 epochs
    python benchmarks/bench_resize.py --quick    # 64 px, 4 epochs, small data set
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.vision.all import CrossEntropyLossFlat, ImageDataLoaders, Learner, Resize, accuracy
from torchvision.models import resnet18

from fastai_tricks import make_fake_imagenette
from fastai_tricks.resizing import ProgressiveResize, resize_schedule


class TrainTimer(Callback):
    """Wall-clock time of each training epoch (validation excluded)."""

    order = 100

    def before_fit(self):
        self.times = []

    def before_train(self):
        self._t = time.perf_counter()

    def after_train(self):
        self.times.append(time.perf_counter() - self._t)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_learner(path, size: int, bs: int, seed: int) -> Learner:
    seed_all(seed)
    dls = ImageDataLoaders.from_folder(path, valid="val", item_tfms=Resize(size), bs=bs, num_workers=0, seed=seed)
    return Learner(dls, resnet18(num_classes=10), loss_func=CrossEntropyLossFlat(), metrics=accuracy)


def fit(learn: Learner, epochs: int, lr: float, cbs: list) -> tuple[float, float, list[float]]:
    timer = TrainTimer()
    start = time.perf_counter()
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(epochs, lr, cbs=[*cbs, timer])
    total = time.perf_counter() - start
    return total, float(learn.recorder.values[-1][-1]), timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and data for a smoke run")
    parser.add_argument("--size", type=int, default=None, help="final image size (default 128, quick 64)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of the compared fits (default 8, quick 4)")
    parser.add_argument("--n-train", type=int, default=None, help="training images per class (default 40, quick 12)")
    parser.add_argument("--n-valid", type=int, default=None, help="validation images per class (default 20, quick 6)")
    parser.add_argument("--bs", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    size = args.size or (64 if args.quick else 128)
    epochs = args.epochs or (4 if args.quick else 8)
    n_train = args.n_train or (12 if args.quick else 40)
    n_valid = args.n_valid or (6 if args.quick else 20)
    if args.threads:
        torch.set_num_threads(args.threads)

    path = make_fake_imagenette(tempfile.mkdtemp(), n_train=n_train, n_valid=n_valid, size=size, seed=args.seed)

    # Warm up the allocator and kernels once so the first timed epoch is not penalised.
    warm = make_learner(path, size, args.bs, args.seed)
    fit(warm, 1, args.lr, [])

    # 1. Epoch time per scheduled size (each size trained alone).
    n_iter = len(warm.dls.train)
    visited = sorted({h for h, _ in resize_schedule(epochs, n_iter, size, schedule="epoch")} | {size // 2, size})
    per_size = {}
    for s in visited:
        learn = make_learner(path, size, args.bs, args.seed)
        # Two epochs, timing the second: the first pays one-off costs of a new input shape.
        # min_epochs=0: a 2-epoch fit is below the budget guard, and this one must train at size s.
        _, _, times = fit(learn, 2, args.lr, [ProgressiveResize(initial_size=s, final_size=s, min_epochs=0)])
        per_size[s] = times[-1]
    full = per_size[size]
    print(
        f"\n### Epoch time per size (final {size} px, {n_iter} iterations/epoch, "
        f"CPU, {torch.get_num_threads()} threads)\n"
    )
    print("| size (px) | epoch time (s) | ratio to full size | ideal (size/final)^2 |")
    print("|---:|---:|---:|---:|")
    for s in visited:
        print(f"| {s} | {per_size[s]:.2f} | {per_size[s] / full:.2f} | {(s / size) ** 2:.2f} |")

    # 2. Default schedule vs fixed size, same seed and epochs.
    learn = make_learner(path, size, args.bs, args.seed)
    t_fixed, acc_fixed, _ = fit(learn, epochs, args.lr, [])
    learn = make_learner(path, size, args.bs, args.seed)
    # The default schedule; min_epochs=0 so that --quick's 4 epochs are resized too (8 pass the guard anyway).
    pr = ProgressiveResize(min_epochs=0)
    t_prog, acc_prog, _ = fit(learn, epochs, args.lr, [pr])
    ideal = sum((h * w) / size**2 for h, w in pr.sizes) / len(pr.sizes)
    print(
        f"\n### Fit time: default ProgressiveResize vs fixed {size} px ({epochs} epochs, one-cycle, seed {args.seed})\n"
    )
    print("| run | total time (s) | ratio | ideal ratio | accuracy |")
    print("|---|---:|---:|---:|---:|")
    print(f"| fixed {size} px | {t_fixed:.1f} | 1.00 | 1.00 | {acc_fixed:.3f} |")
    print(f"| ProgressiveResize() | {t_prog:.1f} | {t_prog / t_fixed:.2f} | {ideal:.2f} | {acc_prog:.3f} |")

    half = per_size[size // 2] / full
    print("\n### Targets\n")
    print("| target | measured | met |")
    print("|---|---:|:---:|")
    print(f"| half-size epoch <= 0.40x full | {half:.2f}x | {'yes' if half <= 0.40 else 'no'} |")
    print(f"| default fit <= 0.75x fixed | {t_prog / t_fixed:.2f}x | {'yes' if t_prog / t_fixed <= 0.75 else 'no'} |")
    gap = 100 * (acc_prog - acc_fixed)
    print(f"| accuracy within 1 point | {gap:+.1f} points | {'yes' if abs(gap) <= 1 else 'no'} |")


if __name__ == "__main__":
    main()
