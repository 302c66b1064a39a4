"""The purifier under random perturbations of an attack's size (`pssr.noise`): not an attack, a
floor check. If random ±ε stripes already flip the defense, an attack that searches among them
(Square) will too; a G trained with `noise.fraction` should hold better here first.

    python scripts/random_noise.py --dataset mnist [--n 500] [--draws 10] [--kind stripes] [--purifier PATH]
"""

import argparse

import torch

from pssr import attacks, noise, purifier
from pssr.data import load_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--kind", default="stripes", choices=noise.KINDS)
    ap.add_argument("--eps", type=float, default=None, help="default: the data set's PGD preset ε")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--purifier", default=None, help="purifier checkpoint (default: the shipped one)")
    args = ap.parse_args()
    path = args.purifier or purifier.shipped_path(f"purifier-{args.dataset}")
    p, _, _ = purifier.load(path)
    f = p.classifier
    eps = args.eps if args.eps is not None else attacks.preset("pgd", args.dataset).eps
    data = load_dataset(args.dataset, args.data_root, "test").subset(args.n)
    x, y = data.images.float() / 255, data.labels
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        clean = (f(p(x)).argmax(1) == y).float().mean()
        means, undefended, worst = [], [], torch.ones_like(y, dtype=torch.bool)
        for _ in range(args.draws):
            xn = noise.random_perturbation(x, eps, args.kind, g)
            right = f(p(xn)).argmax(1) == y
            worst &= right
            means.append(right.float().mean())
            undefended.append((f(xn).argmax(1) == y).float().mean())
    print(f"{args.dataset}, first {args.n} test images, {args.draws} draws of random {args.kind} ±{eps:.4g}, "
          f"seed {args.seed}, purifier {path}")
    print(f"  defense, clean:                   {clean:.1%}")
    print(f"  defense, noisy (mean of draws):   {torch.stack(means).mean():.1%}")
    print(f"  defense, noisy (worst of draws):  {worst.float().mean():.1%}")
    print(f"  undefended, noisy (mean):         {torch.stack(undefended).mean():.1%}")


if __name__ == "__main__":
    main()
