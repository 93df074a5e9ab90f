"""What every Bulle config file shares (the coordinator's and the nodes'): one error type
naming the file and the key, TOML reading, ``${VAR}`` expansion in paths.

Nodes use it too (``from federation import ConfigError``): it stays free of coordinator
code, like ``federation.proto``.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ConfigError(ValueError):
    """A config problem, with the file and key it is about."""


def read_toml(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The resolved path and the parsed file; a missing or invalid file is a ConfigError."""
    path = Path(path).resolve()
    try:
        return path, tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def expand_path(value: str, base: Path, where: str = "") -> Path:
    """``${VAR}`` from the environment (unset: a ConfigError), ``~``, and a relative path
    taken from ``base`` (the config file's folder)."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in os.environ:
            raise ConfigError(f"{where + ': ' if where else ''}environment variable {name} "
                              "is not set")
        return os.environ[name]

    p = Path(_ENV.sub(sub, value)).expanduser()
    return p if p.is_absolute() else (base / p).resolve()
