"""The coordinator: SQL front end, planner, fan-out and merge, HTTP API.

Where things are:
- ``_sql``: researcher SQL → validated query tree (``_tree``);
- ``_planner``: tree → per-node partial-aggregate plan + merge recipe;
- ``_coordinator``: fan-out to nodes (``_nodes``, gRPC + mTLS) and release;
- ``_merge``: partials → released table (DuckDB over Arrow);
- ``_precision``: the ε a DP query needs for a precision (and the exact noise intervals of
  counts and sums); ``_dummy``: dummy tables and answers from public metadata;
- ``_api``: the HTTP JSON API; ``proto/``: the wire contract;
- ``_indicators``: standing indicators (scheduler, history), ``_indicators_page`` their pages.

This module is kept light: nodes import ``federation.proto`` and must not load
coordinator code. Public names are loaded lazily.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ERROR_CODES", "REQUIRED", "ConfigError", "Coordinator", "ErrorCode",
           "IndicatorSpec", "QueryError", "Schema", "Section", "Setting", "did_you_mean",
           "example_toml", "expand_path", "hash_token", "load_coordinator_config",
           "make_certs", "parse", "plan_query", "read_toml", "reference_text",
           "setting_names"]

_LAZY = {
    "ConfigError": "federation._settings",  # shared by every config file (nodes' too)
    "expand_path": "federation._settings",
    "read_toml": "federation._settings",
    # settings declared once (nodes' config too): loading, reference text, example
    "REQUIRED": "federation._settings",
    "Schema": "federation._settings",
    "Section": "federation._settings",
    "Setting": "federation._settings",
    "did_you_mean": "federation._settings",
    "example_toml": "federation._settings",
    "reference_text": "federation._settings",
    "setting_names": "federation._settings",
    "Coordinator": "federation._coordinator",
    "IndicatorSpec": "federation._indicators",  # standing indicators
    "QueryError": "federation._errors",
    "ERROR_CODES": "federation._errors",  # the one catalogue of error codes (docs/errors.md)
    "ErrorCode": "federation._errors",
    "load_coordinator_config": "federation._config",
    "hash_token": "federation._config",  # a researcher's token_sha256 in the config
    "make_certs": "federation._certs",  # a local CA and certificates (bulle certs, the demo)
    "parse": "federation._sql",
    "plan_query": "federation._planner",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
