"""Data-plane round trips between two Ray actors, for each transport backend ("torch" over gloo,
"ray"): the median time of a blocking echo call, per message size.

    python -m bench.transport [--quick]

Prints a table and writes bench/results/transport.json. The groups use the default frame size
(`inline_bytes`, 1 MiB), so 32 KiB travels in one frame and 4 MiB as a header and a body. On a
shared CPU machine the figures move with the load beside them; compare backends side by side.
"""

from __future__ import annotations

import argparse
import time

import ray
import torch

from actors.transport import TransportHost, close_group, connect_group, transport_actor_options
from bench.report import print_table, write_json

BACKENDS = ("torch", "ray")
SIZES = ((32 * 1024, 200), (4 * 1024 * 1024, 20))   # (bytes, timed round trips)


@ray.remote(**transport_actor_options())
class Echo(TransportHost):
    def __init__(self):
        torch.set_num_threads(1)

    def serve_transport(self, src, meta, tensors):
        return {}, tensors

    def round_trip_s(self, dst: int, nbytes: int, iterations: int) -> float:
        x = [torch.zeros(nbytes, dtype=torch.uint8)]
        for _ in range(3):                                    # warm-up
            self.transport.call(dst, {}, x)
        times = []
        for _ in range(iterations):
            t0 = time.perf_counter()
            _, (y,) = self.transport.call(dst, {}, x)
            times.append(time.perf_counter() - t0)
            assert y.numel() == nbytes
        return sorted(times)[len(times) // 2]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a quarter of the round trips")
    args = ap.parse_args(argv)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows, result = [], {"round_trip_median_s": {}}
    try:
        peers = [Echo.remote() for _ in range(2)]
        for backend in BACKENDS:
            connect_group(peers, backend)
            for nbytes, iters in SIZES:
                iters = max(5, iters // 4) if args.quick else iters
                seconds = ray.get(peers[0].round_trip_s.remote(1, nbytes, iters), timeout=600)
                result["round_trip_median_s"][f"{backend}/{nbytes}"] = seconds
                rows.append((backend, f"{nbytes / 1024:.0f}", iters, f"{seconds * 1e3:.3f}"))
            close_group(peers)
    finally:
        ray.shutdown()
    print_table(["backend", "KiB", "round trips", "median ms"], rows)
    write_json("transport", result | {"quick": args.quick})
    return result


if __name__ == "__main__":
    main()
