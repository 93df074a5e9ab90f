"""What a researcher sees in a notebook (issue 14), in a real Jupyter kernel against a real
coordinator and real nodes: a refusal is one message with a hint (no SDK frame), progress
and costs are not written as errors, a released table shows its notes under it, and
``df.bulle`` follows ordinary pandas operations or says it cannot."""

from __future__ import annotations

import re
from collections.abc import Iterator

import nbformat
import pytest

from enclave import BulleError
from enclave._client import result_frame
from federation._api import build_app
from tests._federation import TOKEN
from tests.test_api import ServerThread

ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def url(exact_fed) -> Iterator[str]:
    with ServerThread(build_app(exact_fed.coordinator)) as base:
        yield base


def _run(cells: list[str]) -> list[dict]:
    """Run the cells in a fresh python3 kernel; every cell's outputs."""
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True).execute()
    return [cell.outputs for cell in nb.cells]


def test_a_refusal_is_one_message_and_costs_are_not_errors(url: str) -> None:
    setup = f"from enclave import connect\nhub = connect({url!r}, {TOKEN!r})"
    refused, released = _run([
        setup,
        "hub.sql('SELECT name FROM lycee_students')",  # rows of pupils: refused
        "df = hub.sql('SELECT school, COUNT(*) AS n FROM lycee_students GROUP BY school')\n"
        "df",
    ])[1:]
    [error] = [o for o in refused if o.output_type == "error"]
    shown = ANSI.sub("", "\n".join(error.traceback))
    assert shown.startswith("BulleError [") and len(error.traceback) <= 2, shown
    assert "_client.py" not in shown and "Traceback" not in shown and "File " not in shown
    assert not [o for o in refused + released if o.output_type == "stream"
                and o.name == "stderr"]
    html = next(o for o in released if o.output_type == "execute_result")["data"]["text/html"]
    assert "<table" in html


def test_notes_show_under_the_table_and_metadata_follows_pandas() -> None:
    df = result_frame({
        "columns": [{"name": "school", "type": "string"}, {"name": "n", "type": "number"},
                    {"name": "mean", "type": "number"}],
        "rows": [["GP", 423.4, 11.5], ["MS", 226.1, None]],
        "suppressed": [[False, False, False], [False, False, True]],
        "noise_sd": [[None, 1.0, 0.5], [None, 2.0, None]],
        "notes": ["1 cell of fewer than 8 pupils withheld"], "epsilon_spent": 0.5})
    assert "1 cell of fewer than 8 pupils withheld" in df._repr_html_()
    assert "note: ε spent: 0.5" in repr(df)
    by_school = df.set_index("school")
    assert by_school.bulle.noise_sd.loc["MS", "n"] == 2.0
    assert by_school.bulle.suppressed.loc["MS", "mean"]
    ordered = df.sort_values("n")  # rows reordered: matched by their labels
    assert ordered.bulle.noise_sd["n"].tolist() == [2.0, 1.0]
    assert df[df["n"] > 300].bulle.noise_sd["mean"].tolist() == [0.5]
    assert df[["mean"]].bulle.suppressed["mean"].tolist() == [False, True]
    assert "note:" in repr(df.head(1))  # pandas operations keep the released frame
    with pytest.raises(BulleError, match="cannot be matched"):
        _ = ordered.set_index("school")[lambda d: d["n"] > 300].bulle.noise_sd
