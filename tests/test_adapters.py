"""pssr from torchattacks and IBM ART (pssr.adapters) gives the numbers `pssr eval` gives.

A tiny purifier (a randomly initialised G, as in test_purifier.py) bound to the shipped MNIST
classifier, 16 test images, 5-step attacks. The surgery is set to α = 4 so that a random G still
leaves the classifier right on most clean images (75%), and an attack has something to lower.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchattacks

import pssr
from pssr import attacks, checkpoint, classifiers, evaluate, purifier
from pssr.data import DataError, load_dataset
from pssr.defenses import DefendedModel, parse_defense
from pssr.regeneration import Regenerator, RegeneratorSpec
from pssr.surgery import SurgeryConfig

DATA = "../shared/data"
N = 16
SURGERY = SurgeryConfig(alpha=4.0)
ATTACK = "pgd:eps=0.1,steps=5"  # pssr eval's PGD preset with a smaller budget: some images survive


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the 2 cores are shared


@pytest.fixture(scope="module")
def mnist():
    try:
        d = load_dataset("mnist", DATA, "test").subset(N)  # the first N, as pssr eval takes them
    except DataError as exc:
        pytest.skip(f"no MNIST copy: {exc}")
    return d.images.float() / 255, d.labels


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(purifier checkpoint path, classifier path, classifier, its spec, the in-memory Purifier)."""
    cpath = purifier.shipped_path("classifier-mnist")
    f, cspec = classifiers.load(cpath)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        G = Regenerator(RegeneratorSpec(1, 8, 0.0)).eval()
    spec = purifier.PurifierSpec(RegeneratorSpec(1, 8, 0.0), SURGERY, checkpoint.weights_sha256(f.state_dict()),
                                 cpath.name, "mnist")
    path = tmp_path_factory.mktemp("purifier") / "tiny.safetensors"
    purifier.save(path, G, spec)
    return path, cpath, f, cspec, purifier.Purifier(f, G, SURGERY).eval()


def eval_predictions(tiny, x):
    """The defended logits as pssr eval computes them (the bound `pssr:path=` defense's purify)."""
    path, _, f, cspec, _ = tiny
    defense = parse_defense(f"pssr:path={path}")
    defense.bind(f, cspec)
    with torch.no_grad():
        return f(defense.purify(x))


def input_gradient(model, x, y):
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xr), y), xr)
    return g


def onehot(y):
    return np.eye(10, dtype=np.float32)[y.numpy()]


def test_torchattacks_pgd_on_the_module_is_pssr_eval_bpda(tiny, mnist, monkeypatch):
    """Same N images, same seed: the same adversarial examples and robust accuracy as pssr eval."""
    path, cpath, *_ = tiny
    x, y = mnist
    made = []
    run_attack = attacks.run_attack
    monkeypatch.setattr(attacks, "run_attack", lambda *a, **kw: made.append(run_attack(*a, **kw)) or made[-1])
    name = f"pssr:path={path}"
    result = evaluate.run(evaluate.Config(classifier=str(cpath), data_root=DATA, defenses=(name,), attacks=(ATTACK,),
                                          threats=("bpda",), limit=N, limit_expensive=N, seed=0), quiet=True)
    (record,) = result.records

    model = pssr.load_defended_model(path, cpath, gradient="bpda")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    p = attacks.parse_attack(ATTACK, "mnist").kwargs
    pgd = torchattacks.PGD(model, eps=p["eps"], alpha=p["alpha"], steps=p["steps"], random_start=True)
    # pssr eval's seed for this run, then run_attack's seed for its first (only) batch
    seed = attacks._batch_seed(evaluate.run_seed(0, name, ATTACK, "bpda"), 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        x_adv = pgd(x, y)

    torch.testing.assert_close(x_adv, made[0], rtol=0, atol=1e-6)
    with torch.no_grad():
        clean, robust = model(x).argmax(1) == y, model(x_adv).argmax(1) == y
    assert clean.float().mean().item() == result.clean[0].accuracy >= 0.5
    assert (clean & robust).float().mean().item() == record.robust_accuracy
    assert 0 < record.robust_accuracy < result.clean[0].accuracy  # the attack bites, not completely


@pytest.mark.parametrize("gradient", ["bpda", "mask-fixed", "soft"])
def test_module_gradient_rule_is_pssr_evals(tiny, mnist, gradient):
    """defended_model(...) = pssr eval's DefendedModel: same logits, same gradient, per rule."""
    path, _, f, cspec, tiny_purifier = tiny
    x, y = mnist
    model = pssr.defended_model(f, tiny_purifier, gradient=gradient)
    defense = parse_defense(f"pssr:path={path}")
    defense.bind(f, cspec)
    reference = DefendedModel(f, defense, gradient=gradient)
    with torch.no_grad():
        assert torch.equal(model(x), eval_predictions(tiny, x))
    torch.testing.assert_close(input_gradient(model, x, y), input_gradient(reference, x, y))


def test_gradient_rules_differ_and_bad_arguments_fail(tiny, mnist):
    _, _, f, cspec, tiny_purifier = tiny
    x, y = mnist
    bpda = input_gradient(pssr.defended_model(f, tiny_purifier), x, y)  # the default rule
    fixed = input_gradient(pssr.defended_model(f, tiny_purifier, gradient="mask-fixed"), x, y)
    assert not torch.allclose(bpda, fixed)
    assert pssr.defended_model(f, tiny_purifier, gradient="soft-mask").gradient == "soft"
    with pytest.raises(ValueError, match="unknown gradient"):
        pssr.defended_model(f, tiny_purifier, gradient="identity")
    other = classifiers.build(cspec).eval()  # same architecture, other weights
    with pytest.raises(ValueError, match="another classifier"):
        pssr.defended_model(other, tiny_purifier)
    twin = classifiers.build(cspec).eval()
    twin.load_state_dict(f.state_dict())  # same weights, another module: accepted, attacked as one
    model = pssr.defended_model(twin, tiny_purifier)
    assert model.purifier.classifier is twin and model.classifier is twin


def test_art_preprocessor_predicts_like_pssr_and_differentiates_by_the_rule(tiny, mnist):
    """The documented ART set-up: PyTorchClassifier(model=classifier, preprocessing_defences=[adapter])."""
    from art.estimators.classification import PyTorchClassifier

    _, _, f, _, tiny_purifier = tiny
    x, y = mnist
    for gradient in ("bpda", "mask-fixed", "soft"):
        clf = PyTorchClassifier(model=f, loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 28, 28), nb_classes=10,
                                clip_values=(0, 1), preprocessing=None, device_type="cpu",
                                preprocessing_defences=[pssr.ArtPurifier(tiny_purifier, gradient)])
        assert np.array_equal(clf.predict(x.numpy()), eval_predictions(tiny, x).numpy())
        module = pssr.defended_model(f, tiny_purifier, gradient=gradient)
        art_gradient = torch.from_numpy(clf.loss_gradient(x.numpy(), onehot(y)))
        torch.testing.assert_close(art_gradient, input_gradient(module, x, y))


def test_art_pgd_matches_torchattacks_pgd_and_lowers_accuracy(tiny, mnist):
    """ART's PGD through the adapter makes torchattacks' PGD (no random start) examples."""
    from art.attacks.evasion import ProjectedGradientDescent

    path, cpath, *_ = tiny
    x, y = mnist
    model = pssr.load_defended_model(path, cpath)
    clf = pssr.art_classifier(model)
    p = attacks.parse_attack(ATTACK, "mnist").kwargs
    art_pgd = ProjectedGradientDescent(clf, norm=np.inf, eps=p["eps"], eps_step=p["alpha"], max_iter=p["steps"],
                                       num_random_init=0, batch_size=N, verbose=False)
    x_art = torch.from_numpy(art_pgd.generate(x.numpy(), y=onehot(y)))
    x_ta = torchattacks.PGD(model, eps=p["eps"], alpha=p["alpha"], steps=p["steps"], random_start=False)(x, y)
    torch.testing.assert_close(x_art, x_ta, rtol=0, atol=1e-6)
    assert (x_art - x).abs().max() <= p["eps"] + 1e-6 and 0 <= x_art.min() and x_art.max() <= 1
    clean = (clf.predict(x.numpy()).argmax(1) == y.numpy()).mean()
    robust = (clf.predict(x_art.numpy()).argmax(1) == y.numpy()).mean()
    assert clean >= 0.5 and robust < clean


def test_art_security_curve_runs_and_sees_no_gradient_masking(tiny, mnist):
    """ART 1.20's SecurityCurve: PGD per ε, then ε = 1 for 100 steps must reach chance level."""
    from art.evaluations.security_curve import SecurityCurve

    path, cpath, *_ = tiny
    x, y = (t[:8] for t in mnist)
    clf = pssr.art_classifier(pssr.load_defended_model(path, cpath))
    curve = SecurityCurve(eps=[0.05, 0.3])
    eps, accuracy, clean = curve.evaluate(clf, x.numpy(), onehot(y), eps_step=0.05, max_iter=3,
                                          num_random_init=0, batch_size=8, verbose=False)
    assert eps == [0.05, 0.3] and clean == (eval_predictions(tiny, x).argmax(1) == y).float().mean().item()
    assert accuracy[-1] < clean
    assert not curve.detected_obfuscating_gradients
