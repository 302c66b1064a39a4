"""docs/guide.md and what it relies on: your own architecture's checkpoints, image-folder data sets,
and the guide's commands themselves (run with tiny sizes)."""

import ast
import inspect
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from pssr import checkpoint, classifiers, config, purifier, train_classifier, train_purifier
from pssr.data import DataError, dataset_key, load_dataset, short_name
from pssr_cli.main import cli

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
GUIDE = REPO / "docs" / "guide.md"
DATA = REPO.parent / "shared" / "data"
needs_mnist = pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason=f"MNIST not found under {DATA}")


@pytest.fixture
def my_classifier(monkeypatch):
    """The guide's example module, importable as `my_classifier` (what PYTHONPATH=examples does)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import my_classifier

    return my_classifier


def export_tiny(module, path, **kw):
    torch.manual_seed(0)
    model = module.TinyCNN(width=4)
    args = dict(arch="my_classifier:TinyCNN", arch_kwargs={"width": 4}, num_classes=10, in_channels=1,
                image_size=28, mean=(0.1307,), std=(0.3081,), dataset="mnist", classes=[str(d) for d in range(10)])
    args.update(kw)
    return model, classifiers.export(model, path, **args)


# --------------------------------------------------------------------------------------------
# Your own architecture


def test_export_then_load_gives_the_same_logits(tmp_path, my_classifier, one_thread):
    model, spec = export_tiny(my_classifier, tmp_path / "my.safetensors")
    loaded, spec2 = classifiers.load(tmp_path / "my.safetensors", trust_arch=True)
    assert spec2 == spec and spec.arch == "my_classifier:TinyCNN" and spec.arch_kwargs == {"width": 4}
    assert spec.extra["features"] == "last-linear" and loaded.split == "last-linear"
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        want = model.eval()((x - 0.1307) / 0.3081)
    assert torch.allclose(loaded(x), want, atol=1e-6)  # takes [0, 1] images: the normalisation is inside
    f = loaded.features(x)
    assert f.shape == (5, 64) and torch.allclose(loaded.head(f), loaded(x), atol=1e-6)  # fc2's input
    _, info = checkpoint.load(tmp_path / "my.safetensors")
    assert info["sha256"] == checkpoint.weights_sha256(loaded.state_dict())
    assert set(loaded.state_dict()) == {"normalize.mean", "normalize.std"} | {f"module.{k}" for k in model.state_dict()}


class WithSplit(nn.Module):
    """A module that chooses its own features/head split."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU())
        self.out = nn.Linear(8, 3)

    def features(self, x):
        return self.body(x)

    def head(self, f):
        return self.out(f)

    def forward(self, x):
        return self.head(self.features(x))


class Softmaxed(nn.Module):
    """Returns log-probabilities: the last Linear's input does not reproduce the output."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return F.log_softmax(self.fc(x.flatten(1)), 1)


@pytest.mark.parametrize("cls,split", [(WithSplit, "module"), (Softmaxed, "logits")])
def test_features_split_is_the_first_that_reproduces_the_logits(tmp_path, cls, split):
    torch.manual_seed(0)
    model = cls()
    spec = classifiers.export(model, tmp_path / "m.safetensors", arch=f"{__name__}:{cls.__name__}",
                              num_classes=3, in_channels=1, image_size=4)
    loaded, _ = classifiers.load(tmp_path / "m.safetensors", trust_arch=True)
    assert spec.extra["features"] == split == loaded.split
    assert spec.mean == (0.0,) and spec.std == (1.0,)  # no normalisation given: the module takes [0, 1]
    x = torch.rand(3, 1, 4, 4)
    assert torch.equal(loaded(x), model.eval()(x))
    assert torch.allclose(loaded.head(loaded.features(x)), loaded(x))


def test_bad_architectures_give_one_line(tmp_path, my_classifier):
    good = tmp_path / "my.safetensors"
    model, spec = export_tiny(my_classifier, good)
    tensors, info = checkpoint.load(good)

    def with_spec(name, **change):
        info2 = {**info, "spec": {**info["spec"], **change}}
        checkpoint.save(tmp_path / name, tensors, info2)
        with pytest.raises(checkpoint.CheckpointError) as e:
            classifiers.load(tmp_path / name, trust_arch=True)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "no module named no_such_module here; put its folder on PYTHONPATH" in with_spec(
        "a.safetensors", arch="no_such_module:Net")
    assert "has no attribute 'Nope'" in with_spec("b.safetensors", arch="my_classifier:Nope")
    assert "the weights do not fit" in with_spec("c.safetensors", arch_kwargs={"width": 8})
    assert "unknown architecture" in with_spec("d.safetensors", arch="not a name")
    assert "calling it with" in with_spec("e.safetensors", arch_kwargs={"depth": 3})

    with pytest.raises(classifiers.ArchitectureError, match="__main__"):
        classifiers.export(model, tmp_path / "x.safetensors", arch="__main__:TinyCNN", num_classes=10,
                           in_channels=1, image_size=28)
    with pytest.raises(classifiers.ArchitectureError, match="package.module:factory"):
        classifiers.export(model, tmp_path / "x.safetensors", arch="lenet", num_classes=10, in_channels=1,
                           image_size=28)
    with pytest.raises(classifiers.ArchitectureError, match="do not fit"):  # a factory that builds another model
        export_tiny(my_classifier, tmp_path / "x.safetensors", arch_kwargs={"width": 8})
    assert not (tmp_path / "x.safetensors").exists()

    r = CliRunner().invoke(cli, ["eval", "--classifier", str(tmp_path / "a.safetensors"), "--data-root", str(tmp_path),
                                 "--defense", "none", "--trust-arch"])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "PYTHONPATH" in r.output, r.output


@needs_mnist
def test_pssr_eval_on_your_own_checkpoint(tmp_path, my_classifier, one_thread):
    export_tiny(my_classifier, tmp_path / "my.safetensors")
    r = CliRunner().invoke(cli, ["eval", "--classifier", str(tmp_path / "my.safetensors"), "--trust-arch",
                                 "--data-root", str(DATA), "--defense", "none", "--defense", "jpeg", "--attack", "fgsm", "--limit", "8",
                                 "--threat", "oblivious", "--threat", "bpda", "-q"])
    assert r.exit_code == 0, r.output
    assert "jpeg:quality=75" in r.output and "bpda" in r.output


# --------------------------------------------------------------------------------------------
# Image-folder data sets


def make_folder(root: Path, train=(("b", 6), ("a", 6)), test=(("b", 1), ("a", 1)), size=28) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, counts in (("train", train), ("test", test)):
        for cls, n in counts:
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")


def test_folder_data_set_rule(tmp_path):
    make_folder(tmp_path / "Imgs", train=(("b", 3), ("a", 2), ("c", 1)), test=(("c", 2),))
    train = load_dataset("folder:Imgs", tmp_path, "train")
    test = load_dataset("FOLDER:Imgs", tmp_path, "test")  # the prefix's case does not matter; the path's does
    assert train.name == test.name == "folder:Imgs" and train.classes == test.classes == ("a", "b", "c")
    assert test.labels.tolist() == [2, 2]  # numbered like train/, though test/ has only class c
    assert train.image_shape == (1, 28, 28) and len(train) == 6
    absolute = load_dataset(f"folder:{tmp_path / 'Imgs'}", None, "test")
    assert torch.equal(absolute.images, test.images)
    (tmp_path / "Imgs" / "test" / "d").mkdir()
    with pytest.raises(DataError, match="d not among the 3 classes"):
        load_dataset("folder:Imgs", tmp_path, "test")
    for name, root, match in [("folder:nope", tmp_path, "not a folder"), ("folder:Imgs/train", tmp_path, "no test/"),
                              ("folder:Imgs", None, "needs a data root"),
                              ("folder:", tmp_path, "name the image folder")]:
        with pytest.raises(DataError, match=match):
            load_dataset(name, root, "test")


def test_train_classifier_and_purifier_on_an_image_folder(tmp_path, one_thread):
    make_folder(tmp_path / "data" / "toy")
    tiny = ["data.dataset=folder:toy", "train.epochs=1", "train.batch_size=4", "train.log_every=1"]
    cfg = config.load(train_classifier.ClassifierConfig, "mnist", tiny)
    summary = train_classifier.run(cfg, tmp_path / "clf", data_root=tmp_path / "data", quiet=True)
    _, spec = classifiers.load(summary["checkpoint"])
    assert spec.dataset == "folder:toy" and spec.classes == ("a", "b") and spec.num_classes == 2
    assert summary["test_images"] == 2

    settings = [f"classifier={summary['checkpoint']}", "attack=pgd:eps=0.3,steps=2", "train.batch_size=4",
                "train.max_steps=2", "regenerator.width=8", "train.eval_every=0"]
    with pytest.raises(train_purifier.TrainError, match="trained on folder:toy: set data.dataset=folder:toy"):
        train_purifier.run(train_purifier.load_config("mnist", settings), tmp_path / "p0",  # the preset's mnist
                           data_root=tmp_path / "data", quiet=True, device="cpu")
    pcfg = train_purifier.load_config("mnist", [*settings, "data.dataset=folder:toy"])
    out = train_purifier.run(pcfg, tmp_path / "pur", data_root=tmp_path / "data", quiet=True, device="cpu")
    assert out["steps"] == 2 and out["watch_n"] == 2
    _, pspec, cspec = purifier.load(tmp_path / "pur" / "purifier.safetensors", summary["checkpoint"])
    assert pspec.dataset == "folder:toy" and cspec.dataset == "folder:toy"


def test_folder_names_for_run_folders_and_one_line_errors(tmp_path):
    assert short_name("folder:sub/My Images") == "My Images" and short_name("MNIST") == "mnist"
    assert dataset_key("Folder:Sub/X") == "folder:Sub/X" and dataset_key("CIFAR10") == "cifar10"
    r = CliRunner().invoke(cli, ["train-classifier", "mnist", "--set", "data.dataset=folder:sub/My Images",
                                 "--data-root", str(tmp_path), "--out", str(tmp_path / "run")])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "is not a folder (expected" in r.output, r.output

# --------------------------------------------------------------------------------------------
# The guide itself


def guide_commands() -> list[str]:
    """The guide's ```bash blocks, one string each."""
    return re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), flags=re.S)


def test_guide_is_linked_and_its_options_exist():
    assert "docs/guide.md" in (REPO / "README.md").read_text()
    runner = CliRunner()
    helps = {}
    for block in guide_commands():
        for line in block.replace("\\\n", " ").splitlines():
            words = line.split()
            if "pssr" not in words:
                continue
            words = words[words.index("pssr") + 1 :]
            command = words[0]
            if command not in helps:
                r = runner.invoke(cli, [command, "--help"])
                assert r.exit_code == 0, f"pssr {command}: {r.output}"
                helps[command] = r.output
            for option in (w.split("=")[0] for w in words if w.startswith("--")):
                assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", helps[command]), f"pssr {command} {option}"
    assert set(helps) == {"train-classifier", "train", "eval", "purify"}

    # the export call of recipe 3 uses export's own keyword names
    text = GUIDE.read_text()
    code = re.search(r"```python\n(.*?)```", text, flags=re.S).group(1)
    calls = [n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Call)]
    call = next(n for n in calls if getattr(n.func, "attr", "") == "export")
    params = inspect.signature(classifiers.export).parameters
    assert {k.arg for k in call.keywords} <= set(params)
    assert all(params[k].default is not inspect.Parameter.empty for k in params if k not in
               {"model", "path"} | {kw.arg for kw in call.keywords})


# Shrinks the guide's sizes so that all its commands run in about a minute; each must match.
TINY = [
    ("--per-class 50", "--per-class 12"), ("--test-per-class 20", "--test-per-class 4"),
    ("train.epochs=3", "train.epochs=1"), ("pgd:steps=10", "pgd:steps=2"), (",steps=10", ",steps=2"),
    ("train.max_steps=20", "train.max_steps=2"),
    ("train.eval_every=10", "train.eval_every=0"), ("--limit 100", "--limit 8"), ("--limit 50", "--limit 8"),
    ("--steps 150", "--steps 20"), ("data.train_limit=500", "data.train_limit=100"),
    ("data.test_limit=100", "data.test_limit=16"), ("train.max_steps=10", "train.max_steps=2"),
]


@needs_mnist
def test_guide_commands_run(tmp_path):
    """Every ```bash block of docs/guide.md, in order, from the repository root, with tiny sizes
    and runs/guide moved into a temporary folder."""
    script = "\n".join(guide_commands())
    for old, new in TINY:
        assert old in script, f"the guide no longer says {old!r}: update TINY"
        script = script.replace(old, new)
    work = tmp_path / "guide"
    script = script.replace("runs/guide", str(work))
    env = {k: v for k, v in os.environ.items() if k not in ("PSSR_DATA_ROOT", "PYTHONPATH")}
    env.update(OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    started = time.time()
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for path in ("digits-classifier/classifier.safetensors", "digits-purifier/purifier.safetensors",
                 "digits-eval.md", "purified/manifest.jsonl", "purified/00-7.mask.png", "my-cnn.safetensors",
                 "my-cnn-purifier/purifier.safetensors", "my-cnn-purified/manifest.jsonl"):
        assert (work / path).is_file(), path
    assert '"status": "ok"' in r.stdout  # head -n 2 of the manifest
    print(f"guide commands: {time.time() - started:.0f} s")
