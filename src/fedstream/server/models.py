"""Where the server keeps global models: PyTorch checkpoints that ``torch.load`` + ``load_state_dict`` read.

PyTorch is imported when the first model is saved, so that a server which only aggregates (numpy) starts
without it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fedstream.errors import JobFailed
from fedstream.messages import Weights


class ModelStore:
    """Saves named models (``global``, ``best``) as ``<folder>/<name>.pt`` state dicts, atomically."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.paths: dict[str, Path] = {}

    def save(self, name: str, weights: Weights) -> Path:
        """Write ``weights`` as model ``name``; a reader never sees a half-written file."""
        import torch

        path = self.folder / f"{name}.pt"
        partial = path.with_suffix(".pt.partial")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            torch.save({key: torch.from_numpy(value) for key, value in weights.items()}, partial)
            os.replace(partial, path)
        except (OSError, RuntimeError) as exc:  # torch reports a full disk as a RuntimeError
            size = sum(array.nbytes for array in weights.values())
            free = shutil.disk_usage(self.folder).free if self.folder.exists() else 0
            why = f"the disk is full ({free:,} bytes free, the model needs {size:,})" if free < 2 * size else str(exc)
            raise JobFailed(f"cannot save the {name} model to {path}: {why}") from exc
        finally:
            partial.unlink(missing_ok=True)
        self.paths[name] = path
        return path
