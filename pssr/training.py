"""What both trainers (`train-classifier`, `train`) share: seeds, the schedule, the run folder,
the JSONL log, the resume state and the rules for stopping early.

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
from tqdm import tqdm

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
