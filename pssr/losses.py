"""The training losses (DESIGN.md §2.2 for the purifier; TRADES for the classifier), each a mean
over the batch.

Pixel consistency pulls the regenerated pixels towards the clean image; semantic consistency asks
the frozen classifier to see the right class and the clean image's features; adversarial R-drop
asks for the same prediction on the adversarial and the clean path, and across two dropout passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pixel(x_hat: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """‖x̂ − x‖₁ per image (summed over the removed pixels and channels), averaged over images.

    The literal norm, not a per-pixel mean: a per-pixel mean made each pixel's gradient ~800×
    smaller than the cross-entropy's and G collapsed to black holes within one step (measured).
    Kept pixels of x̂ are x_s's (x on the clean path, x_adv on the adversarial one) and carry no
    gradient to G, so they are left out of the sum.
    """
    m = mask.to(x.dtype).expand_as(x)
    return ((x_hat - x).abs() * m).flatten(1).sum(1).mean()


def semantic(logits: torch.Tensor, y: torch.Tensor, features: torch.Tensor, clean_features: torch.Tensor,
             beta: float) -> torch.Tensor:
    """CE(f(x̂), y) + β ‖φ(x̂) − φ(x)‖² (the squared distance averaged over feature dimensions)."""
    ce = F.cross_entropy(logits, y)
    if beta == 0:
        return ce
    return ce + beta * (features - clean_features).pow(2).mean(1).mean()


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """½ [KL(p_a ‖ p_b) + KL(p_b ‖ p_a)], averaged over the batch."""
    la, lb = F.log_softmax(logits_a, 1), F.log_softmax(logits_b, 1)
    kl_ab = F.kl_div(lb, la, log_target=True, reduction="batchmean")  # KL(p_a || p_b)
    kl_ba = F.kl_div(la, lb, log_target=True, reduction="batchmean")
    return 0.5 * (kl_ab + kl_ba)


def trades(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float,
           label_smoothing: float = 0.0) -> torch.Tensor:
    """TRADES (Zhang et al. 2019): CE(f(x), y) + β · KL(f(x) ‖ f(x_adv)), the KL a batch mean.

    Accuracy on clean images and smoothness around them, traded by β; the clean distribution is
    the KL's target and carries gradient too, as in the paper's code (trades.py).
    """
    robust = F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits_clean, 1), reduction="batchmean")
    return F.cross_entropy(logits_clean, y, label_smoothing=label_smoothing) + beta * robust
