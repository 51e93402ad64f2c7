from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import write_cifar_layout
from tests.mlflow_server import MlflowServer


@pytest.fixture(autouse=True)
def tracking_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test's default MLflow store is its own (MLflow's default would be ./mlflow.db in the checkout)."""
    store = tmp_path / "mlflow-default"
    store.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    return store


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding a small learnable CIFAR-10-shaped set in the official python layout."""
    return write_cifar_layout(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real tracking server shared by the tests that only read and write through it."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server
    server.stop()
