"""Coordinator configuration (TOML). Unknown keys are rejected with their name."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from federation._settings import ConfigError, expand_path, read_toml


@dataclass(frozen=True)
class NodeEndpoint:
    id: str
    address: str


@dataclass(frozen=True)
class Researcher:
    name: str
    token_sha256: str
    projects: tuple[str, ...]


@dataclass(frozen=True)
class ProjectConfig:
    name: str
    grant: Path | None = None  # the board-signed grant token (file)
    default_epsilon: float = 0.1  # ε per query on sensitive data when the query names none
    # The board may declare that no unit appears at two nodes: a federated query then costs
    # ε once at the coordinator instead of ε per node taking part.
    nodes_disjoint: bool = False


@dataclass(frozen=True)
class HubConfig:
    """The coordinator as a JupyterHub service: callers may present hub tokens."""

    api_url: str  # the hub's REST API as the coordinator reaches it (…/hub/api)
    public_url: str = ""  # the hub as browsers reach it (OAuth login for the dashboard)
    service_name: str = "bulle"
    api_token_file: Path | None = None  # the service's token (also its OAuth secret)
    cache_s: float = 10.0  # how long a token's identity is trusted before asking again

    @property
    def prefix(self) -> str:
        """Where the hub's proxy routes the service (requests arrive with it)."""
        return f"/services/{self.service_name}"

    @property
    def api_token(self) -> str:
        if self.api_token_file is None:
            return os.environ.get("JUPYTERHUB_API_TOKEN", "")
        return self.api_token_file.read_text().strip()


@dataclass(frozen=True)
class TrainingConfig:
    """[training]: DP training through the coordinator's Flower SuperLink
    (``federation/_training.py``)."""

    superlink: str  # the SuperLink (Control API behind the fence), host:port
    root_certificates: Path  # CA of the SuperLink's TLS certificate
    control_token_file: Path  # the Control API's secret (the fence lets only it through)
    node_keys: dict[str, Path]  # node id -> its SuperNode public key (OpenSSH)
    work_dir: Path  # progress files written by the ServerApp (same host as the SuperLink)
    # the coordinator's Ed25519 key that signs run authorisations (created with its public
    # half, ``….pub.pem``, on first use; nodes hold the public half)
    signing_key: Path
    round_timeout_s: float = 120.0  # a round's default timeout (a request may set its own)


TRAINING_KEYS = {"superlink", "root_certificates", "control_token_file", "node_keys",
                 "work_dir", "round_timeout_s", "signing_key"}


@dataclass(frozen=True)
class CoordinatorConfig:
    listen: str
    cert: Path
    key: Path
    ca: Path
    nodes: tuple[NodeEndpoint, ...]
    researchers: tuple[Researcher, ...]
    node_timeout_s: float = 30.0
    catalog_ttl_s: float = 30.0
    max_rows: int = 100_000
    state_dir: Path | None = None
    projects: tuple[ProjectConfig, ...] = ()
    board_public_key: Path | None = None
    # SQLAlchemy URL of the ledger and registry; default: SQLite in state_dir
    database_url: str = ""
    hub: HubConfig | None = None  # hub tokens and the board dashboard's login
    # Demo only: the board's private key, so the dashboard can sign grants. In production
    # the key stays with the board (`bulle board grant`) and signed grants are uploaded.
    board_private_key: Path | None = None
    # [training]: the SuperLink for DP training (None: no training)
    training: TrainingConfig | None = None
    # [operators]: hub user -> the nodes whose pages they see (the board sees every node)
    operators: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host or "127.0.0.1", int(port)

    @property
    def state(self) -> Path:
        """The coordinator's state folder (ledger, audit chain, jobs)."""
        return self.state_dir or Path.cwd() / "coordinator-state"

    @property
    def database(self) -> str:
        """Where the ledger, the project and the node registries live: ``database_url``,
        else a SQLite file in the state folder."""
        return self.database_url or str(self.state / "ledger.sqlite")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _check(where: str, raw: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} "
                          f"(allowed: {', '.join(sorted(allowed))})")


def _path(value: str, base: Path) -> Path:
    return expand_path(value, base)


def parse_training(raw: dict[str, Any], base: Path, state_dir: Path | None,
                   where: str = "[training]") -> TrainingConfig:
    """The [training] section: unknown keys refused, paths relative to the config file,
    ``work_dir`` and ``signing_key`` defaulting to the coordinator's state folder."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table")
    _check(where, raw, TRAINING_KEYS)
    missing = sorted({"superlink", "root_certificates", "control_token_file"} - set(raw))
    if missing:
        raise ConfigError(f"{where}: {missing[0]} is required")
    keys = raw.get("node_keys", {})
    if not isinstance(keys, dict):
        raise ConfigError(f"{where}: node_keys must be a table of node id = public key file")
    try:
        timeout = float(raw.get("round_timeout_s", 120.0))
    except (TypeError, ValueError):
        timeout = math.nan
    if not timeout > 0 or math.isinf(timeout):
        raise ConfigError(f"{where}: round_timeout_s must be a positive number of seconds")
    state = state_dir or Path.cwd() / "coordinator-state"  # as federation/_projects.py
    return TrainingConfig(
        superlink=str(raw["superlink"]),
        root_certificates=_path(str(raw["root_certificates"]), base),
        control_token_file=_path(str(raw["control_token_file"]), base),
        node_keys={str(k): _path(str(v), base) for k, v in keys.items()},
        work_dir=(_path(str(raw["work_dir"]), base) if "work_dir" in raw
                  else state / "training"),
        signing_key=(_path(str(raw["signing_key"]), base) if "signing_key" in raw
                     else state / "coordinator_ed25519.pem"),
        round_timeout_s=timeout)


def load_coordinator_config(path: str | Path) -> CoordinatorConfig:
    path, raw = read_toml(path)
    where = str(path)
    _check(where, raw, {"listen", "tls", "node", "researcher", "node_timeout_s",
                        "catalog_ttl_s", "max_rows", "state_dir", "project",
                        "board_public_key", "database_url", "hub", "board_private_key",
                        "training", "operators"})
    operators = raw.get("operators", {})
    if not isinstance(operators, dict) or not all(
            isinstance(v, list) and all(isinstance(n, str) for n in v)
            for v in operators.values()):
        raise ConfigError(f"{where} [operators]: each hub user = a list of node ids")
    tls = raw.get("tls")
    if not tls:
        raise ConfigError(f"{where}: [tls] with cert, key and ca is required (mutual TLS)")
    _check(f"{where} [tls]", tls, {"cert", "key", "ca"})
    nodes = []
    for i, n in enumerate(raw.get("node", [])):
        _check(f"{where} [[node]] #{i + 1}", n, {"id", "address"})
        if "id" not in n or "address" not in n:
            raise ConfigError(f"{where} [[node]] #{i + 1}: id and address are required")
        nodes.append(NodeEndpoint(str(n["id"]), str(n["address"])))
    researchers = []
    for i, r in enumerate(raw.get("researcher", [])):
        _check(f"{where} [[researcher]] #{i + 1}", r, {"name", "token_sha256", "projects"})
        researchers.append(Researcher(str(r["name"]), str(r["token_sha256"]),
                                      tuple(r.get("projects", []))))
    base = path.parent
    projects = []
    for i, p in enumerate(raw.get("project", [])):
        _check(f"{where} [[project]] #{i + 1}", p,
               {"name", "grant", "default_epsilon", "nodes_disjoint"})
        if "name" not in p:
            raise ConfigError(f"{where} [[project]] #{i + 1}: name is required")
        projects.append(ProjectConfig(
            str(p["name"]), _path(p["grant"], base) if "grant" in p else None,
            float(p.get("default_epsilon", 0.1)), bool(p.get("nodes_disjoint", False))))
    hub = None
    if "hub" in raw:
        h = raw["hub"]
        _check(f"{where} [hub]", h, {"api_url", "public_url", "service_name",
                                     "api_token_file", "cache_s"})
        if "api_url" not in h:
            raise ConfigError(f"{where} [hub]: api_url is required")
        hub = HubConfig(str(h["api_url"]).rstrip("/"), str(h.get("public_url", "")).rstrip("/"),
                        str(h.get("service_name", "bulle")),
                        _path(h["api_token_file"], base) if "api_token_file" in h else None,
                        float(h.get("cache_s", 10.0)))
    state_dir = _path(raw["state_dir"], base) if "state_dir" in raw else None
    training = (parse_training(raw["training"], base, state_dir, f"{where} [training]")
                if "training" in raw else None)
    try:
        return CoordinatorConfig(
            listen=str(raw.get("listen", "127.0.0.1:8700")),
            cert=_path(tls["cert"], base), key=_path(tls["key"], base), ca=_path(tls["ca"], base),
            nodes=tuple(nodes), researchers=tuple(researchers),
            node_timeout_s=float(raw.get("node_timeout_s", 30.0)),
            catalog_ttl_s=float(raw.get("catalog_ttl_s", 30.0)),
            max_rows=int(raw.get("max_rows", 100_000)),
            state_dir=state_dir,
            projects=tuple(projects),
            board_public_key=(_path(raw["board_public_key"], base)
                              if "board_public_key" in raw else None),
            database_url=str(raw.get("database_url", "")),
            hub=hub,
            board_private_key=(_path(raw["board_private_key"], base)
                               if "board_private_key" in raw else None),
            training=training,
            operators={str(k): tuple(v) for k, v in operators.items()},
        )
    except KeyError as e:
        raise ConfigError(f"{where} [tls]: missing key {e.args[0]!r}") from None
