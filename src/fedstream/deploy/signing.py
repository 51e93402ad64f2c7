"""Job code is code: an admin signs what it submits, and the server and every site check the signature.

The signature covers the job folder's archive and the ``--set`` overrides (which can change what runs); it is
made with the admin's private key and travels with the admin's certificate. A site runs a job only if that
certificate was issued by its own federation's CA for an admin, is valid now, and the signature verifies over
exactly the bytes it received; the server checks the same at submission and that the signer is the caller.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedstream.deploy.kit import issued_by
from fedstream.errors import FedstreamError


class JobRefused(FedstreamError):
    """A job whose signature does not hold; the message says why."""


@dataclass(frozen=True)
class Signature:
    """A signature over a job and the certificate of the admin who made it (both as text, for JSON)."""

    signature: str  # base64
    certificate: str  # PEM


def _message(archive: bytes, overrides: list[str]) -> bytes:
    return b"fedstream-job-v1\n" + hashlib.sha256(archive).hexdigest().encode() + b"\n" + json.dumps(overrides).encode()


def sign_job(key_pem: bytes, cert_pem: bytes, archive: bytes, overrides: list[str]) -> Signature:
    """Sign ``archive`` and ``overrides`` with an admin's key."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise JobRefused("the admin's key is not an EC key; provision the kit with fedstream provision")
    signature = key.sign(_message(archive, overrides), ec.ECDSA(hashes.SHA256()))
    return Signature(base64.b64encode(signature).decode(), cert_pem.decode())


def verify_job(ca_pem: bytes, archive: bytes, overrides: list[str], signed: Signature) -> str:
    """The name of the admin who signed ``archive`` and ``overrides``; raises :class:`JobRefused` otherwise."""
    try:
        cert = x509.load_pem_x509_certificate(signed.certificate.encode())
        ca = x509.load_pem_x509_certificate(ca_pem)
        signature = base64.b64decode(signed.signature, validate=True)
    except ValueError as exc:
        raise JobRefused(f"the job's signature is unreadable: {exc}") from None
    if not issued_by(cert, ca):
        raise JobRefused("the job was signed with a certificate of another federation (not issued by our CA)")
    roles = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(names[0].value) if names else "?"
    if not roles or roles[0].value != "admin":
        raise JobRefused(f"the job was signed by {name}, who is not an admin")
    now = datetime.datetime.now(datetime.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise JobRefused(f"the job was signed with {name}'s certificate, which is not valid now")
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise JobRefused(f"{name}'s certificate does not hold an EC key")
    try:
        key.verify(signature, _message(archive, overrides), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise JobRefused(f"the job was modified after {name} signed it (its signature does not verify)") from None
    return name
