"""The purifier-training pipeline behind `pssr train`.

Per step, for a batch of clean training images (DESIGN.md §2.2):

1. adversarial examples against the frozen, *undefended* classifier f with the training attack
   (PGD only: every other attack stays unseen), made on the fly;
2. Pixel Surgery of both the adversarial and the clean batch (f's own saliency, the fused op);
3. G regenerates the removed pixels: the adversarial batch twice (two dropout draws, for R-drop)
   and the clean batch once (self-augmentation), in one batched pass;
4. loss = λ_pix L_pix + λ_sem L_sem + λ_rd L_rd, through frozen f into G only.

Resumable exactly: the shuffle, the attack's random starts and the dropout draws are seeded from
(seed, epoch, step, rank), the learning rate is a function of the step, and the state (G and Adam)
is saved atomically as safetensors, at checkpoints and at the step boundary after a Ctrl-C or
SIGTERM (`pssr.interrupt`). Distributed with `torchrun` (DistributedDataParallel; gloo on
CPU, nccl on GPU): each rank takes its share of every batch, rank 0 logs and checkpoints.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from . import attack_cache, attacks, checkpoint, classifiers, config, losses, noise, purifier
from .data import dataset_key, load_dataset
from .interrupt import GracefulStop
from .adapters import PssrModel
from .purifier import Purifier
from .regeneration import Regenerator, RegeneratorSpec, compose
from .surgery import PixelSurgery, SurgeryConfig
from .training import distributed_cleanup  # noqa: F401  (cli/train.py's name for it)
from .training import (Dist, Logger, TrainError, check_run_dir, defining, end_of_step, init_distributed,
                       interrupted_mid_step, lr_at)
from .training import restore as _restore
from .training import seeded_generator as _generator
from .training import state_tensors as _state_tensors

STATE_KIND = "purifier-training-state"
TRAINING_ATTACKS = tuple(a for a in attacks.ATTACKS if a in attacks.TRAINABLE_ATTACKS)  # the registry's trainable rows
RUN_CONTROLS = ("stop_after_steps", "eval_every", "log_every")  # train keys a resume may change


@dataclass
class DataConfig:
    dataset: str | None = None  # default: the classifier's data set; mnist, cifar10, cifar100 or folder:PATH
    root: str | None = None  # default: --data-root, else $PSSR_DATA_ROOT
    train_limit: int | None = None  # first N training images
    test_limit: int = 500  # test images for the accuracy watched during training
    cache: bool = True  # make the training attack and the masks once, stored in the run folder (DESIGN §9)

    def __post_init__(self):
        config.check_limit(self.train_limit, "train_limit")
        config.check_limit(self.test_limit, "test_limit")


MAX_WIDTH = 256  # G's base width; 32 ships, and G's size grows as width² (width 256: 16M parameters)


@dataclass
class RegeneratorConfig:
    width: int = 32
    dropout: float = 0.1
    init: str | None = None  # start G from this purifier checkpoint (same size and classifier): fine-tuning
    input_bits: int = 0  # G reads the surviving pixels rounded to 2**b levels (0: as they are)

    def __post_init__(self):
        if not 1 <= self.width <= MAX_WIDTH:
            raise ValueError(f"width must be from 1 to {MAX_WIDTH}, got {self.width}")
        RegeneratorSpec(1, self.width, self.dropout, self.input_bits)  # its checks are the rules: refused at load


@dataclass
class LossConfig:
    pixel: float = 1.0  # λ_pix
    semantic: float = 1.0  # λ_sem
    feature_beta: float = 0.1  # β: weight of the feature distance inside L_sem
    rdrop: float = 1.0  # λ_rd
    clean_path: bool = True  # self-augmentation: clean images through PS + SR too

    def __post_init__(self):
        if min(self.pixel, self.semantic, self.feature_beta, self.rdrop) < 0:
            raise ValueError("loss weights must be >= 0")


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 128
    lr: float = 1e-3  # peak of the one-cycle schedule (Adam)
    warmup_fraction: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm (0: off); the early CE gradients are large
    seed: int = 0
    checkpoint_every: int = 50  # steps
    log_every: int = 10  # steps
    eval_every: int = 0  # steps between watched-accuracy checks (0: at each epoch's end only)
    stop_after_steps: int | None = None  # stop (checkpointed) after this many steps of this run
    max_steps: int | None = None  # end the run after this many steps in all (a budget, for ablations)

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError("epochs must be >= 1 and batch_size >= 2")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError("warmup_fraction must be in [0, 1)")
        if self.lr <= 0 or self.checkpoint_every < 1 or self.log_every < 1 or self.eval_every < 0:
            raise ValueError("lr, checkpoint_every and log_every must be > 0, eval_every >= 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be >= 1")
        config.check_seed(self.seed)


@dataclass
class AdaptiveConfig:
    """Adversarial examples made through the defense itself, with the G being trained.

    Examples made against f alone teach G to undo f's attack, not to resist an attacker who
    differentiates through G (BPDA breaks such a G: docs/training.md, "What the shipped MNIST
    purifier does under attack"). With ``fraction`` > 0 that share of every batch is attacked by
    PGD through the current defended model (``gradient``: bpda or mask-fixed), as adversarial
    training does; the rest comes from f's attack (the cache).
    """

    fraction: float = 0.0  # share of each batch attacked through the defense (0: off)
    attack: str = "pgd:steps=10"  # PGD family, preset of the data set
    gradient: str = "bpda"  # bpda (straight-through surgery) or mask-fixed
    watch_n: int = 0  # also watch accuracy under the data set's PGD preset through the defense (BPDA), on N test images

    def __post_init__(self):
        if not 0 <= self.fraction <= 1:
            raise ValueError("fraction must be in [0, 1]")
        if self.gradient not in ("bpda", "mask-fixed"):
            raise ValueError("gradient must be bpda or mask-fixed")
        if self.watch_n < 0:
            raise ValueError("watch_n must be >= 0")


@dataclass
class NoiseConfig:
    """Random ±ε perturbations (the training attack's ε) in place of part of each adversarial batch.

    Not an attack (no gradient, no query; `pssr.noise`): G learns from the masks of randomly
    perturbed images that the surgery's cut moves with the input, which is how gradient-free
    attacks steer it. The last ``fraction`` of each batch; the adaptive share stays the first.
    """

    fraction: float = 0.0  # share of each batch (0: off)
    kind: str = "both"  # stripes (±ε per column, Square's start), signs (±ε per pixel), or both

    def __post_init__(self):
        if not 0 <= self.fraction <= 1:
            raise ValueError("fraction must be in [0, 1]")
        if self.kind not in noise.KINDS:
            raise ValueError(f"kind must be one of {', '.join(noise.KINDS)}")


@dataclass
class PurifierConfig:
    classifier: str = "mnist"  # a shipped classifier (mnist, cifar10) or a checkpoint path
    attack: str = "pgd:steps=10"  # the training attack (PGD family only), preset of the data set
    data: DataConfig = field(default_factory=DataConfig)
    surgery: SurgeryConfig = field(default_factory=SurgeryConfig)
    regenerator: RegeneratorConfig = field(default_factory=RegeneratorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)


def load_config(source: str, overrides=()) -> PurifierConfig:
    return config.load(PurifierConfig, source, overrides, prefix="purifier")


# --------------------------------------------------------------------------------------------
# Distribution


# --------------------------------------------------------------------------------------------
# Pieces


def resolve_classifier(name: str) -> Path:
    """'mnist' / 'cifar10' (the shipped ones) or a path."""
    shipped = purifier.shipped_path(f"classifier-{name}")
    if shipped.is_file():
        return shipped
    path = Path(name)
    if not path.is_file():
        raise TrainError(f"classifier {name!r}: no such shipped classifier or file "
                         f"(train one with `pssr train-classifier`)")
    return path


def _seed(*parts: int) -> int:
    return int(_generator(*parts).initial_seed())


@torch.no_grad()
def watched_accuracy(surgery: PixelSurgery, regenerator, x, y, batch_size: int = 250) -> float:
    """Accuracy of f on purified images: the number to watch while training (DESIGN.md §2.2)."""
    was = regenerator.training
    regenerator.eval()
    correct = 0
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        x_s, mask, _ = surgery(xb)
        x_hat = compose(x_s, mask, regenerator(x_s, mask))
        correct += int((surgery.classifier(x_hat).argmax(1) == yb).sum())
    regenerator.train(was)
    return correct / max(1, len(y))


def _has_dropout(G) -> bool:
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in G.modules())


def _cut(surgery: PixelSurgery, x, mask):
    """x_s from a stored mask: exactly the op's (1 − m) x + m · fill."""
    return torch.where(mask, torch.full_like(x, surgery.config.fill), x), mask


def step_loss(f, surgery: PixelSurgery, G, x, y, x_adv, lc: LossConfig, masks=None) -> tuple[torch.Tensor, dict]:
    """The training loss of one batch and its terms (floats), G in training mode.

    ``masks``: (mask of x_adv, mask of x) from the attack cache; None to run the surgery here.
    """
    with torch.no_grad():
        xs_a, m_a = _cut(surgery, x_adv, masks[0]) if masks else surgery(x_adv)[:2]
        target_features = f.features(x)
    parts_x, parts_m, names = [xs_a], [m_a], ["adv"]
    if lc.rdrop > 0 and _has_dropout(G):  # without dropout the second pass would equal the first
        parts_x.append(xs_a), parts_m.append(m_a), names.append("adv2")
    if lc.clean_path:
        with torch.no_grad():
            xs_c, m_c = _cut(surgery, x, masks[1]) if masks else surgery(x)[:2]
        parts_x.append(xs_c), parts_m.append(m_c), names.append("clean")
    xs, m = torch.cat(parts_x), torch.cat(parts_m)
    x_hat = compose(xs, m, G(xs, m))  # one pass: dropout draws differ per image
    features = f.features(x_hat)
    logits = f.head(features)
    n = len(x)
    part = {name: slice(i * n, (i + 1) * n) for i, name in enumerate(names)}
    adv, terms = part["adv"], {}
    l_pix = losses.pixel(x_hat[adv], x, m[adv])
    l_sem = losses.semantic(logits[adv], y, features[adv], target_features, lc.feature_beta)
    l_rd = x.new_zeros(())
    if "clean" in part:
        c = part["clean"]
        l_pix = l_pix + losses.pixel(x_hat[c], x, m[c])
        l_sem = l_sem + losses.semantic(logits[c], y, features[c], target_features, lc.feature_beta)
        if lc.rdrop > 0:
            l_rd = l_rd + losses.symmetric_kl(logits[adv], logits[c])
    if "adv2" in part:
        l_rd = l_rd + losses.symmetric_kl(logits[adv], logits[part["adv2"]])
    loss = lc.pixel * l_pix + lc.semantic * l_sem + lc.rdrop * l_rd
    with torch.no_grad():
        acc = float((logits[adv].argmax(1) == y).float().mean())
    terms = {"loss": loss.item(), "pixel": l_pix.item(), "semantic": l_sem.item(), "rdrop": l_rd.item(),
             "adv_batch_acc": acc}
    return loss, terms


# --------------------------------------------------------------------------------------------
# The run


def run(cfg: PurifierConfig, out_dir, *, resume: bool = False, data_root=None, quiet: bool = False,
        device: str = "auto", trust_arch: bool = False) -> dict:
    """Train; returns the summary (watched accuracies, paths, time). Raises TrainError."""
    dd = init_distributed(device)
    out = Path(out_dir)
    state_path, final_path, log_path = out / "state.safetensors", out / "purifier.safetensors", out / "log.jsonl"
    resolved = config.to_dict(cfg)
    check_run_dir(out, state_path, resume)

    cpath = resolve_classifier(cfg.classifier)
    f, cspec = classifiers.load(cpath, dd.device, trust_arch=trust_arch)  # trust_arch: may import its code
    dataset = dataset_key(cfg.data.dataset or cspec.dataset)  # a folder:PATH keeps its case
    if cspec.dataset and dataset != dataset_key(cspec.dataset):
        raise TrainError(f"data.dataset is {dataset} but {cpath.name} was trained on {cspec.dataset}: set "
                         f"data.dataset={cspec.dataset} (the presets name their own data set)")
    root = cfg.data.root or data_root or os.environ.get("PSSR_DATA_ROOT")
    if root is None:
        raise TrainError("no data root: pass --data-root, set data.root, or set PSSR_DATA_ROOT")
    train = load_dataset(dataset, root, "train").subset(cfg.data.train_limit)
    test = load_dataset(dataset, root, "test").subset(cfg.data.test_limit)
    C, H, W = train.image_shape
    if (C, H) != (cspec.in_channels, cspec.image_size):
        raise TrainError(f"{cpath.name} takes {cspec.in_channels}x{cspec.image_size}² images, {dataset} has {C}x{H}x{W}")
    attack = _training_attack("attack", cfg.attack, cspec.dataset or dataset)
    ac = cfg.adaptive
    adaptive_attack = _training_attack("adaptive.attack", ac.attack, cspec.dataset or dataset)
    if cfg.noise.fraction and attack.norm != "Linf":
        raise TrainError(f"noise.fraction needs an L∞ training attack (its ε sets the noise), not {attack.label()}")
    tc, lc = cfg.train, cfg.loss
    steps_per_epoch = len(train) // tc.batch_size
    if steps_per_epoch < 1:
        raise TrainError(f"{len(train)} training images is less than one batch of {tc.batch_size}")
    if tc.batch_size % dd.world:
        raise TrainError(f"batch_size {tc.batch_size} does not split over {dd.world} processes")
    total = steps_per_epoch * tc.epochs
    if tc.max_steps is not None:
        total = min(total, tc.max_steps)

    classifier_sha = checkpoint.weights_sha256(f.state_dict())
    torch.manual_seed(tc.seed)  # initial weights, the same on every rank
    rspec = RegeneratorSpec(C, cfg.regenerator.width, cfg.regenerator.dropout, cfg.regenerator.input_bits)
    G = Regenerator(rspec).to(dd.device)
    if cfg.regenerator.init:
        _init_from(G, Path(cfg.regenerator.init), rspec, classifier_sha)
    optimizer = torch.optim.Adam(G.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    surgery = PixelSurgery(f, cfg.surgery)
    step = 0
    if resume:
        tensors, info = checkpoint.load(state_path, kind=STATE_KIND)
        try:  # keys added since that run was started count with their defaults
            started_with = config.to_dict(config.from_dict(PurifierConfig, info["config"]))
        except (config.ConfigError, TypeError, ValueError):
            started_with = info["config"]
        if defining(started_with, RUN_CONTROLS) != defining(resolved, RUN_CONTROLS):
            raise TrainError(f"--resume: {out} was started with another config; use the same --set options")
        if info.get("classifier_sha256") != classifier_sha:
            raise TrainError(f"--resume: {out} was started with another classifier than {cpath}")
        if info.get("world") != dd.world:
            raise TrainError(f"--resume: {out} was started on {info.get('world')} process(es), this is {dd.world}; "
                             f"every random draw depends on the process count, so resume with the same")
        _restore(G, optimizer, tensors)
        step = int(info["step"])
    model = G
    if dd.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(G)
    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    # the accuracy to watch: purified clean test images and transferred PGD (made on f once)
    x_test = test.images.float().div_(255).to(dd.device)
    y_test = test.labels.to(dd.device)
    if dd.main:
        watch_attack = attacks.preset("pgd", cspec.dataset or dataset)
        x_test_adv = attacks.run_attack(watch_attack, f, x_test, y_test, seed=_seed(tc.seed, 7))

    defended = PssrModel(Purifier(f, G, cfg.surgery), gradient=ac.gradient)  # shares G: always the current one

    def check(epoch: int) -> dict:
        if not dd.main:
            return {}
        record = {"step": step, "epoch": epoch, "watch_clean_acc": watched_accuracy(surgery, G, x_test, y_test),
                  "watch_pgd_acc": watched_accuracy(surgery, G, x_test_adv, y_test), "watch_n": len(y_test)}
        if ac.watch_n:
            xw, yw = x_test[: ac.watch_n], y_test[: ac.watch_n]
            bpda = PssrModel(Purifier(f, G, cfg.surgery), gradient="bpda")
            xw_adv = attacks.run_attack(watch_attack, bpda, xw, yw, seed=_seed(tc.seed, 8))
            record.update({"watch_bpda_acc": watched_accuracy(surgery, G, xw_adv, yw), "watch_bpda_n": len(yw)})
        return record

    def save_state():
        if dd.main:
            checkpoint.save(state_path, _state_tensors(G, optimizer),
                            {"kind": STATE_KIND, "step": step, "config": resolved, "world": dd.world,
                             "classifier_sha256": classifier_sha})
        dd.barrier()

    show = dd.main and not quiet and sys.stderr.isatty()
    cache = _attack_cache(out / "attack-cache.safetensors", train, f, surgery, attack, classifier_sha, dataset,
                          tc.seed, dd, show, quiet) if cfg.data.cache else None
    started, run_steps = time.time(), 0
    with tqdm(total=total, initial=step, disable=not show, file=sys.stderr, unit="step", dynamic_ncols=True) as bar, \
            GracefulStop(dd.world) as stop:
        log = Logger(log_path, bar, quiet, step if resume else None) if dd.main else (lambda *a, **k: None)
        G.train()
        try:
            while step < total:
                epoch, b = divmod(step, steps_per_epoch)
                perm = torch.randperm(len(train), generator=_generator(tc.seed, epoch))
                idx = perm[b * tc.batch_size : (b + 1) * tc.batch_size][dd.rank :: dd.world]
                x = train.images[idx].float().div_(255).to(dd.device)
                y = train.labels[idx].to(dd.device)
                if cache is None:
                    x_adv, masks = attacks.run_attack(attack, f, x, y, seed=_seed(tc.seed, epoch, b, dd.rank, 1),
                                                      batch_size=len(x)), None
                else:
                    x_adv = cache.x_adv[idx].to(dd.device)
                    masks = cache.mask_adv[idx].to(dd.device), cache.mask_clean[idx].to(dd.device)
                k = round(ac.fraction * len(x))
                if k:  # the first k images: attacked through the defense with the current G instead
                    x_thru = attacks.run_attack(adaptive_attack, defended, x[:k], y[:k],
                                                seed=_seed(tc.seed, epoch, b, dd.rank, 3), batch_size=k)
                    x_adv = torch.cat([x_thru, x_adv[k:]])
                    if masks is not None:
                        with torch.no_grad():
                            masks = torch.cat([surgery(x_thru)[1], masks[0][k:]]), masks[1]
                j = min(round(cfg.noise.fraction * len(x)), len(x) - k)
                if j:  # the last j images: randomly perturbed clean ones, cut where their own saliency says
                    x_noisy = noise.random_perturbation(x[len(x) - j:], attack.eps, cfg.noise.kind,
                                                        _generator(tc.seed, epoch, b, dd.rank, 4))
                    x_adv = torch.cat([x_adv[: len(x) - j], x_noisy])
                    if masks is not None:
                        with torch.no_grad():
                            masks = torch.cat([masks[0][: len(x) - j], surgery(x_noisy)[1]]), masks[1]
                torch.manual_seed(_seed(tc.seed, epoch, b, dd.rank, 2))  # this step's dropout draws
                loss, terms = step_loss(f, surgery, model, x, y, x_adv, lc, masks)
                lr = lr_at(step, total, tc)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if tc.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(G.parameters(), tc.grad_clip)
                optimizer.step()
                step, run_steps = step + 1, run_steps + 1
                bar.update()
                if step % tc.log_every == 0 or step == 1:
                    bar.set_postfix(loss=f"{terms['loss']:.3f}", acc=f"{terms['adv_batch_acc']:.2f}")
                    log({"step": step, "epoch": epoch, "lr": lr, "world": dd.world, **terms})
                end_of_epoch = step % steps_per_epoch == 0 or step == total
                if end_of_epoch or (tc.eval_every and step % tc.eval_every == 0):
                    record = check(epoch)
                    if record:
                        bpda = (f", PGD through G (BPDA) {record['watch_bpda_acc']:.2%} on {record['watch_bpda_n']}"
                                if "watch_bpda_acc" in record else "")
                        log(record, f"step {step}/{total}: purified accuracy clean {record['watch_clean_acc']:.2%}, "
                                    f"PGD (transfer) {record['watch_pgd_acc']:.2%} on {record['watch_n']} test images"
                                    + bpda)
                due = end_of_epoch or step % tc.checkpoint_every == 0
                stopped = end_of_step(save_state, due, stop, tc.stop_after_steps, run_steps, step, total, state_path)
                if stopped:
                    return stopped
        except KeyboardInterrupt:
            raise interrupted_mid_step(step, total) from None

    seconds = time.time() - started
    summary = {"checkpoint": str(final_path), "seconds": seconds, "steps": total, "world": dd.world}
    if dd.main:
        final = check(epoch=(total - 1) // steps_per_epoch)
        spec = purifier.PurifierSpec(
            regenerator=rspec, surgery=cfg.surgery, classifier_sha256=classifier_sha,
            classifier_file=cpath.name, dataset=cspec.dataset or dataset,
            extra={**{k: v for k, v in final.items() if k.startswith("watch_")}, "steps": total, "seed": tc.seed,
                   "attack": attack.label(), "train_images": len(train), "train_seconds_this_run": round(seconds, 1),
                   **({"adaptive": f"{ac.fraction:g} of each batch: {adaptive_attack.label()} through the defense "
                                   f"({ac.gradient})"} if ac.fraction else {}),
                   **({"noise": f"{cfg.noise.fraction:g} of each batch: random {cfg.noise.kind} at the "
                                f"training attack's ε"} if cfg.noise.fraction else {}),
                   **({"init": Path(cfg.regenerator.init).name} if cfg.regenerator.init else {})},
        )
        purifier.save(final_path, G, spec)
        summary.update({k: v for k, v in final.items() if k.startswith("watch_")})
        log({"final": True, **summary})
    dd.barrier()
    return summary


def _training_attack(key: str, text: str, dataset: str) -> attacks.AttackSpec:
    try:
        attack = attacks.parse_attack(text, dataset)
    except attacks.AttackError as exc:
        raise TrainError(f"{key}: {exc}") from None
    if attack.name not in TRAINING_ATTACKS:
        raise TrainError(f"{key}: the training attack must be PGD ({', '.join(TRAINING_ATTACKS)}), "
                         f"got {attack.name!r}; the other attacks stay unseen for evaluation")
    return attack


def _init_from(G: Regenerator, path: Path, rspec: RegeneratorSpec, classifier_sha: str) -> None:
    """G's starting weights from a purifier checkpoint of the same size, for the same classifier;
    finite and of the shapes its spec names (``purifier.check_weights``, as when a purifier is loaded)."""
    try:
        tensors, info = checkpoint.load(path, kind=purifier.KIND)
        spec = purifier.read_spec(info, path)
        purifier.check_weights(tensors, spec, path)
    except checkpoint.CheckpointError as exc:
        raise TrainError(f"regenerator.init: {exc}") from None
    if spec.classifier_sha256 != classifier_sha:
        raise TrainError(f"regenerator.init: {path} was trained for another classifier")
    if spec.regenerator != rspec:
        raise TrainError(f"regenerator.init: {path} holds a G of width {spec.regenerator.width} and "
                         f"{spec.regenerator.channels} channel(s); this run builds width {rspec.width}, {rspec.channels}")
    G.load_state_dict(tensors)


def _attack_cache(path: Path, train, f, surgery, attack, classifier_sha: str, dataset: str, seed: int, dd: Dist,
                  show: bool, quiet: bool) -> attack_cache.Cached:
    """The stored training attack if it matches this run, else made now (all processes) and stored."""
    want = attack_cache.key(classifier_sha, attack.label(), surgery.config, dataset, len(train), seed)
    cached = attack_cache.load(path, want)
    if cached is not None:
        return cached
    parts = path.with_name(path.name.removesuffix(".safetensors") + ".parts")  # made so far, kept on a stop
    started = time.time()
    if dd.main and not quiet and not show:  # no bar off a terminal: say why nothing happens for a while
        print(f"making the training attack for {len(train)} images (once; stored in {path})", file=sys.stderr)
    try:
        with tqdm(total=len(train), disable=not show, file=sys.stderr, unit="img", desc="training attack (once)",
                  dynamic_ncols=True) as bar:
            cached = attack_cache.make(train.images, train.labels, f, surgery, attack, seed, rank=dd.rank,
                                       world=dd.world, device=dd.device, progress=lambda k: bar.update(k * dd.world),
                                       parts=parts, want=want)
    except KeyboardInterrupt:  # Ctrl-C stops here at once (GracefulStop is on only during the steps)
        kept = len(list(parts.glob("*.safetensors"))) if parts.is_dir() else 0
        state = path.with_name("state.safetensors")
        again = "the same command (with --resume)" if state.is_file() else "the same command, without --resume"
        size = attack_cache.PART_CHUNKS * attack_cache.CHUNK
        raise TrainError(f"interrupted while making the training attack ({kept} part file(s) of up to {size} "
                         f"images each kept in {parts}): rerun {again}; it makes only the rest") from None
    if dd.main:
        attack_cache.save(path, cached, want)
        attack_cache.remove_parts(parts)
    if dd.main and not quiet:
        print(f"made the training attack for {len(train)} images in {time.time() - started:.0f} s: {path}",
              file=sys.stderr)
    dd.barrier()
    return cached
