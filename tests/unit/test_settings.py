"""Settings declared once (federation/_settings.py): the node's and the coordinator's config
files are loaded, validated, documented (``bulle … settings``) and exemplified from one
declaration each (``SCHEMA``)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from federation import ConfigError, Schema, Section, example_toml, reference_text
from federation._config import SCHEMA as COORDINATOR
from federation._config import load_coordinator_config
from nodes._config import SCHEMA as NODE
from nodes._config import load_node_config

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = {"node": (NODE, load_node_config), "coordinator": (COORDINATOR,
                                                             load_coordinator_config)}


def _uncommented(text: str) -> dict[str, Any]:
    """The example with its commented-out settings (``# key = value``) switched on."""
    return tomllib.loads(re.sub(r"(?m)^# (\w+ = )", r"\1", text))


def _missing(section: Section, table: Any, path: str) -> list[str]:
    """Declared settings of ``section`` absent from the parsed ``table`` (every entry of an
    array of tables counts)."""
    entries = table if isinstance(table, list) else [table]
    out = [f"{path}{s.name}" for s in section.settings
           if not any(s.name in e for e in entries)]
    for sub in section.sections:
        present = [e[sub.name] for e in entries if sub.name in e]
        if not present:
            out.append(f"[{path}{sub.name}]")
        for t in present:
            out += _missing(sub, t, f"{path}{sub.name}.")
    return out


@pytest.mark.parametrize("name", SCHEMAS)
def test_the_generated_example_holds_every_setting_and_loads(name: str,
                                                             tmp_path: Path) -> None:
    schema, load = SCHEMAS[name]
    text = example_toml(schema)
    assert _missing(schema.top, _uncommented(text), "") == []
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    load(path)  # what the example sets is valid; the rest are defaults, commented out
    reference = reference_text(schema)
    assert all(f"  {s.name}  (" in reference for s in _all(schema))


def _all(schema: Schema) -> list[Any]:
    def walk(section: Section) -> list[Any]:
        return [*section.settings, *(s for sub in section.sections for s in walk(sub))]
    return walk(schema.top)


def test_every_setting_has_help_and_the_defaults_are_the_dataclasses() -> None:
    from federation._config import CoordinatorConfig, HubConfig, ProjectConfig
    from nodes._config import DatasetConfig, EngineConfig, TrainingConfig

    assert [s.name for s in _all(NODE) + _all(COORDINATOR) if not s.help] == []
    top, dataset = COORDINATOR.top, NODE.top.section("dataset")
    assert CoordinatorConfig.max_rows == top["max_rows"].default == 100_000
    assert CoordinatorConfig.node_timeout_s == top["node_timeout_s"].default
    assert HubConfig.cache_s == top.section("hub")["cache_s"].default
    assert ProjectConfig.default_epsilon == top.section("project")["default_epsilon"].default
    assert DatasetConfig.min_count == dataset["min_count"].default
    assert EngineConfig.max_query_seconds == NODE.top.section("engine")[
        "max_query_seconds"].default
    assert TrainingConfig.models == NODE.top.section("training")["models"].default


def test_the_repo_node_example_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/bulle-node.service")
    config = load_node_config(ROOT / "deploy" / "node" / "node.example.toml")
    assert config.tls is not None and len(config.datasets) >= 2


def _node(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text('node_id = "n1"\n' + body)
    return path


@pytest.mark.parametrize(("body", "message"), [
    ("[engine]\nthreds = 2\n",
     "[engine]: unknown key 'threds' (did you mean 'threads'?) (allowed: "),
    ('[engine]\nthreads = "2"\n', "[engine]: threads must be a whole number (got '2')"),
    ("[engine]\nthreads = 0\n", "[engine]: threads must be >= 1 (got 0)"),
    ('[[dataset]]\ntable = "t"\nsource = "t.csv"\ntier = "restriced"\n',
     "[[dataset]] #1 (t): tier 'restriced' is not one of open, restricted, sensitive "
     "(did you mean 'restricted'?)"),
    ('[[dataset]]\ntable = "t"\nsource = "t.csv"\ntier = "open"\ncolour = 1\n',
     "[[dataset]] #1 (t): unknown key 'colour' (did you mean 'columns'?)"),
    ('[[dataset]]\ntable = "t"\nsource = "t.csv"\ntier = "open"\n'
     "cell_key = { variance = true }\n",
     "[[dataset]] #1 (t) cell_key: variance must be a number (got True)"),
    ('metrics_listen = "nowhere"\n', "metrics_listen must be host:port"),
    ('[training]\nsuperlink = "a:1"\nroot_certificates = "ca"\nauth_key = "k"\n'
     'models = ["mpl"]\n', "unknown model 'mpl' (the zoo: logreg, mlp, gru) "
     "(did you mean 'mlp'?)"),
])
def test_node_config_errors_name_file_section_key_and_value(tmp_path: Path, body: str,
                                                            message: str) -> None:
    path = _node(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        load_node_config(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_coordinator_config_errors_suggest_the_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('node_timeout = 5\n[tls]\ncert = "c"\nkey = "k"\nca = "a"\n')
    with pytest.raises(ConfigError, match=r"unknown key 'node_timeout' \(did you mean "
                       r"'node_timeout_s'\?\)"):
        load_coordinator_config(path)
    path.write_text('[tls]\ncert = "c"\nkey = "k"\nca = "a"\n[[project]]\nname = "p"\n'
                    'nodes_disjoint = "yes"\n')
    with pytest.raises(ConfigError, match=r"\[\[project\]\] #1: nodes_disjoint must be true "
                       r"or false \(got 'yes'\)"):
        load_coordinator_config(path)


@pytest.mark.parametrize("package", ["nodes", "federation"])
def test_the_settings_command_prints_the_example(package: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import importlib

    cli = importlib.import_module(f"{package}.cli")
    command = "node" if package == "nodes" else "coordinator"
    assert cli.main([command, "settings", "--example"]) == 0
    schema = NODE if package == "nodes" else COORDINATOR
    assert capsys.readouterr().out == example_toml(schema)
    assert cli.main([command, "settings"]) == 0
    assert capsys.readouterr().out == reference_text(schema)
