"""Bulle's privacy library: pure functions and the stores of the privacy ledger and audit.

Map of the public API:
- Restricted tier (the cell key method, ``_ckm``): ``CkmParams``, ``generate_ptable``,
  ``load_ptable``, ``ptable_for``, ``describe_ptable``, ``count_perturbation``,
  ``magnitude_draw``, ``magnitude_sd``, ``PtableError``.
- DP releases (``_mechanisms``, noise from OpenDP only): ``dp_count``, ``dp_sum``,
  ``dp_mean``, ``dp_variance``, ``dp_quantile`` → ``Release``; raw vector noise
  ``laplace_noise``, ``gaussian_noise``; calibration ``laplace_scale``, ``gaussian_sigma``,
  ``laplace_halfwidth``, ``gaussian_halfwidth``, ``quantile_rank_error``; ``dp_available``
  (OpenDP is the ``dp`` extra: installed or not).
- Events to charge: ``laplace_event``, ``gaussian_event``, ``aggregate_event`` (the event of
  a ``dp_*`` call, to charge before releasing) give the closed-form events of ``_events``
  (``DpEvent``, ``LaplaceDpEvent``, ``GaussianDpEvent``, ``ZCDpEvent``,
  ``SelfComposedDpEvent``, ``ComposedDpEvent``: dp-accounting's names and JSON, RDP without
  dp-accounting or scipy); ``opacus_event`` gives dp-accounting's (DP-SGD).
- Accounting (``_accounting``): ``RdpTotals`` (running RDP sums, O(1) budget checks),
  ``rdp_epsilon``, ``pld_epsilon``, ``report_epsilon``, ``event_to_dict``,
  ``event_from_dict``.
- DP training's noise searches (``_calibrate``): ``calibrate`` (DP-SGD's σ for a run's
  budget), ``sigma_for_eval``, ``per_node_target``, ``round_event``, ``SIGMA_RANGE``.
- Ledger (``_ledger``, SQLAlchemy Core): ``Ledger`` (``set_budget``, ``charge``, ``spent``,
  ``history``), ``ChargeResult``, ``ChargeRecord``, ``LedgerError``; ``PROJECT_WIDE`` (the
  scope of a project's budget across datasets), ``ledger_metadata`` (its tables, for the
  migrations).
- Grants (``_grants``, Ed25519): ``Grant``, ``generate_board_keys``, ``sign_grant``,
  ``verify_grant``, ``GrantError``, ``load_public_key`` (a PEM Ed25519 public key).
- For the training node (``nodes/_flower.py``): ``rdp_of_key`` (the cached RDP curve of a
  ledger event's key).
- Board requests (``_boardreq``, the board's key as its CLI credential): ``BoardRequest``,
  ``sign_board_request``, ``verify_board_request``, ``BOARD_REQUEST_SCHEME``.
- Run authorisations (``_runauth``, the coordinator's Ed25519 key): ``RunAuthorisation``,
  ``sign_run_authorisation``, ``verify_run_authorisation``, ``coordinator_keys``,
  ``canonical_sha256``, ``grant_id``, ``spec_json``.
- Release receipts (``_receipts``, Ed25519 of nodes and coordinator): ``sign_partial``,
  ``sign_release``, ``verify_receipt``, ``ReceiptError``, ``values_sha256``,
  ``released_values``, ``receipt_commitment``, ``new_salt``, ``open_partial_statement``,
  ``receipt_keys``, ``public_key_entry``, ``RECEIPT_KEY_FILE``.
- Audit (``_audit``, hash chain): ``AuditLog`` (``append``, ``verify``, ``head``),
  ``AuditEntry``, ``AuditReport``; ``audit_entry_hash`` and ``AUDIT_GENESIS`` (to check a
  page of entries received from elsewhere).
"""
from __future__ import annotations

from typing import Any

# Public name → (module, name in it). Loaded on first use (PEP 562): a node serving SQL
# must not pay for the accounting, calibration or ledger code it does not touch.
_LAZY: dict[str, tuple[str, str]] = {
    "AuditEntry": ("privacy._audit", "AuditEntry"),
    "AUDIT_GENESIS": ("privacy._audit", "GENESIS"),
    "audit_entry_hash": ("privacy._audit", "entry_hash"),
    "BOARD_REQUEST_SCHEME": ("privacy._boardreq", "SCHEME"),
    "BoardRequest": ("privacy._boardreq", "BoardRequest"),
    "sign_board_request": ("privacy._boardreq", "sign_board_request"),
    "verify_board_request": ("privacy._boardreq", "verify_board_request"),
    "AuditLog": ("privacy._audit", "AuditLog"),
    "AuditReport": ("privacy._audit", "AuditReport"),
    "ChargeRecord": ("privacy._ledger", "ChargeRecord"),
    "ComposedDpEvent": ("privacy._events", "ComposedDpEvent"),
    "DpEvent": ("privacy._events", "DpEvent"),
    "GaussianDpEvent": ("privacy._events", "GaussianDpEvent"),
    "LaplaceDpEvent": ("privacy._events", "LaplaceDpEvent"),
    "SelfComposedDpEvent": ("privacy._events", "SelfComposedDpEvent"),
    "ZCDpEvent": ("privacy._events", "ZCDpEvent"),
    "ChargeResult": ("privacy._ledger", "ChargeResult"),
    "CkmParams": ("privacy._ckm", "CkmParams"),
    "Grant": ("privacy._grants", "Grant"),
    "GrantError": ("privacy._grants", "GrantError"),
    "Ledger": ("privacy._ledger", "Ledger"),
    "LedgerError": ("privacy._ledger", "LedgerError"),
    "PROJECT_WIDE": ("privacy._ledger", "PROJECT_WIDE"),
    "PtableError": ("privacy._ckm", "PtableError"),
    "RdpTotals": ("privacy._accounting", "RdpTotals"),
    "rdp_of_key": ("privacy._accounting", "rdp_of_key"),  # cached RDP of an event's key
    "load_public_key": ("privacy._grants", "load_public_key"),
    "RECEIPT_KEY_FILE": ("privacy._receipts", "RECEIPT_KEY_FILE"),
    "ReceiptError": ("privacy._receipts", "ReceiptError"),
    "new_salt": ("privacy._receipts", "new_salt"),
    "open_partial_statement": ("privacy._receipts", "open_partial_statement"),
    "public_key_entry": ("privacy._receipts", "public_key_entry"),
    "receipt_commitment": ("privacy._receipts", "commitment"),
    "receipt_keys": ("privacy._receipts", "receipt_keys"),
    "released_values": ("privacy._receipts", "released_values"),
    "sign_partial": ("privacy._receipts", "sign_partial"),
    "sign_release": ("privacy._receipts", "sign_release"),
    "values_sha256": ("privacy._receipts", "values_sha256"),
    "verify_receipt": ("privacy._receipts", "verify_receipt"),
    "Release": ("privacy._mechanisms", "Release"),
    "RunAuthorisation": ("privacy._runauth", "RunAuthorisation"),
    "SIGMA_RANGE": ("privacy._calibrate", "SIGMA_RANGE"),
    "aggregate_event": ("privacy._mechanisms", "aggregate_event"),
    "calibrate": ("privacy._calibrate", "calibrate"),
    "canonical_sha256": ("privacy._runauth", "canonical_sha256"),
    "coordinator_keys": ("privacy._runauth", "coordinator_keys"),
    "count_perturbation": ("privacy._ckm", "count_perturbation"),
    "describe_ptable": ("privacy._ckm", "describe_ptable"),
    "dp_available": ("privacy._mechanisms", "dp_available"),
    "dp_count": ("privacy._mechanisms", "dp_count"),
    "dp_mean": ("privacy._mechanisms", "dp_mean"),
    "dp_quantile": ("privacy._mechanisms", "dp_quantile"),
    "dp_sum": ("privacy._mechanisms", "dp_sum"),
    "dp_variance": ("privacy._mechanisms", "dp_variance"),
    "event_from_dict": ("privacy._accounting", "event_from_dict"),
    "event_to_dict": ("privacy._accounting", "event_to_dict"),
    "gaussian_event": ("privacy._mechanisms", "gaussian_event"),
    "gaussian_halfwidth": ("privacy._mechanisms", "gaussian_halfwidth"),
    "gaussian_noise": ("privacy._mechanisms", "gaussian_noise"),
    "gaussian_sigma": ("privacy._mechanisms", "gaussian_sigma"),
    "generate_board_keys": ("privacy._grants", "generate_board_keys"),
    "generate_ptable": ("privacy._ckm", "generate_ptable"),
    "grant_id": ("privacy._runauth", "grant_id"),
    "laplace_event": ("privacy._mechanisms", "laplace_event"),
    "laplace_halfwidth": ("privacy._mechanisms", "laplace_halfwidth"),
    "laplace_noise": ("privacy._mechanisms", "laplace_noise"),
    "laplace_scale": ("privacy._mechanisms", "laplace_scale"),
    "ledger_metadata": ("privacy._ledger", "metadata"),
    "load_ptable": ("privacy._ckm", "load_ptable"),
    "magnitude_draw": ("privacy._ckm", "magnitude_draw"),
    "magnitude_sd": ("privacy._ckm", "magnitude_sd"),
    "opacus_event": ("privacy._mechanisms", "opacus_event"),
    "per_node_target": ("privacy._calibrate", "per_node_target"),
    "pld_epsilon": ("privacy._accounting", "pld_epsilon"),
    "ptable_for": ("privacy._ckm", "ptable_for"),
    "quantile_rank_error": ("privacy._mechanisms", "quantile_rank_error"),
    "rdp_epsilon": ("privacy._accounting", "rdp_epsilon"),
    "report_epsilon": ("privacy._accounting", "report_epsilon"),
    "round_event": ("privacy._calibrate", "round_event"),
    "sigma_for_eval": ("privacy._calibrate", "sigma_for_eval"),
    "sign_grant": ("privacy._grants", "sign_grant"),
    "sign_run_authorisation": ("privacy._runauth", "sign_run_authorisation"),
    "spec_json": ("privacy._runauth", "spec_json"),
    "verify_grant": ("privacy._grants", "verify_grant"),
    "verify_run_authorisation": ("privacy._runauth", "verify_run_authorisation"),
}

__all__ = [
    "CkmParams",
    "PtableError",
    "count_perturbation",
    "describe_ptable",
    "generate_ptable",
    "load_ptable",
    "magnitude_draw",
    "magnitude_sd",
    "ptable_for",
]
__all__ += [
    "BOARD_REQUEST_SCHEME",
    "BoardRequest",
    "sign_board_request",
    "verify_board_request",
]
__all__ += ["load_public_key", "rdp_of_key"]
__all__ += [
    "RunAuthorisation",
    "canonical_sha256",
    "coordinator_keys",
    "grant_id",
    "sign_run_authorisation",
    "spec_json",
    "verify_run_authorisation",
]
__all__ += [
    "RECEIPT_KEY_FILE",
    "ReceiptError",
    "new_salt",
    "open_partial_statement",
    "public_key_entry",
    "receipt_commitment",
    "receipt_keys",
    "released_values",
    "sign_partial",
    "sign_release",
    "values_sha256",
    "verify_receipt",
]
__all__ += [
    "ComposedDpEvent",
    "DpEvent",
    "GaussianDpEvent",
    "LaplaceDpEvent",
    "SelfComposedDpEvent",
    "ZCDpEvent",
]
__all__ += [
    "SIGMA_RANGE",
    "calibrate",
    "per_node_target",
    "round_event",
    "sigma_for_eval",
]
__all__ += [
    "AUDIT_GENESIS",
    "PROJECT_WIDE",
    "AuditEntry",
    "AuditLog",
    "AuditReport",
    "ChargeRecord",
    "ChargeResult",
    "Grant",
    "GrantError",
    "Ledger",
    "LedgerError",
    "RdpTotals",
    "Release",
    "aggregate_event",
    "audit_entry_hash",
    "dp_available",
    "dp_count",
    "dp_mean",
    "dp_quantile",
    "dp_sum",
    "dp_variance",
    "event_from_dict",
    "event_to_dict",
    "gaussian_event",
    "gaussian_halfwidth",
    "gaussian_noise",
    "gaussian_sigma",
    "generate_board_keys",
    "laplace_event",
    "laplace_halfwidth",
    "laplace_noise",
    "laplace_scale",
    "ledger_metadata",
    "opacus_event",
    "pld_epsilon",
    "quantile_rank_error",
    "rdp_epsilon",
    "report_epsilon",
    "sign_grant",
    "verify_grant",
]


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'privacy' has no attribute {name!r}") from None
    import importlib

    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
