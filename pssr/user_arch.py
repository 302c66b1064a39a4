"""Your own classifier architecture inside pssr: imported by name, wrapped to pssr's contract.

A classifier checkpoint whose ``arch`` is ``package.module:factory`` is rebuilt by importing
``package.module`` and calling ``factory(**arch_kwargs)``, which must return an ``nn.Module``
mapping normalised images (B, C, H, W) to logits (B, num_classes). Importing runs that module's
code and the factory is any callable (``os:system`` too), so ``pssr.classifiers`` does this only
when the caller opts in for that load (``trust_arch=True``, ``--trust-arch``); nothing here
checks trust. Nothing is imported for the zoo's names (no ':').

The purifier's semantic loss compares penultimate features, so pssr needs ``features(x)`` and
``head(features)`` with ``head(features(x)) == forward(x)``. :class:`ModuleClassifier` takes the
first of these that reproduces the module's logits on a probe batch (checked once, when built):

``module``       the module's own ``features`` and ``head`` (define them to choose the split);
``last-linear``  the input of its last ``nn.Linear`` (a forward pre-hook), and that layer as head;
``logits``       neither fits (e.g. a softmax after the last layer): features are the logits and
                 the head is the identity, so the feature distance compares logits.
"""

from __future__ import annotations

import importlib
import re

import torch
from torch import nn

from .errors import first_line

_NAME = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
SPLITS = ("module", "last-linear", "logits")


class ArchitectureError(ValueError):
    """A user architecture that cannot be imported, built or fitted with its weights (one line)."""


def is_user_arch(arch: str) -> bool:
    """True for ``package.module:factory`` (the zoo's names have no ':')."""
    return isinstance(arch, str) and bool(_NAME.fullmatch(arch))  # fullmatch: "$" would let "a:b\n" through


def resolve(arch: str):
    """The callable named by ``package.module:factory`` (imports the module)."""
    if not is_user_arch(arch):
        raise ArchitectureError(f"architecture {arch!r}: expected 'package.module:factory'")
    module_name, _, attr = arch.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        missing = getattr(exc, "name", None)
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise ArchitectureError(f"architecture {arch!r}: no module named {module_name} here; put its folder "
                                    "on PYTHONPATH (e.g. PYTHONPATH=examples)") from None
        raise ArchitectureError(f"architecture {arch!r}: importing {module_name} failed ({first_line(exc)})") from None
    except Exception as exc:  # the user's module failed while running its top level
        raise ArchitectureError(f"architecture {arch!r}: importing {module_name} failed ({first_line(exc)})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ArchitectureError(f"architecture {arch!r}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ArchitectureError(f"architecture {arch!r}: {attr} is not callable")
    return obj


def make_module(arch: str, kwargs: dict) -> nn.Module:
    """``factory(**kwargs)``, checked to be an ``nn.Module``."""
    factory = resolve(arch)
    try:
        module = factory(**kwargs)
    except Exception as exc:
        raise ArchitectureError(f"architecture {arch!r}: calling it with {kwargs} failed ({first_line(exc)})") from None
    if not isinstance(module, nn.Module):
        raise ArchitectureError(f"architecture {arch!r}: returned a {type(module).__name__}, not an nn.Module")
    return module


def _last_linear(module: nn.Module) -> str | None:
    names = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


class ModuleClassifier(nn.Module):
    """normalize -> your module; ``features``/``head`` by the first split that reproduces its logits.

    State-dict keys: ``normalize.mean``, ``normalize.std`` and ``module.<your keys>``.
    """

    def __init__(self, normalize: nn.Module, module: nn.Module, image_shape: tuple[int, int, int]):
        super().__init__()
        self.normalize = normalize
        self.module = module
        self._linear = _last_linear(module)  # a name, not the layer: a second reference would change the state dict
        self.split = self._choose_split(image_shape)

    def _features(self, x: torch.Tensor, split: str) -> torch.Tensor:
        if split == "module":
            return self.module.features(x)
        if split == "logits":
            return self.module(x)
        captured = []
        hook = self.module.get_submodule(self._linear).register_forward_pre_hook(lambda m, a: captured.append(a[0]))
        try:
            self.module(x)
        finally:
            hook.remove()
        return captured[-1]

    def _head(self, f: torch.Tensor, split: str) -> torch.Tensor:
        if split == "module":
            return self.module.head(f)
        if split == "logits":
            return f
        return self.module.get_submodule(self._linear)(f)

    def _choose_split(self, image_shape) -> str:
        """The first split whose head(features(x)) equals the module's logits on a random batch."""
        was = self.training
        self.eval()
        x = self.normalize(torch.rand((2, *image_shape), generator=torch.Generator().manual_seed(0)))
        try:
            with torch.no_grad():
                try:
                    logits = self.module(x)
                except Exception as exc:
                    shape = tuple(x.shape)
                    raise ArchitectureError(f"the module fails on a {shape} batch ({first_line(exc)})") from None
                if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                    raise ArchitectureError("the module must return logits of shape (batch, classes)")
                candidates = []
                if callable(getattr(self.module, "features", None)) and callable(getattr(self.module, "head", None)):
                    candidates.append("module")
                if self._linear is not None:
                    candidates.append("last-linear")
                for split in candidates:
                    try:
                        out = self._head(self._features(x, split), split)
                    except Exception:
                        continue
                    if out.shape == logits.shape and torch.allclose(out, logits, rtol=1e-4, atol=1e-5):
                        return split
                return "logits"
        finally:
            self.train(was)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._features(self.normalize(x), self.split)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self._head(features, self.split)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(self.normalize(x))
