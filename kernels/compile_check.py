"""Compile every Triton kernel for a CUDA GPU without one, exactly as the wrappers launch it.

    TRITON_INTERPRET=0 python -m kernels.compile_check [--arch 90]

CI has no GPU and runs the kernels interpreted, which accepts code the compiler rejects (and
says nothing about registers). This runs each wrapper in `dry_run()` on CPU tensors shaped like
real calls, then specialises and compiles every recorded launch the way `JITFunction.run` does,
through ptxas (bundled with Triton), and prints registers, stack (spills) and shared memory.

Exit status: 0 all compiled; 1 a kernel failed to compile; 2 this Triton cannot compile
offline (its internal binder API moved, or no ptxas), which is no verdict on the kernels.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import torch

UNSUPPORTED = 2


def sample_launches() -> list[tuple[str, object]]:
    """(case name, Launch) for representative shapes of every wrapper."""
    from kernels import triton_backend as tb
    from kernels.triton_launch import dry_run

    cases = []
    for name, call in _cases(tb):
        with dry_run() as launches:
            call()
        cases += [(name, launch) for launch in launches]
    return cases


def _cases(tb):
    def pool(block_size, kv_heads, head_dim, dtype, num_blocks=64):
        shape = (num_blocks, block_size, kv_heads, head_dim)
        return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)

    def decode(batch, heads, kv_heads, head_dim, block_size, dtype, width=256, splits=None):
        k, v = pool(block_size, kv_heads, head_dim, dtype)
        tables = torch.zeros(batch, width, dtype=torch.int32)
        lens = torch.ones(batch, dtype=torch.int32)
        q = torch.zeros(batch, heads, head_dim, dtype=dtype)
        return lambda: tb.paged_attention_partial(q, k, v, tables, lens, 0.1, num_splits=splits)

    def prefill(q_lens, heads, kv_heads, head_dim, block_size, dtype, width=256):
        k, v = pool(block_size, kv_heads, head_dim, dtype)
        cu = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0).int()
        tables = torch.zeros(len(q_lens), width, dtype=torch.int32)
        q = torch.zeros(sum(q_lens), heads, head_dim, dtype=dtype)
        kv_lens = torch.ones(len(q), dtype=torch.int32)
        return lambda: tb.paged_prefill_partial(q, k, v, tables, cu, kv_lens, 0.1)

    def write(tokens, kv_heads, head_dim, block_size, dtype):
        k_cache, v_cache = pool(block_size, kv_heads, head_dim, dtype)
        k = torch.zeros(tokens, kv_heads, head_dim, dtype=dtype)
        slots = torch.zeros(tokens, dtype=torch.long)
        return lambda: tb.write_kv(k, k.clone(), k_cache, v_cache, slots)

    return [
        ("decode bf16 H32/8 D128 bs16 (bench shape)", decode(32, 32, 8, 128, 16, torch.bfloat16,
                                                            splits=4)),
        ("decode fp16 H8/8 D80 bs5", decode(3, 8, 8, 80, 5, torch.float16)),
        ("decode fp32 H8/1 D64 bs1", decode(3, 8, 1, 64, 1, torch.float32, width=97)),
        ("decode fp32 H32/8 D128 bs16", decode(8, 32, 8, 128, 16, torch.float32)),
        ("prefill bf16 H32/8 D128 bs16", prefill([300, 1, 1, 17], 32, 8, 128, 16,
                                                 torch.bfloat16)),
        ("prefill fp32 H16/2 D96 bs32", prefill([33, 1], 16, 2, 96, 32, torch.float32)),
        ("write_kv bf16 H_kv8 D128", write(40, 8, 128, 16, torch.bfloat16)),
        ("write_kv fp32 H_kv3 D80", write(5, 3, 80, 7, torch.float32)),
    ]


def compile_launch(launch, arch: int):
    """Specialise args as `JITFunction.run` would (alignment, ints equal to 1, divisibility by
    16) and compile for sm_<arch>. Raises NotImplementedError if this Triton's internals moved."""
    import triton
    from triton.backends.compiler import GPUTarget
    try:
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        kernel = launch.kernel
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*launch.args, **launch.meta)
        options, signature, constexprs, attrs = kernel._pack_args(
            backend, launch.meta, bound, specialization, options)
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        raise NotImplementedError(f"offline compile unsupported by triton "
                                  f"{triton.__version__}: {exc!r}") from exc
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__)


def resource_usage(compiled) -> str:
    """'REG:.. STACK:..' from cuobjdump next to ptxas, or '' when it is not there."""
    tool = _nvidia_tool("cuobjdump")
    if not tool:
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                             check=False).stdout
    fields = next((line.split() for line in out.splitlines() if "REG:" in line), [])
    return " ".join(x for x in fields if x.split(":")[0] in ("REG", "STACK"))


def _nvidia_tool(name: str) -> str | None:
    import triton
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return shutil.which(bundled) or shutil.which(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10")
    arch = parser.parse_args(argv).arch
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("run with TRITON_INTERPRET=0: interpreted kernels cannot be compiled")
        return UNSUPPORTED
    if not _nvidia_tool("ptxas"):
        print("no ptxas (neither bundled with triton nor on PATH): cannot compile offline")
        return UNSUPPORTED
    failures = 0
    for name, launch in sample_launches():
        label = f"{name}: {launch.kernel.fn.__name__} grid={launch.grid}"
        try:
            compiled = compile_launch(launch, arch)
        except NotImplementedError as exc:
            print(exc)
            return UNSUPPORTED
        except Exception as exc:  # noqa: BLE001 - report every kernel, then fail
            failures += 1
            print(f"FAILED {label}\n  {type(exc).__name__}: {exc}")
            continue
        usage = resource_usage(compiled)
        print(f"ok     {label} {usage} smem={compiled.metadata.shared}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
