"""Benchmark: ``learn.four_corner_tta``'s default ``beta`` on real data, beside plain and fastai's ``learn.tta``.

``four_corner_tta`` returns what ``learn.tta`` returns, so its ``beta`` blends like fastai's:
``torch.lerp(aug_preds, preds, beta)``, where ``aug_preds`` is the merged prediction over the views
and ``preds`` the plain one. This script decides whether fastai's default ``beta=0.25`` stays.

For each seed it trains the recipe's digits model once (``digits_config()``: scikit-learn's real
handwritten digits at 32 px, 25 % of each class held out, xresnet18 from scratch, 4 epochs of
``fit_one_cycle``, exactly what ``fastai-tricks train --digits`` trains), then predicts the
validation set with:

* plain ``learn.get_preds()``, the anchor;
* ``learn.four_corner_tta(beta=None)``: its ``aug_preds`` (pure TTA, five crops) and its ``preds``;
* ``beta=0.25`` (fastai's default) and ``beta=0.5``, blended from that same pair;
* ``learn.four_corner_tta()``, the default call, which must equal the ``beta=0.25`` blend;
* ``learn.four_corner_tta(use_max=True)``;
* fastai's ``learn.tta()`` (``n=4``, ``beta=0.25``), for reference.

It prints, as Markdown with the hardware line, the mean ± sample std over the seeds of the
accuracy and of the negative log-likelihood of the true class (rows renormalised first, which
changes only ``use_max``, whose maxima do not sum to 1), and the per-seed accuracies.

Usage::

    python benchmarks/bench_tta_beta.py            # 3 seeds, 4 epochs: a few minutes on 2 CPU cores
    python benchmarks/bench_tta_beta.py --quick    # 1 seed, 1 epoch, 150 images scored: a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_recipe import hardware

import fastai_tricks.tta  # noqa: F401 - patches Learner.four_corner_tta
from fastai_tricks.recipe import digits_config, find_data, train

RESULTS = Path(__file__).resolve().parent / "results" / "tta_beta_digits.md"


def scores(probs: torch.Tensor, targs: torch.Tensor) -> tuple[float, float]:
    """Accuracy, and mean negative log-likelihood of the true class after renormalising each row."""
    p = probs.float() / probs.float().sum(-1, keepdim=True)
    acc = float((p.argmax(-1) == targs).float().mean())
    nll = float(-p.gather(-1, targs.long()[:, None]).clamp_min(1e-12).log().mean())
    return acc, nll


def predictions(learn, dl=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every compared prediction of ``learn`` on ``dl`` (None: its validation set), with its targets."""
    plain, targs = learn.get_preds(dl=dl)
    (aug, plain_tta), targs_tta = learn.four_corner_tta(dl=dl, beta=None)
    if not torch.equal(targs_tta, targs):
        raise RuntimeError("four_corner_tta's targets differ from get_preds'")
    default, _ = learn.four_corner_tta(dl=dl)
    if not torch.allclose(default, torch.lerp(aug, plain_tta, 0.25), atol=1e-6):
        raise RuntimeError("four_corner_tta() is not the beta=0.25 blend of its beta=None pair")
    max_preds, _ = learn.four_corner_tta(dl=dl, use_max=True)
    fastai_preds, fastai_targs = learn.tta(dl=dl)
    return {
        "plain `get_preds()`": (plain, targs),
        "`beta=None`: `aug_preds` (pure TTA)": (aug, targs),
        "`beta=None`: `preds` (plain view)": (plain_tta, targs),
        "`beta=0.25` (fastai's default)": (default, targs),
        "`beta=0.5`": (torch.lerp(aug, plain_tta, 0.5), targs),
        "`use_max=True`": (max_preds, targs),
        "fastai `learn.tta()` (n=4, beta=0.25)": (fastai_preds, fastai_targs),
    }


def run(
    seeds: list[int], epochs: int, tmp: Path, log: Callable[[str], None], n_valid: int | None = None
) -> tuple[dict[str, list[tuple[float, float]]], int]:
    """Train once per seed and score every prediction; return the scores and the number of images scored."""
    results: dict[str, list[tuple[float, float]]] = {}
    n_images = 0
    base = digits_config(epochs=epochs, tta="none", out=tmp / "run")
    path = find_data(base)
    for seed in seeds:
        cfg = digits_config(epochs=epochs, tta="none", seed=seed, out=tmp / f"run{seed}")
        start = time.perf_counter()
        # fastai's progress bars and epoch tables would bury the Markdown this script prints.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            learn, _ = train(cfg, path)
            # --quick scores the first n_valid validation images only, in the validation transforms.
            items = learn.dls.valid_ds.items
            dl = None if n_valid is None else learn.dls.test_dl(items[:n_valid], with_labels=True)
            with learn.no_bar(), learn.no_logging():
                preds = predictions(learn, dl)
        for name, (p, t) in preds.items():
            results.setdefault(name, []).append(scores(p, t))
            n_images = len(t)
        log(f"seed {seed}: {time.perf_counter() - start:.0f} s")
    return results, n_images


def _mean_std(values: list[float], scale: float = 1.0) -> str:
    mean = statistics.mean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {std:.4f}" if scale == 1.0 else f"{mean:+.2f} ± {std:.2f}"


def table(results: dict[str, list[tuple[float, float]]], seeds: list[int], epochs: int, n_images: int) -> str:
    plain = [a for a, _ in results["plain `get_preds()`"]]
    lines = [
        f"### `four_corner_tta`'s `beta` on the digits: recipe model, {epochs} epochs, seeds {seeds[0]}-{seeds[-1]}",
        "",
        f"Hardware: {hardware()}.",
        "",
        "Data: scikit-learn's handwritten digits at 32 px (`make_digits`: 1,347 training and 450 validation scans,",
        f"split seed 0; {n_images} validation scans scored). Model: `digits_config()` (xresnet18 from scratch, {epochs} epochs of `fit_one_cycle`,",
        "lr 8e-3, bs 64), trained once per seed. TTA: the default five crops (87.5 % of the side, resized back).",
        "Mean ± sample std over the seeds; NLL of the true class after renormalising each row.",
        "",
        "| prediction | accuracy | vs plain (points) | NLL | accuracy per seed |",
        "|---|---:|---:|---:|---|",
    ]
    for name, vals in results.items():
        accs, nlls = [a for a, _ in vals], [n for _, n in vals]
        delta = [a - b for a, b in zip(accs, plain, strict=True)]
        per_seed = " ".join(f"{a:.4f}" for a in accs)
        lines.append(f"| {name} | {_mean_std(accs)} | {_mean_std(delta, 100.0)} | {_mean_std(nlls)} | {per_seed} |")
    return "\n".join(lines) + "\n"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, 1 epoch, 150 validation images, results not saved: a smoke run"
    )
    parser.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1 (default 3)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per training (default: the recipe's 4)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--save", type=Path, default=None, help=f"write the table here (default {RESULTS.name})")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    seeds = list(range(1 if args.quick else args.seeds))
    epochs = args.epochs or (1 if args.quick else digits_config().epochs)
    with tempfile.TemporaryDirectory() as tmp:
        results, n_images = run(seeds, epochs, Path(tmp), _log, n_valid=150 if args.quick else None)
    text = table(results, seeds, epochs, n_images)
    print("\n" + text)
    save = args.save or (None if args.quick else RESULTS)
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        save.write_text(text)


if __name__ == "__main__":
    main()
