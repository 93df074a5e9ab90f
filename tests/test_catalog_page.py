"""The catalogue page (``/catalog/``) over a real federation and a real uvicorn server,
without the hub (a coordinator bearer token in the header); the hub login and the browser
are in ``tests/test_enclave.py``."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from enclave import connect
from federation._api import ENDPOINT_SCOPES, build_app
from federation._catalog_page import render
from federation._dashboard import return_path
from federation._hubauth import Caller
from privacy import generate_board_keys
from tests._federation import DATA, TOKEN, start_federation
from tests.test_api import ServerThread
from tests.test_sensitive_tier import vendor

EVIL = "<script>alert('catalogue')</script>"


def uci(school: str) -> list[dict]:
    return [{
        "table": "lycee_students", "tier": "restricted", "min_count": 8, "round_to": 5,
        "source": str(DATA / "uci-student-performance" / "student-por.csv"),
        "filter": f"school = '{school}'", "description": "Pupils of the Portuguese course.",
        "columns": {"g3": "final grade (0-20)", "absences": "number of school absences"},
        "public_domains": {"sex": ["F", "M"], "absences": list(range(40))},
    }]


def depp() -> list[dict]:
    return [
        {"table": "ips_colleges", "tier": "open",
         "source": str(DATA / "fr-ips/fr-en-ips-colleges-ap2022.csv"),
         "description": f"IPS of each collège {EVIL}",
         "columns": {"uai": "school identifier (UAI) & <b>key</b>",
                     "ips": "indice de position sociale"}},
        {"table": "dnb_colleges", "tier": "open", "source": str(
            DATA / "fr-ivac-colleges/fr-en-indicateurs-valeur-ajoutee-colleges.csv")},
    ]


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("catalog-page")
    generate_board_keys(tmp / "board")
    fed = start_federation(tmp, certs, {"gp": uci("GP"), "ms": uci("MS"), "depp": depp(),
                                        "v1": vendor(("AAA", "BBB"))},
                           board_public_key=tmp / "board" / "board_ed25519.pub.pem")
    try:
        with ServerThread(build_app(fed.coordinator)) as base:
            yield base
    finally:
        fed.close()


def get(url: str, q: str | None = None, token: str | None = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{url}/catalog/", params={"q": q} if q is not None else None,
                     headers=headers, timeout=60)


def sections(html: str) -> list[str]:
    return re.findall(r"<section class='table' id='table-([^']+)'", html)


def section(html: str, table: str) -> str:
    start = html.index(f"id='table-{table}'")
    return html[start:html.index("</section>", start)]


def test_page_lists_tables_nodes_and_their_data_dictionary(url: str) -> None:
    r = get(url)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert '<b id="who">alice</b>' in html and "../board/" not in html  # not the board
    assert sections(html) == ["assessments", "dnb_colleges", "ips_colleges", "lycee_students",
                              "student_assessment"]
    assert "<p id='count'>5 tables</p>" in html
    for node in ("gp", "ms", "depp", "v1"):
        assert f"<tr data-node='{node}'><td>{node}</td><td class='ok'>up</td>" in html
    lycee = section(html, "lycee_students")
    assert "<span class='tier tier-restricted'>restricted</span>" in lycee
    assert re.search(r"<b>gp</b> <span class='muted'>\([^)]+ rows\)</span>, <b>ms</b>", lycee)
    assert ("values resting on fewer than 8 units shown as &lt; 8 · perturbed by the cell key "
            "method · no MIN/MAX (the unit is a person) · counts rounded to 5") in lycee
    assert re.search(r"<span class='quality'>\d+/100</span>", lycee)
    g3 = re.search(r"<tr data-column='g3'>.*?</tr>", lycee).group(0)
    assert "<td>final grade (0-20)</td>" in g3
    assert "<td>F, M</td>" in re.search(r"<tr data-column='sex'>.*?</tr>", lycee).group(0)
    absences = re.search(r"<tr data-column='absences'>.*?</tr>", lycee).group(0)
    assert "0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 <span class='muted'>… (+28 more)" in absences
    # Pivots: marked, with the other tables that have the column (links to their section).
    ips = section(html, "ips_colleges")
    uai = re.search(r"<tr data-column='uai'>.*?</tr>", ips).group(0)
    assert "⇄ school</span>" in uai and "<a href='#table-dnb_colleges'>dnb_colleges</a>" in uai
    assert "<tr data-column='rentree_scolaire'>" in ips and "⇄ year" in ips
    assert "⇄" not in re.search(r"<tr data-column='ips'>.*?</tr>", ips).group(0)
    # Escaped everywhere: the node's description and column descriptions are data.
    assert EVIL not in html and "<b>key</b>" not in html
    assert "IPS of each collège &lt;script&gt;alert(&#39;catalogue&#39;)&lt;/script&gt;" in ips
    assert "school identifier (UAI) &amp; &lt;b&gt;key&lt;/b&gt;" in uai
    # A sensitive table no grant of alice's covers: listed, without details (as the JSON).
    hidden = section(html, "student_assessment")
    assert "details need a grant in a project" in hidden and "data-column" not in hidden
    assert "tier-sensitive" in hidden
    body = httpx.get(f"{url}/v1/catalog", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert [t["name"] for t in body["tables"]] == sections(html)
    assert next(t for t in body["tables"] if t["name"] == "student_assessment")["columns"] == []


def test_search_keeps_the_matching_tables(url: str) -> None:
    html = get(url, "college").text  # accents and case ignored: "collège", "colleges"
    assert sections(html) == ["dnb_colleges", "ips_colleges"]
    assert "2 of 5 tables match <b>college</b>" in html
    assert "<input id='q' name='q' value='college'" in html
    assert "matches: name, description" in section(html, "ips_colleges")
    assert sections(get(url, "Position SOCIALE").text) == ["ips_colleges"]
    assert sections(get(url, "grade absences").text) == ["lycee_students"]
    none = get(url, "no such word").text
    assert sections(none) == [] and "No table matches every word." in none
    reflected = "x' onfocus='alert(1)"
    html = get(url, reflected).text
    assert reflected not in html and "value='x&#39; onfocus=&#39;alert(1)'" in html
    # The SDK searches with the same function.
    hub = connect(url, TOKEN)
    assert list(hub.catalog(search="COLLÈGE")["table"]) == ["dnb_colleges", "ips_colleges"]


def test_page_needs_a_caller_with_the_catalogue_scope(url: str) -> None:
    assert ENDPOINT_SCOPES["GET /catalog/"] == ENDPOINT_SCOPES["GET /v1/catalog"]
    for token in (None, "not-a-token"):  # no hub to log in with here: 401
        r = get(url, token=token)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
    r = httpx.get(f"{url}/catalog", timeout=30)
    assert r.status_code == 302 and r.headers["location"] == "catalog/"


def test_reference_tables_are_shown_with_their_copies(url: str) -> None:
    body = httpx.get(f"{url}/v1/catalog", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    for t in body["tables"]:
        if t["name"] == "ips_colleges":
            t.update(shared=True, copies=["gp", "ms"])
    html = render(Caller("alice", frozenset(), "config"), body, "")
    assert ("Reference table, copied to: <span class='copies'>gp, ms</span> — join it at any "
            "of these nodes") in section(html, "ips_colleges")
    assert "Reference table" not in section(html, "dnb_colleges")


def test_the_login_comes_back_only_to_our_pages() -> None:
    assert return_path("catalog/") == "catalog/"
    assert return_path("catalog/?q=coll%C3%A8ge%20ips") == "catalog/?q=coll%C3%A8ge%20ips"
    assert return_path("board/audit?node=vendor-a") == "board/audit?node=vendor-a"
    for bad in (None, "", "https://evil.example/", "//evil.example/", "/catalog/",
                "board/../../x", "board", "board/audit?node=//evil.example",
                "board/audit?node=vendor-a&next=x", "board/audit?node=" + "a" * 64):
        assert return_path(bad) == "board/", bad
    # a catalogue address that does not fit (other parameters, too long a search) comes
    # back to the catalogue itself, never to what it carried
    for bad in ("catalog/?q=a&next=//evil", "catalog/?q=<x>", "catalog/?q=" + "%20" * 300):
        assert return_path(bad) == "catalog/", bad
