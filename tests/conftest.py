"""Shared fixtures: generated Imagenette-like data, tiny Learners, seeded RNGs and hypothesis profiles.

Nothing here downloads anything: every data set is drawn by
``fastai_tricks.data.make_fake_imagenette`` into pytest's temp folders.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "thorough",
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev",
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# One torch thread per test process: the tests' models are tiny, so a second thread gains little, and two pytest-xdist
# workers with two OpenMP threads each on a 2-core machine spin-wait on each other (batches ran 10 to 30 times
# slower when oversubscribed). TORCH_NUM_THREADS overrides it.
torch.set_num_threads(int(os.environ.get("TORCH_NUM_THREADS", "1")))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so a test's random draws repeat."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture
def seeded() -> int:
    """Seed every RNG with 0 and return the seed."""
    seed_everything(0)
    return 0


@pytest.fixture
def rng() -> torch.Generator:
    """A torch generator seeded with 0, for tests that draw their own tensors."""
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def fake_imagenette(tmp_path_factory):
    """A small generated Imagenette tree (6 train and 2 valid images per class, short side 48 px)."""
    from fastai_tricks.data import make_fake_imagenette

    return make_fake_imagenette(tmp_path_factory.mktemp("imagenette"), n_train=6, n_valid=2, size=48, seed=0)


def make_tiny_dls(path, size: int = 32, bs: int = 8, **kwargs):
    """ImageDataLoaders over ``path`` resized to ``size`` px, with no worker processes."""
    from fastai.vision.all import ImageDataLoaders, Resize

    kwargs.setdefault("item_tfms", Resize(size))
    return ImageDataLoaders.from_folder(path, valid="val", bs=bs, num_workers=0, seed=0, **kwargs)


def make_segmentation_dls(path, bs: int = 4):
    """SegmentationDataLoaders over a ``make_fake_segmentation`` folder (laid out like CamVid), and its codes."""
    from fastai.vision.all import SegmentationDataLoaders, get_image_files

    codes = (path / "codes.txt").read_text().split()
    dls = SegmentationDataLoaders.from_label_func(
        path,
        get_image_files(path / "images"),
        lambda f: path / "labels" / f"{f.stem}_P{f.suffix}",
        codes=codes,
        bs=bs,
        num_workers=0,
        seed=0,
    )
    return dls, codes


def tiny_cnn(n_in: int = 3, n_out: int = 10) -> torch.nn.Module:
    """A very small CNN, fast enough to fit an epoch in a fraction of a second."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(n_in, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, n_out),
    )


@pytest.fixture
def tiny_dls(fake_imagenette):
    """DataLoaders over ``fake_imagenette`` at 32 px, batch size 8."""
    seed_everything(0)
    return make_tiny_dls(fake_imagenette)


@pytest.fixture
def tiny_learner(tiny_dls):
    """A Learner with ``tiny_cnn`` on ``tiny_dls``, CrossEntropyLossFlat and accuracy."""
    from fastai.vision.all import CrossEntropyLossFlat, Learner, accuracy

    seed_everything(0)
    return Learner(tiny_dls, tiny_cnn(), loss_func=CrossEntropyLossFlat(), metrics=accuracy)


@pytest.hookimpl(tryfirst=True)  # before the marker expression deselects anything
def pytest_collection_modifyitems(config, items):
    """Every torchrun launch belongs to the slow tier: each costs seconds of process start-up and a gloo group."""
    for item in items:
        if item.get_closest_marker("distributed") is not None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)
