"""The researcher SDK: ``from enclave import connect``.

Results are pandas DataFrames; per-value metadata (which values are suppressed, later the
DP noise scale and interval) rides along in ``df.attrs["bulle"]`` and is read with the
``df.bulle`` accessor: ``df.bulle.suppressed`` is a boolean frame shaped like ``df``.
"""

from __future__ import annotations

import os
import sys
import time
import unicodedata
from typing import Any

import httpx
import pandas as pd

from enclave._error_hints import HINTS

_DTYPES = {"integer": "Int64", "number": "float64", "boolean": "boolean", "string": "object"}


def _fold(text: str) -> str:
    """Lower case without accents: what catalogue search compares."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()


def search_table(table: dict[str, Any], query: str) -> list[str] | None:
    """Where every word of ``query`` occurs in a catalogue entry (``GET /v1/catalog``): its
    name, description, column names and descriptions, case and accents ignored; None if a
    word occurs nowhere. The catalogue page's search (``federation/_catalog.py``) has the
    same meaning: tests/unit/test_search.py holds them equal. Here so that the SDK loads no
    coordinator code (and no protobuf) in a notebook."""
    places = [("name", table["name"]), ("description", table.get("description") or "")]
    places += [(c["name"], f"{c['name']} {c.get('description') or ''}")
               for c in table.get("columns", [])]
    found: list[str] = []
    for word in _fold(query).split():
        hits = [where for where, text in places if word in _fold(text)]
        if not hits:
            return None
        found += [h for h in hits if h not in found]
    return found


class BulleError(RuntimeError):
    """A query the federation refused or could not answer; ``code`` says which kind."""

    def __init__(self, code: str, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.detail = detail or {}

    def _render_traceback_(self) -> list[str]:
        """What IPython shows instead of a traceback: the federation's answer, not the
        SDK's frames (they say nothing about the query)."""
        lines = [f"\x1b[1;31mBulleError\x1b[0m [{self.code}]: {self}"]
        hint = HINTS.get(self.code)  # the catalogue's (docs/errors.md)
        if hint:
            lines.append(f"  hint: {hint}")
        return lines


def _info(text: str, end: str = "\n") -> None:
    """An informational line (progress, what a query cost): standard output, not the error
    stream (notebooks colour that as an error)."""
    print(text, end=end, file=sys.stdout, flush=True)


class ReleasedFrame(pd.DataFrame):
    """A released table: a DataFrame whose notes (withheld keys, cells under the threshold,
    noise, ε) are shown under it, in a notebook and in a terminal. Its per-value metadata
    (``df.bulle``) follows ordinary pandas operations (see :class:`BulleAccessor`)."""

    @property
    def _constructor(self) -> type[ReleasedFrame]:
        return ReleasedFrame  # slices, head(), set_index() … stay released frames

    def _notes(self) -> list[str]:
        meta = self.attrs.get("bulle") or {}
        notes = list(meta.get("notes") or [])
        if meta.get("epsilon_spent"):
            notes.append(f"ε spent: {meta['epsilon_spent']:.4g}")
        return notes

    def _repr_html_(self) -> str | None:
        import html

        table = super()._repr_html_()
        notes = self._notes()
        if table is None or not notes:
            return table
        items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
        return f'{table}<ul class="bulle-notes" style="margin-top:0.3em">{items}</ul>'

    def __repr__(self) -> str:
        notes = self._notes()
        return super().__repr__() + "".join(f"\n  note: {n}" for n in notes)


@pd.api.extensions.register_dataframe_accessor("bulle")
class BulleAccessor:
    """Per-value metadata of a released table: which values are suppressed, each value's
    noise SD and 95% interval.

    It is kept by column name and by the result's row labels (0 … n-1), so it follows
    column selection, renaming-free reshaping, row filters and sorting; after
    ``set_index`` (new row labels) rows are matched by position, which holds as long as
    the rows were not reordered first. A frame whose rows cannot be matched any more
    raises a :class:`BulleError` saying so, never misaligned values."""

    def __init__(self, df: pd.DataFrame) -> None:
        self._df = df

    @property
    def meta(self) -> dict[str, Any]:
        return self._df.attrs.get("bulle", {})

    def _aligned(self, key: str, fill: Any, dtype: str) -> pd.DataFrame:
        df, meta = self._df, self.meta
        names = meta.get("columns") or list(df.columns)
        rows = meta.get("rows", len(df))
        values = meta.get(key) or [[fill] * len(names)] * rows
        full = pd.DataFrame(values, columns=names, dtype=dtype)
        labels = df.index
        if labels.is_unique and all(isinstance(v, int) and 0 <= v < rows for v in labels):
            full = full.loc[list(labels)]  # the result's own row labels: filters, sorts
        elif len(df) == rows:
            pass  # new labels (set_index): by position
        else:
            raise BulleError("reshaped", f"this frame's {len(df)} rows cannot be matched "
                             f"to the {rows} released rows any more: read .bulle on the "
                             "released table (or before changing its index)")
        out = full.reindex(columns=df.columns, fill_value=fill).astype(dtype)
        out.index = labels
        return out

    @property
    def suppressed(self) -> pd.DataFrame:
        return self._aligned("suppressed", False, "bool")

    def _matrix(self, key: str) -> pd.DataFrame:
        return self._aligned(key, None, "float64")

    @property
    def noise_sd(self) -> pd.DataFrame:
        """Standard deviation of the DP noise in each value (NaN: no noise)."""
        return self._matrix("noise_sd")

    @property
    def ci_low(self) -> pd.DataFrame:
        """Lower end of each value's 95% interval for the noise (NaN: exact value)."""
        return self._matrix("ci_low")

    @property
    def ci_high(self) -> pd.DataFrame:
        return self._matrix("ci_high")

    @property
    def epsilon_spent(self) -> float:
        return float(self.meta.get("epsilon_spent") or 0.0)

    @property
    def notes(self) -> list[str]:
        return list(self.meta.get("notes", []))

    @property
    def nodes(self) -> list[str]:
        return list(self.meta.get("nodes", []))

    @property
    def receipt(self) -> dict[str, Any] | None:
        """The release's signed receipt (enclave.verify_receipt checks it offline)."""
        return self.meta.get("receipt")

    def save_receipt(self, path: str | os.PathLike[str]) -> str:
        """Write the receipt as JSON (``bulle receipt verify FILE --keys KEYS``)."""
        from enclave._receipts import save_receipt

        if self.receipt is None:
            raise BulleError("no_receipt", "this frame carries no receipt")
        return str(save_receipt(self.receipt, path))


def result_frame(payload: dict[str, Any]) -> pd.DataFrame:
    cols = payload["columns"]
    data = {c["name"]: pd.Series([row[i] for row in payload["rows"]],
                                 dtype=_DTYPES.get(c["type"], "object"))
            for i, c in enumerate(cols)}
    df = ReleasedFrame(data, columns=[c["name"] for c in cols])
    df.attrs["bulle"] = {"columns": [c["name"] for c in cols], "rows": len(df)}
    df.attrs["bulle"] |= {k: payload.get(k) for k in
                         ("suppressed", "notes", "nodes", "tier", "elapsed_ms",
                          "suppressed_cells", "hidden_cells", "query_id", "noise_sd",
                          "ci_low", "ci_high", "epsilon_spent", "budget", "budget_split",
                          "precision", "dummy", "receipt")}
    return df


class Hub:
    """A connection to the Bulle coordinator."""

    def __init__(self, url: str, token: str, timeout: float = 300.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout + 10),
                                  headers={"Authorization": f"Bearer {token}"})

    def __repr__(self) -> str:
        return f"Hub({self.url!r})"

    def close(self) -> None:
        self._http.close()

    def _check(self, response: httpx.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            response.raise_for_status()
            raise BulleError("bad_response", "the coordinator sent a non-JSON answer") from None
        error = body.get("error") if isinstance(body, dict) else None
        if error:
            raise BulleError(error.get("code", "http_error"), error.get("message", "error"),
                             error)
        if response.status_code >= 400:
            detail = body.get("detail") if isinstance(body, dict) else body
            raise BulleError("http_error", f"HTTP {response.status_code}: {detail}")
        return body

    def catalog(self, refresh: bool = False, search: str | None = None) -> pd.DataFrame:
        """One row per table: tier, publishing nodes, row-count buckets, quality score (0-100,
        the lowest among the nodes), columns.

        ``search`` keeps the tables whose name, description, column names or column
        descriptions hold every word of it (case and accents ignored); ``matches`` says where.
        """
        body = self._check(self._http.get("/v1/catalog", params={"refresh": refresh}))
        rows = []
        for t in body["tables"]:
            row = {"table": t["name"], "tier": t["tier"], "nodes": ", ".join(t["nodes"]),
                   "rows": ", ".join(f"{n}: {b}" for n, b in t["row_count_buckets"].items()),
                   "quality": t.get("quality_score"), "columns": len(t["columns"]),
                   "description": t["description"]}
            if search is not None:
                where = search_table(t, search)
                if where is None:
                    continue
                row["matches"] = ", ".join(where)
            rows.append(row)
        names = ["table", "tier", "nodes", "rows", "quality", "columns", "description"]
        df = pd.DataFrame(rows, columns=names + (["matches"] if search is not None else []))
        df["quality"] = df["quality"].astype("Int64")
        df.attrs["bulle"] = {"tables": {t["name"]: t for t in body["tables"]},
                             "nodes": body.get("nodes", {})}
        return df

    def describe(self, table: str) -> pd.DataFrame:
        """The columns of one table: types, descriptions, public domains, completeness (%,
        lowest among the nodes) and pivots: columns that join datasets (school, year,
        level, area), with the other tables that have them."""
        tables = self.catalog().attrs["bulle"]["tables"]
        info = tables.get(table)
        if info is None:
            raise BulleError("unknown_table", f"table {table!r} is not in the catalogue")
        domains = info.get("public_domains", {})
        reports = list((info.get("quality") or {}).values())
        out = []
        for c in info["columns"]:
            name = c["name"]
            pcts = [q["column_completeness_pct"][name] for q in reports
                    if name in q.get("column_completeness_pct", {})]
            joins = sorted(n for n, t in tables.items() if n != table and c.get("pivot")
                           and any(o["name"] == name for o in t["columns"]))
            out.append({"name": name, "type": c["type"], "description": c["description"],
                        "public_domain": domains.get(name),
                        "completeness_pct": min(pcts) if pcts else None,
                        "pivot": c.get("pivot"), "joins_with": joins})
        return pd.DataFrame(out)

    def keys(self) -> dict[str, Any]:
        """The public keys receipts are signed with (``GET /v1/keys``): save them to
        verify receipts offline."""
        return self._check(self._http.get("/v1/keys"))

    def budget(self, project: str | None = None) -> dict[str, Any]:
        """ε granted, spent and remaining for a project (the global ledger's view)."""
        return self._check(self._http.get("/v1/budget", params={"project": project}
                                          if project else None))

    def projects(self) -> pd.DataFrame:
        """Your research projects (all of them for the ethics board): status, ε granted."""
        body = self._check(self._http.get("/v1/projects"))
        cols = ["name", "title", "status", "datasets", "epsilon", "granted_epsilon",
                "expires_at", "team", "reason"]
        return pd.DataFrame([{k: p.get(k) for k in cols} for p in body["projects"]],
                            columns=cols)

    def submit_project(self, name: str, title: str, purpose: str, datasets: list[str],
                       epsilon: float, *, delta: float = 1e-6, duration_days: int = 365,
                       team: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
        """Ask the ethics board for a project: purpose (finalité), datasets, ε/δ, duration
        and team. It is ``pending`` until the board approves, amends or refuses it."""
        return self._check(self._http.post("/v1/projects", json={
            "name": name, "title": title, "purpose": purpose, "datasets": list(datasets),
            "epsilon": epsilon, "delta": delta, "duration_days": duration_days,
            "team": list(team)}))

    def propose_indicator(self, name: str, title: str, sql: str, schedule: str | int, *,
                          audience: str, epsilon: float | None = None,
                          description: str = "", refreshes: int = 12,
                          epsilon_budget: float | None = None,
                          value_column: str | None = None) -> dict[str, Any]:
        """Propose a standing indicator: ``sql`` refreshed on ``schedule`` (``"hourly"``,
        ``"daily"``, ``"weekly"`` or seconds) for ``audience``, published read-only to
        observers. ``epsilon``: ε per refresh (sensitive tables; the budget asked covers
        ``refreshes`` of them, or give ``epsilon_budget``); restricted tables need none.
        The ethics board decides it like a project (``indicator-<name>``)."""
        return self._check(self._http.post("/v1/indicators", json={
            "name": name, "title": title, "sql": sql, "schedule": str(schedule),
            "audience": audience, "epsilon": epsilon, "description": description,
            "refreshes": refreshes, "epsilon_budget": epsilon_budget,
            "value_column": value_column}))

    def indicators(self) -> pd.DataFrame:
        """The standing indicators you proposed: status, schedule, last refresh."""
        body = self._check(self._http.get("/v1/indicators"))
        cols = ["name", "title", "status", "schedule", "tier", "epsilon", "project"]
        rows = [{**{k: i.get(k) for k in cols},
                 "last_refresh": (i.get("last_refresh") or {}).get("status")}
                for i in body["indicators"]]
        return pd.DataFrame(rows, columns=[*cols, "last_refresh"])

    def price(self, query: str, precision: float, project: str | None = None
              ) -> dict[str, Any]:
        """The ε a query on sensitive data would cost so that every released count and sum
        has a 95% noise interval no wider than ±``precision``; free: nothing is charged and
        nothing is sent to the nodes.

        Returns ``epsilon`` (per node, what ``sql(..., epsilon=)`` takes),
        ``epsilon_charged`` (what the project's ledger would be charged: ε × nodes unless
        they are disjoint), ``partials`` (each partial aggregate, its sensitivity and the ε it
        alone would need), ``notes`` (the assumption for averages and ratios) and
        ``epsilon_remaining``.
        """
        return self._check(self._http.post("/v1/price", json={
            "sql": query, "project": project, "precision": precision}))

    def dummy(self, table: str, rows: int = 1000, *, seed: int = 0) -> pd.DataFrame:
        """A dummy ``table``: its columns and declared types, ``rows`` rows of values drawn
        from public metadata only (public domains, declared bounds, types, null rates from
        the quality report), never from the data. The same seed gives the same table.
        Columns without a domain or bounds hold placeholders (numbers 0–100,
        ``<column>_<k>`` texts). For developing code; ``sql(..., dummy=True)`` runs a query
        on such data."""
        body = self._check(self._http.get(f"/v1/dummy/{table}",
                                          params={"rows": rows, "seed": seed}))
        df = result_frame(body)
        for c in body["columns"]:
            if c["sql_type"].upper().startswith(("DATE", "TIMESTAMP")):
                df[c["name"]] = pd.to_datetime(df[c["name"]])
        df.attrs["bulle"].update(dummy=True, sql_types={c["name"]: c["sql_type"]
                                                        for c in body["columns"]})
        return df

    def sql(self, query: str, project: str | None = None, *, epsilon: float | None = None,
            precision: float | None = None, dummy: bool = False, progress: bool = True
            ) -> pd.DataFrame:
        """Run a federated aggregate query; returns the released table.

        ``epsilon`` is the privacy cost of this query on sensitive data (default: the
        project's); the result says what was spent and what is left. ``precision=h``
        instead runs it at the ε :meth:`price` gives for ±h (the two are exclusive).
        ``dummy=True`` runs it on dummy partitions (see :meth:`dummy`): the same checks and
        the same shape of answer (columns, notes), no ε spent, nothing sent to the nodes.
        """
        if epsilon is not None and precision is not None:
            raise BulleError("bad_request", "give epsilon or precision, not both: the "
                             "precision decides the ε")
        started = time.monotonic()
        body = self._check(self._http.post(
            "/v1/queries", json={"sql": query, "project": project, "epsilon": epsilon,
                                 "precision": precision, "dummy": dummy, "wait_s": 5.0}))
        while body.get("status") == "running":
            if time.monotonic() - started > self.timeout:
                raise BulleError("timeout", f"query {body['id']} still running after "
                                 f"{self.timeout:g} s")
            if progress:
                _info(f"\rquery {body['id'][:8]} running… {time.monotonic() - started:.0f} s",
                      end="")
            body = self._check(self._http.get(f"/v1/queries/{body['id']}",
                                              params={"wait_s": 5.0}))
        if progress and time.monotonic() - started > 5:
            _info("")
        if body.get("status") == "failed":
            err = body.get("error", {})
            raise BulleError(err.get("code", "internal"), err.get("message", "query failed"),
                             err)
        result = body["result"]
        result["query_id"] = body["id"]
        if result.get("receipt"):  # with the SQL text: a verifier checks its hash too
            result["receipt"] = {**result["receipt"], "query": query}
        df = result_frame(result)
        if progress and result.get("budget"):
            b = result["budget"]
            _info(f"ε spent by this query: {result['epsilon_spent']:.4g}; project total "
                  f"{b['epsilon_spent']:.4g}, remaining {b['epsilon_remaining']:.4g}")
        return df

    def train(self, model: str, table: str, features: list[str], label: str, *,
              rounds: int = 5, epsilon: float = 1.0, delta: float | None = None,
              project: str | None = None, join: list[str] | None = None,
              order_by: str | None = None, bounds: dict[str, tuple[float, float]] | None = None,
              **options: Any) -> Any:
        """Start DP federated training of a vetted model (``logreg``, ``mlp``, ``gru``).

        ``label`` is binary: ``"score >= 40"``, a 0/1 column, or a column with a public
        domain compared to values (``"higher = 'yes'"``, ``"col IN ('a', 'b')"``); a table
        whose rows are persons (``privacy_unit = "row"``) trains too; ``join`` names open tables
        (``"assessments"`` or ``"assessments:id_assessment"``); the GRU reads each learner's
        rows ordered by ``order_by``. ``epsilon`` is the run's target at each node (the
        nodes calibrate their noise to it and to what the grant leaves). Returns a
        ``TrainingJob``: ``job.result()`` (weights, noisy metrics, ε), ``job.cancel()``.
        Options: ``lr``, ``batch_size``, ``hidden``, ``epochs``, ``max_len``,
        ``max_grad_norm``, ``noise_multiplier``, ``min_nodes``, ``round_timeout_s``.
        """
        from enclave._training import start_training

        return start_training(self, model=model, table=table, features=list(features),
                              label=label, rounds=rounds, epsilon=epsilon, delta=delta,
                              project=project, join=join, order_by=order_by,
                              bounds={k: list(v) for k, v in (bounds or {}).items()},
                              **options)


def connect(url: str | None = None, token: str | None = None, *, timeout: float = 300.0) -> Hub:
    """Connect to the coordinator; with no arguments, read ``BULLE_URL`` and ``BULLE_TOKEN``.

    In a hub notebook the spawner sets ``BULLE_URL`` (the coordinator service) and
    ``JUPYTERHUB_API_TOKEN`` (the server's hub token, carrying the user's Bulle scopes),
    which is used when ``BULLE_TOKEN`` is not set.
    """
    url = url or os.environ.get("BULLE_URL")
    token = token or os.environ.get("BULLE_TOKEN") or os.environ.get("JUPYTERHUB_API_TOKEN")
    if not url or not token:
        raise BulleError("not_configured", "no coordinator given: pass connect(url, token) or "
                         "set BULLE_URL and BULLE_TOKEN (try: eval \"$(bulle demo env)\")")
    return Hub(url, token, timeout)
