"""Tests for fastai_tricks.normalization: moment maths, dataset_stats, ensure_normalized, model_stats, checks."""

from __future__ import annotations

import json
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_dls, seed_everything, tiny_cnn
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from fastai_tricks.normalization import (
    Moments,
    NormalizationCheck,
    NormalizationWarning,
    batch_moments,
    check_normalization,
    dataset_stats,
    ensure_normalized,
    merge_moments,
    model_stats,
    moments_to_stats,
)

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def reference_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-pass float64 numpy reference over (N, C, H, W): mean first, then mean squared deviation."""
    x = np.asarray(x, dtype=np.float64)
    flat = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
    mean = flat.mean(axis=1)
    std = np.sqrt(((flat - mean[:, None]) ** 2).mean(axis=1))
    return mean, std


def images_from(seed: int, n: int, c: int, h: int, w: int, loc: float, scale: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Per-channel offsets make the channels differ; a large common offset tests numerical stability.
    return loc + rng.normal(rng.uniform(-1, 1, size=(1, c, 1, 1)), scale, size=(n, c, h, w))


def normalizes(dl) -> list:
    from fastai.vision.all import Normalize

    return [t for t in dl.after_batch.fs if isinstance(t, Normalize)]


def problems_of(learn, **kwargs) -> list[str]:
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        report = check_normalization(learn, **kwargs)
    msgs = [str(w.message) for w in rec if issubclass(w.category, NormalizationWarning)]
    assert msgs == list(report.problems)
    return msgs


def kinds(msgs: list[str]) -> list[str]:
    return [m.split(":")[0].split(" in ")[0] for m in msgs]


class TimmLike(nn.Module):
    """A stand-in for a timm model: a plain CNN carrying a timm-style ``pretrained_cfg``."""

    def __init__(self, n_in: int = 3, n_out: int = 10, stats=HALF):
        super().__init__()
        self.body = tiny_cnn(n_in, n_out)
        self.pretrained_cfg = {"mean": stats[0], "std": stats[1], "num_classes": n_out}

    def forward(self, x):
        return self.body(x)


# --- pure moment maths ---------------------------------------------------------------------------

shapes = st.tuples(
    st.integers(1, 8),  # images
    st.integers(1, 3),  # channels
    st.integers(1, 5),  # height
    st.integers(1, 5),  # width
)


@given(
    seed=st.integers(0, 2**16),
    shape=shapes,
    loc=st.floats(-1e3, 1e3),
    scale=st.floats(1e-3, 10),
    cuts=st.lists(st.integers(0, 8), max_size=6),
)
def test_any_split_into_batches_gives_the_same_stats_as_the_float64_reference(seed, shape, loc, scale, cuts):
    x = images_from(seed, *shape, loc, scale)
    edges = sorted({0, shape[0], *(c for c in cuts if c <= shape[0])})
    batches = [torch.from_numpy(x[a:b]).float() for a, b in zip(edges[:-1], edges[1:], strict=True)]
    mean, std = dataset_stats(batches, progress=False)
    ref_mean, ref_std = reference_stats(np.concatenate([b.numpy() for b in batches]))
    # A mean near 0 has no meaningful relative error: it is also held to 1e-6 of the data's spread.
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6, atol=1e-6 * ref_std.max())
    np.testing.assert_allclose(std, ref_std, rtol=1e-6, atol=1e-12)
    whole = moments_to_stats(batch_moments(torch.cat(batches)))
    np.testing.assert_allclose(mean, whole[0], rtol=1e-6, atol=1e-6 * ref_std.max())
    np.testing.assert_allclose(std, whole[1], rtol=1e-6, atol=1e-12)


@given(seed=st.integers(0, 2**16), shape=shapes, n_batches=st.integers(2, 5), order_seed=st.integers(0, 1000))
def test_batch_order_does_not_matter(seed, shape, n_batches, order_seed):
    batches = [torch.from_numpy(images_from(seed + i, *shape, 3.0, 2.0)) for i in range(n_batches)]
    order = np.random.default_rng(order_seed).permutation(n_batches)
    a = dataset_stats(batches, progress=False)
    b = dataset_stats([batches[i] for i in order], progress=False)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-12)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-12)


@given(seed=st.integers(0, 2**16), dark=st.floats(1e-3, 0.05))
def test_pixel_batches_with_a_dark_channel_agree_with_the_reference_to_1e_6_relative(seed, dark):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(16, 3, 24, 24, generator=g)
    x[:, 2] *= 2 * dark  # a nearly black channel: mean `dark`, values in [0, 2 * dark]
    mean, std = dataset_stats([x[:5], x[5:]], progress=False)
    ref_mean, ref_std = reference_stats(x.numpy())
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6)
    np.testing.assert_allclose(std, ref_std, rtol=1e-6)


def test_merging_with_empty_moments_is_the_identity():
    m = batch_moments(torch.arange(24.0).view(2, 3, 2, 2))
    empty = Moments(0, torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    assert merge_moments(empty, m) is m
    assert merge_moments(m, empty) is m


def test_batch_moments_are_float64_and_exact_on_a_small_batch():
    x = torch.tensor([[[[1.0, 2.0]], [[10.0, 10.0]]], [[[3.0, 4.0]], [[10.0, 10.0]]]])  # (2, 2, 1, 2)
    m = batch_moments(x)
    assert m.count == 4 and m.mean.dtype == torch.float64
    assert m.mean.tolist() == [2.5, 10.0]
    assert m.m2.tolist() == [5.0, 0.0]


def test_merging_moments_of_different_channel_counts_raises():
    with pytest.raises(ValueError, match="channels"):
        merge_moments(batch_moments(torch.ones(1, 3, 2, 2)), batch_moments(torch.ones(1, 1, 2, 2)))


# --- dataset_stats on files, loaders and DataLoaders ---------------------------------------------


def test_images_of_different_sizes_are_weighted_per_pixel_not_per_image(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in ((4, 4), (16, 20), (9, 3))]
    files = []
    for i, a in enumerate(arrays):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(a).save(files[-1])
    mean, std = dataset_stats(files, progress=False)
    pixels = np.concatenate([a.reshape(-1, 3) for a in arrays]).astype(np.float64) / 255
    np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, pixels.std(0), rtol=1e-6)
    # Averaging per-image stds (torchvision#3657) gives a different, wrong answer.
    per_image = np.mean([(a.reshape(-1, 3) / 255).std(0) for a in arrays], axis=0)
    assert np.abs(per_image - std).max() > 1e-3


def test_grey_files_give_one_channel_with_mode_l(tmp_path):
    Image.fromarray(np.full((5, 5), 51, dtype=np.uint8)).save(tmp_path / "g.png")
    mean, std = dataset_stats([tmp_path / "g.png"], mode="L", progress=False)
    assert mean == pytest.approx((0.2,)) and std == pytest.approx((0.0,))


def test_dataloaders_stats_cover_the_whole_train_set_without_augmentation_or_normalize(fake_imagenette):
    from fastai.vision.all import Normalize, aug_transforms

    plain = make_tiny_dls(fake_imagenette)
    augmented = make_tiny_dls(fake_imagenette, batch_tfms=[*aug_transforms(size=32), Normalize()])
    # Reference: fastai's own deterministic path (test_dl uses the validation transforms) over every train item.
    ref = np.concatenate([b[0].numpy() for b in plain.test_dl(plain.train_ds.items)]).astype(np.float64)
    assert ref.shape[0] == len(plain.train_ds)
    ref_mean, ref_std = reference_stats(ref)
    for dls in (plain, augmented):
        mean, std = dataset_stats(dls, progress=False)
        np.testing.assert_allclose(mean, ref_mean, rtol=1e-6)
        np.testing.assert_allclose(std, ref_std, rtol=1e-6)
    assert dataset_stats(augmented, progress=True) == dataset_stats(augmented, progress=False)
    # The source DataLoaders is left as it was.
    assert augmented.train.shuffle and augmented.train.drop_last and len(normalizes(augmented.train)) == 1


def test_a_plain_torch_dataloader_and_max_batches():
    x = torch.from_numpy(images_from(1, 10, 2, 3, 3, 5.0, 2.0)).float()
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(10)), batch_size=4)
    mean, std = dataset_stats(dl, progress=False)
    np.testing.assert_allclose(mean, reference_stats(x.numpy())[0], rtol=1e-6)
    mean2, _ = dataset_stats(dl, max_batches=1, progress=False)
    np.testing.assert_allclose(mean2, reference_stats(x[:4].numpy())[0], rtol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_raises_and_names_the_batch(bad):
    x = torch.rand(10, 3, 4, 4)
    x[5, 1, 2, 3] = bad
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4)
    with pytest.raises(ValueError, match="NaN or inf.*batch 1"):
        dataset_stats(dl, progress=False)


@pytest.mark.parametrize(
    ("source", "error", "match"),
    [
        ([torch.rand(4, 10)], ValueError, "image batches"),
        ([torch.randint(0, 255, (2, 3, 4, 4), dtype=torch.uint8)], ValueError, "floats"),
        ([], ValueError, "empty"),
        ("some/folder", TypeError, "get_image_files"),
        (42, TypeError, "source"),
    ],
)
def test_bad_sources_raise(source, error, match):
    with pytest.raises(error, match=match):
        dataset_stats(source, progress=False)


def test_max_batches_must_be_a_positive_int():
    with pytest.raises(ValueError, match="max_batches"):
        dataset_stats([torch.rand(1, 3, 2, 2)], max_batches=0)


def _distributed_worker(rank: int, files: list[str], out: str) -> None:
    """One rank of a 2-process gloo group: stats of a file list, then a NaN that only rank 1 holds."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    try:
        res = {"files": dataset_stats(files, progress=False)}
        x = torch.rand(8, 3, 2, 2)
        if rank == 1:
            x[5, 0, 0, 0] = float("nan")
        # Both ranks must raise: a rank that raised alone would leave the other waiting forever.
        try:
            dataset_stats(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4), progress=False)
        except ValueError as err:
            res["nan"] = str(err)
        Path(out, f"{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_distributed_ranks_get_identical_global_stats(fake_imagenette, tmp_path):
    import multiprocessing

    files = sorted(str(f) for f in (fake_imagenette / "train").rglob("*.JPEG"))[:15]
    # Fork: the children inherit the imported modules, so the test costs no fresh torch/fastai imports.
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_distributed_worker, args=(r, files, str(tmp_path))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert results[0]["files"] == results[1]["files"]
    single = dataset_stats(files, progress=False)
    np.testing.assert_allclose(results[0]["files"], single, rtol=1e-12)
    for res in results:
        assert "batch 1 of rank 1" in res["nan"]


# --- ensure_normalized ---------------------------------------------------------------------------


def test_ensure_normalized_is_idempotent_and_covers_every_loader(tiny_dls):
    ensure_normalized(tiny_dls, "imagenet")
    first = [normalizes(dl) for dl in tiny_dls.loaders]
    assert ensure_normalized(tiny_dls, "imagenet") is tiny_dls
    for dl, before in zip(tiny_dls.loaders, first, strict=True):
        (tfm,) = normalizes(dl)
        assert torch.allclose(tfm.mean.flatten(), torch.tensor(IMAGENET[0]))
        assert torch.allclose(tfm.std.flatten(), before[0].std.flatten())
        assert dl.after_batch.normalize is tfm


def test_ensure_normalized_replaces_an_existing_normalize(fake_imagenette):
    from fastai.vision.all import Normalize

    dls = make_tiny_dls(fake_imagenette, batch_tfms=Normalize.from_stats(*IMAGENET, cuda=False))
    stats = dataset_stats(dls, progress=False)
    ensure_normalized(dls, "dataset")
    for dl in dls.loaders:
        (tfm,) = normalizes(dl)
        np.testing.assert_allclose(tfm.mean.flatten().numpy(), stats[0], rtol=1e-6)
    x = dls.valid.one_batch()[0]
    assert x.mean().abs() < 0.5


@pytest.mark.parametrize(
    "stats",
    ["imagenet", "tuple", "lists", "resnet18-arch", "weights"],
)
def test_ensure_normalized_accepts_names_pairs_archs_and_weights(tiny_dls, stats):
    from torchvision.models import ResNet18_Weights, resnet18

    stats = {
        "tuple": IMAGENET,
        "lists": [list(IMAGENET[0]), list(IMAGENET[1])],
        "resnet18-arch": resnet18,
        "weights": ResNet18_Weights.DEFAULT,
    }.get(stats, stats)
    ensure_normalized(tiny_dls, stats)
    (tfm,) = normalizes(tiny_dls.train)
    assert torch.allclose(tfm.std.flatten(), torch.tensor(IMAGENET[1]))


@pytest.mark.parametrize(
    ("stats", "match"),
    [
        (((0.5, 0.5, 0.5), (0.2, 0.0, 0.2)), "std must be > 0"),
        (((0.5, 0.5, 0.5), (0.2, 0.2)), "mean and std must have the same length"),
        (((0.5,), (0.2,)), "1 channels but the images have 3"),
        (((0.5, float("nan"), 0.5), (0.2, 0.2, 0.2)), "mean must be finite"),
        ("no-such-stats", "timm"),
    ],
)
def test_ensure_normalized_rejects_bad_stats_and_leaves_dls_unchanged(tiny_dls, stats, match, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # make "timm is not installed" certain
    with pytest.raises((ValueError, ImportError), match=match):
        ensure_normalized(tiny_dls, stats)
    assert all(not normalizes(dl) for dl in tiny_dls.loaders)


def test_ensure_normalized_refuses_three_channel_stats_for_grey_images(fake_imagenette):
    from fastai.vision.all import PILImageBW

    dls = make_tiny_dls(fake_imagenette, img_cls=PILImageBW)
    with pytest.raises(ValueError, match="3 channels but the images have 1"):
        ensure_normalized(dls, "imagenet")


def test_ensure_normalized_refuses_a_model_without_pretrained_stats(tiny_dls):
    with pytest.raises(ValueError, match="no pretrained statistics"):
        ensure_normalized(tiny_dls, tiny_cnn())


@pytest.mark.filterwarnings("ignore:load_learner")
def test_export_and_load_learner_keep_the_stats(tiny_dls, tmp_path):
    from fastai.vision.all import CrossEntropyLossFlat, Learner, load_learner

    ensure_normalized(tiny_dls, HALF)
    learn = Learner(tiny_dls, tiny_cnn(), loss_func=CrossEntropyLossFlat(), path=tmp_path, cbs=NormalizationCheck())
    learn.export("export.pkl")
    loaded = load_learner(tmp_path / "export.pkl")
    for dl in loaded.dls.loaders:
        (tfm,) = normalizes(dl)
        assert torch.allclose(tfm.mean.flatten(), torch.tensor(HALF[0]))
        assert torch.allclose(tfm.std.flatten(), torch.tensor(HALF[1]))
    # A test loader built from the loaded learner normalizes with the same stats.
    dl = loaded.dls.test_dl([next((Path(tiny_dls.path) / "val").rglob("*.JPEG"))])
    assert len(normalizes(dl)) == 1


# --- model_stats ---------------------------------------------------------------------------------


def test_model_stats_for_torchvision_archs_weights_and_scratch_models():
    from torchvision.models import ResNet18_Weights, efficientnet_b0, resnet18

    assert model_stats(resnet18) == IMAGENET  # fastai's model_meta
    assert model_stats(efficientnet_b0) == IMAGENET  # not in model_meta: torchvision's weight registry
    assert model_stats(ResNet18_Weights.DEFAULT) == IMAGENET
    assert model_stats(tiny_cnn()) is None
    assert model_stats(lambda: None) is None


def test_model_stats_reads_timm_style_pretrained_cfg_on_objects_and_submodules():
    cfg_only = types.SimpleNamespace(pretrained_cfg={"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)})
    assert model_stats(cfg_only) == HALF
    wrapped = nn.Sequential(TimmLike(), nn.Identity())  # as fastai's TimmBody wraps a timm model
    assert model_stats(wrapped) == HALF


def test_model_stats_of_a_learner_follows_its_pretrained_flag(tiny_dls):
    from fastai.vision.all import Learner
    from torchvision.models import resnet18

    learn = Learner(tiny_dls, tiny_cnn())
    assert model_stats(learn) is None
    learn.arch, learn.pretrained = resnet18, True
    assert model_stats(learn) == IMAGENET
    learn.pretrained = False
    assert model_stats(learn) is None


def test_model_stats_of_a_timm_name_needs_timm(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match="timm is not installed"):
        model_stats("vit_base_patch16_224")
    fake = types.ModuleType("timm")
    cfgs = {"vit_base_patch16_224": types.SimpleNamespace(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))}
    fake.models = types.SimpleNamespace(get_pretrained_cfg=cfgs.get)
    monkeypatch.setitem(sys.modules, "timm", fake)
    assert model_stats("vit_base_patch16_224") == HALF
    with pytest.raises(ValueError, match="no_such_model"):
        model_stats("no_such_model")


def test_model_stats_rejects_other_types():
    with pytest.raises(TypeError, match="model_or_arch"):
        model_stats(3.5)


# --- check_normalization and NormalizationCheck --------------------------------------------------


def make_learner(dls, model=None):
    from fastai.vision.all import CrossEntropyLossFlat, Learner

    seed_everything(0)
    return Learner(dls, model if model is not None else tiny_cnn(), loss_func=CrossEntropyLossFlat())


def test_a_correctly_normalized_learner_gets_no_warning(tiny_dls):
    ensure_normalized(tiny_dls, "dataset")
    learn = make_learner(tiny_dls)
    assert problems_of(learn) == []
    report = check_normalization(learn, warn=False)
    assert report.n_normalize == {"train": 1, "valid": 1}
    assert report.input_channels == report.model_channels == 3
    assert all(abs(m) < 0.5 for m in report.mean) and all(0.5 < s < 2 for s in report.std)


def test_a_pretrained_model_with_matching_stats_gets_no_warning(tiny_dls):
    ensure_normalized(tiny_dls, HALF)
    assert problems_of(make_learner(tiny_dls, TimmLike())) == []


def test_missing_normalization_warns(tiny_dls):
    msgs = problems_of(make_learner(tiny_dls))
    assert kinds(msgs) == ["no normalization"]
    assert "ensure_normalized(dls, 'dataset')" in msgs[0]


def test_missing_normalization_of_a_pretrained_model_names_its_stats(tiny_dls):
    msgs = problems_of(make_learner(tiny_dls, TimmLike()))
    assert kinds(msgs) == ["no normalization"] and "mean=(0.5, 0.5, 0.5)" in msgs[0]


def test_already_standardized_data_without_normalize_is_not_flagged(tiny_dls):
    learn = make_learner(tiny_dls)
    x = torch.randn(4, 3, 8, 8)
    assert problems_of(learn, xb=(x,)) == []


def test_a_validation_loader_without_normalize_warns(tiny_dls):
    from fastai.vision.all import Normalize

    tiny_dls.train.after_batch.add(Normalize.from_stats(*dataset_stats(tiny_dls, progress=False), cuda=False))
    msgs = problems_of(make_learner(tiny_dls))
    assert kinds(msgs) == ["no normalization"] and "dls.valid" in msgs[0]


def test_normalization_applied_twice_warns(tiny_dls):
    from fastai.vision.all import Normalize

    ensure_normalized(tiny_dls, "dataset")
    tiny_dls.add_tfms([Normalize.from_stats(*IMAGENET, cuda=False)], "after_batch")
    msgs = problems_of(make_learner(tiny_dls))
    assert kinds(msgs) == ["normalization applied twice"]


def test_pretrained_stats_that_differ_from_the_pipeline_warn(tiny_dls):
    ensure_normalized(tiny_dls, "imagenet")
    msgs = problems_of(make_learner(tiny_dls, TimmLike()))
    assert kinds(msgs) == ["stats mismatch"]
    assert "mean=(0.5, 0.5, 0.5)" in msgs[0] and "mean=(0.485, 0.456, 0.406)" in msgs[0]


def test_three_channel_stats_on_grey_images_warn(fake_imagenette):
    from fastai.vision.all import Normalize, PILImageBW

    dls = make_tiny_dls(fake_imagenette, img_cls=PILImageBW)
    dls.add_tfms([Normalize.from_stats(*IMAGENET, cuda=False)], "after_batch")  # what fastai#3820 did
    msgs = problems_of(make_learner(dls))
    assert kinds(msgs) == ["channel mismatch"] and "3 channels but the images have 1" in msgs[0]


def test_a_model_expecting_other_channels_warns(tiny_dls):
    ensure_normalized(tiny_dls, "dataset")
    msgs = problems_of(make_learner(tiny_dls, tiny_cnn(n_in=1)))
    assert kinds(msgs) == ["channel mismatch"] and "expects 1 channels" in msgs[0]


def test_the_callback_warns_at_the_first_training_batch_and_changes_nothing(tiny_dls):
    learn = make_learner(tiny_dls)
    cb = NormalizationCheck()
    learn.add_cb(cb)
    pipelines = [list(dl.after_batch.fs) for dl in tiny_dls.loaders]
    with learn.no_bar(), learn.no_logging():
        loss_func, cbs = learn.loss_func, list(learn.cbs)
        with pytest.warns(NormalizationWarning, match="no normalization"):
            learn.fit(1)
        assert learn.loss_func is loss_func and list(learn.cbs) == cbs
    assert cb.report is not None and kinds(list(cb.report.problems)) == ["no normalization"]
    assert [list(dl.after_batch.fs) for dl in tiny_dls.loaders] == pipelines


def test_the_callback_is_silent_on_a_normalized_learner_and_skips_prediction(tiny_dls):
    ensure_normalized(tiny_dls, "dataset")
    learn = make_learner(tiny_dls)
    cb = NormalizationCheck()
    learn.add_cb(cb)
    with learn.no_bar(), learn.no_logging():
        learn.get_preds(dl=tiny_dls.valid)
        assert cb.report is None  # validation/prediction batches are not checked
        with warnings.catch_warnings():
            warnings.simplefilter("error", NormalizationWarning)
            learn.fit(1)
    assert cb.report is not None and cb.report.problems == ()


@pytest.mark.slow
def test_the_callback_does_not_change_a_seeded_training_run(fake_imagenette):
    from fastai.vision.all import aug_transforms

    def losses(with_check: bool) -> list[float]:
        seed_everything(0)
        dls = make_tiny_dls(fake_imagenette, batch_tfms=aug_transforms(size=32))
        learn = make_learner(dls)
        if with_check:
            learn.add_cb(NormalizationCheck(warn=False))
        with learn.no_bar(), learn.no_logging():
            learn.fit(1, 1e-2)
        return [float(v) for v in learn.recorder.losses]

    assert losses(True) == losses(False)


def test_dataset_stats_and_ensure_normalized_leave_the_global_rngs_alone(tiny_dls):
    import random

    seed_everything(0)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    seed_everything(0)
    dataset_stats(tiny_dls, progress=False)
    ensure_normalized(tiny_dls, "dataset")
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


def test_dataloaders_of_plain_torch_loaders():
    from fastai.vision.all import DataLoaders

    x = torch.rand(6, 3, 4, 4)
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4)
    dls = DataLoaders(dl, dl)
    np.testing.assert_allclose(dataset_stats(dls, progress=False)[0], reference_stats(x.numpy())[0], rtol=1e-6)
    with pytest.raises(TypeError, match="after_batch"):
        ensure_normalized(dls, "imagenet")


def test_model_stats_turns_timm_errors_for_bad_tags_into_value_errors(monkeypatch):
    def lookup(name):
        raise RuntimeError(f"Invalid pretrained tag for {name}")

    fake = types.ModuleType("timm")
    fake.models = types.SimpleNamespace(get_pretrained_cfg=lookup)
    monkeypatch.setitem(sys.modules, "timm", fake)
    with pytest.raises(ValueError, match="timm cannot resolve model name 'vit_x.bad_tag'"):
        model_stats("vit_x.bad_tag")
