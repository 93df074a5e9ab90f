"""Joining a federation by certificate request (issue 15): ``bulle node keygen`` on the
node, ``bulle certs sign`` at the CA; the signed certificate serves a real node over
mutual TLS, and what a node must not be is refused."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation import cli as coordinator_cli
from federation._certs import COORDINATOR_CN, SigningRefused, make_certs, sign_request
from nodes import cli as node_cli
from tests._federation import start_federation

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _csr(cn: str, names: list[x509.GeneralName] | None) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_a_node_keyed_on_its_own_machine_and_signed_by_the_ca_serves_over_mtls(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = make_certs(tmp_path / "ca", [])  # the federation's CA and the coordinator's cert
    node_dir = tmp_path / "node"
    assert node_cli.main(["node", "keygen", "--node-id", "newnode", "--host", "127.0.0.1",
                          "--host", "localhost", "--out", str(node_dir)]) == 0
    printed = capsys.readouterr().out
    assert "newnode.csr" in printed and "newnode-supernode.pub" in printed
    for secret in ("newnode.key", "newnode-supernode.key"):
        assert stat.S_IMODE((node_dir / secret).stat().st_mode) == 0o600
    assert (node_dir / "newnode-supernode.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    key_before = (node_dir / "newnode.key").read_bytes()
    assert node_cli.main(["node", "keygen", "--node-id", "newnode", "--host", "127.0.0.1",
                          "--out", str(node_dir)]) == 0  # again: the same key, a new CSR
    assert (node_dir / "newnode.key").read_bytes() == key_before
    assert coordinator_cli.main(["certs", "sign", "--ca", str(ca), "--csr",
                                 str(node_dir / "newnode.csr"),
                                 "--out", str(node_dir / "newnode.pem")]) == 0
    cert = x509.load_pem_x509_certificate((node_dir / "newnode.pem").read_bytes())
    ca_cert = x509.load_pem_x509_certificate((ca / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca_cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "newnode"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]  # a server only: never the coordinator's client role
    # the node's files and the CA's public certificate, where a node config expects them
    (node_dir / "ca.pem").write_bytes((ca / "ca.pem").read_bytes())
    for f in ("bulle-coordinator.pem", "bulle-coordinator.key"):
        (node_dir / f).write_bytes((ca / f).read_bytes())
    (tmp_path / "fed").mkdir()
    fed = start_federation(tmp_path / "fed", node_dir, {"newnode": [{
        "table": "ips_colleges", "tier": "open",
        "source": str(DATA / "fr-ips" / "fr-en-ips-colleges-ap2022.csv")}]})
    try:
        out = fed.run("SELECT COUNT(*) AS n FROM ips_colleges")
        assert out["rows"][0][0] > 1000 and out["nodes"] == ["newnode"]
    finally:
        fed.close()


@pytest.mark.parametrize(("cn", "names", "why"), [
    (COORDINATOR_CN, [x509.DNSName("localhost")], "reserved"),
    ("Bulle demo CA", [x509.DNSName("localhost")], "reserved"),
    ("Node One", [x509.DNSName("localhost")], "not a node id"),
    ("n1", None, "names no host"),
    ("n1", [x509.RFC822Name("a@b.org")], "only DNS names and IP"),
])
def test_requests_a_node_must_not_make_are_refused(tmp_path: Path, cn: str,
                                                   names: list | None, why: str) -> None:
    ca = make_certs(tmp_path / "ca", [])
    with pytest.raises(SigningRefused, match=why):
        sign_request(_csr(cn, names), ca)


def test_a_tampered_or_malformed_request_is_refused(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    ca = make_certs(tmp_path / "ca", [])
    good = _csr("n1", [x509.DNSName("localhost")])
    der = x509.load_pem_x509_csr(good).public_bytes(serialization.Encoding.DER)
    i = der.index(b"localhost")
    forged = der[:i] + b"l0calhost" + der[i + 9:]  # the name changed after signing
    pem = x509.load_der_x509_csr(forged).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(SigningRefused, match="signature"):
        sign_request(pem, ca)
    bad = tmp_path / "bad.csr"
    bad.write_text("not a request")
    assert coordinator_cli.main(["certs", "sign", "--ca", str(ca), "--csr", str(bad),
                                 "--out", str(tmp_path / "x.pem")]) == 2
    assert "refused: not a PEM certificate signing request" in capsys.readouterr().err
    assert not (tmp_path / "x.pem").exists()


def test_the_cas_name_constraints_bound_what_it_signs(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Académie CA")])
    now = dt.datetime.now(dt.UTC)
    ca_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(1)
               .not_valid_before(now).not_valid_after(now + dt.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.NameConstraints(
                   permitted_subtrees=[x509.DNSName("example.org"),
                                       x509.IPAddress(ipaddress.ip_network("10.0.0.0/8"))],
                   excluded_subtrees=[x509.DNSName("hub.example.org")]), critical=True)
               .sign(key, hashes.SHA256()))
    ca = tmp_path / "ca"
    ca.mkdir()
    (ca / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (ca / "ca.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    ok = sign_request(_csr("n1", [x509.DNSName("node.region.example.org"),
                                  x509.IPAddress(ipaddress.ip_address("10.1.2.3"))]), ca, 365)
    cert = x509.load_pem_x509_certificate(ok)
    assert cert.not_valid_after_utc <= ca_cert.not_valid_after_utc  # never beyond the CA
    for names, why in (([x509.DNSName("node.example.com")], "outside"),
                       ([x509.DNSName("badexample.org")], "outside"),
                       ([x509.IPAddress(ipaddress.ip_address("192.168.1.1"))], "outside"),
                       ([x509.DNSName("hub.example.org")], "excluded")):
        with pytest.raises(SigningRefused, match=why):
            sign_request(_csr("n1", names), ca)


def test_keygen_makes_the_receipt_key_the_node_will_sign_with(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nodes._receipts import NodeReceipts

    state = tmp_path / "state"
    assert node_cli.main(["node", "keygen", "--node-id", "n9", "--host", "127.0.0.1",
                          "--out", str(tmp_path / "keys"), "--state", str(state)]) == 0
    assert "receipt_ed25519.pub.pem" in capsys.readouterr().out
    assert stat.S_IMODE((state / "receipt_ed25519.pem").stat().st_mode) == 0o600
    published = (state / "receipt_ed25519.pub.pem").read_text()
    assert NodeReceipts("n9", state).public_pem == published  # what `node serve` publishes
    assert node_cli.main(["node", "keygen", "--node-id", "n9", "--host", "127.0.0.1",
                          "--out", str(tmp_path / "keys"), "--state", str(state)]) == 0
    assert (state / "receipt_ed25519.pub.pem").read_text() == published  # kept
