"""Normalized-convolution inpainting: kept pixels untouched, fills are convex combinations of kept
pixels, so an ε-change of the kept pixels moves no filled pixel by more than ε."""

import torch

from pssr.inpainting import NormalizedConvolution, normalized_convolution


def _case(seed=0, shape=(4, 3, 16, 16), p=0.4):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    mask = torch.rand((shape[0], 1, *shape[2:]), generator=g) < p
    return x, mask


def test_kept_pixels_pass_and_every_hole_is_filled_inside_the_kept_range():
    x, mask = _case()
    x_s = x * ~mask
    out = normalized_convolution(x_s, mask)
    keep = ~mask.expand_as(x)
    assert torch.equal(out[keep], x[keep])
    lo = torch.where(keep, x, torch.inf).amin((2, 3), keepdim=True)
    hi = torch.where(keep, x, -torch.inf).amax((2, 3), keepdim=True)
    assert ((out >= lo - 1e-6) & (out <= hi + 1e-6)).all()
    assert not torch.equal(out[~keep], x_s[~keep])  # the holes were filled (not left at 0)


def test_a_large_hole_fills_from_its_edge_and_a_constant_stays_constant():
    x = torch.full((1, 1, 20, 20), 0.7)
    mask = torch.zeros(1, 1, 20, 20, dtype=torch.bool)
    mask[..., 2:18, 2:18] = True  # 16x16 hole: several passes needed
    out = normalized_convolution(x * ~mask, mask)
    assert torch.allclose(out, x)


def test_an_eps_change_of_the_kept_pixels_moves_no_filled_pixel_by_more_than_eps():
    x, mask = _case(1)
    eps = 0.05
    delta = (torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) * 2 - 1) * eps
    a = normalized_convolution(x * ~mask, mask)
    b = normalized_convolution((x + delta) * ~mask, mask)
    assert (a - b).abs().max() <= eps + 1e-6
    # a learned-free fill has a gradient: attacks through it are not masked
    xr = x.clone().requires_grad_(True)
    NormalizedConvolution()(xr * ~mask, mask).sum().backward()
    assert xr.grad.abs().sum() > 0


def test_nothing_kept_gives_grey_and_soft_masks_threshold_at_half():
    x = torch.rand(2, 1, 8, 8)
    everything = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    assert torch.equal(normalized_convolution(x * 0, everything), torch.full_like(x, 0.5))
    _, mask = _case(3, (2, 1, 8, 8))
    hard = normalized_convolution(x * ~mask, mask)
    soft = normalized_convolution(x * ~mask, mask.float() * 0.8 + 0.1)
    assert torch.allclose(hard, soft)


def test_an_inpainting_purifier_saves_loads_and_purifies(tmp_path):
    from pssr import purifier
    from pssr.surgery import SurgeryConfig

    shipped = purifier.shipped_path("classifier-mnist")
    path = tmp_path / "inpaint.safetensors"
    spec = purifier.save_inpainting(path, shipped, SurgeryConfig(alpha=2.0), sigma=1.5)
    p, loaded, _ = purifier.load(path, shipped)
    assert loaded.regenerator.kind == "normconv" and loaded.regenerator.sigma == 1.5 and loaded == spec
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    out = p.purify(x)
    keep = ~out.mask.expand_as(x)
    assert 0 < out.mask.float().mean() < 1 and torch.equal(out.x_hat[keep], x[keep])
    assert torch.allclose(out.x_hat, normalized_convolution(out.x_s, out.mask, 1.5))
