"""Forward+backward time of the shipped classifiers, as stored and as `pssr eval --fold-batchnorm`
runs them (BatchNorm folded into the convolutions, channels-last): the cost of one attack step.

    python benchmarks/fold_batchnorm.py [--threads 1] [--batch 128] [--repeats 5]
"""

import argparse
import time

import torch

from pssr import classifiers
from pssr.purifier import shipped_path


def per_image_ms(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        xx = x.clone().requires_grad_(True)
        start = time.perf_counter()
        model(xx).logsumexp(1).sum().backward()
        best = min(best, time.perf_counter() - start)
    return best / len(x) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"| classifier | stored ms/image | folded, channels-last ms/image | speed-up |  ({args.threads} thread(s), "
          f"batch {args.batch}, best of {args.repeats})")
    for name in ("classifier-mnist", "classifier-cifar10"):
        model, spec = classifiers.load(shipped_path(name))
        model.eval().requires_grad_(False)
        x = torch.rand(args.batch, spec.in_channels, spec.image_size, spec.image_size)
        fast = classifiers.fold_batchnorm(model).to(memory_format=torch.channels_last)
        plain_ms, fast_ms = per_image_ms(model, x, args.repeats), per_image_ms(fast, x, args.repeats)
        print(f"| {name} | {plain_ms:.3f} | {fast_ms:.3f} | {plain_ms / fast_ms:.2f}x |")


if __name__ == "__main__":
    main()
