"""The moment maths keeps the precision it promises (a companion to test_normalization.py)."""

from __future__ import annotations

import torch

from fastai_tricks.normalization import batch_moments, moments_to_stats


def test_float64_batches_are_summed_in_float64_so_a_tiny_spread_on_a_large_offset_survives():
    # 1e4 + 1e-3 noise: in float32 (ulp 1e-3 at 1e4) the spread would be rounded away; float64 keeps it.
    g = torch.Generator().manual_seed(0)
    x = 1e4 + 1e-3 * torch.randn(4, 2, 8, 8, generator=g, dtype=torch.float64)
    mean, std = moments_to_stats(batch_moments(x))
    flat = x.transpose(0, 1).reshape(2, -1)
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), flat.mean(1), rtol=0, atol=1e-9)
    assert torch.allclose(torch.tensor(std, dtype=torch.float64), flat.std(1, correction=0), rtol=1e-6, atol=0)
