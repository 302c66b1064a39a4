"""The named steps of `purify_folder.run` one at a time: `_plan`'s skip rules."""

import json

import numpy as np
import pytest
import torch

from pssr import classifiers, purify_folder
from test_purify import _REAL_SHIPPED, _grey, _save_purifier


@pytest.fixture(scope="module")
def mnist_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    clf, _ = classifiers.load(_REAL_SHIPPED("classifier-mnist"))
    return _save_purifier(root / "p-mnist.safetensors", clf, 1, "classifier-mnist.safetensors", "mnist", 0)


def _run(tmp_path, model, **options):
    """A started run over IN = tmp/in (one image, a.png) into OUT = tmp/out, and what it said."""
    torch.set_num_threads(1)
    src = tmp_path / "in"
    src.mkdir(exist_ok=True)
    _grey(np.random.default_rng(0)).save(src / "a.png")
    said = []
    r = purify_folder._start(src, tmp_path / "out", purify_folder.Options(model=str(model), **options), {}, said.append)
    return r, said


def _lines(r) -> list[dict]:
    r.outputs.__exit__(None, None, None)
    return [json.loads(line) for line in r.manifest.path.read_text().splitlines()]


def test_plan_purifies_what_is_missing(tmp_path, mnist_model):
    r, said = _run(tmp_path, mnist_model, save_masks=True)
    todo = purify_folder._plan(r, "a.png", "a.png", None)
    out = tmp_path / "out"
    assert todo.out_path == out / "a.png" and todo.todo == [out / "a.png", out / "a.mask.png", out / "a.strip.png"]
    assert (todo.record["output"], todo.record["mask"], todo.record["strip"]) == ("a.png", "a.mask.png", "a.strip.png")
    (out / "a.mask.png").write_bytes(b"x")  # only the missing files are still to write
    assert purify_folder._plan(r, "a.png", "a.png", None).todo == [out / "a.png", out / "a.strip.png"]
    assert _lines(r) == [] and said == []


def test_plan_records_clashes_folders_and_finished_files(tmp_path, mnist_model):
    r, said = _run(tmp_path, mnist_model)
    out = tmp_path / "out"
    assert purify_folder._plan(r, "a.jpg", None, "output a.png is already the output of a.gif") is None
    (out / "d.png").mkdir()
    assert purify_folder._plan(r, "d.png", "d.png", None) is None
    (out / "e.png").write_bytes(b"x")
    assert purify_folder._plan(r, "e.png", "e.png", None) is None
    records = _lines(r)
    assert [(x["path"], x["status"], x["error"]) for x in records] == [
        ("a.jpg", "failed", "output a.png is already the output of a.gif"),
        ("d.png", "failed", "output d.png is a folder"),
        ("e.png", "skipped", "exists"),
    ]
    assert (r.summary.ok, r.summary.skipped, r.summary.failed) == (0, 1, 2)
    assert len(said) == 2 and all(s.startswith("failed ") for s in said)


def test_plan_with_overwrite_writes_everything_again(tmp_path, mnist_model):
    r, _ = _run(tmp_path, mnist_model, overwrite=True)
    out = tmp_path / "out"
    (out / "e.png").write_bytes(b"x")
    assert purify_folder._plan(r, "e.png", "e.png", None).todo == [out / "e.png"]
    assert _lines(r) == []
