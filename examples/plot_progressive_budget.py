"""
When progressive resizing pays off: accuracy against the budget
===============================================================

:class:`fastai_tricks.ProgressiveResize` trains small and grows to the full size during a fit. On
real images in short fits it loses accuracy, whatever the schedule, so it has a budget guard
(``min_epochs=8``): a shorter fit trains at full size and says so. This chart is the evidence.

Each point is the mean over seeds (bars: one standard deviation) of the accuracy gap, in points,
between a progressive fit and a fixed-size fit trained with the same seed: scikit-learn's real
handwritten digits at 32 px, xresnet18, the recipe's pipeline without label smoothing,
``fit_one_cycle`` at lr 8e-3. They were measured with the same code as::

    python benchmarks/bench_recipe.py --curve 4 8

and are read from ``benchmarks/results/progressive_budget.csv``, because the runs take about an
hour on a 2-core CPU. The 40-epoch point is one seed.
"""

# %%
import csv
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib.pyplot as plt

# The committed results, found from the repository root or any folder below it (the gallery runs in examples/).
RESULTS = next(p / "benchmarks" / "results" for p in (Path.cwd(), *Path.cwd().parents) if (p / "benchmarks").is_dir())

with open(RESULTS / "progressive_budget.csv", newline="") as f:
    runs = [r for r in csv.DictReader(f) if r["data"] == "digits"]

fixed = {(r["epochs"], r["seed"]): float(r["accuracy"]) for r in runs if r["run"] == "fixed size"}
gaps = defaultdict(lambda: defaultdict(list))
for r in runs:
    key = (r["epochs"], r["seed"])
    if r["run"] not in ("fixed size", "plain fastai") and key in fixed:
        gaps[r["run"]][int(r["epochs"])].append(100 * (float(r["accuracy"]) - fixed[key]))

fig, ax = plt.subplots(figsize=(8, 4.5))
for name, by_epochs in sorted(gaps.items()):
    epochs = sorted(by_epochs)
    means = [statistics.fmean(by_epochs[e]) for e in epochs]
    stds = [statistics.stdev(by_epochs[e]) if len(by_epochs[e]) > 1 else 0.0 for e in epochs]
    ax.errorbar(epochs, means, yerr=stds, marker="o", capsize=4, label=name)
    for e, m in zip(epochs, means, strict=True):
        print(f"{name:<40} {e:>3} epochs: {m:+.1f} points over {len(by_epochs[e])} seed(s)")
ax.axhline(0.0, color="grey", linewidth=1)
ax.axhspan(-0.3, 0.3, color="tab:green", alpha=0.15, label="within 0.3 point of fixed size")
ax.axvline(8, color="tab:red", linestyle=":", label="min_epochs (budget guard)")
ax.set_xscale("log", base=2)
ax.set_xticks([4, 8, 16, 40], ["4", "8", "16", "40"])
ax.set_xlabel("epochs of fit_one_cycle")
ax.set_ylabel("accuracy vs fixed size (points)")
ax.set_title("Progressive resizing on real digits (32 px, xresnet18)", fontsize=10)
ax.legend(fontsize=8, loc="lower right")
fig.tight_layout()
plt.show()
