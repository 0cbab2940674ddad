"""Benchmark the recipe against plain fastai, side by side, over several seeds, on real and generated data.

For each data set it trains, with the same split, arch, epochs, batch size, learning rate and seed:

1. **plain fastai**: ``ImageDataLoaders.from_folder`` with a ``Resize``, a from-scratch model and
   ``fit_one_cycle``, what a user writes without this package;
2. **recipe, fixed size**: the recipe's defaults with progressive resizing off;
3. **recipe, progressive**: the recipe's defaults with progressive resizing forced on;
4. **recipe defaults**: exactly what ``fastai-tricks train`` does for this budget (not trained
   again when it equals one of the rows above).

It prints the mean ± sample std of the validation accuracy without TTA (and with four-corner TTA,
reported apart so that TTA never hides a training loss) and the mean fit time, as Markdown, with
the hardware line. The data are scikit-learn's real handwritten digits (1,797 scans that ship with
scikit-learn, 25% held out per class, at 32 px) and the generated demo data (600 training and 200
validation images at 64 px).

Targets (issue 11): on the digits, recipe defaults >= plain fastai - 0.3 point; default
progressive resizing >= fixed size - 0.3 point at <= 0.80x its fit time, or guarded off.

``--curve 4 8 16`` measures instead how progressive resizing's accuracy gap to a fixed-size fit
changes with the budget, for several schedules, on the digits (label smoothing off, so that only
the image size differs): the measurement behind ``ProgressiveResize``'s ``min_epochs`` guard.

Usage::

    python benchmarks/bench_recipe.py                  # digits and demo, 3 seeds, 4 epochs
    python benchmarks/bench_recipe.py --epochs 8       # a longer budget
    python benchmarks/bench_recipe.py --curve 4 8 16   # progressive resizing against the budget
    python benchmarks/bench_recipe.py --quick          # 1 seed, 1 epoch, digits only: a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import platform
import statistics
import tempfile
import warnings
from pathlib import Path

import torch

from fastai_tricks.recipe import (
    RecipeConfig,
    demo_config,
    digits_config,
    evaluate,
    find_data,
    train,
    train_plain_fastai,
)


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} torch threads, {gpu}, torch {torch.__version__}"


def arms(base: RecipeConfig) -> dict[str, RecipeConfig | None]:
    """The compared runs: None is plain fastai; the recipe rows differ from ``base`` only as named."""
    return {
        "plain fastai": None,
        "recipe, fixed size": dataclasses.replace(base, progressive=False),
        "recipe, progressive": dataclasses.replace(base, progressive=True),
        "recipe defaults": base,
    }


def run_arm(cfg: RecipeConfig, path: Path, plain: bool) -> dict[str, float]:
    sizes = None
    # fastai's progress bars and epoch tables would bury the Markdown this script prints.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if plain:
            learn, fit_s = train_plain_fastai(cfg, path)
        else:
            learn, info = train(cfg, path)
            fit_s, sizes = info["times"]["train"], info["sizes"]
        with learn.no_bar(), learn.no_logging():
            acc, _ = evaluate(learn, "none")
            acc_tta, _ = evaluate(learn, "four-corner")
    # Whether the fit really ran at more than one size (the budget guard may have kept it fixed).
    resized = bool(sizes) and len({tuple(s) for s in sizes}) > 1
    return {"accuracy": acc, "accuracy_tta": acc_tta, "fit_s": fit_s, "resized": resized}


#: The progressive-resizing schedules of the budget curve, as recipe options.
SCHEDULES: dict[str, dict[str, float]] = {
    "default: initial 0.5, start 0.25, finish 0.5": {},
    "old default: initial 0.5, start 0.5, finish 0.75": {"resize_start": 0.5, "resize_finish": 0.75},
    "initial 0.75, start 0.5, finish 0.75": {"initial_size": 0.75, "resize_start": 0.5, "resize_finish": 0.75},
}


def budget_curve(epochs_list: list[int], seeds: int, tmp: Path, json_path: Path | None) -> None:
    """Print progressive resizing's accuracy and time against a fixed-size fit, per budget and schedule."""
    print(f"\n### Progressive resizing against the budget: digits, seeds 0-{seeds - 1}\n")
    print(f"Hardware: {hardware()}.\n")
    print("| epochs | run | accuracy | vs fixed size | fit time (s) | time vs fixed |")
    print("|---:|---|---:|---:|---:|---:|")
    for epochs in epochs_list:
        base = digits_config(epochs=epochs, label_smoothing=0.0, tta="none", out=tmp / "curve")
        path = find_data(base)
        runs: dict[str, list[dict[str, float]]] = {}
        for seed in range(seeds):
            for name, options in {"fixed size": None, **SCHEDULES}.items():
                cfg = dataclasses.replace(
                    base, seed=seed, progressive=options is not None, **(options or {}), out=tmp / "curve" / "run"
                )
                run = run_arm(cfg, path, plain=False)
                runs.setdefault(name, []).append(run)
                if json_path:
                    with open(json_path, "a") as f:
                        f.write(json.dumps({"curve": name, "seed": seed, "epochs": epochs, **run}) + "\n")
        fixed = runs["fixed size"]
        fixed_s = statistics.fmean(r["fit_s"] for r in fixed)
        for name, rs in runs.items():
            acc = mean_std([r["accuracy"] for r in rs])
            gap = statistics.fmean(100 * (r["accuracy"] - f["accuracy"]) for r, f in zip(rs, fixed, strict=True))
            fit_s = statistics.fmean(r["fit_s"] for r in rs)
            vs = "" if name == "fixed size" else f"{gap:+.1f}"
            print(f"| {epochs} | {name} | {acc[0]:.4f} ± {acc[1]:.4f} | {vs} | {fit_s:.1f} | {fit_s / fixed_s:.2f}x |")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch, digits only: a smoke run")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per row (default 3, quick 1)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every fit (default 4, quick 1)")
    parser.add_argument("--data", nargs="+", choices=("digits", "demo"), default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", type=Path, default=None, help="also write every run as JSON lines here")
    parser.add_argument("--curve", type=int, nargs="+", default=None, help="budget curve at these epochs instead")
    args = parser.parse_args()
    seeds = args.seeds or (1 if args.quick else 3)
    epochs = args.epochs or (1 if args.quick else 4)
    datasets = args.data or (["digits"] if args.quick else ["digits", "demo"])
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    tmp = Path(tempfile.mkdtemp())
    if args.curve:
        budget_curve(args.curve, seeds, tmp, args.json)
        return
    presets = {"digits": digits_config, "demo": demo_config}

    print(f"\n### The recipe against plain fastai: {epochs} epochs, seeds 0-{seeds - 1}\n")
    print(f"Hardware: {hardware()}.\n")
    print("| data | run | accuracy | with four-corner TTA | vs plain fastai | fit time (s) | time vs fixed |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in datasets:
        base = presets[name](epochs=epochs, out=tmp / name, tta="none")
        path = find_data(base)
        results: dict[str, list[dict[str, float]]] = {}
        configs = arms(base)
        for seed in range(seeds):
            done: dict[str, dict[str, float]] = {}
            for arm, cfg in configs.items():
                seeded = dataclasses.replace(cfg or base, seed=seed, out=tmp / name / arm.replace(" ", "_"))
                twin = next((a for a, c in configs.items() if c is not None and a in done and same(c, cfg)), None)
                run = done[twin] if twin else run_arm(seeded, path, plain=cfg is None)
                done[arm] = run
                results.setdefault(arm, []).append(run)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps({"data": name, "arm": arm, "seed": seed, "epochs": epochs, **run}) + "\n")
        plain = [r["accuracy"] for r in results["plain fastai"]]
        fixed_s = statistics.fmean(r["fit_s"] for r in results["recipe, fixed size"])
        for arm, runs in results.items():
            acc = mean_std([r["accuracy"] for r in runs])
            tta = mean_std([r["accuracy_tta"] for r in runs])
            gap = statistics.fmean(100 * (r["accuracy"] - p) for r, p in zip(runs, plain, strict=True))
            fit_s = statistics.fmean(r["fit_s"] for r in runs)
            vs = "" if arm == "plain fastai" else f"{gap:+.1f}"
            ratio = "" if arm == "plain fastai" else f"{fit_s / fixed_s:.2f}x"
            print(
                f"| {name} | {arm} | {acc[0]:.4f} ± {acc[1]:.4f} | {tta[0]:.4f} ± {tta[1]:.4f} | {vs} "
                f"| {fit_s:.1f} | {ratio} |"
            )


def same(a: RecipeConfig | None, b: RecipeConfig | None) -> bool:
    """Whether two recipe configurations train the same model (their outputs folder aside)."""
    if a is None or b is None:
        return a is b
    return a.effective(out=Path(".")) == b.effective(out=Path("."))


if __name__ == "__main__":
    main()
