"""Running an attack (:func:`run_attack`: seeded per batch, no side effects, output checked) and
judging it (:func:`robust_mask`)."""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Callable

import numpy as np
import torch
from torch import nn

from .registry import _REGISTRY, _canonical
from .spec import _TOL, SPARSE_NORMS, AttackError, AttackSpec, budget_norm

__all__ = ["robust_mask", "run_attack"]

log = logging.getLogger("pssr.attacks")  # the package's logger, as before the split


def _build(spec: AttackSpec, model: nn.Module, n_classes: int | None, seed: int):
    """The attack for one batch: the row's factory with the spec's keyword arguments."""
    entry = _REGISTRY[spec.name]
    extra = {"n_classes": n_classes} if entry.needs_classes else {}
    return entry.factory(model, seed=seed, **extra, **spec.kwargs)


@contextlib.contextmanager
def _numpy_fork():
    """numpy's global RNG as it was, afterwards. torchattacks' OnePixel (its differential evolution) and
    Pixle, and ART's patch placement draw from it and take no generator; run_attack seeds it per batch."""
    state = np.random.get_state()
    try:
        yield
    finally:
        np.random.set_state(state)


def _model_device_dtype(model: nn.Module, x: torch.Tensor) -> tuple[torch.device, torch.dtype]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return x.device, (x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32)


def _batch_seed(seed: int, start: int) -> int:
    """A well-mixed 63-bit seed per (seed, first index): batches are reproducible on their own."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(start)]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


def _finish(spec: AttackSpec, x: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """Finite, in [0, 1], and (norm-bounded attacks) inside the ε-ball."""
    bad = ~torch.isfinite(adv).flatten(1).all(1)
    if bad.any():
        log.warning("%s: %d example(s) came back non-finite; returned unperturbed", spec.label(), int(bad.sum()))
        adv = torch.where(bad.view(-1, *[1] * (adv.dim() - 1)), x, adv)
    adv = adv.clamp(0, 1)
    if spec.minimal_norm:
        return adv
    if spec.norm in SPARSE_NORMS:  # never projected: a sparse attack over its budget is a bug
        size = budget_norm(spec, x, adv)
        if len(size) and size.max() > spec.eps:
            what = "changed pixels" if spec.norm == "L0" else "a patch side of"
            raise AttackError(f"{spec.label()}: {int((size > spec.eps).sum())} example(s) came back over the budget "
                              f"({what} {size.max():g} > {spec.eps:g}); a bug in the attack")
        return adv
    delta = adv - x
    if spec.norm == "Linf":
        proj = delta.clamp(-spec.eps, spec.eps)
    else:
        n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        proj = delta * (spec.eps / n).clamp(max=1.0).view(-1, *[1] * (delta.dim() - 1))
    moved = (proj - delta).abs().max().item() if delta.numel() else 0.0
    if moved > 1e-6:
        log.warning("%s: the attack left the ε-ball by up to %.3g; projected back", spec.label(), moved)
    return (x + proj).clamp(0, 1)


def run_attack(
    spec: AttackSpec,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    seed: int = 0,
    batch_size: int = 256,
    progress: Callable[[int], object] | None = None,
) -> torch.Tensor:
    """x_adv for images `x` (N, C, H, W) in [0, 1] with labels `y`, attacking `model` (-> logits).

    Runs in batches of `batch_size` on the model's device; returns a tensor of x's dtype, shape and
    device, in [0, 1]. Batch i is seeded from ``(seed, its first index)``, so a result depends on
    (seed, batch_size) only and is reproducible on the CPU. The model runs in eval mode during
    the attack (as torchattacks does) and is left exactly as it was: every sub-module's train/eval
    flag, the parameters' requires_grad, grad mode and the global RNG states (torch's and numpy's:
    each batch seeds both). `progress`, if given,
    is called after each batch with the number of examples done so far (cumulative).
    """
    if not isinstance(spec, AttackSpec):
        raise AttackError(f"run_attack needs an AttackSpec, got {type(spec).__name__}")
    _canonical(spec.name)
    if not isinstance(model, nn.Module):
        raise AttackError(f"the model must be a torch.nn.Module, got {type(model).__name__}")
    if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() < 2:
        raise AttackError("x must be a float tensor of images (N, C, H, W) in [0, 1]")
    if not torch.is_tensor(y) or y.shape != x.shape[:1] or y.is_floating_point() or y.dtype == torch.bool:
        raise AttackError(f"y must be an integer tensor of {len(x)} labels, got {tuple(getattr(y, 'shape', ()))}")
    if int(batch_size) < 1:
        raise AttackError(f"batch_size must be ≥ 1, got {batch_size}")
    if x.numel() and (not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1):
        raise AttackError("x must be images in [0, 1] (the classifiers normalise internally)")
    batch_size = int(batch_size)
    n = len(x)
    if n == 0:
        return x.detach().clone()
    needs_classes = _REGISTRY[spec.name].needs_classes
    device, dtype = _model_device_dtype(model, x)
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    default_dtype = torch.get_default_dtype()
    forked = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    printed = io.StringIO()
    try:
        with torch.random.fork_rng(devices=forked), _numpy_fork(), torch.inference_mode(False), torch.enable_grad(), \
                contextlib.redirect_stdout(printed):
            out = torch.empty_like(x)  # made here, not an inference tensor under torch.inference_mode()
            model.eval()
            for p, _ in grads:
                p.requires_grad_(False)
            n_classes = None
            for start in range(0, n, batch_size):
                xb = x[start : start + batch_size].detach().to(device=device, dtype=dtype).clone()
                yb = y[start : start + batch_size].detach().to(device=device, dtype=torch.long).clone()
                if needs_classes and n_classes is None:
                    with torch.no_grad():
                        logits = model(xb[:1])
                    if logits.dim() != 2 or logits.shape[1] < 2:
                        raise AttackError(f"the model must return logits (N, classes ≥ 2), got {tuple(logits.shape)}")
                    n_classes = int(logits.shape[1])
                    if n_classes < 4:  # APGD-T's DLR loss reads the 4th-largest logit
                        raise AttackError(f"AutoAttack needs a model with ≥ 4 classes, this one has {n_classes}")
                bseed = _batch_seed(seed, start)
                torch.manual_seed(bseed)
                np.random.seed(bseed % 2**32)
                try:
                    atk = _build(spec, model, n_classes, bseed % (2**31))
                    atk.set_device(device)
                    adv = atk(xb, yb)
                except (TypeError, ValueError) as exc:
                    raise AttackError(f"{spec.label()}: torchattacks failed: {' '.join(str(exc).split())}") from exc
                if isinstance(adv, (tuple, list)):  # DeepFool returns (adv, target) in some versions
                    adv = adv[0]
                if adv.shape != xb.shape:
                    raise AttackError(f"{spec.label()}: torchattacks returned shape {tuple(adv.shape)} for {tuple(xb.shape)}")
                adv = _finish(spec, xb, adv.detach().to(dtype))
                out[start : start + len(xb)] = adv.to(device=x.device, dtype=x.dtype)
                if progress is not None:
                    progress(start + len(xb))
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in grads:
            p.requires_grad_(flag)
        if torch.get_default_dtype() != default_dtype:  # never seen; guard all the same
            log.warning("an attack changed the default dtype to %s; restored", torch.get_default_dtype())
            torch.set_default_dtype(default_dtype)
        if printed.getvalue().strip():
            log.debug("torchattacks printed: %s", " | ".join(printed.getvalue().split("\n")))
    return out


# --------------------------------------------------------------------------------------------
# Judging the result


def robust_mask(
    spec: AttackSpec, predict: Callable, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256
) -> torch.Tensor:
    """Which examples survived the attack (bool, on y's device).

    Robust: ``predict(x_adv).argmax(1) == y`` (predict: the model under evaluation, which may
    differ from the attacked one, e.g. for transfer), or, for a minimal-norm attack, the attack
    needed ``‖x_adv − x‖ > spec.eps`` in ``spec.norm``. A norm-bounded x_adv outside its ε-ball
    is an error (its example would be counted against a budget it broke). `predict` runs in
    batches under ``torch.no_grad()``: defenses that need gradients enable them themselves.
    """
    if len(y) != len(x):
        raise AttackError(f"{len(x)} images but {len(y)} labels")
    norm = budget_norm(spec, x, x_adv)
    if not spec.minimal_norm:
        worst = float(norm.max()) if len(norm) else 0.0
        if worst > spec.eps + _TOL.get(spec.norm, 1e-5):
            raise AttackError(f"{spec.label()}: x_adv exceeds the budget ({spec.norm} norm {worst:.6g} > ε={spec.eps:.6g})")
    preds = []
    with torch.no_grad():
        for start in range(0, len(x_adv), max(1, int(batch_size))):
            logits = predict(x_adv[start : start + batch_size])
            preds.append(logits.argmax(dim=1).to(y.device))
    pred = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=y.device)
    robust = pred == y
    if spec.minimal_norm:
        robust |= (norm > spec.eps).to(y.device)
    return robust
