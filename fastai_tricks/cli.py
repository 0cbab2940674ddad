"""The ``fastai-tricks`` command line.

``fastai-tricks demo`` draws the offline demo data set and trains a small
xresnet on it for a couple of epochs on the CPU, printing progress and the
final accuracy.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _demo(args: argparse.Namespace) -> int:
    from fastai.vision.all import (
        CrossEntropyLossFlat,
        ImageDataLoaders,
        Learner,
        Resize,
        accuracy,
        set_seed,
        xresnet18,
    )

    from .data import make_fake_imagenette

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fastai_tricks_demo_"))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    path = make_fake_imagenette(out / "data", n_train=args.n_train, n_valid=args.n_valid, size=72, seed=args.seed)
    print(f"demo data: {path} ({args.n_train} train + {args.n_valid} valid images per class, 10 classes)")
    set_seed(args.seed, reproducible=True)
    dls = ImageDataLoaders.from_folder(
        path, valid="val", item_tfms=Resize(args.size), bs=args.bs, num_workers=0, seed=args.seed
    )
    learn = Learner(
        dls,
        xresnet18(n_out=dls.c),
        loss_func=CrossEntropyLossFlat(),
        metrics=accuracy,
        path=out,
    )
    learn.fit_one_cycle(args.epochs, args.lr)
    loss, acc = learn.validate()
    print(f"final accuracy: {acc:.4f} (chance is 0.1000) after {args.epochs} epochs in {time.perf_counter() - start:.0f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the ``fastai-tricks`` argument parser."""
    parser = argparse.ArgumentParser(prog="fastai-tricks", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small xresnet on generated Imagenette-like data (offline, CPU)")
    demo.add_argument("--out", help="output folder (default: a new temp folder)")
    demo.add_argument("--epochs", type=_positive_int, default=2)
    demo.add_argument("--size", type=_positive_int, default=64)
    demo.add_argument("--bs", type=_positive_int, default=32)
    demo.add_argument("--lr", type=float, default=1e-2)
    demo.add_argument("--n-train", type=_positive_int, default=60, help="training images per class")
    demo.add_argument("--n-valid", type=_positive_int, default=20, help="validation images per class")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit code."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
