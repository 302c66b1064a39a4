"""Write the sample adversarial images shipped in samples/ (the README's main command purifies them).

For each data set with a shipped classifier: the first N test images, attacked with the data set's
PGD preset (L∞, ε = 0.3 on MNIST, 8/255 on CIFAR-10) against the *undefended* classifier, saved as
8-bit PNG (rounding to 8 bits can undo a few of the attacks; the table below says which fool the
classifier as saved). Also writes samples/labels.csv (file,label rows, which `pssr purify samples/ OUT`
reads to print accuracy before and after purification) and samples/README.md with labels and predictions.

    python scripts/make-samples.py --data-root ../shared/data --n 8 --seed 0
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pssr import attacks, classifiers, purifier
from pssr.data import load_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--out", default="samples")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    rows = []
    for name in ("mnist", "cifar10"):
        path = purifier.shipped_path(f"classifier-{name}")
        if not path.is_file():
            print(f"{name}: no shipped classifier, skipped")
            continue
        f, spec = classifiers.load(path)
        data = load_dataset(name, args.data_root, "test").subset(args.n)
        x, y = data.images.float() / 255, data.labels
        x_adv = attacks.run_attack(attacks.preset("pgd", name), f, x, y, seed=args.seed)
        as_saved = (x_adv * 255).round().to(torch.uint8)
        with torch.no_grad():
            pred_clean = f(x).argmax(1)
            pred_adv = f(as_saved.float() / 255).argmax(1)
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in range(len(x)):
            arr = as_saved[i].permute(1, 2, 0).numpy()
            img = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr, "L" if arr.shape[2] == 1 else "RGB")
            file = out / name / f"{i:02d}-{data.classes[y[i]]}.png"
            img.save(file)
            rows.append((str(file.relative_to(out)), data.classes[y[i]], data.classes[pred_clean[i]],
                         data.classes[pred_adv[i]]))
        print(f"{name}: {len(x)} images, classifier fooled on {(pred_adv != y).sum().item()} as saved")
    lines = [
        "# Sample adversarial images",
        "",
        "Made by `python scripts/make-samples.py --data-root ../shared/data --n 8 --seed 0`: the first",
        "test images of each data set, attacked with the data set's PGD preset against the undefended",
        "shipped classifier, saved as 8-bit PNG. `pssr purify samples/ purified/` purifies them",
        "(greyscale images go to the MNIST model, colour ones to the CIFAR-10 model) and, since",
        "`labels.csv` here gives each file's true class, ends by printing how many predictions",
        "purification changed and the accuracy before and after; the manifest records each `label`.",
        "",
        "| file | label | classifier on the clean image | classifier on this file |",
        "|---|---|---|---|",
        *[f"| `{a}` | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))
    (out / "labels.csv").write_text("file,label\n" + "".join(f"{a},{b}\n" for a, b, _, _ in rows))


if __name__ == "__main__":
    np.random.seed(0)
    main()
