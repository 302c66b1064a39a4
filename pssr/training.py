"""What both trainers (`train-classifier`, `train`) share: seeds, the schedule, the run folder,
the loop frame (progress bar, JSONL log, checkpoints), the resume state, the best-state watch,
torchrun distribution and the rules for stopping early.

A run stops early in two ways, both at a step boundary so that the saved state is exact: its
step budget for this invocation (`stop_after_steps`) or a Ctrl-C/SIGTERM (`pssr.interrupt`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from . import checkpoint, config
from .checkpoint import atomic_write
from .interrupt import GracefulStop


class TrainError(Exception):
    """A run that cannot start or resume (one line)."""


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from integers (seed, epoch, step, ...): the same draws on a resume."""
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def lr_at(step: int, total: int, cfg) -> float:
    """One-cycle: linear warm-up to the peak (cfg.lr), then linear decay to zero."""
    warm = max(1, int(cfg.warmup_fraction * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * max(0.0, (total - step) / max(1, total - warm))


def check_run_dir(out: Path, state_path: Path, resume: bool) -> None:
    if state_path.exists() and not resume:
        raise TrainError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if resume and not state_path.exists():
        # `pssr train` stopped (Ctrl-C) while making its training attack, before the first step saved a
        # state: the finished parts (or the whole cache) are kept, and a plain rerun starts from them
        parts = out / "attack-cache.parts"
        kept = len(list(parts.glob("*.safetensors"))) if parts.is_dir() else 0
        if kept or (out / "attack-cache.safetensors").is_file():
            made = f"{kept} finished part file(s) of the training attack are kept in {parts}" if kept else \
                f"the training attack is kept in {out / 'attack-cache.safetensors'}"
            raise TrainError(f"--resume: no {state_path} to resume from: the run stopped before its first step, "
                             f"and {made}; rerun the same command without --resume, which continues from there")
        raise TrainError(f"--resume: no {state_path} to resume from")


def defining(resolved: dict, run_controls: tuple[str, ...]) -> dict:
    """The config a resume must match: all of it but the `train` keys that only steer this invocation."""
    return {**resolved, "train": {k: v for k, v in resolved["train"].items() if k not in run_controls}}


def state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Model weights and the optimizer's per-parameter state (momentum, Adam moments, step)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, p in enumerate(optimizer.param_groups[0]["params"]):
        for key, value in optimizer.state.get(p, {}).items():
            tensors[f"optim.{i}.{key}"] = torch.as_tensor(value)
    return tensors


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, key = k.split(".", 2)
            state.setdefault(int(i), {})[key] = v.clone()
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def open_run(out: Path, kind: str, resolved: dict, config_cls, run_controls: tuple[str, ...], resume: bool,
             identity: dict, main: bool = True) -> tuple[int, dict, dict]:
    """The run folder, and on ``--resume`` its saved (step, tensors, info).

    A resume is refused when the saved config (keys added since count with their defaults) or an
    ``identity`` entry (``{key: (value, what_differs)}``, e.g. the process count) differs from this
    run's: the same state with other settings would not continue the same run.
    """
    state_path = out / "state.safetensors"
    check_run_dir(out, state_path, resume)
    step, tensors, info = 0, {}, {}
    if resume:
        tensors, info = checkpoint.load(state_path, kind=kind)
        try:
            started_with = config.to_dict(config.from_dict(config_cls, info["config"]))
        except (config.ConfigError, TypeError, ValueError):
            started_with = info["config"]
        if defining(started_with, run_controls) != defining(resolved, run_controls):
            raise TrainError(f"--resume: {out} was started with another config; use the same --set options")
        for key, (value, message) in identity.items():
            if info.get(key, 1 if key == "world" else None) != value:
                raise TrainError(f"--resume: {out} {message(info.get(key))}")
        step = int(info["step"])
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    return step, tensors, info


def world_identity(world: int) -> dict:
    """The ``identity`` entry that pins a run to its process count."""
    return {"world": (world, lambda saved: f"was started on {saved} process(es), this is {world}; every random draw "
                                           f"depends on the process count, so resume with the same")}


def batch_at(step: int, steps_per_epoch: int, n: int, batch_size: int, seed: int) -> tuple[int, int, torch.Tensor]:
    """(epoch, batch in epoch, image indices) of ``step``: the one seeded shuffle per epoch."""
    epoch, b = divmod(step, steps_per_epoch)
    perm = torch.randperm(n, generator=seeded_generator(seed, epoch))
    return epoch, b, perm[b * batch_size : (b + 1) * batch_size]


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, lr: float, *, decay=(),
                   weight_decay: float = 0.0, clip: float = 0.0) -> None:
    """Set the learning rate, backward, decoupled-from-BN weight decay on ``decay``, clip, step."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if weight_decay and decay:
        with torch.no_grad():
            torch._foreach_add_([p.grad for p in decay], list(decay), alpha=weight_decay)
    if clip:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()


@dataclass
class Cadence:
    """When a loop logs, checkpoints and stops on its budget (all in steps)."""

    steps_per_epoch: int
    checkpoint_every: int
    log_every: int
    stop_after_steps: int | None = None


class Steps:
    """What a trainer gives `loop`: one step, the checks after it, and its resume state."""

    def one_step(self, step: int) -> dict:  # numbers to log (loss, lr, ...)
        raise NotImplementedError

    def after_step(self, step: int, epoch_end: bool, log) -> str | None:  # a reason to end the run now
        return None

    def save_state(self, step: int) -> None:
        raise NotImplementedError


def loop(steps: Steps, step: int, total: int, cadence: Cadence, *, log_path: Path, state_path: Path, dd: "Dist",
         quiet: bool, resumed: bool) -> tuple[int, dict | None]:
    """Run steps [step, total) with one progress bar, the JSONL log and the stop rules.

    Returns (the step reached, a summary when the run stopped early: the budget's, or an
    ``after_step`` reason as ``{"ended": reason}``). Ctrl-C/SIGTERM raise ``interrupted`` once
    the state of a finished step is saved; a second Ctrl-C mid-step raises at once.
    """
    show = dd.main and not quiet and sys.stderr.isatty()
    run_steps = 0
    with tqdm(total=total, initial=step, disable=not show, file=sys.stderr, unit="step", dynamic_ncols=True) as bar, \
            GracefulStop(dd.world) as stop:
        log = Logger(log_path, bar, quiet, step if resumed else None) if dd.main else _silent
        try:
            while step < total:
                record = steps.one_step(step)
                epoch = step // cadence.steps_per_epoch
                step, run_steps = step + 1, run_steps + 1
                bar.update()
                if step % cadence.log_every == 0:
                    bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k in ("loss", "lr")})
                    log({"step": step, "epoch": epoch, **record})
                epoch_end = step % cadence.steps_per_epoch == 0
                reason = steps.after_step(step, epoch_end, log)
                if reason:
                    return step, {"ended": reason}
                due = epoch_end or step % cadence.checkpoint_every == 0
                stopped = end_of_step(lambda: steps.save_state(step), due, stop, cadence.stop_after_steps, run_steps,
                                      step, total, state_path)
                if stopped:
                    return step, stopped
        except KeyboardInterrupt:
            raise interrupted_mid_step(step, total) from None
    return step, None


def _silent(*args, **kwargs) -> None:
    """The log of ranks other than 0."""


class Watch:
    """The best watched state of a run so far, and the collapse rule.

    ``update`` takes each check's (clean, robust) accuracy; the best robust accuracy's weights are
    kept as a CPU copy of the state dict (buffers included) and travel in the resume state under
    ``best.``. A check more than ``collapse_points`` below the best is a collapse.
    """

    def __init__(self, collapse_points: float):
        self.collapse_points = collapse_points
        self.best_acc = self.best_clean = -1.0
        self.best_step = -1
        self.best_state: dict | None = None

    def update(self, model: torch.nn.Module, step: int, clean: float, robust: float) -> bool:
        """Record a check; True when it is a collapse."""
        if robust > self.best_acc:
            self.best_acc, self.best_clean, self.best_step = robust, clean, step
            self.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            return False
        return 100 * (self.best_acc - robust) > self.collapse_points

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"best.{k}": v for k, v in (self.best_state or {}).items()}

    def info(self) -> dict:
        return {"best_acc": self.best_acc, "best_clean": self.best_clean, "best_step": self.best_step}

    def restore(self, tensors: dict[str, torch.Tensor], info: dict | None) -> None:
        if info:
            self.best_acc, self.best_clean, self.best_step = info["best_acc"], info["best_clean"], info["best_step"]
        best = {k[len("best."):]: v.clone() for k, v in tensors.items() if k.startswith("best.")}
        self.best_state = best or None

    def load_best_into(self, model: torch.nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict({k: v.clone() for k, v in self.best_state.items()})


class Logger:
    """JSON lines to a file (appended across resumes) and short lines to the terminal.

    ``resumed_at``: the step a resume starts from. Records of later steps (logged before a hard
    kill, after the last checkpoint) are dropped, atomically, so that a resumed log holds each
    step once, as an uninterrupted run's does.
    """

    def __init__(self, path: Path, bar: tqdm, quiet: bool, resumed_at: int | None = None):
        self.path, self.bar, self.quiet = path, bar, quiet
        if resumed_at is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and _kept(json.loads(line), resumed_at)]
            atomic_write(path, lambda tmp: Path(tmp).write_text("".join(f"{line}\n" for line in kept)))

    def __call__(self, record: dict, say: str | None = None) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if say and not self.quiet:
            self.bar.write(say, file=sys.stderr)


def _kept(record: dict, resumed_at: int) -> bool:
    return not record.get("final") and record.get("step", 0) <= resumed_at


def early_stop(stop: GracefulStop, stop_after_steps: int | None, run_steps: int, step: int, total: int) -> str | None:
    """'budget' (this invocation's steps are done), 'signal' (Ctrl-C/SIGTERM), or None.

    Never at the last step (the run then simply finishes). Under torchrun every rank reaches the
    same answer: the budget is the same everywhere and `should_stop` all-reduces the flag.
    """
    if step >= total:
        return None
    if stop_after_steps is not None and run_steps >= stop_after_steps:
        return "budget"
    return "signal" if stop.should_stop() else None


def end_of_step(save_state, due: bool, stop: GracefulStop, stop_after_steps: int | None, run_steps: int, step: int,
                total: int, state_path) -> dict | None:
    """Checkpoint when ``due``; on a stop, make sure this step's state is saved (once), then return
    the budget stop's summary or raise ``interrupted``. None: go on training."""
    if due:
        save_state()
    reason = early_stop(stop, stop_after_steps, run_steps, step, total)
    if reason is None:
        return None
    if not due:
        save_state()
    if reason == "budget":
        return {"stopped_at_step": step, "total_steps": total, "state": str(state_path)}
    raise interrupted(step, total)


def interrupted(step: int, total: int) -> TrainError:
    return TrainError(f"interrupted at step {step}/{total}; state saved, rerun with --resume")


def interrupted_mid_step(step: int, total: int) -> TrainError:
    """A second Ctrl-C, maybe mid-step: the last periodic checkpoint is the resume point."""
    return TrainError(f"interrupted during step {step + 1}/{total}; rerun with --resume to continue from "
                      f"the last checkpoint")


# Distribution (torchrun): shared by both trainers


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_distributed(device: str = "auto") -> Dist:
    """From torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); a single process otherwise.

    ``device``: auto (CUDA when there is a GPU), cpu, or cuda (under torchrun: cuda:LOCAL_RANK).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA device here")
    if world <= 1:
        return Dist(device=torch.device(device if device.startswith("cuda") else "cuda") if use_cuda
                    else torch.device("cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Dist(rank, world, device)


@contextlib.contextmanager
def distributed_cleanup():
    """Tear the process group down however the run ends."""
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
