"""Where the server keeps global models: PyTorch checkpoints that ``torch.load`` + ``load_state_dict`` read.

PyTorch is imported when the first model is saved, so that a server which only aggregates (numpy) starts
without it.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedstream.messages import Weights


class ModelStore:
    """Saves named models (``global``, ``best``) as ``<folder>/<name>.pt`` state dicts, atomically."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.paths: dict[str, Path] = {}

    def save(self, name: str, weights: Weights) -> Path:
        """Write ``weights`` as model ``name``; a reader never sees a half-written file."""
        import torch

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{name}.pt"
        partial = path.with_suffix(".pt.partial")
        try:
            torch.save({key: torch.from_numpy(value) for key, value in weights.items()}, partial)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        self.paths[name] = path
        return path
