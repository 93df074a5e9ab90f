"""OpenDP is the ``dp`` extra (issue 15): a node with a sensitive dataset and no OpenDP refuses
to start, naming the dataset and the fix; a node without one never needs it. The real absence
(an image built without OpenDP) is tested in tests/test_images.py; here ``sys.modules`` hides
the installed OpenDP, which both ``importlib.util.find_spec`` and ``import`` then honour."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import privacy
from federation import ConfigError
from nodes import NodeEngine, load_node_config
from nodes._doctor import FAIL, OK, SKIP, _dp_library

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_opendp(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "opendp" or m.startswith("opendp.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "opendp", None)  # as if not installed


def _config(tmp_path: Path, *tiers: str):
    datasets = "".join(
        f'\n[[dataset]]\ntable = "t{i}"\nsource = "{tmp_path / "missing.csv"}"\n'
        f'tier = "{tier}"\n' + ('privacy_unit = "row"\n' if tier == "sensitive" else "")
        for i, tier in enumerate(tiers))
    path = tmp_path / "node.toml"
    path.write_text(f'node_id = "n1"\nlisten = "127.0.0.1:1"\nstate_dir = "{tmp_path / "s"}"\n'
                    + datasets)
    return load_node_config(path)


def test_dp_available_follows_the_installation(no_opendp: None) -> None:
    assert privacy.dp_available() is False
    with pytest.raises(ImportError):
        import opendp  # noqa: F401


def test_dp_available_with_opendp_installed() -> None:
    assert privacy.dp_available() is True  # the dev install has the dp extra


def test_a_sensitive_node_without_opendp_refuses_to_start(tmp_path: Path,
                                                          no_opendp: None) -> None:
    config = _config(tmp_path, "open", "sensitive", "restricted", "sensitive")
    assert config.without_dp_library() == ["t1", "t3"]
    # refused before anything loads (the sources do not even exist) or is written
    with pytest.raises(ConfigError) as refused:
        NodeEngine(config)
    message = str(refused.value)
    assert "t1, t3" in message and "t0" not in message and "t2" not in message
    assert "pip install 'bulle[dp]'" in message and "--build-arg DP=1" in message
    assert not (tmp_path / "s").exists()
    check = _dp_library(config)
    assert check.status == FAIL and "t1, t3" in check.text and "bulle[dp]" in check.text


def test_a_node_without_sensitive_data_does_not_need_opendp(tmp_path: Path,
                                                            no_opendp: None) -> None:
    config = _config(tmp_path, "open", "restricted")
    assert config.without_dp_library() == []
    config.require_dp_library()
    assert _dp_library(config).status == SKIP
    with pytest.raises(ConfigError, match=r"missing\.csv"):  # gets past the check, to the data
        NodeEngine(config)


def test_doctor_names_the_installed_opendp(tmp_path: Path) -> None:
    check = _dp_library(_config(tmp_path, "sensitive"))
    assert check.status == OK and check.text.startswith("OpenDP 0.16.0 installed"), check


def test_opendp_is_the_dp_extra_not_a_core_dependency() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("opendp") for d in project["dependencies"])
    extras = project["optional-dependencies"]
    assert extras["dp"] == ["opendp==0.16.0"]
    assert "dp" in extras["all"][0].split("[", 1)[1].rstrip("]").split(",")
