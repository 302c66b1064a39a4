"""The classifier zoo, your own architectures, and their checkpoints.

Every classifier takes images in [0, 1]: its normalisation is its first layer, so no caller
can normalise twice or forget to. Every classifier splits into ``features(x)`` (penultimate
activations, which the purifier's semantic loss compares) and ``head(features)``.
A classifier checkpoint stores the architecture spec in its metadata: loading needs nothing else.

An architecture is a zoo name (``lenet``, ``resnet9``, ``resnet18``) or your own, named
``package.module:factory`` (see :func:`export` and ``pssr.user_arch``). A checkpoint is data:
loading one that names its own architecture would import that module and run that factory, so
it is refused unless the caller opts in for that load (``trust_arch=True``; the CLI's
``--trust-arch``), as with Hugging Face's ``trust_remote_code``. The zoo needs no opt-in. Its
metadata is checked (types, bounds) and its weights fitted to the architecture on the meta
device before anything is allocated at the size the metadata asks for.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field

import torch
from torch import nn

from . import checkpoint
from .errors import first_line
from .user_arch import ArchitectureError, ModuleClassifier, is_user_arch, make_module

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

# What a checkpoint's metadata may ask for (checked at load, before anything is built): a crafted
# resnet9 of width 512 took 2 GB before any other check. Beyond them, the architecture is first
# built on the meta device and its shapes compared with the stored weights, so nothing larger than
# the file itself is allocated.
MAX_CLASSES = 100_000
MAX_CHANNELS = 16
MAX_IMAGE_SIZE = 2048
MAX_IMAGE_VALUES = 3 * 2048 * 2048  # channels × size², so a probe batch stays small
ZOO_KWARGS = {"lenet": {}, "resnet9": {"width": (1, 256)}, "resnet18": {}}  # name: (min, max)
ZOO_MIN_IMAGE_SIZE = {"lenet": 4, "resnet9": 8, "resnet18": 1}  # below: pooled to nothing


class UntrustedArchitecture(checkpoint.CheckpointError):
    """A checkpoint naming code to import and run, loaded without ``trust_arch`` (one line)."""


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
    arch_kwargs: dict = field(default_factory=dict)  # keyword arguments of the architecture's factory
    # randomized ablation's base classifier (pssr/ablation.py): {"keep": K, "encoding": "complement-pair"};
    # it takes in_channels-channel images or their 2·in_channels-channel encoding. {}: an ordinary classifier.
    ablation: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.arch not in ARCHITECTURES and not is_user_arch(self.arch):
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}, "
                             "or name your own as 'package.module:factory'")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError("mean and std need one value per input channel")
        if not isinstance(self.arch_kwargs, dict):
            raise ValueError("arch_kwargs must be a mapping of keyword arguments")
        if self.ablation:
            from .ablation import check_record

            check_record(self.ablation, self.arch, self.image_size)


def build(spec: ClassifierSpec) -> Classifier | ModuleClassifier:
    """A fresh classifier of ``spec`` (a user architecture's module is imported here)."""
    if spec.ablation:
        from .ablation import build_classifier

        return build_classifier(spec)
    normalize = Normalize(spec.mean, spec.std)
    if is_user_arch(spec.arch):
        module = make_module(spec.arch, spec.arch_kwargs)
        return ModuleClassifier(normalize, module, (spec.in_channels, spec.image_size, spec.image_size))
    body, head = ARCHITECTURES[spec.arch](spec.in_channels, spec.num_classes, spec.image_size, **spec.arch_kwargs)
    return Classifier(normalize, body, head)


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], arch: str) -> None:
    """``model.load_state_dict`` with one line naming what does not fit (torch's spans many)."""
    problems = fit_problems(model.state_dict(), tensors)
    if problems:
        raise ArchitectureError(f"the weights do not fit architecture {arch!r}: {'; '.join(problems)}")
    model.load_state_dict(tensors)


def fit_problems(want: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> list[str]:
    """What keeps ``tensors`` from loading into a state dict like ``want`` (shapes only: ``want``
    may live on the meta device), as short phrases."""
    missing = sorted(set(want) - set(tensors))
    unexpected = sorted(set(tensors) - set(want))
    shapes = [k for k in sorted(set(want) & set(tensors)) if tuple(want[k].shape) != tuple(tensors[k].shape)]

    def some(keys):
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    problems = []
    if missing:
        problems.append(f"missing {some(missing)}")
    if unexpected:
        problems.append(f"unexpected {some(unexpected)}")
    if shapes:
        k = shapes[0]
        problems.append(f"{k} is {tuple(tensors[k].shape)} in the weights, {tuple(want[k].shape)} in the architecture"
                        + (f" (+{len(shapes) - 1} more)" if len(shapes) > 1 else ""))
    return problems


def save(path, model: Classifier, spec: ClassifierSpec) -> None:
    """Weights + spec (+ the weights' sha256, which purifier checkpoints refer to)."""
    state = model.state_dict()
    doc = dataclasses.asdict(spec)
    if not doc["arch_kwargs"]:
        del doc["arch_kwargs"]  # the zoo's checkpoints keep the format older pssr versions read
    if not doc["ablation"]:
        del doc["ablation"]  # likewise; an ablation classifier is refused by a pssr that cannot build it
    info = {"kind": KIND, "spec": doc, "sha256": checkpoint.weights_sha256(state)}
    checkpoint.save(path, state, info)


def spec_from_metadata(raw) -> ClassifierSpec:
    """The spec a checkpoint's metadata holds, every value type- and bound-checked (ValueError):
    metadata is whatever the file's writer put there, and it sizes what loading allocates."""
    raw = checkpoint.mapping(raw, "the spec")
    fields = {f.name for f in dataclasses.fields(ClassifierSpec)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(f"unknown spec keys {checkpoint.shown(unknown)}")
    for key in ("arch", "num_classes", "in_channels", "image_size", "mean", "std"):
        if key not in raw:
            raise ValueError(f"the spec has no {key!r}")
    arch = checkpoint.text(raw["arch"], "arch")
    num_classes = checkpoint.integer(raw["num_classes"], "num_classes", 1, MAX_CLASSES)
    channels = checkpoint.integer(raw["in_channels"], "in_channels", 1, MAX_CHANNELS)
    size = checkpoint.integer(raw["image_size"], "image_size", ZOO_MIN_IMAGE_SIZE.get(arch, 1), MAX_IMAGE_SIZE)
    if channels * size * size > MAX_IMAGE_VALUES:
        raise ValueError(f"{channels}x{size}x{size} images exceed the bound of {MAX_IMAGE_VALUES} values")
    stats = {}
    for key in ("mean", "std"):
        values = raw[key]
        if not isinstance(values, list) or len(values) != channels:
            raise ValueError(f"{key} must be a list of {channels} numbers (one per channel), not {checkpoint.shown(values)}")
        stats[key] = tuple(checkpoint.number(v, key) for v in values)
    if not all(s > 0 for s in stats["std"]):
        raise ValueError(f"std must be positive, not {checkpoint.shown(list(stats['std']))}")
    classes = raw.get("classes", [])
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"classes must be a list of names, not {checkpoint.shown(classes)}")
    if classes and len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names for {num_classes} classes")
    kwargs = checkpoint.mapping(raw.get("arch_kwargs", {}), "arch_kwargs")
    if arch in ZOO_KWARGS:
        allowed = ZOO_KWARGS[arch]
        for key, value in kwargs.items():
            if key not in allowed:
                raise ValueError(f"{arch} takes arch_kwargs {', '.join(allowed) or 'none'}, not {checkpoint.shown(key)}")
            checkpoint.integer(value, f"{arch} {key}", *allowed[key])
    return ClassifierSpec(arch, num_classes, channels, size, stats["mean"], stats["std"],
                          checkpoint.text(raw.get("dataset", ""), "dataset"), tuple(classes),
                          dict(checkpoint.mapping(raw.get("extra", {}), "extra")), dict(kwargs),
                          dict(checkpoint.mapping(raw.get("ablation", {}), "ablation")))


def read(path) -> tuple[dict[str, torch.Tensor], ClassifierSpec]:
    """The weights and spec of a classifier checkpoint, checked as data (bounds, finite weights):
    nothing is built or imported, so a purifier can compare digests first."""
    tensors, info = checkpoint.load(path, kind=KIND)
    try:
        spec = spec_from_metadata(info.get("spec"))
    except (TypeError, ValueError) as exc:
        raise checkpoint.CheckpointError(f"{path}: does not hold a usable classifier spec ({exc})") from None
    checkpoint.check_finite(tensors, path)
    return tensors, spec


def untrusted_message(path, spec: ClassifierSpec) -> str:
    """One line: what the file names, that it was not run, and how to opt in."""
    module = spec.arch.partition(":")[0]
    return (f"{path}: names the architecture {spec.arch!r} with arch_kwargs {checkpoint.shown(spec.arch_kwargs, 100)}: "
            f"loading it would import {module} and run that code, so it is refused. If you trust this file, "
            "pass --trust-arch (Python: trust_arch=True)")


def from_weights(tensors: dict[str, torch.Tensor], spec: ClassifierSpec, path, device: str | torch.device = "cpu", *,
                 trust_arch: bool = False) -> Classifier | ModuleClassifier:
    """The frozen classifier of ``spec`` with ``tensors`` loaded (see :func:`read`).

    A user architecture is imported and called only with ``trust_arch``; a zoo one is first built
    on the meta device to check the weights' shapes, so the spec cannot make it allocate more
    than the file holds.
    """
    if is_user_arch(spec.arch) and not trust_arch:
        raise UntrustedArchitecture(untrusted_message(path, spec))
    try:
        if not is_user_arch(spec.arch):
            with torch.device("meta"):
                problems = fit_problems(build(spec).state_dict(), tensors)
            if problems:
                raise ArchitectureError(f"the weights do not fit architecture {spec.arch!r}: {'; '.join(problems)}")
        model = build(spec)
        load_weights(model, tensors, spec.arch)
    except ArchitectureError as exc:
        raise checkpoint.CheckpointError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise checkpoint.CheckpointError(f"{path}: does not hold a usable classifier ({first_line(exc)})") from None
    model.eval().requires_grad_(False)
    return model.to(device)


def load(path, device: str | torch.device = "cpu", *,
         trust_arch: bool = False) -> tuple[Classifier | ModuleClassifier, ClassifierSpec]:
    """A frozen (eval-mode) classifier and its spec, from a checkpoint written by `save` or `export`.

    A checkpoint naming its own architecture (``package.module:factory``) is refused
    (``UntrustedArchitecture``, a ``CheckpointError``) unless ``trust_arch``: loading it imports
    that module and calls the factory, which can run any code.
    """
    tensors, spec = read(path)
    return from_weights(tensors, spec, path, device, trust_arch=trust_arch), spec


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` with each Conv2d -> BatchNorm2d pair (consecutive children
    of a Sequential, BN in eval mode) folded into one convolution.

    The same function up to float rounding, ~15% faster forward and backward on the CPU (measured,
    ResNet-9 at 32x32; ~1.6x with channels-last too: benchmarks/fold_batchnorm.py). ``pssr purify``
    runs it, and ``pssr eval --fold-batchnorm`` after taking the digests of the stored weights. Not
    for training. ``model`` itself is left alone.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module._modules.items())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.running_mean is not None:
                module._modules[conv_name] = fuse_conv_bn_eval(conv, bn)
                module._modules[bn_name] = nn.Identity()
    return folded.requires_grad_(False)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands back a contiguous gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class ChannelsLast(nn.Module):
    """``model`` run channels-last (~1.4x faster convolutions on the CPU) behind a plain interface:
    inputs of any layout, and input gradients that come back contiguous, since attack libraries
    ``.view`` them (torchattacks' PGD-L2 does) and a channels-last gradient cannot be viewed."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(_ContiguousGrad.apply(x).contiguous(memory_format=torch.channels_last))


def export(model: nn.Module, path, *, arch: str, arch_kwargs: dict | None = None, num_classes: int,
           in_channels: int, image_size: int, mean=None, std=None, dataset: str = "", classes=(),
           extra: dict | None = None) -> ClassifierSpec:
    """Write your own trained ``model`` as a pssr classifier checkpoint (safetensors, never a pickle).

    ``arch`` = ``"package.module:factory"``: an importable callable (a class or a function) such
    that ``factory(**arch_kwargs)`` rebuilds ``model``'s architecture; loading the checkpoint
    (with ``trust_arch=True``, or ``--trust-arch``) imports that module, so it must be importable
    there too (e.g. on ``PYTHONPATH``), not a script's ``__main__``. ``mean``/``std``: the per-channel normalisation ``model`` expects on
    its input; pssr applies it in front of ``model`` so that the checkpoint takes images in
    [0, 1] like every pssr classifier (default: none, for a model that takes [0, 1] images).
    ``dataset``: the data set it classifies (``mnist``, ``cifar10``, ``folder:PATH``; picks
    ``pssr eval``'s test images and attack presets). ``classes``: class names in label order.

    The factory is imported and rebuilt here, the weights loaded into it and its logits compared
    with ``model``'s, so a name that does not rebuild ``model`` fails now, not at load time.
    Returns the spec; ``spec.extra["features"]`` says where the purifier's feature loss takes
    its features (``ModuleClassifier``: "module", "last-linear" or "logits").
    """
    if not is_user_arch(arch):
        raise ArchitectureError(f"arch {arch!r}: name your model's factory as 'package.module:factory'")
    if arch.partition(":")[0] == "__main__":
        raise ArchitectureError(f"arch {arch!r}: a script's __main__ cannot be imported when loading; "
                                "move the model class into a module and name that")
    arch_kwargs = dict(arch_kwargs or {})
    try:
        json.dumps(arch_kwargs)
    except TypeError as exc:
        raise ArchitectureError(f"arch_kwargs must be JSON values (numbers, strings, lists, dicts): {exc}") from None
    mean = tuple(float(v) for v in (mean if mean is not None else (0.0,) * in_channels))
    std = tuple(float(v) for v in (std if std is not None else (1.0,) * in_channels))
    spec = ClassifierSpec(arch, num_classes, in_channels, image_size, mean, std, dataset,
                          tuple(str(c) for c in classes), dict(extra or {}), arch_kwargs)
    rebuilt = build(spec)
    state = {f"normalize.{k}": v for k, v in Normalize(mean, std).state_dict().items()}
    state.update({f"module.{k}": v.detach().cpu() for k, v in model.state_dict().items()})
    load_weights(rebuilt, state, arch)
    rebuilt.eval()
    x = torch.rand((2, in_channels, image_size, image_size), generator=torch.Generator().manual_seed(0))
    was_training = model.training
    try:
        with torch.no_grad():
            ref = model.eval()(rebuilt.normalize(x).to(next(model.parameters(), x).device)).float().cpu()
            got = rebuilt(x).float()
    finally:
        model.train(was_training)
    if ref.shape != got.shape or not torch.allclose(ref, got, rtol=1e-4, atol=1e-5):
        raise ArchitectureError(f"arch {arch!r} with arch_kwargs {arch_kwargs} rebuilds a module whose logits differ "
                                "from the model's: name the factory that built this model")
    if got.shape[-1] != num_classes:
        raise ArchitectureError(f"the model gives {got.shape[-1]} logits, num_classes is {num_classes}")
    spec.extra = {**spec.extra, "features": rebuilt.split}
    save(path, rebuilt, spec)
    return spec
