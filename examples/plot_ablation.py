"""
The recipe's ablation: real digits with error bars, and generated data
======================================================================

:func:`fastai_tricks.recipe.run_ablation` trains the fastbook chapter's tricks side by side with
**plain fastai** (``ImageDataLoaders.from_folder``, a from-scratch model, ``fit_one_cycle``), with
the same data, split, arch, budget and seeds. It is what ``fastai-tricks ablation`` runs.

The first two charts are **real data**: scikit-learn's 1,797 handwritten digits (they ship with
scikit-learn, so nothing is downloaded), xresnet18 for 4 epochs at 32 px, mean and standard
deviation over 3 seeds. They were measured with::

    fastai-tricks ablation --digits --seeds 3 --out runs/digits-ablation
    fastai-tricks ablation --digits --seeds 3 --one-at-a-time --out runs/digits-one-at-a-time

and are read here from the CSV files those commands wrote (committed in ``benchmarks/results/``),
because three seeds of eight trainings take half an hour on a 2-core CPU. The last chart is a tiny
ablation on **generated** data, run live when this page is built: one epoch on 200 drawn images,
where every bar is within noise of the others. It shows the mechanics, not the value of any trick.
"""

# %%
# Real digits, cumulative (the chapter's order): each step adds one trick to the step before.
# Every step is evaluated without TTA, so a training loss is never hidden behind the TTA gain;
# the TTA step is TTA alone on the previous step's model. The dashed line is plain fastai.
import contextlib
import csv
import io
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt

# The committed results, found from the repository root or any folder below it (the gallery runs in examples/).
RESULTS = next(p / "benchmarks" / "results" for p in (Path.cwd(), *Path.cwd().parents) if (p / "benchmarks").is_dir())


def read_rows(name):
    with open(RESULTS / name, newline="") as f:
        return list(csv.DictReader(f))


def draw(ax, rows, title):
    acc = [float(r["accuracy"]) for r in rows]
    std = [float(r["accuracy_std"]) for r in rows]
    colours = ["tab:orange" if r["step"] == "plain fastai" else "tab:blue" for r in rows]
    ax.bar(range(len(rows)), acc, yerr=std, capsize=4, color=colours)
    ax.axhline(acc[0], color="tab:orange", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(rows)), [r["step"] for r in rows], rotation=25, ha="right")
    ax.set_ylim(min(a - s for a, s in zip(acc, std, strict=True)) - 0.02, 1.0)
    ax.set_ylabel("validation accuracy (no TTA)")
    ax.set_title(title, fontsize=10)


cumulative = read_rows("ablation_digits_cumulative.csv")
one_at_a_time = read_rows("ablation_digits_one_at_a_time.csv")
fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
draw(axes[0], cumulative, "real digits: cumulative, 3 seeds")
draw(axes[1], one_at_a_time, "real digits: each trick alone on the baseline, 3 seeds")
fig.tight_layout()
plt.show()

# %%
# The same rows as numbers: accuracy without and with four-corner TTA (mean ± std over the 3
# seeds) and the change in points against the row each step changes.
for title, rows in (("cumulative", cumulative), ("one at a time", one_at_a_time)):
    print(f"{title}:")
    for r in rows:
        print(
            f"  {r['step']:<34} {float(r['accuracy']):.4f} ± {float(r['accuracy_std']):.4f}"
            f"  TTA {float(r['tta_accuracy']):.4f}  change {100 * float(r['delta']):+.1f}"
            f"  vs plain fastai {100 * float(r['vs_plain']):+.1f}"
        )

# %%
# Generated data, live: a tiny Imagenette-shaped folder (10 classes, 20 training and 5 validation
# images each), one epoch at 32 px, one seed. fastai's progress output is silenced.
from fastai_tricks import make_fake_imagenette  # noqa: E402
from fastai_tricks.recipe import RecipeConfig, run_ablation  # noqa: E402

tmp = Path(tempfile.mkdtemp())
data = make_fake_imagenette(tmp / "data", n_train=20, n_valid=5, size=40, seed=0)
cfg = RecipeConfig(data=data, arch="xresnet18", size=32, epochs=1, bs=32, workers=0, out=tmp / "ablation")
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    rows = run_ablation(cfg)
print((cfg.out / "ablation.md").read_text())

fig, ax = plt.subplots(figsize=(8, 4))
draw(ax, [{k: str(v) for k, v in r.items()} for r in rows], "generated data: 1 epoch, 1 seed (noise, not evidence)")
fig.tight_layout()
plt.show()
