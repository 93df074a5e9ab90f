"""The unit tier: plain data in, plain data out; no servers, no processes, no network.
Every test under tests/unit/ is marked ``unit`` (``make test-fast`` runs only these)."""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.unit)
