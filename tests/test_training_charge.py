"""DP training charges before it runs (DESIGN.md, "Privacy accounting"): a node accepting a
round of an authorised run charges that round's event to its ledger (and audits it) before
the round's data is read; the run's plan, whose sampling rate needs a noisy training-set
size, charges that count before reading the data too. A round the budget cannot pay is
refused with nothing read or trained; a round that fails after its charge keeps it.

Real engine, real ledger and audit log, the node's round run in this process as the
executor runs it (the fixtures of ``tests/test_training_trust.py``).
"""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

import dp_accounting as dpa
import numpy as np
import pytest

from nodes import _training
from privacy import (
    AuditLog,
    Ledger,
    RdpTotals,
    event_from_dict,
    gaussian_event,
    opacus_event,
)
from tests import test_training_trust as trust
from tests.test_training_trust import (
    charges,
    grant_token,
    make_auth,
    make_spec,
    message,
    run_round,
)

# The fixtures ``keys`` and ``node`` (a real engine bound as the executor binds it)
keys, node = trust.keys, trust.node


def released(state: Path) -> dict[str, str]:
    """Request id → when its release was kept."""
    path = state / "releases.sqlite"
    if not path.exists():
        return {}
    db = sqlite3.connect(path)
    try:
        return dict(db.execute("SELECT request_id, created_at FROM releases "
                               "WHERE kind = 'training'"))
    finally:
        db.close()


def audit_of(state: Path, job: str) -> list[Any]:
    return [e for e in AuditLog(state / "audit.sqlite").entries() if e.detail.get("job") == job]


def run_charges(state: Path, project: str, job: str) -> dict[str, Any]:
    return {h.request_id: h for h in charges(state, project) if h.request_id.startswith(job)}


def test_a_round_the_budget_cannot_pay_is_refused_before_anything_is_read(
        node: Path, keys) -> None:
    """Round 1 of a run is paid and released; then a DP query spends (nearly) all that is
    left. Round 2 needs more than that: refused at its charge, before its data is read —
    no weights, no release, the ledger's spend unchanged, audited as refused."""
    project, job = "tight", "tight-run"
    spec = make_spec(keys, job=job, project=project, rounds=2,
                     grant=grant_token(keys, project, 1.0))
    cfg = message(spec, make_auth(spec, keys["private"]))
    first, _ = run_round(cfg)
    assert not first.has_error(), first.error.reason if first.has_error() else ""
    ledger = Ledger(str(node / "ledger.sqlite"))
    # Another consumer of the budget (a DP query at this node) takes what it can.
    i = 0
    while ledger.charge(f"query-{i}", project, "lycee_students", gaussian_event(40.0)).accepted:
        i += 1
    spent = ledger.spent(project, "lycee_students")[0]
    before = charges(node, project)
    seq = AuditLog(node / "audit.sqlite").head()[0]

    reply, _ = run_round({**cfg, "round": 2})
    assert reply.has_error() and reply.error.reason.startswith("budget_exhausted")
    assert "cannot pay for round 2" in reply.error.reason
    assert not reply.has_content()  # no model update left the node
    assert ledger.spent(project, "lycee_students")[0] == spent  # nothing more spent
    after = charges(node, project)
    assert after[:len(before)] == before
    (decision,) = after[len(before):]  # the refusal, recorded with the ledger's figures
    assert decision.request_id == f"{job}:2:n1" and not decision.accepted
    assert decision.needed_epsilon > decision.remaining_epsilon
    assert f"{job}:2:n1" not in released(node)
    # nothing of round 2 was read, evaluated or trained
    assert not {"charged", "started", "fetched", "evaluated", "trained"} & set(_training.TIMES)
    new = [e for e in AuditLog(node / "audit.sqlite").entries() if e.seq > seq]
    assert [e.action for e in new] == ["train_refused"]
    assert new[0].detail["charge"] == f"{job}:2:n1" and "over budget" in new[0].detail["reason"]


def test_a_round_that_fails_while_training_keeps_its_charge(
        node: Path, keys, monkeypatch: pytest.MonkeyPatch) -> None:
    """The training code fails after the round's charge (the node's failpoint hook, in
    this process): the charge stands in the ledger and the audit log, nothing is released,
    and a retry of the round is refused without a second charge or a second training."""
    project, job = "fails", "fail-run"
    spec = make_spec(keys, job=job, project=project, grant=grant_token(keys, project))
    cfg = message(spec, make_auth(spec, keys["private"]))
    monkeypatch.setenv("BULLE_TRAIN_FAILPOINT", f"raise-train:1:{project}")
    with pytest.raises(RuntimeError, match="failpoint"):
        run_round(cfg)
    monkeypatch.delenv("BULLE_TRAIN_FAILPOINT")
    assert "evaluated" in _training.TIMES and "trained" not in _training.TIMES
    rows = run_charges(node, project, job)
    assert sorted(rows) == [f"{job}:0:n1", f"{job}:1:n1"]
    assert all(h.accepted for h in rows.values()) and rows[f"{job}:1:n1"].needed_epsilon > 0
    spent = Ledger(str(node / "ledger.sqlite")).spent(project, "lycee_students")[0]
    assert spent == pytest.approx(rows[f"{job}:1:n1"].spent_epsilon)  # the round is paid
    assert f"{job}:1:n1" not in released(node)
    actions = [(e.action, e.detail.get("charge")) for e in audit_of(node, job)]
    assert actions == [("train_charged", f"{job}:0:n1"), ("train_charged", f"{job}:1:n1"),
                       ("train_failed", None)]
    assert audit_of(node, job)[-1].detail["charged"] == [f"{job}:0:n1", f"{job}:1:n1"]
    assert AuditLog(node / "audit.sqlite").verify().ok  # in the hash chain

    again, _ = run_round(cfg)  # the ServerApp, or anyone, retries the round
    assert again.has_error() and "not trained again" in again.error.reason
    assert run_charges(node, project, job) == rows  # no second charge
    assert "fetched" not in _training.TIMES and f"{job}:1:n1" not in released(node)


def test_each_charge_is_written_before_its_data_is_read_and_its_result_kept(
        node: Path, keys) -> None:
    """Two rounds and the final evaluation of one run: each charge is in the ledger and
    the audit chain before the data it pays for is read, and before its release is kept
    and returned. What the replies report composes to exactly what the node charged (the
    coordinator composes the same events into the project's global ledger)."""
    project, job = "order", "order-run"
    spec = make_spec(keys, job=job, project=project, rounds=2,
                     grant=grant_token(keys, project))
    cfg = message(spec, make_auth(spec, keys["private"]))
    replies = []
    for rnd in (1, 2, 3):  # round 3: the final model's evaluation
        reply, _ = run_round({**cfg, "round": rnd})
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        replies.append(reply)
        t = _training.TIMES
        assert t["charged"] < t["started"] < t["evaluated"] <= t["trained"]
        if rnd == 1:  # the plan's count is paid before the data is read, the round after
            assert t["plan_charged"] < t["fetched"] < t["charged"]
        else:  # the plan is kept: the round is paid before its data is read
            assert "plan_charged" not in t and t["charged"] < t["fetched"]
    rows = run_charges(node, project, job)
    kept = released(node)
    assert sorted(rows) == [f"{job}:{r}:n1" for r in (0, 1, 2, 3)]
    for r in (1, 2, 3):
        assert rows[f"{job}:{r}:n1"].accepted
        assert (datetime.fromisoformat(rows[f"{job}:{r}:n1"].created_at)
                < datetime.fromisoformat(kept[f"{job}:{r}:n1"]))
    entries = audit_of(node, job)
    assert [(e.action, e.detail.get("charge")) for e in entries] == [
        ("train_charged", f"{job}:0:n1"), ("train_charged", f"{job}:1:n1"),
        ("train_released", None), ("train_charged", f"{job}:2:n1"), ("train_released", None),
        ("train_charged", f"{job}:3:n1"), ("train_released", None)]

    composed = RdpTotals()  # as federation/_training.py composes a node's replies
    for reply in replies:
        dp = dict(reply.content["dp"])
        parts = [opacus_event(json.loads(dp["history"])), gaussian_event(dp["sigma_eval"])]
        if dp["sigma_count"] > 0:
            parts.append(gaussian_event(dp["sigma_count"]))
        composed.add(dpa.ComposedDpEvent(parts))
    ledger = RdpTotals()
    for h in rows.values():
        ledger.add(event_from_dict(h.event))
    assert np.allclose(composed.to_list(), ledger.to_list())
    dp = [dict(r.content["dp"]) for r in replies]
    assert dp[0]["sigma_count"] > 0 and dp[1]["sigma_count"] == dp[2]["sigma_count"] == 0
    assert dp[-1]["epsilon_run"] == pytest.approx(ledger.epsilon(spec["delta"]))
    assert dp[-1]["epsilon_run"] <= spec["epsilon"] + 1e-9  # the run, count included, fits
