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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from . import adversarial, checkpoint, classifiers, config
from .data import ImageDataset, load_dataset
from .interrupt import GracefulStop
from .training import distributed_cleanup  # noqa: F401  (cli/train_classifier.py's name for it)
from .training import (Logger, TrainError, check_run_dir, defining, end_of_step, init_distributed, interrupted_mid_step,
                       lr_at)
from .training import restore as _restore
from .training import seeded_generator as _generator
from .training import state_tensors as _state_tensors

STATE_KIND = "classifier-training-state"


@dataclass
class DataConfig:
    dataset: str = "mnist"  # mnist, cifar10, cifar100, or folder:PATH (PATH/train, PATH/test; under the root)
    root: str | None = None  # default: --data-root, else $PSSR_DATA_ROOT
    train_limit: int | None = None  # first N training images (smoke tests, ablations)
    test_limit: int | None = None


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


@dataclass
class ClassifierConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    adversarial: adversarial.AdversarialConfig = field(default_factory=adversarial.AdversarialConfig)


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
    perm = torch.randperm(len(data), generator=_generator(seed, 424_242))
    keep, held = perm[:-n].sort().values, perm[-n:].sort().values

    def part(idx):
        return ImageDataset(data.name, data.images[idx], data.labels[idx], data.classes)

    return part(keep), part(held)


def _build_spec(cfg: ClassifierConfig, train: ImageDataset) -> classifiers.ClassifierSpec:
    C, H, _ = train.image_shape
    mean, std = channel_stats(train)
    kwargs = {"width": cfg.model.width} if cfg.model.width is not None else {}
    return classifiers.ClassifierSpec(cfg.model.arch, train.num_classes, C, H, mean, std, train.name, train.classes,
                                      arch_kwargs=kwargs)


def run(cfg: ClassifierConfig, out_dir, *, resume: bool = False, data_root=None, quiet: bool = False,
        device: str = "auto") -> dict:
    """Train; returns the final summary (test accuracy, watch, paths, time). Raises TrainError."""
    dd = init_distributed(device)
    out = Path(out_dir)
    state_path, final_path, log_path = out / "state.safetensors", out / "classifier.safetensors", out / "log.jsonl"
    resolved = config.to_dict(cfg)
    check_run_dir(out, state_path, resume)

    root = cfg.data.root or data_root or os.environ.get("PSSR_DATA_ROOT")
    if root is None:
        raise TrainError("no data root: pass --data-root, set data.root, or set PSSR_DATA_ROOT")
    tc, ac = cfg.train, cfg.adversarial
    train, held = hold_back(load_dataset(cfg.data.dataset, root, "train").subset(cfg.data.train_limit),
                            ac.watch_n if ac.enabled else 0, tc.seed)
    test = load_dataset(cfg.data.dataset, root, "test").subset(cfg.data.test_limit)
    if test.image_shape != train.image_shape:
        raise TrainError(f"{cfg.data.dataset}: test images are {'x'.join(map(str, test.image_shape))}, "
                         f"training images {'x'.join(map(str, train.image_shape))}; they must match")
    steps_per_epoch = len(train) // tc.batch_size
    if steps_per_epoch < 1:
        raise TrainError(f"{len(train)} training images is less than one batch of {tc.batch_size}")
    if tc.batch_size % dd.world:
        raise TrainError(f"batch_size {tc.batch_size} does not split over {dd.world} processes")
    total = steps_per_epoch * tc.epochs

    spec = _build_spec(cfg, train)
    torch.manual_seed(tc.seed)  # initial weights, the same on every rank
    model = classifiers.build(spec).to(dd.device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=tc.lr, momentum=tc.momentum, nesterov=True)
    decay = [p for p in model.parameters() if p.ndim > 1]  # conv/linear weights; not BN or biases
    watch = adversarial.Watch(ac.collapse_points)

    step, seconds_before = 0, 0.0
    if resume:
        tensors, info = checkpoint.load(state_path, kind=STATE_KIND)
        try:  # keys added since that run was started count with their defaults
            started_with = config.to_dict(config.from_dict(ClassifierConfig, info["config"]))
        except (config.ConfigError, TypeError, ValueError):
            started_with = info["config"]
        if defining(started_with, RUN_CONTROLS) != defining(resolved, RUN_CONTROLS):
            raise TrainError(f"--resume: {out} was started with another config; use the same --set options")
        if info.get("world", 1) != dd.world:
            raise TrainError(f"--resume: {out} was started on {info.get('world', 1)} process(es), this is {dd.world}; "
                             f"every random draw depends on the process count, so resume with the same")
        _restore(model, optimizer, {k: v for k, v in tensors.items() if not k.startswith("best.")})
        watch = adversarial.Watch.restore(ac.collapse_points, tensors, info.get("watch"))
        step, seconds_before = int(info["step"]), float(info.get("seconds", 0.0))
    trained = torch.nn.parallel.DistributedDataParallel(model) if dd.world > 1 else model
    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    started, run_steps = time.time(), 0
    x_held = held.images[dd.rank :: dd.world].float().div_(255).to(dd.device)
    y_held = held.labels[dd.rank :: dd.world].to(dd.device)

    def save_state():
        if dd.main:
            checkpoint.save(state_path, {**_state_tensors(model, optimizer), **watch.tensors()},
                            {"kind": STATE_KIND, "step": step, "config": resolved, "world": dd.world,
                             "watch": watch.info(), "seconds": seconds_before + time.time() - started})
        dd.barrier()

    def check(epoch: int) -> bool:
        """One watch: log it, keep the best state; True on a collapse."""
        counts = torch.tensor(adversarial.watch(model, x_held, y_held, ac, _generator(tc.seed, 7, dd.rank)),
                              dtype=torch.float64)
        if dd.world > 1:
            dist.all_reduce(counts)
        clean, robust = (counts / len(held)).tolist()
        collapsed = watch.update(model, step, clean, robust)
        log({"step": step, "epoch": epoch, "watch_clean_acc": clean, "watch_pgd_acc": robust, "watch_n": len(held),
             "eps": adversarial.eps_at(ac, step - 1, steps_per_epoch)},
            f"step {step}: watch clean {clean:.2%}, PGD-{ac.watch_steps} {robust:.2%} "
            f"(best {watch.best_acc:.2%} at step {watch.best_step})")
        return collapsed

    collapsed_at = None
    show = dd.main and not quiet and sys.stderr.isatty()
    with tqdm(total=total, initial=step, disable=not show, file=sys.stderr, unit="step", dynamic_ncols=True) as bar, \
            GracefulStop(dd.world) as stop:
        log = Logger(log_path, bar, quiet, step if resume else None) if dd.main else (lambda *a, **k: None)
        model.train()
        try:
            while step < total:
                epoch, b = divmod(step, steps_per_epoch)
                perm = torch.randperm(len(train), generator=_generator(tc.seed, epoch))
                idx = perm[b * tc.batch_size : (b + 1) * tc.batch_size]
                x = train.images[idx].float().div_(255)
                x = augment(x, tc.augment, _generator(tc.seed, epoch, b, 1))[dd.rank :: dd.world]
                x = x.to(dd.device).contiguous(memory_format=torch.channels_last)
                y = train.labels[idx][dd.rank :: dd.world].to(dd.device)
                lr = lr_at(step, total, tc)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                eps = adversarial.eps_at(ac, step, steps_per_epoch)
                loss = adversarial.training_loss(ac, trained, model, x, y, eps, _generator(tc.seed, epoch, b, dd.rank, 2),
                                                 tc.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                with torch.no_grad():
                    torch._foreach_add_([p.grad for p in decay], decay, alpha=tc.weight_decay)
                optimizer.step()
                step, run_steps = step + 1, run_steps + 1
                bar.update()
                if step % tc.log_every == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}")
                    log({"step": step, "epoch": epoch, "loss": loss.item(), "lr": lr, "eps": eps})
                epoch_end = step % steps_per_epoch == 0
                if epoch_end and dd.main:
                    acc, test_loss = evaluate(model, test)
                    log({"step": step, "epoch": epoch, "test_acc": acc, "test_loss": test_loss},
                        f"epoch {epoch + 1}/{tc.epochs}: test accuracy {acc:.2%} (loss {test_loss:.3f})")
                if len(held) and (epoch_end or step % ac.watch_every == 0 or step == total) and check(epoch):
                    collapsed_at = step
                    log({"step": step, "collapse": True, "best_step": watch.best_step, "best_acc": watch.best_acc},
                        f"robust accuracy collapsed at step {step} (more than {ac.collapse_points:g} points below "
                        f"the best, {watch.best_acc:.2%} at step {watch.best_step}): ending on the best weights")
                    break
                due = epoch_end or step % tc.checkpoint_every == 0
                stopped = end_of_step(save_state, due, stop, tc.stop_after_steps, run_steps, step, total, state_path)
                if stopped:
                    return stopped
        except KeyboardInterrupt:
            raise interrupted_mid_step(step, total) from None

    if watch.best_state is not None:
        watch.load_best_into(model)
    seconds = seconds_before + time.time() - started
    if not dd.main:
        dd.barrier()
        return {}
    acc, test_loss = evaluate(model, test)
    record = ac.record()
    if len(held):
        record.update(watch={"n": len(held), "pgd_steps": ac.watch_steps, "best_pgd_acc": watch.best_acc,
                             "best_clean_acc": watch.best_clean, "best_step": watch.best_step},
                      weights="best watched", collapsed_at_step=collapsed_at)
    spec.extra = {"test_accuracy": acc, "test_images": len(test), "train_images": len(train),
                  "epochs": tc.epochs, "steps": total, "seed": tc.seed, "train_seconds": round(seconds, 1),
                  "processes": dd.world, "training": record}
    model = model.to("cpu", memory_format=torch.contiguous_format)
    classifiers.save(final_path, model, spec)
    summary = {"test_accuracy": acc, "test_loss": test_loss, "test_images": len(test), "checkpoint": str(final_path),
               "seconds": seconds, "steps": total, "training": record}
    log({"final": True, **summary})
    dd.barrier()
    return summary
