"""``bulle node keygen``: a node's keys, made on the node (they never leave it).

- ``<id>.key`` (0600) and ``<id>.csr``: the TLS key and its certificate signing request
  (CN the node id, subjectAltName the hosts the coordinator dials). An admin signs the CSR
  with ``bulle certs sign`` (or the federation's PKI) and returns ``<id>.pem``.
- ``<id>-supernode.key`` (0600) and ``.pub``: the SuperNode key for DP training (EC
  P-384, OpenSSH); the public half goes in the coordinator's ``[training] node_keys``.
- With ``state``: the receipt key (Ed25519, ``receipt_ed25519.pem`` 0600, in the node's
  state folder, where ``bulle node serve`` uses it), so its public half can be published or
  pinned before the node first serves (otherwise it is made at the first start).
Existing keys are kept: running it again only writes a fresh CSR for the same key.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nodes._flower import make_flower_key
from privacy import RECEIPT_KEY_FILE, receipt_keys


def make_node_keys(node_id: str, hosts: list[str], out: Path,
                   state: Path | None = None) -> dict[str, Path]:
    """The node's TLS key, CSR and SuperNode key pair in ``out`` (and its receipt key pair
    in ``state`` if given); returns their paths."""
    if not hosts:
        raise ValueError("name at least one host (--host): the coordinator checks it")
    out.mkdir(parents=True, exist_ok=True)
    key_path, csr_path = out / f"{node_id}.key", out / f"{node_id}.csr"
    if key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bulle"),
                                    x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
           .add_extension(x509.SubjectAlternativeName(names), critical=False)
           .sign(key, hashes.SHA256()))  # type: ignore[arg-type]
    csr_path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    supernode = out / f"{node_id}-supernode.key"
    made = {"key": key_path, "csr": csr_path, "supernode_key": supernode,
            "supernode_public_key": make_flower_key(supernode)}
    if state is not None:
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        made["receipt_key"], made["receipt_public_key"] = receipt_keys(state / RECEIPT_KEY_FILE)
    return made
