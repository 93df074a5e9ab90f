"""The node agent: holds data, never lets rows out.

- ``_config``: TOML config (unknown keys rejected); ``_ingest``: CSV/Parquet → DuckDB;
- ``_engine``: locked DuckDB, plan execution, disclosure control before release;
- ``_compile``: plan checks (second line of defence) and SQL generation;
- ``_service``: the thin gRPC servicer (mutual TLS, coordinator identity pinned).
"""

from nodes._compile import PlanRefused
from nodes._config import ConfigError, NodeConfig, load_node_config
from nodes._engine import NodeEngine

__all__ = ["ConfigError", "NodeConfig", "NodeEngine", "PlanRefused", "load_node_config"]
