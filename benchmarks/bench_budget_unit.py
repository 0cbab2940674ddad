"""Benchmark: does progressive resizing's budget guard need epochs or optimizer steps (issue 21)?

``ProgressiveResize`` trains at full size below ``min_epochs=8``. The reason its docstring gives,
that a short one-cycle fit reaches full size after the learning rate has decayed "so the model has
too few steps left to adapt", counts optimizer steps, not epochs. This script separates the two:
it trains the recipe's digits model (``digits_config()``: scikit-learn's real handwritten digits
at 32 px, 25 % of each class held out with split seed 0, xresnet18 from scratch, the recipe's
pipeline without label smoothing, ``fit_one_cycle`` at lr 8e-3) on a grid of cells where steps
and epochs come apart:

* the batch size (16, 32, 64) crossed with the number of epochs, so that ``bs 16 x 2 epochs`` has
  the steps of ``bs 64 x 8 epochs``;
* optionally a fraction of the training set (every other scan of each class for 0.5), which at the
  same batch size halves the steps of an epoch.

Each cell trains, for every seed, a fixed-size fit and a progressive one (``ProgressiveResize``
with its default schedule and the guard off, ``min_epochs=0``) with the same seed, and records the
validation accuracy of both. The change of a cell is progressive - fixed, paired per seed.
``--report`` then prints, as Markdown with the hardware line, the table (mean ± sample std per
cell) and the comparison of the two units: how well a threshold on steps and one on epochs
separate the cells where resizing lost from the others, and least-squares fits of the change on
log2 steps, on log2 epochs and on both.

Usage::

    python benchmarks/bench_budget_unit.py --threads 1 --csv runs.csv     # the committed grid, 3 seeds
    python benchmarks/bench_budget_unit.py --cells 16x2 64x8 --csv runs.csv  # some cells, appending to runs.csv
    python benchmarks/bench_budget_unit.py --report runs.csv --threads 1     # the tables from a CSV
    python benchmarks/bench_budget_unit.py --quick                           # 1 seed, 1 tiny cell: a smoke run

The committed results (``benchmarks/results/budget_unit_digits.csv`` and ``.md``) took about 50
minutes on 2 shared CPU cores, with two processes of one torch thread each (split with ``--cells``,
``--seeds`` and ``--runs``). ``--report`` takes the hardware line from the machine it runs on and
the thread count from ``--threads``: pass the training's.

A cell is ``BSxEPOCHS`` or ``BSxEPOCHS@FRACTION`` (``64x16@0.5``: bs 64, 16 epochs, half the
training set). Runs already in ``--csv`` are skipped, so a grid can be split over processes that
append to the same file, and an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import math
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from bench_recipe import hardware

from fastai_tricks.recipe import digits_config, evaluate, find_data, train

FIELDS = ("data", "fraction", "n_train", "bs", "epochs", "steps", "seed", "run", "accuracy", "fit_s", "resized")
RUNS = ("fixed size", "progressive")
#: A cell "lost" when its mean paired change is below this many points (the recipe's 0.3-point tolerance).
LOSS_POINTS = -0.3


@dataclasses.dataclass(frozen=True)
class Cell:
    bs: int
    epochs: int
    fraction: float = 1.0

    @classmethod
    def parse(cls, text: str) -> Cell:
        head, _, frac = text.partition("@")
        bs, _, epochs = head.partition("x")
        return cls(int(bs), int(epochs), float(frac) if frac else 1.0)


def subset(full: Path, fraction: float, root: Path) -> Path:
    """A folder with ``fraction`` of each class of ``full``'s training scans (evenly spaced) and all of its validation."""
    if fraction >= 1.0:
        return full
    out = root / f"digits_{fraction:g}"
    if out.exists():
        return out
    for label_dir in sorted((full / "train").iterdir()):
        files = sorted(label_dir.iterdir())
        keep = files[:: round(1 / fraction)] if (1 / fraction).is_integer() else files[: round(len(files) * fraction)]
        (out / "train" / label_dir.name).mkdir(parents=True)
        for f in keep:
            (out / "train" / label_dir.name / f.name).symlink_to(f.resolve())
    (out / "val").symlink_to((full / "val").resolve())
    return out


def run_cell(cell: Cell, seed: int, run: str, path: Path, tmp: Path) -> dict[str, object]:
    cfg = digits_config(
        bs=cell.bs,
        epochs=cell.epochs,
        label_smoothing=0.0,
        tta="none",
        progressive=run == "progressive",  # the recipe passes min_epochs=0: the guard is off
        seed=seed,
        out=tmp / "run",
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        learn, info = train(cfg, path)
        with learn.no_bar(), learn.no_logging():
            acc, _ = evaluate(learn, "none")
    sizes = info["sizes"] or []
    return {
        "data": "digits",
        "fraction": f"{cell.fraction:g}",
        "n_train": len(learn.dls.train_ds),
        "bs": cell.bs,
        "epochs": cell.epochs,
        "steps": cell.epochs * len(learn.dls.train),
        "seed": seed,
        "run": run,
        "accuracy": f"{acc:.6f}",
        "fit_s": f"{info['times']['train']:.1f}",
        "resized": int(len({tuple(s) for s in sizes}) > 1),
    }


def read(csv_path: Path) -> list[dict[str, str]]:
    if not csv_path.exists():
        return []
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def key(bs: object, epochs: object, fraction: object, seed: object, run: str) -> tuple[str, ...]:
    return (str(bs), str(epochs), f"{float(fraction):g}", str(seed), run)


def train_grid(
    cells: list[Cell], seeds: list[int], csv_path: Path | None, tmp: Path, runs: tuple[str, ...] = RUNS
) -> list[dict[str, object]]:
    full = find_data(digits_config(out=tmp))
    done = (
        {key(r["bs"], r["epochs"], r["fraction"], r["seed"], r["run"]) for r in read(csv_path)} if csv_path else set()
    )
    rows: list[dict[str, object]] = []
    for cell in cells:
        path = subset(full, cell.fraction, tmp)
        for seed in seeds:
            for run in runs:
                if key(cell.bs, cell.epochs, cell.fraction, seed, run) in done:
                    continue
                row = run_cell(cell, seed, run, path, tmp)
                rows.append(row)
                print(", ".join(f"{k}={row[k]}" for k in FIELDS), flush=True)
                if csv_path:
                    new = not csv_path.exists()
                    with open(csv_path, "a", newline="") as f:
                        writer = csv.DictWriter(f, FIELDS)
                        if new:
                            writer.writeheader()
                        writer.writerow(row)
    return rows


# --- the report ------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """One entry per cell: its steps, epochs, accuracies and the per-seed changes in points."""
    acc = {key(r["bs"], r["epochs"], r["fraction"], r["seed"], str(r["run"])): float(r["accuracy"]) for r in rows}
    cells: dict[tuple[str, str, str], dict[str, object]] = {}
    for r in rows:
        c = cells.setdefault(
            (str(r["bs"]), str(r["epochs"]), f"{float(r['fraction']):g}"),
            {
                "bs": int(r["bs"]),
                "epochs": int(r["epochs"]),
                "fraction": float(r["fraction"]),
                "n_train": int(r["n_train"]),
                "steps": int(r["steps"]),
                "samples": int(r["steps"]) * int(r["bs"]),
                "seeds": [],
            },
        )
        fixed = acc.get(key(r["bs"], r["epochs"], r["fraction"], r["seed"], "fixed size"))
        prog = acc.get(key(r["bs"], r["epochs"], r["fraction"], r["seed"], "progressive"))
        if r["run"] == "progressive" and fixed is not None and prog is not None:
            c["seeds"].append((int(r["seed"]), fixed, prog))
    out = []
    for c in cells.values():
        if not c["seeds"]:
            continue
        c["seeds"].sort()
        c["fixed"] = mean_std([f for _, f, _ in c["seeds"]])
        c["progressive"] = mean_std([p for _, _, p in c["seeds"]])
        c["changes"] = [100 * (p - f) for _, f, p in c["seeds"]]
        c["change"] = mean_std(c["changes"])
        out.append(c)
    return sorted(out, key=lambda c: (-c["fraction"], c["bs"], c["epochs"]))


def best_threshold(cells: list[dict[str, object]], unit: str) -> tuple[int, float, int]:
    """The threshold T on ``unit`` for "lost iff unit < T" that classifies most cells right.

    Returns ``(T, fraction right, cells right)``; among equally good thresholds the smallest one
    that puts every losing cell below it, i.e. the first measured value at or above which none lost.
    """
    values = sorted({int(c[unit]) for c in cells})
    candidates = [*values, values[-1] + 1]
    lost = [(int(c[unit]), c["change"][0] < LOSS_POINTS) for c in cells]
    scored = [(sum((v < t) == loss for v, loss in lost), t) for t in candidates]
    right = max(s for s, _ in scored)
    t = min(t for s, t in scored if s == right)
    return t, right / len(lost), right


def least_squares(xs: list[list[float]], ys: list[float]) -> tuple[list[float], float]:
    """Ordinary least squares of ``ys`` on the columns ``xs`` (an intercept added): coefficients and R²."""
    n = len(ys)
    X = torch.tensor([[1.0, *(col[i] for col in xs)] for i in range(n)], dtype=torch.float64)
    y = torch.tensor(ys, dtype=torch.float64)
    beta = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
    resid = y - X @ beta
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    return [float(b) for b in beta], r2


def report(rows: list[dict[str, object]], seeds_note: str) -> str:
    cells = paired(rows)
    lines = [
        f"### Progressive resizing's budget: steps or epochs? Digits, {seeds_note}",
        "",
        f"Hardware: {hardware()}.",
        "",
        "Data: scikit-learn's handwritten digits at 32 px (`make_digits`, split seed 0: 1,347 training and 450",
        "validation scans; a fraction keeps every n-th training scan of each class). Model: `digits_config()`",
        "(xresnet18 from scratch, the recipe's pipeline, no label smoothing, `fit_one_cycle` at lr 8e-3) at the",
        "cell's batch size and epochs. Progressive: `ProgressiveResize(min_epochs=0)`, default schedule (initial",
        "0.5, start 0.25, finish 0.5). Change = progressive − fixed size, paired per seed, in points;",
        "mean ± sample std over the seeds.",
        "",
        "| train scans | bs | epochs | steps | fixed size | progressive | change (points) | per seed |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in sorted(cells, key=lambda c: (c["steps"], c["epochs"])):
        f, p, d = c["fixed"], c["progressive"], c["change"]
        per_seed = " ".join(f"{x:+.1f}" for x in c["changes"])
        bold = "**" if d[0] < LOSS_POINTS else ""
        lines.append(
            f"| {c['n_train']} | {c['bs']} | {c['epochs']} | {c['steps']} | {f[0]:.4f} ± {f[1]:.4f} "
            f"| {p[0]:.4f} ± {p[1]:.4f} | {bold}{d[0]:+.1f} ± {d[1]:.1f}{bold} | {per_seed} |"
        )
    if len(cells) < 3:
        return "\n".join(lines)  # too few cells to compare the units
    lines += [
        "",
        f"Which unit predicts the change? A cell lost when its mean change is below {LOSS_POINTS} point; the",
        'threshold T is the one for "lost iff unit < T" that classifies most cells right (the smallest such T).',
        "The slopes are least squares of the change (points) on log2 of the unit, so points per doubling; R² over",
        "the cell means and over every seed. Samples (steps x batch size = epochs x training scans) is a third",
        "candidate (its slope column is left empty; its R² is that of its own fit). The last row of each group",
        "fits steps and epochs at once.",
        "",
        "| cells | unit | threshold T | cells classified right | slope steps | slope epochs | R² means | R² seeds |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    groups = [("all", cells)]
    full = [c for c in cells if c["fraction"] == 1.0]
    if len(full) < len(cells):
        groups.append(("full training set", full))
    for group, chosen in groups:
        if len(chosen) < 3:
            continue
        lines += comparison(group, chosen)
    return "\n".join(lines)


def comparison(group: str, cells: list[dict[str, object]]) -> list[str]:
    """Rows of the unit comparison for one group of cells."""
    ys = [c["change"][0] for c in cells]
    seed_ys = [d for c in cells for d in c["changes"]]

    def logs(unit: str) -> tuple[list[float], list[float]]:
        return [math.log2(c[unit]) for c in cells], [math.log2(c[unit]) for c in cells for _ in c["changes"]]

    (steps, seed_steps), (epochs, seed_epochs), (samples, seed_samples) = logs("steps"), logs("epochs"), logs("samples")
    rows = []
    for unit, cols, seed_cols in (
        ("steps", [steps], [seed_steps]),
        ("epochs", [epochs], [seed_epochs]),
        ("samples", [samples], [seed_samples]),
        ("steps and epochs", [steps, epochs], [seed_steps, seed_epochs]),
    ):
        beta, r2 = least_squares(cols, ys)
        _, r2_seeds = least_squares(seed_cols, seed_ys)
        if unit == "steps and epochs":
            threshold, right, slopes = "", "", (f"{beta[1]:+.2f}", f"{beta[2]:+.2f}")
        else:
            t, frac, n_right = best_threshold(cells, unit)
            threshold, right = str(t), f"{n_right}/{len(cells)} ({100 * frac:.0f}%)"
            slopes = {"steps": (f"{beta[1]:+.2f}", ""), "epochs": ("", f"{beta[1]:+.2f}")}.get(unit, ("", ""))
        rows.append(
            f"| {group} | {unit} | {threshold} | {right} | {slopes[0]} | {slopes[1]} | {r2:.2f} | {r2_seeds:.2f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, bs 64 x 1 epoch on a quarter of the scans")
    parser.add_argument("--cells", nargs="+", default=None, help="cells BSxEPOCHS[@FRACTION] (default: the grid)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2, quick 0)")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=RUNS, help="which arms to train (to split a grid)")
    parser.add_argument("--csv", type=Path, default=None, help="append every run here; runs already in it are skipped")
    parser.add_argument("--report", type=Path, default=None, help="print the report of this CSV and train nothing")
    parser.add_argument("--md", type=Path, default=None, help="with --report: also write the report here")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.report:
        rows = read(args.report)
        seeds = sorted({int(r["seed"]) for r in rows})
        text = report(rows, f"seeds {', '.join(map(str, seeds))}")
        print(text)
        if args.md:
            args.md.write_text(text + "\n")
        return
    default = "16x2 32x2 64x2 32x4 64x4 64x8 64x4@0.5 64x8@0.5 32x8@0.5"  # the committed grid
    cells = [Cell.parse(c) for c in (["64x1@0.25"] if args.quick else args.cells or default.split())]
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    warnings.filterwarnings("ignore", category=UserWarning)
    tmp = Path(tempfile.mkdtemp())
    rows = train_grid(cells, seeds, args.csv, tmp, tuple(args.runs))
    if args.csv is None:
        print(report(rows, f"seeds {', '.join(map(str, seeds))}"))


if __name__ == "__main__":
    sys.exit(main())
