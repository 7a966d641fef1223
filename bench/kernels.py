"""Paged decode attention vs torch SDPA over the same KV laid out contiguously.

    python -m bench.kernels [--quick] [--batch N] [--contexts 1024,4096]

Reports time per call of `kernels.paged_attention_partial` and the KV bytes it attends per
second (K and V of every attended token, read once), beside SDPA with native GQA
(`enable_gqa=True`, q [B, H, 1, D]) in the same run. On CUDA: bf16, Triton backend, plus the
device copy bandwidth (bytes read + written) as the ceiling. On CPU: float32, torch backend,
smaller batches so the run stays around a minute.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kernels
from bench.report import print_table, write_json

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
CONTEXTS = (1024, 4096, 16384)


@dataclass(frozen=True)
class Plan:
    device: torch.device
    dtype: torch.dtype
    backend: str
    batch: int
    contexts: tuple[tuple[int, int], ...]   # (context, batch)
    reps: int


def make_plan(args) -> Plan:
    cuda = torch.cuda.is_available()
    batch = args.batch or (32 if cuda else 4 if args.quick else 8)
    contexts = tuple((c, batch) for c in args.contexts)
    if cuda and not args.quick and args.contexts == CONTEXTS:
        contexts += ((65536, max(1, batch // 4)),)    # the 64k target, docs/performance.md
    return Plan(torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32,
                "triton" if cuda else "torch", batch, contexts,
                reps=(20 if cuda else 3) if args.quick else (50 if cuda else 5))


def median_seconds(fn, device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median time of one call: CUDA events on GPU, perf_counter after warmup on CPU."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                 for _ in range(reps)]
        for start, end in pairs:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in pairs) / 1e3
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_context(plan: Plan, context: int, batch: int) -> dict:
    """One row: paged kernel and SDPA over the same K/V, B sequences of `context` tokens."""
    blocks_per_seq = context // BLOCK_SIZE
    shape = (batch * blocks_per_seq, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, dtype=plan.dtype, device=plan.device)
    v_cache = torch.randn(shape, dtype=plan.dtype, device=plan.device)
    tables = torch.randperm(shape[0], device=plan.device).view(batch, blocks_per_seq).int()
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=plan.device)
    q = torch.randn(batch, HEADS, HEAD_DIM, dtype=plan.dtype, device=plan.device)
    scale = HEAD_DIM ** -0.5
    paged_s = median_seconds(lambda: kernels.paged_attention_partial(
        q, k_cache, v_cache, tables, seq_lens, scale, backend=plan.backend), plan.device, plan.reps)
    k, v = (c[tables.long()].view(batch, context, KV_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
            for c in (k_cache, v_cache))                               # [B, H_kv, context, D]
    q4 = q[:, :, None]                                                 # [B, H, 1, D]
    sdpa_s = median_seconds(lambda: F.scaled_dot_product_attention(
        q4, k, v, scale=scale, enable_gqa=True), plan.device, plan.reps)
    kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * k.element_size()
    return {"context": context, "batch": batch, "paged_ms": paged_s * 1e3,
            "paged_gbps": kv_bytes / paged_s / 1e9, "sdpa_ms": sdpa_s * 1e3,
            "sdpa_gbps": kv_bytes / sdpa_s / 1e9, "paged_vs_sdpa": sdpa_s / paged_s}


def copy_gbps(device: torch.device, num_bytes: int = 1 << 30) -> float:
    """Device copy bandwidth: bytes read + written per second by a large tensor copy."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * num_bytes / median_seconds(lambda: dst.copy_(src), device, reps=20) / 1e9


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batch, fewer repetitions")
    parser.add_argument("--batch", type=int, default=None, help="sequences per call")
    parser.add_argument("--contexts", type=lambda s: tuple(int(c) for c in s.split(",")),
                        default=CONTEXTS, help="comma-separated context lengths")
    plan = make_plan(parser.parse_args(argv))
    name = torch.cuda.get_device_name(plan.device) if plan.device.type == "cuda" else "cpu"
    print(f"paged_attention_partial ({plan.backend}) vs SDPA enable_gqa on {name}, {plan.dtype}, "
          f"H={HEADS} H_kv={KV_HEADS} D={HEAD_DIM} block_size={BLOCK_SIZE}, "
          f"{torch.get_num_threads()} CPU threads")
    rows = [bench_context(plan, context, batch) for context, batch in plan.contexts]
    ceiling = copy_gbps(plan.device) if plan.device.type == "cuda" else None
    for row in rows:
        row["fraction_of_copy_bw"] = row["paged_gbps"] / ceiling if ceiling else None
    report(rows, ceiling)
    result = {"device": name, "dtype": str(plan.dtype).removeprefix("torch."),
              "backend": plan.backend, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
              "block_size": BLOCK_SIZE, "copy_gbps": ceiling, "rows": rows}
    write_json("kernels", result)
    return result


def report(rows: list[dict], ceiling: float | None) -> None:
    header = ["context", "batch", "paged ms", "paged GB/s", "SDPA ms", "SDPA GB/s",
              "paged/SDPA speed"] + (["of copy BW"] if ceiling else [])
    table = [(r["context"], r["batch"], f"{r['paged_ms']:.3f}", f"{r['paged_gbps']:.1f}",
              f"{r['sdpa_ms']:.3f}", f"{r['sdpa_gbps']:.1f}", f"{r['paged_vs_sdpa']:.2f}x")
             + ((f"{r['fraction_of_copy_bw']:.2f}",) if ceiling else ()) for r in rows]
    print_table(header, table)
    if ceiling:
        print(f"device copy bandwidth (read + written): {ceiling:.0f} GB/s")


if __name__ == "__main__":
    main()
