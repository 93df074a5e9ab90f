"""A Docker daemon for the image tests (Debian's ``docker.io``, installed by ``.ci/run``).

If a daemon already answers on ``/var/run/docker.sock`` it is used as is. Otherwise this
starts ``containerd`` and ``dockerd`` on a private socket, pid file and exec root (the data
root stays ``/var/lib/docker`` so built images are kept between runs as a cache) and stops
both by PID when the test session ends. Debian's ``/usr/bin/docker`` is used: the ``docker``
first on PATH may lack buildx (TRAPS.md, "Containers").
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

DOCKER = "/usr/bin/docker"


class DockerUnavailable(RuntimeError):
    """No docker binaries here, or the daemon cannot start (not root, no cgroups)."""


class Daemon:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.dir: Path | None = None
        self.host = "unix:///var/run/docker.sock"
        if self._ping():
            return
        for tool in (DOCKER, "/usr/sbin/dockerd", "/usr/bin/containerd"):
            if not (Path(tool).exists() or shutil.which(Path(tool).name)):
                raise DockerUnavailable(f"{tool} missing (apt-get install docker.io)")
        if os.geteuid() != 0:
            raise DockerUnavailable("dockerd needs root here")
        self.dir = Path(tempfile.mkdtemp(prefix="bulle-docker-"))
        ctr_sock = self.dir / "containerd.sock"
        self.host = f"unix://{self.dir / 'docker.sock'}"
        log = open(self.dir / "daemon.log", "ab")  # noqa: SIM115 - kept for the daemons' life
        self.procs.append(subprocess.Popen(
            [shutil.which("containerd") or "/usr/bin/containerd", "--address", str(ctr_sock),
             "--root", "/var/lib/containerd", "--state", str(self.dir / "containerd")],
            stdout=log, stderr=log, start_new_session=True))
        self._wait(lambda: ctr_sock.exists(), "containerd")
        self.procs.append(subprocess.Popen(
            [shutil.which("dockerd") or "/usr/sbin/dockerd", f"--containerd={ctr_sock}",
             f"--host={self.host}", f"--pidfile={self.dir / 'docker.pid'}",
             f"--exec-root={self.dir / 'exec'}"],
            stdout=log, stderr=log, start_new_session=True))
        self._wait(self._ping, "dockerd")

    def _wait(self, ready, what: str, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if ready():
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.2)
        tail = (self.dir / "daemon.log").read_text(errors="replace")[-2000:] if self.dir else ""
        self.stop()
        raise DockerUnavailable(f"{what} did not start: {tail}")

    def _ping(self) -> bool:
        if not Path(DOCKER).exists():
            return False
        done = subprocess.run([DOCKER, "-H", self.host, "version", "--format",
                               "{{.Server.Version}}"], capture_output=True, timeout=20,
                              check=False)
        return done.returncode == 0

    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "1"}

    def run(self, *args: str, timeout: float = 120, check: bool = True,
            **kw) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([DOCKER, *args], env=self.env(), capture_output=True, text=True,
                              timeout=timeout, check=False, **kw)
        if check and done.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args[:3])}… failed ({done.returncode}):\n"
                               f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done

    def has_image(self, name: str) -> bool:
        return self.run("image", "inspect", name, check=False).returncode == 0

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
        self.procs.clear()
        if self.dir is not None:
            # dockerd leaves its default network namespace bind-mounted in exec-root
            subprocess.run(["umount", str(self.dir / "exec" / "netns" / "default")],
                           capture_output=True, timeout=30, check=False)
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
