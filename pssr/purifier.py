"""The PSSR purifier: Pixel Surgery then Semantic Regeneration, its checkpoints and its defense.

A purifier belongs to one frozen classifier: the surgery uses that classifier's gradient, and G is
trained on the masks it makes. So a purifier checkpoint stores only G's weights, the surgery
settings and the sha256 of its classifier's weights, and refuses to run with any other classifier.
The classifier is given explicitly, or found by :func:`find_classifier` (the one lookup that
``pssr purify``, ``pssr eval`` and the Python API share): beside the purifier file, where its
training run's ``config.yaml`` points, then among the shipped weights, whichever holds weights of
the recorded sha256. Its stored weights are compared with the recorded sha256 before it is
built, and one naming its own architecture is built only with ``trust_arch`` (see
``pssr.classifiers``): a purifier file cannot make pssr run code.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from . import checkpoint, classifiers
from .defenses import Defense, DefenseError
from .errors import first_line
from .regeneration import Regenerator, RegeneratorSpec, compose
from .regeneration import build as build_regenerator
from .surgery import GRADIENTS, PixelSurgery, SurgeryConfig

KIND = "purifier"
SHIPPED = ("mnist", "cifar10")
MAX_WIDTH = 256  # G's width a checkpoint may ask for (the presets use 16 and 32)


@dataclass
class PurifierSpec:
    regenerator: RegeneratorSpec
    surgery: SurgeryConfig
    classifier_sha256: str
    classifier_file: str = ""  # the classifier checkpoint's file name at training time
    dataset: str = ""
    extra: dict = field(default_factory=dict)  # training summary (accuracies, command, seed)


@dataclass
class Purified:
    """What one purification produced, per image."""

    x_hat: torch.Tensor  # the purified images
    x_s: torch.Tensor  # after surgery
    mask: torch.Tensor  # (B, 1, H, W): bool, or float in [0, 1] for the soft gradient
    logits_before: torch.Tensor  # f(x), whose argmax chose the saliency label


class Purifier(nn.Module):
    """x -> x̂ = SR(PS(x)); ``gradient`` picks how an attacker differentiates the surgery."""

    def __init__(self, classifier: nn.Module, regenerator: Regenerator, surgery: SurgeryConfig):
        super().__init__()
        self.surgery = PixelSurgery(classifier, surgery)
        self.regenerator = regenerator

    @property
    def classifier(self) -> nn.Module:
        return self.surgery.classifier

    def purify(self, x: torch.Tensor, gradient: str = "mask-fixed") -> Purified:
        x_s, mask, logits = self.surgery(x, gradient)
        x_hat = compose(x_s, mask, self.regenerator(x_s, mask))
        return Purified(x_hat, x_s, mask, logits)

    def forward(self, x: torch.Tensor, gradient: str = "mask-fixed") -> torch.Tensor:
        return self.purify(x, gradient).x_hat


# --------------------------------------------------------------------------------------------
# Checkpoints


def save(path, regenerator: Regenerator, spec: PurifierSpec) -> None:
    info = {"kind": KIND, "spec": dataclasses.asdict(spec)}
    checkpoint.save(path, regenerator.state_dict(), info)


def save_inpainting(path, classifier_path, surgery: SurgeryConfig, sigma: float = 1.0, *,
                    trust_arch: bool = False) -> PurifierSpec:
    """A purifier whose regenerator is the normalized-convolution inpainting (``pssr.inpainting``),
    bound to the classifier at ``classifier_path``: nothing to train, the baseline for every G."""
    f, cspec = classifiers.load(classifier_path, trust_arch=trust_arch)
    spec = PurifierSpec(RegeneratorSpec(cspec.in_channels, kind="normconv", sigma=sigma), surgery,
                        checkpoint.weights_sha256(f.state_dict()), Path(classifier_path).name, cspec.dataset,
                        extra={"regenerator": f"normalized-convolution inpainting, sigma {sigma:g} (not learned)"})
    save(path, build_regenerator(spec.regenerator), spec)
    return spec


def _regenerator_spec(raw) -> RegeneratorSpec:
    """G's spec from metadata, type- and bound-checked: its width sizes what loading allocates."""
    raw = dict(checkpoint.mapping(raw, "regenerator"))
    raw["channels"] = checkpoint.integer(raw.get("channels"), "regenerator channels", 1, classifiers.MAX_CHANNELS)
    raw["width"] = checkpoint.integer(raw.get("width", 32), "regenerator width", 1, MAX_WIDTH)
    raw["dropout"] = checkpoint.number(raw.get("dropout", 0.1), "regenerator dropout")
    raw["input_bits"] = checkpoint.integer(raw.get("input_bits", 0), "regenerator input_bits", 0, 8)
    if "kind" in raw:
        checkpoint.text(raw["kind"], "regenerator kind")
    if "sigma" in raw:
        raw["sigma"] = checkpoint.number(raw["sigma"], "regenerator sigma")
    return RegeneratorSpec(**raw)


def _surgery_config(raw) -> SurgeryConfig:
    raw = dict(checkpoint.mapping(raw, "surgery"))
    for key in ("alpha", "ratio", "fill", "soft_temperature"):
        if key in raw:
            raw[key] = checkpoint.number(raw[key], f"surgery {key}")
    for key in ("mode", "reduce"):
        if key in raw:
            checkpoint.text(raw[key], f"surgery {key}")
    return SurgeryConfig(**raw)


def read_spec(info: dict, path) -> PurifierSpec:
    """The purifier spec of checkpoint metadata; every value checked (one-line ``CheckpointError``)."""
    try:
        raw = dict(checkpoint.mapping(info.get("spec"), "the spec"))
        raw["regenerator"] = _regenerator_spec(raw.get("regenerator"))
        raw["surgery"] = _surgery_config(raw.get("surgery"))
        checkpoint.text(raw.get("classifier_sha256"), "classifier_sha256")
        for key in ("classifier_file", "dataset"):
            checkpoint.text(raw.get(key, ""), key)
        checkpoint.mapping(raw.get("extra", {}), "extra")
        return PurifierSpec(**raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise checkpoint.CheckpointError(f"{path}: does not hold a usable purifier spec ({exc})") from None


def check_weights(tensors: dict[str, torch.Tensor], spec: PurifierSpec, path) -> None:
    """G's weights are finite and fit ``spec`` (compared with G built on the meta device, so a
    spec larger than its weights allocates nothing)."""
    checkpoint.check_finite(tensors, path)
    with torch.device("meta"):
        want = build_regenerator(spec.regenerator).state_dict()
    problems = classifiers.fit_problems(want, tensors)
    if problems:
        raise checkpoint.CheckpointError(f"{path}: the weights do not fit the regenerator ({'; '.join(problems)})")


class ForeignClassifier(checkpoint.CheckpointError):
    """The classifier given is not the one the purifier was trained with (by weights sha256)."""


def _check_digest(spec: PurifierSpec, sha: str, path, cpath) -> None:
    if sha != spec.classifier_sha256:
        raise ForeignClassifier(
            f"{path}: this purifier was trained for another classifier (sha256 {spec.classifier_sha256[:12]}…), "
            f"not {cpath} ({sha[:12]}…)"
        )


def shipped_path(name: str) -> Path:
    return Path(str(resources.files("pssr") / "weights" / f"{name}.safetensors"))


API_HINT = "pass it as classifier_path=PATH"  # what find_classifier's error says to do (the CLIs: --classifier PATH)


def find_classifier(path, spec: PurifierSpec | None = None, *, hint: str = API_HINT) -> Path:
    """The classifier checkpoint the purifier at ``path`` was trained with: the first of these whose
    stored weights have the sha256 the purifier records (read as data: nothing is built or imported).

    1. beside it, under the file name recorded at training (``classifier_file``);
    2. what its training run's ``config.yaml`` (beside it, as ``pssr train`` writes runs) names as
       ``classifier``: a shipped name, or a path, tried as given (relative to the current folder),
       then relative to each folder above the run (``pssr train`` resolved it from where it ran);
    3. the shipped classifier of that file name, of its data set, then any other shipped one.

    ``pssr purify --model PATH``, ``pssr eval --defense pssr:path=PATH`` (without ``--classifier``),
    :func:`load` and ``pssr.load_defended_model`` all use it. Without a match, a one-line
    ``CheckpointError`` names what it looked for, and ends with ``hint`` (the option to pass).
    """
    path = Path(path)
    if spec is None:
        _, info = checkpoint.load(path, kind=KIND)
        spec = read_spec(info, path)
    tried: list[Path] = []
    for candidate in _classifier_candidates(Path(os.path.abspath(path)), spec):
        if candidate in tried or not candidate.is_file():
            continue
        tried.append(candidate)
        try:
            tensors, _ = checkpoint.load(candidate, kind=classifiers.KIND)
        except checkpoint.CheckpointError:
            continue
        if checkpoint.weights_sha256(tensors) == spec.classifier_sha256:
            return candidate
    wanted = spec.classifier_file or "its classifier"
    others = f"; not {', '.join(map(str, tried[:3]))}" if tried else ""
    raise checkpoint.CheckpointError(f"{path}: cannot find the classifier it was trained with ({wanted}, weights "
                                     f"sha256 {spec.classifier_sha256[:12]}…){others}; {hint}")


def _classifier_candidates(path: Path, spec: PurifierSpec):
    """The places find_classifier looks, in its order (files may be missing or repeated)."""
    if spec.classifier_file:
        yield path.parent / spec.classifier_file
    named = _run_config_classifier(path.parent / "config.yaml")
    if named:
        shipped = shipped_path(f"classifier-{named}")
        if "/" not in named and shipped.is_file():
            yield shipped
        given = Path(named).expanduser()
        yield given
        if not given.is_absolute():
            for folder in (path.parent, *path.parent.parents):
                yield folder / given
    if spec.classifier_file:
        yield shipped_path(Path(spec.classifier_file).stem)
    if spec.dataset:
        yield shipped_path(f"classifier-{spec.dataset}")
    yield from sorted(shipped_path("classifier-x").parent.glob("classifier-*.safetensors"))


def _run_config_classifier(config: Path) -> str | None:
    """The ``classifier`` a training run's config.yaml names, if it is readable."""
    if not config.is_file():
        return None
    import yaml

    try:
        doc = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    named = doc.get("classifier") if isinstance(doc, dict) else None
    return named if isinstance(named, str) and named else None


def load(path, classifier_path=None, device="cpu", *,
         trust_arch: bool = False) -> tuple[Purifier, PurifierSpec, classifiers.ClassifierSpec]:
    """A purifier in eval mode with its frozen classifier; refuses a classifier it was not trained for.

    ``classifier_path`` defaults to the one :func:`find_classifier` finds. The classifier file's
    stored weights are compared with the sha256 the purifier records before that classifier is
    built, so a foreign classifier never runs; one naming its own architecture is imported only
    with ``trust_arch`` (``classifiers.load``).
    """
    path = Path(path)
    tensors, info = checkpoint.load(path, kind=KIND)
    spec = read_spec(info, path)
    check_weights(tensors, spec, path)
    cpath = Path(classifier_path) if classifier_path is not None else find_classifier(path, spec)
    ctensors, cspec = classifiers.read(cpath)
    _check_digest(spec, checkpoint.weights_sha256(ctensors), path, cpath)
    classifier = classifiers.from_weights(ctensors, cspec, cpath, device, trust_arch=trust_arch)
    return bind(classifier, cspec, tensors, spec, path, cpath, device)


def bind(classifier, cspec, tensors, spec: PurifierSpec, path, cpath, device="cpu"):
    """The purifier of ``spec`` and ``tensors`` on ``classifier`` (which must be the one it records)."""
    _check_digest(spec, checkpoint.weights_sha256(classifier.state_dict()), path, cpath)
    if spec.regenerator.channels != cspec.in_channels:
        raise checkpoint.CheckpointError(f"{path}: {spec.regenerator.channels}-channel purifier, "
                                         f"{cspec.in_channels}-channel classifier")
    check_weights(tensors, spec, path)
    try:
        regenerator = build_regenerator(spec.regenerator)
        regenerator.load_state_dict(tensors)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise checkpoint.CheckpointError(f"{path}: weights do not fit the regenerator ({first_line(exc)})") from None
    regenerator.eval().requires_grad_(False)
    return Purifier(classifier, regenerator.to(device), spec.surgery).eval(), spec, cspec


# --------------------------------------------------------------------------------------------
# The defense in the harness


class PssrDefense(Defense):
    """PSSR as a `pssr eval` defense: ``pssr`` (the shipped purifier of the classifier's data set)
    or ``pssr:path=purifier.safetensors``.

    Deterministic (G in eval mode), so no EOT. Attackers differentiate it in three ways
    (DESIGN.md §9): ``bpda`` (straight-through surgery, then G and f), ``mask-fixed`` (the op's
    own gradient) and ``soft`` (sigmoid mask through the saliency gradient).
    """

    name = "pssr"
    randomized = False
    differentiable = True
    attack_gradients = ("bpda",) + tuple(g for g in GRADIENTS if g != "bpda")

    def __init__(self, path: str | None = None):
        super().__init__(**({"path": path} if path else {}))
        self.path = path
        self.purifier: Purifier | None = None

    def bind(self, classifier: nn.Module, cspec: classifiers.ClassifierSpec) -> None:
        if self.path is None:
            name = f"purifier-{(cspec.dataset or '').lower()}"
            path = shipped_path(name)
            if not path.is_file():
                raise DefenseError(f"pssr: no shipped purifier for data set {cspec.dataset!r}; pass pssr:path=FILE")
        else:
            path = Path(self.path)
        try:
            tensors, info = checkpoint.load(path, kind=KIND)
            spec = read_spec(info, path)
            device = next(iter(classifier.parameters())).device
            self.purifier = bind(classifier, cspec, tensors, spec, path, "the evaluated classifier", device)[0]
        except ForeignClassifier as exc:
            raise DefenseError(f"pssr: {exc}{_trained_with(path, spec, self.path is not None)}") from None
        except checkpoint.CheckpointError as exc:
            raise DefenseError(f"pssr: {exc}") from None

    def _ready(self) -> Purifier:
        if self.purifier is None:
            raise DefenseError("pssr: the defense needs its classifier (call bind first)")
        return self.purifier

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._ready()(x, "mask-fixed").detach()

    def forward_for_attack(self, x: torch.Tensor, gradient: str = "bpda") -> torch.Tensor:
        return self._ready()(x, gradient)


def _trained_with(path: Path, spec: PurifierSpec, given: bool) -> str:
    """Where the purifier's own classifier is, as the end of an error about another one ("" if not
    found); ``given``: the purifier was named (``pssr:path=``), so `pssr eval` can find it alone."""
    try:
        found = find_classifier(path, spec)
    except checkpoint.CheckpointError:
        return ""
    alone = ", or leave --classifier out" if given else ""
    return f"; it was trained with {found} (pass --classifier {found}{alone})"
