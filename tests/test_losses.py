"""Tests for fastai_tricks.losses: smooth_targets and LabelSmoothingCE."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import seed_everything, tiny_cnn
from hypothesis import given
from hypothesis import strategies as st

from fastai_tricks.losses import LabelSmoothingCE, smooth_targets

eps_values = st.floats(0.0, 0.999, exclude_max=False)


def logits_and_labels(seed: int, n: int, k: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * scale, torch.randint(0, k, (n,), generator=g)


# --- smooth_targets ------------------------------------------------------------------------------


def test_worked_example_k5_eps01_gives_092_and_002():
    t = smooth_targets(torch.tensor([2]), n_classes=5, eps=0.1)
    assert t[0].tolist() == pytest.approx([0.02, 0.02, 0.92, 0.02, 0.02])


@given(seed=st.integers(0, 2**16), n=st.integers(1, 6), k=st.integers(1, 8), eps=eps_values)
def test_smoothed_rows_sum_to_one_for_hard_and_soft_targets(seed, n, k, eps):
    _, y = logits_and_labels(seed, n, k)
    hard = smooth_targets(y, k, eps, dtype=torch.float64)
    torch.testing.assert_close(hard.sum(1), torch.ones(n, dtype=torch.float64))
    assert (hard >= 0).all()
    soft = torch.softmax(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), 1)
    torch.testing.assert_close(smooth_targets(soft, k, eps).sum(1), torch.ones(n, dtype=torch.float64))


def test_smooth_targets_are_made_on_the_labels_device():
    # The meta device stands in for a GPU: a target built on the default device would come back on the CPU.
    y = torch.zeros(3, dtype=torch.long, device="meta")
    t = smooth_targets(y, 4, 0.1)
    assert t.device.type == "meta" and t.shape == (3, 4)


def test_eps_zero_gives_one_hot_and_extra_axes_keep_the_class_axis_at_1():
    y = torch.tensor([[0, 1], [2, 0]])  # (N=2, d=2), e.g. per-pixel labels
    t = smooth_targets(y, 3, 0.0)
    assert t.shape == (2, 3, 2)
    assert torch.equal(t.argmax(1), y) and torch.equal(t.sum(1), torch.ones(2, 2))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"eps": 1.0}, ValueError, r"^eps must be in \[0, 1\), got 1.0"),
        ({"eps": -0.1}, ValueError, r"^eps must be in"),
        ({"eps": float("nan")}, ValueError, r"^eps must be finite"),
        ({"n_classes": 0}, ValueError, r"^n_classes must be >= 1, got 0"),
        ({"y": torch.rand(4, 3)}, ValueError, "soft targets y must have shape"),
        ({"y": torch.tensor([True, False])}, ValueError, "dtype torch.bool"),
        ({"y": [0, 1]}, TypeError, "y must be a torch.Tensor"),
    ],
)
def test_smooth_targets_rejects_bad_input(kwargs, error, match):
    args = {"y": torch.tensor([0, 1]), "n_classes": 5, "eps": 0.1, **kwargs}
    with pytest.raises(error, match=match):
        smooth_targets(**args)


# --- LabelSmoothingCE ----------------------------------------------------------------------------


@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 8),
    k=st.integers(2, 10),
    eps=eps_values,
    reduction=st.sampled_from(["mean", "sum", "none"]),
)
def test_equals_fastai_label_smoothing_cross_entropy_on_integer_targets(seed, n, k, eps, reduction):
    from fastai.losses import LabelSmoothingCrossEntropy

    out, y = logits_and_labels(seed, n, k)
    ours = LabelSmoothingCE(eps, reduction)(out, y)
    theirs = LabelSmoothingCrossEntropy(eps, reduction=reduction)(out, y)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@given(seed=st.integers(0, 2**16), n=st.integers(1, 8), k=st.integers(2, 10), eps=eps_values)
def test_smoothed_loss_lies_between_plain_and_uniform_cross_entropy(seed, n, k, eps):
    out, y = logits_and_labels(seed, n, k)
    out = out.double()
    loss = LabelSmoothingCE(eps, "none")(out, y)
    plain = F.cross_entropy(out, y, reduction="none")
    uniform = -F.log_softmax(out, 1).mean(1)
    lo, hi = torch.minimum(plain, uniform), torch.maximum(plain, uniform)
    assert (loss >= lo - 1e-12).all() and (loss <= hi + 1e-12).all()


@given(seed=st.integers(0, 2**16), n=st.integers(1, 8), k=st.integers(2, 10), eps=eps_values)
def test_equals_cross_entropy_against_smooth_targets_and_one_hot_soft_targets(seed, n, k, eps):
    out, y = logits_and_labels(seed, n, k)
    out = out.double()
    loss = LabelSmoothingCE(eps, "none")
    expected = -(smooth_targets(y, k, eps, dtype=torch.float64) * F.log_softmax(out, 1)).sum(1)
    torch.testing.assert_close(loss(out, y), expected)
    torch.testing.assert_close(loss(out, F.one_hot(y, k).double()), expected)


@given(seed=st.integers(0, 2**16), k=st.integers(2, 10), eps=eps_values, lam=st.floats(0, 1))
def test_loss_of_mixed_targets_is_the_mix_of_losses(seed, k, eps, lam):
    # This is why mixing callbacks may mix either targets or losses (y_int=True) with the same result.
    out, y = logits_and_labels(seed, 6, k)
    out = out.double()
    y2 = y.roll(1)
    loss = LabelSmoothingCE(eps, "none")
    mixed = lam * F.one_hot(y, k).double() + (1 - lam) * F.one_hot(y2, k).double()
    torch.testing.assert_close(loss(out, mixed), lam * loss(out, y) + (1 - lam) * loss(out, y2))


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 4, 3, 5)])
def test_dense_logits_get_the_loss_of_each_position_over_the_class_axis(shape):
    # Per-pixel (N, K, L) or (N, K, H, W) logits: the softmax runs over axis 1 at every position, the axis a
    # 3-D tensor's implicit softmax dimension (0) would miss.
    g = torch.Generator().manual_seed(0)
    out = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    loss = LabelSmoothingCE(0.2, "none")
    per_pos = loss(out, y)
    flat_out = out.movedim(1, -1).reshape(-1, shape[1])
    torch.testing.assert_close(per_pos.flatten(), loss(flat_out, y.flatten()))
    probs = loss.activation(out)
    torch.testing.assert_close(probs, F.softmax(out, 1))
    torch.testing.assert_close(probs.sum(1), torch.ones(shape[0], *shape[2:], dtype=torch.float64))


def test_eps_zero_is_plain_cross_entropy():
    out, y = logits_and_labels(0, 7, 4)
    torch.testing.assert_close(LabelSmoothingCE(0.0)(out, y), F.cross_entropy(out, y))


def test_reduction_can_be_set_to_none_by_fastai_none_reduce_and_is_restored():
    from fastai.layers import NoneReduce

    out, y = logits_and_labels(0, 5, 3)
    loss = LabelSmoothingCE()
    with NoneReduce(loss) as lf:
        per_sample = lf(out, y)
    assert per_sample.shape == (5,)
    assert loss.reduction == "mean"
    torch.testing.assert_close(loss(out, y), per_sample.mean())
    with pytest.raises(ValueError, match="reduction must be one of"):
        loss.reduction = "avg"


@pytest.mark.parametrize(
    ("target", "match"),
    [(torch.rand(4, 5), "soft targets must have the shape"), (torch.zeros(4, 3, 2), "target must be class indices")],
)
def test_bad_target_shapes_raise(target, match):
    with pytest.raises(ValueError, match=match):
        LabelSmoothingCE()(torch.randn(4, 3), target)


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"eps": 1.0}, r"^eps must be in \[0, 1\), got 1.0"), ({"reduction": "avg"}, "^reduction")]
)
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LabelSmoothingCE(**kwargs)


def test_pickles_with_settings_and_fastai_protocol():
    loss = LabelSmoothingCE(0.2, "sum")
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        back = pickle.loads(pickle.dumps(loss, protocol=protocol))
        assert (back.eps, back.reduction, back.y_int) == (0.2, "sum", True)
    out, y = logits_and_labels(0, 4, 3)
    torch.testing.assert_close(back(out, y), loss(out, y))
    assert "eps=0.2" in repr(loss)


def test_activation_and_decodes_give_probabilities_and_classes():
    out = torch.tensor([[0.0, 2.0, 1.0]])
    loss = LabelSmoothingCE()
    torch.testing.assert_close(loss.activation(out), F.softmax(out, 1))
    assert loss.decodes(loss.activation(out)).tolist() == [1]


@pytest.mark.filterwarnings("ignore:load_learner")
def test_fit_predict_export_and_load_learner(tiny_dls, tmp_path):
    from fastai.vision.all import Learner, load_learner

    seed_everything(0)
    learn = Learner(tiny_dls, tiny_cnn(), loss_func=LabelSmoothingCE(0.1), path=tmp_path)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2)
        probs, targs, decoded = learn.get_preds(with_decoded=True)
    torch.testing.assert_close(probs.sum(1), torch.ones(len(probs)))
    assert torch.equal(decoded, probs.argmax(1))
    learn.export("export.pkl")
    loaded = load_learner(tmp_path / "export.pkl")
    assert isinstance(loaded.loss_func, LabelSmoothingCE) and loaded.loss_func.eps == 0.1
    item = tiny_dls.valid_ds.items[0]
    with loaded.no_bar():
        label, idx, p = loaded.predict(item)
    assert label in tiny_dls.vocab and int(idx) == int(p.argmax()) and float(p.sum()) == pytest.approx(1.0)


def test_composes_with_fastai_mixup_and_is_left_unchanged(tiny_dls):
    from fastai.vision.all import Learner, MixUp

    seed_everything(0)
    loss = LabelSmoothingCE(0.1)
    learn = Learner(tiny_dls, tiny_cnn(), loss_func=loss, cbs=MixUp(0.4))
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2)
    assert learn.loss_func is loss and loss.reduction == "mean"
    assert torch.isfinite(torch.tensor(learn.recorder.losses)).all()
