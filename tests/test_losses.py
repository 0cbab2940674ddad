"""Tests for fastai_tricks.losses: smooth_targets, LabelSmoothingCE and LabelSmoothingCEFlat."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import seed_everything, tiny_cnn
from hypothesis import given
from hypothesis import strategies as st

from fastai_tricks.losses import LabelSmoothingCE, LabelSmoothingCEFlat, smooth_targets

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
    ours = LabelSmoothingCE(eps, reduction=reduction)(out, y)
    theirs = LabelSmoothingCrossEntropy(eps, reduction=reduction)(out, y)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@given(seed=st.integers(0, 2**16), n=st.integers(1, 8), k=st.integers(2, 10), eps=eps_values)
def test_smoothed_loss_lies_between_plain_and_uniform_cross_entropy(seed, n, k, eps):
    out, y = logits_and_labels(seed, n, k)
    out = out.double()
    loss = LabelSmoothingCE(eps, reduction="none")(out, y)
    plain = F.cross_entropy(out, y, reduction="none")
    uniform = -F.log_softmax(out, 1).mean(1)
    lo, hi = torch.minimum(plain, uniform), torch.maximum(plain, uniform)
    assert (loss >= lo - 1e-12).all() and (loss <= hi + 1e-12).all()


@given(seed=st.integers(0, 2**16), n=st.integers(1, 8), k=st.integers(2, 10), eps=eps_values)
def test_equals_cross_entropy_against_smooth_targets_and_one_hot_soft_targets(seed, n, k, eps):
    out, y = logits_and_labels(seed, n, k)
    out = out.double()
    loss = LabelSmoothingCE(eps, reduction="none")
    expected = -(smooth_targets(y, k, eps, dtype=torch.float64) * F.log_softmax(out, 1)).sum(1)
    torch.testing.assert_close(loss(out, y), expected)
    torch.testing.assert_close(loss(out, F.one_hot(y, k).double()), expected)


@given(seed=st.integers(0, 2**16), k=st.integers(2, 10), eps=eps_values, lam=st.floats(0, 1))
def test_loss_of_mixed_targets_is_the_mix_of_losses(seed, k, eps, lam):
    # This is why mixing callbacks may mix either targets or losses (y_int=True) with the same result.
    out, y = logits_and_labels(seed, 6, k)
    out = out.double()
    y2 = y.roll(1)
    loss = LabelSmoothingCE(eps, reduction="none")
    mixed = lam * F.one_hot(y, k).double() + (1 - lam) * F.one_hot(y2, k).double()
    torch.testing.assert_close(loss(out, mixed), lam * loss(out, y) + (1 - lam) * loss(out, y2))


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 4, 3, 5)])
def test_dense_logits_get_the_loss_of_each_position_over_the_class_axis(shape):
    # Per-pixel (N, K, L) or (N, K, H, W) logits: the softmax runs over axis 1 at every position, the axis a
    # 3-D tensor's implicit softmax dimension (0) would miss.
    g = torch.Generator().manual_seed(0)
    out = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    loss = LabelSmoothingCE(0.2, reduction="none")
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
    loss = LabelSmoothingCE(0.2, reduction="sum")
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


# --- fastai drop-in: weight, axis and the Flat form (issue #19) ----------------------------------


@st.composite
def class_weights(draw, k: int) -> torch.Tensor | None:
    """None, or k non-negative class weights with at least one positive (zeros included on purpose)."""
    if draw(st.booleans()):
        return None
    values = draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0, 3.5]), min_size=k, max_size=k))
    values[draw(st.integers(0, k - 1))] = draw(st.floats(0.1, 4.0))
    return torch.tensor(values)


@st.composite
def fastai_cases(draw):
    """Logits, integer targets, eps, weight, reduction and a class axis for a comparison with fastai."""
    seed, k = draw(st.integers(0, 2**16)), draw(st.integers(2, 7))
    g = torch.Generator().manual_seed(seed)
    n = draw(st.integers(1, 5))
    dense = draw(st.booleans())
    # (N, K) logits, or (N, K, H, W) with the class axis at 1; the axis then says where K is.
    logits = torch.randn((n, k, 3, 2) if dense else (n, k), generator=g) * 3
    axis = draw(st.sampled_from([1, -1] if not dense else [1, -1, 2]))
    logits = logits.movedim(1, axis)
    y = torch.randint(0, k, (n, 3, 2) if dense else (n,), generator=g)
    return logits, y, axis, draw(eps_values), draw(class_weights(k)), draw(st.sampled_from(["mean", "sum", "none"]))


@given(case=fastai_cases())
def test_equals_fastai_for_every_eps_weight_reduction_and_axis(case):
    from fastai.losses import LabelSmoothingCrossEntropy, LabelSmoothingCrossEntropyFlat

    logits, y, axis, eps, weight, reduction = case
    flat = LabelSmoothingCEFlat(eps, weight, reduction, axis=axis)(logits, y)
    # fastai's flattening fails for (N, K) logits with axis=1 (it swaps axis 1 of the (N,) target too): compare
    # with its axis=-1, the same axis.
    their_axis = -1 if logits.ndim == 2 else axis
    theirs_flat = LabelSmoothingCrossEntropyFlat(eps, weight, reduction=reduction, axis=their_axis)(logits, y)
    # A batch whose every target has weight 0 gives nan under 'mean' in both.
    torch.testing.assert_close(flat, theirs_flat, rtol=1e-6, atol=1e-6, equal_nan=True)
    # The unflattened loss with the same class axis equals fastai's (class axis 1 only) on moved logits.
    ours = LabelSmoothingCE(eps, weight, reduction, axis=axis)(logits, y)
    theirs = LabelSmoothingCrossEntropy(eps, weight, reduction)(logits.movedim(axis, 1), y)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6, equal_nan=True)
    if reduction == "none":
        assert ours.shape == y.shape and flat.shape == (y.numel(),)


def test_positional_weight_means_class_weights_as_in_fastai():
    from fastai.losses import LabelSmoothingCrossEntropy, LabelSmoothingCrossEntropyFlat

    w = torch.tensor([1.0, 3.0, 0.5, 2.0])
    out, y = logits_and_labels(1, 9, 4)
    loss = LabelSmoothingCE(0.1, w)
    assert torch.equal(loss.weight, w) and loss.reduction == "mean" and loss.eps == 0.1
    torch.testing.assert_close(loss(out, y), LabelSmoothingCrossEntropy(0.1, w)(out, y), rtol=1e-6, atol=1e-6)
    flat = LabelSmoothingCEFlat(0.1, w, "sum")
    assert torch.equal(flat.weight, w) and flat.reduction == "sum" and flat.eps == 0.1
    theirs = LabelSmoothingCrossEntropyFlat(0.1, w, reduction="sum")(out, y)
    torch.testing.assert_close(flat(out, y), theirs, rtol=1e-6, atol=1e-6)
    # The weight counts: class 1's weight 3 makes its samples cost more than unweighted.
    assert not torch.allclose(loss(out, y), LabelSmoothingCE(0.1)(out, y))


def test_old_positional_reduction_still_works_but_warns():
    out, y = logits_and_labels(2, 6, 3)
    with pytest.warns(DeprecationWarning, match="pass reduction='sum' by keyword"):
        old = LabelSmoothingCE(0.2, "sum")
    assert old.weight is None and old.reduction == "sum"
    torch.testing.assert_close(old(out, y), LabelSmoothingCE(0.2, reduction="sum")(out, y))
    with pytest.raises(TypeError, match="two reductions"):
        LabelSmoothingCE(0.2, "sum", "none")


@given(
    seed=st.integers(0, 2**16),
    k=st.integers(2, 6),
    eps=eps_values,
    reduction=st.sampled_from(["mean", "sum", "none"]),
    dense=st.booleans(),
    data=st.data(),
)
def test_one_hot_soft_target_with_weights_equals_its_class_index(seed, k, eps, reduction, dense, data):
    weight = data.draw(class_weights(k).filter(lambda w: w is not None))
    g = torch.Generator().manual_seed(seed)
    shape = (4, k, 3) if dense else (4, k)
    out = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, k, (4, 3) if dense else (4,), generator=g)
    one_hot = F.one_hot(y, k).movedim(-1, 1).double()
    for loss in (LabelSmoothingCE(eps, weight, reduction), LabelSmoothingCEFlat(eps, weight, reduction, axis=1)):
        torch.testing.assert_close(loss(out, one_hot), loss(out, y), equal_nan=True)


@given(seed=st.integers(0, 2**16), k=st.integers(2, 6), eps=eps_values, lam=st.floats(0, 1), data=st.data())
def test_weighted_loss_of_a_mixed_target_mixes_the_losses_and_weights_of_its_parts(seed, k, eps, lam, data):
    weight = data.draw(class_weights(k).filter(lambda w: w is not None)).double()
    out, y = logits_and_labels(seed, 6, k)
    out, y2 = out.double(), y.roll(1)
    mixed = lam * F.one_hot(y, k).double() + (1 - lam) * F.one_hot(y2, k).double()
    per_sample = LabelSmoothingCE(eps, weight, reduction="none")
    own, partner = per_sample(out, y), per_sample(out, y2)
    torch.testing.assert_close(per_sample(out, mixed), lam * own + (1 - lam) * partner)
    # 'mean': the weighted NLL over the sum of each sample's weight lam*w[y] + (1-lam)*w[y2]; smoothing unweighted.
    log_p = F.log_softmax(out, 1)
    nll = -(
        lam * weight[y] * log_p.gather(1, y[:, None])[:, 0]
        + (1 - lam) * weight[y2] * log_p.gather(1, y2[:, None])[:, 0]
    )
    expected = (1 - eps) * nll.sum() / (lam * weight[y] + (1 - lam) * weight[y2]).sum() - eps * log_p.mean(1).mean()
    torch.testing.assert_close(LabelSmoothingCE(eps, weight)(out, mixed), expected, equal_nan=True)


def test_unit_weights_equal_no_weights_also_for_soft_targets_that_do_not_sum_to_one():
    g = torch.Generator().manual_seed(3)
    out, soft = torch.randn(5, 4, generator=g), torch.rand(5, 4, generator=g) * 2
    for reduction in ("mean", "sum", "none"):
        torch.testing.assert_close(
            LabelSmoothingCE(0.3, torch.ones(4), reduction)(out, soft),
            LabelSmoothingCE(0.3, reduction=reduction)(out, soft),
        )


def test_class_axis_reaches_activation_decodes_and_soft_targets():
    g = torch.Generator().manual_seed(4)
    out = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)  # (N, H, W, K): classes last
    y = torch.randint(0, 5, (2, 3, 4), generator=g)
    soft = torch.softmax(torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64), -1)
    last, first = LabelSmoothingCE(0.2, reduction="none", axis=-1), LabelSmoothingCE(0.2, reduction="none")
    torch.testing.assert_close(last(out, y), first(out.movedim(-1, 1), y))
    torch.testing.assert_close(last(out, soft), first(out.movedim(-1, 1), soft.movedim(-1, 1)))
    torch.testing.assert_close(last.activation(out), F.softmax(out, -1))
    assert torch.equal(last.decodes(out), out.argmax(-1))
    flat = LabelSmoothingCEFlat(0.2, axis=1)
    dense = out.movedim(-1, 1)
    torch.testing.assert_close(flat.activation(dense).sum(1), torch.ones(2, 3, 4, dtype=torch.float64))
    assert torch.equal(flat.decodes(dense), dense.argmax(1))
    # Flat soft targets keep their class axis: the mean equals the unflattened loss's.
    torch.testing.assert_close(flat(dense, soft.movedim(-1, 1)), first(dense, soft.movedim(-1, 1)).mean())


def test_flat_form_lines_targets_up_with_logits_of_any_rank():
    # (N, K, D, H, W): fastai swaps axes 1 and -1 of the (N, D, H, W) target too, giving (N, W, H, D),
    # which does not match the swapped logits (N, W, D, H, K); here the target follows the logits.
    g = torch.Generator().manual_seed(6)
    out = torch.randn(2, 3, 4, 2, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 4, 2, 5), generator=g)
    weight = torch.tensor([1.0, 0.5, 2.0])
    per_pos = LabelSmoothingCE(0.2, weight, "none")(out, y)
    flat = LabelSmoothingCEFlat(0.2, weight, "none", axis=1)(out, y)
    torch.testing.assert_close(flat, per_pos.permute(0, 3, 1, 2).reshape(-1))
    unflat = LabelSmoothingCEFlat(0.2, weight, "none", axis=1, flatten=False)(out, y)
    torch.testing.assert_close(unflat, per_pos.permute(0, 3, 1, 2))
    for reduction in ("mean", "sum"):
        torch.testing.assert_close(
            LabelSmoothingCEFlat(0.2, weight, reduction, axis=1)(out, y),
            LabelSmoothingCE(0.2, weight, reduction)(out, y),
        )


def test_weight_follows_the_logits_device_and_dtype_and_is_a_buffer():
    w = torch.tensor([1.0, 2.0, 3.0])
    loss = LabelSmoothingCE(0.1, w)
    assert "weight" in dict(loss.named_buffers())
    out, y = logits_and_labels(5, 4, 3)
    expected = loss(out, y)
    torch.testing.assert_close(loss(out.double(), y), expected.double())  # float32 weight, float64 logits
    assert loss.to(torch.float64).weight.dtype == torch.float64


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: LabelSmoothingCE(0.1, [1.0, 2.0]), TypeError, r"^weight must be None or a 1-D float torch.Tensor"),
        (lambda: LabelSmoothingCE(0.1, torch.tensor([1, 2])), TypeError, r"^weight must be a float tensor, got dtype"),
        (
            lambda: LabelSmoothingCE(0.1, torch.ones(2, 2)),
            ValueError,
            r"^weight must be a non-empty 1-D tensor.*\(2, 2\)",
        ),
        (lambda: LabelSmoothingCE(0.1, torch.ones(0)), ValueError, r"^weight must be a non-empty 1-D tensor"),
        (lambda: LabelSmoothingCE(0.1, torch.tensor([1.0, -0.5])), ValueError, r"^weight must be non-negative.*-0.5"),
        (lambda: LabelSmoothingCE(0.1, torch.tensor([1.0, float("nan")])), ValueError, r"^weight must be finite"),
        (lambda: LabelSmoothingCE(0.1, torch.zeros(3)), ValueError, r"^weight must have at least one positive"),
        (lambda: LabelSmoothingCE(0.1, "avg"), TypeError, r"^weight must be None or .*'avg'"),
        (lambda: LabelSmoothingCE(0.1, None, "avg"), ValueError, r"^reduction must be one of .*'avg'"),
        (lambda: LabelSmoothingCE(axis="1"), TypeError, r"^axis must be an int.*'1'"),
        (lambda: LabelSmoothingCE(axis=True), TypeError, r"^axis must be an int.*True"),
        (lambda: LabelSmoothingCEFlat(1.0), ValueError, r"^eps must be in \[0, 1\), got 1.0"),
        (lambda: LabelSmoothingCEFlat(0.1, torch.tensor([-1.0, 1.0])), ValueError, r"^weight must be non-negative"),
        (lambda: LabelSmoothingCEFlat(axis=1.5), TypeError, r"^axis must be an int.*1.5"),
        (lambda: LabelSmoothingCEFlat(reduction="avg"), ValueError, r"^reduction must be one of .*'avg'"),
        (lambda: LabelSmoothingCEFlat(flatten=1), TypeError, r"^flatten must be a bool, got 1"),
    ],
)
def test_bad_weight_axis_and_settings_raise_naming_the_parameter(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_data_dependent_errors_come_at_forward_with_the_shapes():
    out, y = logits_and_labels(0, 4, 3)
    with pytest.raises(ValueError, match=r"weight has 4 entries but output has 3 classes .*\(4, 3\)"):
        LabelSmoothingCE(0.1, torch.ones(4))(out, y)
    with pytest.raises(ValueError, match=r"weight has 2 entries but output has 3 classes"):
        LabelSmoothingCEFlat(0.1, torch.ones(2))(out, y)
    with pytest.raises(ValueError, match=r"axis=2 is out of range for output of shape \(4, 3\)"):
        LabelSmoothingCE(axis=2)(out, y)
    with pytest.raises(ValueError, match=r"soft targets must have the shape of output \(4, 3\), got \(4, 2\)"):
        LabelSmoothingCEFlat()(out, torch.rand(4, 2))
    flat = LabelSmoothingCEFlat()
    with pytest.raises(ValueError, match=r"^eps must be in"):
        flat.eps = 1.0
    flat.eps = 0.3
    assert flat.func.eps == 0.3


def test_flat_pickles_and_none_reduce_reaches_the_wrapped_loss():
    from fastai.layers import NoneReduce

    flat = LabelSmoothingCEFlat(0.2, torch.tensor([1.0, 2.0, 0.5]), axis=1)
    back = pickle.loads(pickle.dumps(flat))
    assert (back.eps, back.reduction, back.axis, back.func.axis, back.y_int) == (0.2, "mean", 1, -1, True)
    assert torch.equal(back.weight, flat.weight)
    out = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (2, 4), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(back(out, y), flat(out, y))
    with NoneReduce(back) as lf:
        assert lf(out, y).shape == (8,)
    assert back.reduction == "mean" and back.func.reduction == "mean"


def test_a_pickle_from_before_weight_and_axis_still_loads():
    old_state = dict(LabelSmoothingCE(0.3, reduction="sum").__dict__)
    old_state["_buffers"] = {}
    del old_state["axis"]
    loss = LabelSmoothingCE.__new__(LabelSmoothingCE)
    loss.__setstate__(old_state)
    out, y = logits_and_labels(0, 5, 4)
    assert loss.weight is None and loss.axis == 1
    torch.testing.assert_close(loss(out, y), LabelSmoothingCE(0.3, reduction="sum")(out, y))


def test_flat_form_in_a_learner_gives_interpretation_and_predict(tiny_dls):
    from fastai.interpret import ClassificationInterpretation
    from fastai.vision.all import Learner, noop

    seed_everything(0)
    n_classes = len(tiny_dls.vocab)
    weight = torch.linspace(0.5, 2.0, n_classes)
    loss = LabelSmoothingCEFlat(0.1, weight)
    learn = Learner(tiny_dls, tiny_cnn(n_out=n_classes), loss_func=loss)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2)
        interp = ClassificationInterpretation.from_learner(learn)
        cm = interp.confusion_matrix()
        logits, targs = learn.get_preds(act=noop)
        label, idx, probs = learn.predict(tiny_dls.valid_ds.items[0])
    n_valid = len(tiny_dls.valid_ds)
    assert cm.shape == (n_classes, n_classes) and cm.sum() == n_valid
    # The interpretation's losses are the per-sample (weighted) losses; reduction is back to 'mean'.
    torch.testing.assert_close(interp.losses, LabelSmoothingCEFlat(0.1, weight, "none")(logits, targs))
    assert loss.reduction == "mean"
    assert label in tiny_dls.vocab and int(idx) == int(probs.argmax())
    assert float(probs.sum()) == pytest.approx(1.0) and probs.shape == (n_classes,)


@pytest.mark.parametrize("variant", ["MixUp", "CutMix"])
def test_flat_form_composes_with_our_mixing_callbacks(tiny_dls, variant):
    from fastai.vision.all import Learner

    from fastai_tricks import mixing

    seed_everything(0)
    loss = LabelSmoothingCEFlat(0.1, torch.linspace(0.5, 2.0, len(tiny_dls.vocab)))
    learn = Learner(tiny_dls, tiny_cnn(n_out=len(tiny_dls.vocab)), loss_func=loss, cbs=getattr(mixing, variant)())
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2)
    assert learn.loss_func is loss and loss.reduction == "mean"
    assert torch.isfinite(torch.tensor(learn.recorder.losses)).all()
