"""Why `pssr purify` stays in float32: what bf16 autocast on the classifier's passes would buy
(speed of forward + backward, ResNet-9 at 32x32, BN folded, channels-last) and what it would
change (masks, purified predictions, accuracy) on the first N CIFAR-10 test images.

    OMP_NUM_THREADS=2 python benchmarks/purify_bf16.py --data-root ../shared/data [--n 1000]
"""

import argparse

import torch
from fold_batchnorm import per_image_ms  # benchmarks/: the same forward+backward timing

from pssr import data
from pssr.purify_folder import Models, Options, STAGES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=250)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Models(Options(model="cifar10"), torch.device("cpu")).get("cifar10")  # as purify runs it
    f = model.purifier.classifier
    x = torch.rand(256, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    fp32 = per_image_ms(f, x, repeats=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = per_image_ms(f, x, repeats=5)
    print(f"classifier forward+backward, batch 256, {torch.get_num_threads()} threads: "
          f"float32 {fp32:.3f} ms/image, bf16 autocast {bf16:.3f} ms/image ({fp32 / bf16:.2f}x)")

    ds = data.load_dataset("cifar10", args.data_root, "test")
    n = min(args.n, len(ds))
    images = ds.images[:n].float() / 255
    labels = ds.labels[:n]

    def purify(bf16: bool) -> dict:
        outs = []
        for i in range(0, n, args.batch):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                outs.append(model.run(images[i:i + args.batch], {s: 0.0 for s in STAGES}))
        return {"mask": torch.cat([o["mask"] for o in outs]),
                "after": torch.tensor([p for o in outs for p in o["pred_after"]])}

    a, b = purify(False), purify(True)
    print(f"first {n} CIFAR-10 test images: mask pixels that differ {(a['mask'] != b['mask']).float().mean():.1%}; "
          f"purified predictions that differ {(a['after'] != b['after']).float().mean():.1%}; "
          f"accuracy after purification float32 {(a['after'] == labels).float().mean():.1%}, "
          f"bf16 {(b['after'] == labels).float().mean():.1%}")


if __name__ == "__main__":
    main()
