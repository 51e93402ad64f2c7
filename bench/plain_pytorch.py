"""The baseline: the same training and validation as hello-pt, as a plain PyTorch script (no fedstream).

Each of PROCESSES processes loads CIFAR-10 from the official python layout, takes TRAIN random training
images, and for EPOCHS epochs trains SimpleNetwork (SGD, momentum 0.9) with a DataLoader, then validates
on the 10,000 test images. One torch thread per process, as the simulator gives its workers.

    python bench/plain_pytorch.py DATA_ROOT --processes 2 --train 5000 --epochs 2 --batch-size 4 --lr 0.001
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedstream.examples.hello_pt import SimpleNetwork


def load(folder: Path, names: list[str], count: int = 0, seed: int = 0) -> TensorDataset:
    """The batches ``names`` (or ``count`` random images of them), normalised to (x/255 - 0.5)/0.5."""
    data, labels = [], []
    for name in names:
        with (folder / name).open("rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
        data.append(np.asarray(batch[b"data"], dtype=np.uint8))
        labels.extend(batch[b"labels"])
    pixels, targets = np.concatenate(data), np.asarray(labels)
    if count:
        chosen = np.random.default_rng(seed).choice(len(pixels), count, replace=False)
        pixels, targets = pixels[chosen], targets[chosen]
    x = torch.from_numpy(pixels.reshape(-1, 3, 32, 32)).float().div(255).sub(0.5).div(0.5)
    return TensorDataset(x, torch.from_numpy(targets))


def run(rank: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.processes))
    folder = Path(args.root) / "cifar-10-batches-py"
    train = DataLoader(
        load(folder, [f"data_batch_{i}" for i in range(1, 6)], args.train, rank),
        batch_size=args.batch_size,
        shuffle=True,
    )
    test = DataLoader(load(folder, ["test_batch"]), batch_size=500)
    torch.manual_seed(0)
    model = SimpleNetwork()
    loss_fn = torch.nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        model.train()
        for inputs, targets in train:
            optimizer.zero_grad()
            loss_fn(model(inputs), targets).backward()
            optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for inputs, targets in test:
                correct += int((model(inputs).argmax(1) == targets).sum())
        print(f"process {rank} epoch {epoch + 1}: accuracy {correct / len(test.dataset):.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.001)
    args = parser.parse_args()
    workers = [multiprocessing.Process(target=run, args=(rank, args)) for rank in range(args.processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
        if worker.exitcode:
            raise SystemExit(worker.exitcode)


if __name__ == "__main__":
    main()
