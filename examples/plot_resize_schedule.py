"""
Progressive resizing schedule
=============================

:class:`fastai_tricks.ProgressiveResize` trains at half size for the first half of a fit, grows the
image in 4 px steps between 50% and 75% of training, and finishes at full size. The schedule is a
pure function, :func:`fastai_tricks.resize_schedule`, so it can be drawn before training.
"""

# %%
# The default schedule for a 224 px model, 8 epochs of 100 iterations, in both modes.
import tempfile

import matplotlib.pyplot as plt
from fastai.vision.all import CrossEntropyLossFlat, ImageDataLoaders, Learner, Resize, aug_transforms
from torch import nn

from fastai_tricks import make_fake_imagenette
from fastai_tricks.resizing import ProgressiveResize, resize_schedule

fig, ax = plt.subplots(figsize=(8, 3.5))
for schedule in ("batch", "epoch"):
    sizes = resize_schedule(8, 100, 224, schedule=schedule)
    ax.plot([h for h, _ in sizes], label=f"schedule='{schedule}'")
ax.set_xlabel("training iteration")
ax.set_ylabel("image size (px)")
ax.set_title("ProgressiveResize defaults: 0.5 of the size, grow between 50% and 75%")
ax.legend()
fig.tight_layout()

# %%
# A real (tiny) one-cycle fit on generated data: the callback records the size it used at every
# iteration, and ``plot_schedule`` draws it next to the learning rate.
path = make_fake_imagenette(tempfile.mkdtemp(), n_train=4, n_valid=2, size=48)
dls = ImageDataLoaders.from_folder(
    path, valid="val", item_tfms=Resize(40), batch_tfms=aug_transforms(size=32), bs=8, num_workers=0
)
model = nn.Sequential(
    nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)
)
learn = Learner(dls, model, loss_func=CrossEntropyLossFlat())
# min_epochs=0: resize this 4-epoch fit, which the budget guard (8 epochs) would keep at full size.
resize = ProgressiveResize(increase_by=2, min_epochs=0)
with learn.no_bar(), learn.no_logging():
    learn.fit_one_cycle(4, 1e-2, cbs=resize)
resize.plot_schedule()
plt.show()
