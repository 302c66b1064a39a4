"""An attack as data: :class:`AttackSpec` (name, threat model, the exact keyword arguments), its
label, and the norms table (L∞, L2, L0, patch): how each is measured on x_adv − x, its symbol, its
tolerance when x_adv is checked against the budget, and whether it is sparse (whole pixels:
checked, never projected)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = ["AttackError", "AttackSpec", "CHANGED", "NORMS", "Norms", "SPARSE_NORMS", "budget_norm", "patch_side",
           "perturbation_norms"]


class AttackError(Exception):
    """An unknown attack or a bad parameter (one line)."""


# --------------------------------------------------------------------------------------------
# The spec


def _fmt_eps(eps: float) -> str:
    """0.3 -> '0.3', 2.0 -> '2.0', 8/255 -> '8/255'."""
    text = repr(float(eps))
    if len(text) <= 6:
        return text
    k = eps * 255
    if abs(k - round(k)) < 1e-6 and round(k) > 0:
        return f"{round(k)}/255"
    return f"{eps:.4g}"


class NormRule(NamedTuple):
    """How one threat model's norm is treated."""

    symbol: str  # in labels and reports
    tolerance: float  # slack for float32 rounding when x_adv is checked against its budget
    sparse: bool  # eps counts whole pixels (L0: changed pixels; patch: the side of the square); never projected


# Slack for float32 rounding when checking a norm-bounded x_adv against its budget (none for the
# sparse ones: they count pixels).
NORMS = {
    "Linf": NormRule("L∞", 1e-6, False),
    "L2": NormRule("L2", 1e-5, False),
    "L0": NormRule("L0", 0.0, True),
    "patch": NormRule("patch", 0.0, True),
}
_NORM_SYMBOL = {k: r.symbol for k, r in NORMS.items()}
SPARSE_NORMS = tuple(k for k, r in NORMS.items() if r.sparse)
_TOL = {k: r.tolerance for k, r in NORMS.items()}

# The original standard AutoAttack's settings (Croce & Hein 2020, github.com/fra31/auto-attack).
_AA_STANDARD = {"version": "standard", "steps": 100, "n_target_classes": 9, "n_queries": 5000}


@dataclass(frozen=True)
class AttackSpec:
    """One attack with its threat model and the exact torchattacks keyword arguments.

    ``eps`` is the threat-model budget; for minimal-norm attacks (``minimal_norm``: CW, DeepFool)
    it is the robustness radius that :func:`robust_mask` applies, not an attack parameter.
    ``params`` holds sorted ``(key, value)`` pairs: the keyword arguments actually used (for
    AutoAttack, ``steps``/``n_target_classes``/``n_queries`` are set on its sub-attacks). The
    number of classes (AutoAttack) and the seed are supplied by :func:`run_attack`.
    """

    name: str
    norm: str
    eps: float
    params: tuple
    minimal_norm: bool = False
    gradient_free: bool = False

    @property
    def kwargs(self) -> dict:
        return dict(self.params)

    def label(self) -> str:
        p = self.kwargs
        eps = _fmt_eps(self.eps)
        sym = _NORM_SYMBOL.get(self.norm, self.norm)
        if self.name == "fgsm":
            return f"FGSM {sym} ε={eps}"
        if self.name in ("pgd", "pgd100", "pgd-l2"):
            return f"PGD-{p['steps']} {sym} ε={eps}"
        if self.name == "mifgsm":
            return f"MI-FGSM-{p['steps']} {sym} ε={eps}"
        if self.name == "cw":
            return f"CW-L2 (ε={eps})"
        if self.name == "deepfool":
            return f"DeepFool-L2 (ε={eps})"
        if self.name == "square":
            return f"Square {sym} ε={eps} ({p['n_queries']} queries)"
        if self.name in ("sparse-rs", "sparse-rs-patch"):
            k = int(self.eps)
            budget = f"L0 k={k}" if self.norm == "L0" else f"patch {k}×{k}"
            restarts = f", {p['n_restarts']} restarts" if p.get("n_restarts", 1) > 1 else ""
            return f"Sparse-RS {budget} ({p['n_queries']} queries{restarts})"
        if self.name == "onepixel":
            return f"OnePixel L0 k={int(self.eps)} ({p['steps']} steps, population {p['popsize']})"
        if self.name == "pixle":
            odd = [f"{p['x_dimensions']}×{p['y_dimensions']} pixels a move"] if (p["x_dimensions"], p["y_dimensions"]) != (1, 1) else []
            odd += [f"{p['pixel_mapping']} mapping"] if p["pixel_mapping"] != "random" else []
            return f"Pixle-L0 (k={int(self.eps)}; {p['restarts']}×{p['max_iterations']} iterations{''.join(', ' + o for o in odd)})"
        if self.name == "jsma":
            return f"JSMA-L0 (k={int(self.eps)}; γ={p['gamma']:g}, θ={p['theta']:g})"
        if self.name == "sparsefool":
            return f"SparseFool-L0 (k={int(self.eps)}; {p['steps']} steps, λ={p['lam']:g})"
        if self.name == "adversarial-patch":
            k = int(self.eps)
            return f"AdversarialPatch universal patch {k}×{k} ({p['max_iter']} iterations, lr {p['learning_rate']:g})"
        if self.name == "autoattack":
            odd = [f"{k}={p[k]}" for k, v in _AA_STANDARD.items() if p.get(k) != v]
            version = "" if p.get("version") == "standard" else f" {p.get('version')}"
            return f"AutoAttack{version} {sym} ε={eps}" + (f" (non-standard: {', '.join(odd)})" if odd and not version else "")
        return f"{self.name} {sym} ε={eps}"

    def describe(self) -> str:
        """The spec as `parse_attack` reads it back (every parameter explicit)."""
        args = dict(self.params)
        if self.minimal_norm:
            args["eps"] = self.eps
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in sorted(args.items()))


# --------------------------------------------------------------------------------------------
# Measuring x_adv - x


class Norms(NamedTuple):
    """Per-example sizes of x_adv - x, float64: L∞, L2, and L0 (changed pixels)."""

    linf: torch.Tensor
    l2: torch.Tensor
    l0: torch.Tensor


# A pixel counts as changed (L0, patches) when one of its channels moved by more than this. Float32
# rounding of a value in [0, 1] (< 6e-8) is no change, so an image that went through another dtype
# keeps its unchanged pixels unchanged.
CHANGED = 1e-6


def _delta(x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    if x.shape != x_adv.shape:
        raise AttackError(f"x and x_adv differ in shape: {tuple(x.shape)} vs {tuple(x_adv.shape)}")
    return x_adv.detach().to(torch.float64) - x.detach().to(device=x_adv.device, dtype=torch.float64)


def _changed(delta: torch.Tensor) -> torch.Tensor:
    """Per pixel, whether any channel changed: (N, C, ...) -> (N, ...); (N, D): per entry."""
    moved = delta.abs() > CHANGED
    return moved.any(1) if moved.dim() > 2 else moved


def perturbation_norms(x: torch.Tensor, x_adv: torch.Tensor) -> Norms:
    """Per-example (L∞, L2, L0) norms of x_adv - x, in float64. L0 counts pixels with any channel
    changed (channels on dim 1 of (N, C, H, W)); a pixel counts once whatever its channels."""
    delta = _delta(x, x_adv)
    flat = delta.flatten(1)
    linf = flat.abs().amax(dim=1) if flat.shape[1] else flat.sum(1)
    return Norms(linf, flat.norm(dim=1), _changed(delta).flatten(1).sum(1).to(torch.float64))


def patch_side(x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    """Per example (float64), the side of the smallest square that holds every changed pixel of
    images (N, C, H, W) (0: none changed): a patch attack of side s must give at most s."""
    moved = _changed(_delta(x, x_adv))
    if moved.dim() != 3:
        raise AttackError(f"patches need images (N, C, H, W), got shape {tuple(x.shape)}")

    def extent(m: torch.Tensor) -> torch.Tensor:  # (N, L) bool -> last - first + 1, 0 if none
        idx = torch.arange(m.shape[1], device=m.device)
        first = torch.where(m, idx, m.shape[1]).amin(1)
        last = torch.where(m, idx, -1).amax(1)
        return (last - first + 1).clamp_min(0)

    return torch.maximum(extent(moved.any(2)), extent(moved.any(1))).to(torch.float64)


def budget_norm(spec: AttackSpec, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    """Per example, the size of x_adv - x in spec's threat model (the number its eps bounds)."""
    if spec.norm == "patch":
        return patch_side(x, x_adv)
    return getattr(perturbation_norms(x, x_adv), {"Linf": "linf", "L2": "l2", "L0": "l0"}[spec.norm])

