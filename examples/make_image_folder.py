"""Make a small image-folder data set (PNG files, one sub-folder per class) from MNIST or CIFAR-10.

It stands for your own images in the layout `pssr` reads as `folder:PATH`:
OUT/train/<class>/<n>.png and OUT/test/<class>/<n>.png, the first N images of each class of the
official train and test splits.

    python examples/make_image_folder.py ../shared/data runs/guide/data/digits --per-class 50 --test-per-class 20
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from pssr.data import load_dataset


def write_split(data, out: Path, per_class: int) -> int:
    """The first ``per_class`` images of each class of ``data`` as PNGs under out/<class>/."""
    counts = [0] * data.num_classes
    for image, label in zip(data.images, data.labels.tolist()):
        if counts[label] >= per_class:
            continue
        folder = out / data.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        array = image.permute(1, 2, 0).numpy()
        Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(folder / f"{counts[label]:05d}.png")
        counts[label] += 1
        if min(counts) >= per_class:
            break
    return sum(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description="Write MNIST or CIFAR-10 images as an image-folder data set.")
    parser.add_argument("data_root", help="folder holding mnist/ or cifar10/")
    parser.add_argument("out", help="the image folder to make (OUT/train/<class>, OUT/test/<class>); must not exist")
    parser.add_argument("--dataset", default="mnist", choices=("mnist", "cifar10"))
    parser.add_argument("--per-class", type=int, default=50, help="training images per class")
    parser.add_argument("--test-per-class", type=int, default=20, help="test images per class")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        parser.error(f"{out} exists; choose another folder or remove it")
    n_train = write_split(load_dataset(args.dataset, args.data_root, "train"), out / "train", args.per_class)
    n_test = write_split(load_dataset(args.dataset, args.data_root, "test"), out / "test", args.test_per_class)
    print(f"wrote {n_train} training and {n_test} test images to {out}")


if __name__ == "__main__":
    main()
