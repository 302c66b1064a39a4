"""Attack presets, parsing, and every attack run on a small MNIST classifier trained here.

The classifier is a real one, kept small so the whole module runs in seconds on two busy CPU
cores: a pssr `Classifier` (normalisation as its first layer, a BatchNorm, two strided convs),
trained 200 SGD steps on 4,000 MNIST training images (~93% on the test images used).
Torch runs single-threaded here: with a training job sharing the two cores, two intra-op
threads made each step ~40x slower (they spin waiting for each other).
"""

import math
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from pssr import attacks as A
from pssr.classifiers import Classifier, Normalize

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
N_TEST = 64


@pytest.fixture(scope="module")
def mnist():
    """(model, x, y, clean accuracy): a trained MNIST CNN and N_TEST test images."""
    from pssr.data import DataError, load_dataset

    try:
        train = load_dataset("mnist", DATA, "train").subset(4000, seed=0)
        test = load_dataset("mnist", DATA, "test").subset(N_TEST, seed=0)
    except (DataError, OSError) as exc:
        pytest.skip(f"MNIST not available under {DATA}: {exc}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        body = nn.Sequential(
            nn.Conv2d(1, 16, 5, 2, 2), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 5, 2, 2), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(),
        )  # fmt: skip
        model = Classifier(Normalize((0.1307,), (0.3081,)), body, nn.Linear(64, 10))
        x_train, y_train = train.images.float() / 255, train.labels.long()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(0)
        for _ in range(200):
            i = torch.randint(0, len(x_train), (64,), generator=g)
            loss = nn.functional.cross_entropy(model(x_train[i]), y_train[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval().requires_grad_(False)
        x, y = test.images.float() / 255, test.labels.long()
        with torch.no_grad():
            clean = (model(x).argmax(1) == y).float().mean().item()
        assert clean > 0.85, f"the test classifier did not train ({clean:.0%})"
        yield model, x, y, clean
    finally:
        torch.set_num_threads(threads)


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


# --------------------------------------------------------------------------------------------
# Presets, labels, parsing


def test_presets_follow_design_section_5():
    m = {n: A.preset(n, "mnist") for n in A.ATTACKS}
    c = {n: A.preset(n, "cifar10") for n in A.ATTACKS}
    assert set(A.ATTACKS) == {"fgsm", "pgd", "pgd100", "pgd-l2", "cw", "deepfool", "mifgsm", "autoattack", "square",
                              "sparse-rs", "sparse-rs-patch", "onepixel", "pixle", "jsma", "sparsefool", "adversarial-patch"}
    assert m["pgd"].kwargs == {"eps": 0.3, "alpha": 0.01, "steps": 40, "random_start": True}
    assert c["pgd"].kwargs == {"eps": 8 / 255, "alpha": 2 / 255, "steps": 20, "random_start": True}
    assert c["pgd100"].kwargs["steps"] == 100 and c["pgd100"].eps == 8 / 255
    assert (m["pgd-l2"].norm, m["pgd-l2"].eps, c["pgd-l2"].eps) == ("L2", 2.0, 0.5)
    assert c["deepfool"].kwargs == {"steps": 50, "overshoot": 0.02}
    assert (m["cw"].eps, c["cw"].eps, m["deepfool"].eps, c["deepfool"].eps) == (2.0, 0.5, 2.0, 0.5)
    assert c["autoattack"].kwargs == {"eps": 8 / 255, "norm": "Linf", "version": "standard", "steps": 100,
                                      "n_target_classes": 9, "n_queries": 5000}  # fmt: skip
    for specs in (m, c):
        for name, s in specs.items():
            assert s.name == name and s.params == tuple(sorted(s.params)) and hash(s) == hash(A.preset(name, "mnist" if specs is m else "cifar10"))
            assert s.minimal_norm == (name in ("cw", "deepfool", "pixle", "jsma", "sparsefool"))
            assert s.gradient_free == (name in ("square", "sparse-rs", "sparse-rs-patch", "onepixel", "pixle"))
            norms = {"cw": "L2", "deepfool": "L2", "pgd-l2": "L2", "sparse-rs": "L0", "sparse-rs-patch": "patch",
                     "onepixel": "L0", "pixle": "L0", "jsma": "L0", "sparsefool": "L0", "adversarial-patch": "patch"}
            assert s.norm == norms.get(name, "Linf")
            assert ("eps" in s.kwargs) != s.minimal_norm  # eps is a torchattacks kwarg only when it bounds the attack
    assert A.preset("pgd", "cifar100") == A.preset("pgd", "svhn") == c["pgd"]
    assert A.preset("PGD", "MNIST") == m["pgd"]
    assert set(A.default_attacks("mnist")) == {"fgsm", "pgd", "cw", "deepfool", "autoattack"}
    assert set(A.default_attacks("cifar10")) == {"fgsm", "pgd", "pgd100", "cw", "deepfool", "autoattack", "pgd-l2"}
    assert A.default_attacks("cifar100") == A.default_attacks("cifar10")
    # issue 17's sparse presets: k = 10 and 24 pixels, 5x5 patches, 8x8 on CIFAR-10; >= 1000 queries
    for specs in (m, c):
        assert (specs["sparse-rs"].eps, specs["sparse-rs-patch"].eps) == (10, 5)
        assert specs["sparse-rs"].kwargs == {"eps": 10, "n_queries": 1000, "n_restarts": 1, "p_init": 0.3, "loss": "margin"}
        assert specs["sparse-rs-patch"].kwargs["p_init"] == 0.4 and specs["sparse-rs-patch"].kwargs["n_queries"] >= 1000
    assert A.sparse_attacks("mnist") == ["sparse-rs", "sparse-rs:eps=24", "sparse-rs-patch"]
    assert A.sparse_attacks("cifar10") == [*A.sparse_attacks("mnist"), "sparse-rs-patch:eps=8"]
    assert A.EXPENSIVE_ATTACKS == {"autoattack", "square", "sparse-rs", "sparse-rs-patch", "onepixel", "pixle", "jsma",
                                   "sparsefool", "adversarial-patch"}


def test_trainable_rows_are_the_purifier_trainers_attacks():
    from pssr import train_purifier

    assert A.TRAINABLE_ATTACKS == set(train_purifier.TRAINING_ATTACKS)
    assert not A.TRAINABLE_ATTACKS & {"sparse-rs", "sparse-rs-patch", "square", "onepixel", "pixle", "jsma", "sparsefool",
                                      "adversarial-patch"}


@pytest.mark.parametrize(
    "text,dataset,label",
    [
        ("fgsm", "mnist", "FGSM L∞ ε=0.3"),
        ("pgd", "mnist", "PGD-40 L∞ ε=0.3"),
        ("pgd", "cifar10", "PGD-20 L∞ ε=8/255"),
        ("pgd100", "cifar10", "PGD-100 L∞ ε=8/255"),
        ("pgd-l2", "cifar10", "PGD-20 L2 ε=0.5"),
        ("pgd-l2", "mnist", "PGD-40 L2 ε=2.0"),
        ("cw", "mnist", "CW-L2 (ε=2.0)"),
        ("cw", "cifar10", "CW-L2 (ε=0.5)"),
        ("deepfool", "cifar100", "DeepFool-L2 (ε=0.5)"),
        ("mifgsm", "cifar10", "MI-FGSM-10 L∞ ε=8/255"),
        ("autoattack", "cifar10", "AutoAttack L∞ ε=8/255"),
        ("autoattack", "mnist", "AutoAttack L∞ ε=0.3"),
        ("autoattack:steps=10", "mnist", "AutoAttack L∞ ε=0.3 (non-standard: steps=10)"),
        ("square", "mnist", f"Square L∞ ε=0.3 ({A.SQUARE_QUERIES} queries)"),
        ("pgd:eps=0.2,steps=7", "mnist", "PGD-7 L∞ ε=0.2"),
        ("sparse-rs", "cifar10", "Sparse-RS L0 k=10 (1000 queries)"),
        ("sparse-rs:eps=24,n_restarts=2", "mnist", "Sparse-RS L0 k=24 (1000 queries, 2 restarts)"),
        ("sparse-rs-patch:eps=8,n_queries=3000", "cifar10", "Sparse-RS patch 8×8 (3000 queries)"),
    ],
)
def test_labels(text, dataset, label):
    assert A.parse_attack(text, dataset).label() == label


def test_parse_overrides():
    s = A.parse_attack("pgd:eps=0.1,steps=10,alpha=0.01", "mnist")
    assert (s.eps, s.kwargs) == (0.1, {"eps": 0.1, "alpha": 0.01, "steps": 10, "random_start": True})
    assert A.parse_attack(" pgd : eps = 4/255 , random_start=false ", "cifar10").kwargs == {
        "eps": 4 / 255, "alpha": 1 / 255, "steps": 20, "random_start": False}  # fmt: skip
    # alpha keeps its ratio to eps when only eps is given; MI-FGSM's alpha is eps/steps
    assert math.isclose(A.parse_attack("pgd:eps=0.15", "mnist").kwargs["alpha"], 0.005)
    # fewer steps than the preset: alpha * steps keeps the preset's travel; more steps: same alpha
    assert math.isclose(A.parse_attack("pgd:steps=10", "mnist").kwargs["alpha"], 0.04)
    assert A.parse_attack("pgd:steps=40", "mnist") == A.preset("pgd", "mnist")
    assert math.isclose(A.parse_attack("pgd:steps=100", "mnist").kwargs["alpha"], 0.01)
    assert math.isclose(A.parse_attack("pgd:steps=10,alpha=0.02", "mnist").kwargs["alpha"], 0.02)
    assert math.isclose(A.parse_attack("mifgsm:steps=5", "mnist").kwargs["alpha"], 0.06)
    assert A.parse_attack("mifgsm:alpha=0.01", "mnist").kwargs["alpha"] == 0.01
    cw = A.parse_attack("cw:eps=1.5,c=2,steps=20", "mnist")
    assert cw.eps == 1.5 and cw.kwargs == {"c": 2.0, "kappa": 0.0, "steps": 20, "lr": 0.1}
    sq = A.parse_attack("square:norm=l2,eps=2,n_queries=1e3", "mnist")
    assert (sq.norm, sq.eps, sq.kwargs["n_queries"], sq.kwargs["norm"]) == ("L2", 2.0, 1000, "L2")
    for name in A.ATTACKS:
        for ds in ("mnist", "cifar10"):
            spec = A.preset(name, ds)
            assert A.parse_attack(name, ds) == spec
            assert A.parse_attack(spec.describe(), ds) == spec  # describe() reads back
    assert A.parse_attack("cw-l2", "mnist") == A.preset("cw", "mnist")


@pytest.mark.parametrize(
    "text,match",
    [
        ("blur", "unknown attack 'blur'"),
        ("", "empty attack"),
        ("pgd:foo=1", "unknown parameter 'foo'"),
        ("pgd:eps", "expected key=value"),
        ("pgd:eps=abc", "eps='abc'"),
        ("pgd:eps=-0.1", "eps='-0.1'"),
        ("pgd:eps=inf", "eps='inf'"),
        ("pgd:eps=1/0", "eps='1/0'"),
        ("pgd:steps=2.5", "steps='2.5'"),
        ("pgd:random_start=maybe", "random_start"),
        ("pgd:eps=0.1,eps=0.2", "given twice"),
        ("pgd:norm=L2", "pgd-l2"),
        ("square:loss=hinge", "margin or ce"),
        ("fgsm:steps=3", "unknown parameter 'steps'"),
        ("deepfool:overshoot=-1", "overshoot"),
        ("sparse-rs:eps=2.5", "not a whole number"),
        ("sparse-rs-patch:eps=1/2", "not a whole number"),
        ("sparse-rs:norm=L2", "its norm is L0 only"),
        ("sparse-rs:p_init=0", "p_init"),
    ],
)
def test_parse_errors_are_one_line(text, match):
    with pytest.raises(A.AttackError, match=match) as info:
        A.parse_attack(text, "mnist")
    assert "\n" not in str(info.value)
    with pytest.raises(A.AttackError):
        A.preset("nope", "mnist")


# --------------------------------------------------------------------------------------------
# Every attack on the trained classifier

# (attack with small step/query counts, the most robust accuracy it may leave at ε=0.3 / 2.0)
CASES = [
    ("fgsm", 0.3),
    ("pgd:steps=10,alpha=0.05", 0.05),  # PGD at ε=0.3 on an undefended MNIST CNN: ~0%
    ("pgd100:steps=5,alpha=0.08", 0.3),
    ("pgd-l2:steps=10,alpha=0.5", 0.5),
    ("cw:steps=50", 0.65),
    ("deepfool:steps=10", 0.5),
    ("mifgsm", 0.3),
    ("square:n_queries=100", 0.5),
]


@pytest.mark.parametrize("text,most", CASES, ids=[c[0].split(":")[0] for c in CASES])
def test_attack_runs_bounded_effective_deterministic(mnist, text, most):
    model, x, y, clean = mnist
    spec = A.parse_attack(text, "mnist")
    seen = []
    x_adv = A.run_attack(spec, model, x, y, seed=0, batch_size=40, progress=seen.append)
    assert seen == [40, N_TEST]
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and torch.isfinite(x_adv).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    linf, l2, _ = A.perturbation_norms(x, x_adv)
    if not spec.minimal_norm:
        bound = linf if spec.norm == "Linf" else l2
        assert bound.max() <= spec.eps + (1e-6 if spec.norm == "Linf" else 1e-5)
    robust = A.robust_mask(spec, model, x, x_adv, y)
    assert robust.dtype == torch.bool and robust.shape == y.shape
    assert robust.float().mean().item() <= min(most, clean - 0.25), spec.label()
    if spec.minimal_norm:  # these find an adversarial for most images, some beyond the radius
        assert accuracy(model, x_adv, y) <= 0.45
        assert (robust == ((model(x_adv).argmax(1) == y) | (l2 > spec.eps))).all()
    else:
        assert (robust == (model(x_adv).argmax(1) == y)).all()
    again = A.run_attack(spec, model, x, y, seed=0, batch_size=40)
    assert torch.equal(x_adv, again), "same seed, same x_adv"


def test_random_start_follows_seed(mnist):
    model, x, y, _ = mnist
    spec = A.parse_attack("pgd:steps=1", "mnist")
    a = A.run_attack(spec, model, x[:8], y[:8], seed=1)
    assert torch.equal(a, A.run_attack(spec, model, x[:8], y[:8], seed=1))
    assert not torch.equal(a, A.run_attack(spec, model, x[:8], y[:8], seed=2))


def test_autoattack_standard_preset(mnist):
    model, x, y, clean = mnist
    spec = A.preset("autoattack", "mnist")
    t = time.perf_counter()
    x_adv = A.run_attack(spec, model, x[:16], y[:16], seed=0)
    assert time.perf_counter() - t < 30
    linf = A.perturbation_norms(x[:16], x_adv).linf
    assert linf.max() <= 0.3 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert A.robust_mask(spec, model, x[:16], x_adv, y[:16]).float().mean() <= 0.1


@pytest.mark.parametrize("name", A.ATTACKS)
def test_every_cifar_preset_runs_on_colour_images(name):
    """Shapes and bounds on 3-channel images (an untrained model: no claim about strength)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)).eval()
    small = {"pgd": "steps=2", "pgd100": "steps=2", "pgd-l2": "steps=2", "cw": "steps=3", "deepfool": "steps=3",
             "mifgsm": "steps=2", "autoattack": "steps=2,n_queries=5", "square": "n_queries=5",
             "sparse-rs": "n_queries=5", "sparse-rs-patch": "n_queries=5", "onepixel": "steps=2,popsize=10",
             "pixle": "restarts=2,max_iterations=2", "jsma": "gamma=0.01", "sparsefool": "steps=1",
             "adversarial-patch": "max_iter=2"}  # fmt: skip
    if name == "adversarial-patch":
        try:
            import torchvision  # noqa: F401  (ART's AdversarialPatchPyTorch needs it; pssr does not install it)
        except Exception:
            pytest.skip("no usable torchvision (tests/test_library_sparse.py tests the one-line refusal)")
    spec = A.parse_attack(f"{name}:{small[name]}" if name in small else name, "cifar10")
    x, y = torch.rand(3, 3, 16, 16), torch.tensor([0, 1, 2])
    x_adv = A.run_attack(spec, model, x, y, batch_size=2)
    assert x_adv.shape == x.shape and x_adv.min() >= 0 and x_adv.max() <= 1
    if not spec.minimal_norm:
        assert A.budget_norm(spec, x, x_adv).max() <= spec.eps + 1e-5
    A.robust_mask(spec, model, x, x_adv, y)


def test_autoattack_takes_the_number_of_classes_from_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5)).eval()  # 5 classes: 10 would crash APGD-T's targets
    x = torch.rand(6, 1, 4, 4)
    y = model(x).argmax(1)
    spec = A.parse_attack("autoattack:eps=0.01,steps=3,n_queries=5", "mnist")  # small ε: APGD-T and FAB-T run
    x_adv = A.run_attack(spec, model, x, y)
    assert (x_adv - x).abs().max() <= 0.01 + 1e-6
    with pytest.raises(A.AttackError, match="≥ 4 classes"):
        A.run_attack(spec, nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval(), x, y % 3)


# --------------------------------------------------------------------------------------------
# No side effects


def test_run_attack_leaves_model_and_torch_state_alone(mnist, capsys):
    model, x, y, _ = mnist
    model.classifier.train()  # one sub-module in train mode: its flag must survive
    head_weight = model.classifier.weight
    head_weight.requires_grad_(True)
    head_weight.grad = None  # (training left one)
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        rng = torch.get_rng_state()
        dtype = torch.get_default_dtype()
        for text in ("deepfool:steps=3", "cw:steps=3", "square:n_queries=5", "autoattack:steps=2,n_queries=5"):
            with torch.no_grad():  # attacks need gradients: run_attack turns them on itself
                x_adv = A.run_attack(A.parse_attack(text, "mnist"), model, x[:4], y[:4])
                assert not torch.is_grad_enabled()
            assert x_adv.shape == (4, 1, 28, 28)
        with torch.inference_mode():
            A.run_attack(A.parse_attack("pgd:steps=2", "mnist"), model, x[:4], y[:4])
        assert {name: m.training for name, m in model.named_modules()} == modes
        assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
        assert head_weight.grad is None, "CW and DeepFool call backward(): the model's .grad must stay untouched"
        assert torch.equal(torch.get_rng_state(), rng), "APGD/FAB/Square reseed the global RNG"
        assert torch.get_default_dtype() == dtype and torch.is_grad_enabled()
        assert capsys.readouterr().out == "", "torchattacks' prints stay off stdout"
    finally:
        model.eval().requires_grad_(False)


def test_run_attack_input_checks(mnist):
    model, x, y, _ = mnist
    spec = A.preset("fgsm", "mnist")
    for bad_x, bad_y, match in [
        (x[:2] * 2, y[:2], r"\[0, 1\]"),
        (x[:2], y[:3], "labels"),
        ((x[:2] * 255).to(torch.uint8), y[:2], "float"),
        (x[:2], y[:2].float(), "labels"),
    ]:
        with pytest.raises(A.AttackError, match=match):
            A.run_attack(spec, model, bad_x, bad_y)
    with pytest.raises(A.AttackError, match="AttackSpec"):
        A.run_attack("fgsm", model, x[:2], y[:2])
    assert A.run_attack(spec, model, x[:0], y[:0]).shape == (0, 1, 28, 28)
    x64 = A.run_attack(spec, model, x[:2].double(), y[:2])
    assert x64.dtype == torch.float64 and (x64 - x[:2].double()).abs().max() <= 0.3 + 1e-6


# --------------------------------------------------------------------------------------------
# Judging: norms and the minimal-norm rule


def test_perturbation_norms():
    x = torch.zeros(2, 1, 2, 2)
    x_adv = x.clone()
    x_adv[0, 0, 0, 0], x_adv[0, 0, 1, 1] = 0.3, -0.4
    linf, l2, l0 = A.perturbation_norms(x, x_adv)
    assert torch.allclose(linf, torch.tensor([0.4, 0.0], dtype=torch.float64))
    assert torch.allclose(l2, torch.tensor([0.5, 0.0], dtype=torch.float64))
    assert l0.tolist() == [2.0, 0.0] and l0.dtype == torch.float64


def test_l0_counts_pixels_not_channels_and_patch_side_is_the_bounding_square():
    x = torch.full((3, 3, 8, 8), 0.5)
    x_adv = x.clone()
    x_adv[0, :, 1, 1] = 1.0  # one pixel, all three channels: L0 1
    x_adv[0, 2, 6, 2] = 0.0  # one channel of another: L0 2; spans rows 1..6 -> side 6
    x_adv[1, 0, 3:5, 4:7] = 0.9  # a 2x3 block in one channel: L0 6, side 3
    x_adv[2] = x[2].double().float() + 1e-8  # float rounding is no change
    assert A.perturbation_norms(x, x_adv).l0.tolist() == [2.0, 6.0, 0.0]
    assert A.patch_side(x, x_adv).tolist() == [6.0, 3.0, 0.0]
    assert A.perturbation_norms(x.double(), x_adv.double() + 3e-8).l0.tolist() == [2.0, 6.0, 0.0]
    patch = A.parse_attack("sparse-rs-patch:eps=3", "cifar10")
    l0 = A.parse_attack("sparse-rs:eps=5", "cifar10")
    assert A.budget_norm(patch, x, x_adv).tolist() == [6.0, 3.0, 0.0]

    def predict(z):
        return torch.zeros(len(z), 10)

    y = torch.zeros(3, dtype=torch.long)
    for spec, ok in ((patch, [1, 2]), (l0, [0, 2])):  # within budget: scored; over it: an error
        assert A.robust_mask(spec, predict, x[ok], x_adv[ok], y[ok]).all()
        with pytest.raises(A.AttackError, match="exceeds the budget"):
            A.robust_mask(spec, predict, x, x_adv, y)


def test_robust_mask_minimal_norm_rule():
    """Robust: still correct, or the (minimal-norm) attack needed ‖δ‖ > ε. Class 1 iff perturbed."""

    def predict(z):
        moved = (z.flatten(1).abs().sum(1) > 0).long()
        return nn.functional.one_hot(moved, 2).float()

    x = torch.zeros(5, 1, 2, 2)
    y = torch.zeros(5, dtype=torch.long)
    x_adv = x.clone()
    for i, norm in enumerate([0.0, 0.5, 1.0, 1.5, 3.0]):
        x_adv[i, 0, 0, 0] = norm
    cw = A.parse_attack("cw:eps=1.0", "mnist")
    # untouched -> correct; 0.5 and exactly ε -> broken within the radius; 1.5, 3.0 -> beyond it
    want = torch.tensor([True, False, False, True, True])
    assert torch.equal(A.robust_mask(cw, predict, x, x_adv, y), want)
    assert torch.equal(A.robust_mask(cw, predict, x, x_adv, y, batch_size=2), want)
    deepfool = A.parse_attack("deepfool:eps=2.0", "cifar10")
    assert torch.equal(A.robust_mask(deepfool, predict, x, x_adv, y), torch.tensor([True, False, False, False, True]))
    # a norm-bounded attack is judged by the prediction only, and may not leave its ε-ball
    pgd = A.parse_attack("pgd-l2:eps=1.0", "mnist")
    assert torch.equal(A.robust_mask(pgd, predict, x[:3], x_adv[:3], y[:3]), torch.tensor([True, False, False]))
    with pytest.raises(A.AttackError, match="exceeds the budget"):
        A.robust_mask(pgd, predict, x, x_adv, y)
