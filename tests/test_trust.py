"""A checkpoint is data (issue 14): loading one never imports or runs what its metadata names
unless the user opts in for that run (``--trust-arch``, ``trust_arch=True``); its metadata cannot
make pssr allocate without bound; malformed metadata and non-finite weights stop with one line.

The malicious checkpoints are written here as an attacker would: safetensors plus the metadata
document ``classifiers.save`` writes, with no pssr code involved. Each payload touches a marker
file; the refusal tests check that the marker never appears, and ``test_payloads_are_live_when_trusted``
checks that the same payloads do run once trusted, so the refusals are not vacuous.
"""

import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

import pssr
from pssr import checkpoint, classifiers, purifier
from pssr.defenses import DefenseError, parse_defense
from pssr.regeneration import Regenerator, RegeneratorSpec
from pssr.surgery import SurgeryConfig
from pssr_cli.main import cli

PAYLOADS = ("subprocess:getoutput", "os:system", "timeit:timeit", "yaml:unsafe_load")
OPT_IN = ("--trust-arch", "trust_arch=True")


def payload_kwargs(name: str, marker: Path) -> dict:
    """The issue's payloads, each touching ``marker``; yaml's also returns a working nn.Module."""
    cmd = f"touch {shlex.quote(str(marker))}"
    module = ("!!python/object/apply:torch.nn.Sequential [!!python/object/apply:torch.nn.Flatten [], "
              "!!python/object/apply:torch.nn.Linear [784, 10], "
              f"!!python/object/apply:torch.nn.Identity [!!python/object/apply:os.system [{json.dumps(cmd)}]]]")
    return {
        "subprocess:getoutput": {"cmd": cmd},
        "os:system": {"command": cmd},
        "timeit:timeit": {"stmt": f"open({str(marker)!r}, 'w').close()", "number": 1},  # arbitrary Python
        "yaml:unsafe_load": {"stream": module},
    }[name]


def write_checkpoint(path: Path, tensors: dict, doc) -> None:
    """safetensors with pssr's metadata key, written without pssr (``doc``: a JSON value or raw text)."""
    text = doc if isinstance(doc, str) else json.dumps(doc)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"pssr": text})


def sequential_tensors() -> dict:
    """The weights of yaml's module (normalize + Flatten, Linear(784, 10), Identity)."""
    return {"normalize.mean": torch.zeros(1, 1, 1, 1), "normalize.std": torch.ones(1, 1, 1, 1),
            "module.1.weight": torch.zeros(10, 784), "module.1.bias": torch.zeros(10)}


def classifier_doc(tensors: dict, **spec) -> dict:
    base = {"arch": "lenet", "num_classes": 10, "in_channels": 1, "image_size": 28, "mean": [0.0], "std": [1.0],
            "dataset": "mnist", "classes": [str(d) for d in range(10)], "extra": {}}
    return {"format_version": 1, "kind": "classifier", "spec": {**base, **spec},
            "sha256": checkpoint.weights_sha256(tensors)}


def write_evil_classifier(path: Path, arch: str, kwargs: dict) -> str:
    """A classifier checkpoint naming ``arch(**kwargs)``; returns its weights' sha256."""
    tensors = sequential_tensors()
    doc = classifier_doc(tensors, arch=arch, arch_kwargs=kwargs)
    write_checkpoint(path, tensors, doc)
    return doc["sha256"]


def write_purifier(path: Path, classifier_sha256: str, classifier_file: str, width: int = 4) -> None:
    spec = purifier.PurifierSpec(RegeneratorSpec(1, width, 0.0), SurgeryConfig(), classifier_sha256,
                                 classifier_file, "mnist")
    purifier.save(path, Regenerator(spec.regenerator), spec)


@pytest.fixture(params=PAYLOADS)
def evil(request, tmp_path, monkeypatch):
    """(arch, arch_kwargs, marker, evil classifier path, bundle folder with purifier + that classifier)."""
    monkeypatch.chdir(tmp_path)
    arch, marker = request.param, tmp_path / "MARKER"
    kwargs = payload_kwargs(arch, marker)
    cpath = tmp_path / "evil.safetensors"
    sha = write_evil_classifier(cpath, arch, kwargs)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    write_evil_classifier(bundle / "classifier.safetensors", arch, kwargs)
    write_purifier(bundle / "purifier.safetensors", sha, "classifier.safetensors")
    return arch, kwargs, marker, cpath, bundle


def assert_refused(text: str, arch: str, marker: Path) -> None:
    """One line that names the architecture and both ways to opt in; the payload never ran."""
    assert "\n" not in text.strip(), text
    assert arch in text and all(o in text for o in OPT_IN), text
    assert not marker.exists(), "the payload ran"


# --------------------------------------------------------------------------------------------
# The payloads, through every entry point


def test_payloads_are_live_when_trusted(evil):
    """The control: trusted, each payload runs (yaml's even loads as a working classifier)."""
    arch, _, marker, cpath, _ = evil
    try:
        model, _ = classifiers.load(cpath, trust_arch=True)
    except checkpoint.CheckpointError as exc:  # the others return no nn.Module
        assert arch != "yaml:unsafe_load" and "\n" not in str(exc)
    else:
        assert arch == "yaml:unsafe_load" and model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert marker.exists()


def test_classifiers_load_refuses(evil):
    arch, _, marker, cpath, _ = evil
    with pytest.raises(checkpoint.CheckpointError) as e:
        classifiers.load(cpath)
    assert_refused(str(e.value), arch, marker)
    assert str(cpath) in str(e.value)


def test_pssr_eval_refuses(evil, tmp_path):
    arch, _, marker, cpath, _ = evil
    r = CliRunner().invoke(cli, ["eval", "--classifier", str(cpath), "--data-root", str(tmp_path), "--defense", "none"])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert_refused(r.output, arch, marker)


def test_pssr_train_refuses(evil, tmp_path):
    arch, _, marker, cpath, _ = evil
    r = CliRunner().invoke(cli, ["train", "mnist", "--set", f"classifier={cpath}", "--data-root", str(tmp_path),
                                 "--out", str(tmp_path / "run"), "-q"])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert_refused(r.output, arch, marker)


def test_purifier_load_refuses_the_classifier_beside_it(evil):
    arch, _, marker, _, bundle = evil
    with pytest.raises(checkpoint.CheckpointError) as e:
        purifier.load(bundle / "purifier.safetensors")
    assert_refused(str(e.value), arch, marker)


def test_purifier_load_refuses_any_path_in_its_classifier_file(evil, tmp_path):
    arch, _, marker, cpath, bundle = evil
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_purifier(elsewhere / "purifier.safetensors", checkpoint.weights_sha256(sequential_tensors()), str(cpath))
    with pytest.raises(checkpoint.CheckpointError) as e:
        purifier.load(elsewhere / "purifier.safetensors")
    assert_refused(str(e.value), arch, marker)


def test_load_defended_model_refuses(evil):
    arch, _, marker, cpath, bundle = evil
    for args in [(bundle / "purifier.safetensors",), (bundle / "purifier.safetensors", cpath)]:
        with pytest.raises(checkpoint.CheckpointError) as e:
            pssr.load_defended_model(*args)
        assert_refused(str(e.value), arch, marker)


def test_pssr_purify_refuses_the_bundle(evil, tmp_path):
    """`pssr purify --model bundle/purifier.safetensors` printed "ok" while the payload ran."""
    from PIL import Image

    arch, _, marker, _, bundle = evil
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "in" / "a.png")
    r = CliRunner().invoke(cli, ["purify", str(tmp_path / "in"), str(tmp_path / "out"), "--model",
                                 str(bundle / "purifier.safetensors"), "-q"])
    assert r.exit_code != 0 and "--trust-arch" in r.output and arch in r.output, r.output
    assert not marker.exists()


def test_digest_is_checked_before_any_classifier_is_built(evil):
    """`--model mnist --classifier X` ran X's code before the sha256 check refused it: now the
    stored weights are compared first, so even a trusting caller never builds a foreign classifier."""
    _, _, marker, cpath, _ = evil
    shipped = purifier.shipped_path("purifier-mnist")
    for load in (lambda: purifier.load(shipped, cpath, trust_arch=True),
                 lambda: pssr.load_defended_model(shipped, cpath, trust_arch=True)):
        with pytest.raises(checkpoint.CheckpointError, match="trained for another classifier") as e:
            load()
        assert "\n" not in str(e.value)
    assert not marker.exists()


def test_importing_the_module_is_itself_refused(tmp_path, monkeypatch):
    """A module's top level runs on import: nothing named in the file is even imported."""
    marker = tmp_path / "MARKER"
    (tmp_path / "evil_module_for_pssr.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef Net():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    write_evil_classifier(tmp_path / "c.safetensors", "evil_module_for_pssr:Net", {})
    with pytest.raises(checkpoint.CheckpointError) as e:
        classifiers.load(tmp_path / "c.safetensors")
    assert_refused(str(e.value), "evil_module_for_pssr:Net", marker)
    assert "evil_module_for_pssr" not in sys.modules


# --------------------------------------------------------------------------------------------
# Opting in, and the zoo (which needs no opt-in)


class Tiny(nn.Module):
    """A user architecture (importable as tests.test_trust:Tiny or test_trust:Tiny)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.fc = nn.Linear(784, classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_opting_in_loads_a_user_architecture_everywhere(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    cpath = tmp_path / "tiny.safetensors"
    spec = classifiers.export(model, cpath, arch=f"{__name__}:Tiny", arch_kwargs={"classes": 10}, num_classes=10,
                              in_channels=1, image_size=28, dataset="mnist")
    write_purifier(tmp_path / "purifier.safetensors", checkpoint.weights_sha256(classifiers.load(
        cpath, trust_arch=True)[0].state_dict()), cpath.name)
    x = torch.rand(2, 1, 28, 28)
    loaded, spec2 = classifiers.load(cpath, trust_arch=True)
    assert spec2 == spec and torch.allclose(loaded(x), model.eval()(x))
    p, _, cspec = purifier.load(tmp_path / "purifier.safetensors", trust_arch=True)
    assert cspec == spec and p(x).shape == x.shape
    m = pssr.load_defended_model(tmp_path / "purifier.safetensors", cpath, trust_arch=True)
    assert m(x).shape == (2, 10)
    with pytest.raises(checkpoint.CheckpointError, match="--trust-arch"):  # and each call decides on its own
        classifiers.load(cpath)
    # the CLI flag passes the gate: these now stop at the (empty) data root, not at the architecture
    for args in (["eval", "--classifier", str(cpath), "--defense", "none"],
                 ["train", "mnist", "--set", f"classifier={cpath}", "--out", str(tmp_path / "run"), "-q"]):
        base = CliRunner().invoke(cli, [*args, "--data-root", str(tmp_path / "empty")])
        assert base.exit_code == 1 and "--trust-arch" in base.output, base.output
        r = CliRunner().invoke(cli, [*args, "--data-root", str(tmp_path / "empty"), "--trust-arch"])
        assert r.exit_code == 1 and r.output.count("\n") == 1 and "--trust-arch" not in r.output, r.output
        assert "mnist" in r.output.lower()


def test_the_zoo_needs_no_opt_in():
    for name in ("classifier-mnist", "classifier-cifar10"):
        model, spec = classifiers.load(purifier.shipped_path(name))
        assert spec.arch in classifiers.ARCHITECTURES
    p, _, _ = purifier.load(purifier.shipped_path("purifier-mnist"))
    assert isinstance(p, purifier.Purifier)


@pytest.mark.parametrize("command", ["eval", "train"])
def test_trust_arch_flag_says_what_it_risks(command):
    r = CliRunner().invoke(cli, [command, "--help"])
    text = " ".join(r.output.split())
    assert "--trust-arch" in text and "runs" in text and "code" in text


# --------------------------------------------------------------------------------------------
# Malformed metadata: one line, and no allocation it asks for


def lenet_tensors() -> dict:
    torch.manual_seed(0)
    spec = classifiers.ClassifierSpec("lenet", 10, 1, 28, (0.0,), (1.0,))
    return {k: v.clone() for k, v in classifiers.build(spec).state_dict().items()}


BAD_CLASSIFIER_DOCS = {
    "doc []": "[]",
    "doc null": "null",
    "doc a string": '"classifier"',
    "100k-deep nesting": "[" * 100_000 + "]" * 100_000,
    "deep nesting in extra": '{"kind": "classifier", "spec": {"extra": ' + "[" * 100_000 + "]" * 100_000 + "}}",
    "spec []": {"kind": "classifier", "spec": []},
    "spec null": {"kind": "classifier", "spec": None},
    "float width": {"arch": "resnet9", "arch_kwargs": {"width": 32.5}},
    "integral float width": {"arch": "resnet9", "arch_kwargs": {"width": 32.0}},
    "bool width": {"arch": "resnet9", "arch_kwargs": {"width": True}},
    "string width": {"arch": "resnet9", "arch_kwargs": {"width": "32"}},
    "width 512": {"arch": "resnet9", "arch_kwargs": {"width": 512}},
    "width 0": {"arch": "resnet9", "arch_kwargs": {"width": 0}},
    "unknown zoo keyword": {"arch_kwargs": {"depth": 3}},
    "arch_kwargs a list": {"arch_kwargs": [1]},
    "float channels": {"in_channels": 1.0},
    "huge channels": {"in_channels": 10**6, "mean": [0.0], "std": [1.0]},
    "negative image size": {"image_size": -28},
    "zero image size": {"image_size": 0},
    "huge image size": {"image_size": 10**6},
    "float image size": {"image_size": 28.0},
    "zero classes": {"num_classes": 0},
    "huge classes": {"num_classes": 10**9},
    "classes not matching": {"classes": ["a", "b"]},
    "nan mean": {"mean": [float("nan")]},
    "zero std": {"std": [0.0]},
    "mean a string": {"mean": "0"},
    "arch a list": {"arch": ["lenet"]},
    "arch with a newline": {"arch": "os:system\n"},
    "dataset a number": {"dataset": 5},
}


@pytest.mark.parametrize("case", BAD_CLASSIFIER_DOCS, ids=list(BAD_CLASSIFIER_DOCS))
def test_malformed_classifier_metadata_is_one_line(tmp_path, case):
    bad = BAD_CLASSIFIER_DOCS[case]
    tensors = lenet_tensors()
    doc = bad if isinstance(bad, str) or "kind" in bad else classifier_doc(tensors, **bad)
    path = tmp_path / "c.safetensors"
    write_checkpoint(path, tensors, doc)
    with pytest.raises(checkpoint.CheckpointError) as e:
        classifiers.load(path, trust_arch=True)  # trusted, too: these are refused as data
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    r = CliRunner().invoke(cli, ["eval", "--classifier", str(path), "--data-root", str(tmp_path), "--trust-arch"])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output


def purifier_doc(sha: str, **change) -> dict:
    """A purifier document; ``regenerator``/``surgery`` dicts update those parts, anything else replaces."""
    def part(key, base):
        value = change.pop(key, {})
        return {**base, **value} if isinstance(value, dict) else value

    regen = part("regenerator", {"channels": 1, "width": 4, "dropout": 0.0, "input_bits": 0})
    surgery = part("surgery", dict(vars(SurgeryConfig())))
    spec = {"regenerator": regen, "surgery": surgery, "classifier_sha256": sha,
            "classifier_file": "classifier-mnist.safetensors", "dataset": "mnist", "extra": {}, **change}
    return {"format_version": 1, "kind": "purifier", "spec": spec}


BAD_PURIFIER_DOCS = {
    "doc []": "[]",
    "doc null": "null",
    "100k-deep nesting": "{" + '"a":{' * 100_000 + "}" * 100_001,
    "spec []": {"kind": "purifier", "spec": []},
    "regenerator null": {"regenerator": None},
    "float width": {"regenerator": {"width": 4.5}},
    "integral float width": {"regenerator": {"width": 4.0}},
    "float channels": {"regenerator": {"channels": 1.0}},
    "huge width": {"regenerator": {"width": 10**9}},
    "width 300": {"regenerator": {"width": 300}},
    "bool width": {"regenerator": {"width": True}},
    "nan dropout": {"regenerator": {"dropout": float("nan")}},
    "float input bits": {"regenerator": {"input_bits": 1.5}},
    "alpha a string": {"surgery": {"alpha": "x"}},
    "alpha inf": {"surgery": {"alpha": float("inf")}},
    "temperature inf": {"surgery": {"soft_temperature": float("inf")}},
    "mode a list": {"surgery": {"mode": ["mean"]}},
    "sha a number": {"classifier_sha256": 5},
    "file a list": {"classifier_file": ["x"]},
}


@pytest.mark.parametrize("case", BAD_PURIFIER_DOCS, ids=list(BAD_PURIFIER_DOCS))
def test_malformed_purifier_metadata_is_one_line(tmp_path, case):
    bad = BAD_PURIFIER_DOCS[case]
    cpath = purifier.shipped_path("classifier-mnist")
    f, cspec = classifiers.load(cpath)
    sha = checkpoint.weights_sha256(f.state_dict())
    doc = bad if isinstance(bad, str) or "kind" in bad else purifier_doc(sha, **bad)
    path = tmp_path / "p.safetensors"
    write_checkpoint(path, Regenerator(RegeneratorSpec(1, 4, 0.0)).state_dict(), doc)
    with pytest.raises(checkpoint.CheckpointError) as e:
        purifier.load(path, cpath)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    defense = parse_defense(f"pssr:path={path}")  # pssr eval's defense reads the same file
    with pytest.raises(DefenseError) as e:
        defense.bind(f, cspec)
    assert "\n" not in str(e.value)


@pytest.fixture
def real_allocations(monkeypatch):
    """Counts the elements of parameters made off the meta device (what building really allocates)."""
    made = [0]
    register = nn.Module.register_parameter

    def counting(self, name, param):
        if param is not None and param.device.type != "meta":
            made[0] += param.numel()
        return register(self, name, param)

    monkeypatch.setattr(nn.Module, "register_parameter", counting)
    return made


def test_metadata_cannot_make_pssr_allocate(tmp_path, real_allocations):
    """A spec within the bounds but larger than its weights is refused before anything is built
    at its size: the widest resnet9 (width 256: ~100M parameters) with LeNet's weights, the
    widest G with a width-4 G's weights."""
    tensors = lenet_tensors()
    path = tmp_path / "c.safetensors"
    write_checkpoint(path, tensors, classifier_doc(tensors, arch="resnet9", arch_kwargs={"width": 256}))
    real_allocations[0] = 0
    with pytest.raises(checkpoint.CheckpointError, match="do not fit"):
        classifiers.load(path)
    assert real_allocations[0] == 0

    cpath = purifier.shipped_path("classifier-mnist")
    sha = checkpoint.weights_sha256(classifiers.load(cpath)[0].state_dict())
    real_allocations[0] = 0
    pwide = tmp_path / "p.safetensors"
    with torch.device("meta"):
        small = Regenerator(RegeneratorSpec(1, 4, 0.0))
    write_checkpoint(pwide, {k: torch.zeros(v.shape) for k, v in small.state_dict().items()},
                     purifier_doc(sha, regenerator={"width": purifier.MAX_WIDTH}))
    with pytest.raises(checkpoint.CheckpointError, match="do not fit"):
        purifier.load(pwide, cpath)
    assert real_allocations[0] == 0


# --------------------------------------------------------------------------------------------
# Non-finite weights


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load(tmp_path, value):
    """A NaN classifier "purified" as class 0 with status ok: refuse it when it is loaded."""
    tensors = lenet_tensors()
    name = sorted(k for k in tensors if k.endswith("weight"))[0]
    tensors[name].view(-1)[3] = value
    path = tmp_path / "c.safetensors"
    write_checkpoint(path, tensors, classifier_doc(tensors))
    with pytest.raises(checkpoint.CheckpointError, match="non-finite") as e:
        classifiers.load(path)
    assert name in str(e.value) and "\n" not in str(e.value)
    r = CliRunner().invoke(cli, ["eval", "--classifier", str(path), "--data-root", str(tmp_path)])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "non-finite" in r.output, r.output

    cpath = purifier.shipped_path("classifier-mnist")
    f, cspec = classifiers.load(cpath)
    g = Regenerator(RegeneratorSpec(1, 4, 0.0)).state_dict()
    g["out.bias"][0] = value
    ppath = tmp_path / "p.safetensors"
    write_checkpoint(ppath, g, purifier_doc(checkpoint.weights_sha256(f.state_dict())))
    with pytest.raises(checkpoint.CheckpointError, match="non-finite.*out.bias"):
        purifier.load(ppath, cpath)
    with pytest.raises(DefenseError, match="non-finite"):
        parse_defense(f"pssr:path={ppath}").bind(f, cspec)
