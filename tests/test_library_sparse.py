"""The libraries' sparse attacks (issue 17, item 2): torchattacks' OnePixel, Pixle, JSMA and SparseFool
and ART's universal AdversarialPatch, through the registry's presets and overrides and `pssr eval`.

Per attack: its L0 (changed pixels) is recorded; OnePixel and the patch never exceed their budget
(k pixels, one s×s square), while Pixle, JSMA and SparseFool are minimal-norm (an example counts
robust when the attack fails or needs more than k pixels); the same seed gives the same output,
the global torch and numpy RNGs are left as they were; and no trainer accepts them. The shipped
standard classifiers are attacked on a handful of test images with cheap settings (seconds).
ART's patch needs torchvision (pssr does not install it): without one, its one-line refusal is
tested, and its own tests are skipped.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pssr import attacks as A
from pssr import classifiers, train_purifier
from pssr.data import DataError, load_dataset
from pssr_cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
LIBRARY = ("onepixel", "pixle", "jsma", "sparsefool", "adversarial-patch")
MINIMAL = ("pixle", "jsma", "sparsefool")

# Cheap settings, per data set (JSMA's gamma bounds its iterations: 2 features each).
CHEAP = {
    "mnist": {"onepixel": "onepixel:eps=3,steps=2,popsize=20", "pixle": "pixle:restarts=4,max_iterations=3",
              "jsma": "jsma:gamma=0.01", "sparsefool": "sparsefool:steps=1",
              "adversarial-patch": "adversarial-patch:max_iter=2"},
    "cifar10": {"onepixel": "onepixel:eps=3,steps=2,popsize=20", "pixle": "pixle:restarts=4,max_iterations=3",
                "jsma": "jsma:gamma=0.002", "sparsefool": "sparsefool:steps=1",
                "adversarial-patch": "adversarial-patch:max_iter=2"},
}

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the 2 cores are shared


def torchvision_usable() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # a CUDA torchvision beside a CPU torch raises RuntimeError
        return False
    return True


needs_torchvision = pytest.mark.skipif(not torchvision_usable(), reason="ART's AdversarialPatchPyTorch needs torchvision")


def shipped(dataset: str, n: int):
    try:
        test = load_dataset(dataset, DATA, "test").subset(n)
    except (DataError, OSError) as exc:
        pytest.skip(f"no {dataset} copy under {DATA}: {exc}")
    model, _ = classifiers.load(ROOT / "pssr" / "weights" / f"classifier-{dataset}.safetensors")
    return model.eval(), test.images.float() / 255, test.labels.long()


@pytest.fixture(scope="module")
def data(one_thread):
    return {"mnist": shipped("mnist", 6), "cifar10": shipped("cifar10", 6)}


def fooled(model, x_adv, y) -> torch.Tensor:
    with torch.no_grad():
        return model(x_adv).argmax(1) != y


# --------------------------------------------------------------------------------------------
# The rows


def test_rows_say_what_each_attack_is():
    for dataset in ("mnist", "cifar10"):
        for name in LIBRARY:
            s = A.preset(name, dataset)
            assert s.norm == ("patch" if name == "adversarial-patch" else "L0")
            assert s.minimal_norm == (name in MINIMAL)
            assert s.gradient_free == (name in ("onepixel", "pixle"))  # score-based; the others take gradients
            assert ("eps" in s.kwargs) != s.minimal_norm
            assert name in A.EXPENSIVE_ATTACKS and name not in A.TRAINABLE_ATTACKS
            assert s.eps == (5 if name == "adversarial-patch" else 10)
            assert A.parse_attack(s.describe(), dataset) == s  # describe() reads back
    assert A.preset("jsma", "mnist").kwargs["gamma"] * 784 / 2 >= 12  # 24+ features: the k = 24 radius is in reach
    assert A.preset("jsma", "cifar10").kwargs["gamma"] * 3072 / 2 >= 36  # 72+ features = 24 pixels × 3 channels
    assert A.preset("pixle", "mnist").kwargs["restarts"] >= 24  # 1×1 moves: at most one pixel a restart
    assert A.library_sparse_attacks("mnist") == ["onepixel", "onepixel:eps=24", "pixle", "pixle:eps=24", "jsma", "jsma:eps=24",
                                                 "sparsefool", "sparsefool:eps=24", "adversarial-patch"]
    assert A.library_sparse_attacks("cifar10") == [*A.library_sparse_attacks("mnist"), "adversarial-patch:eps=8"]
    for text in A.library_sparse_attacks("cifar10"):
        A.parse_attack(text, "cifar10")
    assert A.parse_attack("one-pixel", "mnist").name == "onepixel" and A.parse_attack("art-patch", "mnist").name == "adversarial-patch"
    labels = {n: A.preset(n, "cifar10").label() for n in LIBRARY}
    assert labels == {"onepixel": "OnePixel L0 k=10 (10 steps, population 100)",
                      "pixle": "Pixle-L0 (k=10; 25×10 iterations)",
                      "jsma": "JSMA-L0 (k=10; γ=0.024, θ=1)",
                      "sparsefool": "SparseFool-L0 (k=10; 10 steps, λ=3)",
                      "adversarial-patch": "AdversarialPatch universal patch 5×5 (100 iterations, lr 0.1)"}


@pytest.mark.parametrize("text,error", [
    ("onepixel:eps=2.5", "not a whole number"), ("jsma:gamma=0", "in (0, 1]"), ("jsma:theta=0", "[-1, 0)"),
    ("pixle:pixel_mapping=nearest", "random, similarity"), ("pixle:restarts=0", "≥ 1"), ("sparsefool:lam=-1", "> 0"),
    ("adversarial-patch:eps=4.5", "not a whole number"), ("onepixel:gamma=0.1", "unknown parameter"),
])
def test_bad_overrides_are_one_line_errors(text, error):
    with pytest.raises(A.AttackError, match=error.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        A.parse_attack(text, "mnist")


@pytest.mark.parametrize("name", LIBRARY)
def test_no_trainer_takes_them(name):
    assert name not in train_purifier.TRAINING_ATTACKS
    with pytest.raises(train_purifier.TrainError, match="the training attack must be PGD"):
        train_purifier._training_attack("attack", name, "mnist")


# --------------------------------------------------------------------------------------------
# Budgets and scoring, per example


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_onepixel_changes_at_most_k_pixels(data, dataset):
    model, x, y = data[dataset]
    spec = A.parse_attack(CHEAP[dataset]["onepixel"], dataset)
    adv = A.run_attack(spec, model, x, y, seed=1, batch_size=4)
    l0 = A.perturbation_norms(x, adv).l0
    assert l0.max() <= spec.eps == 3 and (l0 > 0).any()
    assert ((adv != x).any(1).flatten(1).sum(1) <= 3).all()  # exact comparison, not the 1e-6 rule
    assert torch.equal(A.robust_mask(spec, model, x, adv, y), ~fooled(model, adv, y))


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
@pytest.mark.parametrize("name", MINIMAL)
def test_minimal_norm_attacks_count_robust_when_they_fail_or_need_more_than_k(data, dataset, name):
    model, x, y = data[dataset]
    text = CHEAP[dataset][name]
    spec = A.parse_attack(text, dataset)
    adv = A.run_attack(spec, model, x, y, seed=0, batch_size=4)
    l0 = A.perturbation_norms(x, adv).l0
    broke = fooled(model, adv, y)
    for k in (1, 10, 1000):  # the same examples, judged at three radii
        at_k = A.parse_attack(f"{text},eps={k}", dataset)
        assert at_k.minimal_norm and at_k.kwargs == spec.kwargs  # the radius is no attack parameter
        assert torch.equal(A.robust_mask(at_k, model, x, adv, y), ~broke | (l0 > k))
    assert (l0 > 0).any(), "the attack changed nothing"


# --------------------------------------------------------------------------------------------
# Seeds and side effects


@pytest.mark.parametrize("name", ["onepixel", "pixle", "jsma", "sparsefool"])
def test_seeded_and_no_global_rng_drawn(data, name):
    """OnePixel (scipy-style differential evolution) and Pixle draw from numpy's global RNG, which
    run_attack seeds per batch and restores; JSMA and SparseFool draw nothing (deterministic)."""
    model, x, y = data["cifar10"]
    spec = A.parse_attack(CHEAP["cifar10"][name], "cifar10")
    np.random.seed(123)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    first = A.run_attack(spec, model, x, y, seed=5, batch_size=3)
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert after[0] == np_state[0] and (after[1] == np_state[1]).all() and after[2:] == np_state[2:]
    assert torch.equal(first, A.run_attack(spec, model, x, y, seed=5, batch_size=3))
    other = A.run_attack(spec, model, x, y, seed=6, batch_size=3)
    if name in ("onepixel", "pixle"):
        assert not torch.equal(first, other)
    else:
        assert torch.equal(first, other)


# --------------------------------------------------------------------------------------------
# pssr eval end to end


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_pssr_eval_runs_each_library_sparse_attack(tmp_path, dataset):
    try:
        load_dataset(dataset, DATA, "test")
    except DataError as exc:
        pytest.skip(f"no {dataset} copy: {exc}")
    texts = [CHEAP[dataset][n] for n in ("onepixel", "pixle", "jsma", "sparsefool")]
    args = ["eval", "--classifier", str(ROOT / "pssr" / "weights" / f"classifier-{dataset}.safetensors"),
            "--data-root", str(DATA), "--defense", "none", "--limit", "5", "--limit-expensive", "4", "--batch-size", "4",
            "-q", "--json", str(tmp_path / "e.json")] + [a for t in texts for a in ("--attack", t)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "e.json").read_text())
    rows = {r["attack"]: r for r in doc["records"]}
    assert set(rows) == set(texts)
    for text, r in rows.items():
        assert r["n"] == 4 and r["threat"] == "oblivious"  # expensive: the first --limit-expensive images
        assert r["mean_l0"] > 0
        if text.startswith("onepixel"):
            assert r["mean_l0"] <= 3
        assert r["attack_label"] == A.parse_attack(text, dataset).label()
    assert {w["norm"] for w in doc["worst_case_by_norm"]} == {"L0"}


@pytest.mark.skipif(torchvision_usable(), reason="torchvision imports here")
def test_adversarial_patch_without_torchvision_says_so_in_one_line(tmp_path):
    try:
        load_dataset("mnist", DATA, "test")
    except DataError as exc:
        pytest.skip(f"no MNIST copy: {exc}")
    args = ["eval", "--classifier", str(ROOT / "pssr" / "weights" / "classifier-mnist.safetensors"),
            "--data-root", str(DATA), "--defense", "none", "--limit", "4", "--attack", "adversarial-patch:max_iter=2", "-q"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code != 0
    assert "needs torchvision" in res.output and "Traceback" not in res.output


# --------------------------------------------------------------------------------------------
# ART's universal patch (where torchvision imports)


@needs_torchvision
@pytest.mark.parametrize("dataset,s", [("mnist", 5), ("cifar10", 5), ("cifar10", 8)])
def test_patch_is_one_universal_square_pasted_whole(data, dataset, s):
    from pssr.attacks.art_patch import UniversalPatch

    model, x, y = data[dataset]
    atk = UniversalPatch(model, eps=s, max_iter=2, seed=3)
    adv = atk(x, y)
    patch = atk.patch
    assert patch.shape == (x.shape[1], s, s) and patch.min() >= 0 and patch.max() <= 1
    h, w = x.shape[2:]
    for i in range(len(x)):
        where = [(r, c) for r in range(h - s + 1) for c in range(w - s + 1) if torch.equal(adv[i, :, r:r + s, c:c + s], patch)]
        assert where, f"image {i}: the patch is not in it"
        r, c = where[0]
        outside = torch.ones(h, w, dtype=torch.bool)
        outside[r:r + s, c:c + s] = False
        assert torch.equal(adv[i][:, outside], x[i][:, outside])
    assert A.patch_side(x, adv).max() <= s


@needs_torchvision
def test_patch_through_run_attack_is_seeded_and_leaves_the_rngs(data):
    model, x, y = data["cifar10"]
    spec = A.parse_attack(CHEAP["cifar10"]["adversarial-patch"], "cifar10")
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    first = A.run_attack(spec, model, x, y, seed=2, batch_size=6)
    assert torch.equal(torch.get_rng_state(), torch_state) and (np.random.get_state()[1] == np_state[1]).all()
    assert torch.equal(first, A.run_attack(spec, model, x, y, seed=2, batch_size=6))
    assert not torch.equal(first, A.run_attack(spec, model, x, y, seed=3, batch_size=6))
    assert A.patch_side(x, first).max() <= 5
    A.robust_mask(spec, model, x, first, y)  # inside its budget


@needs_torchvision
def test_pssr_eval_runs_the_patch(tmp_path):
    try:
        load_dataset("mnist", DATA, "test")
    except DataError as exc:
        pytest.skip(f"no MNIST copy: {exc}")
    text = CHEAP["mnist"]["adversarial-patch"]
    args = ["eval", "--classifier", str(ROOT / "pssr" / "weights" / "classifier-mnist.safetensors"),
            "--data-root", str(DATA), "--defense", "none", "--limit", "4", "--attack", text, "-q",
            "--json", str(tmp_path / "e.json")]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    (r,) = json.loads((tmp_path / "e.json").read_text())["records"]
    assert r["attack"] == text and 0 < r["mean_l0"] <= 25
