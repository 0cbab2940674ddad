"""
Progressive resizing's budget: optimizer steps or epochs?
=========================================================

:class:`fastai_tricks.ProgressiveResize` has a budget guard: a fit too short for progressive
resizing trains at full size and warns. Its reason, that a short one-cycle fit reaches full size
only after the learning rate has decayed and has too few steps left to adapt, counts optimizer
steps; the guard counted epochs. This chart separates the two.

Each point is one cell of a grid where steps and epochs come apart: batch sizes 16, 32 and 64
crossed with 2 to 16 epochs, and half of the training set at batch size 64 (which halves the steps
of an epoch). Its height is the mean over seeds 0, 1 and 2 (bars: one standard deviation) of the
accuracy change, in points, of a progressive fit (``ProgressiveResize(min_epochs=0)``, default
schedule) against a fixed-size fit trained with the same seed: scikit-learn's real handwritten
digits at 32 px, xresnet18 from scratch, the recipe's pipeline, ``fit_one_cycle`` at lr 8e-3. The
left panel places the cells by optimizer steps, the right one by epochs; the unit that predicts the
loss lines the cells up on one curve. They were measured with::

    python benchmarks/bench_budget_unit.py --threads 1 --csv benchmarks/results/budget_unit_digits.csv

and are read from ``benchmarks/results/budget_unit_digits.csv``, because the runs take most of an
hour on a 2-core CPU.
"""

# %%
import csv
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib.pyplot as plt

# The committed results, found from the repository root or any folder below it (the gallery runs in examples/).
RESULTS = next(p / "benchmarks" / "results" for p in (Path.cwd(), *Path.cwd().parents) if (p / "benchmarks").is_dir())

with open(RESULTS / "budget_unit_digits.csv", newline="") as f:
    rows = list(csv.DictReader(f))

accuracy = {(r["bs"], r["epochs"], r["fraction"], r["seed"], r["run"]): float(r["accuracy"]) for r in rows}
cells = defaultdict(list)  # (bs, fraction) -> [(steps, epochs, change per seed)]
changes = defaultdict(list)
for r in rows:
    fixed = accuracy.get((r["bs"], r["epochs"], r["fraction"], r["seed"], "fixed size"))
    if r["run"] == "progressive" and fixed is not None:
        changes[(int(r["bs"]), float(r["fraction"]), int(r["steps"]), int(r["epochs"]))].append(
            100 * (float(r["accuracy"]) - fixed)
        )

series = defaultdict(list)
for (bs, fraction, steps, epochs), values in sorted(changes.items()):
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    label = f"bs {bs}" if fraction == 1.0 else f"bs {bs}, {fraction:g} of the scans"
    series[label].append((steps, epochs, mean, std))
    print(f"{label:<26} {epochs:>3} epochs {steps:>5} steps: {mean:+.1f} ± {std:.1f} points over {len(values)} seed(s)")

fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
for i, (label, points) in enumerate(sorted(series.items())):
    for ax, col in zip(axes, (0, 1), strict=True):
        pts = sorted(points, key=lambda p: p[col])
        ax.errorbar(
            [p[col] for p in pts],
            [p[2] for p in pts],
            yerr=[p[3] for p in pts],
            marker="os^D"[i % 4],
            capsize=3,
            label=label,
        )
for ax, unit in zip(axes, ("optimizer steps", "epochs"), strict=True):
    ax.axhline(0.0, color="grey", linewidth=1)
    ax.axhspan(-0.3, 0.3, color="tab:green", alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"{unit} of fit_one_cycle (log scale)")
axes[0].set_ylabel("accuracy, progressive − fixed size (points)")
axes[1].legend(fontsize=8, loc="lower right")
fig.suptitle("Progressive resizing on real digits: which budget predicts the loss?", fontsize=10)
fig.tight_layout()
plt.show()
