"""What every Bulle config file shares (the coordinator's and the nodes'): one error type
naming the file and the key, TOML reading, ``${VAR}`` expansion in paths, and settings
declared once (``Setting``/``Section``/``Schema``) from which loading, validation, the
reference text and the commented example config are derived.

Nodes use it too (``from federation import ConfigError``): it stays free of coordinator
code, like ``federation.proto``.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import textwrap
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
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


# -- settings declared once -------------------------------------------------------------
# Each config file is a ``Schema``: its sections, each a tuple of ``Setting`` (name, kind,
# default, help). Loading (unknown keys and wrong values refused with a did-you-mean, the
# file, the section and the value), the reference text of ``bulle … settings`` and the
# commented example config are all derived from it (as Datasette's SETTINGS).

class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # a Setting's default when the key must be given
_KINDS = {  # kind -> what a value must be, as the error message says it
    "str": "a string", "int": "a whole number", "float": "a number",
    "bool": "true or false", "path": "a file path (string)",
    "strs": "a string or a list of strings", "list": "a list of strings",
    "table": "a table", "any": "a value",
}


@dataclass(frozen=True)
class Setting:
    """One key of a config file. ``default`` REQUIRED: the key is required. ``check`` is a
    predicate on the (typed) value; ``must`` says what it requires, for the error message.
    ``example`` is what the generated example config shows (else the default)."""

    name: str
    kind: str
    default: Any = REQUIRED
    help: str = ""
    choices: tuple[Any, ...] = ()
    check: Callable[[Any], bool] | None = None
    must: str = ""
    example: Any = REQUIRED

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class Section:
    """A table of a config file: ``name`` "" is the top level, ``array`` a ``[[name]]``
    array of tables; ``sections`` are the tables nested in it (their name is a key of
    this one)."""

    name: str
    help: str
    settings: tuple[Setting, ...]
    array: bool = False
    required: bool = False
    sections: tuple[Section, ...] = ()

    def keys(self) -> set[str]:
        return {s.name for s in self.settings} | {s.name for s in self.sections}

    def __getitem__(self, name: str) -> Setting:
        return next(s for s in self.settings if s.name == name)

    def section(self, name: str) -> Section:
        return next(s for s in self.sections if s.name == name)

    def parse(self, raw: Any, where: str, base: Path) -> dict[str, Any]:
        """The typed values of this table's settings (defaults filled in, paths expanded
        from ``base``); nested tables are left as they are, under their name."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: must be a table")
        check_keys(where, raw, self.keys())
        out = {s.name: raw[s.name] for s in self.sections if s.name in raw}
        for s in self.settings:
            if s.name not in raw:
                if s.required:
                    raise ConfigError(f"{where}: {s.name} is required")
                out[s.name] = s.default
            else:
                out[s.name] = _value(s, raw[s.name], where, base)
        return out


@dataclass(frozen=True)
class Schema:
    """A config file: its title (what reads it) and its top-level table."""

    title: str
    top: Section


def setting_names(schema: Schema) -> list[str]:
    """``section.key`` of every declared setting (``key`` at the top level)."""
    def walk(section: Section, prefix: str) -> list[str]:
        out = [prefix + s.name for s in section.settings]
        for sub in section.sections:
            out += walk(sub, f"{prefix}{sub.name}.")
        return out
    return walk(schema.top, "")


def did_you_mean(name: str, candidates: Any) -> str:
    """`` (did you mean 'x'?)`` for a close candidate, else ""."""
    hint = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


def check_keys(where: str, raw: dict[str, Any], allowed: set[str]) -> None:
    """Unknown keys refused, the first by name, with the closest allowed key."""
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}"
                          f"{did_you_mean(unknown[0], allowed)} "
                          f"(allowed: {', '.join(sorted(allowed))})")


def _typed(kind: str, value: Any) -> Any:
    """``value`` as ``kind``, or raise TypeError."""
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "path": isinstance(value, str),
        "strs": isinstance(value, str) or (isinstance(value, list)
                                           and all(isinstance(v, str) for v in value)),
        "list": isinstance(value, list) and all(isinstance(v, str) for v in value),
        "table": isinstance(value, dict),
        "any": True,
    }[kind]
    if not ok:
        raise TypeError(kind)
    if kind == "float":
        return float(value)
    if kind == "strs":
        return (value,) if isinstance(value, str) else tuple(value)
    if kind == "list":
        return tuple(value)
    return value


def _value(s: Setting, value: Any, where: str, base: Path) -> Any:
    """A declared key's value, typed and checked; a wrong one names key and value."""
    try:
        typed = _typed(s.kind, value)
    except TypeError:
        raise ConfigError(f"{where}: {s.name} must be {_KINDS[s.kind]} "
                          f"(got {value!r})") from None
    if s.choices and typed not in s.choices:
        raise ConfigError(f"{where}: {s.name} {typed!r} is not one of "
                          f"{', '.join(map(str, s.choices))}"
                          f"{did_you_mean(typed, s.choices)}")
    if s.check is not None and not s.check(typed):
        raise ConfigError(f"{where}: {s.name} must be {s.must} (got {value!r})")
    if s.kind == "path":
        return expand_path(typed, base, where)
    return typed


# -- derived text: the reference (``--help``) and the commented example config -----------

def _toml(value: Any) -> str:
    """A TOML literal of a default or example value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{k} = {_toml(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    raise TypeError(f"no TOML literal for {value!r}")


def _shown(s: Setting) -> tuple[bool, Any]:
    """(commented out, value) of a setting in the example: required keys and keys with an
    example are set; the others show their default, commented out."""
    if s.example is not REQUIRED:
        return False, s.example
    if s.required:
        return False, _placeholder(s)
    if s.default is None:
        return True, _placeholder(s)
    return True, s.default


def _placeholder(s: Setting) -> Any:
    return {"int": 1, "float": 1.0, "bool": False, "table": {}, "list": [], "strs": "",
            "path": "/path/to/file", "any": ""}.get(
        s.kind, s.choices[0] if s.choices else "")


def _wrap(text: str, indent: str = "# ") -> list[str]:
    return textwrap.wrap(text, 92 - len(indent), initial_indent=indent,
                         subsequent_indent=indent, break_on_hyphens=False) if text else []


def _describe(s: Setting, required: bool = True) -> str:
    what = s.help
    if s.choices:
        what += f" One of: {', '.join(_toml(c) for c in s.choices)}."
    elif s.must:
        what += f" Must be {s.must}."
    if required and s.required:
        what += " Required."
    return what


def example_toml(schema: Schema) -> str:
    """The commented example config of ``schema`` (``bulle … settings --example``)."""
    lines = [*_wrap(schema.title), *_wrap(schema.top.help), ""]

    def emit(section: Section, path: str) -> None:
        if path:
            lines.extend(["", *_wrap(section.help),
                          f"[[{path}]]" if section.array else f"[{path}]"])
        for s in section.settings:
            commented, value = _shown(s)
            default = "" if s.required or s.default in (None, "") else \
                f" (default {_toml(s.default)})"
            lines.extend(_wrap(_describe(s) + default))
            lines.append(f"{'# ' if commented else ''}{s.name} = {_toml(value)}")
        for sub in section.sections:
            emit(sub, f"{path}.{sub.name}" if path else sub.name)

    emit(schema.top, "")
    return "\n".join(lines) + "\n"


def reference_text(schema: Schema) -> str:
    """Every setting with its type, default and help (``bulle … settings``)."""
    lines = [schema.title, ""]

    def emit(section: Section, path: str) -> None:
        if path:
            header = f"[[{path}]]" if section.array else f"[{path}]"
            lines.extend(["", header + ("  (required)" if section.required else ""),
                          *_wrap(section.help, "  ")])
        for s in section.settings:
            default = "required" if s.required else f"default {_toml(s.default)}" \
                if s.default is not None else "optional"
            lines.append(f"  {s.name}  ({s.kind}, {default})")
            lines.extend(_wrap(_describe(s, required=False), "      "))
        for sub in section.sections:
            emit(sub, f"{path}.{sub.name}" if path else sub.name)

    emit(schema.top, "")
    return "\n".join(lines) + "\n"
