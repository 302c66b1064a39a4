"""`pssr eval` and its pipeline, on a tiny real MNIST classifier, 32 images and cheap attacks."""

import json
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pssr import attacks, classifiers, evaluate, report
from pssr import defenses as D
from pssr.classifiers import ClassifierSpec
from pssr.data import DataError, load_dataset
from pssr_cli.main import cli

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ATTACKS = ("fgsm", "pgd:steps=5")
DEFENSES = ("none", "bit-depth:bits=1", "median")
N, M = 32, 16


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the 2 cores are shared


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, one_thread):
    """A LeNet trained for 100 SGD steps of 16 images on 3k MNIST images (~85% accuracy), saved."""
    try:
        train = load_dataset("mnist", DATA, "train").subset(3000, seed=0)
    except DataError as exc:
        pytest.skip(f"no MNIST copy: {exc}")
    spec = ClassifierSpec("lenet", 10, 1, 28, (0.1307,), (0.3081,), "mnist")
    torch.manual_seed(0)
    model = classifiers.build(spec)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    x, y = train.images.float() / 255, train.labels
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(100):
        idx = torch.randint(len(x), (16,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("clf") / "lenet.safetensors"
    classifiers.save(path, model.eval(), spec)
    return path


def config(checkpoint, **kw):
    base = dict(classifier=str(checkpoint), data_root=str(DATA), defenses=DEFENSES, attacks=ATTACKS,
                limit=N, limit_expensive=M, seed=0, batch_size=16)
    return evaluate.Config(**{**base, **kw})


@pytest.fixture(scope="module")
def evaluated(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    paths = {"json_path": out / "eval.json", "markdown_path": out / "eval.md", "plot_path": out / "eval.png"}
    result = evaluate.run(config(checkpoint), **{k: str(v) for k, v in paths.items()}, quiet=True)
    return result, paths


def without_seconds(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_json_report_is_complete_and_consistent(evaluated):
    result, paths = evaluated
    doc = json.loads(paths["json_path"].read_text())
    assert set(doc) >= {"config", "classifier", "records", "clean", "worst_case", "seed"}
    assert doc["seed"] == 0 and doc["config"]["n"] == N and doc["config"]["dataset"] == "mnist"
    assert len(doc["classifier"]["sha256"]) == 64 and doc["classifier"]["arch"] == "lenet"
    assert doc == json.loads(json.dumps(result.to_json()))
    names = [D.parse_defense(d).describe() for d in DEFENSES]
    assert [c["defense"] for c in doc["clean"]] == names == [w["defense"] for w in doc["worst_case"]]
    clean = {c["defense"]: c for c in doc["clean"]}
    assert clean["none"]["accuracy"] > 0.6, "the tiny classifier should have learnt something"
    keys = {"defense", "attack", "attack_label", "threat", "n", "robust_accuracy", "mean_linf", "mean_l2", "seconds"}
    # none: oblivious only (its BPDA attack would be the same); the others: oblivious and bpda; no eot
    # (no randomized defense)
    threats = {d: ("oblivious",) if d == "none" else ("oblivious", "bpda") for d in names}
    want = {(d, a, t) for d in names for a in ATTACKS for t in threats[d]}
    assert {(r["defense"], r["attack"], r["threat"]) for r in doc["records"]} == want
    assert len(doc["records"]) == len(want)
    for r in doc["records"]:
        assert set(r) >= keys and r["n"] == N and r["seconds"] >= 0
        assert r["attack_label"] == attacks.parse_attack(r["attack"], "mnist").label()
        assert 0 <= r["robust_accuracy"] <= clean[r["defense"]]["accuracy"] + 1e-12
        assert 0 < r["mean_linf"] <= 0.3 + 1e-6 and r["mean_l2"] >= r["mean_linf"]
        # n is a whole number of images
        assert abs(r["robust_accuracy"] * r["n"] - round(r["robust_accuracy"] * r["n"])) < 1e-6
    for w in doc["worst_case"]:
        rows = [r for r in doc["records"] if r["defense"] == w["defense"]]
        assert w["n"] == N and w["runs"] == len(rows)
        assert all(w["robust_accuracy"] <= r["robust_accuracy"] for r in rows)
    by = {(r["defense"], r["attack"], r["threat"]): r for r in doc["records"]}
    assert by[("none", "pgd:steps=5", "oblivious")]["robust_accuracy"] < clean["none"]["accuracy"]
    # transfer reuses the undefended x_adv: same perturbation norms for every defense
    for d in names:
        assert by[(d, "fgsm", "oblivious")]["mean_l2"] == by[("none", "fgsm", "oblivious")]["mean_l2"]


def test_markdown_and_table(evaluated):
    result, paths = evaluated
    md = paths["markdown_path"].read_text()
    table = report.format_table(result)
    assert md == report.format_markdown(result.to_json())
    assert "| defense | attack | threat | n | robust acc |" in md
    for r in result.records:
        row = f"| {r.defense} | {r.attack_label} | {r.threat} | {r.n} | {100 * r.robust_accuracy:.1f}% |"
        assert row in md
        assert r.attack_label in table
    for c, w in zip(result.clean, result.worst_case):
        assert f"| {c.defense} | {c.n} | {100 * c.accuracy:.1f}% | {w.n} | {100 * w.robust_accuracy:.1f}% |" in md
    assert "worst case" in table and "oblivious" in table and "bpda" in table


def test_markdown_summary_pairs_each_oblivious_number_with_the_strongest_adaptive_one(evaluated):
    result, _ = evaluated
    head, rows = report.summary_rows(result.to_json())
    names = [c.defense for c in result.clean]
    assert head == ("attack", *names) and len(names) == len(DEFENSES)
    by_label = {row[0].split(" (n=")[0]: row[1:] for row in rows}
    labels = list(dict.fromkeys(r.attack_label for r in result.records))
    assert list(by_label) == ["clean", *labels, "**worst case, per example**"]
    for label in labels:
        for d, cell in zip(names, by_label[label]):
            runs = [r for r in result.records if r.defense == d and r.attack_label == label]
            oblivious = next(r for r in runs if r.threat == "oblivious")
            others = [r for r in runs if r.threat != "oblivious"]
            expected = f"{100 * oblivious.robust_accuracy:.1f}%"
            if others:  # 'none' has only the oblivious (white-box) run
                worst = min(others, key=lambda r: r.robust_accuracy)
                n_note = f", n={worst.n}" if worst.n != oblivious.n else ""  # e.g. soft-mask on the first M
                expected += f" / {100 * worst.robust_accuracy:.1f}% ({worst.threat}{n_note})"
            assert cell == expected
    assert by_label["**worst case, per example**"][0].startswith(f"**{100 * result.worst_case[0].robust_accuracy:.1f}%**")
    assert "## Summary" in report.format_markdown(result.to_json())


def test_report_warns_when_robust_accuracy_rises_with_eps(evaluated):
    """Robust accuracy must not rise with eps; where a run says it does, the report says the attack
    was too weak there. Two copies of one run, relabelled to eps 0.1 and 0.3 (same images)."""
    doc = json.loads(json.dumps(evaluated[0].to_json()))
    base = next(r for r in doc["records"] if r["threat"] == "bpda")
    small = {**base, "attack": "pgd:eps=0.1", "attack_label": "PGD eps=0.1", "robust_accuracy": 0.25}
    large = {**base, "attack": "pgd:eps=0.3", "attack_label": "PGD eps=0.3", "robust_accuracy": 0.5}
    doc["records"] = [small, large]
    (warning,) = report.eps_warnings(doc)
    assert base["defense"] in warning and "PGD eps=0.3 leaves 50.0%" in warning and "PGD eps=0.1 only 25.0%" in warning
    assert warning in report.format_markdown(doc) and warning in report.format_table(doc)
    doc["records"] = [small, {**large, "robust_accuracy": 0.2}]  # falls with eps: nothing to say
    assert report.eps_warnings(doc) == []
    doc["records"] = [small, {**large, "robust_accuracy": 0.25 + 1 / base["n"]}]  # one image: a random start's noise
    assert report.eps_warnings(doc) == []
    doc["records"] = [small, {**large, "threat": "oblivious", "robust_accuracy": 0.9}]  # another threat model
    assert report.eps_warnings(doc) == []
    assert not report.eps_warnings(evaluated[0].to_json())  # the real run: one eps per attack


def test_plot_is_a_png(evaluated):
    _, paths = evaluated
    png = paths["plot_path"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    assert width > 100 and height > 100


def test_oblivious_examples_are_made_once_per_attack(checkpoint, monkeypatch):
    calls = []
    real = attacks.run_attack

    def counting(spec, model, x, y, **kw):
        calls.append((spec.name, type(model).__name__, getattr(getattr(model, "defense", None), "name", None)))
        return real(spec, model, x, y, **kw)

    monkeypatch.setattr(attacks, "run_attack", counting)
    evaluate.run(config(checkpoint, threats=("oblivious",)), quiet=True)
    assert sorted(calls) == [("fgsm", "Classifier", None), ("pgd", "Classifier", None)]
    calls.clear()
    evaluate.run(config(checkpoint), quiet=True)  # + bpda on the two real defenses, none skipped
    assert len(calls) == 2 + 2 * 2
    assert sorted(c for c in calls if c[1] == "DefendedModel") == sorted(
        (a, "DefendedModel", d) for a in ("fgsm", "pgd") for d in ("bit-depth", "median")
    )


def test_bpda_gradient_is_straight_through(checkpoint):
    """BPDA through 1-bit squeezing: the gradient is the classifier's at the purified point."""
    clf, _ = classifiers.load(checkpoint)
    data = load_dataset("mnist", DATA, "test").subset(8)
    x, y = data.images.float() / 255, data.labels
    defense = D.parse_defense("bit-depth:bits=1")
    model = D.DefendedModel(clf, defense)
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(xr), y), xr)
    z = (x > 0.5).float().requires_grad_()  # 1-bit squeezing, by hand
    (want,) = torch.autograd.grad(torch.nn.functional.cross_entropy(clf(z), y), z)
    assert g.abs().sum() > 0 and torch.allclose(g, want, atol=1e-7)
    # and the attack that the pipeline runs under 'bpda' is on exactly this model: it changes the
    # squeezed image (an attack on a constant function could not)
    spec = attacks.parse_attack("pgd:steps=5", "mnist")
    x_adv = attacks.run_attack(spec, model, x, y, seed=0)
    assert not torch.equal(defense.purify(x_adv), defense.purify(x))


class Noisy(D.Defense):
    """A cheap random defense, to exercise EOT and the expensive sizes without TVM's cost."""

    name, randomized = "noisy", True

    def purify(self, x):
        return (x + 0.05 * torch.randn_like(x)).clamp(0, 1)


def test_eot_and_expensive_sizes(checkpoint, monkeypatch):
    monkeypatch.setitem(D.DEFENSES, "noisy", Noisy)
    monkeypatch.setattr(evaluate, "EXPENSIVE_ATTACKS", frozenset({"fgsm"}))
    cfg = config(checkpoint, defenses=("none", "noisy"), eot=2)
    a = evaluate.run(cfg, quiet=True).to_json()
    n = {(r["defense"], r["attack"], r["threat"]): r["n"] for r in a["records"]}
    assert n == {
        ("none", "fgsm", "oblivious"): M, ("none", "pgd:steps=5", "oblivious"): N,
        ("noisy", "fgsm", "oblivious"): M, ("noisy", "fgsm", "bpda"): M, ("noisy", "fgsm", "eot"): M,
        ("noisy", "pgd:steps=5", "oblivious"): N, ("noisy", "pgd:steps=5", "bpda"): N,
        ("noisy", "pgd:steps=5", "eot"): M,
    }
    assert [(w["defense"], w["n"], w["runs"]) for w in a["worst_case"]] == [("none", M, 2), ("noisy", M, 6)]
    b = evaluate.run(cfg, quiet=True).to_json()  # a random defense is deterministic for a seed too
    assert without_seconds(a["records"]) == without_seconds(b["records"]) and a["clean"] == b["clean"]
    c = evaluate.run(config(checkpoint, defenses=("none", "noisy"), eot=2, seed=1), quiet=True).to_json()
    assert without_seconds(c["records"]) != without_seconds(a["records"])


def test_worst_case_is_per_example(checkpoint, monkeypatch):
    """Two attacks that each break a different half: each row 50%, the worst case 0%."""

    def fake_mask(spec, predict, x, x_adv, y, **kw):
        return torch.arange(len(x)) % 2 == (0 if spec.name == "fgsm" else 1)

    monkeypatch.setattr(attacks, "robust_mask", fake_mask)
    doc = evaluate.run(config(checkpoint, defenses=("none",), threats=("oblivious",)), quiet=True).to_json()
    assert doc["worst_case"][0]["robust_accuracy"] == 0.0
    assert doc["worst_case"][0]["n"] == N and doc["worst_case"][0]["runs"] == 2
    for r in doc["records"]:
        assert r["robust_accuracy"] <= 0.5


def test_cli_writes_reports_and_is_deterministic(checkpoint, evaluated, tmp_path):
    """The CLI, run with the fixture's settings and seed, gives the same records (timings aside)."""
    result, _ = evaluated
    out = tmp_path / "cli.json"
    args = ["eval", "--classifier", str(checkpoint), "--data-root", str(DATA), "--limit", str(N),
            "--limit-expensive", str(M), "--seed", "0", "--batch-size", "16", "--json", str(out),
            "--markdown", str(tmp_path / "r.md"), "--plot", str(tmp_path / "r.png"), "-q"]
    for d in DEFENSES:
        args += ["--defense", d]
    for a in ATTACKS:
        args += ["--attack", a]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "robust acc" in res.output and "worst case" in res.output
    doc = json.loads(out.read_text())
    first = result.to_json()
    assert without_seconds(doc["records"]) == without_seconds(first["records"])
    assert doc["clean"] == first["clean"] and doc["worst_case"] == first["worst_case"]
    assert (tmp_path / "r.md").stat().st_size > 0 and (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob(".*.tmp")), "no temporary files left behind"


def test_cli_errors_are_one_line(checkpoint, tmp_path):
    html = tmp_path / "page.safetensors"
    html.write_text("<html>not a checkpoint</html>")
    base = ["eval", "--classifier", str(checkpoint), "--data-root", str(DATA), "--limit", "4", "-q"]
    cases = [
        (base + ["--attack", "nope"], "unknown attack"),
        (base + ["--attack", "pgd:steps=zero"], "steps"),
        (base + ["--defense", "blur"], "unknown defense"),
        (["eval", "--classifier", str(checkpoint), "--data-root", str(tmp_path), "-q"], "not found"),
        (["eval", "--classifier", str(html), "--data-root", str(DATA), "-q"], "HTML"),
        (["eval", "--classifier", str(tmp_path / "missing.safetensors"), "-q"], "no such checkpoint"),
        (base + ["--dataset", "cifar10"], "3x32x32"),
        (base + ["--json", str(tmp_path)], "is a directory"),
    ]
    for args, needle in cases:
        res = CliRunner().invoke(cli, args, env={"PSSR_DATA_ROOT": None})
        assert res.exit_code != 0, args
        text = res.output.strip()
        assert len(text.splitlines()) == 1 and text.startswith("Error: ") and needle in text, (args, text)
        assert "Traceback" not in text and res.exception is None or isinstance(res.exception, SystemExit)


def test_per_defense_runs_merge_into_the_single_run_table(checkpoint, evaluated, tmp_path):
    """scripts/merge_eval.py: one run per defense, merged, gives the rows of one run over all."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("merge_eval", Path(__file__).parents[1] / "scripts" / "merge_eval.py")
    merge_eval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge_eval)
    whole = evaluated[0].to_json()
    parts = [evaluate.run(config(checkpoint, defenses=(d,)), quiet=True).to_json() for d in DEFENSES]
    merged = merge_eval.merge(parts)
    assert merged["clean"] == whole["clean"] and merged["worst_case"] == whole["worst_case"]
    key = lambda r: (r["defense"], r["attack"], r["threat"])  # noqa: E731
    assert sorted(without_seconds(merged["records"]), key=key) == sorted(without_seconds(whole["records"]), key=key)
    other = evaluate.run(config(checkpoint, defenses=("none",), seed=1), quiet=True).to_json()
    with pytest.raises(SystemExit, match="differ"):
        merge_eval.merge([parts[0], other])
