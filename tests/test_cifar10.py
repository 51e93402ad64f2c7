"""The CIFAR-10 loader: official layout, download + md5, clear errors, the memory-mapped cache, partitions."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedstream.errors import DataError
from fedstream.pt import cifar10
from fedstream.pt.partition import cap, partition
from fedstream.pt.site_data import Cifar10Data, batches
from tests.helpers import cifar_archive, tiny_cifar_batches, write_cifar_layout


@pytest.fixture
def archive_server(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    """A real HTTP server on 127.0.0.1 serving a tiny cifar-10-python.tar.gz."""
    body = cifar_archive(per_batch=8, test=10)
    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "cifar-10-python.tar.gz").write_bytes(body)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            super().__init__(*args, directory=str(tmp_path / "served"), **kwargs)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz", body
    server.shutdown()
    server.server_close()


def test_reads_the_official_layout(tmp_path: Path) -> None:
    root = write_cifar_layout(tmp_path, per_batch=12, test=7)
    train = cifar10.load(root, "train", download=False)
    test = cifar10.load(root, "test", download=False)
    assert train.images.shape == (60, 3, 32, 32) and train.images.dtype == np.uint8
    assert test.images.shape == (7, 3, 32, 32) and test.labels.dtype == np.int64
    expected = tiny_cifar_batches(per_batch=12, test=7)
    np.testing.assert_array_equal(train.images[:12].reshape(12, -1), expected["data_batch_1"][b"data"])
    assert train.labels[12:24].tolist() == expected["data_batch_2"][b"labels"]
    assert isinstance(train.images, np.memmap), "pixels are memory-mapped from the cache"
    assert (root / "cifar-10-batches-npy" / "train_images.npy").is_file()
    picks = np.array([17, 3, 4, 5, 59, 0])  # unsorted, with a run of consecutive rows
    chosen = train.select(picks)
    assert not isinstance(chosen.images, np.memmap)
    np.testing.assert_array_equal(chosen.images, np.asarray(train.images)[picks])
    assert chosen.labels.tolist() == train.labels[picks].tolist()
    assert train.select(np.array([], dtype=np.int64)).images.shape == (0, 3, 32, 32)


def test_downloads_and_verifies_the_archive(tmp_path: Path, archive_server: tuple[str, bytes]) -> None:
    url, body = archive_server
    split = cifar10.load(tmp_path / "data", "test", url=url, md5=hashlib.md5(body).hexdigest())
    assert split.images.shape == (10, 3, 32, 32)
    assert (tmp_path / "data" / "cifar-10-batches-py" / "data_batch_5").is_file()


def test_md5_mismatch_is_refused(tmp_path: Path, archive_server: tuple[str, bytes]) -> None:
    url, _ = archive_server
    with pytest.raises(DataError, match=r"has md5 [0-9a-f]{32}, expected 0{32}; it is corrupt"):
        cifar10.load(tmp_path / "data", "train", url=url, md5="0" * 32)
    assert not (tmp_path / "data" / "cifar-10-batches-py").exists()
    assert not list((tmp_path / "data").glob("*.tar.gz*")), "the bad download is removed"


def test_no_data_and_no_download_says_where_to_put_it(tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens here once the socket is closed
    root = tmp_path / "nothing"
    with pytest.raises(DataError) as caught:
        cifar10.load(root, "train", url=f"http://127.0.0.1:{port}/cifar.tar.gz")
    message = str(caught.value)
    assert f"CIFAR-10 is not at {root / 'cifar-10-batches-py'}" in message
    assert "downloading http://127.0.0.1" in message
    assert "--set client.trainer.args.data.root=" in message
    with pytest.raises(DataError, match="downloading is switched off"):
        cifar10.load(root, "test", download=False)


def test_corrupt_batch_is_named(tmp_path: Path) -> None:
    root = write_cifar_layout(tmp_path, per_batch=4, test=4)
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=r"data_batch_3: not a CIFAR-10 python batch"):
        cifar10.load(root, "train", download=False)


def test_partitions_are_complete_disjoint_and_seeded() -> None:
    labels = np.random.default_rng(1).integers(0, 10, 1000)
    full = partition(labels, 3, "full")
    assert all(np.array_equal(part, np.arange(1000)) for part in full)
    for scheme in ("iid", "dirichlet"):
        parts = partition(labels, 4, scheme, alpha=0.3, seed=7)
        joined = np.concatenate(parts)
        assert len(joined) == 1000 and len(np.unique(joined)) == 1000, scheme
        again = partition(labels, 4, scheme, alpha=0.3, seed=7)
        assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
        other = partition(labels, 4, scheme, alpha=0.3, seed=8)
        assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    iid = partition(labels, 4, "iid")
    assert sorted(len(p) for p in iid) == [250, 250, 250, 250]


def test_dirichlet_skews_labels_and_keeps_the_skew_across_splits() -> None:
    rng = np.random.default_rng(2)
    train, test = rng.integers(0, 10, 20000), rng.integers(0, 10, 4000)
    parts_train = partition(train, 5, "dirichlet", alpha=0.1, seed=3)
    parts_test = partition(test, 5, "dirichlet", alpha=0.1, seed=3)
    iid = partition(train, 5, "iid")

    def share(labels: np.ndarray, part: np.ndarray) -> np.ndarray:
        return np.bincount(labels[part], minlength=10) / max(len(part), 1)

    def from_uniform(distribution: np.ndarray) -> float:  # total variation distance
        return float(np.abs(distribution - 0.1).sum() / 2)

    for site in range(5):
        assert from_uniform(share(train, iid[site])) < 0.05
        assert from_uniform(share(train, parts_train[site])) > 0.3, "alpha=0.1 concentrates sites on few classes"
        gap = np.abs(share(train, parts_train[site]) - share(test, parts_test[site])).max()
        assert gap < 0.1, "the test split follows the same label skew"


def test_caps_differ_between_sites() -> None:
    indices = np.arange(100)
    a, b = cap(indices, 10, seed=0, site=0), cap(indices, 10, seed=0, site=1)
    assert len(a) == len(b) == 10 and not np.array_equal(a, b)
    assert np.array_equal(cap(indices, 0, seed=0, site=0), indices)


def test_site_data_and_normalised_batches(tmp_path: Path) -> None:
    root = write_cifar_layout(tmp_path, per_batch=10, test=20)
    data = Cifar10Data(root=str(root), partition="iid", max_train_samples=7, max_val_samples=5, download=False)
    site = data.for_site(1, 3)
    train, validation = site.train(), site.validation()
    assert len(train.labels) == 7 and len(validation.labels) == 5 and len(site.validation(2).labels) == 2
    assert train.labels.tolist() == cifar10.load(root, "train").labels[site.train_indices].tolist()
    x, y = next(batches(train, 4, shuffle=np.random.default_rng(0)))
    assert x.shape == (4, 3, 32, 32) and x.dtype.is_floating_point and y.shape == (4,)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    pixels = validation.images[:1].astype(np.float32)
    first, _ = next(batches(validation, 1))
    np.testing.assert_allclose(first.numpy(), (pixels / 255 - 0.5) / 0.5, atol=1e-6)
    assert sum(len(y) for _, y in batches(train, 3)) == 7, "the last batch is partial"
