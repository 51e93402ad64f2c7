"""Where the server keeps global models: PyTorch checkpoints that ``torch.load`` + ``load_state_dict`` read.

PyTorch is imported when the first model is saved, so that a server which only aggregates (numpy) starts
without it. A model is written in the background while the workflow goes on (a round's validation tasks go
out while its model is written); the store's next use waits for it. After each completed round the workflow
records a checkpoint (the round, its own state and that round's global model); a server restarted in the
middle of a job resumes after it.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any

from fedstream.errors import JobFailed
from fedstream.messages import Weights

CHECKPOINT = "checkpoint"


class ModelStore:
    """Saves named models (``global``, ``best``) as ``<folder>/<name>.pt`` state dicts, atomically, one at a
    time in the background."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._paths: dict[str, Path] = {path.stem: path for path in sorted(folder.glob("*.pt"))}
        self._paths.update({f"local/{path.stem}": path for path in sorted(folder.glob("local/*.pt"))})
        self._writer: threading.Thread | None = None
        self._failed: JobFailed | None = None

    @property
    def paths(self) -> dict[str, Path]:
        """The saved models by name, once the model being saved is written (a save that failed names the file
        it would have replaced, if any; :meth:`wait` raises its error)."""
        self._join()
        return self._paths

    def checkpoint(self, round: int, state: dict[str, Any], arrays: dict[str, Weights] | None = None) -> None:
        """Record that ``round`` is complete, with the workflow's ``state`` (JSON values) and named groups of
        ``arrays`` (an optimizer's moments), and the ``global`` model saved last (kept as a hard link: no copy,
        and later saves of ``global`` do not change it)."""
        self.wait()
        folder = self.folder / CHECKPOINT
        folder.mkdir(parents=True, exist_ok=True)
        arrays_file = ""
        if arrays:  # one file per round, named in round.json: a crash between the two writes changes nothing
            arrays_file = f"arrays-{round}.pt"
            flat = {f"{group}/{name}": array for group, named in arrays.items() for name, array in named.items()}
            self._write(folder / arrays_file, flat)
        _link(self._paths["global"], folder / "global.pt")
        partial = folder / "round.json.partial"
        partial.write_text(json.dumps({"round": round, "state": state, "arrays": arrays_file}))
        os.replace(partial, folder / "round.json")
        for old in folder.glob("arrays-*.pt"):
            if old.name != arrays_file:
                old.unlink()

    def last_round(self) -> int:
        """The round of the last checkpoint; 0 if the job has none."""
        record = self.folder / CHECKPOINT / "round.json"
        return int(json.loads(record.read_text())["round"]) if record.is_file() else 0

    def resume(self) -> tuple[int, dict[str, Any], Weights, dict[str, Weights]] | None:
        """The last checkpoint: its round, the workflow's state, that round's global model and the workflow's
        arrays; ``None`` if the job has none (it starts from the beginning)."""
        if not self.last_round():
            return None
        folder = self.folder / CHECKPOINT
        data = json.loads((folder / "round.json").read_text())
        arrays: dict[str, Weights] = {}
        if data.get("arrays"):
            for key, value in load_weights(folder / data["arrays"]).items():
                group, _, name = key.partition("/")
                arrays.setdefault(group, {})[name] = value
        return int(data["round"]), dict(data["state"]), load_weights(folder / "global.pt"), arrays

    def save(self, name: str, weights: Weights) -> Path:
        """Start writing ``weights`` (left unchanged until then) as model ``name``, once the model being
        saved is written; a reader never sees a half-written file. Raises the error of the previous save."""
        self.wait()
        path = self.folder / f"{name}.pt"

        def write() -> None:
            try:
                self._write(path, weights)
            except JobFailed as exc:  # raised by the next wait(), in the workflow's thread
                self._failed = exc
            except Exception as exc:  # the server's failure, not that of a result being checked when it is raised
                failed = JobFailed(f"cannot save the {name} model to {path}: {type(exc).__name__}: {exc}")
                failed.__cause__ = exc
                self._failed = failed

        self._writer = threading.Thread(target=write, name=f"save {name}")
        self._writer.start()
        self._paths[name] = path
        return path

    def wait(self) -> None:
        """Wait until the model being saved is written; raises :class:`JobFailed` if it could not be."""
        self._join()
        failed, self._failed = self._failed, None
        if failed is not None:
            raise failed

    def keep(self, name: str, source: str) -> Path:
        """Make model ``name`` the model ``source`` as saved now: a hard link, no copy (a later save of
        ``source`` replaces its file and leaves ``name`` as it is)."""
        self.wait()
        path = self.folder / f"{name}.pt"
        _link(self._paths[source], path)
        self._paths[name] = path
        return path

    def _join(self) -> None:
        if self._writer is not None:
            self._writer.join()
            self._writer = None

    def _write(self, path: Path, weights: Weights) -> None:
        import torch

        partial = path.with_suffix(".pt.partial")
        name = path.stem
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with warnings.catch_warnings():  # a received model is a read-only view; saving only reads it
                warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
                tensors = {key: torch.from_numpy(value) for key, value in weights.items()}
            torch.save(tensors, partial)
            os.replace(partial, path)
        except (OSError, RuntimeError) as exc:  # torch reports a full disk as a RuntimeError
            size = sum(array.nbytes for array in weights.values())
            free = shutil.disk_usage(self.folder).free if self.folder.exists() else 0
            why = f"the disk is full ({free:,} bytes free, the model needs {size:,})" if free < 2 * size else str(exc)
            raise JobFailed(f"cannot save the {name} model to {path}: {why}") from exc
        finally:
            partial.unlink(missing_ok=True)


def _link(source: Path, target: Path) -> None:
    """Make ``target`` a hard link of ``source``, replacing it atomically."""
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    os.link(source, partial)
    os.replace(partial, target)


def load_weights(path: Path) -> Weights:
    """A saved model (a state dict of tensors) as numpy arrays."""
    import torch

    try:
        saved = torch.load(path, map_location="cpu")
    except Exception as exc:
        raise JobFailed(f"cannot read the model {path}: {exc}") from exc
    if not isinstance(saved, dict) or not all(isinstance(value, torch.Tensor) for value in saved.values()):
        raise JobFailed(f"{path} is not a saved state dict (a dict of tensor names to tensors)")
    return {str(key): value.numpy() for key, value in saved.items()}
