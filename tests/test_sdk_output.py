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


def _notebook(cells: list[str]) -> nbformat.NotebookNode:
    """The cells run in a fresh python3 kernel (outputs, and widget state in metadata)."""
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True).execute()
    return nb


def _run(cells: list[str]) -> list[dict]:
    """Run the cells in a fresh python3 kernel; every cell's outputs."""
    return [cell.outputs for cell in _notebook(cells).cells]


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


def test_training_progress_is_a_widget_in_a_notebook_and_shows_at_once() -> None:
    """tqdm.auto: a widget in a kernel (not text on stderr), drawn before any round."""
    status = ("{'model': 'logreg', 'table': 'lycee_students', 'rounds_done': %d, "
              "'rounds_planned': 5, 'rounds': %s, 'epsilon_spent': %s, 'status': %r}")
    start = status % (0, [], 0.0, "starting")
    later = status % (2, [{"accuracy": 0.812}], 0.41, "running")
    nb = _notebook([
        "from enclave._training import _Progress\n"
        f"bar = _Progress({start})\n"
        f"bar.show({later})\n"
        "bar.close()",
    ])
    shown = nb.cells[0].outputs
    widgets = [o for o in shown if o.output_type == "display_data"
               and "application/vnd.jupyter.widget-view+json" in o["data"]]
    assert widgets, shown
    assert not [o for o in shown if o.output_type == "stream" and o.name == "stderr"], shown
    first = widgets[0]["data"]["text/plain"]  # drawn before any round
    assert "logreg on lycee_students" in first and "0/5" in first
    state = str(nb.metadata["widgets"])  # the widget's last state, as the kernel left it
    assert "2/5" in state and "acc=0.812" in state


def test_training_progress_in_a_terminal_goes_to_stdout(capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    from enclave._training import _Progress

    bar = _Progress({"model": "logreg", "table": "t", "rounds_done": 0, "rounds_planned": 3,
                     "rounds": [], "epsilon_spent": 0.0, "status": "starting"})
    bar.show({"model": "logreg", "table": "t", "rounds_done": 3, "rounds_planned": 3,
              "rounds": [{"accuracy": 0.5}], "epsilon_spent": 1.0, "status": "done"})
    bar.close()
    out, err = capsys.readouterr()
    assert err == "" and "3/3" in out and "status=done" in out
