"""Randomized ablation (Levine and Feizi, AAAI 2020; pssr/ablation.py): the encoding, the draws, the
vote, the certificate, the training key (with exact resume) and `pssr eval --defense ablation`."""

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pssr import ablation, classifiers, config, evaluate, train_classifier
from pssr import defenses as D
from pssr.data import load_dataset
from pssr_cli.main import cli

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason=f"real data not found at {DATA}")

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the 2 cores are shared

# A tiny ablation run: 3,000 images, 2 epochs of 64 (94 steps, ~15 s at one thread); resume: 512 images.
TINY = ["data.train_limit=3000", "data.test_limit=300", "train.epochs=2", "train.batch_size=64",
        "train.checkpoint_every=1000", "train.log_every=1000", "train.lr=0.05"]
RESUME = ["data.train_limit=512", "data.test_limit=100", "train.epochs=2", "train.batch_size=64",
          "train.checkpoint_every=3", "train.log_every=1000"]


def train(out, overrides=(), resume=False, preset="mnist-ablation"):
    cfg = config.load(train_classifier.ClassifierConfig, preset, list(overrides))
    return train_classifier.run(cfg, out, resume=resume, data_root=str(DATA), quiet=True)


# --------------------------------------------------------------------------------------------
# Encoding and draws


def test_encoding_distinguishes_ablated_from_every_real_value():
    values = torch.tensor([0.0, 1e-7, 0.25, 0.5, 0.75, 1 - 1e-7, 1.0, -3.0, 2.0])  # [0, 1] and beyond
    x = values.view(1, 1, 3, 3).repeat(1, 3, 1, 1)  # 3 channels
    kept = ablation.encode(x, torch.ones(1, 1, 3, 3, dtype=torch.bool))
    gone = ablation.encode(x, torch.zeros(1, 1, 3, 3, dtype=torch.bool))
    assert kept.shape == gone.shape == (1, 6, 3, 3)
    pair = lambda e: torch.stack([e[:, :3], e[:, 3:]], -1)  # (value, complement) per channel and pixel
    assert torch.equal(pair(kept)[..., 0], x) and torch.equal(pair(kept)[..., 1], 1 - x)
    assert torch.all(pair(gone) == 0)  # ablated: (0, 0)
    assert torch.all((pair(kept) != 0).any(-1))  # no real value encodes as (0, 0) ...
    assert torch.allclose(pair(kept).sum(-1), torch.ones(1, 3, 3, 3))  # ... its pair sums to 1, an ablated one to 0


def test_exactly_keep_pixels_survive_per_draw_uniformly():
    gen = torch.Generator().manual_seed(0)
    masks = ablation.keep_masks(4000, 7, 7, 5, gen)
    assert masks.shape == (4000, 1, 7, 7) and masks.dtype == torch.bool
    assert torch.all(masks.flatten(1).sum(1) == 5)
    share = masks.flatten(1).float().mean(0)  # each of 49 pixels kept with chance 5/49 ≈ 0.102
    assert share.min() > 0.08 and share.max() < 0.125
    x = torch.rand(6, 3, 28, 28) * 0.9 + 0.05
    enc = ablation.ablate(x, 45, torch.Generator().manual_seed(1))
    kept = (enc[:, :3] + enc[:, 3:]).sum(1) > 0  # pair sums: 1 per kept channel, 0 ablated
    assert torch.all(kept.flatten(1).sum(1) == 45)
    assert torch.equal(enc[:, :3] * kept[:, None], x * kept[:, None])  # the kept values themselves
    with pytest.raises(ValueError, match="keep must be from 1 to the 49 pixels"):
        ablation.keep_masks(1, 7, 7, 50)


def test_draws_are_seeded():
    draw = lambda seed: ablation.keep_masks(8, 28, 28, 45, torch.Generator().manual_seed(seed))
    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))
    torch.manual_seed(5)
    a = ablation.keep_masks(8, 28, 28, 45)  # the global generator, which pssr eval seeds per run
    torch.manual_seed(5)
    assert torch.equal(a, ablation.keep_masks(8, 28, 28, 45))
    clf = _Recorder()  # its class depends on the kept pixels
    x = torch.rand(5, 1, 28, 28)
    votes = [ablation.vote_counts(clf, x, 300, 30, torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(votes[0], votes[1]) and not torch.equal(votes[0], votes[2])
    defense = ablation.AblationDefense(keep=300, n=30)
    with evaluate.seeded(11):
        first = defense.classify(clf, x)
    with evaluate.seeded(11):
        assert torch.equal(first, defense.classify(clf, x))


# --------------------------------------------------------------------------------------------
# The vote


class _Recorder(torch.nn.Module):
    """A base classifier whose class depends on which pixels survive (the top-left kept pixels,
    mod 3), recording every prediction it makes."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, enc):
        kept = (enc[:, :1] + enc[:, 1:2]) > 0
        cls = kept[:, 0, :4, :4].flatten(1).sum(1) % 3
        self.seen.append(cls)
        return torch.nn.functional.one_hot(cls, 4).float() * 5


def _toy_classifier():
    torch.manual_seed(0)
    spec = classifiers.ClassifierSpec("lenet", 10, 1, 28, (0.13,), (0.31,), "mnist", ablation={"keep": 45,
                                                                                           "encoding": ablation.ENCODING})
    return classifiers.build(spec).eval()


def test_the_vote_is_the_majority_of_the_draws():
    x = torch.rand(6, 1, 28, 28)
    rec = _Recorder()
    counts = ablation.vote_counts(rec, x, 300, 25, torch.Generator().manual_seed(0))
    preds = torch.cat([p.view(6, -1) for p in rec.seen], 1)  # chunks of draws, image-major within each
    assert preds.shape == (6, 25)
    assert torch.equal(counts, torch.stack([torch.bincount(p, minlength=4) for p in preds]))
    assert counts.sum(1).eq(25).all() and counts[:, 3].eq(0).all()
    defense = ablation.AblationDefense(keep=300, n=25)
    with evaluate.seeded(1):
        scores = defense.classify(rec, x)
    rec.seen.clear()
    with evaluate.seeded(1):
        again = ablation.vote_counts(rec, x, 300, 25)
    assert torch.allclose(scores, again.float() / 25)
    majority = torch.tensor([max(range(4), key=lambda c: (int(row[c]), -c)) for row in again])  # ties: lower class
    assert torch.equal(scores.argmax(1), majority)
    # score=all: a class only where all n draws agree, else the extra last column
    unanimous = ablation.AblationDefense(keep=300, n=25, score="all")
    with evaluate.seeded(1):
        all_scores = unanimous.classify(rec, x)
    assert all_scores.shape == (6, 5)
    want = torch.where(again.max(1).values == 25, again.argmax(1), 4)
    assert torch.equal(all_scores.argmax(1), want)
    one = torch.zeros(1, 1, 28, 28)  # every pixel of the top-left block black: still class by count
    assert ablation.AblationDefense(keep=784, n=3, score="all").classify(rec, one).argmax(1).item() == 16 % 3


def test_the_soft_vote_is_differentiable_through_kept_pixels_only():
    clf = _toy_classifier()
    x = torch.rand(2, 1, 28, 28, requires_grad=True)
    torch.manual_seed(0)
    out = ablation.soft_vote(clf, x, 45, 1)
    assert out.shape == (2, 10) and torch.allclose(out.exp().sum(1), torch.ones(2))
    out[:, 3].sum().backward()
    torch.manual_seed(0)
    kept = ablation.keep_masks(2, 28, 28, 45)
    assert torch.all(x.grad[~kept.expand_as(x)] == 0) and x.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# The certificate


@pytest.mark.parametrize("p, k, d, radius", [
    (0.95, 1, 10, 4),  # Δ(ρ) = ρ/10: 0.95 − ρ/10 > 0.5 ⇔ ρ < 4.5
    (0.95, 2, 10, 2),  # C(10−ρ, 2)/45 = 36/45, 28/45, 21/45: > 0.55 up to ρ = 2
    (0.80, 2, 4, 0),  # C(3, 2)/C(4, 2) = 0.5 is not > 0.7
    (1.00, 2, 4, 0),  # 0.5 is not > 0.5 (strict)
    (1.00, 1, 10, 4),  # ρ/10 < 0.5 ⇔ ρ < 5
    (0.50, 1, 10, 0),  # a weak vote: no ρ at all
    (0.30, 45, 784, 0),
])
def test_the_certificate_matches_hand_computed_values(p, k, d, radius):
    assert ablation.certified_radius(torch.tensor([p]), d, k).tolist() == [radius]


def _exact_radius(p: Fraction, d: int, k: int) -> int:
    best = 0
    for rho in range(0, d - k + 2):
        if p - (1 - Fraction(math.comb(d - rho, k), math.comb(d, k))) > Fraction(1, 2):
            best = rho
        else:
            break
    return best


@pytest.mark.parametrize("d, k", [(784, 45), (1024, 75), (784, 1)])
def test_the_certificate_matches_exact_binomials(d, k):
    ps = [0.51, 0.6, 0.75, 0.9, 0.97, 0.99, 0.9997, 1.0]
    got = ablation.certified_radius(torch.tensor(ps, dtype=torch.float64), d, k).tolist()
    assert got == [_exact_radius(Fraction(p), d, k) for p in ps]
    if (d, k) == (784, 45):
        assert got[-2] == 11  # the paper's setting with every one of 10,000 draws right: ~11 pixels


def _binomial_tail(c, n, p):
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(c, n + 1))


@pytest.mark.parametrize("c, n", [(10, 10), (90, 100), (51, 100), (1, 20), (995, 1000)])
def test_clopper_pearson_lower_bound(c, n):
    alpha = 0.05
    lo = ablation.clopper_pearson_lower(torch.tensor([c]), n, alpha).item()
    assert _binomial_tail(c, n, lo) == pytest.approx(alpha, rel=1e-6)  # P(X ≥ c | p_lower) = alpha
    if c == n:
        assert lo == pytest.approx(alpha ** (1 / n))
    assert ablation.clopper_pearson_lower(torch.tensor([0]), n, alpha).item() == 0.0


def test_certify_end_to_end_strong_and_weak_votes():
    x = torch.rand(3, 1, 28, 28)

    class Constant(torch.nn.Module):
        def forward(self, enc):
            return torch.nn.functional.one_hot(torch.full((len(enc),), 3), 10).float()

    radius = ablation.certify(Constant(), x, torch.tensor([3, 3, 3]), 45, 500, 0.05)
    lower = 0.05 ** (1 / 500)
    assert radius.tolist() == [ablation.certified_radius(torch.tensor([lower]), 784, 45).item()] * 3
    assert radius[0] >= 8
    rec = _Recorder()  # thirds: the vote for any class is weak
    assert ablation.certify(rec, x, torch.tensor([0, 1, 2]), 300, 300, 0.05).tolist() == [0, 0, 0]
    assert ablation.median_radius(torch.tensor([-1, 3, 5, 7])) == 3


# --------------------------------------------------------------------------------------------
# Checkpoints and the defense's checks


def test_checkpoints_record_the_ablation_and_build_the_encoded_network(tmp_path):
    model = _toy_classifier()
    assert isinstance(model, ablation.AblationClassifier)
    assert model.body[0][0].in_channels == 2  # 2C channels behind the normalisation of the encoding
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(model(x), model(x))  # plain images: one fixed-seed ablation, deterministic
    enc = ablation.ablate(x, 45, torch.Generator().manual_seed(ablation.FIXED_SEED))
    assert torch.equal(model(x), model(enc))
    spec = classifiers.ClassifierSpec("lenet", 10, 1, 28, (0.13,), (0.31,), "mnist",
                                      ablation={"keep": 45, "encoding": ablation.ENCODING})
    path = tmp_path / "abl.safetensors"
    classifiers.save(path, model, spec)
    loaded, got = classifiers.load(path)
    assert got.ablation == {"keep": 45, "encoding": ablation.ENCODING} and isinstance(loaded, ablation.AblationClassifier)
    assert torch.equal(loaded(enc), model(enc))
    for bad, message in (({"keep": 45, "encoding": "nan"}, "encoding 'nan' is unknown"),
                         ({"keep": 785, "encoding": ablation.ENCODING}, "keep must be an integer from 1 to 784")):
        with pytest.raises(ValueError, match=message):
            classifiers.ClassifierSpec("lenet", 10, 1, 28, (0.13,), (0.31,), ablation=bad)
    plain = classifiers.ClassifierSpec("lenet", 10, 1, 28, (0.13,), (0.31,))
    with pytest.raises(D.DefenseError, match="not trained on ablated images"):
        D.parse_defense("ablation:n=4").bind(classifiers.build(plain), plain)
    d = D.parse_defense("ablation:n=4")
    d.bind(model, spec)
    assert d.keep == 45 and d.describe() == "ablation:n=4,attack_n=16,cert=1000,alpha=0.05,score=vote"
    for text, message in (("ablation:n=0", "n must be an integer >= 1"), ("ablation:alpha=0.7", "alpha"),
                          ("ablation:score=most", "score must be vote or all")):
        with pytest.raises(D.DefenseError, match=message):
            D.parse_defense(text)


def test_ablation_and_adversarial_training_do_not_combine():
    cfg = config.load(train_classifier.ClassifierConfig, "mnist-ablation", ["adversarial.method=pgd"])
    with pytest.raises(train_classifier.TrainError, match="do not combine"):
        ablation.spec_record(cfg, type("T", (), {"image_shape": (1, 28, 28)})())
    with pytest.raises(config.ConfigError, match="keep must be >= 0"):
        config.load(train_classifier.ClassifierConfig, "mnist", ["ablation.keep=-1"])


# --------------------------------------------------------------------------------------------
# Training and `pssr eval`


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    if not (DATA / "mnist").is_dir():
        pytest.skip(f"real data not found at {DATA}")
    out = tmp_path_factory.mktemp("ablation-run")
    return train(out, TINY), out


@needs_data
def test_a_short_training_with_the_key_beats_chance_under_the_vote(trained):
    summary, out = trained
    model, spec = classifiers.load(summary["checkpoint"])
    assert spec.ablation == {"keep": 45, "encoding": ablation.ENCODING}
    assert isinstance(model, ablation.AblationClassifier)
    test = load_dataset("mnist", DATA, "test").subset(300)
    x, y = test.images.float() / 255, test.labels
    defense = D.parse_defense("ablation:n=16")
    defense.bind(model, spec)
    with evaluate.seeded(0):
        vote = torch.cat([defense.classify(model, b).argmax(1) for b in x.split(100)])
    accuracy = (vote == y).float().mean().item()
    assert accuracy > 0.4, accuracy  # chance: 0.1 (measured: ~0.7 after these 94 steps)
    assert summary["test_accuracy"] > 0.25  # the base classifier on one ablation per image


@needs_data
def test_resume_of_an_ablation_training_is_exact(tmp_path):
    train(tmp_path / "full", RESUME)
    part = train(tmp_path / "part", [*RESUME, "train.stop_after_steps=5"])
    assert part["stopped_at_step"] == 5
    train(tmp_path / "part", RESUME, resume=True)
    a, _ = classifiers.load(tmp_path / "full" / "classifier.safetensors")
    b, spec = classifiers.load(tmp_path / "part" / "classifier.safetensors")
    assert spec.ablation["keep"] == 45
    for (name, u), (_, v) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(u, v), name
    with pytest.raises(train_classifier.TrainError, match="another config"):
        train(tmp_path / "part", [*RESUME, "ablation.keep=30"], resume=True)


@needs_data
def test_pssr_eval_with_the_ablation_defense_reports_the_certified_radius(trained, tmp_path):
    summary, _ = trained
    args = ["eval", "--classifier", summary["checkpoint"], "--data-root", str(DATA),
            "--defense", "ablation:keep=45,n=16", "--attack", "fgsm", "--limit", "6", "--limit-expensive", "6",
            "--eot", "2", "--batch-size", "6", "--json", str(tmp_path / "e.json"), "--state", str(tmp_path / "s")]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "certified L0 radius" in res.output and "median" in res.output
    doc = json.loads((tmp_path / "e.json").read_text())
    (clean,) = doc["clean"]
    assert len(clean["certified_l0"]) == 6 and all(r >= -1 for r in clean["certified_l0"])
    assert clean["certified_l0_median"] == ablation.median_radius(torch.tensor(clean["certified_l0"]))
    assert {r["threat"] for r in doc["records"]} == {"oblivious", "bpda", "eot"}  # EOT: a random defense
    assert doc["classifier"]["ablation"]["keep"] == 45
    again = CliRunner().invoke(cli, args)  # replayed from the state file, radii included
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "e.json").read_text())["clean"] == doc["clean"]
    refused = CliRunner().invoke(cli, [*args[:5], "--defense", "none", "--attack", "fgsm", "--limit", "2"])
    assert refused.exit_code != 0 and "evaluated behind --defense ablation" in refused.output
