"""pssr.figures: example panels computed from a purifier, the example grid and the ε curve."""

import numpy as np
import pytest
import torch
from PIL import Image

from pssr import checkpoint, classifiers, figures, purifier
from pssr.regeneration import Regenerator, RegeneratorSpec
from pssr.surgery import SurgeryConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(Purifier, its checkpoint path, classifier, spec): the shipped MNIST classifier, a random width-8 G."""
    torch.set_num_threads(1)
    clf, cspec = classifiers.load(purifier.shipped_path("classifier-mnist"))
    torch.manual_seed(0)
    G = Regenerator(RegeneratorSpec(1, 8, 0.0)).eval()
    spec = purifier.PurifierSpec(G.spec, SurgeryConfig(), checkpoint.weights_sha256(clf.state_dict()),
                                 "classifier-mnist.safetensors", "mnist")
    path = tmp_path_factory.mktemp("p") / "p.safetensors"
    purifier.save(path, G, spec)
    return purifier.Purifier(clf, G, spec.surgery).eval(), path, clf, cspec


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 28, 28, generator=g)
    x_adv = (x + 0.3 * torch.randn(x.shape, generator=g).sign()).clamp(0, 1)
    return x, x_adv, [3, 5]


def _png(path) -> Image.Image:
    with Image.open(path) as img:
        img.verify()
    img = Image.open(path)
    assert img.format == "PNG"
    return img


def test_example_row_holds_the_four_stages_and_their_predictions(tiny, batch):
    p, _, clf, _ = tiny
    x, x_adv, y = batch
    row = figures.example_row(p, "PGD", x, x_adv, y)
    with torch.no_grad():
        res = p.purify(x_adv)
        for stage, images in zip(row.stages(), (x, x_adv, res.x_s, res.x_hat)):
            torch.testing.assert_close(stage.images, images, rtol=0, atol=0)
            assert stage.preds == clf(images).argmax(1).tolist()
    assert row.labels == y and torch.equal(row.mask, res.mask)


def test_example_row_takes_a_bound_pssr_defense(tiny, batch):
    p, path, clf, cspec = tiny
    x, x_adv, y = batch
    defense = purifier.PssrDefense(str(path))
    with pytest.raises(ValueError, match="bind"):
        figures.example_row(defense, "PGD", x, x_adv, y)
    defense.bind(clf, cspec)
    row = figures.example_row(defense, "PGD", x, x_adv, y)
    assert torch.equal(row.regenerated.images, figures.example_row(p, "PGD", x, x_adv, y).regenerated.images)


def test_example_grid_panels_and_size(tiny, batch, tmp_path):
    p, _, _, cspec = tiny
    x, x_adv, y = batch
    rows = [figures.example_row(p, "PGD-40 L∞ ε=0.3", x, x_adv, y)]
    # a row built by hand from numpy arrays (k = 1, (k, H, W) images), as another pipeline might
    a = np.zeros((1, 28, 28), np.float32)
    stage = figures.Stage(a, [7])
    rows.append(figures.ExampleRow("FGSM", [7], stage, figures.Stage(a, [1]), stage, stage, mask=a > 0))
    fig = figures.example_figure(rows, cspec.classes)
    assert len(fig.axes) == 2 * 4 * 2  # rows x (4 stages x 2 images)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 4 * 2 + 4 * 1
    titles = [ax.get_title() for ax in shown]
    assert [t.split("\n")[0] for t in titles[:4]] == list(figures.STAGES)
    assert titles[-3] == "adversarial\npred 1 (true 7)"
    assert shown[-3].title.get_color() == "tab:red" and shown[-4].title.get_color() == "tab:green"
    figures.example_grid(rows, tmp_path / "grid.png", cspec.classes)
    w, h = figures.PANEL_PX
    assert _png(tmp_path / "grid.png").size == (4 * 2 * w, 2 * h) == (1120, 360)
    assert [f.name for f in tmp_path.iterdir()] == ["grid.png"]  # no temporary file left


def test_eps_curve_two_defenses_three_eps(tmp_path):
    eps = [0.0, 0.1, 0.3]
    curves = [figures.Curve("none", eps, [0.99, 0.2, 0.0]), figures.Curve("pssr", np.array(eps), [0.9, 0.7, 0.4])]
    fig = figures.eps_figure(curves)
    (ax,) = fig.axes
    assert [line.get_label() for line in ax.lines] == ["none", "pssr"]
    assert [list(line.get_ydata()) for line in ax.lines] == [[99.0, 20.0, 0.0], [90.0, 70.0, 40.0]]
    figures.eps_curve(curves, tmp_path / "sub" / "eps.png")
    assert _png(tmp_path / "sub" / "eps.png").size == figures.EPS_PX == (600, 400)


def test_curves_from_result_takes_the_strongest_threat_per_eps():
    def rec(defense, attack, threat, acc):
        return {"defense": defense, "attack": attack, "threat": threat, "robust_accuracy": acc}

    doc = {
        "config": {"dataset": "mnist", "preset_dataset": "mnist"},
        "clean": [{"defense": "none", "accuracy": 0.99}, {"defense": "pssr", "accuracy": 0.9},
                  {"defense": "jpeg", "accuracy": 0.98}],
        "records": [
            rec("none", "pgd:eps=0.1", "oblivious", 0.3), rec("none", "pgd", "oblivious", 0.0),
            rec("pssr", "pgd:eps=0.1", "oblivious", 0.8), rec("pssr", "pgd:eps=0.1", "bpda", 0.6),
            rec("pssr", "pgd", "bpda", 0.4), rec("pssr", "fgsm", "bpda", 0.1), rec("jpeg", "fgsm", "bpda", 0.5),
        ],
    }
    curves = figures.curves_from_result(doc)
    assert [(c.defense, list(c.eps), list(c.accuracy)) for c in curves] == [
        ("none", [0.0, 0.1, 0.3], [0.99, 0.3, 0.0]), ("pssr", [0.0, 0.1, 0.3], [0.9, 0.6, 0.4])]


def test_eval_writes_the_example_grid_and_the_eps_curve(tiny, tmp_path):
    from click.testing import CliRunner

    from pssr_cli.main import cli

    _, path, _, _ = tiny
    base = ["eval", "--classifier", str(purifier.shipped_path("classifier-mnist")), "--data-root", "../shared/data",
            "--limit", "6", "--threat", "oblivious", "--attack", "pgd:eps=0.1,steps=2", "--attack", "pgd:steps=2", "-q"]
    grid, curve = tmp_path / "grid.png", tmp_path / "curve.png"
    r = CliRunner().invoke(cli, [*base, "--defense", "none", "--defense", f"pssr:path={path}",
                                 "--examples", str(grid), "--eps-curve", str(curve)])
    assert r.exit_code == 0, r.output
    assert _png(grid).size == (4 * 3 * 140, 2 * 180)  # 2 attacks, 3 images of 4 panels
    assert _png(curve).size == (600, 400)
    r = CliRunner().invoke(cli, [*base, "--defense", "none", "--examples", str(tmp_path / "g2.png")])
    assert r.exit_code == 1 and "add --defense pssr" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "g2.png").exists()
