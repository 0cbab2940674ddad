"""The demo data is learnable: a small xresnet beats chance by far in two short epochs."""

import pytest


@pytest.mark.slow
def test_xresnet18_reaches_half_accuracy_in_two_epochs_at_64px(tmp_path):
    from fastai.vision.all import CrossEntropyLossFlat, ImageDataLoaders, Learner, Resize, accuracy, set_seed, xresnet18

    from fastai_tricks import make_fake_imagenette

    path = make_fake_imagenette(tmp_path, n_train=60, n_valid=10, size=72, seed=0)
    set_seed(0, reproducible=True)
    dls = ImageDataLoaders.from_folder(path, valid="val", item_tfms=Resize(64), bs=32, num_workers=0, seed=0)
    learn = Learner(dls, xresnet18(n_out=10), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(2, 1e-2)
    _, acc = learn.validate()
    assert acc >= 0.5, f"validation accuracy {acc:.3f} after 2 epochs; chance is 0.1"
