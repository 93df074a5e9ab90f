"""The node agent: holds data, never lets rows out.

- ``_config``: TOML config (unknown keys rejected); ``_sources``: CSV/Parquet source files → DuckDB;
- ``_engine``: locked DuckDB, plan execution; ``_disclosure``: disclosure control before
  release (open as computed, restricted by the cell key method, sensitive by DP, charged first);
- ``_compile``: plan checks (second line of defence) and SQL generation;
- ``_service``: the thin gRPC servicer (mutual TLS, coordinator identity pinned);
- ``_flower``: the SuperNode for DP training (``make_flower_key``); ``_pids``:
  ``process_alive``.

Public names are loaded on first use (PEP 562): ``bulle node keygen``/``check``/``doctor``
and the coordinator's imports of ``nodes._config`` do not load the engine.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConfigError",
    "NodeConfig",
    "NodeEngine",
    "PlanRefused",
    "load_node_config",
    "make_flower_key",
    "process_alive",
    "train_round",
]

_LAZY = {
    "ConfigError": "nodes._config",
    "NodeConfig": "nodes._config",
    "NodeEngine": "nodes._engine",
    "PlanRefused": "nodes._compile",
    "load_node_config": "nodes._config",
    # the vetted ClientApp's work (bulle_flower/client_app.py): torch/opacus load with it
    "train_round": "nodes._training",
    "make_flower_key": "nodes._flower",  # a SuperNode's key (bulle node keygen, the demo)
    "process_alive": "nodes._pids",  # a PID still running, zombies not
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nodes' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
