"""Build the Flower App Bundle (FAB) of this package, deterministically, in memory.

The FAB is this package's Python files plus a generated ``pyproject.toml``. Flower's own
builder writes fixed zip dates and sorted paths, so the same sources always give the
same bytes: the coordinator submits this FAB, and a node accepts a run only if the
sha256 of the FAB it receives equals the hash of the FAB built from the code *its*
operator installed (``fab_sha256()``). ``dependencies = []``: the SuperLink runs with
``--disable-runtime-dependency-installation`` and nothing is downloaded (TRAPS.md).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
APP_NAME = "bulle-dp-training"
APP_VERSION = "1.0.0"

PYPROJECT = f"""\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{APP_NAME}"
version = "{APP_VERSION}"
description = "Bulle: differentially-private federated training of vetted models"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "bulle"

[tool.flwr.app.components]
serverapp = "bulle_flower.server_app:app"
clientapp = "bulle_flower.client_app:app"

[tool.flwr.app.config]
spec = ""
auth = ""
server = ""
"""


def fab_files() -> dict[str, bytes]:
    """Relative path → content of every file that goes into the FAB."""
    files = {"pyproject.toml": PYPROJECT.encode()}
    for path in sorted(PACKAGE.glob("*.py")):
        files[f"bulle_flower/{path.name}"] = path.read_bytes()
    return files


@lru_cache(maxsize=1)
def build_fab() -> bytes:
    """The FAB bytes (cached for the life of the process: the installed code is fixed)."""
    from flwr.cli.build import build_fab_from_files

    fab, _ = build_fab_from_files(fab_files())
    return fab


def fab_sha256() -> str:
    """sha256 (hex) of ``build_fab()``: the only FAB a node of this install will run."""
    return hashlib.sha256(build_fab()).hexdigest()


def released_sha256() -> str:
    """The hash recorded at release time (``make fab-hash`` writes ``fab.sha256``; a test
    fails when the code and the recorded hash drift apart)."""
    return (PACKAGE / "fab.sha256").read_text().strip()


if __name__ == "__main__":  # python -m bulle_flower._fab > bulle_flower/fab.sha256
    print(fab_sha256())
