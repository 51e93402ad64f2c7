"""Issue a federation's certificates: a CA, and one startup kit per participant (server, sites, admins).

::

    kits/
      ca/ca.key, ca/ca.pem     the CA (its key never goes into a kit); copy nowhere
      server/                  kit.toml, cert.pem, key.pem (0600), ca.pem
      site-1/ ...              one folder per site and per admin, the same four files

A participant's name is its certificate's common name, and its role (``server``, ``site``, ``admin``) is the
certificate's organizational unit: the server takes a site's identity and an admin's rights from the
certificate it verified, never from a message. Provisioning again with more participants adds their kits and
leaves existing ones (and the CA) as they are. A site that keeps its own key sends a certificate signing
request instead (:func:`make_request`, :func:`sign_request`).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedstream.config.errors import from_validation_error
from fedstream.deploy.kit import (
    CA_FILE,
    CERT_FILE,
    KEY_FILE,
    KIT_FILE,
    ROLES,
    KitConfig,
    public_key_bytes,
    write_kit_config,
)
from fedstream.errors import ConfigError
from fedstream.workspace import check_site_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CA_DIR = "ca"
CA_KEY = "ca.key"
CA_CERT = "ca.pem"
_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9*]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$")
CLOCK_SKEW = datetime.timedelta(minutes=5)  # certificates are valid from a little before now


def _participant(name: str) -> str:
    check_site_name(name)
    return _not_ca(name)


def _not_ca(name: str) -> str:
    if name.lower() == CA_DIR:
        raise ValueError(f"bad name {name!r}: it is reserved for the CA's folder")
    return name


class ServerSpec(BaseModel):
    """Where the sites and admins reach the server."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = "server"
    hosts: list[str] = Field(default_factory=lambda: ["localhost"], min_length=1)
    port: int = Field(default=8443, ge=1, le=65535)

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                if not _HOST_NAME.match(host):
                    raise ValueError(
                        f"{host!r} is neither an IP address nor a host name (ASCII letters, digits, '-' and '.'; "
                        "write international names in their xn-- form)"
                    ) from None
        return hosts

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if name != "server":  # a site may not take the name of the workspace's server folder; the server may
            check_site_name(name)
        return _not_ca(name)


class Project(BaseModel):
    """``project.toml``: the federation, its server, sites and admins, and how long certificates last."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1)
    server: ServerSpec = Field(default_factory=ServerSpec)
    sites: list[str] = Field(min_length=1)
    admins: list[str] = Field(min_length=1)
    valid_days: int = Field(default=365, ge=1, le=3650)
    ca_valid_days: int = Field(default=3650, ge=1, le=36500)

    @field_validator("sites", "admins")
    @classmethod
    def _names(cls, names: list[str]) -> list[str]:
        return [_participant(name) for name in names]

    @property
    def address(self) -> str:
        """Where participants reach the server: its first host name and its port."""
        return f"{self.server.hosts[0]}:{self.server.port}"

    def participants(self) -> list[tuple[str, str]]:
        """``(name, role)`` of everyone, server first; names are unique (ignoring case)."""
        everyone = (
            [(self.server.name, "server")] + [(s, "site") for s in self.sites] + [(a, "admin") for a in self.admins]
        )
        seen: set[str] = set()
        for name, _ in everyone:
            if name.lower() in seen:
                raise ConfigError(f"{name!r} is named twice; every participant needs its own name")
            seen.add(name.lower())
        return everyone


def load_project(path: str | os.PathLike[str]) -> Project:
    """Read and validate ``project.toml``; errors name the file and the key."""
    file = str(path)
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read it: {exc.strerror or exc}", file=file) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=file) from None
    try:
        project = Project.model_validate(data)
        project.participants()
    except ValidationError as exc:
        raise from_validation_error(exc).located(file=file) from None
    except ConfigError as exc:
        raise exc.located(file=file) from None
    return project


@dataclass(frozen=True)
class Authority:
    """The federation's CA: its key and its certificate."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @staticmethod
    def create(federation: str, days: int) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{federation} CA")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return Authority(key, cert)

    @property
    def federation(self) -> str:
        """The federation whose CA this is (its certificate's common name is "<federation> CA")."""
        names = self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value).removesuffix(" CA") if names else ""

    @staticmethod
    def load(folder: Path) -> Authority:
        key = serialization.load_pem_private_key((folder / CA_KEY).read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError("the CA key is not an EC key", file=str(folder / CA_KEY))
        return Authority(key, x509.load_pem_x509_certificate((folder / CA_CERT).read_bytes()))

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        _write_private(folder / CA_KEY, _pem_key(self.key))
        (folder / CA_CERT).write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def sign(
        self, public_key: ec.EllipticCurvePublicKey, name: str, role: str, federation: str, days: int, hosts: list[str]
    ) -> x509.Certificate:
        """A certificate for participant ``name`` in ``role``; a server's names ``hosts`` (DNS names or IPs)."""
        if role not in ROLES:
            raise ConfigError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, federation),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]
        )
        now = datetime.datetime.now(datetime.timezone.utc)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if role == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(min(now + datetime.timedelta(days=days), self.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if role == "server":
            builder = builder.add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hosts]), False)
        return builder.sign(self.key, hashes.SHA256())


def provision(project: Project, out: str | os.PathLike[str]) -> list[str]:
    """Create the CA (once) and the kits missing under ``out``; returns the names of the kits created."""
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise ConfigError("not a folder: name a folder for the CA and the kits", file=str(root))
    ca_folder = root / CA_DIR
    if (ca_folder / CA_KEY).exists():
        authority = Authority.load(ca_folder)
        _check_same_federation(root, authority, project)
    else:
        if any((root / name / CERT_FILE).exists() for name, _ in project.participants()):
            raise ConfigError(f"{root} holds kits but no CA ({ca_folder / CA_KEY}); provision into a new folder")
        authority = Authority.create(project.name, project.ca_valid_days)
        authority.save(ca_folder)
    created = []
    for name, role in project.participants():
        kit = root / name
        if (kit / CERT_FILE).exists():
            continue
        key = ec.generate_private_key(ec.SECP256R1())
        hosts = project.server.hosts if role == "server" else []
        cert = authority.sign(key.public_key(), name, role, project.name, project.valid_days, hosts)
        config = KitConfig(federation=project.name, name=name, role=role, server=project.address)
        _write_kit(kit, authority, cert, _pem_key(key), config)
        created.append(name)
    return created


def make_request(name: str, folder: str | os.PathLike[str]) -> Path:
    """A new private key (kept in ``folder``) and a signing request for ``name``; returns the request's path."""
    try:
        _participant(name)
    except ValueError as exc:
        raise ConfigError(str(exc), key="name") from None
    kit = Path(folder)
    kit.mkdir(parents=True, exist_ok=True)
    if (kit / KEY_FILE).exists():
        raise ConfigError(f"{kit / KEY_FILE} exists; a new request would replace the key", file=str(kit))
    key = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    _write_private(kit / KEY_FILE, _pem_key(key))
    path = kit / f"{name}.csr"
    path.write_bytes(request.public_bytes(serialization.Encoding.PEM))
    return path


def sign_request(
    request_path: str | os.PathLike[str], kits: str | os.PathLike[str], role: str, project: Project
) -> Path:
    """Sign a participant's request with the CA under ``kits``; returns the folder with its certificate and
    kit files (everything but the key, which stays where the request was made)."""
    path = Path(request_path)
    try:
        request = x509.load_pem_x509_csr(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"not a certificate signing request: {exc}", file=str(path)) from None
    if not request.is_signature_valid:
        raise ConfigError("the request's signature does not verify", file=str(path))
    names = request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        name = _participant(str(names[0].value)) if names else ""
    except ValueError as exc:
        raise ConfigError(f"the request's common name: {exc}", file=str(path)) from None
    public_key = request.public_key()
    if not name or not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise ConfigError("the request needs a common name and an EC key", file=str(path))
    root = Path(kits)
    out = root / name
    if (out / CERT_FILE).exists():
        held = x509.load_pem_x509_certificate((out / CERT_FILE).read_bytes()).public_key()
        if public_key_bytes(held) == public_key_bytes(public_key):
            return out  # signed before: the kit is there
        raise ConfigError(
            f"{name} has a certificate already ({out / CERT_FILE}), for another key: the request may not come "
            f"from {name}, so it is refused. If {name} lost its key, remove {out} and sign its new request",
            file=str(path),
        )
    authority = Authority.load(root / CA_DIR)
    _check_same_federation(root, authority, project)
    cert = authority.sign(public_key, name, role, project.name, project.valid_days, project.server.hosts)
    config = KitConfig(federation=project.name, name=name, role=role, server=project.address)
    _write_kit(out, authority, cert, None, config)
    return out


def _check_same_federation(root: Path, authority: Authority, project: Project) -> None:
    """Refuse to add kits under ``root`` for a project that is not the one its CA and kits were made for: a new
    kit would point at another server, or carry another federation's name, than the kits already given out."""
    federation = authority.federation
    if federation != project.name:
        raise ConfigError(
            f"{root} holds the CA of federation {federation!r}, and the project is {project.name!r}: kits are only "
            f"added to the federation they were made for; provision {project.name!r} into a new folder",
            key="name",
        )
    for kit in sorted(root.glob(f"*/{KIT_FILE}")):
        try:
            given = tomllib.loads(kit.read_text()).get("server")
        except (OSError, tomllib.TOMLDecodeError):
            continue  # not a kit this check can read; loading it names its problem
        if given != project.address:
            raise ConfigError(
                f"the kits in {root} reach the server at {given} ({kit}), and the project says {project.address}: "
                "provisioning again only adds kits, it changes none; give the server its old address in [server], "
                "or provision into a new folder and hand out all the kits again",
                key="server",
            )
    server = root / project.server.name / CERT_FILE
    if server.exists():
        held = x509.load_pem_x509_certificate(server.read_bytes())
        issued = list(held.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        if issued != [_general_name(host) for host in project.server.hosts]:
            hosts = [str(name.value) for name in issued]
            raise ConfigError(
                f"the server's certificate ({server}) is for hosts {hosts}, and the project names "
                f"{project.server.hosts}: provisioning again changes no certificate; to issue the server one for "
                f"the new hosts, remove {server.parent} and run it again (the sites' kits stay valid)",
                key="server.hosts",
            )


def _write_kit(kit: Path, authority: Authority, cert: x509.Certificate, key: bytes | None, config: KitConfig) -> None:
    kit.mkdir(parents=True, exist_ok=True)
    if key is not None:
        _write_private(kit / KEY_FILE, key)
    (kit / CA_FILE).write_bytes(authority.cert.public_bytes(serialization.Encoding.PEM))
    write_kit_config(kit / KIT_FILE, config)
    (kit / CERT_FILE).write_bytes(cert.public_bytes(serialization.Encoding.PEM))  # last: marks the kit complete


def _write_private(path: Path, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
    path.chmod(0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)
