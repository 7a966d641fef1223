"""The autoscaling decision engine: pure Python, no Ray, no torch, a fake clock."""

from __future__ import annotations

import random

import pytest

from autoscale.policy import AutoscalePolicy, Decision, ReplicaLoad
from fabric.config import AutoscaleConfig
from fabric.errors import ConfigError


class FakeClock:
    """The policy's clock: tests set or advance `now` by hand."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def cfg(**kw) -> AutoscaleConfig:
    base = {"min_replicas": 1, "max_replicas": 10, "target_ongoing_requests": 8.0,
            "upscale_delay_s": 3.0, "downscale_delay_s": 30.0,
            "kv_utilization_high": 0.9, "kv_utilization_low": 0.3}
    base.update(kw)
    return AutoscaleConfig(**base)


def policy(**kw) -> tuple[AutoscalePolicy, FakeClock]:
    clock = FakeClock()
    return AutoscalePolicy(cfg(**kw), clock=clock), clock


def loads(*ongoing: float, kv: float = 0.0, ttft: float | None = None) -> list[ReplicaLoad]:
    return [ReplicaLoad(o, kv, ttft) for o in ongoing]


# ----------------------------------------------------------- Serve-style desired count

@pytest.mark.parametrize("reports, expected", [
    ([8.0, 8.0], 2),          # exactly target x 2
    ([8.0, 8.5], 3),          # a bit over rounds up
    ([9.5, 9.5], 3),          # ceil(19 / 8)
    ([0.1] * 30, 1),          # float sum 3.0000000000000013 is 3 requests: ceil(3/8) = 1
    ([40.0, 40.0], 10),       # ceil(80 / 8)
])
def test_desired_is_ceil_of_total_over_target(reports, expected):
    p, _ = policy()
    assert p.desired(2, [ReplicaLoad(o) for o in reports])[0] == expected


def test_desired_float_noise_does_not_round_up():
    p, _ = policy(target_ongoing_requests=1.0)
    assert sum([0.1] * 30) > 3.0                       # the noise is really there
    assert p.desired(3, [ReplicaLoad(0.1)] * 30)[0] == 3


def test_desired_clamps_to_min_and_max():
    p, _ = policy(min_replicas=2, max_replicas=5)
    n, why = p.desired(3, loads(0.0, 0.0, 0.0))
    assert n == 2 and "min_replicas 2" in why
    n, why = p.desired(3, loads(100.0, 100.0, 100.0))
    assert n == 5 and "max_replicas 5" in why
    n, why = p.desired(5, loads(100.0) * 5)
    assert n == 5 and why.startswith("steady at max_replicas 5")


def test_desired_reason_names_the_numbers():
    p, clock = policy()
    n, why = p.desired(2, loads(9.5, 9.5))
    assert (n, why) == (3, "ongoing 19.0 > target 8.0 x 2")
    assert p.desired(2, loads(8.0, 8.0)) == (2, "steady")
    p.decide(2, loads(9.5, 9.5))
    clock.now = 3.0
    assert p.decide(2, loads(9.5, 9.5)) == Decision(3, "ongoing 19.0 > target 8.0 x 2 for 3.0 s", 3)


# ----------------------------------------------------------------------- delays

def test_upscale_only_after_upscale_delay():
    p, clock = policy(upscale_delay_s=3.0)
    for t in (0.0, 1.0, 2.0, 2.9):
        clock.now = t
        d = p.decide(2, loads(12.0, 12.0))
        assert (d.replicas, d.wanted) == (2, 3), t
        assert d.reason.startswith("waiting")
    clock.now = 3.0
    assert p.decide(2, loads(12.0, 12.0)).replicas == 3


def test_one_sample_below_target_resets_upscale_timer():
    p, clock = policy(upscale_delay_s=3.0)
    for t in (0.0, 1.0, 2.0):
        clock.now = t
        assert p.decide(2, loads(12.0, 12.0)).replicas == 2
    clock.now = 2.5
    assert p.decide(2, loads(7.0, 7.0)) == Decision(2, "steady", 2)   # pressure gone once
    for t in (3.0, 4.0, 5.0, 5.4):
        clock.now = t
        assert p.decide(2, loads(12.0, 12.0)).replicas == 2, t       # < 3 s since 3.0
    clock.now = 6.0
    assert p.decide(2, loads(12.0, 12.0)).replicas == 3


def test_downscale_only_after_downscale_delay_and_direction_change_resets():
    p, clock = policy(downscale_delay_s=30.0)
    light = loads(1.0, 1.0, 1.0, 1.0)                   # 4 replicas, 4 requests: want 1
    for t in range(0, 30, 5):
        clock.now = float(t)
        d = p.decide(4, light)
        assert (d.replicas, d.wanted) == (4, 1), t
    clock.now = 29.0
    assert p.decide(4, loads(10.0, 10.0, 10.0, 10.0)).wanted == 5     # wants up once
    for t in (30.0, 45.0, 58.9):
        clock.now = t
        assert p.decide(4, light).replicas == 4, t                    # timer restarted at 30
    clock.now = 60.0
    d = p.decide(4, light)
    assert d.replicas == 1 and d.reason.endswith("for 30.0 s")


def test_zero_delays_act_at_once():
    p, _ = policy(upscale_delay_s=0.0, downscale_delay_s=0.0)
    assert p.decide(2, loads(20.0, 20.0)).replicas == 5
    assert p.decide(5, loads(1.0) * 5).replicas == 1
    p, _ = policy(upscale_delay_s=0.0, downscale_delay_s=30.0)
    assert p.decide(2, loads(20.0, 20.0)).replicas == 5
    assert p.decide(5, loads(1.0) * 5).replicas == 5                  # down still waits


def test_scale_moves_by_the_computed_amount_not_one_step():
    p, clock = policy(upscale_delay_s=1.0, max_replicas=6)
    p.decide(1, loads(40.0))
    clock.now = 1.0
    d = p.decide(1, loads(40.0))
    assert (d.replicas, d.wanted) == (5, 5)
    p.decide(1, loads(400.0))
    clock.now = 2.0
    assert p.decide(1, loads(400.0)).replicas == 6                    # at most max


def test_timers_restart_after_a_decision():
    p, clock = policy(upscale_delay_s=3.0)
    for t in (0.0, 1.0, 2.0):
        clock.now = t
        p.decide(2, loads(20.0, 20.0))                                # wants 5
    clock.now = 3.0
    assert p.decide(2, loads(20.0, 20.0)).replicas == 5
    heavy = loads(12.0) * 5                                           # 60 on 5: wants 8
    for t in (3.5, 4.5, 5.5):
        clock.now = t
        d = p.decide(5, heavy)
        assert (d.replicas, d.wanted) == (5, 8), t                    # no credit from before
    clock.now = 7.0
    assert p.decide(5, heavy).replicas == 8


def test_reset_forgets_timers():
    p, clock = policy(upscale_delay_s=3.0)
    for t in (0.0, 2.0):
        clock.now = t
        p.decide(2, loads(12.0, 12.0))
    p.reset()
    clock.now = 3.0
    assert p.decide(2, loads(12.0, 12.0)).replicas == 2               # restarted at 3.0
    clock.now = 6.0
    assert p.decide(2, loads(12.0, 12.0)).replicas == 3


def test_empty_loads_keeps_current_and_stops_timer():
    p, clock = policy(upscale_delay_s=3.0)
    p.decide(2, loads(12.0, 12.0))
    clock.now = 2.0
    d = p.decide(2, [])
    assert (d.replicas, d.wanted) == (2, 2) and "no load reports" in d.reason
    clock.now = 3.0
    assert p.decide(2, loads(12.0, 12.0)).replicas == 2               # timer restarted at 3.0


def test_no_flapping_on_noisy_load_around_target():
    """A minute of load oscillating around 2 x target, sampled every 0.5 s."""
    rng = random.Random(1234)
    samples = [16.0 + rng.uniform(-5.0, 5.0) for _ in range(120)]

    def changes(p: AutoscalePolicy, clock: FakeClock) -> int:
        current, count = 2, 0
        for i, total in enumerate(samples):
            clock.now = i * 0.5
            d = p.decide(current, [ReplicaLoad(total / current)] * current)
            count += d.replicas != current
            current = d.replicas
        return count

    damped = changes(*policy(upscale_delay_s=3.0, downscale_delay_s=30.0))
    twitchy = changes(*policy(upscale_delay_s=0.0, downscale_delay_s=0.0))
    assert damped <= 2
    assert twitchy >= 20                     # the same load without delays does flap


# ---------------------------------------------------------------- KV utilisation

def test_kv_high_scales_out_with_few_requests():
    p, _ = policy(upscale_delay_s=0.0)
    n, why = p.desired(2, loads(1.0, 1.0, kv=0.95))
    assert n == 3 and "kv utilization 0.95 >= high 0.90" in why
    assert p.desired(2, loads(1.0, 1.0, kv=0.9))[0] == 3              # >= is inclusive
    assert p.decide(2, loads(1.0, 1.0, kv=0.95)).replicas == 3
    assert p.decide(10, loads(1.0, kv=0.95) * 10).replicas == 10      # at max
    mixed = [ReplicaLoad(1.0, 1.0), ReplicaLoad(1.0, 0.7)]            # mean 0.85 < 0.9
    assert p.desired(2, mixed)[0] == 2


def test_kv_between_low_and_high_blocks_scale_down():
    p, _ = policy(downscale_delay_s=0.0)
    n, why = p.desired(4, loads(0.0, 0.0, 0.0, 0.0, kv=0.5))
    assert n == 4 and "held back" in why and "0.50 > low 0.30" in why
    assert p.decide(4, loads(0.0, kv=0.5) * 4).replicas == 4
    assert p.decide(4, loads(0.0, kv=0.2) * 4).replicas == 1          # 0.2 x 4 / 1 <= 0.9


def test_kv_projected_utilisation_limits_scale_down():
    p, _ = policy(downscale_delay_s=0.0)
    # 10 replicas at 0.3 (== low, allowed); 1 replica would be at 3.0: keep ceil(3 / 0.9) = 4.
    n, why = p.desired(10, loads(0.0, kv=0.3) * 10)
    assert n == 4 and "projected" in why
    assert 0.3 * 10 / n <= 0.9 < 0.3 * 10 / (n - 1)
    assert p.decide(10, loads(0.0, kv=0.3) * 10).replicas == 4


# -------------------------------------------------------------------- TTFT SLO

def test_ttft_slo_triggers_scale_out():
    p, _ = policy(ttft_slo_s=1.0, upscale_delay_s=0.0)
    reports = [ReplicaLoad(1.0, 0.1, 1.5), ReplicaLoad(1.0, 0.1, None)]
    n, why = p.desired(2, reports)
    assert n == 3 and "ttft p90 1.50 s > slo 1.00 s" in why
    assert p.decide(2, reports).replicas == 3
    assert p.desired(2, [ReplicaLoad(8.0, 0.1, 1.0)] * 2)[0] == 2     # at the SLO: fine
    assert p.desired(2, [ReplicaLoad(8.0, 0.1, None)] * 2)[0] == 2    # no recent requests


def test_ttft_without_slo_is_ignored():
    p, _ = policy(ttft_slo_s=None)
    assert p.desired(2, [ReplicaLoad(8.0, 0.1, 99.0)] * 2) == (2, "steady")
    assert p.desired(2, [ReplicaLoad(0.0, 0.1, 99.0)] * 2)[0] == 1


def test_ttft_near_slo_blocks_scale_down():
    p, _ = policy(ttft_slo_s=1.0, downscale_delay_s=0.0)
    n, why = p.desired(3, [ReplicaLoad(0.0, 0.1, 0.85)] * 3)
    assert n == 3 and "held back" in why and "ttft" in why
    assert p.decide(3, [ReplicaLoad(0.0, 0.1, 0.85)] * 3).replicas == 3
    assert p.decide(3, [ReplicaLoad(0.0, 0.1, 0.75)] * 3).replicas == 1


# ---------------------------------------------------------------------- clamps

def test_out_of_range_current_is_clamped_at_once():
    p, _ = policy(min_replicas=2, max_replicas=5, upscale_delay_s=60.0, downscale_delay_s=60.0)
    d = p.decide(0, [])
    assert d.replicas == 2 and d.reason == "current 0 outside [2, 5]: clamped to 2"
    d = p.decide(9, loads(1.0) * 9)
    assert (d.replicas, d.wanted) == (5, 2) and "clamped to 5" in d.reason
    d = p.decide(9, loads(100.0) * 9)
    assert (d.replicas, d.wanted) == (5, 5)


def test_at_bounds_no_change_past_min_or_max():
    p, _ = policy(min_replicas=2, max_replicas=4, upscale_delay_s=0.0,
                      downscale_delay_s=0.0)
    d = p.decide(4, loads(50.0) * 4)
    assert d == Decision(4, "steady at max_replicas 4 (ongoing 200.0 > target 8.0 x 4)", 4)
    d = p.decide(2, loads(0.0, 0.0))
    assert (d.replicas, d.wanted) == (2, 2) and "min_replicas 2" in d.reason
    assert p.decide(3, loads(0.0) * 3).replicas == 2


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("kw", [
    {"ongoing_requests": -1.0}, {"ongoing_requests": float("nan")},
    {"ongoing_requests": 1.0, "kv_utilization": float("inf")},
    {"ongoing_requests": 1.0, "ttft_p90_s": -0.5},
])
def test_bad_replica_load_is_rejected(kw):
    with pytest.raises(ValueError, match="ReplicaLoad"):
        ReplicaLoad(**kw)


@pytest.mark.parametrize("kw, field", [
    ({"min_replicas": 3, "max_replicas": 2}, "autoscale.max_replicas"),
    ({"ttft_slo_s": 0.0}, "autoscale.ttft_slo_s"),
    ({"target_ongoing_requests": 0.0}, "autoscale.target_ongoing_requests"),
])
def test_bad_config_is_rejected(kw, field):
    with pytest.raises(ConfigError, match=field):
        AutoscalePolicy(cfg(**kw))
