"""Users and files when the demo runs as root (DESIGN.md "Processes and users"): the node
agents as ``bulle-node`` on their own copies of the open data, the coordinator, its
SuperLink and the hub as ``bulle-coord``; private keys 0600 to the one service that uses
them, service folders 0700, shared folders 0711 with only public certificates and keys
readable (0644), the rest root's."""

from __future__ import annotations

import re
import shutil
import stat
from pathlib import Path

from bulle_demo._layout import COORDINATOR_KEY, PROJECT, TRAINING_NODES
from enclave import Account, ensure_service_user, own

NODE_USER = "bulle-node"
COORD_USER = "bulle-coord"


def closed_ancestor(path: Path) -> Path | None:
    """The first folder above ``path`` that other users cannot traverse, if any."""
    for parent in path.resolve().parents:
        if parent.exists() and not parent.stat().st_mode & stat.S_IXOTH:
            return parent
    return None


def service_accounts() -> dict[str, Account]:
    """Role → system account (created once: no home, no login shell)."""
    return {"node": ensure_service_user(NODE_USER), "coord": ensure_service_user(COORD_USER)}


def copy_node_data(data: Path, state: Path, configs: list[Path]) -> None:
    """The files the node configs name under ``${BULLE_DATA}``, copied (when changed)
    into ``node-data/``: the nodes' own data, which only ``bulle-node`` can read."""
    wanted = sorted({m for cfg in configs
                     for m in re.findall(r"\$\{BULLE_DATA\}/([^\"']+)", cfg.read_text())})
    for rel in wanted:
        src, dst = data / rel, state / "node-data" / rel
        if not src.is_file():
            continue  # the node reports it at start-up, with its config's path
        have = dst.stat() if dst.exists() else None
        now = src.stat()
        if have is None or (have.st_size, int(have.st_mtime)) != (now.st_size,
                                                                  int(now.st_mtime)):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


def secure(state: Path, accounts: dict[str, Account], node_ids: list[str]) -> None:
    """Owners and modes of everything in the state folder."""
    node, coord = accounts["node"], accounts["coord"]
    s = state
    own(s, None, 0o711)
    own(s / "logs", None, 0o700, recursive=True)
    own(s / "spawner", None, 0o711)  # the broker's socket: 0600, the hub's user
    keys = {**{f"{n}.key": node for n in (*node_ids, *TRAINING_NODES)},
            "bulle-coordinator.key": coord, "bulle-superlink.key": coord,
            "board_ed25519.pem": coord, f"{PROJECT}.grant": coord, COORDINATOR_KEY: coord}
    for d in ("certs", "board", "flower"):
        own(s / d, None, 0o711)
        for f in (s / d).iterdir():
            public = f.name.endswith((".pub", ".pub.pem")) or (
                d == "certs" and f.suffix == ".pem")
            own(f, None if public else keys.get(f.name), 0o644 if public else 0o600)
    for d, who in (("nodes", node), ("node-data", node), ("coordinator", coord),
                   ("superlink", coord), ("hub", coord)):
        (s / d).mkdir(exist_ok=True)
        own(s / d, who, 0o700, recursive=True)
    own(s / "coordinator.toml", coord, 0o600)
    for f in ("researcher.token", "pids.json", "demo.json"):
        if (s / f).exists():
            own(s / f, None, 0o600)
