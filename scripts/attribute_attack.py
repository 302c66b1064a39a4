"""Who is to blame when an attack through the whole PSSR defense succeeds: the perturbation left on
the kept pixels, or what G paints into the holes?

An attack (`--attack`, Square by default: it needs no gradient, so nothing here rests on how
the defense is differentiated) is made against x -> f(PSSR(x)). Then, for each adversarial x'
with its own mask m' and G's painting g' = G(x'_s, m'), the classifier is asked three questions:

  defense       f((1 - m') x' + m' g')       the real defended prediction
  perfect G     f((1 - m') x' + m' x)        the holes given back from the clean image
  G's painting  f((1 - m') x  + m' g')       the kept pixels given back clean, G's painting kept

and two that split G's input, each painting composed onto the clean image:

  G, mask only    G reads the clean image cut by the adversarial mask m'
  G, pixels only  G reads the adversarial image cut by the clean image's mask m

An image the attack breaks (defense wrong) although "perfect G" is right was broken through G;
one where "G's painting" is wrong was broken by what the attacker made G paint; "mask only"
wrong means the mask alone (where the surgery cut) steered G there.

    python scripts/attribute_attack.py --dataset mnist --n 200 [--attack square] [--purifier PATH]
"""

import argparse

import torch

from pssr import attacks, purifier
from pssr.adapters import PssrModel
from pssr.data import load_dataset
from pssr.regeneration import compose


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attack", default="square", help="a preset with overrides, e.g. square:n_queries=1000")
    ap.add_argument("--purifier", default=None, help="purifier checkpoint (default: the shipped one)")
    args = ap.parse_args()
    path = args.purifier or purifier.shipped_path(f"purifier-{args.dataset}")
    p, _, _ = purifier.load(path)
    p.requires_grad_(False)
    f = p.classifier
    data = load_dataset(args.dataset, args.data_root, "test").subset(args.n)
    x, y = data.images.float() / 255, data.labels
    spec = attacks.parse_attack(args.attack, args.dataset)
    x_adv = attacks.run_attack(spec, PssrModel(p, gradient="bpda"), x, y, seed=args.seed)
    with torch.no_grad():
        right = {}
        for name, xx in (("clean", x), ("adversarial", x_adv)):
            x_s, mask, _ = p.surgery(xx)
            g = p.regenerator(x_s, mask)  # G's painting, once: the defense's output is compose(x_s, mask, g)
            right[f"{name}: undefended"] = f(xx).argmax(1) == y
            right[f"{name}: defense"] = f(compose(x_s, mask, g)).argmax(1) == y
            right[f"{name}: perfect G"] = f(compose(x_s, mask, x)).argmax(1) == y
            right[f"{name}: G's painting"] = f(compose(x, mask, g)).argmax(1) == y
            if name == "clean":
                m_clean = mask
            else:
                for label, (img, m) in {"G, mask only": (x, mask), "G, pixels only": (xx, m_clean)}.items():
                    x_s = compose(img, m, torch.full_like(img, p.surgery.config.fill))
                    right[f"{name}: {label}"] = f(compose(x, m, p.regenerator(x_s, m))).argmax(1) == y
    print(f"{args.dataset}, first {args.n} test images, {spec.describe()} through PSSR ({path}), seed {args.seed}")
    for k, v in right.items():
        print(f"  {k:<28} {v.float().mean():6.1%} right")
    broken = right["clean: defense"] & ~right["adversarial: defense"]
    nb = int(broken.sum())
    print(f"broken by the attack (right when clean, wrong under attack): {nb}")
    if nb:
        pg, gp = right["adversarial: perfect G"][broken], right["adversarial: G's painting"][broken]
        print(f"  of these, perfect G would be right:        {int(pg.sum()):4d} ({pg.float().mean():.0%})")
        print(f"  of these, G's painting alone fools f:      {int((~gp).sum()):4d} ({(~gp).float().mean():.0%})")
        print(f"  both (perfect G right, G's painting wrong): {int((pg & ~gp).sum()):4d}")
        for label in ("G, mask only", "G, pixels only"):
            w = ~right[f"adversarial: {label}"][broken]
            print(f"  of these, {label + ' fools f:':<33}{int(w.sum()):4d} ({w.float().mean():.0%})")


if __name__ == "__main__":
    main()
