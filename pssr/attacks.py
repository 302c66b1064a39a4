"""The attacks `pssr eval` runs: torchattacks attacks behind one small, checked interface.

An attack is an :class:`AttackSpec`: a registry name, the threat model (norm, ε) and the exact
torchattacks keyword arguments, frozen and hashable. :func:`preset` gives the field's settings
for a data set (DESIGN.md §5), :func:`parse_attack` reads ``"pgd:eps=8/255,steps=10"`` from a
command line, :func:`run_attack` runs one on a model that takes images in [0, 1] (every pssr
model does: normalisation is its first layer, so no normalisation is passed to torchattacks),
and :func:`robust_mask` decides which examples survived.

The attacks are torchattacks' own (none is re-implemented here). What this module adds around
them, because the library does not do it (torchattacks 3.5.1):

* Determinism and no side effects: APGD, APGD-T, FAB and Square reseed the *global* torch RNG,
  and every attack switches the whole model to eval mode; here each batch is seeded from
  ``(seed, first index)`` inside :func:`torch.random.fork_rng`, so the caller's RNG state, the
  train/eval flag of every sub-module, the parameters' ``requires_grad`` and the grad mode are
  all as they were afterwards. The parameters are frozen during the attack (CW and DeepFool call
  ``backward()``, which would otherwise fill the model's ``.grad``).
* Output checks: x_adv is float, in [0, 1], finite (an example whose attack produced NaN/Inf,
  as DeepFool can on a flat logit, is returned unperturbed), and for norm-bounded attacks inside
  the ε-ball (projected, with a logged warning, if an attack ever overshoots).
* torchattacks' ``print`` calls go to the debug log instead of stdout.
* CW-L2: torchattacks maps pixels at exactly 0 or 1 to w = ±inf in tanh space, where they can
  never move (80% of an MNIST image); the subclass here uses the original's 1 - 1e-6 margin.
* DeepFool: torchattacks clamps every iterate to [0, 1] and stalls short of the boundary when
  the step points out of the box (MNIST's black background); here the clamp is moved into the
  model and the perturbation accumulates unclamped, as in Foolbox (see :class:`_BoxInModel`).
* AutoAttack: torchattacks' ``AutoAttack(version="standard")`` builds APGD-CE, APGD-T and FAB-T
  with 10 iterations and ``n_classes - 1`` target classes, where the original standard
  AutoAttack (Croce & Hein 2020) uses 100 iterations and 9 target classes. The preset sets the
  original values on the sub-attacks (``steps=100, n_target_classes=9, n_queries=5000``); the
  label says "non-standard" when they are overridden.

Sparse-RS (``sparse-rs``: at most k changed pixels, the L0 threat model; ``sparse-rs-patch``: one
s×s patch) is not in torchattacks; it is written from its paper in :mod:`pssr.sparse_rs`, in the
shape of torchattacks' Square. Its ``eps`` is k (pixels) or s (the patch side). Its output is never
projected: one over its budget is a bug, and :func:`run_attack` raises.

Minimal-norm attacks (CW-L2, DeepFool) are not bounded: they look for the smallest perturbation
that flips the label. Their x_adv is returned as found (never clipped to ε), and an example counts
as robust if the attack fails or needs ‖δ‖₂ > ε, the preset's robustness radius (DESIGN.md §9).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import nn

__all__ = [
    "ATTACKS",
    "EXPENSIVE_ATTACKS",
    "AttackError",
    "AttackSpec",
    "Norms",
    "budget_norm",
    "default_attacks",
    "parse_attack",
    "patch_side",
    "perturbation_norms",
    "preset",
    "robust_mask",
    "run_attack",
    "sparse_attacks",
]

log = logging.getLogger(__name__)


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


_NORM_SYMBOL = {"Linf": "L∞", "L2": "L2", "L0": "L0", "patch": "patch"}
SPARSE_NORMS = ("L0", "patch")  # eps: whole pixels (L0: changed pixels; patch: the side of the square)

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
# The registry: which torchattacks class, which keyword arguments, their types and presets


def _positive(v):
    return v > 0


def _nonneg(v):
    return v >= 0


_FLOAT, _INT, _BOOL, _STR = "float", "int", "bool", "str"

# key -> (type, check, what the check demands)
_PARAM_TYPES = {
    "eps": (_FLOAT, _positive, "a finite number > 0 (use eps=1 for an unbounded L∞ attack)"),
    "alpha": (_FLOAT, _positive, "a number > 0"),
    "steps": (_INT, _positive, "an integer ≥ 1"),
    "random_start": (_BOOL, None, "true or false"),
    "c": (_FLOAT, _positive, "a number > 0"),
    "kappa": (_FLOAT, _nonneg, "a number ≥ 0"),
    "lr": (_FLOAT, _positive, "a number > 0"),
    "overshoot": (_FLOAT, _nonneg, "a number ≥ 0"),
    "decay": (_FLOAT, _nonneg, "a number ≥ 0"),
    "n_queries": (_INT, _positive, "an integer ≥ 1"),
    "n_restarts": (_INT, _positive, "an integer ≥ 1"),
    "p_init": (_FLOAT, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "loss": (_STR, lambda v: v in ("margin", "ce"), "margin or ce"),
    "resc_schedule": (_BOOL, None, "true or false"),
    "norm": (_STR, lambda v: v in ("Linf", "L2"), "Linf or L2"),
    "version": (_STR, lambda v: v in ("standard", "plus", "rand"), "standard, plus or rand"),
    "n_target_classes": (_INT, _positive, "an integer ≥ 1"),
}


@dataclass(frozen=True)
class _Entry:
    cls: str  # torchattacks class name
    norm: str
    keys: tuple  # the parameters parse_attack accepts (eps always)
    minimal_norm: bool = False
    gradient_free: bool = False
    alpha_rule: str = ""  # "ratio": alpha keeps its ratio to eps; "eps/steps": alpha = eps / steps
    expensive: bool = False  # pssr eval runs it on the first --limit-expensive images only
    trainable: bool = False  # a trainer may generate its training examples with it


_REGISTRY: dict[str, _Entry] = {
    "fgsm": _Entry("FGSM", "Linf", ("eps",)),
    "pgd": _Entry("PGD", "Linf", ("eps", "alpha", "steps", "random_start"), alpha_rule="ratio", trainable=True),
    "pgd100": _Entry("PGD", "Linf", ("eps", "alpha", "steps", "random_start"), alpha_rule="ratio", trainable=True),
    "pgd-l2": _Entry("PGDL2", "L2", ("eps", "alpha", "steps", "random_start"), alpha_rule="ratio", trainable=True),
    "cw": _Entry("CW", "L2", ("eps", "c", "kappa", "steps", "lr"), minimal_norm=True),
    "deepfool": _Entry("DeepFool", "L2", ("eps", "steps", "overshoot"), minimal_norm=True),
    "mifgsm": _Entry("MIFGSM", "Linf", ("eps", "alpha", "steps", "decay"), alpha_rule="eps/steps"),
    "autoattack": _Entry("AutoAttack", "Linf", ("eps", "norm", "version", "steps", "n_target_classes", "n_queries"),
                         expensive=True),
    "square": _Entry(
        "Square", "Linf", ("eps", "norm", "n_queries", "p_init", "loss", "n_restarts", "resc_schedule"),
        gradient_free=True, expensive=True,
    ),
    # pssr.sparse_rs (not in torchattacks): eps = k changed pixels, or the side of the patch
    "sparse-rs": _Entry("SparseRS", "L0", ("eps", "n_queries", "n_restarts", "p_init", "loss"), gradient_free=True,
                        expensive=True),
    "sparse-rs-patch": _Entry("SparseRS", "patch", ("eps", "n_queries", "n_restarts", "p_init", "loss"),
                              gradient_free=True, expensive=True),
}

ATTACKS: tuple[str, ...] = tuple(_REGISTRY)
EXPENSIVE_ATTACKS = frozenset(k for k, e in _REGISTRY.items() if e.expensive)
TRAINABLE_ATTACKS = frozenset(k for k, e in _REGISTRY.items() if e.trainable)

_ALIASES = {
    "pgd-linf": "pgd", "pgd-100": "pgd100", "pgdl2": "pgd-l2", "pgd_l2": "pgd-l2", "cw-l2": "cw", "cwl2": "cw",
    "mi-fgsm": "mifgsm", "aa": "autoattack", "auto-attack": "autoattack",
    "sparse-rs-l0": "sparse-rs", "sparsers": "sparse-rs", "sparse-rs-patches": "sparse-rs-patch",
}  # fmt: skip

# Square's query budget: 300 ("a few hundred"). Each query is one forward pass over the images
# still unbroken, so the worst case (a robust model) for 200 images on 2 busy CPU cores is 300
# forwards of 200 images: ~1 minute for the MNIST LeNet, ~5 minutes for the CIFAR ResNet-9
# (~1 s per forward), and several times that for a purifier-defended model (its forward adds
# the saliency gradient and the regeneration). On an undefended MNIST CNN 300 queries reach 0%
# at ε = 0.3 (200: 5%). AutoAttack runs its own Square with 5000 queries on what its gradient
# attacks leave. Raise it with square:n_queries=5000.
SQUARE_QUERIES = 300

# Sparse-RS (the L0 / patch threat models of issue 17): k = 10 changed pixels (sparse-rs:eps=24 for
# the paper's CIFAR-10 k), 5x5 patches (sparse-rs-patch:eps=8 for CIFAR-10's 8x8), 1,000 queries
# per restart (the paper: 10,000), p_init as in the paper (L0 0.3, patches 0.4). Each query is one
# forward pass over the images still unbroken; sparse_attacks() lists the presets and their costs.
SPARSE_RS_QUERIES = 1000


def _dataset_key(dataset: str) -> str:
    return "mnist" if str(dataset).lower() == "mnist" else "cifar"


def _preset_params(name: str, dataset: str) -> tuple[float, dict]:
    """(eps, torchattacks kwargs) for one attack on one data set (DESIGN.md §5)."""
    mnist = _dataset_key(dataset) == "mnist"
    eps = 0.3 if mnist else 8 / 255  # L∞ budgets: MNIST 0.3, CIFAR 8/255
    if name == "fgsm":
        return eps, {"eps": eps}
    if name == "pgd":  # MNIST: PGD-40, step 0.01 (Madry et al.); CIFAR: PGD-20, step 2/255
        return eps, {"eps": eps, "alpha": 0.01 if mnist else 2 / 255, "steps": 40 if mnist else 20, "random_start": True}
    if name == "pgd100":
        return eps, {"eps": eps, "alpha": 0.01 if mnist else 2 / 255, "steps": 100, "random_start": True}
    if name == "pgd-l2":  # L2 budgets: MNIST 2.0, CIFAR 0.5; step 2.5·ε/steps (Madry et al.)
        e, steps = (2.0, 40) if mnist else (0.5, 20)
        return e, {"eps": e, "alpha": 2.5 * e / steps, "steps": steps, "random_start": True}
    if name == "cw":
        # torchattacks' CW-L2: one constant c (no binary search), Adam in tanh space, keeps the
        # smallest successful perturbation per image. c=1 with 100 steps of lr 0.01 is the common
        # setting for CIFAR. On MNIST a pixel must travel far in tanh space (from the black
        # background), so lr 0.1: on a small MNIST CNN that breaks 78% within ε=2 (as many as
        # PGD-L2 at ε=2), lr 0.01 only 33%; c in 2..10 gives larger, less minimal perturbations.
        # Robustness radius ε (L2): MNIST 2.0, CIFAR 0.5 -- the field's L2 budgets for these sets.
        if mnist:
            return 2.0, {"c": 1.0, "kappa": 0.0, "steps": 100, "lr": 0.1}
        return 0.5, {"c": 1.0, "kappa": 0.0, "steps": 100, "lr": 0.01}
    if name == "deepfool":  # robustness radius as for CW
        return (2.0 if mnist else 0.5), {"steps": 50, "overshoot": 0.02}
    if name == "mifgsm":  # Dong et al.: 10 iterations of ε/10, decay 1.0
        return eps, {"eps": eps, "alpha": eps / 10, "steps": 10, "decay": 1.0}
    if name == "autoattack":
        return eps, {"eps": eps, "norm": "Linf", **_AA_STANDARD}
    if name == "square":
        return eps, {"eps": eps, "norm": "Linf", "n_queries": SQUARE_QUERIES, "p_init": 0.8, "loss": "margin",
                     "n_restarts": 1, "resc_schedule": True}  # fmt: skip
    if name in ("sparse-rs", "sparse-rs-patch"):
        k, p_init = (10.0, 0.3) if name == "sparse-rs" else (5.0, 0.4)
        return k, {"eps": k, "n_queries": SPARSE_RS_QUERIES, "n_restarts": 1, "p_init": p_init, "loss": "margin"}
    raise AttackError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")


def _canonical(name: str) -> str:
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise AttackError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    return key


def _make_spec(name: str, eps: float, params: dict) -> AttackSpec:
    entry = _REGISTRY[name]
    norm = params.get("norm", entry.norm)
    if norm in SPARSE_NORMS and float(eps) != int(eps):
        what = "changed pixels" if norm == "L0" else "the side of the patch, in pixels"
        raise AttackError(f"attack {name}: eps={eps:g} is not a whole number ({what})")
    return AttackSpec(
        name=name, norm=norm, eps=float(eps), params=tuple(sorted(params.items())),
        minimal_norm=entry.minimal_norm, gradient_free=entry.gradient_free,
    )  # fmt: skip


def preset(name: str, dataset: str) -> AttackSpec:
    """The field's setting of attack `name` for `dataset` ("mnist"; anything else: CIFAR's)."""
    key = _canonical(name)
    eps, params = _preset_params(key, dataset)
    return _make_spec(key, eps, params)


def default_attacks(dataset: str) -> list[str]:
    """The attacks DESIGN.md §5 lists for `dataset`, cheapest first (mifgsm and square are extra)."""
    if _dataset_key(dataset) == "mnist":
        return ["fgsm", "pgd", "cw", "deepfool", "autoattack"]
    return ["fgsm", "pgd", "pgd100", "pgd-l2", "cw", "deepfool", "autoattack"]


_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def sparse_attacks(dataset: str) -> list[str]:
    """Issue 17's sparse presets for `dataset`: Sparse-RS at k = 10 and 24 changed pixels, 5x5
    patches, and (CIFAR) 8x8 patches, 1,000 queries each.

    Cost, one thread on 2 busy CPU cores, the first 100 test images, the shipped standard
    classifiers undefended (robust accuracy, seconds): MNIST k=10 37% 53 s, k=24 1% 19 s, 5x5 27%
    38 s; CIFAR-10 k=10 5% 76 s, k=24 0% 15 s, 5x5 2% 69 s, 8x8 1% 33 s. An image that resists
    spends all 1,000 queries (each a forward pass), so a robust or defended model costs up to
    1,000 forward passes of the images: for 200 images ~13 minutes with the CIFAR-10 ResNet-9
    alone (0.76 s a forward), ~3 minutes with the MNIST LeNet (0.2 s), several times that through
    PSSR (docs/evaluation.md)."""
    out = ["sparse-rs", "sparse-rs:eps=24", "sparse-rs-patch"]
    return out + ([] if _dataset_key(dataset) == "mnist" else ["sparse-rs-patch:eps=8"])


def _parse_number(text: str) -> float:
    """'0.1', '1e-2', '8/255' -> float; ValueError otherwise."""
    text = text.strip()
    if "/" in text:
        num, _, den = text.partition("/")
        if not (_NUMBER.match(num.strip()) and _NUMBER.match(den.strip())):
            raise ValueError(text)
        den_v = float(den)
        if den_v == 0:
            raise ValueError(text)
        return float(Fraction(num.strip()) / Fraction(den.strip()))
    if not _NUMBER.match(text):
        raise ValueError(text)
    return float(text)


def _parse_value(attack: str, key: str, text: str):
    kind, check, demand = _PARAM_TYPES[key]
    raw = text.strip()
    try:
        if kind == _FLOAT:
            value = _parse_number(raw)
            if not math.isfinite(value):
                raise ValueError(raw)
        elif kind == _INT:
            value = _parse_number(raw)
            if value != int(value):
                raise ValueError(raw)
            value = int(value)
        elif kind == _BOOL:
            low = raw.lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            value = low in ("true", "1", "yes")
        else:
            value = raw
            if key == "norm":
                value = {"linf": "Linf", "inf": "Linf", "l_inf": "Linf", "l2": "L2"}.get(raw.lower(), raw)
            elif key in ("loss", "version"):
                value = raw.lower()
    except (ValueError, ZeroDivisionError, OverflowError):
        raise AttackError(f"attack {attack}: {key}={text!r} is not {demand}") from None
    if check is not None and not check(value):
        raise AttackError(f"attack {attack}: {key}={text!r} is not {demand}")
    return value


def parse_attack(text: str, dataset: str) -> AttackSpec:
    """'pgd' or 'pgd:eps=0.1,steps=10,alpha=0.01' -> the preset for `dataset` with overrides.

    Values: numbers (``8/255`` and ``1e-3`` accepted), integers, ``true``/``false``, and the
    names of ``norm`` (Linf, L2), ``loss`` and ``version``. For cw and deepfool ``eps`` is the
    robustness radius. When ``eps`` is overridden and ``alpha`` is not, alpha keeps the preset's
    ratio to eps (pgd, pgd100, pgd-l2), and with fewer ``steps`` than the preset it grows so that
    alpha·steps stays the preset's; MI-FGSM's alpha is eps/steps unless given.
    """
    if not isinstance(text, str) or not text.strip():
        raise AttackError("empty attack; choose one of " + ", ".join(ATTACKS))
    name, _, args = text.strip().partition(":")
    key = _canonical(name)
    entry = _REGISTRY[key]
    eps0, params = _preset_params(key, dataset)
    given: dict = {}
    for item in (a.strip() for a in args.split(",")):
        if not item:
            continue
        k, sep, v = item.partition("=")
        k = k.strip()
        if not sep or not k:
            raise AttackError(f"attack {text.strip()!r}: expected key=value, got {item!r}")
        if k == "norm" and k not in entry.keys:
            hint = "; use pgd-l2 for L2" if key.startswith("pgd") else ""
            raise AttackError(f"attack {key}: its norm is {entry.norm} only{hint}")
        if k not in entry.keys:
            raise AttackError(f"attack {key}: unknown parameter {k!r}; it takes {', '.join(entry.keys)}")
        if k in given:
            raise AttackError(f"attack {key}: {k} given twice")
        given[k] = _parse_value(key, k, v)
    eps = given.get("eps", eps0)
    if "alpha" in params and "alpha" not in given:
        if entry.alpha_rule == "ratio":
            params["alpha"] = params["alpha"] * eps / eps0
            # fewer steps than the preset: longer steps, so that alpha * steps still covers the
            # preset's distance (PGD-10 with PGD-40's step could not travel the whole ε-ball)
            params["alpha"] *= max(1.0, params["steps"] / given.get("steps", params["steps"]))
        elif entry.alpha_rule == "eps/steps":
            params["alpha"] = eps / given.get("steps", params["steps"])
    params.update(given)
    if entry.minimal_norm:
        params.pop("eps", None)
    else:
        params["eps"] = eps
    return _make_spec(key, eps, params)


# --------------------------------------------------------------------------------------------
# Running an attack


def _torchattacks():
    try:
        import torchattacks
    except ImportError as exc:  # pragma: no cover - a broken install
        raise AttackError(f"torchattacks does not import ({exc}); pip install --no-deps torchattacks==3.5.1") from None
    return torchattacks


_CW_CLASS = None


def _cw_class():
    """torchattacks' CW with the original's tanh-space margin (Carlini & Wagner clamp at 1 - 1e-6).

    torchattacks maps a pixel at exactly 0 or 1 to w = atanh(-1 or 1) = -inf or +inf, where the
    gradient of tanh is 0: those pixels can never move. On MNIST that freezes ~80% of the pixels
    (the black background): on a small MNIST CNN 47% instead of 78% broken within ε = 2 (c=1,
    lr 0.1, 100 steps). Carlini & Wagner's own code maps ``(2x - 1) * 0.999999`` through atanh;
    the same margin here, nothing else changed.
    """
    global _CW_CLASS
    if _CW_CLASS is None:
        ta = _torchattacks()

        class CW(ta.CW):
            def inverse_tanh_space(self, x):
                return self.atanh(torch.clamp(x * 2 - 1, min=-1 + 1e-6, max=1 - 1e-6))

        _CW_CLASS = CW
    return _CW_CLASS


# DeepFool's coordinate change: u = 1/2 + (x - 1/2) / K. K is a power of two and u is float64, so
# x -> u -> x is exact for float32 images (an exact 0 stays 0, where the clamp still passes the
# gradient), and torchattacks' own clamp of u to [0, 1] allows x in [-511.5, 512.5]: in effect none.
_DEEPFOOL_SCALE = 1024.0


class _BoxInModel(nn.Module):
    """model(clamp(x(u), 0, 1)): torchattacks' DeepFool, with its [0, 1] box moved into the model.

    torchattacks clamps each DeepFool iterate to [0, 1] and linearises again at the clamped point:
    on MNIST the step into the black background (pixels at 0) is clamped away every time, the
    iterates converge short of the decision boundary, and DeepFool breaks only ~20-30% of an
    undefended MNIST classifier. Attacking this wrapper in u coordinates, the perturbation is
    accumulated unclamped while the classifier always sees the clamped image (Foolbox's DeepFool
    does the same); x_adv = clamp(x(u_adv), 0, 1) is what was classified.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.model((0.5 + _DEEPFOOL_SCALE * (u - 0.5)).clamp(0, 1).to(self.dtype))


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _build(spec: AttackSpec, model: nn.Module, n_classes: int | None, seed: int, dtype: torch.dtype):
    """(torchattacks attack, map from images to its input, map from its output to images)."""
    ta = _torchattacks()
    p = spec.kwargs
    name = spec.name
    if name == "autoattack":
        atk = ta.AutoAttack(model, norm=p["norm"], eps=p["eps"], version=p["version"], n_classes=n_classes, seed=seed, verbose=False)
        # torchattacks builds the sub-attacks with 10 iterations and n_classes - 1 targets; the
        # original standard AutoAttack uses 100 iterations and 9 targets (see the module doc).
        targets = max(1, min(p["n_target_classes"], n_classes - 1))
        for sub in atk._autoattack.attacks:
            if isinstance(sub, (ta.APGD, ta.APGDT, ta.FAB)):
                sub.steps = p["steps"]
            if isinstance(sub, ta.APGDT) or (isinstance(sub, ta.FAB) and sub.multi_targeted):
                sub.n_target_classes = targets
            if isinstance(sub, ta.Square):
                sub.n_queries = p["n_queries"]
        return atk, _identity, _identity
    if name == "square":
        return ta.Square(model, seed=seed, verbose=False, **p), _identity, _identity
    if name in ("sparse-rs", "sparse-rs-patch"):
        from pssr.sparse_rs import SparseRS

        return SparseRS(model, norm=spec.norm, seed=seed, **p), _identity, _identity
    if name == "cw":
        return _cw_class()(model, **p), _identity, _identity
    if name == "deepfool":
        wrapper = _BoxInModel(model, dtype).eval()  # eval: torchattacks restores the wrapper's flag

        def encode(x):
            return 0.5 + (x.to(torch.float64) - 0.5) / _DEEPFOOL_SCALE

        def decode(u):
            return (0.5 + _DEEPFOOL_SCALE * (u.to(torch.float64) - 0.5)).clamp(0, 1).to(dtype)

        return ta.DeepFool(wrapper, **p), encode, decode
    return getattr(ta, _REGISTRY[name].cls)(model, **p), _identity, _identity


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
    flag, the parameters' requires_grad, grad mode and the global RNG state. `progress`, if given,
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
    needs_classes = spec.name == "autoattack"
    device, dtype = _model_device_dtype(model, x)
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    default_dtype = torch.get_default_dtype()
    forked = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    printed = io.StringIO()
    try:
        with torch.random.fork_rng(devices=forked), torch.inference_mode(False), torch.enable_grad(), contextlib.redirect_stdout(printed):
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
                try:
                    atk, encode, decode = _build(spec, model, n_classes, bseed % (2**31), dtype)
                    atk.set_device(device)
                    adv = atk(encode(xb), yb)
                except (TypeError, ValueError) as exc:
                    raise AttackError(f"{spec.label()}: torchattacks failed: {' '.join(str(exc).split())}") from exc
                if isinstance(adv, (tuple, list)):  # DeepFool returns (adv, target) in some versions
                    adv = adv[0]
                adv = decode(adv.detach())
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


# Slack for float32 rounding when checking a norm-bounded x_adv against its budget (none for the
# sparse ones: they count pixels).
_TOL = {"Linf": 1e-6, "L2": 1e-5, "L0": 0.0, "patch": 0.0}


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
