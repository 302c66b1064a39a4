"""PSSR from the tools people already run: torchattacks (a plain ``nn.Module``) and IBM ART.

Nothing here re-implements the defense: the defended model is ``pssr.defenses.DefendedModel`` around
``pssr.purifier.PssrDefense``, and the gradient rules are ``pssr.surgery``'s. So an attack run
through these adapters sees exactly what ``pssr eval`` attacks, with the same rule names:

``bpda``        straight-through surgery (∂x_s/∂x = I), then the real gradient of G and f (default);
``mask-fixed``  the surgery's own gradient, 1 − mask, then G and f;
``soft``        the hard threshold's gradient taken from a sigmoid, through the saliency gradient
                (``create_graph=True``): the full adaptive attack. ``soft-mask`` is accepted too.

Every rule keeps the real forward pass, so predictions never depend on the rule. Models take
images in [0, 1]: the classifier normalises inside, so give attack libraries no normalisation.

    model = pssr.load_defended_model("purifier.safetensors", "classifier.safetensors")
    x_adv = torchattacks.PGD(model, eps=0.3, alpha=0.01, steps=40)(x, y)
    art_clf = pssr.art_classifier(model)       # PyTorchClassifier with PSSR as its preprocessor
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import checkpoint, classifiers
from .defenses import DefendedModel
from .purifier import Purifier, PurifierSpec, PssrDefense, load
from .surgery import GRADIENTS

__all__ = ["GRADIENTS", "ArtPurifier", "PssrModel", "art_classifier", "defended_model", "load_defended_model"]

_ALIASES = {"soft-mask": "soft"}  # pssr eval's threat name for the soft rule


def _rule(gradient: str) -> str:
    """A gradient rule's canonical name; unknown names fail here, not deep inside an attack."""
    rule = _ALIASES.get(gradient, gradient)
    if rule not in GRADIENTS:
        raise ValueError(f"unknown gradient {gradient!r}; choose one of {', '.join(GRADIENTS)}")
    return rule


def _device(module: nn.Module) -> torch.device:
    return next(iter(module.parameters())).device


class PssrModel(DefendedModel):
    """classifier(purifier(x)) as a plain ``nn.Module``: logits for images in [0, 1].

    The ``DefendedModel`` that ``pssr eval`` attacks, with the purifier registered as a sub-module
    so that ``.eval()``, ``.to()`` and ``parameters()`` (which torchattacks reads for the device)
    reach G too. ``gradient`` is the rule attacks differentiate by; ``purifier_spec`` and
    ``classifier_spec`` are set when loaded from checkpoints (``None`` otherwise).
    """

    def __init__(self, purifier: Purifier, gradient: str = "bpda"):
        defense = PssrDefense()
        defense.purifier = purifier
        super().__init__(purifier.classifier, defense, gradient=_rule(gradient))
        self.purifier = purifier
        self.purifier_spec: PurifierSpec | None = None
        self.classifier_spec: classifiers.ClassifierSpec | None = None


def defended_model(classifier: nn.Module, purifier: Purifier, gradient: str = "bpda") -> PssrModel:
    """The classifier defended by ``purifier``, in eval mode, attacked through ``gradient``.

    ``purifier`` must purify for this classifier (its surgery uses the classifier's gradient): the
    same module, or one with identical weights, else ``ValueError``.
    """
    if not isinstance(purifier, Purifier):
        raise TypeError(f"purifier must be a pssr Purifier, got {type(purifier).__name__} "
                        "(for checkpoint files use load_defended_model)")
    if purifier.classifier is not classifier:
        sha = checkpoint.weights_sha256
        if sha(purifier.classifier.state_dict()) != sha(classifier.state_dict()):
            raise ValueError("this purifier was built for another classifier (different weights)")
        purifier = Purifier(classifier, purifier.regenerator, purifier.surgery.config)
    return PssrModel(purifier, gradient).eval()


def load_defended_model(purifier_path, classifier_path=None, *, gradient: str = "bpda", device="cpu",
                        trust_arch: bool = False) -> PssrModel:
    """The defended model from checkpoints, in eval mode with frozen weights.

    ``classifier_path`` defaults to the classifier the purifier was trained with, found as ``pssr
    purify`` finds it (``pssr.purifier.find_classifier``: beside it, through its training run's
    config.yaml, or shipped); a classifier the purifier was not trained for is refused
    (``pssr.checkpoint.CheckpointError``), before it is built. A classifier of your own
    architecture (``package.module:factory``) is imported and built only with
    ``trust_arch=True``: a checkpoint could name any code.
    """
    rule = _rule(gradient)
    purifier, spec, cspec = load(Path(purifier_path), classifier_path, device, trust_arch=trust_arch)
    model = PssrModel(purifier, rule).eval()
    model.purifier_spec, model.classifier_spec = spec, cspec
    return model


# --------------------------------------------------------------------------------------------
# IBM ART

def _art_purifier_class() -> type:
    """``ArtPurifier``, defined on first use: importing IBM ART takes seconds (scipy.stats and all of
    ART's attacks), so ``import pssr.adapters`` (and every ``pssr`` command) does not pay for it."""
    cls = globals().get("ArtPurifier")
    if cls is not None:
        return cls
    try:
        from art.defences.preprocessor.preprocessor import PreprocessorPyTorch
    except ImportError:  # pragma: no cover - ART is a dependency; keep the torch API usable without it
        raise ImportError("ArtPurifier needs IBM ART: pip install adversarial-robustness-toolbox") from None

    class ArtPurifier(PreprocessorPyTorch):
        """The purifier as an ART ``PreprocessorPyTorch``: ``forward(x, y) -> (purifier(x), y)``.

        ART chains PyTorch preprocessors on tensors and differentiates them with autograd, so the
        gradient an ART attack gets is the one of the selected rule (``bpda`` by default) — not ART's
        usual identity for preprocessors. The classifier of the ``PyTorchClassifier`` must be the
        purifier's own, with ``preprocessing=None`` (or the identity ``(0, 1)``): it normalises inside.
        Runs where the purifier's weights are. Applied at prediction time only, by default.
        """

        params = ["gradient"]

        def __init__(self, purifier: Purifier, gradient: str = "bpda", *, apply_fit: bool = False,
                     apply_predict: bool = True):
            device = _device(purifier)
            super().__init__(device_type="cpu" if device.type == "cpu" else "gpu", is_fitted=True,
                             apply_fit=apply_fit, apply_predict=apply_predict)
            self._device = device
            self.purifier = purifier.eval()
            self.gradient = _rule(gradient)

        def forward(self, x: torch.Tensor, y=None):
            return self.purifier(x, self.gradient), y

        def _check_params(self) -> None:
            self.gradient = _rule(self.gradient)

    ArtPurifier.__module__, ArtPurifier.__qualname__ = __name__, "ArtPurifier"  # pickles as pssr.adapters.ArtPurifier
    globals()["ArtPurifier"] = ArtPurifier
    return ArtPurifier


def __getattr__(name: str):
    if name == "ArtPurifier":  # `pssr.ArtPurifier`, `from pssr.adapters import ArtPurifier`
        return _art_purifier_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def art_classifier(model: PssrModel, *, input_shape=None, nb_classes: int | None = None, **kwargs):
    """An ART ``PyTorchClassifier`` of ``model``'s classifier with ``ArtPurifier`` in front.

    Same gradient rule as ``model``; cross-entropy loss; ``clip_values=(0, 1)``; no
    normalisation. ``input_shape`` and ``nb_classes`` default to the classifier checkpoint's;
    other keyword arguments go to ``PyTorchClassifier``.
    """
    from art.estimators.classification import PyTorchClassifier

    cspec = model.classifier_spec
    if input_shape is None and cspec is not None:
        input_shape = (cspec.in_channels, cspec.image_size, cspec.image_size)
    if nb_classes is None and cspec is not None:
        nb_classes = cspec.num_classes
    if input_shape is None or nb_classes is None:
        raise ValueError("pass input_shape and nb_classes (the model was not loaded from checkpoints)")
    device = _device(model)
    options = dict(loss=nn.CrossEntropyLoss(), clip_values=(0.0, 1.0), preprocessing=None,
                   device_type="cpu" if device.type == "cpu" else "gpu")
    options.update(kwargs)
    return PyTorchClassifier(model=model.classifier, input_shape=tuple(input_shape), nb_classes=int(nb_classes),
                             preprocessing_defences=[_art_purifier_class()(model.purifier, model.gradient)],
                             **options)
