"""The coordinator's pages without the hub, over a real federation (two nodes over gRPC, a
sensitive table under a signed grant) and a real uvicorn server: the home, the board's list
of every release and refusal with its text, the ε legend's figures against the budget and
the export, the node pages, the styled 403, the decision form's number checks. The hub
login and the browser at two widths are in ``tests/test_enclave.py``."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from federation._api import build_app
from federation._config import ProjectConfig
from federation._dashboard import _decision_from_form, export, render_board, summary
from federation._errors import QueryError
from federation._hubauth import SCOPE_APPROVE, SCOPE_AUDIT, Caller
from federation._operator_page import node_view
from privacy import Grant, generate_board_keys, sign_grant
from tests._federation import TOKEN, Federation, start_federation
from tests.conftest import uci
from tests.test_api import ServerThread
from tests.test_precision import pupils

BOARD = Caller("board", frozenset({SCOPE_APPROVE, SCOPE_AUDIT}), "hub")
OPERATOR = Caller("operator", frozenset({SCOPE_AUDIT}), "hub")
RELEASED = "SELECT COUNT(*) AS n FROM pupils"
REFUSED = "SELECT g3 FROM pupils WHERE g3 > 10 -- <script>x</script>"


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[Federation]:
    tmp = tmp_path_factory.mktemp("pages")
    generate_board_keys(tmp)
    now = datetime.now(UTC)
    grant = Grant("demo", ("alice",), ("pupils",), 10.0, 1e-6, now + timedelta(days=1),
                  "testing the pages", now)
    (tmp / "demo.grant").write_text(sign_grant(grant, (tmp / "board_ed25519.pem").read_bytes()))
    f = start_federation(tmp, certs, {"gp": pupils("GP") + uci("GP")[:1], "ms": pupils("MS")},
                         board_public_key=tmp / "board_ed25519.pub.pem",
                         projects=(ProjectConfig("demo", tmp / "demo.grant", 0.5),),
                         operators={"operator": ("gp",)})
    f.coordinator.run(RELEASED, f.researcher)
    f.coordinator.run(RELEASED, f.researcher)
    with pytest.raises(QueryError):
        f.coordinator.run(REFUSED, f.researcher)
    yield f
    f.close()


@pytest.fixture(scope="module")
def url(fed: Federation) -> Iterator[str]:
    with ServerThread(build_app(fed.coordinator)) as base:
        yield base


def _get(url: str, path: str) -> httpx.Response:
    return httpx.get(url + path, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60,
                     follow_redirects=True)  # an operator's /operator/ is their node


def test_board_lists_releases_and_refusals_with_their_text(fed: Federation) -> None:
    html = render_board(BOARD, summary(fed.coordinator), None, "")
    assert '<meta name="viewport"' in html
    assert html.count(f'<td class="text">{RELEASED}</td>') == 2
    assert "<script>x</script>" not in html and "&lt;script&gt;x&lt;/script&gt;" in html
    rows = re.findall(r'<tr class="row kind-query" data-id="([0-9a-f]+)" '
                      r'data-decision="(\w+)">', html)
    assert [d for _, d in rows] == ["refused", "released", "released"]  # newest first
    refused = render_board(BOARD, summary(fed.coordinator), None, "",
                           {"decision": "refused"})
    assert RELEASED not in refused.split('id="activity"')[1] and "refused" in refused


def test_legend_figures_equal_the_budget_and_the_export(fed: Federation) -> None:
    budget = fed.coordinator.projects.budget("demo")
    data = summary(fed.coordinator)
    html = render_board(BOARD, data, None, "")
    legend = html.split('id="legend-figures"')[1].split("</table>")[0]
    spent = re.search(r'data-project="demo">.*?class="spent" data-value="([\d.]+)"', legend,
                      re.S)
    assert spent and float(spent.group(1)) == pytest.approx(round(budget.spent, 6), abs=1e-6)
    assert f">{budget.spent:.4f}<" in legend and f">{budget.remaining:.4f}<" in legend
    rows = list(csv.DictReader(io.StringIO(export(fed.coordinator, "csv", "budgets")
                                           .body.decode())))
    demo = next(r for r in rows if r["name"] == "demo")
    assert float(demo["epsilon_spent"]) == float(spent.group(1))
    charged = [r for r in data["releases"] if r["decision"] == "released"]
    assert all(r["composed_after"] is not None and r["growth"] is not None for r in charged)
    assert charged[-1]["composed_after"] == pytest.approx(round(budget.spent, 6), abs=1e-6)
    assert "what one query or training round reserves" in html  # the legend, once
    assert html.count('id="epsilon-legend"') == 1
    releases = export(fed.coordinator, "csv", "releases").body.decode()
    assert releases.startswith("seq,time,project,researcher,kind,decision,id,text,hash")
    assert REFUSED in releases and RELEASED in releases


def test_home_gives_each_role_its_links(fed: Federation, url: str) -> None:
    r = _get(url, "/")
    assert r.status_code == 200 and '<meta name="viewport"' in r.text
    for link in ("link-catalog", "link-projects", "link-guide"):
        assert f'id="{link}"' in r.text, link
    assert 'id="link-board"' not in r.text  # a researcher has no board
    budget = _get(url, "/v1/budget?project=demo").json()
    row = r.text.split('data-project="demo"')[1].split("</tr>")[0]
    assert f'data-value="{budget["epsilon_spent"]:.6f}"' in row
    assert _get(url, "/guide/").status_code == 200


def test_pages_not_for_a_role_say_so_without_scopes(url: str) -> None:
    for path in ("/board/", "/operator/", "/operator/gp", "/board/audit",
                 "/board/audit?node=gp"):
        r = _get(url, path)
        assert r.status_code == 403, path
        assert "not part of your role" in r.text and "custom:bulle" not in r.text
        assert '<meta name="viewport"' in r.text


def test_node_page_shows_metadata_plans_and_chain(fed: Federation) -> None:
    view = node_view(fed.coordinator, "gp")
    assert {d["name"] for d in view["datasets"]} >= {"pupils", "lycee_students"}
    assert view["state"] == "up" and view["chain"]["ok"]
    assert any(r.text == RELEASED for r in view["plans"])
    quality = next(d for d in view["datasets"] if d["name"] == "pupils")["quality"]
    assert quality is None or 0 <= quality["score"] <= 100


def test_decision_form_numbers_are_checked_in_words() -> None:
    base = {"decision": "approve", "project": "p"}
    for raw in ("abc", "-1", "1000", "nan"):
        with pytest.raises(ValueError, match="ε must be a number above 0 and at most 100"):
            _decision_from_form({**base, "epsilon": raw})
    with pytest.raises(ValueError, match=r"δ must be a number above 0 and below 0\.01"):
        _decision_from_form({**base, "delta": "0.5"})
    assert _decision_from_form({**base, "epsilon": "2.5"}).epsilon == 2.5


def test_node_page_renders_for_an_operator(fed: Federation) -> None:
    from federation._pages import render

    html = render("node.html", who=OPERATOR, roles=["operator"], root="../", title="node gp",
                  **node_view(fed.coordinator, "gp"))
    assert 'data-table="pupils"' in html and RELEASED in html and "✔ intact" in html


def test_node_page_of_a_vendor_node(tmp_path: Path, certs: Path) -> None:
    from federation._pages import render
    from tests.conftest import oulad

    f = start_federation(tmp_path, certs, {"v1": oulad(("AAA",))})
    try:
        html = render("node.html", who=OPERATOR, roles=["operator"], root="../",
                      title="node v1", **node_view(f.coordinator, "v1"))
        assert 'data-table="student_assessment"' in html
    finally:
        f.close()


@pytest.mark.parametrize("caller", [OPERATOR, BOARD], ids=["operator", "board"])
def test_every_page_answers_each_role(fed: Federation, url: str, caller: Caller,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Over HTTP, as an operator and as the board (the hub's answer stubbed: who the token
    belongs to), every page renders."""
    monkeypatch.setattr(fed.coordinator, "identify", lambda token: caller)
    for path in ("/", "/guide/", "/catalog/", "/board/", "/board/audit", "/board/audit?page=2",
                 "/operator/", "/operator/gp", "/board/?decision=refused&project=demo",
                 "/board/audit?node=gp", "/board/audit?node=gp&before=2"):
        r = _get(url, path)
        assert r.status_code == 200, (path, r.text[:500])
        assert re.search(r"<meta name=.viewport.", r.text), path
    assert _get(url, "/operator/nowhere").status_code == 404
    home = _get(url, "/").text
    assert 'id="link-board"' in home and 'id="link-operator"' in home


def test_dataset_bars_compose_like_the_project_bar(fed: Federation) -> None:
    """Every charge of the fixture's project read ``pupils``: its bar is the project's
    composed total (what hub.budget() says), not the plain sum of the charges."""
    data = summary(fed.coordinator)
    demo = next(p for p in data["projects"] if p["name"] == "demo")
    pupils = next(d for d in data["datasets"]
                  if d["project"] == "demo" and d["dataset"] == "pupils")
    charges = sum(r["epsilon"] for r in data["releases"]
                  if r["project"] == "demo" and "pupils" in r["datasets"])
    assert charges > 0 and len([r for r in data["releases"] if r["epsilon"]]) >= 2
    # composed (RDP at the project's δ), not the plain sum of the charges
    assert pupils["epsilon_spent"] == pytest.approx(demo["epsilon_spent"], abs=1e-6)
    assert pupils["epsilon_spent"] != pytest.approx(charges, abs=1e-6)
    html = render_board(BOARD, data, None, "")
    assert "per project and sensitive dataset: composed ε" in html
