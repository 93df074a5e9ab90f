"""Onboarding config: the dataset's [dataset.ingest], [dataset.pseudonymise] and
[dataset.classify] sub-tables, parsed into frozen specs (``parse_onboarding``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nodes._config import (
    CLASSIFY,
    ENCODINGS,
    INGEST,
    PSEUDONYMISE,
    ConfigError,
    _expand,
)

FORMAT_VERSION = 1  # part of the input hash: a new pipeline re-ingests everything once
RULES = ("year", "month", "departement", "keep")  # and band:N


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
    ing = INGEST.parse(raw["ingest"], f"{where} [dataset.ingest]", base)
    if not ing["inputs"]:
        raise ConfigError(f"{where} [dataset.ingest]: inputs must name the raw files")
    encoding = ing["encoding"].lower().replace("_", "-")
    encoding = {"utf8": "utf-8", "latin1": "latin-1", "iso-8859-1": "latin-1",
                "windows-1252": "cp1252"}.get(encoding, encoding)
    if encoding not in ENCODINGS:
        raise ConfigError(f"{where} [dataset.ingest]: encoding {encoding!r} is not one of "
                          f"{', '.join(ENCODINGS)}")
    cls = CLASSIFY.parse(raw.get("classify", {}), f"{where} [dataset.classify]", base)
    qis = cls["quasi_identifiers"]
    if not all(isinstance(v, str) for v in qis.values()):
        raise ConfigError(f"{where} [dataset.classify]: quasi_identifiers maps each column to "
                          "a rule (year, month, departement, band:N, keep)")
    bad = next((f"{c} = {r!r}" for c, r in qis.items() if not _rule_ok(r)), None)
    if bad:
        raise ConfigError(f"{where} [dataset.classify]: unknown generalisation rule {bad} "
                          "(year, month, departement, band:N, keep)")
    spec = IngestSpec(
        inputs=tuple(_expand(p, base, where) for p in ing["inputs"]),
        encoding=encoding, delimiter=ing["delimiter"],
        identifiers=cls["identifiers"], quasi_identifiers=dict(qis),
        attributes=cls["attributes"], drop=cls["drop"],
    )
    seen: dict[str, int] = {}
    for c in (*spec.identifiers, *spec.quasi_identifiers, *spec.attributes, *spec.drop):
        seen[c] = seen.get(c, 0) + 1
    twice = sorted(c for c, n in seen.items() if n > 1)
    if twice:
        raise ConfigError(f"{where} [dataset.classify]: column {twice[0]!r} is classified "
                          "more than once")
    if "pseudonymise" in raw:
        ps = PSEUDONYMISE.parse(raw["pseudonymise"], f"{where} [dataset.pseudonymise]", base)
        if (ps["key_file"] is None) == (not ps["key_env"]):
            raise ConfigError(f"{where} [dataset.pseudonymise]: give exactly one of key_file "
                              "or key_env (the trusted third party's key)")
        spec = replace(spec, pseudonymise=PseudonymSpec(**ps))
    elif spec.identifiers:
        raise ConfigError(f"{where}: identifiers are declared but there is no "
                          "[dataset.pseudonymise] section giving the key")
    return Onboarding(ingest=spec, pivots=pivots)
