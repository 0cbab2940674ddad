"""One prepared device check (issue #21, part 3): host syncs, mix cost, progressive resizing and TTA.

Built to run once, unattended, on a lent GPU: ``python benchmarks/device_check.py`` takes at most
about 8 minutes on one H100/H200 (16 CPU cores), prints a table per part and writes every figure,
with the hardware and versions, to ``benchmarks/results/device_check_<device>.json``. Each part
runs on its own: one that fails is recorded in the JSON with its traceback and the others still
run; the JSON is rewritten after every part, and once the time budget (``--budget``, 7 minutes)
is spent the remaining parts are skipped with a note.

The parts (``--only syncs,mix,resize,tta``):

``syncs``
    Host-device synchronisations per batch added by each training callback (MixUp, CutMix,
    CutMix(per_sample=True), FMix, ResizeMix, ManifoldMix, RandomMix, ProgressiveResize,
    LabelSmoothingCE) and by FourCornerTTA / ``learn.four_corner_tta`` (classification and dense
    outputs), with fastai's own MixUp and CutMix beside them for contrast. Only the batch loop is
    watched: a callback that runs first in ``before_batch`` opens a window that one running before
    fastai's Recorder (and, in prediction, before ``GatherPredsCallback``) closes in ``after_batch``;
    fastai's own per-batch reads of the loss and the predictions happen outside it. Two counters:

    * on every device, a ``TorchDispatchMode`` that counts the aten ops that read a device value
      on the host (``_local_scalar_dense`` behind ``.item()``/``bool()``, ``nonzero``,
      ``masked_select``, indexing with a boolean mask) plus wrapped ``Tensor.cpu``, ``.tolist``,
      ``.numpy`` and ``.to(device)``;
    * on CUDA, ``torch.cuda.set_sync_debug_mode('warn')`` inside the window, counting the
      warnings, and one more run in ``'error'`` mode, which stops at the first sync with its
      traceback.

    Each count is taken on fits of ``n`` and ``2n`` training (and validation) batches; the slope
    between them minus the same slope without the callback is the number of syncs added per batch
    (syncs made once per fit cancel out). Ours must add 0.

``mix``
    Per-batch cost of each mix: our callbacks' ``before_batch`` plus the loss on the batch (and
    ``after_loss``, where they mix per-sample losses), the pure ``fastai_tricks.mix_ops``
    functions, fastai's MixUp and CutMix (``before_batch`` plus their swapped loss) and timm's
    ``Mixup`` when timm is installed, on one channels-last batch (256 x 224 px on CUDA, in bfloat16
    and in float32; ``--quick``: 32 x 64 px), against one xresnet18 training step on the same
    batch. Median of N runs after a warm-up, timed with CUDA events on CUDA (the host wall time is
    recorded too), ``time.perf_counter`` on CPU.

``resize``
    A ``ProgressiveResize(min_epochs=0)`` fit against a fixed-size fit of xresnet18 from scratch
    (channels-last, bf16 autocast through fastai's ``to_bf16``) at a 224 px final size (64 px on
    CPU or with ``--quick``), on generated JPEGs with the dimensions of Imagenette's full-size
    release, loaded with ``DraftImageBlock`` by 8 or more workers on CUDA (none on CPU). Reports
    the time ratio and the share of training time spent waiting for data (from the end of one
    batch's ``after_batch`` to the start of the next ``before_batch``).

``tta``
    Time of each TTA path over the ideal ``D + V * M``: D one pass of the validation loader with
    no model, M one forward of the model over the cached validation batches, V the number of
    views (5). Paths: ``learn.four_corner_tta()``, ``FourCornerTTA()`` with all views in one
    forward and with one view per forward, fastai's ``learn.tta()``, and plain ``get_preds``.

Usage::

    python benchmarks/device_check.py                          # everything, on CUDA if available
    python benchmarks/device_check.py --device cpu --quick     # every part, under a minute on 2 cores
    python benchmarks/device_check.py --only syncs --out /tmp/syncs.json
    python benchmarks/device_check.py --out "$OUT/device_check.json"   # on a lent machine: keep the JSON

The exit status is 1 when a part raised (its traceback is in the JSON), else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import json
import math
import multiprocessing
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

import fastai.callback.progress  # noqa: E402, F401 - patches Learner.no_bar
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from fastai.callback.core import Callback  # noqa: E402
from fastai.data.core import DataLoaders  # noqa: E402
from fastai.learner import Learner  # noqa: E402
from fastai.losses import CrossEntropyLossFlat  # noqa: E402
from fastai.torch_core import TensorCategory, TensorImage, TensorMask  # noqa: E402
from torch import nn  # noqa: E402

SCHEMA = "fastai_tricks.device_check/1"
PARTS = ("syncs", "mix", "resize", "tta")
# The longest part last, so that a spent budget skips it rather than the short ones.
RUN_ORDER = ("syncs", "mix", "tta", "resize")
DEFAULT_BUDGET_S = 420.0
RESULTS_DIR = ROOT / "benchmarks" / "results"
STATUSES = ("ok", "error", "skipped")
#: Order of the callback that closes the sync window in a fit: after every callback's
#: ``after_batch`` but fastai's Recorder (50), which reads the loss on the host.
CLOSE_IN_FIT = 49
#: In prediction: before ``GatherPredsCallback.after_batch`` (order 0), which copies the predictions.
CLOSE_IN_PREDS = -1


# --- pure helpers ----------------------------------------------------------------------------------


def ideal_seconds(d: float, views: int, m: float) -> float:
    """The ideal time of a TTA path: one decoding pass ``d`` plus ``views`` model passes of ``m`` seconds each."""
    return d + views * m


def slope(count_n: float, count_2n: float, n: int) -> float:
    """Per-batch count from two runs of ``n`` and ``2 n`` batches: what the extra ``n`` batches added, per batch."""
    if n <= 0:
        raise ValueError(f"n must be a positive number of batches, got {n!r}")
    return (count_2n - count_n) / n


def added_per_batch(with_counts: Sequence[float], base_counts: Sequence[float], n: int) -> float:
    """Syncs per batch that a run adds beyond its baseline: the difference of the two slopes.

    Args:
        with_counts: Counts of the runs with the callback, on ``n`` and ``2 n`` batches.
        base_counts: Counts of the baseline runs on ``n`` and ``2 n`` batches.
        n: The smaller number of batches.

    Returns:
        The added syncs per batch (0.0 for a callback that syncs at most once per fit).

    """
    return slope(with_counts[0], with_counts[1], n) - slope(base_counts[0], base_counts[1], n)


def device_slug(name: str) -> str:
    """A file-name-safe, lower-case form of a device name (``'NVIDIA H100 80GB HBM3'`` -> ``'nvidia-h100-80gb-hbm3'``)."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "device"


def default_out_path(slug: str, quick: bool) -> Path:
    """Where the JSON goes by default: ``benchmarks/results/device_check_<slug>[_quick].json``."""
    return RESULTS_DIR / f"device_check_{slug}{'_quick' if quick else ''}.json"


def parse_only(text: str | None) -> list[str]:
    """The parts named in ``--only`` (comma-separated, any order), in the order they run; all if None or 'all'.

    Raises:
        ValueError: A name that is not one of :data:`PARTS`.

    """
    if text is None or text.strip() in ("", "all"):
        return list(RUN_ORDER)
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in PARTS]
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    return [p for p in RUN_ORDER if p in names]


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: '-' for None, fixed digits for a float, ``str`` on one line otherwise."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}"
    return " ".join(str(value).split()).replace("|", "/")  # one line, no column separator


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 2) -> str:
    """A Markdown table; cells go through :func:`fmt`, numbers are right-aligned.

    Raises:
        ValueError: A row whose length differs from the headers'.

    """
    cells = [[fmt(c, digits) for c in row] for row in rows]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"row {row} has {len(row)} cells for {len(headers)} headers")
    numeric = [
        bool(rows) and all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool) or r[i] is None for r in rows)
        for i in range(len(headers))
    ]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def plan(device_type: str, quick: bool, cpu_count: int) -> dict[str, dict[str, Any]]:
    """The sizes of every part for a device type (``'cuda'`` or ``'cpu'``), ``--quick`` and a CPU count.

    CUDA: sync fits of 2 and 4 batches of 32 at 64 px; mixes at 256 x 224 px (quick: 32 x 64 px) in
    bfloat16 and float32; fits at 224 px (quick: 64 px) with ``max(8, min(12, cpu_count - 2))``
    loader workers. CPU: everything smaller, no workers, float32, and with ``--quick`` narrower
    models (``widen`` 0.25) in the syncs, resize and tta parts (the same code, less arithmetic).
    """
    cuda = device_type == "cuda"
    if cuda:
        workers = max(8, min(12, cpu_count - 2))
        return {
            "syncs": {"bs": 32, "size": 64, "n": 2, "widen": 1.0},
            "mix": {
                "bs": 32 if quick else 256,
                "size": 64 if quick else 224,
                "dtypes": ["bfloat16", "float32"],
                "repeats": 10 if quick else 30,
                "warmup": 3 if quick else 5,
                "step_repeats": 5 if quick else 10,
            },
            "data": {
                "n_train": 10 if quick else 200,
                "n_valid": 3 if quick else 50,
                "parts": max(1, min(16, cpu_count)),
            },
            "resize": {
                "size": 64 if quick else 224,
                "epochs": 2 if quick else 5,
                "bs": 64,
                "workers": workers,
                "widen": 1.0,
            },
            "tta": {
                "size": 64 if quick else 224,
                "bs": 64,
                "workers": workers,
                "repeats": 1 if quick else 2,
                "widen": 1.0,
            },
        }
    return {
        "syncs": {"bs": 4, "size": 32, "n": 1, "widen": 0.25},
        "mix": {
            "bs": 32 if quick else 256,
            "size": 64 if quick else 224,
            "dtypes": ["float32"],
            "repeats": 3 if quick else 10,
            "warmup": 1 if quick else 2,
            "step_repeats": 1 if quick else 3,
        },
        "data": {"n_train": 2 if quick else 10, "n_valid": 1 if quick else 3, "parts": 2},
        "resize": {"size": 64, "epochs": 2 if quick else 3, "bs": 8, "workers": 0, "widen": 0.25 if quick else 1.0},
        "tta": {"size": 64, "bs": 8, "workers": 0, "repeats": 1, "widen": 0.25 if quick else 1.0},
    }


def check_schema(doc: Any) -> list[str]:
    """The problems of a result document against the schema this script writes (an empty list: valid).

    Top level: ``schema``, ``command``, ``hardware`` (with ``device``, ``device_name``, ``torch``,
    ``fastai``, ``cpu_count`` and ``date``), ``settings``, ``parts`` and ``total_seconds``. Each
    part has a ``status`` in :data:`STATUSES`; an ``ok`` part has its ``result``, an ``error`` part
    its ``error`` and ``traceback``, a ``skipped`` part a ``note``.
    """
    problems: list[str] = []
    if not isinstance(doc, dict):
        return [f"the document is a {type(doc).__name__}, not an object"]
    if doc.get("schema") != SCHEMA:
        problems.append(f"schema is {doc.get('schema')!r}, expected {SCHEMA!r}")
    for key, kind in (("command", str), ("hardware", dict), ("settings", dict), ("parts", dict)):
        if not isinstance(doc.get(key), kind):
            problems.append(f"{key} is missing or not a {kind.__name__}")
    if not isinstance(doc.get("total_seconds"), (int, float)):
        problems.append("total_seconds is missing or not a number")
    hardware = doc.get("hardware") if isinstance(doc.get("hardware"), dict) else {}
    for key in ("device", "device_name", "torch", "fastai", "cpu_count", "date"):
        if key not in hardware:
            problems.append(f"hardware.{key} is missing")
    parts = doc.get("parts") if isinstance(doc.get("parts"), dict) else {}
    for name, part in parts.items():
        if name not in (*PARTS, "data"):
            problems.append(f"unknown part {name!r}")
        if not isinstance(part, dict) or part.get("status") not in STATUSES:
            problems.append(f"parts.{name}.status is not one of {STATUSES}")
            continue
        needs = {"ok": ("result",), "error": ("error", "traceback"), "skipped": ("note",)}[part["status"]]
        problems += [f"parts.{name}.{key} is missing" for key in needs if key not in part]
    return problems


# --- device helpers --------------------------------------------------------------------------------


def is_cuda(device: torch.device | str) -> bool:
    """Whether ``device`` is a CUDA device."""
    return torch.device(device).type == "cuda"


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA only; a no-op on CPU)."""
    if is_cuda(device):
        torch.cuda.synchronize(device)


def reset_sync_debug_mode(device: torch.device | str) -> None:
    """Switch CUDA's sync debug mode off (a no-op on CPU): the safety net after a part that raised."""
    if is_cuda(device):
        torch.cuda.set_sync_debug_mode("default")


def cpu_name() -> str:
    """The CPU's model name (from ``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def hardware_info(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on: the device, library versions, CPU count and the date."""
    import fastai

    import fastai_tricks

    try:
        import timm

        timm_version: str | None = timm.__version__
    except ImportError:
        timm_version = None
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": cpu_name(),
        "torch": torch.__version__,
        "fastai": fastai.__version__,
        "fastai_tricks": fastai_tricks.__version__,
        "timm": timm_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if is_cuda(device):
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        queries: dict[str, Callable[[], Any]] = {
            "device_name": lambda: torch.cuda.get_device_name(index),
            "capability": lambda: ".".join(str(v) for v in torch.cuda.get_device_capability(index)),
            "memory_gib": lambda: round(torch.cuda.get_device_properties(index).total_memory / 2**30, 1),
            "cuda": lambda: torch.version.cuda,
            "cudnn": lambda: torch.backends.cudnn.version(),
            "cudnn_benchmark": lambda: torch.backends.cudnn.benchmark,
            "bf16_supported": lambda: torch.cuda.is_bf16_supported(),
        }
        for key, query in queries.items():
            try:
                info[key] = query()
            except Exception as err:  # noqa: BLE001 - a missing detail must not cost the run.
                info[key] = f"unknown ({type(err).__name__}: {err})"
    return info


class Budget:
    """A global time budget: parts (and sync cases) that would start after it is spent are skipped."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = float(seconds)
        self._clock = clock
        self._start = clock()

    def elapsed(self) -> float:
        """Seconds since the budget started."""
        return self._clock() - self._start

    def left(self) -> float:
        """Seconds left (negative once spent)."""
        return self.seconds - self.elapsed()

    def over(self) -> bool:
        """Whether the budget is spent."""
        return self.left() <= 0


def run_part(name: str, fn: Callable[[], Any], budget: Budget, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Run one part and record its outcome: ``ok`` with its result, ``error`` with the traceback, or ``skipped``."""
    if budget.over():
        return {
            "status": "skipped",
            "note": f"skipped: the {budget.seconds:.0f} s budget was spent after {budget.elapsed():.0f} s",
        }
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - one part's failure is recorded, and the others still run.
        with contextlib.suppress(Exception):
            reset_sync_debug_mode(device)
        return {
            "status": "error",
            "seconds": round(time.perf_counter() - start, 2),
            "error": f"{type(err).__name__}: {err}"[:2000],
            "traceback": traceback.format_exc()[-8000:],
        }
    finally:
        if is_cuda(device):
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()
    return {"status": "ok", "seconds": round(time.perf_counter() - start, 2), "result": result}


def write_json(doc: dict[str, Any], path: Path) -> None:
    """Write ``doc`` to ``path`` atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(path)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- syncs: the counters ---------------------------------------------------------------------------

# The counter lives in the package (fastai_tricks.host_syncs), shared with tests/test_host_syncs.py.
from fastai_tricks.host_syncs import HostSyncCounter, counting_host_syncs  # noqa: E402


def _is_sync_warning(w: warnings.WarningMessage) -> bool:
    return "synchroniz" in str(w.message).lower()


class SyncWindow:
    """The part of each batch that is watched: opened in ``before_batch``, closed in ``after_batch``.

    Opening activates the dispatch counter and, when ``set_debug_mode`` is given (on CUDA,
    ``torch.cuda.set_sync_debug_mode``), sets ``mode`` (``'warn'`` or ``'error'``); closing sets
    ``'default'`` back. ``opened`` counts the batches watched.
    """

    def __init__(
        self,
        counter: HostSyncCounter | None = None,
        set_debug_mode: Callable[[str], None] | None = None,
        mode: str = "warn",
    ) -> None:
        self.counter, self.set_debug_mode, self.mode = counter, set_debug_mode, mode
        self.is_open = False
        self.opened = 0

    def open(self) -> None:
        """Start watching (one batch)."""
        self.is_open = True
        self.opened += 1
        if self.set_debug_mode is not None:
            self.set_debug_mode(self.mode)
        if self.counter is not None:
            self.counter.active = True

    def close(self) -> None:
        """Stop watching; safe to call when not open."""
        if self.counter is not None:
            self.counter.active = False
        if self.is_open and self.set_debug_mode is not None:
            self.set_debug_mode("default")
        self.is_open = False


class OpenSyncWindow(Callback):
    """Opens the window in ``before_batch``, before every other callback."""

    order = -100

    def __init__(self, window: SyncWindow) -> None:
        super().__init__()
        self.window = window

    def before_batch(self) -> None:
        """Open the window."""
        self.window.open()


class CloseSyncWindow(Callback):
    """Closes the window in ``after_batch`` at ``order`` (and whenever a batch or the fit ends otherwise)."""

    def __init__(self, window: SyncWindow, order: int) -> None:
        super().__init__()
        self.window = window
        self.order = order

    def after_batch(self) -> None:
        """Close the window."""
        self.window.close()

    def after_cancel_batch(self) -> None:
        """Close the window."""
        self.window.close()

    def after_fit(self) -> None:
        """Close the window."""
        self.window.close()


def sync_probe(
    learn: Learner,
    run: Callable[[Learner], Any],
    *,
    close_order: int,
    set_debug_mode: Callable[[str], None] | None = None,
    mode: str = "warn",
) -> dict[str, Any]:
    """Run ``run(learn)`` with the sync window on its batches; return the counts inside the window.

    Returns:
        ``dispatch`` (the dispatch counter's total), ``by_op`` (its counts by name), ``cuda_warnings``
        (the sync warnings of the debug mode, None without ``set_debug_mode``), ``first_sync``
        (where the first warning came from) and ``windows`` (the batches watched).

    """
    counter = HostSyncCounter(active=False)
    window = SyncWindow(counter, set_debug_mode, mode)
    cbs = [OpenSyncWindow(window), CloseSyncWindow(window, close_order)]
    learn.add_cbs(cbs)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with counting_host_syncs(counter):
                run(learn)
    finally:
        window.close()
        learn.remove_cbs(cbs)
    syncs = [w for w in caught if _is_sync_warning(w)]
    return {
        "dispatch": counter.total,
        "by_op": dict(counter.counts),
        "cuda_warnings": len(syncs) if set_debug_mode is not None else None,
        "first_sync": f"{syncs[0].filename}:{syncs[0].lineno}" if syncs else None,
        "windows": window.opened,
    }


def strict_probe(
    learn: Learner, run: Callable[[Learner], Any], *, close_order: int, set_debug_mode: Callable[[str], None]
) -> dict[str, Any]:
    """Run once in ``'error'`` mode: ``{'ok': True}``, or ``{'ok': False, 'error': ...}`` with the traceback's end."""
    try:
        sync_probe(learn, run, close_order=close_order, set_debug_mode=set_debug_mode, mode="error")
    except Exception as err:  # noqa: BLE001 - the sync, or whatever else failed, is the result.
        return {
            "ok": False,
            "error": f"{type(err).__name__}: {str(err)[:600]}",
            "where": raise_site(err),
            "traceback": traceback.format_exc()[-3000:],
        }
    return {"ok": True}


def raise_site(err: BaseException) -> str | None:
    """``file:line in function`` of the innermost frame outside torch where ``err`` was raised (None if none)."""
    torch_dir = str(Path(torch.__file__).resolve().parent)
    frames = [
        f for f in traceback.extract_tb(err.__traceback__) if not str(Path(f.filename).resolve()).startswith(torch_dir)
    ]
    if not frames:
        return None
    frame = frames[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"


# --- syncs: the learners and the cases -------------------------------------------------------------


class _CastTargets(Callback):
    """Give the targets a fastai type, as a typed pipeline would (a list dataset's batches lose it)."""

    order = 5  # before FourCornerTTA's before_batch

    def __init__(self, cls: type) -> None:
        super().__init__()
        self.cls = cls

    def before_batch(self) -> None:
        """Cast the targets."""
        self.learn.yb = (self.cls(self.learn.yb[0]),)


def _xresnet(n_out: int, widen: float = 1.0) -> nn.Module:
    """fastai's xresnet18 (``widen`` < 1 narrows its stages, for the small CPU runs)."""
    from fastai.vision.models.xresnet import xresnet18

    return xresnet18(n_out=n_out, widen=widen)


def image_learner(
    n_batches: int,
    *,
    bs: int,
    size: int,
    device: torch.device,
    loss_func: Any = None,
    n_out: int = 4,
    widen: float = 1.0,
) -> Learner:
    """A Learner on seeded random images, ``n_batches`` batches in training and in validation, xresnet18 on ``device``."""
    g = torch.Generator().manual_seed(0)
    n = bs * n_batches
    xs = TensorImage(torch.rand(2 * n, 3, size, size, generator=g))
    ys = TensorCategory(torch.randint(0, n_out, (2 * n,), generator=g))
    ds = list(zip(xs, ys, strict=True))
    dls = DataLoaders.from_dsets(ds[:n], ds[n:], bs=bs, drop_last=True, device=device, num_workers=0)
    seed_everything(0)
    model = _xresnet(n_out, widen).to(device)
    return Learner(dls, model, loss_func=loss_func if loss_func is not None else CrossEntropyLossFlat())


def dense_learner(n_batches: int, *, bs: int, size: int, device: torch.device) -> Learner:
    """A segmentation-like Learner: random images, ``TensorMask`` targets in 3 classes, a model giving (N, 3, H, W)."""
    g = torch.Generator().manual_seed(0)
    n = bs * n_batches
    xs = TensorImage(torch.rand(2 * n, 3, size, size, generator=g))
    ys = TensorMask(torch.randint(0, 3, (2 * n, size, size), generator=g))
    ds = list(zip(xs, ys, strict=True))
    dls = DataLoaders.from_dsets(ds[:n], ds[n:], bs=bs, device=device, num_workers=0)
    seed_everything(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1)).to(device)
    return Learner(dls, model, loss_func=CrossEntropyLossFlat(axis=1), cbs=_CastTargets(TensorMask))


def _fit_with(make_cbs: Callable[[], list]) -> Callable[[Learner], None]:
    def run(learn: Learner) -> None:
        with learn.no_bar(), learn.no_logging():
            learn.fit(1, 1e-3, cbs=make_cbs())

    return run


def _preds_with(make_cbs: Callable[[], list]) -> Callable[[Learner], None]:
    def run(learn: Learner) -> None:
        with learn.no_bar():
            learn.get_preds(cbs=make_cbs())

    return run


def _four_corner_tta(learn: Learner) -> None:
    with learn.no_bar():
        learn.four_corner_tta()


def sync_cases(device: torch.device, bs: int, size: int, widen: float = 1.0) -> list[dict[str, Any]]:
    """The sync cases: name, group (baseline, ours, fastai), the Learner builder, the run and its baseline."""
    from fastai.callback.mixup import CutMix as FastaiCutMix
    from fastai.callback.mixup import MixUp as FastaiMixUp
    from fastai.losses import LabelSmoothingCrossEntropy

    import fastai_tricks.tta  # noqa: F401 - patches Learner.four_corner_tta
    from fastai_tricks import (
        CutMix,
        FMix,
        FourCornerTTA,
        LabelSmoothingCE,
        ManifoldMix,
        MixUp,
        ProgressiveResize,
        RandomMix,
        ResizeMix,
    )

    def images(loss: Callable[[], Any] | None = None) -> Callable[[int], Learner]:
        return lambda n: image_learner(
            n, bs=bs, size=size, device=device, loss_func=loss() if loss else None, widen=widen
        )

    def dense(n: int) -> Learner:
        return dense_learner(n, bs=bs, size=size, device=device)

    fit, preds = "fit, no callback", "get_preds, no callback"
    dense_preds = "get_preds, no callback (dense)"
    cases = [
        ("baseline", fit, images(), _fit_with(list), None, CLOSE_IN_FIT),
        ("ours", "MixUp", images(), _fit_with(lambda: [MixUp()]), fit, CLOSE_IN_FIT),
        ("ours", "CutMix", images(), _fit_with(lambda: [CutMix()]), fit, CLOSE_IN_FIT),
        ("ours", "CutMix(per_sample=True)", images(), _fit_with(lambda: [CutMix(per_sample=True)]), fit, CLOSE_IN_FIT),
        ("ours", "FMix", images(), _fit_with(lambda: [FMix()]), fit, CLOSE_IN_FIT),
        ("ours", "ResizeMix", images(), _fit_with(lambda: [ResizeMix()]), fit, CLOSE_IN_FIT),
        ("ours", "ManifoldMix", images(), _fit_with(lambda: [ManifoldMix()]), fit, CLOSE_IN_FIT),
        (
            "ours",
            "RandomMix([MixUp, CutMix, FMix, ResizeMix])",
            images(),
            _fit_with(lambda: [RandomMix([MixUp(), CutMix(), FMix(), ResizeMix()])]),
            fit,
            CLOSE_IN_FIT,
        ),
        (
            "ours",
            "ProgressiveResize(min_epochs=0)",
            images(),
            _fit_with(lambda: [ProgressiveResize(min_epochs=0)]),
            fit,
            CLOSE_IN_FIT,
        ),
        ("ours", "LabelSmoothingCE loss", images(LabelSmoothingCE), _fit_with(list), fit, CLOSE_IN_FIT),
        (
            "ours",
            "MixUp + ProgressiveResize + LabelSmoothingCE",
            images(LabelSmoothingCE),
            _fit_with(lambda: [ProgressiveResize(min_epochs=0), MixUp()]),
            fit,
            CLOSE_IN_FIT,
        ),
        ("fastai", "fastai MixUp", images(), _fit_with(lambda: [FastaiMixUp()]), fit, CLOSE_IN_FIT),
        ("fastai", "fastai CutMix", images(), _fit_with(lambda: [FastaiCutMix()]), fit, CLOSE_IN_FIT),
        (
            "fastai",
            "fastai LabelSmoothingCrossEntropy loss",
            images(LabelSmoothingCrossEntropy),
            _fit_with(list),
            fit,
            CLOSE_IN_FIT,
        ),
        ("baseline", preds, images(), _preds_with(list), None, CLOSE_IN_PREDS),
        ("ours", "FourCornerTTA()", images(), _preds_with(lambda: [FourCornerTTA()]), preds, CLOSE_IN_PREDS),
        (
            "ours",
            "FourCornerTTA(flip=True)",
            images(),
            _preds_with(lambda: [FourCornerTTA(flip=True)]),
            preds,
            CLOSE_IN_PREDS,
        ),
        ("ours", "learn.four_corner_tta()", images(), _four_corner_tta, preds, CLOSE_IN_PREDS),
        ("baseline", dense_preds, dense, _preds_with(list), None, CLOSE_IN_PREDS),
        ("ours", "FourCornerTTA() dense", dense, _preds_with(lambda: [FourCornerTTA()]), dense_preds, CLOSE_IN_PREDS),
        ("ours", "learn.four_corner_tta() dense", dense, _four_corner_tta, dense_preds, CLOSE_IN_PREDS),
    ]
    keys = ("group", "name", "build", "run", "baseline", "close_order")
    out = [dict(zip(keys, case, strict=True)) for case in cases]
    for case in out:  # a fit watches n training and n validation batches, a prediction n validation batches
        case["kind"] = "fit" if case["close_order"] == CLOSE_IN_FIT else "preds"
    return out


def select_cases(cases: list[dict[str, Any]], only: str | None) -> list[dict[str, Any]]:
    """The cases whose name contains one of the comma-separated substrings of ``only``, with their baselines."""
    if not only:
        return cases
    wanted = [w.strip().lower() for w in only.split(",") if w.strip()]
    chosen = {c["name"] for c in cases if any(w in c["name"].lower() for w in wanted)}
    chosen |= {c["baseline"] for c in cases if c["name"] in chosen and c["baseline"]}
    return [c for c in cases if c["name"] in chosen]


def syncs_part(
    device: torch.device,
    cfg: dict[str, Any],
    budget: Budget,
    only_cases: str | None = None,
    set_debug_mode: Callable[[str], None] | None = None,
) -> dict:
    """Measure the syncs per batch of every case (see the module docstring).

    Args:
        device: Where the fits run.
        cfg: ``plan(...)['syncs']``: ``bs``, ``size``, ``n`` and ``widen``.
        budget: Cases that would start after it is spent are skipped.
        only_cases: Comma-separated substrings of the case names to run (with their baselines).
        set_debug_mode: The sync debug-mode setter: ``torch.cuda.set_sync_debug_mode`` on CUDA when
            None; tests pass a fake one to drive the CUDA-only branch on a CPU.

    """
    n = cfg["n"]
    setter = set_debug_mode or (torch.cuda.set_sync_debug_mode if is_cuda(device) else None)
    cases = select_cases(sync_cases(device, cfg["bs"], cfg["size"], cfg["widen"]), only_cases)
    rows: list[dict[str, Any]] = []
    slopes: dict[str, dict[str, float | None]] = {}
    for case in cases:
        if budget.over():
            rows.append({"name": case["name"], "group": case["group"], "skipped": "over the time budget"})
            continue
        row: dict[str, Any] = {
            "name": case["name"],
            "group": case["group"],
            "kind": case["kind"],
            "baseline": case["baseline"],
        }
        try:
            probes = [
                sync_probe(case["build"](k), case["run"], close_order=case["close_order"], set_debug_mode=setter)
                for k in (n, 2 * n)
            ]
            row["windows"] = [p["windows"] for p in probes]
            row["dispatch"] = [p["dispatch"] for p in probes]
            row["by_op"] = probes[1]["by_op"]
            own = {"dispatch": slope(probes[0]["dispatch"], probes[1]["dispatch"], n), "cuda": None}
            if setter is not None:
                row["cuda_warnings"] = [p["cuda_warnings"] for p in probes]
                row["first_sync"] = probes[1]["first_sync"] or probes[0]["first_sync"]
                own["cuda"] = slope(probes[0]["cuda_warnings"], probes[1]["cuda_warnings"], n)
                row["strict"] = strict_probe(
                    case["build"](n), case["run"], close_order=case["close_order"], set_debug_mode=setter
                )
            slopes[case["name"]] = own
            row["per_batch"] = own
            base = slopes.get(case["baseline"]) if case["baseline"] else None
            if base is not None:
                row["added_per_batch"] = {
                    k: (own[k] - base[k]) if own[k] is not None and base[k] is not None else None for k in own
                }
            if case["group"] == "ours":
                added = row.get("added_per_batch", {})
                row["pass"] = bool(added) and all(v == 0 for v in added.values() if v is not None)
        except Exception as err:  # noqa: BLE001 - one case's failure is recorded, the others still run.
            with contextlib.suppress(Exception):
                reset_sync_debug_mode(device)
            row["error"] = f"{type(err).__name__}: {str(err)[:600]}"
            row["traceback"] = traceback.format_exc()[-3000:]
            if case["group"] == "ours":
                row["pass"] = False
        rows.append(row)
    ours = [r for r in rows if r["group"] == "ours" and "skipped" not in r]
    return {
        "n_batches": [n, 2 * n],
        "bs": cfg["bs"],
        "size": cfg["size"],
        "model": f"xresnet18(widen={cfg['widen']}) (classification), a 2-layer conv net (dense)",
        "counters": ["dispatch"] + (["cuda_warn", "cuda_error"] if setter is not None else []),
        "cases": rows,
        "all_ours_pass": bool(ours) and all(r.get("pass") for r in ours),
    }


def syncs_table(result: dict[str, Any]) -> str:
    """The syncs part as a table: added syncs per batch by counter, the ops seen, strict mode, pass."""
    rows = []
    for r in result["cases"]:
        added = r.get("added_per_batch") or {}
        per = r.get("per_batch") or {}
        strict = r.get("strict")
        strict_cell = None if strict is None else ("ok" if strict["ok"] else f"sync at {strict.get('where')}")
        note = r.get("error") or r.get("skipped")
        by_op = ", ".join(f"{k} {v}" for k, v in sorted((r.get("by_op") or {}).items()))
        rows.append(
            [
                r["name"],
                r["group"],
                added.get("dispatch", per.get("dispatch")),
                added.get("cuda", per.get("cuda")),
                strict_cell,
                (note[:60] if note else by_op) or None,
                r.get("pass"),
            ]
        )
    headers = [
        "case",
        "group",
        "added/batch (dispatch)",
        "added/batch (CUDA warn)",
        "CUDA error mode",
        "ops / error",
        "pass",
    ]
    return format_table(headers, rows)


# --- mix cost --------------------------------------------------------------------------------------


def time_ms(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> dict[str, float]:
    """Median milliseconds of ``fn()`` after ``warmup`` calls.

    On CUDA, ``ms`` is timed with CUDA events and ``wall_ms`` on the host (both after a
    synchronisation); on CPU both are ``time.perf_counter``.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    gpu, wall = [], []
    for _ in range(repeats):
        if is_cuda(device):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            fn()
            end.record()
            end.synchronize()
            wall.append((time.perf_counter() - t0) * 1000)
            gpu.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            wall.append((time.perf_counter() - t0) * 1000)
    ms = statistics.median(gpu if gpu else wall)
    return {"ms": round(ms, 4), "wall_ms": round(statistics.median(wall), 4)}


def _driven_learner(device: torch.device) -> Learner:
    """A Learner whose callbacks are driven by hand, one event at a time: an xresnet18 (for ManifoldMix), no data used."""
    xs = TensorImage(torch.zeros(2, 3, 8, 8))
    ys = TensorCategory(torch.zeros(2, dtype=torch.long))
    ds = list(zip(xs, ys, strict=True))
    dls = DataLoaders.from_dsets(ds, ds, bs=2, device=device, num_workers=0)
    learn = Learner(dls, _xresnet(10).to(device), loss_func=CrossEntropyLossFlat())
    learn.training = True
    learn.pct_train, learn.epoch, learn.n_epoch = 0.0, 0, 1
    return learn


def _our_step(learn: Learner, cb: Callback, x: torch.Tensor, y: torch.Tensor, pred: torch.Tensor):
    """One training batch of one of our callbacks: ``before_batch``, the loss, ``after_loss``, ``after_batch``."""
    learn.add_cb(cb)
    cb("before_fit")

    def step() -> None:
        learn.xb, learn.yb = (x,), (y,)
        cb("before_batch")
        learn.pred = pred
        learn.loss_grad = learn.loss_func(learn.pred, *learn.yb)
        learn.loss = learn.loss_grad.clone()
        cb("after_loss")
        cb("after_batch")  # also removes ManifoldMix's armed hook: the forward pass is not timed here

    def done() -> None:
        cb("after_fit")
        learn.remove_cb(cb)

    return step, done


def _fastai_step(learn: Learner, cb: Callback, x: torch.Tensor, y: torch.Tensor, pred: torch.Tensor):
    """One training batch of a fastai mix callback: ``before_batch`` and its swapped loss function."""
    learn.add_cb(cb)
    cb("before_train")  # swaps learn.loss_func for its mixed loss

    def step() -> None:
        learn.xb, learn.yb = (x,), (y,)  # fastai's CutMix pastes into x in place
        cb("before_batch")
        learn.pred = pred
        learn.loss_grad = learn.loss_func(learn.pred, *learn.yb)
        learn.loss = learn.loss_grad.clone()

    def done() -> None:
        cb("after_train")
        learn.remove_cb(cb)

    return step, done


def _timm_step(mixup_alpha: float, cutmix_alpha: float, x: torch.Tensor, y: torch.Tensor, pred: torch.Tensor):
    """timm's ``Mixup`` (in place, soft targets) and the soft-target cross-entropy."""
    from timm.data import Mixup

    mix = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, num_classes=pred.shape[1])

    def step() -> None:
        _, target = mix(x, y)
        torch.sum(-target * F.log_softmax(pred, dim=-1), dim=-1).mean()

    return step, lambda: None


def _train_step(device: torch.device, dtype: torch.dtype, x: torch.Tensor, y: torch.Tensor):
    """One xresnet18 forward, backward and SGD step on ``x`` (bf16 autocast when ``dtype`` is bfloat16 on CUDA)."""
    seed_everything(0)
    model = _xresnet(10).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    autocast = is_cuda(device) and dtype == torch.bfloat16

    def step() -> None:
        ctx = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, lambda: None


def _mix_cases(
    learn: Learner,
    device: torch.device,
    dtype: torch.dtype,
    x: torch.Tensor,
    y: torch.Tensor,
    pred: torch.Tensor,
    timm_installed: bool,
) -> list[tuple[str, str, Callable[[], tuple[Callable[[], Any], Callable[[], None]]]]]:
    """(impl, name, make) per timed row; ``make()`` returns the step to time and what to call after timing it."""
    from fastai.callback.mixup import CutMix as FastaiCutMix
    from fastai.callback.mixup import MixUp as FastaiMixUp

    from fastai_tricks import CutMix, FMix, ManifoldMix, MixUp, RandomMix, ResizeMix, mix_ops

    def pure(fn: Callable[[], Any]) -> Callable[[], tuple[Callable[[], Any], Callable[[], None]]]:
        return lambda: (fn, lambda: None)

    cases = [
        ("reference", "xresnet18 training step", lambda: _train_step(device, dtype, x, y)),
        ("ours", "MixUp", lambda: _our_step(learn, MixUp(), x, y, pred)),
        ("ours", "CutMix", lambda: _our_step(learn, CutMix(), x, y, pred)),
        ("ours", "CutMix(per_sample=True)", lambda: _our_step(learn, CutMix(per_sample=True), x, y, pred)),
        ("ours", "FMix", lambda: _our_step(learn, FMix(), x, y, pred)),
        ("ours", "ResizeMix", lambda: _our_step(learn, ResizeMix(), x, y, pred)),
        ("ours", "ManifoldMix (per-batch work only)", lambda: _our_step(learn, ManifoldMix(), x, y, pred)),
        ("ours", "RandomMix([MixUp, CutMix])", lambda: _our_step(learn, RandomMix([MixUp(), CutMix()]), x, y, pred)),
        ("mix_ops", "mix_ops.mixup", pure(lambda: mix_ops.mixup(x, 0.4))),
        ("mix_ops", "mix_ops.cutmix", pure(lambda: mix_ops.cutmix(x, 1.0))),
        ("mix_ops", "mix_ops.cutmix(per_sample=True)", pure(lambda: mix_ops.cutmix(x, 1.0, per_sample=True))),
        ("mix_ops", "mix_ops.fmix", pure(lambda: mix_ops.fmix(x, 1.0))),
        ("mix_ops", "mix_ops.resizemix", pure(lambda: mix_ops.resizemix(x))),
        ("fastai", "fastai MixUp", lambda: _fastai_step(learn, FastaiMixUp(), x.clone(), y, pred)),
        ("fastai", "fastai CutMix", lambda: _fastai_step(learn, FastaiCutMix(), x.clone(), y, pred)),
    ]
    if timm_installed:
        cases += [
            ("timm", "timm Mixup (mixup_alpha=0.4)", lambda: _timm_step(0.4, 0.0, x.clone(), y, pred)),
            ("timm", "timm Mixup (cutmix_alpha=1.0)", lambda: _timm_step(0.0, 1.0, x.clone(), y, pred)),
        ]
    return cases


def mix_part(device: torch.device, cfg: dict[str, Any], budget: Budget) -> dict[str, Any]:
    """Time every mix's per-batch work against one training step (see the module docstring)."""
    try:
        import timm

        timm_note = f"timm {timm.__version__}"
        timm_installed = True
    except ImportError:
        timm_note, timm_installed = "timm not installed", False
    bs, size, n_classes = cfg["bs"], cfg["size"], 10
    learn = _driven_learner(device)
    rows: list[dict[str, Any]] = []
    for dtype_name in cfg["dtypes"]:
        dtype = getattr(torch, dtype_name)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(bs, 3, size, size, generator=g).to(device=device, dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, n_classes, (bs,), generator=g).to(device)
        pred = torch.randn(bs, n_classes, generator=g).to(device)
        cases = _mix_cases(learn, device, dtype, x, y, pred, timm_installed)
        step_ms = None
        for impl, name, make in cases:
            if budget.over():
                rows.append({"impl": impl, "name": name, "dtype": dtype_name, "skipped": "over the time budget"})
                continue
            repeats = cfg["step_repeats"] if impl == "reference" else cfg["repeats"]
            row: dict[str, Any] = {"impl": impl, "name": name, "dtype": dtype_name}
            try:
                fn, done = make()
                try:
                    row.update(time_ms(fn, device, repeats, cfg["warmup"] if impl != "reference" else 1))
                finally:
                    done()
                if impl == "reference":
                    step_ms = row["ms"]
                elif step_ms:
                    row["pct_of_step"] = round(100 * row["ms"] / step_ms, 3)
            except Exception as err:  # noqa: BLE001 - e.g. a library that refuses bfloat16: recorded, not fatal.
                row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            rows.append(row)
        del x, y, pred
    return {
        "bs": bs,
        "size": size,
        "memory_format": "channels_last",
        "repeats": cfg["repeats"],
        "timer": "CUDA events (ms) and host wall time (wall_ms)" if is_cuda(device) else "time.perf_counter",
        "timm": timm_note,
        "rows": rows,
    }


def mix_table(result: dict[str, Any]) -> str:
    """The mix part as a table."""
    rows = [
        [r["name"], r["impl"], r["dtype"], r.get("ms"), r.get("wall_ms"), r.get("pct_of_step"),
         (r.get("error") or r.get("skipped") or "")[:60] or None]
        for r in result["rows"]
    ]  # fmt: skip
    note = f"\n{result['timm']}" if result["timm"] == "timm not installed" else ""
    return format_table(["work", "impl", "dtype", "ms", "wall ms", "% of step", "note"], rows, digits=3) + note


# --- data for resize and tta -----------------------------------------------------------------------


def _make_part(args: tuple[str, int, int, int]) -> str:
    from fastai_tricks import make_fake_imagenette

    path, n_train, n_valid, seed = args
    return str(make_fake_imagenette(path, n_train=n_train, n_valid=n_valid, seed=seed, full_size=True))


def prepare_data(root: Path, n_train: int, n_valid: int, parts: int) -> dict[str, Any]:
    """Generate full-size JPEGs in ``parts`` processes, one sub-folder each (``root/part<i>/{train,val}/<wnid>``).

    Each process writes ``ceil(n_train / parts)`` training and ``ceil(n_valid / parts)``
    validation images per class with its own seed, so the totals are at least the ones asked.
    """
    from fastai.vision.all import get_image_files

    parts = max(1, min(parts, n_train))
    per_train, per_valid = math.ceil(n_train / parts), math.ceil(n_valid / parts)
    jobs = [(str(root / f"part{i}"), per_train, per_valid, i) for i in range(parts)]
    start = time.perf_counter()
    if parts == 1:
        _make_part(jobs[0])
    else:
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        with ProcessPoolExecutor(max_workers=parts, mp_context=ctx) as pool:
            list(pool.map(_make_part, jobs))
    files = get_image_files(root)
    return {
        "path": str(root),
        "n_train": sum(1 for f in files if f.parent.parent.name == "train"),
        "n_valid": sum(1 for f in files if f.parent.parent.name == "val"),
        "processes": parts,
        "seconds": round(time.perf_counter() - start, 2),
    }


def draft_dls(path: Path, size: int, bs: int, workers: int, device: torch.device) -> DataLoaders:
    """``DraftImageBlock`` loaders: ``Resize(1.25 size)`` items, ``aug_transforms(size=size)`` and normalisation batches."""
    from fastai.vision.all import (
        CategoryBlock,
        DataBlock,
        GrandparentSplitter,
        Normalize,
        Resize,
        aug_transforms,
        get_image_files,
        imagenet_stats,
        parent_label,
    )

    from fastai_tricks import DraftImageBlock

    block = DataBlock(
        blocks=(DraftImageBlock, CategoryBlock),
        get_items=get_image_files,
        get_y=parent_label,
        splitter=GrandparentSplitter(valid_name="val"),
        item_tfms=Resize(round(size * 1.25)),
        batch_tfms=[*aug_transforms(size=size, min_scale=0.75), Normalize.from_stats(*imagenet_stats)],
    )
    return block.dataloaders(path, bs=bs, num_workers=workers, device=device, seed=0)


def vision_learner(dls: DataLoaders, device: torch.device, widen: float = 1.0) -> tuple[Learner, str]:
    """xresnet18 from scratch, channels-last, with fastai's bf16 autocast (fp16 if this fastai has no ``to_bf16``)."""
    import fastai.callback.fp16  # noqa: F401 - patches Learner.to_fp16 / to_bf16
    from fastai.metrics import accuracy

    seed_everything(0)
    model = _xresnet(dls.c, widen).to(device).to(memory_format=torch.channels_last)
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # on CPU, fastai's autocast('cuda') warns that CUDA is unavailable
        if hasattr(learn, "to_bf16"):
            return learn.to_bf16(), "bf16"
        return learn.to_fp16(), "fp16"


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast region fastai's MixedPrecision opens (CUDA only; fastai's is ``autocast('cuda')``)."""
    if not is_cuda(device):
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def warm_up(learn: Learner, device: torch.device, precision: str, size: int, bs: int) -> None:
    """One forward and backward pass at full and half size, so that the first timed fit pays no lazy set-up."""
    model = learn.model
    model.train()
    for s in (size, max(8, size // 2)):
        x = torch.randn(bs, 3, s, s, device=device).contiguous(memory_format=torch.channels_last)
        with _autocast(device, precision):
            out = model(x)
        out.float().mean().backward()
    model.zero_grad(set_to_none=True)
    synchronize(device)


# --- resize ----------------------------------------------------------------------------------------


class _Clock:
    """Training time and time spent waiting for the loader, shared by the two timing callbacks."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.train_s: list[float] = []
        self.wait_s: list[float] = []
        self._start = self._last = 0.0

    def train_start(self) -> None:
        self._start = self._last = time.perf_counter()
        self.wait_s.append(0.0)

    def batch_start(self) -> None:
        self.wait_s[-1] += time.perf_counter() - self._last

    def batch_end(self) -> None:
        self._last = time.perf_counter()

    def train_end(self) -> None:
        synchronize(self.device)
        self.train_s.append(time.perf_counter() - self._start)


class _FirstOfBatch(Callback):
    """Runs first: notes the start of training and of each training batch (the end of the wait for data)."""

    order, run_valid = -100, False

    def __init__(self, clock: _Clock) -> None:
        super().__init__()
        self.clock = clock

    def before_train(self) -> None:
        """Start the epoch's clock."""
        self.clock.train_start()

    def before_batch(self) -> None:
        """The batch arrived."""
        self.clock.batch_start()


class _LastOfBatch(Callback):
    """Runs last: notes the end of each training batch (after the Recorder and the progress bar)."""

    order, run_valid = 1000, False

    def __init__(self, clock: _Clock) -> None:
        super().__init__()
        self.clock = clock

    def after_batch(self) -> None:
        """The batch is done; waiting for the next one starts."""
        self.clock.batch_end()

    def after_train(self) -> None:
        """Stop the epoch's clock."""
        self.clock.train_end()


def timed_fit(learn: Learner, epochs: int, extra_cbs: list, device: torch.device) -> dict[str, Any]:
    """``fit_one_cycle`` with the timing callbacks: training and waiting seconds per epoch, the whole fit's seconds."""
    clock = _Clock(device)
    start = time.perf_counter()
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(epochs, 3e-3, cbs=[_FirstOfBatch(clock), _LastOfBatch(clock), *extra_cbs])
    synchronize(device)
    fit_s = time.perf_counter() - start
    train_s, wait_s = sum(clock.train_s), sum(clock.wait_s)
    return {
        "fit_s": round(fit_s, 3),
        "train_s": round(train_s, 3),
        "wait_s": round(wait_s, 3),
        "wait_share": round(wait_s / train_s, 4) if train_s else None,
        "epoch_train_s": [round(t, 3) for t in clock.train_s],
        "valid_accuracy": float(learn.recorder.values[-1][-1]) if learn.recorder.values else None,
    }


def resize_part(device: torch.device, cfg: dict[str, Any], data: dict[str, Any], budget: Budget) -> dict[str, Any]:
    """A ProgressiveResize fit against a fixed-size fit (see the module docstring)."""
    from fastai_tricks import ProgressiveResize

    size, epochs = cfg["size"], cfg["epochs"]
    dls = draft_dls(Path(data["path"]), size, cfg["bs"], cfg["workers"], device)
    fits: dict[str, Any] = {}
    precision = None
    for name in ("fixed", "progressive"):
        if name == "progressive" and budget.left() < 1.2 * fits["fixed"]["fit_s"]:
            fits[name] = {
                "skipped": f"{budget.left():.0f} s of budget left, the fixed-size fit took {fits['fixed']['fit_s']:.0f} s"
            }
            continue
        learn, precision = vision_learner(dls, device, cfg["widen"])
        warm_up(learn, device, precision, size, cfg["bs"])
        pr = ProgressiveResize(min_epochs=0) if name == "progressive" else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fits[name] = timed_fit(learn, epochs, [pr] if pr else [], device)
        if pr is not None:
            sizes = [tuple(s) for s in pr.sizes]
            fits[name]["sizes"] = {"first": sizes[0], "last": sizes[-1], "distinct": len(set(sizes))} if sizes else None
            full = size * size
            fits[name]["ideal_ratio"] = round(sum(h * w for h, w in sizes) / (len(sizes) * full), 4) if sizes else None
    ratio = None
    if "fit_s" in fits.get("progressive", {}):
        fixed, prog = fits["fixed"], fits["progressive"]
        ratio = {"train": round(prog["train_s"] / fixed["train_s"], 4), "fit": round(prog["fit_s"] / fixed["fit_s"], 4)}
    return {
        "final_size": size,
        "epochs": epochs,
        "bs": cfg["bs"],
        "workers": cfg["workers"],
        "precision": precision if is_cuda(device) else "float32 (fastai's autocast is CUDA-only)",
        "memory_format": "channels_last",
        "model": f"xresnet18(widen={cfg['widen']}) from scratch",
        "loader": "DraftImageBlock, Resize(1.25 size), aug_transforms(size, min_scale=0.75), Normalize",
        "n_train": data["n_train"],
        "n_valid": data["n_valid"],
        "fits": fits,
        "ratio_progressive_over_fixed": ratio,
    }


def resize_table(result: dict[str, Any]) -> str:
    """The resize part as a table."""
    rows = []
    for name, f in result["fits"].items():
        if "skipped" in f:
            rows.append([name, None, None, None, None, f["skipped"][:60]])
            continue
        rows.append([name, f["fit_s"], f["train_s"], f["wait_s"], f["wait_share"], f.get("ideal_ratio")])
    ratio = result["ratio_progressive_over_fixed"]
    text = format_table(["fit", "fit s", "train s", "data wait s", "wait share", "ideal ratio (area)"], rows)
    if ratio:
        text += f"\nprogressive / fixed: training {ratio['train']:.2f}x, whole fit {ratio['fit']:.2f}x"
    return text


# --- tta -------------------------------------------------------------------------------------------


def one_view_option() -> dict[str, int] | None:
    """FourCornerTTA's keyword that sends one view per forward (``{'max_views_per_batch': 1}``), or None if it has none."""
    from fastai_tricks import FourCornerTTA

    params = inspect.signature(FourCornerTTA).parameters
    for name in ("max_views_per_batch", "max_views", "views_per_forward", "views_per_batch"):
        if name in params:
            return {name: 1}
    return None


def _timed_s(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` (synchronised on CUDA)."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def tta_part(device: torch.device, cfg: dict[str, Any], data: dict[str, Any], budget: Budget) -> dict[str, Any]:
    """Each TTA path's time over the ideal D + V M (see the module docstring)."""
    import fastai_tricks.tta  # noqa: F401 - patches Learner.four_corner_tta
    from fastai_tricks import FourCornerTTA

    views = 5
    repeats = cfg["repeats"]
    dls = draft_dls(Path(data["path"]), cfg["size"], cfg["bs"], cfg["workers"], device)
    learn, precision = vision_learner(dls, device, cfg["widen"])
    dl = learn.dls.valid.new(shuffle=False, drop_last=False)
    model = learn.model
    with learn.no_bar(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learn.get_preds(dl=dl)  # warm-up: kernels for both batch shapes, the autocast region, the workers
        learn.get_preds(dl=dl, cbs=FourCornerTTA())

    def one_pass() -> list:
        return [b[0] for b in dl]

    d = _timed_s(one_pass, device, repeats)
    batches = one_pass()
    model.eval()

    def model_pass() -> None:
        with torch.no_grad(), _autocast(device, precision):
            for xb in batches:
                model(xb)

    model_pass()
    m = _timed_s(model_pass, device, repeats)
    batches.clear()  # free the cached batches before the timed paths
    one_view = one_view_option()
    paths: list[tuple[str, int, int, int, Callable[[], Any] | None]] = [
        # name, views, forwards over the set, loader passes, run
        ("plain get_preds", 1, 1, 1, lambda: learn.get_preds(dl=dl)),
        ("learn.four_corner_tta()", views, views + 1, 1, lambda: learn.four_corner_tta(dl=dl)),
        ("FourCornerTTA(), all views in one forward", views, views, 1, lambda: learn.get_preds(dl=dl, cbs=FourCornerTTA())),
        (
            f"FourCornerTTA({', '.join(f'{k}={v}' for k, v in (one_view or {}).items())}), one view per forward",
            views, views, 1,
            (lambda: learn.get_preds(dl=dl, cbs=FourCornerTTA(**one_view))) if one_view else None,
        ),
        ("fastai learn.tta() (n=4)", views, views, views, lambda: learn.tta(dl=dl)),
    ]  # fmt: skip
    rows = []
    for name, v, forwards, passes, fn in paths:
        row: dict[str, Any] = {"name": name, "views": v, "forwards": forwards, "loader_passes": passes}
        if fn is None:
            row["skipped"] = "FourCornerTTA has no option for one view per forward"
        elif budget.over():
            row["skipped"] = "over the time budget"
        else:
            try:
                with learn.no_bar(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    row["seconds"] = round(_timed_s(fn, device, repeats), 4)
                row["ideal_s"] = round(ideal_seconds(d, v, m), 4)
                row["ratio"] = round(row["seconds"] / row["ideal_s"], 4)
                # Against the model passes it really makes (four_corner_tta adds the plain view).
                row["ratio_to_its_forwards"] = round(row["seconds"] / ideal_seconds(d, forwards, m), 4)
            except Exception as err:  # noqa: BLE001 - one path's failure is recorded, the others still run.
                row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        rows.append(row)
    return {
        "size": cfg["size"],
        "bs": cfg["bs"],
        "workers": cfg["workers"],
        "precision": precision if is_cuda(device) else "float32",
        "model": f"xresnet18(widen={cfg['widen']})",
        "n_images": len(dl.dataset),
        "views": views,
        "D_s": round(d, 4),
        "M_s": round(m, 4),
        "note": "the crops are resized back to the input size (resize=True), so M is one forward at the input size",
        "paths": rows,
    }


def tta_table(result: dict[str, Any]) -> str:
    """The tta part as a table."""
    rows = [
        [r["name"], r["views"], r["forwards"], r["loader_passes"], r.get("seconds"), r.get("ideal_s"), r.get("ratio"),
         (r.get("error") or r.get("skipped") or "")[:60] or None]
        for r in result["paths"]
    ]  # fmt: skip
    head = f"D = {result['D_s']:.3f} s, M = {result['M_s']:.3f} s, {result['n_images']} images\n"
    headers = ["path", "V", "forwards", "loader passes", "time s", "ideal D+V·M s", "time / ideal", "note"]
    return head + format_table(headers, rows, digits=3)


# --- main ------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=["cuda", "cpu"], default=default_device, help=f"default: {default_device}")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run (CI runs it on CPU)")
    parser.add_argument(
        "--out", default=None, help="JSON path (default: benchmarks/results/device_check_<device>.json)"
    )
    parser.add_argument("--only", default=None, help=f"comma-separated parts to run, of {','.join(PARTS)}")
    parser.add_argument("--cases", default=None, help="syncs part: only the cases whose name contains one of these")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds before skipping parts")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False here; use --device cpu")
    try:
        args.parts = parse_only(args.only)
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen parts, print their tables and write the JSON; 1 if a part raised, else 0."""
    args = parse_args(argv)
    budget = Budget(args.budget)
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(line_buffering=True)  # a run cut short still shows what it printed
    device = torch.device(args.device)
    cpu_count = os.cpu_count() or 1
    cfg = plan(device.type, args.quick, cpu_count)
    hardware = hardware_info(device)
    slug = device_slug(str(hardware["device_name"])) if is_cuda(device) else "cpu"
    if slug.startswith("unknown"):
        slug = "cuda"
    out = Path(args.out) if args.out else default_out_path(slug, args.quick)
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "hardware": hardware,
        "settings": {"quick": args.quick, "parts": args.parts, "budget_s": args.budget, "plan": cfg},
        "parts": {},
        "total_seconds": 0.0,
    }
    print(f"device check on {hardware['device_name']} ({device}), torch {torch.__version__}, parts {args.parts}")
    data: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="device_check_") as tmp:
        if {"resize", "tta"} & set(args.parts):
            d = cfg["data"]
            doc["parts"]["data"] = run_part(
                "data", lambda: prepare_data(Path(tmp), d["n_train"], d["n_valid"], d["parts"]), budget, device
            )
            data = doc["parts"]["data"].get("result")
            if data is not None:
                print(
                    f"data: {data['n_train']} training and {data['n_valid']} validation JPEGs in {data['seconds']:.1f} s"
                )
            else:
                print(f"data: {doc['parts']['data'].get('error') or doc['parts']['data'].get('note')}")
        runners: dict[str, Callable[[], Any]] = {
            "syncs": lambda: syncs_part(device, cfg["syncs"], budget, args.cases),
            "mix": lambda: mix_part(device, cfg["mix"], budget),
            "resize": lambda: resize_part(device, cfg["resize"], _need(data), budget),
            "tta": lambda: tta_part(device, cfg["tta"], _need(data), budget),
        }
        tables = {"syncs": syncs_table, "mix": mix_table, "resize": resize_table, "tta": tta_table}
        for name in args.parts:
            doc["parts"][name] = part = run_part(name, runners[name], budget, device)
            doc["total_seconds"] = round(budget.elapsed(), 2)
            write_json(doc, out)
            print(f"\n## {name}: {part['status']} ({part.get('seconds', 0):.1f} s)\n")
            if part["status"] == "ok":
                try:
                    print(tables[name](part["result"]))
                except Exception as err:  # noqa: BLE001 - the JSON has the figures; the table is a view of them.
                    print(f"(no table: {type(err).__name__}: {err}; the figures are in {out})")
            else:
                print(part.get("error") or part.get("note"))
                print(part.get("traceback", "")[-1500:])
    doc["total_seconds"] = round(budget.elapsed(), 2)
    write_json(doc, out)
    failed = [n for n, p in doc["parts"].items() if p["status"] == "error"]
    syncs = doc["parts"].get("syncs", {}).get("result")
    if syncs is not None:
        print(f"\nour callbacks add no sync per batch: {'yes' if syncs['all_ours_pass'] else 'NO'}")
    print(f"\nwrote {out} in {doc['total_seconds']:.0f} s" + (f"; parts that raised: {failed}" if failed else ""))
    return 1 if failed else 0


def _need(data: dict[str, Any] | None) -> dict[str, Any]:
    if data is None:
        raise RuntimeError("the generated data set is missing: the 'data' step failed or was skipped (see parts.data)")
    return data


if __name__ == "__main__":
    sys.exit(main())
