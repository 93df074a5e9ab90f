"""The node's data engine: datasets loaded into DuckDB, then locked; plans executed.

Tables live in a DuckDB file of the node's state folder (``duckdb/``, 0700; the file 0600),
built from the sources at start by a loading connection that is then closed; the serving
connection reads DuckDB's compressed storage through its buffer pool (``memory_limit``),
so a node's memory does not grow with its data (issue 13).

Lock-down (TRAPS.md): data is loaded first, then external access is disabled and the
configuration locked, so no query can read files, load extensions or change settings.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Generator
from pathlib import Path

import duckdb
import pyarrow as pa

from federation.proto import bulle_pb2 as pb
from nodes._compile import CompiledPlan, PlanRefused, TableMeta, compile_plan
from nodes._config import ROW_UNIT, ConfigError, DatasetConfig, NodeConfig
from nodes._deadline import Deadline
from nodes._disclosure import FAILED as FAILED  # re-exported: the node's one failure text
from nodes._disclosure import (
    Execution,
    PlanFailed,
    envelopes,
    max_unit_rows,
    release_dp,
    release_table,
)
from nodes._guard import PrivacyGuard
from nodes._pids import process_alive
from nodes._quality import compute_quality, fill_table_info
from nodes._references import (
    MAX_REFERENCE_BYTES,
    Copy,
    ReferenceFiles,
    ReferenceRefused,
    catalog_entry,
    check,
    light,
    sha256,
    to_ipc,
)
from nodes._restricted import add_record_keys
from nodes._sources import _quote, load_dataset, row_count_bucket, table_columns, type_family
from privacy import describe_ptable, ptable_for

log = logging.getLogger("bulle.node")
# SQL that bound before runs through execute() (one parse and bind, not two): DuckDB warns
# that its Arrow output copies the rows, which costs nothing for a plan's bounded result.
warnings.filterwarnings("ignore", "Arrow output on a DB-API result", UserWarning)
ROW_BATCH = 65_536  # rows per chunk of ExecuteRows


def _typed_domain(values: tuple[object, ...], duck_type: str, where: str) -> tuple[object, ...]:
    family = type_family(duck_type)
    try:
        if family == "integer":
            return tuple(int(v) for v in values)
        if family == "number":
            return tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: public domain values must be numbers") from None
    return tuple(str(v) for v in values)


class NodeEngine:
    def __init__(self, config: NodeConfig, max_rows: int = 1_000_000) -> None:
        # Here, not in the config's parsing (doctor reports it as one check) nor only in
        # `serve`: every host of the datasets refuses, before any data loads.
        config.require_dp_library()
        self.config = config
        self.max_rows = max_rows
        self.max_query_seconds = config.engine.max_query_seconds
        self._local = threading.local()  # the deadline of the plan this thread executes
        self.meta: dict[str, TableMeta] = {}
        self._compiled: dict[bytes, CompiledPlan] = {}
        self._bound: set[str] = set()  # SQL that bound against the current tables
        self._generation = 0  # bumped when tables change: older compilations are not kept
        self._cache_lock = threading.Lock()
        self._buckets: dict[str, str] = {}
        self.quality: dict[str, dict[str, object]] = {}  # nodes/_quality.py reports
        self._shared: dict[str, tuple[bytes, str]] = {}  # own shared tables: IPC, SHA-256
        self.copies: dict[str, pb.ReferenceTable] = {}  # entries of the copies held here
        self._copies_lock = threading.Lock()
        state_dir = config.state_dir or (
            config.path.parent / f"{config.node_id}-state" if config.path
            else Path(tempfile.gettempdir()) / f"bulle-{config.node_id}-state")
        # The tables live in a DuckDB file of this node's state folder (compressed storage,
        # read through a bounded buffer pool: memory does not grow with the data). The file
        # is this engine's own, rebuilt from the sources at every start and removed at
        # close; see _open_storage.
        self.storage = _open_storage(state_dir)
        self.state_dir = state_dir  # the node's keys live here too (nodes/_receipts.py)
        duck_config = {
            "threads": config.engine.threads,
            "memory_limit": config.engine.memory_limit,
            "temp_directory": str(self.storage.with_suffix(".tmp")),
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            # DuckDB 2.0's common-subexpression pass hoists a subexpression used twice
            # out of the TRY(...) around it (TRY((b*2)+(b*2)) then raises): plans rely on
            # TRY for total evaluation (federation/proto/ops.py)
            "disabled_optimizers": "common_subexpressions",
        }
        # Load with a connection of its own, then close it: DuckDB keeps what a load
        # touched (buffers of the sources, every block written) until its database is
        # closed; the serving connection, opened afresh, holds only what queries read.
        loader = duckdb.connect(str(self.storage), config=duck_config)
        try:
            os.chmod(self.storage, 0o600)
            for ds in config.datasets:
                self._load(loader, ds, state_dir)
            loader.execute("CHECKPOINT")  # every table in compressed storage, none in a WAL
            loader.close()
            self._con = duckdb.connect(str(self.storage), config=duck_config)
        except BaseException:
            loader.close()
            _close_storage(None, self.storage, os.getpid())
            raise
        self._closer = weakref.finalize(self, _close_storage, self._con, self.storage,
                                        os.getpid())
        self._con.execute("SET enable_external_access = false")
        self._con.execute("SET lock_configuration = true")
        self.guard = PrivacyGuard(config.node_id, state_dir, config.board_public_key)
        self._reference_files = ReferenceFiles(state_dir)
        if config.accept_references:  # copies received before a restart serve at once
            for copy in self._reference_files.load(config.node_id, set(self._buckets)):
                try:
                    self._keep(copy)
                except Exception as e:  # never a reason not to start: it is sent again
                    log.warning("reference copy %s not loaded: %s", copy.ref.info.name, e)

    def _load(self, con: duckdb.DuckDBPyConnection, ds: DatasetConfig, state_dir: Path
              ) -> None:
        """Load one dataset and compute what is known of it before the lock-down."""
        started = time.perf_counter()
        n = load_dataset(con, ds)
        columns = dict(table_columns(con, ds.table))
        domains = {c: _typed_domain(v, columns[c], f"dataset {ds.table!r} domain {c!r}")
                   for c, v in ds.public_domains.items()}
        for col in ds.bounds:
            if type_family(columns[col]) not in ("integer", "number"):
                raise ConfigError(f"dataset {ds.table!r}: bounds on non-numeric {col!r}")
        self._buckets[ds.table] = row_count_bucket(n)
        self.quality[ds.table] = compute_quality(con, ds)  # before the lock-down
        if ds.tier == "restricted":  # a hidden column, never in the catalogue
            add_record_keys(con, ds.table, "" if ds.privacy_unit == ROW_UNIT
                            else ds.privacy_unit, state_dir)
        bounds = dict(ds.bounds)
        if ds.tier != "sensitive":  # DP bounds must never come from the data
            bounds = {**envelopes(con, ds.table, columns), **bounds}
        self.meta[ds.table] = TableMeta(
            ds.table, ds.tier, columns, ds.privacy_unit, domains, ds.min_count,
            ds.round_to, bounds, ds.max_rows_per_unit,
            max_unit_rows(con, ds), ds.unit_level, ds.cell_key, ds.perturb)
        if ds.shared:
            ipc = _shared_ipc(con, ds.table)
            self._shared[ds.table] = ipc, sha256(ipc)
        log.info("loaded %s (%s, %s rows) in %.2fs", ds.table, ds.tier,
                 row_count_bucket(n), time.perf_counter() - started)

    def close(self) -> None:
        self._closer()  # closes the connection and removes the table file

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A connection to the locked database (tests use it to probe the lock-down)."""
        return self._con.cursor()

    def catalog(self) -> pb.Catalog:
        out = pb.Catalog(node_id=self.config.node_id,
                         accepts_references=self.config.accept_references)
        out.tables.extend(self._table_info(ds) for ds in self.config.datasets)
        out.tables.extend(catalog_entry(c) for c in self.copies.values())
        return out

    def _table_info(self, ds: DatasetConfig) -> pb.TableInfo:
        meta = self.meta[ds.table]
        info = pb.TableInfo(
            name=ds.table, tier=ds.tier, description=ds.description,
            row_count_bucket=self._buckets[ds.table], privacy_unit=ds.privacy_unit,
            min_count=ds.min_count if ds.tier == "restricted" else 0,
            round_to=ds.round_to if ds.tier == "restricted" else 1,
            max_rows_per_unit=ds.max_rows_per_unit if ds.tier == "sensitive" else 0,
        )
        for col, (lo, hi) in ds.bounds.items():
            info.bounds[col].lower, info.bounds[col].upper = lo, hi
        if ds.tier == "restricted":
            info.unit_level = ds.unit_level
            table = ptable_for(ds.cell_key)
            info.cell_key.perturbed = ds.perturb
            info.cell_key.max_perturbation = float(abs(table).max())
            info.cell_key.variance = describe_ptable(table)["variance"]
            info.cell_key.magnitude = ds.cell_key.magnitude
        for name, typ in meta.columns.items():
            info.columns.add(name=name, type=typ, description=ds.columns.get(name, ""))
        for col, values in meta.public_domains.items():
            info.public_domains[col].values.extend(str(v) for v in values)
        fill_table_info(info, ds, self.quality.get(ds.table))
        if ds.table in self._shared:
            info.shared, info.content_sha256 = True, self._shared[ds.table][1]
        return info

    # -- public reference tables (nodes/_references.py) --------------------------------
    def fetch_reference(self, table: str) -> pb.ReferenceTable:
        """One of this node's shared tables, whole, with its catalogue entry."""
        ds = self.config.dataset(table)
        if ds is None or table not in self._shared:
            raise ReferenceRefused(f"{table!r} is not a shared table of this node")
        return pb.ReferenceTable(info=self._table_info(ds), origin=self.config.node_id,
                                 arrow_ipc=self._shared[table][0])

    def put_reference(self, ref: pb.ReferenceTable) -> pb.TableInfo:
        """Check, record, store and load another node's shared table; returns the copy's
        catalogue entry. The version already held is acknowledged without reading it."""
        if not self.config.accept_references:
            raise ReferenceRefused("this node does not accept reference tables "
                                   "(accept_references = false)")
        with self._copies_lock:
            held = self.copies.get(ref.info.name)
            if held is not None and held.origin == ref.origin and held.info == ref.info:
                return catalog_entry(held)  # the same entry and content hash: checked before
            copy = check(ref, self.config.node_id, set(self._buckets))
            # On the record first: a copy is never served without its audit entry.
            self.guard.audit.append("coordinator", "", "reference_received", {
                "node": self.config.node_id, "table": ref.info.name, "origin": ref.origin,
                "sha256": ref.info.content_sha256, "rows": copy.table.num_rows})
            try:
                self._keep(copy)  # checks the domains against DuckDB's types too
            except ReferenceRefused as e:  # the version held, if any, stays
                self.guard.audit.append("coordinator", "", "reference_refused", {
                    "node": self.config.node_id, "table": ref.info.name,
                    "origin": ref.origin, "reason": str(e)[:200]})
                raise
            self._reference_files.save(copy)  # a restart serves it before the next sync
            log.info("reference %s from %s: %d rows (sha256 %s…)", ref.info.name,
                     ref.origin, copy.table.num_rows, ref.info.content_sha256[:12])
        return catalog_entry(copy.ref)

    def drop_reference(self, table: str) -> pb.TableInfo:
        """Forget a copy (its origin stopped sharing it); the node's own tables never."""
        with self._copies_lock:
            held = self.copies.get(table)
            if held is None:
                raise ReferenceRefused(f"{table!r} is not a reference copy held by this node")
            self.meta = {k: v for k, v in self.meta.items() if k != table}
            self.copies = {k: v for k, v in self.copies.items() if k != table}
            self._forget_compiled()
            cur = self._con.cursor()
            try:
                cur.execute(f"DROP TABLE IF EXISTS {_quote(table)}")
            finally:
                cur.close()
            self._reference_files.remove(table)
            self.guard.audit.append("coordinator", "", "reference_dropped", {
                "node": self.config.node_id, "table": table, "origin": held.origin,
                "sha256": held.info.content_sha256})
            log.info("reference %s (from %s) dropped", table, held.origin)
        return catalog_entry(held)

    def _forget_compiled(self) -> None:
        with self._cache_lock:
            self._generation += 1
            self._compiled.clear()
            self._bound.clear()

    def _keep(self, copy: Copy) -> None:
        """Load a checked copy into DuckDB (from Arrow: allowed after the lock-down)."""
        name = copy.ref.info.name
        view = f"__reference_{name}"
        cur = self._con.cursor()
        cur.register(view, copy.table)
        try:
            columns = dict(table_columns(cur, view))
            try:
                domains = {c: _typed_domain(tuple(d.values), columns[c], f"reference {name!r}")
                           for c, d in copy.ref.info.public_domains.items() if c in columns}
            except ConfigError as e:
                raise ReferenceRefused(str(e)) from None
            cur.execute(f"CREATE OR REPLACE TABLE {_quote(name)} AS SELECT * FROM {_quote(view)}")
            bounds = envelopes(cur, name, columns)  # public data: a SUM over it is bounded too
        finally:
            cur.unregister(view)
            cur.close()
        meta = TableMeta(name, "open", columns, "", domains, 0, 1, bounds)
        self.meta = {**self.meta, name: meta}  # swapped whole: compiles read one version
        self.copies = {**self.copies, name: light(copy.ref)}
        self._forget_compiled()

    def deadline(self, seconds: float | None = None) -> Deadline:
        """A plan's limit: the caller's remaining time, at most max_query_seconds."""
        return Deadline(min(seconds if seconds is not None else math.inf,
                            self.max_query_seconds))

    def _bind(self, cursor: duckdb.DuckDBPyConnection, sql: str) -> duckdb.DuckDBPyRelation:
        """Parse and bind the plan's SQL, reading no data: its errors are static refusals."""
        try:
            return cursor.sql(sql)
        except (duckdb.BinderException, duckdb.ParserException, duckdb.CatalogException):
            raise PlanRefused("the plan does not type-check against this node's tables") \
                from None

    def _run(self, plan: pb.Plan, sql: str) -> pa.Table:
        limit = getattr(self._local, "deadline", None) or self.deadline()
        cursor = self._con.cursor()
        try:
            with self._cache_lock:
                bound, generation = sql in self._bound, self._generation
            if bound:  # it bound before against these tables: parse and bind once, not twice
                limit.attach(cursor)
                try:
                    return cursor.execute(sql).to_arrow_table()
                finally:
                    limit.detach()
            relation = self._bind(cursor, sql)
            with self._cache_lock:  # not DP plans: their SQL has a fresh salt each time
                if generation == self._generation and len(self._bound) < 1024 \
                        and not plan.HasField("privacy"):
                    self._bound.add(sql)
            limit.attach(cursor)
            try:
                return relation.to_arrow_table()
            finally:
                limit.detach()
        except duckdb.Error as e:
            raise self._failed(plan, e, limit) from None
        finally:
            cursor.close()
            if limit is not getattr(self._local, "deadline", None):
                limit.close()

    def _compile(self, plan: pb.Plan) -> CompiledPlan:
        """compile_plan, memoised for exact plans (a dashboard repeats its queries).

        The key is the plan without its request fields; DP plans are never cached (each
        compilation draws a fresh salt for the per-unit row selection).
        """
        if plan.HasField("privacy"):
            return compile_plan(plan, self.meta, self.max_rows)
        shape = pb.Plan()
        shape.CopyFrom(plan)
        shape.request_id = shape.project = shape.researcher = shape.query_sha256 = ""
        key = shape.SerializeToString(deterministic=True)
        with self._cache_lock:
            hit, generation = self._compiled.get(key), self._generation
        if hit is None:
            hit = compile_plan(plan, self.meta, self.max_rows)
            with self._cache_lock:
                if generation != self._generation:
                    return hit  # a table changed meanwhile: use it once, do not keep it
                if len(self._compiled) >= 512:
                    self._compiled.pop(next(iter(self._compiled)))
                self._compiled[key] = hit
        return hit

    def execute(self, plan: pb.Plan, deadline: Deadline | None = None) -> Execution:
        """Run a plan within ``deadline`` (by default the node's own max_query_seconds)."""
        limit = deadline or self.deadline()
        self._local.deadline = limit
        try:
            done = self._execute(plan)
            limit.check()
            return done
        finally:
            self._local.deadline = None
            if deadline is None:
                limit.close()

    def _execute(self, plan: pb.Plan) -> Execution:
        started = time.perf_counter()
        compiled = self._compile(plan)
        if compiled.dp is not None:  # charged before it runs (nodes/_disclosure.py)
            return release_dp(self.guard, plan, compiled, self.config.node_id,
                              lambda: self._run(plan, compiled.sql),
                              lambda e: self._failed(plan, e), started)
        table = self._run(plan, compiled.sql)
        result, rows = release_table(table, compiled, self.config.node_id, self.max_rows)
        return Execution(result, rows, time.perf_counter() - started)


    def execute_rows(self, plan: pb.Plan, deadline: Deadline | None = None
                     ) -> tuple[pb.PartialResult, Generator[tuple[bytes, int], None, None]]:
        """A row plan as (header, pieces of one Arrow IPC stream with their row counts).

        Rows only ever leave from `open` tables: ``compile_plan`` refuses anything else, and
        a plan with aggregates is refused here (it goes through ``execute``). The query
        stays interruptible by ``deadline`` until the stream ends.
        """
        compiled = self._compile(plan)
        if not compiled.is_rows:
            raise PlanRefused("ExecuteRows takes row plans only")
        header = pb.PartialResult(node_id=self.config.node_id, tier=compiled.tier,
                                  round_to=1)
        limit = deadline or self.deadline()
        cursor = self._con.cursor()
        try:
            relation = self._bind(cursor, compiled.sql)
            limit.attach(cursor)
            reader = relation.to_arrow_reader(ROW_BATCH)
        except BaseException as e:
            limit.close()
            cursor.close()
            if isinstance(e, duckdb.Error):
                raise self._failed(plan, e, limit) from None
            raise
        return header, self._ipc_pieces(plan, cursor, reader, limit)

    def _ipc_pieces(self, plan: pb.Plan, cursor: duckdb.DuckDBPyConnection,
                    reader: pa.RecordBatchReader, limit: Deadline
                    ) -> Generator[tuple[bytes, int], None, None]:
        sink = _Pieces()
        rows = 0
        try:
            with pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), reader.schema) as writer:
                yield sink.take(), 0
                while True:
                    try:
                        batch = reader.read_next_batch()
                    except StopIteration:
                        break
                    except Exception as e:  # an interrupt arrives as an Arrow OSError
                        raise self._failed(plan, e, limit) from None
                    rows += batch.num_rows
                    if rows > self.max_rows:
                        raise PlanRefused(f"more than {self.max_rows} rows: add a filter or "
                                          "a LIMIT")
                    writer.write_batch(batch)
                    yield sink.take(), batch.num_rows
            yield sink.take(), 0  # the end-of-stream marker
        finally:
            limit.close()  # detaches the cursor before it closes
            reader.close()
            cursor.close()

    def _failed(self, plan: pb.Plan, e: BaseException,
                deadline: Deadline | None = None) -> PlanFailed:
        """Any failure of an accepted plan, as the one public outcome. The cause may quote
        data values: it goes to this node's log and audit chain only."""
        limit = deadline or getattr(self._local, "deadline", None)
        failure = PlanFailed(cause=f"{type(e).__name__}: {e}"[:1000],
                             interrupted=limit.cause if limit is not None else "")
        log.warning("plan %s failed (incident %s%s): %s", plan.request_id, failure.incident,
                    f", {failure.interrupted}" if failure.interrupted else "", failure.cause)
        return failure

class _Pieces:
    """A write-only file for ``pa.ipc.new_stream`` whose bytes are taken piece by piece."""

    closed = False

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


STORAGE_DIR = "duckdb"  # in the node's state folder (0700): one table file per engine


def _open_storage(state_dir: Path) -> Path:
    """A fresh path for this engine's DuckDB file, in ``state_dir/duckdb`` (0700).

    Each engine has its own file (``tables-<pid>-<random>.duckdb``): a file database takes
    one read-write opener per process, and the training executor runs an engine of its own
    beside the serving one. Files left by processes that no longer exist are removed.
    Rebuilding at start costs one read of the sources (seconds for millions of rows) and is
    correct by construction: nothing from a previous run (record keys, filters, renames,
    another version of a source) can be served by mistake.
    """
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    where = state_dir / STORAGE_DIR
    where.mkdir(mode=0o700, exist_ok=True)
    os.chmod(where, 0o700)
    for old in where.glob("tables-*"):
        try:
            pid = int(old.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not process_alive(pid):
            _remove(old)
    return where / f"tables-{os.getpid()}-{uuid.uuid4().hex[:12]}.duckdb"


def _remove(path: Path) -> None:
    try:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError as e:
        log.warning("could not remove %s: %s", path, e)


def _close_storage(con: duckdb.DuckDBPyConnection | None, storage: Path, owner: int) -> None:
    """Close the engine's connection and remove its table file (and WAL, spill folder).
    A forked child leaving (the training executor's tasks) leaves them to its parent."""
    if os.getpid() != owner:
        return
    try:
        if con is not None:
            con.close()
    finally:
        for path in (storage, Path(f"{storage}.wal"), storage.with_suffix(".tmp")):
            _remove(path)


def _shared_ipc(con: duckdb.DuckDBPyConnection, table: str) -> bytes:
    ipc = to_ipc(con.sql(f"SELECT * FROM {_quote(table)}").to_arrow_table(), compressed=True)
    if len(ipc) > MAX_REFERENCE_BYTES:
        raise ConfigError(f"dataset {table!r}: a shared table must fit in "
                          f"{MAX_REFERENCE_BYTES >> 20} MiB as Arrow IPC "
                          f"({len(ipc) >> 20} MiB): drop columns or share a smaller table")
    return ipc
