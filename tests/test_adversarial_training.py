"""Adversarial training in `pssr train-classifier` (pssr.adversarial): the three methods on short
real MNIST runs, N-FGSM's missing projection, the ε ramp, the watch, the collapse rule, exact
resume with the watch, DDP with two CPU processes, and the checkpoint's training record."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pssr import adversarial, classifiers, config, report, train_classifier
from pssr.data import ImageDataset, load_dataset

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason=f"real data not found at {DATA}")

# 30 steps of 50 MNIST images, 200 held back for the watch, ε = 0.2: long enough that every
# method's watched PGD accuracy ends far above a standard model's (measured: 59-63% against 23.5%)
SHORT = ["data.train_limit=1700", "data.test_limit=500", "train.epochs=1", "train.batch_size=50",
         "train.checkpoint_every=1000", "train.log_every=5", "train.lr=0.05", "adversarial.watch_n=200",
         "adversarial.watch_every=10", "adversarial.eps=0.2", "adversarial.steps=3", "adversarial.watch_steps=5",
         "adversarial.warmup_epochs=0.3"]


def cfg(*overrides):
    return config.load(train_classifier.ClassifierConfig, "mnist", [*SHORT, *overrides])


def train(out, *overrides, resume=False):
    return train_classifier.run(cfg(*overrides), out, resume=resume, data_root=str(DATA), quiet=True)


def log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    spec = classifiers.ClassifierSpec("lenet", 10, 1, 28, (0.5,), (0.25,))
    return classifiers.build(spec).eval()


# --------------------------------------------------------------------------------------------
# The attacks


def test_n_fgsm_is_not_projected_back_to_the_eps_ball():
    model, eps = tiny_model(), 0.05
    x = torch.full((8, 1, 28, 28), 0.5)  # mid-grey: [0, 1] clipping cannot hide a projection
    y = torch.arange(8)
    x_adv = adversarial.n_fgsm(model, x, y, eps, eps, 2.0, torch.Generator().manual_seed(1))
    delta = (x_adv - x).abs()
    assert delta.max() > 2 * eps  # noise up to 2ε plus a step of ε: far outside the ε-ball
    assert delta.max() <= 3 * eps + 1e-6
    # exactly x + η + ε·sign(∇CE at x + η), η ~ U(-2ε, 2ε) from the same generator
    g = torch.Generator().manual_seed(1)
    x_noisy = (x + torch.rand(x.shape, generator=g) * 4 * eps - 2 * eps).clamp(0, 1).requires_grad_(True)
    grad, = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x_noisy), y, reduction="sum"), x_noisy)
    assert torch.allclose(x_adv, (x_noisy + eps * grad.sign()).clamp(0, 1))


@needs_data
def test_pgd_and_trades_stay_in_the_ball_and_pgd_fools_the_standard_classifier():
    model, _ = classifiers.load(Path(classifiers.__file__).parent / "weights" / "classifier-mnist.safetensors")
    test = load_dataset("mnist", DATA, "test").subset(64)
    x, y, eps = test.images.float() / 255, test.labels, 0.2
    x_pgd = adversarial.pgd(model, x, y, eps, 0.05, 10, torch.Generator().manual_seed(3))
    x_trades = adversarial.trades_attack(model, x, eps, 0.05, 10, torch.Generator().manual_seed(3))
    for x_adv in (x_pgd, x_trades):
        assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    noise = (x + (torch.rand(x.shape, generator=torch.Generator().manual_seed(4)) * 2 - 1) * eps).clamp(0, 1)

    def acc(z):
        return (model(z).argmax(1) == y).float().mean().item()

    assert acc(noise) > 0.9 and acc(x_pgd) < 0.2 and acc(x_trades) < 0.5  # the standard LeNet: 0% under PGD


def test_eps_ramps_linearly_then_holds():
    a = adversarial.AdversarialConfig(method="pgd", eps=0.3, warmup_epochs=2.0, steps=10)
    assert adversarial.eps_at(a, 0, 100) == pytest.approx(0.3 / 200)
    assert adversarial.eps_at(a, 99, 100) == pytest.approx(0.15)
    assert adversarial.eps_at(a, 199, 100) == adversarial.eps_at(a, 5000, 100) == 0.3
    assert a.step_size_at(0.15) == pytest.approx(2.5 * 0.15 / 10)  # the step follows the ramping ε
    assert adversarial.eps_at(adversarial.AdversarialConfig(method="pgd", eps=0.3), 0, 100) == 0.3


@pytest.mark.parametrize("bad", ["adversarial.eps=.nan", "adversarial.eps=1.5", "adversarial.method=fgsm",
                                 "adversarial.steps=0", "adversarial.norm=l2", "train.lr=.inf", "train.lr=1e400",
                                 "adversarial.step_size=0"])
def test_adversarial_config_refuses_bad_values(bad):
    with pytest.raises(config.ConfigError):
        config.load(train_classifier.ClassifierConfig, "mnist", ["adversarial.method=pgd", bad])


def test_training_label_names_robust_and_standard_classifiers():
    robust = {"test_accuracy": 0.991, "test_images": 10000,
              "training": {"method": "n-fgsm", "norm": "linf", "eps": 8 / 255, "steps": 1}}
    assert report.training_label(robust).startswith("robust: adversarially trained (n-fgsm, L∞ ε = 8/255, 1 step(s))")
    assert "99.10% on 10000 images" in report.training_label(robust)
    assert report.training_label({"training": {"method": "standard"}}).startswith("standard training")
    assert "records no adversarial training" in report.training_label({"test_accuracy": 0.99})


# --------------------------------------------------------------------------------------------
# Short real runs


@pytest.fixture(scope="module")
def standard_watch_acc(tmp_path_factory):
    """The watched PGD accuracy of a standard model trained with the same budget (no watch of its own)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("standard")
    train(out)
    model, _ = classifiers.load(out / "classifier.safetensors")
    _, held = train_classifier.hold_back(load_dataset("mnist", DATA, "train").subset(1700), 200, 0)
    a = cfg("adversarial.method=pgd").adversarial
    _, robust = adversarial.watch(model, held.images.float() / 255, held.labels, a, torch.Generator().manual_seed(0))
    return robust / len(held)


@needs_data
@pytest.mark.parametrize("method", ["pgd", "n-fgsm", "trades"])
def test_each_method_lowers_its_loss_and_beats_the_standard_model_on_the_watch(tmp_path, method,
                                                                              standard_watch_acc):
    summary = train(tmp_path, f"adversarial.method={method}")
    records = log(tmp_path)
    losses = [r["loss"] for r in records if "loss" in r]
    assert sum(losses[-2:]) < 0.8 * sum(losses[:2])
    watched = [r["watch_pgd_acc"] for r in records if "watch_pgd_acc" in r]
    assert len(watched) == 3  # steps 10, 20 and 30, the end (1,500 images to train on)
    assert max(watched) > standard_watch_acc + 0.15
    # the checkpoint holds the best watched weights and says how they were trained
    model, spec = classifiers.load(tmp_path / "classifier.safetensors")
    t = spec.extra["training"]
    assert t["method"] == method and t["eps"] == 0.2 and t["norm"] == "linf"
    assert t["steps"] == (1 if method == "n-fgsm" else 3) and t["weights"] == "best watched"
    assert t["watch"]["best_pgd_acc"] == max(watched) and summary["training"] == t
    _, held = train_classifier.hold_back(load_dataset("mnist", DATA, "train").subset(1700), 200, 0)
    a = cfg(f"adversarial.method={method}").adversarial
    _, robust = adversarial.watch(model, held.images.float() / 255, held.labels, a, torch.Generator().manual_seed(0))
    assert abs(robust / 200 - max(watched)) <= 0.03  # the saved weights are the best watched ones (float noise aside)


def test_the_watch_images_are_held_out_of_training():
    n = 1000
    ids = torch.arange(n)
    images = torch.zeros((n, 1, 4, 4), dtype=torch.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = ids % 256, ids // 256  # each image names its index
    data = ImageDataset("toy", images, ids % 10, tuple("abcdefghij"))
    kept, held = train_classifier.hold_back(data, 200, 0)

    def index(part):
        return (part.images[:, 0, 0, 0].long() + 256 * part.images[:, 0, 0, 1].long()).tolist()

    assert len(held) == 200 and sorted(index(kept) + index(held)) == list(range(n))
    assert index(kept) == sorted(index(kept)) and index(held) == sorted(index(held))  # data order kept
    assert index(train_classifier.hold_back(data, 200, 0)[1]) == index(held) != index(train_classifier.hold_back(data, 200, 1)[1])
    assert kept.labels.tolist() == [i % 10 for i in index(kept)]
    with pytest.raises(train_classifier.TrainError, match="hold back all"):
        train_classifier.hold_back(data, n, 0)


@needs_data
def test_a_collapse_ends_the_run_on_the_best_weights(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    train(tmp_path / "first5", "adversarial.method=n-fgsm", "adversarial.watch_every=5", "train.stop_after_steps=5")
    at_step_5 = {k[len("model."):]: v for k, v in load_file(str(tmp_path / "first5" / "state.safetensors")).items()
                 if k.startswith("model.")}

    real_watch, calls = adversarial.watch, {"n": 0}

    def collapsing(model, x, y, a, gen, batch_size=500):
        real_watch(model, x, y, a, gen, batch_size)
        calls["n"] += 1
        return len(y), {1: 0.8, 2: 0.7, 3: 0.55}[calls["n"]] * len(y)  # the third is 25 points below the best

    monkeypatch.setattr(adversarial, "watch", collapsing)
    summary = train(tmp_path / "run", "adversarial.method=n-fgsm", "adversarial.watch_every=5")
    assert summary["training"]["collapsed_at_step"] == 15 and summary["training"]["watch"]["best_step"] == 5
    assert any(r.get("collapse") for r in log(tmp_path / "run"))
    assert not any(r.get("step", 0) > 15 for r in log(tmp_path / "run") if "loss" in r)
    model, _ = classifiers.load(tmp_path / "run" / "classifier.safetensors")
    for name, value in model.state_dict().items():
        assert torch.equal(value, at_step_5[name]), name


@needs_data
def test_resume_mid_run_is_exact_with_the_watch(tmp_path):
    torch.set_num_threads(1)
    full = train(tmp_path / "full", "adversarial.method=n-fgsm")
    part = train(tmp_path / "part", "adversarial.method=n-fgsm", "train.stop_after_steps=15")  # between watches
    assert part["stopped_at_step"] == 15
    state = load_file(str(tmp_path / "part" / "state.safetensors"))
    assert any(k.startswith("best.") for k in state)  # the best watched weights travel with the state
    done = train(tmp_path / "part", "adversarial.method=n-fgsm", resume=True)
    a, _ = classifiers.load(tmp_path / "full" / "classifier.safetensors")
    b, _ = classifiers.load(tmp_path / "part" / "classifier.safetensors")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert done["training"] == full["training"] and done["test_accuracy"] == full["test_accuracy"]
    watches = [[r for r in log(out) if "watch_pgd_acc" in r] for out in (tmp_path / "full", tmp_path / "part")]
    assert watches[0] == watches[1]


@needs_data
def test_ddp_two_cpu_processes_with_the_watch(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    assert torchrun, "torchrun comes with torch"
    out = tmp_path / "ddp"
    base = [torchrun, "--nproc_per_node", "2", "--master_port", "29519", "-m", "pssr_cli.main", "train-classifier",
            "mnist", "--data-root", str(DATA), "--out", str(out), "-q", "--device", "cpu",
            *sum((["--set", s] for s in SHORT), []), "--set", "adversarial.method=n-fgsm",
            "--set", "data.train_limit=800"]  # 12 steps of 50, 25 images per process
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*base, "--set", "train.stop_after_steps=7"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "stopped at step 7/12" in r.stdout
    r = subprocess.run([*base, "--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "best watched PGD-5 accuracy" in r.stdout
    records = log(out)
    assert [r["step"] for r in records if "loss" in r] == [5, 10]
    assert [r["step"] for r in records if "watch_pgd_acc" in r] == [10, 12]
    assert all(r["watch_n"] == 200 for r in records if "watch_pgd_acc" in r)
    model, spec = classifiers.load(out / "classifier.safetensors")
    assert spec.extra["processes"] == 2 and spec.extra["training"]["method"] == "n-fgsm"
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())
    r = subprocess.run([torchrun, "--nproc_per_node", "1", "--master_port", "29519", "-m", "pssr_cli.main",
                        "train-classifier", "mnist", "--data-root", str(DATA), "--out", str(out), "-q", "--resume",
                        *sum((["--set", s] for s in SHORT), []), "--set", "adversarial.method=n-fgsm",
                        "--set", "data.train_limit=800"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode != 0 and "started on 2 process(es), this is 1" in r.stderr
