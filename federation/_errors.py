"""Errors the coordinator returns to researchers: a code, a public message, no data."""

from __future__ import annotations


class QueryError(Exception):
    """A query the coordinator refuses or could not answer.

    ``status`` is the HTTP status the API uses; ``position`` is (line, column) in the SQL
    text for syntax errors.
    """

    def __init__(self, code: str, message: str, *, status: int = 400,
                 position: tuple[int, int] | None = None, nodes: dict[str, str] | None = None,
                 ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
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
