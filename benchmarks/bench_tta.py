"""Benchmark: FourCornerTTA (decode once, V views in one pass) against fastai's ``learn.tta``.

One model (xresnet18 by default) is trained briefly on generated Imagenette-like data at 64 px,
then predictions on one validation set are timed for:

* plain ``get_preds``;
* fastai's ``learn.tta(n=4, beta=0.25)`` (n + 1 = 5 DataLoader passes);
* ``FourCornerTTA`` with 5 views (four corners and center): the default ``max_views_per_batch=None``
  (auto: chosen by device), and each explicit path, all 5 views in one forward (``max_views_per_batch=5``)
  and one view per forward (``max_views_per_batch=1``);
* ten-crop (``flip=True``), default;
* ``learn.four_corner_tta(beta=0.25)`` (5 views plus the plain view, blended like ``learn.tta``), default;
* the ideal of five views, D + 5·M (below), as a row of its own.

A segmentation part does the same for a small ``unet_learner`` on generated shapes
(``make_fake_segmentation``): plain, fastai's ``learn.tta``, five-crop, ten-crop and flip-only
(``crop=None, full=True, flip=True``), whose dense outputs ``FourCornerTTA`` pastes back in place.
It times seed 0 and reports foreground accuracy and Dice (``DiceMulti``) as mean ± std over
``--seg-seeds`` trainings.

Two costs are measured separately: **D**, one pass of the validation DataLoader (decode, item and
batch transforms) with no model, and **M**, one pass of the model over cached batches. For a method
that shows the model V views of every image, the ideal time is D + V*M. Images decoded per image
is counted by wrapping ``PIL.Image.open``.

The methods (and D and M) are timed interleaved: each repeat runs every one of them once, in turn,
so a change in the machine's load hits them all alike; the table gives the median over the repeats.
On a shared machine, ``--threads 1 --clock cpu`` times this process's CPU time on one thread, which
other processes disturb least.

Usage::

    python benchmarks/bench_tta.py            # full run, a few minutes on a 2-core CPU
    python benchmarks/bench_tta.py --quick    # smaller data and training, under a minute
    python benchmarks/bench_tta.py --quick --threads 1 --clock cpu   # on a busy machine
    python benchmarks/bench_tta.py --task segmentation   # only the unet part
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import PIL.Image
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastai.vision.all import (  # noqa: E402
    ConvLayer,
    CrossEntropyLossFlat,
    DataBlock,
    FileSplitter,
    ImageBlock,
    ImageDataLoaders,
    Learner,
    MaskBlock,
    Normalize,
    Resize,
    accuracy,
    aug_transforms,
    get_image_files,
    imagenet_stats,
    unet_learner,
    xresnet18,
    xresnet34,
)
from torch import nn  # noqa: E402

import fastai_tricks.tta  # noqa: E402, F401 - patches Learner.four_corner_tta
from fastai_tricks.data import make_fake_imagenette, make_fake_segmentation  # noqa: E402
from fastai_tricks.tta import FourCornerTTA  # noqa: E402

_OPENS = [0]
_real_open = PIL.Image.open


def _counting_open(*args, **kwargs):
    # Segmentation masks (CamVid's ``*_P.png``) are not images: count the images only.
    if not str(args[0] if args else "").endswith("_P.png"):
        _OPENS[0] += 1
    return _real_open(*args, **kwargs)


#: The clock of the timings: wall time, or with ``--clock cpu`` this process's CPU time (for busy machines).
_CLOCK = [time.perf_counter]


def _interleaved(fns: dict, repeats: int) -> dict:
    """Time every function of ``fns`` once per repeat, in turn; return name -> (last result, median s, opens)."""
    times: dict = {name: [] for name in fns}
    opens: dict = {name: [] for name in fns}
    results: dict = {}
    clock = _CLOCK[0]
    for _ in range(repeats):
        for name, fn in fns.items():
            _OPENS[0] = 0
            start = clock()
            results[name] = fn()
            times[name].append(clock() - start)
            opens[name].append(_OPENS[0])
    return {name: (results[name], statistics.median(times[name]), statistics.median(opens[name])) for name in fns}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data, short training, 3 repeats")
    parser.add_argument("--arch", choices=["xresnet18", "xresnet34"], default="xresnet18")
    parser.add_argument("--size", type=int, default=64, help="training and validation resolution")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--n-train", type=int, default=None, help="training images per class")
    parser.add_argument("--n-valid", type=int, default=None, help="validation images per class")
    parser.add_argument("--bs", type=int, default=64, help="batch size of the timed predictions")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per method (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", choices=["classification", "segmentation", "both"], default="both")
    parser.add_argument("--seg-seeds", type=int, default=None, help="segmentation trainings (default 3, quick 1)")
    parser.add_argument("--seg-epochs", type=int, default=None, help="segmentation epochs (default 8, quick 2)")
    parser.add_argument("--seg-size", type=int, default=64, help="side of the generated segmentation images")
    parser.add_argument("--seg-n-train", type=int, default=None, help="segmentation training images (96, quick 32)")
    parser.add_argument("--seg-n-valid", type=int, default=None, help="segmentation validation images (32, quick 16)")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall", help="time with the wall clock or this process's CPU time"
    )
    args = parser.parse_args(argv)
    if args.clock == "cpu":
        _CLOCK[0] = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.task != "segmentation":
        _classification(args)
    if args.task != "classification":
        _segmentation(args)


def _classification(args: argparse.Namespace) -> None:
    epochs = args.epochs or (1 if args.quick else 5)
    n_train = args.n_train or (10 if args.quick else 40)
    n_valid = args.n_valid or (5 if args.quick else 20)
    repeats = args.repeats or (3 if args.quick else 5)
    torch.manual_seed(args.seed)

    tmp = Path(tempfile.mkdtemp(prefix="bench_tta_"))
    # Images a little larger than the model input, so the training crop is really random.
    path = make_fake_imagenette(tmp, n_train=n_train, n_valid=n_valid, size=args.size * 5 // 4, seed=args.seed)
    dls = ImageDataLoaders.from_folder(
        path,
        valid="val",
        bs=32,  # small batches: more steps in a short training
        num_workers=0,
        seed=args.seed,
        item_tfms=Resize(args.size),
        batch_tfms=[*aug_transforms(max_warp=0.0), Normalize.from_stats(*imagenet_stats)],
    )
    arch = {"xresnet18": xresnet18, "xresnet34": xresnet34}[args.arch]
    learn = Learner(dls, arch(n_out=dls.c), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    start = time.perf_counter()
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(epochs, 4e-3)
    train_s = time.perf_counter() - start

    PIL.Image.open = _counting_open
    try:
        rows = _measure(learn, repeats, args.bs)
    finally:
        PIL.Image.open = _real_open

    n_img = len(dls.valid_ds)
    print(
        f"\n{args.arch} at {args.size} px, {n_img} validation images, bs {args.bs}, "
        f"{torch.get_num_threads()} threads, trained {epochs} epochs in {train_s:.0f} s; median of {repeats} run(s)\n"
    )
    d, m = rows.pop("D"), rows.pop("M")
    print(f"D (decode + augment, one pass) = {d:.2f} s; M (model, one pass) = {m:.2f} s; M/D = {m / d:.1f}")
    print(f"max_views_per_batch=None (auto) picked {rows.pop('auto')} here ({args.clock} clock)\n")
    plain_t = rows["plain get_preds"]["time"]
    print("| method | views V | time (s) | time / plain | time / (D + V·M) | decodes per image | accuracy |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        ideal = d + r["views"] * m
        print(
            f"| {name} | {r['views']} | {r['time']:.2f} | {r['time'] / plain_t:.2f} | {r['time'] / ideal:.2f} "
            f"| {r['opens'] / n_img:.2f} | {r['acc']:.4f} |"
        )
    ideal = d + 5 * m
    print(f"| ideal of 5 views, D + 5·M | 5 | {ideal:.2f} | {ideal / plain_t:.2f} | 1.00 | 1.00 | |")


def _measure(learn: Learner, repeats: int, bs: int) -> dict:
    dl = learn.dls.valid.new(shuffle=False, drop_last=False, bs=bs)
    rows: dict = {}
    batches = [b for b in dl]
    model = learn.model.eval()
    # Warm up (allocator, oneDNN kernels for every batch shape) so the first timed method is not penalised.
    with torch.no_grad(), learn.no_bar():
        model(batches[0][0])
        for k in (1, 5):
            learn.get_preds(dl=dl, cbs=FourCornerTTA(max_views_per_batch=k))
    rows["auto"] = _auto_label(batches[0][0])

    def model_pass():
        with torch.no_grad():
            for xb, _ in batches:
                model(xb)

    def acc(preds_targs):
        preds, targs = preds_targs
        return (preds.argmax(1) == targs).float().mean().item()

    methods = {
        "plain get_preds": (1, lambda: learn.get_preds(dl=dl)),
        "fastai learn.tta(n=4, beta=0.25)": (5, lambda: learn.tta(dl=dl, n=4, beta=0.25)),
        "FourCornerTTA, 5 views, default (auto)": (5, lambda: learn.get_preds(dl=dl, cbs=FourCornerTTA())),
        "FourCornerTTA, 5 views, all in one forward (max_views_per_batch=5)": (
            5,
            lambda: learn.get_preds(dl=dl, cbs=FourCornerTTA(max_views_per_batch=5)),
        ),
        "FourCornerTTA, 5 views, one view per forward (max_views_per_batch=1)": (
            5,
            lambda: learn.get_preds(dl=dl, cbs=FourCornerTTA(max_views_per_batch=1)),
        ),
        "FourCornerTTA, ten-crop, default": (10, lambda: learn.get_preds(dl=dl, cbs=FourCornerTTA(flip=True))),
        "four_corner_tta(beta=0.25), 5 views + plain, default": (
            6,
            lambda: learn.four_corner_tta(dl=dl, beta=0.25),
        ),
    }
    fns = {"D": lambda: [b for b in dl], "M": model_pass, **{name: fn for name, (_, fn) in methods.items()}}
    with learn.no_bar():
        timed = _interleaved(fns, repeats)
    rows["D"], rows["M"] = timed["D"][1], timed["M"][1]
    for name, (views, _) in methods.items():
        res, t, opens = timed[name]
        rows[name] = {"views": views, "time": t, "opens": opens, "acc": acc(res)}
    return rows


def _auto_label(xb: torch.Tensor) -> str:
    """What ``max_views_per_batch=None`` picks for five views of ``xb``, in words."""
    from fastai_tricks.tta_views import _auto_max_views, expand_views

    k = _auto_max_views(expand_views(xb))
    where = f"{xb.device.type}, batch {tuple(xb.shape)}"
    return f"all views in one forward ({where})" if k is None or k >= 5 else f"{k} view(s) per forward ({where})"


# --- segmentation ----------------------------------------------------------------------------------


def tiny_encoder(pretrained: bool = False) -> nn.Module:
    """A four-stage CNN (1.3 M parameters with its unet decoder) that ``unet_learner`` cuts at its pooling layer."""
    chans = [3, 16, 32, 64, 128]
    convs = [ConvLayer(a, b, stride=2) for a, b in zip(chans, chans[1:], strict=False)]
    return nn.Sequential(*convs, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def _seg_learner(path: Path, bs: int) -> Learner:
    codes = (path / "codes.txt").read_text().split()
    block = DataBlock(
        blocks=(ImageBlock, MaskBlock(codes)),
        get_items=get_image_files,
        get_y=lambda f: path / "labels" / f"{f.stem}_P{f.suffix}",
        splitter=FileSplitter(path / "valid.txt"),
        batch_tfms=[*aug_transforms(max_warp=0.0), Normalize.from_stats(*imagenet_stats)],
    )
    dls = block.dataloaders(path / "images", bs=bs, num_workers=0)
    return unet_learner(dls, tiny_encoder, pretrained=False, n_out=len(codes))


def _seg_scores(preds: torch.Tensor, targs: torch.Tensor) -> tuple[float, float]:
    """Foreground accuracy (pixels whose target is not background) and DiceMulti over the whole set."""
    pred = preds.argmax(1)
    fg = targs != 0
    fg_acc = (pred[fg] == targs[fg]).float().mean().item()
    dices = []
    for c in range(1, preds.shape[1]):
        p, t = pred == c, targs == c
        union = p.sum() + t.sum()
        if union > 0:
            dices.append(2 * (p & t).sum().item() / union.item())
    return fg_acc, sum(dices) / len(dices)


def _segmentation(args: argparse.Namespace) -> None:
    seeds = args.seg_seeds or (1 if args.quick else 3)
    epochs = args.seg_epochs or (1 if args.quick else 8)
    n_train = args.seg_n_train or (32 if args.quick else 96)
    n_valid = args.seg_n_valid or (16 if args.quick else 32)
    repeats = args.repeats or (3 if args.quick else 5)
    methods = {
        "plain get_preds": (1, lambda learn, dl: learn.get_preds(dl=dl)),
        "fastai learn.tta(n=4, beta=0.25)": (5, lambda learn, dl: learn.tta(dl=dl, n=4, beta=0.25)),
        "FourCornerTTA, 5 views, default (auto)": (5, lambda learn, dl: learn.get_preds(dl=dl, cbs=FourCornerTTA())),
        "FourCornerTTA, 5 views, all in one forward (max_views_per_batch=5)": (
            5,
            lambda learn, dl: learn.get_preds(dl=dl, cbs=FourCornerTTA(max_views_per_batch=5)),
        ),
        "FourCornerTTA, 5 views, one view per forward (max_views_per_batch=1)": (
            5,
            lambda learn, dl: learn.get_preds(dl=dl, cbs=FourCornerTTA(max_views_per_batch=1)),
        ),
        "FourCornerTTA, ten-crop, default": (
            10,
            lambda learn, dl: learn.get_preds(dl=dl, cbs=FourCornerTTA(flip=True)),
        ),
        "FourCornerTTA, flip only, default": (
            2,
            lambda learn, dl: learn.get_preds(dl=dl, cbs=FourCornerTTA(crop=None, full=True, flip=True)),
        ),
    }
    scores: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
    timing: dict = {}
    for i in range(seeds):
        seed = args.seed + i
        torch.manual_seed(seed)
        path = make_fake_segmentation(
            Path(tempfile.mkdtemp(prefix="bench_tta_seg_")),
            n_train=n_train,
            n_valid=n_valid,
            size=args.seg_size,
            seed=seed,
        )
        learn = _seg_learner(path, bs=16)
        start = time.perf_counter()
        with learn.no_bar(), learn.no_logging():
            learn.fit_one_cycle(epochs, 1e-2)
        train_s = time.perf_counter() - start
        dl = learn.dls.valid.new(shuffle=False, drop_last=False, bs=args.bs)
        PIL.Image.open = _counting_open
        try:
            if i == 0:
                timing = _measure_seg(learn, dl, methods, repeats)
            with learn.no_bar():
                for name, (_, fn) in methods.items():
                    scores[name].append(_seg_scores(*fn(learn, dl)))
        finally:
            PIL.Image.open = _real_open

    n_img = len(learn.dls.valid_ds)
    d, m, auto = timing.pop("D"), timing.pop("M"), timing.pop("auto")
    print(
        f"\nSegmentation: unet_learner(tiny_encoder) at {args.seg_size} px, {n_train} training and {n_img} validation "
        f"images, bs {args.bs}, {torch.get_num_threads()} threads, trained {epochs} epochs ({train_s:.0f} s for the "
        f"last seed); timed ({args.clock} clock) on seed {args.seed}, median of {repeats} run(s)\n"
    )
    print(f"D (decode + augment, one pass) = {d:.2f} s; M (model, one pass) = {m:.2f} s; M/D = {m / d:.1f}")
    print(f"max_views_per_batch=None (auto) picked {auto} here\n")
    plain_t = timing["plain get_preds"]["time"]
    print("| method | views V | time (s) | time / plain | time / (D + V·M) | decodes per image |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in timing.items():
        ideal = d + r["views"] * m
        print(
            f"| {name} | {r['views']} | {r['time']:.2f} | {r['time'] / plain_t:.2f} | {r['time'] / ideal:.2f} "
            f"| {r['opens'] / n_img:.2f} |"
        )
    ideal = d + 5 * m
    print(f"| ideal of 5 views, D + 5·M | 5 | {ideal:.2f} | {ideal / plain_t:.2f} | 1.00 | 1.00 |")
    print(f"\nForeground accuracy and Dice (DiceMulti), mean ± std over {seeds} seed(s):\n")
    print(
        "| method | foreground accuracy | Dice |"
        + "".join(f" seed {args.seed + i} (fg acc / Dice) |" for i in range(seeds))
    )
    print("|---|---:|---:|" + "---:|" * seeds)
    for name, rows in scores.items():
        fg, dice = zip(*rows, strict=True)
        per_seed = "".join(f" {a:.4f} / {b:.4f} |" for a, b in rows)
        print(f"| {name} | {_mean_std(fg)} | {_mean_std(dice)} |{per_seed}")


def _mean_std(values: tuple[float, ...]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _measure_seg(learn: Learner, dl, methods: dict, repeats: int) -> dict:
    rows: dict = {}
    batches = [b for b in dl]
    model = learn.model.eval()
    with torch.no_grad(), learn.no_bar():
        model(batches[0][0])
        for k in (1, 5):
            learn.get_preds(dl=dl, cbs=FourCornerTTA(max_views_per_batch=k))
    rows["auto"] = _auto_label(batches[0][0])

    def model_pass():
        with torch.no_grad():
            for xb, _ in batches:
                model(xb)

    fns = {
        "D": lambda: [b for b in dl],
        "M": model_pass,
        **{name: (lambda fn=fn: fn(learn, dl)) for name, (_, fn) in methods.items()},
    }
    with learn.no_bar():
        timed = _interleaved(fns, repeats)
    rows["D"], rows["M"] = timed["D"][1], timed["M"][1]
    for name, (views, _) in methods.items():
        _, t, opens = timed[name]
        rows[name] = {"views": views, "time": t, "opens": opens}
    return rows


if __name__ == "__main__":
    main()
