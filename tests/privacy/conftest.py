"""Run the ledger's contract against every store it supports: SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._postgres import fresh_database


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty ledger store: a SQLite file, or a new database on a real PostgreSQL
    server (Debian's ``postgresql``, started once per test session by tests/_postgres.py)."""
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    return fresh_database()
