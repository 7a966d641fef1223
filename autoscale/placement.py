"""Expert placement planner for elastic MoE scaling: pure Python, no Ray, no torch.

A placement maps every expert (any hashable key, in practice `(layer, expert)`) to the
device that holds its primary copy. When the device set changes, `plan_placement` picks
a new placement that moves as few bytes as it can while keeping the measured load
balanced: max device load <= (1 + imbalance) x mean device load whenever the greedy
method below reaches it, else as balanced as it gets.

Algorithm (a greedy heuristic; exact minimum-bytes balancing is a bin-packing problem):

1. Keep: an expert whose old device is still present stays there (moving it costs bytes).
2. Place: experts on removed devices, and new experts, go largest load first to the
   least-loaded device (ties: fewest bytes held, then name). This is LPT scheduling,
   which balances well, and each of these experts has to be placed somewhere anyway.
3. Rebalance: while the most loaded device is over the tolerance, move one of its experts
   to the least-loaded device: the smallest one that alone brings both within tolerance,
   else the one with the best load relief per byte, provided it lowers the pair's max.
   When no single move helps, swap a heavier expert for a lighter one on another device
   (best relief per byte). A new, empty device is the least loaded, so it fills up; the
   loop stops as soon as the tolerance holds, so only the bytes needed for balance move.
   Every step strictly lowers the sum of squared device loads, so the loop ends.
4. Fill: when there are at least as many experts as devices, a device still empty
   receives the lightest expert from a device holding two or more.

Loads that are missing count as 0; loads that are None or all zero count as 1 per
expert (equal loads). Everything is visited in sorted order, so results are deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence

__all__ = ["Key", "bytes_moved", "device_loads", "moves", "naive_placement", "plan_placement"]

Key = Hashable
_EPS = 1e-9   # relative float slack for load comparisons


def plan_placement(current: Mapping[Key, str] | None, devices: Sequence[str],
                   sizes: Mapping[Key, int], loads: Mapping[Key, float] | None = None,
                   *, imbalance: float = 0.1) -> dict[Key, str]:
    """Place every expert of `sizes` on one of `devices`, moving few bytes from `current`.

    current: the old placement (None or {}: nothing placed yet, a fresh balanced placement).
    devices: the new device set. sizes: bytes per expert. loads: measured load per expert.
    imbalance: the tolerance, max device load <= (1 + imbalance) x mean device load.
    """
    current = dict(current or {})
    _check_devices(devices)
    _check_inputs(current, sizes, loads)
    if imbalance < 0 or not math.isfinite(imbalance):
        raise ValueError(f"imbalance must be finite and >= 0, got {imbalance!r}")
    load = _effective_loads(sizes, loads)
    devs = sorted(devices)
    live = set(devs)
    placement = {e: current[e] for e in _ordered(sizes) if current.get(e) in live}
    orphans = [e for e in _ordered(sizes) if e not in placement]
    state = _State(devs, placement, sizes, load)
    for e in sorted(orphans, key=lambda e: (-load[e], -sizes[e])):   # stable: key order
        state.put(e, state.least_loaded())
    limit = (1 + imbalance) * sum(load.values()) / len(devs)
    _rebalance(state, limit)
    if len(sizes) >= len(devs):
        _fill_empty(state)
    return {e: state.placement[e] for e in _ordered(sizes)}


def naive_placement(experts: Iterable[Key], devices: Sequence[str]) -> dict[Key, str]:
    """The static re-shard baseline: the i-th expert in sorted order -> sorted(devices)[i % n]."""
    _check_devices(devices)
    devs = sorted(devices)
    return {e: devs[i % len(devs)] for i, e in enumerate(_ordered(experts))}


def bytes_moved(old: Mapping[Key, str] | None, new: Mapping[Key, str],
                sizes: Mapping[Key, int]) -> int:
    """Sum of the sizes of experts placed in both `old` and `new` on different devices."""
    total = 0
    for e, dev in (old or {}).items():
        if e in new and new[e] != dev:
            if e not in sizes:
                raise ValueError(f"expert {e!r} has no size")
            total += sizes[e]
    return total


def device_loads(placement: Mapping[Key, str], loads: Mapping[Key, float] | None,
                 devices: Sequence[str] | None = None) -> dict[str, float]:
    """Total load per device as the planner sees it (None or all-zero loads: 1 per expert).

    Every device of `devices` appears, with 0.0 if it holds nothing.
    """
    load = _effective_loads(placement, loads)
    out = {d: 0.0 for d in sorted(devices or ())}
    for e, dev in placement.items():
        out[dev] = out.get(dev, 0.0) + load[e]
    return out


def moves(old: Mapping[Key, str] | None, new: Mapping[Key, str]) -> list[tuple[Key, str | None, str]]:
    """(expert, from, to) for every expert of `new` whose device changed; from is None if new."""
    old = old or {}
    return [(e, old.get(e), new[e]) for e in _ordered(new) if old.get(e) != new[e]]


class _State:
    """A placement under construction with running per-device load and byte totals."""

    def __init__(self, devs: list[str], placement: dict[Key, str],
                 sizes: Mapping[Key, int], load: Mapping[Key, float]):
        self.devs, self.sizes, self.load = devs, sizes, load
        self.placement: dict[Key, str] = {}
        self.dev_load = {d: 0.0 for d in devs}
        self.dev_bytes = {d: 0 for d in devs}
        self.members: dict[str, list[Key]] = {d: [] for d in devs}
        for e, dev in placement.items():
            self.put(e, dev)

    def put(self, e: Key, dev: str) -> None:
        """Place expert `e` on `dev`, taking it off its previous device if any."""
        old = self.placement.get(e)
        if old is not None:
            self.dev_load[old] -= self.load[e]
            self.dev_bytes[old] -= self.sizes[e]
            self.members[old].remove(e)
        self.placement[e] = dev
        self.dev_load[dev] += self.load[e]
        self.dev_bytes[dev] += self.sizes[e]
        self.members[dev].append(e)

    def least_loaded(self) -> str:
        """The device with the least load (ties: fewest bytes, then name)."""
        return min(self.devs, key=lambda d: (self.dev_load[d], self.dev_bytes[d], d))

    def most_loaded(self) -> str:
        """The device with the most load (ties: first name)."""
        return min(self.devs, key=lambda d: (-self.dev_load[d], d))


def _rebalance(state: _State, limit: float) -> None:
    """Move experts off the most loaded device until it is within `limit` or stuck."""
    slack = _EPS * max(1.0, limit)
    while True:
        src, dst = state.most_loaded(), state.least_loaded()
        if state.dev_load[src] <= limit + slack or src == dst:
            return
        step = _best_move(state, src, dst, limit, slack) or _best_swap(state, src, slack)
        if step is None:
            return
        for e, dev in step:
            state.put(e, dev)


def _best_move(state: _State, src: str, dst: str, limit: float,
               slack: float) -> list[tuple[Key, str]] | None:
    """The move src -> dst to make: the smallest expert that alone brings src within
    `limit` (keeping dst within it), else the best load relief per byte; None if none helps."""
    top, low = state.dev_load[src], state.dev_load[dst]
    fits, best, best_score = None, None, None
    for e in state.members[src]:
        le, size = state.load[e], state.sizes[e]
        relief = top - max(top - le, low + le)
        if relief <= slack:
            continue
        solves = top - le <= limit + slack and low + le <= limit + slack
        if solves and (fits is None or size < state.sizes[fits]):
            fits = e
        score = relief / size if size else math.inf
        if best_score is None or score > best_score:
            best, best_score = e, score
    pick = fits if fits is not None else best
    return None if pick is None else [(pick, dst)]


def _best_swap(state: _State, src: str, slack: float) -> list[tuple[Key, str]] | None:
    """The exchange of a heavier expert of src with a lighter one elsewhere that lowers
    the pair's max by the most per byte moved; None if no exchange helps."""
    top = state.dev_load[src]
    best, best_score = None, None
    for dev in state.devs:
        if dev == src:
            continue
        for a in state.members[src]:
            for b in state.members[dev]:
                delta = state.load[a] - state.load[b]
                relief = top - max(top - delta, state.dev_load[dev] + delta)
                if delta <= 0 or relief <= slack:
                    continue
                size = state.sizes[a] + state.sizes[b]
                score = relief / size if size else math.inf
                if best_score is None or score > best_score:
                    best, best_score = [(a, dev), (b, src)], score
    return best


def _fill_empty(state: _State) -> None:
    """Give each empty device the lightest expert of a device holding two or more."""
    for dev in state.devs:
        if state.members[dev]:
            continue
        donors = [e for d in state.devs if len(state.members[d]) >= 2 for e in state.members[d]]
        if not donors:
            return
        e = min(donors, key=lambda e: (state.load[e], state.sizes[e], _sort_key(e)))
        state.put(e, dev)


def _effective_loads(experts: Iterable[Key], loads: Mapping[Key, float] | None) -> dict[Key, float]:
    """Load per expert: missing -> 0; None or all zero -> 1 each (treated as equal)."""
    out = {e: float((loads or {}).get(e, 0.0)) for e in experts}
    if not any(out.values()):
        return {e: 1.0 for e in out}
    return out


def _check_devices(devices: Sequence[str]) -> None:
    """Raise ValueError for an empty or duplicated device list."""
    if not devices:
        raise ValueError("devices is empty: need at least one device")
    seen: set[str] = set()
    dups = sorted({d for d in devices if d in seen or seen.add(d)})
    if dups:
        raise ValueError(f"duplicate devices: {dups}")


def _check_inputs(current: Mapping[Key, str], sizes: Mapping[Key, int],
                  loads: Mapping[Key, float] | None) -> None:
    """Raise ValueError for negative sizes or loads and for experts without a size."""
    for e, s in sizes.items():
        if s < 0:
            raise ValueError(f"negative size {s!r} for expert {e!r}")
    for e, v in (loads or {}).items():
        if e not in sizes:
            raise ValueError(f"expert {e!r} in loads is not in sizes")
        if not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"negative or non-finite load {v!r} for expert {e!r}")
    for e in current:
        if e not in sizes:
            raise ValueError(f"expert {e!r} in current placement is not in sizes")


def _sort_key(e: Key) -> tuple[str, str]:
    """A total order over arbitrary hashable keys (used only when keys don't compare)."""
    return (type(e).__name__, repr(e))


def _ordered(keys: Iterable[Key]) -> list[Key]:
    """Keys in sorted order, or by (type, repr) when they are not mutually comparable."""
    keys = list(keys)
    try:
        return sorted(keys)
    except TypeError:
        return sorted(keys, key=_sort_key)
