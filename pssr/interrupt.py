"""Stop a training run at a step boundary on Ctrl-C or SIGTERM, so the saved state is exact.

A signal only sets a flag; the loop asks `should_stop()` between steps (under torchrun every
rank agrees through an all-reduce, so no rank waits forever in a collective). A second Ctrl-C
stops at once, without saving: the last periodic checkpoint is then the resume point.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist


class GracefulStop:
    def __init__(self, world: int = 1):
        self.world = world
        self.requested = False
        self._old: dict = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def should_stop(self) -> bool:
        flag = self.requested
        if self.world > 1:
            t = torch.tensor([int(flag)])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag
