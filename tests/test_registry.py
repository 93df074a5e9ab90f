"""The project registry and the board's decisions, without processes: SQLite in tmp_path."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from federation._config import CoordinatorConfig, load_coordinator_config
from federation._dashboard import svg_bars, svg_timeline
from federation._projects import Projects
from federation._registry import RegistryError, metadata
from privacy import Grant, generate_board_keys, sign_grant, verify_grant


def _projects(tmp: Path, with_private_key: bool = True) -> Projects:
    board = tmp / "board"
    if not board.exists():
        generate_board_keys(board)
    dummy = tmp / "unused.pem"
    return Projects(CoordinatorConfig(
        listen="127.0.0.1:0", cert=dummy, key=dummy, ca=dummy, nodes=(), researchers=(),
        state_dir=tmp / "state", board_public_key=board / "board_ed25519.pub.pem",
        board_private_key=board / "board_ed25519.pem" if with_private_key else None))


def _submit(pj: Projects, name: str = "study", epsilon: float = 2.0) -> None:
    pj.registry.submit("alice", name=name, title="A study", purpose="research only",
                       datasets=["student_assessment"], epsilon=epsilon, delta=1e-6,
                       duration_days=30, team=["bob"])


def test_tables_live_in_one_metadata_for_migrations() -> None:
    assert {"bulle_projects", "bulle_project_events"} <= set(metadata.tables)


def test_submit_approve_amend_refuse(tmp_path: Path) -> None:
    pj = _projects(tmp_path)
    _submit(pj)
    p = pj.registry.get("study")
    assert p is not None and p.status == "pending" and p.team == ("alice", "bob")
    with pytest.raises(RegistryError) as err:
        _submit(pj)
    assert err.value.status == 409
    with pytest.raises(RegistryError, match="name"):
        _submit(pj, name="Bad Name!")
    approved = pj.approve("study", "carol", epsilon=1.0)
    assert approved.status == "approved" and approved.granted_epsilon == 1.0
    grant = verify_grant(approved.grant_token, tmp_path / "board" / "board_ed25519.pub.pem")
    assert grant.researchers == ("alice", "bob") and grant.epsilon == 1.0
    assert grant.datasets == ("student_assessment",) and grant.purpose == "research only"
    assert pj.grant("study")[0] == grant  # the coordinator now uses it
    assert pj.budget("study").epsilon == 1.0
    assert [e["action"] for e in pj.registry.events("study")] == ["submitted", "amended"]
    with pytest.raises(RegistryError) as err:  # decided: no refusal afterwards
        pj.refuse("study", "carol", "changed my mind")
    assert err.value.status == 409
    _submit(pj, "other")
    with pytest.raises(RegistryError, match="reason"):
        pj.refuse("other", "carol", "  ")
    assert pj.refuse("other", "carol", "no purpose").reason == "no purpose"
    assert [p.name for p in pj.registry.projects(member="bob")] == ["other", "study"]
    assert pj.registry.projects(member="dave") == []
    actions = [e.action for e in pj.audit.entries()]
    assert actions == ["project_amended", "project_refused"] and pj.audit.verify().ok


def test_production_uploads_a_grant_signed_by_the_board(tmp_path: Path) -> None:
    pj = _projects(tmp_path, with_private_key=False)
    _submit(pj)
    with pytest.raises(RegistryError, match="bulle board grant"):
        pj.approve("study", "carol")
    now = datetime.now(UTC)
    key = (tmp_path / "board" / "board_ed25519.pem").read_bytes()
    other = sign_grant(Grant("elsewhere", ("alice",), ("x",), 1.0, 1e-6, now + timedelta(1),
                             "p", now), key)
    with pytest.raises(RegistryError, match="for project 'elsewhere'"):
        pj.approve("study", "carol", grant=other)
    token = sign_grant(Grant("study", ("alice", "bob"), ("student_assessment",), 2.0, 1e-6,
                             now + timedelta(days=10), "research only", now), key)
    p = pj.approve("study", "carol", grant=token)
    assert p.status == "approved" and p.grant_token == token


def test_expiry_ends_the_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import federation._registry as registry

    pj = _projects(tmp_path)
    _submit(pj)
    pj.approve("study", "carol", days=1)
    p = pj.registry.get("study")
    assert p is not None and p.effective_status == "approved" and p.active
    later = datetime.now(UTC) + timedelta(days=1, seconds=1)
    monkeypatch.setattr(registry, "_now", lambda: later)  # the registry's clock, moved on
    p = pj.registry.get("study")
    assert p is not None and p.effective_status == "expired" and not p.active
    assert pj.registry.active_grant("study") is None


def test_svg_plots_escape_and_scale() -> None:
    svg = svg_bars([("<proj>", 2.0, 4.0), ("none", 0.0, None)], "p", "t")
    assert 'data-spent="2"' in svg and "&lt;proj&gt;" in svg and "(50%)" in svg
    assert "<proj>" not in svg and svg.startswith("<svg")
    now = datetime.now(UTC)
    rel = [{"time": (now + timedelta(seconds=i)).isoformat(), "project": "a",
            "epsilon": e} for i, e in enumerate((0.5, 0.0, 1.0))]
    tl = svg_timeline(rel, "t")
    assert tl.count("<polyline") == 1 and "1.5 ε" in tl


def test_hub_section_of_the_coordinator_config(tmp_path: Path) -> None:
    (tmp_path / "svc.token").write_text("secret\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text('listen = "127.0.0.1:1"\n[tls]\ncert = "a"\nkey = "b"\nca = "c"\n'
                   '[hub]\napi_url = "http://127.0.0.1:2/hub/api/"\npublic_url = '
                   '"http://127.0.0.1:3"\napi_token_file = "svc.token"\ncache_s = 1\n')
    hub = load_coordinator_config(cfg).hub
    assert hub is not None and hub.api_url == "http://127.0.0.1:2/hub/api"
    assert hub.prefix == "/services/bulle" and hub.api_token == "secret"
    cfg.write_text(cfg.read_text() + "oops = 1\n")
    with pytest.raises(ValueError, match="oops"):
        load_coordinator_config(cfg)
