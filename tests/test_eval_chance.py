"""`pssr eval` warns when clean accuracy is near chance: robust numbers then mean nothing."""

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pssr import classifiers, report
from pssr.classifiers import ClassifierSpec
from pssr.data import DataError, load_dataset
from pssr_cli.main import cli

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def doc(clean: dict[str, float], classes: int = 10, n: int = 100) -> dict:
    """The smallest evaluation document the reports draw: clean passes only."""
    return {
        "config": {"dataset": "mnist", "n": n, "n_expensive": n, "torch": "x", "threads": 1},
        "classifier": {"arch": "lenet", "path": "c.safetensors", "sha256": "0" * 64, "num_classes": classes,
                       "extra": {}},
        "records": [], "seed": 0, "worst_case": [],
        "clean": [{"defense": d, "n": n, "accuracy": a} for d, a in clean.items()],
    }


def test_near_chance_is_warned_in_the_terminal_and_markdown_notes():
    d = doc({"none": 0.12, "jpeg:quality=75": 0.90, "median": 0.15, "tvm": 0.151})
    warnings = report.chance_warnings(d)
    assert len(warnings) == 2
    assert warnings[0].startswith("warning: the classifier's own clean accuracy is 12.0%, near chance "
                                  "(1/10 = 10.0%) on 100 images: every robust accuracy in this report means nothing")
    assert warnings[1].startswith("warning: median: clean accuracy 15.0% behind this defense, near chance")
    for w in warnings:
        assert w in report.format_table(d) and f"- {w}" in report.format_markdown(d)
    assert report.chance_warnings(doc({"none": 0.99, "median": 0.16})) == []
    assert len(report.chance_warnings(doc({"none": 0.7}, classes=2))) == 1  # 1.5 / 2 = 75%
    assert report.chance_warnings(doc({"none": 0.6}, classes=1)) == []  # no chance level to speak of


def test_pssr_eval_of_a_classifier_that_always_says_zero(tmp_path):
    """A LeNet whose head says 3 whatever the image: right on 2 of the first 32 MNIST test images."""
    try:
        load_dataset("mnist", DATA, "test")
    except DataError as exc:
        pytest.skip(f"no MNIST copy: {exc}")
    spec = ClassifierSpec("lenet", 10, 1, 28, (0.1307,), (0.3081,), "mnist")
    torch.manual_seed(0)
    model = classifiers.build(spec)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    with torch.no_grad():
        head.bias[3] = 1.0
    path = tmp_path / "constant.safetensors"
    classifiers.save(path, model.eval(), spec)
    md = tmp_path / "eval.md"
    r = CliRunner().invoke(cli, ["eval", "--classifier", str(path), "--data-root", str(DATA), "--defense", "none",
                                 "--attack", "fgsm", "--limit", "32", "-q", "--markdown", str(md)])
    assert r.exit_code == 0, r.output
    warning = ("warning: the classifier's own clean accuracy is 6.2%, near chance (1/10 = 10.0%) on 32 images: "
               "every robust accuracy in this report means nothing")
    assert warning in r.output and warning in md.read_text()
