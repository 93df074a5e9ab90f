"""Training you can trust (issue 12), without Flower's servers: run authorisations signed by
the coordinator and verified at the node before anything is read, the node's round on a real
engine refusing forged, altered, replayed-elsewhere and expired authorisations (nothing
trained, nothing charged, audited), replays mapped to the same request, tables whose rows
are persons (``privacy_unit = "row"``) for DP queries and training, categorical labels, and
the SuperNode's app I/O fence. The end-to-end probes are in ``tests/test_training.py``.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from federation._config import ProjectConfig, Researcher, hash_token
from federation._errors import QueryError
from federation._trainspec import parse_label
from nodes._config import ConfigError, load_node_config
from nodes._training import TrainingRefused, TrainSpec, authorise
from nodes._trainview import label_of
from privacy import (
    AuditLog,
    Grant,
    GrantError,
    Ledger,
    RunAuthorisation,
    canonical_sha256,
    coordinator_keys,
    generate_board_keys,
    grant_id,
    sign_grant,
    sign_run_authorisation,
    spec_json,
    verify_run_authorisation,
)
from tests._federation import DATA, node_toml, start_federation

UCI = DATA / "uci-student-performance" / "student-por.csv"
FEATURES = [{"name": "age", "kind": "num", "lo": 15, "hi": 22},
            {"name": "studytime", "kind": "cat", "values": ["1", "2", "3", "4"]},
            {"name": "g1", "kind": "num", "lo": 0, "hi": 20}]


def lycee(school: str, tier: str = "sensitive") -> dict[str, Any]:
    return {"table": "lycee_students", "source": str(UCI), "filter": f"school = '{school}'",
            "tier": tier, "privacy_unit": "row",
            "public_domains": {"studytime": [1, 2, 3, 4], "higher": ["no", "yes"],
                               "sex": ["F", "M"]},
            "bounds": {"age": [15, 22], "g1": [0, 20], "g3": [0, 20]}}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("keys")
    generate_board_keys(tmp / "board")
    private, public = coordinator_keys(tmp / "coordinator" / "coordinator_ed25519.pem")
    return {"board": tmp / "board", "private": private, "public": public}


def grant_token(keys: dict[str, Path], project: str = "p", epsilon: float = 5.0) -> str:
    now = datetime.now(UTC)
    return sign_grant(Grant(project, ("alice",), ("lycee_students",), epsilon, 1e-6,
                            now + timedelta(days=1), "tests", now),
                      (keys["board"] / "board_ed25519.pem").read_bytes())


def make_spec(keys: dict[str, Path], **kw: Any) -> dict[str, Any]:
    base = {"job": "run1", "project": "p", "researcher": "alice", "grant": grant_token(keys),
            "model": "logreg", "hidden": 1, "table": "lycee_students", "joins": [],
            "features": FEATURES, "label": ["higher", "in", ["yes"]], "order_by": "",
            "max_len": 10, "rounds": 1, "epochs": 1, "batch_size": 64, "lr": 0.3,
            "max_grad_norm": 1.0, "epsilon": 1.0, "delta": 1e-6, "noise_multiplier": None,
            "eval_fraction": 0.2, "eval_share": 0.2, "bins": 4, "nodes": ["n1"],
            "min_nodes": 1, "round_timeout_s": 60.0, "seed": 0}
    return {**base, **kw}


def make_auth(spec: dict[str, Any], private: Any, *, nodes: dict[str, float] | None = None,
              ttl_s: float = 600, issued_ago_s: float = 60, **kw: Any) -> str:
    now = datetime.now(UTC)
    auth = RunAuthorisation(
        run=spec["job"], project=spec["project"], grant=grant_id(spec["grant"]),
        spec_sha256=canonical_sha256(spec),
        nodes=tuple(sorted((nodes or {"n1": spec["epsilon"]}).items())),
        expires=now + timedelta(seconds=ttl_s), issued=now - timedelta(seconds=issued_ago_s))
    return sign_run_authorisation(replace(auth, **kw), private)


def message(spec: dict[str, Any], auth: str, rnd: int = 1, spec_text: str | None = None
            ) -> dict[str, Any]:
    return {"spec": spec_text if spec_text is not None else spec_json(spec), "auth": auth,
            "round": rnd}


# ------------------------------------------------------------------ authorisations, unit


def test_run_authorisation_round_trip_and_what_it_refuses(keys) -> None:
    from privacy._grants import load_public_key

    spec = make_spec(keys)
    token = make_auth(spec, keys["private"])
    auth = verify_run_authorisation(token, keys["public"])
    assert auth.run == "run1" and auth.epsilon_for("n1") == 1.0 and auth.epsilon_for("x") is None
    assert auth.spec_sha256 == canonical_sha256(json.loads(spec_json(spec)))
    public = load_public_key(keys["public"])
    with pytest.raises(GrantError) as err:  # another key signed it
        verify_run_authorisation(make_auth(spec, Ed25519PrivateKey.generate()), public)
    assert err.value.code == "wrong_key"
    head, _, sig = token.partition(".")
    payload = json.loads(__import__("base64").urlsafe_b64decode(head + "==="))
    payload["nodes"] = {"n1": 50.0}  # a bigger ε target, same signature
    from privacy._grants import _b64e, _canonical

    with pytest.raises(GrantError) as err:
        verify_run_authorisation(f"{_b64e(_canonical(payload))}.{sig}", public)
    assert err.value.code == "bad_signature"
    with pytest.raises(GrantError) as err:
        verify_run_authorisation(make_auth(spec, keys["private"], ttl_s=1, issued_ago_s=60),
                                 public, datetime.now(UTC) + timedelta(seconds=5))
    assert err.value.code == "expired"
    with pytest.raises(GrantError) as err:  # a board grant is not a run authorisation
        verify_run_authorisation(spec["grant"], (keys["board"] / "board_ed25519.pub.pem"))
    assert err.value.code == "malformed"


@pytest.mark.parametrize("case", ["forged", "altered_spec", "expired", "not_listed",
                                  "other_grant", "other_run", "bad_round", "no_auth",
                                  "no_key", "reformatted_ok"])
def test_node_verifies_the_authorisation_before_anything(keys, case: str) -> None:
    from privacy._grants import load_public_key

    key = load_public_key(keys["public"])
    spec = make_spec(keys)
    auth = make_auth(spec, keys["private"])
    cfg = message(spec, auth)
    if case == "forged":
        cfg["auth"] = make_auth(spec, Ed25519PrivateKey.generate())
    elif case == "altered_spec":  # a bigger ε, more rounds, another table...
        cfg["spec"] = spec_json({**spec, "epsilon": 3.0})
    elif case == "expired":
        cfg["auth"] = make_auth(spec, keys["private"], ttl_s=-1, issued_ago_s=120)
    elif case == "not_listed":
        cfg["auth"] = make_auth(spec, keys["private"], nodes={"n2": 1.0})
    elif case == "other_grant":  # the spec names another grant than the signed one
        other = {**spec, "grant": grant_token(keys)}
        cfg = message(other, make_auth(other, keys["private"], grant="0" * 64))
    elif case == "other_run":
        cfg = message(spec, make_auth(spec, keys["private"], run="run2"))
    elif case == "bad_round":
        cfg["round"] = spec["rounds"] + 2
    elif case == "no_auth":
        del cfg["auth"]
    elif case == "no_key":
        key = None
    elif case == "reformatted_ok":  # the same spec written otherwise: the same hash
        cfg["spec"] = json.dumps(spec, indent=2)
    if case == "reformatted_ok":
        got, parsed, rnd = authorise(cfg, "n1", key)
        assert got.run == parsed.job == "run1" and rnd == 1
        return
    with pytest.raises(TrainingRefused) as err:
        authorise(cfg, "n1", key)
    assert err.value.code == "unauthorised"


# ---------------------------------------------------------------- the node's round, real


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, certs: Path, keys) -> Iterator[Any]:
    """A real engine on the lycée's pupils (sensitive, one row per pupil), bound as the
    executor binds it, in this process."""
    from nodes import _training
    from nodes._engine import NodeEngine
    from privacy._grants import load_public_key

    tmp = tmp_path_factory.mktemp("node")
    path = tmp / "n1.toml"
    path.write_text(node_toml("gp", certs, [lycee("GP")],
                              f'state_dir = "{tmp / "state"}"\n'
                              f'board_public_key = "{keys["board"]}/board_ed25519.pub.pem"\n'
                              f'coordinator_public_key = "{keys["public"]}"').replace(
        'node_id = "gp"', 'node_id = "n1"'))
    config = load_node_config(path)
    engine = NodeEngine(config)
    _training.bind(_training.NodeRuntime(config, engine, ("logreg",), tmp / "state",
                                         load_public_key(keys["public"])))
    yield tmp / "state"
    engine.close()


def run_round(cfg: dict[str, Any], rnd_state: Any = None) -> Any:
    """train_round on a message holding ``cfg``, as the ClientApp does."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from bulle_flower.models import build_model, pack
    from nodes._training import train_round

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1
    spec = json.loads(cfg["spec"])
    model = build_model("logreg", TrainSpec.parse(spec).input_width, 1)
    w = model.state_dict()
    msg = Message(RecordDict({"arrays": ArrayRecord({"w": torch.from_numpy(pack(w, w))}),
                              "config": ConfigRecord(cfg)}), dst_node_id=1,
                  message_type="train")
    context = rnd_state or Context(7, 1, {}, RecordDict(), {})
    return train_round(msg, context), context


def charges(state: Path, project: str = "p") -> list[Any]:
    return Ledger(str(state / "ledger.sqlite")).history(project, "lycee_students")


def test_a_node_refuses_bad_authorisations_and_charges_nothing(node: Path, keys) -> None:
    spec = make_spec(keys, job="bad-run")
    good = make_auth(spec, keys["private"])
    bad = {"forged": message(spec, make_auth(spec, Ed25519PrivateKey.generate())),
           "altered": message(spec, good, spec_text=spec_json({**spec, "epsilon": 4.0})),
           "expired": message(spec, make_auth(spec, keys["private"], ttl_s=-1,
                                              issued_ago_s=120)),
           "replayed elsewhere": message(spec, make_auth(spec, keys["private"],
                                                         nodes={"other-node": 1.0}))}
    before = AuditLog(node / "audit.sqlite").head()[0] if (node / "audit.sqlite").exists() \
        else 0
    for name, cfg in bad.items():
        reply, _ = run_round(cfg)
        assert reply.has_error() and reply.error.reason.startswith("unauthorised"), name
    assert charges(node) == []  # nothing charged
    db = sqlite3.connect(node / "releases.sqlite") if (node / "releases.sqlite").exists() \
        else None
    assert db is None or db.execute(
        "SELECT count(*) FROM releases WHERE kind = 'training'").fetchone()[0] == 0
    entries = [e for e in AuditLog(node / "audit.sqlite").entries() if e.seq > before]
    assert [e.action for e in entries] == ["train_refused"] * 4  # audited, nothing else
    assert all(e.detail["unauthorised"] and e.detail["request_id"] == "" for e in entries)
    assert "(wrong_key)" in entries[0].detail["reason"]
    assert "(expired)" in entries[2].detail["reason"]


def test_a_replayed_authorised_round_is_one_charge_and_the_same_release(node: Path,
                                                                        keys) -> None:
    """Rows as units and a categorical label at the node; a replay (same authorisation and
    round, e.g. from another Flower run) gets the stored release: no second charge, no
    fresh noise."""
    spec = make_spec(keys, job="good-run")
    cfg = message(spec, make_auth(spec, keys["private"]))
    first, _ = run_round(cfg)
    assert not first.has_error(), first.error.reason if first.has_error() else ""
    again, _ = run_round(cfg)  # a fresh context: as if another run replayed it
    assert not again.has_error()
    assert np.array_equal(first.content["arrays"]["w"].numpy(),
                          again.content["arrays"]["w"].numpy())
    assert list(first.content["metrics"]["hist"]) == list(again.content["metrics"]["hist"])
    rows = charges(node)  # the run's plan (its noisy count) and the round, each once
    assert [h.request_id for h in rows] == ["good-run:0:n1", "good-run:1:n1"]
    assert all(h.accepted for h in rows)
    actions = [e.action for e in AuditLog(node / "audit.sqlite").entries()
               if e.detail.get("job") == "good-run"]
    assert actions == ["train_charged", "train_charged", "train_released", "train_replayed"]
    m = first.content["metrics"]
    assert 0 <= m["auth_s"] < 0.01  # the check itself: well under 10 ms
    # 423 GP pupils, one example per row, 20 % held out
    assert 250 < m["n_train_noisy"] < 420


# ------------------------------------------------------------------------ rows as units


def test_row_unit_at_config_load(tmp_path: Path, certs: Path) -> None:
    path = tmp_path / "n.toml"
    path.write_text(node_toml("gp", certs, [lycee("GP")]))
    assert load_node_config(path).datasets[0].privacy_unit == "row"
    path.write_text(node_toml("gp", certs, [{**lycee("GP"), "max_rows_per_unit": 3}]))
    with pytest.raises(ConfigError, match="max_rows_per_unit is 1"):
        load_node_config(path)
    no_unit = {k: v for k, v in lycee("GP").items() if k != "privacy_unit"}
    path.write_text(node_toml("gp", certs, [no_unit]))
    with pytest.raises(ConfigError, match='"row" when each row is one person'):
        load_node_config(path)


def test_dp_queries_on_a_table_whose_rows_are_pupils(tmp_path: Path, certs: Path,
                                                      keys) -> None:
    """Each row is a pupil: contributions bounded to one row, also through a join with an
    open table that could repeat rows (the per-unit bound is then by DuckDB's rowid)."""
    schools = tmp_path / "schools.csv"
    schools.write_text("school,campus\nGP,a\nGP,b\nMS,c\n")  # GP twice: a join doubles rows
    grant = tmp_path / "p.grant"
    grant.write_text(grant_token(keys, epsilon=100.0))
    fed = start_federation(
        tmp_path, certs,
        {"gp": [lycee("GP"), {"table": "schools", "source": str(schools), "tier": "open"}]},
        board_public_key=keys["board"] / "board_ed25519.pub.pem",
        projects=(ProjectConfig("p", grant, 0.5, True),))
    try:
        alice = Researcher("alice", hash_token("x"), ("p",))
        n = fed.coordinator.run("SELECT COUNT(*) AS n FROM lycee_students", alice,
                                project="p", epsilon=5.0)
        joined = fed.coordinator.run(
            "SELECT COUNT(*) AS n FROM lycee_students JOIN schools USING (school)", alice,
            project="p", epsilon=5.0)
        by_sex = fed.coordinator.run(
            "SELECT sex, COUNT(*) AS n, AVG(g3) AS g FROM lycee_students GROUP BY sex "
            "ORDER BY sex", alice, project="p", epsilon=5.0)
    finally:
        fed.close()
    assert abs(n["rows"][0][0] - 423) < 10  # 423 GP pupils
    assert abs(joined["rows"][0][0] - 423) < 10  # not 846: one row per pupil kept
    assert [r[0] for r in by_sex["rows"]] == ["F", "M"] and 0 <= by_sex["rows"][0][2] <= 20


# --------------------------------------------------------------------- categorical labels


def test_categorical_labels() -> None:
    assert parse_label("higher = 'yes'") == ["higher", "in", ["yes"]]
    assert parse_label("target IN ('Dropout', 'Enrolled')") == [
        "target", "in", ["Dropout", "Enrolled"]]
    assert parse_label("target NOT IN ('Graduate')") == ["target", "not in", ["Graduate"]]
    assert parse_label("sex != 'F'") == ["sex", "not in", ["F"]]
    assert parse_label("studytime IN (3, 4)") == ["studytime", "in", ["3", "4"]]
    assert parse_label("score >= 40") == ["score", ">=", 40.0]
    for bad in ("higher = yes", "t.higher = 'yes'", "higher IN (SELECT 1)", "a = 'x' OR 1",
                "higher LIKE 'y%'", "f('x') = 'x'"):
        with pytest.raises(QueryError):
            parse_label(bad)
    rows = {"higher": np.array(["yes", "no", None, "yes"], dtype=object),
            "studytime": np.array([1, 3, 4, 2])}
    got = label_of(rows, ("higher", "in", ("yes",)))
    assert got[[0, 1, 3]].tolist() == [1.0, 0.0, 1.0] and np.isnan(got[2])
    assert label_of(rows, ("studytime", "not in", ("3", "4"))).tolist() == [1, 0, 0, 1]


def test_a_categorical_label_needs_a_public_domain_at_the_node(keys) -> None:
    from types import SimpleNamespace

    from nodes._trainview import check_spec

    meta = {"lycee_students": SimpleNamespace(
        tier="sensitive", privacy_unit="row",
        columns={"age": "BIGINT", "studytime": "BIGINT", "g1": "BIGINT", "higher": "VARCHAR",
                 "school": "VARCHAR"},
        public_domains={"studytime": (1, 2, 3, 4), "higher": ("no", "yes")})}
    check_spec(TrainSpec.parse(make_spec(keys)), meta, ("logreg",))
    for label in (["school", "in", ["GP"]], ["higher", "in", ["maybe"]]):
        with pytest.raises(TrainingRefused):
            check_spec(TrainSpec.parse(make_spec(keys, label=label)), meta, ("logreg",))


# ------------------------------------------------------------------- the app I/O fence


def test_supernode_app_io_fence() -> None:
    from bulle_flower._fence import RUNTIME_HEADER, AppIoFence

    seen: list[str] = []

    async def app(scope, receive, send) -> None:
        seen.append(scope["path"])

    sent: list[dict] = []

    async def send(message) -> None:
        sent.append(message)

    fence = AppIoFence(app, "node-secret")

    def call(path: str, host: str = "127.0.0.1", secret: str | None = None) -> int:
        sent.clear()
        headers = [(RUNTIME_HEADER.encode(), secret.encode())] if secret else []
        asyncio.run(fence({"type": "http", "path": path, "client": (host, 1),
                           "headers": headers}, None, send))
        return sent[0]["status"] if sent else 200

    assert call("/health") == 200
    assert call("/v1/runtime/acquire-task") == 403
    assert call("/v1/runtime/acquire-task", secret="guess") == 403
    assert call("/v1/runtime/acquire-task", host="10.0.0.2", secret="node-secret") == 403
    assert call("/v1/runtime/acquire-task", secret="node-secret") == 200
    assert call("/docs") == 403
    assert seen == ["/health", "/v1/runtime/acquire-task"]
