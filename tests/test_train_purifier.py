"""`pssr train`: a short real run lowers the loss, resume is exact, DDP runs on 2 CPU processes."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from pssr import attack_cache, attacks, checkpoint, classifiers, noise, purifier, train_purifier
from pssr.config import ConfigError
from pssr.data import load_dataset
from pssr.regeneration import Regenerator, RegeneratorSpec
from pssr.surgery import PixelSurgery
from pssr_cli.main import cli

DATA = "../shared/data"
TINY = ["data.train_limit=64", "data.test_limit=16", "train.batch_size=16", "regenerator.width=8",
        "train.checkpoint_every=2", "train.log_every=1", "train.eval_every=0", "attack=pgd:steps=3"]


def tiny_config(*extra):
    return train_purifier.load_config("mnist", [*TINY, *extra])


def test_presets_load_and_bad_configs_are_rejected():
    for name in ("mnist", "cifar10"):
        cfg = train_purifier.load_config(name)
        assert cfg.classifier == name and cfg.attack.startswith("pgd")
    with pytest.raises(ConfigError, match="unknown key.*lossy"):
        train_purifier.load_config("mnist", ["lossy.pixel=1"])
    with pytest.raises(ConfigError, match="surgery.alpha: must be a number"):
        train_purifier.load_config("mnist", ["surgery.alpha=lots"])
    with pytest.raises(ConfigError, match="train.lr: must be a number"):
        train_purifier.load_config("mnist", ["train.lr=5e-4x"])
    # YAML 1.1 reads an exponent without a dot as a string: still a number here
    assert train_purifier.load_config("mnist", ["train.lr=5e-4"]).train.lr == 5e-4
    assert train_purifier.load_config("mnist", ["train.lr=+2.5E-3"]).train.lr == 2.5e-3
    with pytest.raises(ConfigError, match="mean or topk|must be one of"):
        train_purifier.load_config("mnist", ["surgery.mode=median"])
    with pytest.raises(ConfigError, match="loss weights"):
        train_purifier.load_config("mnist", ["loss.rdrop=-1"])


def test_training_attack_must_be_pgd(tmp_path):
    with pytest.raises(train_purifier.TrainError, match="must be PGD"):
        train_purifier.run(tiny_config("attack=fgsm"), tmp_path / "r", data_root=DATA, quiet=True)


def test_short_real_run_lowers_the_loss(tmp_path):
    """40 steps on 256 MNIST images: the loss on a fixed held-out batch falls."""
    torch.set_num_threads(1)
    f, _ = classifiers.load(purifier.shipped_path("classifier-mnist"))
    test = load_dataset("mnist", DATA, "test").subset(64)
    x, y = test.images.float() / 255, test.labels
    x_adv = attacks.run_attack(attacks.parse_attack("pgd:steps=3", "mnist"), f, x, y, seed=1)
    cfg = tiny_config("data.train_limit=256", "train.epochs=3", "train.lr=0.005", "regenerator.dropout=0.0")
    surgery = PixelSurgery(f, cfg.surgery)

    def held_out_loss(G):
        G.eval()
        with torch.no_grad():
            return train_purifier.step_loss(f, surgery, G, x, y, x_adv, cfg.loss)[1]["loss"]

    torch.manual_seed(cfg.train.seed)
    before = held_out_loss(Regenerator(RegeneratorSpec(1, 8, 0.0, cfg.regenerator.input_bits)))
    out = tmp_path / "run"
    summary = train_purifier.run(cfg, out, data_root=DATA, quiet=True)
    assert summary["steps"] == 48
    trained, spec, _ = purifier.load(out / "purifier.safetensors")
    after = held_out_loss(trained.regenerator)
    assert after < 0.85 * before, (before, after)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 48 and all(k in log[0] for k in ("pixel", "semantic", "rdrop", "lr"))
    assert log[-1]["final"] and 0 <= log[-1]["watch_pgd_acc"] <= 1
    assert spec.extra["steps"] == 48 and "PGD" in spec.extra["attack"]


ADAPTIVE = ["adaptive.fraction=0.25", "adaptive.attack=pgd:steps=2"]


NOISE = ["noise.fraction=0.25"]


@pytest.mark.parametrize("cache", ["true", "false", "adaptive", "noise"])
def test_resume_is_exact(tmp_path, cache):
    torch.set_num_threads(1)
    extra = [f"data.cache={cache != 'false'}".lower(), *(ADAPTIVE if cache == "adaptive" else []),
             *(NOISE if cache == "noise" else [])]
    cfg = tiny_config("train.epochs=2", *extra)  # 4 steps an epoch
    straight = tmp_path / "straight"
    train_purifier.run(cfg, straight, data_root=DATA, quiet=True)
    assert (straight / "attack-cache.safetensors").is_file() == (cache != "false")

    resumed = tmp_path / "resumed"
    stop = tiny_config("train.epochs=2", "train.stop_after_steps=3", *extra)
    first = train_purifier.run(stop, resumed, data_root=DATA, quiet=True)
    assert first["stopped_at_step"] == 3
    with pytest.raises(train_purifier.TrainError, match="already holds a run"):
        train_purifier.run(stop, resumed, data_root=DATA, quiet=True)
    with pytest.raises(train_purifier.TrainError, match="another config"):
        train_purifier.run(tiny_config("train.epochs=2", "loss.rdrop=0.5", *extra), resumed,
                           resume=True, data_root=DATA, quiet=True)
    if cache in ("true", "false"):  # a state written before the `adaptive` and `noise` keys existed resumes
        tensors, info = checkpoint.load(resumed / "state.safetensors")  # with their defaults
        assert info["config"].pop("adaptive") == {"fraction": 0.0, "attack": "pgd:steps=10", "gradient": "bpda",
                                                   "watch_n": 0}
        assert info["config"].pop("noise") == {"fraction": 0.0, "kind": "both"}
        checkpoint.save(resumed / "state.safetensors", tensors, info)
    with open(resumed / "log.jsonl", "a") as fh:  # as if killed hard after logging steps past the checkpoint
        fh.write(json.dumps({"step": 4, "loss": 9.0}) + "\n" + json.dumps({"step": 5, "loss": 9.0}) + "\n")
    train_purifier.run(stop, resumed, resume=True, data_root=DATA, quiet=True)  # 3 more steps
    train_purifier.run(cfg, resumed, resume=True, data_root=DATA, quiet=True)  # the last 2
    a = load_file(str(straight / "purifier.safetensors"))
    b = load_file(str(resumed / "purifier.safetensors"))
    steps = [json.loads(line).get("step") for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert [s for s in steps if s is not None] == [json.loads(line).get("step") for line in
                                                  (straight / "log.jsonl").read_text().splitlines()
                                                  if json.loads(line).get("step") is not None]
    assert 9.0 not in [json.loads(line).get("loss") for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_adaptive_share_is_attacked_through_the_current_G(tmp_path, monkeypatch):
    """adaptive.fraction: the first share of each batch is PGD through the defense with this step's G
    (BPDA), the rest the cached attack on f; the BPDA accuracy is watched and stored."""
    from pssr.adapters import PssrModel

    torch.set_num_threads(1)
    cfg = tiny_config("train.epochs=1", "train.max_steps=2", "adaptive.watch_n=8", *ADAPTIVE)
    seen = []
    real_step = train_purifier.step_loss

    def spy(f, surgery, G, x, y, x_adv, lc, masks=None):
        seen.append(({k: v.clone() for k, v in G.state_dict().items()}, x.clone(), y.clone(), x_adv.clone(), masks))
        return real_step(f, surgery, G, x, y, x_adv, lc, masks)

    monkeypatch.setattr(train_purifier, "step_loss", spy)
    out = tmp_path / "r"
    summary = train_purifier.run(cfg, out, data_root=DATA, quiet=True)
    assert len(seen) == 2 and 0 <= summary["watch_bpda_acc"] <= 1 and summary["watch_bpda_n"] == 8
    f, attack, surgery = _attack_and_surgery(cfg)
    cached = load_file(str(out / "attack-cache.safetensors"))
    step2_G, x, y, x_adv, masks = seen[1]
    G = Regenerator(RegeneratorSpec(1, 8, cfg.regenerator.dropout, cfg.regenerator.input_bits))  # the preset's
    G.load_state_dict(step2_G)
    defended = PssrModel(purifier.Purifier(f, G, cfg.surgery), gradient="bpda")
    k = 4  # a quarter of 16
    want = attacks.run_attack(attacks.parse_attack("pgd:steps=2", "mnist"), defended, x[:k], y[:k],
                              seed=train_purifier._seed(cfg.train.seed, 0, 1, 0, 3), batch_size=k)
    assert torch.equal(x_adv[:k], want) and torch.equal(masks[0][:k], surgery(want)[1])
    idx = torch.randperm(64, generator=train_purifier._generator(cfg.train.seed, 0))[16:32]
    assert torch.equal(x_adv[k:], cached["x_adv"][idx][k:]) and not torch.equal(x_adv[:k], cached["x_adv"][idx][:k])
    p, spec, _ = purifier.load(out / "purifier.safetensors")
    assert spec.extra["watch_bpda_n"] == 8
    assert any('"watch_bpda_acc"' in line for line in (out / "log.jsonl").read_text().splitlines())


def test_noise_share_is_randomly_perturbed_clean_images_cut_where_their_saliency_says(tmp_path, monkeypatch):
    """noise.fraction: the last share of each batch is the clean images plus seeded random ±ε noise
    (the training attack's ε), with the surgery's mask of those noisy images; the adaptive share stays
    the first, the cached attack the middle."""
    torch.set_num_threads(1)
    cfg = tiny_config("train.epochs=1", "train.max_steps=2", "noise.fraction=0.25", "noise.kind=stripes", *ADAPTIVE)
    seen = []
    real_step = train_purifier.step_loss

    def spy(f, surgery, G, x, y, x_adv, lc, masks=None):
        seen.append((x.clone(), x_adv.clone(), masks))
        return real_step(f, surgery, G, x, y, x_adv, lc, masks)

    monkeypatch.setattr(train_purifier, "step_loss", spy)
    out = tmp_path / "r"
    train_purifier.run(cfg, out, data_root=DATA, quiet=True)
    f, attack, surgery = _attack_and_surgery(cfg)
    x, x_adv, masks = seen[1]
    k = j = 4  # a quarter of 16 each
    want = noise.random_perturbation(x[-j:], attack.eps, "stripes", train_purifier._generator(cfg.train.seed, 0, 1, 0, 4))
    assert torch.equal(x_adv[-j:], want) and torch.equal(masks[0][-j:], surgery(want)[1])
    delta = x_adv[-j:] - x[-j:]
    assert delta.abs().max() <= attack.eps + 1e-6 and not torch.equal(delta, torch.zeros_like(delta))
    cached = load_file(str(out / "attack-cache.safetensors"))
    idx = torch.randperm(64, generator=train_purifier._generator(cfg.train.seed, 0))[16:32]
    assert torch.equal(x_adv[k:-j], cached["x_adv"][idx][k:-j])
    assert torch.equal(masks[0][k:-j], cached["mask_adv"][idx][k:-j].bool())
    assert not torch.equal(x_adv[:k], cached["x_adv"][idx][:k])  # the adaptive share is still there
    p, spec, _ = purifier.load(out / "purifier.safetensors")
    assert "random stripes" in spec.extra["noise"]
    with pytest.raises(ConfigError, match="noise: kind must be one of"):
        tiny_config("noise.kind=gauss")
    with pytest.raises(ConfigError, match="noise: fraction must be in"):
        tiny_config("noise.fraction=2")
    with pytest.raises(train_purifier.TrainError, match="noise.fraction needs an L∞ training attack"):
        train_purifier.run(tiny_config("noise.fraction=0.5", "attack=pgd-l2:steps=2"), tmp_path / "l2",
                           data_root=DATA, quiet=True)


def test_random_perturbation_is_bounded_seeded_and_of_its_kind():
    x = torch.rand(6, 3, 8, 8)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    for kind in noise.KINDS:
        a, b = noise.random_perturbation(x, 0.1, kind, g()), noise.random_perturbation(x, 0.1, kind, g())
        assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
        assert (a - x).abs().max() <= 0.1 + 1e-6
        inside = (x > 0.1) & (x < 0.9)  # no clipping there: exactly ±ε
        assert torch.allclose((a - x).abs()[inside], torch.full_like(x[inside], 0.1), atol=1e-6)
    s = noise.random_perturbation(torch.full((4, 1, 8, 8), 0.5), 0.1, "stripes", g())
    assert torch.equal(s, s[:, :, :1].expand_as(s))  # one sign per column
    p = noise.random_perturbation(torch.full((4, 1, 8, 8), 0.5), 0.1, "signs", g())
    assert not torch.equal(p, p[:, :, :1].expand_as(p))
    with pytest.raises(ValueError, match="noise kind must be one of"):
        noise.random_perturbation(x, 0.1, "gauss", g())


def test_regenerator_init_starts_from_a_checkpoint_and_checks_it(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    first = tmp_path / "first"
    train_purifier.run(tiny_config("train.max_steps=2"), first, data_root=DATA, quiet=True)
    start = load_file(str(first / "purifier.safetensors"))
    seen = []
    real_step = train_purifier.step_loss
    monkeypatch.setattr(train_purifier, "step_loss",
                        lambda f, s, G, *a, **k: (seen.append({n: v.clone() for n, v in G.state_dict().items()}), real_step(f, s, G, *a, **k))[1])
    init = f"regenerator.init={first / 'purifier.safetensors'}"
    train_purifier.run(tiny_config("train.max_steps=1", init), tmp_path / "tuned", data_root=DATA, quiet=True)
    assert all(torch.equal(seen[0][k], start[k]) for k in start)
    with pytest.raises(train_purifier.TrainError, match="regenerator.init: .*width 8.*this run builds width 16"):
        train_purifier.run(tiny_config("train.max_steps=1", init, "regenerator.width=16"), tmp_path / "w",
                           data_root=DATA, quiet=True)
    with pytest.raises(train_purifier.TrainError, match="regenerator.init: .*none.safetensors: no such checkpoint file"):
        train_purifier.run(tiny_config("train.max_steps=1", f"regenerator.init={tmp_path / 'none.safetensors'}"),
                           tmp_path / "n", data_root=DATA, quiet=True)
    with pytest.raises(train_purifier.TrainError, match="adaptive.attack: the training attack must be PGD"):
        train_purifier.run(tiny_config("adaptive.attack=fgsm"), tmp_path / "a", data_root=DATA, quiet=True)


@pytest.mark.parametrize("flaw", ["nan", "inf", "shape"])
def test_regenerator_init_refuses_non_finite_or_misfit_weights(tmp_path, flaw):
    """regenerator.init went straight to G.load_state_dict: NaN/Inf weights trained on (and a file whose
    weights do not fit its own spec gave a RuntimeError traceback). Now purifier.check_weights runs
    first: `pssr train` stops with one line naming the file, before any training or attack cache."""
    cfg = tiny_config()
    f, cspec = classifiers.load(purifier.shipped_path("classifier-mnist"))
    rspec = RegeneratorSpec(1, cfg.regenerator.width, cfg.regenerator.dropout, cfg.regenerator.input_bits)
    tensors = Regenerator(rspec).state_dict()
    name = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
    if flaw == "shape":
        tensors[name] = torch.zeros(*tensors[name].shape[:-1], tensors[name].shape[-1] + 1)
    else:
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = float(flaw)
    spec = purifier.PurifierSpec(rspec, cfg.surgery, checkpoint.weights_sha256(f.state_dict()),
                                 "classifier-mnist.safetensors", "mnist")
    init = tmp_path / "bad.safetensors"
    checkpoint.save(init, tensors, {"kind": purifier.KIND, "spec": dataclasses.asdict(spec)})
    args = [f"{k}" for o in TINY for k in ("--set", o)]
    r = CliRunner().invoke(cli, ["train", "mnist", *args, "--set", "train.max_steps=1", "--set",
                                 f"regenerator.init={init}", "--data-root", DATA, "--out", str(tmp_path / "run"), "-q"])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "Traceback" not in r.output, r.output
    assert r.output.startswith("Error: regenerator.init: ") and str(init) in r.output, r.output
    assert ("non-finite weights" if flaw != "shape" else "do not fit the regenerator") in r.output, r.output
    assert not (tmp_path / "run" / "attack-cache.safetensors").exists()
    assert not (tmp_path / "run" / "purifier.safetensors").exists()
    with pytest.raises(train_purifier.TrainError, match="regenerator.init: .*bad.safetensors"):
        train_purifier.run(tiny_config("train.max_steps=1", f"regenerator.init={init}"), tmp_path / "run2",
                           data_root=DATA, quiet=True)


def _attack_and_surgery(cfg):
    f, _ = classifiers.load(purifier.shipped_path("classifier-mnist"))
    return f, attacks.parse_attack(cfg.attack, "mnist"), PixelSurgery(f, cfg.surgery)


def test_attack_cache_holds_what_the_on_the_fly_path_computes_and_is_reused(tmp_path, monkeypatch):
    """The stored PGD examples and masks are the attack and the op's own; a resume does not remake them,
    a cache made for another attack is remade."""
    torch.set_num_threads(1)
    cfg = tiny_config("train.stop_after_steps=1")
    out = tmp_path / "r"
    train_purifier.run(cfg, out, data_root=DATA, quiet=True)
    tensors, info = checkpoint.load(out / "attack-cache.safetensors")
    train = load_dataset("mnist", DATA, "train").subset(64)
    x, y = train.images.float() / 255, train.labels
    f, attack, surgery = _attack_and_surgery(cfg)
    x_adv = attacks.run_attack(attack, f, x, y, seed=attack_cache.chunk_seed(cfg.train.seed, 0))
    assert torch.equal(tensors["x_adv"], x_adv)
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6 and not torch.equal(x_adv, x)
    assert torch.equal(tensors["mask_adv"], surgery(x_adv)[1]) and torch.equal(tensors["mask_clean"], surgery(x)[1])
    assert info["key"]["attack"] == attack.label() and info["key"]["images"] == 64
    assert not (out / "attack-cache.parts").exists()  # the parts made on the way are gone

    made = {"n": 0}
    real_make = attack_cache.make

    def counting_make(*a, **k):
        made["n"] += 1
        return real_make(*a, **k)

    monkeypatch.setattr(attack_cache, "make", counting_make)
    train_purifier.run(tiny_config("train.stop_after_steps=1"), out, resume=True, data_root=DATA, quiet=True)
    assert made["n"] == 0
    attack_cache.save(out / "attack-cache.safetensors", attack_cache.Cached(tensors["x_adv"], tensors["mask_adv"],
                      tensors["mask_clean"]), {**info["key"], "attack": "PGD-L∞ something else"})
    train_purifier.run(tiny_config("train.stop_after_steps=1"), out, resume=True, data_root=DATA, quiet=True)
    assert made["n"] == 1
    assert attack_cache.load(out / "attack-cache.safetensors", info["key"]) is not None


def test_cache_making_survives_a_stop(tmp_path, monkeypatch):
    """Chunks finished before a stop are in part files and not made again; parts of another key are not used."""
    torch.set_num_threads(1)
    cfg = tiny_config()
    f, attack, surgery = _attack_and_surgery(cfg)
    train = load_dataset("mnist", DATA, "train").subset(600)  # 3 chunks: 256, 256, 88 images
    want = attack_cache.key("0" * 64, attack.label(), surgery.config, "mnist", 600, 0)
    parts = tmp_path / "attack-cache.parts"
    whole = attack_cache.make(train.images, train.labels, f, surgery, attack, 0)
    monkeypatch.setattr(attack_cache, "PART_CHUNKS", 1)
    calls = []
    real = attacks.run_attack

    class Stop(Exception):  # stands for Ctrl-C or a crash
        pass

    stop_done = False

    def stopped_in_the_third_chunk(*a, **k):
        calls.append(k["seed"])
        if len(calls) == 3 and not stop_done:
            raise Stop
        return real(*a, **k)

    monkeypatch.setattr(attacks, "run_attack", stopped_in_the_third_chunk)
    with pytest.raises(Stop):
        attack_cache.make(train.images, train.labels, f, surgery, attack, 0, parts=parts, want=want)
    stop_done = True
    assert len(list(parts.glob("*.safetensors"))) == 2
    calls.clear()
    again = attack_cache.make(train.images, train.labels, f, surgery, attack, 0, parts=parts, want=want)
    assert calls == [attack_cache.chunk_seed(0, 2)]  # only the unfinished chunk
    for name in ("x_adv", "mask_adv", "mask_clean"):
        assert torch.equal(getattr(again, name), getattr(whole, name)), name
    calls.clear()
    attack_cache.make(train.images, train.labels, f, surgery, attack, 0, parts=parts, want={**want, "seed": 1})
    assert len(calls) == 3
    attack_cache.remove_parts(parts)
    assert not parts.exists()


def test_cli_train_errors_are_one_line(tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["train", "mnist", "--out", str(tmp_path / "x"), "--data-root", DATA, "--resume"])
    assert r.exit_code == 1 and "no " in r.output and "Traceback" not in r.output
    r = runner.invoke(cli, ["train", "nonesuch.yaml", "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "no such config file" in r.output
    r = runner.invoke(cli, ["train", "mnist", "--set", "classifier=missing.safetensors", "--data-root", DATA,
                            "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "no such shipped classifier or file" in r.output


def test_ddp_two_cpu_processes(tmp_path):
    """torchrun with 2 gloo processes: each takes half of every batch; rank 0 checkpoints; resumes."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    assert torchrun, "torchrun comes with torch"
    out = tmp_path / "ddp"
    base = [torchrun, "--nproc_per_node", "2", "--master_port", "29517", "-m", "pssr_cli.main", "train", "mnist",
            "--data-root", DATA, "--out", str(out), "-q", *sum((["--set", s] for s in TINY), []),
            "--set", "train.epochs=2", "--set", "data.train_limit=600", "--set", "train.max_steps=8"]  # 3 chunks
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*base, "--set", "train.stop_after_steps=3"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "stopped at step 3/8" in r.stdout
    r = subprocess.run([*base, "--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [rec["step"] for rec in log if "loss" in rec]
    assert steps == list(range(1, 9)) and all(rec["world"] == 2 for rec in log if "loss" in rec)
    p, _, _ = purifier.load(out / "purifier.safetensors")
    assert all(torch.isfinite(t).all() for t in p.regenerator.state_dict().values())
    # each process attacked every other chunk; together they stored what one process makes
    cfg = tiny_config("data.train_limit=600")
    train = load_dataset("mnist", DATA, "train").subset(600)
    f, attack, surgery = _attack_and_surgery(cfg)
    one = attack_cache.make(train.images, train.labels, f, surgery, attack, cfg.train.seed)
    stored = load_file(str(out / "attack-cache.safetensors"))
    assert torch.equal(stored["x_adv"], one.x_adv) and torch.equal(stored["mask_adv"], one.mask_adv)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_signal_stops_at_a_step_boundary_and_resume_is_exact(tmp_path, monkeypatch):
    """Ctrl-C/SIGTERM only set a flag: the state saved is that of a finished step."""
    import signal

    torch.set_num_threads(1)
    cfg = tiny_config("train.epochs=2", "train.checkpoint_every=100")
    straight = tmp_path / "straight"
    train_purifier.run(cfg, straight, data_root=DATA, quiet=True)

    original = train_purifier.GracefulStop.should_stop
    calls = {"n": 0}

    def send_sigterm_in_step_3(self):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives inside the loop, handled by a flag
        return original(self)

    monkeypatch.setattr(train_purifier.GracefulStop, "should_stop", send_sigterm_in_step_3)
    stopped = tmp_path / "stopped"
    with pytest.raises(train_purifier.TrainError, match="interrupted at step 3/8; state saved"):
        train_purifier.run(cfg, stopped, data_root=DATA, quiet=True)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    monkeypatch.setattr(train_purifier.GracefulStop, "should_stop", original)
    train_purifier.run(cfg, stopped, resume=True, data_root=DATA, quiet=True)
    a = load_file(str(straight / "purifier.safetensors"))
    b = load_file(str(stopped / "purifier.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_process_count_or_classifier(tmp_path):
    cfg = tiny_config("train.stop_after_steps=1")
    out = tmp_path / "r"
    train_purifier.run(cfg, out, data_root=DATA, quiet=True)
    tensors, info = checkpoint.load(out / "state.safetensors")
    checkpoint.save(out / "state.safetensors", tensors, {**info, "world": 2})
    with pytest.raises(train_purifier.TrainError, match="2 process"):
        train_purifier.run(cfg, out, resume=True, data_root=DATA, quiet=True)
    checkpoint.save(out / "state.safetensors", tensors, {**info, "classifier_sha256": "0" * 64})
    with pytest.raises(train_purifier.TrainError, match="another classifier"):
        train_purifier.run(cfg, out, resume=True, data_root=DATA, quiet=True)


def test_regenerator_does_not_collapse_under_the_preset_loss():
    """Regression: with a per-pixel-mean L1 the cross-entropy swamped the pixel term and every hole
    pixel went black within one Adam step, for good. With the preset's weights G keeps filling.

    Early on, the share of filled hole pixels swings between ~0 and 1 from one step to the next
    (measured: width 16 at step 12, width 32 at step 8 are both near 0), so one look at one step
    cannot tell a swing from the collapse; the collapse stays at ~0, so the best of three later
    looks must not."""
    torch.set_num_threads(1)
    f, _ = classifiers.load(purifier.shipped_path("classifier-mnist"))
    d = load_dataset("mnist", DATA, "train").subset(64)
    x, y = d.images.float() / 255, d.labels
    x_adv = attacks.run_attack(attacks.parse_attack("pgd:steps=3", "mnist"), f, x, y, seed=0)
    cfg = train_purifier.load_config("mnist")
    surgery = PixelSurgery(f, cfg.surgery)
    torch.manual_seed(0)
    G = Regenerator(RegeneratorSpec(1, cfg.regenerator.width, cfg.regenerator.dropout, cfg.regenerator.input_bits))
    opt = torch.optim.Adam(G.parameters(), cfg.train.lr)
    pixel, filled_share = [], []
    with torch.no_grad():
        x_s, mask, _ = surgery(x)
    for step in range(1, 25):
        G.train()
        loss, terms = train_purifier.step_loss(f, surgery, G, x, y, x_adv, cfg.loss)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(G.parameters(), cfg.train.grad_clip)
        opt.step()
        pixel.append(terms["pixel"])
        if step in (16, 20, 24):
            G.eval()
            with torch.no_grad():
                filled = G(x_s, mask)[mask.expand_as(x)]
            filled_share.append(float((filled > 0.05).float().mean()))
    assert max(filled_share) > 0.2, f"G fills the holes with black: {filled_share}"
    assert pixel[-1] < pixel[0]


def test_ctrl_c_while_the_attack_cache_is_made_says_how_to_continue(tmp_path, monkeypatch):
    """Ctrl-C before the first step used to print only "Aborted!", and --resume then refused (no state yet).
    It now says, in one line, that a plain rerun continues from the finished parts; and it does."""
    torch.set_num_threads(1)
    monkeypatch.setattr(attack_cache, "CHUNK", 16)  # 64 images: 4 chunks, one part file each
    monkeypatch.setattr(attack_cache, "PART_CHUNKS", 1)
    real, made = attacks.run_attack, []

    def ctrl_c_in_the_third_chunk(*a, **k):
        if k.get("batch_size") == 16:  # the cache's calls (the watched test attack has none)
            made.append(k["seed"])
            if len(made) == 3:
                raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(attacks, "run_attack", ctrl_c_in_the_third_chunk)
    out = tmp_path / "run"
    args = ["train", "mnist", "--data-root", DATA, "--out", str(out), "-q",
            *sum((["--set", s] for s in [*TINY, "train.stop_after_steps=1"]), [])]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1 and "Aborted" not in r.output, r.output
    assert r.output.startswith("Error: interrupted while making the training attack (2 part file(s)")
    assert "rerun the same command, without --resume" in r.output and len(r.output.strip().splitlines()) == 1
    assert len(list((out / "attack-cache.parts").glob("*.safetensors"))) == 2
    made.clear()
    r = CliRunner().invoke(cli, [*args, "--resume"])  # what a user tries first: refused, pointing at the rerun
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert "2 finished part file(s)" in r.output and "without --resume" in r.output, r.output
    assert not made  # refused before any attack ran
    r = CliRunner().invoke(cli, args)  # the plain rerun the message asks for
    assert r.exit_code == 0, r.output
    assert made == [attack_cache.chunk_seed(0, 2), attack_cache.chunk_seed(0, 3)]  # only the rest
    assert (out / "attack-cache.safetensors").is_file() and not (out / "attack-cache.parts").exists()


def test_resume_without_state_but_with_attack_parts_says_rerun_plainly(tmp_path):
    """--resume after a Ctrl-C during the attack cache: no state.safetensors yet, but finished parts in
    OUT/attack-cache.parts/ (or the whole cache). The one-line refusal says that a plain rerun (without
    --resume) continues from them; a folder with neither keeps the short message."""
    from pssr.training import TrainError, check_run_dir

    out = tmp_path / "run"
    out.mkdir()
    state = out / "state.safetensors"
    with pytest.raises(TrainError, match=r"^--resume: no .*state.safetensors to resume from$"):
        check_run_dir(out, state, resume=True)
    (out / "attack-cache.parts").mkdir()
    with pytest.raises(TrainError, match=r"to resume from$"):  # an empty parts folder: nothing kept
        check_run_dir(out, state, resume=True)
    for i in range(3):
        (out / "attack-cache.parts" / f"chunks-{i:06d}-{i:06d}.safetensors").write_bytes(b"")
    args = ["train", "mnist", "--data-root", DATA, "--out", str(out), "--resume", "-q"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output, r.output
    text = " ".join(r.output.split())
    assert "3 finished part file(s) of the training attack are kept in" in text, text
    assert "rerun the same command without --resume, which continues from there" in text, text
    for file in (out / "attack-cache.parts").iterdir():
        file.unlink()
    (out / "attack-cache.safetensors").write_bytes(b"")
    with pytest.raises(TrainError, match="the training attack is kept in .*attack-cache.safetensors; rerun the "
                                         "same command without --resume"):
        check_run_dir(out, state, resume=True)
    check_run_dir(out, state, resume=False)  # the plain rerun starts
