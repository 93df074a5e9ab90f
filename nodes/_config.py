"""Node agent configuration (TOML), declared once in ``SCHEMA`` (``Setting``s per table):
loading, validation (unknown keys and wrong values refused by name, with a did-you-mean),
``bulle node settings`` and its commented example are derived from it.

Paths may use ``${VAR}`` (environment) and are resolved relative to the config file.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

# One error type for every config file (the coordinator's too): federation._settings.
from federation import (
    REQUIRED,
    ConfigError,
    Schema,
    Section,
    Setting,
    did_you_mean,
    expand_path,
    read_toml,
)
from privacy import CkmParams, dp_available, ptable_for

if TYPE_CHECKING:
    from nodes._onboard import Onboarding

EXACT_RELEASE_ENV = "BULLE_ALLOW_EXACT_RELEASE"  # tests only: restricted tier unperturbed
UNIT_LEVELS = ("person", "institution")
# privacy_unit = "row": each row is one person (a table without an id column); queries and
# training then bound contributions to one row (DuckDB's rowid stands for the unit).
ROW_UNIT = "row"

TIERS = ("open", "restricted", "sensitive")
_TABLE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_COLUMN = re.compile(r"^[a-z0-9_]{1,63}$")
_NODE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
ENCODINGS = ("auto", "utf-8", "cp1252", "latin-1")
# What a node with a sensitive dataset but no OpenDP is told to do (deploy/README.md, "Images")
DP_FIX = ("install OpenDP with `pip install 'bulle[dp]'`, or run the node-sql image built "
          "with `--build-arg DP=1` (the default)")
DELIMITERS = ("auto", ";", ",", "\t", "|")


def _host_port(value: str) -> bool:
    host, _, port = value.rpartition(":")
    return not value or bool(host and port.isdigit() and int(port) < 65536)


_TLS = Section("tls", "Mutual TLS: the node serves only the coordinator's certificate.", (
    Setting("cert", "path", help="This node's server certificate (PEM, may be followed by "
            "intermediates), with the name the coordinator dials in its SAN.",
            example="/etc/bulle/tls/node.pem"),
    Setting("key", "path", help="Its private key (PEM, unencrypted, mode 0600).",
            example="/etc/bulle/tls/node.key"),
    Setting("client_ca", "path", help="CA bundle that issued the coordinator's client "
            "certificate: only clients it signed may connect.",
            example="/etc/bulle/tls/ca.pem"),
    Setting("allowed_client_cn", "str", "bulle-coordinator", "Common name of the only "
            "client certificate served, the coordinator's."),
))
_ENGINE = Section("engine", "The node's DuckDB (loaded, then locked: no file access, no "
                  "settings change).", (
    Setting("threads", "int", 1, "DuckDB worker threads (1 keeps several agents on a small "
            "machine responsive).", check=lambda v: v >= 1, must=">= 1"),
    Setting("memory_limit", "str", "1GB", "DuckDB memory limit; keep the service's "
            "MemoryMax above it."),
    Setting("max_query_seconds", "float", 60.0, "A plan's query is interrupted in DuckDB "
            "after this long, or sooner when the coordinator's own deadline (its "
            "node_timeout_s) comes first.", check=lambda v: 0 < v <= 86400,
            must="a number of seconds in (0, 86400]"),
))
_CELL_KEY = Section("cell_key", "restricted tier: the cell key method's perturbation "
                    "(privacy/_ckm.py), an inline table.", (
    Setting("max_perturbation", "int", CkmParams.max_perturbation, "Counts move by at most "
            "±D (times the most rows one unit adds)."),
    Setting("variance", "float", CkmParams.variance, "Variance of a count's perturbation."),
    Setting("magnitude", "float", CkmParams.magnitude, "Sums move by magnitude × [0.5, 1.5] "
            "× B, B the most one unit can add.", check=lambda v: 0.05 <= v <= 2,
            must="in [0.05, 2]"),
    Setting("ptable", "path", None, "An agency's own perturbation table in ONS's layout "
            "(pcv,ckey,pvalue) instead of the generated one."),
    Setting("perturb", "bool", True, "false releases exact aggregates: refused outside tests "
            f"({EXACT_RELEASE_ENV}=1)."),
))
INGEST = Section("ingest", "Raw files turned into `source` by `bulle node ingest` "
                 "(pseudonymised, validated).", (
    Setting("inputs", "strs", help="The raw extracts (CSV with ; , tab or |, Parquet, JSON "
            "lines).", example=["/srv/bulle/raw/eleves-2024.csv"]),
    Setting("encoding", "str", "auto", f"Text encoding of CSV inputs: {', '.join(ENCODINGS)} "
            "(aliases such as utf8 or windows-1252 are accepted)."),
    Setting("delimiter", "str", "auto", "Field separator of CSV inputs.", choices=DELIMITERS),
))
PSEUDONYMISE = Section("pseudonymise", "Keyed HMAC pseudonyms for the identifiers; the key "
                       "comes from a trusted third party and is the same at every node, so "
                       "datasets link across nodes. Give key_file OR key_env.", (
    Setting("key_file", "path", None, "File holding the key.",
            example="/etc/bulle/pseudonym.key"),
    Setting("key_env", "str", "", "Or the name of an environment variable holding it (not "
            "the key itself), e.g. BULLE_PSEUDONYM_KEY."),
    Setting("length", "int", 32, "Pseudonym length in hex characters (32 = 128 bits).",
            check=lambda v: 16 <= v <= 64, must="16..64 hex characters"),
))
CLASSIFY = Section("classify", "Every input column exactly once: ingest refuses an "
                   "unclassified column.", (
    Setting("identifiers", "list", (), "Direct identifiers: replaced by their pseudonym.",
            example=["ine"]),
    Setting("quasi_identifiers", "table", {}, "Quasi-identifiers and their generalisation: "
            "year | month | departement | band:N | keep.",
            example={"date_naissance": "year"}),
    Setting("attributes", "list", (), "Kept as they are.", example=["uai", "moyenne"]),
    Setting("drop", "list", (), "Not kept at all.", example=["nom"]),
))
_DATASET = Section("dataset", "One [[dataset]] per table the node publishes. A table "
                   "published by several nodes under one name and schema is the union of "
                   "their partitions.", (
    Setting("table", "str", help="Name researchers query.",
            check=lambda v: bool(_TABLE_NAME.match(v)), must="lowercase snake_case",
            example="pupils"),
    Setting("source", "strs", help="File(s) the table is loaded from: CSV (delimiter and "
            "encoding sniffed), Parquet or JSON lines; several are stacked by column name.",
            check=bool, must="at least one file",
            example="/var/lib/bulle-node/data/pupils.parquet"),
    Setting("tier", "str", help="open (rows may be read) | restricted (aggregates with "
            "disclosure control) | sensitive (DP aggregates and training only).",
            choices=TIERS, example="restricted"),
    Setting("description", "str", "", "Shown in the catalogue."),
    Setting("filter", "str", "", "Operator-side row filter (SQL over the source columns, by "
            "their published names), applied before anything is served."),
    Setting("privacy_unit", "str", "", f"The column identifying a person (thresholds, record "
            f'keys and DP contributions are per unit), or "{ROW_UNIT}" when each row is one '
            "person. Required on the sensitive tier.", example="ine"),
    Setting("unit_level", "str", "person", "restricted tier: person (MIN/MAX/quantiles "
            "refused) or institution (a school is the unit: order statistics allowed).",
            choices=UNIT_LEVELS),
    Setting("min_count", "int", CkmParams.threshold, "restricted tier: the threshold k of "
            "the cell key method (below it a value is released as \"< k\").",
            check=lambda v: v >= 0, must=">= 0"),
    Setting("round_to", "int", 1, "restricted tier: released counts are also rounded to a "
            "multiple of this.", check=lambda v: v >= 1, must=">= 1"),
    Setting("rename", "table", {}, "Publish a source column under another name (normalised "
            "names); every other key of the dataset uses the new names.",
            example={"code_etablissement": "uai"}),
    Setting("schema", "table", {}, "Expected columns and types; loading fails if one is "
            "missing or of another kind.", example={"ine": "VARCHAR", "moyenne": "DOUBLE"}),
    Setting("columns", "table", {}, "Column descriptions for the catalogue.",
            example={"moyenne": "average grade (0-20)"}),
    Setting("pivots", "list", (), "Join columns, marked in the catalogue.", example=["uai"]),
    Setting("public_domains", "table", {}, "Grouping keys released in full (zero-filled) "
            "whatever the data holds.", example={"sexe": ["F", "M"]}),
    Setting("max_rows_per_unit", "int", 1, "sensitive tier: each unit keeps at most this "
            "many rows (contribution bound).", check=lambda v: v >= 1, must=">= 1"),
    Setting("bounds", "table", {}, "Values clamped to [lower, upper]. Sensitive: only bounded "
            "columns can be summed; restricted: the bound sets the noise of a SUM.",
            example={"moyenne": [0, 20]}),
    Setting("shared", "bool", False, "Open tables only: a public reference table the "
            "coordinator copies to the nodes that accept references (joins run there)."),
), array=True, sections=(_CELL_KEY, INGEST, PSEUDONYMISE, CLASSIFY))
_TRAINING = Section("training", "DP training (Flower + Opacus): the SuperNode this agent "
                    "starts next to itself. Leave it out on a node that serves SQL only.", (
    Setting("superlink", "str", help="The coordinator's Flower SuperLink (Fleet API), "
            "host:port.", example="coordinator.bulle.example:9092"),
    Setting("root_certificates", "path", help="CA of the SuperLink's TLS certificate.",
            example="/etc/bulle/tls/ca.pem"),
    Setting("auth_key", "path", help="This node's EC private key (OpenSSH), registered with "
            "the SuperLink.", example="/etc/bulle/flower/node_key"),
    Setting("models", "list", ("logreg", "mlp", "gru"), "The vetted models the operator "
            "lets run here."),  # = bulle_flower.models.MODELS (no torch import here)
    Setting("runtime_port", "int", 0, "The SuperNode's local Runtime API port (0: a free "
            "port).", check=lambda v: 0 <= v < 65536, must="a port number"),
    Setting("poll_interval_s", "float", 0.2, "SuperNode and executor polling: lower is "
            "faster rounds, more idle CPU.", check=lambda v: 0.01 <= v <= 10,
            must="in [0.01, 10]"),
))
_TOP = Section("", "Read by `bulle node serve|check|ingest|doctor --config FILE`. Unknown "
               "keys are refused with their name. Paths may use ${VAR} (environment "
               "variables) and are relative to this file otherwise.", (
    Setting("node_id", "str", help="This node's name in the federation; it must match the "
            "[[node]] id in the coordinator's config.",
            check=lambda v: bool(_NODE_ID.match(v)), must="lowercase letters, digits, '-'",
            example="region-occitanie"),
    Setting("listen", "str", "127.0.0.1:50051", "host:port the gRPC service listens on."),
    Setting("data_dir", "path", None, "Where `bulle node ingest` writes the Parquet it "
            "serves, with quality reports and manifests."),
    Setting("state_dir", "path", None, "Where the node keeps its privacy ledger, release "
            "cache and hash-chained audit log."),
    Setting("board_public_key", "path", None, "The ethics board's Ed25519 public key (PEM): "
            "grants are verified against it."),
    Setting("coordinator_public_key", "path", None, "The coordinator's Ed25519 public key "
            "(PEM): training run authorisations are verified against it (no key: this node "
            "trains nothing)."),
    Setting("accept_references", "bool", True, "Keep copies of other nodes' shared open "
            "tables so that joins with them run here."),
    Setting("metrics_listen", "str", "", "host:port of the operator's Prometheus endpoint; "
            "\"\" = off. It has no authentication: keep it on loopback or a scrape-only "
            "network.", check=_host_port, must='host:port (e.g. "127.0.0.1:9464")'),
    Setting("metrics_allow_remote", "bool", False, "Let metrics_listen be a non-loopback "
            "address (a scrape-only network): the endpoint has no authentication."),
), sections=(_TLS, _ENGINE, _DATASET, _TRAINING))
SCHEMA = Schema("Bulle node agent configuration (TOML).", _TOP)


def _default(section: Section, name: str) -> Any:
    """A setting's declared default, for the dataclasses' field defaults."""
    value = section[name].default
    assert value is not REQUIRED, name
    return value


@dataclass(frozen=True)
class TlsConfig:
    cert: Path
    key: Path
    client_ca: Path
    # Only a client certificate with this common name (the coordinator's) is served.
    allowed_client_cn: str = _default(_TLS, "allowed_client_cn")


@dataclass(frozen=True)
class EngineConfig:
    threads: int = _default(_ENGINE, "threads")
    memory_limit: str = _default(_ENGINE, "memory_limit")
    # a plan's DuckDB query is interrupted after this long, or sooner when the caller's
    # own deadline (the coordinator's node_timeout_s) comes first
    max_query_seconds: float = _default(_ENGINE, "max_query_seconds")


@dataclass(frozen=True)
class DatasetConfig:
    table: str
    source: tuple[Path, ...]
    tier: str
    description: str = ""
    # Operator-side row filter (SQL over the source columns, evaluated before lock-down):
    # how a node publishes only its own part of a shared extract.
    filter: str = ""
    privacy_unit: str = ""
    min_count: int = _default(_DATASET, "min_count")  # restricted: the threshold k
    round_to: int = _default(_DATASET, "round_to")
    # restricted tier: "person" (MIN/MAX/quantiles refused) or "institution" (a school is
    # the unit: order statistics allowed)
    unit_level: str = _default(_DATASET, "unit_level")
    # restricted tier: the cell key method's parameters (privacy/_ckm.py), from the
    # optional inline table `cell_key = { max_perturbation = 4, variance = 3.0,
    # magnitude = 0.5, ptable = "ons.csv", perturb = true }`
    cell_key: CkmParams = field(default_factory=CkmParams)
    perturb: bool = True  # false only with BULLE_ALLOW_EXACT_RELEASE=1 (tests)
    # Source column (normalised name) -> name it is published under, e.g. a UAI column
    # renamed ``uai`` so that joins can say USING (uai); the other keys use the new names.
    rename: dict[str, str] = field(default_factory=dict)
    # Expected columns and types; loading fails if one is missing or of another kind.
    schema: dict[str, str] = field(default_factory=dict)
    columns: dict[str, str] = field(default_factory=dict)  # column -> description
    public_domains: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    # sensitive tier (DP): each unit keeps at most this many rows. Values are clamped to the
    # declared bounds (sensitive: only bounded columns can be summed; restricted: the bound
    # sets the noise of a SUM, else the node derives a power-of-two envelope at load).
    max_rows_per_unit: int = _default(_DATASET, "max_rows_per_unit")
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)
    # open tier only: a public reference table the coordinator copies to the other nodes,
    # so that joins with it run inside each node (nodes/_references.py)
    shared: bool = False
    # onboarding (nodes/_onboard/): [dataset.ingest], [dataset.pseudonymise],
    # [dataset.classify] and `pivots`, parsed there; None for a dataset served as is
    onboarding: Onboarding | None = None


@dataclass(frozen=True)
class TrainingConfig:
    """DP training (nodes/_flower.py): the SuperNode this agent starts next to itself."""

    superlink: str  # the coordinator's SuperLink (Fleet API), host:port
    root_certificates: Path  # CA of the SuperLink's TLS certificate
    auth_key: Path  # this node's EC private key (OpenSSH), registered with the SuperLink
    models: tuple[str, ...] = _default(_TRAINING, "models")  # what the operator allows
    runtime_port: int = _default(_TRAINING, "runtime_port")  # SuperNode's Runtime API
    poll_interval_s: float = _default(_TRAINING, "poll_interval_s")  # CPU vs round latency


@dataclass(frozen=True)
class NodeConfig:
    node_id: str
    listen: str
    tls: TlsConfig | None
    engine: EngineConfig
    datasets: tuple[DatasetConfig, ...]
    # where `bulle node ingest` writes the datasets' Parquet, quality reports and manifests
    data_dir: Path | None = None
    # where the node keeps its privacy ledger, release cache and audit chain
    state_dir: Path | None = None
    # the ethics board's Ed25519 public key (PEM): grants are verified against it
    board_public_key: Path | None = None
    # the coordinator's Ed25519 public key (PEM): training run authorisations are verified
    # against it (no key: this node trains nothing)
    coordinator_public_key: Path | None = None
    path: Path | None = None
    training: TrainingConfig | None = None
    # keep copies of other nodes' shared open tables for joins (nodes/_references.py)
    accept_references: bool = True
    # host:port of the operator's Prometheus endpoint (nodes/_metrics.py); "" = off.
    # It has no authentication: loopback only, unless ``metrics_allow_remote`` says the
    # operator put it on a scrape-only network.
    metrics_listen: str = ""

    def dataset(self, table: str) -> DatasetConfig | None:
        return next((d for d in self.datasets if d.table == table), None)

    def without_dp_library(self) -> list[str]:
        """The sensitive datasets this node could not release from: OpenDP (the ``dp``
        extra), whose samplers make every DP release, is not installed."""
        sensitive = [d.table for d in self.datasets if d.tier == "sensitive"]
        return [] if not sensitive or dp_available() else sensitive

    def require_dp_library(self) -> None:
        """Refuse to serve sensitive datasets without OpenDP, at start (NodeEngine), rather
        than failing their first DP query."""
        if missing := self.without_dp_library():
            raise ConfigError(f"sensitive dataset(s) {', '.join(missing)}: DP releases need "
                              f"OpenDP, which is not installed here; {DP_FIX}")


def _expand(value: str, base: Path, where: str) -> Path:
    return expand_path(value, base, where)


def _dataset(raw: dict[str, Any], base: Path, where: str) -> DatasetConfig:
    if isinstance(raw, dict) and isinstance(raw.get("table"), str):
        where = f"{where} ({raw['table']})"
    v = _DATASET.parse(raw, where, base)
    tier, privacy_unit = v["tier"], v["privacy_unit"]
    bounds = {}
    for col, pair in v["bounds"].items():
        if (not isinstance(pair, list) or len(pair) != 2
                or not all(isinstance(x, (int, float)) for x in pair) or pair[0] > pair[1]):
            raise ConfigError(f"{where}: bounds for {col!r} must be [lower, upper]")
        bounds[col] = (float(pair[0]), float(pair[1]))
    if tier == "sensitive" and not privacy_unit:
        raise ConfigError(f"{where}: a sensitive dataset needs a privacy_unit (a column, or "
                          f'"{ROW_UNIT}" when each row is one person)')
    if privacy_unit == ROW_UNIT and v["max_rows_per_unit"] != 1:
        raise ConfigError(f'{where}: privacy_unit = "{ROW_UNIT}" makes each row one person: '
                          "max_rows_per_unit is 1")
    rename = v["rename"]
    if not all(isinstance(k, str) and isinstance(n, str) and _COLUMN.match(k)
               and _COLUMN.match(n) for k, n in rename.items()):
        raise ConfigError(f"{where}: rename maps source column names to new names, both "
                          "lowercase snake_case (e.g. rename = { numero_du_college = \"uai\" })")
    if len(set(rename.values())) != len(rename):
        raise ConfigError(f"{where}: rename gives two columns the same name")
    cell_key, perturb = _cell_key(raw.get("cell_key", {}), v["min_count"], base, where)
    if v["shared"] and tier != "open":
        raise ConfigError(f"{where}: only an open table can be shared (tier is {tier!r})")
    return DatasetConfig(
        table=v["table"], source=tuple(_expand(s, base, where) for s in v["source"]),
        tier=tier, description=v["description"], filter=v["filter"],
        privacy_unit=privacy_unit, min_count=v["min_count"], round_to=v["round_to"],
        unit_level=v["unit_level"], cell_key=cell_key, perturb=perturb,
        schema={k: str(t).upper() for k, t in v["schema"].items()},
        columns={k: str(d) for k, d in v["columns"].items()},
        public_domains={k: tuple(d) for k, d in v["public_domains"].items()},
        max_rows_per_unit=v["max_rows_per_unit"], bounds=bounds, rename=dict(rename),
        shared=v["shared"], onboarding=_onboarding(raw, base, where))


def _cell_key(raw: Any, threshold: int, base: Path, where: str) -> tuple[CkmParams, bool]:
    """The cell key method's parameters of a dataset; checked by building its ptable."""
    where = f"{where} cell_key"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: an inline table, e.g. {{ max_perturbation = 4 }}")
    v = _CELL_KEY.parse(raw, where, base)
    if not v["perturb"] and os.environ.get(EXACT_RELEASE_ENV) != "1":
        raise ConfigError(f"{where}: perturb = false releases exact restricted aggregates; "
                          f"it is for tests only ({EXACT_RELEASE_ENV}=1) and a node refuses "
                          "it otherwise")
    try:
        params = CkmParams(threshold=threshold, max_perturbation=v["max_perturbation"],
                           variance=v["variance"], magnitude=v["magnitude"],
                           ptable=v["ptable"])
        ptable_for(params)  # a bad table or parameters fail at start, not at query time
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    return params, v["perturb"]


def _onboarding(raw: dict[str, Any], base: Path, where: str) -> Onboarding | None:
    from nodes._onboard import parse_onboarding  # imports this module: load it late

    return parse_onboarding(raw, base, where)


def load_node_config(path: str | Path) -> NodeConfig:
    path, raw = read_toml(path)
    base = path.parent
    where = str(path)
    top = _TOP.parse(raw, where, base)
    tls = None
    if "tls" in raw:
        tls = TlsConfig(**_TLS.parse(raw["tls"], f"{where} [tls]", base))
    engine = EngineConfig(**_ENGINE.parse(raw.get("engine", {}), f"{where} [engine]", base))
    entries = raw.get("dataset", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: dataset must be an array of tables ([[dataset]])")
    datasets = tuple(_dataset(d, base, f"{where} [[dataset]] #{i + 1}")
                     for i, d in enumerate(entries))
    names = [d.table for d in datasets]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"{where}: table {dup!r} is declared twice")
    return NodeConfig(
        node_id=top["node_id"], listen=top["listen"], tls=tls, engine=engine,
        datasets=datasets, data_dir=top["data_dir"], state_dir=top["state_dir"],
        board_public_key=top["board_public_key"],
        coordinator_public_key=top["coordinator_public_key"], path=path,
        training=(_training(raw["training"], base, f"{where} [training]")
                  if "training" in raw else None),
        accept_references=top["accept_references"],
        metrics_listen=_metrics_listen(top["metrics_listen"], top["metrics_allow_remote"],
                                       where))


def _metrics_listen(value: str, allow_remote: bool, where: str) -> str:
    """The metrics endpoint has no authentication: loopback unless declared otherwise."""
    host = value.rpartition(":")[0]
    if value and not allow_remote and not _is_loopback(host):
        raise ConfigError(
            f"{where}: metrics_listen {value!r} is not a loopback address; the metrics "
            "endpoint has no authentication, so it listens on loopback (127.0.0.1, ::1, "
            "localhost) unless metrics_allow_remote = true says it is on a scrape-only "
            "network")
    return value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # any other name may resolve anywhere


def _training(raw: dict[str, Any], base: Path, where: str) -> TrainingConfig:
    v = _TRAINING.parse(raw, where, base)
    zoo = _default(_TRAINING, "models")  # = bulle_flower.models.MODELS (no torch here)
    unknown = sorted(set(v["models"]) - set(zoo))
    if unknown:
        raise ConfigError(f"{where}: unknown model {unknown[0]!r} (the zoo: {', '.join(zoo)})"
                          f"{did_you_mean(unknown[0], zoo)}")
    return TrainingConfig(**v)
