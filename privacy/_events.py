"""The privacy events a SQL node charges, and their RDP in closed form (no dp-accounting).

A node's DP releases are Laplace, Gaussian and zCDP mechanisms, composed. Their RDP curves
have closed forms, so a SQL node needs neither dp-accounting nor scipy (~150 MB in an
image): these classes carry the same names and fields as dp-accounting's events and
serialise to exactly the same JSON (``{"type": "LaplaceDpEvent", "noise_multiplier": …}``),
so ledgers written with either read the same. Events these forms do not cover (DP-SGD's
Poisson-subsampled Gaussian, at training nodes and the coordinator) stay dp-accounting's
(privacy/_accounting.py falls back to its ``RdpAccountant`` for them).

Each RDP equals dp-accounting's ``RdpAccountant`` at the same orders (tests check it over a
grid of noise multipliers): Laplace, Mironov 2017 Prop. 6; Gaussian α/(2σ²); (ξ, ρ)-zCDP
ξ + ρα; compositions add.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any


class DpEvent:
    """Base of the closed-form events (a plain-data, frozen dataclass each)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class NoOpDpEvent(DpEvent):
    """An operation that costs nothing."""


@dataclass(frozen=True, slots=True)
class LaplaceDpEvent(DpEvent):
    """Laplace noise of scale b on a query of L1 sensitivity Δ: ``noise_multiplier`` = b/Δ."""

    noise_multiplier: float


@dataclass(frozen=True, slots=True)
class GaussianDpEvent(DpEvent):
    """Gaussian noise σ on a query of L2 sensitivity Δ: ``noise_multiplier`` = σ/Δ."""

    noise_multiplier: float


@dataclass(frozen=True, slots=True)
class ZCDpEvent(DpEvent):
    """A (ξ, ρ)-zCDP mechanism: (α, ξ + ρα)-RDP for every α."""

    rho: float
    xi: float = 0.0


@dataclass(frozen=True, slots=True)
class SelfComposedDpEvent(DpEvent):
    """``event`` applied ``count`` times."""

    event: Any  # a DpEvent here, or dp-accounting's
    count: int


@dataclass(frozen=True, slots=True)
class ComposedDpEvent(DpEvent):
    """``events`` applied in turn (adaptively)."""

    events: tuple[Any, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "events", tuple(self.events))  # lists accepted, as dpa


EVENT_CLASSES: dict[str, type[DpEvent]] = {
    c.__name__: c for c in (NoOpDpEvent, LaplaceDpEvent, GaussianDpEvent, ZCDpEvent,
                            SelfComposedDpEvent, ComposedDpEvent)}


def event_to_dict(event: Any) -> dict[str, Any]:
    """dp-accounting's JSON form of an event, ours or dp-accounting's (mixed trees too):
    ``{"type": class name, field: value, …}``."""
    if isinstance(event, DpEvent):
        items = [(f.name, getattr(event, f.name)) for f in fields(event)]  # type: ignore[arg-type]
    elif _is_dpa(event):
        import attr

        items = [(f.name, getattr(event, f.name)) for f in attr.fields(type(event))]
    else:
        raise TypeError(f"not a DpEvent: {event!r}")

    def conv(v: Any) -> Any:
        if isinstance(v, DpEvent) or _is_dpa(v):
            return event_to_dict(v)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return {"type": type(event).__name__, **{name: conv(v) for name, v in items}}


def _is_dpa(v: Any) -> bool:
    """A dp-accounting event (checked without loading dp-accounting for anything else)."""
    if not type(v).__module__.startswith("dp_accounting."):
        return False
    from dp_accounting import dp_event

    return isinstance(v, dp_event.DpEvent)


def covers(data: dict[str, Any]) -> bool:
    """Whether every event in a serialised event tree is one of the closed-form classes."""
    kind = data.get("type")
    if kind == "SelfComposedDpEvent":
        return isinstance(data.get("event"), dict) and covers(data["event"])
    if kind == "ComposedDpEvent":
        return all(isinstance(e, dict) and covers(e) for e in data.get("events", ()))
    return kind in EVENT_CLASSES


def from_dict(data: dict[str, Any]) -> DpEvent:
    """Inverse of ``event_to_dict`` for a tree that ``covers`` accepts."""
    cls = EVENT_CLASSES.get(str(data.get("type")))
    if cls is None:
        raise ValueError(f"unknown DpEvent type {data.get('type')!r}")

    def conv(v: Any) -> Any:
        if isinstance(v, dict) and "type" in v:
            return from_dict(v)
        if isinstance(v, list):
            return [conv(x) for x in v]
        return v

    return cls(**{k: conv(v) for k, v in data.items() if k != "type"})


# ------------------------------------------------------------------------- closed forms


def laplace_rdp(noise_multiplier: float, orders: Sequence[float]) -> list[float]:
    """RDP of Laplace noise with scale/sensitivity ``noise_multiplier`` (Mironov 2017, Prop. 6).

    With ε = 1/b: D_α = ε + log(1 + (α−1)·(e^{(1−2α)ε} − 1)/(2α−1)) / (α−1), written with
    ``expm1``/``log1p``: the exponent is never positive (no overflow for large α and small b,
    where e^{(α−1)/b} in the textbook form overflows) and small ε keeps its precision.
    """
    b = float(noise_multiplier)
    if not (b > 0 and math.isfinite(b)):
        raise ValueError(f"Laplace noise_multiplier must be positive and finite, got {b}")
    eps = 1.0 / b
    out = []
    for a in orders:
        if a == 1:  # the KL limit
            out.append(eps + math.expm1(-eps))
        elif a < 1.1:  # log1p(c·x)/x by its series (as dp-accounting, for α near 1)
            c = math.expm1(eps * (1 - 2 * a)) / (2 * a - 1)
            v = -c * (a - 1)
            out.append(eps + c * math.fsum(v ** (k - 1) / k for k in range(1, 100)))
        else:
            out.append(eps + math.log1p((a - 1) * math.expm1(eps * (1 - 2 * a)) / (2 * a - 1))
                       / (a - 1))
    return out


def gaussian_rdp(noise_multiplier: float, orders: Sequence[float]) -> list[float]:
    """RDP of the Gaussian mechanism: α / (2σ²); infinite without noise."""
    s = float(noise_multiplier)
    if not (s >= 0 and math.isfinite(s)):
        raise ValueError(f"Gaussian noise_multiplier must be non-negative, got {s}")
    return [math.inf if s == 0 else a / (2 * s * s) for a in orders]


def zcdp_rdp(rho: float, xi: float, orders: Sequence[float]) -> list[float]:
    """RDP of a (ξ, ρ)-zCDP mechanism: ξ + ρα."""
    if not (rho >= 0 and xi >= 0):
        raise ValueError(f"zCDP needs rho >= 0 and xi >= 0, got rho={rho}, xi={xi}")
    return [xi + rho * a for a in orders]
