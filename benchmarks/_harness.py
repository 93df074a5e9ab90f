"""Benchmark harness: synthetic data, a real 3-node federation, timers, a results table.

Nodes run as **subprocesses** (``python -m bulle_cli node serve``), one per node, as in a
deployment: each has its own interpreter and GIL, so the nodes' Python work (plan
compilation, disclosure control, Arrow IPC, protobuf) runs in parallel the way it would in
production instead of being serialised behind the benchmark's own GIL, and each node can
be profiled alone (py-spy on its pid). The HTTP API also runs as a subprocess
(``python -m bulle_cli coordinator serve``): the client (SDK/httpx) and the server do not
share an interpreter. ``Coordinator.run`` is additionally measured in-process.

Every child gets PR_SET_PDEATHSIG, so it dies with the benchmark even on a hard kill;
:meth:`Federation.stop` terminates them in order (``finally`` in the caller).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / ".data"
# children import the same tree as this process (also when the benchmarks run from a
# snapshot of a commit: PYTHONPATH=<snapshot> .venv/bin/python <snapshot>/benchmarks/…)
CHILD_ENV = {**os.environ,
             "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                           if p)}
PY = sys.executable
N_NODES = 3
TOKEN = "bench-token-0123456789"


# -- data --------------------------------------------------------------------------------
def gen_partitions(name: str, rows: int, parts: int = N_NODES,
                   unit_rows: int = 0) -> list[Path]:
    """Write ``rows`` synthetic rows to ``parts`` Parquet files (cached by name and size).

    Columns: ``id`` BIGINT, ``grp`` VARCHAR (10 categories g0…g9), ``x`` DOUBLE in
    [0, 1000), ``k`` BIGINT in [0, 100). Row i goes to partition ``i % parts``.
    With ``unit_rows`` > 0, also ``unit`` BIGINT (a privacy unit): ``unit_rows`` consecutive
    rows of one partition share a unit, so every unit lives at exactly one node.
    """
    out = DATA / f"{name}_{rows}"
    paths = [out / f"part{i}.parquet" for i in range(parts)]
    if all(p.is_file() for p in paths):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    unit = (f",\n        (range // {parts * unit_rows}) * {parts} + range % {parts} AS unit"
            if unit_rows > 0 else "")
    con.execute(f"""CREATE TABLE src AS SELECT
        range AS id,
        'g' || CAST(hash(range) % 10 AS VARCHAR) AS grp,
        CAST(hash(range * 7 + 1) % 1000000 AS DOUBLE) / 1000.0 AS x,
        CAST(hash(range * 13 + 5) % 100 AS BIGINT) AS k{unit}
        FROM range({int(rows)})""")
    for i, p in enumerate(paths):
        tmp = p.with_suffix(".tmp")
        con.execute(f"COPY (SELECT * FROM src WHERE id % {parts} = {i} ORDER BY id) "
                    f"TO '{tmp}' (FORMAT parquet)")
        tmp.rename(p)
    con.close()
    return paths


# -- timing ------------------------------------------------------------------------------
def time_runs(fn: Callable[[], Any], runs: int, warmup: int = 2) -> tuple[list[float], Any]:
    """Seconds per run after ``warmup`` unmeasured runs; also the last result."""
    result = None
    for _ in range(warmup):
        result = fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        result = fn()
        out.append(time.perf_counter() - t)
    return out, result


def time_interleaved(fns: dict[str, Callable[[], Any]], runs: int, warmup: int = 2
                     ) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Like :func:`time_runs` for several variants, run in turn (a, b, c, a, b, c, …) so
    that background load on a shared machine hits every variant alike; the ratio of two
    variants is then taken from the same stretch of time."""
    results: dict[str, Any] = {}
    for _ in range(warmup):
        for name, fn in fns.items():
            results[name] = fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t)
    return times, results


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def p95(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(0.95 * (len(s) - 1)))]


def fmt_s(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s * 1000:.2f} ms" if s < 1 else f"{s:.3f} s"


@dataclass
class Row:
    name: str
    baseline: str
    bulle: str
    ratio: str
    target: str
    ok: bool | None

    @property
    def verdict(self) -> str:
        return "—" if self.ok is None else ("pass" if self.ok else "MISS")


def print_table(rows: list[Row]) -> str:
    head = ("name", "baseline", "bulle", "ratio", "target", "target met")
    cells = [head, *((r.name, r.baseline, r.bulle, r.ratio, r.target, r.verdict) for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["| " + " | ".join(c[i].ljust(widths[i]) for i in range(len(head))) + " |"
             for c in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    text = "\n".join(lines)
    print(text)
    return text


# -- processes ---------------------------------------------------------------------------
def _die_with_parent() -> None:  # runs in the child before exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml_str(p: Path | str) -> str:
    return json.dumps(str(p))  # a JSON string is a valid TOML basic string


@dataclass
class Dataset:
    table: str
    sources: list[Path]  # one per node; a node with no source does not publish it
    tier: str = "restricted"
    min_count: int = 0
    round_to: int = 1
    privacy_unit: str = ""
    # restricted tier, the cell key method (nodes/_config.py): e.g. {"perturb": False} (exact
    # release: the nodes then get BULLE_ALLOW_EXACT_RELEASE=1), {"max_perturbation": 4,
    # "variance": 3.0, "magnitude": 0.2}; empty: the node's defaults (perturbed)
    cell_key: dict[str, Any] = field(default_factory=dict)
    unit_level: str = ""  # "" (the node's default, person) or "institution"
    # operator-side row filter per node (same length as sources), e.g. "school = 'GP'"
    filters: list[str] | None = None
    # sensitive tier (DP)
    max_rows_per_unit: int = 0  # 0: the node's default
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)
    public_domains: dict[str, list[Any]] = field(default_factory=dict)


def _toml_inline(d: dict[str, Any]) -> str:
    """An inline TOML table of lists or scalars (JSON literals are valid TOML values)."""
    return "{ " + ", ".join(
        f"{k} = {json.dumps(list(v) if isinstance(v, (list, tuple)) else v)}"
        for k, v in d.items()) + " }"


def exact_release_env(datasets: list[Dataset]) -> dict[str, str]:
    """The nodes' environment: BULLE_ALLOW_EXACT_RELEASE=1 only when a dataset asks for an
    unperturbed restricted tier (nodes refuse ``perturb = false`` otherwise)."""
    exact = any(ds.cell_key.get("perturb") is False for ds in datasets)
    return {**CHILD_ENV, **({"BULLE_ALLOW_EXACT_RELEASE": "1"} if exact else {})}


@dataclass
class Federation:
    datasets: list[Dataset]
    threads: int = 1
    memory_limit: str = "2GB"  # per node (DuckDB), tables included
    http: bool = True
    board_public_key: Path | None = None  # nodes and coordinator verify grants with it
    projects: tuple[Any, ...] = ()  # ProjectConfig for the coordinator (sensitive tier)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bulle-bench-")))
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    http_url: str = ""
    coordinator: Any = None
    coordinator_options: dict[str, Any] = field(default_factory=dict)  # e.g. node_timeout_s

    @property
    def node_ids(self) -> list[str]:
        return [f"n{i}" for i in range(N_NODES)]

    def start(self) -> Federation:
        from dataclasses import fields as dc_fields

        from federation._certs import make_certs
        from nodes._config import NodeConfig

        certs = make_certs(self.workdir / "certs", self.node_ids)
        self.certs = certs
        # the node config has changed over time: log_dir (audit JSONL) → state_dir (ledger,
        # audit chain in SQLite); write what this tree's NodeConfig knows
        node_keys = {f.name for f in dc_fields(NodeConfig)}
        node_env = exact_release_env(self.datasets)
        for i, nid in enumerate(self.node_ids):
            cfg = self.workdir / f"{nid}.toml"
            dirs = [f"{key} = {_toml_str(self.workdir / sub / nid)}"
                    for key, sub in (("log_dir", "logs"), ("state_dir", "state"))
                    if key in node_keys]
            if self.board_public_key is not None:
                dirs.append(f"board_public_key = {_toml_str(self.board_public_key)}")
            lines = [f'node_id = "{nid}"', 'listen = "127.0.0.1:0"', *dirs, "",
                     "[tls]", f"cert = {_toml_str(certs / f'{nid}.pem')}",
                     f"key = {_toml_str(certs / f'{nid}.key')}",
                     f"client_ca = {_toml_str(certs / 'ca.pem')}", "",
                     "[engine]", f"threads = {self.threads}",
                     f"memory_limit = {_toml_str(self.memory_limit)}", ""]
            for ds in self.datasets:
                if i >= len(ds.sources) or ds.sources[i] is None:
                    continue
                lines += ["[[dataset]]", f'table = "{ds.table}"',
                          f"source = {_toml_str(ds.sources[i])}", f'tier = "{ds.tier}"']
                if ds.filters and ds.filters[i]:
                    lines.append(f"filter = {_toml_str(ds.filters[i])}")
                if ds.tier == "restricted":
                    lines += [f"min_count = {ds.min_count}", f"round_to = {ds.round_to}"]
                    if ds.cell_key:
                        lines.append(f"cell_key = {_toml_inline(ds.cell_key)}")
                    if ds.unit_level:
                        lines.append(f'unit_level = "{ds.unit_level}"')
                if ds.privacy_unit:
                    lines.append(f'privacy_unit = "{ds.privacy_unit}"')
                if ds.max_rows_per_unit:
                    lines.append(f"max_rows_per_unit = {ds.max_rows_per_unit}")
                if ds.bounds:
                    lines.append(f"bounds = {_toml_inline(ds.bounds)}")
                if ds.public_domains:
                    lines.append(f"public_domains = {_toml_inline(ds.public_domains)}")
                lines.append("")
            cfg.write_text("\n".join(lines))
            err = (self.workdir / f"{nid}.stderr").open("wb")
            self.procs[nid] = subprocess.Popen(
                [PY, "-m", "bulle_cli", "node", "serve", "--config", str(cfg)],
                cwd=ROOT, env=node_env, stdout=subprocess.DEVNULL, stderr=err,
                preexec_fn=_die_with_parent)
        for nid in self.node_ids:
            self.ports[nid] = self._wait_log(nid, re.compile(rb"\(port (\d+), mutual TLS\)"),
                                             timeout=120)
        from federation._config import CoordinatorConfig, NodeEndpoint, Researcher, hash_token
        from federation._coordinator import Coordinator

        extra: dict[str, Any] = {}
        self.coord_has_state = "state_dir" in {f.name for f in dc_fields(CoordinatorConfig)}
        if self.coord_has_state:  # else the coordinator keeps its ledger under the cwd
            extra["state_dir"] = self.workdir / "coordinator-state"
        if self.projects or self.board_public_key is not None:
            extra["projects"] = self.projects
            extra["board_public_key"] = self.board_public_key
        self.coord_config = CoordinatorConfig(
            listen="127.0.0.1:0", cert=certs / "bulle-coordinator.pem",
            key=certs / "bulle-coordinator.key", ca=certs / "ca.pem",
            nodes=tuple(NodeEndpoint(n, f"127.0.0.1:{p}") for n, p in self.ports.items()),
            researchers=(Researcher("bench", hash_token(TOKEN), ("bench",)),),
            **extra, **self.coordinator_options,
        )
        self.researcher = self.coord_config.researchers[0]
        if self.http:  # fork before this process starts gRPC threads
            self._start_http()
        self.coordinator = Coordinator(self.coord_config)
        return self

    def _wait_log(self, nid: str, pattern: re.Pattern[bytes], timeout: float) -> int:
        path = self.workdir / f"{nid}.stderr"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = pattern.search(path.read_bytes())
            if m:
                return int(m.group(1))
            if self.procs[nid].poll() is not None:
                raise RuntimeError(f"{nid} exited: {path.read_text()[-2000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"{nid} not ready after {timeout} s: {path.read_text()[-2000:]}")

    def _start_http(self) -> None:
        import httpx

        port = free_port()
        cfg = self.workdir / "coordinator.toml"
        state = self.workdir / "coordinator-http-state"
        lines = [f'listen = "127.0.0.1:{port}"',
                 *([f"state_dir = {_toml_str(state)}"] if self.coord_has_state else []),
                 "", "[tls]",
                 f"cert = {_toml_str(self.coord_config.cert)}",
                 f"key = {_toml_str(self.coord_config.key)}",
                 f"ca = {_toml_str(self.coord_config.ca)}", ""]
        for n in self.coord_config.nodes:
            lines += ["[[node]]", f'id = "{n.id}"', f'address = "{n.address}"', ""]
        lines += ["[[researcher]]", 'name = "bench"',
                  f'token_sha256 = "{self.researcher.token_sha256}"', 'projects = ["bench"]']
        cfg.write_text("\n".join(lines))
        err = (self.workdir / "coordinator.stderr").open("wb")
        self.procs["coordinator"] = subprocess.Popen(
            [PY, "-m", "bulle_cli", "coordinator", "serve", "--config", str(cfg)],
            cwd=ROOT, env=CHILD_ENV, stdout=subprocess.DEVNULL, stderr=err,
            preexec_fn=_die_with_parent)
        self.http_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.procs["coordinator"].poll() is not None:
                raise RuntimeError("coordinator exited: "
                                   + (self.workdir / "coordinator.stderr").read_text()[-2000:])
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.http_url}/v1/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError("coordinator HTTP API not ready")

    def released_ms(self, nid: str) -> list[float]:
        """The node's own engine time ("ms") of every released plan so far, from its audit
        log: JSONL under log_dir (older nodes) or the SQLite audit chain under state_dir."""
        return [d["ms"] for d in self.released_entries(nid) if "ms" in d]

    def released_entries(self, nid: str) -> list[dict[str, Any]]:
        """The audit detail of every plan node ``nid`` released so far, in order (``ms``:
        its engine time; ``tables``: the tables the plan read, on nodes that log them)."""
        jsonl = self.workdir / "logs" / nid / "audit.jsonl"
        if jsonl.is_file():
            rows = [json.loads(x) for x in jsonl.read_text().splitlines() if x.strip()]
            return [r for r in rows if r.get("decision") == "released"]
        db = self.workdir / "state" / nid / "audit.sqlite"
        if db.is_file():
            import sqlite3

            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
            try:
                rows = con.execute("SELECT detail FROM audit_entries WHERE action = 'released' "
                                   "ORDER BY seq").fetchall()
            finally:
                con.close()
            return [json.loads(r[0]) for r in rows]
        return []

    def node_stub(self, nid: str) -> Any:
        """A NodeStub for one node, with the coordinator's client certificate."""
        import grpc

        from federation._nodes import MAX_MESSAGE, client_credentials
        from federation.proto import bulle_pb2_grpc as pb_grpc

        channel = grpc.secure_channel(
            f"127.0.0.1:{self.ports[nid]}", client_credentials(self.coord_config),
            options=[("grpc.max_receive_message_length", MAX_MESSAGE)])
        return channel, pb_grpc.NodeStub(channel)

    def stop(self) -> None:
        if self.coordinator is not None:
            with contextlib.suppress(Exception):
                self.coordinator.close()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if not os.environ.get("BULLE_BENCH_KEEP"):  # certs, keys, node state and logs
            shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def federation(datasets: list[Dataset], **kw: Any) -> Iterator[Federation]:
    fed = Federation(datasets, **kw)
    try:
        yield fed.start()
    finally:
        fed.stop()


def finish(details: dict[str, Any], failures: list[str], path: Path, ok: str) -> int:
    """Save the run's details as JSON; exit status 1 (and say which) on a wrong answer."""
    details["failures"] = failures
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(details, indent=1, default=str))
    if failures:
        print("\nWRONG ANSWERS:\n  " + "\n  ".join(failures))
        return 1
    print(ok)
    return 0


def cpu_info() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores, {model}"


def tree_info() -> str:
    """Which code is measured: the git commit of ROOT (+dirty), or a snapshot's SNAPSHOT file."""
    snap = ROOT / "SNAPSHOT"
    if snap.is_file():
        return snap.read_text().strip()
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               check=True).stdout.strip()
        return f"{ROOT} @ {head}" + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return f"{ROOT} (not a git checkout)"


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
