"""The Python face of the pssr kernels, with the pure-PyTorch reference beside it.

`pixel_surgery` returns `(x_surgered, mask)`; `mask` is `torch.bool` with shape (B, 1, H, W)
(True = removed). `x_surgered` is contiguous and has x's dtype. Gradients flow to `x` as
`1 - mask`; none flow to `grad`. Without the compiled extension (or without kernels for the
tensor's device) the reference in `pssr.ops.reference` runs instead, after one warning.
"""

from __future__ import annotations

import torch

from . import reference
from ._extension import LOADED as EXTENSION_LOADED
from ._extension import has_kernel, warn_fallback
from ._contract import check_pixel_surgery_args, check_score_args, topk_count

__all__ = ["saliency_score", "pixel_surgery", "reference", "topk_count", "EXTENSION_LOADED"]


def saliency_score(grad: torch.Tensor, reduce: str = "max") -> torch.Tensor:
    """Per-pixel saliency (B, H, W) of a (B, C, H, W) gradient: max (or sum) over channels of |g|.

    A NaN or ±Inf in any channel makes the pixel's score +Inf. Half-precision gradients give
    float32 scores.
    """
    check_score_args(grad, reduce)
    if has_kernel("saliency_score", grad.device):
        return torch.ops.pssr.saliency_score(grad.detach(), reduce)
    warn_fallback(grad.device)
    return reference.saliency_score(grad, reduce)


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
    """Remove the pixels where `grad` is salient; returns `(x_surgered, mask)`.

    mode "mean": remove pixels whose score is > alpha * (the image's mean finite score).
    mode "topk": remove exactly ceil(ratio * H * W) pixels per image, the highest scores,
    ties to the lower flat index. Removed pixels are set to `fill` in every channel.
    """
    check_pixel_surgery_args(x, grad, alpha=alpha, mode=mode, ratio=ratio, fill=fill, reduce=reduce)
    if has_kernel("pixel_surgery", x.device):
        k = topk_count(ratio, x.shape[-2], x.shape[-1])
        return torch.ops.pssr.pixel_surgery(x, grad.detach(), float(alpha), k, float(fill), mode, reduce)
    warn_fallback(x.device)
    return reference.pixel_surgery(x, grad, alpha=alpha, mode=mode, ratio=ratio, fill=fill, reduce=reduce)
