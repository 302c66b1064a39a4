"""Defense plug-ins: parsing, what each baseline does to an image, BPDA and EOT gradients."""

import pytest
import torch

from pssr import defenses as D


def image(seed=0, c=1):
    return torch.rand(2, c, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_parse_and_errors():
    assert D.parse_defense("bit-depth:bits=1").params == {"bits": 1}
    assert D.parse_defense("jpeg:quality=50").describe() == "jpeg:quality=50"
    assert D.parse_defense("tvm:prob=0.2").params["prob"] == 0.2
    for bad, msg in [("blur", "unknown defense"), ("jpeg:50", "key=value"), ("median:size=3", "size")]:
        with pytest.raises(D.DefenseError, match=msg):
            D.parse_defense(bad)


def test_baselines_do_what_they_say():
    x = image(c=3)
    assert torch.equal(D.parse_defense("none").purify(x), x)
    y = D.parse_defense("bit-depth:bits=1").purify(x)
    assert set(y.unique().tolist()) <= {0.0, 1.0} and torch.equal(y, (x > 0.5).float())
    m = D.parse_defense("median:window=3").purify(x)
    # an interior pixel is the median of its 3x3 neighbourhood, channel by channel
    assert torch.isclose(m[0, 1, 5, 7], x[0, 1, 4:7, 6:9].flatten().median())
    j = D.parse_defense("jpeg:quality=10").purify(x)
    assert j.shape == x.shape and 0 < (j - x).abs().mean() < 0.5 and j.min() >= 0 and j.max() <= 1
    t = D.parse_defense("tvm")
    assert t.randomized and t.purify(x).shape == x.shape


def test_tvm_minimises_each_channel_plane():
    """ART's TotalVarMin reads (N, H, W, C): the defense must hand it that layout (a channels-first
    array made it minimise the variation of (C, H) slices, one per column)."""
    import numpy as np
    from art.defences.preprocessor import TotalVarMin

    x = image(c=3)
    t = D.parse_defense("tvm")
    np.random.seed(3)
    got = t.purify(x)
    np.random.seed(3)
    art = TotalVarMin(prob=0.3, norm=2, lamb=0.5, max_iter=10, clip_values=(0, 1), verbose=False)
    want, _ = art(x.permute(0, 2, 3, 1).numpy())
    assert torch.equal(got, torch.from_numpy(want).permute(0, 3, 1, 2))
    # a flat grey channel with one bright pixel: TV minimisation in the plane pulls the spike down
    flat = torch.full((1, 1, 16, 16), 0.5)
    flat[0, 0, 8, 8] = 1.0
    np.random.seed(0)
    assert t.purify(flat)[0, 0, 8, 8] < 0.9


@pytest.mark.parametrize("spec", ["jpeg", "bit-depth:bits=1", "median", "tvm"])
def test_bpda_is_straight_through(spec):
    defense = D.parse_defense(spec)
    assert not defense.differentiable
    x = image().requires_grad_()
    w = torch.randn(2, 1, 16, 16)
    y = defense.forward_for_attack(x)
    (g,) = torch.autograd.grad((y * w).sum(), x)
    assert torch.equal(g, w), "BPDA: the gradient passes the defense unchanged"


def test_defended_model_gradient_is_classifier_gradient_at_purified_point():
    torch.manual_seed(0)
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 3))
    defense = D.parse_defense("bit-depth:bits=1")
    x = image().requires_grad_()
    model = D.DefendedModel(clf, defense)
    (g,) = torch.autograd.grad(model(x)[:, 1].sum(), x)
    z = defense.purify(x.detach()).requires_grad_()
    (want,) = torch.autograd.grad(clf(z)[:, 1].sum(), z)
    assert torch.allclose(g, want)
    assert torch.equal(model(x), clf(defense.purify(x.detach())))


def test_eot_averages_draws_of_a_random_defense():
    calls = []

    class Noisy(D.Defense):
        name, randomized = "noisy", True

        def purify(self, x):
            calls.append(1)
            return (x + 0.1 * torch.randn_like(x)).clamp(0, 1)

    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 3))
    out = D.DefendedModel(clf, Noisy(), eot=5)(image())
    assert out.shape == (2, 3) and len(calls) == 5
    calls.clear()
    D.DefendedModel(clf, D.Defense(), eot=5)(image())  # a deterministic defense is drawn once
    D.DefendedModel(clf, Noisy(), eot=1)(image())
    assert len(calls) == 1
