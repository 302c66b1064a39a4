"""`pssr purify` says what happened (issue 14): predictions changed, accuracy before and after where the truth
is known (class folders, --labels, IN/labels.csv), captioned strips; a training run's purifier finds its
classifier; unknown model names get a suggestion; --trust-arch reaches the loaders."""

import re

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pssr import classifiers, purifier, purify_folder
from pssr.classifiers import ClassifierSpec
from test_purify import _REAL_SHIPPED, _by_path, _grey, _invoke, _save_purifier

STATS = re.compile(r"purification changed (\d+) of (\d+) predictions(?:; accuracy on (\d+) labelled images: "
                   r"([\d.]+)% before, ([\d.]+)% after)?")


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    torch.set_num_threads(1)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def mnist_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    clf, _ = classifiers.load(_REAL_SHIPPED("classifier-mnist"))
    return _save_purifier(root / "p-mnist.safetensors", clf, 1, "classifier-mnist.safetensors", "mnist", 0)


def _stats(result):
    m = STATS.search(result.stdout)
    assert m, result.stdout
    return m


def _check_stats(result, records, labelled):
    """The printed line agrees with the manifest."""
    m = _stats(result)
    ok = [r for r in records.values() if r["status"] == "ok"]
    assert int(m[1]) == sum(r["pred_before"] != r["pred_after"] for r in ok) and int(m[2]) == len(ok)
    with_label = [r for r in ok if r["label"] is not None]
    assert len(with_label) == labelled
    if labelled:
        assert int(m[3]) == labelled
        before = 100 * sum(r["label"] == r["class_before"] for r in with_label) / labelled
        after = 100 * sum(r["label"] == r["class_after"] for r in with_label) / labelled
        assert float(m[4]) == pytest.approx(before, abs=0.051) and float(m[5]) == pytest.approx(after, abs=0.051)
    else:
        assert m[3] is None


def test_class_folders_give_labels_and_accuracy(tmp_path, mnist_model):
    rng = np.random.default_rng(0)
    src, out = tmp_path / "in", tmp_path / "out"
    for folder, n in (("3", 2), ("7", 1), ("other", 1)):
        (src / folder).mkdir(parents=True)
        for i in range(n):
            _grey(rng).save(src / folder / f"x{i}.png")
    result = _invoke(src, out, "--model", mnist_model)
    assert result.exit_code == 0, result.output
    r = _by_path(out / "manifest.jsonl")
    assert {k: v["label"] for k, v in r.items()} == {"3/x0.png": "3", "3/x1.png": "3", "7/x0.png": "7",
                                                     "other/x0.png": None}
    _check_stats(result, r, labelled=3)


def test_no_labels_says_how_to_get_accuracy(tmp_path, mnist_model):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        _grey(np.random.default_rng(i)).save(src / f"g{i}.png")
    result = _invoke(src, tmp_path / "out", "--model", mnist_model)
    assert result.exit_code == 0, result.output
    r = _by_path(tmp_path / "out" / "manifest.jsonl")
    assert all(v["label"] is None for v in r.values())
    _check_stats(result, r, labelled=0)
    assert "--labels" in result.stdout
    # a rerun that skips everything still reports on what the manifest holds
    again = _invoke(src, tmp_path / "out", "--model", mnist_model)
    assert "0 ok, 3 skipped" in again.stdout and _stats(again)[2] == "3"


def test_labels_csv_option(tmp_path, mnist_model):
    rng = np.random.default_rng(1)
    src, out = tmp_path / "in", tmp_path / "out"
    (src / "d").mkdir(parents=True)
    for name in ("a.png", "b.png", "d/c.png", "e.png"):
        _grey(rng).save(src / name)
    labels = tmp_path / "truth.csv"
    labels.write_text("file,label\na.png,4\nd/c.png, 9\ne.png,cat\nnot-there.png,1\n")
    result = _invoke(src, out, "--model", mnist_model, "--labels", labels)
    assert result.exit_code == 0, result.output
    r = _by_path(out / "manifest.jsonl")
    assert {k: v["label"] for k, v in r.items()} == {"a.png": "4", "b.png": None, "d/c.png": "9", "e.png": None}
    _check_stats(result, r, labelled=2)
    warning = [line for line in result.stderr.splitlines() if "cat" in line]
    assert len(warning) == 1 and "not a class" in warning[0], result.stderr


@pytest.mark.parametrize("text, message", [
    ("a.png\n", "line 1"),
    ("file,label\na.png,1\na.png,2\n", "twice"),
    (b"a.png,\xff\n", "UTF-8"),
])
def test_bad_labels_file_is_a_one_line_error(tmp_path, mnist_model, text, message):
    src = tmp_path / "in"
    src.mkdir()
    _grey(np.random.default_rng(2)).save(src / "a.png")
    labels = tmp_path / "labels.csv"
    labels.write_bytes(text if isinstance(text, bytes) else text.encode())
    result = _invoke(src, tmp_path / "out", "--model", mnist_model, "--labels", labels)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr
    missing = _invoke(src, tmp_path / "out", "--model", mnist_model, "--labels", tmp_path / "none.csv")
    assert missing.exit_code == 1 and "none.csv" in missing.stderr


def test_labels_csv_in_the_input_folder_is_used_and_is_not_an_input(tmp_path, mnist_model):
    rng = np.random.default_rng(3)
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for name in ("a.png", "b.png"):
        _grey(rng).save(src / name)
    (src / "labels.csv").write_text("a.png,5\nb.png,6\n")
    (src / "notes.txt").write_text("x")
    result = _invoke(src, out, "--model", mnist_model)
    assert result.exit_code == 0, result.output
    assert "2 ok, 0 skipped, 0 failed, 1 non-image files ignored" in result.stdout  # notes.txt, not labels.csv
    r = _by_path(out / "manifest.jsonl")
    assert set(r) == {"a.png", "b.png"} and (r["a.png"]["label"], r["b.png"]["label"]) == ("5", "6")
    _check_stats(result, r, labelled=2)
    assert "labels.csv" in result.stdout


def test_save_masks_strip_is_captioned_with_the_predictions(tmp_path, mnist_model):
    rng = np.random.default_rng(4)
    src, out = tmp_path / "in", tmp_path / "out"
    (src / "2").mkdir(parents=True)
    _grey(rng).save(src / "2" / "g.png")
    _grey(rng).save(src / "h.png")
    result = _invoke(src, out, "--model", mnist_model, "--save-masks")
    assert result.exit_code == 0, result.output
    s = purify_folder.view_scale(28)
    for rel, rec in _by_path(out / "manifest.jsonl").items():
        texts = purify_folder.strip_captions(rec)
        assert texts[0] == f"before\n{rec['class_before']} ({rec['prob_before']:.0%})"
        assert texts[2] == f"after\n{rec['class_after']} ({rec['prob_after']:.0%})"
        assert texts[3] == (f"label\n{rec['label']}" if rec["label"] is not None else "|out-in|\nx4")
        strip = np.asarray(Image.open(out / rec["strip"]))
        assert strip.shape == (28 * s + purify_folder.CAPTION_PX, 4 * 28 * s)
        band = strip[28 * s:]
        expected = np.asarray(purify_folder.caption_band(texts, 28 * s, "L"))
        np.testing.assert_array_equal(band, expected)
        assert (band > 128).mean() > 0.01  # there is text


# --------------------------------------------------------------------------------------------
# --model PATH of a training run, unknown names, --trust-arch


def _run_folders(tmp_path):
    """A classifier trained in runs/clf (not shipped, not beside the purifier) and a purifier trained on
    it in runs/pur, whose config.yaml names the classifier as `pssr train --set classifier=...` did."""
    torch.manual_seed(5)
    cspec = ClassifierSpec("lenet", 10, 1, 28, (0.5,), (0.25,), "mnist", classes=tuple(str(i) for i in range(10)))
    clf = classifiers.build(cspec).eval()
    (tmp_path / "runs" / "clf").mkdir(parents=True)
    cpath = tmp_path / "runs" / "clf" / "classifier.safetensors"
    classifiers.save(cpath, clf, cspec)
    run = tmp_path / "runs" / "pur"
    run.mkdir()
    p = _save_purifier(run / "purifier.safetensors", clf, 1, "classifier.safetensors", "mnist", 6)
    return p, cpath


def test_purifier_of_a_training_run_finds_its_classifier(tmp_path, monkeypatch):
    p, cpath = _run_folders(tmp_path)
    src = tmp_path / "in"
    src.mkdir()
    _grey(np.random.default_rng(7)).save(src / "g.png")
    # config.yaml as `pssr train` writes it, the classifier path relative to where training ran
    (p.parent / "config.yaml").write_text(yaml.safe_dump({"classifier": "runs/clf/classifier.safetensors"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not where training ran: found from the run folder's parents
    result = _invoke(src, tmp_path / "out", "--model", p)
    assert result.exit_code == 0, result.output
    assert _by_path(tmp_path / "out" / "manifest.jsonl")["g.png"]["status"] == "ok"
    assert purify_folder.find_classifier(p) == cpath


def test_missing_classifier_error_names_the_option(tmp_path):
    p, cpath = _run_folders(tmp_path)
    src = tmp_path / "in"
    src.mkdir()
    _grey(np.random.default_rng(8)).save(src / "g.png")
    result = _invoke(src, tmp_path / "out", "--model", p)  # no config.yaml; the shipped mnist one is another
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--classifier" in lines[0] and "classifier.safetensors" in lines[0], result.stderr
    ok = _invoke(src, tmp_path / "out", "--model", p, "--classifier", cpath)
    assert ok.exit_code == 0, ok.output


def test_another_classifier_is_refused_before_it_is_built(tmp_path, monkeypatch, mnist_model):
    p, cpath = _run_folders(tmp_path)
    src = tmp_path / "in"
    src.mkdir()
    _grey(np.random.default_rng(9)).save(src / "g.png")

    def no_build(spec):
        raise AssertionError("a classifier was built before its sha256 was checked")

    monkeypatch.setattr(classifiers, "build", no_build)
    result = _invoke(src, tmp_path / "out", "--model", mnist_model, "--classifier", cpath)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "another classifier" in lines[0] and str(cpath) in lines[0], result.stderr


@pytest.mark.parametrize("name, suggestion", [("mnsit", "mnist"), ("cifar", "cifar10"), ("Auto", "auto")])
def test_unknown_model_name_gets_a_suggestion(tmp_path, name, suggestion):
    src = tmp_path / "in"
    src.mkdir()
    result = _invoke(src, tmp_path / "out", "--model", name)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"did you mean {suggestion!r}?" in lines[0], result.stderr


def test_trust_arch_reaches_the_loaders(tmp_path, mnist_model, monkeypatch):
    seen = []
    real = purifier.load

    def load(path, classifier_path=None, device="cpu", **kwargs):
        seen.append(kwargs.get("trust_arch"))
        kwargs.pop("trust_arch", None)
        return real(path, classifier_path, device, **kwargs)

    monkeypatch.setattr(purifier, "load", load)
    src = tmp_path / "in"
    src.mkdir()
    _grey(np.random.default_rng(10)).save(src / "g.png")
    assert _invoke(src, tmp_path / "o1", "--model", mnist_model).exit_code == 0
    assert _invoke(src, tmp_path / "o2", "--model", mnist_model, "--trust-arch").exit_code == 0
    assert seen == [False, True]
    help_text = _invoke("--help").output  # `pssr purify --help`
    assert "--trust-arch" in help_text and "only for files you trust" in " ".join(help_text.split())
