import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastai_tricks import __version__, make_fake_imagenette
from fastai_tricks.cli import build_parser, main

QUICK = ["--epochs", "1", "--size", "32", "--tta", "none", "--no-progressive"]
# What every training run leaves in its --out folder (schedule.png only with progressive resizing).
RUN_FILES = {"metrics.csv", "results.json", "export.pkl", "curves.png"}


def _files_under(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file()}


def _assert_run_folder(cwd: Path, out: str, printed: str) -> None:
    """Every file of the run is in ``cwd / out``, the folder printed is that one, and nothing lies elsewhere."""
    folder = cwd / out
    assert RUN_FILES <= {p.name for p in folder.iterdir()}
    assert f"files written to {folder.resolve()}:" in printed
    strays = {p for p in _files_under(cwd) if not p.is_relative_to(out) and not p.is_relative_to("data")}
    assert not strays, f"files written outside --out: {sorted(map(str, strays))}"
    nested = [p for p in _files_under(folder) if p.name in RUN_FILES and p.parent != Path(".")]
    assert not nested, f"run files nested inside --out: {nested}"


@pytest.mark.slow
def test_demo_is_train_on_generated_data_and_prints_final_accuracy(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a relative --out, as a user types it: runs/demo/runs/demo/metrics.csv was a crash
    assert main(["demo", "--out", "runs/rel", *QUICK]) == 0
    out = capsys.readouterr().out
    acc = float(out.split("final accuracy:")[1].split()[0])
    assert 0.0 <= acc <= 1.0
    assert (tmp_path / "runs" / "rel" / "data" / "train").is_dir()
    config = json.loads((tmp_path / "runs" / "rel" / "results.json").read_text())["config"]
    assert config["demo"] and config["arch"] == "xresnet18" and config["epochs"] == 1
    _assert_run_folder(tmp_path, "runs/rel", out)


def test_train_without_out_writes_under_runs_train_of_the_working_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_fake_imagenette("data", n_train=4, n_valid=2, size=40)
    assert main(["train", "--data", "data", "--arch", "xresnet18", "--bs", "8", "--workers", "0", *QUICK]) == 0
    _assert_run_folder(tmp_path, "runs/train", capsys.readouterr().out)


class _Recorded(Exception):
    """Raised by a stand-in for run_recipe once it has seen the configuration."""


@pytest.mark.parametrize("argv", [["demo"], ["train", "--demo"]])
def test_demo_without_out_trains_into_runs_demo_of_the_working_directory(argv, tmp_path, monkeypatch):
    seen = []

    def fake_run_recipe(cfg):  # the real run is the demo test above; here only the folder matters
        seen.append(cfg)
        raise _Recorded

    monkeypatch.setattr("fastai_tricks.recipe.run_recipe", fake_run_recipe)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(_Recorded):
        main(argv)
    assert [cfg.out for cfg in seen] == [tmp_path.resolve() / "runs" / "demo"]


def _console_script() -> str:
    """The ``fastai-tricks`` entry point installed beside this interpreter (a venv), else the one on PATH."""
    here = Path(sys.executable).parent / ("fastai-tricks.exe" if sys.platform == "win32" else "fastai-tricks")
    found = str(here) if here.exists() else shutil.which("fastai-tricks")
    if found is None:
        pytest.fail("the fastai-tricks console script is not installed: pip install -e . first")
    return found


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["module", "script"])
def test_version_is_printed_by_the_console_script_and_python_m(launcher, tmp_path):
    cmd = [sys.executable, "-m", "fastai_tricks"] if launcher == "module" else [_console_script()]
    proc = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"fastai-tricks {__version__}"


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--epochs", "0"],
        ["demo", "--bs", "-1"],
        ["train", "--mix", "mixdown"],
        ["train", "--demo", "--data", "x"],
        ["nope"],
        [],
    ],
)
def test_bad_arguments_exit_with_code_2(argv):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2


def test_no_draft_turns_draft_decoding_off_and_it_is_on_by_default():
    from fastai_tricks.cli import config_from_args

    parser = build_parser()
    assert config_from_args(parser.parse_args(["train", "--data", "d"]), "runs/train").draft is True
    assert config_from_args(parser.parse_args(["train", "--data", "d", "--no-draft"]), "runs/train").draft is False


@pytest.mark.parametrize(
    ("text", "value"), [("auto", "auto"), ("off", "off"), ("36", 36), ("1.15", 1.15), ("1.0", 1.0), (" 2 ", 2)]
)
def test_test_size_reads_auto_off_an_int_as_pixels_and_a_float_as_a_factor(text, value):
    from fastai_tricks.cli import parse_test_size

    parsed = parse_test_size(text)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("command", ["train", "ablation", "demo"])
def test_test_size_and_recalibrate_bn_reach_the_config_of_every_command(command):
    from fastai_tricks.cli import config_from_args

    parser = build_parser()
    cfg = config_from_args(parser.parse_args([command, "--test-size", "1.0", "--recalibrate-bn", "4"]), "runs/x")
    assert (cfg.test_size, cfg.recalibrate_bn) == (1.0, 4)
    default = config_from_args(parser.parse_args([command]), "runs/x")
    assert (default.test_size, default.recalibrate_bn) == ("off", 0)


def test_a_negative_recalibrate_bn_exits_with_code_2():
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["train", "--test-size", "auto", "--recalibrate-bn", "-1"])
    assert info.value.code == 2
