"""The reference ops against hand-worked examples: the reference is the spec, so check it first."""

import math

import pytest
import torch

from pssr.ops import reference, topk_count


def one_image(scores, channels=1):
    """A (1, C, 1, N) gradient whose channel-max score is `scores` (channel 0 holds it)."""
    s = torch.tensor(scores, dtype=torch.float32).reshape(1, 1, 1, -1)
    g = torch.zeros(1, channels, 1, s.shape[-1])
    g[:, :1] = s
    return g


def test_score_is_channel_max_or_sum_of_abs():
    g = torch.tensor([[-1.0, 2.0], [3.0, -0.5], [0.25, -4.0]]).reshape(1, 3, 1, 2)
    assert reference.saliency_score(g, "max").flatten().tolist() == [3.0, 4.0]
    assert reference.saliency_score(g, "sum").flatten().tolist() == [4.25, 6.5]


def test_nonfinite_channel_makes_score_inf():
    g = torch.tensor([[1.0, float("nan"), 2.0], [float("-inf"), 0.0, 1.0]]).reshape(1, 2, 1, 3)
    s = reference.saliency_score(g, "max").flatten().tolist()
    assert s[0] == math.inf and s[1] == math.inf and s[2] == 2.0


def test_mean_mode_is_strict_against_alpha_times_mean():
    # mean = 2, alpha = 1: only the 3 and 4 are strictly above
    x = torch.ones(1, 1, 1, 4)
    x_s, m = reference.pixel_surgery(x, one_image([0.0, 2.0, 3.0, 3.0]), alpha=1.0, fill=-1.0)
    assert m.flatten().tolist() == [False, False, True, True]
    assert x_s.flatten().tolist() == [1.0, 1.0, -1.0, -1.0]
    # alpha = 1.5: tau = 3, strict compare keeps the 3s
    _, m = reference.pixel_surgery(x, one_image([0.0, 2.0, 3.0, 3.0]), alpha=1.5)
    assert not m.any()


def test_zero_and_constant_gradients_remove_nothing_in_mean_mode():
    x = torch.rand(2, 3, 5, 5)
    for g in (torch.zeros_like(x), torch.full_like(x, 0.7)):
        _, m = reference.pixel_surgery(x, g)
        assert not m.any()


def test_nonfinite_pixels_are_removed_and_left_out_of_the_mean():
    _, m = reference.pixel_surgery(torch.ones(1, 1, 1, 4), one_image([float("nan"), 1.0, 1.0, 3.0]))
    # mean of the finite scores = 5/3: NaN pixel and the 3 go
    assert m.flatten().tolist() == [True, False, False, True]
    _, m = reference.pixel_surgery(torch.ones(1, 1, 1, 3), one_image([float("nan"), float("inf"), float("-inf")]))
    assert m.all(), "an image with no finite score is removed whole"


def test_topk_count_rule():
    assert topk_count(0.2, 28, 28) == math.ceil(0.2 * 784)
    assert topk_count(0.0, 5, 5) == 0 and topk_count(1.0, 5, 5) == 25
    # 0.1 * 30 = 3.0000000000000004 in float64: the rounding to 6 places keeps it at 3
    assert topk_count(0.1, 5, 6) == 3


def test_topk_removes_exactly_k_with_ties_to_the_lower_index():
    g = one_image([1.0, 5.0, 2.0, 2.0, 2.0, 0.0])
    _, m = reference.pixel_surgery(torch.ones(1, 1, 1, 6), g, mode="topk", ratio=0.5)
    assert m.flatten().tolist() == [False, True, True, True, False, False]
    _, m = reference.pixel_surgery(torch.ones(1, 1, 1, 6), torch.zeros(1, 1, 1, 6), mode="topk", ratio=0.5)
    assert m.flatten().tolist() == [True, True, True, False, False, False]


def test_surgery_gradient_is_one_minus_mask_and_nothing_to_grad():
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    x_s, m = reference.pixel_surgery(x, g)
    gx, gg = torch.autograd.grad(x_s.sum(), (x, g), allow_unused=True)
    assert torch.equal(gx, (~m).expand_as(x).double())
    assert gg is None


@pytest.mark.parametrize("bad", [dict(alpha=-1.0), dict(alpha=math.nan), dict(mode="median"), dict(ratio=1.5), dict(reduce="mean"), dict(fill=math.inf)])
def test_bad_arguments_raise(bad):
    x = torch.rand(1, 1, 3, 3)
    with pytest.raises((ValueError, TypeError)):
        reference.pixel_surgery(x, x, **bad)
