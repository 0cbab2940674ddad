"""Properties of the pure mixing maths in fastai_tricks.mix_ops (hypothesis, no Learner)."""

from __future__ import annotations

import random
import re
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastai_tricks import mix_ops
from fastai_tricks.mixing import CutMix, FMix, ManifoldMix, MixUp, RandomMix, ResizeMix

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

batch = st.integers(1, 8)
chans = st.integers(1, 4)
side = st.integers(1, 40)
dtypes = st.sampled_from(DTYPES)
alphas = st.floats(0.05, 20.0)
seeds = st.integers(0, 2**31 - 1)


def _batch(b, c, h, w, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=g).to(dtype)


def _all_mixes(x, alpha, seed):
    """Every pure mixing function on x, each with its own seeded generator."""
    return {
        "mixup": mix_ops.mixup(x, alpha, generator=torch.Generator().manual_seed(seed)),
        "cutmix": mix_ops.cutmix(x, alpha, generator=torch.Generator().manual_seed(seed)),
        "cutmix_per_sample": mix_ops.cutmix(x, alpha, per_sample=True, generator=torch.Generator().manual_seed(seed)),
        "fmix": mix_ops.fmix(x, alpha, generator=torch.Generator().manual_seed(seed)),
        "fmix_per_sample": mix_ops.fmix(x, alpha, per_sample=True, generator=torch.Generator().manual_seed(seed)),
        "resizemix": mix_ops.resizemix(
            x, (0.1, 0.8), min(alpha, 5.0), rng=random.Random(seed), generator=torch.Generator().manual_seed(seed)
        ),
    }


@given(b=batch, c=chans, h=side, w=side, dtype=dtypes, alpha=alphas, seed=seeds)
def test_every_mix_preserves_shape_dtype_device_and_keeps_lambda_in_unit_interval(b, c, h, w, dtype, alpha, seed):
    x = _batch(b, c, h, w, dtype, seed)
    for name, res in _all_mixes(x, alpha, seed).items():
        assert res.x.shape == x.shape, name
        assert res.x.dtype == dtype, name
        assert res.x.device == x.device, name
        assert res.lam.shape == (b,) and res.lam.dtype == torch.float32, name
        assert bool(((res.lam >= 0) & (res.lam <= 1)).all()), name
        assert sorted(res.perm.tolist()) == list(range(b)), name


@given(b=batch, c=chans, h=side, w=side, dtype=dtypes, alpha=alphas, seed=seeds)
def test_no_mix_modifies_its_input_tensor(b, c, h, w, dtype, alpha, seed):
    x = _batch(b, c, h, w, dtype, seed)
    before = x.clone()
    _all_mixes(x, alpha, seed)
    assert torch.equal(x, before)


@given(b=batch, c=chans, h=side, w=side, dtype=dtypes, alpha=alphas, seed=seeds)
def test_fixed_seed_reproduces_every_mix(b, c, h, w, dtype, alpha, seed):
    x = _batch(b, c, h, w, dtype, seed)
    first, second = _all_mixes(x, alpha, seed), _all_mixes(x, alpha, seed)
    for name in first:
        assert torch.equal(first[name].x, second[name].x), name
        assert torch.equal(first[name].lam, second[name].lam), name
        assert torch.equal(first[name].perm, second[name].perm), name


@given(b=batch, c=chans, h=side, w=side, alpha=alphas, seed=seeds, per_sample=st.booleans())
def test_cutmix_copies_partner_inside_box_keeps_original_outside_and_lambda_is_kept_fraction(
    b, c, h, w, alpha, seed, per_sample
):
    x = torch.arange(b * c * h * w, dtype=torch.float64).view(b, c, h, w)  # every pixel distinct
    res = mix_ops.cutmix(x, alpha, per_sample=per_sample, generator=torch.Generator().manual_seed(seed))
    mask = res.mask.expand(b, h, w).unsqueeze(1).expand_as(x)
    partner = x[res.perm]
    assert torch.equal(res.x[mask], partner[mask])
    assert torch.equal(res.x[~mask], x[~mask])
    kept = 1.0 - res.mask.expand(b, h, w).flatten(1).double().mean(1)
    assert torch.allclose(res.lam.double(), kept, atol=1e-6)
    # The mask is exactly a rectangle: its pixel count is rows x cols of its bounding box.
    for m in res.mask:
        rows, cols = m.any(1).sum(), m.any(0).sum()
        assert int(m.sum()) == int(rows * cols)


@given(b=batch, h=side, w=side, alpha=alphas, seed=seeds, per_sample=st.booleans())
def test_fmix_mask_pastes_partner_and_lambda_is_exact_kept_fraction(b, h, w, alpha, seed, per_sample):
    x = torch.arange(b * 2 * h * w, dtype=torch.float32).view(b, 2, h, w)
    res = mix_ops.fmix(x, alpha, per_sample=per_sample, generator=torch.Generator().manual_seed(seed))
    mask = res.mask.expand(b, h, w).unsqueeze(1).expand_as(x)
    assert torch.equal(res.x[mask], x[res.perm][mask])
    assert torch.equal(res.x[~mask], x[~mask])
    assert torch.allclose(res.lam, mix_ops.kept_fraction(res.mask).expand(b))


@given(b=batch, h=side, w=side, seed=seeds, lo=st.floats(0.01, 1.0), span=st.floats(0.0, 1.0))
def test_resizemix_changes_only_the_patch_and_lambda_is_one_minus_patch_area(b, h, w, seed, lo, span):
    hi = lo + (1.0 - lo) * span
    x = torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))
    y = torch.randint(0, 5, (b, h, w), generator=torch.Generator().manual_seed(seed + 1))
    top, left, ph, pw = geometry = mix_ops.resizemix_geometry(h, w, (lo, hi), rng=random.Random(seed))
    assert 1 <= ph <= h and 1 <= pw <= w and 0 <= top <= h - ph and 0 <= left <= w - pw
    perm = mix_ops.sample_permutation(b, generator=torch.Generator().manual_seed(seed))
    mx, my = mix_ops.resize_paste(x, perm, geometry), mix_ops.resize_paste(y, perm, geometry)
    outside = torch.ones(h, w, dtype=torch.bool)
    outside[top : top + ph, left : left + pw] = False
    assert torch.equal(mx[..., outside], x[..., outside])
    assert torch.equal(my[..., outside], y[..., outside])
    # Labels pasted by nearest neighbour are labels the partner really has.
    for i in range(b):
        assert set(my[i, top : top + ph, left : left + pw].unique().tolist()) <= set(y[perm[i]].unique().tolist())
    res = mix_ops.resizemix(x, (lo, hi), rng=random.Random(seed))
    assert torch.allclose(res.lam, mix_ops.kept_fraction(res.mask).expand(b), atol=1e-6)


@given(b=batch, n_classes=st.integers(1, 12), alpha=alphas, seed=seeds, dtype=st.sampled_from(DTYPES[:2]))
def test_mixed_one_hot_and_soft_targets_sum_to_one_per_row(b, n_classes, alpha, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, n_classes, (b,), generator=g)
    soft = torch.softmax(torch.randn(b, n_classes, generator=g, dtype=dtype), 1)
    perm = mix_ops.sample_permutation(b, generator=g)
    lam = mix_ops.sample_lambda(b, alpha, generator=g)
    for t in (mix_ops.one_hot(y, n_classes, dtype), soft):
        mixed = mix_ops.mix_targets(t, perm, lam)
        assert mixed.dtype == dtype and mixed.shape == t.shape
        assert torch.allclose(mixed.sum(1), torch.ones(b, dtype=dtype), atol=1e-5)
        assert bool((mixed >= 0).all())


@given(b=batch, alpha=alphas, seed=seeds)
def test_mix_losses_is_lambda_weighted_mean_of_own_and_partner_losses(b, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    own, partner = torch.rand(b, generator=g), torch.rand(b, generator=g)
    lam = mix_ops.sample_lambda(b, alpha, generator=g)
    expected = (lam * own + (1 - lam) * partner).mean()
    assert torch.allclose(mix_ops.mix_losses(own, partner, lam), expected)
    assert torch.allclose(mix_ops.mix_losses(own, partner, lam, "sum"), expected * b)


@given(alpha=st.floats(1e-3, 1e3), n=st.integers(1, 64), seed=seeds)
def test_lambda_is_finite_and_in_unit_interval_even_for_extreme_alpha(alpha, n, seed):
    lam = mix_ops.sample_lambda(n, alpha, generator=torch.Generator().manual_seed(seed))
    assert lam.shape == (n,) and bool(torch.isfinite(lam).all())
    assert bool(((lam >= 0) & (lam <= 1)).all())


def test_lambda_mean_matches_beta_mean_of_one_half():
    lam = mix_ops.sample_lambda(20000, 0.4, generator=torch.Generator().manual_seed(0))
    assert abs(float(lam.mean()) - 0.5) < 0.02
    # Beta(0.4, 0.4) variance is 1 / (4 * (2 * 0.4 + 1)).
    assert abs(float(lam.var()) - 1 / (4 * 1.8)) < 0.01


def test_mixes_keep_channels_last_memory_format():
    x = torch.rand(4, 3, 9, 7).contiguous(memory_format=torch.channels_last)
    for name, res in _all_mixes(x, 1.0, 0).items():
        assert res.x.is_contiguous(memory_format=torch.channels_last), name


@pytest.mark.parametrize(("x", "shown"), [(torch.zeros(4, 3), "(4, 3)"), ([[0.0]], "list")])
def test_box_and_mask_mixes_need_a_spatial_batch_and_name_what_they_got(x, shown):
    with pytest.raises(ValueError, match=rf"^x must be a batch of images .* got shape {re.escape(shown)}$"):
        mix_ops.check_spatial_batch(x)


def test_generator_on_another_device_type_is_rejected():
    with pytest.raises(ValueError, match="generator"):
        mix_ops.sample_lambda(3, 1.0, device="meta", generator=torch.Generator())


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_sample_lambda_rejects_bad_alpha(bad):
    with pytest.raises(ValueError, match="^alpha must be"):
        mix_ops.sample_lambda(2, bad)


@pytest.mark.parametrize("scale", [(0.0, 0.5), (0.2, 1.5), (0.6, 0.3), (float("nan"), 0.5), (0.5,)])
def test_resizemix_geometry_rejects_scale_outside_zero_one(scale):
    with pytest.raises(ValueError, match="scale"):
        mix_ops.resizemix_geometry(8, 8, scale)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: mix_ops.resizemix_geometry(8, 8, (0.0, 0.5)), r"^scale\[0\] must be in \(0, 1\], got 0.0"),
        (lambda: mix_ops.resizemix_geometry(8, 8, (0.5, 0.0)), r"^scale\[1\] must be in \(0, 1\], got 0.0"),
        (lambda: mix_ops.resizemix_geometry(8, 8, (0.2, 1.5)), r"^scale\[1\] must be in \(0, 1\], got 1.5"),
        (lambda: mix_ops.resizemix_geometry(8, 8, alpha=0.0), r"^alpha must be > 0, got 0.0"),
        (lambda: mix_ops.fourier_noise(1, 4, 4, decay_power=-1.0), r"^decay_power must be > 0, got -1.0"),
    ],
)
def test_errors_start_with_the_name_of_the_bad_parameter(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_lambda_is_float32_whatever_the_default_dtype():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert mix_ops.sample_lambda(4, 0.5).dtype == torch.float32
        assert mix_ops.mixup(torch.rand(4, 3), 0.5).lam.dtype == torch.float32
        assert mix_ops.resizemix(torch.rand(4, 3, 8, 8)).lam.dtype == torch.float32
    finally:
        torch.set_default_dtype(old)


def test_mixes_of_a_contiguous_batch_stay_contiguous():
    x = torch.rand(4, 3, 9, 7)
    for name, res in _all_mixes(x, 1.0, 0).items():
        assert res.x.is_contiguous() and not res.x.is_contiguous(memory_format=torch.channels_last), name
    # A strided view (here transposed) is not turned into channels-last either.
    xt = torch.rand(4, 3, 7, 7).transpose(2, 3)
    for name, res in _all_mixes(xt, 1.0, 0).items():
        assert not res.x.is_contiguous(memory_format=torch.channels_last), name


def test_paste_takes_maps_and_refuses_masks_of_another_shape():
    y = torch.arange(2 * 3 * 4).view(2, 3, 4)  # (B, H, W) label maps
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[0, 1:, 2:] = True
    out = mix_ops.paste(y, torch.tensor([1, 0]), mask)
    assert torch.equal(out[0, 1:, 2:], y[1, 1:, 2:]) and torch.equal(out[0, :1], y[0, :1])
    for bad in (torch.zeros(1, 4, 4, dtype=torch.bool), torch.zeros(3, 4, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"^mask must have shape \(n, H, W\) matching x"):
            mix_ops.paste(y, torch.tensor([1, 0]), bad)


def test_spatial_size_of_maps_and_images_is_the_last_two_axes():
    assert mix_ops.check_spatial_batch(torch.zeros(2, 5, 7)) == (5, 7)
    assert mix_ops.check_spatial_batch(torch.zeros(2, 3, 5, 7)) == (5, 7)


def test_default_decay_power_is_three_and_default_resizemix_alpha_is_one():
    # Harris et al.'s decay power 3; Qin et al.'s uniform side ratio, Beta(1, 1).
    lam, x = torch.full((2,), 0.5), torch.rand(4, 1, 12, 12)
    g = torch.Generator
    assert torch.equal(
        mix_ops.fourier_noise(2, 8, 8, generator=g().manual_seed(0)),
        mix_ops.fourier_noise(2, 8, 8, 3.0, generator=g().manual_seed(0)),
    )
    assert torch.equal(
        mix_ops.fmix_masks(lam, 12, 12, generator=g().manual_seed(0)),
        mix_ops.fmix_masks(lam, 12, 12, 3.0, generator=g().manual_seed(0)),
    )
    assert torch.equal(
        mix_ops.fmix(x, 1.0, generator=g().manual_seed(0)).mask,
        mix_ops.fmix(x, 1.0, 3.0, generator=g().manual_seed(0)).mask,
    )
    for seed in range(5):
        assert mix_ops.resizemix_geometry(64, 64, (0.1, 0.8), rng=random.Random(seed)) == mix_ops.resizemix_geometry(
            64, 64, (0.1, 0.8), 1.0, rng=random.Random(seed)
        )
        assert torch.equal(
            mix_ops.resizemix(x, (0.1, 0.8), rng=random.Random(seed)).mask,
            mix_ops.resizemix(x, (0.1, 0.8), 1.0, rng=random.Random(seed)).mask,
        )


@pytest.mark.parametrize(
    ("draw", "same_draws"),
    [
        # Two normal numbers (real and imaginary part) per frequency.
        (
            lambda g: mix_ops.fourier_noise(3, 8, 10, generator=g),
            lambda g: torch.randn(2, 3, 8, 10 // 2 + 1, generator=g),
        ),
        # Two uniform numbers (the centre) per box.
        (lambda g: mix_ops.sample_boxes(3, 8, 10, torch.rand(3), generator=g), lambda g: torch.rand(3, 2, generator=g)),
    ],
)
def test_draws_take_only_the_random_numbers_they_use(draw, same_draws):
    # A generator shared with later draws is left where it should be.
    g, ref = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    draw(g)
    same_draws(ref)
    assert torch.equal(torch.rand(5, generator=g), torch.rand(5, generator=ref))


def test_one_hot_has_n_classes_columns_even_when_the_labels_do_not_reach_them():
    assert mix_ops.one_hot(torch.tensor([0, 1]), 4).tolist() == [[1, 0, 0, 0], [0, 1, 0, 0]]


def test_mix_losses_weights_every_element_of_a_sample_by_its_lambda_and_keeps_their_dtype():
    # Per-pixel (or per-token) losses, B * k of them, in float64: sample i's k losses all get lam[i].
    own = torch.arange(6, dtype=torch.float64)
    partner = torch.full((6,), 10.0, dtype=torch.float64)
    lam = torch.tensor([0.25, 1.0])
    mixed = mix_ops.mix_losses(own, partner, lam, "none")
    expected = torch.tensor([7.5, 7.75, 8.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    assert mixed.dtype == torch.float64 and torch.equal(mixed, expected)
    assert mix_ops.mix_losses(own, partner, lam, "mean") == expected.mean()


@pytest.mark.parametrize(("loss", "b"), [(torch.rand(5), 2), (torch.tensor(0.5), 1), (torch.tensor(0.5), 3)])
def test_mix_losses_refuses_losses_that_do_not_split_into_the_batch(loss, b):
    with pytest.raises(ValueError, match=f"cannot be split into {b} samples"):
        mix_ops.mix_losses(loss, loss.clone(), torch.rand(b))


# --- the callbacks' per-batch logic on a stand-in learner, over the same shapes -----------------------

VARIANTS = [
    lambda p: MixUp(p=p),
    lambda p: CutMix(p=p),
    lambda p: CutMix(per_sample=True, p=p),
    lambda p: FMix(p=p),
    lambda p: ResizeMix(p=p),
    lambda p: ManifoldMix(p=p),
    lambda p: RandomMix([MixUp(), CutMix()], p=p),
]


def _fake_learn(x, y, **kw):
    from fastai.losses import CrossEntropyLossFlat

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(3))
    base = dict(xb=(x,), yb=(y,), training=True, pct_train=0.0, epoch=0, n_epoch=1, model=model)
    base["loss_func"] = CrossEntropyLossFlat()
    base.update(kw)
    return SimpleNamespace(**base)


@given(b=batch, c=chans, h=side, w=side, dtype=dtypes, seed=seeds, which=st.integers(0, len(VARIANTS) - 1))
def test_p_zero_leaves_the_batch_unchanged(b, c, h, w, dtype, seed, which):
    x = _batch(b, c, h, w, dtype, seed)
    y = torch.randint(0, 3, (b,), generator=torch.Generator().manual_seed(seed))
    cb = VARIANTS[which](0.0)
    learn = _fake_learn(x, y)
    cb.learn = learn
    cb.before_batch()
    assert learn.xb[0] is x and learn.yb[0] is y
    assert cb.__dict__["_batch"] is None


@given(c=chans, h=side, w=side, dtype=dtypes, seed=seeds, which=st.integers(0, len(VARIANTS) - 1))
def test_batch_of_one_is_left_unmixed(c, h, w, dtype, seed, which):
    x = _batch(1, c, h, w, dtype, seed)
    y = torch.zeros(1, dtype=torch.long)
    cb = VARIANTS[which](1.0)
    learn = _fake_learn(x, y)
    cb.learn = learn
    cb.before_batch()
    assert learn.xb[0] is x and learn.yb[0] is y
    cb.after_loss()  # nothing stored, so the loss is not touched
    assert not hasattr(learn, "loss_grad")


def test_math_module_has_no_fastai_import():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(mix_ops))
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not any(name.startswith("fastai") for name in names)


def test_draws_happen_on_the_asked_device_and_on_the_cpu_by_default():
    # The meta device stands in for a GPU on a CPU-only machine: a draw that drops the device lands on the CPU.
    lam = torch.rand(3, device="meta")
    assert mix_ops.sample_permutation(3, device="meta").device.type == "meta"
    assert mix_ops.fourier_noise(2, 4, 6, device="meta").device.type == "meta"
    assert mix_ops.sample_boxes(3, 8, 8, lam).device.type == "meta"
    assert mix_ops.fmix_masks(lam, 8, 8).device.type == "meta"
    res = mix_ops.resizemix(torch.empty(4, 3, 8, 8, device="meta"))
    assert {t.device.type for t in (res.x, res.perm, res.lam, res.mask)} == {"meta"}
    assert mix_ops.box_masks(torch.tensor([[1, 3, 2, 5]], device="meta"), 8, 8).device.type == "meta"
    for drawn in (mix_ops.sample_lambda(3, 1.0), mix_ops.sample_permutation(3), mix_ops.fourier_noise(1, 3, 3)):
        assert drawn.device.type == "cpu"


@pytest.mark.parametrize(
    "draw",
    [
        lambda g: mix_ops.sample_permutation(3, device="meta", generator=g),
        lambda g: mix_ops.fourier_noise(1, 4, 4, device="meta", generator=g),
        lambda g: mix_ops.sample_boxes(3, 8, 8, torch.rand(3, device="meta"), generator=g),
        lambda g: mix_ops.fmix_masks(torch.rand(3, device="meta"), 4, 4, generator=g),
    ],
)
def test_every_draw_rejects_a_generator_on_another_device(draw):
    with pytest.raises(ValueError, match="generator"):
        draw(torch.Generator())


def test_per_sample_draws_one_region_per_sample_and_otherwise_one_for_the_batch():
    x = torch.rand(6, 1, 12, 12)
    for mix in (mix_ops.cutmix, mix_ops.fmix):
        one = mix(x, 1.0, generator=torch.Generator().manual_seed(0))
        each = mix(x, 1.0, per_sample=True, generator=torch.Generator().manual_seed(0))
        assert one.mask.shape == (1, 12, 12) and each.mask.shape == (6, 12, 12)
        assert len({m.numpy().tobytes() for m in each.mask}) > 1
