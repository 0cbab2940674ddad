"""Every multi-process check of tests/test_distributed.py, run once per rank under torchrun.

Launched as ``python -m torch.distributed.run --nproc_per_node 2 worker.py DATA OUT`` on CPU
with gloo. Each check is a function that returns a JSON-able dict; a check that raises records
its traceback instead, so one broken feature does not hide the others. Rank r writes
``OUT/rank{r}.json`` (and tensors ``OUT/tta_rank{r}.pt``); pytest asserts on those files.

Probes only read the batch (they never change it), so what they record is what each feature did.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the conftest helpers

from conftest import make_tiny_dls, seed_everything, tiny_cnn  # noqa: E402
from fastai.callback.core import Callback  # noqa: E402
from fastai.distributed import DistributedDL  # noqa: E402
from fastai.learner import Learner  # noqa: E402
from fastai.losses import CrossEntropyLossFlat  # noqa: E402
from fastai.vision.all import get_image_files  # noqa: E402

import fastai_tricks.distributed as ftd  # noqa: E402

RANK = int(os.environ["RANK"])
WORLD = int(os.environ["WORLD_SIZE"])


def ctx_kwargs() -> dict[str, Any]:
    """``distrib_ctx`` arguments for CPU: gloo via ``cpu=True``, no SyncBatchNorm, a short hang timeout."""
    from accelerate.utils import InitProcessGroupKwargs

    return {"cpu": True, "sync_bn": False, "kwargs_handlers": [InitProcessGroupKwargs(timeout=timedelta(seconds=90))]}


def new_learner(path: Path, **dls_kwargs: Any) -> Learner:
    """The conftest ``tiny_learner``: same seed, hence same weights and data order, on every rank."""
    seed_everything(0)
    dls = make_tiny_dls(path, **dls_kwargs)
    learn = Learner(dls, tiny_cnn(), loss_func=CrossEntropyLossFlat())
    learn.recorder.train_metrics = False
    return learn


def digest(t: torch.Tensor) -> str:
    """A short hash of a tensor's exact values, to compare batches across ranks."""
    return hashlib.sha1(t.detach().cpu().contiguous().float().numpy().tobytes()).hexdigest()[:16]


def params_digest(model: torch.nn.Module) -> str:
    """A hash of every parameter and buffer, to prove DDP kept the replicas identical."""
    h = hashlib.sha1()
    for t in model.state_dict().values():
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class Snapshot(Callback):
    """Keep a copy of each training input at ``before_batch``, at a chosen point of the callback order."""

    def __init__(self, order: int):
        self.order = order
        self.xs: list[torch.Tensor] = []

    def before_batch(self) -> None:
        if self.learn.training:
            self.xs.append(self.learn.xb[0].detach().clone())


# --- checks ------------------------------------------------------------------------------------------


def check_needs_shim(path: Path) -> dict[str, Any]:
    """Without the shim, fastai's DDP path must fail on a CPU-only machine (guards the shim's reason to exist)."""
    if torch.cuda.is_available():
        return {"skipped": "CUDA is available"}
    ftd.disable_cpu_ddp()
    learn = new_learner(path)  # thrown away: a failed fit leaves fastai's DDP wrappers on it
    try:
        with learn.distrib_ctx(**ctx_kwargs()):
            learn.fit(1)
    except Exception as err:  # noqa: BLE001 - the point is to see which error fastai raises
        return {"raised": type(err).__name__, "message": str(err)[:300]}
    return {"raised": None}


def check_plain_fit(path: Path) -> dict[str, Any]:
    """A plain fit under distrib_ctx with the shim; what each rank saw and where the learner ended."""
    ftd.enable_cpu_ddp()
    ftd.enable_cpu_ddp()  # idempotent
    learn = new_learner(path)
    snap = Snapshot(order=0)
    with learn.distrib_ctx(**ctx_kwargs()):
        learn.fit(1, cbs=snap)
        helpers = {
            "rank_and_world": list(ftd.rank_and_world()),
            "is_distributed": ftd.is_distributed(),
            "broadcast": ftd.broadcast_object(f"from rank {RANK}"),
            "gathered": ftd.gather_objects(RANK),
        }
    return {
        "shim_enabled": ftd.cpu_ddp_enabled(),
        "backend": str(torch.distributed.get_backend()),
        "values": [list(map(float, v)) for v in learn.recorder.values],
        "batch_sizes": [int(x.shape[0]) for x in snap.xs],
        "batch_digests": [digest(x) for x in snap.xs],
        "params": params_digest(learn.model),
        "model_after": type(learn.model).__name__,
        "loaders_after": [type(dl).__name__ for dl in learn.dls.loaders],
        "n_train_items": len(learn.dls.train_ds),
        "helpers": helpers,
    }


def _mixup_residual(x: torch.Tensor, mixed: torch.Tensor) -> float:
    """Largest distance from a mixed row to the best blend ``λ x[i] + (1 - λ) x[j]`` of the batch's own rows."""
    xf, mf = x.flatten(1).double(), mixed.flatten(1).double()
    worst = 0.0
    for i in range(len(xf)):
        d = xf[i] - xf  # (B, D): x_i - x_j for every partner j
        lam = ((mf[i] - xf) * d).sum(1) / (d * d).sum(1).clamp_min(1e-30)
        lam = torch.where((d * d).sum(1) > 0, lam.clamp(0, 1), torch.ones_like(lam))
        blend = xf + lam[:, None] * d
        worst = max(worst, float((blend - mf[i]).abs().amax(1).min()))
    return worst


def _cutmix_residual(x: torch.Tensor, mixed: torch.Tensor) -> int:
    """Number of mixed rows that are not, pixel for pixel, their own image or one partner of the same batch."""
    bad = 0
    for i in range(len(x)):
        ok = ((mixed[i] == x[i]) | (mixed[i] == x)).flatten(1).all(1)
        bad += int(not bool(ok.any()))
    return bad


def check_mixing(path: Path) -> dict[str, Any]:
    """MixUp and CutMix under DDP: every mixed row comes from the rank's own local batch."""
    from fastai_tricks.mixing import CutMix, MixUp

    out: dict[str, Any] = {}
    for name, mix, residual in (("MixUp", MixUp(alpha=1.0), _mixup_residual), ("CutMix", CutMix(), _cutmix_residual)):
        learn = new_learner(path)
        before, after = Snapshot(order=mix.order - 1), Snapshot(order=mix.order + 1)
        with learn.distrib_ctx(**ctx_kwargs()):
            learn.fit(1, cbs=[mix, before, after])
        out[name] = {
            "batch_sizes": [int(x.shape[0]) for x in before.xs],
            "changed": [not torch.equal(a, b) for a, b in zip(before.xs, after.xs, strict=True)],
            "residual": [residual(a, b) for a, b in zip(before.xs, after.xs, strict=True)],
            "input_digests": [digest(x) for x in before.xs],
            "loss_finite": all(torch.isfinite(torch.tensor(v)).all().item() for v in learn.recorder.values),
        }
    return out


class _SizeProbe(Callback):
    """Record, at every training batch, the step counters and the size the model gets."""

    order = 1  # after ProgressiveResize (-5) and any mixing callback (0)

    def __init__(self, mix: Any):
        self.mix = mix
        self.rows: list[list[Any]] = []

    def before_batch(self) -> None:
        if self.learn.training:
            x = self.learn.xb[0]
            self.rows.append([self.learn.epoch, self.learn.iter, self.learn.n_iter, list(x.shape[-2:]), self.mix.alpha])


def check_resize(path: Path) -> dict[str, Any]:
    """ProgressiveResize (with a mix_alpha schedule) under DDP: sizes and alphas per iteration."""
    from fastai_tricks.mixing import MixUp
    from fastai_tricks.resizing import ProgressiveResize, resize_schedule

    learn = new_learner(path)
    mix = MixUp(alpha=0.4)
    resize = ProgressiveResize(min_epochs=0, initial_size=0.5, start=0.0, finish=1.0, mix_alpha=(0.1, 0.4))
    probe = _SizeProbe(mix)
    n_epoch = 2
    with learn.distrib_ctx(**ctx_kwargs()):
        learn.fit(n_epoch, cbs=[resize, mix, probe])
    n_iter = probe.rows[0][2]
    expected = resize_schedule(n_epoch, n_iter, 32, initial_size=0.5, start=0.0, finish=1.0)
    return {
        "rows": probe.rows,
        "sizes": [list(s) for s in resize.sizes],
        "expected": [list(expected[e * n_iter + i]) for e, i, *_ in probe.rows],
        "alpha_after": mix.alpha,
    }


def check_tta(path: Path, out: Path) -> dict[str, Any]:
    """FourCornerTTA through get_preds and four_corner_tta on 19 images (odd: rank 1's shard gets padded)."""
    from fastai_tricks.tta import FourCornerTTA

    learn = new_learner(path)
    files = sorted(get_image_files(path / "val"))[:19]
    dl = learn.dls.test_dl(files, with_labels=True)
    with learn.distrib_ctx(**ctx_kwargs()):
        inps, preds, targs = learn.get_preds(dl=dl, with_input=True, cbs=FourCornerTTA(flip=True))
        blended, btargs = learn.four_corner_tta(dl=dl, beta=0.5)
    if RANK == 0:
        torch.save(learn.model.state_dict(), out / "tta_model.pt")
    saved = {"preds": preds, "targs": targs, "inps": inps, "blended": blended, "btargs": btargs, "files": files}
    plain = {k: v if k == "files" else v.detach().as_subclass(torch.Tensor) for k, v in saved.items()}
    torch.save(plain, out / f"tta_rank{RANK}.pt")
    return {"n": len(preds), "model_after": type(learn.model).__name__}


def check_stats(path: Path) -> dict[str, Any]:
    """dataset_stats on DataLoaders and on a file list, inside distrib_ctx (the process group exists)."""
    from fastai_tricks.normalization import dataset_stats

    learn = new_learner(path)
    files = sorted(get_image_files(path / "train"))
    with learn.distrib_ctx(**ctx_kwargs()):
        assert ftd.is_distributed()
        from_dls = dataset_stats(learn.dls, progress=False)
        from_files = dataset_stats(files, progress=False)
    # repr keeps every digit of the floats, so "identical" below means bit-identical
    return {"dls": repr(from_dls), "files": repr(from_files)}


def main() -> None:
    """Run every check on this rank and write ``OUT/rank{RANK}.json``."""
    path, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    checks: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("needs_shim", lambda: check_needs_shim(path)),
        ("plain_fit", lambda: check_plain_fit(path)),
        ("mixing", lambda: check_mixing(path)),
        ("resize", lambda: check_resize(path)),
        ("tta", lambda: check_tta(path, out)),
        ("stats", lambda: check_stats(path)),
    ]
    results: dict[str, Any] = {"rank": RANK, "world": WORLD}
    for name, fn in checks:
        t0 = time.perf_counter()
        try:
            results[name] = {"ok": True, **fn()}
        except Exception:  # noqa: BLE001 - recorded for pytest to show
            results[name] = {"ok": False, "error": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)
    ftd.disable_cpu_ddp()
    results["shim_restored"] = not ftd.cpu_ddp_enabled() and not hasattr(DistributedDL._broadcast, "__wrapped__")
    (out / f"rank{RANK}.json").write_text(json.dumps(results, indent=1))
    # No clean-up of the process group here: enable_cpu_ddp's exit hook destroys it, as in a user's script.


if __name__ == "__main__":
    main()
