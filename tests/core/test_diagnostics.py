import math

import pytest
import torch

from tailorpo.core.diagnostics import clamp_fraction, mean_shift_in_sigma, row_cosine
from tailorpo.core.objectives import clipped_log_ratio


def test_mean_shift_is_the_rms_of_the_shift_over_latent_dims_in_sigma_units():
    ref = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    offsets = torch.tensor([0.0, 0.3, -1.2]).view(3, 1, 1, 1)  # a constant move of each row
    torch.testing.assert_close(mean_shift_in_sigma(ref + offsets, ref, sigma=0.6), torch.tensor([0.0, 0.5, 2.0]))
    # one latent dim of 16 moved by 4 sigma: RMS sqrt(16 / 16) = 1
    moved = ref.clone()
    moved[:, 1, 0, 1] += 4 * 0.25
    torch.testing.assert_close(mean_shift_in_sigma(moved, ref, sigma=0.25), torch.ones(3))


def test_row_cosine_per_row_and_zero_for_a_zero_row():
    a = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]], [[0.0, 0.0]], [[2.0, 0.0]]])
    b = torch.tensor([[[3.0, 0.0]], [[-1.0, 0.0]], [[1.0, 0.0]], [[-5.0, 0.0]]])
    torch.testing.assert_close(row_cosine(a, b), torch.tensor([1.0, -1 / math.sqrt(2), 0.0, -1.0], dtype=torch.float64))
    tiny = torch.full((1, 8), 1e-30)  # a first update's shift: its float32 norm product underflows
    assert row_cosine(tiny, tiny).item() == pytest.approx(1.0)


def test_clamp_fraction_counts_pairs_with_either_ratio_outside_the_clip():
    c = 0.1
    inside, above, below = math.log(1.05), math.log(1.2), math.log(0.85)
    log_ratio_w = torch.tensor([inside, above, inside, below])
    log_ratio_l = torch.tensor([inside, inside, below, above])
    assert clamp_fraction(log_ratio_w, log_ratio_l, c) == 0.75
    assert clamp_fraction(log_ratio_w, log_ratio_l, None) == 0.0
    # exactly where dpo_logits' clamp changes a ratio
    for log_ratio in (log_ratio_w, log_ratio_l):
        changed = clipped_log_ratio(log_ratio, torch.zeros(4), c) != log_ratio
        assert clamp_fraction(log_ratio, torch.zeros(4), c) == changed.float().mean().item()
