"""Benchmark ``dataset_stats``: throughput against a plain pass over the same DataLoader, and exactness.

On generated Imagenette-like JPEGs it times

* a plain iteration of the DataLoader ``dataset_stats`` reads (the training
  set in order, un-augmented, without ``Normalize``), doing nothing per batch;
* ``dataset_stats`` over the same ``DataLoaders``;

and reports the median ratio of interleaved paired runs (target: >= 0.9x the plain pass) and the largest
relative error of the mean and std against a float64 two-pass numpy
reference. A third row times an in-memory tensor loader, where loading costs
nothing and the statistics are the whole cost: a worst case, not the target.

Run ``python benchmarks/bench_stats.py`` (``--quick`` for a short run).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch


def timed(fn, repeats: int) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls, and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small data set and fewer repeats")
    parser.add_argument("--n-train", type=int, default=40, help="training images per class (10 classes)")
    parser.add_argument("--size", type=int, default=160, help="image size after Resize")
    parser.add_argument("--bs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.quick:
        args.n_train, args.size, args.repeats = 12, 96, 3

    from fastai.vision.all import ImageDataLoaders, Resize, aug_transforms

    from fastai_tricks.data import make_fake_imagenette
    from fastai_tricks.normalization import _deterministic_dl, dataset_stats

    torch.set_num_threads(max(1, torch.get_num_threads()))
    path = make_fake_imagenette(tempfile.mkdtemp(), n_train=args.n_train, n_valid=2, size=args.size, seed=0)
    dls = ImageDataLoaders.from_folder(
        path,
        valid="val",
        item_tfms=Resize(args.size),
        batch_tfms=aug_transforms(size=args.size),
        bs=args.bs,
        num_workers=0,
        seed=0,
    )
    plain_dl = _deterministic_dl(dls.train)

    def plain_pass() -> int:
        n = 0
        for xb, _ in plain_dl:
            n += xb.shape[0]
        return n

    def reference() -> tuple[np.ndarray, np.ndarray]:
        x = np.concatenate([xb.numpy().astype(np.float64) for xb, _ in plain_dl])
        flat = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
        mean = flat.mean(1)
        return mean, np.sqrt(((flat - mean[:, None]) ** 2).mean(1))

    n_images = plain_pass()  # warm-up: file cache, lazy imports
    dataset_stats(dls, progress=False)
    rows = []
    # Interleave the two timings so drifting machine load hits both alike; the ratio is the median of the
    # paired runs, the throughputs are the best runs.
    t_plain, t_stats, ratios = float("inf"), float("inf"), []
    stats = None
    for _ in range(args.repeats):
        tp = timed(plain_pass, 1)[0]
        ts, stats = timed(lambda: dataset_stats(dls, progress=False), 1)
        t_plain, t_stats = min(t_plain, tp), min(t_stats, ts)
        ratios.append(tp / ts)
    ref_mean, ref_std = reference()
    err_mean = float(np.max(np.abs(np.array(stats[0]) - ref_mean) / np.abs(ref_mean)))
    err_std = float(np.max(np.abs(np.array(stats[1]) - ref_std) / ref_std))
    rows.append(("plain pass over the DataLoader", n_images / t_plain, "1.00x", "", ""))
    ratio = float(np.median(ratios))
    rows.append(("dataset_stats(dls)", n_images / t_stats, f"{ratio:.2f}x", f"{err_mean:.1e}", f"{err_std:.1e}"))

    x = torch.rand(n_images, 3, args.size, args.size)
    mem_dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=args.bs)
    t_mem_plain, _ = timed(lambda: sum(b[0].shape[0] for b in mem_dl), args.repeats)
    t_mem_stats, _ = timed(lambda: dataset_stats(mem_dl, progress=False), args.repeats)
    rows.append(
        (
            "in-memory tensors: dataset_stats (worst case)",
            n_images / t_mem_stats,
            f"{t_mem_plain / t_mem_stats:.2f}x",
            "",
            "",
        )
    )

    print(f"{n_images} images of {args.size} px, batch size {args.bs}, {torch.get_num_threads()} torch threads\n")
    print("| run | images/s | vs plain pass | max rel. error mean | max rel. error std |")
    print("|---|---|---|---|---|")
    for name, ips, rel, em, es in rows:
        print(f"| {name} | {ips:,.0f} | {rel} | {em} | {es} |")
    verdict = "met" if ratio >= 0.9 else "NOT met"
    print(
        f"\nTarget >= 0.9x the plain pass: {verdict} ({ratio:.2f}x). Target error <= 1e-6: "
        f"{'met' if max(err_mean, err_std) <= 1e-6 else 'NOT met'}."
    )


if __name__ == "__main__":
    main()
