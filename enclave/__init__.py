"""Bulle for researchers.

- ``connect(url=None, token=None)`` → :class:`Hub`, reading ``BULLE_URL``/``BULLE_TOKEN``
  when called without arguments.
- ``Hub.catalog()``, ``Hub.describe(table)``, ``Hub.sql(query)`` → pandas DataFrames; the
  ``df.bulle`` accessor gives per-value metadata (``df.bulle.suppressed``, ``.notes``).
- ``Hub.price(query, precision=h)``: the ε for ±h at 95% (free); ``Hub.sql(query,
  precision=h)`` runs at it. ``Hub.dummy(table)`` and ``Hub.sql(query, dummy=True)``: data
  and answers drawn from public metadata only, nothing spent, no node asked.
- ``Hub.budget()``, ``Hub.projects()``, ``Hub.submit_project(...)``: ε left, your projects,
  a new project for the ethics board.
- ``Hub.train(model, table, features, label, rounds=…, epsilon=…)`` → a training job
  (DP federated training): ``job.result()`` (weights, noisy metrics, ε), ``job.cancel()``.
- ``BulleError``: a refused or failed query, with a ``code``.
"""

from enclave._client import BulleError, Hub, connect

__all__ = ["BulleError", "Hub", "connect"]
