"""The recipe's command line end to end: train, ablation, and the errors a user can make."""

import csv
import json
import urllib.error

import pytest

from fastai_tricks import recipe
from fastai_tricks.cli import main
from fastai_tricks.data import make_fake_imagenette
from fastai_tricks.recipe import (
    ABLATION_STEPS,
    ABLATION_TRICKS,
    PLAIN_FASTAI,
    RECIPE_DEFAULTS,
    RecipeConfig,
    ablation_plan,
    demo_config,
    digits_config,
    training_callbacks,
)
from fastai_tricks.resizing import MIN_EPOCHS, ProgressiveResize


def _flat_class_folder(root, n=6):
    """Class folders with no train/val split, as a user's own project might have."""
    src = make_fake_imagenette(root / "src", n_train=n, n_valid=1, size=40, seed=1)
    flat = root / "cells"
    flat.mkdir()
    for class_dir in (src / "train").iterdir():
        class_dir.rename(flat / class_dir.name)
    return flat


@pytest.mark.slow
def test_train_demo_writes_every_output_and_beats_chance(tmp_path, capsys):
    from fastai.vision.all import load_learner

    out = tmp_path / "run"
    # --progressive forces resizing on: two epochs are below the budget guard's default.
    assert main(["train", "--demo", "--epochs", "2", "--size", "48", "--progressive", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "final accuracy:" in printed
    for name in ("metrics.csv", "results.json", "curves.png", "schedule.png", "export.pkl"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["accuracy"] > 0.2, results["accuracy"]  # chance is 0.1
    assert results["accuracy_tta"] is not None and results["tta"] == "four-corner"
    assert set(results["times"]) >= {"data", "dataloaders", "train", "eval", "tta"}
    sizes = [tuple(s) for s in results["schedule"]]
    assert sizes[0] == (24, 24) and sizes[-1] == (48, 48) and sizes == sorted(sizes)
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1"] and "accuracy" in rows[0]
    learn = load_learner(out / "export.pkl")
    assert not any(type(cb).__name__ in {"ProgressiveResize", "MixUp"} for cb in learn.cbs)
    pred, idx, probs = learn.predict(next((out / "data" / "val").rglob("*.JPEG")))
    assert probs.shape == (10,)


@pytest.mark.slow
def test_train_on_a_plain_class_folder_uses_a_random_split(tmp_path):
    data = _flat_class_folder(tmp_path)
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--valid-pct", "0.25", "--arch", "xresnet18", "--epochs", "1"]
    argv += ["--size", "32", "--bs", "16", "--no-progressive", "--tta", "none", "--normalize", "imagenet"]
    argv += ["--label-smoothing", "0", "--workers", "0", "--out", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["n_train"] + results["n_valid"] == 60
    assert results["n_valid"] == 15
    assert results["schedule"] is None and results["accuracy_tta"] is None
    assert results["config"]["normalize"] == "imagenet"


@pytest.mark.slow
def test_ablation_with_a_tiny_budget_writes_its_table(tmp_path, capsys):
    # Every row of the table on 40 generated images at 16 px: the table's layout, not its accuracy, is the point.
    data = make_fake_imagenette(tmp_path / "data", n_train=3, n_valid=1, size=24, seed=0)
    out = tmp_path / "abl"
    argv = ["ablation", "--data", str(data), "--arch", "xresnet18", "--epochs", "1", "--size", "16", "--bs", "8"]
    argv += ["--workers", "0", "--out", str(out)]
    assert main(argv) == 0
    table = (out / "ablation.md").read_text()
    names = [PLAIN_FASTAI, *(name for name, _ in ABLATION_STEPS), RECIPE_DEFAULTS]
    for name in names:
        assert f"| {name} |" in table
    assert "fastai's `learn.tta()`" in table
    with open(out / "ablation.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == names
    assert all(0.0 <= float(r[key]) <= 1.0 for r in rows for key in ("accuracy", "tta_accuracy"))
    assert (out / "ablation.png").is_file()
    assert "ablation.md" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "nowhere", "does not exist"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "holds no class folders of images"),
        (lambda p: (p / "f.txt").write_text("x") and p / "f.txt", "not a folder"),
    ],
)
def test_missing_or_malformed_data_exits_2_with_one_line(tmp_path, capsys, make, message):
    with pytest.raises(SystemExit) as info:
        main(["train", "--data", str(make(tmp_path)), "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fastai-tricks: error:") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_named_validation_folder_that_does_not_exist_exits_2(tmp_path, capsys):
    data = make_fake_imagenette(tmp_path / "d", n_train=1, n_valid=1, size=16)
    with pytest.raises(SystemExit) as info:
        main(["train", "--data", str(data), "--valid", "holdout", "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    assert "no validation folder 'holdout'" in capsys.readouterr().err


@pytest.mark.slow
def test_a_named_validation_folder_splits_the_data_by_folder(tmp_path):
    data = make_fake_imagenette(tmp_path / "d", n_train=2, n_valid=1, size=24)
    (data / "val").rename(data / "holdout")
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--valid", "holdout", "--arch", "xresnet18", "--epochs", "1", "--size", "16"]
    argv += [
        "--bs",
        "8",
        "--no-progressive",
        "--tta",
        "none",
        "--normalize",
        "none",
        "--workers",
        "0",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert (results["n_train"], results["n_valid"]) == (20, 10)


def test_offline_imagenette_download_exits_2_with_advice(tmp_path, capsys, monkeypatch):
    import fastai.data.external as external

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(external, "untar_data", offline)
    with pytest.raises(SystemExit) as info:
        main(["train", "--imagenette", "320", "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "imagenette2-320" in err and "--data PATH" in err and "--demo" in err
    assert "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--arch", "vgg99"], "arch must be a fastai xresnet or torchvision resnet name, got 'vgg99'"),
        (["--label-smoothing", "1.0"], "label_smoothing must be in [0, 1), got 1.0"),
        (["--resize-start", "0.8", "--resize-finish", "0.2"], "resize_finish must be >= resize_start"),
        (["--lr", "-1"], "lr must be > 0, got -1.0"),
        (["--valid-pct", "1.5"], "valid_pct must be in (0, 1), got 1.5"),
    ],
)
def test_bad_recipe_options_exit_2_naming_the_option(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(["train", "--demo", *argv, "--out", str(tmp_path)])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_config_keeps_explicit_choices_over_demo_defaults():
    cfg = demo_config(epochs=7, mix="cutmix")
    assert cfg.demo and cfg.arch == "xresnet18" and cfg.epochs == 7 and cfg.mix == "cutmix"
    assert RecipeConfig().arch == "xresnet50" and RecipeConfig().size == 128


@pytest.mark.parametrize("mix", ["mixup", "cutmix", "manifold", "resizemix", "fmix", "random"])
def test_every_mix_choice_builds_its_callback_with_the_given_alpha(mix):
    from fastai_tricks.mixing import MixCallback
    from fastai_tricks.recipe import training_callbacks

    (cb,) = training_callbacks(demo_config(mix=mix, alpha=0.7, progressive=False))
    assert isinstance(cb, MixCallback)
    alphas = [m.alpha for m in cb.mixes] if mix == "random" else [cb.alpha]
    assert alphas and all(a == 0.7 for a in alphas)


# --- the ablation's bookkeeping, on a fake trainer ----------------------------------------------------


class _FakeLearner:
    def __init__(self, acc):
        self.acc = acc


def _fake_accuracy(cfg):
    """A made-up accuracy that each trick moves by a known amount, and each seed by 0.01."""
    acc = 0.5 + 0.01 * cfg.seed
    acc += 0.10 * (cfg.normalize != "none") - 0.05 * bool(cfg.progressive) + 0.03 * (cfg.mix != "none")
    return acc - 0.02 * (cfg.label_smoothing > 0)


@pytest.fixture
def fake_training(monkeypatch, tmp_path):
    trained = []

    def train(cfg, path):
        trained.append(cfg)
        return _FakeLearner(_fake_accuracy(cfg)), {"times": {"train": 2.0}, "sizes": None}

    def train_plain_fastai(cfg, path):
        return _FakeLearner(0.6 + 0.01 * cfg.seed), 1.0

    def evaluate(learn, tta, test_size=None):
        shift = -0.04 if test_size is not None else 0.0  # a larger test size loses, as on the real digits
        return learn.acc + shift + {"none": 0.0, "four-corner": 0.02, "fastai": 0.01}[tta], 0.5

    monkeypatch.setattr(recipe, "train", train)
    monkeypatch.setattr(recipe, "train_plain_fastai", train_plain_fastai)
    monkeypatch.setattr(recipe, "evaluate", evaluate)
    monkeypatch.setattr(recipe, "find_data", lambda cfg: tmp_path)
    monkeypatch.setattr(recipe, "_write_ablation", lambda *args: None)
    return trained


def test_cumulative_ablation_compares_each_step_with_the_step_it_changes_over_seeds(fake_training, tmp_path):
    cfg = RecipeConfig(data=tmp_path, epochs=MIN_EPOCHS, out=tmp_path / "out")
    rows = {r["step"]: r for r in recipe.run_ablation(cfg, seeds=2)}
    assert list(rows) == [PLAIN_FASTAI, *(name for name, _ in ABLATION_STEPS), RECIPE_DEFAULTS]
    plain, base = rows[PLAIN_FASTAI], rows["baseline"]
    assert plain["accuracy"] == pytest.approx(0.605) and plain["accuracy_std"] == pytest.approx(0.01 / 2**0.5)
    assert base["accuracy"] == pytest.approx(0.505) and base["vs_plain"] == pytest.approx(-0.1)
    assert rows["+ normalization"]["delta"] == pytest.approx(0.10)
    assert rows["+ progressive resizing"]["delta"] == pytest.approx(-0.05)
    tta = rows["+ four-corner TTA"]
    # TTA trains nothing: its accuracy is TTA on the previous model, its change is TTA's alone.
    assert tta["train_s"] == 0.0 and tta["delta"] == pytest.approx(0.02)
    assert tta["fastai_tta_accuracy"] == pytest.approx(rows["+ progressive resizing"]["accuracy"] + 0.01)
    # Later steps are scored without TTA, against the last trained step: the TTA gain hides nothing.
    assert rows["+ mixup"]["delta"] == pytest.approx(0.03)
    assert rows["+ mixup"]["tta_accuracy"] == pytest.approx(rows["+ mixup"]["accuracy"] + 0.02)
    assert rows["+ label smoothing"]["delta"] == pytest.approx(-0.02)
    assert rows["+ label smoothing"]["per_seed"] == pytest.approx([0.56, 0.57])
    # Five trained recipe steps for each of the two seeds: TTA re-uses its model, and at this budget the
    # defaults (normalization and progressive resizing) train exactly what "+ progressive resizing" trained.
    assert len(fake_training) == 2 * 5 and {c.seed for c in fake_training} == {0, 1}
    assert all(c.tta == "none" for c in fake_training)
    assert rows[RECIPE_DEFAULTS]["per_seed"] == rows["+ progressive resizing"]["per_seed"]


def test_one_at_a_time_ablation_adds_each_trick_alone_to_the_baseline(fake_training, tmp_path):
    cfg = RecipeConfig(data=tmp_path, epochs=MIN_EPOCHS, out=tmp_path / "out")
    plan = ablation_plan(cfg, one_at_a_time=True)
    assert [name for name, _ in plan] == [
        PLAIN_FASTAI, "baseline", *(f"baseline + {name}" for name, _ in ABLATION_TRICKS), RECIPE_DEFAULTS,
    ]  # fmt: skip
    rows = {r["step"]: r for r in recipe.run_ablation(cfg, one_at_a_time=True)}
    assert rows["baseline + progressive resizing"]["delta"] == pytest.approx(-0.05)
    assert rows["baseline + mixup"]["delta"] == pytest.approx(0.03)
    assert rows["baseline + label smoothing"]["delta"] == pytest.approx(-0.02)
    assert rows["baseline + four-corner TTA"]["delta"] == pytest.approx(0.02)
    assert rows["baseline + four-corner TTA"]["train_s"] == 0.0  # TTA on the baseline's own model


def test_ablation_rejects_a_seed_count_below_one(tmp_path):
    with pytest.raises(ValueError, match="seeds"):
        recipe.run_ablation(RecipeConfig(data=tmp_path, out=tmp_path / "out"), seeds=0)


# --- defaults that follow the data and the budget -----------------------------------------------------


def test_flips_are_on_for_photos_and_off_for_digits_and_a_users_own_folder(tmp_path):
    assert demo_config().flip is True and RecipeConfig().flip is True  # demo shapes, Imagenette
    assert digits_config().flip is False
    assert RecipeConfig(data=tmp_path).flip is False
    assert RecipeConfig(data=tmp_path, flip=True).flip is True and digits_config(flip=True).flip is True


def test_progressive_resizing_is_off_below_the_budget_guard_and_forced_on_when_asked():
    assert training_callbacks(digits_config(epochs=MIN_EPOCHS - 1)) == []
    (cb,) = training_callbacks(digits_config(epochs=MIN_EPOCHS))
    assert isinstance(cb, ProgressiveResize)
    (forced,) = training_callbacks(digits_config(epochs=1, progressive=True))
    assert isinstance(forced, ProgressiveResize) and forced.min_epochs == 0
    assert training_callbacks(digits_config(epochs=MIN_EPOCHS, progressive=False)) == []
    assert digits_config(epochs=1).effective() == digits_config(epochs=1, progressive=False).effective()


def test_the_recipe_decodes_jpegs_at_the_needed_size_unless_told_not_to(fake_imagenette):
    from fastai.data.core import TfmdDL

    from fastai_tricks import DraftDL

    cfg = RecipeConfig(data=fake_imagenette, size=32, bs=8, workers=0, normalize="none")
    assert type(recipe.build_dls(fake_imagenette, cfg).train) is DraftDL
    assert cfg.tricks()["draft decoding"] == "on"
    plain = RecipeConfig(data=fake_imagenette, size=32, bs=8, workers=0, normalize="none", draft=False)
    assert type(recipe.build_dls(fake_imagenette, plain).train) is TfmdDL
    assert plain.tricks()["draft decoding"] == "off"


def test_demo_and_digits_are_two_sources_not_one():
    with pytest.raises(ValueError, match="demo=True and digits=True"):
        RecipeConfig(demo=True, digits=True)


def test_a_relative_out_is_resolved_once_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert RecipeConfig(out="runs/x").out == tmp_path / "runs" / "x"


@pytest.mark.slow
def test_train_on_real_digits_says_what_it_turned_on_and_why(tmp_path, capsys):
    out = tmp_path / "digits"
    assert main(["train", "--digits", "--epochs", "1", "--tta", "none", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "progressive resizing off (budget guard: 1 < 8 epochs)" in printed and "flips off" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["n_train"] + results["n_valid"] == 1797 and results["classes"] == [str(d) for d in range(10)]
    assert results["schedule"] is None and results["config"]["flip"] is False
    assert results["accuracy"] > 0.3  # chance is 0.1; one epoch on real digits


# --- test-size resizing (FixRes, issue #22): evaluation only -----------------------------------------


def _tiny_train(tmp_path, *extra):
    data = make_fake_imagenette(tmp_path / "data", n_train=3, n_valid=1, size=24, seed=0)
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--arch", "xresnet18", "--size", "16", "--bs", "8", "--workers", "0"]
    argv += ["--epochs", "1", "--no-progressive", "--tta", "none", "--out", str(out), *extra]
    assert main(argv) == 0
    return out, json.loads((out / "results.json").read_text())


def test_train_at_a_test_size_in_pixels_records_it_beside_the_training_size_accuracy(tmp_path, capsys):
    from fastai.vision.all import load_learner

    from fastai_tricks import TestSize

    out, results = _tiny_train(tmp_path, "--test-size", "20")
    assert results["test_size"] == {"setting": 20, "px": 20, "auto_found": None, "recalibrate_bn": 0}
    assert 0.0 <= results["accuracy_test_size"] <= 1.0 and 0.0 <= results["accuracy"] <= 1.0
    assert results["tricks"]["test size"] == "20 px" and results["config"]["test_size"] == 20
    assert "test_size" in results["times"]
    printed = capsys.readouterr().out
    assert "test size 20 px" in printed and "accuracy at test size 20 px:" in printed
    # Attached around the evaluation only: the exported learner never carries it.
    learn = load_learner(out / "export.pkl")
    assert not any(isinstance(cb, TestSize) for cb in learn.cbs)


@pytest.mark.slow
def test_train_at_the_auto_test_size_says_which_size_it_found(tmp_path, capsys):
    _, results = _tiny_train(tmp_path, "--test-size", "auto")
    info = results["test_size"]
    assert info["setting"] == "auto" and isinstance(info["px"], int) and info["px"] >= 16
    assert info["auto_found"] and all(isinstance(name, str) for name in info["auto_found"])
    assert 0.0 <= results["accuracy_test_size"] <= 1.0
    assert results["tricks"]["test size"] == f"auto ({info['px']} px)"
    assert f"test size auto ({info['px']} px)" in capsys.readouterr().out


@pytest.mark.slow
def test_train_with_the_test_size_off_records_none(tmp_path, capsys):
    _, results = _tiny_train(tmp_path, "--test-size", "off")
    assert results["accuracy_test_size"] is None
    assert results["test_size"] == {"setting": "off", "px": None, "auto_found": None, "recalibrate_bn": 0}
    assert "test size off" in capsys.readouterr().out
    assert RecipeConfig().test_size == "off" and RecipeConfig().tricks()["test size"] == "off"


@pytest.mark.parametrize("value", ["big", "0", "-3", "0.0", "nan", "inf", "1.5.2", ""])
def test_a_bad_test_size_exits_2_with_one_line_naming_the_flag(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as info:
        main(["train", "--demo", "--test-size", value, "--out", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fastai-tricks: error: --test-size must be") and repr(value) in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_recalibrating_batchnorm_needs_a_test_size(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["ablation", "--demo", "--recalibrate-bn", "4", "--out", str(tmp_path)])
    assert info.value.code == 2
    assert "recalibrate_bn needs a test_size" in capsys.readouterr().err
    cfg = RecipeConfig(test_size=1.0, recalibrate_bn=4)
    assert cfg.tricks()["test size"] == "1x, BatchNorm recalibrated on 4 batches"


@pytest.mark.parametrize(
    ("value", "error"),
    [("small", ValueError), (-1, ValueError), (0.0, ValueError), (True, TypeError), ([32], TypeError)],
)
def test_recipe_config_rejects_a_bad_test_size_naming_it(value, error):
    with pytest.raises(error, match="test_size must be 'off', 'auto'"):
        RecipeConfig(test_size=value)
    with pytest.raises(ValueError, match="recalibrate_bn must be >= 0"):
        RecipeConfig(test_size="auto", recalibrate_bn=-1)


@pytest.mark.parametrize("one_at_a_time", [False, True])
def test_the_ablation_plan_has_a_test_size_row_that_reuses_its_parents_model(one_at_a_time, tmp_path):
    plan = ablation_plan(RecipeConfig(data=tmp_path, out=tmp_path / "out"), one_at_a_time)
    names = [name for name, _ in plan]
    row = "baseline + test size" if one_at_a_time else "+ test size"
    parent = "baseline" if one_at_a_time else "+ label smoothing"
    i = names.index(row)
    change = plan[i][1]
    assert change["test_size"] == "auto" and change["recalibrate_bn"] == 0
    # It changes the evaluation only: its model is its parent's, which trained its own.
    assert recipe.eval_parent(plan, i) == parent
    assert recipe.eval_parent(plan, names.index(parent)) is None
    assert {k: v for k, v in change.items() if k not in recipe.EVAL_ONLY} == {
        k: v for k, v in dict(plan)[parent].items() if k not in recipe.EVAL_ONLY
    }
    # Every other row is evaluated at the training size, the defaults included.
    assert [n for n, c in plan if c is not None and c["test_size"] != "off"] == [row]
    # A test size given to the ablation is the one its row measures.
    given = ablation_plan(RecipeConfig(data=tmp_path, out=tmp_path, test_size=1.0, recalibrate_bn=3), one_at_a_time)
    assert dict(given)[row]["test_size"] == 1.0 and dict(given)[row]["recalibrate_bn"] == 3


@pytest.mark.parametrize("one_at_a_time", [False, True])
def test_the_test_size_row_trains_nothing_and_is_compared_with_its_parent(fake_training, tmp_path, one_at_a_time):
    cfg = RecipeConfig(data=tmp_path, epochs=MIN_EPOCHS, out=tmp_path / "out")
    rows = {r["step"]: r for r in recipe.run_ablation(cfg, one_at_a_time=one_at_a_time)}
    row = rows["baseline + test size" if one_at_a_time else "+ test size"]
    parent = rows["baseline" if one_at_a_time else "+ label smoothing"]
    assert row["train_s"] == 0.0 and "fastai_tta_accuracy" not in row
    # Its own accuracy is its parent's model at the test size, without TTA: the fake's -0.04 alone.
    assert row["accuracy"] == pytest.approx(parent["accuracy"] - 0.04)
    assert row["delta"] == pytest.approx(-0.04)
    assert row["tta_accuracy"] == pytest.approx(parent["tta_accuracy"] - 0.04)
    assert len(fake_training) == (6 if one_at_a_time else 5)  # the same trainings as without the row
    assert all(c.test_size == "off" and c.recalibrate_bn == 0 for c in fake_training)
