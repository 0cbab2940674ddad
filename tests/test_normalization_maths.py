"""The moment maths keeps the precision it promises (a companion to test_normalization.py)."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastai_tricks.normalization import Moments, batch_moments, merge_moments, moments_to_stats


def test_float64_batches_are_summed_in_float64_so_a_tiny_spread_on_a_large_offset_survives():
    # 1e4 + 1e-3 noise: in float32 (ulp 1e-3 at 1e4) the spread would be rounded away; float64 keeps it.
    g = torch.Generator().manual_seed(0)
    x = 1e4 + 1e-3 * torch.randn(4, 2, 8, 8, generator=g, dtype=torch.float64)
    mean, std = moments_to_stats(batch_moments(x))
    flat = x.transpose(0, 1).reshape(2, -1)
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), flat.mean(1), rtol=0, atol=1e-9)
    assert torch.allclose(torch.tensor(std, dtype=torch.float64), flat.std(1, correction=0), rtol=1e-6, atol=0)


def test_float32_moments_are_exact_where_the_float32_sums_are():
    # A zero image and one near 2**20: every float32 sum here is exact, so the only rounding left is the
    # image mean's (2**20 + 1/3 is held as 2**20 + 0.375 in float32). The float64 division and the
    # correction S(x - m)^2 = S(x - c)^2 - L (m - c)^2 remove it: the result matches exact arithmetic.
    b = 2**20
    values = [[0, 0, 0], [b, b, b + 1]]
    m = batch_moments(torch.tensor(values, dtype=torch.float32).view(2, 1, 3))
    flat = [Fraction(v) for row in values for v in row]
    mean = sum(flat) / len(flat)
    m2 = sum((v - mean) ** 2 for v in flat)
    assert m.count == 6
    assert abs(Fraction(float(m.mean[0])) - mean) < 1e-9  # float32 would be 0.02 off
    assert abs(Fraction(float(m.m2[0])) - m2) < 2e-3  # 6 parts in 1e16; without the correction, 1e-2 off


class _Float64Outputs(TorchDispatchMode):
    """Record every op that returns a float64 tensor with at least ``numel`` elements."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.numel() >= self.numel:
                self.ops.append(str(func))
        return out


def test_float32_batches_are_summed_in_float32_without_a_float64_copy():
    # The speed batch_moments promises: only per-image sums, (N, C), are ever float64.
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with _Float64Outputs(x[:, :, 0].numel() + 1) as mode:
        batch_moments(x)
    assert mode.ops == []


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.float16, torch.bfloat16])
def test_integer_and_half_batches_give_the_float64_reference_stats(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(3, 2, 5, 7, generator=g) * 255).to(dtype)
    mean, std = moments_to_stats(batch_moments(x))
    flat = x.double().transpose(0, 1).reshape(2, -1)
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), flat.mean(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), flat.std(1, correction=0), rtol=1e-6, atol=0)


def test_a_batch_of_feature_vectors_has_the_moments_of_its_columns():
    # (N, C) with no spatial axes is a batch too: every value of a column is one sample of its channel.
    x = torch.tensor([[1.0, 10.0], [2.0, 20.0], [6.0, 30.0]])
    m = batch_moments(x)
    assert m.count == 3
    torch.testing.assert_close(m.mean, torch.tensor([3.0, 20.0], dtype=torch.float64))
    torch.testing.assert_close(m.m2, torch.tensor([14.0, 200.0], dtype=torch.float64))


@pytest.mark.parametrize(("shape", "channels"), [((0, 3, 4, 4), 3), ((2, 0, 4, 4), 0), ((2, 3, 0, 4), 3), ((0, 3), 3)])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_an_empty_batch_has_zero_moments_of_its_channels_on_its_device(shape, channels, device):
    m = batch_moments(torch.empty(shape, device=device))
    assert m.count == 0 and isinstance(m.count, int)
    for t in (m.mean, m.m2):
        assert t.shape == (channels,) and t.dtype == torch.float64 and t.device.type == device
    if device == "cpu":
        assert torch.equal(m.mean, torch.zeros(channels, dtype=torch.float64))
        assert torch.equal(m.m2, torch.zeros(channels, dtype=torch.float64))
        m.m2.add_(1)  # mean and m2 are two tensors, not one
        assert torch.equal(m.mean, torch.zeros(channels, dtype=torch.float64))
        full = batch_moments(torch.rand(2, channels, 3, 3))
        assert merge_moments(full, batch_moments(torch.empty(shape))) is full
        with pytest.raises(ValueError, match="empty"):
            moments_to_stats(batch_moments(torch.empty(shape)))


def test_merging_moments_from_another_device_moves_them_to_the_first():
    # Moments gathered from other ranks may arrive on the CPU; the meta device stands in for the GPU.
    on_meta = Moments(
        4, torch.zeros(3, dtype=torch.float64, device="meta"), torch.ones(3, dtype=torch.float64, device="meta")
    )
    merged = merge_moments(on_meta, batch_moments(torch.rand(2, 3, 2, 2)))
    assert merged.count == 12
    assert merged.mean.device.type == "meta" and merged.m2.device.type == "meta"
