"""Random perturbations of an attack's size, for training G: not an attack (no gradient, no query).

Square and AutoAttack break the shipped purifiers through the mask: the perturbation moves the
classifier's saliency, so the surgery cuts elsewhere and G, which reads the mask, paints another
class (`scripts/attribute_attack.py`). Random draws of the same kind already do it often (random
±ε stripes, worst of 10 draws: 27% on MNIST). Training G on the masks of randomly perturbed images
teaches it that the mask moves, without showing it any attack: every attack of the evaluation
stays unseen.

``stripes``: ±ε per column and channel (Square's starting point); ``signs``: ±ε per pixel;
``both``: each image draws one of the two.
"""

from __future__ import annotations

import torch

KINDS = ("stripes", "signs", "both")


def random_perturbation(x: torch.Tensor, eps: float, kind: str, generator: torch.Generator) -> torch.Tensor:
    """x + δ clipped to [0, 1], ‖δ‖∞ = ε, δ drawn on the CPU from ``generator`` (reproducible)."""
    if kind not in KINDS:
        raise ValueError(f"noise kind must be one of {', '.join(KINDS)}, got {kind!r}")
    B, C, H, W = x.shape
    stripes = torch.randint(0, 2, (B, C, 1, W), generator=generator).expand(B, C, H, W)
    signs = torch.randint(0, 2, (B, C, H, W), generator=generator)
    if kind == "stripes":
        pick = stripes
    elif kind == "signs":
        pick = signs
    else:
        use_stripes = torch.randint(0, 2, (B, 1, 1, 1), generator=generator).bool()
        pick = torch.where(use_stripes, stripes, signs)
    delta = (pick.to(x.dtype) * 2 - 1) * eps
    return (x + delta.to(x.device)).clamp(0, 1)
