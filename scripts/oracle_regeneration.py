"""An upper bound for any regenerator: the classifier's accuracy when the removed pixels of an
adversarial image are given back *from the clean image* (a perfect G), per surgery setting.

If this bound is low, no G can make PSSR robust with that surgery: the perturbation left on the
kept pixels alone fools the classifier. Run it before a long purifier training.

    python scripts/oracle_regeneration.py --dataset mnist --n 500 --seed 0
"""

import argparse

import torch

from pssr import attacks, classifiers, purifier
from pssr.data import load_dataset
from pssr.regeneration import compose
from pssr.surgery import PixelSurgery, SurgeryConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    f, _ = classifiers.load(purifier.shipped_path(f"classifier-{args.dataset}"))
    data = load_dataset(args.dataset, args.data_root, "test").subset(args.n)
    x, y = data.images.float() / 255, data.labels
    x_adv = attacks.run_attack(attacks.preset("pgd", args.dataset), f, x, y, seed=args.seed)
    settings = [SurgeryConfig(alpha=a) for a in (0.25, 0.5, 1.0, 2.0, 4.0)]
    settings += [SurgeryConfig(mode="topk", ratio=r) for r in (0.1, 0.3, 0.5, 0.7)]
    print("| surgery | removed (clean) | removed (adv) | f on x_adv | f, removed pixels from clean x |")
    print("|---|---:|---:|---:|---:|")
    with torch.no_grad():
        base = (f(x_adv).argmax(1) == y).float().mean().item()
        for cfg in settings:
            s = PixelSurgery(f, cfg)
            _, m_clean, _ = s(x)
            x_s, m_adv, _ = s(x_adv)
            oracle = (f(compose(x_s, m_adv, x)).argmax(1) == y).float().mean().item()
            name = f"mean α={cfg.alpha:g}" if cfg.mode == "mean" else f"topk ρ={cfg.ratio:g}"
            print(f"| {name} | {m_clean.float().mean():.1%} | {m_adv.float().mean():.1%} | {base:.1%} | {oracle:.1%} |")


if __name__ == "__main__":
    main()
