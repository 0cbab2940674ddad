import json

import pytest

from fastai_tricks.cli import build_parser, main


def test_demo_is_train_on_generated_data_and_prints_final_accuracy(tmp_path, capsys):
    argv = ["demo", "--out", str(tmp_path), "--epochs", "1", "--size", "32", "--tta", "none", "--no-progressive"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    acc = float(out.split("final accuracy:")[1].split()[0])
    assert 0.0 <= acc <= 1.0
    assert (tmp_path / "data" / "train").is_dir()
    config = json.loads((tmp_path / "results.json").read_text())["config"]
    assert config["demo"] and config["arch"] == "xresnet18" and config["epochs"] == 1


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
