"""A node's audit entries as the board browses them (``board/audit?node=NAME``).

The node sends a page of its chain as stored (``ListAudit``); the coordinator shows it only
once its links hold: consecutive sequence numbers, each entry's ``prev_hash`` the hash of
the one before (the genesis hash for entry 1), each whole entry's hash recomputed from its
fields, the head the coordinator recorded earlier (``node_chains``) found unchanged when the
page covers it, and the node's head when the page reaches it. An entry with a withheld field
(a failure's cause, which may quote data, stays at the node) cannot be rehashed here: the
next entry's link still covers it. The entries carry what the node's audit records: request
ids, plan and query hashes, datasets, ε, outcomes, incident ids; nothing about one person.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from federation._nodes import describe_rpc_error
from federation.proto import bulle_pb2 as pb
from privacy import AUDIT_GENESIS, AuditEntry, audit_entry_hash

if TYPE_CHECKING:
    from federation._coordinator import Coordinator

PAGE_SIZE = 50
WITHHOLDABLE = frozenset({"cause"})  # what a node may keep back (nodes/_service.py)


class ChainRefused(ValueError):
    """A page whose links do not hold (the message names sequence numbers only)."""


@dataclass(frozen=True)
class NodeAuditEntry(AuditEntry):
    """A node's audit entry as a page brings it: what it kept back is named in ``withheld``."""

    withheld: tuple[str, ...] = ()


def _entry(r: pb.AuditRecord) -> NodeAuditEntry:
    try:
        detail = json.loads(r.detail_json)
    except ValueError:
        raise ChainRefused(f"entry {r.seq}: its detail is not JSON") from None
    if not isinstance(detail, dict):
        raise ChainRefused(f"entry {r.seq}: its detail is not an object")
    if not set(r.withheld) <= WITHHOLDABLE or set(r.withheld) & set(detail):
        raise ChainRefused(f"entry {r.seq}: withholds what a node may not")
    return NodeAuditEntry(r.seq, r.time, r.actor, r.project, r.action, detail, r.prev_hash,
                     r.hash, tuple(r.withheld))


def verify_page(page: pb.AuditPage, after: int,
                checkpoint: tuple[int, str] | None = None) -> list[NodeAuditEntry]:
    """The entries of ``page`` (those after ``after``), oldest first, once their links hold;
    :class:`ChainRefused` otherwise."""
    out: list[NodeAuditEntry] = []
    prev = AUDIT_GENESIS if after == 0 else None
    for r in page.entries:
        expected = after + len(out) + 1
        if r.seq != expected:
            raise ChainRefused(f"entry {expected} is missing (the page has {r.seq})")
        e = _entry(r)
        if not e.withheld and e.hash != audit_entry_hash(e.seq, e.time, e.actor, e.project,
                                                         e.action, e.detail, e.prev_hash):
            raise ChainRefused(f"entry {e.seq} does not match its hash")
        if prev is not None and e.prev_hash != prev:
            raise ChainRefused(f"entry {e.seq} does not link to entry {e.seq - 1}")
        if checkpoint is not None and checkpoint[0] == e.seq and checkpoint[1] != e.hash:
            raise ChainRefused(f"entry {e.seq} differs from the head the coordinator saw")
        if e.seq > page.head_seq or (e.seq == page.head_seq and e.hash != page.head_hash):
            raise ChainRefused(f"entry {e.seq} does not agree with the node's head")
        prev = e.hash
        out.append(e)
    return out


def node_audit_page(coordinator: Coordinator, node: str, before: int | None) -> dict[str, Any]:
    """Up to PAGE_SIZE entries before seq ``before`` (the newest without it), newest first,
    verified; or ``error`` (unreachable, refused page) and no entries."""
    client = coordinator.clients.get(node)
    out: dict[str, Any] = {"node": node, "entries": [], "error": None, "head_seq": None,
                           "older": None, "newer": None}
    if client is None:
        out["error"] = "not a node of this federation"
        return out
    timeout = min(coordinator.config.node_timeout_s, 10.0)
    after = 0 if before is None else max(before - 1 - PAGE_SIZE, 0)
    limit = PAGE_SIZE if before is None else before - 1 - after
    try:
        page = (client.list_audit(0, PAGE_SIZE, True, timeout) if before is None else
                client.list_audit(after, limit, False, timeout) if limit > 0 else None)
    except grpc.RpcError as e:
        out["error"] = describe_rpc_error(node, e, timeout)
        return out
    if page is None:
        return out
    if before is None:
        after = max(page.head_seq - PAGE_SIZE, 0)
    try:
        entries = verify_page(page, after, coordinator.seen_chain_head(node))
    except ChainRefused as e:
        out["error"] = f"page refused: {e}"
        return out
    out["head_seq"] = page.head_seq
    if entries:
        first, last = entries[0].seq, entries[-1].seq
        out["older"] = first if first > 1 else None
        newer = last + PAGE_SIZE + 1
        out["newer"] = None if last >= page.head_seq else (newer if newer <= page.head_seq
                                                            else 0)
    out["entries"] = entries[::-1]
    return out
