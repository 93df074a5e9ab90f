"""The ingest of a dataset: idempotent (manifest of input hashes), atomic, locked."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from nodes._config import ConfigError, DatasetConfig, NodeConfig
from nodes._onboard._files import _locked, _publish, _write_temp, atomic_write, outputs
from nodes._onboard._proposal import _proposal, _write_proposal
from nodes._onboard._pseudonym import _load_key, key_fingerprint
from nodes._onboard._read import _Input, _read
from nodes._onboard._spec import FORMAT_VERSION, IngestError, IngestSpec, _Unclassified
from nodes._onboard._transform import _build, _drain
from nodes._quality import compute_quality, sha256_file
from nodes._quality import iso as _iso
from nodes._sources import _infer_casts, _quote, load_dataset


@dataclass(frozen=True)
class IngestResult:
    table: str
    status: str  # "ingested" or "unchanged"
    rows: int
    output: Path
    score: int | None
    proposal: Path | None


def _input_hash(ds: DatasetConfig, spec: IngestSpec, digests: list[str], key_id: str) -> str:
    settings = {
        "format": FORMAT_VERSION, "inputs": digests, "key": key_id,
        "spec": {"encoding": spec.encoding, "delimiter": spec.delimiter,
                 "identifiers": spec.identifiers, "quasi_identifiers": spec.quasi_identifiers,
                 "attributes": spec.attributes, "drop": spec.drop,
                 "length": spec.pseudonymise.length if spec.pseudonymise else 0},
        # what the validation and the stored quality report depend on
        "schema": ds.schema, "filter": ds.filter, "tier": ds.tier, "unit": ds.privacy_unit,
        "max_rows_per_unit": ds.max_rows_per_unit, "bounds": ds.bounds,
        "public_domains": {k: [str(v) for v in vs] for k, vs in ds.public_domains.items()},
        "pivots": ds.onboarding.pivots if ds.onboarding else (),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _unchanged(manifest_path: Path, parquet: Path, input_hash: str) -> dict[str, Any] | None:
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (manifest.get("input_hash") == input_hash and parquet.is_file()
            and sha256_file(parquet) == manifest.get("output_sha256")):
        return manifest
    return None


def _raw_types(con: duckdb.DuckDBPyConnection, inputs: list[_Input]) -> dict[str, str]:
    """Inferred types of the raw columns, for a proposal written before any transformation."""
    out: dict[str, str] = {}
    for i, inp in enumerate(inputs):
        name = f"__raw{i}"
        con.register(name, inp.table)
        cols = [c for c in inp.table.column_names if not c.startswith("__")]
        text = [c for c in cols if pa.types.is_string(inp.table.schema.field(c).type)]
        sel = dict(zip(text, _infer_casts(con, name, text), strict=True)) if text else {}
        _drain(con)
        rel = con.sql(f"SELECT {', '.join(sel.get(c, _quote(c)) for c in cols)} FROM {name}")
        for c, t in zip(rel.columns, rel.types, strict=True):
            out.setdefault(c, str(t))
        con.unregister(name)
    return out


def ingest_dataset(config: NodeConfig, ds: DatasetConfig, *, force: bool = False
                   ) -> IngestResult:
    """Ingest one dataset (see the module docstring); raises IngestError on any problem."""
    where = f"dataset {ds.table!r}"
    spec = ds.onboarding.ingest if ds.onboarding else None
    if spec is None:
        raise IngestError(f"{where}: no [dataset.ingest] section: it is served from its "
                          "source as is")
    try:
        return _ingest(config, ds, spec, force)
    except IngestError as e:
        raise IngestError(f"{where}: {e}") from None


def _ingest(config: NodeConfig, ds: DatasetConfig, spec: IngestSpec, force: bool
            ) -> IngestResult:
    data_dir = config.data_dir
    if data_dir is None:
        raise IngestError("the node config has no data_dir (where ingest writes)")
    parquet, _, manifest_path = outputs(ds)
    if (len(ds.source) != 1 or parquet.suffix != ".parquet"
            or not parquet.resolve().is_relative_to(data_dir.resolve())):
        raise IngestError(f"source must be one .parquet file under data_dir ({data_dir}): "
                          "ingest writes it and the node serves it")
    if spec.identifiers:
        inside = [p for p in spec.inputs if p.resolve().is_relative_to(data_dir.resolve())]
        if inside:
            raise IngestError(f"raw input {inside[0]} holds direct identifiers and must not be "
                              "kept under data_dir")
    key = None
    key_id = ""
    if spec.identifiers:
        assert spec.pseudonymise is not None
        key = _load_key(spec.pseudonymise, data_dir, "pseudonymisation")
        key_id = key_fingerprint(key)
    data_dir.mkdir(parents=True, exist_ok=True)
    with _locked(data_dir, ds.table):
        for stale in data_dir.glob(f".{parquet.stem}.*.tmp*"):  # left by a killed ingest
            stale.unlink(missing_ok=True)
        missing = [p for p in spec.inputs if not p.is_file()]
        if missing:
            raise IngestError(f"input file not found: {missing[0]}")
        digests = [sha256_file(p) for p in spec.inputs]
        input_hash = _input_hash(ds, spec, digests, key_id)
        previous = None if force else _unchanged(manifest_path, parquet, input_hash)
        if previous is not None:
            return IngestResult(ds.table, "unchanged", int(previous.get("rows", 0)), parquet,
                                previous.get("score"), None)
        return _run(config, ds, spec, key, key_id, digests, input_hash)


def _run(config: NodeConfig, ds: DatasetConfig, spec: IngestSpec, key: bytes | None,
         key_id: str, digests: list[str], input_hash: str) -> IngestResult:
    parquet, quality_path, manifest_path = outputs(ds)
    scratch = Path(tempfile.mkdtemp(prefix="bulle-ingest-"))  # DuckDB spill: never data_dir
    con = duckdb.connect(":memory:", config={
        "threads": 1, "temp_directory": str(scratch), "memory_limit": config.engine.memory_limit,
        "autoinstall_known_extensions": False, "autoload_known_extensions": False})
    tmp: Path | None = None
    try:
        inputs = [_read(p, spec) for p in spec.inputs]
        try:
            table = _build(con, inputs, ds, spec, key)
        except _Unclassified:
            _write_proposal(config, ds.table,
                            _proposal(spec, _raw_types(con, inputs), "refused: classify"))
            raise
        table = table.replace_schema_metadata({"bulle.ingest": json.dumps(
            {"format": FORMAT_VERSION, "input_hash": input_hash})})
        # Uncompressed: then a byte scan (grep) of data_dir for a raw identifier is conclusive,
        # which compression would defeat; the node holds the table in memory anyway.
        tmp = _write_temp(parquet, lambda f: pq.write_table(table, f, compression="none"))
        # Validate by loading the file exactly as the node will (filter, declared columns).
        check = duckdb.connect(":memory:", config={"threads": 1,
                                                   "temp_directory": str(scratch)})
        try:
            load_dataset(check, replace(ds, source=(tmp,)))
            mtimes = [p.stat().st_mtime for p in spec.inputs]
            now = datetime.now(UTC).timestamp()
            freshness = {"source_modified_at": _iso(max(mtimes)), "ingested_at": _iso(now)}
            report = compute_quality(check, ds, freshness)
        except ConfigError as e:
            raise IngestError(str(e).replace(str(tmp), str(parquet))) from None
        finally:
            check.close()
        output_sha = sha256_file(tmp)
        manifest = {
            "format": FORMAT_VERSION, "table": ds.table, "input_hash": input_hash,
            "inputs": [{"path": str(p), "sha256": d, "bytes": p.stat().st_size,
                        "modified_at": _iso(p.stat().st_mtime)}
                       for p, d in zip(spec.inputs, digests, strict=True)],
            "key_id": key_id, "output": parquet.name, "output_sha256": output_sha,
            "rows": table.num_rows, "score": report["score"], **freshness,
        }
        # Data first, then its report, then the manifest that vouches for both: a crash in
        # between leaves a manifest that does not match, so the next ingest runs again.
        _publish(tmp, parquet)
        tmp = None
        atomic_write(quality_path, json.dumps(report, indent=2).encode())
        atomic_write(manifest_path, json.dumps(manifest, indent=2).encode())
        types = {c: str(t) for c, t in zip(table.column_names,
                                           _duck_types(con, table), strict=True)}
        proposal = _write_proposal(config, ds.table, _proposal(spec, types, "ingested"))
        return IngestResult(ds.table, "ingested", table.num_rows, parquet, report["score"],
                            proposal)
    except duckdb.Error as e:
        raise IngestError(f"cannot transform the inputs: {e}") from None
    except OSError as e:  # disk full, permissions: nothing was renamed
        raise IngestError(f"cannot write under {parquet.parent}: {e}") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        con.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _duck_types(con: duckdb.DuckDBPyConnection, table: pa.Table) -> list[str]:
    con.register("__typed", table)
    try:
        return [str(t) for t in con.sql("SELECT * FROM __typed").types]
    finally:
        con.unregister("__typed")


def ingest_node(config: NodeConfig, table: str | None = None, *, force: bool = False
                ) -> list[IngestResult | IngestError]:
    """Ingest every dataset with an ``[dataset.ingest]`` section (or just ``table``).

    Each dataset is independent: one failing leaves the others' results (and its own
    previous version) in place. Returns a result or the error per dataset.
    """
    if table is not None:
        ds = config.dataset(table)
        if ds is None:
            raise IngestError(f"no dataset {table!r} in {config.path}")
        todo = [ds]
    else:
        todo = [d for d in config.datasets if d.onboarding and d.onboarding.ingest]
        if not todo:
            raise IngestError(f"{config.path}: no dataset has a [dataset.ingest] section")
    out: list[IngestResult | IngestError] = []
    for ds in todo:
        try:
            out.append(ingest_dataset(config, ds, force=force))
        except IngestError as e:
            out.append(e)
    return out
