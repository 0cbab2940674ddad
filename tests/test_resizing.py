"""ProgressiveResize: properties of the pure schedule, and the callback on real tiny Learners."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from conftest import make_tiny_dls, seed_everything, tiny_cnn
from fastai.callback.core import Callback, CancelFitException
from fastai.data.load import DataLoader
from fastai.torch_core import TensorMask
from fastai.vision.all import CrossEntropyLossFlat, DataLoaders, Learner, aug_transforms
from hypothesis import given
from hypothesis import strategies as st

import fastai_tricks.resizing as resizing
from fastai_tricks.resizing import (
    ProgressiveResize,
    initial_pixels,
    mix_alpha_at,
    resize_schedule,
    schedule_progress,
)

# --- the pure schedule ---------------------------------------------------------------------------------

sizes_st = st.tuples(st.integers(1, 300), st.integers(1, 300))
initial_st = st.one_of(
    st.floats(0.01, 1.0, allow_nan=False),
    st.integers(1, 300),
)


@st.composite
def schedules(draw):
    final = draw(sizes_st)
    initial = draw(initial_st)
    if isinstance(initial, int):
        initial = min(initial, min(final))
    start = draw(st.floats(0.0, 1.0))
    finish = draw(st.floats(start, 1.0))
    kw = dict(
        initial_size=initial,
        start=start,
        finish=finish,
        increase_by=draw(st.integers(1, 32)),
        schedule=draw(st.sampled_from(["batch", "epoch"])),
    )
    return draw(st.integers(1, 5)), draw(st.integers(1, 12)), final, kw


def _progresses(n_epoch, n_iter, schedule):
    if schedule == "epoch":
        return [schedule_progress(e, n_epoch) for e in range(n_epoch) for _ in range(n_iter)]
    return [schedule_progress(k, n_epoch * n_iter) for k in range(n_epoch * n_iter)]


@given(schedules())
def test_schedule_never_decreases_starts_at_initial_and_holds_final_from_finish(case):
    n_epoch, n_iter, final, kw = case
    sizes = resize_schedule(n_epoch, n_iter, final, **kw)
    assert len(sizes) == n_epoch * n_iter
    for a, b in zip(sizes, sizes[1:], strict=False):
        assert b[0] >= a[0] and b[1] >= a[1]
    progress = _progresses(n_epoch, n_iter, kw["schedule"])
    initial = initial_pixels(kw["initial_size"], final, kw["increase_by"])
    assert sizes[0] == (final if progress[0] >= kw["finish"] else initial)
    for p, s in zip(progress, sizes, strict=True):
        if p >= kw["finish"]:
            assert s == final
        assert all(initial[d] <= s[d] <= final[d] for d in range(2))
    assert sizes[-1] == final  # the last step is at progress 1


@given(schedules())
def test_schedule_sizes_are_multiples_of_increase_by_except_the_final_size(case):
    n_epoch, n_iter, final, kw = case
    k = kw["increase_by"]
    for s in resize_schedule(n_epoch, n_iter, final, **kw):
        for d in range(2):
            assert s[d] == final[d] or s[d] % k == 0


@given(schedules(), st.integers(0, 2**31 - 1))
def test_schedule_is_identical_whatever_the_random_state_as_on_every_rank(case, seed):
    n_epoch, n_iter, final, kw = case
    reference = resize_schedule(n_epoch, n_iter, final, **kw)
    random.seed(seed)
    torch.manual_seed(seed)
    assert resize_schedule(n_epoch, n_iter, final, **kw) == reference


@given(sizes_st, st.integers(1, 4), st.integers(1, 6), st.sampled_from(["batch", "epoch"]))
def test_schedule_is_constant_when_initial_equals_final(final, n_epoch, n_iter, schedule):
    assert set(resize_schedule(n_epoch, n_iter, final, initial_size=1.0, schedule=schedule)) == {final}
    assert set(resize_schedule(n_epoch, n_iter, final, initial_size=final, schedule=schedule)) == {final}


def test_schedule_handles_one_step_and_one_epoch_fits():
    assert resize_schedule(1, 1, 64) == [(64, 64)]
    assert resize_schedule(1, 5, 64, schedule="epoch") == [(64, 64)] * 5  # one epoch: nothing to grow between
    batch = resize_schedule(1, 5, 64, start=0.0, finish=1.0)
    assert batch[0] == (32, 32) and batch[-1] == (64, 64)


def test_schedule_defaults_follow_the_documented_shape():
    sizes = resize_schedule(4, 25, 224)
    assert sizes[:25] == [(112, 112)] * 25  # half size for the first quarter
    assert sizes[50:] == [(224, 224)] * 50  # full size for the second half
    assert len(set(sizes[25:50])) > 5  # grows in 4 px steps in between


def test_non_square_sizes_keep_their_aspect_ratio():
    assert initial_pixels(0.5, (64, 128), 4) == (32, 64)
    assert initial_pixels(32, (64, 128), 4) == (32, 64)  # an int is the short side
    sizes = resize_schedule(1, 20, (64, 128), start=0.0, finish=1.0)
    for h, w in sizes:
        assert abs(w / h - 2) < 0.2


@given(sizes_st, st.floats(0.05, 1.0), st.floats(0.01, 1.0), st.floats(0.01, 1.0))
def test_mix_alpha_grows_with_size_from_low_to_high(final, frac, low, high):
    initial = initial_pixels(frac, final, 1)
    sizes = resize_schedule(1, 10, final, initial_size=frac, start=0.0, finish=1.0, increase_by=1)
    alphas = [mix_alpha_at(s, initial, final, low, high) for s in sizes]
    assert alphas[-1] == pytest.approx(high)
    if initial != final:
        assert alphas[0] == pytest.approx(low)
    sign = 1 if high >= low else -1
    assert all(sign * (b - a) >= -1e-12 for a, b in zip(alphas, alphas[1:], strict=False))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(initial_size=0), "initial_size"),
        (dict(initial_size=-8), "initial_size"),
        (dict(initial_size=0.0), "initial_size"),
        (dict(initial_size=1.5), "initial_size"),
        (dict(final_size=0), "final_size"),
        (dict(final_size=(32, -1)), "final_size"),
        (dict(initial_size=64, final_size=32), "initial_size"),
        (dict(initial_size=(16, 40), final_size=(32, 32)), "initial_size"),
        (dict(start=0.8, finish=0.5), "finish"),
        (dict(start=-0.1), "start"),
        (dict(finish=1.5), "finish"),
        (dict(increase_by=0), "increase_by"),
        (dict(increase_by=-4), "increase_by"),
        (dict(mode="linear"), "mode"),
        (dict(schedule="step"), "schedule"),
        (dict(mix_alpha=(0.0, 0.4)), "mix_alpha"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProgressiveResize(**kwargs)


def test_masks_are_resized_with_nearest_and_keep_their_labels():
    mask = TensorMask(torch.randint(0, 5, (2, 32, 48)))
    out = resizing._resize_target(mask, (32, 48), (16, 24), "bilinear")
    assert out.shape == (2, 16, 24) and out.dtype == mask.dtype
    assert set(out.unique().tolist()) <= set(mask.unique().tolist())
    assert resizing._resize_target(torch.tensor([1, 2]), (32, 48), (16, 24), "bilinear").shape == (2,)


# --- the callback on real Learners ---------------------------------------------------------------------


class Spy(Callback):
    """Record the input's spatial size at every batch, after ProgressiveResize (order -5) has run."""

    order = 1

    def __init__(self, fail_at=None, exc=RuntimeError):
        self.train, self.valid, self.fail_at, self.exc = [], [], fail_at, exc

    def before_batch(self):
        hw = tuple(self.learn.xb[0].shape[-2:])
        (self.train if self.learn.training else self.valid).append(hw)
        if self.learn.training and self.fail_at is not None and len(self.train) > self.fail_at:
            raise self.exc("boom")


def _learner(path, size=32, **dls_kw):
    seed_everything(0)
    dls = make_tiny_dls(path, size=size, **dls_kw)
    return Learner(dls, tiny_cnn(), loss_func=CrossEntropyLossFlat())


def _fit(learn, n_epoch, cbs, method="fit"):
    with learn.no_bar(), learn.no_logging():
        getattr(learn, method)(n_epoch, cbs=cbs)


def _tfm_sizes(learn):
    return [getattr(t, "size", None) for t in learn.dls.train.after_batch.fs]


CASES = {
    "interpolate": dict(size=32),
    "interpolate-non-square": dict(size=(32, 48)),
    "aug_transforms": dict(size=40, batch_tfms=aug_transforms(size=32)),
    "aug_transforms-rrc": dict(size=40, batch_tfms=aug_transforms(size=32, min_scale=0.5)),
}


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["batch", "epoch"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_training_batch_has_the_scheduled_size_and_validation_is_full_size(fake_imagenette, case, schedule):
    learn = _learner(fake_imagenette, **CASES[case])
    before = _tfm_sizes(learn)
    spy, pr = Spy(), ProgressiveResize(min_epochs=0, schedule=schedule)
    _fit(learn, 2, [pr, spy])
    final = spy.valid[0]
    assert set(spy.valid) == {final}
    n_iter = len(learn.dls.train)
    expected = resize_schedule(2, n_iter, final, schedule=schedule)
    assert spy.train == expected
    assert pr.sizes == expected and len(pr.lrs) == len(expected)
    assert expected[0] != final  # the fit did train small
    assert _tfm_sizes(learn) == before  # the learner's own pipeline is untouched
    assert learn.dls.train.one_batch()[0].shape[-2:] == final


def test_with_a_size_fixing_augmentation_the_small_batch_comes_from_the_augmentation(fake_imagenette, monkeypatch):
    learn = _learner(fake_imagenette, **CASES["aug_transforms"])

    def no_interpolation(*args, **kwargs):
        raise AssertionError("the batch should already have the scheduled size")

    monkeypatch.setattr(resizing, "_interpolate", no_interpolation)
    spy = Spy()
    _fit(learn, 1, [ProgressiveResize(min_epochs=0, start=0.0, finish=1.0), spy])
    assert spy.train[0] == (16, 16) and spy.train[-1] == (32, 32)


def test_resize_items_shrinks_the_item_resize_in_epoch_schedule(fake_imagenette, monkeypatch):
    learn = _learner(fake_imagenette, size=32)
    monkeypatch.setattr(resizing, "_interpolate", lambda *a, **k: pytest.fail("items should come small"))
    spy = Spy()
    _fit(learn, 2, [ProgressiveResize(min_epochs=0, schedule="epoch", resize_items=True), spy])
    n = len(learn.dls.train)
    assert spy.train == [(16, 16)] * n + [(32, 32)] * n
    assert learn.dls.train.after_item.resize.size == (32, 32)


@pytest.mark.slow
def test_a_no_op_schedule_trains_exactly_like_no_callback(fake_imagenette):
    """The per-fit loader copy shuffles and augments exactly like the learner's own loader."""
    losses = []
    for cbs in ([], [ProgressiveResize(min_epochs=0, initial_size=1.0)]):
        learn = _learner(fake_imagenette, **CASES["aug_transforms-rrc"])
        _fit(learn, 1, cbs)
        losses.append(learn.recorder.losses)
    assert torch.stack(losses[0]).allclose(torch.stack(losses[1]))


@pytest.mark.slow
def test_each_of_fine_tunes_two_fits_runs_its_own_schedule(fake_imagenette):
    learn = _learner(fake_imagenette, **CASES["aug_transforms"])
    spy, pr = Spy(), ProgressiveResize(min_epochs=0, start=0.0, finish=1.0)
    learn.add_cbs([pr, spy])
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(1, freeze_epochs=1)
    n = len(learn.dls.train)
    one_fit = resize_schedule(1, n, 32, start=0.0, finish=1.0)
    assert spy.train == one_fit + one_fit
    assert pr.sizes == one_fit  # sizes of the last fit
    assert set(spy.valid) == {(32, 32)}


@pytest.mark.slow
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt, CancelFitException])
@pytest.mark.parametrize("attached", [True, False])
def test_after_an_exception_mid_fit_validate_and_predict_use_full_size(fake_imagenette, tmp_path, exc, attached):
    learn = _learner(fake_imagenette, **CASES["aug_transforms"])
    before = _tfm_sizes(learn)
    pr = ProgressiveResize(min_epochs=0)
    if attached:
        learn.add_cb(pr)
    fail = Spy(fail_at=2, exc=exc)
    if exc is CancelFitException:
        _fit(learn, 2, [fail] if attached else [pr, fail])
    else:
        with pytest.raises(exc):
            _fit(learn, 2, [fail] if attached else [pr, fail])
    assert fail.train[-1] == (16, 16)  # it failed while training small
    assert _tfm_sizes(learn) == before
    assert learn.dl is None or learn.dl is learn.dls.train
    learn.export(tmp_path / "export.pkl")  # the per-fit loader copy is not pickled with the callback
    spy = Spy()
    with learn.no_bar(), learn.no_logging():
        learn.validate(cbs=[spy])
        learn.get_preds(ds_idx=0, cbs=[spy])
    assert set(spy.valid) == {(32, 32)}
    assert learn.dls.train.one_batch()[0].shape[-2:] == (32, 32)


@pytest.mark.parametrize("attached", [True, False])
def test_an_interrupt_while_the_first_batch_loads_leaves_learn_dl_on_the_learners_loader(
    fake_imagenette, tmp_path, monkeypatch, attached
):
    learn = _learner(fake_imagenette, **CASES["aug_transforms"])
    pr = ProgressiveResize(min_epochs=0)
    if attached:
        learn.add_cb(pr)

    def interrupted(b):
        raise KeyboardInterrupt

    monkeypatch.setattr(learn.dls.train, "create_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _fit(learn, 1, [] if attached else [pr])
    assert learn.dl is learn.dls.train
    monkeypatch.undo()
    assert learn.dls.train.one_batch()[0].shape[-2:] == (32, 32)
    learn.export(tmp_path / "export.pkl")


@pytest.mark.slow
def test_resize_valid_validates_at_the_current_training_size(fake_imagenette):
    learn = _learner(fake_imagenette, size=32)
    spy, pr = Spy(), ProgressiveResize(min_epochs=0, resize_valid=True, schedule="epoch")
    learn.add_cbs([pr, spy])
    _fit(learn, 2, [])
    n_valid = len(learn.dls.valid)
    assert spy.valid == [(16, 16)] * n_valid + [(32, 32)] * n_valid
    spy.valid.clear()
    with learn.no_bar(), learn.no_logging():
        learn.validate()
        learn.get_preds()
    assert set(spy.valid) == {(32, 32)}  # outside fit: full size


def test_lr_find_is_left_at_full_size(fake_imagenette):
    learn = _learner(fake_imagenette, size=32)
    spy, pr = Spy(), ProgressiveResize(min_epochs=0)
    learn.add_cbs([pr, spy])
    with learn.no_bar(), learn.no_logging():
        learn.lr_find(num_it=5, show_plot=False)
    assert set(spy.train) == {(32, 32)} and pr.sizes == []


def test_a_batch_that_is_not_4d_raises_naming_its_shape():
    seed_everything(0)
    items = [(torch.randn(5), i % 2) for i in range(16)]
    dls = DataLoaders(DataLoader(items, bs=4), DataLoader(items, bs=4))
    learn = Learner(dls, torch.nn.Linear(5, 2), loss_func=CrossEntropyLossFlat())
    with pytest.raises(ValueError, match=r"4-D.*\(4, 5\)"):
        _fit(learn, 1, [ProgressiveResize(min_epochs=0)])


class _CancelAtFirstBatch(Callback):
    order = 1

    def before_batch(self):
        raise CancelFitException()


def test_warns_when_cudnn_benchmark_is_on(fake_imagenette):
    learn = _learner(fake_imagenette, size=32)
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        with pytest.warns(UserWarning, match="cudnn.benchmark"):
            _fit(learn, 1, [ProgressiveResize(min_epochs=0), _CancelAtFirstBatch()])
    finally:
        torch.backends.cudnn.benchmark = old


def test_warns_when_the_model_is_compiled_and_recommends_dynamic(fake_imagenette):
    learn = _learner(fake_imagenette, size=32)
    learn.model = torch.compile(learn.model, backend="eager")  # never called: the fit stops at the first batch
    with pytest.warns(UserWarning, match="dynamic=True"):
        _fit(learn, 1, [ProgressiveResize(min_epochs=0), _CancelAtFirstBatch()])


def test_reserve_memory_leaves_batchnorm_statistics_and_gradients_as_they_were(fake_imagenette):
    learn = _learner(fake_imagenette, size=32)
    buffers = [b.clone() for b in learn.model.buffers()]
    _fit(learn, 1, [ProgressiveResize(min_epochs=0, reserve_memory=True), _CancelAtFirstBatch()])
    assert all(torch.equal(a, b) for a, b in zip(buffers, learn.model.buffers(), strict=True))
    assert all(p.grad is None for p in learn.model.parameters())


def test_plot_schedule_draws_size_and_learning_rate(fake_imagenette):
    import matplotlib

    matplotlib.use("Agg")
    pr = ProgressiveResize(min_epochs=0)
    with pytest.raises(RuntimeError, match="fit first"):
        pr.plot_schedule()
    learn = _learner(fake_imagenette, size=32)
    _fit(learn, 1, [pr], method="fit_one_cycle")
    fig = pr.plot_schedule()
    lines = [line for ax in fig.axes for line in ax.get_lines()]
    assert len(lines) == 2
    assert list(lines[0].get_ydata()) == [h for h, _ in pr.sizes]
    assert len(set(lines[1].get_ydata())) > 1  # one-cycle learning rate
    matplotlib.pyplot.close(fig)


def test_the_callback_is_reachable_from_the_learner(fake_imagenette):
    learn = _learner(fake_imagenette, size=32)
    learn.add_cb(ProgressiveResize(min_epochs=0))
    assert isinstance(learn.progressive_resize, ProgressiveResize)


@pytest.mark.slow
def test_mixing_callbacks_attached_with_progressive_resize_get_alpha_growing_with_size(fake_imagenette):
    from fastai_tricks.mixing import CutMix, MixUp

    class AlphaSpy(Callback):
        order = 1  # after ProgressiveResize (-5) and the mixing callbacks (0)

        def __init__(self):
            self.seen = []

        def before_batch(self):
            if self.learn.training:
                self.seen.append((tuple(self.learn.xb[0].shape[-2:]), mixup.alpha, cutmix.alpha))

    learn = _learner(fake_imagenette, **CASES["aug_transforms"])
    mixup, cutmix, spy = MixUp(alpha=0.4), CutMix(alpha=1.0, p=0.5), AlphaSpy()
    pr = ProgressiveResize(min_epochs=0, start=0.0, finish=1.0, mix_alpha=(0.1, 0.5))
    _fit(learn, 1, [pr, mixup, cutmix, spy])
    initial, final = (16, 16), (32, 32)
    assert [s for s, _, _ in spy.seen] == pr.sizes and pr.sizes[0] == initial
    for size, a_mixup, a_cutmix in spy.seen:
        assert a_mixup == a_cutmix == pytest.approx(mix_alpha_at(size, initial, final, 0.1, 0.5))
    assert spy.seen[0][1] == pytest.approx(0.1) and spy.seen[-1][1] == pytest.approx(0.5)
    assert (mixup.alpha, cutmix.alpha) == (0.4, 1.0)  # put back after the fit
    assert all(torch.isfinite(torch.stack(learn.recorder.losses)))


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_mixing_alphas_are_put_back_after_an_exception_mid_fit(fake_imagenette, exc):
    from fastai_tricks.mixing import MixUp

    learn = _learner(fake_imagenette, size=32)
    mixup = MixUp(alpha=0.4)
    learn.add_cb(mixup)
    pr = ProgressiveResize(min_epochs=0, start=0.0, finish=1.0, mix_alpha=(0.1, 0.5))
    with pytest.raises(exc):
        _fit(learn, 1, [pr, Spy(fail_at=2, exc=exc)])  # raises in before_batch, after the alpha was set
    assert mixup.alpha == 0.4


# --- the budget guard ----------------------------------------------------------------------------------


@given(st.integers(1, 200), st.integers(0, 200))
def test_the_schedule_runs_exactly_from_min_epochs_on(n_epoch, min_epochs):
    assert resizing.schedule_pays_off(n_epoch, min_epochs) == (n_epoch >= min_epochs)
    assert resizing.schedule_pays_off(n_epoch, 0)


@pytest.mark.parametrize("bad", [-1, 1.5, "8", True])
def test_min_epochs_must_be_a_non_negative_int(bad):
    with pytest.raises((TypeError, ValueError), match="min_epochs"):
        ProgressiveResize(min_epochs=bad)


@pytest.mark.slow
def test_a_fit_shorter_than_min_epochs_trains_at_full_size_and_says_why(fake_imagenette):
    learn = _learner(fake_imagenette, **CASES["aug_transforms"])
    spy, pr = Spy(), ProgressiveResize(min_epochs=3)
    with pytest.warns(UserWarning, match=r"2-epoch fit is shorter than min_epochs=3"):
        _fit(learn, 2, [pr, spy])
    assert set(spy.train) == {(32, 32)} and pr.sizes == []
    spy.train.clear()
    _fit(learn, 3, [pr, spy])  # long enough: the same callback resizes the next fit
    assert spy.train[0] == (16, 16) and spy.train[-1] == (32, 32)


def _demo_accuracy(path, cbs):
    """Accuracy of a seeded xresnet18 one-cycle fit on generated data, presized as the recipe does."""
    from fastai.vision.all import ImageDataLoaders, Resize, accuracy, set_seed, xresnet18

    set_seed(0, reproducible=True)
    dls = ImageDataLoaders.from_folder(
        path, valid="val", bs=32, num_workers=0, seed=0, item_tfms=Resize(40), batch_tfms=aug_transforms(size=32)
    )
    learn = Learner(dls, xresnet18(n_out=dls.c), metrics=accuracy)
    set_seed(0, reproducible=True)
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        learn.fit_one_cycle(3, 1e-2, cbs=cbs)
        return float(learn.validate()[1]), caught


@pytest.mark.slow
def test_default_progressive_resize_is_within_0_3_points_of_a_fixed_size_fit_on_demo_data(tmp_path):
    """The default on a short budget: the schedule that lost on real data (issue 11) is guarded off."""
    from fastai_tricks.data import make_fake_imagenette

    path = make_fake_imagenette(tmp_path, n_train=30, n_valid=30, size=40, seed=0)
    fixed, _ = _demo_accuracy(path, [])
    pr = ProgressiveResize()
    progressive, caught = _demo_accuracy(path, [pr])
    assert progressive >= fixed - 0.003, (progressive, fixed)
    assert any("min_epochs" in str(w.message) for w in caught)


# --- the record outlives the fit that made it ------------------------------------------------------------

# fastai fires before_fit (and after_fit) for each of these calls, not only for a training fit.
LATER_CALLS = ["validate", "get_preds", "predict", "tta", "show_results", "four_corner_tta", "lr_find"]


def _later_call(learn, call, path):
    """Run one of ``LATER_CALLS`` on ``learn``, quietly."""
    import matplotlib

    import fastai_tricks.tta  # noqa: F401 - registers Learner.four_corner_tta

    matplotlib.use("Agg")
    from fastai.vision.all import get_image_files

    with learn.no_bar(), learn.no_logging():
        if call == "validate":
            learn.validate()
        elif call == "get_preds":
            learn.get_preds()
        elif call == "predict":
            learn.predict(get_image_files(path / "val")[0])
        elif call == "tta":
            learn.tta(n=1)
        elif call == "show_results":
            learn.show_results(max_n=2)
            matplotlib.pyplot.close("all")
        elif call == "four_corner_tta":
            learn.four_corner_tta()
        elif call == "lr_find":
            learn.lr_find(num_it=5, show_plot=False)


def _trained(path, attach):
    """A learner after a 1-epoch one-cycle fit with ProgressiveResize attached as ``attach`` says; and the callback."""
    seed_everything(0)
    dls = make_tiny_dls(path, size=32)
    pr = ProgressiveResize(min_epochs=0)
    learn = Learner(dls, tiny_cnn(), loss_func=CrossEntropyLossFlat(), cbs=[pr] if attach == "Learner(cbs=)" else None)
    _fit(learn, 1, [pr] if attach == "fit(cbs=)" else [], method="fit_one_cycle")
    return learn, pr


@pytest.mark.parametrize("call", LATER_CALLS)
@pytest.mark.parametrize("attach", ["Learner(cbs=)", "fit(cbs=)"])
def test_the_record_of_the_last_training_fit_survives_every_later_call(fake_imagenette, attach, call):
    learn, pr = _trained(fake_imagenette, attach)
    n = len(learn.dls.train)
    expected = resize_schedule(1, n, 32)
    assert pr.sizes == expected and len(pr.lrs) == n  # fit(cbs=) removed the callback: the record stayed
    lrs = list(pr.lrs)
    if attach == "fit(cbs=)":
        assert pr not in learn.cbs
        with learn.added_cbs([pr]):  # the kept reference, attached again for this call only
            _later_call(learn, call, fake_imagenette)
    else:
        _later_call(learn, call, fake_imagenette)
    assert pr.sizes == expected and pr.lrs == lrs, call


def test_plot_schedule_works_after_get_preds_as_the_docs_show(fake_imagenette):
    import matplotlib

    matplotlib.use("Agg")
    learn, pr = _trained(fake_imagenette, "Learner(cbs=)")
    with learn.no_bar(), learn.no_logging():
        learn.get_preds()
        learn.validate()
    fig = learn.progressive_resize.plot_schedule()
    assert list(fig.axes[0].get_lines()[0].get_ydata()) == [h for h, _ in pr.sizes]
    assert pr.sizes[0] == (16, 16) and pr.sizes[-1] == (32, 32)
    matplotlib.pyplot.close(fig)


def test_the_record_survives_export_and_load_learner(fake_imagenette, tmp_path):
    from fastai.learner import load_learner
    from fastai.vision.all import get_image_files

    learn, pr = _trained(fake_imagenette, "Learner(cbs=)")
    learn.export(tmp_path / "export.pkl")
    assert learn.progressive_resize.sizes == resize_schedule(1, len(learn.dls.train), 32)
    loaded = load_learner(tmp_path / "export.pkl")
    assert loaded.progressive_resize.sizes == pr.sizes and loaded.progressive_resize.lrs == pr.lrs
    with loaded.no_bar():
        loaded.predict(get_image_files(fake_imagenette / "val")[0])
    assert loaded.progressive_resize.sizes == pr.sizes


def test_lr_find_keeps_the_previous_training_fits_record_and_the_next_fit_replaces_it(fake_imagenette):
    learn, pr = _trained(fake_imagenette, "Learner(cbs=)")
    one_epoch = list(pr.sizes)
    spy = Spy()
    learn.add_cb(spy)
    with learn.no_bar(), learn.no_logging():
        learn.lr_find(num_it=5, show_plot=False)
    assert set(spy.train) == {(32, 32)}  # lr_find itself ran at full size...
    assert pr.sizes == one_epoch  # ...and left the training fit's record alone
    _fit(learn, 2, [], method="fit_one_cycle")
    assert pr.sizes == resize_schedule(2, len(learn.dls.train), 32)  # a training fit starts a new record


@pytest.mark.parametrize("bs", [2, 8])
def test_the_budget_guard_counts_epochs_whatever_the_number_of_steps(fake_imagenette, bs):
    """Issue 21: the loss followed epochs, not optimizer steps; 4x the steps per epoch does not pass the guard."""
    learn = _learner(fake_imagenette, bs=bs, **CASES["aug_transforms"])
    spy, pr = Spy(), ProgressiveResize(min_epochs=3)
    with pytest.warns(UserWarning, match=r"2-epoch fit is shorter than min_epochs=3.*counted in epochs"):
        _fit(learn, 2, [pr, spy])
    assert set(spy.train) == {(32, 32)} and pr.sizes == []
    spy.train.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(learn, 3, [pr, spy])
    assert not [w for w in caught if "min_epochs" in str(w.message)]
    assert spy.train[0] == (16, 16) and spy.train[-1] == (32, 32)


def test_the_two_batch_sizes_of_the_guard_test_really_differ_in_steps(fake_imagenette):
    small = _learner(fake_imagenette, bs=2, **CASES["aug_transforms"])
    large = _learner(fake_imagenette, bs=8, **CASES["aug_transforms"])
    assert len(small.dls.train) >= 2 * len(large.dls.train)


def test_schedule_pays_off_takes_epochs_only():
    import inspect

    from fastai_tricks import resizing

    assert list(inspect.signature(resizing.schedule_pays_off).parameters) == ["n_epoch", "min_epochs"]
    doc = inspect.getdoc(resizing.schedule_pays_off)
    assert "not in optimizer steps" in doc and "too few steps left" not in doc
