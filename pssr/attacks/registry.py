"""The registry: one row per attack (its factory, threat model, the keyword arguments a command line
may set, and what it is: minimal-norm, gradient-free, expensive, trainable), the presets per data set
(DESIGN.md §5), and :func:`parse_attack`, which reads ``"pgd:eps=8/255,steps=10"``.

A row's factory builds the attack for one batch: ``factory(model, seed=..., **params)`` (plus
``n_classes=`` for a row with ``needs_classes``) returns a torchattacks-style ``Attack`` whose call
``atk(images, labels)`` returns the adversarial images. torchattacks rows without a quirk get
:func:`_library`; the fixed ones are in :mod:`.fixes`; Sparse-RS is :mod:`.sparse_rs`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

from torch import nn

from . import fixes
from .fixes import _torchattacks
from .spec import _AA_STANDARD, SPARSE_NORMS, AttackError, AttackSpec

__all__ = ["ATTACKS", "EXPENSIVE_ATTACKS", "SPARSE_RS_QUERIES", "SQUARE_QUERIES", "TRAINABLE_ATTACKS",
           "default_attacks", "library_sparse_attacks", "parse_attack", "preset", "sparse_attacks"]


# --------------------------------------------------------------------------------------------
# Factories: factory(model, seed=..., **params) -> an attack for one batch


def _library(cls: str) -> Callable:
    """A torchattacks attack as it is, with the row's keyword arguments. torchattacks draws from
    torch's global RNG, which run_attack seeds per batch (inside a fork), so `seed` is not passed."""

    def factory(model: nn.Module, *, seed: int, **params):
        return getattr(_torchattacks(), cls)(model, **params)

    factory.__qualname__ = factory.__name__ = f"torchattacks_{cls}"
    return factory


def _square(model: nn.Module, *, seed: int, **params):
    return _torchattacks().Square(model, seed=seed, verbose=False, **params)


def _autoattack(model: nn.Module, *, seed: int, n_classes: int, **p):
    ta = _torchattacks()
    atk = ta.AutoAttack(model, norm=p["norm"], eps=p["eps"], version=p["version"], n_classes=n_classes, seed=seed, verbose=False)
    # torchattacks builds the sub-attacks with 10 iterations and n_classes - 1 targets; the
    # original standard AutoAttack uses 100 iterations and 9 targets (see the package doc).
    targets = max(1, min(p["n_target_classes"], n_classes - 1))
    for sub in atk._autoattack.attacks:
        if isinstance(sub, (ta.APGD, ta.APGDT, ta.FAB)):
            sub.steps = p["steps"]
        if isinstance(sub, ta.APGDT) or (isinstance(sub, ta.FAB) and sub.multi_targeted):
            sub.n_target_classes = targets
        if isinstance(sub, ta.Square):
            sub.n_queries = p["n_queries"]
    return atk


def _sparse_rs(norm: str) -> Callable:
    def factory(model: nn.Module, *, seed: int, **params):
        from .sparse_rs import SparseRS  # imports torchattacks: on first use only

        return SparseRS(model, norm=norm, seed=seed, **params)

    factory.__qualname__ = factory.__name__ = f"sparse_rs_{norm}"
    return factory


def _onepixel(model: nn.Module, *, seed: int, eps: float, **params):
    """torchattacks' OnePixel changing exactly ``pixels`` = k pixels; its differential evolution
    draws from numpy's global RNG, which run_attack seeds per batch (and restores)."""
    return _torchattacks().OnePixel(model, pixels=int(eps), **params)


def _universal_patch(model: nn.Module, *, seed: int, **params):
    from .art_patch import UniversalPatch  # imports ART on the first patch only

    return UniversalPatch(model, seed=seed, **params)


# --------------------------------------------------------------------------------------------
# The rows: which factory, which keyword arguments, their types and presets


def _positive(v):
    return v > 0


def _nonneg(v):
    return v >= 0


_FLOAT, _INT, _BOOL, _STR = "float", "int", "bool", "str"
_PIXLE_MAPPINGS = ("random", "similarity", "similarity_random", "distance", "distance_random")

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
    "popsize": (_INT, _positive, "an integer ≥ 1"),
    "restarts": (_INT, _positive, "an integer ≥ 1"),
    "max_iterations": (_INT, _positive, "an integer ≥ 1"),
    "x_dimensions": (_INT, _positive, "an integer ≥ 1 (pixels)"),
    "y_dimensions": (_INT, _positive, "an integer ≥ 1 (pixels)"),
    "pixel_mapping": (_STR, lambda v: v in _PIXLE_MAPPINGS, ", ".join(_PIXLE_MAPPINGS)),
    "theta": (_FLOAT, lambda v: v != 0 and abs(v) <= 1, "a number in [-1, 0) or (0, 1]"),
    "gamma": (_FLOAT, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "lam": (_FLOAT, _positive, "a number > 0"),
    "max_iter": (_INT, _positive, "an integer ≥ 1"),
    "learning_rate": (_FLOAT, _positive, "a number > 0"),
}


@dataclass(frozen=True)
class _Entry:
    factory: Callable  # factory(model, seed=..., **params) -> attack; see the module doc
    norm: str
    keys: tuple  # the parameters parse_attack accepts (eps always)
    minimal_norm: bool = False
    gradient_free: bool = False
    alpha_rule: str = ""  # "ratio": alpha keeps its ratio to eps; "eps/steps": alpha = eps / steps
    expensive: bool = False  # pssr eval runs it on the first --limit-expensive images only
    trainable: bool = False  # a trainer may generate its training examples with it
    needs_classes: bool = False  # the factory takes n_classes= (run_attack reads it off the model's logits)


_PGD_KEYS = ("eps", "alpha", "steps", "random_start")
_SPARSE_RS_KEYS = ("eps", "n_queries", "n_restarts", "p_init", "loss")

_REGISTRY: dict[str, _Entry] = {
    "fgsm": _Entry(_library("FGSM"), "Linf", ("eps",)),
    "pgd": _Entry(_library("PGD"), "Linf", _PGD_KEYS, alpha_rule="ratio", trainable=True),
    "pgd100": _Entry(_library("PGD"), "Linf", _PGD_KEYS, alpha_rule="ratio", trainable=True),
    "pgd-l2": _Entry(_library("PGDL2"), "L2", _PGD_KEYS, alpha_rule="ratio", trainable=True),
    "cw": _Entry(fixes.cw, "L2", ("eps", "c", "kappa", "steps", "lr"), minimal_norm=True),
    "deepfool": _Entry(fixes.deepfool, "L2", ("eps", "steps", "overshoot"), minimal_norm=True),
    "mifgsm": _Entry(_library("MIFGSM"), "Linf", ("eps", "alpha", "steps", "decay"), alpha_rule="eps/steps"),
    "autoattack": _Entry(_autoattack, "Linf", ("eps", "norm", "version", "steps", "n_target_classes", "n_queries"),
                         expensive=True, needs_classes=True),
    "square": _Entry(
        _square, "Linf", ("eps", "norm", "n_queries", "p_init", "loss", "n_restarts", "resc_schedule"),
        gradient_free=True, expensive=True,
    ),
    # pssr.attacks.sparse_rs (not in torchattacks): eps = k changed pixels, or the side of the patch
    "sparse-rs": _Entry(_sparse_rs("L0"), "L0", _SPARSE_RS_KEYS, gradient_free=True, expensive=True),
    "sparse-rs-patch": _Entry(_sparse_rs("patch"), "patch", _SPARSE_RS_KEYS, gradient_free=True, expensive=True),
    # The libraries' sparse attacks (issue 17). OnePixel and the patch change at most k pixels / one
    # s×s square by their own parameters: checked like Sparse-RS. Pixle, JSMA and SparseFool stop
    # once the label flips and have no pixel budget of their own: minimal-norm, eps = k is the radius.
    "onepixel": _Entry(_onepixel, "L0", ("eps", "steps", "popsize"), gradient_free=True, expensive=True),
    "pixle": _Entry(_library("Pixle"), "L0", ("eps", "restarts", "max_iterations", "x_dimensions", "y_dimensions",
                                              "pixel_mapping"), minimal_norm=True, gradient_free=True, expensive=True),
    "jsma": _Entry(_library("JSMA"), "L0", ("eps", "theta", "gamma"), minimal_norm=True, expensive=True),
    "sparsefool": _Entry(_library("SparseFool"), "L0", ("eps", "steps", "lam", "overshoot"), minimal_norm=True,
                         expensive=True),
    "adversarial-patch": _Entry(_universal_patch, "patch", ("eps", "max_iter", "learning_rate"), expensive=True),
}

ATTACKS: tuple[str, ...] = tuple(_REGISTRY)
EXPENSIVE_ATTACKS = frozenset(k for k, e in _REGISTRY.items() if e.expensive)
TRAINABLE_ATTACKS = frozenset(k for k, e in _REGISTRY.items() if e.trainable)

_ALIASES = {
    "pgd-linf": "pgd", "pgd-100": "pgd100", "pgdl2": "pgd-l2", "pgd_l2": "pgd-l2", "cw-l2": "cw", "cwl2": "cw",
    "mi-fgsm": "mifgsm", "aa": "autoattack", "auto-attack": "autoattack",
    "sparse-rs-l0": "sparse-rs", "sparsers": "sparse-rs", "sparse-rs-patches": "sparse-rs-patch",
    "one-pixel": "onepixel", "sparse-fool": "sparsefool", "adversarial-patch-pytorch": "adversarial-patch",
    "art-patch": "adversarial-patch", "universal-patch": "adversarial-patch",
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

# The libraries' sparse attacks (issue 17), presets for both data sets: k = 10 (``:eps=24`` for 24).
# * onepixel: torchattacks' OnePixel, differential evolution over k pixels (position and colour),
#   at most k changed; 10 generations of ~100 candidates (popsize, rounded down to a multiple of the
#   3k (MNIST) or 5k (CIFAR) parameters, at least one of each), one batched forward a generation.
# * pixle: torchattacks' Pixle, 25 restarts × 10 iterations, each moving one pixel's value to a
#   random place (1×1: at most one new pixel a restart, so ≤ 25 changed, enough for k = 24); its
#   L0 grows until the label flips: minimal-norm, scored at the radius k.
# * jsma: torchattacks' JSMA, θ = 1 (features pushed to 1), γ the share of features (channel values)
#   it may change, 2 a step: MNIST 0.031 (26 features), CIFAR-10 0.024 (74 features = 24 pixels × 3
#   channels), so the k = 24 radius is within reach. Untargeted it is not: torchattacks aims at the
#   class (y + 1) mod 10 and stops only there. Minimal-norm.
# * sparsefool: torchattacks' SparseFool (its DeepFool has the [0, 1]-clamp stall that fixes.py
#   removes from the deepfool row), 10 steps, λ = 3: minimal-norm. Where the clamped step never
#   crosses the boundary its solver runs through every coordinate (CIFAR-10: median L0 1024).
# * adversarial-patch: ART's AdversarialPatchPyTorch as one universal patch per batch (art_patch.py),
#   5×5 (8×8 for CIFAR-10), 100 Adam steps of 0.1 on the batch; needs torchvision.
# Cost, the first 20 test images of the shipped standard classifiers undefended, one thread on 2
# cores shared with two training jobs (robust accuracy at k; CPU seconds; wall seconds varied up to
# 8x with the load): MNIST (clean 100%) onepixel 100% 21 s, onepixel:eps=24 95% 20 s, pixle 100%
# 14 s (10% fooled with more than 10 pixels), jsma 100% 8 s (35% fooled, median 26 pixels),
# sparsefool 85% 30 s (median 25 pixels), adversarial-patch 95% 9 s. CIFAR-10 (clean 90%) onepixel
# 35% 46 s, onepixel:eps=24 20% 45 s, pixle 40% 25 s (median 6 pixels), jsma 100% 155 s (45% fooled,
# median 59 pixels), sparsefool 85% 54 s, adversarial-patch 65% 15 s, adversarial-patch:eps=8 40%
# 15 s (the patch under torch 2.14.1 with torchvision 0.29.1, which this CPU torch lacks). All scale
# with the images (x10 for pssr eval's 200 expensive ones); an image that resists spends the whole
# budget (OnePixel, Pixle and JSMA attack one image at a time), and a defended model costs its
# forward (and, for JSMA, SparseFool and the patch, its backward) each query. Sparse-RS is far
# stronger at the same k (sparse_attacks' doc).


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
    if name == "onepixel":
        return 10.0, {"eps": 10.0, "steps": 10, "popsize": 100}
    if name == "pixle":
        return 10.0, {"restarts": 25, "max_iterations": 10, "x_dimensions": 1, "y_dimensions": 1, "pixel_mapping": "random"}
    if name == "jsma":
        return 10.0, {"theta": 1.0, "gamma": 0.031 if mnist else 0.024}
    if name == "sparsefool":
        return 10.0, {"steps": 10, "lam": 3.0, "overshoot": 0.02}
    if name == "adversarial-patch":
        return 5.0, {"eps": 5.0, "max_iter": 100, "learning_rate": 0.1}
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


def library_sparse_attacks(dataset: str) -> list[str]:
    """Issue 17's presets of the libraries' sparse attacks for `dataset`: OnePixel, Pixle, JSMA and
    SparseFool at k = 10 and 24 changed pixels, and ART's universal patch at 5x5 and (CIFAR) 8x8.
    Their costs are in the comment after ``SPARSE_RS_QUERIES``."""
    out = [f"{name}{suffix}" for name in ("onepixel", "pixle", "jsma", "sparsefool") for suffix in ("", ":eps=24")]
    return out + ["adversarial-patch"] + ([] if _dataset_key(dataset) == "mnist" else ["adversarial-patch:eps=8"])


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
