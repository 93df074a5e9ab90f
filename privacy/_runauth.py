"""Run authorisations: the coordinator's signed permission for one DP training run.

When the coordinator starts a training run it signs, with its own Ed25519 key (the same
token format as the board's grants, ``_grants.sign_payload``):
``{run, project, grant, spec_sha256, nodes: {node: ε target}, expires, issued}``.
Every training message a node acts on carries the token; the node verifies it before it
touches data (signature, validity window, that it is listed, that the message's spec has
this hash, that the spec's project and grant are these) and derives its ledger request ids
from ``run``, so a replayed message is the same request, never a second charge.

``grant`` is ``grant_id(token)`` of the board-signed grant the run spends; ``spec_sha256``
is ``canonical_sha256`` of the spec the nodes receive (canonical JSON, as the tokens).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from privacy._grants import (
    GrantError,
    PrivateKeyLike,
    PublicKeyLike,
    _canonical,
    _iso,
    _parse_time,
    check_window,
    generate_signing_keys,
    key_id,
    load_private_key,
    open_payload,
    sign_payload,
)

TYPE = "bulle-run"
VERSION = 1
COORDINATOR_KEY_FILE = "coordinator_ed25519.pem"
_FIELDS = {"typ", "v", "kid", "run", "project", "grant", "spec_sha256", "nodes", "expires",
           "issued"}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_RUN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class RunAuthorisation:
    """What the coordinator allows for one training run (see the module docstring)."""

    run: str  # the coordinator's run id: the nodes' request ids are ``<run>:<round>:<node>``
    project: str
    grant: str  # grant_id() of the board-signed grant
    spec_sha256: str  # canonical_sha256() of the spec the nodes receive
    nodes: tuple[tuple[str, float], ...]  # (node id, ε target of the run at that node)
    expires: datetime
    issued: datetime

    def __post_init__(self) -> None:
        if not isinstance(self.run, str) or not _RUN.match(self.run):
            raise ValueError("run must be 1-64 letters, digits, '-' or '_'")
        if not isinstance(self.project, str) or not self.project:
            raise ValueError("project must be a non-empty string")
        for name in ("grant", "spec_sha256"):
            if not isinstance(getattr(self, name), str) or not _HEX64.match(getattr(self, name)):
                raise ValueError(f"{name} must be 64 lowercase hex digits")
        if not self.nodes or len({n for n, _ in self.nodes}) != len(self.nodes):
            raise ValueError("nodes must name at least one node, each once")
        for node, eps in self.nodes:
            if not isinstance(node, str) or not node:
                raise ValueError("node ids must be non-empty strings")
            if isinstance(eps, bool) or not isinstance(eps, (int, float)) \
                    or not 0 < eps < math.inf:
                raise ValueError(f"ε target of {node!r} must be positive and finite")
        check_window(self.issued, self.expires)

    def epsilon_for(self, node: str) -> float | None:
        """The run's ε target at ``node``; None if the node is not part of the run."""
        return next((float(e) for n, e in self.nodes if n == node), None)


def canonical_sha256(data: Any) -> str:
    """sha256 (hex) of the canonical JSON of ``data`` (sorted keys, no spaces, UTF-8)."""
    return hashlib.sha256(_canonical(data)).hexdigest()


def grant_id(grant_token: str) -> str:
    """The id of a board-signed grant token: sha256 (hex) of the token."""
    return hashlib.sha256(grant_token.encode("utf-8")).hexdigest()


def coordinator_keys(private_path: Path) -> tuple[Path, Path]:
    """The coordinator's signing key pair: ``private_path`` (0600) and the public key next
    to it (``….pub.pem``), created on first use; returns both paths."""
    public_path = private_path.with_name(private_path.name.removesuffix(".pem") + ".pub.pem")
    if not private_path.exists():
        generate_signing_keys(private_path, public_path)
    elif not public_path.exists():  # re-derive a lost public half
        from cryptography.hazmat.primitives import serialization

        pem = load_private_key(private_path).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        fd = os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
    return private_path, public_path


def sign_run_authorisation(auth: RunAuthorisation, private_key: PrivateKeyLike) -> str:
    key = load_private_key(private_key)
    return sign_payload({
        "typ": TYPE, "v": VERSION, "kid": key_id(key.public_key()), "run": auth.run,
        "project": auth.project, "grant": auth.grant, "spec_sha256": auth.spec_sha256,
        "nodes": {n: float(e) for n, e in auth.nodes}, "expires": _iso(auth.expires),
        "issued": _iso(auth.issued)}, key)


def verify_run_authorisation(token: str, public_key: PublicKeyLike,
                             now: datetime | None = None) -> RunAuthorisation:
    """The authorisation in ``token`` if it is well formed, signed by ``public_key`` and
    current; ``GrantError`` otherwise (codes: malformed, wrong_key, bad_signature, expired,
    not_yet_valid). A board grant is not a run authorisation (``typ``), whatever its key."""
    data = open_payload(token, public_key, "run authorisation")
    if data.get("typ") != TYPE or data.get("v") != VERSION:
        raise GrantError("malformed", "not a run authorisation of a supported version")
    if set(data) != _FIELDS:
        raise GrantError("malformed", f"fields must be {sorted(_FIELDS)}")
    try:
        if not isinstance(data["nodes"], dict):
            raise ValueError("nodes must be an object")
        auth = RunAuthorisation(
            run=data["run"], project=data["project"], grant=data["grant"],
            spec_sha256=data["spec_sha256"],
            nodes=tuple(sorted((str(n), e) for n, e in data["nodes"].items())),
            expires=_parse_time(data["expires"]), issued=_parse_time(data["issued"]))
    except (TypeError, ValueError) as exc:
        raise GrantError("malformed", f"invalid field: {exc}") from None
    t = now or datetime.now(UTC)
    if t >= auth.expires:
        raise GrantError("expired", f"run authorisation expired at {_iso(auth.expires)}")
    if t < auth.issued:
        raise GrantError("not_yet_valid", "run authorisation issued in the future")
    return auth


def spec_json(spec: dict[str, Any]) -> str:
    """The spec as the nodes receive it (canonical JSON: its hash is ``canonical_sha256``)."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)
