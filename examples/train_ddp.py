import argparse

from accelerate import PartialState
from fastai.distributed import rank0_first
from fastai.vision.all import (
    ImageDataLoaders,
    Learner,
    Path,
    RandomResizedCrop,
    URLs,
    accuracy,
    aug_transforms,
    rank_distrib,
    untar_data,
    xresnet50,
)

import fastai_tricks.tta  # noqa: F401 - adds Learner.four_corner_tta
from fastai_tricks.distributed import enable_cpu_ddp
from fastai_tricks.losses import LabelSmoothingCE
from fastai_tricks.mixing import MixUp
from fastai_tricks.normalization import ensure_normalized
from fastai_tricks.resizing import ProgressiveResize

p = argparse.ArgumentParser()
p.add_argument("--cpu", action="store_true", help="train on CPU processes with gloo")
p.add_argument("--data", type=Path, help="an ImageNet-style folder (default: Imagenette 160)")
p.add_argument("--epochs", type=int, default=5)
p.add_argument("--size", type=int, default=128)
p.add_argument("--bs", type=int, default=64)
args = p.parse_args()

if args.cpu:
    enable_cpu_ddp()  # also leaves the gloo process group cleanly when the script ends
PartialState(cpu=args.cpu)  # join the process group now, so dataset_stats splits its work across ranks
path = args.data or rank0_first(untar_data, URLs.IMAGENETTE_160)  # download once, on rank 0
dls = ImageDataLoaders.from_folder(
    path,
    valid="val",
    bs=args.bs,
    # On CPU the ranks are the parallelism; a loader worker forked beside gloo's threads can deadlock.
    num_workers=0 if args.cpu else None,
    seed=0,
    item_tfms=RandomResizedCrop(int(args.size * 1.25), min_scale=0.35),
    batch_tfms=aug_transforms(size=args.size),
)
ensure_normalized(dls, "dataset")  # the same global statistics on every rank
learn = Learner(dls, xresnet50(n_out=dls.c), loss_func=LabelSmoothingCE(), metrics=accuracy)
with learn.distrib_ctx(cpu=args.cpu, sync_bn=not args.cpu):
    learn.fit_one_cycle(args.epochs, 8e-3, cbs=[ProgressiveResize(), MixUp(0.4)])
    preds, targs = learn.four_corner_tta()  # gathered from every rank
if rank_distrib() == 0:
    print(f"four-corner TTA accuracy: {accuracy(preds, targs).item():.4f}")
    learn.export("model.pkl")
