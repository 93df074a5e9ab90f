"""Public reference tables at a node: its own shared tables, and copies of other nodes'.

An `open` table declared ``shared = true`` (the ministry's IPS by UAI, say) is copied by the
coordinator to every node that accepts references, so that ``... JOIN ips_colleges USING
(uai)`` runs inside each node: rows of the other tables never move. A copy is checked
(open tier, shared at its origin, SHA-256 of the content, column names), written under
``state_dir/references`` atomically (a restart serves it again at once) and loaded into
the locked DuckDB from Arrow, which needs no file access.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from federation.proto import bulle_pb2 as pb
from nodes._sources import normalize_column_name

log = logging.getLogger("bulle.node")
# The node accepts gRPC messages up to 16 MiB; the table info travels with the content.
MAX_REFERENCE_BYTES = 15 * 1024 * 1024
# …and the table once decompressed (zstd can shrink repetitive data a thousandfold).
MAX_REFERENCE_TABLE_BYTES = 256 * 1024 * 1024
_ZSTD = pa.ipc.IpcWriteOptions(compression="zstd")
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_NODE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class ReferenceRefused(ValueError):
    """A reference table this node will not keep; the message is safe to send."""


def to_ipc(table: pa.Table, compressed: bool = False) -> bytes:
    """One Arrow IPC stream; zstd-compressed for reference copies (shipped, then stored)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=_ZSTD if compressed else None) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Copy:
    """A checked copy: the table as received and its catalogue entry at this node."""

    ref: pb.ReferenceTable
    table: pa.Table


def check(ref: pb.ReferenceTable, node_id: str, own_tables: set[str]) -> Copy:
    """Everything a copy must satisfy before it is stored or served."""
    info = ref.info
    if not _NAME.match(info.name):
        raise ReferenceRefused("reference table name must be lowercase snake_case")
    if not _NODE_ID.match(ref.origin) or ref.origin == node_id:
        raise ReferenceRefused(f"reference {info.name!r}: bad origin node")
    if info.name in own_tables:
        raise ReferenceRefused(f"reference {info.name!r}: this node publishes a table of "
                               "that name")
    if info.tier != "open" or not info.shared:
        raise ReferenceRefused(f"reference {info.name!r}: only open tables declared shared "
                               "are copied")
    if len(ref.arrow_ipc) > MAX_REFERENCE_BYTES:
        raise ReferenceRefused(f"reference {info.name!r}: more than "
                               f"{MAX_REFERENCE_BYTES >> 20} MiB")
    if sha256(ref.arrow_ipc) != info.content_sha256:
        raise ReferenceRefused(f"reference {info.name!r}: content does not match its SHA-256")
    try:
        with pa.ipc.open_stream(ref.arrow_ipc) as reader:
            batches, size = [], 0
            for batch in reader:  # batch by batch: stop early at the size cap
                size += batch.nbytes
                if size > MAX_REFERENCE_TABLE_BYTES:
                    raise ReferenceRefused(f"reference {info.name!r}: more than "
                                           f"{MAX_REFERENCE_TABLE_BYTES >> 20} MiB once read")
                batches.append(batch)
            table = pa.Table.from_batches(batches, reader.schema)
    except (pa.ArrowInvalid, OSError):
        raise ReferenceRefused(f"reference {info.name!r}: not an Arrow IPC stream") from None
    names = table.column_names
    if names != [c.name for c in info.columns]:
        raise ReferenceRefused(f"reference {info.name!r}: columns differ from its catalogue "
                               "entry")
    if any(normalize_column_name(n) != n for n in names) or len(set(names)) != len(names):
        raise ReferenceRefused(f"reference {info.name!r}: column names must be lowercase "
                               "snake_case and unique")
    return Copy(ref, table)


def light(ref: pb.ReferenceTable) -> pb.ReferenceTable:
    """What the node keeps in memory of a loaded copy: its entry, not its content."""
    return pb.ReferenceTable(info=ref.info, origin=ref.origin)


def catalog_entry(ref: pb.ReferenceTable) -> pb.TableInfo:
    """How this node lists a copy: the origin's entry, marked as a copy of it."""
    info = pb.TableInfo()
    info.CopyFrom(ref.info)
    info.copy_of = ref.origin
    info.ClearField("quality")  # the origin's report describes the origin's load
    return info


class ReferenceFiles:
    """Copies on disk, one serialised ReferenceTable per table."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "references"

    def save(self, copy: Copy) -> None:
        from nodes._onboard import atomic_write

        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.dir / f"{copy.ref.info.name}.pb", copy.ref.SerializeToString())

    def remove(self, table: str) -> None:
        (self.dir / f"{table}.pb").unlink(missing_ok=True)

    def load(self, node_id: str, own_tables: set[str]) -> list[Copy]:
        """The stored copies that still pass the checks (others are logged and skipped);
        temporary files a crash left behind are removed."""
        out = []
        for path in sorted(self.dir.iterdir()) if self.dir.is_dir() else []:
            if path.name.startswith("."):  # atomic_write's temporary name
                path.unlink(missing_ok=True)
                continue
            if path.suffix != ".pb":
                continue
            try:
                ref = pb.ReferenceTable.FromString(path.read_bytes())
                out.append(check(ref, node_id, own_tables))
            except (ReferenceRefused, OSError, ValueError) as e:
                log.warning("reference copy %s not loaded: %s", path.name, e)
        return out
