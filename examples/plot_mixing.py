"""
Mixing a batch: MixUp, CutMix, ManifoldMix, ResizeMix, FMix and RandomMix
=========================================================================

Each figure below is one training batch of generated Imagenette-like images,
mixed the way a callback of :mod:`fastai_tricks.mixing` would mix it during
training, drawn with :func:`fastai_tricks.show_mix_batch`. Every title reads
``own label λ / partner label 1-λ``: λ is the share of the loss (or of the
target) that goes to the image's own label.
"""

# %%
# A small generated data set
# --------------------------
# ``make_fake_imagenette`` draws ten shape classes on noisy backgrounds, laid
# out exactly like Imagenette, so this example runs offline in seconds.
import tempfile

import matplotlib.pyplot as plt
import torch
from fastai.vision.all import ImageDataLoaders, Resize

from fastai_tricks.data import make_fake_imagenette
from fastai_tricks.mixing import CutMix, FMix, ManifoldMix, MixUp, RandomMix, ResizeMix, show_mix_batch

torch.manual_seed(0)
path = make_fake_imagenette(tempfile.mkdtemp(), n_train=2, n_valid=1, size=96, seed=0)
dls = ImageDataLoaders.from_folder(path, valid="val", item_tfms=Resize(96), bs=9, num_workers=0, seed=0)

# %%
# MixUp
# -----
# Every image is blended with a partner, with its own λ drawn from
# Beta(0.4, 0.4): most images are close to one of the two.
show_mix_batch(dls, MixUp(alpha=0.4))
plt.show()

# %%
# CutMix
# ------
# A box of the partner is pasted; λ is the exact fraction of the image that
# was kept, after the box is clipped to the image. ``per_sample=True`` draws one
# box per image instead of one for the batch.
show_mix_batch(dls, CutMix(alpha=1.0, per_sample=True))
plt.show()

# %%
# ManifoldMix
# -----------
# ManifoldMix blends hidden activations at a residual stage drawn per batch,
# which cannot be drawn as an image; the picture shows the input-level case
# (the input is one of the candidate layers), with one λ for the batch.
show_mix_batch(dls, ManifoldMix(alpha=2.0))
plt.show()

# %%
# ResizeMix
# ---------
# The whole partner, shrunk to a side ratio drawn in ``scale``, is pasted at one
# place per batch, so the partner's object is always visible.
show_mix_batch(dls, ResizeMix(scale=(0.1, 0.8)))
plt.show()

# %%
# FMix
# ----
# The partner is pasted through a binary mask made by thresholding
# low-frequency Fourier noise: irregular blobs instead of a box.
show_mix_batch(dls, FMix(alpha=1.0, decay_power=3.0, per_sample=True))
plt.show()

# %%
# RandomMix
# ---------
# One of several recipes per batch, here MixUp or CutMix with equal weights
# (timm's ``switch_prob``); the title names the one drawn.
show_mix_batch(dls, RandomMix([MixUp(), CutMix()], probs=[0.5, 0.5]))
plt.show()
