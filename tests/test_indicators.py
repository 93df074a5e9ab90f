"""Standing indicators (issue 17): proposed through the SDK, approved by the board like a
project, refreshed by the coordinator on a schedule through real nodes (gRPC, mTLS, free
loopback ports) and charged at both ledgers; a refresh the budget cannot pay is recorded
and shown; the page renders in Debian's chromium for an observer and refuses a researcher.

Time is the scheduler's injected clock: the tests move it and call ``tick()``, no sleeps.
The hub answering ``GET /hub/api/user`` is a stub here (who owns which token, with which
scopes); the real hub's login and landing are in tests/test_enclave.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse

from enclave import BulleError, connect
from federation._api import build_app
from federation._config import HubConfig
from federation._hubauth import HubAuth
from privacy import PROJECT_WIDE, generate_board_keys
from tests._federation import TOKEN, Federation, start_federation
from tests.test_api import ServerThread
from tests.test_sensitive_tier import vendor

CHROMIUM = "/usr/bin/chromium"
SQL = ("SELECT is_banked, COUNT(*) AS submissions FROM student_assessment "
       "GROUP BY is_banked ORDER BY is_banked")
# hub token → the user model the stub hub answers (scopes already narrowed, as the hub does)
HUB_USERS = {
    "observer-token": {"kind": "user", "name": "olivia", "scopes": ["custom:bulle:observe"]},
    "researcher-token": {"kind": "user", "name": "rita",
                         "scopes": ["custom:bulle:query", "custom:bulle:train"]},
}


class Clock:
    """The scheduler's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def stub_hub() -> FastAPI:
    app = FastAPI()

    @app.get("/hub/api/user")
    def user(authorization: str = Header("")) -> JSONResponse:
        model = HUB_USERS.get(authorization.partition(" ")[2])
        return JSONResponse(model or {"error": "no"}, status_code=200 if model else 403)

    return app


@dataclass
class Env:
    fed: Federation
    url: str
    clock: Clock


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("indicators")
    board = tmp / "board"
    generate_board_keys(board)
    fed = start_federation(tmp, certs, {"v1": vendor(("AAA",)), "v2": vendor(("BBB",))},
                           board_public_key=board / "board_ed25519.pub.pem")
    # The board signs here with its key, as the demo's board service does.
    fed.coordinator.projects.board_private_key = (board / "board_ed25519.pem").read_bytes()
    clock = Clock()
    fed.coordinator.indicators.clock = clock
    try:
        with ServerThread(stub_hub()) as hub_url:
            fed.coordinator.hub = HubAuth(HubConfig(api_url=f"{hub_url}/hub/api", cache_s=0))
            with ServerThread(build_app(fed.coordinator)) as base:
                yield Env(fed, base, clock)
    finally:
        fed.close()


def _approve(fed: Federation, project: str) -> None:
    fed.coordinator.projects.approve(project, "board-member")


def test_an_indicator_refreshes_on_schedule_is_charged_and_a_refusal_is_shown(
        env: Env) -> None:
    fed, clock, indicators = env.fed, env.clock, env.fed.coordinator.indicators
    hub = connect(env.url, TOKEN)
    proposed = hub.propose_indicator(
        "banked", "Banked submissions", SQL, 60, audience="the State (DNE)", epsilon=0.5,
        epsilon_budget=2.2, description="How many assessment submissions are banked.")
    assert proposed["status"] == "pending" and proposed["tier"] == "sensitive"
    project = proposed["project"]
    assert project == "indicator-banked"
    # Not approved yet: nothing runs, whatever the time.
    clock.advance(3600)
    assert indicators.tick() == []
    # The board decides it like any project: same registry, same audit.
    p = fed.coordinator.projects.registry.get(project)
    assert p is not None and p.team == ("indicator:banked",) and "alice" not in p.team
    assert "SQL: SELECT is_banked" in p.purpose and "ε=0.5 per refresh" in p.purpose
    _approve(fed, project)
    [first] = indicators.tick()
    assert first.status == "released" and first.query_id and first.epsilon_charged == 1.0
    assert indicators.tick() == []  # not due again before its interval
    clock.advance(59)
    assert indicators.tick() == []
    clock.advance(1)
    [second] = indicators.tick()
    assert second.status == "released"
    # Charged like a researcher's query: the coordinator's ledger and each node's.
    coord = [h for h in fed.coordinator.projects.ledger.history(project, PROJECT_WIDE)
             if h.accepted]
    assert [h.request_id for h in coord] == [first.query_id, second.query_id]
    for node in ("v1", "v2"):
        ledger = fed.engines[node].guard.ledger
        charged = [h.request_id for h in ledger.history(project, "student_assessment")
                   if h.accepted]
        assert charged == [first.query_id, second.query_id], node
    # The budget cannot pay a third refresh: refused, recorded, and tried again later.
    clock.advance(60)
    [third] = indicators.tick()
    assert third.status == "refused" and third.error_code == "budget_exhausted"
    assert third.epsilon_charged == 0.0 and third.result is None
    assert [r.status for r in indicators.history("banked")] == \
        ["released", "released", "refused"]
    audit = [e.action for e in fed.coordinator.projects.audit.entries(project)]
    assert audit[:2] == ["indicator_proposed", "project_approved"]
    assert audit.count("released") == 2 and audit.count("refused") == 1
    # The researcher reads her proposal through the API, not others'.
    assert hub.indicators()["last_refresh"].tolist() == ["refused"]
    assert connect(env.url, "test-token-other-researcher-98765").indicators().empty
    # ... and cannot spend the indicator's budget with her own queries.
    with pytest.raises(BulleError):
        hub.sql(SQL, project=project, epsilon=0.1)
    # The page and the CSV show the refused refresh, not only the releases.
    observer = {"Authorization": "Bearer observer-token"}
    page = httpx.get(f"{env.url}/indicators/banked/", headers=observer, timeout=60)
    assert page.status_code == 200
    assert page.text.count("data-status=\"refused\"") == 2  # chart mark + table row
    assert "budget_exhausted" in page.text and first.query_id in page.text
    csv = httpx.get(f"{env.url}/indicators/banked/history.csv", headers=observer,
                    timeout=60).text.splitlines()
    assert csv[0].startswith("refreshed_at,status,query_id,epsilon_charged,is_banked,")
    assert sum(",released," in line for line in csv) == 4  # 2 refreshes × 2 groups
    assert sum(",refused," in line for line in csv) == 1


def test_proposals_are_checked_like_queries(env: Env) -> None:
    hub = connect(env.url, TOKEN)
    with pytest.raises(BulleError, match="give the ε"):
        hub.propose_indicator("no-eps", "x", SQL, "daily", audience="State")
    with pytest.raises(BulleError, match="refused"):
        hub.propose_indicator("rows", "x", "SELECT * FROM student_assessment", "daily",
                              audience="State", epsilon=0.1)
    with pytest.raises(BulleError, match="refused"):  # DP shape rules, before the board
        hub.propose_indicator("dp-max", "x", "SELECT MAX(score) AS m FROM student_assessment",
                              "daily", audience="State", epsilon=0.1)
    with pytest.raises(BulleError, match="schedule"):
        hub.propose_indicator("bad-schedule", "x", SQL, "sometimes", audience="State",
                              epsilon=0.1)
    ok = hub.propose_indicator("open-count", "Assessments", "SELECT assessment_type, "
                               "COUNT(*) AS n FROM assessments GROUP BY assessment_type",
                               "daily", audience="départements")
    assert ok["tier"] == "open" and ok["epsilon"] is None and ok["schedule"] == "daily"


def test_the_scheduler_thread_stops_cleanly(env: Env) -> None:
    from federation._indicators import Indicators, refreshes_table

    # Its own scheduler (the module's keeps serving the other tests), on a clock before
    # any refresh: it ticks for real and finds nothing due.
    indicators = Indicators(env.fed.coordinator, clock=lambda: datetime(2000, 1, 1, tzinfo=UTC),
                            poll_s=0.01)
    # A refresh a crashed run left behind is shown as interrupted when the scheduler starts.
    with indicators._engine.begin() as conn:
        conn.execute(refreshes_table.insert().values(
            indicator="ghost", started_at="1999-12-31T23:00:00+00:00", status="running",
            epsilon_charged=0.0, query_id="q-ghost"))
    indicators.start()
    [ghost] = indicators.history("ghost")
    assert (ghost.status, ghost.error_code, ghost.query_id) == ("failed", "interrupted",
                                                                "q-ghost")
    thread = indicators._thread
    assert thread is not None and thread.is_alive()
    indicators.stop()
    assert not thread.is_alive() and indicators._thread is None
    assert indicators.tick() == []  # stopped: a late tick runs nothing


# WCAG AA: every text (HTML and the chart's SVG text) against its background, ≥ 4.5:1.
CONTRAST_JS = """() => {
  const rgb = c => c.match(/[\\d.]+/g).map(Number);
  const lum = c => { const [r, g, b] = rgb(c).slice(0, 3).map(v => { v /= 255;
    return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
  const bg = el => { for (; el; el = el.parentElement) {
      if (el.closest && el.closest('svg')) return 'rgb(255, 255, 255)';
      const c = getComputedStyle(el).backgroundColor, a = rgb(c);
      if (a.length < 4 || a[3] > 0) return c; }
    return 'rgb(255, 255, 255)'; };
  const bad = [];
  for (const el of document.querySelectorAll('body *')) {
    if (![...el.childNodes].some(n => n.nodeType === 3 && n.textContent.trim())) continue;
    if (['title', 'style'].includes(el.tagName.toLowerCase())) continue;
    const s = getComputedStyle(el);
    const fg = el.closest('svg') ? s.fill : s.color;
    const [l1, l2] = [lum(fg), lum(bg(el))];
    const ratio = (Math.max(l1, l2) + 0.05) / (Math.min(l1, l2) + 0.05);
    if (ratio < 4.5) bad.push(el.tagName + ' ' + el.textContent.trim().slice(0, 30) + ' '
                              + ratio.toFixed(2));
  }
  return bad;
}"""


def _browser(p: Any) -> Any:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} missing: apt-get install -y chromium (.ci/run does)")
    return p.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"])


def test_the_page_renders_for_an_observer_and_refuses_a_researcher(env: Env) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not env.fed.coordinator.indicators.history("banked"):
        pytest.skip("needs the refreshes of the first test")
    # Without the observer role: a styled 403, for a hub researcher and a config token.
    for token in ("researcher-token", TOKEN):
        r = httpx.get(f"{env.url}/indicators/", timeout=60,
                      headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 403 and "<style>" in r.text
        assert "custom:bulle:observe" in r.text
    artifacts = Path(__file__).resolve().parents[1] / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    outside: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = _browser(p)
        try:
            for token, status in (("observer-token", 200), ("researcher-token", 403)):
                ctx = browser.new_context(viewport={"width": 1000, "height": 900},
                                          extra_http_headers={
                                              "Authorization": f"Bearer {token}"})
                page = ctx.new_page()
                page.on("request", lambda req: outside.append(req.url)
                        if not req.url.startswith(env.url) else None)
                r = page.goto(f"{env.url}/indicators/")
                assert r is not None and r.status == status
                if status == 403:
                    assert "Not allowed" in page.inner_text("#forbidden")
                    ctx.close()
                    continue
                assert page.inner_text("#who") == "olivia"
                assert page.query_selector("#indicator-banked svg.chart") is not None
                # published ones only: the pending open-count proposal is not shown
                assert page.query_selector("#indicator-open-count") is None
                assert page.evaluate(CONTRAST_JS) == []
                page.screenshot(path=str(artifacts / "indicators-index.png"), full_page=True)
                page.click("#indicator-banked h2 a")
                page.wait_for_selector("#history-chart svg")
                assert page.query_selector_all("#chart g.series circle.point")
                assert page.query_selector_all("#chart line.interval")  # 95% intervals
                assert page.query_selector("#chart g.mark-refused") is not None
                rows = page.query_selector_all("#refreshes tr.refresh")
                assert [r.get_attribute("data-status") for r in rows] == \
                    ["refused", "released", "released"]
                assert page.inner_text("#refreshes tr.refresh[data-status=refused] .receipt")
                assert page.query_selector("meta[name=viewport]") is not None
                assert page.evaluate(CONTRAST_JS) == []
                page.screenshot(path=str(artifacts / "indicator-observer.png"),
                                full_page=True)
                with page.expect_download() as dl:
                    page.click("#csv")
                assert dl.value.suggested_filename == "indicator-banked.csv"
                ctx.close()
        finally:
            browser.close()
    assert outside == []  # nothing loads from outside the coordinator


def test_the_demo_indicator_is_seeded_approved_and_refreshes_without_epsilon(
        tmp_path: Path, certs: Path) -> None:
    """The demo's indicator (bulle_demo), seeded through the running coordinator's API: the
    researcher proposes it with the SDK, the board approves it with ``bulle board approve``
    and its key; on a node holding the demo's restricted headcounts (cell key on)."""
    from bulle_demo._seed import INDICATOR, seed_indicator
    from tests._federation import DATA

    generate_board_keys(tmp_path / "board")
    headcounts = {
        "table": "college_headcounts", "tier": "restricted", "privacy_unit": "uai",
        "source": str(DATA / "fr-ille-et-vilaine" / "fr-en-college-effectifs-niveau-sexe-lv.csv"),
        "rename": {"numero_du_college": "uai"}, "unit_level": "institution", "min_count": 5,
        "public_domains": {"rentree_scolaire": [2019, 2020, 2021]}}
    fed = start_federation(tmp_path, certs, {"solo": [headcounts]},
                           board_public_key=tmp_path / "board" / "board_ed25519.pub.pem")
    try:
        with ServerThread(build_app(fed.coordinator)) as base:
            for _ in range(2):  # idempotent: `bulle demo up` again
                seed_indicator(base, TOKEN, tmp_path / "board" / "board_ed25519.pem", tmp_path)
        indicators = fed.coordinator.indicators
        [ind] = indicators.indicators()
        assert ind.name == INDICATOR["name"] and ind.proposer == fed.researcher.name
        assert ind.status == "approved" and ind.epsilon is None and ind.tier == "restricted"
        [r] = indicators.tick()
        assert r.status == "released", r.error_message
        assert r.epsilon_charged == 0.0 and r.result is not None
        assert [row[0] for row in r.result["rows"]] == [2019, 2020, 2021]
        assert r.result["tier"] == "restricted"
        actions = [e.action for e in fed.coordinator.projects.audit.entries(ind.project)]
        assert actions == ["indicator_proposed", "project_approved", "released"]
    finally:
        fed.close()


def test_the_hub_login_comes_back_to_the_indicator_pages() -> None:
    from federation._dashboard import return_path

    for good in ("indicators/", "indicators/college-6e-35/"):
        assert return_path(good) == good
    for bad in ("indicators/../board/", "indicators//evil.example/", "indicators/X/",
                "indicators/a/history.csv"):
        assert return_path(bad) == "board/", bad


def test_the_template_escapes_what_researchers_wrote() -> None:
    from federation._indicators import Indicator
    from federation._indicators_page import chart, render

    evil = "<script>alert('x')</script>"
    ind = Indicator(name="x1", title=evil, description=evil, sql=f"SELECT 1 -- {evil}",
                    schedule="daily", interval_s=86_400, epsilon=None, tier="restricted",
                    audience=evil, value_column=None, project="indicator-x1", proposer=evil,
                    proposed_at="2026-12-01T00:00:00+00:00", status="approved")
    html = render("indicators.html", page="detail", who=evil, title=evil, board=False,
                  ind=ind, history=[], chart=chart(ind, []), latest=None, last=None,
                  value=evil).body.decode()
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "No refresh yet" in html


def test_a_refresh_keeps_the_receipt_of_its_release(env: Env) -> None:
    """Each refresh keeps its release's signed receipt (issue 17): it verifies offline with
    the published keys and is linked from the page by its query id."""
    from enclave import connect, verify_receipt

    fed, indicators = env.fed, env.fed.coordinator.indicators
    if indicators.get("open-count") is None:
        pytest.skip("needs the proposal of test_proposals_are_checked_like_queries")
    _approve(fed, "indicator-open-count")
    env.clock.advance(86_400)
    [r] = [r for r in indicators.tick() if r.indicator == "open-count"]
    assert r.status == "released" and r.receipt is not None
    verify_receipt(r.receipt, connect(env.url, TOKEN).keys())
    observer = {"Authorization": "Bearer observer-token"}
    page = httpx.get(f"{env.url}/indicators/open-count/", headers=observer, timeout=60).text
    assert f"href=\"receipts/{r.query_id}.json\"" in page
    got = httpx.get(f"{env.url}/indicators/open-count/receipts/{r.query_id}.json",
                    headers=observer, timeout=60)
    assert got.status_code == 200 and got.json() == r.receipt
