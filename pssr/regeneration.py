"""Semantic Regeneration: the conditional alignment extrapolator (CAE) that refills removed pixels.

G sees the surgered image and its mask ([x_s, m], C + 1 channels) and predicts the whole image;
only its prediction *inside* the mask is used, so every surviving pixel passes through unchanged:

    x̂ = (1 − m) ⊙ x_s + m ⊙ G(x_s, m)

G is a small U-Net of gated convolutions (a learned per-pixel gate lets it treat holes and
surviving pixels differently, as in free-form inpainting) with one down-sampling level, dilated
convolutions at the bottom for context, and dropout there so that adversarial R-drop has two
different passes to compare. It is fully convolutional: any image size works (odd sizes too).
No batch norm: a purified image must not depend on what else is in its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .inpainting import NormalizedConvolution


KINDS = ("unet", "normconv")


@dataclass(frozen=True)
class RegeneratorSpec:
    """All that is needed to rebuild G (stored in the purifier checkpoint)."""

    channels: int  # image channels (1 for MNIST, 3 for CIFAR)
    width: int = 32
    dropout: float = 0.1
    # 0: G reads the surviving pixels as they are; b >= 1: rounded to 2**b levels first, so that a
    # perturbation that moves no pixel across a level cannot steer what G paints into the holes
    # (the kept pixels themselves still reach f unchanged). Straight-through backward, so attacks
    # keep a useful gradient (BPDA for the rounding) and no robustness comes from masked gradients.
    input_bits: int = 0
    # "unet": the learned G above; "normconv": pssr.inpainting's normalized-convolution fill (no
    # weights; width, dropout and input_bits unused), the regenerator an attacker cannot steer
    kind: str = "unet"
    sigma: float = 1.0  # normconv: the Gaussian's σ in pixels

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"regenerator kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not 0.3 <= self.sigma <= 8:
            raise ValueError("regenerator sigma must be in [0.3, 8]")
        if self.channels < 1 or self.width < 1:
            raise ValueError("regenerator channels and width must be >= 1")
        if not 0 <= self.dropout < 1:
            raise ValueError("regenerator dropout must be in [0, 1)")
        if not 0 <= self.input_bits <= 8:
            raise ValueError("regenerator input_bits must be in 0..8 (0: no rounding)")


class GatedConv(nn.Module):
    """3x3 conv whose output is ELU(features) × sigmoid(gate), both from one convolution."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, 2 * cout, 3, stride=stride, padding=dilation, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, gate = self.conv(x).chunk(2, dim=1)
        return F.elu(features) * torch.sigmoid(gate)


class _ClampInward(torch.autograd.Function):
    """clamp(a, 0, 1) forward; backward: the identity, except that a gradient pushing a value that is
    already out of range further out is dropped. A sigmoid output saturates under the large early
    cross-entropy gradients and never recovers (measured: every hole pixel stuck at 0 after 20
    steps); a plain straight-through clamp let the cross-entropy push pre-activations ever further
    out where no pixel loss pulls back (a clamped pixel at its target has no pixel gradient), and
    training degraded after ~300 steps. Inward gradients (the pixel loss pulling back) still pass."""

    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return a.clamp(0, 1)

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved_tensors
        outward = ((a > 1) & (grad < 0)) | ((a < 0) & (grad > 0))  # descent moves a by -grad
        return grad.masked_fill(outward, 0)


class _RoundStraightThrough(torch.autograd.Function):
    """round(x · L) / L forward; identity backward (BPDA's rule for a quantiser)."""

    @staticmethod
    def forward(ctx, x, levels: int):
        return torch.round(x.clamp(0, 1) * levels) / levels

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class Regenerator(nn.Module):
    """G(x_s, m) -> an image in [0, 1] of x_s's shape."""

    def __init__(self, spec: RegeneratorSpec):
        super().__init__()
        c, w = spec.channels, spec.width
        self.spec = spec
        self.encode = nn.Sequential(GatedConv(c + 1, w), GatedConv(w, w))
        self.down = GatedConv(w, 2 * w, stride=2)
        self.context = nn.Sequential(
            GatedConv(2 * w, 2 * w, dilation=2), nn.Dropout(spec.dropout), GatedConv(2 * w, 2 * w, dilation=4)
        )
        self.decode = GatedConv(3 * w, w)
        self.out = nn.Conv2d(w, c, 3, padding=1)
        nn.init.constant_(self.out.bias, 0.5)  # start mid-range: the clamp's dead zones are far away

    def forward(self, x_s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.spec.input_bits:
            x_s = _RoundStraightThrough.apply(x_s, 2**self.spec.input_bits - 1)
        skip = self.encode(torch.cat([x_s, mask.to(x_s.dtype)], dim=1))
        deep = self.context(self.down(skip))
        up = F.interpolate(deep, size=skip.shape[-2:], mode="nearest")
        return _ClampInward.apply(self.out(self.decode(torch.cat([up, skip], dim=1))))


def build(spec: RegeneratorSpec) -> nn.Module:
    """The regenerator ``spec`` describes: the learned U-Net, or the inpainting (no weights)."""
    if spec.kind == "normconv":
        return NormalizedConvolution(spec.sigma)
    return Regenerator(spec)


def compose(x_s: torch.Tensor, mask: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """Surviving pixels from x_s, removed ones from G: (1 − m) x_s + m G."""
    m = mask.to(x_s.dtype)
    return (1 - m) * x_s + m * generated
