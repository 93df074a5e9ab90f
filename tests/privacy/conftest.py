"""Run the ledger's contract against every store it supports: SQLite and PostgreSQL."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests._postgres import PostgresUnavailable, server


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty ledger store: a SQLite file, or a new database on a real PostgreSQL
    server (skipped where Debian's ``postgresql`` is not installed, failed in CI)."""
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    try:
        import psycopg  # noqa: F401

        return server().create_database()
    except (ImportError, PostgresUnavailable) as e:
        if os.environ.get("CI"):  # .ci/run installs both: a skip there would hide a gap
            pytest.fail(f"PostgreSQL is required in CI: {e}")
        pytest.skip(f"PostgreSQL not available: {e}")
