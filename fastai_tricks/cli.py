"""The ``fastai-tricks`` command line: the Imagenette recipe, its ablation, and the offline demo.

``fastai-tricks train`` runs the recipe on Imagenette, on any ImageNet-style
folder (``--data``), or on generated offline data (``--demo``).
``fastai-tricks ablation`` runs the chapter's sequence of tricks one at a time.
``fastai-tricks demo`` is ``train --demo``: it needs no network and takes a few
minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .data import DataUnavailableError

__all__ = ["build_parser", "main"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def parse_test_size(text: str) -> str | int | float:
    """Parse ``--test-size``: 'auto' or 'off', an int as pixels ('36'), any other number as a factor ('1.15').

    Raises:
        ValueError: Anything else, or a size <= 0 or not finite; the one-line message names ``--test-size``.
    """
    from .recipe import check_test_size

    value: str | int | float = text.strip()
    if value not in ("auto", "off"):
        try:
            value = int(value)
        except ValueError:
            try:
                value = float(value)
            except ValueError:
                value = text
    try:
        return check_test_size(value)
    except (ValueError, TypeError) as err:
        raise ValueError(
            "--test-size must be auto, off, pixels (an integer > 0, e.g. 36) or a factor of --size "
            f"(a number with a point > 0, e.g. 1.15), got {text!r}"
        ) from err


def _add_recipe_options(p: argparse.ArgumentParser, *, demo_flag: bool = True) -> None:
    from .recipe import IMAGENETTE_CHOICES, MIX_CHOICES, NORMALIZE_CHOICES, TTA_CHOICES

    data = p.add_argument_group("data")
    source = data.add_mutually_exclusive_group()
    source.add_argument("--data", type=Path, help="an ImageNet-style folder: <class>/*.jpg, or train/ and val/")
    source.add_argument("--imagenette", choices=IMAGENETTE_CHOICES, help="download Imagenette (default 160)")
    if demo_flag:
        source.add_argument("--demo", action="store_true", help="generated offline data and a small, fast model")
        source.add_argument(
            "--digits",
            action="store_true",
            help="scikit-learn's real handwritten digits (1,797 scans, offline) with a small model; implies --no-flip",
        )
    data.add_argument("--valid", help="validation folder name (default: val or valid if present, else a random split)")
    data.add_argument("--valid-pct", type=float, help="held-out fraction for a random split (default 0.2)")
    data.add_argument("--workers", type=int, help="DataLoader worker processes (default: fastai's)")
    train = p.add_argument_group("training")
    train.add_argument("--arch", help="xresnet18/34/50/... or a torchvision resnet name (default xresnet50)")
    train.add_argument("--size", type=_positive_int, help="final image size in px (default 128)")
    train.add_argument("--epochs", type=_positive_int, help="epochs of fit_one_cycle (default 5)")
    train.add_argument("--bs", type=_positive_int, help="batch size (default 64)")
    train.add_argument("--lr", type=float, help="peak learning rate (default 8e-3)")
    train.add_argument("--seed", type=int, help="random seed (default 0)")
    train.add_argument("--fp16", action="store_true", default=None, help="mixed precision (CUDA only)")
    train.add_argument("--channels-last", action="store_true", default=None, help="channels_last memory format")
    tricks = p.add_argument_group("tricks")
    tricks.add_argument("--normalize", choices=NORMALIZE_CHOICES, help="normalization statistics (default dataset)")
    tricks.add_argument(
        "--progressive",
        action=argparse.BooleanOptionalAction,
        help="progressive resizing (default: on for budgets where it measured no loss, see the docs)",
    )
    tricks.add_argument("--initial-size", type=float, help="initial size: a fraction of --size or pixels (default 0.5)")
    tricks.add_argument("--resize-start", type=float, help="fraction of training where growth starts (default 0.25)")
    tricks.add_argument("--resize-finish", type=float, help="fraction where it reaches --size (default 0.5)")
    tricks.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        help="random horizontal flips (default: on for --imagenette and --demo, off for --data and --digits); "
        "pass --flip for photos, never for digits, text, road signs or anything whose meaning changes when mirrored",
    )
    tricks.add_argument(
        "--draft",
        action=argparse.BooleanOptionalAction,
        help="decode JPEGs at the size the pipeline needs, shrinking with progressive resizing (default on)",
    )
    tricks.add_argument("--mix", choices=MIX_CHOICES, help="mixing callback (default none)")
    tricks.add_argument("--alpha", type=float, help="alpha of the mixing callback")
    tricks.add_argument(
        "--label-smoothing", type=float, help="label smoothing epsilon, e.g. 0.1 for long runs (default 0: none)"
    )
    tricks.add_argument("--tta", choices=TTA_CHOICES, help="test-time augmentation (default four-corner)")
    tricks.add_argument(
        "--test-size",
        metavar="auto|PX|FACTOR|off",
        help="also evaluate at another size (FixRes): auto, pixels (36) or a factor of --size (1.15); "
        "results.json keeps the accuracy at --size beside it. Default off: it lost accuracy on real digits",
    )
    tricks.add_argument(
        "--recalibrate-bn",
        type=_non_negative_int,
        metavar="N",
        help="recompute BatchNorm statistics from N training batches at the test size (default 0; needs --test-size)",
    )
    p.add_argument("--out", type=Path, help="output folder (default runs/<command>)")


# Options that map one-to-one onto RecipeConfig fields; an option left unset keeps the config's default.
_FIELDS = (
    "data", "imagenette", "valid", "valid_pct", "workers", "arch", "size", "epochs", "bs", "lr", "seed", "fp16",
    "channels_last", "normalize", "progressive", "flip", "draft", "initial_size", "resize_start", "resize_finish",
    "mix", "alpha", "label_smoothing", "tta", "recalibrate_bn", "out",
)  # fmt: skip


def config_from_args(args: argparse.Namespace, default_out: str) -> Any:
    """Build a :class:`~fastai_tricks.recipe.RecipeConfig` from parsed options; unset options keep their defaults."""
    from .recipe import RecipeConfig, demo_config, digits_config

    given = {name: getattr(args, name) for name in _FIELDS if getattr(args, name, None) is not None}
    if getattr(args, "test_size", None) is not None:
        given["test_size"] = parse_test_size(args.test_size)
    given.setdefault("out", Path(default_out))
    if getattr(args, "demo", False):
        return demo_config(**given)
    if getattr(args, "digits", False):
        return digits_config(**given)
    return RecipeConfig(**given)


def _summary(results: dict[str, Any]) -> str:
    lines = ["tricks: " + ", ".join(f"{k} {v}" for k, v in results["tricks"].items())]
    lines.append(f"accuracy: {results['accuracy']:.4f}")
    if results.get("accuracy_tta") is not None:
        lines.append(f"accuracy with {results['tta']} TTA: {results['accuracy_tta']:.4f}")
    if results.get("accuracy_test_size") is not None:
        size = results["tricks"].get("test size", "")
        lines.append(f"accuracy at test size {size}: {results['accuracy_test_size']:.4f}")
    times = ", ".join(f"{k} {v:.1f} s" for k, v in results["times"].items())
    lines.append(f"time: {times}")
    return "\n".join(lines)


def _train(cfg: Any, args: argparse.Namespace) -> int:
    from .recipe import run_recipe

    results = run_recipe(cfg)
    print(_summary(results))
    # The model's own accuracy comes first: a TTA gain must never hide what training did.
    tta = "" if results["accuracy_tta"] is None else f" (with {results['tta']} TTA: {results['accuracy_tta']:.4f})"
    print(f"final accuracy: {results['accuracy']:.4f}{tta}")
    files = ["metrics.csv", "results.json", "curves.png", "schedule.png", "export.pkl"]
    print(f"files written to {cfg.out}: {', '.join(f for f in files if (cfg.out / f).exists())}")
    return 0


def _ablation(cfg: Any, args: argparse.Namespace) -> int:
    from .recipe import run_ablation

    run_ablation(cfg, seeds=args.seeds, one_at_a_time=args.one_at_a_time)
    print((cfg.out / "ablation.md").read_text())
    print(f"files written to {cfg.out}: ablation.md, ablation.csv, ablation.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the ``fastai-tricks`` argument parser."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="fastai-tricks", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run the Imagenette recipe")
    _add_recipe_options(train)
    train.set_defaults(func=_train)
    ablation = sub.add_parser("ablation", help="run the chapter's tricks one at a time with the same budget")
    _add_recipe_options(ablation)
    ablation.add_argument("--seeds", type=_positive_int, default=1, help="seeds per row: mean ± std (default 1)")
    ablation.add_argument(
        "--one-at-a-time",
        action="store_true",
        help="add each trick alone to the baseline instead of the chapter's cumulative order",
    )
    ablation.set_defaults(func=_ablation)
    demo = sub.add_parser("demo", help="train --demo: generated data, small model, offline, a few minutes on CPU")
    _add_recipe_options(demo, demo_flag=False)
    demo.set_defaults(func=_train, demo=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit code.

    Bad options, a missing or malformed data folder, and a failed download exit with code 2
    and a one-line message, not a traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args, f"runs/{'demo' if getattr(args, 'demo', False) else args.command}")
    except (ValueError, TypeError) as err:
        parser.exit(2, f"fastai-tricks: error: {err}\n")
    try:
        return args.func(cfg, args)
    except DataUnavailableError as err:
        parser.exit(2, f"fastai-tricks: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
