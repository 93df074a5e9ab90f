"""The coordinator's node registry: which nodes it routes queries to, in its database.

The ``[[node]]`` entries of ``coordinator.toml`` are the starting list; ``bulle coordinator
nodes add|remove`` change it in the database (table ``bulle_nodes``, migration
``deploy/migrations/versions/0003_node_registry.py``), each change in the coordinator's
hash-chained audit log. A running coordinator polls the registry's version and picks
changes up without a restart (``Coordinator._sync_nodes``): an added node is queried from
the next catalogue on, a removed one gets no plan any more.

The effective list: the config's nodes, then the registry's rows in order — an ``active``
row adds a node or moves it to a new address, a ``removed`` row takes it out (a config
node too, until it is added again).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Column, Integer, String, Table, func, select

from federation._config import NodeEndpoint
from federation._registry import _engine, metadata

nodes_table = Table(
    "bulle_nodes",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("address", String(300), nullable=False),
    Column("status", String(10), nullable=False),  # active | removed
    Column("changed_at", String(40), nullable=False),
    Column("changed_by", String(200), nullable=False),
    Column("version", Integer, nullable=False),  # the registry's version at this change
)

_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_ADDRESS = re.compile(r"^[A-Za-z0-9.\-]+:\d{1,5}$|^\[[0-9A-Fa-f:]+\]:\d{1,5}$")


class NodeRegistryError(ValueError):
    """A change the registry refuses (bad id or address, unknown node)."""


@dataclass(frozen=True)
class NodeEntry:
    id: str
    address: str
    status: str
    changed_at: str
    changed_by: str
    source: str  # "config" or "registry"


class NodeRegistry:
    """The registry in the coordinator's database (``url``: SQLAlchemy URL or file)."""

    def __init__(self, url: str, configured: tuple[NodeEndpoint, ...] = ()) -> None:
        if "://" not in url:
            url = f"sqlite:///{url}"
        self._engine = _engine(url)
        self._lock = threading.Lock()  # SQLite: one writer of ours at a time
        self.configured = configured
        with self._engine.begin() as conn:
            metadata.create_all(conn, tables=[nodes_table])

    def close(self) -> None:
        self._engine.dispose()

    def version(self) -> int:
        """Grows with every change: a running coordinator compares it to its own."""
        with self._engine.connect() as conn:
            return int(conn.execute(select(func.max(nodes_table.c.version))).scalar() or 0)

    def entries(self) -> list[NodeEntry]:
        """Every node the coordinator knows of, removed ones included, by id."""
        out = {n.id: NodeEntry(n.id, n.address, "active", "", "coordinator.toml", "config")
               for n in self.configured}
        with self._engine.connect() as conn:
            rows = conn.execute(select(nodes_table).order_by(nodes_table.c.version)).all()
        for r in rows:
            out[r.id] = NodeEntry(r.id, r.address, r.status, r.changed_at, r.changed_by,
                                  "registry")
        return [out[k] for k in sorted(out)]

    def active(self) -> tuple[NodeEndpoint, ...]:
        return tuple(NodeEndpoint(e.id, e.address) for e in self.entries()
                     if e.status == "active")

    def add(self, node_id: str, address: str, actor: str) -> NodeEntry:
        if not _ID.match(node_id):
            raise NodeRegistryError(f"node id {node_id!r}: 1-63 characters among a-z, 0-9, "
                                    "'-' and '_' (the CN of its certificate)")
        if not _ADDRESS.match(address):
            raise NodeRegistryError(f"address {address!r}: host:port, e.g. node-7.example:7443")
        return self._write(node_id, address, "active", actor)

    def remove(self, node_id: str, actor: str) -> NodeEntry:
        known = {e.id: e for e in self.entries()}
        entry = known.get(node_id)
        if entry is None or entry.status != "active":
            raise NodeRegistryError(f"node {node_id!r} is not in the federation "
                                    f"(known: {', '.join(sorted(known)) or 'none'})")
        return self._write(node_id, entry.address, "removed", actor)

    def _write(self, node_id: str, address: str, status: str, actor: str) -> NodeEntry:
        now = datetime.now(UTC).isoformat(timespec="seconds")
        with self._lock, self._engine.begin() as conn:
            version = int(conn.execute(select(func.max(nodes_table.c.version))).scalar()
                          or 0) + 1
            values = {"address": address, "status": status, "changed_at": now,
                      "changed_by": actor[:200], "version": version}
            exists = conn.execute(select(nodes_table.c.id).where(
                nodes_table.c.id == node_id)).first()
            if exists:
                conn.execute(nodes_table.update().where(nodes_table.c.id == node_id)
                             .values(**values))
            else:
                conn.execute(nodes_table.insert().values(id=node_id, **values))
        return NodeEntry(node_id, address, status, now, actor, "registry")
