"""A classifier of your own, outside pssr: the example of docs/guide.md ("Your own architecture").

`TinyCNN` stands for any `nn.Module` you trained yourself. It takes *normalised* images and has
no `features`/`head` methods, so pssr takes the input of its last `nn.Linear` as the features
for the purifier's semantic loss. Running this file trains it for a few steps on MNIST with a
plain PyTorch loop (your own training, not pssr's) and exports it with
`pssr.classifiers.export`; pssr then loads it by importing this module, so put this folder on
the path: `PYTHONPATH=examples pssr eval --classifier ...`.

    python examples/my_classifier.py --data-root ../shared/data --steps 150 --out runs/guide/my-cnn.safetensors
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


class TinyCNN(nn.Module):
    """Two conv layers and two linear layers (~30k parameters at width 16)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, image_size: int = 28):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * (image_size // 4) ** 2, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def main() -> None:
    parser = argparse.ArgumentParser(description="Train TinyCNN on MNIST briefly and export it for pssr.")
    parser.add_argument("--data-root", required=True, help="folder holding mnist/")
    parser.add_argument("--out", required=True, help="the pssr classifier checkpoint to write (.safetensors)")
    parser.add_argument("--steps", type=int, default=150, help="Adam steps of batch 64")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from pssr import classifiers
    from pssr.data import load_dataset

    torch.manual_seed(args.seed)
    train, test = load_dataset("mnist", args.data_root, "train"), load_dataset("mnist", args.data_root, "test")
    mean, std = torch.tensor(MNIST_MEAN).view(1, -1, 1, 1), torch.tensor(MNIST_STD).view(1, -1, 1, 1)
    model = TinyCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(args.steps):
        idx = torch.randint(0, len(train), (64,))
        x = (train.images[idx].float() / 255 - mean) / std  # this model wants normalised input
        loss = F.cross_entropy(model(x), train.labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        x = (test.images[:1000].float() / 255 - mean) / std
        accuracy = (model(x).argmax(1) == test.labels[:1000]).float().mean().item()

    # The name pssr will import: this file is the module `my_classifier` once examples/ is on the path.
    spec = classifiers.export(
        model, args.out, arch="my_classifier:TinyCNN", arch_kwargs={"in_channels": 1, "num_classes": 10},
        num_classes=10, in_channels=1, image_size=28, mean=MNIST_MEAN, std=MNIST_STD,
        dataset="mnist", classes=train.classes, extra={"test_accuracy": accuracy, "test_images": 1000},
    )
    print(f"test accuracy {accuracy:.2%} on 1000 images; features from: {spec.extra['features']}; wrote {args.out}")


if __name__ == "__main__":
    main()
