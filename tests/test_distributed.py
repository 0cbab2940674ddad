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
import re
import shlex
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
DOCS = REPO / "docs" / "distributed.md"
WORLD = 2
# How many times the documented CPU launch runs in a row; every launch must exit 0.
LAUNCHES = int(os.environ.get("FASTAI_TRICKS_DDP_LAUNCHES", "3"))


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


def _single_process_env(monkeypatch):
    """The environment torchrun gives a world of one process, on a free local port."""
    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "RANK": "0",
        "WORLD_SIZE": "1",
    }.items():
        monkeypatch.setenv(key, value)


def test_shimmed_setup_distrib_and_broadcast_work_in_a_gloo_group_without_cuda(no_shim, monkeypatch):
    _single_process_env(monkeypatch)
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


def test_enable_cpu_ddp_registers_the_exit_hook_once(no_shim, monkeypatch):
    registered = []
    monkeypatch.setattr(ftd, "_exit_hook_registered", False)
    monkeypatch.setattr(ftd.atexit, "register", registered.append)
    ftd.enable_cpu_ddp()
    ftd.enable_cpu_ddp()
    ftd.disable_cpu_ddp()
    ftd.enable_cpu_ddp()
    assert registered == [ftd._leave_gloo_group_at_exit]


def test_exit_hook_destroys_a_live_gloo_group_and_is_a_no_op_without_one(monkeypatch):
    _single_process_env(monkeypatch)
    ftd._leave_gloo_group_at_exit()  # no group: nothing to do, nothing raised
    dist.init_process_group("gloo")
    try:
        assert dist.is_initialized()
        ftd._leave_gloo_group_at_exit()
        assert not dist.is_initialized()
        ftd._leave_gloo_group_at_exit()  # already destroyed (by the hook or the user): still fine
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_exit_hook_leaves_an_nccl_group_to_its_owner(monkeypatch):
    destroyed = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a: destroyed.append(a))
    for backend in ("nccl", "cuda:nccl,cpu:gloo"):
        monkeypatch.setattr(dist, "get_backend", lambda *a, b=backend: b)
        ftd._leave_gloo_group_at_exit()
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    ftd._leave_gloo_group_at_exit()
    assert destroyed == [()]


# --- two processes under torchrun ----------------------------------------------------------------------


def _documented_cpu_launch() -> list[list[str]]:
    """The shell lines of docs/distributed.md's CPU section, the block that runs ``torchrun``."""
    text = DOCS.read_text(encoding="utf-8")
    section = text[text.index("## Running it on CPU") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block and "torchrun" in block.group(1), "the CPU section no longer shows a torchrun launch"
    return [shlex.split(line) for line in block.group(1).splitlines() if line.strip()]


def test_the_docs_show_the_tested_script_verbatim():
    assert "```{literalinclude} ../examples/train_ddp.py" in DOCS.read_text(encoding="utf-8")
    assert any("train_ddp.py" in argv for argv in _documented_cpu_launch())


@pytest.mark.distributed
def test_the_documented_cpu_launch_exits_0_every_time(tmp_path):
    """The docs' two commands, verbatim but for the interpreter and a free port, ``LAUNCHES`` times in a row.

    The script has no clean-up line of its own: ``enable_cpu_ddp``'s exit hook must end the gloo group
    so that no launch dies at interpreter exit after training (``terminate called ...``, exit -6).
    """
    pytest.importorskip("accelerate")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    launches = []
    for argv in _documented_cpu_launch():
        assignments = {}
        while "=" in argv[0] and not argv[0].startswith("-"):
            key, value = argv.pop(0).split("=", 1)
            assignments[key] = value
        if argv[0] == "torchrun":
            script = [str(REPO / "examples" / a) if a == "train_ddp.py" else a for a in argv[1:]]
            launches.append((script, {**env, **assignments}))
        else:
            assert argv[0] == "python", argv
            subprocess.run([sys.executable, *argv[1:]], env={**env, **assignments}, cwd=tmp_path, check=True)
    assert len(launches) == 1, "expected exactly one torchrun line"
    (args, launch_env), codes = launches[0], []
    for i in range(LAUNCHES):
        for old in tmp_path.rglob("model.pkl"):
            old.unlink()
        port = ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]  # a fresh one: no TIME_WAIT clash
        argv = [sys.executable, "-m", "torch.distributed.run", *port, *args]
        proc = subprocess.run(argv, env=launch_env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        codes.append(proc.returncode)
        if proc.returncode != 0:
            pytest.fail(
                f"launch {i + 1} of {LAUNCHES} exited {proc.returncode} (codes so far: {codes})\n"
                f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
            )
        assert "four-corner TTA accuracy:" in proc.stdout
        assert list(tmp_path.rglob("model.pkl")), "rank 0 exported nothing"  # learn.export writes under learn.path
        assert "terminate called" not in proc.stderr
    assert codes == [0] * LAUNCHES


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
