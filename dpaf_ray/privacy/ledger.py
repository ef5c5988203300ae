"""The privacy ledger: the single source of every ε this program prints or writes.

Every private release that is *executed* is charged here, as a `dp_accounting`
event; ε is always computed from these entries (never from a plan). The JSON form
lists the mechanisms with their parameters so that anyone can recompute ε
independently (see `privacy_report.json`).

Entry kinds (σ is per unit of L2 sensitivity):
- ``poisson_gaussian``: Poisson-sampled Gaussian at rate q with noise multiplier σ.
  One DPAF iteration that releases DPAGG *and* a DP-SGD update on the same sample
  is one such entry with σ_eff = (σ_agg⁻² + σ_sgd⁻²)^(-1/2) (docs/design.md rule 9).
- ``gaussian``: an unsampled Gaussian release (a noisy count or histogram).
- ``repeat_and_select``: Papernot–Steinke private hyperparameter search over a
  random number of runs of a reference mechanism.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import dp_accounting
import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

# Dense low orders matter for large ε and for the repeat-and-select bound.
RDP_ORDERS: tuple[float, ...] = tuple(
    sorted(
        set(
            [1.05, 1.1, 1.15, 1.2, 1.25, 1.3, 1.4, 1.5, 1.6, 1.75, 1.9, 2.0, 2.25, 2.5, 2.75, 3.0, 3.5, 4.0, 4.5]
            + list(np.round(np.arange(5.0, 11.0, 0.5), 2))
            + list(range(11, 64))
            + [64, 80, 96, 128, 192, 256, 512, 1024]
        )
    )
)


class PrivacyConfigError(ValueError):
    """An impossible budget or privacy knob; the message says what to change."""


@dataclass(frozen=True)
class PoissonGaussian:
    sampling_rate: float
    noise_multiplier: float
    count: int = 1

    def dp_event(self) -> dp_accounting.DpEvent:
        one = dp_accounting.PoissonSampledDpEvent(
            self.sampling_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier)
        )
        return dp_accounting.SelfComposedDpEvent(one, self.count)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "poisson_gaussian",
            "sampling_rate": self.sampling_rate,
            "noise_multiplier": self.noise_multiplier,
            "count": self.count,
        }


@dataclass(frozen=True)
class Gaussian:
    noise_multiplier: float
    count: int = 1

    def dp_event(self) -> dp_accounting.DpEvent:
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.GaussianDpEvent(self.noise_multiplier), self.count
        )

    def to_json(self) -> dict[str, Any]:
        return {"kind": "gaussian", "noise_multiplier": self.noise_multiplier, "count": self.count}


@dataclass(frozen=True)
class RepeatAndSelect:
    """Runs of `events` repeated a random number of times K, best one released."""

    events: tuple["Entry", ...]
    mean: float
    shape: float  # math.inf for Poisson, 0 logarithmic, 1 geometric, else TNB

    def dp_event(self) -> dp_accounting.DpEvent:
        inner = dp_accounting.ComposedDpEvent([e.dp_event() for e in self.events])
        return dp_accounting.dp_event.RepeatAndSelectDpEvent(inner, self.mean, self.shape)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "repeat_and_select",
            "event": {"kind": "composed", "events": [e.to_json() for e in self.events]},
            "mean": self.mean,
            "shape": "inf" if math.isinf(self.shape) else self.shape,
        }


Entry = Union[PoissonGaussian, Gaussian, RepeatAndSelect]


def entry_from_json(d: dict[str, Any]) -> Entry:
    kind = d.get("kind")
    if kind == "poisson_gaussian":
        return PoissonGaussian(float(d["sampling_rate"]), float(d["noise_multiplier"]), int(d["count"]))
    if kind == "gaussian":
        return Gaussian(float(d["noise_multiplier"]), int(d["count"]))
    if kind == "repeat_and_select":
        inner = d["event"]
        events = inner["events"] if inner.get("kind") == "composed" else [inner]
        shape = math.inf if d["shape"] in ("inf", "Infinity", math.inf) else float(d["shape"])
        return RepeatAndSelect(tuple(entry_from_json(e) for e in events), float(d["mean"]), shape)
    raise ValueError(f"unknown ledger entry kind {kind!r}")


def coalesced(entries: Iterable[Entry]) -> list[Entry]:
    """The same composition with each repeated mechanism counted once.

    RDP composition is commutative, so a schedule that alternates two mechanisms
    (k > 1: DPAGG-only iterations between shared-sample ones) costs two RDP evaluations
    instead of one per iteration.
    """
    merged: dict[tuple, PoissonGaussian | Gaussian] = {}
    rest: list[Entry] = []
    for e in entries:
        key = _mechanism_key(e)
        if key is None:
            rest.append(e)
        elif key in merged:
            merged[key] = _with_count(merged[key], merged[key].count + e.count)  # type: ignore[union-attr]
        else:
            merged[key] = e  # type: ignore[assignment]
    return [*merged.values(), *rest]


def rdp_curve(entries: Iterable[Entry], orders: Sequence[float] = RDP_ORDERS) -> np.ndarray:
    """RDP of the composition of `entries` at `orders` (add/remove-one neighbours)."""
    entries = coalesced(entries)
    acc = dp_accounting.rdp.RdpAccountant(list(orders))
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # orders where a series does not converge are dropped (safe), quietly
    try:
        acc.compose(dp_accounting.ComposedDpEvent([e.dp_event() for e in entries]))
    finally:
        absl_log.setLevel(level)
    return np.asarray(acc.rdp, dtype=np.float64).copy()  # the curve itself, for dominance checks


def epsilon_from_rdp(rdp: np.ndarray, delta: float, orders: Sequence[float] = RDP_ORDERS) -> float:
    eps, _ = rdp_lib.compute_epsilon(list(orders), list(rdp), delta)
    return float(eps)


def validate_budget(epsilon: float, delta: float) -> None:
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise PrivacyConfigError(f"epsilon must be a finite number > 0, got {epsilon}; pass e.g. --epsilon 10")
    if not (0 < delta < 1):
        raise PrivacyConfigError(
            f"delta must lie strictly between 0 and 1, got {delta}; use a value below 1/N, e.g. --delta 1e-5"
        )


@dataclass
class PrivacyLedger:
    """What was executed, in order; consecutive identical mechanisms are merged into one count."""

    entries: list[Entry] = field(default_factory=list)
    orders: tuple[float, ...] = RDP_ORDERS

    def charge_poisson_gaussian(self, sampling_rate: float, noise_multiplier: float, count: int = 1) -> None:
        self._charge(PoissonGaussian(float(sampling_rate), float(noise_multiplier), count))

    def charge_gaussian(self, noise_multiplier: float, count: int = 1) -> None:
        self._charge(Gaussian(float(noise_multiplier), count))

    def charge_repeat_and_select(self, events: Sequence[Entry], mean: float, shape: float) -> None:
        self.entries.append(RepeatAndSelect(tuple(events), float(mean), float(shape)))

    def _charge(self, entry: PoissonGaussian | Gaussian) -> None:
        if entry.count <= 0:
            return
        if entry.noise_multiplier <= 0 or not math.isfinite(entry.noise_multiplier):
            raise PrivacyConfigError(f"noise multiplier must be > 0, got {entry.noise_multiplier}")
        last = self.entries[-1] if self.entries else None
        if last is not None and _mechanism_key(last) == _mechanism_key(entry):
            self.entries[-1] = _with_count(last, last.count + entry.count)  # type: ignore[arg-type]
        else:
            self.entries.append(entry)

    def extend(self, other: "PrivacyLedger") -> None:
        for e in other.entries:
            if isinstance(e, RepeatAndSelect):
                self.entries.append(e)
            else:
                self._charge(e)

    def rdp(self) -> np.ndarray:
        return rdp_curve(self.entries, self.orders)

    def epsilon(self, delta: float) -> float:
        if not self.entries:
            return 0.0
        return epsilon_from_rdp(self.rdp(), delta, self.orders)

    def to_json(self) -> dict[str, Any]:
        return {
            "accountant": "rdp",
            "neighboring_relation": "add_or_remove_one",
            "orders": list(self.orders),
            "events": [e.to_json() for e in self.entries],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "PrivacyLedger":
        orders = tuple(float(o) for o in d.get("orders", RDP_ORDERS))
        return cls([entry_from_json(e) for e in d["events"]], orders)

    def save(self, path: str | Path) -> None:
        """Atomic write: a crash mid-write never leaves a truncated ledger behind."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "PrivacyLedger":
        return cls.from_json(json.loads(Path(path).read_text()))


def _mechanism_key(e: Entry) -> tuple | None:
    """What identifies a mechanism apart from its count; None for entries that never merge."""
    if isinstance(e, PoissonGaussian):
        return ("poisson_gaussian", e.sampling_rate, e.noise_multiplier)
    if isinstance(e, Gaussian):
        return ("gaussian", e.noise_multiplier)
    return None


def _with_count(e: PoissonGaussian | Gaussian, count: int) -> PoissonGaussian | Gaussian:
    if isinstance(e, PoissonGaussian):
        return PoissonGaussian(e.sampling_rate, e.noise_multiplier, count)
    return Gaussian(e.noise_multiplier, count)


def effective_noise_multiplier(sigma_agg: float, sigma_sgd: float) -> float:
    """σ of the single Gaussian that dominates a DPAGG release and a DP-SGD release on one sample."""
    return (sigma_agg ** -2 + sigma_sgd ** -2) ** -0.5
