"""Benchmark: does evaluating at a larger test size (FixRes, ``TestSize``) pay off on real digits?

Touvron et al., *Fixing the train-test resolution discrepancy*, NeurIPS 2019 (arXiv:1906.06423):
random-resized crops show objects larger in training than the whole-image validation transform
shows them, so a model may do better at a test size somewhat larger than its training size, and
better still with its BatchNorm statistics recomputed at that size.

For each training augmentation and seed it trains the recipe's digits model once
(``digits_config()``: scikit-learn's real handwritten digits at 32 px, 25 % of each class held out
with split seed 0, xresnet18 from scratch, 4 epochs of ``fit_one_cycle`` at lr 8e-3, bs 64,
dataset normalization, no flips) with one of three batch augmentations, all after the recipe's
``Resize(40)`` presizing:

* **recipe**: ``aug_transforms(size=32, min_scale=0.75)``, what ``fastai-tricks train --digits`` trains;
* **fastai default**: ``aug_transforms(size=32)`` (fastai's defaults: no crop, zoom up to 1.1 with
  p 0.75; flips off, as for every digits run, since a mirrored digit is another symbol);
* **strong crops**: ``aug_transforms(size=32, min_scale=0.35)``, the FixRes regime (crops of down to
  35 % of the area), where the predicted gain is largest.

Then it scores the validation set with plain ``learn.get_preds()`` (fastai, no callback: the anchor)
and with ``TestSize(f)`` for ``f`` in 1.0, 1.1, 1.15, 1.25, 1.5 and 2.0 times the training size and
``'auto'`` (:func:`fastai_tricks.fixres_test_size` from the training pipeline), each with the
training BatchNorm statistics and with ``recalibrate_bn=10`` (10 batches of 64 training images
through the validation transforms at the test size). It prints, as Markdown with the hardware line,
the mean ± sample std over the seeds of the accuracy and of the negative log-likelihood of the true
class, and writes every per-seed score as CSV.

Usage::

    python benchmarks/bench_test_size.py --threads 1   # 3 seeds x 3 augmentations: ~20 min on 1 CPU thread
    python benchmarks/bench_test_size.py --quick       # 1 seed, 1 epoch, recipe only, 150 images: a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from bench_recipe import hardware

from fastai_tricks import TestSize
from fastai_tricks.recipe import build_dls, digits_config, find_data, train

RESULTS = Path(__file__).resolve().parent / "results"
MD, CSV = RESULTS / "test_size_digits.md", RESULTS / "test_size_digits.csv"

#: Name -> the ``min_scale`` of ``aug_transforms`` (1.0: fastai's default, no crop).
ARMS = {"recipe": 0.75, "fastai default": 1.0, "strong crops": 0.35}
FACTORS: list[float | str] = [1.0, 1.1, 1.15, 1.25, 1.5, 2.0, "auto"]
BN_BATCHES = 10
PLAIN = "plain fastai"


def build(path: Path, cfg, min_scale: float):
    """The recipe's DataLoaders with ``aug_transforms(size, min_scale)``; the recipe's own for min_scale 0.75."""
    if min_scale == 0.75:
        return build_dls(path, cfg)
    from fastai.vision.all import (
        CategoryBlock,
        DataBlock,
        GrandparentSplitter,
        Resize,
        aug_transforms,
        get_image_files,
        parent_label,
    )

    from fastai_tricks import DraftImageBlock, ensure_normalized

    block = DataBlock(
        blocks=(DraftImageBlock, CategoryBlock),
        get_items=get_image_files,
        get_y=parent_label,
        splitter=GrandparentSplitter(train_name="train", valid_name="val"),
        item_tfms=Resize(int(cfg.size * 1.25)),
        batch_tfms=aug_transforms(size=cfg.size, min_scale=min_scale, do_flip=False),
    )
    dls = block.dataloaders(path, bs=cfg.bs, num_workers=cfg.workers)
    ensure_normalized(dls, cfg.normalize)
    return dls


def scores(probs: torch.Tensor, targs: torch.Tensor) -> tuple[float, float]:
    """Accuracy and the mean negative log-likelihood of the true class."""
    acc = float((probs.argmax(-1) == targs).float().mean())
    nll = float(-probs.float().gather(-1, targs.long()[:, None]).clamp_min(1e-12).log().mean())
    return acc, nll


def score_model(learn, dl, factors, bn_batches: int) -> list[dict]:
    """Every evaluation of one trained model: plain, then each factor without and with BN recalibration."""
    rows = []
    start = time.perf_counter()
    probs, targs = learn.get_preds(dl=dl)
    acc, nll = scores(probs, targs)
    rows.append(dict(eval=PLAIN, factor=1.0, bn=0, px=32, accuracy=acc, nll=nll, seconds=time.perf_counter() - start))
    for factor in factors:
        for bn in (0, bn_batches):
            cb = TestSize(factor, recalibrate_bn=bn)
            start = time.perf_counter()
            probs, targs = learn.get_preds(dl=dl, cbs=cb)
            acc, nll = scores(probs, targs)
            px = cb.evaluated_size[0]
            rows.append(
                dict(
                    eval=f"TestSize({factor!r})",
                    factor=factor if factor != "auto" else px / cb.plain_size[0],
                    bn=bn,
                    px=px,
                    accuracy=acc,
                    nll=nll,
                    seconds=time.perf_counter() - start,
                )
            )
    return rows


def run(arms, seeds, epochs, factors, bn_batches, tmp: Path, log: Callable[[str], None], n_valid=None) -> list[dict]:
    """Train each augmentation once per seed and score it; return one row per (arm, seed, evaluation)."""
    results = []
    path = find_data(digits_config(out=tmp / "data"))
    for arm in arms:
        for seed in seeds:
            cfg = digits_config(epochs=epochs, tta="none", seed=seed, out=tmp / f"{arm}-{seed}".replace(" ", "_"))
            start = time.perf_counter()
            # fastai's progress bars and epoch tables would bury the Markdown this script prints.
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                from fastai.vision.all import set_seed

                set_seed(seed, reproducible=True)
                learn, info = train(cfg, path, dls=build(path, cfg, ARMS[arm]))
                items = learn.dls.valid_ds.items
                dl = None if n_valid is None else learn.dls.test_dl(items[:n_valid], with_labels=True)
                with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # 'auto' on a pipeline without crops warns, by design
                    rows = score_model(learn, dl, factors, bn_batches)
            for r in rows:
                results.append(dict(arm=arm, seed=seed, epochs=epochs, train_s=round(info["times"]["train"], 1), **r))
            log(f"{arm}, seed {seed}: {time.perf_counter() - start:.0f} s")
    return results


def _ms(values: list[float], scale: float = 100.0, signed: bool = False) -> str:
    mean = statistics.fmean(values) * scale
    std = (statistics.stdev(values) if len(values) > 1 else 0.0) * scale
    return f"{mean:+.2f} ± {std:.2f}" if signed else f"{mean:.2f} ± {std:.2f}"


def _label(r: dict) -> str:
    return PLAIN + " (32 px, no callback)" if r["eval"] == PLAIN else r["eval"]


def table(results: list[dict], seeds: list[int], epochs: int, n_images: int, bn_batches: int) -> str:
    arms = list(dict.fromkeys(r["arm"] for r in results))
    evals = list(dict.fromkeys(r["eval"] for r in results))
    cell: dict[tuple, list[dict]] = {}
    for r in results:
        cell.setdefault((r["arm"], r["eval"], r["bn"]), []).append(r)
    plain = {(r["arm"], r["seed"]): r for r in results if r["eval"] == PLAIN}

    def px(rows: list[dict]) -> str:
        sizes = sorted({r["px"] for r in rows})
        return "/".join(map(str, sizes))

    lines = [
        f"### Test-size resizing (FixRes) on the digits: {epochs} epochs, seeds {seeds[0]}-{seeds[-1]}",
        "",
        f"Hardware: {hardware()}.",
        "",
        "Data: scikit-learn's handwritten digits at 32 px (`make_digits`: 1,347 training and 450 validation scans,",
        f"split seed 0; {n_images} validation scans scored). Model: `digits_config()` (xresnet18 from scratch,",
        f"{epochs} epochs of `fit_one_cycle`, lr 8e-3, bs 64, dataset normalization, `Resize(40)` presizing, no flips),",
        "trained once per seed and augmentation. Batch augmentation: recipe `aug_transforms(size=32, min_scale=0.75)`;",
        "fastai default `aug_transforms(size=32)` (no crop; zoom up to 1.1, p 0.75); strong crops",
        "`aug_transforms(size=32, min_scale=0.35)`. Evaluation: plain `learn.get_preds()`, and `TestSize(f)` with the",
        f"training BatchNorm statistics or with `recalibrate_bn={bn_batches}` ({bn_batches} x 64 training scans through the",
        "validation transforms at the test size). `auto` is `fixres_test_size` read from the training pipeline.",
        "Mean ± sample std over the seeds, in %; 'vs plain' is the per-seed difference to plain fastai, in points.",
        "",
    ]
    header = "| evaluation | px | " + " | ".join(f"{a} | {a} + BN recal." for a in arms) + " |"
    for metric, title in (("accuracy", "Accuracy (%)"), ("nll", "NLL of the true class (x 100, lower is better)")):
        lines += [f"#### {title}", "", header, "|---|---|" + "---:|---:|" * len(arms)]
        for ev in evals:
            row = []
            sizes = []
            for arm in arms:
                for bn in (0, bn_batches):
                    rows = cell.get((arm, ev, bn))
                    row.append("" if not rows else _ms([r[metric] for r in rows]))
                    if rows and bn == 0:
                        sizes.append(px(rows))
            size_text = " / ".join(dict.fromkeys(sizes))
            name = _label(cell[(arms[0], ev, 0)][0])
            lines.append(f"| {name} | {size_text} | " + " | ".join(row) + " |")
        lines.append("")
    lines += [
        "#### Accuracy vs plain fastai, same model and seed (points)",
        "",
        header,
        "|---|---|" + "---:|---:|" * len(arms),
    ]
    for ev in evals:
        if ev == PLAIN:
            continue
        row, sizes = [], []
        for arm in arms:
            for bn in (0, bn_batches):
                rows = cell.get((arm, ev, bn), [])
                deltas = [r["accuracy"] - plain[(arm, r["seed"])]["accuracy"] for r in rows]
                row.append(_ms(deltas, signed=True) if deltas else "")
                if rows and bn == 0:
                    sizes.append(px(rows))
        lines.append(f"| {ev} | {' / '.join(dict.fromkeys(sizes))} | " + " | ".join(row) + " |")
    lines.append("")
    secs = statistics.fmean(r["seconds"] for r in results if r["bn"] == bn_batches) - statistics.fmean(
        r["seconds"] for r in results if r["bn"] == 0 and r["eval"] != PLAIN
    )
    lines += [
        f"Recalibration costs {secs:.1f} s per evaluation on this machine (mean over every recalibrated row).",
        "",
    ]
    return "\n".join(lines)


def write_csv(results: list[dict], path: Path) -> None:
    fields = ["arm", "seed", "epochs", "eval", "factor", "px", "bn", "accuracy", "nll", "seconds", "train_s"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in results:
            writer.writerow(
                {
                    **{k: r[k] for k in fields},
                    "factor": f"{r['factor']:.4f}",
                    "accuracy": f"{r['accuracy']:.6f}",
                    "nll": f"{r['nll']:.6f}",
                    "seconds": f"{r['seconds']:.2f}",
                }
            )


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, 1 epoch, recipe augmentation, 150 images, not saved: a smoke run"
    )
    parser.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1 (default 3)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per training (default: the recipe's 4)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--save", action="store_true", help=f"write {MD.name} and {CSV.name} (default unless --quick)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    seeds = list(range(1 if args.quick else args.seeds))
    epochs = args.epochs or (1 if args.quick else digits_config().epochs)
    arms = ["recipe"] if args.quick else list(ARMS)
    factors = [1.0, 1.25, "auto"] if args.quick else FACTORS
    with tempfile.TemporaryDirectory() as tmp:
        results = run(
            arms,
            seeds,
            epochs,
            factors,
            2 if args.quick else BN_BATCHES,
            Path(tmp),
            _log,
            n_valid=150 if args.quick else None,
        )
    n_images = 150 if args.quick else 450
    text = table(results, seeds, epochs, n_images, 2 if args.quick else BN_BATCHES)
    print("\n" + text)
    if args.save or not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        MD.write_text(text)
        write_csv(results, CSV)


if __name__ == "__main__":
    main()
