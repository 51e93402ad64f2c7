"""A site's share of CIFAR-10 and the mini-batches a trainer iterates over."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from fedstream.pt import cifar10
from fedstream.pt.partition import cap, partition


class Cifar10Data(BaseModel):
    """The ``data`` table of a CIFAR-10 trainer.

    Attributes:
        root: folder holding (or receiving) ``cifar-10-batches-py``.
        download: download the official archive when the folder lacks the data.
        partition: ``full`` (every site the whole set), ``iid`` (an even random split) or ``dirichlet``
            (label skew, stronger as ``alpha`` shrinks). Applied to the training and the test split.
        alpha: concentration of the Dirichlet split.
        seed: seed of the split, the caps and the shuffling.
        max_train_samples: at most this many training samples per site (0: no cap).
        max_val_samples: at most this many validation samples per site (0: no cap).
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    root: str = "~/.cache/fedstream/cifar10"
    download: bool = True
    partition: Literal["full", "iid", "dirichlet"] = "iid"
    alpha: float = Field(default=0.5, gt=0)
    seed: int = 0
    max_train_samples: int = Field(default=0, ge=0)
    max_val_samples: int = Field(default=0, ge=0)

    def for_site(self, index: int, num_sites: int) -> SiteData:
        """Which samples are site ``index``'s: training samples, and validation samples from the test split."""

        def share(split: str, limit: int) -> np.ndarray:
            labels = cifar10.load(self.root, split, download=self.download).labels
            parts = partition(labels, num_sites, self.partition, alpha=self.alpha, seed=self.seed)
            return cap(parts[index], limit, seed=self.seed, site=index)

        return SiteData(self.root, share("train", self.max_train_samples), share("test", self.max_val_samples))


@dataclass(frozen=True)
class SiteData:
    """A site's share of CIFAR-10: the indices of its samples, read in for each task.

    A site holds only indices between tasks, so a worker hosting many sites holds the pixels of one at a time;
    reading them back from the ``.npy`` cache (page cache, contiguous runs) takes milliseconds.
    """

    root: str
    train_indices: np.ndarray
    validation_indices: np.ndarray

    def train(self) -> cifar10.Split:
        return cifar10.load(self.root, "train", download=False).select(self.train_indices)

    def validation(self, max_samples: int = 0) -> cifar10.Split:
        """The validation samples (the first ``max_samples`` of them if that is not 0)."""
        indices = self.validation_indices[:max_samples] if max_samples else self.validation_indices
        return cifar10.load(self.root, "test", download=False).select(indices)


def batches(
    split: cifar10.Split, batch_size: int, *, shuffle: np.random.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised ``(x, y)`` mini-batches: ``x = (pixels / 255 - 0.5) / 0.5`` as float32 ``(B, 3, 32, 32)``."""
    count = len(split.labels)
    order = shuffle.permutation(count) if shuffle is not None else np.arange(count)
    for start in range(0, count, batch_size):
        chosen = order[start : start + batch_size]
        pixels = torch.from_numpy(split.images[chosen])
        x = pixels.to(torch.float32).div_(127.5).sub_(1.0)
        yield x, torch.from_numpy(split.labels[chosen])
