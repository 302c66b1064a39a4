"""Loads the compiled `pssr._C` ops and registers their fake kernels and autograd formula.

Kept apart from the public API so that a missing extension degrades to the reference ops
with a single warning instead of an import error.
"""

from __future__ import annotations

import warnings

import torch

from ._contract import score_dtype

try:
    from pssr import _C  # noqa: F401  (loading the library registers torch.ops.pssr.*)

    LOAD_ERROR: Exception | None = None
except ImportError as exc:  # not built, or built against another torch
    LOAD_ERROR = exc

LOADED = LOAD_ERROR is None
_warned: set[str] = set()

# Which (op, device type) pairs have native kernels, read once from the dispatcher: a plain
# dict lookup at call time is also something torch.compile can trace.
_NATIVE = {
    (op, device_type): LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(f"pssr::{op}", key)
    for op in ("saliency_score", "pixel_surgery")
    for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))
}


def has_kernel(op: str, device: torch.device) -> bool:
    """Whether `pssr::<op>` runs natively on `device` (meta/fake tensors use the fake kernel)."""
    if device.type == "meta":
        return LOADED
    return _NATIVE.get((op, device.type), False)


def warn_fallback(device: torch.device) -> None:
    """One warning per device type when the reference ops stand in for the kernels."""
    if device.type in _warned:
        return
    _warned.add(device.type)
    why = f"the compiled extension could not be loaded ({LOAD_ERROR})" if not LOADED else (
        f"the extension has no {device.type} kernels"
    )
    warnings.warn(
        f"pssr: {why}; using the pure-PyTorch reference ops (same results, slower). "
        "Reinstall with `pip install --no-build-isolation .` to build the kernels.",
        RuntimeWarning,
        stacklevel=3,
    )


if LOADED:

    @torch.library.register_fake("pssr::saliency_score")
    def _saliency_score_fake(grad, reduce):
        torch._check(grad.dim() == 4, lambda: f"pssr: grad must be (B, C, H, W), got {grad.shape}")
        B, _, H, W = grad.shape
        return grad.new_empty((B, H, W), dtype=score_dtype(grad.dtype))

    @torch.library.register_fake("pssr::pixel_surgery")
    def _pixel_surgery_fake(x, grad, alpha, k, fill, mode, reduce):
        torch._check(x.dim() == 4, lambda: f"pssr: x must be (B, C, H, W), got {x.shape}")
        torch._check(x.shape == grad.shape, lambda: "pssr: x and grad must have the same shape")
        B, _, H, W = x.shape
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        return out, x.new_empty((B, 1, H, W), dtype=torch.bool)

    def _surgery_setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[1])

    def _surgery_backward(ctx, grad_out, _grad_mask):
        # d x_s / d x = 1 - mask (the mask held fixed); nothing flows to `grad` or the scalars.
        (mask,) = ctx.saved_tensors
        return grad_out.masked_fill(mask, 0), None, None, None, None, None, None

    torch.library.register_autograd(
        "pssr::pixel_surgery", _surgery_backward, setup_context=_surgery_setup_context
    )
