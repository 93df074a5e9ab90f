"""The coordinator's side of release receipts (privacy/_receipts.py has the format and the
privacy argument): it checks every node's signed statement against the partial it merges,
signs the release, keeps the receipt for the board and publishes the public keys.

- Its key: ``receipt_ed25519.pem`` (0600) in the coordinator's state folder, made on first
  use; one key per purpose (run authorisations have their own).
- Node keys: each node publishes its receipt key in its catalogue; the first key seen for a
  node is kept (pinned for this process) and a different one later is refused.
- Key history (``receipt_keys.json`` in the state folder): every key this coordinator
  or a node ever signed with stays published in ``/v1/keys``. A key replaced (a node's new
  key seen at a later start, or the coordinator's key file renewed) is marked ``retired`` at
  that time, so a receipt signed before still verifies and a statement dated after is refused.
- Receipts are kept as ``receipts/<query id>.json`` in the state folder (board lookup by
  id, or by the receipt's sha256).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from federation._errors import QueryError
from federation.proto import bulle_pb2 as pb
from privacy import (
    RECEIPT_KEY_FILE,
    ReceiptError,
    grant_id,
    open_partial_statement,
    public_key_entry,
    receipt_commitment,
    receipt_keys,
    sign_release,
)

_ID = re.compile(r"^[0-9a-f]{32}$|^[0-9a-f]{64}$")


def plan_sha256(plan: pb.Plan) -> str:
    """sha256 of the plan's deterministic protobuf encoding (as the nodes compute it)."""
    return hashlib.sha256(plan.SerializeToString(deterministic=True)).hexdigest()


class Receipts:
    def __init__(self, state: Path) -> None:
        self._private, public = receipt_keys(state / RECEIPT_KEY_FILE)
        self._key = self._private.read_bytes()
        self.public_pem = public.read_text(encoding="ascii")
        self.folder = state / "receipts"
        self.folder.mkdir(mode=0o700, exist_ok=True)
        self._node_keys: dict[str, str] = {}
        self._lock = threading.Lock()
        self._history = KeyHistory(state / "receipt_keys.json")
        self._history.record("coordinator", "coordinator", self.public_pem)

    def learn(self, catalogs: Mapping[str, pb.Catalog]) -> None:
        """Take up the nodes' published receipt keys (first seen is pinned)."""
        with self._lock:
            for nid, cat in catalogs.items():
                if cat.receipt_public_key and nid not in self._node_keys:
                    self._node_keys[nid] = cat.receipt_public_key
                    self._history.record(nid, "node", cat.receipt_public_key)

    def keys(self) -> dict[str, Any]:
        """What ``/v1/keys`` publishes: every public key a receipt may be or was signed
        with (the current ones, then the retired ones with the time they were replaced)."""
        with self._lock:
            return {"keys": self._history.published()}

    def issue(self, query_id: str, project: str, query_sha256: str, plan: pb.Plan, tier: str,
              epsilon: float, result: Mapping[str, Any],
              partials: list[pb.PartialResult]) -> dict[str, Any]:
        """Check each node's statement against its partial, then sign and keep the receipt.
        A statement that does not match what was merged fails the query (no receipt that
        would vouch for something else)."""
        digest = plan_sha256(plan)
        statements = [self._checked(p, digest) for p in partials if p.receipt_statement
                      or not _streamed(plan)]
        receipt = sign_release(
            self._key, query=query_id, query_sha256=query_sha256, plan_sha256=digest,
            grant=grant_id(plan.privacy.grant) if plan.privacy.grant else "",
            project=project, tier=tier, epsilon=epsilon, result=result,
            node_statements=statements)
        path = self.folder / f"{query_id}.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(receipt))  # json.dump to a file skips the C encoder
        return receipt

    def _checked(self, part: pb.PartialResult, digest: str) -> str:
        token = part.receipt_statement
        with self._lock:
            pem = self._node_keys.get(part.node_id)
        try:
            if pem is None:
                raise ReceiptError("unknown_key", "no published receipt key")
            stmt = open_partial_statement(token, pem)
        except ReceiptError as e:
            raise _bad(part.node_id, e.reason) from None
        if stmt.get("node") != part.node_id or stmt.get("plan_sha256") != digest:
            raise _bad(part.node_id, "statement about another node or plan")
        if stmt.get("commitment") != receipt_commitment(part.receipt_salt, part.arrow_ipc):
            raise _bad(part.node_id, "statement does not commit to the partial it sent")
        return token

    def find(self, key: str) -> dict[str, Any] | None:
        """A kept receipt by query id or by its sha256; None if there is none."""
        if not _ID.match(key):
            return None
        path = self.folder / f"{key}.json"
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
        if len(key) == 64:  # by hash: a scan (kept receipts are few per day)
            for p in self.folder.glob("*.json"):
                receipt = json.loads(p.read_text(encoding="utf-8"))
                if receipt.get("sha256") == key:
                    return receipt
        return None


class KeyHistory:
    """Every receipt key seen, by owner, kept in a JSON file (0600, replaced atomically).
    Callers hold the Receipts lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: list[dict[str, str]] = (
            json.loads(path.read_text(encoding="utf-8")) if path.is_file() else [])

    def record(self, owner: str, role: str, pem: str) -> None:
        """``pem`` is ``owner``'s current key: add it if new, retire the one it replaces."""
        new = public_key_entry(owner, role, pem)
        kid = new["kid"]
        now = datetime.now(UTC).isoformat(timespec="seconds")
        changed = False
        for entry in self._entries:
            if entry["owner"] != owner or "retired" in entry:
                continue
            if entry["kid"] == kid:
                return
            entry["retired"] = now
            changed = True
        if not any(e["owner"] == owner and e["kid"] == kid for e in self._entries):
            self._entries.append({**new, "since": now})
            changed = True
        if changed:
            self._save()

    def published(self) -> list[dict[str, str]]:
        current = [e for e in self._entries if "retired" not in e]
        retired = [e for e in self._entries if "retired" in e]
        order = sorted(current, key=lambda e: (e["role"] != "coordinator", e["owner"]))
        return [dict(e) for e in order + retired]

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self._entries, f, indent=1)
        os.replace(tmp, self.path)


def _streamed(plan: pb.Plan) -> bool:
    """Row plans (open tables) are streamed: their nodes sign no statement."""
    return plan.HasField("rows")


def _bad(node: str, why: str) -> QueryError:
    return QueryError("node_failed", f"query not answered: node {node}'s receipt statement "
                      f"is invalid ({why})", status=502)

