"""A regenerator with nothing to learn and nothing to steer: normalized-convolution inpainting.

Each removed pixel becomes a Gaussian-weighted average of the kept pixels around it, filled
from the hole's edge inwards (a pixel whose neighbourhood holds no value yet waits for the next
pass). Every filled value is therefore a convex combination of kept pixels, so for a fixed mask an
ε-change of the kept pixels moves every filled pixel by at most ε (in L∞): the fill cannot
amplify an attack the way a learned G can (DESIGN.md §10). It is the baseline every learned G
must beat, and a regenerator in its own right (``regenerator.kind: normconv``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def gaussian_kernel(sigma: float, channels: int) -> torch.Tensor:
    """A normalised (channels, 1, k, k) depthwise Gaussian, k = 2·ceil(2σ) + 1."""
    radius = max(1, math.ceil(2 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    k = torch.outer(g, g)
    return (k / k.sum()).to(torch.float32).expand(channels, 1, -1, -1).contiguous()


def normalized_convolution(x_s: torch.Tensor, mask: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """x_s with every removed pixel (mask True or > 0.5) filled from the kept ones, edge inwards.

    A pixel with no kept pixel anywhere in its image is set to 0.5 (nothing to average).
    """
    B, C, H, W = x_s.shape
    kernel = gaussian_kernel(sigma, C + 1).to(x_s.device, x_s.dtype)
    pad = kernel.shape[-1] // 2
    known = (mask < 0.5).to(x_s.dtype) if mask.is_floating_point() else (~mask).to(x_s.dtype)
    known = known.expand(B, 1, H, W)
    out = x_s * known
    for _ in range(H + W):
        if bool(known.all()):
            break
        both = F.conv2d(F.pad(torch.cat([out * known, known], 1), (pad,) * 4), kernel, groups=C + 1)
        num, den = both[:, :C], both[:, C:]
        new = (den > 1e-12) & (known < 0.5)
        out = torch.where(new, num / den.clamp_min(1e-12), out)
        if not bool(new.any()):
            break
        known = torch.where(new, torch.ones_like(known), known)
    return torch.where(known > 0.5, out, torch.full_like(out, 0.5))


class NormalizedConvolution(nn.Module):
    """G(x_s, m) for the purifier: the inpainting above (no parameters)."""

    def __init__(self, sigma: float = 1.0):
        super().__init__()
        self.sigma = sigma

    def forward(self, x_s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return normalized_convolution(x_s, mask, self.sigma)
