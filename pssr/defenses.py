"""Defenses as plug-ins, and the defended model an attacker sees.

A defense is a preprocessor `purify(x) -> x` on images in [0, 1], plus what an adaptive attack
needs: how to differentiate through it (`gradient`: a straight-through BPDA rule for
non-differentiable defenses) and whether it is random (then EOT averages over its randomness).
`DefendedModel` wraps classifier + defense as a plain `nn.Module`, so any attack library attacks
the defended model, with the backward rule chosen explicitly.

Baselines (DESIGN.md §6) are IBM ART's preprocessors: JPEG compression, feature squeezing
(bit depth, 1-bit included), spatial (median) smoothing and total-variation minimisation.
Randomized ablation (`ablation`, pssr/ablation.py) is no preprocessor: it classifies by a vote of
its own base classifier, so a defense may override `classify` (what is evaluated) and
`attack_logits` (what an attacker differentiates or queries) instead of `purify`.
"""

from __future__ import annotations

import importlib
from typing import Callable

import numpy as np
import torch
from torch import nn


class DefenseError(Exception):
    """An unknown defense or bad parameter (one line)."""


class Defense:
    """Base class: identity. Subclasses override `purify` and, when differentiable, `forward_for_attack`."""

    name = "none"
    randomized = False  # True: EOT over the defense's randomness is part of an adaptive attack
    differentiable = True  # False: attacks use the BPDA straight-through rule
    # The ways an attacker may differentiate the defense (`pssr eval` runs one threat model each);
    # "bpda" is the defense's default rule: its true gradient if differentiable, else straight-through.
    attack_gradients: tuple[str, ...] = ("bpda",)
    # Bumped when a fix changes what the defense computes, so that `pssr eval --state` files made
    # before the fix are refused instead of replayed (see evaluate.defining_options).
    revision = 1

    def __init__(self, **params):
        self.params = params

    def bind(self, classifier: nn.Module, spec) -> None:
        """Called with the evaluated classifier before use (PSSR needs it; the baselines do not)."""

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_for_attack(self, x: torch.Tensor, gradient: str = "bpda") -> torch.Tensor:
        """The defense as an attacker differentiates it: the true forward, BPDA backward if needed."""
        if gradient not in self.attack_gradients:
            raise DefenseError(f"defense {self.describe()} has no {gradient!r} gradient")
        if self.differentiable:
            return self.purify(x)
        return straight_through(x, self.purify)

    def classify(self, classifier: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The defended classifier's scores as evaluated (argmax: its prediction): classifier(purify(x)).
        A defense that is no preprocessor overrides it (randomized ablation: its vote)."""
        return classifier(self.purify(x))

    def attack_logits(self, classifier: nn.Module, x: torch.Tensor, gradient: str = "bpda") -> torch.Tensor:
        """The logits an attacker differentiates (or queries): classifier(forward_for_attack(x))."""
        return classifier(self.forward_for_attack(x, gradient))

    def describe(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.params.items())
        return self.name + (f":{args}" if args else "")


class _StraightThrough(torch.autograd.Function):
    """BPDA with the identity: forward y = g(x), backward dL/dx = dL/dy."""

    @staticmethod
    def forward(ctx, x, purified):
        return purified

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def straight_through(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        y = fn(x.detach())
    return _StraightThrough.apply(x, y)


class ArtPreprocessor(Defense):
    """An ART preprocessor run on numpy; non-differentiable (BPDA for attacks).

    ``channels_last``: the preprocessor only reads (N, H, W, C) arrays (ART's TotalVarMin has no
    ``channels_first`` switch), so the images are transposed there and back.
    """

    differentiable = False
    factory: Callable = None
    channels_last = False

    def __init__(self, **params):
        super().__init__(**params)
        self._art = type(self).factory(**params)

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        a = x.detach().cpu().numpy().astype(np.float32)
        if self.channels_last:
            a = np.ascontiguousarray(a.transpose(0, 2, 3, 1))
        y, _ = self._art(a)
        if self.channels_last:
            y = y.transpose(0, 3, 1, 2)
        return torch.as_tensor(np.ascontiguousarray(y), dtype=x.dtype).clamp_(0, 1).to(x.device)


def _art(name: str):
    from art.defences import preprocessor

    return getattr(preprocessor, name)


class Jpeg(ArtPreprocessor):
    name = "jpeg"
    factory = staticmethod(lambda quality=75: _art("JpegCompression")(clip_values=(0, 1), quality=int(quality), channels_first=True))

    def __init__(self, quality: int = 75):
        super().__init__(quality=quality)


class BitDepth(ArtPreprocessor):
    name = "bit-depth"
    factory = staticmethod(lambda bits=4: _art("FeatureSqueezing")(clip_values=(0, 1), bit_depth=int(bits)))

    def __init__(self, bits: int = 4):
        super().__init__(bits=bits)


class Median(ArtPreprocessor):
    name = "median"
    factory = staticmethod(lambda window=3: _art("SpatialSmoothing")(window_size=int(window), channels_first=True))

    def __init__(self, window: int = 3):
        super().__init__(window=window)


class TotalVariation(ArtPreprocessor):
    """ART's TotalVarMin: random pixel drop-out then TV minimisation, so it is a random defense."""

    name = "tvm"
    randomized = True
    channels_last = True
    # 2: until 2026-11-25 the images were passed channels first, so ART minimised the variation of
    # each (C, H) slice for every column instead of each channel's (H, W) plane.
    revision = 2
    factory = staticmethod(
        lambda prob=0.3, norm=2, lamb=0.5, max_iter=10: _art("TotalVarMin")(
            clip_values=(0, 1), prob=float(prob), norm=int(norm), lamb=float(lamb), max_iter=int(max_iter), verbose=False
        )
    )

    def __init__(self, prob: float = 0.3, norm: int = 2, lamb: float = 0.5, max_iter: int = 10):
        super().__init__(prob=prob, norm=norm, lamb=lamb, max_iter=max_iter)


DEFENSES: dict[str, type[Defense] | str] = {
    "none": Defense, "jpeg": Jpeg, "bit-depth": BitDepth, "median": Median, "tvm": TotalVariation,
    "pssr": "pssr.purifier:PssrDefense",  # imported when first used (it imports this module)
    "ablation": "pssr.ablation:AblationDefense",  # randomized ablation (Levine and Feizi): the L0 baseline
}


def register(name: str, cls: type[Defense]) -> None:
    """Plug a defense in (PSSR registers itself here)."""
    DEFENSES[name] = cls


def parse_defense(text: str) -> Defense:
    """'jpeg', 'jpeg:quality=50', 'bit-depth:bits=1' -> a Defense."""
    name, _, args = text.strip().partition(":")
    if name not in DEFENSES:
        raise DefenseError(f"unknown defense {name!r}; choose one of {', '.join(DEFENSES)}")
    params = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise DefenseError(f"defense {text!r}: expected key=value, got {item!r}")
        try:
            params[key] = float(value) if "." in value or "e" in value.lower() else int(value)
        except ValueError:
            params[key] = value
    cls = DEFENSES[name]
    if isinstance(cls, str):
        module, _, attr = cls.partition(":")
        cls = DEFENSES[name] = getattr(importlib.import_module(module), attr)
    try:
        return cls(**params)
    except TypeError as exc:
        raise DefenseError(f"defense {text!r}: {exc}") from None


class DefendedModel(nn.Module):
    """classifier(defense(x)) as one module, as an attacker sees it.

    The forward runs the real defense; its backward is the defense's own (a straight-through
    BPDA rule for non-differentiable ones). `eot`: for a random defense, average the logits over
    this many draws (expectation over transformation); 1 = a single draw. `gradient`: one of the
    defense's `attack_gradients` (PSSR has several).
    """

    def __init__(self, classifier: nn.Module, defense: Defense | None = None, eot: int = 1, gradient: str = "bpda"):
        super().__init__()
        self.classifier = classifier
        self.defense = defense or Defense()
        self.eot = max(1, int(eot))
        if gradient not in self.defense.attack_gradients:
            raise DefenseError(f"defense {self.defense.describe()} has no {gradient!r} gradient "
                               f"(it has: {', '.join(self.defense.attack_gradients)})")
        self.gradient = gradient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        draws = self.eot if self.defense.randomized else 1
        logits = [self.defense.attack_logits(self.classifier, x, self.gradient) for _ in range(draws)]
        return torch.stack(logits).mean(0) if draws > 1 else logits[0]
