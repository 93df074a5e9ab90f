"""Catalogue search has one meaning in the SDK (enclave, no coordinator code loaded) and on
the catalogue page (federation/_catalog.py)."""

from __future__ import annotations

import pytest

from enclave._client import search_table as sdk_search
from federation._catalog import search_table as page_search

TABLE = {"name": "dnb_resultats", "description": "Résultats du brevet par collège",
         "columns": [{"name": "uai", "description": "identifiant de l'établissement"},
                     {"name": "ips", "description": "Indice de position sociale"}]}


@pytest.mark.parametrize(("query", "found"), [
    ("college", ["description"]),
    ("COLLÈGE ips", ["description", "ips"]),
    ("etablissement", ["uai"]),
    ("dnb", ["name"]),
    ("lycée", None),
    ("", []),
])
def test_the_sdk_and_the_page_agree(query: str, found: list[str] | None) -> None:
    assert sdk_search(TABLE, query) == found
    assert page_search(TABLE, query) == found
