"""One classifier lookup for a purifier (issue 14's follow-up): ``pssr purify --model PATH``,
``pssr eval --defense pssr:path=PATH``, ``pssr.load_defended_model`` and ``purifier.load`` all find the
classifier a training run recorded through ``pssr.purifier.find_classifier``: beside the purifier,
where the run's config.yaml points, then shipped, matched by the sha256 the purifier records."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

import pssr
from pssr import checkpoint, classifiers, purifier, purify_folder
from pssr.classifiers import ClassifierSpec
from pssr.data import DataError, load_dataset
from pssr_cli.main import cli
from test_purify import _by_path, _grey, _invoke, _save_purifier

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    torch.set_num_threads(1)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def run(tmp_path, monkeypatch):
    """(purifier path, classifier path): a classifier trained in runs/clf (not shipped, not beside the
    purifier) and a purifier trained on it in runs/pur, whose config.yaml names the classifier relative to
    where `pssr train` ran; the current folder is elsewhere."""
    torch.manual_seed(5)
    cspec = ClassifierSpec("lenet", 10, 1, 28, (0.5,), (0.25,), "mnist", classes=tuple(str(i) for i in range(10)))
    clf = classifiers.build(cspec).eval()
    (tmp_path / "runs" / "clf").mkdir(parents=True)
    cpath = tmp_path / "runs" / "clf" / "classifier.safetensors"
    classifiers.save(cpath, clf, cspec)
    (tmp_path / "runs" / "pur").mkdir()
    p = _save_purifier(tmp_path / "runs" / "pur" / "purifier.safetensors", clf, 1, "classifier.safetensors", "mnist", 6)
    (p.parent / "config.yaml").write_text(yaml.safe_dump({"classifier": "runs/clf/classifier.safetensors"}))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    return p, cpath


def _sha(model) -> str:
    return checkpoint.weights_sha256(model.state_dict())


def _need_mnist():
    try:
        load_dataset("mnist", DATA, "test")
    except DataError as exc:
        pytest.skip(f"no MNIST copy: {exc}")


def _eval(*args):
    r = CliRunner().invoke(cli, ["eval", "--data-root", str(DATA), "--attack", "fgsm", "--threat", "oblivious",
                                 "--limit", "8", "--limit-expensive", "8", "-q", *map(str, args)])
    assert "Traceback" not in r.output, r.output
    return r


def test_every_entry_point_goes_through_the_one_lookup(run, tmp_path, monkeypatch):
    """purify, eval's pssr:path= (without --classifier), load_defended_model and purifier.load each call
    pssr.purifier.find_classifier, and all find the run's classifier (purify_folder keeps no copy)."""
    _need_mnist()
    p, cpath = run
    calls = []
    real = purifier.find_classifier

    def spy(path, *args, **kwargs):
        found = real(path, *args, **kwargs)
        calls.append(found)
        return found

    monkeypatch.setattr(purifier, "find_classifier", spy)
    assert not hasattr(purify_folder, "_classifier_candidates") and not hasattr(purifier, "_find_classifier")

    src = tmp_path / "in"
    src.mkdir()
    _grey(np.random.default_rng(7)).save(src / "g.png")
    r = _invoke(src, tmp_path / "out", "--model", p, "-q")
    assert r.exit_code == 0 and _by_path(tmp_path / "out" / "manifest.jsonl")["g.png"]["status"] == "ok", r.output
    assert calls == [cpath]

    model = pssr.load_defended_model(p)
    assert calls == [cpath, cpath]
    assert _sha(model.classifier) == checkpoint.weights_sha256(classifiers.read(cpath)[0])
    assert model.purifier_spec.classifier_sha256 == _sha(model.classifier)

    loaded, _, _ = purifier.load(p)
    assert calls == [cpath] * 3 and _sha(loaded.classifier) == _sha(model.classifier)

    report = tmp_path / "eval.json"
    r = _eval("--defense", "none", "--defense", f"pssr:path={p}", "--json", report)
    assert r.exit_code == 0, r.output
    assert calls == [cpath] * 4
    got = json.loads(report.read_text())["classifier"]
    assert got["path"] == str(cpath) and got["sha256"] == _sha(model.classifier)


def test_not_found_names_the_option_of_each_entry_point(run, tmp_path):
    """Without the run's config.yaml nothing leads to the classifier: one line each, naming what was
    looked for and how to pass it (--classifier on the CLI, classifier_path= in the API)."""
    p, cpath = run
    (p.parent / "config.yaml").unlink()
    for load in (lambda: purifier.load(p), lambda: pssr.load_defended_model(p)):
        with pytest.raises(checkpoint.CheckpointError) as e:
            load()
        text = str(e.value)
        assert "\n" not in text and "cannot find the classifier" in text and "classifier_path=" in text, text
        assert "classifier.safetensors" in text
    with pytest.raises(purify_folder.PurifyError, match="--classifier PATH"):
        purify_folder.find_classifier(p)
    r = _eval("--defense", f"pssr:path={p}")
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert "cannot find the classifier" in r.output and "--classifier PATH" in r.output
    # and given explicitly, each finds nothing to look for
    assert _sha(pssr.load_defended_model(p, cpath).classifier) == checkpoint.weights_sha256(classifiers.read(cpath)[0])


def test_eval_needs_a_classifier_or_a_purifier(tmp_path):
    r = _eval("--defense", "none")
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "--classifier PATH" in r.output, r.output


def test_eval_with_another_classifier_says_where_the_purifiers_is(run):
    """--classifier X with a pssr:path= purifier trained on another: the one-line refusal names the
    classifier the lookup finds for it."""
    _need_mnist()
    p, cpath = run
    shipped = purifier.shipped_path("classifier-mnist")
    r = _eval("--classifier", shipped, "--defense", f"pssr:path={p}")
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert "another classifier" in r.output and f"it was trained with {cpath}" in r.output
    assert f"--classifier {cpath}" in r.output
