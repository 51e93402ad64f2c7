"""Job signatures: only an admin of the same federation can sign, and any change to what was signed is seen."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedstream.deploy.kit import load_kit
from fedstream.deploy.poc import poc_project
from fedstream.deploy.provision import provision
from fedstream.deploy.signing import JobRefused, Signature, sign_job, verify_job


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
