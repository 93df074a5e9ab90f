"""Onboarding a dataset: ``bulle node ingest`` turns an operator's raw files into the Parquet
the node serves, with direct identifiers pseudonymised, quasi-identifiers generalised, the
values validated and a data-quality report (``nodes/_quality.py``) stored beside it.

Config (all inside the dataset; ``nodes/_config.py`` only hooks :func:`parse_onboarding`)::

    data_dir = "/srv/bulle/data"                 # node level: where ingest writes

    [[dataset]]
    table = "pupils"
    source = "/srv/bulle/data/pupils.parquet"    # what the node serves = what ingest writes
    tier = "sensitive"
    privacy_unit = "ine"
    pivots = ["uai"]                             # join columns, marked in the catalogue

    [dataset.ingest]
    inputs = ["raw/pupils-2024.csv"]             # CSV (; , tab |), Parquet, JSON lines
    encoding = "auto"                            # or utf-8, cp1252, latin-1
    delimiter = "auto"

    [dataset.pseudonymise]
    key_env = "BULLE_PSEUDONYM_KEY"              # or key_file = "/run/secrets/bulle.key"
    length = 32

    [dataset.classify]                           # every input column, exactly once
    identifiers = ["ine", "nom", "prenom", "email"]
    quasi_identifiers = { date_naissance = "year", code_postal = "departement", age = "band:5" }
    attributes = ["uai", "score"]
    drop = ["commentaire"]

Only a dataset with ``[dataset.ingest]`` needs (and may have) ``[dataset.pseudonymise]`` and
``[dataset.classify]``; then every input column must be classified or the ingest is refused
(its columns are listed in the proposal file, see below). Datasets without it, such as the
demo's published open data, are served straight from their source as before.

Pseudonyms are HMAC-SHA256(key, value) in hex, truncated to ``length`` (default 32 hex = 128
bits). The key makes them irreversible: a national pupil id (INE) has few enough possible
values that a plain hash could be inverted by enumeration; without the key it cannot. 128
bits keep accidental collisions negligible (about n²/2¹²⁹: 10⁻²³ for 10⁸ pupils) at half the
width of the full digest. The key comes from a trusted third party, via a file or an
environment variable named in the config, and is never written with the data; the same key
at every node gives the same pseudonym for the same value, so datasets link across nodes.
Values are normalised first (Unicode NFC, whitespace collapsed, case folded) so ``" Dupont"``
and ``"DUPONT"`` meet.

Generalisation rules for quasi-identifiers: ``year`` and ``month`` (dates as ``YYYY-MM-DD``,
``DD/MM/YYYY`` or a year), ``departement`` (postcode → département: the first two digits;
``97x``/``98x`` overseas keep three; Corsican postcodes ``200xx``–``201xx`` → ``2A``, others
``20xxx`` → ``2B``; a four-digit code that lost its leading zero is padded), ``band:N``
(number → ``"15-19"`` for N = 5) and ``keep``.

Writes are atomic (temporary file, fsync, rename, fsync of the folder) and idempotent: a
manifest records the hash of the inputs, the ingest settings and the key's fingerprint, and
an unchanged ingest is skipped. Any failure (malformed file, bad encoding, wrong type against
the declared ``schema``) names the file and line and leaves the previous version serving. The
inferred schema and a classification proposal are written to ``<config>.schema.toml`` for the
operator to review; the operator's own TOML is never rewritten.

Modules, one job each: ``_spec`` (config), ``_pseudonym`` (HMAC), ``_read`` (decoding the
inputs), ``_transform`` (generalisation, typing, validation), ``_files`` (atomic I/O),
``_proposal`` (the proposal file), ``_run`` (manifests and the ingest itself).
"""

from nodes._onboard._files import atomic_write, outputs
from nodes._onboard._proposal import _suggest, proposal_path
from nodes._onboard._pseudonym import key_fingerprint, pseudonym
from nodes._onboard._run import IngestResult, ingest_dataset, ingest_node
from nodes._onboard._spec import (
    ENCODINGS,
    FORMAT_VERSION,
    RULES,
    IngestError,
    IngestSpec,
    Onboarding,
    PseudonymSpec,
    parse_onboarding,
)

__all__ = [
    "ENCODINGS",
    "FORMAT_VERSION",
    "RULES",
    "IngestError",
    "IngestResult",
    "IngestSpec",
    "Onboarding",
    "PseudonymSpec",
    "_suggest",
    "atomic_write",
    "ingest_dataset",
    "ingest_node",
    "key_fingerprint",
    "outputs",
    "parse_onboarding",
    "proposal_path",
    "pseudonym",
]
