"""`bulle demo up/env/down` as a user runs them: separate processes, real ports, real data."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from enclave import connect
from tests._federation import DATA


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


@pytest.mark.slow
def test_demo_up_query_down(tmp_path: Path) -> None:
    state = tmp_path / "demo"
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
        assert df["pupils"].tolist() == [425, 225]  # 423 and 226, rounded to 5 at release
        assert set(hub.catalog()["table"]) >= {"lycee_students", "student_info", "ips_colleges",
                                               "dnb_colleges", "student_assessment"}
        # idempotent: a second `up` keeps the running federation
        again = bulle("demo", "up", state=state)
        assert again.returncode == 0 and "already running" in again.stdout
        assert json.loads((state / "pids.json").read_text()) == pids
    finally:
        down = bulle("demo", "down", state=state)
    assert down.returncode == 0
    assert not any(_alive(pid) for pid in pids.values())
    assert bulle("demo", "down", state=state).stdout.strip() == "nothing was running"
