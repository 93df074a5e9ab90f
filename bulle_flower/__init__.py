"""Bulle's Flower app: DP federated training of vetted models (the FAB's content).

- ``spec``: ``TrainSpec``, the run's spec: one frozen type the coordinator builds and
  signs, the ServerApp and the nodes rebuild (``from_dict``/``to_dict``, checked once);
- ``models``: the model zoo (logistic regression, MLP, GRU over learning traces);
- ``server_app``: the ServerApp (FedAvg, rounds, progress files for the coordinator);
- ``client_app``: the ClientApp entry (work in ``nodes._training``, at the node);
- ``_fab``: the deterministic FAB of this package and its sha256 (``build_fab``,
  ``fab_sha256``, ``released_sha256``);
- ``_fence``: the shared-secret fences of Flower's local APIs (``AppIoFence``,
  ``SecretHeader``, ``new_secret``, ``take_secret``, ``loopback_with_secret``, …);
- ``_patches``: the pinned-Flower latency patches (``IdleBackoff``, ``cap_pull_backoff``,
  ``cap_supernode_sleep``).

Public names load on first use (PEP 562): importing ``bulle_flower.spec`` loads no Flower.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "build_fab": "bulle_flower._fab",
    "fab_sha256": "bulle_flower._fab",
    "released_sha256": "bulle_flower._fab",
    "APPIO_SECRET_ENV": "bulle_flower._fence",
    "ASGI": "bulle_flower._fence",
    "AppIoFence": "bulle_flower._fence",
    "SUPERLINK_SECRET_ENV": "bulle_flower._fence",
    "Scope": "bulle_flower._fence",
    "SecretHeader": "bulle_flower._fence",
    "deny": "bulle_flower._fence",
    "loopback_with_secret": "bulle_flower._fence",
    "new_secret": "bulle_flower._fence",
    "send_secret_on_runtime_calls": "bulle_flower._fence",
    "take_secret": "bulle_flower._fence",
    "IdleBackoff": "bulle_flower._patches",
    "cap_pull_backoff": "bulle_flower._patches",
    "cap_supernode_sleep": "bulle_flower._patches",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bulle_flower' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
