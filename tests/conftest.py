from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import write_cifar_layout


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding a small learnable CIFAR-10-shaped set in the official python layout."""
    return write_cifar_layout(tmp_path_factory.mktemp("cifar"))
