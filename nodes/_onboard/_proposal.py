"""The proposal file ``<config>.schema.toml``: the inferred schema and a classification
for the operator to review (the operator's own TOML is never rewritten)."""

from __future__ import annotations

import json
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nodes._config import NodeConfig
from nodes._onboard._files import atomic_write
from nodes._onboard._spec import IngestSpec
from nodes._quality import iso as _iso

_ID_TOKENS = {"ine", "nir", "email", "mail", "courriel", "prenom", "firstname", "surname",
              "lastname", "telephone", "phone", "tel", "nom", "name"}
# Quasi-identifiers by a token of the column's name (``age_at_enrollment`` has ``age``),
# with the generalisation proposed: the usual ones of pupil records (birth dates, age,
# sex, nationality, postcode, school), a starting point the operator confirms.
_QI_TOKENS = {
    "year": {"naissance", "birth", "birthdate", "birthday", "dob"},
    "departement": {"postal", "postcode", "zip", "cp", "zipcode"},
    "band:5": {"age"},
    "keep": {"sex", "sexe", "gender", "genre", "nationality", "nacionality", "nationalite",
             "citizenship", "nation", "school", "ecole", "etablissement", "college", "lycee",
             "uai"},
}


def _suggest(col: str) -> tuple[str, str]:
    """A classification suggested by the name only: a starting point for the operator."""
    tokens = set(col.split("_"))
    if col in _ID_TOKENS or tokens & (_ID_TOKENS - {"nom", "name", "tel"}):
        return "identifier", ""
    for rule, names in _QI_TOKENS.items():
        if tokens & names:
            return "quasi-identifier", rule
    return "attribute", ""


def _toml(v: Any) -> str:
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    return json.dumps(v)


def proposal_path(config: NodeConfig) -> Path:
    assert config.path is not None
    return config.path.with_name(config.path.stem + ".schema.toml")


def _write_proposal(config: NodeConfig, table: str, entry: dict[str, Any]) -> Path:
    path = proposal_path(config)
    try:
        tables = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        tables = {}
    tables[table] = entry
    lines = ["# Schema and classification proposed by `bulle node ingest` from the data it",
             "# read. Nothing here is applied: review it and copy what you accept into the",
             f"# dataset in {config.path.name if config.path else 'the config'}. "
             "This file is rewritten by every ingest."]
    for name in sorted(tables):
        t = tables[name]
        cls = t.get("classify", {})
        label = {"identifiers": "identifier, pseudonymised", "attributes": "attribute",
                 "drop": "dropped, not written"}
        classes = {c: label.get(k, k) for k, cols in cls.items() if isinstance(cols, list)
                   for c in cols}
        classes.update({c: f"quasi-identifier, {r}"
                        for c, r in cls.get("quasi_identifiers", {}).items()})
        raw = str(t.get("status", "")).startswith("refused")
        lines += ["", f"[{name}]", f"status = {_toml(t.get('status', ''))}",
                  f"proposed_at = {_toml(t.get('proposed_at', ''))}",
                  f"inputs = {_toml(t.get('inputs', []))}",
                  "# classified here by a guess from the name only: check these first",
                  f"guessed = {_toml(t.get('guessed', []))}", "",
                  f"[{name}.schema]  # " + ("types of the raw columns (nothing ingested yet)"
                                            if raw else "types after ingest: copy into the "
                                            "dataset's `schema`")]
        lines += [f"{c} = {_toml(typ)}  # {classes.get(c, '')}".rstrip(" #")
                  for c, typ in t.get("schema", {}).items()]
        lines += ["", f"[{name}.classify]  # copy into [dataset.classify] once reviewed"]
        lines += [f"{k} = {_toml(v)}" for k, v in cls.items()]
    atomic_write(path, ("\n".join(lines) + "\n").encode())
    return path


def _proposal(spec: IngestSpec, columns: dict[str, str], status: str) -> dict[str, Any]:
    classes = spec.classes()
    cls: dict[str, Any] = {"identifiers": [], "quasi_identifiers": {}, "attributes": [],
                           "drop": []}
    guessed = []
    for col in columns:
        kind, rule = classes.get(col, ""), spec.quasi_identifiers.get(col, "")
        if not kind:
            kind, rule = _suggest(col)
            guessed.append(col)
        if kind == "quasi-identifier":
            cls["quasi_identifiers"][col] = rule or "keep"
        else:
            cls[{"identifier": "identifiers", "attribute": "attributes",
                 "dropped": "drop"}[kind]].append(col)
    return {"status": status, "proposed_at": _iso(datetime.now(UTC).timestamp()),
            "inputs": [str(p) for p in spec.inputs], "guessed": guessed, "schema": columns,
            "classify": {k: v for k, v in cls.items() if v}}
