"""
Draft decoding: a JPEG decoded at the size that is needed
=========================================================

A JPEG can be decoded straight to 1/2, 1/4 or 1/8 of its stored size (libjpeg's DCT scaling,
Pillow's ``Image.draft``). :class:`fastai_tricks.DraftImage` takes the largest reduction that still
covers what the first item transform needs (:func:`fastai_tricks.draft_reduction`), so the
``Resize`` after it only ever shrinks.

The top row is a real photo that ships with scikit-learn (640x427), decoded for a ``Resize`` of
each width: the full decode, then the draft decodes, with their decoded size and decode time (the fastest of 20). The
bottom row resizes each to the target and shows the absolute difference from the full decode
resized the same way (scaled x10 to be visible), with its mean absolute error out of 255.
"""

# %%
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import sklearn.datasets
from PIL import Image

from fastai_tricks.draft import decoded_size, draft_reduction, open_image

photo = Path(sklearn.datasets.__file__).parent / "images" / "china.jpg"
stored = Image.open(photo).size


def decode_ms(need, repeats=20):
    """Fastest of ``repeats`` decodes for ``need`` (None: full size), in milliseconds: the least disturbed one."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        open_image(photo, need=None if need is None else (lambda size: need))
        times.append(1000 * (time.perf_counter() - start))
    return min(times)


targets = [None, (300, 200), (150, 100), (75, 50)]
full = open_image(photo)
fig, axes = plt.subplots(2, len(targets), figsize=(3.2 * len(targets), 6.2))
for col, need in enumerate(targets):
    img = open_image(photo, need=None if need is None else (lambda size, n=need: n))
    r = 1 if need is None else draft_reduction(stored, need)
    assert img.size == decoded_size(stored, r)
    title = "full decode" if need is None else f"need {need[0]}x{need[1]}: 1/{r}"
    axes[0, col].imshow(img)
    axes[0, col].set_title(f"{title}\n{img.size[0]}x{img.size[1]}, {decode_ms(need):.1f} ms", fontsize=9)
    target = need or (300, 200)
    a = np.asarray(full.resize(target, Image.BILINEAR), dtype=np.float64)
    b = np.asarray(img.resize(target, Image.BILINEAR), dtype=np.float64)
    diff = np.abs(a - b)
    axes[1, col].imshow(np.clip(diff * 10, 0, 255).astype(np.uint8))
    axes[1, col].set_title(f"|difference| x10 at {target[0]}x{target[1]}\nMAE {diff.mean():.2f} / 255", fontsize=9)
for ax in axes.flat:
    ax.axis("off")
fig.suptitle(f"scikit-learn's china.jpg ({stored[0]}x{stored[1]}): draft decoding", fontsize=11)
fig.tight_layout()
plt.show()
