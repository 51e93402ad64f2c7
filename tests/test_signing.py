"""Job signatures: only an admin of the same federation can sign, and any change to what was signed is seen."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedstream.deploy.archive import pack_job, unpack_job
from fedstream.deploy.kit import load_kit
from fedstream.deploy.poc import poc_project
from fedstream.deploy.provision import provision
from fedstream.deploy.signing import JobRefused, Signature, sign_job, verify_job
from fedstream.errors import ConfigError


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kits")
    provision(poc_project(1, 9000), root / "ours")
    provision(poc_project(1, 9000), root / "theirs")
    return root


def _sign(kits: Path, who: str, role: str, archive: bytes, overrides: list[str], federation: str = "ours") -> Signature:
    kit = load_kit(kits / federation / who, role)
    return sign_job(kit.key, kit.cert, archive, overrides)


def _ca(kits: Path) -> bytes:
    return (kits / "ours" / "ca" / "ca.pem").read_bytes()


def test_an_admins_signature_verifies(kits: Path) -> None:
    signed = _sign(kits, "admin", "admin", b"job", ["a=1"])
    assert verify_job(_ca(kits), b"job", ["a=1"], signed) == "admin"


@pytest.mark.parametrize(
    ("archive", "overrides", "words"),
    [
        (b"job!", ["a=1"], "modified after admin signed it"),
        (b"job", ["a=2"], "modified after"),
        (b"job", [], "modified"),
    ],
)
def test_any_change_is_refused(kits: Path, archive: bytes, overrides: list[str], words: str) -> None:
    signed = _sign(kits, "admin", "admin", b"job", ["a=1"])
    with pytest.raises(JobRefused, match=words):
        verify_job(_ca(kits), archive, overrides, signed)


def test_signers_must_be_admins_of_this_federation(kits: Path) -> None:
    with pytest.raises(JobRefused, match="another federation"):
        verify_job(_ca(kits), b"job", [], _sign(kits, "admin", "admin", b"job", [], federation="theirs"))
    with pytest.raises(JobRefused, match="signed by site-1, who is not an admin"):
        verify_job(_ca(kits), b"job", [], _sign(kits, "site-1", "site", b"job", []))


@pytest.mark.parametrize(
    "signed",
    [Signature("", ""), Signature("not base64!", "-----BEGIN CERTIFICATE-----\nxx\n-----END CERTIFICATE-----\n")],
)
def test_garbage_is_refused(kits: Path, signed: Signature) -> None:
    with pytest.raises(JobRefused, match="unreadable"):
        verify_job(_ca(kits), b"job", [], signed)


def test_a_job_is_packed_as_simulate_sees_it_through_links_and_without_data(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    (shared / "nets").mkdir(parents=True)
    (shared / "nets" / "net.py").write_text("NET = 1\n")
    (shared / "util.py").write_text("UTIL = 2\n")
    job = tmp_path / "job"
    (job / "__pycache__").mkdir(parents=True)
    (job / "job.toml").write_text('name = "j"\n')
    (job / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    (job / "util.py").symlink_to(shared / "util.py")
    (job / "nets").symlink_to(shared / "nets")
    (shared / "nets" / "loop").symlink_to(job)  # a link back: walked once
    (job / "gone.py").symlink_to(tmp_path / "missing.py")
    unpack_job(pack_job(job), tmp_path / "out")
    files = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == ["job.toml", "nets/net.py", "util.py"]
    assert (tmp_path / "out" / "nets" / "net.py").read_text() == "NET = 1\n"
    assert not any(p.is_symlink() for p in (tmp_path / "out").rglob("*"))
    (job / "data.npy").write_bytes(b"\0" * 5000)
    with pytest.raises(ConfigError, match=r"the job folder holds over 0 MiB \(data\.npy among it\); keep data sets"):
        pack_job(job, 1000)
