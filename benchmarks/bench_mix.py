"""Per-batch cost of each mixing callback against one xresnet18 training step on CPU.

Times, on the same 64x3x128x128 CPU batch, the work each callback does per
training batch (its ``before_batch``, plus ``after_loss`` where it mixes
per-sample losses), fastai's own MixUp and CutMix, and timm's ``Mixup`` (when
timm is installed), and compares each with one xresnet18 forward + backward +
SGD step on the same batch. Prints a Markdown table of milliseconds and percent
of a step; the target is at most 1% for every variant.

Run ``python benchmarks/bench_mix.py`` (or ``--quick`` for a short run).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch
from fastai.callback.mixup import CutMix as FastaiCutMix
from fastai.callback.mixup import MixUp as FastaiMixUp
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import TensorCategory, TensorImage
from fastai.vision.models.xresnet import xresnet18

from fastai_tricks.mixing import CutMix, FMix, ManifoldMix, MixUp, RandomMix, ResizeMix

TARGET_PCT = 1.0


def timeit(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def fake_learn(x: torch.Tensor, y: torch.Tensor, model: torch.nn.Module) -> SimpleNamespace:
    """The attributes the callbacks read, without a DataLoader or training loop."""
    return SimpleNamespace(
        xb=(x,),
        yb=(y,),
        x=x,
        y=y,
        training=True,
        pct_train=0.0,
        epoch=0,
        n_epoch=1,
        model=model,
        loss_func=CrossEntropyLossFlat(),
        pred=torch.randn(x.shape[0], 10),
    )


def ours(cb, x, y, model) -> Callable[[], object]:
    """One batch of our callback: before_batch and, for integer targets, the mixed loss in after_loss."""
    learn = fake_learn(x, y, model)
    cb.learn = learn
    cb.before_fit()

    def run():
        learn.xb, learn.yb = (x,), (y,)
        cb.before_batch()
        cb.after_loss()
        cb.after_batch()  # also drops ManifoldMix's armed hook: the forward pass is not timed here

    return run


def fastai_cb(cb, x, y, model) -> Callable[[], object]:
    """One batch of a fastai mix callback: before_batch plus its swapped loss function."""
    learn = fake_learn(x, y, model)
    cb.learn = learn
    cb.before_train()

    def run():
        # fastai's CutMix pastes into learn.xb[0] in place; timing it as is favours fastai slightly.
        learn.xb, learn.yb = (x,), (y,)
        cb.before_batch()
        learn.loss_func(learn.pred, *learn.yb)

    return run


def timm_mixup(x, y) -> Callable[[], object] | None:
    try:
        from timm.data import Mixup
    except ImportError:
        return None
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=10)
    return lambda: mix(x, y)  # mixes in place, as timm does


def training_step(x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    model = xresnet18(n_out=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_func = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad()
        loss_func(model(x), y).backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a smaller batch (32x3x64x64)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bs, size, repeats, step_repeats = (32, 64, 5, 2) if args.quick else (64, 128, 20, 3)
    x = TensorImage(torch.randn(bs, 3, size, size))
    y = TensorCategory(torch.randint(0, 10, (bs,)))
    model = xresnet18(n_out=10)

    step_ms = timeit(training_step(x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor)), step_repeats, warmup=1)
    # (name, ms or None, whether the 1% target applies: our variants with default settings)
    rows: list[tuple[str, float | None, bool]] = []
    for name, cb, default in [
        ("MixUp", MixUp(), True),
        ("CutMix", CutMix(), True),
        ("CutMix(per_sample=True)", CutMix(per_sample=True), False),
        ("ManifoldMix (per-batch work; the hidden-layer lerp runs in the forward)", ManifoldMix(), True),
        ("ResizeMix", ResizeMix(), True),
        ("FMix", FMix(), True),
        ("FMix(per_sample=True)", FMix(per_sample=True), False),
        ("RandomMix([MixUp, CutMix])", RandomMix([MixUp(), CutMix()]), True),
    ]:
        rows.append((f"fastai_tricks {name}", timeit(ours(cb, x, y, model), repeats), default))
    rows.append(("fastai MixUp", timeit(fastai_cb(FastaiMixUp(), x, y, model), repeats), False))
    rows.append(("fastai CutMix", timeit(fastai_cb(FastaiCutMix(), x, y, model), repeats), False))
    timm_fn = timm_mixup(x, y)
    if timm_fn is None:
        rows.append(("timm Mixup (timm not installed: skipped)", None, False))
    else:
        rows.append(("timm Mixup", timeit(timm_fn, repeats), False))

    print(f"Batch {bs}x3x{size}x{size} on CPU, {torch.get_num_threads()} threads, median of {repeats} runs.\n")
    print("| work | ms | % of step |")
    print("|---|---:|---:|")
    print(f"| one xresnet18 training step | {step_ms:.1f} | 100 |")
    worst = 0.0
    for name, ms, counts in rows:
        if ms is None:
            print(f"| {name} | - | - |")
            continue
        pct = 100 * ms / step_ms
        if counts:
            worst = max(worst, pct)
        print(f"| {name} | {ms:.2f} | {pct:.2f} |")
    verdict = "met" if worst <= TARGET_PCT else "NOT met"
    print(f"\nTarget <= {TARGET_PCT:g}% of a step for each variant's default settings: {verdict} (worst {worst:.2f}%).")


if __name__ == "__main__":
    main()
