"""Pixel Surgery: remove the pixels where the frozen classifier's own gradient is salient.

The classifier's predicted label stands in for the unknown true one (DESIGN.md §2.1): one forward
and backward pass of f gives g = ∂ log p(ŷ | x) / ∂x, and the fused op removes the pixels whose
score max_c |g| is above α × the image's mean (or the top ρ fraction). The saliency step always
runs under ``torch.enable_grad()``, because attack libraries call models inside ``no_grad``.

How an attacker differentiates the surgery is a choice, not a fact, so it is explicit here:

``mask-fixed``  the op's own autograd: ∂x_s/∂x = 1 − mask (the true gradient, mask held fixed).
``bpda``        straight-through: ∂x_s/∂x = I (BPDA with the identity).
``soft``        the hard threshold's gradient replaced by that of σ((s − τ)/T), differentiated
                through the saliency gradient itself (``create_graph=True``): the full adaptive
                attack. The forward value stays exactly the real defense's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from . import ops

GRADIENTS = ("mask-fixed", "bpda", "soft")


@dataclass(frozen=True)
class SurgeryConfig:
    """The surgery's knobs (stored in the purifier checkpoint: train and test must agree)."""

    mode: Literal["mean", "topk"] = "mean"
    alpha: float = 1.0  # mean mode: remove pixels with score > alpha * mean score
    ratio: float = 0.2  # topk mode: remove ceil(ratio * H * W) pixels
    fill: float = 0.0
    reduce: Literal["max", "sum"] = "max"
    soft_temperature: float = 0.1  # soft gradient: T = this × the image's mean score

    def __post_init__(self):
        if self.mode not in ("mean", "topk"):
            raise ValueError(f"surgery mode must be mean or topk, got {self.mode!r}")
        if self.reduce not in ("max", "sum"):
            raise ValueError(f"surgery reduce must be max or sum, got {self.reduce!r}")
        if not self.alpha >= 0 or not 0 <= self.ratio <= 1 or not 0 <= self.fill <= 1:
            raise ValueError("surgery needs alpha >= 0, ratio in [0, 1] and fill in [0, 1]")
        if not self.soft_temperature > 0:
            raise ValueError("surgery soft_temperature must be > 0")


def saliency_gradient(classifier: nn.Module, x: torch.Tensor, *, create_graph: bool = False):
    """(g, logits): per image, the gradient of log p(ŷ | x) up to a positive factor, ŷ = argmax f(x).

    g = ∂/∂x [l_ŷ − logsumexp_{j≠ŷ} l_j] = ∂ log p(ŷ|x)/∂x ÷ (1 − p_ŷ). The factor is the same for
    every pixel of an image, so the mask (relative threshold or top-k) is the one DESIGN §2.1
    defines; differentiating log p itself loses the ∇l_ŷ term in float32 once p_ŷ rounds to 1,
    as it does on confidently classified images. Without ``create_graph`` the gradient is taken
    at a detached copy of x (no graph to the caller); with it, g stays a differentiable function
    of x (for the soft adaptive attack).
    """
    with torch.enable_grad():
        xin = x if create_graph and x.requires_grad else x.detach().requires_grad_(True)
        logits = classifier(xin)
        pred = logits.argmax(1, keepdim=True)
        others = logits.masked_fill(F.one_hot(pred[:, 0], logits.shape[1]).bool(), float("-inf"))
        margin = (logits.gather(1, pred)[:, 0] - others.logsumexp(1)).sum()
        (grad,) = torch.autograd.grad(margin, xin, create_graph=create_graph)
    return grad, logits


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y):
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def straight_through(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exactly y in the forward pass, the identity (∂/∂x = I) in the backward pass."""
    return _StraightThrough.apply(x, y.detach())


class PixelSurgery(nn.Module):
    """x -> (x_s, mask, logits of f(x)); mask is bool (B, 1, H, W), True = removed."""

    def __init__(self, classifier: nn.Module, config: SurgeryConfig = SurgeryConfig()):
        super().__init__()
        self.classifier = classifier
        self.config = config

    def forward(self, x: torch.Tensor, gradient: str = "mask-fixed"):
        if gradient not in GRADIENTS:
            raise ValueError(f"unknown surgery gradient {gradient!r}; choose one of {', '.join(GRADIENTS)}")
        if gradient == "soft":
            return self.soft(x)
        grad, logits = self.saliency(x)
        x_s, mask = self.cut(x if gradient == "mask-fixed" else x.detach(), grad)
        if gradient == "bpda":
            x_s = straight_through(x, x_s)
        return x_s, mask, logits

    def saliency(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g, logits of f(x)), both detached: the first of the surgery's two stages."""
        grad, logits = saliency_gradient(self.classifier, x)
        return grad, logits.detach()

    def cut(self, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_s, mask) by the fused op with this surgery's settings: the second stage."""
        c = self.config
        return ops.pixel_surgery(x, grad, alpha=c.alpha, mode=c.mode, ratio=c.ratio, fill=c.fill, reduce=c.reduce)

    def soft(self, x: torch.Tensor):
        """The real surgery forward, a relaxed backward: (x_s, mask as 0./1. floats, logits).

        Forward: exactly the hard mask of the op, so G and f see what the real defense makes (and
        an attack's own success checks are made on the real defense). Backward: through
        σ((s − τ)/T) and through the saliency gradient s itself (``create_graph=True``).
        """
        c = self.config
        grad, logits = saliency_gradient(self.classifier, x, create_graph=True)
        _, hard = self.cut(x.detach(), grad.detach())
        g = grad.abs()
        s = g.amax(1) if c.reduce == "max" else g.sum(1)  # (B, H, W)
        flat = s.flatten(1)
        scale = flat.mean(1).clamp_min(torch.finfo(s.dtype).tiny)
        if c.mode == "mean":
            tau = c.alpha * flat.mean(1)
        else:
            k = ops.topk_count(c.ratio, s.shape[-2], s.shape[-1])
            # threshold halfway between the k-th and (k+1)-th highest score (a fixed, detached level)
            top = flat.detach().sort(1, descending=True).values
            hi = top[:, max(k - 1, 0)] if k > 0 else top[:, 0] + scale
            lo = top[:, k] if k < top.shape[1] else top[:, -1] - scale
            tau = 0.5 * (hi + lo)
        soft = torch.sigmoid((s - tau[:, None, None]) / (c.soft_temperature * scale[:, None, None]))[:, None]
        m = hard.to(x.dtype) + (soft - soft.detach())  # value: the hard mask; gradient: the sigmoid's
        x_s = (1 - m) * x + m * c.fill
        return x_s, m, logits.detach()
