"""DP federated training at the coordinator: requests → Flower runs → released rounds.

A request names a model of the zoo, a table, features, a binary label, rounds and a target
(ε, δ). The coordinator checks it against the federated catalogue and the project's grant,
turns it into a *spec* (``federation/_trainspec.py``: a ``bulle_flower.spec.TrainSpec``,
the type the ServerApp and the nodes rebuild; feature layout from public domains and
declared bounds only, never from data), signs a *run authorisation* for it with its own
Ed25519 key (run id, project, grant id, spec hash, nodes with their ε targets, expiry:
``privacy._runauth``; the nodes act on no message without it), and submits its own vetted
FAB (``bulle_flower``) to its SuperLink over the fenced Control API. The ServerApp writes
one record per round (``progress.jsonl``) and the aggregated weights; this module charges
the project's **global** ledger for each round — the composition of every node's DP-SGD
and evaluation events (and, in a node's first round, the noisy count its run's plan drew),
since a learner may be at several nodes — before the researcher can see that round. A
refused charge stops the run.

Reported: ε per node (its own ledger's figure) and the composed ε of the run across nodes;
never an average of ε over nodes. The run's result is the noisy evaluation of the released
(last) model, charged like the rounds (``evaluation``), apart from the per-round history.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dp_accounting as dpa

from bulle_flower.spec import TrainSpec
from federation._config import TrainingConfig
from federation._errors import QueryError
from federation._trainspec import (
    check_model,
    make_spec,
    request_delta,
    run_budget,
    training_nodes,
    training_table,
    training_view,
)
from privacy import (
    RunAuthorisation,
    canonical_sha256,
    coordinator_keys,
    gaussian_event,
    grant_id,
    opacus_event,
    rdp_epsilon,
    sign_run_authorisation,
    spec_json,
)

log = logging.getLogger("bulle.training")
AUTH_MARGIN_S = 600.0  # a run authorisation outlives the run's longest possible duration by
AUTH_SKEW_S = 300.0  # … and is dated this much earlier (clocks of other hosts)
FINAL = ("finished", "failed", "cancelled", "budget_exhausted")


@dataclass
class TrainingJob:
    id: str
    researcher: str
    project: str
    request: dict[str, Any]
    spec: TrainSpec  # what the nodes receive (the hash of its wire form is in ``auth``)
    nodes: list[str]
    out_dir: Path = Path()  # where the ServerApp writes progress and models
    flower: dict[str, int] = field(default_factory=dict)  # node id -> Flower node id
    auth: str = ""  # the run authorisation (signed token)
    evaluation: dict[str, Any] | None = None  # the final model's noisy evaluation
    status: str = "starting"  # starting | running | finished | failed | cancelled |
    #                          budget_exhausted
    run_id: int | None = None
    reason: str = ""
    rounds: list[dict[str, Any]] = field(default_factory=list)  # released (charged) rounds
    withheld: list[dict[str, Any]] = field(default_factory=list)  # rounds not released
    events: list[dpa.DpEvent] = field(default_factory=list)  # charged to the global ledger
    node_epsilon: dict[str, float] = field(default_factory=dict)  # each node's ε, this run
    model_path: Path | None = None
    submitted: float = field(default_factory=time.time)
    finished: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def to_json(self) -> dict[str, Any]:
        s, wire = self.spec, self.spec.to_dict()
        return {
            "id": self.id, "status": self.status, "reason": self.reason,
            "project": self.project, "model": s.model, "table": s.table,
            "rounds_planned": s.rounds, "rounds_done": len(self.rounds),
            "nodes": self.nodes, "epsilon_target": s.epsilon_total,
            "epsilon_target_per_node": s.epsilon, "delta": s.delta,
            # the run's ε composed over nodes and rounds (RDP, as the global ledger)
            "epsilon_spent": rdp_epsilon(self.events, s.delta),
            "epsilon_per_node": dict(self.node_epsilon),
            "rounds": self.rounds, "withheld": self.withheld,
            "features": [f.name for f in s.features], "label": wire["label"],
            "layout": wire["features"], "hidden": s.hidden, "order_by": s.order_by,
            "joins": wire["joins"],
            "max_len": s.max_len,
            "submitted": self.submitted, "finished": self.finished,
            "has_model": self.model_path is not None,
            # the run's result: the released model's noisy evaluation (None until done)
            "evaluation": self.evaluation,
        }


class Trainer:
    """Training jobs of one coordinator (``federation/_api.py`` routes call it)."""

    def __init__(self, coordinator: Any, settings: TrainingConfig) -> None:
        self.coordinator = coordinator
        self.settings = settings
        self.jobs: dict[str, TrainingJob] = {}
        self._lock = threading.Lock()  # the jobs
        self._flower_lock = threading.Lock()  # node registration at the SuperLink
        self._token: str | None = None  # the Control API secret, read once
        self._signing_key = coordinator_keys(settings.signing_key)[0].read_bytes()
        # SuperNodes whose key is not registered are refused (exit 305): register now, in
        # the background (the SuperLink may still be starting); submit() retries if needed.
        threading.Thread(target=self._register_quietly, daemon=True).start()

    def _register_quietly(self) -> None:
        for _ in range(30):
            try:
                self.flower_ids()
                return
            except Exception as e:
                log.info("SuperLink not reachable yet (%s); retrying", type(e).__name__)
                time.sleep(2.0)

    # -- Flower plumbing ----------------------------------------------------------------
    def _control(self) -> Any:
        from federation._superlink import control_client, control_token

        s = self.settings
        if self._token is None:
            self._token = control_token(s.control_token_file)
        return control_client(s.superlink, s.root_certificates, self._token)

    def flower_ids(self) -> dict[str, int]:
        """Node id → Flower node id. Registers the nodes' keys (idempotent): each time, as
        an in-memory SuperLink forgets them when it restarts."""
        from federation._superlink import register_nodes

        with self._flower_lock:
            client = self._control()
            try:
                return register_nodes(client, self.settings.node_keys)
            finally:
                client.close()

    # -- requests -----------------------------------------------------------------------
    def submit(self, researcher: Any, request: dict[str, Any]) -> TrainingJob:
        project = self.coordinator.project_of(researcher, request.get("project"))
        job_id = uuid.uuid4().hex
        spec, flower = self._spec(researcher, project, request, job_id)
        job = TrainingJob(job_id, researcher.name, project, request, spec, sorted(flower),
                          self.settings.work_dir / job_id, flower, self.authorise(spec))
        with self._lock:
            self.jobs[job.id] = job
        self._audit(job, "train_submitted", {"model": spec.model, "table": spec.table,
                                             "rounds": spec.rounds, "nodes": job.nodes,
                                             "epsilon": spec.epsilon,
                                             "spec_sha256": canonical_sha256(spec.to_dict())})
        self._start(job)
        threading.Thread(target=self._watch, args=(job,), name=f"train-{job.id[:8]}",
                         daemon=True).start()
        return job

    def authorise(self, spec: TrainSpec | dict[str, Any], now: datetime | None = None) -> str:
        """The run authorisation of ``spec`` (its ``job`` is the run id), signed with the
        coordinator's key: valid for the run's longest possible duration. ``spec`` may be
        its wire form (a dict, as the nodes will receive it: signed as given)."""
        now = now or datetime.now(UTC)
        wire = spec if isinstance(spec, dict) else spec.to_dict()
        typed = TrainSpec.from_dict(wire) if isinstance(spec, dict) else spec
        last = (typed.rounds + 1) * typed.round_timeout_s + AUTH_MARGIN_S
        auth = RunAuthorisation(
            run=typed.job, project=typed.project, grant=grant_id(typed.grant),
            spec_sha256=canonical_sha256(wire),
            nodes=tuple((n, typed.epsilon) for n in sorted(typed.nodes)),
            expires=now + timedelta(seconds=last), issued=now - timedelta(seconds=AUTH_SKEW_S))
        return sign_run_authorisation(auth, self._signing_key)

    def run_config(self, job: TrainingJob) -> dict[str, str]:
        """The ServerApp's run config: the nodes' spec (passed on byte for byte), the run
        authorisation, and what only the ServerApp needs."""
        return {"spec": spec_json(job.spec.to_dict()), "auth": job.auth,
                "server": json.dumps({"out_dir": str(job.out_dir), "nodes": job.flower})}

    def get(self, job_id: str, researcher: Any) -> TrainingJob | None:
        with self._lock:
            job = self.jobs.get(job_id)
        return job if job and job.researcher == researcher.name else None

    def cancel(self, job: TrainingJob) -> None:
        if job.status in FINAL:
            return
        self._stop_run(job)
        self._finish(job, "cancelled", "cancelled by the researcher")

    def _spec(self, researcher: Any, project: str, req: dict[str, Any], job: str = ""
              ) -> tuple[TrainSpec, dict[str, int]]:
        """The spec of run ``job`` (what the nodes receive), and node id → Flower id; the
        request checked in the order of ``federation/_trainspec.py``."""
        model = check_model(req)
        catalog = self.coordinator.catalog()
        table = training_table(catalog, req)
        grant, token = self.coordinator.projects.grant(project)
        self.coordinator.projects.check(grant, researcher, [table.name])
        delta = request_delta(req, grant)
        view = training_view(req, catalog, table)
        nodes = training_nodes(req, catalog, table, view.joins, set(self.settings.node_keys))
        budget = run_budget(req, grant, delta,
                            self.coordinator.projects.budget(project).remaining, project)
        spec = make_spec(req, job=job, project=project, researcher=researcher.name,
                         grant=token, model=model, table=table.name, view=view, nodes=nodes,
                         budget=budget, round_timeout_s=self.settings.round_timeout_s)
        flower = self.flower_ids()  # outside the jobs lock: a SuperLink call
        return spec, {n: flower[n] for n in nodes}

    # -- the run ------------------------------------------------------------------------
    def _start(self, job: TrainingJob) -> None:
        from flwr.common.serde import fab_to_proto, user_config_to_proto
        from flwr.proto.control_pb2 import StartRunRequest
        from flwr.supercore.fab import Fab

        from bulle_flower import build_fab, fab_sha256

        job.out_dir.mkdir(parents=True, exist_ok=True)
        client = self._control()
        try:
            res = client.StartRun(StartRunRequest(
                fab=fab_to_proto(Fab(fab_sha256(), build_fab(), {})),
                override_config=user_config_to_proto(self.run_config(job)), federation=""))
        except Exception as e:
            self._finish(job, "failed", f"the SuperLink did not start the run ({type(e).__name__})")
            raise QueryError("training_unavailable", "the training service (SuperLink) is "
                             "not reachable", status=503) from None
        finally:
            client.close()
        job.run_id = int(res.run_id)
        job.status = "running"

    def _stop_run(self, job: TrainingJob) -> None:
        if job.run_id is None:
            return
        from flwr.proto.control_pb2 import StopRunRequest

        client = self._control()
        try:
            client.StopRun(StopRunRequest(run_id=job.run_id))
        except Exception as e:  # already finished: nothing to stop
            log.info("stop run %s: %s", job.run_id, e)
        finally:
            client.close()

    def _watch(self, job: TrainingJob) -> None:
        progress = job.out_dir / "progress.jsonl"
        offset, buf, last_check = 0, "", time.monotonic()
        while job.status not in FINAL:
            if progress.exists():
                with progress.open(encoding="utf-8") as f:
                    f.seek(offset)
                    chunk = f.read()
                    offset = f.tell()
                buf += chunk
                *lines, buf = buf.split("\n")
                for line in lines:
                    if line.strip() and job.status not in FINAL:
                        self._on_record(job, json.loads(line))
            if job.status in FINAL:
                break
            if time.monotonic() - last_check > 5:
                last_check = time.monotonic()
                self._check_run(job)
            time.sleep(0.05)

    def _check_run(self, job: TrainingJob) -> None:
        """A ServerApp that died without its final record: the run failed."""
        from flwr.proto.control_pb2 import ListRunsRequest

        try:
            client = self._control()
            try:
                run = client.ListRuns(ListRunsRequest(run_id=job.run_id)).run_dict[job.run_id]
            finally:
                client.close()
        except Exception:
            return
        if run.status.status == "finished":
            time.sleep(1.0)  # its last lines may still be on their way
            if job.status not in FINAL and not self._drain_done(job):
                self._finish(job, "failed", f"the run ended ({run.status.sub_status}) "
                             f"without a result: {run.status.details[:200]}")

    def _drain_done(self, job: TrainingJob) -> bool:
        progress = job.out_dir / "progress.jsonl"
        return progress.exists() and '"type": "done"' in progress.read_text()

    def _on_record(self, job: TrainingJob, rec: dict[str, Any]) -> None:
        kind = rec.get("type")
        if kind in ("round", "eval") and rec.get("released"):
            self._release(job, rec)
        elif kind in ("round", "eval"):
            job.withheld.append({"round": rec["round"], "failed": rec.get("failed", {}),
                                 "refused": rec.get("refused", {})})
        elif kind == "done":
            self._finish(job, rec["status"], rec.get("reason", ""))
        self._notify(job)

    def _release(self, job: TrainingJob, rec: dict[str, Any]) -> None:
        """Charge the global ledger for one exchange, then show it: round r's weights and
        the noisy evaluation of round r-1's model (an "eval" record: of the last one)."""
        events, nodes = [], {}
        for name, n in sorted(rec["nodes"].items()):
            parts = [opacus_event(json.loads(n["history"])),
                     gaussian_event(float(n["sigma_eval"]))]
            if float(n.get("sigma_count") or 0) > 0:  # the node's count for its run's plan
                parts.append(gaussian_event(float(n["sigma_count"])))
            events.append(dpa.ComposedDpEvent(parts))
            nodes[name] = {k: n.get(k) for k in (
                "epsilon_round", "epsilon_count", "epsilon_run", "epsilon_spent",
                "epsilon_remaining", "sigma", "sample_rate", "steps", "sigma_eval",
                "sigma_count", "accuracy", "auc", "n_eval")}
        # A learner may be at several nodes: the round costs the composition of them all.
        event = dpa.ComposedDpEvent(events)
        claim = sum(float(n["epsilon_round"]) + float(n.get("epsilon_count") or 0)
                    for n in nodes.values())
        try:
            charged = self.coordinator.projects.charge(
                f"train:{job.id}:{rec['round']}", job.project, event, claim)
        except QueryError as e:
            job.withheld.append({"round": rec["round"], "refused": {"coordinator": e.message}})
            self._stop_run(job)
            self._finish(job, "budget_exhausted", e.message)
            return
        job.events.append(event)
        for name, n in nodes.items():
            job.node_epsilon[name] = float(n["epsilon_run"])
        evaluated = {"accuracy": rec.get("accuracy"), "auc": rec.get("auc"),
                     "n_eval": rec.get("n_eval"),
                     "nodes_eval": {k: {m: v[m] for m in ("accuracy", "auc", "n_eval")}
                                    for k, v in nodes.items()}}
        if job.rounds and rec["evaluates"] == job.rounds[-1]["round"]:
            job.rounds[-1].update(evaluated)
        if rec["type"] == "eval":  # the released model's own evaluation: the run's result
            job.evaluation = {"round": rec["evaluates"], **evaluated,
                              # its own ε (composed over the nodes), and what it added to
                              # the project's composed spend
                              "epsilon": rdp_epsilon([event], job.spec.delta),
                              "epsilon_growth": charged.needed_epsilon}
        if rec["type"] == "round":
            job.model_path = job.out_dir / rec["model_file"]
            job.rounds.append({
                "round": rec["round"], "accuracy": None, "auc": None, "n_eval": None,
                "nodes": nodes, "failed": rec.get("failed", {}),
                "round_s": rec.get("round_s"), "train_s": rec.get("train_s")})
        last = job.rounds[-1]
        last.update(epsilon_spent=rdp_epsilon(job.events, job.spec.delta),
                    project_epsilon_spent=charged.spent_epsilon,
                    project_epsilon_remaining=charged.remaining_epsilon)
        for name, n in nodes.items():  # the node's ε after this exchange
            last["nodes"].setdefault(name, n).update(
                {k: n[k] for k in ("epsilon_run", "epsilon_spent", "epsilon_remaining")})
        self._audit(job, "train_round_released" if rec["type"] == "round" else
                    "train_eval_released", {"round": rec["round"], "nodes": sorted(nodes),
                                            "epsilon": charged.needed_epsilon,
                                            "failed": sorted(rec.get("failed", {}))})

    def _finish(self, job: TrainingJob, status: str, reason: str) -> None:
        if job.status in FINAL:
            return
        job.status, job.reason, job.finished = status, reason[:1000], time.time()
        self._audit(job, "train_" + status, {"rounds_done": len(job.rounds),
                                             "reason": reason[:300]})
        job.done.set()
        self._notify(job)

    def _notify(self, job: TrainingJob) -> None:
        with job.changed:
            job.changed.notify_all()

    def _audit(self, job: TrainingJob, action: str, detail: dict[str, Any]) -> None:
        try:
            self.coordinator.projects.audit.append(job.researcher, job.project, action,
                                                   {"job": job.id, **detail})
        except Exception:
            log.exception("audit append failed for training job %s", job.id)

    def wait(self, job: TrainingJob, timeout: float, after_round: int = -1) -> None:
        """Block until the job ends, or until it has more than ``after_round`` rounds."""
        deadline = time.monotonic() + timeout
        with job.changed:
            while job.status not in FINAL and len(job.rounds) <= after_round:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                job.changed.wait(left)


# ----------------------------------------------------------------------------- HTTP API


def training_router(coordinator: Any, to_researcher: Any, who_dep: Any) -> Any:
    """Routes ``/v1/trainings…`` (added by ``federation/_api.py``); ``who_dep`` is its
    authenticated-caller dependency, ``to_researcher`` checks the scope and maps the caller
    to a researcher. Without [training] in the config they answer 404."""
    from typing import get_args

    from fastapi import APIRouter, Body
    from fastapi.responses import JSONResponse, Response

    router = APIRouter()
    caller = get_args(who_dep)[1]  # the Depends(...) of Annotated[Caller, Depends(...)]
    body_default = Body()
    settings = coordinator.config.training  # [training], parsed by federation/_config.py
    trainer = Trainer(coordinator, settings) if settings is not None else None
    coordinator.trainer = trainer

    def need() -> Trainer:
        if trainer is None:
            raise QueryError("training_unavailable", "this coordinator has no SuperLink "
                             "configured for DP training", status=404)
        return trainer

    def job_of(job_id: str, who: Any) -> TrainingJob:
        job = need().get(job_id, to_researcher(who))
        if job is None:  # not found, or someone else's: the same answer
            raise QueryError("not_found", "no such training job", status=404)
        return job

    @router.post("/v1/trainings", response_model=None)
    def submit_training(who: Any = caller, body: dict[str, Any] = body_default
                        ) -> Any:
        job = need().submit(to_researcher(who), body)
        return JSONResponse(job.to_json(), status_code=202)

    @router.get("/v1/trainings/{job_id}")
    def training_status(job_id: str, who: Any = caller, wait_s: float = 0.0,
                        after_round: int = -1) -> dict[str, Any]:
        job = job_of(job_id, who)
        need().wait(job, min(max(wait_s, 0.0), 60.0), after_round)
        return job.to_json()

    @router.post("/v1/trainings/{job_id}/cancel")
    def cancel_training(job_id: str, who: Any = caller) -> dict[str, Any]:
        job = job_of(job_id, who)
        need().cancel(job)
        return job.to_json()

    @router.get("/v1/trainings/{job_id}/model", response_model=None)
    def training_model(job_id: str, who: Any = caller) -> Any:
        job = job_of(job_id, who)
        if job.model_path is None:
            raise QueryError("not_ready", "no round has been released yet", status=409)
        return Response(job.model_path.read_bytes(), media_type="application/octet-stream")

    return router
