"""Pure-PyTorch reference of the pssr ops: the specification the kernels are held to.

Every rule here is part of the contract (DESIGN.md §9) and the fused kernels must
reproduce it bit for bit on the mask:

* score ``s = max_c |g|`` (or the channel sum, added in channel order 0, 1, …),
  accumulated in float32 for half/bfloat16 gradients, in the gradient's own dtype
  otherwise; a NaN or ±Inf anywhere in a pixel's gradient makes its score +Inf;
* ``mean`` mode: ``τ_b = α · (S_b / n_b)`` in float64, with ``S_b`` the float64 sum of
  image b's finite scores and ``n_b`` their count (1 when there are none);
  ``mask = s > τ`` (strict, compared in float64);
* ``topk`` mode: the ``k`` highest scores are removed, ties going to the lower flat
  index ``h·W + w`` first;
* surgery: ``x_s = where(mask, fill, x)``; ``d x_s / d x = 1 − mask``, nothing flows
  to ``grad``.
"""

from __future__ import annotations

import torch

from ._contract import check_pixel_surgery_args, check_score_args, score_dtype, topk_count

__all__ = ["saliency_score", "pixel_surgery", "surgery_mask"]



def saliency_score(grad: torch.Tensor, reduce: str = "max") -> torch.Tensor:
    """(B, C, H, W) gradient -> (B, H, W) per-pixel saliency score."""
    check_score_args(grad, reduce)
    g = grad.detach().to(score_dtype(grad.dtype)).abs()
    if reduce == "max":
        s = g.amax(dim=1)
    else:
        # Channel order fixed (0, 1, ...) so that the kernels can match the rounding.
        s = g[:, 0].clone()
        for c in range(1, g.shape[1]):
            s = s + g[:, c]
    nonfinite = ~torch.isfinite(grad.detach()).all(dim=1)
    return s.masked_fill(nonfinite, float("inf"))


def surgery_mask(
    score: torch.Tensor, *, alpha: float = 1.0, mode: str = "mean", k: int = 0
) -> torch.Tensor:
    """(B, H, W) score -> (B, H, W) bool mask of the pixels to remove."""
    B = score.shape[0]
    flat = score.reshape(B, -1)
    if mode == "mean":
        finite = torch.isfinite(flat)
        total = torch.where(finite, flat.double(), 0.0).sum(dim=1)
        count = finite.sum(dim=1).clamp(min=1).double()
        tau = alpha * (total / count)
        mask = flat.double() > tau[:, None]
    else:
        order = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :k]
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask.scatter_(1, order, True)
    return mask.reshape(score.shape)


def pixel_surgery(
    x: torch.Tensor,
    grad: torch.Tensor,
    *,
    alpha: float = 1.0,
    mode: str = "mean",
    ratio: float = 0.2,
    fill: float = 0.0,
    reduce: str = "max",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove the salient pixels of ``x``: returns ``(x_surgered, mask)``, mask bool (B, 1, H, W)."""
    check_pixel_surgery_args(x, grad, alpha=alpha, mode=mode, ratio=ratio, fill=fill, reduce=reduce)
    k = topk_count(ratio, x.shape[-2], x.shape[-1])
    with torch.no_grad():
        mask = surgery_mask(saliency_score(grad, reduce), alpha=alpha, mode=mode, k=k)
        mask = mask.unsqueeze(1)
    x_s = torch.where(mask, torch.tensor(fill, dtype=x.dtype, device=x.device), x)
    return x_s, mask
