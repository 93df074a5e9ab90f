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

For the hub's side (``jupyterhub_config.py`` and the demo launcher ``bulle_demo``), loaded
only when asked for (a notebook never loads them): ``write_users`` (the demo
authenticator's user file, ``_hub``); system users and file ownership as root
(``_users``): ``Account``, ``is_root``, ``ensure_service_user``, ``own``,
``mount_namespaces_work``, ``PERSON_PREFIX``.
"""

from typing import Any

from enclave._client import BulleError, Hub, connect
from enclave._receipts import ReceiptError, save_receipt, verify_receipt

__all__ = ["PERSON_PREFIX", "Account", "BulleError", "Hub", "ReceiptError", "connect",
           "ensure_service_user", "is_root", "mount_namespaces_work", "own", "save_receipt",
           "verify_receipt", "write_users"]

_LAZY = {
    "write_users": "enclave._hub",  # imports jupyterhub
    "Account": "enclave._users",
    "PERSON_PREFIX": "enclave._users",
    "ensure_service_user": "enclave._users",
    "is_root": "enclave._users",
    "mount_namespaces_work": "enclave._users",
    "own": "enclave._users",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'enclave' has no attribute {name!r}")
