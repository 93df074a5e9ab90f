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
- ``BulleError``: a refused or failed query, with a ``code`` (docs/errors.md).

For ``jupyterhub_config.py`` (``_hub``, loads JupyterHub): ``BrokeredSpawner``,
``DemoAuthenticator``, ``CUSTOM_SCOPES``, ``roles_for``, ``read_users``, ``prepare_home``,
``landing_url``, ``refuse_server``, ``HOME``, ``LAUNCHER``, ``SERVICE``, ``TEMPLATES``,
``write_users``.
For the demo launcher (``bulle_demo``, as root, ``_users``): ``Account``, ``is_root``,
``ensure_service_user``, ``own``, ``mount_namespaces_work``, ``PERSON_PREFIX``.

Names load on first use (PEP 562): a notebook loads no JupyterHub code, the hub no pandas.
"""

from __future__ import annotations

from typing import Any

_SDK = ("BulleError", "Hub", "connect")
_RECEIPTS = ("ReceiptError", "save_receipt", "verify_receipt")
_HUB = ("CUSTOM_SCOPES", "HOME", "LAUNCHER", "SERVICE", "TEMPLATES", "BrokeredSpawner",
        "DemoAuthenticator", "landing_url", "prepare_home", "read_users", "refuse_server",
        "roles_for", "write_users")
# system users and file ownership as root (the demo launcher ``bulle_demo``)
_USERS = ("PERSON_PREFIX", "Account", "ensure_service_user", "is_root",
          "mount_namespaces_work", "own")
_LAZY = {**dict.fromkeys(_SDK, "enclave._client"),
         **dict.fromkeys(_RECEIPTS, "enclave._receipts"), **dict.fromkeys(_HUB, "enclave._hub"),
         **dict.fromkeys(_USERS, "enclave._users")}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'enclave' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
