"""`bulle demo up/env/down` as a user runs them: separate processes, real ports, real data."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bulle_demo import NODES, node_config
from enclave import BulleError, connect
from tests._federation import DATA, wait_for


def bulle(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bulle_cli", *args, "--state", str(state),
                           "--data", str(DATA)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.fixture
def state() -> Iterator[Path]:
    """Not under pytest's 0700 temporary root: as root, the service users enter it."""
    path = Path(tempfile.mkdtemp(prefix="bulle-demo-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(path.parent / f"{path.name}-added", ignore_errors=True)


@pytest.mark.slow
def test_demo_up_query_down(state: Path) -> None:
    up = bulle("demo", "up", state=state)
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        url = re.search(r"coordinator API\s+(http://127\.0\.0\.1:\d+)", up.stdout).group(1)
        assert "from enclave import connect" in up.stdout
        pids = json.loads((state / "pids.json").read_text())
        assert set(pids) >= {"region-gp", "region-ms", "region-35", "vendor-a", "vendor-b", "depp",
                             "coordinator", "hub"}
        env = bulle("demo", "env", state=state).stdout.strip()
        values = dict(kv.split("=", 1) for kv in env.removeprefix("export ").split())
        assert values["BULLE_URL"] == url
        hub = connect(values["BULLE_URL"], values["BULLE_TOKEN"])
        df = hub.sql("SELECT school, COUNT(*) AS pupils, AVG(g3) AS mean FROM lycee_students "
                     "GROUP BY school ORDER BY school")
        assert df["school"].tolist() == ["GP", "MS"]
        # 423 and 226 pupils; the restricted tier releases counts perturbed by the cell key
        # method, by at most max_perturbation = 4 (bulle_demo/nodes/region-*.toml)
        assert all(abs(got - true) <= 4 for got, true in zip(df["pupils"], [423, 226],
                                                               strict=True))
        # an unknown column: the columns whose descriptions name it (issue 14)
        with pytest.raises(BulleError, match=r"did you mean 'g1', 'g2' or 'g3'"):
            hub.sql("SELECT AVG(grade) FROM lycee_students")
        assert set(hub.catalog()["table"]) >= {"lycee_students", "student_info", "ips_colleges",
                                               "dnb_colleges", "student_assessment"}
        # The demo's standing indicator, approved at setup, is refreshed by the coordinator
        # (its scheduler ticks every 5 s; the first refresh is due at once).
        assert "services/bulle/indicators/" in up.stdout
        wait_for(lambda: hub.indicators()["last_refresh"].tolist() in (["released"],
                                                                        ["refused"],
                                                                        ["failed"]), 60)
        assert hub.indicators()["last_refresh"].tolist() == ["released"]
        # idempotent: a second `up` keeps the running federation
        again = bulle("demo", "up", state=state)
        assert again.returncode == 0 and "already running" in again.stdout
        assert json.loads((state / "pids.json").read_text()) == pids
        # One more node joins the running federation: no coordinator restart.
        added = bulle("demo", "add-node", str(_second_gp_node(state)), state=state)
        assert added.returncode == 0, added.stderr + added.stdout
        before, pids = pids, json.loads((state / "pids.json").read_text())
        assert pids == {**before, "gp-copy": pids["gp-copy"]}  # the coordinator kept running
        _wait_gp_pupils(hub, 2 * 423, 8)  # GP pupils now at two nodes, ±4 each
        status = bulle("demo", "status", state=state).stdout
        assert re.search(r"gp-copy\s+running", status), status
        # `up` after `down` brings it back, on the port the coordinator has registered.
        assert bulle("demo", "down", state=state).returncode == 0
        assert not any(_alive(pid) for pid in pids.values())
        assert bulle("demo", "up", state=state).returncode == 0
        pids = json.loads((state / "pids.json").read_text())
        assert "gp-copy" in pids
        env = bulle("demo", "env", state=state).stdout.strip()
        values = dict(kv.split("=", 1) for kv in env.removeprefix("export ").split())
        _wait_gp_pupils(connect(values["BULLE_URL"], values["BULLE_TOKEN"]), 2 * 423, 8)
    finally:
        down = bulle("demo", "down", state=state)
    assert down.returncode == 0
    assert not any(_alive(pid) for pid in pids.values())
    assert bulle("demo", "down", state=state).stdout.strip() == "nothing was running"


def _second_gp_node(state: Path) -> Path:
    """A new node publishing the GP pupils again (the demo's region-gp, another id), in a
    folder the node's service user can read."""
    src = node_config("region-gp")
    folder = state.parent / f"{state.name}-added"
    folder.mkdir(mode=0o755, exist_ok=True)
    path = folder / "gp-copy.toml"
    path.write_text(src.read_text().replace('"region-gp"', '"gp-copy"')
                    .replace("/region-gp", "/gp-copy"))
    path.chmod(0o644)
    return path


def _wait_gp_pupils(hub, expected: int, tolerance: int, timeout: float = 30.0) -> None:
    """Until the GP count reaches ``expected`` (within the cell-key perturbation)."""
    import time

    deadline, got = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        df = hub.sql("SELECT COUNT(*) AS pupils FROM lycee_students WHERE school = 'GP'",
                     progress=False)
        got = int(df["pupils"][0])
        if abs(got - expected) <= tolerance:
            return
        time.sleep(0.5)
    raise AssertionError(f"GP pupils {got}, expected {expected} ± {tolerance}")


def test_demo_refuses_a_state_its_service_users_cannot_enter(tmp_path: Path) -> None:
    """As root, a state folder below a closed folder (pytest's 0700 temporary root) is
    refused at once with the reason, before any user, file or process is made."""
    if os.geteuid() != 0:
        pytest.skip("only root runs the demo under service users")
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    up = bulle("demo", "up", state=closed / "demo")
    assert up.returncode == 1 and "cannot enter" in up.stderr and str(closed) in up.stderr
    assert not (closed / "demo").exists()


def test_demo_as_another_user_says_it_runs_as_one_user() -> None:
    from bulle_demo import Demo

    demo = Demo(Path("/nonexistent-state"))  # accounts are made by `up`, as root only
    assert demo._process_note().startswith("not root: every process runs as ")
    assert demo._node_data() == demo.data and demo._hidden() == []


def test_the_wheel_ships_the_demo_and_the_launcher_finds_it_there(tmp_path: Path) -> None:
    """The node configs, the coordinator's template and jupyterhub_config.py are in the
    wheel, and the launcher finds them in the installed copy (importlib.resources), not in
    the source tree."""
    import zipfile

    repo = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"  # setuptools builds in the tree: a copy, not the checkout
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], capture_output=True, text=True,
                            cwd=repo, check=True).stdout
    for rel in filter(None, listed.split("\0")):
        if (repo / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / rel, src / rel)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                            "--no-build-isolation", str(src), "-w", str(tmp_path / "dist")],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp_path / "dist").glob("bulle-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"bulle_demo/nodes/{n}.toml" for n in NODES} | {
        "bulle_demo/templates/coordinator.toml", "jupyterhub_config.py"} <= names
    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                                "--target", str(site), str(wheel)], capture_output=True,
                               text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    probe = (f"import sys; sys.path.insert(0, {str(site)!r})\n"
             "from importlib.resources import files\n"
             "import bulle_demo\n"
             "from bulle_demo._layout import hub_config, node_configs\n"
             "print(*node_configs(), hub_config(), bulle_demo.__file__,\n"
             "      files('bulle_demo') / 'templates' / 'coordinator.toml', sep='\\n')")
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                           timeout=60, cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    paths = [Path(line) for line in found.stdout.splitlines()]
    assert len(paths) == len(NODES) + 3
    assert all(p.is_file() and p.is_relative_to(site) for p in paths), paths


def test_supernodes_needs_the_training_section(tmp_path: Path, capsys) -> None:
    """`bulle coordinator supernodes` (what `up` registers the SuperNode keys with) on a
    config without [training]: a clear refusal, nothing dialled."""
    from federation.cli import main as coordinator_cli

    config = tmp_path / "coordinator.toml"
    config.write_text(f'listen = "127.0.0.1:0"\nstate_dir = "{tmp_path}"\n\n[tls]\n'
                      f'cert = "{tmp_path}/c.pem"\nkey = "{tmp_path}/c.key"\n'
                      f'ca = "{tmp_path}/ca.pem"\n')
    assert coordinator_cli(["coordinator", "supernodes", "--config", str(config)]) == 2
    assert "has no [training]" in capsys.readouterr().err
