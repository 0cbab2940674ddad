"""Tests of benchmarks/device_check.py, the prepared GPU check (issue #21, part 3).

There is no GPU here, so the CUDA-only branches are driven with fakes: a recording
``set_sync_debug_mode`` and a planted callback that warns or raises like CUDA's sync debug mode,
fake CUDA events for the timer and fake device properties for the hardware record. The CPU path
runs for real: its pure helpers, and ``--device cpu --quick --only syncs`` in a subprocess.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from fastai.callback.core import Callback

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.py"


def _load():
    if "device_check" in sys.modules:
        return sys.modules["device_check"]
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["device_check"] = module  # dataclasses, pickling and forked workers look it up by name
    spec.loader.exec_module(module)
    return module


dc = _load()


# --- pure helpers ----------------------------------------------------------------------------------


def test_ideal_time_is_one_decode_plus_one_model_pass_per_view():
    assert dc.ideal_seconds(2.0, 5, 0.5) == 4.5
    assert dc.ideal_seconds(1.0, 1, 0.25) == 1.25


def test_slopes_cancel_syncs_made_once_per_fit():
    # 3 syncs once per fit plus 2 per batch: 5 on 1 batch, 7 on 2; the baseline syncs once per fit only.
    assert dc.slope(5, 7, 1) == 2.0
    assert dc.added_per_batch((5, 7), (1, 1), 1) == 2.0
    assert dc.added_per_batch((4, 4), (1, 1), 2) == 0.0
    with pytest.raises(ValueError, match="positive"):
        dc.slope(0, 0, 0)


def test_device_slug_and_default_out_path():
    assert dc.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert dc.device_slug("  ") == "device"
    assert dc.default_out_path("cpu", quick=True).name == "device_check_cpu_quick.json"
    assert dc.default_out_path("nvidia-h200", quick=False) == dc.RESULTS_DIR / "device_check_nvidia-h200.json"


def test_parse_only_keeps_the_run_order_and_refuses_unknown_parts():
    assert dc.parse_only(None) == list(dc.RUN_ORDER)
    assert dc.parse_only("all") == list(dc.RUN_ORDER)
    assert dc.parse_only("resize, syncs") == ["syncs", "resize"]
    with pytest.raises(ValueError, match="sync"):
        dc.parse_only("sync")


def test_format_table_aligns_numbers_and_formats_cells():
    table = dc.format_table(["name", "ms", "pass"], [["a", 1.23456, True], ["b", None, False]], digits=3)
    assert table.splitlines() == [
        "| name | ms | pass |",
        "|---|---:|---|",
        "| a | 1.235 | yes |",
        "| b | - | NO |",
    ]
    with pytest.raises(ValueError, match="2 cells for 3 headers"):
        dc.format_table(["a", "b", "c"], [[1, 2]])
    assert dc.fmt(float("nan")) == "nan" and dc.fmt(3) == "3"
    assert dc.fmt("Error in `MixUp`:\n\tcalled a | b") == "Error in `MixUp`: called a / b"


def test_plan_sizes():
    cuda = dc.plan("cuda", quick=False, cpu_count=16)
    assert cuda["mix"]["bs"] == 256 and cuda["mix"]["size"] == 224 and "bfloat16" in cuda["mix"]["dtypes"]
    assert cuda["resize"]["size"] == 224 and cuda["resize"]["workers"] >= 8 and cuda["tta"]["workers"] >= 8
    assert dc.plan("cuda", quick=False, cpu_count=4)["resize"]["workers"] == 8
    quick = dc.plan("cuda", quick=True, cpu_count=16)
    assert (quick["mix"]["bs"], quick["mix"]["size"], quick["resize"]["size"]) == (32, 64, 64)
    cpu = dc.plan("cpu", quick=True, cpu_count=2)
    assert cpu["resize"]["workers"] == cpu["tta"]["workers"] == 0 and cpu["resize"]["size"] == 64
    assert cpu["mix"]["dtypes"] == ["float32"]


def _doc(**parts):
    return {
        "schema": dc.SCHEMA,
        "command": "device_check.py",
        "hardware": {k: 1 for k in ("device", "device_name", "torch", "fastai", "cpu_count", "date")},
        "settings": {},
        "parts": parts,
        "total_seconds": 1.0,
    }


def test_check_schema():
    ok = _doc(
        syncs={"status": "ok", "result": {}},
        mix={"status": "error", "error": "E", "traceback": "tb"},
        tta={"status": "skipped", "note": "budget"},
    )
    assert dc.check_schema(ok) == []
    bad = _doc(resize={"status": "error", "error": "E"}, other={"status": "done"})
    bad["hardware"].pop("date")
    problems = dc.check_schema(bad)
    assert "parts.resize.traceback is missing" in problems
    assert "unknown part 'other'" in problems and "hardware.date is missing" in problems
    assert dc.check_schema([]) != []


def test_budget_and_run_part_record_ok_error_and_skipped():
    now = [0.0]
    budget = dc.Budget(10, clock=lambda: now[0])
    ok = dc.run_part("x", lambda: {"a": 1}, budget)
    assert ok["status"] == "ok" and ok["result"] == {"a": 1}

    def boom():
        raise RuntimeError("planted")

    err = dc.run_part("x", boom, budget)
    assert err["status"] == "error" and "planted" in err["error"] and "boom" in err["traceback"]
    now[0] = 11.0
    assert budget.over() and budget.left() == -1.0
    assert dc.run_part("x", lambda: 1, budget)["status"] == "skipped"
    assert dc.check_schema(_doc(syncs=ok, mix=err, tta=dc.run_part("x", lambda: 1, budget))) == []


def test_select_cases_keeps_the_baselines():
    cases = dc.sync_cases(torch.device("cpu"), bs=2, size=16, widen=0.25)
    names = [c["name"] for c in dc.select_cases(cases, "manifold,four_corner_tta() dense")]
    assert names == [
        "fit, no callback",
        "ManifoldMix",
        "get_preds, no callback (dense)",
        "learn.four_corner_tta() dense",
    ]
    assert all(c["baseline"] is None or c["baseline"] in {d["name"] for d in cases} for c in cases)


# --- the CUDA-only branches, with fakes ----------------------------------------------------------------


class FakeDebugMode:
    """Records the modes set, like ``torch.cuda.set_sync_debug_mode``."""

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, mode):
        self.calls.append(mode)

    @property
    def mode(self):
        return self.calls[-1] if self.calls else "default"


class _PlantedSync(Callback):
    """Syncs at every training batch as CUDA's debug mode reports it: a warning, or an error."""

    run_valid = False

    def __init__(self, debug: FakeDebugMode):
        super().__init__()
        self.debug = debug

    def after_loss(self):
        if self.debug.mode == "warn":
            warnings.warn("called a synchronizing CUDA operation", UserWarning)
        elif self.debug.mode == "error":
            raise RuntimeError("called a synchronizing CUDA operation")


def _tiny(n):
    return dc.image_learner(n, bs=2, size=16, device=torch.device("cpu"), widen=0.25)


def _fit(cbs):
    def run(learn):
        with learn.no_bar(), learn.no_logging():
            learn.fit(1, 1e-3, cbs=cbs())

    return run


@pytest.mark.slow
def test_window_sets_the_debug_mode_around_each_batch_only():
    debug = FakeDebugMode()
    window = dc.SyncWindow(None, debug, "error")
    window.close()  # closing a window that is not open sets nothing
    window.open()
    window.close()
    assert debug.calls == ["error", "default"] and window.opened == 1
    debug = FakeDebugMode()
    probe = dc.sync_probe(_tiny(2), _fit(list), close_order=dc.CLOSE_IN_FIT, set_debug_mode=debug)
    # Two training and two validation batches, each its own window, and nothing left switched on.
    assert probe["windows"] == 4 and debug.calls == ["warn", "default"] * 4
    assert probe["cuda_warnings"] == 0 and probe["dispatch"] == 0


def test_warn_mode_counts_and_error_mode_reports_a_planted_sync():
    debug = FakeDebugMode()
    probe = dc.sync_probe(
        _tiny(2), _fit(lambda: [_PlantedSync(debug)]), close_order=dc.CLOSE_IN_FIT, set_debug_mode=debug
    )
    assert probe["cuda_warnings"] == 2 and probe["first_sync"].startswith(__file__)
    strict = dc.strict_probe(
        _tiny(1), _fit(lambda: [_PlantedSync(debug)]), close_order=dc.CLOSE_IN_FIT, set_debug_mode=debug
    )
    assert not strict["ok"] and "synchronizing" in strict["error"] and "after_loss" in strict["traceback"]
    assert strict["where"].startswith("test_device_check.py:") and strict["where"].endswith("in after_loss")
    assert debug.mode == "default"  # reset even though the fit raised
    assert dc.strict_probe(_tiny(1), _fit(list), close_order=dc.CLOSE_IN_FIT, set_debug_mode=debug) == {"ok": True}


@pytest.mark.slow
def test_syncs_part_cuda_branch_with_a_fake_debug_mode():
    cfg = {"bs": 2, "size": 16, "n": 1, "widen": 0.25}
    res = dc.syncs_part(torch.device("cpu"), cfg, dc.Budget(60), "MixUp,FourCornerTTA()", FakeDebugMode())
    rows = {r["name"]: r for r in res["cases"]}
    assert set(rows) >= {"fit, no callback", "MixUp", "fastai MixUp", "get_preds, no callback", "FourCornerTTA()"}
    for name in ("MixUp", "FourCornerTTA()"):
        assert rows[name]["pass"] and rows[name]["added_per_batch"] == {"dispatch": 0.0, "cuda": 0.0}
        assert rows[name]["strict"] == {"ok": True}
    assert rows["fastai MixUp"]["added_per_batch"]["dispatch"] > 0  # the contrast: fastai's copies λ per batch
    assert res["counters"] == ["dispatch", "cuda_warn", "cuda_error"] and res["all_ours_pass"]
    assert "| MixUp | ours | 0.00 | 0.00 | ok |" in dc.syncs_table(res)


def test_cuda_timer_uses_events(monkeypatch):
    clock = [0.0]

    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.t = None

        def record(self):
            self.t = clock[0]

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return (end.t - self.t) * 1000

    def work():
        clock[0] += 0.002

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    res = dc.time_ms(work, torch.device("cuda"), repeats=3, warmup=1)
    assert res["ms"] == pytest.approx(2.0) and res["wall_ms"] >= 0


def test_cuda_helpers_call_the_cuda_api(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("sync", str(device))))
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: calls.append(("mode", mode)))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(("empty", None)))
    dc.synchronize(torch.device("cuda"))
    dc.synchronize("cpu")
    dc.reset_sync_debug_mode("cuda:0")

    def boom():
        raise RuntimeError("planted")

    assert dc.run_part("x", boom, dc.Budget(10), torch.device("cuda"))["status"] == "error"
    assert calls == [("sync", "cuda"), ("mode", "default"), ("mode", "default"), ("empty", None)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available, disabling" on this machine
        with dc._autocast(torch.device("cuda"), "bf16"):
            pass


def test_hardware_info_on_cuda(monkeypatch):
    class Props:
        total_memory = 80 * 2**30

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91000)
    info = dc.hardware_info(torch.device("cuda"))
    assert info["device_name"] == "NVIDIA H100 80GB HBM3" and info["capability"] == "9.0"
    assert info["memory_gib"] == 80.0 and info["cudnn"] == 91000 and info["bf16_supported"]
    assert {"torch", "fastai", "cpu_count", "date"} <= set(info)


def test_one_view_option_names_a_real_argument():
    from fastai_tricks import FourCornerTTA

    option = dc.one_view_option()
    assert option is not None
    FourCornerTTA(**option)


# --- the command line --------------------------------------------------------------------------------


def test_cli_refuses_an_unknown_part_and_cuda_without_a_gpu(capsys):
    with pytest.raises(SystemExit):
        dc.parse_args(["--device", "cpu", "--only", "nope"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            dc.parse_args(["--device", "cuda"])
    assert "unknown part" in capsys.readouterr().err


@pytest.mark.slow
def test_cpu_quick_syncs_in_a_subprocess(tmp_path):
    out = tmp_path / "check.json"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--only", "syncs", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert dc.check_schema(doc) == []
    assert doc["hardware"]["device"] == "cpu" and list(doc["parts"]) == ["syncs"]
    result = doc["parts"]["syncs"]["result"]
    ours = [r for r in result["cases"] if r["group"] == "ours"]
    assert len(ours) >= 14 and result["all_ours_pass"]
    for row in ours:
        assert row["added_per_batch"]["dispatch"] == 0, row
        per_run = 2 if row["kind"] == "fit" else 1  # a fit has n training and n validation batches
        assert row["windows"] == [per_run * n for n in result["n_batches"]], row  # every batch was watched
    fastai = {r["name"]: r for r in result["cases"] if r["group"] == "fastai"}
    assert fastai["fastai CutMix"]["added_per_batch"]["dispatch"] > 0
    assert "our callbacks add no sync per batch: yes" in proc.stdout
    assert time.monotonic() - start < 120
