"""Autoscaling decision engine for elastic replicas: pure Python, no Ray, no torch.

The request trigger follows Ray Serve's `autoscaling_config` meanings:

* desired replicas = ceil(total ongoing requests / target_ongoing_requests),
  clamped to [min_replicas, max_replicas];
* a scale-up is taken only after "want more" held continuously for `upscale_delay_s`,
  a scale-down only after "want fewer" held continuously for `downscale_delay_s`;
  a sample that wants the other direction, or no change, resets the timer.

Two more triggers come on top:

* KV utilisation (mean over replicas of the fraction of KV blocks in use):
  >= `kv_utilization_high` wants at least current + 1; a scale-down is allowed only at
  <= `kv_utilization_low`, and never below the count that keeps the projected utilisation
  `util * current / desired` at or under `kv_utilization_high`.
* TTFT SLO (`ttft_slo_s`, optional): the max over replicas of their recent p90 TTFT above
  the SLO wants at least current + 1; no scale-down while it is above 0.8 x SLO.

`AutoscalePolicy.desired` says what the metrics ask for now; `AutoscalePolicy.decide`
applies the delays and is meant to be called periodically by a control loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fabric.config import AutoscaleConfig
from fabric.errors import ConfigError

__all__ = ["TTFT_DOWNSCALE_FRACTION", "AutoscalePolicy", "Decision", "ReplicaLoad"]

TTFT_DOWNSCALE_FRACTION = 0.8   # no scale-down while recent TTFT > this x ttft_slo_s
_EPS = 1e-9                     # float slack for ceil() of sums and for elapsed-time checks


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica's load report.

    ongoing_requests: running + waiting requests on that replica (>= 0).
    kv_utilization: fraction of its KV blocks in use (0..1; >= 0 and finite).
    ttft_p90_s: recent p90 time to first token in seconds, None if no recent requests.
    """

    ongoing_requests: float
    kv_utilization: float = 0.0
    ttft_p90_s: float | None = None

    def __post_init__(self) -> None:
        _check_non_negative("ongoing_requests", self.ongoing_requests)
        _check_non_negative("kv_utilization", self.kv_utilization)
        if self.ttft_p90_s is not None:
            _check_non_negative("ttft_p90_s", self.ttft_p90_s)


@dataclass(frozen=True)
class Decision:
    """The outcome of one `AutoscalePolicy.decide` call.

    replicas: the replica count to run now (== current when nothing changes).
    reason: human readable, e.g. "ongoing 19.0 > target 8.0 x 2 for 3.0 s" or "steady".
    wanted: what the metrics ask for right now, before delays (already within [min, max]).
    """

    replicas: int
    reason: str
    wanted: int


@dataclass(frozen=True)
class _Signals:
    """The fleet-wide view of a set of load reports."""

    total_ongoing: float
    kv_utilization: float      # mean over replicas
    ttft_s: float | None       # max over replicas that reported one


def _check_non_negative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"ReplicaLoad.{name} must be a finite number >= 0, got {value!r}")


def _ceil(x: float) -> int:
    """ceil(x) that ignores float noise, so a sum like 0.1 * 30 counts as 3, not 4."""
    return math.ceil(x - _EPS)


def _summarize(loads: Sequence[ReplicaLoad]) -> _Signals:
    """Total ongoing requests, mean KV utilisation and max recent p90 TTFT (None if none)."""
    ttfts = [load.ttft_p90_s for load in loads if load.ttft_p90_s is not None]
    return _Signals(
        total_ongoing=sum(load.ongoing_requests for load in loads),
        kv_utilization=sum(load.kv_utilization for load in loads) / len(loads),
        ttft_s=max(ttfts) if ttfts else None,
    )


def _validate(cfg: AutoscaleConfig) -> None:
    """The config's own checks, plus the ones it does not make on fields the policy reads."""
    cfg.validate("autoscale")
    if cfg.ttft_slo_s is not None and not cfg.ttft_slo_s > 0:
        raise ConfigError(f"autoscale.ttft_slo_s must be > 0 or null, got {cfg.ttft_slo_s}")


class AutoscalePolicy:
    """Decides the replica count from load reports, with Ray Serve-like delays.

    Timer semantics: the timer of a direction (up or down) starts at the first `decide` sample
    that wants that direction and keeps running while every later sample wants the same
    direction (the wanted amount may change meanwhile; the latest one is used). A sample that
    wants no change, the other direction, or has no load reports stops it. When it has run for
    the direction's delay, `decide` moves straight to the wanted count (by the whole computed
    amount, within [min, max]) and the timers restart: the next change needs a condition seen
    after that decision to hold for the full delay again.
    """

    def __init__(self, cfg: AutoscaleConfig, clock: Callable[[], float] = time.monotonic):
        """cfg: the autoscale config (validated here, raising `ConfigError`).
        clock: seconds, monotonic; injectable for tests."""
        _validate(cfg)
        self.cfg = cfg
        self._clock = clock
        self._direction = 0               # +1 want more, -1 want fewer, 0 none pending
        self._since: float | None = None  # when the pending direction was first seen

    # ----------------------------------------------------------------- public

    def decide(self, current: int, loads: Sequence[ReplicaLoad]) -> Decision:
        """One control-loop step: the replica count to run now, with the delays applied.

        A `current` outside [min_replicas, max_replicas] is clamped back at once (no delay).
        Empty `loads` (no replica reporting yet) keeps `current` and stops any timer.
        """
        now = self._clock()
        if not self.cfg.min_replicas <= current <= self.cfg.max_replicas:
            return self._clamp_out_of_range(current, loads)
        wanted, why = self.desired(current, loads)
        direction = (wanted > current) - (wanted < current)
        if direction == 0:
            self.reset()
            return Decision(current, why, wanted)
        if direction != self._direction:
            self._direction, self._since = direction, now
        held = now - self._since
        delay = self.cfg.upscale_delay_s if direction > 0 else self.cfg.downscale_delay_s
        if held + _EPS >= delay:
            self.reset()
            return Decision(wanted, f"{why} for {held:.1f} s", wanted)
        verb = "up" if direction > 0 else "down"
        return Decision(current, f"waiting {held:.1f}/{delay:.1f} s to scale {verb} to "
                                 f"{wanted}: {why}", wanted)

    def desired(self, current: int, loads: Sequence[ReplicaLoad]) -> tuple[int, str]:
        """What the metrics ask for right now, with no delays: (replicas, reason).

        The result is within [min_replicas, max_replicas]. Empty `loads` keeps `current`.
        """
        if not loads:
            return self._clamped(current, current, "no load reports")
        signals = _summarize(loads)
        serve = _ceil(signals.total_ongoing / self.cfg.target_ongoing_requests)
        ups = self._up_triggers(current, signals, serve)
        if ups:
            wanted = max(n for n, _ in ups)
            return self._clamped(current, wanted, "; ".join(r for _, r in ups))
        if serve < current:
            wanted, why = self._guard_downscale(current, serve, signals)
            return self._clamped(current, wanted, why)
        return self._clamped(current, current, "steady")

    def reset(self) -> None:
        """Forget the pending timer (e.g. after an external manual scale)."""
        self._direction, self._since = 0, None

    # ---------------------------------------------------------------- helpers

    def _up_triggers(self, current: int, s: _Signals, serve: int) -> list[tuple[int, str]]:
        """Every trigger that wants more than `current`, as (replicas, reason)."""
        cfg = self.cfg
        ups = []
        if serve > current:
            ups.append((serve, (f"ongoing {s.total_ongoing:.1f} > target "
                                f"{cfg.target_ongoing_requests:.1f} x {current}")))
        if s.kv_utilization >= cfg.kv_utilization_high:
            ups.append((current + 1, (f"kv utilization {s.kv_utilization:.2f} >= high "
                                      f"{cfg.kv_utilization_high:.2f}")))
        if self._ttft_over(s, 1.0):
            ups.append((current + 1, f"ttft p90 {s.ttft_s:.2f} s > slo {cfg.ttft_slo_s:.2f} s"))
        return ups

    def _guard_downscale(self, current: int, serve: int, s: _Signals) -> tuple[int, str]:
        """Apply the KV and TTFT guards to a request-driven scale-down to `serve`."""
        cfg = self.cfg
        why = (f"ongoing {s.total_ongoing:.1f} <= target "
               f"{cfg.target_ongoing_requests:.1f} x {serve}")
        if s.kv_utilization > cfg.kv_utilization_low:
            return current, (f"steady (scale-down to {serve} held back: kv utilization "
                             f"{s.kv_utilization:.2f} > low {cfg.kv_utilization_low:.2f})")
        if self._ttft_over(s, TTFT_DOWNSCALE_FRACTION):
            return current, (f"steady (scale-down to {serve} held back: ttft p90 {s.ttft_s:.2f}"
                             f" s > {TTFT_DOWNSCALE_FRACTION} x slo {cfg.ttft_slo_s:.2f} s)")
        kv_floor = _ceil(s.kv_utilization * current / cfg.kv_utilization_high)
        if kv_floor >= current:
            return current, (f"steady (scale-down to {serve} held back: projected kv "
                             f"utilization > high {cfg.kv_utilization_high:.2f})")
        if kv_floor > serve:
            return kv_floor, (f"{why}; kept {kv_floor} so projected kv utilization stays "
                              f"<= {cfg.kv_utilization_high:.2f}")
        return serve, why

    def _ttft_over(self, s: _Signals, fraction: float) -> bool:
        """Whether the recent TTFT exceeds `fraction` x ttft_slo_s (False without an SLO)."""
        slo = self.cfg.ttft_slo_s
        return slo is not None and s.ttft_s is not None and s.ttft_s > fraction * slo

    def _clamped(self, current: int, wanted: int, why: str) -> tuple[int, str]:
        """Clamp `wanted` into [min, max], saying so in the reason when it bites."""
        lo, hi = self.cfg.min_replicas, self.cfg.max_replicas
        n = min(max(wanted, lo), hi)
        if n == wanted:
            return n, why
        bound = f"max_replicas {hi}" if wanted > hi else f"min_replicas {lo}"
        if n == current:
            return n, f"steady at {bound} ({why})"
        return n, f"{why}; clamped to {bound}"

    def _clamp_out_of_range(self, current: int, loads: Sequence[ReplicaLoad]) -> Decision:
        """Bring a `current` outside [min, max] back into range at once, restarting timers."""
        lo, hi = self.cfg.min_replicas, self.cfg.max_replicas
        n = min(max(current, lo), hi)
        self.reset()
        wanted, _ = self.desired(n, loads)
        return Decision(n, f"current {current} outside [{lo}, {hi}]: clamped to {n}", wanted)
