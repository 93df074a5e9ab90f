"""Build the deploy/images and run them: a real federated query end to end (issue 15)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests._net import free_port

ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = "bulle-base:bookworm"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")


def build_base_image(docker, name: str = BASE_IMAGE) -> float:
    """Debian bookworm minbase with python3 and the host's CA certificates (TRAPS.md).

    No registry is reachable here: debootstrap makes the root fs, ``docker import`` the
    image. Cached by name. Returns the seconds it took (0 when cached).
    """
    if docker.has_image(name):
        return 0.0
    t0 = time.monotonic()
    rootfs = Path(tempfile.mkdtemp(prefix="bulle-rootfs-"))
    try:
        subprocess.run(["debootstrap", "--variant=minbase",
                        "--include=python3,python3-venv,ca-certificates",
                        "bookworm", str(rootfs)], check=True, capture_output=True, timeout=900)
        # HTTPS to the registries goes through a re-signing proxy: trust what the host trusts.
        dest = rootfs / "usr/local/share/ca-certificates"
        dest.mkdir(parents=True, exist_ok=True)
        if HOST_CA_DIR.is_dir():
            for crt in HOST_CA_DIR.rglob("*.crt"):
                shutil.copy(crt, dest / crt.name)
        subprocess.run(["chroot", str(rootfs), "update-ca-certificates"], check=True,
                       capture_output=True, timeout=120)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for f in (rootfs / junk).glob("*"):
                if f.is_file():
                    f.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        docker.run("import", "-", name, stdin=tar.stdout, timeout=600)
        tar.wait(timeout=60)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    return time.monotonic() - t0


IMAGES = {  # tag: Dockerfile, build arguments
    "bulle-node-sql:test": ("node-sql.Dockerfile", {}),
    # the slim node without OpenDP (the `dp` extra), for open and restricted tables only;
    # built right after the DP one, whose first layers it reuses from the build cache
    "bulle-node-sql-nodp:test": ("node-sql.Dockerfile", {"DP": "0"}),
    "bulle-node:test": ("node.Dockerfile", {}),
    "bulle-coordinator:test": ("coordinator.Dockerfile", {}),
    "bulle-notebook:test": ("notebook.Dockerfile", {}),
}
NODP = "bulle-node-sql-nodp:test"
NODP_LIMIT_MB = 400  # issue 15: the SQL node image without OpenDP
TORCH = "torch==2.13.0"
LABEL = "org.bulle.test=images"  # on what the builds make, so that cleaning finds it all
WHEELS = Path(os.environ.get("BULLE_WHEEL_CACHE", Path.home() / ".cache" / "bulle-wheels"))


def torch_wheel_dir() -> Path:
    """A folder holding the CPU torch wheel, fetched by the host's pip (its config knows where
    the CPU wheel lies: a local folder or the CPU index), cached between runs."""
    if not list(WHEELS.glob("torch-2.13.0*.whl")):
        WHEELS.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary=:all:", TORCH, "-d", str(WHEELS)], check=True,
                       timeout=900)
    return WHEELS


class WheelServer:
    """``python -m http.server`` over the wheel folder: the builds' TORCH_FIND_LINKS."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1",
             "--directory", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def build_image(docker, tag: str, dockerfile: str, wheels_url: str | None,
                base: str = BASE_IMAGE, build_args: dict[str, str] | None = None) -> float:
    """``docker build`` one image of deploy/images from the base image; seconds taken."""
    args = ["build", "-f", str(ROOT / "deploy" / "images" / dockerfile), "-t", tag,
            "--network=host", "--build-arg", f"BASE_IMAGE={base}", "--label", LABEL]
    for name, value in (build_args or {}).items():
        args += ["--build-arg", f"{name}={value}"]
    if wheels_url:
        # the CPU wheel from the host; torch's own dependencies from PyPI
        args += ["--build-arg", f"TORCH_FIND_LINKS={wheels_url}",
                 "--build-arg", "TORCH_INDEX=https://pypi.org/simple"]
    t0 = time.monotonic()
    docker.run(*args, str(ROOT), timeout=1800)
    return time.monotonic() - t0


def image_size_mb(docker, tag: str) -> float:
    out = docker.run("image", "inspect", tag, "--format", "{{.Size}}").stdout
    return int(out.strip()) / 1e6


# ------------------------------------------------------------------ the run, end to end

DATA = Path(os.environ.get("BULLE_DATA") or ROOT.parent / "shared" / "data")
TOKEN = "image-test-token-researcher-0123456789"
UID = 10001  # the images' user (the manifests' runAsUser)
# deploy/k8s/manifests (coordinator.yaml securityContext *restricted*, deploy/node/compose.yaml):
# non-root, read-only root fs, no capabilities, no privilege escalation, a tmpfs /tmp.
LOCKED_DOWN = ["--user", f"{UID}:{UID}", "--read-only", "--cap-drop", "ALL",
               "--security-opt", "no-new-privileges:true", "--tmpfs", "/tmp",
               "--network", "host"]


@pytest.fixture(scope="module")
def docker():
    from tests._docker import Daemon, DockerUnavailable
    try:
        daemon = Daemon()
    except DockerUnavailable as e:
        pytest.skip(f"no docker here: {e}")  # a failure under BULLE_REQUIRE_ALL=1 (CI)
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def images(docker) -> Iterator[dict[str, float]]:
    """Every image of deploy/images built from the debootstrap base; seconds per build.
    Removed with the build cache at the end of the module."""
    took = {BASE_IMAGE: build_base_image(docker)}
    try:
        server = WheelServer(torch_wheel_dir())
        try:
            for tag, (dockerfile, build_args) in IMAGES.items():
                took[tag] = build_image(docker, tag, dockerfile, server.url,
                                        build_args=build_args)
        finally:
            server.stop()
        for tag, seconds in took.items():
            size = image_size_mb(docker, tag)
            print(f"\n{tag}: {size:.0f} MB, built in {seconds:.0f} s")
        yield took
    finally:
        if os.environ.get("BULLE_KEEP_IMAGES", "0") in ("", "0"):  # =0 prunes too
            remove_images(docker)


def remove_images(docker) -> None:
    """The images and build cache a run made (~7 GB), so that runs do not fill the disk;
    the base image (169 MB, slow to make) stays, cached by name. BULLE_KEEP_IMAGES=1 keeps
    everything (iterating on one Dockerfile)."""
    docker.run("rmi", "-f", *IMAGES, check=False)
    docker.run("image", "prune", "-af", "--filter", f"label={LABEL}", check=False)
    docker.run("builder", "prune", "-af", check=False, timeout=600)


# A sensitive table at the slim node: DP releases through OpenDP's stripped library, charged
# with the closed-form events (no dp-accounting in that image).
DP_TABLE = "lycee_scores"
DP_DATASET = f"""
[[dataset]]
table = "{DP_TABLE}"
source = "/data/uci-student-performance/student-por.csv"
filter = "school = 'GP'"
tier = "sensitive"
privacy_unit = "row"
max_rows_per_unit = 1
bounds = {{ g3 = [0, 20] }}
"""


def _node_toml(node_id: str, school: str | None, port: int, dp: bool = False,
               restricted: bool = False) -> str:
    """The demo's node config (bulle_demo/nodes), with the container's paths; the open tier
    so that the answer is exact and can be asserted, unless ``restricted`` (the demo's
    tiers kept). ``dp``: plus a sensitive table, under the board's key mounted at
    /etc/bulle/board.pub.pem."""
    from bulle_demo import node_config

    text = node_config(node_id).read_text()
    if not restricted:
        text = text.replace('tier = "restricted"', 'tier = "open"')
    text = text.replace("${BULLE_DATA}", "/data")
    lines = []
    for line in text.splitlines():
        if line.startswith("listen ="):
            line = f'listen = "127.0.0.1:{port}"'
        elif line.startswith("state_dir ="):
            line = 'state_dir = "/var/lib/bulle/state"'
        elif line.startswith("board_public_key ="):
            continue
        elif line.startswith("cert ="):
            line = f'cert = "/etc/bulle/tls/{node_id}.pem"'
        elif line.startswith("key ="):
            line = f'key = "/etc/bulle/tls/{node_id}.key"'
        elif line.startswith("client_ca ="):
            line = 'client_ca = "/etc/bulle/tls/ca.pem"'
        lines.append(line)
    assert school is None or f"school = '{school}'" in text
    if dp:  # a top-level key before the first table, the dataset after the last
        lines = ['board_public_key = "/etc/bulle/board.pub.pem"', *lines, DP_DATASET]
    return "\n".join(lines) + "\n"


def _get(url: str, token: str | None = None, body: dict | None = None) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"}
                                             if token else {})})
    with urllib.request.urlopen(req, timeout=90) as r:
        return json.loads(r.read())


def _wait_http(url: str, container: str, docker, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            _get(url)
            return
        except OSError:
            state = docker.run("inspect", "-f", "{{.State.Status}}", container, check=False)
            if state.stdout.strip() != "running":
                break
            time.sleep(0.5)
    logs = docker.run("logs", container, check=False)
    raise AssertionError(f"{container} not up:\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")


def _chown(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        os.chown(p, UID, UID)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_images_run_a_federated_query_end_to_end(docker, images, tmp_path: Path) -> None:
    import duckdb

    from federation._certs import make_certs
    from federation._config import hash_token
    from privacy import Grant, generate_board_keys, sign_grant
    from tests._postgres import PostgresUnavailable, server

    t0 = time.monotonic()
    try:
        pg = server()
    except PostgresUnavailable as e:
        pytest.fail(f"PostgreSQL is needed (.ci/run installs it): {e}")
    database = pg.create_database().rsplit("/", 1)[-1]
    board = tmp_path / "board"
    generate_board_keys(board)
    now = datetime.now(UTC)
    grant = sign_grant(Grant("demo", ("alice",), (DP_TABLE,), 10.0, 1e-6, now + timedelta(1),
                             "the image test's DP query", now),
                       (board / "board_ed25519.pem").read_bytes())
    # region-35 on the image without OpenDP: its restricted table, perturbed by the cell key
    # method (no OpenDP involved), in the same federation
    nodes = {"region-gp": ("GP", "bulle-node-sql:test"), "region-ms": ("MS", "bulle-node:test"),
             "region-35": (None, NODP)}
    certs = make_certs(tmp_path / "tls", list(nodes))
    ports = {n: free_port() for n in nodes}
    names: list[str] = []
    run_id = os.urandom(3).hex()
    try:
        for node_id, (school, image) in nodes.items():
            etc, state = tmp_path / node_id / "etc", tmp_path / node_id / "state"
            (etc / "tls").mkdir(parents=True)
            state.mkdir(parents=True)
            for f in ("ca.pem", f"{node_id}.pem", f"{node_id}.key"):
                shutil.copy(certs / f, etc / "tls" / f)
            dp = image == "bulle-node-sql:test"
            (etc / "node.toml").write_text(_node_toml(node_id, school, ports[node_id], dp,
                                                      restricted=image == NODP))
            if image == NODP:  # with a sensitive dataset too: what it must refuse to serve
                (etc / "sensitive.toml").write_text(_node_toml(node_id, school, ports[node_id],
                                                               dp=True, restricted=True))
            shutil.copy(board / "board_ed25519.pub.pem", etc / "board.pub.pem")
            _chown(tmp_path / node_id)
            name = f"bulle-test-{node_id}-{run_id}"
            names.append(name)
            mounts = ["-v", f"{etc}:/etc/bulle:ro", "-v", f"{DATA}:/data:ro",
                      "-v", f"{state}:/var/lib/bulle"]
            if image != "bulle-node:test":  # the distroless slim images run the checks too
                doctor = docker.run("run", "--rm", *LOCKED_DOWN, *mounts, image, "node",
                                    "doctor", "--config", "/etc/bulle/node.toml", check=False)
                assert doctor.returncode == 0, doctor.stdout + doctor.stderr
            if image == NODP:
                assert "OpenDP: not needed (no sensitive dataset)" in doctor.stdout
                _assert_refuses_sensitive(docker, mounts)
            docker.run("run", "-d", "--name", name, *LOCKED_DOWN, *mounts, image,
                       "node", "serve", "--config", "/etc/bulle/node.toml")
        for node_id, port in ports.items():  # both nodes listening before the coordinator
            end = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < end, docker.run(
                        "logs", f"bulle-test-{node_id}-{run_id}", check=False).stderr[-3000:]
                    time.sleep(0.3)
        coord = tmp_path / "coordinator"
        (coord / "tls").mkdir(parents=True)
        (coord / "state").mkdir()
        for src, dst in (("bulle-coordinator.pem", "tls.crt"), ("bulle-coordinator.key",
                                                                 "tls.key"), ("ca.pem", "ca.crt")):
            shutil.copy(certs / src, coord / "tls" / dst)
        http = free_port()
        node_lines = "".join(f'\n[[node]]\nid = "{n}"\naddress = "127.0.0.1:{p}"\n'
                             for n, p in ports.items())
        shutil.copy(board / "board_ed25519.pub.pem", coord / "tls" / "board.pub.pem")
        (coord / "tls" / "demo.grant").write_text(grant)
        (coord / "coordinator.toml").write_text(
            f'listen = "127.0.0.1:{http}"\nnode_timeout_s = 30\n'
            'state_dir = "/var/lib/bulle/coordinator"\ndatabase_url = "postgresql+psycopg://"\n'
            'board_public_key = "/etc/bulle/tls/board.pub.pem"\n'
            '\n[tls]\ncert = "/etc/bulle/tls/tls.crt"\nkey = "/etc/bulle/tls/tls.key"\n'
            f'ca = "/etc/bulle/tls/ca.crt"\n{node_lines}\n[[researcher]]\nname = "alice"\n'
            f'token_sha256 = "{hash_token(TOKEN)}"\nprojects = ["demo"]\n'
            '\n[[project]]\nname = "demo"\ngrant = "/etc/bulle/tls/demo.grant"\n'
            'nodes_disjoint = true\n')
        _chown(coord)
        # the bulle-postgres ConfigMap's libpq environment (the password-less test server)
        pgenv = ["-e", "PGHOST=127.0.0.1", "-e", f"PGPORT={pg.port}", "-e",
                 f"PGDATABASE={database}", "-e", "PGUSER=postgres", "-e", "PGSSLMODE=disable",
                 "-e", "PGAPPNAME=bulle-coordinator"]
        mounts = ["-v", f"{coord / 'coordinator.toml'}:/etc/bulle/coordinator.toml:ro",
                  "-v", f"{coord / 'tls'}:/etc/bulle/tls:ro",
                  "-v", f"{coord / 'state'}:/var/lib/bulle"]
        # the Deployment's init container: the migrations first
        migrate = docker.run("run", "--rm", *LOCKED_DOWN, *pgenv, *mounts,
                             "--entrypoint", "alembic", "bulle-coordinator:test",
                             "-c", "/opt/bulle/migrations/alembic.ini",
                             "-x", "coordinator_config=/etc/bulle/coordinator.toml",
                             "upgrade", "head", timeout=300)
        assert migrate.returncode == 0
        name = f"bulle-test-coordinator-{run_id}"
        names.append(name)
        docker.run("run", "-d", "--name", name, *LOCKED_DOWN, *pgenv, *mounts,
                   "bulle-coordinator:test",
                   "coordinator", "serve", "--config", "/etc/bulle/coordinator.toml")
        base = f"http://127.0.0.1:{http}/v1"
        _wait_http(f"{base}/health", name, docker)
        sql = ("SELECT school, COUNT(*) AS n, SUM(g3) AS g3 FROM lycee_students "
               "GROUP BY school ORDER BY school")
        reply = _get(f"{base}/queries", TOKEN, {"sql": sql, "wait_s": 120})
        assert reply["status"] == "done", reply
        got = reply["result"]
        csv = DATA / "uci-student-performance" / "student-por.csv"
        want = duckdb.sql(f"SELECT school, COUNT(*) AS n, SUM(CAST(G3 AS BIGINT)) AS g3 "
                          f"FROM read_csv('{csv}', delim=';') GROUP BY school "
                          "ORDER BY school").fetchall()
        rows = got.get("rows") if isinstance(got, dict) else None
        assert rows is not None, got
        assert [tuple(r) if isinstance(r, list) else tuple(r.values()) for r in rows] == \
            [tuple(w) for w in want], got
        # the restricted tier at the node without OpenDP: counts perturbed by at most D times
        # the largest contribution of one collège (the cell key method, privacy/_ckm.py)
        headcounts = DATA / "fr-ille-et-vilaine" / "fr-en-college-effectifs-niveau-sexe-lv.csv"
        src = f"read_csv('{headcounts}', delim=';', header=true)"
        exact = dict(duckdb.sql(f'SELECT "Secteur", COUNT(*) FROM {src} GROUP BY 1').fetchall())
        most = duckdb.sql(f'SELECT MAX(n) FROM (SELECT COUNT(*) AS n FROM {src} '
                          'GROUP BY "Numéro du collège")').fetchall()[0][0]
        reply = _get(f"{base}/queries", TOKEN, {
            "sql": "SELECT secteur, COUNT(*) AS n FROM college_headcounts GROUP BY secteur "
                   "ORDER BY secteur", "wait_s": 120})
        assert reply["status"] == "done", reply
        res = reply["result"]
        assert res["tier"] == "restricted", res
        released = {r[0] if isinstance(r, list) else r["secteur"]:
                    r[1] if isinstance(r, list) else r["n"] for r in res["rows"]}
        assert set(released) == {"PRIVE", "PUBLIC"}, res
        for secteur, n in released.items():
            assert abs(n - exact[secteur]) <= 4 * most, (secteur, n, exact, most)
        # a DP query at the slim node: OpenDP's stripped library releases, the node charges
        dp = _get(f"{base}/queries", TOKEN, {"sql": f"SELECT COUNT(*) AS n, SUM(g3) AS g3 "
                                                    f"FROM {DP_TABLE}", "epsilon": 1.0,
                                             "wait_s": 120})
        assert dp["status"] == "done", dp
        res = dp["result"]
        assert res["tier"] == "sensitive" and res["epsilon_spent"] == pytest.approx(1.0)
        exact = next(w[1:] for w in want if w[0] == "GP")
        row, sd = res["rows"][0], res["noise_sd"][0]
        n, g3 = row if isinstance(row, list) else row.values()
        n_sd, g3_sd = sd if isinstance(sd, list) else sd.values()
        assert 0 < n_sd < 10 and 0 < g3_sd < 200  # Laplace b = 2 and 40 (ε split over two)
        assert abs(n - exact[0]) < 20 * n_sd and abs(g3 - exact[1]) < 20 * g3_sd, (res, exact)
        # the ledger is in PostgreSQL: the coordinator wrote to the migrated schema
        import psycopg
        with psycopg.connect(host="127.0.0.1", port=pg.port, user="postgres",
                             dbname=database) as conn:
            tables = {r[0] for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert "alembic_version" in tables, tables
    finally:
        for name in names:
            docker.run("rm", "-f", name, check=False)
    print(f"\nrun from the images: {time.monotonic() - t0:.0f} s")


def _assert_refuses_sensitive(docker, mounts: list[str]) -> None:
    """The image without OpenDP, given a sensitive dataset: serve refuses to start, naming
    the dataset and the fix, and the operator's doctor says the same."""
    serve = docker.run("run", "--rm", *LOCKED_DOWN, *mounts, NODP, "node", "serve",
                       "--config", "/etc/bulle/sensitive.toml", check=False, timeout=120)
    assert serve.returncode == 2, serve.stdout + serve.stderr
    assert f"sensitive dataset(s) {DP_TABLE}: DP releases need OpenDP" in serve.stderr
    assert "pip install 'bulle[dp]'" in serve.stderr and "--build-arg DP=1" in serve.stderr
    doctor = docker.run("run", "--rm", *LOCKED_DOWN, *mounts, NODP, "node", "doctor",
                        "--config", "/etc/bulle/sensitive.toml", check=False, timeout=120)
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    assert f"✘ OpenDP not installed: the sensitive dataset(s) {DP_TABLE}" in doctor.stdout


def test_notebook_image_has_the_sdk_and_singleuser(docker, images) -> None:
    done = docker.run("run", "--rm", "--user", "1000:100", "--read-only", "--tmpfs", "/tmp",
                      "--entrypoint", "sh", "bulle-notebook:test", "-c",
                      "jupyterhub-singleuser --version && python -c 'import enclave, pandas'")
    assert done.returncode == 0


@pytest.mark.parametrize("tag", ["bulle-node-sql:test", NODP])
def test_slim_node_image_has_no_training_stack(docker, images, tag: str) -> None:
    """Nor a shell (distroless root fs); ctypes still finds libc (bulle_cli.tune_malloc).
    OpenDP only in the DP variant."""
    done = docker.run("run", "--rm", *LOCKED_DOWN, "--entrypoint", "python", tag, "-c",
                      "import importlib.util as u, ctypes.util, os; print([m for m in ('torch', "
                      "'flwr', 'opacus', 'jupyterhub', 'pandas', 'fastapi', 'dp_accounting', "
                      "'scipy', 'pip', 'opendp') if u.find_spec(m)], os.path.exists('/bin/sh'), "
                      "ctypes.util.find_library('c'))")
    found = "[]" if tag == NODP else "['opendp']"
    assert done.stdout.strip() == f"{found} False libc.so.6", done.stdout + done.stderr


def test_node_image_without_opendp_is_under_400_mb(docker, images) -> None:
    size = image_size_mb(docker, NODP)
    assert size < NODP_LIMIT_MB, f"{NODP}: {size:.0f} MB"
    assert size < image_size_mb(docker, "bulle-node-sql:test") - 100  # OpenDP is really out
