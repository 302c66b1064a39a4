"""Write a purifier whose regenerator is the non-learned normalized-convolution inpainting
(pssr.inpainting), bound to a classifier: the baseline every learned G must beat, evaluated
like any purifier (pssr eval --defense pssr:path=FILE).

    python scripts/make_inpainting_purifier.py --classifier pssr/weights/classifier-mnist-robust.safetensors \\
        --alpha 2 --out results/mnist-robust/inpaint-a2.safetensors
"""

import argparse
from pathlib import Path

from pssr import purifier
from pssr.surgery import SurgeryConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classifier", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--alpha", type=float, default=1.0, help="mean-mode threshold factor α")
    ap.add_argument("--ratio", type=float, default=None, help="top-k mode: remove this fraction instead")
    ap.add_argument("--sigma", type=float, default=1.0)
    args = ap.parse_args()
    surgery = SurgeryConfig(mode="topk", ratio=args.ratio) if args.ratio is not None else SurgeryConfig(alpha=args.alpha)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    spec = purifier.save_inpainting(args.out, args.classifier, surgery, args.sigma)
    print(f"wrote {args.out}: {spec.extra['regenerator']}, surgery {surgery}")


if __name__ == "__main__":
    main()
