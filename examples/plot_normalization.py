"""
Normalization and label smoothing
=================================

This example computes the exact per-channel statistics of a small generated
data set with :func:`fastai_tricks.dataset_stats`, normalizes the
``DataLoaders`` with :func:`fastai_tricks.ensure_normalized`, and compares
the pixel values before and after normalization. It ends with the soft
targets of label smoothing for K = 5 classes and eps = 0.1.
"""

# %%
# Exact statistics of the training set
# ------------------------------------
# ``dataset_stats`` reads the whole training set once, in order and without
# random augmentation, and merges per-batch moments in float64.
import tempfile

import matplotlib.pyplot as plt
import numpy as np
import torch
from fastai.vision.all import ImageDataLoaders, Resize

from fastai_tricks.data import make_fake_imagenette
from fastai_tricks.losses import smooth_targets
from fastai_tricks.normalization import check_normalization, dataset_stats, ensure_normalized

path = make_fake_imagenette(tempfile.mkdtemp(), n_train=4, n_valid=2, size=48, seed=0)
dls = ImageDataLoaders.from_folder(path, valid="val", item_tfms=Resize(32), bs=20, num_workers=0, seed=0)
mean, std = dataset_stats(dls, progress=False)
print("mean", np.round(mean, 4), "std", np.round(std, 4))

# %%
# Pixel values before and after normalization
# -------------------------------------------
# Before, each channel lives in [0, 1] with its own mean and spread. After
# ``ensure_normalized(dls, 'dataset')`` every channel has mean 0 and std 1
# over the training set, which is what the first layer's initialisation
# assumes.
before = dls.valid.one_batch()[0]
ensure_normalized(dls, "dataset")
after = dls.valid.one_batch()[0]

colours = ("tab:red", "tab:green", "tab:blue")
fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
for ax, x, title in zip(
    axes, (before, after), ("before: raw pixels in [0, 1]", "after: (x - mean) / std"), strict=True
):
    for c, colour in enumerate(colours):
        ax.hist(x[:, c].flatten().numpy(), bins=40, histtype="step", color=colour, label="RGB"[c])
    ax.set_title(title)
    ax.set_xlabel("pixel value")
axes[0].set_ylabel("count")
axes[1].legend()
fig.tight_layout()

# %%
# A check that catches mistakes
# -----------------------------
# ``check_normalization`` reports the statistics the model actually sees, and
# warns when normalization is missing, doubled, mismatched with the pretrained
# model's statistics, or has the wrong number of channels.
from fastai.vision.all import CrossEntropyLossFlat, Learner  # noqa: E402
from torch import nn  # noqa: E402

model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
report = check_normalization(Learner(dls, model, loss_func=CrossEntropyLossFlat()), warn=False)
print("per-channel mean", np.round(report.mean, 3), "std", np.round(report.std, 3), "problems:", report.problems)

# %%
# Label smoothing, K = 5 and eps = 0.1
# ------------------------------------
# The true class gets ``1 - eps + eps/K = 0.92`` and each of the others
# ``eps/K = 0.02``; the row still sums to 1.
target = smooth_targets(torch.tensor([2]), n_classes=5, eps=0.1)[0]
print([round(v, 4) for v in target.tolist()], "sum", round(float(target.sum()), 4))

fig, ax = plt.subplots(figsize=(4.5, 2.8))
ax.bar(range(5), target.numpy(), color=["tab:gray", "tab:gray", "tab:orange", "tab:gray", "tab:gray"])
for k, v in enumerate(target.tolist()):
    ax.text(k, v + 0.02, f"{v:.2f}", ha="center")
ax.set_xticks(range(5))
ax.set_xlabel("class")
ax.set_ylabel("target probability")
ax.set_ylim(0, 1.05)
ax.set_title("smooth_targets(y=2, K=5, eps=0.1)")
fig.tight_layout()
