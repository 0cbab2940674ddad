"""Should the mixing callbacks mix ``lr_find``'s batches? lr_find's suggestion and the fit it gives, on real digits.

fastai's ``MixUp`` and ``CutMix`` mix every batch ``lr_find`` runs; this package's callbacks did not
until ``mix_in_lr_find`` was added. For each seed and each mix (MixUp with α = 0.4 and CutMix with α = 1.0, the
defaults), this script:

1. runs ``lr_find`` (valley suggestion) with the callback mixing lr_find's batches
   (``mix_in_lr_find=True``, fastai's behaviour);
2. runs ``lr_find`` with lr_find's batches unmixed (``mix_in_lr_find=False``). The callback then does
   nothing at all under lr_find, so this is the plain lr_find: it runs once per seed and serves both
   mixes;
3. trains ``fit_one_cycle`` with the mix callback at each suggestion, from the same initial weights,
   data order and seed, so that the two arms differ only in the learning rate (when both suggestions
   are equal the fit is the same, so it runs once).

The anchor is plain fastai: the same model trained without mixing at the plain suggestion.

Data: scikit-learn's real handwritten digits (:func:`fastai_tricks.make_digits`, 1,797 scans, 25% of
each class held out, written at 32 px), loaded as the recipe loads them (:func:`fastai_tricks.recipe.build_dls`:
presizing, no flips, dataset normalization, batch size 64). Model: fastai's xresnet18 at half width
(``widen=0.5``; less than half of the recipe's cost per batch on a CPU). It prints Markdown with the hardware line:
the per-seed suggestions and accuracies, mean ± sample std, and the paired difference (mixed minus
unmixed) with its std, which is what decides: a mean difference within one std of the differences is
a tie.

Usage::

    python benchmarks/bench_lr_find_mix.py            # 3 seeds, 6 epochs (about 11 CPU minutes on 1 thread)
    python benchmarks/bench_lr_find_mix.py --quick    # 1 seed, 1 epoch, lr_find of 20 batches, width 0.25: a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from fastai_tricks.mixing import CutMix, MixUp
from fastai_tricks.recipe import build_dls, digits_config, find_data

MIXES = {"MixUp": lambda flag: MixUp(mix_in_lr_find=flag), "CutMix": lambda flag: CutMix(mix_in_lr_find=flag)}


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} torch threads, {gpu}, torch {torch.__version__}"


def seeded_learner(dls: Any, seed: int, widen: float, out: Path) -> Any:
    """A fresh half-width xresnet18 whose weights and data order depend only on ``seed``."""
    from fastai.vision.all import CrossEntropyLossFlat, Learner, accuracy, set_seed, xresnet18

    set_seed(seed, reproducible=True)
    for dl in dls.loaders:  # fastai's loaders carry their own shuffling RNG: restart it too
        dl.rng = random.Random(seed)
    model = xresnet18(n_out=dls.c, widen=widen)
    return Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, path=out, model_dir=".")


def suggest(
    dls: Any, seed: int, cbs: list[Any], num_it: int, widen: float, out: Path
) -> tuple[float, tuple[int, int], float]:
    """lr_find's valley with ``cbs`` attached; (mixed, run) lr_find batches; the seconds it took."""
    from fastai.callback.core import Callback

    class CountMixed(Callback):
        order = 1  # after the mixing callbacks (0)

        def __init__(self) -> None:
            self.mixed, self.batches = 0, 0

        def before_batch(self) -> None:
            if self.learn.training:
                self.batches += 1
                self.mixed += any(getattr(cb, "_batch", None) is not None for cb in cbs)

    learn = seeded_learner(dls, seed, widen, out)
    counter = CountMixed()
    learn.add_cbs([*cbs, counter])
    start = time.perf_counter()
    with learn.no_bar():
        lr = learn.lr_find(num_it=num_it, show_plot=False).valley
    return float(lr), (counter.mixed, counter.batches), time.perf_counter() - start


def train(
    dls: Any, seed: int, cbs: list[Any], lr: float, epochs: int, widen: float, out: Path
) -> tuple[tuple[float, float], float]:
    """(accuracy, validation loss) of ``fit_one_cycle(epochs, lr)`` with ``cbs``, and the seconds the fit took."""
    learn = seeded_learner(dls, seed, widen, out)
    start = time.perf_counter()
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(epochs, lr, cbs=cbs)
    # The fit's last validation, on the whole held-out set: [train_loss, valid_loss, accuracy].
    _, valid_loss, acc = learn.recorder.values[-1]
    return (float(acc), float(valid_loss)), time.perf_counter() - start


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch, lr_find of 20 batches, width 0.25")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..n-1 (default 3, quick 1)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every fit (default 6, quick 1)")
    parser.add_argument("--num-it", type=int, default=None, help="lr_find's batches (default 100, quick 20)")
    parser.add_argument("--widen", type=float, default=None, help="xresnet18's width multiplier (0.5, quick 0.25)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    args = parser.parse_args()
    seeds = args.seeds or (1 if args.quick else 3)
    epochs = args.epochs or (1 if args.quick else 6)
    num_it = args.num_it or (20 if args.quick else 100)
    args.widen = args.widen or (0.25 if args.quick else 0.5)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    tmp = Path(tempfile.mkdtemp())
    cfg = digits_config(epochs=epochs, out=tmp, tta="none")
    with contextlib.redirect_stdout(io.StringIO()):
        dls = build_dls(find_data(cfg), cfg)

    plain_lr: dict[int, float] = {}
    plain_acc: dict[int, float] = {}
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in MIXES}
    lr_find_s: list[float] = []
    fit_s: list[float] = []
    for seed in range(seeds):
        # fastai's progress output and the callbacks' lr_find line would bury the Markdown printed below.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            plain_lr[seed], _, s = suggest(dls, seed, [], num_it, args.widen, tmp)
            lr_find_s.append(s)
            (plain_acc[seed], _), s = train(dls, seed, [], plain_lr[seed], epochs, args.widen, tmp)
            fit_s.append(s)
            for name, make in MIXES.items():
                lr_mixed, (n_mixed, n_run), s = suggest(dls, seed, [make(True)], num_it, args.widen, tmp)
                lr_find_s.append(s)
                (acc_mixed, loss_mixed), s = train(dls, seed, [make(True)], lr_mixed, epochs, args.widen, tmp)
                fit_s.append(s)
                if lr_mixed == plain_lr[seed]:  # the same seeded fit: deterministic on a CPU, not run twice
                    acc_plain, loss_plain = acc_mixed, loss_mixed
                else:
                    (acc_plain, loss_plain), s = train(dls, seed, [make(True)], plain_lr[seed], epochs, args.widen, tmp)
                    fit_s.append(s)
                rows[name].append(
                    {
                        "seed": seed,
                        "lr_mixed": lr_mixed,
                        "lr_plain": plain_lr[seed],
                        "mixed": n_mixed,
                        "run": n_run,
                        "acc_mixed": acc_mixed,
                        "acc_plain": acc_plain,
                        "loss_mixed": loss_mixed,
                        "loss_plain": loss_plain,
                    }
                )

    lines = [
        f"### lr_find with and without mixing its batches: digits, {epochs} epochs, seeds 0-{seeds - 1}",
        "",
        f"Hardware: {hardware()}.",
        "",
        f"xresnet18 (widen={args.widen}) from scratch, digits at 32 px as the recipe loads them, batch size 64, "
        f"`lr_find(num_it={num_it})` valley, then `fit_one_cycle({epochs}, lr)` with the mix callback, from the "
        "same weights and data order in both arms. Accuracy on the 449 held-out digits, without TTA.",
        "",
        "| mix | seed | lr, lr_find mixed | lr, lr_find unmixed | accuracy, mixed lr | accuracy, unmixed lr "
        "| difference (points) | valid loss, mixed lr / unmixed lr |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for name, runs in rows.items():
        for r in runs:
            diff = 100 * (r["acc_mixed"] - r["acc_plain"])
            lines.append(
                f"| {name} | {r['seed']} | {r['lr_mixed']:.3e} | {r['lr_plain']:.3e} | {r['acc_mixed']:.4f} "
                f"| {r['acc_plain']:.4f} | {diff:+.1f} | {r['loss_mixed']:.4f} / {r['loss_plain']:.4f} |"
            )
        am, ap = mean_std([r["acc_mixed"] for r in runs]), mean_std([r["acc_plain"] for r in runs])
        d = mean_std([100 * (r["acc_mixed"] - r["acc_plain"]) for r in runs])
        lm = statistics.geometric_mean([r["lr_mixed"] for r in runs])
        lp = statistics.geometric_mean([r["lr_plain"] for r in runs])
        lm_, lp_ = mean_std([r["loss_mixed"] for r in runs]), mean_std([r["loss_plain"] for r in runs])
        lines.append(
            f"| **{name}**, mean ± std | | {lm:.3e} (geo. mean) | {lp:.3e} (geo. mean) | {am[0]:.4f} ± {am[1]:.4f} "
            f"| {ap[0]:.4f} ± {ap[1]:.4f} | **{d[0]:+.1f} ± {d[1]:.1f}** | {lm_[0]:.4f} / {lp_[0]:.4f} |"
        )
        if len(runs) < 2:
            verdicts.append(f"{name}: one seed, no verdict")
        elif abs(d[0]) <= d[1]:
            verdicts.append(f"{name}: tied (|{d[0]:+.1f}| <= {d[1]:.1f} points)")
        else:
            better = "mixed" if d[0] > 0 else "unmixed"
            verdicts.append(f"{name}: the {better} lr_find's suggestion is better ({d[0]:+.1f} ± {d[1]:.1f} points)")
    pa = mean_std(list(plain_acc.values()))
    per_seed = ", ".join(f"{plain_acc[s]:.4f}" for s in range(seeds))
    lines += [
        f"| plain fastai (no mixing, unmixed lr) | all | | | | {pa[0]:.4f} ± {pa[1]:.4f} | | |",
        "",
        f"Plain fastai per seed: {per_seed}. lr_find batches mixed with `mix_in_lr_find=True` (of those run; "
        "lr_find stops early when the loss diverges): "
        + ", ".join(
            f"{name} {sum(r['mixed'] for r in runs)} of {sum(r['run'] for r in runs)}" for name, runs in rows.items()
        )
        + f". Mean lr_find {statistics.fmean(lr_find_s):.1f} s, mean fit {statistics.fmean(fit_s):.1f} s.",
        "",
        "Verdict (difference = mixed minus unmixed, mean ± std over seeds; a tie when |mean| <= std): "
        + "; ".join(verdicts)
        + ".",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
