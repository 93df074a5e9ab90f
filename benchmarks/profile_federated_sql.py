"""Where the time goes in the federated SQL path (companion of bench_federated_sql.py).

    .venv/bin/python benchmarks/profile_federated_sql.py [--rows N]

Read-only: it wraps functions of the running coordinator in memory and times node-engine
steps in-process; "what if" variants run on copies (the repository code is not changed).

A  per-query fixed cost (T0 query): coordinator phases, CPU-ms per process, gRPC floor
B  node engine steps (in-process NodeEngine on partition 0, threads=1) for T0, R1, R4,
   plus variants: restricted-tier extra aggregates, DB-API vs relational Arrow export,
   sqlglot builder copies / plan-compile cache
C  R4 transport: the same SQL on scratch node subprocesses: unary protobuf reply (as the
   node does it), a gRPC server stream of raw Arrow IPC messages, Arrow Flight DoGet; each
   with mutual TLS or plaintext, glibc malloc default or tuned (MALLOC_MMAP_THRESHOLD_ …)
S  (optional, --sections s) py-spy on node n0 and on the coordinator during T0 queries
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import duckdb
import pyarrow as pa
import pyarrow.compute
from _harness import (
    CHILD_ENV,
    PY,
    ROOT,
    Dataset,
    _die_with_parent,
    cpu_info,
    federation,
    free_port,
    gen_partitions,
    load_avg,
    time_runs,
    tree_info,
)

T0_QUERY = "SELECT grp, COUNT(*) AS n, AVG(x) AS ax FROM t_small GROUP BY grp ORDER BY grp"
R1 = {
    "COUNT(*)": "SELECT COUNT(*) AS n FROM t",
    "SUM/AVG": "SELECT SUM(x) AS sx, AVG(x) AS ax, SUM(k) AS sk FROM t",
    "GROUP BY AVG/STDDEV": ("SELECT grp, COUNT(*) AS n, AVG(x) AS ax, STDDEV(x) AS sdx "
                            "FROM t GROUP BY grp ORDER BY grp"),
}
TICK = os.sysconf("SC_CLK_TCK")


def ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:8.2f}"


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime (fields 14, 15)


# -- A ----------------------------------------------------------------------------------
def section_a(fed: Any, runs: int) -> None:
    import federation._coordinator as fc

    coord, who = fed.coordinator, fed.researcher
    phases: dict[str, list[float]] = defaultdict(list)
    local = threading.local()

    def wrap(name: str, fn: Any) -> Any:
        def inner(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phases[name].append(time.perf_counter() - t)
        return inner

    originals = {n: getattr(fc, n) for n in ("parse", "plan_query", "merge", "released_to_json")}
    for n, f in originals.items():
        setattr(fc, n, wrap(n, f))
    captured: dict[str, Any] = {}
    timed_merge = fc.merge

    def capture_merge(*a: Any) -> Any:
        captured["args"] = a
        return timed_merge(*a)

    fc.merge = capture_merge
    coord.catalog = wrap("catalog()", coord.catalog)
    coord._fan_out = wrap("fan-out (3 gRPC Execute + IPC decode)", coord._fan_out)
    for c in coord.clients.values():
        c.execute = wrap(f"  Execute RPC {c.id}", c.execute)
    orig_run, orig_submit = coord._run, coord.submit

    def submit(*a: Any, **kw: Any) -> Any:
        local.t = time.perf_counter()
        return orig_submit(*a, **kw)

    submitted: list[float] = []

    def run(record: Any, sql: str) -> None:
        phases["queue hop submit→worker"].append(time.perf_counter() - submitted[-1])
        orig_run(record, sql)

    def submit2(*a: Any, **kw: Any) -> Any:
        submitted.append(time.perf_counter())
        return orig_submit(*a, **kw)

    coord._run, coord.submit = run, submit2
    total, _ = time_runs(lambda: coord.run(T0_QUERY, who), runs, warmup=10)
    for n, f in originals.items():
        setattr(fc, n, f)
    print(f"\nA1. Coordinator.run phases, T0 query, median of {runs} (ms):")
    print(f"  {'Coordinator.run total':<44}{ms(total)}")
    for name, xs in phases.items():
        print(f"  {name:<44}{ms(xs[-runs:])}")

    # CPU per query per process
    pids = {nid: fed.procs[nid].pid for nid in fed.node_ids}
    pids["coordinator (HTTP subprocess)"] = fed.procs["coordinator"].pid
    import httpx
    from _harness import TOKEN

    http = httpx.Client(base_url=fed.http_url, headers={"Authorization": f"Bearer {TOKEN}"})
    for label, fn in (("Coordinator.run in-process", lambda: coord.run(T0_QUERY, who)),
                      ("HTTP API (httpx)", lambda: http.post(
                          "/v1/queries", json={"sql": T0_QUERY}).raise_for_status())):
        for _ in range(10):
            fn()
        before = {k: proc_cpu(p) for k, p in pids.items()}
        me0, w0 = time.process_time(), time.perf_counter()
        for _ in range(runs):
            fn()
        wall = (time.perf_counter() - w0) / runs
        me = (time.process_time() - me0) / runs
        after = {k: proc_cpu(p) for k, p in pids.items()}
        cpu = {k: (after[k] - before[k]) / runs for k in pids}
        total_cpu = me + sum(cpu.values())
        print(f"\nA2. CPU per T0 query via {label} (ms; {runs} queries, 10 ms tick):")
        print(f"  wall {wall * 1000:.2f}; this process (client/in-process coordinator) "
              f"{me * 1000:.2f}; " + "; ".join(f"{k} {v * 1000:.2f}" for k, v in cpu.items())
              + f"; total {total_cpu * 1000:.2f} CPU-ms → ≥ {total_cpu * 500:.2f} ms wall "
              "on 2 idle cores")
    http.close()

    _merge_variants(originals["merge"], captured["args"], runs)

    # the same query answered by one node only (no core sharing between nodes)
    one = T0_QUERY.replace("t_small", "t_small_n0")
    t1, _ = time_runs(lambda: coord.run(one, who), runs, warmup=10)
    print(f"\nA4. T0 query on a table held by one node only (n0's 333 rows; the other two "
          f"nodes idle): Coordinator.run median {ms(t1)} ms (3 nodes: {ms(total)} ms)")

    # gRPC floor
    from federation.proto import bulle_pb2 as pb

    channel, stub = fed.node_stub("n0")
    h, _ = time_runs(lambda: stub.Health(pb.HealthRequest(), timeout=5), runs, warmup=10)
    print(f"\nA3. gRPC Health round trip over mutual TLS (one node): {ms(h)} ms")
    channel.close()


def _merge_variants(merge: Any, args: tuple[Any, ...], runs: int) -> None:
    """The T0 merge as is, its DuckDB statements replayed alone, the same with prepared
    statements, and a pyarrow group-by doing this query's merge (scratch, checked equal)."""
    import pyarrow.compute as pc

    from federation import _merge

    parts = args[1]
    events: list[tuple[str, Any, Any]] = []  # ("register", name, table) | ("sql", text, None)
    real_cursor = _merge._cursor

    class Spy:  # records what the merge asks DuckDB to do
        def __init__(self, cur: Any) -> None:
            self.cur = cur

        def __getattr__(self, name: str) -> Any:
            return getattr(self.cur, name)

        def register(self, name: str, table: Any) -> Any:
            events.append(("register", name, table))
            return self.cur.register(name, table)

        def unregister(self, name: str) -> Any:
            events.append(("unregister", name, None))
            return self.cur.unregister(name)

        def sql(self, q: str) -> Any:
            events.append(("sql", q, None))
            return self.cur.sql(q)

        def execute(self, q: str, *a: Any) -> Any:
            events.append(("sql", q, None))
            return self.cur.execute(q, *a)

    _merge._cursor = lambda: Spy(real_cursor())
    try:
        expected = merge(*args).table
    finally:
        _merge._cursor = real_cursor
    cur = real_cursor()
    statements = [q for kind, q, _ in events if kind == "sql"]
    prepared_names: dict[str, str] = {}
    for kind, a, b in events:  # prepare each statement with its tables registered
        if kind == "register":
            cur.register(a, b)
        elif kind == "unregister":
            cur.unregister(a)
        else:
            prepared_names[a] = f"bench_merge_{len(prepared_names)}"
            cur.execute(f"PREPARE {prepared_names[a]} AS {a}")

    def duck(prepared: bool = False) -> None:
        for kind, a, b in events:
            if kind == "register":
                cur.register(a, b)
            elif kind == "unregister":
                cur.unregister(a)
            else:
                cur.execute(f"EXECUTE {prepared_names[a]}" if prepared else a).to_arrow_table()

    table = pa.concat_tables(
        [t.append_column("__node", pa.array([i] * t.num_rows, pa.int32()))
         for i, (_, t) in enumerate(parts)], promote_options="permissive")

    def arrow() -> pa.Table:  # this query only: GROUP BY g0, n = Σp0, ax = Σp1 / Σp2
        g = table.group_by(["g0"]).aggregate([("p0", "sum"), ("p1", "sum"), ("p2", "sum"),
                                              ("__suppressed", "any")])
        ax = pc.divide(pc.cast(g["p1_sum"], pa.float64()), pc.cast(g["p2_sum"], pa.float64()))
        return pa.table({"grp": g["g0"], "n": g["p0_sum"], "ax": ax}).sort_by("grp")

    got = arrow()
    same = (got["grp"].to_pylist() == expected["grp"].to_pylist()
            and got["n"].to_pylist() == expected["n"].to_pylist()
            and all(abs(a - b) <= 1e-9 * abs(b) for a, b in zip(
                got["ax"].to_pylist(), expected["ax"].to_pylist(), strict=True)))
    full, _ = time_runs(lambda: merge(*args), runs, 10)
    d1, _ = time_runs(duck, runs, 10)
    d2, _ = time_runs(lambda: duck(True), runs, 10)
    a1, _ = time_runs(arrow, runs, 10)
    print(f"\nA5. T0 merge (coordinator, median ms): merge() as is {ms(full)} | its "
          f"{len(statements)} DuckDB statement(s) replayed alone (with register/unregister) "
          f"{ms(d1)} | same as prepared statements {ms(d2)} (planning share only: UNSAFE as a "
          f"fix, a prepared statement keeps the first registered Arrow table) | pyarrow "
          f"group_by for this "
          f"query {ms(a1)} ({'same answer' if same else 'DIFFERENT ANSWER'})")


# -- S (optional: py-spy) ---------------------------------------------------------------
SPY_FRAMES = {
    "node": [("NodeServicer.Execute", "Execute servicer (all)"),
             ("NodeEngine.execute", "  NodeEngine.execute"),
             ("DuckDBPyRelation.to_arrow_table", "    DuckDB run + Arrow export"),
             ("sql", "    DuckDB sql() plan/bind"),
             ("compile_plan", "    compile_plan (sqlglot)"),
             ("deepcopy", "      of which sqlglot deepcopy"),
             ("release_restricted", "    release_restricted (cell key method)"),
             ("_status", "  gRPC send of the reply (start_server_batch)"),
             ("Logger.info", "  audit log (JSONL, nodes before 91506c1)"),
             ("AuditLog.append", "  audit chain append (SQLite, synchronous=FULL)")],
    "coordinator": [("Coordinator._run", "Coordinator._run (all)"),
                    ("parse", "  parse (sqlglot)"),
                    ("Coordinator._fan_out", "  fan-out (gRPC client)"),
                    ("merge", "  merge"),
                    ("DuckDBPyRelation.to_arrow_table", "    merge: DuckDB run"),
                    ("_connection_sql", "    merge: DuckDB sql() plan/bind"),
                    ("_sql", "    merge: SQL text via sqlglot"),
                    ("released_to_json", "  released_to_json")],
}


def _spy_summary(path: Path, frames: list[tuple[str, str]]) -> None:
    total, inclusive = 0, defaultdict(int)
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        names = {f.split(" (")[0] for f in stack.split(";")}
        for name in names:
            inclusive[name] += n
    for name, label in frames:
        print(f"  {label:<46}{100 * inclusive.get(name, 0) / max(total, 1):6.1f} %")
    print(f"  ({total} samples of busy threads)")


def section_s(fed: Any, py_spy: str, seconds: float) -> None:
    coord, who = fed.coordinator, fed.researcher
    for _ in range(20):
        coord.run(T0_QUERY, who)
    out = {name: fed.workdir / f"spy_{name}.txt" for name in ("node", "coordinator")}
    pids = {"node": fed.procs["n0"].pid, "coordinator": os.getpid()}
    spies = [subprocess.Popen([py_spy, "record", "-p", str(pids[k]), "-d", str(int(seconds)),
                               "-r", "500", "--format", "raw", "-o", str(out[k]),
                               "--nonblocking"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for k in out]
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < seconds + 1:
        coord.run(T0_QUERY, who)
        n += 1
    for spy in spies:
        spy.wait(timeout=60)
    print(f"\nS. py-spy ({n} T0 queries in {seconds:.0f} s, 500 Hz, inclusive share of busy "
          "samples):")
    for k, path in out.items():
        print(f" {k} ({'n0 subprocess' if k == 'node' else 'in-process Coordinator'}):")
        if path.is_file():
            _spy_summary(path, SPY_FRAMES[k])
        else:
            print("  (py-spy wrote nothing: ptrace not permitted?)")


# -- B ----------------------------------------------------------------------------------
def _engine_steps(engine: Any, plan: Any, runs: int) -> dict[str, list[float]]:
    from federation.proto import bulle_pb2 as pb
    from nodes._compile import compile_plan

    out: dict[str, list[float]] = defaultdict(list)
    for i in range(runs + 2):
        t0 = time.perf_counter()
        c = compile_plan(plan, engine.meta, engine.max_rows)
        t1 = time.perf_counter()
        rel = engine._con.cursor().sql(c.sql)  # as nodes/_engine.py at HEAD
        t2 = time.perf_counter()
        table = rel.to_arrow_table()
        t3 = time.perf_counter()
        result = table if c.is_rows else _release(table, c)
        t4 = time.perf_counter()
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, result.schema) as w:
            w.write_table(result)
        t5 = time.perf_counter()
        blob = sink.getvalue().to_pybytes()
        t6 = time.perf_counter()
        msg = pb.PartialResult(node_id="n0", arrow_ipc=blob)
        wire = msg.SerializeToString()
        t7 = time.perf_counter()
        if i < 2:
            continue
        for k, v in (("compile_plan (sqlglot)", t1 - t0), ("DuckDB sql() (plan+bind)", t2 - t1),
                     ("to_arrow_table (runs the query)", t3 - t2),
                     ("release (cell key method)", t4 - t3),
                     ("IPC write", t5 - t4), ("IPC to_pybytes copy", t6 - t5),
                     ("PartialResult + SerializeToString", t7 - t6), ("sum", t7 - t0)):
            out[k].append(v)
        out["_bytes"] = [len(wire)]
        out["_sql"] = [c.sql]  # type: ignore[list-item]
    return out


def _release(table: pa.Table, c: Any) -> pa.Table:
    """What the node releases from an aggregate plan's cells (as nodes/_engine.py does): the
    cell key method's perturbation and threshold for restricted data, else the cells as is."""
    if c.restricted is not None:
        from nodes._restricted import release_restricted
        from privacy import ptable_for

        return release_restricted(table, c.restricted, ptable_for(c.restricted.params))[0]
    return table.append_column("__suppressed", pa.array([False] * table.num_rows))


def _scratch_compile_nocopy() -> Any:
    """nodes/_compile.py with sqlglot builder calls told not to deep-copy the tree."""
    src = (ROOT / "nodes" / "_compile.py").read_text()
    for call in ("select", "where", "group_by", "join", "order_by"):
        src = src.replace(f"query = query.{call}(", f"query = query.{call}(__NC__")
    # add copy=False as the last keyword of each builder call (balanced parentheses)
    out, i = [], 0
    while (j := src.find("__NC__", i)) >= 0:
        out.append(src[i:j])
        depth, k = 1, j + len("__NC__")
        while depth:
            depth += {"(": 1, ")": -1}.get(src[k], 0)
            k += 1
        args = src[j + len("__NC__"):k - 1]  # calls that already say copy= keep theirs
        out.append(args + (")" if "copy=" in args else ", copy=False)"))
        i = k
    out.append(src[i:])
    path = Path(tempfile.mkdtemp(prefix="bulle-scratch-")) / "_compile_nocopy.py"
    path.write_text("".join(out))
    spec = importlib.util.spec_from_file_location("_compile_nocopy", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["_compile_nocopy"] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    shutil.rmtree(path.parent, ignore_errors=True)
    return mod


def section_b(parts: list[Path], small: list[Path], runs: int) -> str:
    from dataclasses import fields

    from federation._planner import plan_query
    from federation._sql import parse
    from nodes._compile import compile_plan
    from nodes._config import DatasetConfig, EngineConfig, NodeConfig
    from nodes._engine import NodeEngine

    # newer nodes keep a ledger and audit chain in state_dir (default: under the cwd)
    extra = ({"state_dir": Path(tempfile.mkdtemp(prefix="bulle-bench-state-"))}
             if "state_dir" in {f.name for f in fields(NodeConfig)} else {})
    cfg = NodeConfig("n0", "127.0.0.1:0", None, EngineConfig(threads=1, memory_limit="2GB"), (
        DatasetConfig("t", (parts[0],), "restricted", min_count=0, round_to=1),
        DatasetConfig("t_small", (small[0],), "restricted", min_count=0, round_to=1),
        DatasetConfig("t_open", (parts[0],), "open"),
    ), **extra)
    engine = NodeEngine(cfg)
    schema = {n: dict(m.columns) for n, m in engine.meta.items()}
    n_rows = engine._con.execute("SELECT count(*) FROM t").fetchone()[0]
    cut = max(1, min(100, int(0.95e6 * 100 / max(n_rows, 1))))
    r4 = f"SELECT id, x, k FROM t_open WHERE k < {cut}"
    queries = {"T0 (333 rows)": T0_QUERY, **{f"R1 {k}": v for k, v in R1.items()}, "R4": r4}
    plans = {name: plan_query(parse(sql, schema)).plan for name, sql in queries.items()}
    print(f"\nB1. Node engine steps, in-process, partition 0 ({n_rows:,} rows), threads=1, "
          "median ms:")
    steps = {name: _engine_steps(engine, plan, runs if "T0" in name or "COUNT" in name
                                 else max(3, runs // 20)) for name, plan in plans.items()}
    keys = [k for k in next(iter(steps.values())) if not k.startswith("_")]
    print(f"  {'step':<36}" + "".join(f"{n[:14]:>15}" for n in steps))
    for k in keys:
        print(f"  {k:<36}" + "".join(f"{ms(s[k]):>15}" for s in steps.values()))
    print(f"  {'reply bytes':<36}" + "".join(f"{s['_bytes'][0]:>15,}" for s in steps.values()))
    for name, s in steps.items():
        print(f"  node SQL {name}: {s['_sql'][0]}")

    cur = engine._con.cursor()
    print("\nB2. Variants (scratch, same engine):")
    # restricted-tier extra aggregates
    for name in ("R1 SUM/AVG", "R1 GROUP BY AVG/STDDEV"):
        c = compile_plan(plans[name], engine.meta, engine.max_rows)
        full, _ = time_runs(lambda c=c: cur.execute(c.sql).fetchall(), 5, warmup=1)
        plain_plan = type(plans[name])()
        plain_plan.CopyFrom(plans[name])
        plain_plan.source.table = "t_open"  # same rows, open tier: no cell key columns
        c2 = compile_plan(plain_plan, engine.meta, engine.max_rows)
        plain, _ = time_runs(lambda c2=c2: cur.execute(c2.sql).fetchall(), 5, warmup=1)
        direct_sql = queries[name].replace(" ORDER BY grp", "")
        direct, _ = time_runs(lambda s=direct_sql: cur.execute(s).fetchall(), 5, warmup=1)
        print(f"  {name}: node SQL as compiled (restricted, cell key columns) {ms(full)} ms | "
              f"same plan on open tier {ms(plain)} ms | researcher SQL directly "
              f"{ms(direct)} ms  (benchmarks/bench_restricted.py breaks the restricted SQL "
              "down further)")
    # Arrow export
    rsql = compile_plan(plans["R4"], engine.meta, engine.max_rows).sql
    a, _ = time_runs(lambda: cur.execute(rsql).to_arrow_table(), 5, warmup=1)
    b, _ = time_runs(lambda: cur.sql(rsql).to_arrow_table(), 5, warmup=1)
    print(f"  R4 export: cursor().execute(sql).to_arrow_table() {ms(a)} ms (node before "
          f"cea5024) vs cursor().sql(sql).to_arrow_table() {ms(b)} ms (node at HEAD)")
    # compile: sqlglot copies, cache
    nocopy = _scratch_compile_nocopy()
    for name in ("T0 (333 rows)", "R1 GROUP BY AVG/STDDEV"):
        p = plans[name]
        base, c_base = time_runs(lambda p=p: compile_plan(p, engine.meta, 10**6), runs, 10)
        fast, c_fast = time_runs(lambda p=p: nocopy.compile_plan(p, engine.meta, 10**6), runs,
                                 10)
        assert c_base.sql == c_fast.sql, "scratch compile changed the SQL"
        cache: dict[bytes, Any] = {}

        def cached(p: Any = p, cache: dict[bytes, Any] = cache) -> Any:
            key = p.SerializeToString(deterministic=True)  # a real cache would drop ids
            hit = cache.get(key)
            if hit is None:
                hit = cache[key] = compile_plan(p, engine.meta, 10**6)
            return hit

        memo, _ = time_runs(cached, runs, 10)
        print(f"  compile_plan {name}: as is {ms(base)} ms | builders with copy=False "
              f"{ms(fast)} ms (same SQL) | cached by plan bytes {ms(memo)} ms")
    # DuckDB floor per query on this locked connection
    f1, _ = time_runs(lambda: cur.execute("SELECT 42").fetchall(), runs, 10)
    f2, _ = time_runs(lambda: cur.execute("SELECT 42").to_arrow_table(), runs, 10)
    print(f"  DuckDB 2.0 floor: SELECT 42 fetchall {ms(f1)} ms, to_arrow_table {ms(f2)} ms")
    engine.close()
    for d in extra.values():
        shutil.rmtree(d, ignore_errors=True)
    return r4


# -- C ----------------------------------------------------------------------------------
MALLOC_TUNED = {"MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024),
                "MALLOC_TRIM_THRESHOLD_": str(1024 * 1024 * 1024),
                "MALLOC_TOP_PAD_": str(256 * 1024 * 1024)}
STREAM_BATCH_ROWS = 65_536


def _server_creds(certs: Path) -> Any:
    import grpc

    return grpc.ssl_server_credentials(
        [((certs / "n0.key").read_bytes(), (certs / "n0.pem").read_bytes())],
        root_certificates=(certs / "ca.pem").read_bytes(), require_client_auth=True)


def _channel(port: int, mode: str, certs: Path) -> Any:
    import grpc

    opts = [("grpc.max_receive_message_length", 512 * 1024 * 1024)]
    if mode == "plaintext":
        return grpc.insecure_channel(f"127.0.0.1:{port}", options=opts)
    creds = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes(),
                                         (certs / "bulle-coordinator.key").read_bytes(),
                                         (certs / "bulle-coordinator.pem").read_bytes())
    return grpc.secure_channel(f"127.0.0.1:{port}", creds, options=opts)


def scratch_server(port: int, mode: str, parquet: str, certs: str) -> None:
    """A scratch node (not the real one): the R4 SQL on a threads=1 DuckDB, answered either
    as today (unary, Arrow IPC inside PartialResult.arrow_ipc) or as a server stream of raw
    Arrow IPC messages (schema, then one message per 64k-row batch; no protobuf)."""
    from concurrent import futures

    import grpc

    from federation.proto import bulle_pb2 as pb
    from federation.proto import bulle_pb2_grpc as pb_grpc

    con = duckdb.connect(config={"threads": 1})
    con.execute(f"CREATE TABLE t_open AS SELECT * FROM read_parquet('{parquet}')")

    class Unary(pb_grpc.NodeServicer):
        def Execute(self, plan: Any, context: Any) -> Any:
            table = con.cursor().sql(plan.request_id).to_arrow_table()  # SQL rides in the id
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as w:
                w.write_table(table)
            return pb.PartialResult(node_id="n0", arrow_ipc=sink.getvalue().to_pybytes())

    def stream(request: bytes, context: Any) -> Any:
        reader = con.cursor().sql(request.decode()).to_arrow_reader(STREAM_BATCH_ROWS)
        yield reader.schema.serialize().to_pybytes()
        for batch in reader:
            yield batch.serialize().to_pybytes()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.max_send_message_length", 512 * 1024 * 1024)])
    pb_grpc.add_NodeServicer_to_server(Unary(), server)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "bench.Scratch", {"Stream": grpc.unary_stream_rpc_method_handler(stream)})])
    addr = f"127.0.0.1:{port}"
    if mode == "plaintext":
        server.add_insecure_port(addr)
    else:
        server.add_secure_port(addr, _server_creds(Path(certs)))
    server.start()
    server.wait_for_termination()


def scratch_flight_server(port: int, mode: str, parquet: str, certs: str) -> None:
    """A scratch node serving the same SQL over Arrow Flight DoGet (C++ gRPC transport of
    record batches, mutual TLS available), streaming from DuckDB's Arrow reader."""
    from pyarrow import flight

    con = duckdb.connect(config={"threads": 1})
    con.execute(f"CREATE TABLE t_open AS SELECT * FROM read_parquet('{parquet}')")

    class Server(flight.FlightServerBase):
        def do_get(self, context: Any, ticket: Any) -> Any:
            sql = ticket.ticket.decode()
            return flight.RecordBatchStream(
                con.cursor().sql(sql).to_arrow_reader(STREAM_BATCH_ROWS))

    c = Path(certs)
    if mode == "plaintext":
        server = Server(f"grpc+tcp://127.0.0.1:{port}")
    else:
        server = Server(f"grpc+tls://127.0.0.1:{port}",
                        tls_certificates=[flight.CertKeyPair((c / "n0.pem").read_bytes(),
                                                             (c / "n0.key").read_bytes())],
                        verify_client=True, root_certificates=(c / "ca.pem").read_bytes())
    server.serve()


def scratch_client(port: int, mode: str, transport: str, certs: str, runs: int,
                   sql: str) -> None:
    if transport == "flight":
        from pyarrow import flight

        c = Path(certs)
        if mode == "plaintext":
            client = flight.FlightClient(f"grpc+tcp://127.0.0.1:{port}")
        else:
            client = flight.FlightClient(
                f"grpc+tls://127.0.0.1:{port}", tls_root_certs=(c / "ca.pem").read_bytes(),
                cert_chain=(c / "bulle-coordinator.pem").read_bytes(),
                private_key=(c / "bulle-coordinator.key").read_bytes())
        client.wait_for_available(timeout=60)
        times, table = time_runs(lambda: client.do_get(flight.Ticket(sql.encode())).read_all(),
                                 runs)
        print(json.dumps({"ms": statistics.median(times) * 1000, "rows": table.num_rows,
                          "sum_id": pa.compute.sum(table.column(0)).as_py()}))
        client.close()
        return
    import grpc

    from federation.proto import bulle_pb2 as pb
    from federation.proto import bulle_pb2_grpc as pb_grpc

    channel = _channel(port, mode, Path(certs))
    grpc.channel_ready_future(channel).result(timeout=60)
    if transport == "unary":
        stub = pb_grpc.NodeStub(channel)

        def call() -> pa.Table:
            res = stub.Execute(pb.Plan(request_id=sql), timeout=60)
            return pa.ipc.open_stream(res.arrow_ipc).read_all()
    else:
        method = channel.unary_stream("/bench.Scratch/Stream")

        def call() -> pa.Table:
            chunks = list(method(sql.encode(), timeout=60))
            schema = pa.ipc.read_schema(pa.py_buffer(chunks[0]))
            return pa.Table.from_batches(
                [pa.ipc.read_record_batch(pa.py_buffer(c), schema) for c in chunks[1:]], schema)

    times, table = time_runs(call, runs)
    print(json.dumps({"ms": statistics.median(times) * 1000, "rows": table.num_rows,
                      "sum_id": pa.compute.sum(table.column(0)).as_py()}))
    channel.close()


def section_c(parquet: Path, sql: str, runs: int) -> None:
    from federation._certs import make_certs

    tmp = Path(tempfile.mkdtemp(prefix="bulle-scratch-"))
    certs = make_certs(tmp / "certs", ["n0"])
    direct = duckdb.connect()
    direct.execute(f"CREATE TABLE t_open AS SELECT * FROM read_parquet('{parquet}')")
    d, ref = time_runs(lambda: direct.sql(sql).to_arrow_table(), runs)
    direct.close()
    print(f"\nC. R4 transport on a scratch node (subprocess, threads=1, same SQL), client in a "
          f"subprocess, median of {runs} (ms). DuckDB direct, default threads: {ms(d)} ms "
          f"({ref.num_rows:,} rows; measured once before the variants, so the ratio column is "
          "only as good as this baseline; the speed-up column compares variants)")
    combos = [("unary", "tls", False), ("unary", "plaintext", False), ("unary", "tls", True),
              ("stream", "tls", False), ("stream", "tls", True), ("stream", "plaintext", True),
              ("flight", "tls", False), ("flight", "plaintext", False)]
    today = 0.0
    for transport, mode, tuned in combos:
        env = {**CHILD_ENV, **(MALLOC_TUNED if tuned else {})}
        port = free_port()
        kind = "--scratch-flight-server" if transport == "flight" else "--scratch-server"
        server = subprocess.Popen([PY, __file__, kind, str(port), mode, str(parquet),
                                   str(certs)], cwd=ROOT, env=env,
                                  preexec_fn=_die_with_parent)
        try:
            out = subprocess.run([PY, __file__, "--scratch-client", str(port), mode, transport,
                                  str(certs), str(runs), sql], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=120)
            if out.returncode != 0:
                print(f"  {transport}/{mode}: client failed: {out.stderr[-500:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            ok = r["rows"] == ref.num_rows and r["sum_id"] == pa.compute.sum(
                ref.column(0)).as_py()
            name = {"unary": "unary protobuf (as today)", "stream": "gRPC stream of raw IPC",
                    "flight": "Arrow Flight DoGet"}[transport]
            label = f"{name}, {mode}, malloc {'tuned' if tuned else 'default'}"
            ratio = statistics.median(d) * 1000 / r["ms"]
            today = today or r["ms"]
            print(f"  {label:<52}{r['ms']:8.2f} ms  speed-up vs as today {today / r['ms']:.2f}"
                  f"  R4 ratio {ratio:.2f}{'' if ok else '  (WRONG ROWS)'}")
        finally:
            server.terminate()
            server.wait(timeout=10)
    shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--scratch-server":
        scratch_server(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--scratch-flight-server":
        scratch_flight_server(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--scratch-client":
        a = sys.argv
        scratch_client(int(a[2]), a[3], a[4], a[5], int(a[6]), a[7])
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--sections", default="abc",
                    help="which sections to run: a, b, c, and s (py-spy, needs --py-spy)")
    ap.add_argument("--py-spy", default=shutil.which("py-spy") or "",
                    help="py-spy binary (pip install py-spy) for section s")
    args = ap.parse_args()
    started = time.perf_counter()
    print(f"{cpu_info()}; code: {tree_info()}; load average {load_avg()}")
    parts = gen_partitions("t", args.rows)
    small = gen_partitions("small", 1000)
    if "a" in args.sections or "s" in args.sections:
        with federation([Dataset("t_small", small), Dataset("t_small_n0", small[:1])],
                        threads=1) as fed:
            if "a" in args.sections:
                section_a(fed, args.runs)
            if "s" in args.sections:
                if args.py_spy:
                    section_s(fed, args.py_spy, 10)
                else:
                    print("\nS. skipped: py-spy not found (pip install py-spy; --py-spy PATH)")
    n = args.rows // 3
    r4_sql = f"SELECT id, x, k FROM t_open WHERE k < {max(1, min(100, int(0.95e6 * 100 / n)))}"
    if "b" in args.sections:
        r4_sql = section_b(parts, small, args.runs)
    if "c" in args.sections:
        section_c(parts[0], r4_sql, 7)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average {load_avg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
