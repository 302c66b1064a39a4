"""The purifier's parts: surgery gradients, the regenerator, checkpoints, and PSSR as a defense."""

import pytest
import torch

from pssr import attacks, checkpoint, classifiers, purifier, train_purifier
from pssr.config import ConfigError
from pssr.data import load_dataset
from pssr.defenses import DefendedModel, DefenseError, parse_defense
from pssr.regeneration import Regenerator, RegeneratorSpec, compose
from pssr.surgery import PixelSurgery, SurgeryConfig, saliency_gradient

DATA = "../shared/data"


@pytest.fixture(scope="module")
def mnist_classifier():
    return classifiers.load(purifier.shipped_path("classifier-mnist"))


@pytest.fixture(scope="module")
def mnist_batch():
    d = load_dataset("mnist", DATA, "test").subset(16)
    return d.images.float() / 255, d.labels


def tiny_purifier(classifier, width=8, seed=0, surgery=SurgeryConfig()):
    torch.manual_seed(seed)
    G = Regenerator(RegeneratorSpec(1, width, 0.0)).eval()
    return purifier.Purifier(classifier, G, surgery).eval(), G


def save_tiny(path, classifier, width=8, seed=0):
    _, G = tiny_purifier(classifier, width, seed)
    spec = purifier.PurifierSpec(RegeneratorSpec(1, width, 0.0), SurgeryConfig(),
                                 checkpoint.weights_sha256(classifier.state_dict()),
                                 "classifier-mnist.safetensors", "mnist")
    purifier.save(path, G, spec)
    return G


@pytest.mark.parametrize("shape", [(2, 1, 28, 28), (1, 3, 32, 32), (3, 3, 5, 7), (1, 1, 1, 1), (1, 2, 17, 33)])
def test_regenerator_any_size_keeps_surviving_pixels(shape):
    torch.manual_seed(0)
    G = Regenerator(RegeneratorSpec(shape[1], 8, 0.1)).eval()
    x_s = torch.rand(shape)
    mask = torch.rand(shape[0], 1, *shape[2:]) < 0.3
    out = G(x_s, mask)
    assert out.shape == shape and out.min() >= 0 and out.max() <= 1
    x_hat = compose(x_s, mask, out)
    keep = ~mask.expand_as(x_s)
    assert torch.equal(x_hat[keep], x_s[keep])
    assert torch.equal(x_hat[~keep], out[~keep])


def test_regenerator_dropout_gives_two_passes_and_eval_is_deterministic():
    torch.manual_seed(0)
    G = Regenerator(RegeneratorSpec(1, 8, 0.3))
    x, m = torch.rand(2, 1, 12, 12), torch.rand(2, 1, 12, 12) < 0.5
    assert not torch.equal(G(x, m), G(x, m))  # training mode: two dropout draws differ
    G.eval()
    assert torch.equal(G(x, m), G(x, m))


def test_saliency_gradient_is_the_log_prob_gradient_up_to_a_positive_factor(mnist_classifier, mnist_batch):
    """g = ∇ log p(ŷ) / (1 − p_ŷ): checked in float64, where log p does not saturate."""
    f, cspec = mnist_classifier
    x = mnist_batch[0].double()
    f64 = classifiers.build(cspec).double()
    f64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in f.state_dict().items()})
    f64.eval()
    with torch.no_grad():  # as attack libraries call models
        grad, logits = saliency_gradient(f64, x)
    xr = x.clone().requires_grad_(True)
    out = f64(xr)
    pred = out.argmax(1, keepdim=True)
    lp = torch.log_softmax(out, 1).gather(1, pred)
    (ref,) = torch.autograd.grad(lp.sum(), xr)
    p = lp.detach().exp()[:, 0]
    torch.testing.assert_close(grad * (1 - p)[:, None, None, None], ref, rtol=1e-6, atol=1e-12)
    assert torch.equal(logits.argmax(1), out.argmax(1))


def test_saliency_gradient_survives_saturated_probabilities(mnist_classifier, mnist_batch):
    """In float32 the float64 mask is kept even where p_ŷ rounds to 1 (DESIGN §2.1's mask)."""
    f, cspec = mnist_classifier
    x = load_dataset("mnist", DATA, "test").subset(200).images.float() / 255
    f64 = classifiers.build(cspec).double()
    f64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in f.state_dict().items()})
    f64.eval()
    from pssr import ops
    with torch.no_grad():
        assert (torch.log_softmax(f(x), 1).max(1).values.exp() == 1).sum() >= 5  # p_ŷ rounds to 1 in float32
    m32 = ops.pixel_surgery(x, saliency_gradient(f, x)[0])[1]
    m64 = ops.pixel_surgery(x.double(), saliency_gradient(f64, x.double())[0])[1]
    assert (m32 != m64).float().mean() < 0.005


def test_mask_depends_on_the_label_only_not_on_the_loss_scale(mnist_classifier, mnist_batch):
    """DESIGN §2.1: the gradient of p and of log p give the same mask (a per-image scale)."""
    f, _ = mnist_classifier
    x = mnist_batch[0].double()
    f64 = classifiers.build(classifiers.load(purifier.shipped_path("classifier-mnist"))[1]).double()
    f64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in f.state_dict().items()})
    f64.eval()
    xr = x.clone().requires_grad_(True)
    out = f64(xr)
    pred = out.argmax(1, keepdim=True)
    g_log = torch.autograd.grad(torch.log_softmax(out, 1).gather(1, pred).sum(), xr, retain_graph=True)[0]
    g_p = torch.autograd.grad(torch.softmax(out, 1).gather(1, pred).sum(), xr)[0]
    from pssr import ops
    m1 = ops.pixel_surgery(x, g_log)[1]
    m2 = ops.pixel_surgery(x, g_p)[1]
    assert (m1 != m2).float().mean() < 0.002  # equal up to pixels at the threshold within rounding


def test_surgery_gradient_rules(mnist_classifier, mnist_batch):
    f, _ = mnist_classifier
    x, _ = mnist_batch
    surgery = PixelSurgery(f)
    grads, masks = {}, {}
    for mode in ("mask-fixed", "bpda"):
        xr = x.clone().requires_grad_(True)
        x_s, mask, _ = surgery(xr, mode)
        (w,) = torch.autograd.grad((x_s * torch.arange(x_s.numel()).reshape(x_s.shape).float()).sum(), xr)
        grads[mode], masks[mode] = w, mask
    assert torch.equal(masks["mask-fixed"], masks["bpda"]) and masks["bpda"].any()
    weights = torch.arange(x.numel()).reshape(x.shape).float()
    m = masks["bpda"].expand_as(x)
    assert torch.equal(grads["mask-fixed"], torch.where(m, 0.0, weights))  # 1 - mask
    assert torch.equal(grads["bpda"], weights)  # identity


def test_soft_gradient_keeps_the_real_forward(mnist_classifier, mnist_batch):
    f, _ = mnist_classifier
    x, _ = mnist_batch
    for cfg in (SurgeryConfig(), SurgeryConfig(mode="topk", ratio=0.2), SurgeryConfig(fill=0.5)):
        surgery = PixelSurgery(f, cfg)
        x_hard, hard, _ = surgery(x)
        xr = x.clone().requires_grad_(True)
        x_s, soft, _ = surgery(xr, "soft")
        assert torch.equal(soft.detach(), hard.float()) and torch.equal(x_s.detach(), x_hard)
        (g,) = torch.autograd.grad((x_s * torch.randn_like(x_s)).sum(), xr)
        assert torch.isfinite(g).all()
        removed = hard.expand_as(x)
        assert g[removed].abs().sum() > 0  # unlike mask-fixed, gradient reaches removed pixels (via s)


@pytest.mark.parametrize("gradient", ["mask-fixed", "bpda", "soft"])
def test_every_adaptive_attack_wins_with_unbounded_eps(mnist_classifier, mnist_batch, gradient):
    """DESIGN §9's sanity check: with ε = 1 each gradient rule must break the defense."""
    f, _ = mnist_classifier
    x, y = mnist_batch
    x, y = x[:8], y[:8]
    path_model, _ = tiny_purifier(f)
    defense = parse_defense("pssr")
    defense.purifier = path_model
    model = DefendedModel(f, defense, gradient=gradient)
    spec = attacks.parse_attack("pgd:eps=1,alpha=0.1,steps=30", "mnist")
    x_adv = attacks.run_attack(spec, model, x, y, seed=0)
    with torch.no_grad():
        pred = f(defense.purify(x_adv)).argmax(1)
    assert (pred == y).float().mean() <= 0.125


def test_checkpoint_round_trip_and_classifier_binding(tmp_path, mnist_classifier, mnist_batch):
    f, cspec = mnist_classifier
    x, _ = mnist_batch
    path = tmp_path / "p.safetensors"
    G = save_tiny(path, f)
    loaded, spec, _ = purifier.load(path)  # finds the shipped classifier by its recorded name
    ref = purifier.Purifier(f, G, SurgeryConfig()).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), ref(x))
    assert spec.regenerator.width == 8 and spec.dataset == "mnist"

    other = classifiers.build(cspec)  # same architecture, other weights
    other_path = tmp_path / "other.safetensors"
    classifiers.save(other_path, other, cspec)
    with pytest.raises(checkpoint.CheckpointError, match="trained for another classifier"):
        purifier.load(path, classifier_path=other_path)
    d = parse_defense(f"pssr:path={path}")
    with pytest.raises(DefenseError, match="another classifier"):
        d.bind(other.eval(), cspec)
    d.bind(f, cspec)
    with torch.no_grad():
        assert torch.equal(d.purify(x), ref(x))
    with pytest.raises(checkpoint.CheckpointError, match="classifier.*checkpoint"):
        purifier.load(purifier.shipped_path("classifier-mnist"))  # a classifier is not a purifier


def test_baselines_have_bpda_only_and_pssr_has_three_gradients(mnist_classifier):
    f, _ = mnist_classifier
    with pytest.raises(DefenseError, match="no 'mask-fixed' gradient"):
        DefendedModel(f, parse_defense("median"), gradient="mask-fixed")
    assert set(parse_defense("pssr").attack_gradients) == {"bpda", "mask-fixed", "soft"}
    with pytest.raises(DefenseError, match="bind"):
        parse_defense("pssr").purify(torch.zeros(1, 1, 28, 28))


def test_eval_runs_every_pssr_threat_model(tmp_path, mnist_classifier):
    from pssr import evaluate

    f, _ = mnist_classifier
    path = tmp_path / "p.safetensors"
    save_tiny(path, f)
    cfg = evaluate.Config(classifier=str(purifier.shipped_path("classifier-mnist")), data_root=DATA,
                          defenses=("none", "median", f"pssr:path={path}"), attacks=("fgsm", "square:n_queries=5"),
                          limit=8, limit_expensive=4)
    result = evaluate.run(cfg, quiet=True)
    runs = {(r.defense, r.attack, r.threat): r.n for r in result.records}
    pssr_name = f"pssr:path={path}"
    assert {k[2] for k in runs if k[0] == pssr_name and k[1] == "fgsm"} == {"oblivious", "bpda", "mask-fixed", "soft-mask"}
    assert runs[(pssr_name, "fgsm", "soft-mask")] == 4 and runs[(pssr_name, "fgsm", "mask-fixed")] == 8
    # a gradient-free attack only queries the real defense: no mask-fixed or soft-mask run
    assert {k[2] for k in runs if k[0] == pssr_name and k[1].startswith("square")} == {"oblivious", "bpda"}
    assert {k[2] for k in runs if k[0].startswith("median")} == {"oblivious", "bpda"}
    worst = {w.defense: w for w in result.worst_case}
    for r in result.records:
        if r.n == worst[r.defense].n:
            assert worst[r.defense].robust_accuracy <= r.robust_accuracy + 1e-9
    assert worst[pssr_name].runs == 6


def test_regenerator_output_clamp_passes_only_inward_gradients():
    """In range: the identity. Out of range: a gradient that would push the value further out is
    dropped (the cross-entropy drifted pre-activations away), one that pulls it back passes."""
    from pssr.regeneration import _ClampInward

    a = torch.tensor([-0.5, -0.5, 0.5, 0.5, 1.5, 1.5], requires_grad=True)
    out = _ClampInward.apply(a)
    assert torch.equal(out, a.detach().clamp(0, 1))
    grad = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])  # descent moves a by -grad
    (g,) = torch.autograd.grad(out, a, grad)
    assert g.tolist() == [0.0, -1.0, 1.0, -1.0, 1.0, 0.0]


def test_eval_with_folded_batchnorm_folds_the_saliency_classifier_too(tmp_path, mnist_classifier, monkeypatch):
    """--fold-batchnorm: PSSR's saliency step runs the folded classifier as well (it is half the
    cost), and the report's accuracies are those of the stored weights on these images."""
    from pssr import evaluate

    f, _ = mnist_classifier
    path = tmp_path / "p.safetensors"
    save_tiny(path, f)
    seen = []
    real = evaluate._folded
    monkeypatch.setattr(evaluate, "_folded", lambda c, d: seen.append(d) or real(c, d))
    base = dict(classifier=str(purifier.shipped_path("classifier-mnist")), data_root=DATA,
                defenses=("none", f"pssr:path={path}"), attacks=("fgsm",), threats=("oblivious", "bpda", "mask-fixed"),
                limit=16)
    plain = evaluate.run(evaluate.Config(**base), quiet=True)
    folded = evaluate.run(evaluate.Config(**base, fold_batchnorm=True), quiet=True)
    (d,) = seen
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in d.purifier.surgery.classifier.modules())
    assert [(r.defense, r.threat, r.robust_accuracy) for r in folded.records] == \
        [(r.defense, r.threat, r.robust_accuracy) for r in plain.records]
    assert [c.accuracy for c in folded.clean] == [c.accuracy for c in plain.clean]


def test_regenerator_input_bits_rounds_what_g_reads_with_a_straight_through_gradient():
    """input_bits=1: a perturbation that moves no surviving pixel across 0.5 cannot change G's output;
    the backward is the identity through the rounding, so an attacker still gets a gradient."""
    torch.manual_seed(0)
    G = Regenerator(RegeneratorSpec(1, 8, 0.0, input_bits=1)).eval()
    x = torch.rand(4, 1, 16, 16)
    mask = torch.rand(4, 1, 16, 16) > 0.5
    delta = 0.05 * torch.sign(torch.randn_like(x))
    crosses = (x - 0.5).sign() != (x + delta - 0.5).sign()
    nudged = torch.where(crosses, x, x + delta)  # every pixel stays on its side of 0.5
    with torch.no_grad():
        assert torch.equal(G(x, mask), G(nudged, mask))
        plain = Regenerator(RegeneratorSpec(1, 8, 0.0)).eval()
        plain.load_state_dict(G.state_dict())
        assert not torch.equal(plain(x, mask), plain(nudged, mask))
    xg = x.clone().requires_grad_(True)
    G(xg, mask).sum().backward()
    assert xg.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="input_bits"):
        RegeneratorSpec(1, 8, 0.0, input_bits=9)
    cfg = train_purifier.load_config("mnist", ["regenerator.input_bits=1"])
    assert cfg.regenerator.input_bits == 1
    with pytest.raises(ConfigError, match="input_bits"):
        train_purifier.load_config("mnist", ["regenerator.input_bits=12"])
