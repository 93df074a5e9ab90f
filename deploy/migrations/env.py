"""Alembic environment: where the coordinator's database is, and what it should contain."""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import MetaData, create_engine, pool

import federation._indicators  # adds the indicator tables to that metadata
import federation._noderegistry  # noqa: F401 -- adds bulle_nodes to the registry's metadata
from federation._registry import metadata as registry_metadata
from privacy import ledger_metadata

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

# What autogenerate and the drift test compare the migrated schema with: the privacy ledger
# and the project registry, the coordinator's tables. The node-side stores (audit chain,
# release cache) are SQLite files owned by each node: not migrated here.
target_metadata: list[MetaData] = [ledger_metadata, registry_metadata]


def database_url() -> str:
    x = context.get_x_argument(as_dictionary=True)
    url = x.get("url", "")
    if not url and x.get("coordinator_config"):
        # The coordinator's own config: the database migrated is the one it will open.
        from federation._config import load_coordinator_config

        url = load_coordinator_config(x["coordinator_config"]).database
    url = url or os.environ.get("BULLE_DATABASE_URL", "")
    if not url:
        raise SystemExit("no database: pass -x url=URL or -x coordinator_config=FILE, "
                         "or set BULLE_DATABASE_URL")
    return url if "://" in url else f"sqlite:///{url}"  # a bare path, as Ledger(url) takes


def run_offline() -> None:
    """``alembic upgrade head --sql``: print the SQL for a DBA instead of running it."""
    context.configure(url=database_url(), target_metadata=target_metadata,
                      literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata,
                          render_as_batch=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
