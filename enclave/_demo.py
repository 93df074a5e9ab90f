"""The demo federation on one machine: five node agents on real open data, the
coordinator, and JupyterHub (started after the coordinator, its service).
``bulle demo up`` is idempotent; ``down`` stops what ``up`` started, by PID.

Run as root, every process gets the least privilege its job needs (DESIGN.md "Processes
and users"): the node agents run as ``bulle-node`` on their own copies of the open data
(``node-data/``), owning their state and keys; the coordinator, its SuperLink, the hub
and its proxy as ``bulle-coord``; each notebook runs as ``jupyter-<account>``, in a mount
namespace where the source data folder is hidden, started by the one root process left, the
spawn broker (``enclave/_spawnbroker.py``: it answers only the hub's user). Files: 0600,
folders 0700, public certificates and keys 0644 in traversable-only folders.
Not root: one user, as before.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from enclave import _users as users

REPO = Path(__file__).resolve().parents[1]
NODE_CONFIGS = REPO / "deploy" / "demo" / "nodes"
NODES = ("region-gp", "region-ms", "region-35", "vendor-a", "vendor-b", "depp")
RESEARCHER = "demo-researcher"
PROJECT = "demo"
# what the demo grant covers: DP queries on student_assessment, DP training on the lycée tables
GRANT_DATASETS = ("student_assessment", "lycee_students", "lycee_students_math")
GRANT_EPSILON = 10.0
# Hub accounts (name → role); passwords are generated and printed once by `up`.
HUB_ACCOUNTS = {"demo-researcher": "researcher", "other-researcher": "researcher",
                "demo-board": "ethics-board", "demo-operator": "node-operator",
                "demo-observer": "observer", "demo-admin": "admin"}
# The standing indicator the demo ships, approved at setup (federation/_indicators.py):
# restricted tier (cell key method), so no ε; refreshed hourly by the coordinator.
INDICATOR = {"name": "college-6e-35", "title": "Pupils in 6e in the collèges of "
             "Ille-et-Vilaine, by rentrée", "schedule": "hourly",
             "sql": "SELECT rentree_scolaire, SUM(nombre_total_de_6emes) AS pupils_6e FROM "
                    "college_headcounts GROUP BY rentree_scolaire ORDER BY rentree_scolaire",
             "audience": "the State (rectorat de Rennes) and the département 35",
             "description": "Headcounts of 6e in the 117 collèges, perturbed by the cell key "
                            "method at the region's node.", "value_column": "pupils_6e"}
HUB_PORTS = ("hub", "hub-api", "hub-proxy-api")
OPERATOR, OPERATOR_NODE = "demo-operator", "vendor-a"  # [operators] of the coordinator
# DP training (issue 6): the coordinator's SuperLink, and the nodes that run a SuperNode
TRAINING_NODES = ("vendor-a", "vendor-b")
COORDINATOR_KEY = "coordinator_ed25519.pem"  # run authorisations (public half: .pub.pem)
EXAMPLE = ("SELECT school, sex, COUNT(*) AS pupils, AVG(g3) AS mean_final_grade "
           "FROM lycee_students GROUP BY school, sex ORDER BY school, sex")


def default_state() -> Path:
    return Path(os.environ.get("BULLE_DEMO_STATE", REPO / ".bulle-demo")).resolve()


def default_data() -> Path:
    env = os.environ.get("BULLE_DATA")
    return Path(env).resolve() if env else (REPO.parent / "shared" / "data").resolve()


def _free_port(preferred: int | None = None) -> int:
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Demo:
    def __init__(self, state: Path | None = None, data: Path | None = None) -> None:
        self.state = state or default_state()
        self.data = data or default_data()
        self.pids_file = self.state / "pids.json"
        self.info_file = self.state / "demo.json"
        self.accounts: dict[str, users.Account] = {}  # role → service account (as root)
        self._namespaces: bool | None = None

    # -- state ------------------------------------------------------------------------
    def _read(self, path: Path) -> dict:
        return json.loads(path.read_text()) if path.exists() else {}

    def _token(self) -> str:
        path = self.state / "researcher.token"
        if not path.exists():
            path.write_text(secrets.token_urlsafe(32))
            path.chmod(0o600)
        return path.read_text().strip()

    def info(self) -> dict:
        return self._read(self.info_file)

    def running(self) -> dict[str, int]:
        return {name: pid for name, pid in self._read(self.pids_file).items() if _alive(pid)}

    def healthy(self) -> bool:
        info = self.info()
        if not info or not {*self.node_ids(), "coordinator", "hub"} <= set(self.running()):
            return False
        try:
            return httpx.get(info["url"] + "/v1/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def extra_nodes(self) -> dict[str, dict]:
        """Nodes added to the running demo by ``add-node``: id → config, port."""
        return self.info().get("extra_nodes", {})

    def node_ids(self) -> list[str]:
        return [*NODES, *self.extra_nodes()]

    # -- up / down --------------------------------------------------------------------
    def up(self, log=print) -> dict:
        if self.healthy():
            log("The demo federation is already running.")
            return self.info()
        self.down(quiet=True)
        if not (self.data / "uci-student-performance" / "student-por.csv").exists():
            raise SystemExit(f"demo data not found under {self.data}: pass --data DIR or set "
                             "BULLE_DATA to the shared/data folder")
        umask = os.umask(0o077) if users.is_root() else None  # as root: private by default
        try:
            return self._up(log)
        finally:
            if umask is not None:
                os.umask(umask)

    def _up(self, log) -> dict:
        started = time.monotonic()
        extra = self.extra_nodes()  # kept across `up`: the coordinator's registry has them
        ports, env = self._prepare()
        pids: dict[str, int] = {}
        try:
            self._superlink(ports, env, pids)  # before the nodes: their SuperNodes dial it
            node_env = {**env, "BULLE_DATA": str(self._node_data())}
            for name in NODES:
                flower = (["--superlink", f"127.0.0.1:{ports['superlink']}"]
                          if name in TRAINING_NODES else [])
                pids[name] = self._spawn(name, ["node", "serve", "--config",
                                                str(NODE_CONFIGS / f"{name}.toml"),
                                                "--listen", f"127.0.0.1:{ports[name]}",
                                                *flower], node_env, "node")
                self.pids_file.write_text(json.dumps(pids))
            for name in NODES:
                self._wait(name, pids[name], ports[name], 120)
                log(f"  node {name:<10} ready on 127.0.0.1:{ports[name]}")
            for name, e in extra.items():  # on the port the coordinator's registry has
                port = _free_port(e["port"])
                pids[name] = self._start_node(name, Path(e["config"]), port, node_env)
                self.pids_file.write_text(json.dumps(pids))
                if port != e["port"]:  # taken meanwhile: the registry learns the new one
                    self._register(name, port)
                    e["port"] = port
                log(f"  node {name:<10} ready on 127.0.0.1:{e['port']} (added)")
            cfg = self.state / "coordinator.toml"
            pids["coordinator"] = self._spawn("coordinator",
                                              ["coordinator", "serve", "--config", str(cfg)],
                                              env, "coord")
            self.pids_file.write_text(json.dumps(pids))
            self._wait("coordinator", pids["coordinator"], ports["coordinator"], 60)
            # The hub after its external service (else it waits 30 s for it: TRAPS.md).
            passwords = self._hub(ports, env, pids)
        except Exception:
            self.down(quiet=True)
            raise
        url = f"http://127.0.0.1:{ports['coordinator']}"
        info = {"url": url, "ports": ports, "researcher": RESEARCHER, "project": PROJECT,
                "state": str(self.state), "started_in_s": round(time.monotonic() - started, 1),
                "hub_url": f"http://127.0.0.1:{ports['hub']}", "accounts": HUB_ACCOUNTS,
                "processes": self._process_note(), "extra_nodes": extra}
        self.info_file.write_text(json.dumps(info, indent=2))
        return {**info, "passwords": passwords}  # shown once, never stored in clear

    # -- one more node -----------------------------------------------------------------
    def add_node(self, config: Path, log=print) -> dict:
        """Start the node of ``config`` in the running demo and register it with the
        coordinator (``bulle coordinator nodes add``, as the coordinator's user): the
        coordinator takes it up without a restart; ``status``, ``down`` and ``up`` know it.
        Its certificate is issued by the demo's CA when the config names one in the demo's
        ``certs/`` that does not exist yet."""
        from nodes import ConfigError, load_node_config

        config = config.resolve()
        if not self.info() or "coordinator" not in self.running():
            raise RuntimeError("the demo is not running: start it with `bulle demo up`")
        if users.is_root():
            self.accounts = {"node": users.ensure_service_user(users.NODE_USER),
                             "coord": users.ensure_service_user(users.COORD_USER)}
        node_env = {**os.environ, "BULLE_DATA": str(self._node_data()),
                    "BULLE_DEMO_STATE": str(self.state)}
        saved = {k: os.environ.get(k) for k in ("BULLE_DATA", "BULLE_DEMO_STATE")}
        os.environ.update({k: node_env[k] for k in saved})  # what the config expands
        try:
            cfg = load_node_config(config)
        except ConfigError as e:
            raise RuntimeError(f"{config}: {e}") from None
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        name = cfg.node_id
        if name in self.node_ids() or name in ("coordinator", "hub", "superlink"):
            raise RuntimeError(f"node {name!r} is already in the demo federation")
        if not cfg.tls.cert.exists():
            if cfg.tls.cert.parent != self.state / "certs":
                raise RuntimeError(
                    f"{cfg.tls.cert} does not exist: make the node's keys with `bulle node "
                    f"keygen` and sign them with `bulle certs sign --ca {self.state / 'certs'}`")
            from federation._certs import make_certs

            make_certs(self.state / "certs", [name])
        if self.accounts:
            self._copy_node_data([config])
            (self.state / "nodes").mkdir(exist_ok=True)
            self._secure()
            if cfg.tls.key.parent == self.state / "certs":  # not yet one of node_ids()
                users.own(cfg.tls.key, self.accounts["node"], 0o600)
        port = _free_port()
        pid = self._start_node(name, config, port, node_env)
        pids = {**self._read(self.pids_file), name: pid}
        self.pids_file.write_text(json.dumps(pids))
        self._register(name, port)
        info = self.info()
        info.setdefault("extra_nodes", {})[name] = {"config": str(config), "port": port}
        self.info_file.write_text(json.dumps(info, indent=2))
        log(f"node {name} added on 127.0.0.1:{port}: the coordinator routes to it within "
            "a second (bulle demo status lists it)")
        return info["extra_nodes"][name]

    def _start_node(self, name: str, config: Path, port: int, env: dict[str, str]) -> int:
        pid = self._spawn(name, ["node", "serve", "--config", str(config),
                                 "--listen", f"127.0.0.1:{port}"], env, "node")
        self._wait(name, pid, port, 120)
        return pid

    def _register(self, name: str, port: int) -> None:
        """``bulle coordinator nodes add`` as the coordinator's user (its database)."""
        account = self.accounts.get("coord")
        kw = {"user": account.uid, "group": account.gid, "extra_groups": []} if account \
            else {}
        r = subprocess.run([sys.executable, "-m", "bulle_cli", "coordinator", "nodes", "add",
                            name, f"127.0.0.1:{port}", "--config",
                            str(self.state / "coordinator.toml"), "--actor", "bulle demo"],
                           capture_output=True, text=True, cwd=REPO, env={
                               **os.environ, "HOME": str(self.state / "coordinator")}, **kw)
        if r.returncode != 0:
            raise RuntimeError(f"registering {name} failed: {(r.stderr or r.stdout).strip()}")

    def _prepare(self) -> tuple[dict[str, int], dict[str, str]]:
        """Everything on disk before the first process starts: certificates, keys, the
        board's grant, the nodes' data copies, the coordinator's config and ledger; then,
        as root, the service users and who owns what."""
        if users.is_root():
            closed = users.closed_ancestor(self.state)
            if closed is not None:
                raise RuntimeError(f"the state folder {self.state} is below {closed}, which "
                                   f"{users.NODE_USER} and {users.COORD_USER} cannot enter: "
                                   "pick another --state")
            self.accounts = {"node": users.ensure_service_user(users.NODE_USER),
                             "coord": users.ensure_service_user(users.COORD_USER)}
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / "logs").mkdir(exist_ok=True)
        from federation._certs import make_certs
        from nodes._flower import make_flower_key

        make_certs(self.state / "certs", [*NODES, "bulle-superlink"])
        self._board()
        for n in TRAINING_NODES:
            make_flower_key(self.state / "flower" / f"{n}.key")
        from privacy import coordinator_keys  # signs run authorisations; nodes hold .pub.pem

        coordinator_keys(self.state / "flower" / COORDINATOR_KEY)
        previous = self.info().get("ports", {})
        ports = {name: _free_port(previous.get(name))
                 for name in (*NODES, "coordinator", *HUB_PORTS, "superlink")}
        self._coordinator_config(ports)
        self._seed_projects()
        (self.state / "hub").mkdir(exist_ok=True)
        (self.state / "spawner").mkdir(exist_ok=True)
        if self.accounts:
            self._copy_node_data([*NODE_CONFIGS.glob("*.toml"),
                                  *(Path(e["config"]) for e in self.extra_nodes().values())])
            self._secure()
        return ports, {**os.environ, "BULLE_DATA": str(self.data),
                       "BULLE_DEMO_STATE": str(self.state)}

    # -- users and files (as root) ----------------------------------------------------
    def _node_data(self) -> Path:
        """What the nodes read: their own copies as root, else the source itself."""
        return self.state / "node-data" if self.accounts else self.data

    def _copy_node_data(self, configs: list[Path]) -> None:
        """The files the node configs name under ``${BULLE_DATA}``, copied (when changed)
        into ``node-data/``: the nodes' own data, which only ``bulle-node`` can read."""
        wanted = sorted({m for cfg in configs
                         for m in re.findall(r"\$\{BULLE_DATA\}/([^\"']+)", cfg.read_text())})
        for rel in wanted:
            src, dst = self.data / rel, self.state / "node-data" / rel
            if not src.is_file():
                continue  # the node reports it at start-up, with its config's path
            have = dst.stat() if dst.exists() else None
            now = src.stat()
            if have is None or (have.st_size, int(have.st_mtime)) != (now.st_size,
                                                                      int(now.st_mtime)):
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)

    def _secure(self) -> None:
        """Owners and modes. Private keys: 0600, each to the one service that uses it;
        service folders 0700 to their user; shared folders 0711 (enter, not list) with
        only public certificates and keys readable (0644); the rest root's, 0600/0700."""
        node, coord = self.accounts["node"], self.accounts["coord"]
        s = self.state
        users.own(s, None, 0o711)
        users.own(s / "logs", None, 0o700, recursive=True)
        users.own(s / "spawner", None, 0o711)  # the broker's socket: 0600, the hub's user
        keys = {**{f"{n}.key": node for n in (*self.node_ids(), *TRAINING_NODES)},
                "bulle-coordinator.key": coord, "bulle-superlink.key": coord,
                "board_ed25519.pem": coord, f"{PROJECT}.grant": coord,
                COORDINATOR_KEY: coord}
        for d in ("certs", "board", "flower"):
            users.own(s / d, None, 0o711)
            for f in (s / d).iterdir():
                public = f.name.endswith((".pub", ".pub.pem")) or (
                    d == "certs" and f.suffix == ".pem")
                users.own(f, None if public else keys.get(f.name), 0o644 if public else 0o600)
        for d, who in (("nodes", node), ("node-data", node), ("coordinator", coord),
                       ("superlink", coord), ("hub", coord)):
            (s / d).mkdir(exist_ok=True)
            users.own(s / d, who, 0o700, recursive=True)
        users.own(s / "coordinator.toml", coord, 0o600)
        for f in ("researcher.token", "pids.json", "demo.json"):
            if (s / f).exists():
                users.own(s / f, None, 0o600)

    def _process_note(self) -> str:
        if not self.accounts:
            import getpass

            return (f"not root: every process runs as {getpass.getuser()} (one user; "
                    "start the demo as root for one system user per service and person)")
        note = (f"nodes as {users.NODE_USER}, coordinator, SuperLink, hub and proxy as "
                f"{users.COORD_USER}; each notebook as its own system user "
                f"{users.PERSON_PREFIX}<account>, created at first login by the spawn "
                "broker (root, answers only the hub's user)")
        if not self._hidden():
            note += (f"; this machine has no mount namespaces, so notebooks can still read "
                     f"the open-data source {self.data} (the nodes serve their own copies)")
        return note

    def _hidden(self) -> list[str]:
        """Folders hidden from notebooks: the data source (world-readable, read-only)."""
        if self._namespaces is None:
            self._namespaces = bool(self.accounts) and users.mount_namespaces_work()
        return [str(self.data)] if self._namespaces else []

    def _spawn(self, name: str, args: list[str], env: dict[str, str], role: str | None,
               module: str = "bulle_cli", home: str | None = None) -> int:
        """Start ``python -m <module> <args>`` (``bulle <args>``) as the ``role`` service
        user (as root; ``None``: root itself), its log in ``logs/``, its working folder and
        HOME its own state folder (``home``, else the role's)."""
        cwd, kw = REPO, {}
        account = self.accounts.get(role) if role else None
        if home is not None:
            cwd = self.state / home
        if account is not None:
            cwd = self.state / (home or ("nodes" if role == "node" else "coordinator"))
            env = {**env, "HOME": str(cwd)}
            kw = {"user": account.uid, "group": account.gid, "extra_groups": [],
                  "umask": 0o077}
        with (self.state / "logs" / f"{name}.log").open("ab") as log_file:
            proc = subprocess.Popen([sys.executable, "-m", module, *args], env=env,
                                    stdout=log_file, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    cwd=cwd, **kw)
        return proc.pid

    def _wait(self, name: str, pid: int, port: int, timeout: float,
              ready: Callable[[], bool] | None = None) -> None:
        """Until ``name`` listens on ``port`` (or ``ready()``); its log's end if it dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                tail = (self.state / "logs" / f"{name}.log").read_text(errors="replace")
                tail = "\n".join(tail.splitlines()[-15:])
                raise RuntimeError(f"{name} exited during start-up; end of its log:\n{tail}")
            if ready() if ready else _port_open(port):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{name} was not ready within {timeout:g} s (port {port})")

    def _board(self) -> None:
        """The demo's ethics board: a key pair and a signed grant for the demo project."""
        from datetime import UTC, datetime, timedelta

        from privacy import Grant, generate_board_keys, sign_grant

        board = self.state / "board"
        if not (board / "board_ed25519.pem").exists():
            generate_board_keys(board)
        grant_file = board / f"{PROJECT}.grant"
        if not grant_file.exists():
            now = datetime.now(UTC)
            grant = Grant(PROJECT, (RESEARCHER,), GRANT_DATASETS, GRANT_EPSILON, 1e-6,
                          now + timedelta(days=90), "Demo: learning traces and success "
                          "(research only, no decision about a pupil)", now)
            grant_file.write_text(sign_grant(grant, (board / "board_ed25519.pem").read_bytes()))

    def _coordinator_config(self, ports: dict[str, int]) -> Path:
        from federation._config import hash_token

        certs = self.state / "certs"
        board = self.state / "board"
        lines = [
            "# Generated by `bulle demo up`; edit deploy/demo or enclave/_demo.py instead.",
            f'listen = "127.0.0.1:{ports["coordinator"]}"',
            "node_timeout_s = 30",
            f'state_dir = "{self.state / "coordinator"}"',
            f'board_public_key = "{board / "board_ed25519.pub.pem"}"',
            "",
            "[tls]",
            f'cert = "{certs / "bulle-coordinator.pem"}"',
            f'key = "{certs / "bulle-coordinator.key"}"',
            f'ca = "{certs / "ca.pem"}"',
        ]
        for name in NODES:
            lines += ["", "[[node]]", f'id = "{name}"', f'address = "127.0.0.1:{ports[name]}"']
        lines += ["", "[[project]]", f'name = "{PROJECT}"',
                  f'grant = "{board / (PROJECT + ".grant")}"', "default_epsilon = 0.5",
                  "# OULAD learners can take modules at both vendors: not disjoint",
                  "nodes_disjoint = false"]
        lines += ["", "[[researcher]]", f'name = "{RESEARCHER}"',
                  f'token_sha256 = "{hash_token(self._token())}"', f'projects = ["{PROJECT}"]']
        # The coordinator as the hub's `bulle` service. The demo's board service signs
        # grants with the demo board key; in production that key stays with the board.
        at = next(i for i, line in enumerate(lines) if line.startswith("board_public_key"))
        lines.insert(at + 1, f'board_private_key = "{board / "board_ed25519.pem"}"')
        lines += ["", "[training]", f'superlink = "127.0.0.1:{ports["superlink"]}"',
                  f'root_certificates = "{certs / "ca.pem"}"',
                  f'control_token_file = "{self.state / "superlink" / "control.token"}"',
                  f'signing_key = "{self.state / "flower" / COORDINATOR_KEY}"',
                  f'work_dir = "{self.state / "coordinator" / "training"}"',
                  "node_keys = { " + ", ".join(
                      f'"{n}" = "{self.state / "flower" / (n + ".pub")}"'
                      for n in TRAINING_NODES) + " }"]
        # The demo operator runs vendor-a: they see its pages and land on them.
        lines += ["", "[operators]", f'"{OPERATOR}" = ["{OPERATOR_NODE}"]']
        lines += ["", "[hub]", f'api_url = "http://127.0.0.1:{ports["hub-api"]}/hub/api"',
                  f'public_url = "http://127.0.0.1:{ports["hub"]}"', 'service_name = "bulle"',
                  f'api_token_file = "{self._service_token()}"', "cache_s = 5"]
        path = self.state / "coordinator.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def down(self, quiet: bool = False, log=print) -> list[str]:
        pids = {n: p for n, p in self._read(self.pids_file).items() if _alive(p)}
        # Found before anything stops: the proxy, SuperNodes, each notebook server (its
        # own user and session) and its kernels.
        below = users.process_tree(list(pids.values()))
        stopped = []
        for name, pid in pids.items():
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                os.kill(pid, signal.SIGTERM)
            except PermissionError:
                raise SystemExit("bulle demo: the demo runs under other users; stop it as "
                                 "the user who started it (root)") from None
            stopped.append(name)
        deadline = time.monotonic() + 15
        for pid in pids.values():
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5  # the hub stops its servers; what it could not:
        while users.still_running(below) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in users.still_running(below):
            os.kill(pid, signal.SIGKILL)
        proxy = self.state / "hub" / "proxy.pid"  # the hub stops its proxy; if it died first
        if proxy.exists():
            pid = int(proxy.read_text().strip() or 0)
            if pid and _alive(pid):
                os.kill(pid, signal.SIGTERM)
            proxy.unlink(missing_ok=True)
        self.pids_file.unlink(missing_ok=True)
        if not quiet:
            log(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")
        return stopped

    def env_lines(self) -> str:
        info = self.info()
        if not info:
            raise SystemExit("the demo is not set up: run `bulle demo up` first")
        hub = f" BULLE_HUB_URL={info['hub_url']}" if info.get("hub_url") else ""
        return f"export BULLE_URL={info['url']} BULLE_TOKEN={self._token()}{hub}"

    # -- the hub ----------------------------------------------------------------------
    def _service_token(self) -> Path:
        """The `bulle` service's hub API token (the coordinator's OAuth client secret), in
        the coordinator's folder (the hub, root, reads it there too)."""
        path = self.state / "coordinator" / "hub-service.token"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        return path

    def _seed_projects(self) -> None:
        """A pending project, so the board has something to decide in the demo; the demo's
        standing indicator, approved."""
        from federation._registry import Registry

        (self.state / "coordinator").mkdir(parents=True, exist_ok=True)
        registry = Registry(str(self.state / "coordinator" / "ledger.sqlite"))
        try:
            if registry.get("dropout-signals") is None:
                registry.submit(
                    RESEARCHER, name="dropout-signals",
                    title="Early signals of dropout in online courses",
                    purpose="Describe how assessment scores and submission delays evolve "
                    "before withdrawal, per module, to inform tutoring policy. Research only: "
                    "no decision about any learner.", datasets=["student_assessment"],
                    epsilon=3.0, delta=1e-6, duration_days=180, team=[RESEARCHER])
        finally:
            registry.close()
        from federation import IndicatorSpec, seed_indicator

        seed_indicator(str(self.state / "coordinator" / "ledger.sqlite"),
                       (self.state / "board" / "board_ed25519.pem").read_bytes(),
                       self.state / "coordinator" / "audit.sqlite", RESEARCHER,
                       IndicatorSpec(**INDICATOR), "restricted", ["college_headcounts"])

    def _hub(self, ports: dict[str, int], env: dict[str, str],
             pids: dict[str, int]) -> dict[str, str]:
        """Start JupyterHub (demo accounts, the coordinator as its service); returns the
        passwords generated for new accounts (empty when they already existed)."""
        from enclave._hub import write_users

        hub_state = self.state / "hub"
        passwords = write_users(hub_state / "users.json", HUB_ACCOUNTS)
        hub_env = {**env, "BULLE_HUB_STATE": str(hub_state),
                   "BULLE_HUB_PORT": str(ports["hub"]),
                   "BULLE_HUB_API_PORT": str(ports["hub-api"]),
                   "BULLE_HUB_PROXY_API_PORT": str(ports["hub-proxy-api"]),
                   "BULLE_COORDINATOR_URL": f"http://127.0.0.1:{ports['coordinator']}",
                   "BULLE_HUB_SERVICE_TOKEN_FILE": str(self._service_token())}
        if self.accounts:  # root: the hub as the coordinator's user, servers by the broker
            hub_env.pop("BULLE_DATA", None)
            users.own(hub_state / "users.json", self.accounts["coord"], 0o600)
            sock = self.state / "spawner" / "spawn.sock"
            pids["spawnbroker"] = self._spawn("spawnbroker", [
                "--socket", str(sock), "--hub-user", users.COORD_USER,
                "--singleuser", str(Path(sys.executable).parent / "jupyterhub-singleuser"),
                "--hide", os.pathsep.join(self._hidden())], env, None,
                module="enclave._spawnbroker")
            self.pids_file.write_text(json.dumps(pids))
            self._wait("spawnbroker", pids["spawnbroker"], 0, 30, ready=sock.exists)
            hub_env["BULLE_HUB_SPAWN_SOCKET"] = str(sock)
        pids["hub"] = self._spawn("hub", ["-f", str(REPO / "jupyterhub_config.py")], hub_env,
                                  "coord", module="jupyterhub", home="hub")
        self.pids_file.write_text(json.dumps(pids))
        self._wait("hub", pids["hub"], ports["hub"], 90)
        deadline = time.monotonic() + 90
        while True:  # the proxy listens first; the hub answers once routes are set
            try:
                if httpx.get(f"http://127.0.0.1:{ports['hub']}/hub/api/", timeout=2
                             ).status_code == 200:
                    return passwords
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or not _alive(pids["hub"]):
                raise RuntimeError("the hub did not answer within 90 s; see logs/hub.log")
            time.sleep(0.2)

    # -- DP training ------------------------------------------------------------------
    def _superlink(self, ports: dict[str, int], env: dict[str, str],
                   pids: dict[str, int]) -> None:
        """The coordinator's Flower SuperLink (fenced Control API), and the training nodes'
        SuperNode keys, registered before the nodes start (an unknown key is refused)."""
        from federation._superlink import control_client, control_token, register_nodes
        from nodes._flower import make_flower_key

        certs, sl = self.state / "certs", self.state / "superlink"
        token_file = sl / "control.token"
        keys = {n: make_flower_key(self.state / "flower" / f"{n}.key") for n in TRAINING_NODES}
        pids["superlink"] = self._spawn("superlink", [
            "coordinator", "superlink", "--state", str(sl), "--port", str(ports["superlink"]),
            "--cert", str(certs / "bulle-superlink.pem"),
            "--key", str(certs / "bulle-superlink.key"), "--ca", str(certs / "ca.pem"),
            "--control-token-file", str(token_file)], env, "coord")
        self.pids_file.write_text(json.dumps(pids))
        self._wait("superlink", pids["superlink"], ports["superlink"], 60)
        client = control_client(f"127.0.0.1:{ports['superlink']}", certs / "ca.pem",
                                control_token(token_file))
        try:
            register_nodes(client, {n: k for n, k in keys.items()})
        finally:
            client.close()
