from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import signal
import threading

import pytest

from privacy import Ledger, LedgerError, RdpTotals, laplace_event

DELTA = 1e-5
EVENT = laplace_event(0.1)


def cap_for(n: int) -> float:
    """A cap that n charges of EVENT fit exactly: the ε of n of them, to the last bit."""
    t = RdpTotals()
    for _ in range(n):
        t.add(EVENT)
    return t.epsilon(DELTA)


@pytest.fixture
def db(ledger_url: str) -> str:
    """The store under test: a SQLite file or a PostgreSQL database (tests/privacy/conftest)."""
    return ledger_url


def setup_budget(db: str, cap: float) -> None:
    led = Ledger(db)
    led.set_budget("p", "ds", cap, DELTA)
    led.close()  # nothing of the parent's pool may be inherited by forked children


def test_charge_spent_history_and_refusal(db: str) -> None:
    led = Ledger(db)
    led.set_budget("p", "ds", cap_for(2), DELTA)
    r1 = led.charge("r1", "p", "ds", EVENT, epsilon_claim=0.1)
    r2 = led.charge("r2", "p", "ds", EVENT)
    r3 = led.charge("r3", "p", "ds", EVENT)
    assert (r1.accepted, r2.accepted, r3.accepted) == (True, True, False)
    assert r2.remaining_epsilon == pytest.approx(0.0, abs=1e-12)
    # the refusal says how much was needed and how much is left
    assert r3.needed_epsilon == pytest.approx(cap_for(3) - cap_for(2))
    assert r3.remaining_epsilon == pytest.approx(0.0, abs=1e-12)
    assert "needs" in r3.reason and "left" in r3.reason
    assert led.spent("p", "ds") == (pytest.approx(cap_for(2)), DELTA)
    hist = led.history("p", "ds")
    assert [h.request_id for h in hist] == ["r1", "r2", "r3"]
    assert [h.accepted for h in hist] == [True, True, False]
    assert hist[0].epsilon_claim == 0.1 and hist[0].event["type"] == "LaplaceDpEvent"


def test_replay_is_idempotent(db: str) -> None:
    led = Ledger(db)
    led.set_budget("p", "ds", cap_for(1), DELTA)
    first = led.charge("a", "p", "ds", EVENT)
    again = led.charge("a", "p", "ds", EVENT)
    assert first.accepted and again.accepted and again.replay and not first.replay
    assert again.spent_epsilon == first.spent_epsilon
    assert led.spent("p", "ds")[0] == pytest.approx(cap_for(1))
    refused = led.charge("b", "p", "ds", EVENT)
    led.set_budget("p", "ds", 10.0, DELTA)  # even after a raise, "b" stays a refusal
    assert led.charge("b", "p", "ds", EVENT) == dataclasses.replace(refused, replay=True)
    with pytest.raises(LedgerError):
        led.charge("a", "p", "ds", laplace_event(0.2))  # same id, different charge
    assert len(led.history("p", "ds")) == 2


def test_project_wide_budget_also_binds(db: str) -> None:
    led = Ledger(db)
    led.set_budget("p", "*", cap_for(3), DELTA)
    led.set_budget("p", "ds1", cap_for(2), DELTA)
    assert led.charge("1", "p", "ds1", EVENT).accepted
    assert led.charge("2", "p", "ds2", EVENT).accepted  # no ds2 budget: only "*" applies
    r = led.charge("3", "p", "ds1", EVENT)
    assert r.accepted and r.scope == "*"  # binding budget is the project-wide one
    r = led.charge("4", "p", "ds2", EVENT)
    assert not r.accepted and r.scope == "*"
    assert led.spent("p", "*")[0] == pytest.approx(cap_for(3))
    assert led.spent("p", "ds1")[0] == pytest.approx(cap_for(2))
    no = led.charge("5", "q", "ds", EVENT)
    assert not no.accepted and "no budget" in no.reason


def test_hundred_concurrent_threads(db: str) -> None:
    led = Ledger(db)
    led.set_budget("p", "ds", cap_for(10), DELTA)
    barrier = threading.Barrier(100)
    results = [None] * 100

    def work(i: int) -> None:
        barrier.wait()
        results[i] = led.charge(f"t{i}", "p", "ds", EVENT)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _check_ten_of_hundred(led, results)


def _proc_charge(db: str, i: int, start: mp.Event, out: mp.Queue) -> None:
    led = Ledger(db)  # each process its own Ledger (own engine, own connections)
    start.wait()
    r = led.charge(f"m{i}", "p", "ds", EVENT)
    out.put((i, r.accepted, r.spent_epsilon))


def test_hundred_concurrent_processes(db: str) -> None:
    setup_budget(db, cap_for(10))
    ctx = mp.get_context("fork")  # children inherit the imports: no 0.5 s start-up each
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_proc_charge, args=(db, i, start, out)) for i in range(100)]
    for p in procs:
        p.start()
    start.set()
    got = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    accepted = [g for g in got if g[1]]
    assert len(accepted) == 10 and len(got) == 100
    led = Ledger(db)
    assert led.spent("p", "ds")[0] == cap_for(10)
    assert len(led.history("p", "ds")) == 100
    assert sorted(h.request_id for h in led.history("p", "ds") if h.accepted) == sorted(
        f"m{g[0]}" for g in accepted
    )


def _check_ten_of_hundred(led: Ledger, results: list) -> None:
    assert sum(r.accepted for r in results) == 10
    assert sum(not r.accepted for r in results) == 90
    assert led.spent("p", "ds")[0] == cap_for(10)  # bit-exact: same sums, same order
    hist = led.history("p", "ds")
    assert len(hist) == 100 and sum(h.accepted for h in hist) == 10
    # recorded running totals are the 10 prefix sums, each once
    spent = sorted(h.spent_epsilon for h in hist if h.accepted)
    assert spent == pytest.approx([cap_for(k) for k in range(1, 11)])


def _charge_then_die(db: str) -> None:
    led = Ledger(db)
    led.charge("crash-1", "p", "ds", EVENT)
    os.kill(os.getpid(), signal.SIGKILL)  # dies before it could reply to anyone


def test_charge_survives_kill_before_reply(db: str) -> None:
    setup_budget(db, 1.0)
    proc = mp.get_context("fork").Process(target=_charge_then_die, args=(db,))
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == -signal.SIGKILL
    led = Ledger(db)
    assert [h.request_id for h in led.history("p", "ds")] == ["crash-1"]
    assert led.spent("p", "ds")[0] == pytest.approx(cap_for(1))
    again = led.charge("crash-1", "p", "ds", EVENT)  # the client retries: no double charge
    assert again.replay and again.accepted
    assert led.spent("p", "ds")[0] == pytest.approx(cap_for(1))


def test_bad_arguments(db: str) -> None:
    led = Ledger(db)
    with pytest.raises(LedgerError):
        led.set_budget("p", "ds", 1.0, 0.0)  # RDP gating needs δ > 0
    with pytest.raises(LedgerError):
        led.spent("p", "nope")
    with pytest.raises(LedgerError):
        led.charge("", "p", "ds", EVENT)
