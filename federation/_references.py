"""Public reference tables: copy each node's shared open tables to the other nodes.

Run at every catalogue refresh. A table is copied when exactly one node publishes it,
as `open` and `shared`; it goes to every reachable node that accepts references and does
not hold the current version (same origin, same SHA-256). The content is fetched once
per version. A failed copy is logged and tried again after 30 s, then less and less often
(at most every 15 min); until then that node does not hold the table (queries say which
nodes took part). A copy whose origin answers and no longer shares the table is dropped
at the node.
"""

from __future__ import annotations

import logging
import time
from concurrent import futures

import grpc

from federation._catalog import shipped
from federation._nodes import NodeClient, describe_rpc_error
from federation.proto import bulle_pb2 as pb

log = logging.getLogger("bulle.coordinator")
RETRY_S, RETRY_MAX_S = 30.0, 900.0  # back-off after a failed copy: 30 s, doubling to 15 min


def _replace(catalog: pb.Catalog, name: str, copy: pb.TableInfo | None) -> None:
    """Set (or remove) the copy of ``name`` in a node's catalogue."""
    kept = [t for t in catalog.tables if t.name != name or not t.copy_of]
    del catalog.tables[:]
    catalog.tables.extend([*kept, *([copy] if copy is not None else [])])


class ReferenceSync:
    def __init__(self, clients: dict[str, NodeClient], pool: futures.Executor) -> None:
        self.clients = clients
        self.pool = pool
        self._fetched: dict[tuple[str, str], pb.ReferenceTable] = {}  # (origin, table)
        self.problems: dict[tuple[str, str], str] = {}  # (node, table) -> last failure
        # (node, table) -> (monotonic time of the next try, delay): a node that keeps
        # refusing is not sent the table at every refresh
        self._retry: dict[tuple[str, str], tuple[float, float]] = {}

    def sync(self, catalogs: dict[str, pb.Catalog], timeout: float) -> None:
        """Ship what is missing, drop copies their origin no longer shares; ``catalogs``
        is updated in place to match."""
        publishers: dict[str, list[tuple[str, pb.TableInfo]]] = {}
        for nid, cat in catalogs.items():
            for t in cat.tables:
                if not t.copy_of:
                    publishers.setdefault(t.name, []).append((nid, t))
        shippable = {name: entries[0] for name, entries in publishers.items()
                     if shipped(entries)}
        for name, (origin, info) in sorted(shippable.items()):
            targets = [nid for nid, cat in sorted(catalogs.items())
                       if nid != origin and cat.accepts_references
                       and name not in {t.name for t in cat.tables if not t.copy_of}
                       and not any(t.name == name and t.copy_of == origin
                                   and t.content_sha256 == info.content_sha256
                                   for t in cat.tables)
                       and self._due(nid, name)]
            if not targets:
                continue
            ref = self._fetch(origin, info, timeout)
            if ref is None:
                continue
            calls = {nid: self.pool.submit(self.clients[nid].put_reference, ref, timeout)
                     for nid in targets}
            for nid, call in calls.items():
                try:
                    ack = call.result()
                except grpc.RpcError as e:
                    self._problem(nid, name, describe_rpc_error(nid, e, timeout))
                    continue
                self.problems.pop((nid, name), None)
                self._retry.pop((nid, name), None)
                _replace(catalogs[nid], name, ack.info)
                log.info("reference table %s (from %s) copied to %s", name, origin, nid)
        # A copy whose origin answered and no longer shares the table (or another node
        # publishes it too) is dropped; an origin that is down decides nothing.
        for nid, cat in sorted(catalogs.items()):
            for t in [t for t in cat.tables if t.copy_of and t.copy_of in catalogs]:
                if shippable.get(t.name, ("",))[0] == t.copy_of:
                    continue
                try:
                    self.clients[nid].drop_reference(t.name, timeout)
                except grpc.RpcError as e:
                    self._problem(nid, t.name, describe_rpc_error(nid, e, timeout))
                    continue
                _replace(cat, t.name, None)
                log.info("reference table %s (from %s) dropped at %s: no longer shared",
                         t.name, t.copy_of, nid)

    def _fetch(self, origin: str, info: pb.TableInfo, timeout: float) -> pb.ReferenceTable | None:
        key = (origin, info.name)
        held = self._fetched.get(key)
        if held is not None and held.info.content_sha256 == info.content_sha256:
            return held
        try:
            ref = self.clients[origin].fetch_reference(info.name, timeout)
        except grpc.RpcError as e:
            self._problem(origin, info.name, describe_rpc_error(origin, e, timeout))
            return None
        self._fetched[key] = ref
        return ref

    def _due(self, node: str, table: str) -> bool:
        return time.monotonic() >= self._retry.get((node, table), (0.0, 0.0))[0]

    def _problem(self, node: str, table: str, why: str) -> None:
        if self.problems.get((node, table)) != why:  # once per new reason, not every refresh
            log.warning("reference table %s not copied to/from %s: %s", table, node, why)
        self.problems[(node, table)] = why
        delay = min(RETRY_MAX_S, 2 * self._retry.get((node, table), (0.0, RETRY_S / 2))[1])
        self._retry[(node, table)] = (time.monotonic() + delay, delay)
