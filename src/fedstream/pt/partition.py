"""Split a labelled data set between sites: everyone the full set, an IID split, or Dirichlet label skew.

All splits are seeded. The Dirichlet class proportions depend only on the seed, so the training and the
test split of a site follow the same label distribution.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Scheme = Literal["full", "iid", "dirichlet"]


def dirichlet_proportions(num_classes: int, num_sites: int, alpha: float, seed: int) -> np.ndarray:
    """``(num_classes, num_sites)``: the share of each class that each site gets (rows sum to 1)."""
    return np.random.default_rng([seed, 0]).dirichlet([alpha] * num_sites, size=num_classes)


def partition(
    labels: np.ndarray, num_sites: int, scheme: Scheme, *, alpha: float = 0.5, seed: int = 0
) -> list[np.ndarray]:
    """The sample indices of every site, sorted; ``iid`` and ``dirichlet`` give each sample to exactly one site."""
    count = len(labels)
    if scheme == "full":
        return [np.arange(count)] * num_sites  # one shared array
    rng = np.random.default_rng([seed, 1, count])
    if scheme == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(count), num_sites)]
    if scheme == "dirichlet":
        num_classes = int(labels.max()) + 1 if count else 0
        shares = dirichlet_proportions(num_classes, num_sites, alpha, seed)
        parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
        for cls in range(num_classes):
            members = rng.permutation(np.flatnonzero(labels == cls))
            cuts = (np.cumsum(shares[cls])[:-1] * len(members)).astype(int)
            for site, chunk in enumerate(np.split(members, cuts)):
                parts[site].append(chunk)
        return [np.sort(np.concatenate(chunks)) for chunks in parts]
    raise ValueError(f"unknown partition scheme {scheme!r}; expected full, iid or dirichlet")


def cap(indices: np.ndarray, max_samples: int, *, seed: int, site: int) -> np.ndarray:
    """At most ``max_samples`` of ``indices``: a random subset seeded by ``seed`` and ``site``, sorted.

    0 means no cap. Different sites get different subsets even when they share the same indices.
    """
    if not max_samples or len(indices) <= max_samples:
        return indices
    rng = np.random.default_rng([seed, 2, site, len(indices)])
    return np.sort(rng.choice(indices, size=max_samples, replace=False))
