"""The parts of the op contract shared by the reference and the extension path (checks, k, dtypes)."""

from __future__ import annotations

import math

import torch

MODES = ("mean", "topk")
REDUCTIONS = ("max", "sum")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_image_batch(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(t.shape)}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    if t.shape[1] < 1:
        raise ValueError(f"{name} must have at least one channel, got shape {tuple(t.shape)}")


def check_score_args(grad: torch.Tensor, reduce: str) -> None:
    _check_image_batch("grad", grad)
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")


def check_pixel_surgery_args(
    x: torch.Tensor, grad: torch.Tensor, *, alpha: float, mode: str, ratio: float, fill: float, reduce: str
) -> None:
    _check_image_batch("x", x)
    check_score_args(grad, reduce)
    if x.shape != grad.shape:
        raise ValueError(f"x and grad must have the same shape, got {tuple(x.shape)} and {tuple(grad.shape)}")
    if x.dtype != grad.dtype:
        raise TypeError(f"x and grad must have the same dtype, got {x.dtype} and {grad.dtype}")
    if x.device != grad.device:
        raise ValueError(f"x and grad must be on the same device, got {x.device} and {grad.device}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    if not (isinstance(ratio, (int, float)) and 0.0 <= ratio <= 1.0):
        raise ValueError(f"ratio must be a number in [0, 1], got {ratio!r}")
    if not (isinstance(fill, (int, float)) and math.isfinite(fill)):
        raise ValueError(f"fill must be a finite number, got {fill!r}")


def topk_count(ratio: float, height: int, width: int) -> int:
    """Number of pixels ``topk`` removes per image: ``ceil(round(ratio·H·W, 6))`` (DESIGN.md §9)."""
    return min(math.ceil(round(ratio * height * width, 6)), height * width)


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores of half-precision gradients are accumulated (and returned) in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
