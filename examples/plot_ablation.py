"""
The recipe's ablation on demo data
==================================

:func:`fastai_tricks.recipe.run_ablation` runs the fastbook chapter's sequence of tricks one at a
time, with the same data, seed and budget: a baseline, then normalization, progressive resizing,
four-corner TTA (compared with fastai's ``learn.tta``), mixup and label smoothing. It is what
``fastai-tricks ablation`` runs.

Here the budget is tiny so that the page builds in seconds: one epoch of xresnet18 at 32 px on
200 generated images. At this budget the differences between steps are mostly noise, and mixup
and label smoothing are expected not to help: both pay off only after many epochs. Run
``fastai-tricks ablation --demo`` (or ``--data PATH``) with more epochs to measure them.
"""

# %%
# Generate a small Imagenette-shaped folder (10 classes, 20 training and 5 validation images
# each) and run the six steps. fastai's progress output is silenced; the tables are printed below.
import contextlib
import io
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt

from fastai_tricks import make_fake_imagenette
from fastai_tricks.recipe import RecipeConfig, run_ablation

tmp = Path(tempfile.mkdtemp())
data = make_fake_imagenette(tmp / "data", n_train=20, n_valid=5, size=40, seed=0)
cfg = RecipeConfig(data=data, arch="xresnet18", size=32, epochs=1, bs=32, workers=0, out=tmp / "ablation")
with contextlib.redirect_stdout(io.StringIO()):
    rows = run_ablation(cfg)

# %%
# ``run_ablation`` returns one row per step and writes ``ablation.md``, ``ablation.csv`` and
# ``ablation.png`` into ``cfg.out``. The Markdown table is the one ``fastai-tricks ablation``
# prints:
print((cfg.out / "ablation.md").read_text())

# %%
# The same rows as a bar chart: accuracy per step (chance is 0.1), and the seconds each step
# spent training and evaluating. The TTA step re-uses the model of the step before it, so its
# extra cost is evaluation only; fastai's ``learn.tta`` on that model is drawn beside it.
names = [r["step"] for r in rows]
fig, (ax_acc, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
ax_acc.bar(range(len(rows)), [r["accuracy"] for r in rows], color="tab:blue", label="step")
tta_idx = next((i for i, r in enumerate(rows) if "fastai_tta_accuracy" in r), None)
if tta_idx is not None:
    ax_acc.bar(tta_idx + 0.3, rows[tta_idx]["fastai_tta_accuracy"], width=0.3, color="tab:orange", label="learn.tta")
ax_acc.axhline(0.1, color="grey", linestyle=":", label="chance")
ax_acc.set_xticks(range(len(rows)), names, rotation=25, ha="right")
ax_acc.set_ylabel("validation accuracy")
ax_acc.set_ylim(0, 1)
ax_acc.legend(loc="upper left")
# The TTA step trained nothing new: count only its evaluation.
train_s = [0.0 if i == tta_idx else r["train_s"] for i, r in enumerate(rows)]
ax_time.bar(range(len(rows)), train_s, color="tab:green", label="train")
ax_time.bar(range(len(rows)), [r["eval_s"] for r in rows], bottom=train_s, color="tab:red", label="eval")
ax_time.set_xticks(range(len(rows)), names, rotation=25, ha="right")
ax_time.set_ylabel("seconds")
ax_time.legend(loc="upper left")
fig.suptitle(f"Ablation: {cfg.arch}, {cfg.epochs} epoch at {cfg.size} px, 200 generated images")
fig.tight_layout()
plt.show()
