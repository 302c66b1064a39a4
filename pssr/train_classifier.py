"""The classifier-training pipeline behind `pssr train-classifier`, standard or adversarial.

Adversarial training (the ``adversarial:`` block; `pssr.adversarial`) makes each batch's
examples in the loop, watches PGD accuracy on training images held back from training, keeps
the best watched weights (they are what the final checkpoint holds) and ends a run whose robust
accuracy collapses. Distributed with `torchrun` (DDP; gloo on CPU), each process taking its
share of every batch.

Resumable exactly: every random choice (shuffle, crops, flips) is derived from (seed, epoch,
step) and the learning rate is a function of the step, so a run stopped at any checkpoint and
resumed with `--resume` ends with the same weights as an uninterrupted run (same threads).
State is saved atomically as safetensors every `checkpoint_every` steps, at each epoch's end
and at the step boundary after Ctrl-C or SIGTERM (`pssr.interrupt`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import ablation, adversarial, checkpoint, classifiers, config
from .data import ImageDataset, load_dataset
from .training import distributed_cleanup  # noqa: F401  (cli/train_classifier.py's name for it)
from .training import (Cadence, Logger, Steps, TrainError, Watch, batch_at, init_distributed, loop, lr_at, open_run,
                       optimizer_step, world_identity)
from .training import restore as _restore
from .training import seeded_generator as _generator
from .training import state_tensors as _state_tensors

STATE_KIND = "classifier-training-state"
# seed streams: the numbers that name each kind of random draw (never renumbered: runs stay reproducible)
AUGMENT, ATTACK, WATCH, HOLD_BACK = 1, 2, 7, 424_242
ABLATE = 3  # randomized ablation's kept pixels (the ablation: block; pssr/ablation.py)


@dataclass
class DataConfig:
    dataset: str = "mnist"  # mnist, cifar10, cifar100, or folder:PATH (PATH/train, PATH/test; under the root)
    root: str | None = None  # default: --data-root, else $PSSR_DATA_ROOT
    train_limit: int | None = None  # first N training images (smoke tests, ablations)
    test_limit: int | None = None

    def __post_init__(self):
        config.check_limit(self.train_limit, "train_limit")
        config.check_limit(self.test_limit, "test_limit")


@dataclass
class ModelConfig:
    arch: Literal["lenet", "resnet9", "resnet18"] = "lenet"
    width: int | None = None  # resnet9's base width (default 32; 64 is DAWNBench's)

    def __post_init__(self):
        if self.width is not None and (self.arch != "resnet9" or not 8 <= self.width <= 256):
            raise ValueError("model.width is resnet9's base width, from 8 to 256")


@dataclass
class TrainConfig:
    epochs: int = 4
    batch_size: int = 128
    lr: float = 0.05  # peak of the one-cycle schedule
    warmup_fraction: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    augment: Literal["none", "crop", "crop-flip"] = "none"
    seed: int = 0
    checkpoint_every: int = 200  # steps
    log_every: int = 20  # steps
    stop_after_steps: int | None = None  # stop (checkpointed) after this many steps of this run

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError("epochs must be >= 1 and batch_size >= 2")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError("warmup_fraction must be in [0, 1)")
        if self.lr <= 0 or self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("lr, checkpoint_every and log_every must be > 0")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        config.check_seed(self.seed)


@dataclass
class ClassifierConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    adversarial: adversarial.AdversarialConfig = field(default_factory=adversarial.AdversarialConfig)
    ablation: ablation.AblationConfig = field(default_factory=ablation.AblationConfig)  # randomized ablation; off


RUN_CONTROLS = ("stop_after_steps",)  # train keys a resume may change


def augment(x: torch.Tensor, kind: str, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding) and horizontal flip, per image, from one generator."""
    if kind == "none":
        return x
    B, C, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=gen)
    rows = (dy[:, None] + torch.arange(H))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(W))[:, None, None, :]
    out = padded[torch.arange(B)[:, None, None, None], torch.arange(C)[None, :, None, None], rows, cols]
    if kind == "crop-flip":
        flip = torch.rand(B, generator=gen) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: ImageDataset, batch_size: int = 500) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on `data`, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, loss = 0, 0.0
    for i in range(0, len(data), batch_size):
        x = data.images[i : i + batch_size].to(device).float().div_(255)
        y = data.labels[i : i + batch_size].to(device)
        logits = model(x.contiguous(memory_format=torch.channels_last))
        correct += int((logits.argmax(1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
    model.train(was_training)
    n = max(1, len(data))
    return correct / n, loss / n


def channel_stats(data: ImageDataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the training images: the classifier's Normalize layer."""
    x = data.images.float().div_(255).transpose(0, 1).flatten(1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).tolist())


def hold_back(data: ImageDataset, n: int, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """(the images to train on, ``n`` held back for the watch): a seeded split, each part in data order."""
    if n <= 0:
        return data, data.subset(0)
    if n >= len(data):
        raise TrainError(f"adversarial.watch_n={n} would hold back all {len(data)} training images")
    perm = torch.randperm(len(data), generator=_generator(seed, HOLD_BACK))
    keep, held = perm[:-n].sort().values, perm[-n:].sort().values

    def part(idx):
        return ImageDataset(data.name, data.images[idx], data.labels[idx], data.classes)

    return part(keep), part(held)


def _build_spec(cfg: ClassifierConfig, train: ImageDataset) -> classifiers.ClassifierSpec:
    C, H, _ = train.image_shape
    mean, std = channel_stats(train)
    kwargs = {"width": cfg.model.width} if cfg.model.width is not None else {}
    return classifiers.ClassifierSpec(cfg.model.arch, train.num_classes, C, H, mean, std, train.name, train.classes,
                                      arch_kwargs=kwargs, ablation=ablation.spec_record(cfg, train))


def load_data(cfg: ClassifierConfig, data_root) -> tuple[ImageDataset, ImageDataset, ImageDataset]:
    """(training images, images held back for the watch, test images)."""
    root = cfg.data.root or data_root or os.environ.get("PSSR_DATA_ROOT")
    if root is None:
        raise TrainError("no data root: pass --data-root, set data.root, or set PSSR_DATA_ROOT")
    ac = cfg.adversarial
    train, held = hold_back(load_dataset(cfg.data.dataset, root, "train").subset(cfg.data.train_limit),
                            ac.watch_n if ac.enabled else 0, cfg.train.seed)
    test = load_dataset(cfg.data.dataset, root, "test").subset(cfg.data.test_limit)
    if test.image_shape != train.image_shape:
        raise TrainError(f"{cfg.data.dataset}: test images are {'x'.join(map(str, test.image_shape))}, "
                         f"training images {'x'.join(map(str, train.image_shape))}; they must match")
    if len(train) < cfg.train.batch_size:
        raise TrainError(f"{len(train)} training images is less than one batch of {cfg.train.batch_size}")
    return train, held, test


class _Run(Steps):
    """One classifier-training run: its data, model, optimizer and watch, and what a step does."""

    def __init__(self, cfg: ClassifierConfig, out: Path, resume: bool, data_root, device: str):
        self.cfg, self.out, self.dd = cfg, out, init_distributed(device)
        tc = cfg.train
        self.train, self.held, self.test = load_data(cfg, data_root)
        if tc.batch_size % self.dd.world:
            raise TrainError(f"batch_size {tc.batch_size} does not split over {self.dd.world} processes")
        self.cadence = Cadence(len(self.train) // tc.batch_size, tc.checkpoint_every, tc.log_every,
                               tc.stop_after_steps)
        self.total = self.cadence.steps_per_epoch * tc.epochs
        self.resolved = config.to_dict(cfg)
        self.spec = _build_spec(cfg, self.train)
        torch.manual_seed(tc.seed)  # initial weights, the same on every rank
        self.model = classifiers.build(self.spec).to(self.dd.device, memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=tc.lr, momentum=tc.momentum, nesterov=True)
        self.decay = [p for p in self.model.parameters() if p.ndim > 1]  # conv/linear weights; not BN or biases
        self.watch = Watch(cfg.adversarial.collapse_points)
        self.step, tensors, info = open_run(out, STATE_KIND, self.resolved, ClassifierConfig, RUN_CONTROLS, resume,
                                            world_identity(self.dd.world), self.dd.main)
        if resume:
            _restore(self.model, self.optimizer, {k: v for k, v in tensors.items() if not k.startswith("best.")})
            self.watch.restore(tensors, info.get("watch"))
        self.seconds_before, self.started = float(info.get("seconds", 0.0)), time.time()
        self.trained = torch.nn.parallel.DistributedDataParallel(self.model) if self.dd.world > 1 else self.model
        self.x_held = self.held.images[self.dd.rank :: self.dd.world].float().div_(255).to(self.dd.device)
        self.y_held = self.held.labels[self.dd.rank :: self.dd.world].to(self.dd.device)
        self.collapsed_at: int | None = None

    def one_step(self, step: int) -> dict:
        tc, ac, dd = self.cfg.train, self.cfg.adversarial, self.dd
        epoch, b, idx = batch_at(step, self.cadence.steps_per_epoch, len(self.train), tc.batch_size, tc.seed)
        x = augment(self.train.images[idx].float().div_(255), tc.augment, _generator(tc.seed, epoch, b, AUGMENT))
        x = x[dd.rank :: dd.world].to(dd.device).contiguous(memory_format=torch.channels_last)
        x = ablation.train_input(self.cfg.ablation, x, _generator(tc.seed, epoch, b, dd.rank, ABLATE))  # off: x
        y = self.train.labels[idx][dd.rank :: dd.world].to(dd.device)
        eps = adversarial.eps_at(ac, step, self.cadence.steps_per_epoch)
        x_adv = None
        if ac.enabled:
            x_adv = adversarial.make(self.model, x, y, ac, eps, _generator(tc.seed, epoch, b, dd.rank, ATTACK))
        loss = adversarial.classifier_loss(self.trained, x, y, x_adv, ac, tc.label_smoothing)
        lr = lr_at(step, self.total, tc)
        optimizer_step(self.optimizer, loss, lr, decay=self.decay, weight_decay=tc.weight_decay)
        return {"loss": loss.item(), "lr": lr, "eps": eps}

    def after_step(self, step: int, epoch_end: bool, log) -> str | None:
        epoch = (step - 1) // self.cadence.steps_per_epoch
        if epoch_end and self.dd.main:
            acc, test_loss = evaluate(self.model, self.test)
            log({"step": step, "epoch": epoch, "test_acc": acc, "test_loss": test_loss},
                f"epoch {epoch + 1}/{self.cfg.train.epochs}: test accuracy {acc:.2%} (loss {test_loss:.3f})")
        ac = self.cfg.adversarial
        if not len(self.held) or not (epoch_end or step % ac.watch_every == 0 or step == self.total):
            return None
        if not self.check(step, epoch, log):
            return None
        self.collapsed_at = step
        log({"step": step, "collapse": True, "best_step": self.watch.best_step, "best_acc": self.watch.best_acc},
            f"robust accuracy collapsed at step {step} (more than {ac.collapse_points:g} points below the best, "
            f"{self.watch.best_acc:.2%} at step {self.watch.best_step}): ending on the best weights")
        return "collapse"

    def check(self, step: int, epoch: int, log) -> bool:
        """One watch of the held-back images (each rank its share): log it, keep the best; True on a collapse."""
        ac = self.cfg.adversarial
        counts = adversarial.watch(self.model, self.x_held, self.y_held, ac, _generator(self.cfg.train.seed, WATCH,
                                                                                       self.dd.rank))
        counts = torch.tensor(counts, dtype=torch.float64)
        if self.dd.world > 1:
            dist.all_reduce(counts)
        clean, robust = (counts / len(self.held)).tolist()
        collapsed = self.watch.update(self.model, step, clean, robust)
        log({"step": step, "epoch": epoch, "watch_clean_acc": clean, "watch_pgd_acc": robust,
             "watch_n": len(self.held), "eps": adversarial.eps_at(ac, step - 1, self.cadence.steps_per_epoch)},
            f"step {step}: watch clean {clean:.2%}, PGD-{ac.watch_steps} {robust:.2%} "
            f"(best {self.watch.best_acc:.2%} at step {self.watch.best_step})")
        return collapsed

    def save_state(self, step: int) -> None:
        if self.dd.main:
            checkpoint.save(self.out / "state.safetensors",
                            {**_state_tensors(self.model, self.optimizer), **self.watch.tensors()},
                            {"kind": STATE_KIND, "step": step, "config": self.resolved, "world": self.dd.world,
                             "watch": self.watch.info(), "seconds": self.seconds()})
        self.dd.barrier()

    def seconds(self) -> float:
        return self.seconds_before + time.time() - self.started

    def finish(self) -> dict:
        """The final checkpoint (the best watched weights, when watched) and the summary."""
        self.watch.load_best_into(self.model)
        if not self.dd.main:
            self.dd.barrier()
            return {}
        acc, test_loss = evaluate(self.model, self.test)
        tc, record = self.cfg.train, self.cfg.adversarial.record()
        if len(self.held):
            record.update(watch={"n": len(self.held), "pgd_steps": self.cfg.adversarial.watch_steps,
                                 "best_pgd_acc": self.watch.best_acc, "best_clean_acc": self.watch.best_clean,
                                 "best_step": self.watch.best_step},
                          weights="best watched", collapsed_at_step=self.collapsed_at)
        self.spec.extra = {"test_accuracy": acc, "test_images": len(self.test), "train_images": len(self.train),
                           "epochs": tc.epochs, "steps": self.total, "seed": tc.seed,
                           "train_seconds": round(self.seconds(), 1), "processes": self.dd.world, "training": record}
        final = self.out / "classifier.safetensors"
        classifiers.save(final, self.model.to("cpu", memory_format=torch.contiguous_format), self.spec)
        summary = {"test_accuracy": acc, "test_loss": test_loss, "test_images": len(self.test),
                   "checkpoint": str(final), "seconds": self.seconds(), "steps": self.total, "training": record}
        Logger(self.out / "log.jsonl", None, True)({"final": True, **summary})
        self.dd.barrier()
        return summary


def run(cfg: ClassifierConfig, out_dir, *, resume: bool = False, data_root=None, quiet: bool = False,
        device: str = "auto") -> dict:
    """Train; returns the final summary (test accuracy, training record, paths, time). Raises TrainError."""
    out = Path(out_dir)
    r = _Run(cfg, out, resume, data_root, device)
    r.model.train()
    step, stopped = loop(r, r.step, r.total, r.cadence, log_path=out / "log.jsonl", state_path=out / "state.safetensors",
                         dd=r.dd, quiet=quiet, resumed=resume)
    if stopped and "ended" not in stopped:
        return stopped
    return r.finish()
