"""
Four-corner TTA for segmentation: paste each view back
======================================================

For a segmentation model every view's output is a mask of its own crop.
:class:`fastai_tricks.FourCornerTTA` mirrors each output back, resizes it to
its crop's size and pastes it at the crop's place; every pixel is then the mean
over the views that contain it (:func:`fastai_tricks.paste_views`). This
example trains a tiny ``unet_learner`` on generated shapes
(:func:`fastai_tricks.make_fake_segmentation`) for a few seconds and shows the
five crops of one validation image, each crop's predicted mask, and the
stitched result with its coverage map (:func:`fastai_tricks.view_coverage`).
"""

# %%
# Generated data and a tiny unet
# ------------------------------
# Shapes on noisy backgrounds, with masks: 0 background, 1 disc, 2 square,
# 3 triangle. The encoder is a three-stage CNN, so nothing is downloaded.

import tempfile

import matplotlib.pyplot as plt
import torch
from fastai.vision.all import (
    ConvLayer,
    DiceMulti,
    SegmentationDataLoaders,
    foreground_acc,
    get_image_files,
    unet_learner,
)
from matplotlib.colors import ListedColormap
from matplotlib.patches import Rectangle
from torch import nn

from fastai_tricks import FourCornerTTA, expand_views, make_fake_segmentation, paste_views, view_boxes, view_coverage

torch.manual_seed(0)
path = make_fake_segmentation(tempfile.mkdtemp(), n_train=24, n_valid=8, size=48, seed=0)
codes = (path / "codes.txt").read_text().split()
dls = SegmentationDataLoaders.from_label_func(
    path,
    get_image_files(path / "images"),
    lambda f: path / "labels" / f"{f.stem}_P{f.suffix}",
    codes=codes,
    valid_pct=0.25,
    bs=8,
    num_workers=0,
    seed=0,
)


def tiny_encoder(pretrained=False):
    return nn.Sequential(
        ConvLayer(3, 16, stride=2),
        ConvLayer(16, 32, stride=2),
        ConvLayer(32, 64, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 2),
    )


learn = unet_learner(dls, tiny_encoder, pretrained=False, n_out=len(codes), metrics=[DiceMulti(), foreground_acc])
with learn.no_bar(), learn.no_logging():
    learn.fit_one_cycle(5, 1e-2)
    plain = learn.validate()
    tta = learn.validate(cbs=FourCornerTTA())
print(f"plain:     loss {plain[0]:.3f}, Dice {plain[1]:.3f}, foreground accuracy {plain[2]:.3f}")
print(f"five-crop: loss {tta[0]:.3f}, Dice {tta[1]:.3f}, foreground accuracy {tta[2]:.3f}")

# %%
# Five crops, five masks, one stitched prediction
# -----------------------------------------------
# Top row: the image with the five windows, and the five views the model sees
# (each crop resized back to 48 px). Middle row: the true mask and each view's
# predicted mask. Bottom row: the plain prediction, the five views pasted back
# and merged, the coverage map (how many views contain each pixel), and the
# pixels where the two predictions differ. The model trained for a few seconds
# only, so its masks are rough (it confuses classes); the point here is the
# geometry: where each view's mask goes back, and how many views each pixel gets.

xb, yb = dls.valid.one_batch()
x, y = xb[:1], yb[0]
crop = 0.875
boxes = view_boxes(*x.shape[-2:], crop)
views = expand_views(x, crop)
model = learn.model.eval()
with torch.no_grad():
    outs = [model(v) for v in views]
    plain_pred = model(x)[0].argmax(0)
stitched = paste_views(outs, tuple(x.shape[-2:]), crop)[0].argmax(0)
coverage = view_coverage(*x.shape[-2:], crop)


def show_img(t):
    # unet_learner adds no Normalize without pretrained weights: the batch is in [0, 1].
    return t.cpu().clamp(0, 1).permute(1, 2, 0).numpy()


cmap = ListedColormap(["#222222", "tab:orange", "tab:blue", "tab:green"])
colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "white"]
fig, axes = plt.subplots(3, 6, figsize=(14, 7.4))
axes[0, 0].imshow(show_img(x[0]))
axes[0, 0].set_title("image, five windows", fontsize=9)
for b, colour in zip(boxes, colours, strict=True):
    axes[0, 0].add_patch(Rectangle((b.left - 0.5, b.top - 0.5), b.width, b.height, fill=False, edgecolor=colour, lw=2))
axes[1, 0].imshow(y.cpu(), cmap=cmap, vmin=0, vmax=3, interpolation="nearest")
axes[1, 0].set_title("true mask", fontsize=9)
for i, (b, v, o) in enumerate(zip(boxes, views, outs, strict=True)):
    axes[0, i + 1].imshow(show_img(v[0]))
    axes[0, i + 1].set_title(f"{b.name} view", fontsize=9, color="black" if i == 4 else colours[i])
    axes[1, i + 1].imshow(o[0].argmax(0).cpu(), cmap=cmap, vmin=0, vmax=3, interpolation="nearest")
    axes[1, i + 1].set_title(f"{b.name} mask", fontsize=9)
axes[2, 0].imshow(plain_pred.cpu(), cmap=cmap, vmin=0, vmax=3, interpolation="nearest")
axes[2, 0].set_title("plain prediction", fontsize=9)
axes[2, 1].imshow(stitched.cpu(), cmap=cmap, vmin=0, vmax=3, interpolation="nearest")
axes[2, 1].set_title("five views pasted back", fontsize=9)
im = axes[2, 2].imshow(coverage, cmap="viridis", vmin=0, vmax=5, interpolation="nearest")
axes[2, 2].set_title("coverage (views per pixel)", fontsize=9)
fig.colorbar(im, ax=axes[2, 2], fraction=0.046, ticks=range(6))
axes[2, 3].imshow((stitched != plain_pred).cpu(), cmap="gray", interpolation="nearest")
axes[2, 3].set_title(f"differs from plain: {int((stitched != plain_pred).sum())} px", fontsize=9)
for ax in axes.flat:
    ax.axis("off")
fig.tight_layout()
plt.show()
