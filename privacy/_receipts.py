"""Signed release receipts: anyone holding the published public keys can check, offline,
that a released table is one the platform released, for this query, plan, grant and ε.

A receipt (JSON) is ``{"typ": "bulle-receipt", "v": 1, "id", "statement", "summary",
"released", "query"?}``:
- ``statement``: the coordinator's token (``sign_payload``, Ed25519, canonical JSON) over
  ``{typ: "bulle-release", kid, query (id), query_sha256, plan_sha256, grant, project,
  tier, epsilon (charged to the project), values_sha256, nodes: [node tokens], issued}``;
- each node token, signed by that node's own receipt key, over its partial:
  ``{typ: "bulle-partial", kid, node, request, query_sha256, plan_sha256, grant, epsilon,
  delta (charged at that node), tier, commitment, issued}``;
- ``released``: the released values themselves (already disclosure-controlled), and
  ``values_sha256`` is :func:`values_sha256` of them: sha256 of their **canonical JSON**
  (sorted keys, no spaces, UTF-8, floats in Python's shortest round-trip form, NaN as
  null) of ``{columns: [[name, type]...], rows, suppressed, noise_sd, ci_low, ci_high}`` as
  the API returns them. JSON, not Arrow IPC: a notebook or a third party recomputes it from
  the JSON it holds, without the coordinator's Arrow types; ``summary`` repeats the signed
  fields for reading and must equal them.

Privacy: what a node signs over its partial. The partial is a per-node table the release
does not show (the researcher sees the merge). A plain hash of it is a deterministic
function of that table: before noise it is a function of raw rows, and anyone can confirm a
guess ("is pupil X in this small cell?": hash the candidate partial, compare). Even after
the node's own disclosure control the values are low-entropy (perturbed integer counts;
exact ones on a test node) and a public hash would let anyone enumerate each node's own
table, a finer tabulation than the one released. So a node signs a hiding commitment
``sha256(salt || sha256(partial Arrow IPC))`` with a fresh 256-bit random salt sent only to
the coordinator, next to the partial it already receives, and never put in a receipt. The
coordinator checks each commitment against the partial it merges (a node's statement must
be about what was merged), and whoever holds a partial and its salt can open it for an
audit; without them the commitment reveals nothing. A receipt therefore holds only hashes,
ids, ε and the released (disclosure-controlled) values: nothing about one person.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

from privacy._grants import (
    GrantError,
    PrivateKeyLike,
    _b64d,
    _iso,
    generate_signing_keys,
    key_id,
    load_private_key,
    load_public_key,
    open_payload,
    sign_payload,
)

RECEIPT_TYPE, RELEASE_TYPE, PARTIAL_TYPE, VERSION = (
    "bulle-receipt", "bulle-release", "bulle-partial", 1)
RECEIPT_KEY_FILE = "receipt_ed25519.pem"
_RELEASED_KEYS = ("columns", "rows", "suppressed", "noise_sd", "ci_low", "ci_high")
_SHARED = ("query_sha256", "plan_sha256", "grant")  # a node's statement repeats these


class ReceiptError(ValueError):
    """A receipt that does not verify; ``code`` is stable, ``reason`` says what failed."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code, self.reason = code, reason


# ------------------------------------------------------------------------------ hashes

def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def values_sha256(released: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the released values (module docstring)."""
    data: dict[str, Any] = {}
    for k in _RELEASED_KEYS:
        if released.get(k) is not None:
            data[k] = _finite(released[k])
    if "columns" in data:  # the API gives [{name, type}]; the hash takes [name, type]
        data["columns"] = [[c["name"], c["type"]] if isinstance(c, Mapping) else list(c)
                           for c in data["columns"]]
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def released_values(result: Mapping[str, Any]) -> dict[str, Any]:
    """The released values of a query result (the API's JSON): what ``values_sha256``
    covers and what a receipt carries."""
    return {k: result[k] for k in _RELEASED_KEYS if result.get(k) is not None}


def commitment(salt: bytes, partial: bytes) -> str:
    """The hiding commitment a node signs: sha256(salt || sha256(partial))."""
    return hashlib.sha256(salt + hashlib.sha256(partial).digest()).hexdigest()


def new_salt() -> bytes:
    return os.urandom(32)


def receipt_keys(private_path: Path) -> tuple[Path, Path]:
    """A receipt signing key pair: ``private_path`` (0600, made on first use) and its public
    half (``….pub.pem``, 0644); returns both paths."""
    public_path = private_path.with_name(private_path.name.removesuffix(".pem") + ".pub.pem")
    if not private_path.exists():
        generate_signing_keys(private_path, public_path)
    elif not public_path.exists():
        from cryptography.hazmat.primitives import serialization

        pem = load_private_key(private_path).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        fd = os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
    return private_path, public_path


def public_key_entry(owner: str, role: str, key: PrivateKeyLike | bytes | str) -> dict[str, str]:
    """``{kid, owner, role, pem}`` of a public key, as ``/v1/keys`` publishes it."""
    from cryptography.hazmat.primitives import serialization

    if isinstance(key, str):
        key = key.encode()
    try:
        pub = load_public_key(key)  # type: ignore[arg-type]
    except ValueError:
        pub = load_private_key(key).public_key()
    pem = pub.public_bytes(serialization.Encoding.PEM,
                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return {"kid": key_id(pub), "owner": owner, "role": role, "pem": pem}


# ----------------------------------------------------------------------------- signing

def sign_partial(private_key: PrivateKeyLike, *, node: str, request: str, query_sha256: str,
                 plan_sha256: str, grant: str, epsilon: float, delta: float, tier: str,
                 commitment: str, issued: datetime | None = None) -> str:
    """A node's signed statement over one partial it released (module docstring)."""
    key = load_private_key(private_key)
    return sign_payload({
        "typ": PARTIAL_TYPE, "v": VERSION, "kid": key_id(key.public_key()), "node": node,
        "request": request, "query_sha256": query_sha256, "plan_sha256": plan_sha256,
        "grant": grant, "epsilon": float(epsilon), "delta": float(delta), "tier": tier,
        "commitment": commitment, "issued": _iso(issued or datetime.now(UTC))}, key)


def sign_release(private_key: PrivateKeyLike, *, query: str, query_sha256: str,
                 plan_sha256: str, grant: str, project: str, tier: str, epsilon: float,
                 result: Mapping[str, Any], node_statements: Iterable[str],
                 issued: datetime | None = None) -> dict[str, Any]:
    """The coordinator's receipt for a released ``result`` (the API's JSON)."""
    key = load_private_key(private_key)
    released = released_values(result)
    payload = {
        "typ": RELEASE_TYPE, "v": VERSION, "kid": key_id(key.public_key()), "query": query,
        "query_sha256": query_sha256, "plan_sha256": plan_sha256, "grant": grant,
        "project": project, "tier": tier, "epsilon": float(epsilon),
        "values_sha256": values_sha256(released), "nodes": sorted(node_statements),
        "issued": _iso(issued or datetime.now(UTC))}
    token = sign_payload(payload, key)
    return {"typ": RECEIPT_TYPE, "v": VERSION, "id": query,
            "sha256": hashlib.sha256(token.encode()).hexdigest(), "statement": token,
            "summary": _summary(payload), "released": released}


def _summary(payload: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in payload.items() if k not in ("typ", "v", "nodes")}


def peek(token: str) -> dict[str, Any]:
    """The payload of a signed token, NOT verified (to find its key id or node)."""
    try:
        data = json.loads(_b64d(token.split(".")[0], "payload").decode("utf-8"))
    except (GrantError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        raise ReceiptError("malformed", "a statement is not a signed token") from None
    if not isinstance(data, dict):
        raise ReceiptError("malformed", "a statement is not a JSON object")
    return data


# ---------------------------------------------------------------------------- checking

def _key_table(keys: Any) -> dict[str, dict[str, Any]]:
    """kid → {owner, role, key, retired} from ``/v1/keys``'s JSON, a list of its entries, a
    mapping owner → PEM, or a list of PEMs. ``retired``: when the key was replaced (None if
    it is current)."""
    if isinstance(keys, Mapping) and "keys" in keys:
        keys = keys["keys"]
    entries: list[tuple[str | None, str | None, Any, str | None]] = []
    if isinstance(keys, Mapping):
        entries = [(str(o), None, k, None) for o, k in keys.items()]
    else:
        for k in keys or ():
            if isinstance(k, Mapping):
                entries.append((k.get("owner"), k.get("role"), k["pem"], k.get("retired")))
            else:
                entries.append((None, None, k, None))
    out: dict[str, dict[str, Any]] = {}
    for owner, role, k, retired in entries:
        pub = load_public_key(k.encode() if isinstance(k, str) else k)
        out[key_id(pub)] = {"owner": owner, "role": role, "key": pub,
                            "retired": _when(retired) if retired else None}
    return out


def _when(iso: Any) -> datetime:
    try:
        when = datetime.fromisoformat(str(iso))
    except ValueError:
        raise ReceiptError("malformed", f"not a time: {iso!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _open(token: str, table: Mapping[str, Mapping[str, Any]], what: str,
          role: str) -> dict[str, Any]:
    kid = peek(token).get("kid")
    entry = table.get(kid) if isinstance(kid, str) else None
    if entry is None:
        raise ReceiptError("unknown_key", f"{what} is signed by key {kid!r}, which is not "
                           "among the published keys given")
    if entry["role"] not in (None, role):
        raise ReceiptError("wrong_key", f"{what} is signed by a {entry['role']} key, "
                           f"not a {role} key")
    try:
        signed = open_payload(token, entry["key"], what)
    except GrantError as e:
        raise ReceiptError(e.code if e.code != "malformed" else "malformed",
                           f"{what}: {e}") from None
    if entry["retired"] is not None and _when(signed.get("issued")) > entry["retired"]:
        raise ReceiptError("retired_key", f"{what} is dated after its key was retired "
                           f"({entry['retired'].isoformat()})")
    return signed


def open_partial_statement(token: str, public_key: bytes | str) -> dict[str, Any]:
    """A node's statement opened with that node's key (the coordinator's check)."""
    key = public_key.encode() if isinstance(public_key, str) else public_key
    return _open(token, _one_key_table(key), "node statement", "node")


@lru_cache(maxsize=256)
def _one_key_table(pem: bytes) -> Mapping[str, Mapping[str, Any]]:
    """A node's key table, kept: the coordinator opens one statement per node and query."""
    return MappingProxyType(_key_table([pem]))


def verify_receipt(receipt: Mapping[str, Any] | str | os.PathLike[str], keys: Any,
                   ) -> dict[str, Any]:
    """Check a receipt offline against published public keys (``/v1/keys``'s JSON, or a
    mapping owner → PEM); returns the signed statement, with its nodes' statements opened.
    Raises :class:`ReceiptError` with a reason: a changed released value, ε, query text or
    hash, node statement, or a key not among ``keys``."""
    if not isinstance(receipt, Mapping):
        receipt = json.loads(Path(receipt).read_text(encoding="utf-8"))
    if receipt.get("typ") != RECEIPT_TYPE or receipt.get("v") != VERSION:
        raise ReceiptError("malformed", "not a Bulle receipt of a supported version")
    table = _key_table(keys)
    token = receipt.get("statement")
    if not isinstance(token, str):
        raise ReceiptError("malformed", "the receipt has no coordinator statement")
    signed = _open(token, table, "the coordinator's statement", "coordinator")
    if signed.get("typ") != RELEASE_TYPE:
        raise ReceiptError("malformed", "the coordinator's statement is not a release")
    _check_unsigned(receipt, signed, token)
    signed["nodes"] = [_check_node(t, signed, table) for t in signed.get("nodes", [])]
    return signed


def _check_unsigned(receipt: Mapping[str, Any], signed: Mapping[str, Any], token: str) -> None:
    """What the receipt carries outside the signature must agree with it."""
    released = receipt.get("released")
    if not isinstance(released, Mapping):
        raise ReceiptError("malformed", "the receipt carries no released values")
    if not hmac.compare_digest(values_sha256(released), str(signed.get("values_sha256"))):
        raise ReceiptError("values_changed", "the released values differ from the signed "
                           "ones (values_sha256 does not match)")
    query = receipt.get("query")
    if query is not None and hashlib.sha256(str(query).encode()).hexdigest() \
            != signed.get("query_sha256"):
        raise ReceiptError("query_changed", "the query text does not hash to the signed "
                           "query_sha256")
    for k, v in (receipt.get("summary") or {}).items():
        if signed.get(k) != v:
            raise ReceiptError("summary_changed", f"summary field {k!r} differs from the "
                               "signed statement")
    digest = receipt.get("sha256")
    if digest is not None and digest != hashlib.sha256(token.encode()).hexdigest():
        raise ReceiptError("malformed", "the receipt's sha256 is not its statement's")


def _check_node(token: str, signed: Mapping[str, Any],
                table: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    node = peek(token).get("node")
    stmt = _open(token, table, f"node {node!r}'s statement", "node")
    if stmt.get("typ") != PARTIAL_TYPE:
        raise ReceiptError("malformed", f"node {node!r}'s statement is not a partial")
    owner = table[stmt["kid"]]["owner"]
    if owner is not None and owner != stmt.get("node"):
        raise ReceiptError("wrong_key", f"node {stmt.get('node')!r}'s statement is signed "
                           f"by {owner!r}'s key")
    for k in _SHARED:
        if stmt.get(k) != signed.get(k):
            raise ReceiptError("node_mismatch", f"node {stmt.get('node')!r} signed another "
                               f"{k} than the coordinator")
    if stmt.get("request") != signed.get("query"):
        raise ReceiptError("node_mismatch", f"node {stmt.get('node')!r} signed another "
                           "request")
    return stmt
