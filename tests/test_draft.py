"""JPEG draft decoding: the reduction maths, the image type, the loader and ProgressiveResize driving it."""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import sklearn.datasets
import torch
from conftest import tiny_cnn
from fastai.callback.core import Callback
from fastai.vision.all import (
    CategoryBlock,
    DataBlock,
    GrandparentSplitter,
    ImageBlock,
    Learner,
    PILImage,
    RandomResizedCrop,
    Resize,
    TensorImage,
    aug_transforms,
    get_image_files,
    parent_label,
)
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from fastai_tricks import DraftDL, DraftImage, DraftImageBlock, ProgressiveResize, draft, make_fake_imagenette
from fastai_tricks.draft import (
    DCT_REDUCTIONS,
    decoded_size,
    draft_reduction,
    item_need,
    open_image,
    random_resized_crop_need,
    resize_need,
)

REAL_JPEGS = [
    Path(sklearn.datasets.__file__).parent / "images" / "china.jpg",
    Path(sklearn.datasets.__file__).parent / "images" / "flower.jpg",
    Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
]

sides = st.integers(1, 5000)
image_sizes = st.tuples(sides, sides)


# --- the pure maths ----------------------------------------------------------------------------------


@given(image_sizes, st.tuples(st.integers(1, 6000), st.integers(1, 6000)))
def test_draft_reduction_is_the_largest_dct_scale_that_still_covers_the_needed_size(image, needed):
    r = draft_reduction(image, needed)
    assert r in DCT_REDUCTIONS
    dw, dh = decoded_size(image, r)
    if r > 1:
        assert dw >= needed[0] and dh >= needed[1]  # covers
        assert r <= min(image)
    # no larger reduction covers too
    for bigger in (s for s in DCT_REDUCTIONS if s > r):
        bw, bh = decoded_size(image, bigger)
        assert bigger > min(image) or bw < needed[0] or bh < needed[1]


@given(image_sizes, st.tuples(st.integers(1, 6000), st.integers(1, 6000)))
def test_a_needed_size_larger_than_the_image_decodes_at_full_size(image, needed):
    if needed[0] > image[0] or needed[1] > image[1]:
        assert draft_reduction(image, needed) == 1
    assert draft_reduction(image, None) == 1


@given(image_sizes, st.sampled_from(DCT_REDUCTIONS))
def test_decoded_size_rounds_up_like_libjpeg(image, r):
    w, h = decoded_size(image, r)
    assert (w - 1) * r < image[0] <= w * r and (h - 1) * r < image[1] <= h * r


@given(image_sizes, st.tuples(st.integers(8, 600), st.integers(8, 600)), st.sampled_from(["crop", "squish", "pad"]))
def test_after_the_reduction_fastai_resize_never_upsamples(image, target, method):
    """fastai's Resize cuts a region ``cp_sz`` of the decoded image and resizes it to the target."""
    r = draft_reduction(image, resize_need(image, target, method))
    w, h = decoded_size(image, r)
    tw, th = target
    if method == "squish":
        region = (w, h)
    else:  # fastai's own formula (vision/augment.py, Resize.encodes)
        pick = (lambda a, b: a < b) if method == "crop" else (lambda a, b: a > b)
        m = w / tw if pick(w / tw, h / th) else h / th
        region = (int(m * tw), int(m * th))
    if r > 1:
        if method == "pad":  # the image fills the target in one side
            assert max(w / tw, h / th) >= 1
        else:
            assert region[0] >= tw and region[1] >= th


@given(
    st.tuples(st.integers(16, 5000), st.integers(16, 5000)),
    st.integers(8, 400),
    st.floats(0.05, 1.0),
    st.booleans(),
)
def test_after_the_reduction_random_resized_crop_never_upsamples(image, side, min_scale, training):
    target, ratio = (side, side), (3 / 4, 4 / 3)
    r = draft_reduction(image, random_resized_crop_need(image, target, min_scale, ratio, 0.14, training))
    w, h = decoded_size(image, r)
    if r == 1:
        return
    if training:  # the smallest crop fastai can draw, in the decoded image
        area = min_scale * w * h
        assert math.sqrt(area * ratio[0]) >= side - 1e-6 and math.sqrt(area / ratio[1]) >= side - 1e-6
    else:  # the whole image is resized to the target plus fastai's margin
        xtra = math.ceil(side * 0.14 / 8) * 8
        assert w >= side + xtra and h >= side + xtra


def test_a_small_min_scale_leaves_no_room_for_reduction():
    # A 0.08-area crop of a 500x375 image is ~100 px wide: drafting it for a 128 px target would upsample.
    need = random_resized_crop_need((500, 375), (128, 128), 0.08, (3 / 4, 4 / 3), 0.14, True)
    assert draft_reduction((500, 375), need) == 1
    need = random_resized_crop_need((2000, 1500), (128, 128), 0.35, (3 / 4, 4 / 3), 0.14, True)
    assert draft_reduction((2000, 1500), need) == 4


def test_item_need_knows_only_resize_and_random_resized_crop_applied_always():
    assert item_need(Resize(64), 0)((500, 375)) == (64, 64)
    assert item_need(Resize((48, 64)), 0)((500, 375)) == (64, 48)  # fastai sizes are (h, w); needs are (w, h)
    assert item_need(RandomResizedCrop(64, min_scale=0.5), 1)((500, 375)) == (64 + 16, 64 + 16)
    assert item_need(Resize(64, p=0.5), 0) is None
    from fastai.vision.augment import CropPad, RandomCrop

    assert item_need(RandomCrop(64), 0) is None and item_need(CropPad(64), 0) is None


# --- decoding a real JPEG ------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", REAL_JPEGS, ids=lambda p: p.name)
@pytest.mark.parametrize("target", [32, 64, 128, 200])
def test_a_draft_decode_resized_to_the_target_matches_the_full_decode_resized(fn, target):
    full = open_image(fn)
    small = open_image(fn, need=lambda size: (target, target))
    r = draft_reduction(full.size, (target, target))
    assert r > 1 and small.size == decoded_size(full.size, r)  # it really was reduced, as predicted
    a = np.asarray(full.resize((target, target), Image.BILINEAR), dtype=np.float64)
    b = np.asarray(small.resize((target, target), Image.BILINEAR), dtype=np.float64)
    # Measured 0.8-3.3 (of 255): the size of the gap between bilinear and bicubic resizing of the
    # same full decode (0.7-3.6). No colour or brightness shift either.
    assert np.abs(a - b).mean() < 4.0
    assert np.abs(a.mean((0, 1)) - b.mean((0, 1))).max() < 2.0  # measured <= 1.1


@pytest.mark.parametrize("fn", REAL_JPEGS, ids=lambda p: p.name)
def test_pillow_decodes_every_predicted_reduction_to_the_predicted_size(fn):
    w, h = Image.open(fn).size
    for needed in [(1, 1), (w // 8, h // 8), (w // 4 + 1, h // 4), (w // 2, h // 2 + 1), (w, h), (w + 1, h)]:
        r = draft_reduction((w, h), needed)
        assert open_image(fn, need=lambda size, n=needed: n).size == decoded_size((w, h), r)


def _jpeg(tmp_path, name, mode="RGB", size=(400, 300), exif=None, **save):
    rng = np.random.default_rng(0)
    bands = {"RGB": 3, "L": 1, "CMYK": 4}[mode]
    arr = rng.integers(0, 256, (size[1], size[0], bands), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if bands == 1 else arr, mode=mode)
    path = tmp_path / name
    kwargs = {"exif": exif} if exif is not None else {}
    img.save(path, **kwargs, **save)
    return path


def _in_loader(fn, need=(100, 100)):
    token = draft._NEED.set(lambda size: need)
    try:
        return DraftImage.create(fn)
    finally:
        draft._NEED.reset(token)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP"])
def test_other_formats_decode_exactly_as_pilimage(tmp_path, fmt):
    fn = _jpeg(tmp_path, f"x.{fmt.lower()}", format=fmt)
    ours, theirs = _in_loader(fn), PILImage.create(fn)
    assert isinstance(ours, DraftImage) and ours.mode == theirs.mode == "RGB"
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grayscale_and_cmyk_jpegs_come_out_rgb_like_pilimage(tmp_path, mode):
    fn = _jpeg(tmp_path, "x.jpg", mode=mode, format="JPEG")
    ours, theirs = _in_loader(fn), PILImage.create(fn)
    assert ours.mode == theirs.mode == "RGB"
    assert ours.size == decoded_size(theirs.size, 2)  # 400x300 reduced for a 100x100 need


def test_an_exif_rotated_jpeg_keeps_the_stored_orientation_like_pilimage(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: fastai does not apply it, so neither do we
    fn = _jpeg(tmp_path, "x.jpg", exif=exif, format="JPEG")
    assert PILImage.create(fn).size == (400, 300)
    assert _in_loader(fn).size == (200, 150)


def test_outside_a_draft_loader_a_draft_image_is_a_pilimage(tmp_path):
    fn = _jpeg(tmp_path, "x.jpg", format="JPEG")
    ours, theirs = DraftImage.create(fn), PILImage.create(fn)
    assert ours.size == (400, 300) and np.array_equal(np.asarray(ours), np.asarray(theirs))
    data = fn.read_bytes()
    assert np.array_equal(np.asarray(DraftImage.create(data)), np.asarray(theirs))
    arr = np.asarray(theirs)
    assert np.array_equal(np.asarray(DraftImage.create(arr)), arr)
    tensor = TensorImage(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    assert np.array_equal(np.asarray(DraftImage.create(tensor)), arr)


def test_a_file_that_is_not_an_image_raises_fastais_error_with_the_path(tmp_path):
    fn = tmp_path / "notes.jpg"
    fn.write_text("not an image")
    with pytest.raises(Exception) as theirs:
        PILImage.create(fn)
    with pytest.raises(type(theirs.value)) as ours:
        _in_loader(fn)
    assert str(ours.value) == str(theirs.value) and str(fn) in str(ours.value)


def test_a_truncated_jpeg_raises_fastais_error_naming_the_file(tmp_path):
    fn = _jpeg(tmp_path, "x.jpg", format="JPEG")
    fn.write_bytes(fn.read_bytes()[:2000])
    with pytest.raises(OSError) as theirs:
        PILImage.create(fn)
    for make in (_in_loader, DraftImage.create):
        with pytest.raises(type(theirs.value)) as ours:
            make(fn)
        assert str(theirs.value) in str(ours.value) and str(fn) in str(ours.value)
    with pytest.raises(type(theirs.value), match="<bytes>|BytesIO"):
        DraftImage.create(io.BytesIO(fn.read_bytes()))


def test_draft_image_block_rejects_a_class_that_is_not_a_draft_image():
    with pytest.raises(TypeError, match="cls.*PILImage"):
        DraftImageBlock(PILImage)


# --- in a DataBlock ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def large_jpegs(tmp_path_factory):
    """Generated JPEGs with Imagenette's full-size dimensions (mostly 500 px on the long side)."""
    return make_fake_imagenette(tmp_path_factory.mktemp("large"), n_train=2, n_valid=1, full_size=True, seed=0)


def _dls(path, block, item_tfms, batch_size=None, bs=4, workers=0):
    return DataBlock(
        blocks=(block, CategoryBlock),
        get_items=get_image_files,
        get_y=parent_label,
        splitter=GrandparentSplitter(valid_name="val"),
        item_tfms=item_tfms,
        batch_tfms=aug_transforms(size=batch_size, min_scale=0.75) if batch_size else None,
    ).dataloaders(path, bs=bs, num_workers=workers, seed=0)


class DecodeSpy:
    """Records the stored and the decoded size of every image a DraftImage.create call decodes."""

    def __init__(self, monkeypatch):
        self.sizes: list[tuple[int, int]] = []
        self.stored: list[tuple[int, int]] = []
        real = draft.open_image

        def spy(fn, *args, **kwargs):
            img = real(fn, *args, **kwargs)
            self.sizes.append(img.size)
            self.stored.append(Image.open(fn).size)
            return img

        monkeypatch.setattr(draft, "open_image", spy)


def test_the_block_decodes_each_jpeg_at_the_dct_scale_its_resize_needs(large_jpegs, monkeypatch):
    dls = _dls(large_jpegs, DraftImageBlock, Resize(100), batch_size=80)
    assert isinstance(dls.train, DraftDL) and isinstance(dls.valid, DraftDL)
    spy = DecodeSpy(monkeypatch)
    x, _ = dls.train.one_batch()
    assert x.shape[-2:] == (80, 80)
    assert len(spy.sizes) == 4
    assert spy.sizes == [decoded_size(s, draft_reduction(s, (100, 100))) for s in spy.stored]
    assert all(min(s) >= 100 for s in spy.sizes)  # never below the need
    assert any(d != s for d, s in zip(spy.sizes, spy.stored, strict=True))  # and reduced


def test_with_no_size_fixing_item_transform_nothing_is_drafted_and_batches_equal_imageblocks(large_jpegs, monkeypatch):
    from fastai.vision.augment import RandomCrop

    ours = _dls(large_jpegs, DraftImageBlock, [RandomCrop(64)])
    theirs = _dls(large_jpegs, ImageBlock, [RandomCrop(64)])
    spy = DecodeSpy(monkeypatch)
    ours.valid.one_batch()
    assert spy.sizes and spy.sizes == spy.stored
    for a, b in zip(ours.valid, theirs.valid, strict=True):
        assert torch.equal(a[0], b[0])


def test_worker_processes_make_the_same_batches(large_jpegs):
    one = _dls(large_jpegs, DraftImageBlock, Resize(100), batch_size=80)
    two = _dls(large_jpegs, DraftImageBlock, Resize(100), batch_size=80, workers=2)
    for a, b in zip(one.valid, two.valid, strict=True):
        assert torch.equal(a[0], b[0])


def test_validation_and_the_dataset_decode_at_their_own_need(large_jpegs, monkeypatch):
    dls = _dls(large_jpegs, DraftImageBlock, RandomResizedCrop(64, min_scale=0.35))
    spy = DecodeSpy(monkeypatch)
    dls.valid.one_batch()  # validation: the whole image to 64 + 16 px, then a centre crop
    assert all(min(s) >= 80 for s in spy.sizes) and any(max(s) < 500 for s in spy.sizes)
    assert dls.train_ds[0][0].size == Image.open(dls.train_ds.items[0]).size  # outside a loader: full size


def test_a_sample_with_two_images_is_never_drafted(large_jpegs, monkeypatch):
    """Transforms such as RandomResizedCrop take the geometry of a sample's first image for all of its parts."""
    block = DataBlock(
        blocks=(DraftImageBlock, DraftImageBlock),
        get_items=get_image_files,
        get_y=lambda f: f,
        splitter=GrandparentSplitter(valid_name="val"),
        item_tfms=Resize(64),
    )
    dls = block.dataloaders(large_jpegs, bs=2, num_workers=0, seed=0)
    spy = DecodeSpy(monkeypatch)
    x, y = dls.valid.one_batch()
    assert x.shape[-2:] == y.shape[-2:] == (64, 64)
    assert spy.sizes[-4:] == spy.stored[-4:]  # the batch's two pairs at full size


def test_a_segmentation_block_is_never_drafted(tmp_path, monkeypatch):
    from fastai.vision.all import MaskBlock

    from fastai_tricks.data import make_fake_segmentation

    root = make_fake_segmentation(tmp_path / "seg", n_train=4, n_valid=2, size=200)
    codes = (root / "codes.txt").read_text().split()
    for f in sorted((root / "images").glob("*")):  # JPEG images, so that they could be drafted
        Image.open(f).convert("RGB").save(f.with_suffix(".jpg"), quality=90)
    block = DataBlock(
        blocks=(DraftImageBlock, MaskBlock(codes)),
        get_items=lambda p: sorted((p / "images").glob("*.jpg")),
        get_y=lambda f: root / "labels" / f"{f.stem}_P.png",
        item_tfms=Resize(64),
    )
    dls = block.dataloaders(root, bs=2, num_workers=0, seed=0)
    spy = DecodeSpy(monkeypatch)
    x, y = dls.train.one_batch()
    assert x.shape[-2:] == y.shape[-2:] == (64, 64)
    assert spy.sizes and spy.sizes == spy.stored


# --- ProgressiveResize drives it --------------------------------------------------------------------------


class EpochDecodes(Callback):
    """Groups the decoded sizes recorded by a DecodeSpy per training epoch."""

    order = 90

    def __init__(self, spy):
        self.spy, self.per_epoch = spy, []

    def before_train(self):
        self.spy.sizes.clear()

    def after_train(self):
        self.per_epoch.append(list(self.spy.sizes))


@pytest.mark.slow
def test_progressive_resize_shrinks_the_decode_epoch_by_epoch_and_leaves_the_loaders_as_they_were(
    large_jpegs, monkeypatch
):
    dls = _dls(large_jpegs, DraftImageBlock, Resize(200), batch_size=160, bs=4)
    learn = Learner(dls, tiny_cnn())
    spy = DecodeSpy(monkeypatch)
    epochs = EpochDecodes(spy)
    with learn.no_bar(), learn.no_logging():
        learn.fit(4, 1e-3, cbs=[ProgressiveResize(min_epochs=0, start=0.5, finish=0.75), epochs])
    first, last = epochs.per_epoch[0], epochs.per_epoch[-1]
    # Epoch 0 trains at 80 px: items at 100 px, JPEGs reduced to >= 100 px; the last at full size (>= 200 px).
    assert all(min(s) >= 100 for s in first) and all(min(s) >= 200 for s in last)
    assert sum(w * h for w, h in first) < 0.5 * sum(w * h for w, h in last)
    assert learn.dls.train.after_item.resize.size == (200, 200)  # the learner's own pipeline is untouched
    spy.sizes.clear()
    learn.dls.train.one_batch()
    assert all(min(s) >= 200 for s in spy.sizes)


def test_with_the_batch_schedule_each_epochs_items_have_that_epochs_largest_size(fake_imagenette):
    from fastai.vision.all import ImageDataLoaders

    dls = ImageDataLoaders.from_folder(
        fake_imagenette, valid="val", item_tfms=Resize(40), batch_tfms=aug_transforms(size=32), bs=8, num_workers=0
    )
    seen = []
    pr = ProgressiveResize(min_epochs=0, start=0.25, finish=0.75)

    class ItemSizes(Callback):
        order = 90

        def before_batch(self):  # the per-fit copy's item Resize
            seen.append((self.epoch, tuple(pr._item_tfms[0].size)))

    learn = Learner(dls, tiny_cnn())
    with learn.no_bar(), learn.no_logging():
        learn.fit(4, 1e-3, cbs=[pr, ItemSizes()])
    n = len(dls.train)
    for epoch in range(4):
        largest = max(pr.sizes[epoch * n : (epoch + 1) * n])
        item = {s for e, s in seen if e == epoch}
        assert item == {(round(40 * largest[1] / 32), round(40 * largest[0] / 32))}
    assert dls.train.after_item.resize.size == (40, 40)


def test_resize_items_false_keeps_full_size_items(fake_imagenette):
    from fastai.vision.all import ImageDataLoaders

    dls = ImageDataLoaders.from_folder(
        fake_imagenette, valid="val", item_tfms=Resize(40), batch_tfms=aug_transforms(size=32), bs=8, num_workers=0
    )

    class ItemSizes(Callback):
        def __init__(self, pr):
            self.pr, self.seen = pr, set()

        def before_batch(self):  # the per-fit copy's item transforms, if it made any
            self.seen.update(tuple(t.size) for t in self.pr._item_tfms)

    item_sizes: dict[bool, set] = {}
    for resize_items in (False, True):
        pr = ProgressiveResize(min_epochs=0, resize_items=resize_items)
        spy = ItemSizes(pr)
        learn = Learner(dls, tiny_cnn())
        with learn.no_bar(), learn.no_logging():
            learn.fit(2, 1e-3, cbs=[pr, spy])
        item_sizes[resize_items] = spy.seen
        assert pr.sizes[0] == (16, 16)  # the batch shrank either way
    assert item_sizes[False] == set()
    assert item_sizes[True] == {(35, 35), (40, 40)}  # epoch 0 grows to 28 px: items at 28 * 40 / 32


def test_an_exported_draft_learner_predicts_from_a_jpeg_path(large_jpegs, tmp_path):
    from fastai.learner import load_learner

    learn = Learner(_dls(large_jpegs, DraftImageBlock, Resize(64), bs=4), tiny_cnn())
    learn.export(tmp_path / "export.pkl")
    fn = get_image_files(large_jpegs)[0]
    loaded = load_learner(tmp_path / "export.pkl")
    with loaded.no_bar():
        pred, idx, probs = loaded.predict(fn)
    assert probs.shape == (10,)
    with learn.no_bar():
        assert torch.allclose(learn.predict(fn)[2], probs)
