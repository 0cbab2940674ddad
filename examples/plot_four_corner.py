"""
Four-corner crops for test-time augmentation
============================================

:class:`fastai_tricks.FourCornerTTA` shows the model five views of every
validation image: a square crop in each corner and one in the center, each
resized back to the input size. Here are those views on a real photo that ships
with matplotlib (Grace Hopper's portrait), computed by
:func:`fastai_tricks.four_corner_crops` on a batch tensor, exactly as the
callback does on a validation batch.
"""

# %%
# Load the photo as a ``(B, C, H, W)`` batch of one image
# --------------------------------------------------------
# The photo is 600 x 512 (height x width): not square, so the crops are squares
# cut from the short side.

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib import cbook
from matplotlib.patches import Rectangle
from PIL import Image

from fastai_tricks.tta import expand_views, four_corner_crops, view_names

with cbook.get_sample_data("grace_hopper.jpg") as f:
    img = np.array(Image.open(f).convert("RGB"))
x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
print("batch shape:", tuple(x.shape))

# %%
# The five crops at 87.5 % of the short side
# ------------------------------------------
# ``four_corner_crops`` returns ``(5, B, C, s, s)`` in torchvision's order:
# top-left, top-right, bottom-left, bottom-right, center. The rectangles on the
# left show where each crop comes from.

crop = 0.875
crops = four_corner_crops(x, crop)
side = crops.shape[-1]
h, w = x.shape[-2:]
origins = [(0, 0), (w - side, 0), (0, h - side), (w - side, h - side), (round((w - side) / 2), round((h - side) / 2))]
colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "white"]
names = view_names()

fig, axes = plt.subplots(1, 6, figsize=(15, 3.2))
axes[0].imshow(img)
axes[0].set_title(f"original {h}x{w}")
for (ox, oy), colour in zip(origins, colours, strict=True):
    axes[0].add_patch(Rectangle((ox, oy), side, side, fill=False, edgecolor=colour, linewidth=2))
for ax, c, name, colour in zip(axes[1:], crops[:, 0], names, colours, strict=True):
    ax.imshow(c.permute(1, 2, 0).numpy())
    ax.set_title(f"{name} {side}x{side}", color="black" if colour == "white" else colour)
for ax in axes:
    ax.axis("off")
fig.tight_layout()

# %%
# Ten-crop: the same views and their mirror images
# ------------------------------------------------
# ``FourCornerTTA(flip=True)`` adds the horizontal flip of each view. With
# ``resize=True`` (the default) every crop is resized back to the short side,
# so the model sees its training resolution and the objects slightly enlarged.

views = expand_views(x, crop, flip=True)
fig, axes = plt.subplots(2, 5, figsize=(13, 6.4))
for ax, v, name in zip(axes.flat, views, view_names(flip=True), strict=True):
    ax.imshow(v[0].permute(1, 2, 0).clamp(0, 1).numpy())
    ax.set_title(f"{name}\n{v.shape[-2]}x{v.shape[-1]}", fontsize=9)
    ax.axis("off")
fig.tight_layout()
plt.show()
