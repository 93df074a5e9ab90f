"""``bulle node doctor``: check a node's config, data, TLS files, keys and port before serving.

Each check prints one line, ✔ (fine), ✘ (a problem, in plain words, with what to do) or
– (not applicable). Nothing is written: datasets load into a scratch in-memory DuckDB, and
the port is only probed. Exit status 0 when no check failed.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import ipaddress
import os
import socket
import ssl
import stat
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nodes._config import DP_FIX, ConfigError, NodeConfig, load_node_config
from nodes._sources import load_dataset, row_count_bucket, table_columns, type_family

if TYPE_CHECKING:
    from nodes._onboard import IngestSpec

OK, FAIL, SKIP = "✔", "✘", "–"
RENEW_SOON_DAYS = 30
_WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}
_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Check:
    status: str  # OK, FAIL or SKIP
    text: str

    @property
    def failed(self) -> bool:
        return self.status == FAIL


def run_checks(config_path: Path, coordinator_ca: Path | None = None,
               host: str | None = None, listen: str | None = None,
               superlink: str | None = None) -> list[Check]:
    """All checks, in order; a config that does not parse stops the rest.

    ``listen`` and ``superlink`` override the config's addresses, as ``bulle node serve
    --listen/--superlink`` do.
    """
    try:
        config = load_node_config(config_path)
    except ConfigError as e:
        return [Check(FAIL, f"config: {e}")]
    if listen:
        config = replace(config, listen=listen)
    if superlink and config.training is not None:
        config = replace(config, training=replace(config.training, superlink=superlink))
    out = [Check(OK, f"config {config.path}: node {config.node_id!r}, "
                     f"{len(config.datasets)} dataset(s)")]
    out += _datasets(config)
    out += _tls(config, coordinator_ca, host)
    out.append(_board_key(config.board_public_key,
                          [d.table for d in config.datasets if d.tier == "sensitive"]))
    out.append(_dp_library(config))
    out += [_writable("state_dir", config.state_dir), _writable("data_dir", config.data_dir)]
    out += _training(config)
    out.append(_port(config))
    return out


def report(checks: list[Check]) -> str:
    lines = [f"{c.status} {c.text}" for c in checks]
    failed = sum(c.failed for c in checks)
    passed = sum(c.status == OK for c in checks)
    lines.append(f"{failed} problem(s) found, {passed} check(s) passed" if failed
                 else f"all {passed} checks passed")
    return "\n".join(lines)


def doctor(config_path: Path, coordinator_ca: Path | None = None,
           host: str | None = None, listen: str | None = None,
           out: Callable[[str], None] = print, superlink: str | None = None) -> int:
    checks = run_checks(config_path, coordinator_ca, host, listen, superlink)
    out(report(checks))
    return 1 if any(c.failed for c in checks) else 0


# -------------------------------------------------------------------------- datasets


def _datasets(config: NodeConfig) -> list[Check]:
    if not config.datasets:
        return [Check(FAIL, "datasets: none declared: add at least one [[dataset]]")]
    # Same settings as the engine, and one connection: a filter may read a table loaded above.
    con = duckdb.connect(":memory:", config={
        "threads": config.engine.threads, "memory_limit": config.engine.memory_limit,
        "autoinstall_known_extensions": False, "autoload_known_extensions": False})
    out = []
    try:
        for ds in config.datasets:
            ingest = ds.onboarding.ingest if ds.onboarding else None
            if ingest is not None:
                out += _ingest_inputs(ds.table, ingest)
            missing = [p for p in ds.source if not p.is_file()]
            if missing:
                # With [dataset.ingest] the source is what `bulle node ingest` writes.
                hint = " (run `bulle node ingest` first)" if ingest is not None else ""
                out += [Check(FAIL, f"dataset {ds.table}: source file not found: {p}{hint}")
                        for p in missing]
                continue
            try:
                n = load_dataset(con, ds)
                columns = dict(table_columns(con, ds.table))
            except ConfigError as e:
                message = str(e).removeprefix(f"dataset {ds.table!r}: ")
                out.append(Check(FAIL, f"dataset {ds.table}: {message}"))
                continue
            bad = [c for c in ds.bounds if c not in columns
                   or type_family(columns[c]) not in ("integer", "number")]
            if bad:
                out.append(Check(FAIL, f"dataset {ds.table}: bounds on {bad[0]!r}, which is "
                                       "missing or not numeric"))
                continue
            # A bucket, as the catalogue shows: doctor output gets pasted into tickets.
            out.append(Check(OK, f"dataset {ds.table} ({ds.tier}): {len(ds.source)} file(s) "
                                 f"loaded, {row_count_bucket(n)} rows, {len(columns)} columns"))
    finally:
        con.close()
    return out


def _ingest_inputs(table: str, ingest: IngestSpec) -> list[Check]:
    """The raw files and the pseudonymisation key `bulle node ingest` will need."""
    out = [Check(FAIL, f"dataset {table}: ingest input not found: {p}")
           for p in ingest.inputs if not p.is_file()]
    ps = ingest.pseudonymise
    if ps is not None and ps.key_file is not None and not ps.key_file.is_file():
        out.append(Check(FAIL, f"dataset {table}: pseudonymisation key file not found: "
                               f"{ps.key_file}"))
    elif ps is not None and ps.key_env and not os.environ.get(ps.key_env):
        out.append(Check(FAIL, f"dataset {table}: the pseudonymisation key variable "
                               f"{ps.key_env} is not set in this environment"))
    if not out:
        key = ", pseudonymisation key found" if ps is not None else ""
        out.append(Check(OK, f"dataset {table}: {len(ingest.inputs)} ingest input(s) "
                             f"present{key}"))
    return out


# ------------------------------------------------------------------------------- TLS


def _load_certs(path: Path, what: str) -> tuple[list[x509.Certificate], str]:
    """(certificates, problem); an empty problem means they loaded."""
    if not path.is_file():
        return [], f"{what} file not found: {path}"
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError:
        return [], f"{what} {path} is not a PEM certificate"
    return certs, ""


def _validity(cert: x509.Certificate, what: str, now: dt.datetime) -> Check:
    until = cert.not_valid_after_utc
    if cert.not_valid_before_utc > now:
        return Check(FAIL, f"{what} is not valid before {cert.not_valid_before_utc:%Y-%m-%d} "
                           "(check the clock of this machine, or the certificate)")
    if until < now:
        return Check(FAIL, f"{what} expired on {until:%Y-%m-%d}: issue a new one "
                           "(deploy/README.md, rotate certificates)")
    days = (until - now).days
    soon = " — renew it soon" if days < RENEW_SOON_DAYS else ""
    return Check(OK, f"{what} valid until {until:%Y-%m-%d} ({days} days left{soon})")


def _names(cert: x509.Certificate) -> tuple[list[str], list[_IP]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return san.get_values_for_type(x509.DNSName), san.get_values_for_type(x509.IPAddress)


def _host_matches(host: str, dns: list[str], ips: list[_IP]) -> bool:
    try:
        return ipaddress.ip_address(host) in ips
    except ValueError:
        pass
    host = host.lower().rstrip(".")
    for name in (n.lower().rstrip(".") for n in dns):
        if name == host:
            return True
        if name.startswith("*.") and "." in host and host.split(".", 1)[1] == name[2:]:
            return True
    return False


def _split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def _tls(config: NodeConfig, coordinator_ca: Path | None, host: str | None) -> list[Check]:
    tls = config.tls
    if tls is None:
        return [Check(FAIL, "tls: no [tls] section: a node only serves with mutual TLS "
                            "(cert, key, client_ca)")]
    now = dt.datetime.now(dt.UTC)
    out: list[Check] = []
    chain, problem = _load_certs(tls.cert, "certificate")
    if problem:
        out.append(Check(FAIL, f"tls: {problem}"))
    else:
        leaf = chain[0]
        out.append(_validity(leaf, f"certificate {tls.cert.name} ({_cn(leaf)})", now))
        out.append(_server_usage(leaf))
        out.append(_san(leaf, config.listen, host))
    out.append(_key(tls.key, chain[0] if chain else None))
    ca_certs, ca_problem = _load_certs(tls.client_ca, "client_ca")
    if ca_problem:
        out.append(Check(FAIL, f"tls: {ca_problem}"))
    else:
        cas = [c for c in ca_certs if _is_ca(c)]
        if not cas:
            out.append(Check(FAIL, f"client_ca {tls.client_ca} holds no CA certificate "
                                   "(basicConstraints CA:TRUE)"))
        else:
            out += [_validity(c, f"client_ca {_cn(c)}", now) for c in cas]
    if chain:
        out.append(_chain(chain, coordinator_ca or tls.client_ca, now))
    return out


def _cn(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return f"CN={names[0].value}" if names else cert.subject.rfc4514_string()


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _server_usage(cert: x509.Certificate) -> Check:
    if _is_ca(cert):
        return Check(FAIL, "certificate is a CA certificate: the node needs its own server "
                           "certificate issued by the CA")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return Check(OK, "certificate usable as a TLS server certificate")
    if ExtendedKeyUsageOID.SERVER_AUTH not in eku:
        return Check(FAIL, "certificate is not allowed for TLS servers (its extended key "
                           "usage lacks serverAuth): ask for a server certificate")
    return Check(OK, "certificate usable as a TLS server certificate (serverAuth)")


def _san(cert: x509.Certificate, listen: str, host: str | None) -> Check:
    dns, ips = _names(cert)
    shown = ", ".join([*dns, *map(str, ips)]) or "none"
    if host is None:
        listen_host = _split_listen(listen)[0]
        if listen_host in _WILDCARD_HOSTS:
            return Check(SKIP, f"certificate names ({shown}) not compared: the node listens "
                               "on every interface; pass --host NAME, the name the "
                               "coordinator dials")
        host = listen_host
    if not dns and not ips:
        return Check(FAIL, "certificate has no subject alternative name: clients (gRPC, "
                           f"Flower) refuse it; reissue it with a SAN for {host}")
    if _host_matches(host, dns, ips):
        return Check(OK, f"certificate names {host} (SAN: {shown})")
    return Check(FAIL, f"certificate does not name {host} (SAN: {shown}): the coordinator "
                       f"will refuse the connection; reissue it with {host} in the SAN")


def _key(path: Path, leaf: x509.Certificate | None) -> Check:
    if not path.is_file():
        return Check(FAIL, f"tls: private key file not found: {path}")
    mode = path.stat().st_mode
    if mode & stat.S_IROTH:
        return Check(FAIL, f"private key {path} is readable by every user on this machine: "
                           f"chmod 600 {path} (or 640 with the node's group)")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        return Check(FAIL, f"private key {path} is not an unencrypted PEM private key")
    if leaf is None:
        return Check(SKIP, "private key loaded; not compared (no certificate)")
    same = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if not same:
        return Check(FAIL, f"private key {path.name} does not belong to the certificate: "
                           "the pair was mixed up or one of them was replaced")
    return Check(OK, f"private key {path.name} matches the certificate")


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)  # issuer name and signature
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _chain(chain: list[x509.Certificate], ca_file: Path, now: dt.datetime) -> Check:
    """Leaf → intermediates (in the certificate file, in order) → a CA of ``ca_file``."""
    roots, problem = _load_certs(ca_file, "CA")
    if problem:
        return Check(FAIL, f"chain not checked: {problem}")
    for cert in chain[1:]:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return Check(FAIL, f"intermediate {_cn(cert)} in the certificate file has expired")
    for child, parent in pairwise(chain):
        if not _issued_by(child, parent):
            return Check(FAIL, f"the certificate file is not a chain: {_cn(child)} was not "
                               f"issued by the next certificate, {_cn(parent)}")
    top = chain[-1]
    root = next((r for r in roots if r == top or _issued_by(top, r)), None)
    if root is None:
        return Check(FAIL, f"certificate ({_cn(chain[0])}) was not issued by a CA in "
                           f"{ca_file}: the coordinator will not trust this node; have it "
                           "signed by the federation's CA (or pass --coordinator-ca)")
    return Check(OK, f"certificate chain verifies against {ca_file.name} ({_cn(root)})")


# ------------------------------------------------------------------- keys, dirs, port


def _board_key(path: Path | None, sensitive: list[str]) -> Check:
    if path is None:
        if sensitive:
            return Check(FAIL, f"board public key not configured: the sensitive dataset(s) "
                               f"{', '.join(sensitive)} would refuse every query (grants "
                               "are verified against it); set board_public_key")
        return Check(SKIP, "board public key: not configured (needed only for the "
                           "sensitive tier)")
    if not path.is_file():
        return Check(FAIL, f"board public key file not found: {path}")
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except ValueError:
        return Check(FAIL, f"board public key {path} is not a PEM public key")
    if not isinstance(key, Ed25519PublicKey):
        return Check(FAIL, f"board public key {path} is not an Ed25519 key")
    # Same fingerprint as the ``kid`` of signed grants: compare it with the board's.
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return Check(OK, f"board public key loaded (Ed25519, kid "
                     f"{hashlib.sha256(raw).hexdigest()[:16]})")


def _dp_library(config: NodeConfig) -> Check:
    """OpenDP (the ``dp`` extra) where a sensitive dataset needs it: serve refuses without."""
    if missing := config.without_dp_library():
        return Check(FAIL, f"OpenDP not installed: the sensitive dataset(s) {', '.join(missing)}"
                           f" need it and the node would refuse to start; {DP_FIX}")
    if not any(d.tier == "sensitive" for d in config.datasets):
        return Check(SKIP, "OpenDP: not needed (no sensitive dataset)")
    from importlib.metadata import version

    return Check(OK, f"OpenDP {version('opendp')} installed (DP releases of the sensitive "
                     "tier)")


def _training(config: NodeConfig) -> list[Check]:
    """[training]: the SuperNode key, the SuperLink's CA and the SuperLink itself (TLS
    handshake), and whether the installed training code is the released one."""
    t = config.training
    if t is None:
        return [Check(SKIP, "training: no [training] section (this node serves SQL only)")]
    out = [_supernode_key(t.auth_key)]
    cas, problem = _load_certs(t.root_certificates, "training root_certificates")
    if problem:
        out.append(Check(FAIL, f"training: {problem}"))
    else:
        now = dt.datetime.now(dt.UTC)
        out += [_validity(c, f"training root_certificates {_cn(c)}", now) for c in cas]
        out.append(_superlink(t.superlink, t.root_certificates))
    out.append(_fab())
    return out


def _supernode_key(path: Path) -> Check:
    if not path.is_file():
        return Check(FAIL, f"training: SuperNode key not found: {path} (bulle node keygen "
                           "makes one; its .pub goes in the coordinator's node_keys)")
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        return Check(FAIL, f"training: SuperNode key {path} is readable by others "
                           f"(mode {stat.S_IMODE(path.stat().st_mode):o}); chmod 600 it")
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, TypeError):
        return Check(FAIL, f"training: SuperNode key {path} is not an OpenSSH private key")
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp384r1":
        return Check(FAIL, f"training: SuperNode key {path} is not EC P-384 (the SuperLink "
                           "accepts only those)")
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return Check(OK, f"training: SuperNode key EC P-384 (public key sha256 "
                     f"{hashlib.sha256(public).hexdigest()[:16]}: the coordinator's "
                     "node_keys must hold this one)")


def _superlink(address: str, ca: Path) -> Check:
    try:
        host, port = _split_listen(address)
    except ValueError:
        return Check(FAIL, f"training: superlink {address!r} is not host:port")
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with socket.create_connection((host, port), timeout=3) as raw, \
                context.wrap_socket(raw, server_hostname=host):
            pass
    except ssl.SSLCertVerificationError as e:
        return Check(FAIL, f"training: the SuperLink at {address} answers, but its certificate "
                           f"does not verify against root_certificates ({e.verify_message})")
    except OSError as e:
        return Check(FAIL, f"training: cannot reach the SuperLink at {address} ({e}); check "
                           "the address and the firewall")
    return Check(OK, f"training: SuperLink {address} reachable, its TLS certificate verifies")


def _fab() -> Check:
    try:
        from bulle_flower import fab_sha256, released_sha256

        installed, released = fab_sha256(), released_sha256()
    except (ImportError, OSError) as e:
        return Check(FAIL, f"training: cannot build the training app's FAB ({e})")
    if installed != released:
        return Check(FAIL, f"training: the installed training code (FAB sha256 "
                           f"{installed[:16]}…) is not the released one ({released[:16]}…): "
                           "runs from the coordinator would be refused; reinstall Bulle")
    return Check(OK, f"training: installed training code is the released FAB "
                     f"(sha256 {installed[:16]}…)")


def _writable(name: str, path: Path | None) -> Check:
    if path is None:
        return Check(SKIP, f"{name}: not set")
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return Check(FAIL, f"{name} {path}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        return Check(FAIL, f"{name} {path}: not writable by this user ({probe})")
    verb = "writable" if probe == path else f"will be created under {probe}"
    return Check(OK, f"{name} {path}: {verb}")


def _port(config: NodeConfig) -> Check:
    try:
        host, port = _split_listen(config.listen)
    except ValueError:
        return Check(FAIL, f"listen {config.listen!r} is not host:port")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host or "0.0.0.0", port))
            return Check(OK, f"listen address {config.listen} is free")
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                return Check(FAIL, f"cannot listen on {config.listen}: {host} is not an "
                                   "address of this machine")
            if e.errno == errno.EACCES:
                return Check(FAIL, f"cannot listen on {config.listen}: ports below 1024 "
                                   "need privileges; use a higher port")
            if e.errno != errno.EADDRINUSE:
                return Check(FAIL, f"cannot listen on {config.listen}: {e.strerror}")
    probe_host = "127.0.0.1" if host in _WILDCARD_HOSTS else host
    presented = _presented_cert(probe_host, port)
    mine = config.tls.cert.read_bytes() if config.tls and config.tls.cert.is_file() else b""
    if presented and mine and _der_in_pem(presented, mine):
        return Check(OK, f"listen address {config.listen}: this node is already answering "
                         "(it presents the configured certificate)")
    return Check(FAIL, f"listen address {config.listen} is taken by another program: stop "
                       "it or choose another port")


def _presented_cert(host: str, port: int) -> bytes | None:
    """The certificate a TLS server on host:port presents, without client auth (TLS 1.3
    lets the client finish its side before the server asks for a client certificate)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # we only compare bytes with the configured cert
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=3) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            return tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None


def _der_in_pem(der: bytes, pem: bytes) -> bool:
    try:
        return any(c.public_bytes(serialization.Encoding.DER) == der
                   for c in x509.load_pem_x509_certificates(pem))
    except ValueError:
        return False
