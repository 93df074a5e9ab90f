"""The Z2JH values linted by Helm itself (``helm-sdkpy``: the Helm v4 Go library bundled
in the wheel, offline) against the vendored chart — schema *and* template rendering.

helm-sdkpy's ``Lint`` takes a chart folder and no values, and Helm reads the schema only
from ``values.schema.json``, so the test lints a copy of the vendored chart whose
``values.yaml`` is the chart's defaults merged with ours (what ``helm lint -f`` does) and
whose ``values.schema.json`` is the chart's ``values.schema.yaml`` (what the chart's release
tooling ships). helm-sdkpy declares Python ≥ 3.12; on 3.11 it is installed with
``--ignore-requires-python`` (Makefile), its Python code runs unchanged.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests._k8s import helm_merge

REPO = Path(__file__).resolve().parents[1]
CHART = REPO.parent / "shared" / "vendor" / "z2jh-chart"
VALUES = REPO / "deploy" / "k8s" / "z2jh-values.yaml"


def _helm() -> Any:
    if os.environ.get("CI") or os.environ.get("BULLE_REQUIRE_ALL") == "1":
        import helm_sdkpy  # must be there: a failure, not a skip
    else:
        helm_sdkpy = pytest.importorskip("helm_sdkpy", reason="helm-sdkpy not installed "
                                         "(make install adds it)")
    if not CHART.is_dir():
        pytest.skip(f"{CHART} is missing")
    return helm_sdkpy


def lint(values: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """Helm's lint result for the vendored chart with ``values``."""
    from helm_sdkpy import Configuration
    from helm_sdkpy.chart import Lint

    chart = tmp / "jupyterhub"
    shutil.copytree(CHART, chart)
    schema = yaml.safe_load((chart / "values.schema.yaml").read_text())
    (chart / "values.schema.json").write_text(json.dumps(schema))
    defaults = yaml.safe_load((chart / "values.yaml").read_text())
    (chart / "values.yaml").write_text(yaml.safe_dump(helm_merge(defaults, values)))
    return asyncio.run(Lint(Configuration()).run(str(chart)))


def test_z2jh_values_pass_helm_lint(tmp_path: Path) -> None:
    _helm()
    result = lint(yaml.safe_load(VALUES.read_text()), tmp_path)
    assert result["TotalChartsLinted"] == 1
    assert not result["Errors"] and not result["Messages"], result


@pytest.mark.parametrize(("path", "bad"), [
    (("singleuser", "networkPolicy", "egressAllowRule"), {}),  # typo of egressAllowRules
    (("hub", "db", "type"), "postgresql"),  # the enum says postgres
])
def test_helm_lint_catches_mistakes(tmp_path: Path, path: tuple[str, ...], bad: Any) -> None:
    _helm()
    broken = copy.deepcopy(yaml.safe_load(VALUES.read_text()))
    node = broken
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = bad
    result = lint(broken, tmp_path)
    assert result["Errors"], result  # Helm's messages lose their text through the FFI
    assert {m["Path"] for m in result["Messages"]} >= {"values.yaml"}
