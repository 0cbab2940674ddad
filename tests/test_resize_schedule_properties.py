"""The progressive-resize schedule computes the documented sizes, not only self-consistent ones.

Every call passes every argument explicitly: these properties hold for any settings, so they do not
depend on (and do not pin) the defaults of :func:`resize_schedule` or :class:`ProgressiveResize`.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastai_tricks.resizing import initial_pixels, mix_alpha_at, resize_schedule, schedule_progress, size_at

finals = st.tuples(st.integers(1, 300), st.integers(1, 300))


@st.composite
def settings_st(draw):
    """``(n_epoch, n_iter, final, kwargs)`` with every keyword of resize_schedule given."""
    final = draw(finals)
    initial = draw(st.one_of(st.floats(0.01, 1.0), st.integers(1, min(final))))
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


def _progress(k: int, n_epoch: int, n_iter: int, schedule: str) -> float:
    """The documented progress of iteration ``k``: k / (N - 1), or e / (n_epoch - 1) per epoch."""
    if schedule == "epoch":
        return 1.0 if n_epoch == 1 else (k // n_iter) / (n_epoch - 1)
    n = n_epoch * n_iter
    return 1.0 if n == 1 else k / (n - 1)


def _grown(i: int, f: int, t: float, k: int) -> set[int]:
    """The documented side at fraction ``t`` of the growth: i + (f - i) t rounded down to a multiple of k,
    never below i nor above f (both neighbours of an exact multiple are allowed, for float rounding)."""
    out = set()
    for eps in (-1e-9, 0.0, 1e-9):
        out.add(min(f, max(i, math.floor((i + (f - i) * t) / k + eps) * k)))
    return out


@given(settings_st())
def test_schedule_is_monotone_initial_up_to_start_and_final_from_finish(case):
    n_epoch, n_iter, final, kw = case
    sizes = resize_schedule(n_epoch, n_iter, final, **kw)
    initial = initial_pixels(kw["initial_size"], final, kw["increase_by"])
    assert len(sizes) == n_epoch * n_iter
    for a, b in zip(sizes, sizes[1:], strict=False):
        assert b[0] >= a[0] and b[1] >= a[1]
    for k, size in enumerate(sizes):
        p = _progress(k, n_epoch, n_iter, kw["schedule"])
        if p >= kw["finish"]:
            assert size == final
        elif p <= kw["start"]:
            assert size == initial
    assert sizes[-1] == final


@given(settings_st())
def test_schedule_takes_only_multiples_of_increase_by_or_the_final_side(case):
    n_epoch, n_iter, final, kw = case
    for size in resize_schedule(n_epoch, n_iter, final, **kw):
        for side, full in zip(size, final, strict=True):
            assert side == full or side % kw["increase_by"] == 0


@given(settings_st())
def test_schedule_grows_linearly_between_start_and_finish_rounded_down(case):
    n_epoch, n_iter, final, kw = case
    start, finish, k = kw["start"], kw["finish"], kw["increase_by"]
    initial = initial_pixels(kw["initial_size"], final, k)
    for step, size in enumerate(resize_schedule(n_epoch, n_iter, final, **kw)):
        p = _progress(step, n_epoch, n_iter, kw["schedule"])
        if start < p < finish:
            t = (p - start) / (finish - start)
            for d in range(2):
                assert size[d] in _grown(initial[d], final[d], t, k), (p, d)


def _documented_initial(target: float, full: int, k: int) -> set[int]:
    """The nearest multiple of k to ``target`` (both on a tie), at least k, at most ``full``; ``full`` if asked."""
    if target >= full:
        return {full}
    below, above = k * math.floor(target / k), k * math.ceil(target / k)
    nearest = (
        {below, above}
        if abs((target - below) - (above - target)) < 1e-9
        else {min(below, above, key=lambda m: abs(m - target))}
    )
    return {min(full, max(k, m)) for m in nearest}


@given(final=finals, frac=st.floats(0.01, 1.0), k=st.integers(1, 32))
def test_initial_size_is_the_nearest_multiple_of_increase_by_to_the_fraction(final, frac, k):
    initial = initial_pixels(frac, final, k)
    for side, full in zip(initial, final, strict=True):
        assert side in _documented_initial(full * frac, full, k)


@given(final=finals, short=st.integers(1, 300), k=st.integers(1, 16))
def test_integer_initial_size_is_the_short_side_and_keeps_the_aspect_ratio(final, short, k):
    short = min(short, min(final))
    initial = initial_pixels(short, final, k)
    for side, full in zip(initial, final, strict=True):
        assert side in _documented_initial(full * short / min(final), full, k)


def test_initial_size_rounds_to_the_nearest_multiple_not_down():
    # 0.31 of 100 is 31: of the multiples of 4 around it, 28 and 32, 32 is the nearest; 29 goes to 28.
    assert initial_pixels(0.31, (100, 100), 4) == (32, 32)
    assert initial_pixels(0.29, (100, 100), 4) == (28, 28)
    assert initial_pixels((30, 58), (100, 100), 8) == (32, 56)
    assert initial_pixels(0.01, (100, 50), 8) == (8, 8)  # at least one multiple
    assert initial_pixels(1.0, (30, 45), 8) == (30, 45)  # full size stays exact


@pytest.mark.parametrize(
    ("step", "total", "expected"),
    [(0, 1, 1.0), (0, 5, 0.0), (1, 5, 0.25), (4, 5, 1.0), (9, 5, 1.0), (-1, 5, 0.0), (3, 7, 0.5)],
)
def test_schedule_progress_is_step_over_total_minus_one_clamped(step, total, expected):
    assert schedule_progress(step, total) == pytest.approx(expected)


def test_size_at_by_hand():
    # initial 32, final 64, growth between 0.2 and 0.6 in steps of 8.
    args = ((32, 40), (64, 64), 0.2, 0.6, 8)
    assert size_at(0.0, *args) == (32, 40)
    assert size_at(0.2, *args) == (32, 40)
    assert size_at(0.4, *args) == (48, 48)  # halfway: 48 and 52, rounded down to 48
    assert size_at(0.5, *args) == (56, 56)  # 56 and 58
    assert size_at(0.59, *args) == (56, 56)  # 63.2 and 63.4: rounded down, not up to 64
    assert size_at(0.6, *args) == (64, 64)
    assert size_at(1.0, *args) == (64, 64)


@given(final=finals, frac=st.floats(0.05, 1.0), low=st.floats(0.01, 5.0), high=st.floats(0.01, 5.0))
def test_mix_alpha_is_linear_in_the_side_that_grows_most(final, frac, low, high):
    initial = initial_pixels(frac, final, 1)
    spans = [f - i for i, f in zip(initial, final, strict=True)]
    d = max(range(2), key=lambda j: spans[j])
    for t in (0.0, 0.25, 0.5, 1.0):
        size = tuple(round(i + (f - i) * t) for i, f in zip(initial, final, strict=True))
        expected = high if spans[d] <= 0 else low + (high - low) * (size[d] - initial[d]) / spans[d]
        assert mix_alpha_at(size, initial, final, low, high) == pytest.approx(expected)


def test_size_at_is_exactly_final_at_finish_even_when_final_is_not_a_multiple():
    # At progress == finish the linear growth would give floor(45 / 8) * 8 = 40; the final size is exact.
    args = ((16, 24), (30, 45), 0.2, 0.6, 8)
    assert size_at(0.6, *args) == (30, 45)
    assert size_at(0.5999, *args) == (24, 40)
    # A window of zero width jumps straight from initial to final at its one point.
    assert size_at(0.4, (16, 24), (30, 45), 0.4, 0.4, 8) == (30, 45)
    assert size_at(0.3999, (16, 24), (30, 45), 0.4, 0.4, 8) == (16, 24)


def test_initial_pixels_default_granularity_is_the_callbacks():
    from fastai_tricks import ProgressiveResize

    # 31 px: the nearest multiple of 4 is 32 (of 5 it would be 30).
    assert initial_pixels(0.31, 100) == initial_pixels(0.31, 100, ProgressiveResize().increase_by) == (32, 32)


@pytest.mark.parametrize(
    ("size", "initial", "final", "expected"),
    [
        # The height grows most (by 90 px) so it measures, though the width is further along: 5 of 90 px done.
        ((15, 30), (10, 20), (100, 30), 0.1 + 0.9 * 5 / 90),
        ((31, 31), (31, 31), (32, 32), 0.1),  # a side that grows by one pixel is measured too: none of it done
        ((32, 32), (31, 31), (32, 32), 1.0),
        ((80, 80), (32, 32), (64, 64), 1.0),  # past the final size: clamped at high
        ((5, 5), (32, 32), (64, 64), 0.1),  # below the initial size: clamped at low
        ((40, 40), (64, 64), (64, 64), 1.0),  # nothing to grow: high
    ],
)
def test_mix_alpha_by_hand(size, initial, final, expected):
    assert mix_alpha_at(size, initial, final, 0.1, 1.0) == pytest.approx(expected)


def test_sizes_of_different_lengths_are_refused_not_truncated():
    with pytest.raises(ValueError, match="zip"):
        size_at(0.5, (16, 16, 3), (32, 32), 0.0, 1.0, 4)
    with pytest.raises(ValueError, match="zip"):
        mix_alpha_at((20, 20), (16, 16, 3), (32, 32), 0.1, 1.0)


@pytest.mark.parametrize("final", [(32, 32, 3), (32.0, 32), (32, True), "32", 32.0, True, (0, 5)])
def test_a_size_is_an_int_or_a_pair_of_positive_ints(final):
    with pytest.raises((TypeError, ValueError), match=r"^final_size must be"):
        initial_pixels(0.5, final, 4)


_DEFAULTS = dict(initial_size=0.5, start=0.25, finish=0.5, increase_by=4, schedule="batch")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: initial_pixels(0.0, 32, 4), r"^initial_size must be in \(0, 1\], got 0.0"),
        (lambda: initial_pixels((0, 5), 32, 4), r"^initial_size must be > 0 in both dimensions"),
        (lambda: initial_pixels(0.5, 0, 4), r"^final_size must be >= 1, got 0"),
        (lambda: initial_pixels(0.5, 32, 0), r"^increase_by must be >= 1, got 0"),
        (lambda: resize_schedule(0, 1, 32, **_DEFAULTS), r"^n_epoch must be >= 1, got 0"),
        (lambda: resize_schedule(1, 0, 32, **_DEFAULTS), r"^n_iter must be >= 1, got 0"),
        (lambda: resize_schedule(1, 1, 0, **_DEFAULTS), r"^final_size must be >= 1, got 0"),
        (lambda: resize_schedule(1, 1, 32, **{**_DEFAULTS, "schedule": "daily"}), r"^schedule must be one of"),
        (lambda: resize_schedule(1, 1, 32, **{**_DEFAULTS, "start": 1.5}), r"^start must be in \[0, 1\], got 1.5"),
        (lambda: resize_schedule(1, 1, 32, **{**_DEFAULTS, "finish": -0.5}), r"^finish must be in \[0, 1\], got -0.5"),
    ],
)
def test_errors_start_with_the_name_of_the_bad_parameter(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()
