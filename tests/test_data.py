import urllib.error
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastai_tricks import DataUnavailableError, imagenette_path, make_fake_imagenette
from fastai_tricks.data import IMAGENETTE_CLASSES, IMAGENETTE_WNIDS


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_layout_matches_imagenette(tmp_path):
    root = make_fake_imagenette(tmp_path, n_train=3, n_valid=2, size=32)
    assert root == tmp_path
    assert sorted(p.name for p in root.iterdir()) == ["train", "val"]
    for split, count in (("train", 3), ("val", 2)):
        assert sorted(p.name for p in (root / split).iterdir()) == list(IMAGENETTE_WNIDS)
        for wnid in IMAGENETTE_WNIDS:
            files = sorted((root / split / wnid).iterdir())
            assert len(files) == count
            assert all(f.suffix == ".JPEG" and f.name.startswith(wnid) for f in files)


def test_wnids_are_imagenettes_ten_classes():
    assert len(IMAGENETTE_WNIDS) == len(set(IMAGENETTE_WNIDS)) == 10
    assert IMAGENETTE_WNIDS[0] == "n01440764" and IMAGENETTE_WNIDS[-1] == "n03888605"
    assert IMAGENETTE_CLASSES["n01440764"] == "tench"


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    a = make_fake_imagenette(tmp_path / "a", n_train=2, n_valid=1, size=32, seed=3)
    b = make_fake_imagenette(tmp_path / "b", n_train=2, n_valid=1, size=32, seed=3)
    c = make_fake_imagenette(tmp_path / "c", n_train=2, n_valid=1, size=32, seed=4)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert [f.relative_to(a) for f in fa] == [f.relative_to(b) for f in fb]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(fa, fb, strict=True))
    assert any(x.read_bytes() != z.read_bytes() for x, z in zip(fa, fc, strict=True))


def test_images_have_varied_sizes_and_aspect_ratios(tmp_path):
    root = make_fake_imagenette(tmp_path, n_train=5, n_valid=1, size=64)
    sizes = [Image.open(f).size for f in _files(root)]
    assert len(set(sizes)) > 10
    aspects = [w / h for w, h in sizes]
    assert min(aspects) < 0.95 and max(aspects) > 1.05
    assert all(0.8 * 64 - 1 <= min(s) <= 64 for s in sizes)
    assert all(Image.open(f).mode == "RGB" for f in _files(root)[:5])


@pytest.mark.slow
def test_full_size_images_have_imagenettes_full_size_dimensions(tmp_path):
    root = make_fake_imagenette(tmp_path, n_train=10, n_valid=2, full_size=True)
    sizes = [Image.open(f).size for f in _files(root)]
    assert len(sizes) == 120 and all(Image.open(f).format == "JPEG" for f in _files(root)[:5])
    longs = [max(s) for s in sizes]
    assert sum(side == 500 for side in longs) >= 0.75 * len(sizes)  # mostly ImageNet's 500 px long side
    assert max(longs) > 500 and max(longs) <= 4000  # and some larger ones
    aspects = {round(max(s) / min(s), 1) for s in sizes}
    assert aspects <= {1.3, 1.5} and any(w < h for w, h in sizes) and any(w > h for w, h in sizes)


def test_full_size_does_not_change_the_default_data(tmp_path):
    a = make_fake_imagenette(tmp_path / "a", n_train=2, n_valid=1, size=32)
    b = make_fake_imagenette(tmp_path / "b", n_train=2, n_valid=1, size=32, full_size=False)
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(_files(a), _files(b), strict=True))


def test_classes_are_visually_distinct_on_average(tmp_path):
    # The mean image of each class differs from the others: patterns are not all the same.
    root = make_fake_imagenette(tmp_path, n_train=8, n_valid=1, size=32)
    means = []
    for wnid in IMAGENETTE_WNIDS:
        arrs = [
            np.asarray(Image.open(f).convert("RGB").resize((16, 16)), dtype=np.float64)
            for f in (root / "train" / wnid).iterdir()
        ]
        means.append(np.mean(arrs, axis=0))
    dists = [np.abs(means[i] - means[j]).mean() for i in range(10) for j in range(i + 1, 10)]
    assert min(dists) > 1.0


def test_fastai_from_folder_loads_it_unchanged(fake_imagenette):
    from fastai.vision.all import ImageDataLoaders, Resize

    dls = ImageDataLoaders.from_folder(fake_imagenette, valid="val", item_tfms=Resize(32), bs=4, num_workers=0)
    assert list(dls.vocab) == list(IMAGENETTE_WNIDS)
    assert len(dls.train_ds) == 60 and len(dls.valid_ds) == 20
    xb, yb = dls.one_batch()
    assert tuple(xb.shape) == (4, 3, 32, 32)
    assert yb.max() < 10


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"n_train": 0}, ValueError, "n_train must be >= 1, got 0"),
        ({"n_valid": -2}, ValueError, "n_valid must be >= 1, got -2"),
        ({"size": 8}, ValueError, "size must be >= 16 pixels, got 8"),
        ({"size": 32.5}, TypeError, "size must be an int, got 32.5"),
        ({"seed": "0"}, TypeError, "seed must be an int, got '0'"),
    ],
)
def test_make_fake_imagenette_rejects_bad_arguments(tmp_path, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        make_fake_imagenette(tmp_path, **kwargs)


def test_imagenette_path_returns_a_valid_local_folder(fake_imagenette):
    assert imagenette_path(fake_imagenette) == fake_imagenette
    assert imagenette_path(str(fake_imagenette)) == fake_imagenette


def test_imagenette_path_accepts_valid_as_the_validation_folder_name(tmp_path):
    root = make_fake_imagenette(tmp_path, n_train=1, n_valid=1, size=16)
    (root / "val").rename(root / "valid")
    assert imagenette_path(root) == root


@pytest.mark.parametrize(
    ("prepare", "match"),
    [
        (lambda root: root / "missing", "does not exist"),
        (lambda root: (root / "train").mkdir() or root, "has no 'train' subfolder|no 'val"),
        (lambda root: [(root / s / "cls").mkdir(parents=True) for s in ("train", "val")] and root, "no image files"),
    ],
)
def test_imagenette_path_rejects_malformed_folders(tmp_path, prepare, match):
    with pytest.raises(DataUnavailableError, match=match):
        imagenette_path(prepare(tmp_path))


def test_imagenette_path_offline_gives_clear_advice_not_a_urllib_traceback(monkeypatch):
    import fastai.data.external as external

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(external, "untar_data", offline)
    with pytest.raises(DataUnavailableError) as info:
        imagenette_path(size=160)
    message = str(info.value)
    assert "imagenette2-160" in message
    assert "--data PATH" in message and "make_fake_imagenette" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_imagenette_path_rejects_unknown_size():
    with pytest.raises(ValueError, match="size must be one of .* got 224"):
        imagenette_path(size=224)


# --- real digits -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    from fastai_tricks import make_digits

    return make_digits(tmp_path_factory.mktemp("digits"), size=32, valid_pct=0.25, seed=0)


def test_digits_are_sklearns_real_scans_split_stratified_by_class(digits_folder):
    from sklearn.datasets import load_digits

    target = load_digits().target
    counts = {
        split: {c: len(list((digits_folder / split / str(c)).glob("*.png"))) for c in range(10)}
        for split in ("train", "val")
    }
    for c in range(10):
        n = int((target == c).sum())
        assert counts["train"][c] + counts["val"][c] == n
        assert counts["val"][c] == round(0.25 * n)
    assert sum(counts["train"].values()) + sum(counts["val"].values()) == 1797


def test_digit_images_are_the_scans_scaled_to_the_size_in_grayscale(digits_folder):
    from sklearn.datasets import load_digits

    digits = load_digits()
    path = next((digits_folder / "val" / "3").glob("*.png"))
    img = Image.open(path)
    assert img.mode == "L" and img.size == (32, 32)
    scan = digits.images[int(path.stem)] * (255 / 16)
    assert digits.target[int(path.stem)] == 3  # the file name is the scan's index in load_digits
    small = np.asarray(img.resize((8, 8), Image.BOX), dtype=np.float32)
    assert np.abs(small - scan).mean() < 20  # the same digit, up to the bilinear scaling


def test_the_digit_split_depends_only_on_the_seed(tmp_path):
    from fastai_tricks import make_digits

    def val_files(root):
        return sorted(p.relative_to(root) for p in (root / "val").rglob("*.png"))

    a, b = make_digits(tmp_path / "a", size=8, seed=1), make_digits(tmp_path / "b", size=8, seed=1)
    assert val_files(a) == val_files(b)
    assert val_files(a) != val_files(make_digits(tmp_path / "c", size=8, seed=2))


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"size": 4}, "size"), ({"valid_pct": 1.0}, "valid_pct"), ({"seed": -1}, "seed")]
)
def test_make_digits_rejects_bad_arguments(tmp_path, kwargs, match):
    from fastai_tricks import make_digits

    with pytest.raises(ValueError, match=match):
        make_digits(tmp_path, **kwargs)
