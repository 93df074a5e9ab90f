"""The coordinator's side of release receipts (privacy/_receipts.py has the format and the
privacy argument): it checks every node's signed statement against the partial it merges,
signs the release, keeps the receipt for the board and publishes the public keys.

- Its key: ``receipt_ed25519.pem`` (0600) in the coordinator's state folder, made on first
  use; one key per purpose (run authorisations have their own).
- Node keys: each node publishes its receipt key in its catalogue; the first key seen for a
  node is kept (pinned for this process) and a different one later is refused.
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

    def learn(self, catalogs: Mapping[str, pb.Catalog]) -> None:
        """Take up the nodes' published receipt keys (first seen is pinned)."""
        with self._lock:
            for nid, cat in catalogs.items():
                if cat.receipt_public_key:
                    self._node_keys.setdefault(nid, cat.receipt_public_key)

    def keys(self) -> dict[str, Any]:
        """What ``/v1/keys`` publishes: every public key a receipt may be signed with."""
        with self._lock:
            nodes = dict(self._node_keys)
        return {"keys": [public_key_entry("coordinator", "coordinator", self.public_pem),
                         *(public_key_entry(n, "node", pem) for n, pem in sorted(nodes.items()))]}

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
            json.dump(receipt, f)
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


def _streamed(plan: pb.Plan) -> bool:
    """Row plans (open tables) are streamed: their nodes sign no statement."""
    return plan.HasField("rows")


def _bad(node: str, why: str) -> QueryError:
    return QueryError("node_failed", f"query not answered: node {node}'s receipt statement "
                      f"is invalid ({why})", status=502)

