"""Node agent configuration (TOML). Unknown keys are rejected with their name.

Paths may use ``${VAR}`` (environment) and are resolved relative to the config file.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

# One error type for every config file (the coordinator's too): federation._settings.
from federation import ConfigError, expand_path, read_toml
from privacy import CkmParams, ptable_for

if TYPE_CHECKING:
    from nodes._onboard import Onboarding

EXACT_RELEASE_ENV = "BULLE_ALLOW_EXACT_RELEASE"  # tests only: restricted tier unperturbed
UNIT_LEVELS = ("person", "institution")
# privacy_unit = "row": each row is one person (a table without an id column); queries and
# training then bound contributions to one row (DuckDB's rowid stands for the unit).
ROW_UNIT = "row"
_CELL_KEY_KEYS = {"max_perturbation", "variance", "magnitude", "ptable", "perturb"}

TIERS = ("open", "restricted", "sensitive")
_TABLE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_COLUMN = re.compile(r"^[a-z0-9_]{1,63}$")


@dataclass(frozen=True)
class TlsConfig:
    cert: Path
    key: Path
    client_ca: Path
    # Only a client certificate with this common name (the coordinator's) is served.
    allowed_client_cn: str = "bulle-coordinator"


@dataclass(frozen=True)
class EngineConfig:
    threads: int = 1
    memory_limit: str = "1GB"
    # a plan's DuckDB query is interrupted after this long, or sooner when the caller's
    # own deadline (the coordinator's node_timeout_s) comes first
    max_query_seconds: float = 60.0


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
    min_count: int = 10  # restricted tier: the threshold k of the cell key method
    round_to: int = 1
    # restricted tier: "person" (MIN/MAX/quantiles refused) or "institution" (a school is
    # the unit: order statistics allowed)
    unit_level: str = "person"
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
    max_rows_per_unit: int = 1
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)
    # open tier only: a public reference table the coordinator copies to the other nodes,
    # so that joins with it run inside each node (nodes/_references.py)
    shared: bool = False
    # onboarding (nodes/_onboard/): [dataset.ingest], [dataset.pseudonymise],
    # [dataset.classify] and `pivots`, parsed there; None for a dataset served as is
    onboarding: Onboarding | None = None


# `onboarding` is built from these keys, never given as such
_DATASET_KEYS = ({f.name for f in fields(DatasetConfig)} - {"onboarding", "perturb"}
                 | {"ingest", "pseudonymise", "classify", "pivots"})


@dataclass(frozen=True)
class TrainingConfig:
    """DP training (nodes/_flower.py): the SuperNode this agent starts next to itself."""

    superlink: str  # the coordinator's SuperLink (Fleet API), host:port
    root_certificates: Path  # CA of the SuperLink's TLS certificate
    auth_key: Path  # this node's EC private key (OpenSSH), registered with the SuperLink
    models: tuple[str, ...] = ("logreg", "mlp", "gru")  # what the operator lets run here
    runtime_port: int = 0  # the SuperNode's local Runtime API (0: a free port)
    poll_interval_s: float = 0.2  # SuperNode and executor polling (CPU vs round latency)


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


def _check_keys(where: str, raw: dict[str, Any], cls: type | set[str]) -> None:
    allowed = cls if isinstance(cls, set) else {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})"
        )


def _expand(value: str, base: Path, where: str) -> Path:
    return expand_path(value, base, where)


def _require(raw: dict[str, Any], key: str, where: str) -> Any:
    if key not in raw:
        raise ConfigError(f"{where}: missing key {key!r}")
    return raw[key]


def _dataset(raw: dict[str, Any], base: Path, where: str) -> DatasetConfig:
    _check_keys(where, raw, _DATASET_KEYS)
    table = _require(raw, "table", where)
    if not isinstance(table, str) or not _TABLE_NAME.match(table):
        raise ConfigError(f"{where}: table name {table!r} must be lowercase snake_case")
    where = f"{where} ({table})"
    tier = _require(raw, "tier", where)
    if tier not in TIERS:
        raise ConfigError(f"{where}: tier {tier!r} is not one of {', '.join(TIERS)}")
    src = _require(raw, "source", where)
    sources = (src,) if isinstance(src, str) else tuple(src)
    if not sources:
        raise ConfigError(f"{where}: source is empty")
    min_count = int(raw.get("min_count", 10))
    round_to = int(raw.get("round_to", 1))
    if min_count < 0 or round_to < 1:
        raise ConfigError(f"{where}: min_count must be >= 0 and round_to >= 1")
    domains = {k: tuple(v) for k, v in raw.get("public_domains", {}).items()}
    bounds = {}
    for col, pair in raw.get("bounds", {}).items():
        if (not isinstance(pair, list) or len(pair) != 2
                or not all(isinstance(v, (int, float)) for v in pair) or pair[0] > pair[1]):
            raise ConfigError(f"{where}: bounds for {col!r} must be [lower, upper]")
        bounds[col] = (float(pair[0]), float(pair[1]))
    max_rows = int(raw.get("max_rows_per_unit", 1))
    privacy_unit = str(raw.get("privacy_unit", ""))
    if tier == "sensitive" and not privacy_unit:
        raise ConfigError(f"{where}: a sensitive dataset needs a privacy_unit (a column, or "
                          f'"{ROW_UNIT}" when each row is one person)')
    if privacy_unit == ROW_UNIT and int(raw.get("max_rows_per_unit", 1)) != 1:
        raise ConfigError(f'{where}: privacy_unit = "{ROW_UNIT}" makes each row one person: '
                          "max_rows_per_unit is 1")
    if max_rows < 1:
        raise ConfigError(f"{where}: max_rows_per_unit must be >= 1")
    rename = raw.get("rename", {})
    if not isinstance(rename, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and _COLUMN.match(k) and _COLUMN.match(v)
            for k, v in rename.items()):
        raise ConfigError(f"{where}: rename maps source column names to new names, both "
                          "lowercase snake_case (e.g. rename = { numero_du_college = \"uai\" })")
    if len(set(rename.values())) != len(rename):
        raise ConfigError(f"{where}: rename gives two columns the same name")
    unit_level = raw.get("unit_level", "person")
    if unit_level not in UNIT_LEVELS:
        raise ConfigError(f"{where}: unit_level must be one of {', '.join(UNIT_LEVELS)}")
    cell_key, perturb = _cell_key(raw.get("cell_key", {}), min_count, base, where)
    shared = raw.get("shared", False)
    if not isinstance(shared, bool):
        raise ConfigError(f"{where}: shared must be true or false")
    if shared and tier != "open":
        raise ConfigError(f"{where}: only an open table can be shared (tier is {tier!r})")
    return DatasetConfig(
        table=table,
        source=tuple(_expand(s, base, where) for s in sources),
        tier=tier,
        description=str(raw.get("description", "")),
        filter=str(raw.get("filter", "")),
        privacy_unit=privacy_unit,
        min_count=min_count,
        round_to=round_to,
        unit_level=unit_level,
        cell_key=cell_key,
        perturb=perturb,
        schema={k: str(v).upper() for k, v in raw.get("schema", {}).items()},
        columns={k: str(v) for k, v in raw.get("columns", {}).items()},
        public_domains=domains,
        max_rows_per_unit=max_rows,
        bounds=bounds,
        rename=dict(rename),
        shared=shared,
        onboarding=_onboarding(raw, base, where),
    )


def _cell_key(raw: Any, threshold: int, base: Path, where: str) -> tuple[CkmParams, bool]:
    """The cell key method's parameters of a dataset; checked by building its ptable."""
    where = f"{where} cell_key"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: an inline table, e.g. {{ max_perturbation = 4 }}")
    _check_keys(where, raw, _CELL_KEY_KEYS)
    perturb = raw.get("perturb", True)
    if not isinstance(perturb, bool):
        raise ConfigError(f"{where}: perturb must be true or false")
    if not perturb and os.environ.get(EXACT_RELEASE_ENV) != "1":
        raise ConfigError(f"{where}: perturb = false releases exact restricted aggregates; "
                          f"it is for tests only ({EXACT_RELEASE_ENV}=1) and a node refuses "
                          "it otherwise")
    default = CkmParams()
    try:
        params = CkmParams(
            threshold=threshold,
            max_perturbation=int(raw.get("max_perturbation", default.max_perturbation)),
            variance=float(raw.get("variance", default.variance)),
            magnitude=float(raw.get("magnitude", default.magnitude)),
            ptable=_expand(raw["ptable"], base, where) if "ptable" in raw else None)
        if not 0.05 <= params.magnitude <= 2:
            raise ConfigError(f"{where}: magnitude must be in [0.05, 2]")
        ptable_for(params)  # a bad table or parameters fail at start, not at query time
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where}: {e}") from None
    return params, perturb


def _onboarding(raw: dict[str, Any], base: Path, where: str) -> Onboarding | None:
    from nodes._onboard import parse_onboarding  # imports this module: load it late

    return parse_onboarding(raw, base, where)


def load_node_config(path: str | Path) -> NodeConfig:
    path, raw = read_toml(path)
    base = path.parent
    where = str(path)
    _check_keys(where, raw, {"node_id", "listen", "tls", "engine", "dataset",
                             "state_dir", "board_public_key", "data_dir", "training",
                             "accept_references", "coordinator_public_key",
                             "metrics_listen", "metrics_allow_remote"})
    accept_references = raw.get("accept_references", True)
    if not isinstance(accept_references, bool):
        raise ConfigError(f"{where}: accept_references must be true or false")
    tls = None
    if "tls" in raw:
        _check_keys(f"{where} [tls]", raw["tls"], TlsConfig)
        t = raw["tls"]
        tls = TlsConfig(
            cert=_expand(_require(t, "cert", where + " [tls]"), base, where),
            key=_expand(_require(t, "key", where + " [tls]"), base, where),
            client_ca=_expand(_require(t, "client_ca", where + " [tls]"), base, where),
            allowed_client_cn=t.get("allowed_client_cn", "bulle-coordinator"),
        )
    engine_raw = raw.get("engine", {})
    _check_keys(f"{where} [engine]", engine_raw, EngineConfig)
    limit = engine_raw.get("max_query_seconds", EngineConfig.max_query_seconds)
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 < limit <= 86400:
        raise ConfigError(f"{where} [engine]: max_query_seconds must be a number of seconds "
                          "in (0, 86400]")
    datasets = tuple(
        _dataset(d, base, f"{where} [[dataset]] #{i + 1}")
        for i, d in enumerate(raw.get("dataset", []))
    )
    names = [d.table for d in datasets]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"{where}: table {dup!r} is declared twice")
    node_id = _require(raw, "node_id", where)
    if not re.match(r"^[a-z0-9][a-z0-9-]{0,62}$", str(node_id)):
        raise ConfigError(f"{where}: node_id {node_id!r} must be lowercase letters, digits, '-'")
    return NodeConfig(
        node_id=node_id,
        listen=str(raw.get("listen", "127.0.0.1:50051")),
        tls=tls,
        engine=EngineConfig(**engine_raw),
        datasets=datasets,
        data_dir=_expand(raw["data_dir"], base, where) if "data_dir" in raw else None,
        state_dir=_expand(raw["state_dir"], base, where) if "state_dir" in raw else None,
        board_public_key=(_expand(raw["board_public_key"], base, where)
                          if "board_public_key" in raw else None),
        coordinator_public_key=(_expand(raw["coordinator_public_key"], base, where)
                                if "coordinator_public_key" in raw else None),
        path=path,
        training=_training(raw["training"], base, f"{where} [training]")
        if "training" in raw else None,
        accept_references=accept_references,
        metrics_listen=_metrics_listen(raw.get("metrics_listen", ""),
                                       raw.get("metrics_allow_remote", False), where),
    )


def _metrics_listen(value: Any, allow_remote: Any, where: str) -> str:
    host, _, port = str(value).rpartition(":")
    if value and not (isinstance(value, str) and host and port.isdigit()
                      and int(port) < 65536):
        raise ConfigError(f"{where}: metrics_listen {value!r} must be host:port "
                          '(e.g. "127.0.0.1:9464")')
    if not isinstance(allow_remote, bool):
        raise ConfigError(f"{where}: metrics_allow_remote must be true or false")
    if value and not allow_remote and not _is_loopback(host):
        raise ConfigError(
            f"{where}: metrics_listen {value!r} is not a loopback address; the metrics "
            "endpoint has no authentication, so it listens on loopback (127.0.0.1, ::1, "
            "localhost) unless metrics_allow_remote = true says it is on a scrape-only "
            "network")
    return str(value)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # any other name may resolve anywhere


def _training(raw: dict[str, Any], base: Path, where: str) -> TrainingConfig:
    _check_keys(where, raw, TrainingConfig)
    zoo = TrainingConfig.models  # = bulle_flower.models.MODELS (no torch import here)
    models = tuple(raw.get("models", zoo))
    unknown = sorted(set(models) - set(zoo))
    if unknown:
        raise ConfigError(f"{where}: unknown model {unknown[0]!r} (the zoo: {', '.join(zoo)})")
    poll = float(raw.get("poll_interval_s", 0.2))
    if not 0.01 <= poll <= 10:
        raise ConfigError(f"{where}: poll_interval_s must be in [0.01, 10]")
    return TrainingConfig(
        superlink=str(_require(raw, "superlink", where)),
        root_certificates=_expand(_require(raw, "root_certificates", where), base, where),
        auth_key=_expand(_require(raw, "auth_key", where), base, where),
        models=models, runtime_port=int(raw.get("runtime_port", 0)), poll_interval_s=poll)
