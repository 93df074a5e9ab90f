"""The typed training contract, unit tests (no servers): the coordinator's [training]
section, parsed by its own config loader, and the one spec type (``bulle_flower.spec``)
the coordinator, the ServerApp and the nodes share."""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError, replace
from pathlib import Path
from typing import Any

import pytest

from bulle_flower.spec import (
    LABEL_OPS,
    NOISE_MULTIPLIER_MIN,
    Feature,
    SpecError,
    TrainSpec,
)
from federation._config import ConfigError, TrainingConfig, load_coordinator_config
from privacy import (
    SIGMA_RANGE,
    canonical_sha256,
    coordinator_keys,
    grant_id,
    spec_json,
    verify_run_authorisation,
)

TLS = '[tls]\ncert = "c.pem"\nkey = "c.key"\nca = "ca.pem"\n'


def coordinator_toml(tmp_path: Path, training: str, top: str = "") -> Path:
    path = tmp_path / "coordinator.toml"
    path.write_text(top + TLS + "[training]\n" + training)
    return path


# ------------------------------------------------------------------ [training] settings


def test_training_section_is_typed_with_paths_and_defaults(tmp_path: Path) -> None:
    path = coordinator_toml(tmp_path, 'superlink = "127.0.0.1:9093"\n'
                            'root_certificates = "certs/ca.pem"\n'
                            'control_token_file = "/abs/control.token"\n'
                            'node_keys = { n1 = "keys/n1.pub" }\n',
                            top='state_dir = "state"\n')
    t = load_coordinator_config(path).training
    assert isinstance(t, TrainingConfig)
    assert t.superlink == "127.0.0.1:9093"
    assert t.root_certificates == tmp_path / "certs" / "ca.pem"  # relative to the file
    assert t.control_token_file == Path("/abs/control.token")
    assert t.node_keys == {"n1": tmp_path / "keys" / "n1.pub"}
    assert t.work_dir == tmp_path / "state" / "training"  # in the state folder
    assert t.signing_key == tmp_path / "state" / "coordinator_ed25519.pem"
    assert t.round_timeout_s == 120.0
    with pytest.raises(AttributeError):
        t.superlink = "elsewhere:1"  # type: ignore[misc]  # frozen


def test_no_training_section_no_training(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.toml"
    path.write_text(TLS)
    assert load_coordinator_config(path).training is None


@pytest.mark.parametrize(("body", "message"), [
    ('superlink = "a:1"\nroot_certificates = "ca"\ncontrol_token_file = "t"\nsuperlinks = 1\n',
     "unknown key 'superlinks'"),
    ('root_certificates = "ca"\ncontrol_token_file = "t"\n', "superlink is required"),
    ('superlink = "a:1"\ncontrol_token_file = "t"\n', "root_certificates is required"),
    ('superlink = "a:1"\nroot_certificates = "ca"\ncontrol_token_file = "t"\n'
     'round_timeout_s = -1\n', "round_timeout_s"),
    ('superlink = "a:1"\nroot_certificates = "ca"\ncontrol_token_file = "t"\n'
     'round_timeout_s = "soon"\n', "round_timeout_s"),
    ('superlink = "a:1"\nroot_certificates = "ca"\ncontrol_token_file = "t"\n'
     'node_keys = "n1.pub"\n', "node_keys"),
])
def test_training_section_refuses_what_it_does_not_know(tmp_path: Path, body: str,
                                                        message: str) -> None:
    with pytest.raises(ConfigError, match="training") as err:
        load_coordinator_config(coordinator_toml(tmp_path, body))
    assert message in str(err.value)


# ------------------------------------------------------------------- the training spec


def wire(**kw: Any) -> dict[str, Any]:
    """A spec's wire form as the coordinator sends it (``TrainSpec.to_dict``)."""
    base = {"job": "run1", "project": "p", "researcher": "alice", "grant": "token",
            "model": "mlp", "hidden": 8, "table": "lycee_students",
            "joins": [["schools", "school"]],
            "features": [{"name": "age", "kind": "num", "lo": 15.0, "hi": 22.0},
                         {"name": "studytime", "kind": "cat", "values": ["1", "2", "3"]}],
            "label": ["higher", "in", ["yes"]], "order_by": "", "max_len": 10, "rounds": 3,
            "epochs": 1, "batch_size": 64, "lr": 0.3, "max_grad_norm": 1.0, "epsilon": 0.6,
            "epsilon_total": 1.0, "delta": 1e-6, "noise_multiplier": None,
            "eval_fraction": 0.2, "eval_share": 0.2, "bins": 4, "nodes": ["n1", "n2"],
            "min_nodes": 1, "round_timeout_s": 60.0, "seed": 7}
    return {**base, **kw}


def test_spec_round_trips_through_its_wire_form() -> None:
    raw = wire()
    spec = TrainSpec.from_dict(raw)
    assert spec.to_dict() == raw
    assert TrainSpec.from_dict(json.loads(spec_json(spec.to_dict()))) == spec
    assert spec.label == ("higher", "in", ("yes",)) and spec.joins == (("schools", "school"),)
    assert spec.features[1] == Feature("studytime", "cat", values=("1", "2", "3"))
    assert spec.n_features == 4 and spec.input_width == 4
    assert TrainSpec.from_dict(wire(order_by="date")).input_width == 8  # mean + last row
    assert TrainSpec.from_dict(wire(label=["g3", ">=", 10])).label == ("g3", ">=", 10.0)
    with pytest.raises(FrozenInstanceError):
        spec.rounds = 5  # type: ignore[misc]
    # what the ServerApp needs has defaults (a node's tests and benchmarks leave it out)
    short = {k: v for k, v in raw.items()
             if k not in ("nodes", "min_nodes", "round_timeout_s", "seed", "epsilon_total")}
    assert TrainSpec.from_dict(short).round_timeout_s == 120.0


@pytest.mark.parametrize("change", [
    {"model": "resnet"}, {"table": "x; DROP"}, {"rounds": 201}, {"rounds": 2.5},
    {"hidden": "many"}, {"label": ["higher", "~", 1]}, {"label": ["higher", "in", "yes"]},
    {"label": ["higher", "in", []]}, {"label": ["higher", "in", [1]]}, {"features": []},
    {"features": [{"name": "age", "kind": "num", "lo": 3, "hi": 3}]},
    {"features": [{"name": "age", "kind": "vector"}]}, {"bins": 5}, {"delta": 0.5},
    {"noise_multiplier": 0.01}, {"model": "gru", "order_by": ""},
    {"features": [{"name": "higher", "kind": "cat", "values": ["no", "yes"]}]},
    {"joins": [["open", "bad column"]]}, {"nodes": [""]}, {"min_nodes": 0},
    {"round_timeout_s": 0}, {"epsilon_total": -1}, {"lr": float("nan")},
])
def test_spec_refuses_what_does_not_hold(change: dict[str, Any]) -> None:
    with pytest.raises(SpecError):
        TrainSpec.from_dict(wire(**change))
    missing = wire()
    del missing["rounds"]
    with pytest.raises(SpecError, match="invalid training spec"):
        TrainSpec.from_dict(missing)


def test_a_spec_is_checked_when_built_not_only_when_parsed() -> None:
    spec = TrainSpec.from_dict(wire())
    with pytest.raises(SpecError):
        replace(spec, bins=3)
    with pytest.raises(SpecError):
        Feature("age", "num", 1.0, 0.0)


def test_the_parties_agree_on_limits() -> None:
    from nodes._trainview import _OPS

    assert SIGMA_RANGE[0] == NOISE_MULTIPLIER_MIN  # the spec's floor, the nodes' search
    assert tuple(_OPS) == LABEL_OPS  # every operator a spec allows, the node computes


def test_coordinator_signs_the_wire_form(tmp_path: Path) -> None:
    from federation._training import Trainer

    private, public = coordinator_keys(tmp_path / "coordinator_ed25519.pem")
    trainer = Trainer.__new__(Trainer)  # only its signing: no SuperLink
    trainer._signing_key = private.read_bytes()
    spec = TrainSpec.from_dict(wire())
    auth = verify_run_authorisation(trainer.authorise(spec), public)
    assert auth.spec_sha256 == canonical_sha256(json.loads(spec_json(spec.to_dict())))
    assert auth.run == "run1" and auth.nodes == (("n1", 0.6), ("n2", 0.6))
    assert auth.grant == grant_id("token")
    # its wire form (as a benchmark builds it) is signed as given
    raw = wire(features=[{"name": "age", "kind": "num", "lo": 15, "hi": 22}])
    again = verify_run_authorisation(trainer.authorise(raw), public)
    assert again.spec_sha256 == canonical_sha256(raw)


def test_a_hanging_superlink_holds_no_jobs_lock(tmp_path: Path) -> None:
    """Starting a run is a SuperLink call: while it hangs, every other job is still
    served (status, cancel), because no SuperLink call is made under the jobs lock."""
    import threading
    from types import SimpleNamespace

    from federation._training import Trainer, TrainingJob

    started, release = threading.Event(), threading.Event()

    class HangingSuperLink:
        def StartRun(self, request: Any) -> Any:
            started.set()
            release.wait(60)
            return SimpleNamespace(run_id=7)

        def close(self) -> None:
            pass

    trainer = Trainer.__new__(Trainer)
    trainer.jobs, trainer._lock = {}, threading.Lock()
    trainer._control = HangingSuperLink  # type: ignore[method-assign]
    spec = TrainSpec.from_dict(wire())
    other = TrainingJob("other", "alice", "p", {}, spec, ["n1"], tmp_path / "other")
    job = TrainingJob("new", "alice", "p", {}, spec, ["n1"], tmp_path / "new")
    trainer.jobs = {"other": other, "new": job}
    starting = threading.Thread(target=trainer._start, args=(job,), daemon=True)
    starting.start()
    assert started.wait(60)
    seen: list[Any] = []
    reader = threading.Thread(target=lambda: seen.append(
        trainer.get("other", SimpleNamespace(name="alice"))), daemon=True)
    reader.start()
    reader.join(30)  # under the jobs lock it would wait for the SuperLink (60 s)
    try:
        assert not reader.is_alive() and seen == [other] and starting.is_alive()
    finally:
        release.set()
        starting.join(60)
    assert job.run_id == 7 and job.status == "running"


# ------------------------------------------------------- the node's one state folder


def test_the_supernode_keeps_its_state_in_the_engine_state_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``bulle node serve`` gives the SuperNode the engine's state folder (its Flower home
    is ``<state>/flower``), whatever way the engine chose it (here: its default)."""
    from nodes import _flower
    from nodes._config import load_node_config
    from nodes._engine import NodeEngine

    path = tmp_path / "n1.toml"
    path.write_text('node_id = "n1"\nlisten = "127.0.0.1:0"\n[engine]\nthreads = 1\n'
                    '[training]\nsuperlink = "127.0.0.1:1"\nroot_certificates = "ca.pem"\n'
                    'auth_key = "n1.key"\n')
    config = load_node_config(path)
    engine = NodeEngine(config)
    envs: list[dict[str, str]] = []
    try:
        state = _flower.state_dir_of(engine)
        assert state == tmp_path / "n1-state"  # the engine's default, next to its config
        flower = _flower.NodeFlower(config, path, state)

        class Started:  # the SuperNode and executor, not started: their environment kept
            pid = 0

            def __init__(self, argv: list[str], env: dict[str, str], **_: Any) -> None:
                envs.append(env)

            def wait(self, timeout: float | None = None) -> int:
                flower._stopping.wait()
                return 0

            def poll(self) -> int:
                return 0

        monkeypatch.setattr(_flower.subprocess, "Popen", Started)
        flower.start()
        flower.stop()
    finally:
        engine.close()
    assert len(envs) == 2 and {e["FLWR_HOME"] for e in envs} == {str(state / "flower")}
