"""What the demo federation is made of, and everything written before a process starts:
the node configs shipped with the package, certificates, keys, the board's grant and the
coordinator's config (from ``templates/coordinator.toml``)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from importlib.resources import files
from pathlib import Path
from string import Template

NODES = ("region-gp", "region-ms", "region-35", "vendor-a", "vendor-b", "depp")
RESEARCHER = "demo-researcher"
PROJECT = "demo"
# what the demo grant covers: DP queries on student_assessment, DP training on the lycée tables
GRANT_DATASETS = ("student_assessment", "lycee_students", "lycee_students_math")
GRANT_EPSILON = 10.0
# Hub accounts (name → role); passwords are generated and printed once by `up`.
HUB_ACCOUNTS = {"demo-researcher": "researcher", "other-researcher": "researcher",
                "demo-board": "ethics-board", "demo-operator": "node-operator",
                "demo-observer": "observer", "demo-admin": "admin"}
HUB_PORTS = ("hub", "hub-api", "hub-proxy-api")
# DP training (issue 6): the coordinator's SuperLink, and the nodes that run a SuperNode
TRAINING_NODES = ("vendor-a", "vendor-b")
COORDINATOR_KEY = "coordinator_ed25519.pem"  # run authorisations (public half: .pub.pem)
EXAMPLE = ("SELECT school, sex, COUNT(*) AS pupils, AVG(g3) AS mean_final_grade "
           "FROM lycee_students GROUP BY school, sex ORDER BY school, sex")


def node_config(name: str) -> Path:
    """The shipped config of a demo node (package data: found in a wheel as in a checkout)."""
    return Path(str(files("bulle_demo") / "nodes" / f"{name}.toml"))


def node_configs() -> list[Path]:
    return [node_config(n) for n in NODES]


def default_state() -> Path:
    """``$BULLE_DEMO_STATE``, else ``.bulle-demo`` in the working folder (``make demo``:
    the checkout)."""
    return Path(os.environ.get("BULLE_DEMO_STATE") or ".bulle-demo").resolve()


def default_data() -> Path:
    """``$BULLE_DATA``, else ``../shared/data`` from the working folder (a checkout beside
    the project's shared folder)."""
    env = os.environ.get("BULLE_DATA")
    return Path(env).resolve() if env else (Path.cwd().parent / "shared" / "data").resolve()


def hub_config() -> Path:
    """``jupyterhub_config.py``, installed as a top-level module beside ``bulle_cli``."""
    from importlib.util import find_spec

    spec = find_spec("jupyterhub_config")
    if spec is None or spec.origin is None:
        raise RuntimeError("jupyterhub_config.py is not installed: reinstall bulle "
                           "(pip install -e . or the wheel)")
    return Path(spec.origin)


def secret_file(path: Path, make: Callable[[], str]) -> Path:
    """``path`` holding ``make()`` (created 0600 once; kept after)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(make())
    return path


def researcher_token(state: Path) -> str:
    return secret_file(state / "researcher.token",
                       lambda: secrets.token_urlsafe(32)).read_text().strip()


def service_token(state: Path) -> Path:
    """The `bulle` service's hub API token (the coordinator's OAuth client secret), in the
    coordinator's folder (the hub, root, reads it there too)."""
    return secret_file(state / "coordinator" / "hub-service.token",
                       lambda: secrets.token_hex(32))


def make_keys(state: Path) -> None:
    """Certificates (a local CA), the SuperNodes' keys, the coordinator's signing key and
    the board's key pair and grant: each made once, kept across `up`."""
    from federation import make_certs
    from nodes import make_flower_key
    from privacy import coordinator_keys

    make_certs(state / "certs", [*NODES, "bulle-superlink"])
    _board(state / "board")
    for n in TRAINING_NODES:
        make_flower_key(state / "flower" / f"{n}.key")
    coordinator_keys(state / "flower" / COORDINATOR_KEY)


def _board(board: Path) -> None:
    """The demo's ethics board: a key pair and a signed grant for the demo project."""
    from privacy import Grant, generate_board_keys, sign_grant

    if not (board / "board_ed25519.pem").exists():
        generate_board_keys(board)
    grant_file = board / f"{PROJECT}.grant"
    if not grant_file.exists():
        now = datetime.now(UTC)
        grant = Grant(PROJECT, (RESEARCHER,), GRANT_DATASETS, GRANT_EPSILON, 1e-6,
                      now + timedelta(days=90), "Demo: learning traces and success "
                      "(research only, no decision about a pupil)", now)
        grant_file.write_text(sign_grant(grant, (board / "board_ed25519.pem").read_bytes()))


def coordinator_config(state: Path, ports: dict[str, int]) -> Path:
    """``coordinator.toml`` from the shipped template, for these ports."""
    from federation import hash_token

    nodes = "\n".join(f'\n[[node]]\nid = "{n}"\naddress = "127.0.0.1:{ports[n]}"'
                      for n in NODES)
    node_keys = ", ".join(f'"{n}" = "{state / "flower" / (n + ".pub")}"'
                          for n in TRAINING_NODES)
    text = Template((files("bulle_demo") / "templates" / "coordinator.toml").read_text())
    path = state / "coordinator.toml"
    path.write_text(text.substitute(
        state=state, nodes=nodes, node_keys=node_keys, project=PROJECT, researcher=RESEARCHER,
        token_sha256=hash_token(researcher_token(state)), service_token=service_token(state),
        coordinator_key=COORDINATOR_KEY,
        **{k.replace("-", "_") + "_port": v for k, v in ports.items() if k not in NODES}))
    return path
