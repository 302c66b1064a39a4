"""An upper bound for any regenerator: the classifier's accuracy when the removed pixels of an
adversarial image are given back *from the clean image* (a perfect G), per surgery setting.

If this bound is low, no G can make PSSR robust with that surgery: the perturbation left on the
kept pixels alone fools the classifier. Run it before a long purifier training.

The last column is the same bound against an adaptive attacker: an attack (`--attack`, PGD by
default; `square` needs no gradient at all) made through the perfect-G defense
x -> f((1 - m(x))·x + m(x)·x_clean) itself. For a perfect G the BPDA and
the mask-fixed gradients coincide (G's output does not depend on the input), so this is the best
any regenerator can do under BPDA with this surgery and this (frozen) classifier.

"Mask bits flipped" is the share of pixels whose mask bit differs between the clean image and
its attacked copy: how far the attack moves the surgery (for the adaptive column, the attack
through the perfect-G defense). `--classifier` takes any classifier checkpoint (default: the
shipped standard one of the data set), e.g. the robust one the defense is built on.

    python scripts/oracle_regeneration.py --dataset mnist --n 500 --seed 0
    python scripts/oracle_regeneration.py --dataset mnist --classifier pssr/weights/classifier-mnist-robust.safetensors --adaptive
"""

import argparse

import torch

from pssr import attacks, classifiers, purifier
from pssr.data import load_dataset
from pssr.regeneration import compose
from pssr.surgery import PixelSurgery, SurgeryConfig


class PerfectG(torch.nn.Module):
    """The defense with a perfect regenerator: removed pixels come back from the clean images.

    Attacks query sub-batches (Square and AutoAttack drop the images already fooled), so each
    query finds its own clean image as the nearest one in L∞: it is within ε, and two different
    test images are much further apart (asserted)."""

    def __init__(self, f, surgery: PixelSurgery, clean: torch.Tensor, eps: float):
        super().__init__()
        self.f, self.surgery, self.clean, self.eps = f, surgery, clean, eps

    def forward(self, x):
        dist = torch.cdist(x.detach().flatten(1), self.clean.flatten(1), p=float("inf"))  # (queries, clean)
        near, idx = dist.min(1)
        assert (near <= self.eps + 1e-4).all(), "a query is not within eps of any clean image"
        x_s, mask, _ = self.surgery(x, gradient="mask-fixed")
        return self.f(compose(x_s, mask, self.clean[idx]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--classifier", default=None, help="classifier checkpoint (default: the shipped standard one)")
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adaptive", action="store_true", help="add the attack-through-perfect-G column (slower)")
    ap.add_argument("--attack", default="pgd", help="the adaptive column's attack: a preset with overrides, e.g. square or square:n_queries=1000")
    ap.add_argument("--alpha", type=float, action="append", help="only these mean-mode α (repeatable)")
    args = ap.parse_args()
    f, _ = classifiers.load(args.classifier or purifier.shipped_path(f"classifier-{args.dataset}"))
    data = load_dataset(args.dataset, args.data_root, "test").subset(args.n)
    x, y = data.images.float() / 255, data.labels
    x_adv = attacks.run_attack(attacks.preset("pgd", args.dataset), f, x, y, seed=args.seed)
    settings = [SurgeryConfig(alpha=a) for a in (args.alpha or (0.25, 0.5, 1.0, 2.0, 4.0))]
    if not args.alpha:
        settings += [SurgeryConfig(mode="topk", ratio=r) for r in (0.1, 0.3, 0.5, 0.7)]
    print("| surgery | removed (clean) | removed (adv) | mask bits flipped | f on x_adv | f, removed pixels from clean x |"
          + (f" same, {args.attack} through it | mask bits flipped by it |" if args.adaptive else ""))
    print("|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.adaptive else ""))
    with torch.no_grad():
        base = (f(x_adv).argmax(1) == y).float().mean().item()
        for cfg in settings:
            s = PixelSurgery(f, cfg)
            _, m_clean, _ = s(x)
            x_s, m_adv, _ = s(x_adv)
            oracle = (f(compose(x_s, m_adv, x)).argmax(1) == y).float().mean().item()
            name = f"mean α={cfg.alpha:g}" if cfg.mode == "mean" else f"topk ρ={cfg.ratio:g}"
            flipped = (m_adv != m_clean).float().mean()
            row = (f"| {name} | {m_clean.float().mean():.1%} | {m_adv.float().mean():.1%} | {flipped:.1%} | {base:.1%} "
                   f"| {oracle:.1%} |")
            if args.adaptive:
                with torch.enable_grad():
                    spec = attacks.parse_attack(args.attack, args.dataset)
                    x_ad = attacks.run_attack(spec, PerfectG(f, s, x, spec.eps), x, y, seed=args.seed, batch_size=len(x))
                _, m_ad, _ = s(x_ad)
                row += (f" {(f(compose(x_ad, m_ad, x)).argmax(1) == y).float().mean():.1%} |"
                        f" {(m_ad != m_clean).float().mean():.1%} |")
            print(row, flush=True)


if __name__ == "__main__":
    main()
