"""Sparse-RS (pssr.sparse_rs): its budgets, its seeding, its strength on the shipped standard
classifiers, the search's keep-if-better rule, and `pssr eval --attack sparse-rs...` end to end.

The strength tests attack the shipped undefended MNIST LeNet and CIFAR-10 ResNet-9 on 16 test
images with tens of queries (a few seconds each on one thread); the paper's regime (CIFAR-10,
k = 24, 1,000 queries, near-0% robust accuracy) is measured once, outside the tests (README).
"""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from pssr import attacks as A
from pssr import classifiers
from pssr.data import DataError, load_dataset
from pssr.attacks.sparse_rs import FOOLED, SparseRS
from pssr_cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the 2 cores are shared


def shipped(dataset: str, n: int):
    """(the shipped standard classifier, its first n test images, their labels)."""
    try:
        test = load_dataset(dataset, DATA, "test").subset(n)
    except (DataError, OSError) as exc:
        pytest.skip(f"no {dataset} copy under {DATA}: {exc}")
    model, _ = classifiers.load(ROOT / "pssr" / "weights" / f"classifier-{dataset}.safetensors")
    return model.eval(), test.images.float() / 255, test.labels.long()


@pytest.fixture(scope="module")
def mnist(one_thread):
    return shipped("mnist", 16)


@pytest.fixture(scope="module")
def cifar(one_thread):
    return shipped("cifar10", 16)


def changed_pixels(x, adv) -> torch.Tensor:
    """Per image, the pixels with any channel changed (exact comparison)."""
    return (adv != x).any(1)


def robust(model, adv, y) -> float:
    with torch.no_grad():
        return (model(adv).argmax(1) == y).float().mean().item()


# --------------------------------------------------------------------------------------------
# Budgets, asserted on the output


@pytest.mark.parametrize("k", [1, 10, 24])
def test_l0_never_changes_more_than_k_pixels(cifar, k):
    model, x, y = cifar
    atk = SparseRS(model, norm="L0", eps=k, n_queries=20, seed=k)
    adv = atk(x, y)
    assert adv.shape == x.shape and adv.dtype == x.dtype and adv.min() >= 0 and adv.max() <= 1
    counts = changed_pixels(x, adv).flatten(1).sum(1)
    assert counts.max() <= k
    attacked = atk.queries > 1
    assert attacked.any() and (counts[attacked] > 0).all()  # every attacked image came back perturbed
    if k != 10:
        return
    # through run_attack (the path pssr eval takes): the same budget, checked by _finish and robust_mask
    spec = A.parse_attack(f"sparse-rs:eps={k},n_queries=20", "cifar10")
    out = A.run_attack(spec, model, x, y, seed=3, batch_size=7)
    assert changed_pixels(x, out).flatten(1).sum(1).max() <= k
    assert A.perturbation_norms(x, out).l0.max() <= k
    A.robust_mask(spec, model, x, out, y)


@pytest.mark.parametrize("dataset,s", [("mnist", 5), ("cifar10", 5), ("cifar10", 8)])
def test_patch_changes_lie_inside_one_s_by_s_square(mnist, cifar, dataset, s):
    model, x, y = mnist if dataset == "mnist" else cifar
    adv = SparseRS(model, norm="patch", eps=s, n_queries=40, seed=1)(x, y)
    assert adv.min() >= 0 and adv.max() <= 1
    for moved in changed_pixels(x, adv):
        rows, cols = moved.any(1).nonzero().flatten(), moved.any(0).nonzero().flatten()
        if len(rows):
            assert rows[-1] - rows[0] < s and cols[-1] - cols[0] < s
    assert A.patch_side(x, adv).max() <= s


def test_the_patch_can_sit_anywhere_and_its_values_are_searched():
    """Positions from the first to the last row and column (rs_attacks.py's randint(h - s) missed the
    last); the content is {0, 1} per channel, not a copy of the image."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    x = torch.rand(200, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    y = model(x).argmax(1)
    adv = SparseRS(model, norm="patch", eps=3, n_queries=1, seed=0)(x, y)  # the initial patch only
    moved = changed_pixels(x, adv)
    rows, cols = moved.any(2), moved.any(1)
    assert rows[:, 0].any() and rows[:, -1].any() and cols[:, 0].any() and cols[:, -1].any()
    assert (moved.flatten(1).sum(1) == 9).all()
    assert set(adv[moved.unsqueeze(1).expand_as(adv)].unique().tolist()) == {0.0, 1.0}


def test_an_output_over_its_budget_is_an_error_not_a_projection(mnist, monkeypatch):
    model, x, y = mnist
    spec = A.parse_attack("sparse-rs:eps=3,n_queries=2", "mnist")

    def buggy(self, images, labels):
        out = images.clone()
        out[:, :, 0, :4] = 1 - out[:, :, 0, :4]  # 4 pixels > k = 3
        return out

    monkeypatch.setattr(SparseRS, "forward", buggy)
    with pytest.raises(A.AttackError, match="over the budget"):
        A.run_attack(spec, model, x[:2], y[:2])


# --------------------------------------------------------------------------------------------
# Seeds


def test_seeded_same_seed_same_output_other_seed_other_output(cifar):
    model, x, y = cifar
    x, y = x[:8], y[:8]
    for norm, eps in (("L0", 10), ("patch", 5)):
        rng = torch.get_rng_state()
        a = SparseRS(model, norm=norm, eps=eps, n_queries=15, seed=1)(x, y)
        assert torch.equal(torch.get_rng_state(), rng), "the global RNG is never drawn from nor reseeded"
        assert torch.equal(a, SparseRS(model, norm=norm, eps=eps, n_queries=15, seed=1)(x, y))
        assert not torch.equal(a, SparseRS(model, norm=norm, eps=eps, n_queries=15, seed=2)(x, y))
    spec = A.parse_attack("sparse-rs:n_queries=10", "cifar10")
    first = A.run_attack(spec, model, x, y, seed=5, batch_size=4)
    assert torch.equal(first, A.run_attack(spec, model, x, y, seed=5, batch_size=4))
    assert not torch.equal(first, A.run_attack(spec, model, x, y, seed=6, batch_size=4))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_runs_on_the_images_device_with_its_own_generator(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).to(device).eval()
    x = torch.rand(6, 3, 16, 16, device=device)
    y = model(x).argmax(1)
    for norm, eps in (("L0", 4), ("patch", 3)):
        a = SparseRS(model, norm=norm, eps=eps, n_queries=20, seed=0)(x, y)
        assert a.device == x.device and torch.equal(a, SparseRS(model, norm=norm, eps=eps, n_queries=20, seed=0)(x, y))
        assert A.budget_norm(A.parse_attack(f"sparse-rs{'-patch' if norm == 'patch' else ''}:eps={eps}", "cifar10"),
                             x, a).max() <= eps


# --------------------------------------------------------------------------------------------
# Strength on the shipped standard classifiers


def test_robust_accuracy_falls_as_k_grows(cifar):
    model, x, y = cifar
    acc = [robust(model, SparseRS(model, eps=k, n_queries=30, seed=0)(x, y), y) for k in (1, 4, 16)]
    assert acc[0] >= acc[1] >= acc[2] and acc[0] - acc[2] >= 0.3, acc  # measured 88%, 69%, 31%


def test_robust_accuracy_falls_as_the_patch_grows(cifar):
    model, x, y = cifar
    acc = [robust(model, SparseRS(model, norm="patch", eps=s, n_queries=30, seed=0)(x, y), y) for s in (2, 8)]
    assert acc[0] - acc[1] >= 0.15, acc  # measured 75%, 50%


def test_robust_accuracy_falls_as_the_query_budget_grows(cifar):
    model, x, y = cifar
    few, many = SparseRS(model, eps=4, n_queries=5, seed=0), SparseRS(model, eps=4, n_queries=100, seed=0)
    acc = [robust(model, few(x, y), y), robust(model, many(x, y), y)]
    assert acc[0] - acc[1] >= 0.2, acc  # measured 75%, 44%
    assert few.queries.max() <= 5 + 1 and many.queries.max() <= 100 + 1  # + the clean query


def test_restarts_only_add_and_only_correct_images_are_attacked(mnist):
    model, x, y = mnist
    y = y.clone()
    y[:3] = (y[:3] + 1) % 10  # three images the model gets wrong: left alone
    one = SparseRS(model, eps=10, n_queries=20, seed=0)
    two = SparseRS(model, eps=10, n_queries=20, n_restarts=2, seed=0)
    a1, a2 = one(x, y), two(x, y)
    assert torch.equal(a1[:3], x[:3]) and (one.queries[:3] == 1).all()
    assert robust(model, a2, y) <= robust(model, a1, y)  # the first restart is the same run
    assert two.queries.max() <= 2 * 20 + 1


# --------------------------------------------------------------------------------------------
# The search keeps improvements only


class Recorder(nn.Module):
    """The model, recording every query (images and margins)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, images):
        logits = self.model(images)
        self.calls.append((images.detach().clone(), logits.detach().clone()))
        return logits


def margins(logits, y):
    true = logits.gather(1, y[:, None]).squeeze(1)
    return true - logits.scatter(1, y[:, None], -float("inf")).amax(1)


@pytest.mark.parametrize("norm,eps", [("L0", 10), ("patch", 5)])
def test_the_margin_never_increases_the_best_query_is_returned(mnist, norm, eps):
    """Per image, the queries in order: the image returned is the one of least margin among all its
    queries (keep-if-better: a later, worse candidate never replaces a better one), and the margin
    kept after each query, the running minimum, never increases."""
    model, x, y = mnist
    rec = Recorder(model).eval()  # (torchattacks puts the model back in the mode it found it in)
    atk = SparseRS(rec, norm=norm, eps=eps, n_queries=60, seed=0)
    adv = atk(x, y)
    per_image = [[] for _ in x]
    for images, logits in rec.calls[1:]:  # after the clean query
        owner = (images[:, None] != x[None]).any(2).flatten(2).sum(2).argmin(1)  # the clean image it perturbs
        for i, m in zip(owner.tolist(), margins(logits, y[owner]).tolist()):
            per_image[i].append(m)
    with torch.no_grad():
        final = margins(model(adv), y)
    for i, seen in enumerate(per_image):
        assert len(seen) == atk.queries[i] - 1
        kept = torch.tensor(seen).cummin(0).values
        assert (kept[1:] <= kept[:-1]).all()
        assert abs(final[i].item() - kept[-1].item()) < 1e-4, (i, final[i], kept[-1])
        if kept[-1] < FOOLED:  # stopped querying once fooled
            assert seen.index(min(seen)) == len(seen) - 1


# --------------------------------------------------------------------------------------------
# pssr eval end to end


def test_pssr_eval_runs_sparse_rs_end_to_end_and_resumes(tmp_path):
    try:
        load_dataset("mnist", DATA, "test")
    except DataError as exc:
        pytest.skip(f"no MNIST copy: {exc}")
    args = ["eval", "--classifier", str(ROOT / "pssr" / "weights" / "classifier-mnist.safetensors"),
            "--data-root", str(DATA), "--defense", "none", "--defense", "bit-depth:bits=1",
            "--attack", "sparse-rs:n_queries=20", "--attack", "sparse-rs-patch:n_queries=20", "--attack", "fgsm",
            "--limit", "8", "--limit-expensive", "6", "--batch-size", "4", "-q", "--state", str(tmp_path / "s"),
            "--json", str(tmp_path / "e.json"), "--markdown", str(tmp_path / "e.md")]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "Sparse-RS L0 k=10 (20 queries)" in res.output and "mean L0" in res.output
    doc = json.loads((tmp_path / "e.json").read_text())
    rows = {(r["defense"], r["attack"], r["threat"]): r for r in doc["records"]}
    assert set(rows) == {(d, a, t) for d in ("none", "bit-depth:bits=1")
                         for a in ("sparse-rs:n_queries=20", "sparse-rs-patch:n_queries=20", "fgsm")
                         for t in (("oblivious",) if d == "none" else ("oblivious", "bpda"))}
    for (_, attack, _), r in rows.items():
        if attack.startswith("sparse-rs"):
            assert r["n"] == 6  # an expensive attack: the first --limit-expensive images
            assert 0 < r["mean_l0"] <= (10 if attack.startswith("sparse-rs:") else 25)
        else:
            assert r["n"] == 8 and r["mean_l0"] > 25  # FGSM moves nearly every pixel
    norms = {(w["defense"], w["norm"]): w for w in doc["worst_case_by_norm"]}
    assert set(norms) == {(d, n) for d in ("none", "bit-depth:bits=1") for n in ("Linf", "L0", "patch")}
    for w in doc["worst_case"]:
        assert all(w["robust_accuracy"] <= norms[(w["defense"], n)]["robust_accuracy"] for n in ("Linf", "L0", "patch"))
        assert sum(norms[(w["defense"], n)]["runs"] for n in ("Linf", "L0", "patch")) == w["runs"]
    md = (tmp_path / "e.md").read_text()
    for group in ("L∞", "L0", "patch"):
        assert f"*worst case, {group} attacks, per example*" in md
    again = CliRunner().invoke(cli, args)  # every run replayed from the state file: the same report
    assert again.exit_code == 0
    redone = json.loads((tmp_path / "e.json").read_text())
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in redone["records"]] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in doc["records"]]
    assert redone["worst_case_by_norm"] == doc["worst_case_by_norm"]
