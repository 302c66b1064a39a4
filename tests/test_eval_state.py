"""`pssr eval --state FILE`: an interrupted evaluation, rerun, gives the uninterrupted report.

Shipped MNIST classifier, 20 test images, FGSM and PGD-3, defenses none and 1-bit squeezing,
threats oblivious and bpda: 2 clean passes and 4 attack runs, about a second per evaluation.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from pssr import attacks, checkpoint, classifiers, evaluate
from pssr import defenses as D
from pssr.data import DataError, load_dataset
from pssr_cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
CLASSIFIER = ROOT / "pssr" / "weights" / "classifier-mnist.safetensors"
DATA = ROOT.parent / "shared" / "data"
OPTIONS = dict(defenses=("none", "bit-depth:bits=1"), attacks=("fgsm", "pgd:steps=3"), threats=("oblivious", "bpda"),
               limit=20, limit_expensive=10, seed=0, batch_size=16)
UNITS = 6  # 2 clean passes + per attack: the shared (oblivious) run and bpda on bit-depth
ATTACK_RUNS = 4


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, raised from inside an attack run."""


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the 2 cores are shared


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, one_thread) -> tuple[dict, Path]:
    """(report, state file) of one whole run."""
    try:
        load_dataset("mnist", DATA, "test")
    except DataError as exc:
        pytest.skip(f"no MNIST copy: {exc}")
    path = tmp_path_factory.mktemp("state") / "whole.safetensors"
    return evaluate.run(config(), state_path=str(path), quiet=True).to_json(), path


@pytest.fixture
def finished(uninterrupted, tmp_path) -> Path:
    """A copy of the whole run's state file."""
    return Path(shutil.copy(uninterrupted[1], tmp_path / "eval.safetensors"))


def config(**kw) -> evaluate.Config:
    return evaluate.Config(**{"classifier": str(CLASSIFIER), "data_root": str(DATA), **OPTIONS, **kw})


def without_seconds(doc: dict) -> dict:
    """The report but its timings: a resumed run measured its new runs itself."""
    doc = {k: v for k, v in doc.items() if k != "seconds"}
    doc["records"] = [{k: v for k, v in r.items() if k != "seconds"} for r in doc["records"]]
    return doc


def count_calls(monkeypatch, stop_after: int | None = None) -> dict:
    """Count attack runs and scorings; with stop_after, Ctrl-C in attack run stop_after + 1."""
    calls = {"run_attack": 0, "robust_mask": 0}
    run_attack, robust_mask = attacks.run_attack, attacks.robust_mask

    def counting_attack(*args, **kw):
        if calls["run_attack"] == stop_after:
            raise Interrupted
        calls["run_attack"] += 1
        return run_attack(*args, **kw)

    def counting_mask(*args, **kw):
        calls["robust_mask"] += 1
        return robust_mask(*args, **kw)

    monkeypatch.setattr(attacks, "run_attack", counting_attack)
    monkeypatch.setattr(attacks, "robust_mask", counting_mask)
    return calls


def stored_units(path: Path) -> list[tuple]:
    """The units a state file holds, checking it is safetensors with bool and float64 tensors."""
    with safe_open(str(path), framework="pt") as fh:
        info = json.loads(fh.metadata()["pssr"])
        for name in fh.keys():
            assert fh.get_tensor(name).dtype == (torch.bool if name.endswith(".robust") else torch.float64)
    return [tuple(u["key"]) for u in info["units"]]


def cli_args(state: Path, *extra: str) -> list[str]:
    args = ["eval", "--classifier", str(CLASSIFIER), "--data-root", str(DATA), "--state", str(state), "-q",
            "--limit", str(OPTIONS["limit"]), "--limit-expensive", str(OPTIONS["limit_expensive"]),
            "--batch-size", str(OPTIONS["batch_size"]), *extra]
    for name in ("defense", "attack", "threat"):
        for value in OPTIONS[name + "s"]:
            args += [f"--{name}", value]
    return args


def one_line_error(args: list[str], needle: str) -> str:
    res = CliRunner().invoke(cli, args)
    text = res.output.strip()
    assert res.exit_code != 0 and isinstance(res.exception, SystemExit), text
    assert len(text.splitlines()) == 1 and text.startswith("Error: ") and needle in text, text
    return text


@pytest.mark.parametrize("stop_after", [0, 1, 3])
def test_interrupted_then_resumed_equals_uninterrupted(uninterrupted, tmp_path, monkeypatch, stop_after):
    """Ctrl-C in attack run k+1 leaves the clean passes and k finished runs; the rerun runs only the
    rest and its report equals the uninterrupted one's (timings aside)."""
    state = tmp_path / "eval.safetensors"
    count_calls(monkeypatch, stop_after)
    with pytest.raises(Interrupted):
        evaluate.run(config(), state_path=str(state), quiet=True)
    units = stored_units(state)
    assert len(units) == 2 + stop_after and units[:2] == [("clean", "none"), ("clean", "bit-depth:bits=1")]
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file left behind"
    monkeypatch.undo()
    calls = count_calls(monkeypatch)
    resumed = evaluate.run(config(), state_path=str(state), quiet=True).to_json()
    assert calls["run_attack"] == ATTACK_RUNS - stop_after
    assert without_seconds(resumed) == without_seconds(uninterrupted[0])
    assert stored_units(state) == stored_units(uninterrupted[1])


def test_finished_state_replays_without_running_anything(uninterrupted, finished, monkeypatch):
    """Every unit finished: no attack, no scoring, and the very same records, their seconds included."""
    assert len(stored_units(finished)) == UNITS
    calls = count_calls(monkeypatch)
    again = evaluate.run(config(), state_path=str(finished), quiet=True).to_json()
    assert calls == {"run_attack": 0, "robust_mask": 0}
    assert again["records"] == uninterrupted[0]["records"]
    assert again["clean"] == uninterrupted[0]["clean"] and again["worst_case"] == uninterrupted[0]["worst_case"]


def test_cli_interrupted_then_resumed_and_the_classifier_may_move(uninterrupted, tmp_path, monkeypatch):
    """Ctrl-C: one line saying how to go on. The state names the classifier by its weights, not
    its path, so the rerun may name a copy."""
    state = tmp_path / "eval.safetensors"
    count_calls(monkeypatch, stop_after=1)
    one_line_error(cli_args(state), f"interrupted; the finished runs are in {state}: rerun the same command")
    monkeypatch.undo()
    moved = Path(shutil.copy(CLASSIFIER, tmp_path / "moved.safetensors"))
    args = cli_args(state, "--json", str(tmp_path / "eval.json"))
    args[args.index(str(CLASSIFIER))] = str(moved)
    calls = count_calls(monkeypatch)
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert calls["run_attack"] == ATTACK_RUNS - 1
    doc = without_seconds(json.loads((tmp_path / "eval.json").read_text()))
    assert doc["classifier"]["path"] == doc["config"]["classifier"] == str(moved)
    doc["classifier"]["path"] = doc["config"]["classifier"] = str(CLASSIFIER)
    assert doc == without_seconds(uninterrupted[0])


def test_other_options_are_refused(finished, tmp_path):
    before = finished.read_bytes()
    one_line_error(cli_args(finished, "--seed", "1"), "is from another evaluation: seed 0 there, 1 here")
    cases = [
        (dict(limit=19), "limit 20 there, 19 here"),
        (dict(attacks=("fgsm", "pgd:steps=4")), 'attacks ["fgsm", "pgd:steps=3"] there, ["fgsm", "pgd:steps=4"] here'),
        (dict(defenses=("none",)), "defenses"),
        (dict(threats=("oblivious",)), "threats"),
        (dict(eot=2), "eot 8 there, 2 here"),
        (dict(batch_size=8), "batch_size 16 there, 8 here"),
        (dict(limit_expensive=5), "limit_expensive 10 there, 5 here"),
        (dict(fold_batchnorm=True), "fold_batchnorm null there, true here"),
    ]
    for kw, needle in cases:
        with pytest.raises(evaluate.EvalError, match="from another evaluation") as err:
            evaluate.run(config(**kw), state_path=str(finished), quiet=True)
        assert needle in str(err.value) and "\n" not in str(err.value)
    model, spec = classifiers.load(CLASSIFIER)
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    other = tmp_path / "other.safetensors"
    classifiers.save(other, model, spec)
    with pytest.raises(evaluate.EvalError, match="classifier_sha256"):
        evaluate.run(config(classifier=str(other)), state_path=str(finished), quiet=True)
    assert finished.read_bytes() == before, "a refused run leaves the state file alone"


class Scaled(D.Defense):
    """A defense that holds a module, as PSSR holds its purifier: a stand-in for a retrained one."""

    name, weight = "scaled", 1.0

    def __init__(self):
        super().__init__()
        self.module = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.constant_(self.module.weight, self.weight)

    def purify(self, x):
        with torch.no_grad():
            return (self.module.weight * x).clamp(0, 1)


def test_other_defense_weights_are_refused(uninterrupted, tmp_path, monkeypatch):
    """Same defense name, other weights (a purifier retrained in place): refused."""
    monkeypatch.setitem(D.DEFENSES, "scaled", Scaled)
    state = str(tmp_path / "eval.safetensors")
    small = config(defenses=("none", "scaled"), attacks=("fgsm",), threats=("oblivious",))
    evaluate.run(small, state_path=state, quiet=True)
    monkeypatch.setattr(Scaled, "weight", 0.9)
    with pytest.raises(evaluate.EvalError, match="defense_weights"):
        evaluate.run(small, state_path=state, quiet=True)


def test_a_revised_defense_refuses_states_made_before(uninterrupted, tmp_path, monkeypatch):
    """A fix that changes what a defense computes bumps its revision: old states are not replayed."""
    monkeypatch.setitem(D.DEFENSES, "scaled", Scaled)
    state = str(tmp_path / "eval.safetensors")
    small = config(defenses=("none", "scaled"), attacks=("fgsm",), threats=("oblivious",))
    evaluate.run(small, state_path=state, quiet=True)
    monkeypatch.setattr(Scaled, "revision", 2)
    with pytest.raises(evaluate.EvalError, match="defense_revisions null there"):
        evaluate.run(small, state_path=state, quiet=True)
    evaluate.run(small, state_path=str(tmp_path / "new.safetensors"), quiet=True)
    evaluate.run(small, state_path=str(tmp_path / "new.safetensors"), quiet=True)  # a rerun replays it


def test_folded_batchnorm_gives_the_same_report(uninterrupted, tmp_path):
    """--fold-batchnorm runs another graph for the same function: same per-run accuracies here, and
    its state file is its own (a state made without it stays valid for runs without it)."""
    state = tmp_path / "fold.safetensors"
    folded = evaluate.run(config(fold_batchnorm=True), state_path=str(state), quiet=True).to_json()
    plain = uninterrupted[0]
    key = lambda r: (r["defense"], r["attack"], r["threat"])  # noqa: E731
    assert [(key(r), r["robust_accuracy"]) for r in folded["records"]] == \
        [(key(r), r["robust_accuracy"]) for r in plain["records"]]
    assert [c["accuracy"] for c in folded["clean"]] == [c["accuracy"] for c in plain["clean"]]
    with pytest.raises(evaluate.EvalError, match="fold_batchnorm true there"):
        evaluate.run(config(), state_path=str(state), quiet=True)


def test_unreadable_state_is_one_clear_error(finished, tmp_path):
    data = finished.read_bytes()
    garbage, truncated, pickle, empty = (tmp_path / n for n in ("garbage", "truncated", "pickle", "empty"))
    garbage.write_bytes(b"\x00\x01 not a state file")
    truncated.write_bytes(data[: len(data) // 2])
    torch.save({"units": []}, pickle)
    empty.write_bytes(b"")
    cases = [
        (garbage, "not a safetensors file"), (truncated, "not a safetensors file"), (pickle, "pickle"),
        (empty, "not a safetensors file"), (CLASSIFIER, "expected 'eval-state'"), (tmp_path, "is a directory"),
    ]
    for path, needle in cases:
        assert "--state" in one_line_error(cli_args(path), needle)
    tensors, info = checkpoint.load(finished)  # valid safetensors, damaged content
    missing = {k: v for k, v in tensors.items() if k != "1.0.robust"}
    two_clean = json.loads(json.dumps(info))
    two_clean["units"][0]["entries"] *= 2
    doubled = {**tensors, "0.1.robust": tensors["0.0.robust"].clone()}
    for t, i, needle in ((missing, info, "tensor 1.0.robust missing"), (doubled, two_clean, "do not fit its key")):
        checkpoint.save(finished, t, i)
        assert "damaged state file" in one_line_error(cli_args(finished), needle)


def test_a_state_of_version_1_replays_and_its_runs_report_no_l0(uninterrupted, finished, monkeypatch):
    """State files made before L0 was kept (version 1: no .l0 vectors, the expensive attacks then
    known) still replay, without running anything; their runs report no L0. Other versions: one line."""
    tensors, info = checkpoint.load(finished)
    assert info["state_version"] == evaluate.STATE_VERSION == 2
    assert info["options"]["expensive_attacks"] == ["autoattack", "square"]  # as states made before Sparse-RS
    old = {k: v for k, v in tensors.items() if not k.endswith(".l0")}
    assert len(old) == len(tensors) - 2 * 3  # per attack, L0 of 3 scorings: oblivious on both defenses, bpda
    checkpoint.save(finished, old, {**info, "state_version": 1})
    calls = count_calls(monkeypatch)
    doc = evaluate.run(config(), state_path=str(finished), quiet=True).to_json()
    assert calls == {"run_attack": 0, "robust_mask": 0}
    assert all(r["mean_l0"] is None for r in doc["records"])
    expected = without_seconds(uninterrupted[0])
    expected["records"] = [{**r, "mean_l0": None} for r in expected["records"]]
    assert without_seconds(doc) == expected
    assert all(r["mean_l0"] > 0 for r in uninterrupted[0]["records"])
    checkpoint.save(finished, old, {**info, "state_version": 3})
    assert "this pssr reads 1 or 2" in one_line_error(cli_args(finished), "state version 3")
