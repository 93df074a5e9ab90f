"""A local certificate authority for the demo and tests (``bulle certs``).

Production uses the institutions' PKI or cert-manager (deploy/README.md); this makes the
same layout: one CA, one server certificate per node (SAN localhost/127.0.0.1), and the
coordinator's client certificate (CN ``bulle-coordinator``) that nodes pin.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

COORDINATOR_CN = "bulle-coordinator"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bulle"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(cn: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
           hosts: list[str], days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def make_certs(out: str | Path, names: list[str], hosts: list[str] | None = None,
               days: int = 365, extra_clients: list[str] | None = None) -> Path:
    """Create ``ca.pem`` and ``<name>.pem``/``<name>.key`` for each name, plus the
    coordinator's. Existing files are kept (idempotent); returns the folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hosts = hosts or ["localhost", "127.0.0.1"]
    ca_pem, ca_key_path = out / "ca.pem", out / "ca.key"
    if ca_pem.exists() and ca_key_path.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_pem.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
    else:
        ca_key = _key()
        now = dt.datetime.now(dt.UTC)
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(_name("Bulle demo CA")).issuer_name(_name("Bulle demo CA"))
            .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        _write_key(ca_key_path, ca_key)
        ca_pem.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for name in [COORDINATOR_CN, *names, *(extra_clients or [])]:
        cert_path, key_path = out / f"{name}.pem", out / f"{name}.key"
        if cert_path.exists() and key_path.exists():
            continue
        key, cert = _issue(name, ca_key, ca_cert, hosts, days)
        _write_key(key_path, key)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out


# ------------------------------------------------------------------ signing a node's CSR

_NODE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
RESERVED_CNS = frozenset({COORDINATOR_CN, "bulle-superlink", "Bulle demo CA"})


class SigningRefused(ValueError):
    """The request is not one this CA signs; the message says which rule."""


def sign_request(csr_pem: bytes, ca_dir: str | Path, days: int = 365) -> bytes:
    """A node's certificate for its certificate signing request (``bulle node keygen``),
    issued by the CA in ``ca_dir`` (``ca.pem``, ``ca.key``). Only what a node may be: a
    server (no CA, no client use: it cannot pose as the coordinator), its node id as CN,
    DNS/IP names from the request, each within the CA's name constraints if it has any."""
    ca_dir = Path(ca_dir)
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as e:
        raise SigningRefused(f"not a PEM certificate signing request ({e})") from None
    if not csr.is_signature_valid:
        raise SigningRefused("the request's signature does not verify")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if len(cns) == 1 else ""
    if cn in RESERVED_CNS:
        raise SigningRefused(f"CN {cn!r} is reserved: a node certificate cannot carry it")
    if not _NODE_ID.match(cn):
        raise SigningRefused(f"CN {cn!r} is not a node id (lowercase letters, digits, - and _)")
    try:
        sans = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        sans = []
    if not sans:
        raise SigningRefused("the request names no host (subjectAltName): the coordinator "
                             "must be able to check the name it dials")
    for name in sans:
        if not isinstance(name, x509.DNSName | x509.IPAddress):
            raise SigningRefused(f"only DNS names and IP addresses are signed, not {name}")
        _check_constraints(name, ca_cert)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn)).issuer_name(ca_cert.subject)
        .public_key(csr.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _check_constraints(name: x509.GeneralName, ca_cert: x509.Certificate) -> None:
    try:
        nc = ca_cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return

    def within(subtree: x509.GeneralName) -> bool:
        if isinstance(name, x509.DNSName) and isinstance(subtree, x509.DNSName):
            base = subtree.value.lstrip(".").lower()
            host = name.value.lower()
            return host == base or host.endswith("." + base)
        if isinstance(name, x509.IPAddress) and isinstance(subtree, x509.IPAddress):
            return name.value in subtree.value  # type: ignore[operator]
        return False

    same_kind = [s for s in (nc.permitted_subtrees or []) if type(s) is type(name)]
    if same_kind and not any(within(s) for s in same_kind):
        raise SigningRefused(f"{name.value} is outside the CA's permitted names")
    if any(within(s) for s in (nc.excluded_subtrees or [])):
        raise SigningRefused(f"{name.value} is in the CA's excluded names")
