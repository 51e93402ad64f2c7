"""Provisioning: the CA, the kits, re-running, signing requests, and the errors of project.toml and kits."""

from __future__ import annotations

import datetime
import re
import shutil
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedstream.deploy.kit import load_kit
from fedstream.deploy.provision import load_project, make_request, provision, sign_request
from fedstream.errors import ConfigError

PROJECT = """
name = "demo"
sites = ["site-1", "site-2"]
admins = ["alice"]

[server]
hosts = ["fl.example.org", "127.0.0.1"]
port = 9443
"""


def _project(tmp_path: Path, text: str = PROJECT) -> Path:
    path = tmp_path / "project.toml"
    path.write_text(text)
    return path


def _cert(kit: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((kit / "cert.pem").read_bytes())


def test_kits_hold_what_each_participant_needs(tmp_path: Path) -> None:
    kits = tmp_path / "kits"
    created = provision(load_project(_project(tmp_path)), kits)
    assert created == ["server", "site-1", "site-2", "alice"]
    ca = x509.load_pem_x509_certificate((kits / "ca" / "ca.pem").read_bytes())
    for name, role in [("server", "server"), ("site-1", "site"), ("alice", "admin")]:
        kit = load_kit(kits / name, role)
        assert kit.config.server == "fl.example.org:9443"
        assert stat.S_IMODE((kits / name / "key.pem").stat().st_mode) == 0o600
        assert not (kits / name / "ca.key").exists()
        cert = _cert(kits / name)
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == role
    usage = _cert(kits / "server").extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usage
    names = _cert(kits / "server").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert stat.S_IMODE((kits / "ca" / "ca.key").stat().st_mode) == 0o600


def test_provisioning_again_adds_new_participants_and_keeps_the_rest(tmp_path: Path) -> None:
    kits = tmp_path / "kits"
    provision(load_project(_project(tmp_path)), kits)
    before = {"ca": (kits / "ca" / "ca.pem").read_bytes(), "site-1": (kits / "site-1" / "cert.pem").read_bytes()}
    grown = _project(tmp_path, PROJECT.replace('"site-2"]', '"site-2", "site-3"]'))
    assert provision(load_project(grown), kits) == ["site-3"]
    assert (kits / "ca" / "ca.pem").read_bytes() == before["ca"]
    assert (kits / "site-1" / "cert.pem").read_bytes() == before["site-1"]
    ca = x509.load_pem_x509_certificate(before["ca"])
    _cert(kits / "site-3").verify_directly_issued_by(ca)


def test_a_signing_request_keeps_the_key_at_the_site(tmp_path: Path) -> None:
    project = load_project(_project(tmp_path))
    kits = tmp_path / "kits"
    provision(project, kits)
    site_kit = tmp_path / "at-the-site"
    request = make_request("site-9", site_kit)
    signed = sign_request(request, kits, "site", project)
    assert not (signed / "key.pem").exists()
    for name in ("cert.pem", "ca.pem", "kit.toml"):
        (site_kit / name).write_bytes((signed / name).read_bytes())
    kit = load_kit(site_kit, "site")
    cert = x509.load_pem_x509_certificate(kit.cert)
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert kit.name == "site-9"
    with pytest.raises(ConfigError, match="would replace the key"):
        make_request("site-9", site_kit)
    assert sign_request(request, kits, "site", project) == signed, "signing the same request again changes nothing"
    assert (signed / "cert.pem").read_bytes() == kit.cert
    for name in ("site-9", "site-1"):  # another key asking for a name that has a certificate: signed, or kit made
        with pytest.raises(ConfigError, match=f"{name} has a certificate already .* another key"):
            sign_request(make_request(name, tmp_path / f"impostor-{name}"), kits, "site", project)
    assert (signed / "cert.pem").read_bytes() == kit.cert
    cert_1 = _cert(kits / "site-1")
    key_1 = serialization.load_pem_private_key((kits / "site-1" / "key.pem").read_bytes(), None)
    assert cert_1.public_key().public_numbers() == key_1.public_key().public_numbers(), "site-1's kit still works"
    with pytest.raises(ConfigError, match=r"bad site name '\.\./x'"):
        make_request("../x", tmp_path / "elsewhere")


def test_certificates_never_outlive_the_ca(tmp_path: Path) -> None:
    text = "valid_days = 3650\nca_valid_days = 10\n" + PROJECT
    provision(load_project(_project(tmp_path, text)), tmp_path / "kits")
    ca = x509.load_pem_x509_certificate((tmp_path / "kits" / "ca" / "ca.pem").read_bytes())
    assert _cert(tmp_path / "kits" / "site-1").not_valid_after_utc <= ca.not_valid_after_utc
    assert ca.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc) < datetime.timedelta(days=11)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('name = "x"\nsites = ["a"]\n', "admins: missing required key"),
        ('name = "x"\nsites = ["a"]\nadmins = ["b"]\ncolour = 1\n', "colour: unknown key"),
        ('name = "x"\nsites = ["../up"]\nadmins = ["b"]\n', "sites: bad site name '../up'"),
        ('name = "x"\nsites = ["a", "A"]\nadmins = ["b"]\n', "'A' is named twice"),
        ('name = "x"\nsites = ["server"]\nadmins = ["b"]\n', "'server': it is reserved"),
        ('name = "x"\nsites = ["a"]\nadmins = ["a"]\n', "'a' is named twice"),
        ('name = "x"\nsites = ["ca"]\nadmins = ["b"]\n', "reserved for the CA"),
        ('name = "x"\nsites = []\nadmins = ["b"]\n', "sites: List should have at least 1 item"),
        ('name = "x"\nsites = ["a"]\nadmins = ["b"]\n[server]\nport = 70000\n', "server.port"),
        ('name = "x"\nsites = ["a"]\nadmins = ["b"]\n[server]\nhosts = []\n', "server.hosts"),
        ('name = "x"\nsites = ["a"]\nadmins = ["b"]\nvalid_days = "1y"\n', "valid_days"),
        ('name = "x"\nsites = ["a"]\nadmins = ["b"]\n[server]\nhosts = ["héllo"]\n', "neither an IP address"),
        ('name = "x"\nsites = ["a"]\nadmins = ["b"]\n[server]\nhosts = ["a b"]\n', "neither an IP address"),
        ("name = \n", "not valid TOML"),
    ],
)
def test_project_errors_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = _project(tmp_path, text)
    with pytest.raises(ConfigError, match=r"project\.toml") as caught:
        load_project(path)
    assert message in str(caught.value)


def test_kit_errors_are_clear(tmp_path: Path) -> None:
    kits = tmp_path / "kits"
    provision(load_project(_project(tmp_path)), kits)
    with pytest.raises(ConfigError, match="kit of site 'site-1'; a server's kit is needed"):
        load_kit(kits / "site-1", "server")
    with pytest.raises(ConfigError, match="not a startup kit"):
        load_kit(tmp_path, "site")
    (kits / "site-2" / "key.pem").chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_kit(kits / "site-2", "site")
    (kits / "alice" / "key.pem").unlink()
    with pytest.raises(ConfigError, match=r"key\.pem is missing"):
        load_kit(kits / "alice", "admin")
    with (kits / "site-1" / "kit.toml").open("a") as file:
        file.write('colour = "red"\n')
    with pytest.raises(ConfigError, match=r"kit\.toml: colour: unknown key"):
        load_kit(kits / "site-1", "site")
    (kits / "server" / "kit.toml").write_text('federation = "d"\nname = "server"\nrole = "server"\nserver = "nope"\n')
    with pytest.raises(ConfigError, match="server: expected host:port"):
        load_kit(kits / "server", "server")
    (kits / "server" / "kit.toml").write_text(
        'federation = "d"\nname = "server"\nrole = "server"\nserver = "h:1"\noverrides = ["a=1"]\n'
    )
    with pytest.raises(ConfigError, match="only a site's kit may set overrides"):
        load_kit(kits / "server", "server")


def test_a_kit_whose_files_do_not_belong_together_is_named(tmp_path: Path) -> None:
    # Found at load, each broken kit names its file; gRPC would have said "the server refused the connection".
    kits, other = tmp_path / "kits", tmp_path / "other"
    provision(load_project(_project(tmp_path)), kits)
    (tmp_path / "o").mkdir()
    provision(load_project(_project(tmp_path / "o")), other)  # another federation, its own CA
    with pytest.raises(ConfigError, match=r"kit\.toml: not a folder"):
        load_kit(kits / "site-1" / "kit.toml", "site")
    cases = {
        "key.pem: not an unencrypted PEM private key": ("key.pem", b"garbage"),
        "cert.pem: not a PEM certificate": ("cert.pem", b"garbage"),
        "ca.pem: not a PEM certificate": ("ca.pem", b""),
        "key.pem: not the key of cert.pem": ("key.pem", (kits / "site-2" / "key.pem").read_bytes()),
        "cert.pem: not issued by the CA of ca.pem": ("cert.pem", (other / "site-1" / "cert.pem").read_bytes()),
    }
    for words, (name, content) in cases.items():
        kit = tmp_path / "broken"
        shutil.rmtree(kit, ignore_errors=True)
        shutil.copytree(kits / "site-1", kit)
        (kit / name).write_bytes(content)
        if name == "cert.pem" and content != b"garbage":
            (kit / "key.pem").write_bytes((other / "site-1" / "key.pem").read_bytes())
        with pytest.raises(ConfigError, match=re.escape(f"{kit / words.split(':')[0]}: {words.split(': ')[1]}")):
            load_kit(kit, "site")
    assert load_kit(kits / "site-1", "site").name == "site-1"


def test_kits_without_a_ca_are_not_overwritten(tmp_path: Path) -> None:
    kits = tmp_path / "kits"
    provision(load_project(_project(tmp_path)), kits)
    (kits / "ca" / "ca.key").unlink()
    with pytest.raises(ConfigError, match="holds kits but no CA"):
        provision(load_project(_project(tmp_path)), kits)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('name = "demo"', 'name = "other"'), "holds the CA of federation 'demo', and the project is 'other'"),
        (("port = 9443", "port = 9444"), "at fl.example.org:9443 .*, and the project says fl.example.org:9444"),
        (('"127.0.0.1"]', '"127.0.0.1", "10.0.0.1"]'), r"is for hosts \['fl.example.org', '127.0.0.1'\]"),
    ],
)
def test_provisioning_again_refuses_another_federation_or_server(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    kits = tmp_path / "kits"
    provision(load_project(_project(tmp_path)), kits)
    changed = PROJECT.replace(*change).replace('"site-2"]', '"site-2", "site-3"]')
    with pytest.raises(ConfigError, match=message):
        provision(load_project(_project(tmp_path, changed)), kits)
    with pytest.raises(ConfigError, match=message):  # nor is a request signed for it
        sign_request(make_request("site-4", tmp_path / "site-4"), kits, "site", load_project(tmp_path / "project.toml"))
    assert not (kits / "site-3").exists() and not (kits / "site-4").exists()


def test_provisioning_into_a_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a folder"):
        provision(load_project(_project(tmp_path)), tmp_path / "project.toml")
