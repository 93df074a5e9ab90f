"""``Demo``: the demo federation on one machine, five node agents on real open data (and
any added with ``add-node``), the coordinator with its Flower SuperLink, and JupyterHub
(started after the coordinator, its service). ``up`` is idempotent; ``down`` stops what
``up`` started, by PID.

Run as root, every process gets the least privilege its job needs (``_hosts``); each
notebook runs as ``jupyter-<account>``, in a mount namespace where the source data folder
is hidden, started by the one root process left, the spawn broker (``enclave``'s: it
answers only the hub's user). Not root: one user, as before.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from bulle_demo import _hosts as hosts
from bulle_demo._layout import (
    HUB_ACCOUNTS,
    HUB_PORTS,
    NODES,
    PROJECT,
    RESEARCHER,
    TRAINING_NODES,
    coordinator_config,
    default_data,
    default_state,
    hub_config,
    make_keys,
    node_config,
    node_configs,
    researcher_token,
    service_token,
)
from bulle_demo._procs import Pids, free_port, port_open, spawn, stop, stop_pid_file, wait_ready
from bulle_demo._seed import bulle, seed_indicator, seed_pending_project
from enclave import PERSON_PREFIX, Account, is_root, mount_namespaces_work, own


class Demo:
    def __init__(self, state: Path | None = None, data: Path | None = None) -> None:
        self.state = (state or default_state()).resolve()
        self.data = (data or default_data()).resolve()
        self.pids = Pids(self.state / "pids.json")
        self.info_file = self.state / "demo.json"
        self.accounts: dict[str, Account] = {}  # role → service account (as root)
        self._namespaces: bool | None = None

    # -- state ------------------------------------------------------------------------
    def info(self) -> dict:
        return json.loads(self.info_file.read_text()) if self.info_file.exists() else {}

    def running(self) -> dict[str, int]:
        return self.pids.running()

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

    def env_lines(self) -> str:
        info = self.info()
        if not info:
            raise SystemExit("the demo is not set up: run `bulle demo up` first")
        hub = f" BULLE_HUB_URL={info['hub_url']}" if info.get("hub_url") else ""
        return (f"export BULLE_URL={info['url']} BULLE_TOKEN={researcher_token(self.state)}"
                f"{hub}")

    # -- up / down --------------------------------------------------------------------
    def up(self, log=print) -> dict:
        if self.healthy():
            log("The demo federation is already running.")
            return self.info()
        self.down(quiet=True)
        if not (self.data / "uci-student-performance" / "student-por.csv").exists():
            raise SystemExit(f"demo data not found under {self.data}: pass --data DIR or set "
                             "BULLE_DATA to the shared/data folder")
        umask = os.umask(0o077) if is_root() else None  # as root: private by default
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
                                                str(node_config(name)), "--listen",
                                                f"127.0.0.1:{ports[name]}", *flower],
                                         node_env, "node")
                self.pids.write(pids)
            for name in NODES:
                self._wait(name, pids[name], ports[name], 120)
                log(f"  node {name:<10} ready on 127.0.0.1:{ports[name]}")
            self._extra_nodes(extra, pids, node_env, log)
            cfg = self.state / "coordinator.toml"
            pids["coordinator"] = self._spawn("coordinator",
                                              ["coordinator", "serve", "--config", str(cfg)],
                                              env, "coord")
            self.pids.write(pids)
            self._wait("coordinator", pids["coordinator"], ports["coordinator"], 60)
            url = f"http://127.0.0.1:{ports['coordinator']}"
            self._seed(url)
            # The hub after its external service (else it waits 30 s for it: TRAPS.md).
            passwords = self._hub(ports, env, pids)
        except Exception:
            self.down(quiet=True)
            raise
        info = {"url": url, "ports": ports, "researcher": RESEARCHER, "project": PROJECT,
                "state": str(self.state), "started_in_s": round(time.monotonic() - started, 1),
                "hub_url": f"http://127.0.0.1:{ports['hub']}", "accounts": HUB_ACCOUNTS,
                "processes": self._process_note(), "extra_nodes": extra}
        self.info_file.write_text(json.dumps(info, indent=2))
        return {**info, "passwords": passwords}  # shown once, never stored in clear

    def _extra_nodes(self, extra: dict[str, dict], pids: dict[str, int],
                     node_env: dict[str, str], log) -> None:
        """Nodes added earlier, on the port the coordinator's registry has."""
        for name, e in extra.items():
            port = free_port(e["port"])
            pids[name] = self._start_node(name, Path(e["config"]), port, node_env)
            self.pids.write(pids)
            if port != e["port"]:  # taken meanwhile: the registry learns the new one
                self._register(name, port)
                e["port"] = port
            log(f"  node {name:<10} ready on 127.0.0.1:{e['port']} (added)")

    def _seed(self, url: str) -> None:
        """Through the running coordinator's API and the board's CLI, never its database."""
        token = researcher_token(self.state)
        seed_pending_project(url, token, RESEARCHER)
        seed_indicator(url, token, self.state / "board" / "board_ed25519.pem", self.state)

    def down(self, quiet: bool = False, log=print) -> list[str]:
        stopped = stop(self.pids.read())
        stop_pid_file(self.state / "hub" / "proxy.pid")  # the hub's proxy, if the hub died
        self.pids.path.unlink(missing_ok=True)
        if not quiet:
            log(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")
        return stopped

    # -- one more node -----------------------------------------------------------------
    def add_node(self, config: Path, log=print) -> dict:
        """Start the node of ``config`` in the running demo and register it with the
        coordinator (``bulle coordinator nodes add``, as the coordinator's user): the
        coordinator takes it up without a restart; ``status``, ``down`` and ``up`` know it.
        Its certificate is issued by the demo's CA when the config names one in the demo's
        ``certs/`` that does not exist yet."""
        config = config.resolve()
        if not self.info() or "coordinator" not in self.running():
            raise RuntimeError("the demo is not running: start it with `bulle demo up`")
        if is_root():
            self.accounts = hosts.service_accounts()
        node_env = {**os.environ, "BULLE_DATA": str(self._node_data()),
                    "BULLE_DEMO_STATE": str(self.state)}
        cfg = self._load_node_config(config, node_env)
        name = cfg.node_id
        if name in self.node_ids() or name in ("coordinator", "hub", "superlink"):
            raise RuntimeError(f"node {name!r} is already in the demo federation")
        if not cfg.tls.cert.exists():
            if cfg.tls.cert.parent != self.state / "certs":
                raise RuntimeError(
                    f"{cfg.tls.cert} does not exist: make the node's keys with `bulle node "
                    f"keygen` and sign them with `bulle certs sign --ca {self.state / 'certs'}`")
            from federation import make_certs

            make_certs(self.state / "certs", [name])
        if self.accounts:
            hosts.copy_node_data(self.data, self.state, [config])
            (self.state / "nodes").mkdir(exist_ok=True)
            hosts.secure(self.state, self.accounts, self.node_ids())
            if cfg.tls.key.parent == self.state / "certs":  # not yet one of node_ids()
                own(cfg.tls.key, self.accounts["node"], 0o600)
        port = free_port()
        pid = self._start_node(name, config, port, node_env)
        self.pids.write({**self.pids.read(), name: pid})
        self._register(name, port)
        info = self.info()
        info.setdefault("extra_nodes", {})[name] = {"config": str(config), "port": port}
        self.info_file.write_text(json.dumps(info, indent=2))
        log(f"node {name} added on 127.0.0.1:{port}: the coordinator routes to it within "
            "a second (bulle demo status lists it)")
        return info["extra_nodes"][name]

    @staticmethod
    def _load_node_config(config: Path, env: dict[str, str]):
        """The node's config as the node will read it (``${BULLE_DATA}``, ``${…STATE}``)."""
        from nodes import ConfigError, load_node_config

        saved = {k: os.environ.get(k) for k in ("BULLE_DATA", "BULLE_DEMO_STATE")}
        os.environ.update({k: env[k] for k in saved})  # what the config expands
        try:
            return load_node_config(config)
        except ConfigError as e:
            raise RuntimeError(f"{config}: {e}") from None
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)

    def _start_node(self, name: str, config: Path, port: int, env: dict[str, str]) -> int:
        pid = self._spawn(name, ["node", "serve", "--config", str(config),
                                 "--listen", f"127.0.0.1:{port}"], env, "node")
        self._wait(name, pid, port, 120)
        return pid

    def _register(self, name: str, port: int) -> None:
        """``bulle coordinator nodes add`` as the coordinator's user (its registry)."""
        self._as_coord(["coordinator", "nodes", "add", name, f"127.0.0.1:{port}",
                        "--config", str(self.state / "coordinator.toml"),
                        "--actor", "bulle demo"])

    def _as_coord(self, args: list[str]) -> str:
        account = self.accounts.get("coord")
        return bulle(args, self.state, (account.uid, account.gid) if account else None,
                     {"HOME": str(self.state / "coordinator")})

    def _prepare(self) -> tuple[dict[str, int], dict[str, str]]:
        """Everything on disk before the first process starts: certificates, keys, the
        board's grant, the nodes' data copies, the coordinator's config; then, as root,
        the service users and who owns what."""
        if is_root():
            closed = hosts.closed_ancestor(self.state)
            if closed is not None:
                raise RuntimeError(f"the state folder {self.state} is below {closed}, which "
                                   f"{hosts.NODE_USER} and {hosts.COORD_USER} cannot enter: "
                                   "pick another --state")
            self.accounts = hosts.service_accounts()
        self.state.mkdir(parents=True, exist_ok=True)
        for d in ("logs", "coordinator", "hub", "spawner"):
            (self.state / d).mkdir(exist_ok=True)
        make_keys(self.state)
        previous = self.info().get("ports", {})
        ports = {name: free_port(previous.get(name))
                 for name in (*NODES, "coordinator", *HUB_PORTS, "superlink")}
        coordinator_config(self.state, ports)
        if self.accounts:
            hosts.copy_node_data(self.data, self.state, [
                *node_configs(), *(Path(e["config"]) for e in self.extra_nodes().values())])
            hosts.secure(self.state, self.accounts, self.node_ids())
        return ports, {**os.environ, "BULLE_DATA": str(self.data),
                       "BULLE_DEMO_STATE": str(self.state)}

    # -- users and processes ----------------------------------------------------------
    def _node_data(self) -> Path:
        """What the nodes read: their own copies as root, else the source itself."""
        return self.state / "node-data" if self.accounts else self.data

    def _process_note(self) -> str:
        if not self.accounts:
            import getpass

            return (f"not root: every process runs as {getpass.getuser()} (one user; "
                    "start the demo as root for one system user per service and person)")
        note = (f"nodes as {hosts.NODE_USER}, coordinator, SuperLink, hub and proxy as "
                f"{hosts.COORD_USER}; each notebook as its own system user "
                f"{PERSON_PREFIX}<account>, created at first login by the spawn "
                "broker (root, answers only the hub's user)")
        if not self._hidden():
            note += (f"; this machine has no mount namespaces, so notebooks can still read "
                     f"the open-data source {self.data} (the nodes serve their own copies)")
        return note

    def _hidden(self) -> list[str]:
        """Folders hidden from notebooks: the data source (world-readable, read-only)."""
        if self._namespaces is None:
            self._namespaces = bool(self.accounts) and mount_namespaces_work()
        return [str(self.data)] if self._namespaces else []

    def _spawn(self, name: str, args: list[str], env: dict[str, str], role: str | None,
               module: str = "bulle_cli", home: str | None = None) -> int:
        """Start ``python -m <module> <args>`` (``bulle <args>``) as the ``role`` service
        user (as root; ``None``: root itself), its log in ``logs/``, its working folder and
        HOME its own state folder (``home``, else the role's)."""
        account = self.accounts.get(role) if role else None
        cwd = self.state / home if home else self.state
        user = None
        if account is not None:
            cwd = self.state / (home or ("nodes" if role == "node" else "coordinator"))
            env, user = {**env, "HOME": str(cwd)}, (account.uid, account.gid)
        return spawn(self._log(name), cwd, args, env, module, user)

    def _log(self, name: str) -> Path:
        return self.state / "logs" / f"{name}.log"

    def _wait(self, name: str, pid: int, port: int, timeout: float,
              ready: Callable[[], bool] | None = None) -> None:
        """Until ``name`` listens on ``port`` (or ``ready()``); its log's end if it dies."""
        wait_ready(name, pid, self._log(name), timeout, ready or (lambda: port_open(port)))

    # -- the hub ----------------------------------------------------------------------
    def _hub(self, ports: dict[str, int], env: dict[str, str],
             pids: dict[str, int]) -> dict[str, str]:
        """Start JupyterHub (demo accounts, the coordinator as its service); returns the
        passwords generated for new accounts (empty when they already existed)."""
        from enclave import write_users  # loads jupyterhub

        hub_state = self.state / "hub"
        passwords = write_users(hub_state / "users.json", HUB_ACCOUNTS)
        hub_env = {**env, "BULLE_HUB_STATE": str(hub_state),
                   "BULLE_HUB_PORT": str(ports["hub"]),
                   "BULLE_HUB_API_PORT": str(ports["hub-api"]),
                   "BULLE_HUB_PROXY_API_PORT": str(ports["hub-proxy-api"]),
                   "BULLE_COORDINATOR_URL": f"http://127.0.0.1:{ports['coordinator']}",
                   "BULLE_HUB_SERVICE_TOKEN_FILE": str(service_token(self.state))}
        if self.accounts:  # root: the hub as the coordinator's user, servers by the broker
            hub_env.pop("BULLE_DATA", None)
            own(hub_state / "users.json", self.accounts["coord"], 0o600)
            sock = self.state / "spawner" / "spawn.sock"
            pids["spawnbroker"] = self._spawn("spawnbroker", [
                "--socket", str(sock), "--hub-user", hosts.COORD_USER,
                "--singleuser", str(Path(sys.executable).parent / "jupyterhub-singleuser"),
                "--hide", os.pathsep.join(self._hidden())], env, None,
                module="enclave._spawnbroker")
            self.pids.write(pids)
            self._wait("spawnbroker", pids["spawnbroker"], 0, 30, ready=sock.exists)
            hub_env["BULLE_HUB_SPAWN_SOCKET"] = str(sock)
        pids["hub"] = self._spawn("hub", ["-f", str(hub_config())], hub_env, "coord",
                                  module="jupyterhub", home="hub")
        self.pids.write(pids)
        self._wait("hub", pids["hub"], 0, 90, ready=lambda: self._hub_answers(ports["hub"]))
        return passwords

    @staticmethod
    def _hub_answers(port: int) -> bool:
        """The proxy listens first; the hub answers once routes are set."""
        try:
            return httpx.get(f"http://127.0.0.1:{port}/hub/api/", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    # -- DP training ------------------------------------------------------------------
    def _superlink(self, ports: dict[str, int], env: dict[str, str],
                   pids: dict[str, int]) -> None:
        """The coordinator's Flower SuperLink (fenced Control API), and the training nodes'
        SuperNode keys registered with it before the nodes start (an unknown key is
        refused), by ``bulle coordinator supernodes``."""
        certs, sl = self.state / "certs", self.state / "superlink"
        pids["superlink"] = self._spawn("superlink", [
            "coordinator", "superlink", "--state", str(sl), "--port", str(ports["superlink"]),
            "--cert", str(certs / "bulle-superlink.pem"),
            "--key", str(certs / "bulle-superlink.key"), "--ca", str(certs / "ca.pem"),
            "--control-token-file", str(sl / "control.token")], env, "coord")
        self.pids.write(pids)
        self._wait("superlink", pids["superlink"], ports["superlink"], 60)
        self._as_coord(["coordinator", "supernodes", "--config",
                        str(self.state / "coordinator.toml")])
