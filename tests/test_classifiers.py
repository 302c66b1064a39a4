"""Classifier zoo, safetensors checkpoints, configs and the classifier-training pipeline."""

import json
import pickle
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pssr import checkpoint, classifiers, config, train_classifier
from pssr_cli.main import cli

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason=f"real data not found at {DATA}")


def spec(arch="lenet", c=1, size=28):
    return classifiers.ClassifierSpec(arch, 10, c, size, (0.5,) * c, (0.25,) * c, "toy", tuple("abcdefghij"))


@pytest.mark.parametrize("arch,c,size", [("lenet", 1, 28), ("resnet9", 3, 32), ("resnet18", 3, 32)])
def test_zoo_shapes_and_normalisation_inside(arch, c, size):
    torch.manual_seed(0)
    model = classifiers.build(spec(arch, c, size)).eval()
    x = torch.rand(2, c, size, size)
    logits = model(x)
    assert logits.shape == (2, 10)
    assert torch.equal(model.head(model.features(x)), logits)
    # the first layer normalises: feeding pre-normalised data would give other logits
    assert torch.allclose(model.normalize(x), (x - 0.5) / 0.25)


def test_checkpoint_round_trip_and_refusals(tmp_path):
    torch.manual_seed(0)
    model = classifiers.build(spec())
    path = tmp_path / "c.safetensors"
    classifiers.save(path, model, spec())
    loaded, s = classifiers.load(path)
    assert s == spec() and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(loaded(x), model.eval()(x))
    _, info = checkpoint.load(path)
    assert info["sha256"] == checkpoint.weights_sha256(model.state_dict())

    torch.save(model.state_dict(), tmp_path / "p.pt")
    (tmp_path / "h.safetensors").write_text("<!DOCTYPE html><html>Not found</html>")
    (tmp_path / "pk.bin").write_bytes(pickle.dumps({"a": 1}))
    for name, msg in [("p.pt", "pickle"), ("h.safetensors", "HTML"), ("pk.bin", "pickle"), ("missing", "no such")]:
        with pytest.raises(checkpoint.CheckpointError, match=msg):
            classifiers.load(tmp_path / name)
    checkpoint.save(tmp_path / "other.safetensors", {"w": torch.ones(1)}, {"kind": "purifier"})
    with pytest.raises(checkpoint.CheckpointError, match="expected 'classifier'"):
        classifiers.load(tmp_path / "other.safetensors")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.safetensors"
    target.write_bytes(b"old")

    def boom(tmp):
        Path(tmp).write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        checkpoint.atomic_write(target, boom)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]
    checkpoint.atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"new"))
    assert target.read_bytes() == b"new" and target.stat().st_mode & 0o044 == 0o044  # readable, not private


def test_config_presets_overrides_and_errors(tmp_path):
    cfg = config.load(train_classifier.ClassifierConfig, "cifar10", ["train.epochs=2", "data.train_limit=100"])
    assert cfg.model.arch == "resnet9" and cfg.train.epochs == 2 and cfg.data.train_limit == 100
    assert set(config.preset_names("classifier")) >= {"mnist", "cifar10"}
    bad = [
        (["train.epoch=3"], "unknown key"),
        (["train.epochs=three"], "must be an integer"),
        (["model.arch=vgg"], "must be one of"),
        (["train.lr=-1"], "lr"),
        (["noequals"], "KEY=VALUE"),
    ]
    for overrides, msg in bad:
        with pytest.raises(config.ConfigError, match=msg):
            config.load(train_classifier.ClassifierConfig, "mnist", overrides)
    with pytest.raises(config.ConfigError, match="no such config file"):
        config.load(train_classifier.ClassifierConfig, str(tmp_path / "nope.yaml"))
    f = tmp_path / "c.yaml"
    f.write_text("train: [1, 2\n")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load(train_classifier.ClassifierConfig, str(f))


def test_augment_is_a_seeded_crop_and_flip():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    a = train_classifier.augment(x, "crop-flip", torch.Generator().manual_seed(1), pad=2)
    b = train_classifier.augment(x, "crop-flip", torch.Generator().manual_seed(1), pad=2)
    assert torch.equal(a, b) and a.shape == x.shape
    assert torch.equal(train_classifier.augment(x, "none", torch.Generator()), x)
    # every output row is a window of the zero-padded input row (possibly flipped)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        rows = {tuple(r.tolist()) for r in padded[i, 0].unfold(1, 6, 1).reshape(-1, 6)}
        rows |= {tuple(reversed(r)) for r in rows}
        assert all(tuple(r.tolist()) in rows for r in a[i, 0])


SMALL = ["data.train_limit=512", "data.test_limit=200", "train.epochs=2", "train.batch_size=64",
         "train.checkpoint_every=3", "train.log_every=2", "train.lr=0.05"]


def train(out, overrides=(), resume=False):
    cfg = config.load(train_classifier.ClassifierConfig, "mnist", SMALL + list(overrides))
    return train_classifier.run(cfg, out, resume=resume, data_root=str(DATA), quiet=True)


@needs_data
def test_short_real_training_lowers_loss_and_resumes_exactly(tmp_path):
    full = train(tmp_path / "full")
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "full" / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    assert full["test_accuracy"] > 0.5  # 10 classes: chance is 0.1

    part = train(tmp_path / "part", ["train.stop_after_steps=5"])
    assert part["stopped_at_step"] == 5
    with pytest.raises(train_classifier.TrainError, match="--resume"):
        train(tmp_path / "part")
    with pytest.raises(train_classifier.TrainError, match="another config"):
        train(tmp_path / "part", ["train.lr=0.1"], resume=True)
    resumed = train(tmp_path / "part", ["train.stop_after_steps=5"], resume=True)  # steps 5..10
    assert resumed["stopped_at_step"] == 10
    done = train(tmp_path / "part", resume=True)  # to the end: stop_after_steps is no part of the run
    a, _ = classifiers.load(tmp_path / "full" / "classifier.safetensors")
    b, _ = classifiers.load(tmp_path / "part" / "classifier.safetensors")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert done["test_accuracy"] == full["test_accuracy"]


@needs_data
def test_sigterm_stops_at_a_step_boundary_and_resumes_exactly(tmp_path, monkeypatch):
    import os
    import signal

    from pssr import interrupt

    full = train(tmp_path / "full", ["train.checkpoint_every=100"])
    original, calls = interrupt.GracefulStop.should_stop, {"n": 0}

    def sigterm_in_step_4(self):
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self)

    monkeypatch.setattr(interrupt.GracefulStop, "should_stop", sigterm_in_step_4)
    with pytest.raises(train_classifier.TrainError, match="interrupted at step 4/16; state saved"):
        train(tmp_path / "part", ["train.checkpoint_every=100"])
    monkeypatch.setattr(interrupt.GracefulStop, "should_stop", original)
    done = train(tmp_path / "part", ["train.checkpoint_every=100"], resume=True)
    a, _ = classifiers.load(tmp_path / "full" / "classifier.safetensors")
    b, _ = classifiers.load(tmp_path / "part" / "classifier.safetensors")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert done["test_accuracy"] == full["test_accuracy"]


@needs_data
def test_cli_errors_are_one_line(tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["train-classifier", "mnist", "--set", "train.epochs=0", "--data-root", str(DATA)])
    assert r.exit_code == 1 and "Error: train: epochs must be >= 1" in r.output and "Traceback" not in r.output
    r = runner.invoke(cli, ["train-classifier", "mnist", "--out", str(tmp_path), "--data-root", str(tmp_path)])
    assert r.exit_code == 1 and "mnist train split not found" in r.output
    r = runner.invoke(cli, ["train-classifier", "mnist", "--out", str(tmp_path / "x"), "--resume", "--data-root", str(DATA)])
    assert r.exit_code == 1 and "no " in r.output and "state.safetensors" in r.output


def test_saved_checkpoints_are_readable_by_others(tmp_path):
    """safetensors' writer recreates its file private (0600); shipped weights must be readable."""
    import os

    path = tmp_path / "w.safetensors"
    old = os.umask(0o022)
    try:
        checkpoint.save(path, {"w": torch.zeros(2)}, {"kind": "test"})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("arch", ["lenet", "resnet9", "resnet18"])
def test_fold_batchnorm_is_the_same_function_without_batchnorm(arch):
    """Every Conv->BN pair of the zoo is folded; logits and input gradients stay the same up to
    rounding; the original model is untouched."""
    torch.manual_seed(0)
    channels, size = (1, 28) if arch == "lenet" else (3, 32)
    spec = classifiers.ClassifierSpec(arch, 10, channels, size, (0.5,) * channels, (0.25,) * channels)
    model = classifiers.build(spec)
    with torch.no_grad():  # running statistics other than the initial (0, 1), as after training
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2), m.weight.uniform_(0.5, 1.5)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = classifiers.fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    x = torch.rand(4, channels, size, size, requires_grad=True)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    (g1,) = torch.autograd.grad(model(x).logsumexp(1).sum(), x)
    (g2,) = torch.autograd.grad(folded(x).logsumexp(1).sum(), x)
    torch.testing.assert_close(g2, g1, rtol=1e-3, atol=1e-5)


def test_channels_last_wrapper_hands_back_viewable_gradients():
    """Attack libraries .view() input gradients (torchattacks' PGD-L2 did, and failed on the bare
    channels-last model): the wrapper's are contiguous, and the same as the plain model's."""
    torch.manual_seed(0)
    spec = classifiers.ClassifierSpec("resnet9", 10, 3, 32, (0.5,) * 3, (0.25,) * 3)
    model = classifiers.build(spec).eval()
    fast = classifiers.ChannelsLast(classifiers.fold_batchnorm(model))
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    (g,) = torch.autograd.grad(fast(x).logsumexp(1).sum(), x)
    assert g.is_contiguous()
    g.view(3, -1)  # what failed before
    (g0,) = torch.autograd.grad(model(x).logsumexp(1).sum(), x)
    torch.testing.assert_close(g, g0, rtol=1e-3, atol=1e-5)
    bare = classifiers.fold_batchnorm(model).to(memory_format=torch.channels_last)
    (gb,) = torch.autograd.grad(bare(x).logsumexp(1).sum(), x)
    assert not gb.is_contiguous()  # the failure the wrapper exists for still happens without it
