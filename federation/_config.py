"""Coordinator configuration (TOML), declared once in ``SCHEMA``: loading, validation
(unknown keys and wrong values refused by name, with a did-you-mean), ``bulle coordinator
settings`` and its commented example are derived from it (``federation._settings``)."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from federation._settings import (
    ConfigError,
    Schema,
    Section,
    Setting,
    expand_path,
    read_toml,
)


def _positive(v: float) -> bool:
    return 0 < v < math.inf


_TLS = Section("tls", "Mutual TLS: the coordinator's client certificate towards the nodes "
               "(and its server certificate).", (
    Setting("cert", "path", help="The coordinator's certificate (PEM).",
            example="/etc/bulle/tls/coordinator.pem"),
    Setting("key", "path", help="Its private key (PEM, mode 0600).",
            example="/etc/bulle/tls/coordinator.key"),
    Setting("ca", "path", help="The CA bundle that issued the nodes' certificates.",
            example="/etc/bulle/tls/ca.pem"),
), required=True)
_NODE = Section("node", "One [[node]] per node agent of the federation.", (
    Setting("id", "str", help="The node's node_id (as in its own config).",
            example="region-occitanie"),
    Setting("address", "str", help="host:port the coordinator dials (a name in the node's "
            "certificate).", example="node.region.example:50051"),
), array=True)
_RESEARCHER = Section("researcher", "Researchers with a static token (without a hub).", (
    Setting("name", "str", help="The researcher's name.", example="alice"),
    Setting("token_sha256", "str", help="sha256 (hex) of their API token.",
            example="0" * 64),
    Setting("projects", "list", (), "Projects they are a member of.", example=["p1"]),
), array=True)
_PROJECT = Section("project", "Projects declared in the file (the board may also register "
                   "them through the dashboard).", (
    Setting("name", "str", help="The project's name.", example="p1"),
    Setting("grant", "path", None, "The board-signed grant token (file)."),
    Setting("default_epsilon", "float", 0.1, "ε per query on sensitive data when the query "
            "names none.", check=_positive, must="a positive number"),
    Setting("nodes_disjoint", "bool", False, "The board declares that no unit appears at two "
            "nodes: a federated query then costs ε once at the coordinator instead of ε per "
            "node taking part."),
), array=True)
_HUB = Section("hub", "The coordinator as a JupyterHub service: callers may present hub "
               "tokens, the board dashboard logs in with hub OAuth.", (
    Setting("api_url", "str", help="The hub's REST API as the coordinator reaches it "
            "(…/hub/api).", example="http://127.0.0.1:8081/hub/api"),
    Setting("public_url", "str", "", "The hub as browsers reach it (OAuth login for the "
            "dashboard)."),
    Setting("service_name", "str", "bulle", "The service's name in the hub (routed under "
            "/services/NAME)."),
    Setting("api_token_file", "path", None, "The service's token (also its OAuth secret); "
            "default: the JUPYTERHUB_API_TOKEN environment variable."),
    Setting("cache_s", "float", 10.0, "How long a token's identity is trusted before asking "
            "the hub again (seconds).", check=lambda v: 0 <= v < math.inf,
            must="a number of seconds >= 0"),
))
_TRAINING = Section("training", "DP training through the coordinator's Flower SuperLink "
                    "(leave it out: no training).", (
    Setting("superlink", "str", help="The SuperLink (Control API behind the fence), "
            "host:port.", example="127.0.0.1:9093"),
    Setting("root_certificates", "path", help="CA of the SuperLink's TLS certificate.",
            example="/etc/bulle/tls/ca.pem"),
    Setting("control_token_file", "path", help="The Control API's secret (the fence lets "
            "only it through).", example="/etc/bulle/flower/control.token"),
    Setting("node_keys", "table", {}, "node id = its SuperNode public key file (OpenSSH).",
            must="a table of node id = public key file", example={}),
    Setting("work_dir", "path", None, "Progress files written by the ServerApp (same host "
            "as the SuperLink); default: state_dir/training."),
    Setting("signing_key", "path", None, "The coordinator's Ed25519 key that signs run "
            "authorisations (created with its public half, ….pub.pem, on first use; nodes "
            "hold the public half); default: state_dir/coordinator_ed25519.pem."),
    Setting("round_timeout_s", "float", 120.0, "A round's default timeout (a request may set "
            "its own).", check=_positive, must="a positive number of seconds"),
))
# Keys are hub user names (free-form): the table is read in load_coordinator_config.
_OPERATORS = Section("operators", "Hub user = [node ids]: the node pages an operator sees "
                     "and lands on (the board sees every node).", ())
_TOP = Section("", "Read by `bulle coordinator serve --config FILE`. Unknown keys are "
               "refused with their name. Paths may use ${VAR} (environment) and are "
               "relative to this file otherwise.", (
    Setting("listen", "str", "127.0.0.1:8700", "host:port of the HTTP API."),
    Setting("node_timeout_s", "float", 30.0, "How long a node may take to answer a plan "
            "(seconds); the node interrupts its query at this deadline.", check=_positive,
            must="a positive number of seconds"),
    Setting("catalog_ttl_s", "float", 30.0, "How long the merged catalogue is cached "
            "(seconds).", check=lambda v: 0 <= v < math.inf, must="a number of seconds >= 0"),
    Setting("max_rows", "int", 100_000, "The most rows (groups) a released table may have.",
            check=lambda v: v >= 1, must=">= 1"),
    Setting("state_dir", "path", None, "The coordinator's state folder (ledger, audit chain, "
            "jobs); default: ./coordinator-state."),
    Setting("board_public_key", "path", None, "The ethics board's Ed25519 public key (PEM): "
            "grants are verified against it."),
    Setting("database_url", "str", "", "SQLAlchemy URL of the ledger and registries; "
            "default: SQLite in state_dir."),
    Setting("board_private_key", "path", None, "Demo only: the board's private key, so the "
            "dashboard can sign grants. In production the key stays with the board (`bulle "
            "board grant`) and signed grants are uploaded."),
), sections=(_TLS, _NODE, _RESEARCHER, _PROJECT, _HUB, _TRAINING, _OPERATORS))
SCHEMA = Schema("Bulle coordinator configuration (TOML).", _TOP)


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
    """A [[project]] (``_PROJECT`` declares the keys, defaults and help)."""

    name: str
    grant: Path | None = None
    default_epsilon: float = _PROJECT["default_epsilon"].default
    nodes_disjoint: bool = _PROJECT["nodes_disjoint"].default


@dataclass(frozen=True)
class HubConfig:
    """[hub]: the coordinator as a JupyterHub service (``_HUB`` declares the keys)."""

    api_url: str
    public_url: str = ""
    service_name: str = _HUB["service_name"].default
    api_token_file: Path | None = None
    cache_s: float = _HUB["cache_s"].default

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
    (``federation/_training.py``; ``_TRAINING`` declares the keys)."""

    superlink: str
    root_certificates: Path
    control_token_file: Path
    node_keys: dict[str, Path]
    work_dir: Path
    signing_key: Path
    round_timeout_s: float = _TRAINING["round_timeout_s"].default


@dataclass(frozen=True)
class CoordinatorConfig:
    listen: str
    cert: Path
    key: Path
    ca: Path
    nodes: tuple[NodeEndpoint, ...]
    researchers: tuple[Researcher, ...]
    node_timeout_s: float = _TOP["node_timeout_s"].default
    catalog_ttl_s: float = _TOP["catalog_ttl_s"].default
    max_rows: int = _TOP["max_rows"].default
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


def parse_training(raw: dict[str, Any], base: Path, state_dir: Path | None,
                   where: str = "[training]") -> TrainingConfig:
    """The [training] section: unknown keys refused, paths relative to the config file,
    ``work_dir`` and ``signing_key`` defaulting to the coordinator's state folder."""
    v = _TRAINING.parse(raw, where, base)
    if not all(isinstance(p, str) for p in v["node_keys"].values()):
        raise ConfigError(f"{where}: node_keys must be a table of node id = public key file")
    state = state_dir or Path.cwd() / "coordinator-state"  # as federation/_projects.py
    return TrainingConfig(
        superlink=v["superlink"], root_certificates=v["root_certificates"],
        control_token_file=v["control_token_file"],
        node_keys={str(k): expand_path(p, base, where) for k, p in v["node_keys"].items()},
        work_dir=v["work_dir"] or state / "training",
        signing_key=v["signing_key"] or state / "coordinator_ed25519.pem",
        round_timeout_s=v["round_timeout_s"])


def _tables(raw: dict[str, Any], section: Section, where: str, base: Path
            ) -> list[dict[str, Any]]:
    """The parsed entries of a ``[[section]]`` array."""
    entries = raw.get(section.name, [])
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: {section.name} must be an array of tables "
                          f"([[{section.name}]])")
    return [section.parse(e, f"{where} [[{section.name}]] #{i + 1}", base)
            for i, e in enumerate(entries)]


def load_coordinator_config(path: str | Path) -> CoordinatorConfig:
    path, raw = read_toml(path)
    where, base = str(path), path.parent
    top = _TOP.parse(raw, where, base)
    operators = raw.get("operators", {})
    if not isinstance(operators, dict) or not all(
            isinstance(v, list) and all(isinstance(n, str) for n in v)
            for v in operators.values()):
        raise ConfigError(f"{where} [operators]: each hub user = a list of node ids")
    if "tls" not in raw:
        raise ConfigError(f"{where}: [tls] with cert, key and ca is required (mutual TLS)")
    tls = _TLS.parse(raw["tls"], f"{where} [tls]", base)
    hub = None
    if "hub" in raw:
        h = _HUB.parse(raw["hub"], f"{where} [hub]", base)
        hub = HubConfig(h["api_url"].rstrip("/"), h["public_url"].rstrip("/"),
                        h["service_name"], h["api_token_file"], h["cache_s"])
    state_dir = top["state_dir"]
    training = (parse_training(raw["training"], base, state_dir, f"{where} [training]")
                if "training" in raw else None)
    return CoordinatorConfig(
        listen=top["listen"], cert=tls["cert"], key=tls["key"], ca=tls["ca"],
        nodes=tuple(NodeEndpoint(n["id"], n["address"])
                    for n in _tables(raw, _NODE, where, base)),
        researchers=tuple(Researcher(r["name"], r["token_sha256"], r["projects"])
                          for r in _tables(raw, _RESEARCHER, where, base)),
        node_timeout_s=top["node_timeout_s"], catalog_ttl_s=top["catalog_ttl_s"],
        max_rows=top["max_rows"], state_dir=state_dir,
        projects=tuple(ProjectConfig(**p) for p in _tables(raw, _PROJECT, where, base)),
        board_public_key=top["board_public_key"], database_url=top["database_url"],
        hub=hub, board_private_key=top["board_private_key"], training=training,
        operators={str(k): tuple(v) for k, v in operators.items()})
