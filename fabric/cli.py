"""`python -m fabric` (also the `kv-fabric` console script): `demo`, `run` (a JSONL job),
`serve` / `status` / `scale` / `stop` (a named, detached fabric on a running Ray cluster),
`convert` (a GGUF file into a Hugging Face checkpoint directory)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time

DEMO_CONFIG = {                 # a real chat model; a long document outgrows one instance
    "model": {"preset": "smollm2-135m-instruct"},
    "instances": {"count": 3, "kv_blocks": 24, "block_size": 16, "max_batch_tokens": 128},
}
ELASTIC_DEMO_CONFIG = {
    "model": {"preset": "tiny-moe"},
    "instances": {"count": 3, "kv_blocks": 32, "block_size": 16, "num_cpus": 0.5},
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fabric.errors import FabricError

    try:
        return COMMANDS[args.command](args)
    except (FabricError, UsageError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


class UsageError(Exception):
    """A command line that cannot run (missing file, conflicting options): exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fabric", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="chat with a real model on an embedded 3-instance fabric, "
                                       "ask about a document longer than one instance holds, "
                                       "then scale a MoE model 3 -> 4 -> 3 while serving")
    demo.add_argument("--config", default=None,
                      help="YAML config of the chat part (default: smollm2-135m-instruct)")
    demo.add_argument("--long-prompt", type=int, default=500, help="words in the long document")
    demo.add_argument("--max-new-tokens", type=int, default=32)
    _add_run(sub)
    serve = sub.add_parser("serve", help="start a named, detached fabric on a running Ray "
                                         "cluster (with --http-port: and its OpenAI-compatible "
                                         "HTTP API) and exit")
    serve.add_argument("--config", default=None, help="YAML config (default: built-in default)")
    _add_target(serve, required_name=True)
    http = serve.add_argument_group(
        "OpenAI-compatible HTTP API (Ray Serve; see docs/serving.md)")
    http.add_argument("--http-port", type=int, default=None, metavar="P",
                      help="also serve /v1/chat/completions, /v1/completions, /v1/models, "
                           "/health and /metrics on this port (a Serve app named after the "
                           "fabric, route /)")
    http.add_argument("--http-host", default="127.0.0.1", metavar="H",
                      help="address the Serve HTTP proxy listens on (default 127.0.0.1; "
                           "0.0.0.0 for every interface)")
    http.add_argument("--api-key", default=None, metavar="K",
                      help="require 'Authorization: Bearer K' on /v1/* (default: "
                           "$KVFABRIC_API_KEY; none: no key asked)")
    http.add_argument("--served-model-name", default=None, metavar="M",
                      help="the model name clients send (default: the config's preset or the "
                           "checkpoint's directory or file name)")
    status = sub.add_parser("status", help="a named fabric's instances: blocks, queues, tokens")
    _add_target(status, required_name=True)
    status.add_argument("--window", type=float, default=1.0, metavar="S",
                        help="seconds between two looks to measure tokens/s (0: no rate)")
    status.add_argument("--json", action="store_true", help="print fab.stats() as JSON instead")
    scale = sub.add_parser("scale", help="set a named fabric's elastic MoE replicas")
    scale.add_argument("--replicas", type=int, required=True)
    _add_target(scale, required_name=True)
    stop = sub.add_parser("stop", help="shut a named fabric down")
    _add_target(stop, required_name=True)
    convert = sub.add_parser(
        "convert", help="write a GGUF file as a Hugging Face checkpoint directory",
        description="Dequantize IN.gguf (llama.cpp's llama architecture) into OUT_DIR: "
                    "config.json, model.safetensors, generation_config.json and the tokenizer "
                    "files with the chat template. transformers' AutoModelForCausalLM and this "
                    "fabric (model.path: OUT_DIR) both load it.")
    convert.add_argument("input", metavar="IN.gguf", help="the GGUF file")
    convert.add_argument("output", metavar="OUT_DIR", help="directory to write (created)")
    convert.add_argument("--dtype", default="float32",
                         choices=["float32", "float64", "bfloat16", "float16"],
                         help="dtype of the written weights (default float32)")
    return parser


def _add_run(sub) -> None:
    run = sub.add_parser(
        "run", help="run a JSONL file of requests into a JSONL file of results",
        description="Each input line: {\"id\", \"prompt\": [ids] or \"text\", \"max_new_tokens\", "
                    "\"temperature\", \"seed\", \"ignore_eos\"}. Each output line: {\"id\", "
                    "\"tokens\", \"text\", \"finish_reason\", \"metrics\"} or {\"id\", \"line\", "
                    "\"error\", \"error_type\"}. Re-running onto the same output skips ids already "
                    "done and retries failed ones. Exit code: 0 all lines ok, 1 some lines failed, "
                    "2 the job could not run.")
    run.add_argument("--input", required=True, help="JSONL file of requests")
    run.add_argument("--output", required=True, help="JSONL file of results (appended; resumable)")
    run.add_argument("--config", default=None,
                     help="YAML config of the fabric to start (default: built-in default)")
    run.add_argument("--batch-size", type=int, default=32, metavar="K",
                     help="requests per Fabric.submit call (default 32)")
    _add_target(run, required_name=False)


def _add_target(p: argparse.ArgumentParser, *, required_name: bool) -> None:
    p.add_argument("--address", default=None,
                   help="Ray address: \"auto\", \"host:port\" or \"ray://host:10001\" (default: "
                        "$RAY_ADDRESS, as set under `ray job submit`; else " +
                        ("a running local cluster)" if required_name else "an embedded local Ray)"))
    p.add_argument("--name", required=required_name, default=None,
                   help="name of the fabric" + ("" if required_name else
                                                " to connect to instead of starting one"))


def _address(args) -> str | None:
    address = args.address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        check_reachable(address)
    return address


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a "host:port" / "ray://host:port" nobody listens on: `ray.init` would retry
    for minutes. "auto" and other forms are left to Ray."""
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise UsageError(f"cannot reach Ray at {address!r}: {e.strerror or e}") from None


def run_demo(args) -> int:
    import fabric
    from fabric.engine import check_capacity
    from fabric.errors import CapacityError

    cfg = fabric.load_config(args.config or DEMO_CONFIG)
    per_instance = cfg.instances.kv_blocks * cfg.instances.block_size
    print(f"starting an embedded fabric of {cfg.model.preset or cfg.model.path}: "
          f"{cfg.instances.count} CPU instances x {cfg.instances.kv_blocks} blocks x "
          f"{cfg.instances.block_size} tokens = {per_instance} tokens of KV each")
    t0 = time.perf_counter()
    with fabric.start(cfg) as fab:
        print(f"ready in {time.perf_counter() - t0:.0f} s\n")
        for q in DEMO_QUESTIONS:
            (r,) = fab.chat([[{"role": "user", "content": q}]], max_new_tokens=48)
            print(f"Q: {q}\nA: {r.text.strip()}   [{len(r.tokens)} tokens, "
                  f"ttft {r.metrics['ttft_s']:.2f} s, {r.finish_reason}]\n")
        document = _demo_document(args.long_prompt)
        question = [{"role": "user", "content": document + "\n\nQuestion: according to the "
                     "log above, what colour was the lighthouse painted? Answer in one sentence."}]
        prompt_len = len(fab.render_chat(question))
        out: dict = {}
        worker = threading.Thread(target=lambda: out.update(r=fab.chat(
            [question], max_new_tokens=args.max_new_tokens)[0]))
        t1 = time.perf_counter()
        worker.start()
        stats = _busiest_stats(fab, [worker])
        seconds = time.perf_counter() - t1
        long_res = out["r"]
        stats["lending"] = fab.stats()["lending"]
        again = [{"role": "user", "content": document + "\n\nQuestion: according to the log "
                  "above, how many crates of rope were counted on day 2?"}]
        (follow,) = fab.chat([again], max_new_tokens=24)    # same document: its KV is reused
        prefix, again_len = fab.stats()["prefix_cache"], len(fab.render_chat(again))
    total = prompt_len + args.max_new_tokens
    print(f"long document: {prompt_len} prompt tokens + up to {args.max_new_tokens} new = "
          f"{total} tokens of KV ({total / per_instance:.2f}x one instance's pool)")
    print(f"A: {long_res.text.strip()}   [{len(long_res.tokens)} tokens in {seconds:.1f} s]")
    print("\nKV blocks per instance while it ran (most borrowed moment):")
    _print_instances(stats)
    print(f"borrow events: {stats['lending']['borrow_events']}, "
          f"blocks borrowed: {stats['lending']['blocks_borrowed_total']}")
    print(f"\na second question on the same document: {follow.metrics['cached_tokens']} of its "
          f"{again_len} prompt tokens came from the prefix cache, ttft "
          f"{follow.metrics['ttft_s']:.2f} s (the first: {long_res.metrics['ttft_s']:.2f} s); "
          f"fabric-wide hit rate {prefix['hit_rate']:.0%}")
    try:
        check_capacity(total, cfg.instances.block_size, cfg.instances.kv_blocks)
        print("a single instance of the same size would hold it too")
    except CapacityError as e:
        print(f"a single instance of the same size rejects it: {e}")
    print("\nelastic scaling on the built-in MoE model while requests run "
          "(weights mapped from the node's object store):")
    with fabric.start(ELASTIC_DEMO_CONFIG) as moe:
        events = _elastic_demo(moe, ["The fabric lends KV blocks.", "Hello, Ray!",
                                     "Attention runs where the KV lives."])
    for e in events:
        print(f"  {e['from']} -> {e['to']} replicas in {e['seconds']:.2f} s: "
              f"mapped {e['bytes_mapped'] / 1e6:.1f} MB, copied {e['bytes_copied'] / 1e6:.1f} MB, "
              f"read from disk {e['bytes_loaded_from_disk'] / 1e6:.1f} MB"
              + (f", requests handed over {e['requests_moved'] + e['requests_recomputed']}"
                 if e["kind"] == "down" else ""))
    print(f"\ndemo done in {time.perf_counter() - t0:.0f} s")
    return 0


DEMO_QUESTIONS = ("What is the capital of France?", "Name three primary colors.")


def _demo_document(num_words: int) -> str:
    """A long maintenance log with one fact the question asks for, near its start."""
    lines = ["Harbour maintenance log.", "Day 1: the lighthouse was painted bright red."]
    day = 2
    while sum(len(x.split()) for x in lines) < num_words:
        lines.append(f"Day {day}: the crew checked the pier, cleaned the lamps, counted "
                     f"{day * 3} crates of rope and logged calm weather.")
        day += 1
    return "\n".join(lines)


def _elastic_demo(fab, prompts: list[str]) -> list[dict]:
    """Scale up by one replica, then back, each while requests run; the tokens stay the same."""
    before = [r.tokens for r in fab.generate(prompts, max_new_tokens=96, ignore_eos=True)]
    n = len(fab.instances)
    events, same = [], True
    for target in (n + 1, n):
        out: dict = {}
        worker = threading.Thread(target=lambda: out.update(during=fab.generate(
            prompts * 2, max_new_tokens=96, ignore_eos=True)))
        worker.start()
        time.sleep(0.1)
        events.append(fab.scale(target))
        worker.join()
        same = same and [r.tokens for r in out["during"]] == before * 2
    print(f"\nrequests served while scaling {n} -> {n + 1} -> {n}: "
          f"{'same tokens as without scaling' if same else 'TOKENS DIFFER'}")
    return events


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


# ---- run ---------------------------------------------------------------------------------------
class FabricOpener:
    """Starts (or connects to) the fabric the first time a job needs it; `close` shuts down only
    a fabric this job started, never a named one it connected to."""

    def __init__(self, config, address: str | None, name: str | None):
        self.config, self.address, self.name = config, address, name
        self.fab = None

    def __call__(self):
        import fabric

        if self.fab is None:
            self.fab = fabric.connect(self.name, address=self.address) if self.name else \
                fabric.start(self.config, address=self.address)
        return self.fab

    def close(self) -> None:
        if self.fab is not None and self.name is None:
            self.fab.shutdown()
        self.fab = None


def check_job_paths(input_path: str, output_path: str) -> None:
    if not os.path.exists(input_path):
        raise UsageError(f"input file {input_path!r} does not exist")
    if not os.path.isfile(input_path):
        raise UsageError(f"input {input_path!r} is not a file")
    if not os.access(input_path, os.R_OK):
        raise UsageError(f"input file {input_path!r} is not readable")
    out_dir = os.path.dirname(os.path.abspath(output_path))
    if not os.path.isdir(out_dir):
        raise UsageError(f"output directory {out_dir!r} does not exist")
    if os.path.exists(output_path) and os.path.samefile(input_path, output_path):
        raise UsageError("--output must not be the input file")


def run_jobs(args) -> int:
    import fabric
    from fabric import jobs

    check_job_paths(args.input, args.output)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.name and args.config:
        raise UsageError("--config starts a new fabric; a named one (--name) has its own config")
    config = None if args.name else fabric.load_config(args.config)   # bad config: fail first
    opener = FabricOpener(config, _address(args), args.name)
    try:
        summary = jobs.run_job(opener, args.input, args.output, batch_size=args.batch_size)
    finally:
        opener.close()
    print(summary.format())
    return 0 if summary.errors == 0 else 1


# ---- serve / status / scale / stop -------------------------------------------------------------
def _connect(args):
    import fabric

    return fabric.connect(args.name, address=_address(args))


def run_serve(args) -> int:
    """Start a named, detached fabric; with --http-port also its OpenAI-compatible ingress. A
    fabric of that name already running (and no --config) gets only the ingress."""
    import fabric
    from fabric.errors import FabricError

    http = args.http_port is not None
    if http and not 1 <= args.http_port <= 65535:
        raise UsageError(f"--http-port must be a port number (1-65535), got {args.http_port}")
    if not http and (args.served_model_name or args.api_key):
        raise UsageError("--api-key and --served-model-name need --http-port")
    api_key = args.api_key or os.environ.get("KVFABRIC_API_KEY") or None
    cfg = fabric.load_config(args.config)
    try:
        fab = _connect(args)
    except FabricError:
        fab = None                               # the name is free
    if fab is not None and (not http or args.config):
        raise UsageError(f"a fabric named {args.name!r} is already running" + (
            " (without --config, --http-port puts the HTTP API in front of it)" if http else ""))
    if http:
        import ray

        from actors import ingress

        if ray.is_initialized():                 # else fabric.start says why Ray is out of reach
            ingress.check_http(args.name, args.http_host, args.http_port)   # before any work
    started = fab is None
    if started:
        fab = fabric.start(cfg, address=_address(args) or "auto", name=args.name, detached=True)
        print(f"fabric {fab.name!r} is serving: {len(fab.instances)} instances x "
              f"{cfg.instances.kv_blocks} blocks x {cfg.instances.block_size} tokens "
              f"(stop it with: python -m fabric stop --name {fab.name})")
    if http:
        try:
            ingress.deploy(args.name, args.http_host, args.http_port, args.served_model_name,
                           api_key)
        except Exception as e:                   # noqa: BLE001 - no half-started server is left
            try:
                ingress.undeploy(args.name)
            except Exception:                    # noqa: BLE001 - the first error is the one
                pass
            if started:
                fab.shutdown()
            raise FabricError(f"the HTTP ingress did not start"
                              f"{f', fabric {fab.name!r} stopped' if started else ''}: "
                              f"{e}") from None
        from fabric.openai_api import served_model_name

        model = args.served_model_name or served_model_name(fab.cfg.model)
        print(f"OpenAI-compatible API on http://{args.http_host}:{args.http_port}/v1 "
              f"(model {model!r}{', API key required' if api_key else ''}) in front of fabric "
              f"{fab.name!r} (stop both with: python -m fabric stop --name {fab.name})")
    return 0


def run_status(args) -> int:
    fab = _connect(args)
    stats = fab.stats()
    if args.json:
        print(json.dumps(stats, indent=2, default=str))
        return 0
    rates = None
    if args.window > 0:
        time.sleep(args.window)
        later = fab.stats()
        before = {s["id"]: _generated(s) for s in stats["instances"]}
        rates = {s["id"]: (_generated(s) - before.get(s["id"], 0)) / args.window
                 for s in later["instances"]}
        stats = later
    print(f"fabric {fab.name!r}: {len(stats['instances'])} instances, "
          f"{stats['elastic']['replicas']} replicas")
    print(status_table(stats, rates))
    lending = stats["lending"]
    print(f"borrow events: {lending['borrow_events']}, "
          f"blocks borrowed: {lending['blocks_borrowed_total']}")
    return 0


def _generated(inst: dict) -> int:
    return inst.get("detail", {}).get("num_generated", 0)


STATUS_COLUMNS = ("instance", "node", "total", "free", "lent", "borrowed", "running", "waiting",
                  "generated", "tokens/s")


def status_table(stats: dict, rates: dict | None = None) -> str:
    """One row per instance; `rates` (instance id -> tokens/s) fills the last column."""
    rows = [STATUS_COLUMNS]
    for s in stats["instances"]:
        d = s.get("detail", {})
        rate = f"{rates[s['id']]:.1f}" if rates and s["id"] in rates else "-"
        rows.append((str(s["id"]), str(s["node"])[:8], *(str(s[f"blocks_{c}"]) for c in
                     ("total", "free", "lent", "borrowed")), str(d.get("num_running", "-")),
                     str(d.get("num_waiting", "-")), str(d.get("num_generated", "-")), rate))
    widths = [max(len(r[c]) for r in rows) for c in range(len(STATUS_COLUMNS))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows)


def run_scale(args) -> int:
    if args.replicas < 1:
        raise UsageError(f"--replicas must be >= 1, got {args.replicas}")
    out = _connect(args).scale(replicas=args.replicas)
    print(json.dumps(out, default=str))
    return 0


def run_stop(args) -> int:
    """The fabric and its HTTP ingress (the Serve app of its name), whichever of them runs."""
    from fabric.errors import FabricError

    try:
        fab = _connect(args)
    except FabricError as e:
        fab, missing = None, e
    app = _undeploy_ingress(args.name)          # HTTP first: no new requests reach the fabric
    if app:
        print(f"HTTP ingress {args.name!r} stopped")
    if fab is None:
        if not app:
            raise missing
        return 0
    fab.shutdown()
    print(f"fabric {args.name!r} stopped")
    return 0


def _undeploy_ingress(name: str) -> bool:
    try:
        import ray
        import ray.serve  # noqa: F401 - ray[serve] may be absent: then no app can exist
    except ImportError:
        return False
    if not ray.is_initialized():
        return False
    from actors import ingress

    return ingress.undeploy(name)


# ---- convert ----------------------------------------------------------------------------------
def run_convert(args) -> int:
    from fabric.model import gguf

    if not gguf.is_gguf(args.input):
        raise UsageError(f"input {args.input!r} is not a .gguf file")
    if not os.path.isfile(args.input):
        raise UsageError(f"input file {args.input!r} does not exist")
    out = gguf.convert(args.input, args.output, args.dtype)
    print(f"wrote {out['path']}: {out['architecture']}, {out['num_layers']} layers, "
          f"{out['parameters'] / 1e6:.1f}M parameters in {out['dtype']}; tokenizer: "
          f"{'yes' if out['tokenizer'] else 'none in the file'}, chat template: "
          f"{'yes' if out['chat_template'] else 'no'}, EOS ids {out['eos_token_ids']}")
    return 0


COMMANDS = {"demo": run_demo, "run": run_jobs, "serve": run_serve, "status": run_status,
            "scale": run_scale, "stop": run_stop, "convert": run_convert}
