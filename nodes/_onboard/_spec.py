"""Onboarding config: the dataset's [dataset.ingest], [dataset.pseudonymise] and
[dataset.classify] sub-tables, parsed into frozen specs (``parse_onboarding``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nodes._config import ConfigError, _expand

FORMAT_VERSION = 1  # part of the input hash: a new pipeline re-ingests everything once
RULES = ("year", "month", "departement", "keep")  # and band:N
ENCODINGS = ("auto", "utf-8", "cp1252", "latin-1")


class IngestError(ConfigError):
    """An ingest refused or failed; the previous version of the dataset still serves."""


class _Unclassified(IngestError):
    """Input columns that [dataset.classify] does not name."""


# -- config ------------------------------------------------------------------------------

@dataclass(frozen=True)
class PseudonymSpec:
    key_file: Path | None = None
    key_env: str = ""
    length: int = 32


@dataclass(frozen=True)
class IngestSpec:
    inputs: tuple[Path, ...]
    encoding: str = "auto"
    delimiter: str = "auto"
    pseudonymise: PseudonymSpec | None = None
    identifiers: tuple[str, ...] = ()
    quasi_identifiers: dict[str, str] = field(default_factory=dict)  # column -> rule
    attributes: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()

    def classes(self) -> dict[str, str]:
        out = {c: "identifier" for c in self.identifiers}
        out.update({c: "quasi-identifier" for c in self.quasi_identifiers})
        out.update({c: "attribute" for c in self.attributes})
        out.update({c: "dropped" for c in self.drop})
        return out


@dataclass(frozen=True)
class Onboarding:
    ingest: IngestSpec | None = None
    pivots: tuple[str, ...] = ()


def _keys(where: str, raw: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} "
                          f"(allowed: {', '.join(sorted(allowed))})")
    return raw


def _names(where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: must be a list of column names")
    return tuple(value)


def _rule_ok(rule: str) -> bool:
    if rule in RULES:
        return True
    m = re.fullmatch(r"band:([1-9][0-9]{0,3})", rule)
    return m is not None


def parse_onboarding(raw: dict[str, Any], base: Path, where: str) -> Onboarding | None:
    """The dataset's onboarding sub-tables, or None when it has none."""
    if not {"ingest", "pseudonymise", "classify", "pivots"} & set(raw):
        return None
    pivots = _names(f"{where} pivots", raw.get("pivots", []))
    if "ingest" not in raw:
        extra = sorted({"pseudonymise", "classify"} & set(raw))
        if extra:
            raise ConfigError(f"{where}: [dataset.{extra[0]}] only applies with a "
                              "[dataset.ingest] section (it happens at ingest)")
        return Onboarding(pivots=pivots)
    ing = _keys(f"{where} [dataset.ingest]", raw["ingest"], {"inputs", "encoding", "delimiter"})
    inputs = ing.get("inputs")
    inputs = [inputs] if isinstance(inputs, str) else inputs
    if not inputs or not all(isinstance(p, str) for p in inputs):
        raise ConfigError(f"{where} [dataset.ingest]: inputs must name the raw files")
    encoding = str(ing.get("encoding", "auto")).lower().replace("_", "-")
    encoding = {"utf8": "utf-8", "latin1": "latin-1", "iso-8859-1": "latin-1",
                "windows-1252": "cp1252"}.get(encoding, encoding)
    if encoding not in ENCODINGS:
        raise ConfigError(f"{where} [dataset.ingest]: encoding {encoding!r} is not one of "
                          f"{', '.join(ENCODINGS)}")
    delimiter = str(ing.get("delimiter", "auto"))
    if delimiter not in ("auto", ";", ",", "\t", "|"):
        raise ConfigError(f"{where} [dataset.ingest]: delimiter must be auto, ';', ',', tab "
                          "or '|'")
    cls = _keys(f"{where} [dataset.classify]", raw.get("classify", {}),
                {"identifiers", "quasi_identifiers", "attributes", "drop"})
    qis = cls.get("quasi_identifiers", {})
    if not isinstance(qis, dict) or not all(isinstance(v, str) for v in qis.values()):
        raise ConfigError(f"{where} [dataset.classify]: quasi_identifiers maps each column to "
                          "a rule (year, month, departement, band:N, keep)")
    bad = next((f"{c} = {r!r}" for c, r in qis.items() if not _rule_ok(r)), None)
    if bad:
        raise ConfigError(f"{where} [dataset.classify]: unknown generalisation rule {bad} "
                          "(year, month, departement, band:N, keep)")
    spec = IngestSpec(
        inputs=tuple(_expand(p, base, where) for p in inputs),
        encoding=encoding, delimiter=delimiter,
        identifiers=_names(f"{where} identifiers", cls.get("identifiers", [])),
        quasi_identifiers=dict(qis),
        attributes=_names(f"{where} attributes", cls.get("attributes", [])),
        drop=_names(f"{where} drop", cls.get("drop", [])),
    )
    seen: dict[str, int] = {}
    for c in (*spec.identifiers, *spec.quasi_identifiers, *spec.attributes, *spec.drop):
        seen[c] = seen.get(c, 0) + 1
    twice = sorted(c for c, n in seen.items() if n > 1)
    if twice:
        raise ConfigError(f"{where} [dataset.classify]: column {twice[0]!r} is classified "
                          "more than once")
    if "pseudonymise" in raw:
        ps = _keys(f"{where} [dataset.pseudonymise]", raw["pseudonymise"],
                   {"key_file", "key_env", "length"})
        if ("key_file" in ps) == ("key_env" in ps):
            raise ConfigError(f"{where} [dataset.pseudonymise]: give exactly one of key_file "
                              "or key_env (the trusted third party's key)")
        length = ps.get("length", 32)
        if not isinstance(length, int) or not 16 <= length <= 64:
            raise ConfigError(f"{where} [dataset.pseudonymise]: length must be 16..64 hex "
                              "characters")
        spec = replace(spec, pseudonymise=PseudonymSpec(
            key_file=_expand(ps["key_file"], base, where) if "key_file" in ps else None,
            key_env=str(ps.get("key_env", "")), length=length))
    elif spec.identifiers:
        raise ConfigError(f"{where}: identifiers are declared but there is no "
                          "[dataset.pseudonymise] section giving the key")
    return Onboarding(ingest=spec, pivots=pivots)
