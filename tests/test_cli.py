import pytest

from fastai_tricks.cli import build_parser, main


def test_demo_trains_and_prints_final_accuracy(tmp_path, capsys):
    code = main(["demo", "--out", str(tmp_path), "--epochs", "1", "--n-train", "2", "--n-valid", "1", "--size", "32"])
    assert code == 0
    out = capsys.readouterr().out
    assert "final accuracy:" in out
    acc = float(out.split("final accuracy:")[1].split()[0])
    assert 0.0 <= acc <= 1.0
    assert (tmp_path / "data" / "train").is_dir()


@pytest.mark.parametrize("argv", [["demo", "--epochs", "0"], ["demo", "--bs", "-1"], ["nope"], []])
def test_bad_arguments_exit_with_code_2(argv):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
