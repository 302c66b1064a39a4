"""Why 64x3x224x224 reaches a lower fraction of copy bandwidth on the CPU than 1024x3x32x32.

The fused op must return a fresh 38.5 MB x_surgered. Above glibc's 32 MB mmap threshold every
such allocation is new pages, and the first write to each page is a page fault: that, not the
kernel, is most of the op's time at this size. This script times the op next to
`empty_like(x).fill_(0)` (fresh memory) and `out.fill_(0)` (reused memory).
Run it as is and with THP_MEM_ALLOC_ENABLE=1 (PyTorch then backs large CPU tensors with
transparent huge pages: far fewer faults).

    python benchmarks/alloc_cost.py [BxCxHxW]
"""

import sys
import time

import torch

import pssr.ops as ops


def median_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    shape = tuple(int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "64x3x224x224").split("x"))
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=gen)
    grad = torch.randn(shape, generator=gen)
    out = torch.empty_like(x)
    print(f"shape {shape}, {torch.get_num_threads()} threads")
    print(f"  pixel_surgery (mean)     {median_ms(lambda: ops.pixel_surgery(x, grad)):7.2f} ms")
    print(f"  empty_like(x).fill_(0)   {median_ms(lambda: torch.empty_like(x).fill_(0)):7.2f} ms  (fresh memory)")
    print(f"  out.fill_(0)             {median_ms(lambda: out.fill_(0)):7.2f} ms  (reused memory)")


if __name__ == "__main__":
    main()
