"""A startup kit: one participant's certificate, private key, the CA certificate and ``kit.toml``.

``kit.toml`` says who the kit belongs to and where the server is::

    federation = "demo"
    name = "site-1"
    role = "site"
    server = "fl.example.org:8443"

    # sites only: this site's own job values, applied after the job's, written like --set
    overrides = ["client.trainer.args.data.root=/data/cifar10"]
    allow_custom_code = true        # false: run only components installed here, never a job's own .py files
"""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedstream.config.errors import from_validation_error
from fedstream.config.loader import parse_override
from fedstream.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

KIT_FILE = "kit.toml"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
CA_FILE = "ca.pem"
ROLES = ("server", "site", "admin")


class KitConfig(BaseModel):
    """The content of ``kit.toml``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    federation: str
    name: str
    role: str
    server: str = Field(description="host:port of the server")
    overrides: list[str] = Field(default_factory=list)
    allow_custom_code: bool = True

    @field_validator("role")
    @classmethod
    def _role(cls, value: str) -> str:
        if value not in ROLES:
            raise ValueError(f"expected one of {', '.join(ROLES)}, got {value!r}")
        return value

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, values: list[str]) -> list[str]:
        for value in values:
            try:
                parse_override(value)
            except ConfigError as exc:
                raise ValueError(exc.message) from None
        return values

    @field_validator("server")
    @classmethod
    def _address(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"expected host:port, got {value!r}")
        return value

    @property
    def port(self) -> int:
        return int(self.server.rpartition(":")[2])


def write_kit_config(path: Path, config: KitConfig) -> None:
    data = config.model_dump()
    if config.role != "site":
        del data["overrides"], data["allow_custom_code"]
    path.write_text(tomli_w.dumps(data))


@dataclass(frozen=True)
class Kit:
    """A loaded kit: its config and the PEM bytes gRPC needs."""

    folder: Path
    config: KitConfig
    cert: bytes
    key: bytes
    ca: bytes

    @property
    def name(self) -> str:
        return self.config.name


def load_kit(folder: str | os.PathLike[str], role: str) -> Kit:
    """Load the kit in ``folder``, which must belong to a participant in ``role``."""
    root = Path(folder)
    file = str(root / KIT_FILE)
    if root.exists() and not root.is_dir():
        raise ConfigError("not a folder: a startup kit is the folder fedstream provision made", file=str(root))
    try:
        data = tomllib.loads((root / KIT_FILE).read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"no {KIT_FILE} here: not a startup kit (made by fedstream provision)", file=str(root)
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=file) from None
    try:
        config = KitConfig.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc).located(file=file) from None
    if config.role != role:
        article = "an" if role[0] in "aeiou" else "a"
        raise ConfigError(
            f"this is the kit of {config.role} {config.name!r}; {article} {role}'s kit is needed", file=file
        )
    if role != "site" and ("overrides" in data or "allow_custom_code" in data):
        raise ConfigError("only a site's kit may set overrides and allow_custom_code", file=file)
    key_path = root / KEY_FILE
    try:
        mode = key_path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"the private key is readable by others (mode {stat.filemode(mode)}); run: chmod 600 {key_path}",
                file=str(key_path),
            )
        kit = Kit(root, config, (root / CERT_FILE).read_bytes(), key_path.read_bytes(), (root / CA_FILE).read_bytes())
    except FileNotFoundError as exc:
        raise ConfigError(f"the kit is incomplete: {exc.filename} is missing", file=str(root)) from None
    _check_pems(kit)
    return kit


def _check_pems(kit: Kit) -> None:
    """Raise :class:`ConfigError` unless the kit's certificate, key and CA certificate are readable, the key is
    the certificate's and the CA issued it: found here, a broken kit is named; found by TLS, it would look like
    a server that refuses connections."""
    root = kit.folder
    try:
        cert = x509.load_pem_x509_certificate(kit.cert)
    except ValueError:
        raise ConfigError("not a PEM certificate", file=str(root / CERT_FILE)) from None
    try:
        ca = x509.load_pem_x509_certificate(kit.ca)
    except ValueError:
        raise ConfigError("not a PEM certificate", file=str(root / CA_FILE)) from None
    try:
        key = serialization.load_pem_private_key(kit.key, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError("not an unencrypted PEM private key", file=str(root / KEY_FILE)) from None
    if public_key_bytes(key.public_key()) != public_key_bytes(cert.public_key()):
        raise ConfigError(f"not the key of {CERT_FILE} (files of two kits mixed up?)", file=str(root / KEY_FILE))
    if not issued_by(cert, ca):
        raise ConfigError(
            f"not issued by the CA of {CA_FILE} (files of two federations mixed up?)", file=str(root / CERT_FILE)
        )


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``ca`` signed ``cert``."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def public_key_bytes(key: Any) -> bytes:
    """A public key's bytes (DER), by which two keys are compared."""
    return bytes(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
