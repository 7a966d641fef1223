"""`python -m fabric` (also the `kv-fabric` console script)."""

from __future__ import annotations

import argparse
import sys
import threading
import time

DEMO_CONFIG = {
    "model": {"preset": "tiny-llama"},
    "instances": {"count": 3, "kv_blocks": 32, "block_size": 16},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fabric", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a long-context request on an embedded 3-instance fabric")
    demo.add_argument("--config", default=None, help="YAML config (default: built-in demo config)")
    demo.add_argument("--long-prompt", type=int, default=1200, help="tokens in the long prompt")
    demo.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    from fabric.errors import FabricError

    try:
        return {"demo": run_demo}[args.command](args)
    except FabricError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run_demo(args) -> int:
    import random

    import fabric

    config = args.config or DEMO_CONFIG
    cfg = fabric.load_config(config)
    per_instance = cfg.instances.kv_blocks * cfg.instances.block_size
    rng = random.Random(0)
    long_prompt = [rng.randrange(256) for _ in range(args.long_prompt)]
    short = ["The fabric lends KV blocks.", "Attention runs where the KV lives.", "Hello, Ray!"]
    print(f"starting an embedded fabric: {cfg.instances.count} CPU instances x "
          f"{cfg.instances.kv_blocks} blocks x {cfg.instances.block_size} tokens "
          f"= {per_instance} tokens of KV each")
    with fabric.start(config) as fab:
        t0 = time.perf_counter()
        out: dict = {}
        workers = [threading.Thread(target=lambda: out.update(long=fab.generate(
                       [long_prompt], max_new_tokens=args.max_new_tokens, ignore_eos=True)[0])),
                   threading.Thread(target=lambda: out.update(
                       short=fab.generate(short, max_new_tokens=16)))]
        for w in workers:
            w.start()
        stats = _busiest_stats(fab, workers)
        seconds = time.perf_counter() - t0
        long_res, short_res = out["long"], out["short"]
        stats["lending"] = fab.stats()["lending"]
    total = len(long_prompt) + args.max_new_tokens
    generated = len(long_res.tokens) + sum(len(r.tokens) for r in short_res)
    print(f"\nlong request: {len(long_prompt)} prompt + {len(long_res.tokens)} new = {total} tokens "
          f"of KV ({total / per_instance:.2f}x one instance's capacity), finish={long_res.finish_reason}")
    print(f"  first generated ids: {long_res.tokens[:10]} (the built-in model has random weights)")
    for r, p in zip(short_res, short):
        print(f"short request {p!r}: {len(r.tokens)} tokens, ttft {r.metrics['ttft_s'] * 1e3:.1f} ms")
    print("\nKV blocks per instance while the long request ran (most borrowed moment):")
    _print_instances(stats)
    print(f"borrow events: {stats['lending']['borrow_events']}, "
          f"blocks borrowed: {stats['lending']['blocks_borrowed_total']}")
    print(f"throughput: {generated / seconds:.1f} tokens/s ({generated} tokens in {seconds:.2f} s)")
    _single_instance(cfg, long_prompt, args.max_new_tokens)
    return 0


def _busiest_stats(fab, workers) -> dict:
    """Poll stats while `workers` run; keep the snapshot with the most blocks borrowed."""
    best = fab.stats()
    while any(w.is_alive() for w in workers):
        snap = fab.stats()
        if sum(i["blocks_borrowed"] for i in snap["instances"]) > \
                sum(i["blocks_borrowed"] for i in best["instances"]):
            best = snap
        time.sleep(0.01)
    for w in workers:
        w.join()
    return best


def _print_instances(stats: dict) -> None:
    print(f"\n{'instance':>8} {'node':>10} {'total':>6} {'free':>6} {'lent':>6} {'borrowed':>9}")
    for s in stats["instances"]:
        print(f"{s['id']:>8} {s['node'][:10]:>10} {s['blocks_total']:>6} {s['blocks_free']:>6} "
              f"{s['blocks_lent']:>6} {s['blocks_borrowed']:>9}")


def _single_instance(cfg, prompt: list[int], max_new_tokens: int) -> None:
    """What one vLLM-style instance of the same size does with the long request."""
    from fabric.engine import Engine
    from fabric.errors import CapacityError
    from fabric.model import load_model
    from fabric.sequence import SamplingParams

    m = cfg.model
    engine = Engine(load_model(m.preset, m.path, m.dtype, m.seed), cfg.instances.kv_blocks,
                    cfg.instances.block_size)
    try:
        engine.add_request(prompt, SamplingParams(max_new_tokens, ignore_eos=True))
        print("single instance: accepted the long request")
    except CapacityError as e:
        print(f"single instance of the same size: rejected ({e})")
