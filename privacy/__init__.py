"""Bulle's privacy library: pure functions and the stores of the privacy ledger and audit.

Map of the public API:
- Restricted tier (the cell key method, ``_ckm``): ``CkmParams``, ``generate_ptable``,
  ``load_ptable``, ``ptable_for``, ``describe_ptable``, ``count_perturbation``,
  ``magnitude_draw``, ``magnitude_sd``, ``PtableError``.
- DP releases (``_mechanisms``, noise from OpenDP only): ``dp_count``, ``dp_sum``,
  ``dp_mean``, ``dp_variance``, ``dp_quantile`` → ``Release``; raw vector noise
  ``laplace_noise``, ``gaussian_noise``; calibration ``laplace_scale``, ``gaussian_sigma``,
  ``laplace_halfwidth``, ``gaussian_halfwidth``, ``quantile_rank_error``.
- Events to charge (dp-accounting): ``laplace_event``, ``gaussian_event``, ``opacus_event``,
  ``aggregate_event`` (the event of a ``dp_*`` call, to charge before releasing).
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
  ``verify_grant``, ``GrantError``.
- Run authorisations (``_runauth``, the coordinator's Ed25519 key): ``RunAuthorisation``,
  ``sign_run_authorisation``, ``verify_run_authorisation``, ``coordinator_keys``,
  ``canonical_sha256``, ``grant_id``, ``spec_json``.
- Audit (``_audit``, hash chain): ``AuditLog`` (``append``, ``verify``, ``head``),
  ``AuditEntry``, ``AuditReport``.
"""

from privacy._accounting import (
    RdpTotals,
    event_from_dict,
    event_to_dict,
    pld_epsilon,
    rdp_epsilon,
    report_epsilon,
)
from privacy._audit import AuditEntry, AuditLog, AuditReport
from privacy._calibrate import (
    SIGMA_RANGE,
    calibrate,
    per_node_target,
    round_event,
    sigma_for_eval,
)
from privacy._ckm import (
    CkmParams,
    PtableError,
    count_perturbation,
    describe_ptable,
    generate_ptable,
    load_ptable,
    magnitude_draw,
    magnitude_sd,
    ptable_for,
)
from privacy._grants import Grant, GrantError, generate_board_keys, sign_grant, verify_grant
from privacy._ledger import PROJECT_WIDE, ChargeRecord, ChargeResult, Ledger, LedgerError
from privacy._ledger import metadata as ledger_metadata
from privacy._mechanisms import (
    Release,
    aggregate_event,
    dp_count,
    dp_mean,
    dp_quantile,
    dp_sum,
    dp_variance,
    gaussian_event,
    gaussian_halfwidth,
    gaussian_noise,
    gaussian_sigma,
    laplace_event,
    laplace_halfwidth,
    laplace_noise,
    laplace_scale,
    opacus_event,
    quantile_rank_error,
)
from privacy._runauth import (
    RunAuthorisation,
    canonical_sha256,
    coordinator_keys,
    grant_id,
    sign_run_authorisation,
    spec_json,
    verify_run_authorisation,
)

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
    "RunAuthorisation",
    "canonical_sha256",
    "coordinator_keys",
    "grant_id",
    "sign_run_authorisation",
    "spec_json",
    "verify_run_authorisation",
]
__all__ += [
    "SIGMA_RANGE",
    "calibrate",
    "per_node_target",
    "round_event",
    "sigma_for_eval",
]
__all__ += [
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
