"""Train the fast metric's network: a small LeNet on MNIST, saved as safetensors inside the package.

    .venv/bin/python scripts/train_lenet.py --data-root ../shared/data/mnist

Deterministic (fixed seed, one thread by default): a few epochs of Adam on the 60,000
training images, then the accuracy on the 10,000 test images is measured and stored in
the file's metadata with the seed and the settings. About two minutes on two CPU cores.
The result, ``src/ddpm/evaluation/lenet_mnist.safetensors``, is committed to the repository;
its penultimate layer gives the fast FID features and its output the MNIST classifier
(``ddpm.evaluation.classify``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ddpm.data import load_dataset
from ddpm.evaluation.features import LENET_WEIGHTS, LeNet, images_to_grey_28
from ddpm.fileio import atomic_write


def batches(n: int, batch_size: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


@torch.inference_mode()
def accuracy(model: LeNet, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum().item() for i in range(0, len(x), 1000))
    return correct / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="folder with the MNIST IDX files")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps the run bit-reproducible)")
    parser.add_argument("--out", type=Path, default=LENET_WEIGHTS)
    args = parser.parse_args()

    # Phase 1: data, as float [N, 1, 28, 28] in [0, 1] (the same mapping the features use).
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train, test = (load_dataset("mnist", data_root=args.data_root, split=s) for s in ("train", "test"))
    x_train, x_test = images_to_grey_28(train.images), images_to_grey_28(test.images)
    y_train, y_test = torch.from_numpy(train.labels), torch.from_numpy(test.labels)

    # Phase 2: train with Adam, the learning rate decaying linearly to zero.
    model = LeNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    total = args.epochs * ((len(x_train) + args.batch_size - 1) // args.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        losses = []
        for idx in batches(len(x_train), args.batch_size, generator):
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        print(f"epoch {epoch + 1}/{args.epochs}: loss {np.mean(losses):.4f}, "
              f"test accuracy {accuracy(model, x_test, y_test):.4f} ({time.perf_counter() - start:.0f} s)")

    # Phase 3: measure and save, with the figures in the safetensors metadata.
    test_accuracy = accuracy(model, x_test, y_test)
    meta = {"format": "ddpm-lenet-1", "dataset": "mnist", "test_accuracy": f"{test_accuracy:.4f}",
            "train_seconds": f"{time.perf_counter() - start:.0f}",
            "settings": json.dumps({k: v for k, v in vars(args).items() if k not in ("data_root", "out")}),
            "input": "grey 28x28 in [0, 1] (uint8 / 255); other sizes resized bilinearly"}
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(args.out, lambda tmp: save_file(state, str(tmp), metadata=meta))
    print(f"test accuracy {test_accuracy:.4f}; wrote {args.out}")


if __name__ == "__main__":
    main()
