"""Linear layers on the CPU: oneDNN with the weight packed once against torch's F.linear.

    python -m bench.linear [--quick] [--dtype float32|bfloat16]

SmolLM2-135M's layer shapes (q/o, k/v, gate/up, down, the tied lm_head) at the row counts of
decoding (1 to a few dozen sequences) and of prefill, both kernels side by side in one run:
median milliseconds per call, the weight bytes read per second, and the packed kernel's speed
over F.linear's. What `model.linear_kernel: auto` chooses on the CPU (`fabric/model/linear.py`).
Prints a table and writes bench/results/linear.json.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.kernels import median_seconds
from bench.report import print_table, write_json
from fabric.model.linear import Linear, onednn_works, pack_linears

SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "gate_proj": (1536, 576),
          "down_proj": (576, 1536), "lm_head": (49152, 576)}       # (out, in)
ROWS = (1, 8, 32, 128, 512, 4096)
QUICK_ROWS = (1, 8, 32, 512)


def bench_shape(name: str, out_f: int, in_f: int, rows: int, dtype, reps: int) -> dict:
    g = torch.Generator().manual_seed(out_f + rows)
    layer = Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_f, in_f, generator=g))
    layer = layer.to(dtype)
    pack_linears(layer, True)
    x = torch.randn(rows, in_f, generator=g).to(dtype)
    with torch.inference_mode():
        torch_s = median_seconds(lambda: F.linear(x, layer.weight), torch.device("cpu"), reps)
        packed_s = median_seconds(lambda: layer(x), torch.device("cpu"), reps)
    weight_bytes = out_f * in_f * layer.weight.element_size()
    return {"layer": name, "out": out_f, "in": in_f, "rows": rows,
            "torch_ms": torch_s * 1e3, "onednn_ms": packed_s * 1e3,
            "torch_weight_gbps": weight_bytes / torch_s / 1e9,
            "onednn_weight_gbps": weight_bytes / packed_s / 1e9,
            "onednn_speedup": torch_s / packed_s}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer row counts and repetitions")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if not onednn_works(dtype):
        print(f"torch's oneDNN cannot run packed {args.dtype} linears here: nothing to compare")
        result = {"dtype": args.dtype, "onednn": False, "rows": []}
        write_json("linear", result)
        return result
    reps = 5 if args.quick else 15
    rows = [bench_shape(name, o, i, n, dtype, reps)
            for n in (QUICK_ROWS if args.quick else ROWS) for name, (o, i) in SHAPES.items()
            if not (name == "lm_head" and n > 512)]       # the lm_head sees sampled rows only
    print(f"F.linear (MKL) vs oneDNN packed, {args.dtype}, {torch.get_num_threads()} CPU threads")
    print_table(["layer", "rows", "torch ms", "onednn ms", "torch GB/s", "onednn GB/s", "speed-up"],
                [(r["layer"], r["rows"], f"{r['torch_ms']:.3f}", f"{r['onednn_ms']:.3f}",
                  f"{r['torch_weight_gbps']:.1f}", f"{r['onednn_weight_gbps']:.1f}",
                  f"{r['onednn_speedup']:.2f}x") for r in rows])
    result = {"dtype": args.dtype, "onednn": True, "threads": torch.get_num_threads(), "rows": rows}
    write_json("linear", result)
    return result


if __name__ == "__main__":
    main()
