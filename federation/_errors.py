"""Errors the coordinator returns to researchers: a code, a public message, no data.

``ERROR_CODES`` is the one catalogue of codes (Flower's ``ErrorCode``): the API raises only
these, the SDK shows their hints (``enclave/_error_hints.py``, generated from here without
importing anything) and ``docs/errors.md`` lists them (``python -m federation._errordocs``
writes both; tests/unit/test_error_codes.py checks they are current and that every code
raised in the source is here).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ErrorCode:
    """A code: its usual HTTP status (None: raised by the SDK or kept in a record, never an
    HTTP answer), what it means and what to do about it."""

    code: str
    status: int | None
    meaning: str
    hint: str = ""


_CATALOGUE = (
    # the query itself
    ErrorCode("syntax_error", 400, "The SQL does not parse.",
              "The message gives the line and column."),
    ErrorCode("not_allowed", 400, "The query uses something the federation does not release "
              "(row-level output from a non-open table, a function, a join across nodes…).",
              "The message says what and why; README.md lists the SQL accepted."),
    ErrorCode("unknown_table", 400, "A table is not in the catalogue (404 from "
              "/v1/tables/NAME).",
              "hub.catalog(search='words') finds tables; hub.describe(table) their columns"),
    ErrorCode("unknown_column", 400, "A column is not in the table (or the training view).",
              "hub.describe(table) lists the columns; the message suggests close names"),
    ErrorCode("ambiguous_column", 400, "A column name is in several joined tables.",
              "Qualify it with its table or alias."),
    ErrorCode("bad_request", 400, "A parameter is missing, malformed or out of range.",
              "The message names the parameter."),
    ErrorCode("precision_unreachable", 400, "No ε the grant allows reaches the precision "
              "asked.", "Ask for a looser precision, or fewer groups."),
    ErrorCode("dummy_failed", 400, "The query could not be evaluated on the dummy tables.",
              "Dummy tables hold random values from public metadata: simplify the query."),
    # who may ask
    ErrorCode("unauthenticated", 401, "No valid token, or a board signature was refused.",
              "in a hub notebook, connect() picks up the token"),
    ErrorCode("forbidden", 403, "The caller may not do this (scope, project membership, the "
              "grant's datasets).",
              "hub.projects() lists your projects; a query names one with project=..."),
    ErrorCode("no_grant", 403, "The project has no valid grant from the ethics board.",
              "The board signs grants (`bulle board grant`); hub.projects() shows the status."),
    ErrorCode("budget_exhausted", 403, "The project's privacy budget cannot pay for this "
              "release.", "hub.budget() shows what is left; hub.price(sql, precision=h) what "
              "a query would cost; the ethics board can amend the grant"),
    # what the request names
    ErrorCode("not_found", 404, "No such query, project, receipt, job or indicator.",
              "Check the id or name."),
    ErrorCode("conflict", 409, "The change conflicts with what exists (e.g. a project name "
              "taken).", "The message says what exists."),
    ErrorCode("not_ready", 409, "Nothing to return yet (no training round released).",
              "Wait for the job, then ask again."),
    # the federation's answer
    ErrorCode("node_refused", 400, "A node refused the plan on its own checks (policy, "
              "grant, ledger); the message names the node and its data-free reason.",
              "Read the node's reason; the board sees the same in its audit log."),
    ErrorCode("node_failed", 502, "A node could not be reached, was removed, or sent an "
              "invalid receipt statement: no partial answer is released.",
              "Try again later; hub.catalog() shows which nodes serve a table."),
    ErrorCode("evaluation_failed", 502, "A node accepted the query and did not complete it "
              "(time, memory or an internal error): one outcome whatever the node and cause.",
              "Narrow or simplify the query (fewer joins, groups or rows)."),
    ErrorCode("training_unavailable", 503, "This coordinator has no training service, or "
              "its SuperLink does not answer.", "Ask the platform admin."),
    ErrorCode("hub_unavailable", 503, "JupyterHub did not answer the token check.",
              "Try again in a moment."),
    ErrorCode("internal", 500, "The coordinator failed; the detail is in its log, not here.",
              "Report the query id to the platform admin."),
    # kept in records (indicators' refreshes, training jobs) or raised by the SDK
    ErrorCode("timeout", None, "No answer in time (the query may still run at the "
              "coordinator).",
              "the query keeps running at the coordinator: try again with a larger timeout"),
    ErrorCode("interrupted", None, "An indicator's refresh was cut by a coordinator restart; "
              "its charge stands.", "The next scheduled refresh runs as usual."),
    ErrorCode("failed", None, "A training job failed before releasing a round.",
              "job.status() gives the reason."),
    ErrorCode("cancelled", None, "A training job was cancelled.", ""),
    ErrorCode("not_configured", None, "The SDK has no coordinator URL or token.",
              "in a hub notebook, BULLE_URL and the token are set for you"),
    ErrorCode("bad_response", None, "The coordinator's answer was not JSON.",
              "Check BULLE_URL points at the coordinator."),
    ErrorCode("http_error", None, "An HTTP error without a Bulle error body (a proxy, the "
              "hub).", "The message carries the HTTP status."),
    ErrorCode("reshaped", None, "A released frame was reshaped so that its rows no longer "
              "match their metadata.", "Keep the frame as released to read df.bulle."),
    ErrorCode("no_receipt", None, "The frame carries no signed receipt.",
              "Only frames released by hub.sql() carry one."),
)
ERROR_CODES: dict[str, ErrorCode] = {e.code: e for e in _CATALOGUE}


class QueryError(Exception):
    """A query the coordinator refuses or could not answer.

    ``code`` is one of ``ERROR_CODES``; ``status`` the HTTP status the API uses (the code's
    own unless given); ``position`` is (line, column) in the SQL text for syntax errors.
    """

    def __init__(self, code: str, message: str, *, status: int | None = None,
                 position: tuple[int, int] | None = None, nodes: dict[str, str] | None = None,
                 ) -> None:
        super().__init__(message)
        if code not in ERROR_CODES:  # tests/unit/test_error_codes.py finds them statically
            raise ValueError(f"uncatalogued error code {code!r} (federation/_errors.py)")
        self.code = code
        self.message = message
        self.status = status or ERROR_CODES[code].status or 500
        self.position = position
        self.nodes = nodes or {}

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"code": self.code, "message": self.message}
        if self.position:
            out["line"], out["column"] = self.position
        if self.nodes:
            out["nodes"] = self.nodes
        return out


# The one outcome of a query that a node accepted and did not complete, whatever the node
# and the cause (an error, memory, its deadline): both may depend on one person's data.
EVALUATION_FAILED = (
    "the query could not be evaluated: a node accepted it but did not complete it (a limit "
    "on time or memory, or an internal error). Which node and why are recorded in that "
    "node's audit log, which the ethics board reads, and are not reported here because they "
    "may depend on the data. Narrow or simplify the query (fewer joins, groups or rows).")


def evaluation_failed() -> QueryError:
    return QueryError("evaluation_failed", EVALUATION_FAILED, status=502)
