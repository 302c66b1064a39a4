"""The classifier zoo and its checkpoints.

Every classifier takes images in [0, 1]: its normalisation is its first layer, so no caller
can normalise twice or forget to. Every classifier splits into ``features(x)`` (penultimate
activations, which the purifier's semantic loss compares) and ``head(features)``.
A classifier checkpoint stores the architecture spec in its metadata: loading needs nothing else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from . import checkpoint

KIND = "classifier"


class Normalize(nn.Module):
    """(x - mean) / std per channel, with the statistics stored as buffers (saved with the weights)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def conv_bn(cin: int, cout: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x):
        return x + self.body(x)


class Classifier(nn.Module):
    """normalize -> body -> global pooling/flatten -> features; head: linear layer(s) to logits."""

    def __init__(self, normalize: Normalize, body: nn.Module, head: nn.Module):
        super().__init__()
        self.normalize = normalize
        self.body = body
        self.classifier = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def lenet(in_channels: int, num_classes: int, image_size: int) -> tuple[nn.Module, nn.Module]:
    """A LeNet-style CNN (4 convs, BN): > 99% on MNIST in a few CPU minutes."""
    side = image_size // 4
    body = nn.Sequential(
        conv_bn(in_channels, 32), conv_bn(32, 32, pool=True),
        conv_bn(32, 64), conv_bn(64, 64, pool=True),
        nn.Flatten(), nn.Linear(64 * side * side, 256), nn.ReLU(inplace=True),
    )
    return body, nn.Linear(256, num_classes)


def resnet9(in_channels: int, num_classes: int, image_size: int, width: int = 32) -> tuple[nn.Module, nn.Module]:
    """The fast small ResNet of the DAWNBench CIFAR-10 entries (ResNet-9), at a CPU-friendly width."""
    w = width
    body = nn.Sequential(
        conv_bn(in_channels, w),
        conv_bn(w, 2 * w, pool=True), Residual(2 * w),
        conv_bn(2 * w, 4 * w, pool=True),
        conv_bn(4 * w, 8 * w, pool=True), Residual(8 * w),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(),
    )
    return body, nn.Linear(8 * w, num_classes)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
        )

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet18(in_channels: int, num_classes: int, image_size: int) -> tuple[nn.Module, nn.Module]:
    """ResNet-18 in its CIFAR form (3x3 stem, no max-pool): the field's reference model; slow on CPU."""
    layers = [nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return body, nn.Linear(512, num_classes)


ARCHITECTURES = {"lenet": lenet, "resnet9": resnet9, "resnet18": resnet18}


@dataclass
class ClassifierSpec:
    """All that is needed to rebuild a classifier; stored in its checkpoint."""

    arch: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dataset: str = ""
    classes: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)  # e.g. test accuracy, training command

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError("mean and std need one value per input channel")


def build(spec: ClassifierSpec) -> Classifier:
    body, head = ARCHITECTURES[spec.arch](spec.in_channels, spec.num_classes, spec.image_size)
    return Classifier(Normalize(spec.mean, spec.std), body, head)


def save(path, model: Classifier, spec: ClassifierSpec) -> None:
    """Weights + spec (+ the weights' sha256, which purifier checkpoints refer to)."""
    state = model.state_dict()
    info = {"kind": KIND, "spec": dataclasses.asdict(spec), "sha256": checkpoint.weights_sha256(state)}
    checkpoint.save(path, state, info)


def load(path, device: str | torch.device = "cpu") -> tuple[Classifier, ClassifierSpec]:
    """A frozen (eval-mode) classifier and its spec, from a checkpoint written by `save`."""
    tensors, info = checkpoint.load(path, kind=KIND)
    try:
        raw = dict(info["spec"])
        raw["mean"], raw["std"], raw["classes"] = tuple(raw["mean"]), tuple(raw["std"]), tuple(raw.get("classes", ()))
        spec = ClassifierSpec(**raw)
        model = build(spec)
        model.load_state_dict(tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise checkpoint.CheckpointError(f"{path}: does not hold a usable classifier ({str(exc).splitlines()[0]})") from None
    model.eval().requires_grad_(False)
    return model.to(device), spec
