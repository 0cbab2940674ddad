"""
Test-size resizing (FixRes) on real digits: accuracy against the test size
==========================================================================

:class:`fastai_tricks.TestSize` evaluates a model at another image size than the one it was trained
at, without touching the learner's loaders, and can recompute the BatchNorm statistics at that size
(Touvron et al., *Fixing the train-test resolution discrepancy*, arXiv:1906.06423). This chart is
the evidence for its default: each point is the mean over three seeds (bars: one standard
deviation) of the validation accuracy of the recipe's digits model (scikit-learn's real handwritten
digits at 32 px, xresnet18 from scratch, 4 epochs), evaluated at 1.0 to 2.0 times the training
size, with the training BatchNorm statistics and recalibrated ones, under three training
augmentations. The dashed line is plain fastai (``learn.get_preds()`` at 32 px, no callback); the
star marks the size ``TestSize('auto')`` chose (:func:`fastai_tricks.fixres_test_size`).

They were measured with::

    python benchmarks/bench_test_size.py --threads 1

and are read from ``benchmarks/results/test_size_digits.csv``, because the runs take about twenty
minutes on one CPU thread.
"""

# %%
import csv
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib.pyplot as plt

# The committed results, found from the repository root or any folder below it (the gallery runs in examples/).
RESULTS = next(p / "benchmarks" / "results" for p in (Path.cwd(), *Path.cwd().parents) if (p / "benchmarks").is_dir())

with open(RESULTS / "test_size_digits.csv", newline="") as f:
    rows = list(csv.DictReader(f))

arms = list(dict.fromkeys(r["arm"] for r in rows))
by_key = defaultdict(list)
for r in rows:
    by_key[(r["arm"], r["eval"], int(r["bn"]))].append(r)


def mean_std(values):
    values = [100 * float(v) for v in values]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


fig, axes = plt.subplots(1, len(arms), figsize=(4.2 * len(arms), 4.2), sharey=True, squeeze=False)
for ax, arm in zip(axes[0], arms, strict=True):
    plain, plain_std = mean_std(r["accuracy"] for r in by_key[(arm, "plain fastai", 0)])
    ax.axhspan(plain - plain_std, plain + plain_std, color="grey", alpha=0.15)
    ax.axhline(plain, color="grey", linestyle="--", label="plain fastai (32 px)")
    bns = sorted({int(r["bn"]) for r in rows if r["arm"] == arm})
    for bn, color in zip(bns, ("tab:blue", "tab:orange"), strict=False):
        label = "TestSize, training BN statistics" if bn == 0 else f"TestSize(recalibrate_bn={bn})"
        evals = [e for (a, e, b) in by_key if a == arm and b == bn and e.startswith("TestSize") and "auto" not in e]
        points = sorted((float(by_key[(arm, e, bn)][0]["px"]), e) for e in evals)
        xs = [px for px, _ in points]
        stats = [mean_std(r["accuracy"] for r in by_key[(arm, e, bn)]) for _, e in points]
        ax.errorbar(
            xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, color=color, label=label
        )
        auto = by_key.get((arm, "TestSize('auto')", bn))
        if auto:
            m, _ = mean_std(r["accuracy"] for r in auto)
            ax.plot([float(auto[0]["px"])], [m], marker="*", markersize=14, color=color, linestyle="none")
        for px, (m, s) in zip(xs, stats, strict=True):
            print(f"{arm:<15} bn={bn:<2} {px:>4.0f} px: {m:6.2f} ± {s:.2f} % (plain {plain:.2f} %)")
    ax.set_title(arm, fontsize=10)
    ax.set_xlabel("test size (px; trained at 32)")
axes[0][0].set_ylabel("validation accuracy (%)")
axes[0][0].legend(fontsize=7, loc="lower left")
fig.suptitle("Accuracy against the test size on real digits (xresnet18, 4 epochs, 3 seeds); star: 'auto'", fontsize=10)
fig.tight_layout()
plt.show()
