"""Where the server keeps global models: PyTorch checkpoints that ``torch.load`` + ``load_state_dict`` read.

PyTorch is imported when the first model is saved, so that a server which only aggregates (numpy) starts
without it. After each completed round the workflow records a checkpoint (the round, its own state and that
round's global model); a server restarted in the middle of a job resumes after it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from fedstream.errors import JobFailed
from fedstream.messages import Weights

CHECKPOINT = "checkpoint"


class ModelStore:
    """Saves named models (``global``, ``best``) as ``<folder>/<name>.pt`` state dicts, atomically."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.paths: dict[str, Path] = {path.stem: path for path in sorted(folder.glob("*.pt"))}

    def checkpoint(self, round: int, state: dict[str, Any]) -> None:
        """Record that ``round`` is complete, with the workflow's ``state`` (JSON values) and the ``global``
        model saved last (kept as a hard link: no copy, and later saves of ``global`` do not change it)."""
        folder = self.folder / CHECKPOINT
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / "global.pt.partial"
        partial.unlink(missing_ok=True)
        os.link(self.paths["global"], partial)
        os.replace(partial, folder / "global.pt")
        partial = folder / "round.json.partial"
        partial.write_text(json.dumps({"round": round, "state": state}))
        os.replace(partial, folder / "round.json")

    def last_round(self) -> int:
        """The round of the last checkpoint; 0 if the job has none."""
        record = self.folder / CHECKPOINT / "round.json"
        return int(json.loads(record.read_text())["round"]) if record.is_file() else 0

    def resume(self) -> tuple[int, dict[str, Any], Weights] | None:
        """The last checkpoint: its round, the workflow's state and that round's global model; ``None`` if the
        job has none (it starts from the beginning)."""
        if not self.last_round():
            return None
        import torch

        data = json.loads((self.folder / CHECKPOINT / "round.json").read_text())
        saved = torch.load(self.folder / CHECKPOINT / "global.pt")
        return int(data["round"]), dict(data["state"]), {key: value.numpy() for key, value in saved.items()}

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
