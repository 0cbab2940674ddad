"""Distributed training: the CPU shim for fastai's DDP path, the rank helpers, and every feature under DDP.

The multi-process tests share one ``torchrun --nproc_per_node 2`` launch on CPU with gloo
(``tests/distributed/worker.py`` runs every check and writes a JSON file per rank), because each
launch spends most of its time importing fastai. The single-process references (TTA predictions,
dataset statistics) are computed here, in this process, from the same data and weights.
"""

from __future__ import annotations

import ast
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import fastai_tricks.distributed as ftd

fd = pytest.importorskip("fastai.distributed")

WORKER = Path(__file__).parent / "distributed" / "worker.py"
REPO = Path(__file__).resolve().parents[1]
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the shim and the helpers in this process ----------------------------------------------------------


@pytest.fixture
def no_shim():
    """Start and end with fastai's own functions in place, whatever a test does."""
    ftd.disable_cpu_ddp()
    yield
    ftd.disable_cpu_ddp()


def test_enable_cpu_ddp_is_idempotent_and_disable_puts_fastais_functions_back(no_shim):
    broadcast, setup = fd.DistributedDL._broadcast, fd.setup_distrib
    assert not ftd.cpu_ddp_enabled()
    ftd.enable_cpu_ddp()
    patched = fd.DistributedDL._broadcast, fd.setup_distrib
    ftd.enable_cpu_ddp()
    assert ftd.cpu_ddp_enabled()
    assert (fd.DistributedDL._broadcast, fd.setup_distrib) == patched
    assert patched[0].__wrapped__ is broadcast and patched[1].__wrapped__ is setup
    ftd.disable_cpu_ddp()
    ftd.disable_cpu_ddp()
    assert not ftd.cpu_ddp_enabled()
    assert fd.DistributedDL._broadcast is broadcast and fd.setup_distrib is setup


def test_cpu_ddp_context_manager_leaves_the_shim_as_it_found_it(no_shim):
    broadcast = fd.DistributedDL._broadcast
    with ftd.cpu_ddp():
        assert ftd.cpu_ddp_enabled()
        with ftd.cpu_ddp():
            assert ftd.cpu_ddp_enabled()
        assert ftd.cpu_ddp_enabled()  # the inner block did not undo the outer one
    assert fd.DistributedDL._broadcast is broadcast
    ftd.enable_cpu_ddp()
    with pytest.raises(KeyboardInterrupt), ftd.cpu_ddp():
        raise KeyboardInterrupt
    assert ftd.cpu_ddp_enabled()  # enabled before the block, so still enabled after it


@pytest.mark.parametrize(
    ("backend", "nccl"),
    [("nccl", True), ("NCCL", True), ("cuda:nccl,cpu:gloo", True), ("gloo", False), ("mpi", False)],
)
def test_shim_recognises_which_backends_need_cuda_tensors(backend, nccl):
    assert ftd._uses_nccl(backend) is nccl


def test_shim_runs_fastais_own_code_on_an_nccl_or_cuda_run(no_shim, monkeypatch):
    calls = []
    ftd.enable_cpu_ddp()
    monkeypatch.setitem(ftd._originals, "broadcast", lambda self, t, rank: calls.append(("broadcast", t)) or t)
    monkeypatch.setitem(ftd._originals, "setup_distrib", lambda gpu=None: calls.append(("setup", gpu)) or gpu)
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "cuda:nccl,cpu:gloo")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fd.DistributedDL._broadcast(None, [2, 0, 1], 0) == [2, 0, 1]
    assert fd.setup_distrib(1) == 1
    assert calls == [("broadcast", [2, 0, 1]), ("setup", 1)]


def test_rank_helpers_without_a_process_group_act_as_one_process():
    assert not dist.is_initialized()
    obj = {"size": (16, 16)}
    assert ftd.rank_and_world() == (0, 1)
    assert not ftd.is_distributed()
    assert ftd.broadcast_object(obj) is obj
    assert ftd.gather_objects(obj) == [obj]


def test_shimmed_setup_distrib_and_broadcast_work_in_a_gloo_group_without_cuda(no_shim, monkeypatch):
    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "RANK": "0",
        "WORLD_SIZE": "1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    try:
        with ftd.cpu_ddp():
            assert fd.setup_distrib(0) == 0
            assert dist.is_initialized() and dist.get_backend() == "gloo"
            assert fd.DistributedDL._broadcast(None, [3, 1, 2], 0) == [3, 1, 2]
            assert ftd.rank_and_world() == (0, 1)
            assert ftd.gather_objects("a") == ["a"]
    finally:
        fd.teardown_distrib()
    assert not dist.is_initialized()


# --- two processes under torchrun ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp(fake_imagenette, tmp_path_factory):
    """Run tests/distributed/worker.py on 2 CPU processes once; return ``{rank: results}`` and the output folder."""
    pytest.importorskip("accelerate")  # distrib_ctx needs it; the shim's own tests above do not
    out = tmp_path_factory.mktemp("ddp")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(WORLD),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(WORKER),
        str(fake_imagenette),
        str(out),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"torchrun timed out after 300 s\n--- stdout ---\n{err.stdout}\n--- stderr ---\n{err.stderr}")
    files = [out / f"rank{r}.json" for r in range(WORLD)]
    if proc.returncode != 0 or not all(f.exists() for f in files):
        pytest.fail(
            f"torchrun failed (rc={proc.returncode})\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
        )
    return {r: json.loads(f.read_text()) for r, f in enumerate(files)}, out


def _check(ddp, name: str) -> list[dict]:
    """The results of check ``name`` on every rank, failing with the worker's traceback if it raised."""
    results, _ = ddp
    per_rank = [results[r][name] for r in range(WORLD)]
    for r, res in enumerate(per_rank):
        if not res["ok"]:
            pytest.fail(f"check {name!r} raised on rank {r}:\n{res['error']}")
    return per_rank


@pytest.mark.distributed
def test_fastai_ddp_path_fails_on_cpu_without_the_shim(ddp):
    for res in _check(ddp, "needs_shim"):
        if "skipped" in res:
            pytest.skip(res["skipped"])
        # fastai calls .cuda(): "Found no NVIDIA driver" (CUDA wheels) or "Torch not compiled with CUDA" (CPU wheels).
        assert res["raised"] is not None, "fastai's DistributedDL now works on CPU: the shim may no longer be needed"
        assert "NVIDIA" in res["message"] or "CUDA" in res["message"]


@pytest.mark.distributed
def test_plain_fit_under_distrib_ctx_works_on_cpu_with_the_shim(ddp):
    r0, r1 = _check(ddp, "plain_fit")
    for res in (r0, r1):
        assert res["shim_enabled"] and res["backend"] == "gloo"
        assert res["model_after"] == "Sequential"  # DDP wrapper removed after fit
        assert res["loaders_after"] == ["TfmdDL", "TfmdDL"]  # DistributedDL wrappers removed
        assert len(res["batch_sizes"]) >= 1
        assert WORLD * sum(res["batch_sizes"]) <= res["n_train_items"]
    assert r0["params"] == r1["params"], "DDP replicas diverged"
    assert r0["values"] == r1["values"], "recorded losses differ between ranks"
    assert not set(r0["batch_digests"]) & set(r1["batch_digests"]), "ranks trained on the same batches"


@pytest.mark.distributed
def test_rank_helpers_agree_across_ranks(ddp):
    for rank, res in enumerate(_check(ddp, "plain_fit")):
        helpers = res["helpers"]
        assert helpers["rank_and_world"] == [rank, WORLD]
        assert helpers["is_distributed"] is True
        assert helpers["broadcast"] == "from rank 0"
        assert helpers["gathered"] == list(range(WORLD))


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["MixUp", "CutMix"])
def test_each_rank_mixes_its_own_batch(ddp, name):
    ranks = [res[name] for res in _check(ddp, "mixing")]
    for res in ranks:
        assert res["loss_finite"]
        assert all(res["changed"]), "a training batch was not mixed"
        assert res["batch_sizes"] == [8] * len(res["batch_sizes"])  # the local batch, not a gathered one
        if name == "MixUp":  # every row is λ x[i] + (1 - λ) x[j] of the rank's own batch
            assert max(res["residual"]) < 1e-5
        else:  # every row is, pixel for pixel, its own image or one partner from the rank's own batch
            assert res["residual"] == [0] * len(res["residual"])
    assert not set(ranks[0]["input_digests"]) & set(ranks[1]["input_digests"])


@pytest.mark.distributed
def test_progressive_resize_uses_the_same_size_on_every_rank_at_every_iteration(ddp):
    r0, r1 = _check(ddp, "resize")
    assert r0["rows"] == r1["rows"]  # (epoch, iter, n_iter, input size, mixing alpha) at every batch
    assert r0["sizes"] == r1["sizes"] == r0["expected"]
    assert [row[3] for row in r0["rows"]] == r0["sizes"]  # the model got the recorded size
    assert len({tuple(s) for s in r0["sizes"]}) > 2, "the schedule did not grow, the check proves nothing"
    assert r0["alpha_after"] == r1["alpha_after"] == 0.4


@pytest.mark.distributed
def test_four_corner_tta_gathers_merged_predictions_like_a_single_process(ddp, fake_imagenette):
    from conftest import make_tiny_dls, tiny_cnn
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat

    from fastai_tricks.tta import FourCornerTTA

    for res in _check(ddp, "tta"):
        assert res["n"] == 19 and res["model_after"] == "Sequential"
    _, out = ddp
    got = [torch.load(out / f"tta_rank{r}.pt", weights_only=False) for r in range(WORLD)]
    learn = Learner(make_tiny_dls(fake_imagenette), tiny_cnn(), loss_func=CrossEntropyLossFlat())
    learn.model.load_state_dict(torch.load(out / "tta_model.pt"))
    dl = learn.dls.test_dl(got[0]["files"], with_labels=True)
    with learn.no_bar():
        inps, preds, targs = learn.get_preds(dl=dl, with_input=True, cbs=FourCornerTTA(flip=True))
        blended, btargs = learn.four_corner_tta(dl=dl, beta=0.5)

    for g in got:  # every rank holds the whole, gathered result
        for key in ("preds", "targs", "inps", "blended", "btargs"):
            assert torch.equal(g[key], got[0][key])
    # DDP gathers batch by batch across ranks, so rows come in another order: find it from the inputs.
    flat, ref = got[0]["inps"].flatten(1), inps.flatten(1)
    match = (flat[:, None] == ref[None]).all(-1)  # (ddp row, single-process row)
    assert match.sum(1).tolist() == [1] * len(ref), "padding left in, or an input lost, by the gather"
    order = match.float().argmax(1)
    assert sorted(order.tolist()) == list(range(len(ref)))
    assert torch.equal(got[0]["targs"], targs[order])
    assert torch.equal(got[0]["btargs"], btargs[order])
    torch.testing.assert_close(got[0]["preds"], preds[order], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0]["blended"], blended[order], rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
def test_dataset_stats_are_identical_on_every_rank_and_equal_single_process_stats(ddp, fake_imagenette):
    from conftest import make_tiny_dls
    from fastai.vision.all import get_image_files

    from fastai_tricks.normalization import dataset_stats

    r0, r1 = _check(ddp, "stats")
    assert r0["dls"] == r1["dls"] and r0["files"] == r1["files"]  # repr of the floats: bit-identical
    expected = {
        "dls": dataset_stats(make_tiny_dls(fake_imagenette), progress=False),
        "files": dataset_stats(sorted(get_image_files(fake_imagenette / "train")), progress=False),
    }
    for key, (mean, std) in expected.items():
        got_mean, got_std = ast.literal_eval(r0[key])
        # Shards group the pixels into other batches than one pass does, so they may differ by
        # dataset_stats' own accuracy (float32 sums per image, about 1e-8 relative), not more.
        assert got_mean == pytest.approx(mean, rel=1e-6)
        assert got_std == pytest.approx(std, rel=1e-6)


@pytest.mark.distributed
def test_every_worker_can_undo_the_shim(ddp):
    results, _ = ddp
    assert all(results[r]["shim_restored"] for r in range(WORLD))
