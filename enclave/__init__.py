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
- Receipts: every released frame carries a signed receipt (``df.bulle.receipt``,
  ``df.bulle.save_receipt(path)``); ``verify_receipt(receipt, keys)`` checks one offline
  with the published keys (``Hub.keys()``, ``GET /v1/keys``), raising ``ReceiptError``.
- ``BulleError``: a refused or failed query, with a ``code``.
"""

from enclave._client import BulleError, Hub, connect
from enclave._receipts import ReceiptError, save_receipt, verify_receipt

__all__ = ["BulleError", "Hub", "ReceiptError", "connect", "save_receipt", "verify_receipt"]
