"""The expert placement planner: pure Python, fixed and seeded-random cases, a brute-force oracle."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from autoscale.placement import bytes_moved, device_loads, moves, naive_placement, plan_placement

EXPERTS = [(layer, expert) for layer in range(8) for expert in range(8)]
SEEDS = range(6)
TOL = 0.1


def devs(n: int) -> list[str]:
    return [f"gpu{i}" for i in range(n)]


def zipf_loads(rng: random.Random, experts: list, s: float = 1.0) -> dict:
    """Zipf-like loads: the k-th hottest expert (random order) gets 1 / k**s."""
    order = experts[:]
    rng.shuffle(order)
    return {e: 1.0 / (k + 1) ** s for k, e in enumerate(order)}


def max_ratio(placement: dict, loads: dict | None, devices: list[str]) -> float:
    """Max device load over mean device load."""
    dl = device_loads(placement, loads, devices)
    return max(dl.values()) / (sum(dl.values()) / len(devices))


def assert_valid(placement: dict, experts, devices: list[str], *, non_empty: bool = True) -> None:
    assert set(placement) == set(experts)
    assert set(placement.values()) <= set(devices)
    if non_empty and len(placement) >= len(devices):
        assert set(placement.values()) == set(devices), "a device was left empty"


# --- fresh placement -------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["uniform", "zipf"])
def test_fresh_placement_balanced(n, kind):
    for seed in SEEDS:
        rng = random.Random(seed)
        sizes = {e: rng.randint(1, 5) * 1000 for e in EXPERTS}
        loads = None if kind == "uniform" else zipf_loads(rng, EXPERTS)
        for current in (None, {}):
            p = plan_placement(current, devs(n), sizes, loads, imbalance=TOL)
            assert_valid(p, EXPERTS, devs(n))
            assert max_ratio(p, loads, devs(n)) <= 1 + TOL + 1e-9
            assert bytes_moved(current, p, sizes) == 0


def test_fresh_placement_uniform_is_near_perfect():
    p = plan_placement(None, devs(3), {e: 1 for e in EXPERTS})
    counts = sorted(device_loads(p, None, devs(3)).values())
    assert counts == [21.0, 21.0, 22.0]


def test_every_device_gets_an_expert_even_when_one_expert_dominates():
    experts = list(range(5))
    sizes = {e: 10 for e in experts}
    loads = {0: 100.0, 1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}
    p = plan_placement(None, devs(4), sizes, loads)
    assert_valid(p, experts, devs(4))
    assert sum(1 for e in experts if p[e] == p[0]) == 1   # the hot expert sits alone


# --- scale up ----------------------------------------------------------------------------------

@pytest.mark.parametrize("old_n,new_n", [(2, 3), (3, 4), (2, 4)])
def test_scale_up_moves_minimum_for_tolerance(old_n, new_n):
    sizes = {e: 4096 for e in EXPERTS}
    old = naive_placement(EXPERTS, devs(old_n))
    new = plan_placement(old, devs(new_n), sizes, imbalance=TOL)
    assert_valid(new, EXPERTS, devs(new_n))
    assert max_ratio(new, None, devs(new_n)) <= 1 + TOL + 1e-9
    naive = bytes_moved(old, naive_placement(EXPERTS, devs(new_n)), sizes)
    moved = bytes_moved(old, new, sizes)
    assert moved < naive
    # Equal loads and sizes: each old device must shed down to floor((1 + TOL) * mean) experts.
    cap = math.floor((1 + TOL) * len(EXPERTS) / new_n)
    counts = device_loads(old, None, devs(old_n)).values()
    assert moved == sum(max(0, int(c) - cap) for c in counts) * 4096
    perfect = (new_n - old_n) * math.ceil(len(EXPERTS) / new_n) * 4096   # fill new devices to the mean
    assert moved <= perfect
    assert all(src in devs(old_n) and dst not in devs(old_n) for _, src, dst in moves(old, new))


def test_scale_up_zero_imbalance_moves_about_total_over_n():
    sizes = {e: 1 for e in EXPERTS}
    old = naive_placement(EXPERTS, devs(2))
    new = plan_placement(old, devs(3), sizes, imbalance=0.0)
    assert sorted(device_loads(new, None, devs(3)).values()) == [21.0, 21.0, 22.0]
    assert abs(bytes_moved(old, new, sizes) - len(EXPERTS) / 3) <= 1


def test_scale_up_random_sizes_beats_naive():
    for seed in SEEDS:
        rng = random.Random(seed)
        sizes = {e: rng.randint(1, 8) * 1000 for e in EXPERTS}
        old_n, new_n = rng.choice([(2, 3), (3, 4), (4, 6)])
        old = plan_placement(None, devs(old_n), sizes)
        new = plan_placement(old, devs(new_n), sizes)
        assert_valid(new, EXPERTS, devs(new_n))
        assert max_ratio(new, None, devs(new_n)) <= 1 + TOL + 1e-9
        naive = bytes_moved(naive_placement(EXPERTS, devs(old_n)),
                            naive_placement(EXPERTS, devs(new_n)), sizes)
        assert bytes_moved(old, new, sizes) < naive


def test_new_experts_are_placed_and_cost_nothing():
    sizes = {e: 100 for e in EXPERTS}
    old = {e: d for e, d in naive_placement(EXPERTS, devs(2)).items() if e[0] < 4}   # half known
    new = plan_placement(old, devs(2), sizes)
    assert_valid(new, EXPERTS, devs(2))
    assert bytes_moved(old, new, sizes) == 0
    assert {(e, None) for e, src, _ in moves(old, new)} == {(e, None) for e in EXPERTS if e[0] >= 4}


# --- scale down --------------------------------------------------------------------------------

@pytest.mark.parametrize("equal_sizes", [True, False])
def test_scale_down_moves_only_removed_device(equal_sizes):
    for seed in SEEDS:
        rng = random.Random(seed)
        sizes = {e: 1000 if equal_sizes else rng.randint(1, 9) * 1000 for e in EXPERTS}
        old = plan_placement(None, devs(3), sizes)
        gone = rng.choice(devs(3))
        keep = [d for d in devs(3) if d != gone]
        new = plan_placement(old, keep, sizes)
        assert_valid(new, EXPERTS, keep)
        assert gone not in new.values()
        assert bytes_moved(old, new, sizes) == sum(sizes[e] for e, d in old.items() if d == gone)
        assert {src for _, src, _ in moves(old, new)} == {gone}
        assert max_ratio(new, None, keep) <= 1 + TOL + 1e-9


def test_scale_to_one_device():
    sizes = {e: 3 for e in EXPERTS}
    old = naive_placement(EXPERTS, devs(3))
    new = plan_placement(old, ["gpu1"], sizes)
    assert set(new.values()) == {"gpu1"}
    assert bytes_moved(old, new, sizes) == 3 * sum(1 for d in old.values() if d != "gpu1")


# --- skewed loads ------------------------------------------------------------------------------

@pytest.mark.parametrize("old_n,new_n", [(2, 3), (3, 4), (3, 2), (4, 3)])
@pytest.mark.parametrize("start", ["naive", "planned"])
def test_skewed_loads_balanced_and_cheaper_than_naive(old_n, new_n, start):
    for seed in SEEDS:
        rng = random.Random(1000 + seed)
        sizes = {e: rng.randint(1, 4) * 1000 for e in EXPERTS}
        loads = zipf_loads(rng, EXPERTS)
        naive_old, naive_new = naive_placement(EXPERTS, devs(old_n)), naive_placement(EXPERTS, devs(new_n))
        old = naive_old if start == "naive" else plan_placement(None, devs(old_n), sizes, loads)
        new = plan_placement(old, devs(new_n), sizes, loads, imbalance=TOL)
        assert_valid(new, EXPERTS, devs(new_n))
        ratio = max_ratio(new, loads, devs(new_n))
        assert ratio <= 1 + TOL + 1e-9 or ratio <= max_ratio(naive_new, loads, devs(new_n))
        assert bytes_moved(old, new, sizes) < bytes_moved(naive_old, naive_new, sizes)


def test_unachievable_tolerance_is_best_effort():
    sizes = {e: 1 for e in range(4)}
    loads = {0: 10.0, 1: 1.0, 2: 1.0, 3: 1.0}
    old = {e: "gpu0" for e in sizes}
    new = plan_placement(old, devs(2), sizes, loads)
    assert sorted(device_loads(new, loads, devs(2)).values()) == [3.0, 10.0]   # the best possible
    assert moves(old, new) == [(0, "gpu0", "gpu1")]   # one byte, not the three light experts


# --- stability and determinism -----------------------------------------------------------------

def test_unchanged_devices_move_nothing():
    for seed in SEEDS:
        rng = random.Random(seed)
        sizes = {e: rng.randint(1, 5) for e in EXPERTS}
        loads = zipf_loads(rng, EXPERTS, s=0.8)
        current = plan_placement(None, devs(4), sizes, loads)
        again = plan_placement(current, devs(4), sizes, loads)
        assert again == current
        assert bytes_moved(current, again, sizes) == 0 and moves(current, again) == []


def test_deterministic_regardless_of_input_order():
    rng = random.Random(7)
    sizes = {e: rng.randint(1, 5) for e in EXPERTS}
    loads = zipf_loads(rng, EXPERTS)
    old = naive_placement(EXPERTS, devs(3))
    a = plan_placement(old, devs(5), sizes, loads)
    shuffled = EXPERTS[:]
    rng.shuffle(shuffled)
    b = plan_placement({e: old[e] for e in shuffled}, list(reversed(devs(5))),
                       {e: sizes[e] for e in shuffled}, {e: loads[e] for e in shuffled})
    assert a == b == plan_placement(old, devs(5), sizes, loads)
    assert list(a) == sorted(EXPERTS)


# --- helpers -----------------------------------------------------------------------------------

def test_naive_placement_round_robin():
    p = naive_placement([(1, 0), (0, 1), (0, 0)], ["b", "a"])
    assert p == {(0, 0): "a", (0, 1): "b", (1, 0): "a"}


def test_bytes_moved_moves_and_device_loads():
    sizes = {"x": 5, "y": 7, "z": 11}
    old = {"x": "a", "y": "a"}
    new = {"x": "a", "y": "b", "z": "b"}
    assert bytes_moved(old, new, sizes) == 7
    assert bytes_moved(None, new, sizes) == 0
    assert moves(old, new) == [("y", "a", "b"), ("z", None, "b")]
    assert device_loads(new, {"x": 2.0, "y": 3.0}, ["a", "b", "c"]) == {"a": 2.0, "b": 3.0, "c": 0.0}
    assert device_loads(new, {"x": 0.0}) == {"a": 1.0, "b": 2.0}   # all zero: equal loads


# --- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"devices": []}, "empty"),
    ({"devices": ["a", "b", "a"]}, "duplicate"),
    ({"sizes": {"x": -1, "y": 2}}, "negative size"),
    ({"loads": {"x": -0.5}}, "negative"),
    ({"loads": {"q": 1.0}}, "not in sizes"),
    ({"current": {"q": "a"}}, "not in sizes"),
    ({"imbalance": -0.1}, "imbalance"),
])
def test_errors(kwargs, match):
    args = {"current": None, "devices": ["a", "b"], "sizes": {"x": 1, "y": 2}, "loads": None}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        plan_placement(args.pop("current"), args.pop("devices"), args.pop("sizes"), args.pop("loads"),
                       **args)


def test_helper_errors():
    with pytest.raises(ValueError, match="empty"):
        naive_placement([1, 2], [])
    with pytest.raises(ValueError, match="duplicate"):
        naive_placement([1, 2], ["a", "a"])


# --- brute-force oracle ------------------------------------------------------------------------

def brute_force(old: dict, devices: list[str], sizes: dict, loads: dict, limit: float):
    """(fewest bytes moved within `limit` or None, smallest achievable max load)."""
    experts = sorted(sizes)
    best, best_max = None, math.inf
    for assignment in itertools.product(devices, repeat=len(experts)):
        per_dev = dict.fromkeys(devices, 0.0)
        for e, d in zip(experts, assignment):
            per_dev[d] += loads[e]
        top = max(per_dev.values())
        best_max = min(best_max, top)
        if top <= limit + 1e-9:
            cost = sum(sizes[e] for e, d in zip(experts, assignment) if old.get(e, d) != d)
            best = cost if best is None else min(best, cost)
    return best, best_max


@pytest.mark.parametrize("old_n,new_n", [(2, 3), (3, 2)])
def test_near_brute_force_optimum_on_tiny_cases(old_n, new_n):
    feasible = 0
    for seed in range(40):
        rng = random.Random(seed)
        experts = list(range(6))
        sizes = {e: rng.randint(1, 10) for e in experts}
        loads = {e: rng.random() for e in experts}
        old = plan_placement(None, devs(old_n), sizes, loads)
        new = plan_placement(old, devs(new_n), sizes, loads, imbalance=TOL)
        assert_valid(new, experts, devs(new_n))
        limit = (1 + TOL) * sum(loads.values()) / new_n
        best, best_max = brute_force(old, devs(new_n), sizes, loads, limit)
        top = max(device_loads(new, loads, devs(new_n)).values())
        assert top <= 4 / 3 * best_max + 1e-9
        if best is None:
            continue
        feasible += 1
        assert top <= limit + 1e-9, f"seed {seed}: a balanced placement exists but none found"
        assert bytes_moved(old, new, sizes) <= 1.5 * best + max(sizes.values())
    assert feasible >= 15
