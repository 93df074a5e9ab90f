"""The enclave end to end: `bulle demo up` (6 nodes, the coordinator, JupyterHub with its
proxy) as separate processes; hub tokens and scopes on every endpoint; projects from
submission to the board's decision to a DP query the nodes accept; the example notebooks
run headless; the dashboard and JupyterLab in a real browser (Debian's chromium).

Screenshots and executed notebooks go to ``test-artifacts/`` (gitignored).
"""

from __future__ import annotations

import csv
import io
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bulle_demo import NODES
from enclave import BulleError, connect
from tests._federation import DATA, wait_for
from tests._hub import HubSession, run_in_kernel, start_server

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
pytestmark = pytest.mark.slow


def bulle(*args: str, state: Path, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bulle_cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=REPO, env={**os.environ, **(env or {}),
                                                                 "BULLE_DEMO_STATE": str(state)})


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (single-user servers, kernels, the proxy)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Enclave:
    def __init__(self, state: Path, info: dict[str, Any], passwords: dict[str, str]) -> None:
        self.state, self.info, self.passwords = state, info, passwords
        self.url, self.hub_url = info["url"], info["hub_url"]
        self._sessions: dict[str, HubSession] = {}

    def session(self, user: str) -> HubSession:
        if user not in self._sessions:
            self._sessions[user] = HubSession(self.hub_url, user, self.passwords[user])
        return self._sessions[user]

    def token(self, user: str, **kw: Any) -> str:
        return self.session(user).token(**kw)[0]

    def close(self) -> None:
        for s in self._sessions.values():
            s.close()


@pytest.fixture(scope="module")
def enclave() -> Iterator[Enclave]:
    # Not under pytest's 0700 temporary root: as root, the demo's service users must be
    # able to enter the state folder.
    state = Path(tempfile.mkdtemp(prefix="bulle-enclave-"))
    started = time.monotonic()
    up = subprocess.run([sys.executable, "-m", "bulle_cli", "demo", "up", "--state", str(state),
                         "--data", str(DATA)], capture_output=True, text=True, timeout=300,
                        cwd=REPO)
    pids = json.loads((state / "pids.json").read_text()) if (state / "pids.json").exists() \
        else {}
    env = None
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        info = json.loads((state / "demo.json").read_text())
        info["up_s"] = round(time.monotonic() - started, 1)
        passwords = dict(re.findall(r"^\s+\S+\s+(\S+)\s+password (\S{12,})$", up.stdout, re.M))
        assert set(passwords) == set(info["accounts"]), up.stdout
        assert f"JupyterHub          {info['hub_url']}" in up.stdout
        env = Enclave(state, info, passwords)
        yield env
    finally:
        below = _descendants(pids["hub"]) if "hub" in pids else set()
        if env is not None:
            env.close()
        down = bulle("demo", "down", "--state", str(state), state=state)
        left = [p for p in {*pids.values(), *below} if _alive(p)]
        shutil.rmtree(state, ignore_errors=True)
        assert down.returncode == 0, down.stderr
        assert not left, f"processes left running: {left}"


def _call(e: Enclave, method: str, path: str, token: str | None, body: Any = None
          ) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, e.url + path, headers=headers, json=body, timeout=60)


# role → user
USERS = {"researcher": "demo-researcher", "board": "demo-board", "operator": "demo-operator",
         "admin": "demo-admin"}


def test_demo_env_has_the_hub(enclave: Enclave) -> None:
    env = bulle("demo", "env", "--state", str(enclave.state), state=enclave.state).stdout
    assert f"BULLE_HUB_URL={enclave.hub_url}" in env
    status = bulle("demo", "status", "--state", str(enclave.state), state=enclave.state)
    assert status.returncode == 0 and re.search(r"^hub\s+running", status.stdout, re.M)


def test_token_and_scope_matrix(enclave: Enclave) -> None:
    tokens = {role: enclave.token(user) for role, user in USERS.items()}
    # Projects the board and the admin decide below (submitted by the researcher).
    for name in ("matrix-a", "matrix-b"):
        r = _call(enclave, "POST", "/v1/projects", tokens["researcher"], {
            "name": name, "title": "Matrix", "purpose": "scope test",
            "datasets": ["student_assessment"], "epsilon": 1.0})
        assert r.status_code == 201, r.text
    ok, no = 200, 403
    project = {"title": "t", "purpose": "p", "datasets": ["ips_colleges"], "epsilon": 1.0}
    # (method, path, body) → expected status for researcher, board, operator, admin.
    # The admin holds every scope but is in no project: queries and budget say 403.
    matrix = [
        ("GET", "/v1/health", None, (ok, ok, ok, ok)),
        ("GET", "/v1/catalog", None, (ok, ok, ok, ok)),
        ("POST", "/v1/queries", {"sql": "SELECT COUNT(*) AS n FROM ips_colleges"},
         (ok, no, no, no)),
        ("GET", "/v1/budget", None, (ok, no, no, no)),
        ("GET", "/v1/projects", None, (ok, ok, ok, ok)),
        ("POST", "/v1/projects", project, (201, no, no, 201)),
        ("GET", "/v1/projects/matrix-a", None, (ok, ok, ok, ok)),
        ("POST", "/v1/projects/{p}/decision", {"decision": "refuse", "reason": "test"},
         (no, ok, no, ok)),
        ("GET", "/v1/board/summary", None, (no, ok, ok, ok)),
        ("GET", "/v1/board/export?format=csv&table=projects", None, (no, ok, ok, ok)),
        ("GET", "/v1/audit", None, (no, ok, ok, ok)),
        ("GET", "/v1/audit/verify", None, (no, ok, ok, ok)),
    ]
    failures = []
    decisions = iter(["matrix-a", "matrix-b"])
    for method, path, body, expected in matrix:
        for (role, token), want in zip(tokens.items(), expected, strict=True):
            p = path
            if "{p}" in path:
                p = path.format(p=next(decisions) if want == ok else "matrix-a")
            b = {**body, "name": f"m-{role}"} if path == "/v1/projects" and body else body
            got = _call(enclave, method, p, token, b).status_code
            if got != want:
                failures.append(f"{role} {method} {p}: {got}, expected {want}")
        if path != "/v1/health":
            for bad in (None, "not-a-token"):
                got = _call(enclave, method, path.format(p="matrix-a"), bad, body).status_code
                if got != 401:
                    failures.append(f"token {bad!r} {method} {path}: {got}, expected 401")
    assert not failures, "\n".join(failures)
    # The dashboard through the hub's proxy: the board only; a browser without a session
    # is sent to the hub's OAuth.
    board = f"{enclave.hub_url}/services/bulle/board/"
    for role, want in (("researcher", no), ("board", ok), ("operator", ok)):
        r = httpx.get(board, headers={"Authorization": f"Bearer {tokens[role]}"}, timeout=60)
        assert r.status_code == want, (role, r.status_code)
    r = httpx.get(board, timeout=60)
    assert r.status_code == 302 and "/hub/api/oauth2/authorize" in r.headers["location"]
    # The catalogue page: whoever may read the catalogue (every role here).
    page = f"{enclave.hub_url}/services/bulle/catalog/"
    for role, token in tokens.items():
        r = httpx.get(page, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        assert r.status_code == ok and "id='table-ips_colleges'" in r.text, role
    # The notebook server's token carries the user's Bulle scopes (server_token_scopes).
    scopes = httpx.get(f"{enclave.hub_url}/hub/api/user", timeout=30, headers={
        "Authorization": f"token {tokens['researcher']}"}).json()["scopes"]
    assert "custom:bulle:query" in scopes and "custom:bulle:approve" not in scopes


def test_each_role_lands_on_its_own_page_and_only_researchers_get_a_server(
        enclave: Enclave) -> None:
    """Issue 14: after login the board lands on the Bulle home, the operator on their node's
    page, observers on the standing indicators, admins on the hub's admin page, researchers
    on their notebook server; nobody else gets a server started."""
    expected = {"demo-board": "/services/bulle/", "demo-operator": "/services/bulle/operator/",
                "demo-observer": "/services/bulle/indicators/",
                "demo-admin": "/hub/admin", "demo-researcher": "/user/demo-researcher/"}
    admin = enclave.session("demo-admin")
    for user, page in expected.items():
        s = HubSession(enclave.hub_url, user, enclave.passwords[user])
        try:
            assert s.landing.split("?")[0] in (page, "/hub/spawn"), (user, s.landing)
            if user != "demo-researcher":
                r = s.http.get(s.landing)
                assert r.status_code in (200, 302), (user, r.status_code)
                assert not r.headers.get("location", "").startswith("/hub/spawn")
            if user == "demo-operator":  # on to their own node (the demo's [operators])
                r = s.http.get(s.landing, follow_redirects=True)
                assert r.status_code == 200 and str(r.url).endswith("/operator/vendor-a")
        finally:
            s.close()
    for user in ("demo-board", "demo-operator", "demo-observer", "demo-admin"):
        servers = admin.api("GET", f"/users/{user}").json().get("servers", {})
        assert servers == {}, (user, servers)
    # Asked for directly, an observer's server is refused too (enclave/_hub.refuse_server).
    r = httpx.post(f"{enclave.hub_url}/hub/api/users/demo-observer/server", timeout=60,
                   headers={"Authorization": f"token {enclave.token('demo-observer')}"})
    assert r.status_code == 403 and "no notebook server" in r.text, (r.status_code, r.text)
    servers = admin.api("GET", "/users/demo-observer").json().get("servers", {})
    assert servers == {}, servers
    # The standing indicators' page: observers and the board, never a researcher (issue 17);
    # the demo ships one indicator, approved at setup.
    page = f"{enclave.hub_url}/services/bulle/indicators/"
    for user, want in (("demo-observer", 200), ("demo-board", 200), ("demo-researcher", 403)):
        r = httpx.get(page, timeout=60,
                      headers={"Authorization": f"Bearer {enclave.token(user)}"})
        assert r.status_code == want, (user, r.status_code)
        assert want != 200 or "indicator-college-6e-35" in r.text, user


def test_expired_revoked_and_narrowed_tokens(enclave: Enclave) -> None:
    s = enclave.session("demo-researcher")
    expiring, _ = s.token(expires_in=1)
    wait_for(lambda: _call(enclave, "GET", "/v1/catalog", expiring).status_code == 401, 30)
    token, token_id = s.token()
    assert _call(enclave, "GET", "/v1/catalog", token).status_code == 200
    s.revoke(token_id)
    # the coordinator trusts an identity for cache_s = 5 s in the demo: refused after that
    wait_for(lambda: _call(enclave, "GET", "/v1/catalog", token).status_code == 401, 30)
    # A token narrowed to less than the user holds: known, but not allowed.
    narrow, _ = s.token(scopes=["read:users:name!user"])
    r = _call(enclave, "GET", "/v1/catalog", narrow)
    assert r.status_code == 403 and "custom:bulle:query" in r.json()["error"]["message"]
    # Asking the hub for more than the user holds is refused there (TRAPS.md).
    r = s.api("POST", "/users/demo-researcher/tokens", json={"scopes": ["custom:bulle:approve"]})
    assert r.status_code == 400


def test_project_lifecycle_isolation_and_board_cli(enclave: Enclave) -> None:
    other = connect(enclave.url, enclave.token("other-researcher"))
    me = connect(enclave.url, enclave.token("demo-researcher"))
    board_env = {"BULLE_URL": enclave.url, "BULLE_TOKEN": enclave.token("demo-board")}
    other.submit_project("other-study", "Assessment delays", "Compare submission delays "
                         "between modules; research only.", ["student_assessment"], 2.0,
                         duration_days=30)
    assert "other-study" not in set(me.projects()["name"])
    assert set(other.projects()["name"]) == {"other-study"}
    with pytest.raises(BulleError) as err:  # pending: no access yet
        other.sql("SELECT COUNT(*) AS n FROM ips_colleges", project="other-study")
    assert err.value.code == "forbidden"
    # Without a grant, a sensitive table is listed (so it can be requested) without details.
    cat = _call(enclave, "GET", "/v1/catalog", enclave.token("other-researcher")).json()
    hidden = next(t for t in cat["tables"] if t["name"] == "student_assessment")
    assert hidden["columns"] == [] and hidden["granted"] is False
    listed = bulle("board", "list", "--status", "pending", state=enclave.state, env=board_env)
    assert listed.returncode == 0 and "other-study" in listed.stdout, listed.stderr
    approved = bulle("board", "approve", "other-study", "--epsilon", "1.5", "--reason",
                     "amended: ε lowered", state=enclave.state, env=board_env)
    assert approved.returncode == 0 and "other-study: approved (ε 1.5" in approved.stdout, \
        approved.stderr
    events = [e["action"] for e in _call(enclave, "GET", "/v1/projects/other-study",
                                         board_env["BULLE_TOKEN"]).json()["events"]]
    assert events == ["submitted", "amended"]
    # The grant the board service signed is accepted by the vendor nodes (they verify it).
    df = other.sql("SELECT COUNT(*) AS n FROM student_assessment", project="other-study",
                   epsilon=0.25)
    assert df.bulle.epsilon_spent > 0 and df.bulle.nodes == ["vendor-a", "vendor-b"]
    assert other.budget("other-study")["epsilon"] == 1.5
    qid = df.attrs["bulle"]["query_id"]
    # Isolation: demo-researcher sees neither the project, its results, nor the audit log.
    token = enclave.token("demo-researcher")
    for method, path in (("GET", "/v1/projects/other-study"),
                         ("GET", "/v1/budget?project=other-study"), ("GET", "/v1/audit")):
        assert _call(enclave, method, path, token).status_code == 403, path
    assert _call(enclave, "GET", f"/v1/queries/{qid}", token).status_code == 404
    with pytest.raises(BulleError) as err:
        me.sql("SELECT COUNT(*) AS n FROM student_assessment", project="other-study")
    assert err.value.code == "forbidden"
    # The catalogue hides the columns of sensitive tables no grant of yours covers.
    cat = _call(enclave, "GET", "/v1/catalog", enclave.token("other-researcher")).json()
    assert next(t for t in cat["tables"] if t["name"] == "student_assessment")["columns"]
    # Refusal needs a reason; the export carries decisions and releases.
    other.submit_project("other-refused", "Names", "wants pupil names", ["student_info"], 5.0)
    refused = bulle("board", "refuse", "other-refused", "--reason", "direct identifiers",
                    state=enclave.state, env=board_env)
    assert refused.returncode == 0 and "direct identifiers" in refused.stdout
    csv_out = bulle("board", "export", "--format", "csv", "--table", "releases",
                    state=enclave.state, env=board_env)
    assert csv_out.stdout.startswith("seq,time,project") and "other-study" in csv_out.stdout
    # Expiry ends access on its date.
    other.submit_project("other-short", "Short", "expires fast", ["student_assessment"], 1.0)
    assert bulle("board", "approve", "other-short", "--days", "0.00005", state=enclave.state,
                 env=board_env).returncode == 0
    wait_for(lambda: other.projects().set_index("name").loc["other-short", "status"]
             == "expired", 60)
    with pytest.raises(BulleError) as err:
        other.sql("SELECT COUNT(*) AS n FROM ips_colleges", project="other-short")
    assert err.value.code == "forbidden"


def test_example_notebooks_run_headless(enclave: Enclave) -> None:
    import nbformat
    from nbclient import NotebookClient

    # As in a hub notebook: the coordinator's URL and the user's hub token, nothing else.
    env = {"BULLE_URL": enclave.url, "JUPYTERHUB_API_TOKEN": enclave.token("demo-researcher")}
    saved = {k: os.environ.get(k) for k in ("BULLE_URL", "BULLE_TOKEN", "JUPYTERHUB_API_TOKEN")}
    os.environ.pop("BULLE_TOKEN", None)
    os.environ.update(env)
    expected = {"01_descriptive_statistics.ipynb": ["ips_bucket", "mean_pass_rate",
                                                    "mean_final_grade", "lycee_students",
                                                    # the join with the reference copy ran
                                                    # at the regional node alone
                                                    "pupils_6e", "['region-35']"],
                "02_success_rates.ipynb": ["success_rate", "ci_low", "ci_high", "half_width"],
                "03_privacy_budget.ipynb": ["noise_sd", "epsilon_remaining", "budget_exhausted"]}
    out_dir = ARTIFACTS / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        for name, words in expected.items():
            nb = nbformat.read(REPO / "enclave" / "examples" / name, as_version=4)
            NotebookClient(nb, timeout=180, kernel_name="python3").execute()
            nbformat.write(nb, out_dir / name)
            outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
            assert not [o for o in outputs if o.output_type == "error"], name
            text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                             for o in outputs)
            for w in words:
                assert w in text, (name, w)
            if name.startswith("02"):
                assert sum("image/png" in o.get("data", {}) for o in outputs) == 2
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


_PROBE = """
import json, os, pwd, socket
def opened(path, folder):
    try:
        os.listdir(path) if folder else open(path, "rb").close()
        return "ok"
    except Exception as e:
        return type(e).__name__
def connect(path):
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
        return "ok"
    except Exception as e:
        return type(e).__name__
files, folders, public, broker = json.loads({args!r})
print(json.dumps({{"uid": os.getuid(), "user": pwd.getpwuid(os.getuid()).pw_name,
                  "groups": os.getgroups(), "home": os.environ["HOME"],
                  "opened": {{**{{p: opened(p, False) for p in files}},
                             **{{p: opened(p, True) for p in folders}}}},
                  "public": opened(public, False), "broker": connect(broker)}}))
"""


def test_processes_run_as_least_privileged_users_and_notebooks_read_no_secret(
        enclave: Enclave) -> None:
    """Issue 12: nodes as bulle-node, coordinator, SuperLink and proxy as bulle-coord, each
    notebook as its person's own system user; from a kernel, every file of the demo's state
    (node data copies, node state and ledgers, the coordinator's ledger, every key, token and
    log) and the open-data source refuse to open, with a permission error."""
    if os.geteuid() != 0:
        pytest.skip("not root: the demo runs every process as one user (and says so)")
    state = enclave.state
    pids = json.loads((state / "pids.json").read_text())
    node, coord = pwd.getpwnam("bulle-node"), pwd.getpwnam("bulle-coord")
    assert {_uid(pids[n]) for n in NODES} == {node.pw_uid}
    assert _uid(pids["coordinator"]) == _uid(pids["superlink"]) == coord.pw_uid
    assert _uid(int((state / "hub" / "proxy.pid").read_text())) == coord.pw_uid
    assert _uid(pids["hub"]) == coord.pw_uid  # the hub is not root ...
    assert _uid(pids["spawnbroker"]) == 0  # ... the broker is, and answers only the hub
    assert "as bulle-node" in enclave.info["processes"]
    sock = state / "spawner" / "spawn.sock"
    assert sock.stat().st_uid == coord.pw_uid and sock.stat().st_mode & 0o777 == 0o600

    user = "other-researcher"
    token = enclave.token(user)
    start_server(enclave.hub_url, user, token)
    person = pwd.getpwnam(f"jupyter-{user}")  # created at this first start
    servers = [p for p in _descendants(pids["spawnbroker"]) if _alive(p) and "jupyterhub-singleuser"
               in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
    assert servers and {_uid(p) for p in servers} == {person.pw_uid}

    def public(p: Path) -> bool:
        return p.name.endswith((".pub", ".pub.pem")) or (p.parent.name == "certs"
                                                         and p.suffix == ".pem")
    files = sorted(str(p) for p in state.rglob("*") if p.is_file() and not public(p))
    for must in ("board/board_ed25519.pem", "certs/bulle-coordinator.key",
                 "certs/bulle-superlink.key", "certs/ca.key", "certs/vendor-a.key",
                 "flower/vendor-a.key", "coordinator/ledger.sqlite",
                 "coordinator/hub-service.token", "nodes/vendor-a/ledger.sqlite",
                 "nodes/vendor-a/audit.sqlite", "node-data/oulad/studentInfo.csv",
                 "node-data/uci-student-performance/student-por.csv", "superlink/control.token",
                 "hub/users.json", "hub/jupyterhub_cookie_secret", "researcher.token"):
        assert str(state / must) in files, must
    files += [str(DATA / "uci-student-performance" / "student-por.csv"),
              str(DATA / "oulad" / "studentInfo.csv"),
              *(f"/proc/{pid}/environ" for pid in pids.values())]
    folders = [str(state / d) for d in ("", "nodes", "node-data", "coordinator", "superlink",
                                        "hub", "logs")] + [str(DATA)]
    args = json.dumps([files, folders, str(state / "certs" / "ca.pem"), str(sock)])
    out = json.loads(run_in_kernel(enclave.hub_url, user, token,
                                   _PROBE.format(args=args)).strip().splitlines()[-1])
    assert out["uid"] == person.pw_uid != 0 and out["user"] == f"jupyter-{user}"
    assert out["home"] == person.pw_dir
    assert not set(out["groups"]) & {0, node.pw_gid, coord.pw_gid}
    assert out["public"] == "ok"  # the probe itself opens what it may
    assert out["broker"] == "PermissionError"  # no kernel asks the broker for anything
    readable = {p: r for p, r in out["opened"].items() if r != "PermissionError"}
    assert not readable, readable
    assert len(out["opened"]) == len(files) + len(folders)


def _browser(p: Any) -> Any:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} missing: apt-get install -y chromium (.ci/run does)")
    return p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def _login(page: Any, user: str, password: str) -> None:
    page.fill("#username_input", user)
    page.fill("#password_input", password)
    page.click("#login_submit")


def _spent(page: Any, label: str) -> float | None:
    bar = page.query_selector(f"#plot-projects rect.spent[data-label='{label}']")
    return float(bar.get_attribute("data-spent")) if bar else None


def test_board_approves_in_the_dashboard_and_sees_the_spend(enclave: Enclave) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = _browser(p)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(f"{enclave.hub_url}/services/bulle/board/")
            assert "/hub/login" in page.url  # the hub logs the board member in (OAuth)
            _login(page, "demo-board", enclave.passwords["demo-board"])
            page.wait_for_selector("#pending .card[data-project='dropout-signals']")
            assert page.inner_text("#who") == "demo-board"
            assert page.query_selector("#chain-ok") is not None
            for node in NODES:  # each node verified its own chain over gRPC
                assert "✔ intact" in page.inner_text(f"#node-chain-{node}"), node
            assert _spent(page, "dropout-signals") is None  # no grant, no bar
            page.screenshot(path=str(ARTIFACTS / "board-1-pending.png"), full_page=True)
            page.click("#approve-dropout-signals")
            page.wait_for_selector("#msg")
            assert page.inner_text("#msg") == "dropout-signals: approved"
            assert _spent(page, "dropout-signals") == 0.0
            # The researcher uses the new grant; the board sees the spend on reload.
            hub = connect(enclave.url, enclave.token("demo-researcher"))
            hub.sql("SELECT COUNT(*) AS n FROM student_assessment", project="dropout-signals",
                    epsilon=0.5)
            page.goto(f"{enclave.hub_url}/services/bulle/board/")
            spent = _spent(page, "dropout-signals")
            assert spent is not None and spent > 0.5
            assert page.query_selector(
                "#plot-datasets rect.spent[data-label='dropout-signals · student_assessment']")
            assert page.query_selector("#plot-timeline polyline") is not None
            page.screenshot(path=str(ARTIFACTS / "board-2-after-query.png"), full_page=True)
            r = page.request.get(f"{enclave.hub_url}/services/bulle/board/export?format=csv"
                                 "&table=budgets")
            assert r.ok and "dropout-signals,approved,3.0," in r.text()
        finally:
            browser.close()


def test_researcher_browses_and_searches_the_catalogue_page(enclave: Enclave) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    from federation._catalog import search_table

    ARTIFACTS.mkdir(exist_ok=True)
    page_url = f"{enclave.hub_url}/services/bulle/catalog/"
    # No session: to the hub's OAuth, remembering to come back here (with the search).
    r = httpx.get(page_url, params={"q": "IPS"}, timeout=60)
    assert r.status_code == 302 and "/hub/api/oauth2/authorize" in r.headers["location"]
    assert any(c.startswith('bulle-oauth-return="catalog/?q=IPS"')
               for c in r.headers.get_list("set-cookie"))
    r = httpx.get(f"{enclave.hub_url}/services/bulle/board/audit", params={"node": "vendor-a"},
                  timeout=60)  # a node's chain: back to that node's page after the login
    assert r.status_code == 302 and any(c.startswith('bulle-oauth-return="board/audit?node='
                                                     'vendor-a"')
                                        for c in r.headers.get_list("set-cookie"))
    # A token without the catalogue's scopes: 403.
    narrow, _ = enclave.session("demo-researcher").token(scopes=["read:users:name!user"])
    r = httpx.get(page_url, headers={"Authorization": f"Bearer {narrow}"}, timeout=60)
    assert r.status_code == 403 and "not part of your role" in r.text
    assert "custom:bulle" not in r.text  # a styled page, in words, naming no scope
    user = "demo-researcher"
    tables = _call(enclave, "GET", "/v1/catalog", enclave.token(user)).json()["tables"]

    def shown(page: Any) -> set[str]:
        return {s.get_attribute("data-table") for s in page.query_selector_all("section.table")}

    with sync_api.sync_playwright() as p:
        browser = _browser(p)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(f"{page_url}?q=IPS")
            assert "/hub/login" in page.url
            _login(page, user, enclave.passwords[user])
            page.wait_for_selector("#table-ips_colleges")
            assert page.url == f"{page_url}?q=IPS"  # back where the researcher started
            assert page.inner_text("#who") == user
            want = {t["name"] for t in tables if search_table(t, "IPS") is not None}
            assert shown(page) == want and "lycee_students" not in want
            page.screenshot(path=str(ARTIFACTS / "catalogue-1-search-ips.png"), full_page=True)
            page.fill("input[name=q]", "college")  # accents ignored: "collège", "colleges"
            page.click("#search button")
            page.wait_for_url(re.compile(r".*/catalog/\?q=college$"))
            want = {t["name"] for t in tables if search_table(t, "COLLÈGE") is not None}
            assert shown(page) == want and {"ips_colleges", "dnb_colleges"} <= want
            assert "ips_ecoles" not in want and "lycee_students" not in want
            assert page.inner_text("#count").startswith(f"{len(want)} of {len(tables)} tables")
            page.goto(page_url)
            assert page.inner_text("#count") == f"{len(tables)} tables"
            assert page.inner_text("#nodes tr[data-node='depp'] td.ok") == "up"
            lycee = page.inner_text("#table-lycee_students")
            assert "restricted" in page.inner_text("#table-lycee_students .tier")
            assert "region-gp" in lycee and "region-ms" in lycee
            assert "final grade (0-20)" in page.inner_text(
                "#table-lycee_students tr[data-column='g3']")
            ips = "#table-ips_colleges tr[data-column='{}']"
            assert "social-position index (higher = more favoured)" in page.inner_text(
                ips.format("ips"))
            uai = page.inner_text(ips.format("uai"))
            assert "⇄ school" in uai and "dnb_colleges" in uai
            copies = next(t for t in tables if t["name"] == "ips_colleges").get("copies")
            if copies:  # a shared reference table: where it can be joined
                ref = page.inner_text("#table-ips_colleges .ref")
                assert "join it at any of these nodes" in ref and all(n in ref for n in copies)
            # Sensitive: details only once a grant of hers covers it (as GET /v1/catalog).
            granted = next(t for t in tables if t["name"] == "student_assessment")["columns"]
            details = page.inner_text("#table-student_assessment")
            assert ("details need a grant in a project" in details) is not bool(granted)
            page.screenshot(path=str(ARTIFACTS / "catalogue-2-all.png"), full_page=True)
        finally:
            browser.close()


def test_observer_logs_in_and_lands_on_the_standing_indicators(enclave: Enclave) -> None:
    """Issue 17: an observer (State, local authority) logs in at the hub and lands, through
    the hub's OAuth, on the indicators page; the demo's indicator has been refreshed."""
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = _browser(p)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(f"{enclave.hub_url}/hub/login")
            _login(page, "demo-observer", enclave.passwords["demo-observer"])
            page.wait_for_selector("#indicator-college-6e-35")
            assert page.url == f"{enclave.hub_url}/services/bulle/indicators/"
            assert page.inner_text("#who") == "demo-observer"
            page.click("#indicator-college-6e-35 h2 a")
            page.wait_for_selector("#history-chart svg")
            wait_for(lambda: page.reload() and page.query_selector(
                "#refreshes tr.refresh[data-status=released]") is not None, 60)
            assert page.query_selector_all("#chart g.series circle.point")
            page.screenshot(path=str(ARTIFACTS / "indicators-observer.png"), full_page=True)
        finally:
            browser.close()


def test_researcher_starts_a_server_and_queries_from_a_notebook(enclave: Enclave) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(exist_ok=True)
    user = "demo-researcher"
    code = ("from enclave import connect\nhub = connect()\n"
            "hub.sql('SELECT school, COUNT(*) AS pupils, AVG(g3) AS mean_g3 "
            "FROM lycee_students GROUP BY school ORDER BY school')")
    nb = {"cells": [{"cell_type": "code", "execution_count": None, "id": "query",
                     "metadata": {}, "outputs": [], "source": code}],
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                      "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    with sync_api.sync_playwright() as p:
        browser = _browser(p)
        try:
            ctx = browser.new_context(viewport={"width": 1280, "height": 800})
            page = ctx.new_page()
            started = time.monotonic()
            page.goto(f"{enclave.hub_url}/hub/login")
            _login(page, user, enclave.passwords[user])
            page.wait_for_url(re.compile(f".*/user/{user}/lab.*"), timeout=120_000)
            page.wait_for_selector("#jp-main-dock-panel", timeout=120_000)
            # The launcher's "Bulle" card (jupyter-app-launcher) opens the Bulle home in a
            # new tab, signed in through the hub. A new launcher first: the workspace may
            # have restored an earlier session's documents instead of the launcher.
            page.locator("#jp-main-dock-panel .lm-TabBar-addButton").first.click()
            card = page.locator(".jp-LauncherCard[data-category='Bulle']").filter(visible=True)
            card.first.wait_for(timeout=60_000)
            assert card.first.inner_text().strip() == "Bulle"
            with ctx.expect_page() as opened:
                card.first.click()
            bulle = opened.value
            bulle.wait_for_selector("#who", timeout=60_000)
            assert bulle.url == f"{enclave.hub_url}/services/bulle/"
            assert bulle.inner_text("#who") == "demo-researcher"
            bulle.close()
            xsrf = next(c["value"] for c in ctx.cookies() if c["name"] == "_xsrf")
            r = page.request.put(f"{enclave.hub_url}/user/{user}/api/contents/query.ipynb",
                                 headers={"X-XSRFToken": xsrf},
                                 data=json.dumps({"type": "notebook", "content": nb}))
            assert r.ok, r.status
            page.goto(f"{enclave.hub_url}/user/{user}/lab/tree/query.ipynb")
            page.wait_for_selector(".jp-Notebook .jp-Cell .cm-content", timeout=60_000)
            page.wait_for_selector("text=Python 3 (ipykernel) | Idle", timeout=90_000)
            try:
                for attempt in range(3):  # a key press while the kernel connects may be lost
                    page.click(".jp-Notebook .jp-Cell .cm-content >> nth=0")
                    page.keyboard.press("Shift+Enter")
                    try:
                        page.wait_for_selector(".jp-OutputArea-output table", timeout=30_000)
                        break
                    except sync_api.TimeoutError:
                        if attempt == 2:
                            raise
            finally:
                page.screenshot(path=str(ARTIFACTS / "researcher-notebook.png"))
            elapsed = time.monotonic() - started
            text = page.inner_text(".jp-OutputArea-output")
            assert "GP" in text and "MS" in text and "mean_g3" in text
            print(f"login → server → notebook query: {elapsed:.1f} s "
                  f"(demo up took {enclave.info['up_s']} s)")
            # The examples were copied into the new home (as root: the person's own).
            home = (Path(pwd.getpwnam(f"jupyter-{user}").pw_dir) if os.geteuid() == 0
                    else enclave.state / "hub" / "home" / user)
            assert (home / "examples" / "03_privacy_budget.ipynb").exists()
        finally:
            browser.close()


# -- issue 14: each role's pages in a browser, at desktop width and at 375 px ----------------
WIDTHS = (1200, 375)


def _luminance(rgb: str) -> float:
    def channel(v: int) -> float:
        c = v / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (int(v) for v in re.findall(r"\d+", rgb)[:3])
    return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)


def _contrast(page: Any, selector: str) -> float:
    fg, bg = page.eval_on_selector(selector, "e => [getComputedStyle(e).color, "
                                             "getComputedStyle(e).backgroundColor]")
    hi, lo = sorted((_luminance(fg), _luminance(bg)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def _fits(page: Any, width: int) -> None:
    """Nothing wider than the window: no sideways scrolling of the whole page."""
    assert page.evaluate("document.documentElement.scrollWidth") <= width, page.url
    assert page.query_selector('meta[name="viewport"]') is not None, page.url


def _wait(page: Any, selector: str, log: Path | None = None) -> None:
    """Wait for ``selector``; if it never comes, say where the page was, what it said and
    the end of the server's log."""
    try:
        page.wait_for_selector(selector)
    except Exception as e:
        tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
        raise AssertionError(f"{selector} not on {page.url}: "
                             f"{page.inner_text('body')[:2000]}\n{tail}") from e


def _sign_in_at(browser: Any, enclave: Enclave, user: str, url: str, width: int) -> Any:
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.goto(url)
    assert "/hub/login" in page.url
    _login(page, user, enclave.passwords[user])
    page.wait_for_selector("#who")
    assert page.inner_text("#who") == user
    return page


def test_each_role_has_its_home_board_and_node_pages(enclave: Enclave) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(exist_ok=True)
    home = f"{enclave.hub_url}/services/bulle/"
    hub = connect(enclave.url, enclave.token("demo-researcher"))
    job = hub.train("logreg", "student_assessment", ["is_banked"], "score >= 70",
                    rounds=1, epsilon=1.0, project="demo")
    job.result()
    refused_sql = "SELECT score FROM student_assessment WHERE score > 90"
    with pytest.raises(BulleError):
        hub.sql(refused_sql, project="demo")
    spent = float(hub.budget(project="demo")["epsilon_spent"])
    with sync_api.sync_playwright() as p:
        browser = _browser(p)
        try:
            for width in WIDTHS:
                _researcher_home(browser, enclave, home, width, spent)
                _board_pages(browser, enclave, home, width, spent, refused_sql)
                _operator_pages(browser, enclave, home, width)
        finally:
            browser.close()


def _researcher_home(browser: Any, enclave: Enclave, home: str, width: int,
                     spent: float) -> None:
    page = _sign_in_at(browser, enclave, "demo-researcher", home, width)
    for link in ("catalog", "lab", "examples", "projects", "guide"):
        assert page.query_selector(f"#link-{link} a"), link
    assert page.query_selector("#link-board") is None
    figure = page.get_attribute("#projects tr[data-project='demo'] td.spent", "data-value")
    assert float(figure) == pytest.approx(spent, abs=1e-6)
    _fits(page, width)
    page.screenshot(path=str(ARTIFACTS / f"home-researcher-{width}.png"), full_page=True)
    page.click("#link-catalog a")
    page.wait_for_selector("#table-lycee_students")
    assert _contrast(page, "#table-lycee_students .tier") >= 4.5  # WCAG AA (was 3.19)
    _fits(page, width)
    page.close()


def _board_pages(browser: Any, enclave: Enclave, home: str, width: int, spent: float,
                 refused_sql: str) -> None:
    page = _sign_in_at(browser, enclave, "demo-board", home, width)
    assert page.query_selector("#link-board a") and page.query_selector("#link-operator a")
    page.click("#link-board a")
    page.wait_for_selector("#activity")
    _fits(page, width)
    text = page.inner_text("#activity")
    assert "logreg on student_assessment" in text and "training round" in text
    assert "final model" in text and refused_sql in text
    refused = page.query_selector_all("#activity tr[data-decision='refused']")
    assert any(refused_sql in r.inner_text() for r in refused)
    legend = page.get_attribute("#legend-figures tr[data-project='demo'] td.spent",
                                "data-value")
    assert float(legend) == pytest.approx(spent, abs=1e-6)  # the same as hub.budget()
    r = page.request.get(f"{home}board/export?format=csv&table=budgets")
    demo = next(row for row in csv.DictReader(io.StringIO(r.text())) if row["name"] == "demo")
    assert float(demo["epsilon_spent"]) == float(legend)  # the export says the same
    page.screenshot(path=str(ARTIFACTS / f"board-{width}.png"), full_page=True)
    _chart_fits(page, "#plot-projects", width)
    _chart_fits(page, "#plot-timeline", width)
    page.select_option("#filter-decision", "refused")
    page.click("#filter-apply")
    page.wait_for_url(re.compile(r".*decision=refused.*"))
    assert all(row.get_attribute("data-decision") == "refused"
               for row in page.query_selector_all("#activity tr.row"))
    page.click("#browse-audit")
    page.wait_for_selector("#entries tr[data-seq]")
    assert "charged" in page.inner_text("#entries")
    _fits(page, width)
    page.goto(f"{home}indicators/")  # the standing indicators' chart scales the same way
    page.wait_for_selector("svg.chart")
    _chart_fits(page, "svg.chart", width)
    page.goto(f"{home}board/audit")
    page.wait_for_selector("#logout")
    page.click("#logout")
    page.wait_for_load_state()
    page.goto(f"{home}board/")
    assert "/hub/login" in page.url  # logged out: not signed straight back in
    page.close()


def _chart_fits(page: Any, selector: str, width: int) -> None:
    """An SVG chart scales with the page (viewBox, width 100%): at 375 px it spans nearly
    the whole window instead of being cut or scrolled."""
    box = page.locator(selector).first.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width, selector
    if width < 700:  # narrower than the chart's own width: it fills its column (the
        # page's margins and an indicator card's padding aside)
        assert box["width"] >= 0.75 * width, (selector, box)


def _operator_pages(browser: Any, enclave: Enclave, home: str, width: int) -> None:
    page = _sign_in_at(browser, enclave, "demo-operator", home, width)
    page.click("#link-operator a")  # straight to their own node (the demo's [operators])
    _wait(page, "#datasets tr[data-table='student_assessment']",
          enclave.state / "logs" / "coordinator.log")
    assert page.url.endswith("/operator/vendor-a")
    assert page.inner_text("#node-status") == "up"
    assert "✔ intact" in page.inner_text("#node-chain")
    assert "logreg on student_assessment" in page.inner_text("#plans")
    assert page.query_selector("#decide") is None and page.query_selector("form.decide") is None
    _fits(page, width)
    page.screenshot(path=str(ARTIFACTS / f"operator-{width}.png"), full_page=True)
    page.click("#browse-node-audit")  # the node's own entries, verified by the coordinator
    page.wait_for_selector("#entries tr[data-seq]")
    assert "train_released" in page.inner_text("#entries")
    assert page.query_selector("#node-audit-error") is None
    _fits(page, width)
    r = page.request.get(f"{home}operator/vendor-b")
    assert r.status == 403  # another node's page
    page.close()


def test_the_hub_home_links_to_the_bulle_home(enclave: Enclave) -> None:
    s = enclave.session("demo-admin")
    r = s.http.get("/hub/home")
    assert r.status_code == 200
    assert 'id="bulle-home"' in r.text and 'href="/services/bulle/"' in r.text
    assert 'id="bulle-home-nav"' in r.text
