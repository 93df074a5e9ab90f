"""The node's receipt key and its signed statements over the partials it releases.

The key (Ed25519, ``receipt_ed25519.pem``, 0600 in the node's state folder, its public half
next to it) is made at the first start and never leaves the node; the public half is
published in the node's catalogue (``Catalog.receipt_public_key``) and the coordinator's
``/v1/keys``. What is signed, and why a commitment and not a hash of the partial: see
privacy/_receipts.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from federation.proto import bulle_pb2 as pb
from privacy import (
    RECEIPT_KEY_FILE,
    grant_id,
    new_salt,
    receipt_commitment,
    receipt_keys,
    sign_partial,
)


def plan_sha256(plan: pb.Plan) -> str:
    """sha256 of the plan's deterministic protobuf encoding (the coordinator's too)."""
    return hashlib.sha256(plan.SerializeToString(deterministic=True)).hexdigest()


class NodeReceipts:
    def __init__(self, node_id: str, state_dir: Path) -> None:
        self.node_id = node_id
        self.private_path, public_path = receipt_keys(state_dir / RECEIPT_KEY_FILE)
        self.public_pem = public_path.read_text(encoding="ascii")
        self._key = self.private_path.read_bytes()

    def sign(self, plan: pb.Plan, result: pb.PartialResult) -> pb.PartialResult:
        """A copy of ``result`` carrying this node's statement and the commitment's salt
        (a fresh salt per answer: a replayed release gets a new, unlinkable commitment)."""
        out = pb.PartialResult()
        out.CopyFrom(result)
        salt = new_salt()
        out.receipt_salt = salt
        out.receipt_statement = sign_partial(
            self._key, node=self.node_id, request=plan.request_id,
            query_sha256=plan.query_sha256, plan_sha256=plan_sha256(plan),
            grant=grant_id(plan.privacy.grant) if plan.privacy.grant else "",
            epsilon=result.epsilon_spent, delta=result.delta_spent, tier=result.tier,
            commitment=receipt_commitment(salt, result.arrow_ipc))
        return out
