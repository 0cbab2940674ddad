"""Statistical fidelity of the mixing maths: the draws follow the stated distributions, not only themselves.

The properties in ``test_mix_ops.py`` check that every mix is consistent (λ equals the kept fraction of
its own mask, the pasted pixels are the partner's). These check that the numbers are the right ones:
λ follows Beta(α, α), CutMix boxes have the sides and centres of Yun et al., FMix masks are
low-frequency with the exact area, ResizeMix patches have the drawn side, and the callbacks pick
children, layers and per-sample λ with the stated probabilities.

Every test draws from fixed seeds (a hypothesis-drawn seed, derandomized in CI) and compares with
scipy's distributions through a p-value floor of ``P_FLOOR``. A right distribution fails one such
comparison once in about 10^9 seeds, so ``HYPOTHESIS_PROFILE=thorough`` (500 seeds) does not flake;
a wrong one (α swapped, white noise instead of Fourier noise, a biased centre) gives p-values far
below it at these sample sizes.
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import stats

from fastai_tricks import mix_ops
from fastai_tricks.mixing import ManifoldMix, MixUp, RandomMix

P_FLOOR = 1e-9
ALPHAS = [0.1, 0.4, 1.0, 2.0, 8.0]

seeds = st.integers(0, 2**31 - 1)

# A test that draws thousands of samples per example gets its power from the sample size, not from the
# number of seeds: it runs an eighth of the profile's examples (3 under ci, 62 under thorough).
few_seeds = settings(max_examples=max(2, settings.default.max_examples // 8))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _near_half(x: float, tol: float = 1e-4) -> bool:
    """Whether ``x`` is so close to a .5 boundary that float32 and float64 may round it differently."""
    return abs((x % 1.0) - 0.5) < tol


def _ks_pvalue(samples: np.ndarray, cdf, top: float = 1 - 1e-6) -> float:
    """One-sample Kolmogorov-Smirnov p-value of ``samples`` against ``cdf``, the sup taken below ``top``.

    float32 cannot hold a λ within 6e-8 of 1 (torch's Dirichlet returns at most 1 - 2**-24), so for
    α < 1 the ~10% of Beta mass above 1 - 6e-8 sits on one float. Leaving out the points above ``top``
    only lowers the statistic, so the p-value stays exact or conservative for a right distribution.
    """
    x = np.sort(np.asarray(samples, dtype=np.float64))
    n = len(x)
    rank = np.arange(1, n + 1)[x < top]
    f = cdf(x[x < top])
    d = max(float((rank / n - f).max()), float((f - (rank - 1) / n).max()))
    return float(stats.kstwo(n).sf(d))


def _uniform_chi2_pvalue(values: np.ndarray, n_bins: int) -> float:
    counts = np.bincount(values, minlength=n_bins)
    assert counts.shape == (n_bins,), f"values outside [0, {n_bins}): {sorted(set(values.tolist()))[-3:]}"
    return float(stats.chisquare(counts).pvalue)


# --- λ ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", ALPHAS)
@few_seeds
@given(seed=seeds)
def test_lambda_draws_follow_beta_alpha_alpha(alpha, seed):
    lam = mix_ops.sample_lambda(20_000, alpha, generator=_gen(seed)).double().numpy()
    assert _ks_pvalue(lam, stats.beta(alpha, alpha).cdf) > P_FLOOR


@given(seed=seeds)
def test_lambda_reaches_both_ends_of_the_unit_interval_when_alpha_is_small(seed):
    # Beta(0.1, 0.1) puts about 12% of its mass within 1e-6 of each end: a cap below 1 (or a floor above 0) shows.
    lam = mix_ops.sample_lambda(2_000, 0.1, generator=_gen(seed))
    assert float(lam.max()) > 1 - 1e-6
    assert float(lam.min()) < 1e-6


@few_seeds
@given(seed=seeds)
def test_mixup_draws_an_independent_beta_lambda_for_every_sample(seed):
    g = _gen(seed)
    x = torch.zeros(64, 1)
    lam = torch.stack([mix_ops.mixup(x, 0.4, generator=g).lam for _ in range(200)]).double()
    assert _ks_pvalue(lam.flatten().numpy(), stats.beta(0.4, 0.4).cdf) > P_FLOOR
    # Neighbours in a batch are uncorrelated (12,600 pairs: the standard error of r is 0.009).
    r = np.corrcoef(lam[:, :-1].flatten().numpy(), lam[:, 1:].flatten().numpy())[0, 1]
    assert abs(r) < 0.06
    # And the spread inside one batch is the Beta spread, 1 / (4 (2α + 1)), not zero.
    assert abs(float(lam.var(1).mean()) - 1 / (4 * 1.8)) < 0.02


@given(b=st.integers(1, 8), seed=seeds)
def test_mixup_blends_lambda_of_own_sample_with_one_minus_lambda_of_partner(b, seed):
    x = torch.rand(b, 3, 4, 5, generator=_gen(seed), dtype=torch.float64)
    res = mix_ops.mixup(x, 1.0, generator=_gen(seed + 1))
    lam = res.lam.double().view(b, 1, 1, 1)
    assert torch.allclose(res.x, lam * x + (1 - lam) * x[res.perm], rtol=0, atol=1e-12)


# --- CutMix ----------------------------------------------------------------------------------------


def _clipped_spans(side: int, size: int) -> set[tuple[int, int]]:
    """Every ``[start, stop)`` a box of ``side`` pixels centred on some pixel of ``[0, size)`` can give, clipped."""
    out = set()
    for centre in range(size):
        start = centre - side // 2
        out.add((min(max(start, 0), size), min(max(start + side, 0), size)))
    return out


@given(h=st.integers(1, 48), w=st.integers(1, 48), seed=seeds)
def test_cutmix_box_is_round_h_and_w_times_sqrt_one_minus_lambda_around_an_image_pixel(h, w, seed):
    g = _gen(seed)
    lam = torch.cat([torch.rand(62, generator=g), torch.tensor([0.0, 1.0])])
    boxes = mix_ops.sample_boxes(64, h, w, lam, generator=g)
    for (top, bottom, left, right), lam_i in zip(boxes.tolist(), lam.double().tolist(), strict=True):
        cut = math.sqrt(1 - lam_i)
        for (start, stop), size in (((top, bottom), h), ((left, right), w)):
            exact = size * cut
            sides = {math.floor(exact), math.ceil(exact)} if _near_half(exact) else {round(exact)}
            assert any((start, stop) in _clipped_spans(s, size) for s in sides), (lam_i, size, start, stop)


def test_cutmix_box_sides_before_clipping_are_exact_where_the_box_fits():
    # The paper's box is H√(1-λ) by W√(1-λ); clipping only shortens boxes that reach an edge.
    g = _gen(0)
    lam = torch.rand(4000, generator=g)
    boxes = mix_ops.sample_boxes(4000, 40, 30, lam, generator=g)
    cut = torch.sqrt(1 - lam.double())
    inside = (boxes[:, 0] > 0) & (boxes[:, 1] < 40) & (boxes[:, 2] > 0) & (boxes[:, 3] < 30)
    assert int(inside.sum()) > 500
    assert torch.equal((boxes[:, 1] - boxes[:, 0])[inside], torch.round(40 * cut[inside]).long())
    assert torch.equal((boxes[:, 3] - boxes[:, 2])[inside], torch.round(30 * cut[inside]).long())


@few_seeds
@given(seed=seeds)
def test_cutmix_box_centre_is_uniform_over_the_image_pixels(seed):
    # λ = 0.84 gives boxes of 5 x 4 pixels on a 12 x 9 image; the centre is recovered from the clipped box.
    h, w, n = 12, 9, 20_000
    boxes = mix_ops.sample_boxes(n, h, w, torch.full((n,), 0.84), generator=_gen(seed))
    top, bottom, left, right = boxes.T
    assert torch.equal(bottom - top, torch.where((top == 0) | (bottom == h), bottom - top, torch.full_like(top, 5)))
    cy = torch.where(top > 0, top + 5 // 2, bottom - 5 + 5 // 2)
    cx = torch.where(left > 0, left + 4 // 2, right - 4 + 4 // 2)
    assert _uniform_chi2_pvalue((cy * w + cx).numpy(), h * w) > P_FLOOR


@given(n=st.integers(1, 6), h=st.integers(1, 12), w=st.integers(1, 12), seed=seeds)
def test_box_masks_mark_exactly_the_half_open_box_pixels(n, h, w, seed):
    g = _gen(seed)
    rows = torch.randint(0, h + 1, (n, 2), generator=g).sort(1).values
    cols = torch.randint(0, w + 1, (n, 2), generator=g).sort(1).values
    boxes = torch.cat([rows, cols], 1)
    masks = mix_ops.box_masks(boxes, h, w)
    expected = torch.zeros(n, h, w, dtype=torch.bool)
    for i, (top, bottom, left, right) in enumerate(boxes.tolist()):
        expected[i, top:bottom, left:right] = True
    assert torch.equal(masks, expected)


# --- FMix ------------------------------------------------------------------------------------------


@given(n=st.integers(1, 4), h=st.integers(1, 24), w=st.integers(1, 24), decay=st.floats(0.5, 4.0), seed=seeds)
def test_fmix_mask_pastes_exactly_the_round_one_minus_lambda_hw_highest_noise_pixels(n, h, w, decay, seed):
    lam = torch.rand(n, generator=_gen(seed))
    lam[0] = [0.0, 1.0, float(lam[0])][seed % 3]  # the ends: every pixel pasted, or none
    k = [round((1 - float(lam_i)) * h * w) for lam_i in lam.double()]
    assume(not any(_near_half((1 - float(lam_i)) * h * w, 1e-3) for lam_i in lam.double()))
    # fmix_masks draws its noise first: the same seed gives the same noise.
    noise = mix_ops.fourier_noise(n, h, w, decay, generator=_gen(seed + 1)).flatten(1)
    assume(all(len(set(row.tolist())) == h * w for row in noise))  # no ties
    masks = mix_ops.fmix_masks(lam, h, w, decay, generator=_gen(seed + 1)).flatten(1)
    for i in range(n):
        assert int(masks[i].sum()) == k[i]
        top_k = torch.zeros(h * w, dtype=torch.bool)
        top_k[noise[i].argsort(descending=True)[: k[i]]] = True
        assert torch.equal(masks[i], top_k)


def _power_slope(noise: torch.Tensor) -> float:
    """Least-squares slope of log mean power against log frequency, DC left out."""
    h, w = noise.shape[-2:]
    power = torch.fft.rfft2(noise.double()).abs().square().mean(0)
    fy = torch.fft.fftfreq(h, dtype=torch.float64).view(-1, 1)
    fx = torch.fft.rfftfreq(w, dtype=torch.float64).view(1, -1)
    freq = torch.sqrt(fy**2 + fx**2).expand_as(power)
    keep = freq > 0
    return float(np.polyfit(freq[keep].log().numpy(), power[keep].log().numpy(), 1)[0])


@pytest.mark.parametrize("decay", [1.0, 2.0, 3.0])
@few_seeds
@given(seed=seeds)
def test_fourier_noise_power_falls_as_frequency_to_minus_twice_decay_power(decay, seed):
    noise = mix_ops.fourier_noise(64, 32, 24, decay, generator=_gen(seed))
    assert abs(_power_slope(noise) + 2 * decay) < 0.3


@pytest.mark.parametrize("decay", [1.0, 3.0])
def test_fourier_noise_lowest_frequencies_keep_the_power_law_and_only_dc_is_floored(decay):
    # Along the first row of the spectrum the frequencies are 0, 1/W, 2/W, ...: the power at 1/W is 2^(2 decay)
    # times that at 2/W, and the DC term is floored to the power at 1/W (the floor is 1 / max(H, W)).
    noise = mix_ops.fourier_noise(512, 16, 16, decay, generator=_gen(0))
    power = torch.fft.rfft2(noise.double()).abs().square().mean(0)[0]
    ratio = float(power[1] / power[2])
    assert 2 ** (2 * decay) / 1.5 < ratio < 2 ** (2 * decay) * 1.5
    # The DC bin holds one real draw (its imaginary part is dropped), so its mean power is half as large.
    assert 0.5 / 1.5 < float(power[0] / power[1]) < 0.5 * 1.5


@few_seeds
@given(seed=seeds)
def test_fourier_noise_has_uniformly_random_phases(seed):
    # Complex Gaussian coefficients: the phase of every frequency is uniform, independent of its amplitude.
    noise = mix_ops.fourier_noise(4000, 8, 8, 3.0, generator=_gen(seed))
    spectrum = torch.fft.rfft2(noise.double())[:, 1, 2]  # a bin that is not its own mirror image
    phase = (spectrum.angle().numpy() + math.pi) / (2 * math.pi)
    assert stats.kstest(phase, "uniform").pvalue > P_FLOOR


def _lag1_autocorrelation(masks: torch.Tensor) -> float:
    """Mean correlation of each pixel with its right and lower neighbours, per mask."""
    m = masks.double()
    out = []
    for a, b in ((m[:, :, :-1], m[:, :, 1:]), (m[:, :-1, :], m[:, 1:, :])):
        a, b = a.flatten(1), b.flatten(1)
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        out.append((a * b).mean(1) / (a.std(1, correction=0) * b.std(1, correction=0)))
    return float(torch.stack(out).mean())


@few_seeds
@given(seed=seeds)
def test_fmix_masks_are_low_frequency_blobs_not_white_noise(seed):
    masks = mix_ops.fmix_masks(torch.full((32,), 0.5), 32, 32, generator=_gen(seed))
    white = torch.rand(32, 32, 32, generator=_gen(seed)) > 0.5
    # Thresholded white noise has a lag-1 autocorrelation near 0; FMix's masks (decay power 3), near 0.9.
    assert abs(_lag1_autocorrelation(white)) < 0.05
    assert _lag1_autocorrelation(masks) > 0.6


@few_seeds
@given(seed=seeds)
def test_fmix_lambda_follows_beta_up_to_the_pixel_grid(seed):
    g = _gen(seed)
    x = torch.zeros(50, 1, 16, 16)
    lam = torch.cat([mix_ops.fmix(x, 2.0, per_sample=True, generator=g).lam for _ in range(100)]).double()
    # The kept fraction is λ rounded to the 1/256 grid, which moves the CDF by at most 0.006; the KS
    # statistic of 5,000 exact Beta draws stays below 0.046 with probability 1 - 1e-9.
    assert stats.kstest(lam.numpy(), stats.beta(2.0, 2.0).cdf).statistic < 0.055


# --- ResizeMix -------------------------------------------------------------------------------------


@given(
    h=st.integers(1, 300),
    w=st.integers(1, 300),
    lo=st.floats(0.01, 1.0),
    span=st.floats(0.0, 1.0),
    alpha=st.floats(0.2, 5.0),
    seed=seeds,
)
def test_resizemix_patch_side_is_round_tau_times_image_side(h, w, lo, span, alpha, seed):
    hi = lo + (1.0 - lo) * span
    top, left, ph, pw = mix_ops.resizemix_geometry(h, w, (lo, hi), alpha, rng=random.Random(seed))
    # τ = lo + (hi - lo) * Beta(α, α) is the first draw of the host generator.
    tau = lo + (hi - lo) * random.Random(seed).betavariate(alpha, alpha)
    assert (ph, pw) == (min(h, max(1, round(tau * h))), min(w, max(1, round(tau * w))))
    assert 0 <= top <= h - ph and 0 <= left <= w - pw


def test_resizemix_patch_side_is_at_least_one_pixel():
    # round(0.1 * 3) = 0: the side is lifted to one pixel, not more.
    assert mix_ops.resizemix_geometry(20, 3, (0.1, 0.1), rng=random.Random(0))[2:] == (2, 1)
    assert mix_ops.resizemix_geometry(3, 20, (0.1, 0.1), rng=random.Random(0))[2:] == (1, 2)


@given(alpha=st.floats(0.1, 5.0), seed=seeds)
def test_resizemix_draws_its_patch_with_its_own_alpha(alpha, seed):
    x = torch.zeros(2, 1, 64, 64)
    res = mix_ops.resizemix(x, (0.1, 0.9), alpha, rng=random.Random(seed))
    top, left, ph, pw = mix_ops.resizemix_geometry(64, 64, (0.1, 0.9), alpha, rng=random.Random(seed))
    expected = torch.zeros(64, 64, dtype=torch.bool)
    expected[top : top + ph, left : left + pw] = True
    assert torch.equal(res.mask[0], expected)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
@few_seeds
@given(seed=seeds)
def test_resizemix_side_ratio_follows_beta_scaled_to_the_scale_range(alpha, seed):
    rng, lo, hi, side = random.Random(seed), 0.1, 0.8, 4000
    ratios = np.array([mix_ops.resizemix_geometry(side, side, (lo, hi), alpha, rng=rng)[2] for _ in range(3000)])
    tau = stats.beta(alpha, alpha, loc=lo, scale=hi - lo)
    # Sides are whole pixels: a 1/4000 grid, far finer than what the KS test resolves at 3000 draws.
    assert stats.kstest(ratios / side, tau.cdf).pvalue > P_FLOOR


@few_seeds
@given(seed=seeds)
def test_resizemix_patch_position_is_uniform_over_every_place_it_fits(seed):
    rng = random.Random(seed)
    # scale (0.5, 0.5) fixes a 5 x 4 patch on a 10 x 8 image: 6 x 5 places.
    where = np.array([mix_ops.resizemix_geometry(10, 8, (0.5, 0.5), rng=rng)[:2] for _ in range(6000)])
    assert _uniform_chi2_pvalue(where[:, 0] * 5 + where[:, 1], 30) > P_FLOOR


@given(b=st.integers(1, 4), h=st.integers(2, 24), w=st.integers(2, 24), seed=seeds)
def test_resizemix_patch_is_the_whole_partner_resized(b, h, w, seed):
    g = _gen(seed)
    x = torch.rand(b, 3, h, w, generator=g, dtype=torch.float64)
    y = torch.randint(0, 9, (b, h, w), generator=g)
    perm = mix_ops.sample_permutation(b, generator=g)
    top, left, ph, pw = geometry = mix_ops.resizemix_geometry(h, w, (0.2, 0.9), rng=random.Random(seed))
    patch = mix_ops.resize_paste(x, perm, geometry)[..., top : top + ph, left : left + pw]
    expected = F.interpolate(x[perm], size=(ph, pw), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(patch, expected, rtol=0, atol=1e-12)  # float64 throughout, not via float32
    # Labels by nearest neighbour over the whole partner: pixel i of the patch comes from floor(i * h / ph).
    label_patch = mix_ops.resize_paste(y, perm, geometry)[..., top : top + ph, left : left + pw]
    expected_labels = F.interpolate(y[perm][:, None].double(), size=(ph, pw), mode="nearest")[:, 0].long()
    assert torch.equal(label_patch, expected_labels)


@pytest.mark.parametrize(("shape", "dtype"), [((2, 3, 12, 10), torch.uint8), ((2, 12, 10), torch.float32)])
def test_resizemix_patch_of_integer_images_and_float_maps_is_the_nearest_partner_pixel(shape, dtype):
    # Only floating image batches (B, C, H, W) are blended bilinearly: integer images keep exact source
    # pixel values, and (B, H, W) float maps take the nearest pixel like label maps do.
    x = torch.randint(0, 256, shape, generator=_gen(0)).to(dtype)
    perm = torch.tensor([1, 0])
    top, left, ph, pw = geometry = (2, 3, 5, 4)
    patch = mix_ops.resize_paste(x, perm, geometry)[..., top : top + ph, left : left + pw]
    rows, cols = (torch.arange(ph) * shape[-2]) // ph, (torch.arange(pw) * shape[-1]) // pw
    assert torch.equal(patch, x[perm][..., rows[:, None], cols[None, :]])


def test_resizemix_patch_of_a_ramp_spans_the_whole_ramp():
    # A crop of the partner would show only part of the ramp; the whole image resized shows all of it.
    ramp = torch.linspace(0, 1, 64, dtype=torch.float64).view(1, 1, 64, 1).expand(2, 1, 64, 64)
    x = torch.cat([torch.zeros(1, 1, 64, 64, dtype=torch.float64), ramp[:1]])
    out = mix_ops.resize_paste(x, torch.tensor([1, 0]), (10, 20, 16, 16))
    column = out[0, 0, 10:26, 25]
    assert float(column[0]) < 0.05 and float(column[-1]) > 0.95
    assert bool((column.diff() > 0).all())


# --- the callbacks' choices ------------------------------------------------------------------------


class _Counted(MixUp):
    """A MixUp that counts how often RandomMix chose it."""

    def __init__(self):
        super().__init__()
        self.drawn = 0

    def draw(self, x):
        self.drawn += 1
        return super().draw(x)


@few_seeds
@given(seed=seeds)
def test_random_mix_picks_each_child_with_its_stated_probability(seed):
    random.seed(seed)
    torch.manual_seed(seed)
    children = [_Counted() for _ in range(3)]
    mix = RandomMix(children, probs=[1.0, 2.0, 5.0])
    x = torch.rand(2, 1)
    for _ in range(4000):
        mix.draw(x)
    counts = [c.drawn for c in children]
    assert stats.chisquare(counts, [500, 1000, 2500]).pvalue > P_FLOOR


@few_seeds
@given(seed=seeds)
def test_a_batch_is_mixed_with_probability_p(seed):
    random.seed(seed)
    torch.manual_seed(seed)
    mix = MixUp(p=0.3)
    x, y = torch.rand(2, 3), torch.rand(2, 4)
    mix.learn = SimpleNamespace(xb=(x,), yb=(y,), training=True, pct_train=0.0, epoch=0, n_epoch=1)
    mixed = 0
    for _ in range(3000):
        mix.learn.xb, mix.learn.yb = (x,), (y,)
        mix.before_batch()
        mixed += mix.learn.xb[0] is not x
    assert stats.binomtest(mixed, 3000, 0.3).pvalue > P_FLOOR


@few_seeds
@given(seed=seeds)
def test_manifold_mix_picks_the_input_and_each_stage_uniformly(seed):
    random.seed(seed)
    torch.manual_seed(seed)
    stages = [torch.nn.Linear(2, 2) for _ in range(3)]
    model = torch.nn.Sequential(*stages)
    mix = ManifoldMix(modules=stages)
    mix.learn = SimpleNamespace(model=model, training=True, pct_train=0.0)
    x = torch.rand(2, 2)
    picks = []
    for _ in range(4000):
        drawn = mix.draw(x)
        armed = [i + 1 for i, s in enumerate(stages) if s._forward_hooks]
        assert len(armed) == (0 if drawn.x is not None else 1)
        picks.append(armed[0] if armed else 0)
        mix._release()
    assert _uniform_chi2_pvalue(np.array(picks), 4) > P_FLOOR
