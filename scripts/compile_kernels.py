"""Compile every MoBA kernel launch for an NVIDIA GPU, on a machine without one (moba_train/kernel_compile.py).

Records the launches of small forward and backward calls under Triton's interpreter (the recipes' tilings,
the standard shapes', suffix queries, skewed routing, RoPE), then builds each one for the target with Triton's
compiler and ptxas. Prints one line per launch and exits 1 if any fails to compile. Before a device call,
`--variant` checks a benchmark variant of scripts/bench_kernels.py the same way.

    python scripts/compile_kernels.py                          # every workload, sm_90 (H100 / H200)
    python scripts/compile_kernels.py --workloads d64_b512_gqa4 --variant d64_packed_ws
    python scripts/compile_kernels.py --capability 100 --json out.json
    python scripts/compile_kernels.py --workloads d64_b512_gqa4 --against-gpu   # on the GPU machine: same PTX?
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels must be JIT functions here, not interpreted ones
    os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402

from moba_train import kernel_compile  # noqa: E402
from moba_train.cli import positive  # noqa: E402
from moba_train.staging import write_json  # noqa: E402

BENCH_KERNELS = Path(__file__).resolve().parent / "bench_kernels.py"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="",
                        help=f"comma-separated, of: {', '.join(kernel_compile.WORKLOADS)} (default all)")
    parser.add_argument("--variant", default="", help="a variant name of scripts/bench_kernels.py's VARIANTS")
    parser.add_argument("--capability", type=int, default=90, help="compute capability x 10 (default 90: sm_90)")
    parser.add_argument("--jobs", type=positive(int, "number of compiler processes"),
                        default=min(4, os.cpu_count() or 1), help="compiler processes")
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--against-gpu", action="store_true",
                        help="on a CUDA machine: also run the workloads compiled and check that each kernel Triton's "
                             "JIT built there is one compiled here (the same PTX)")
    args = parser.parse_args(argv)
    names = [name for name in args.workloads.split(",") if name]
    unknown = [name for name in names if name not in kernel_compile.WORKLOADS]
    if unknown:
        choices = ", ".join(kernel_compile.WORKLOADS)
        print(f"error: unknown workload {unknown[0]!r}; choose from {choices}", file=sys.stderr)
        return 2
    if args.against_gpu and not torch.cuda.is_available():
        print("error: --against-gpu needs a CUDA device; run it on the GPU machine", file=sys.stderr)
        return 2
    try:
        launches = kernel_compile.record_in_child(names, str(BENCH_KERNELS), args.variant)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(kernel_compile.compile_launch, launches, [args.capability] * len(launches)))
    for result in results:
        status = "ok  " if result.ok else "FAIL"
        extra = (f"{result.registers} registers, {result.stack_bytes} B spilled ({result.loop_spills} spill "
                 f"instructions in loops), {result.shared_bytes // 1024} KiB shared"
                 + (", warp-specialised" if result.warp_specialized else ""))
        print(f"{status} {result.seconds:5.1f}s  {result.launch.label()}  ({extra if result.ok else result.error})")
    failed = sum(not result.ok for result in results)
    print(f"{len(results) - failed} of {len(results)} launches compile for sm_{args.capability}"
          + (f" ({args.variant})" if args.variant else ""))
    gpu = []
    if args.against_gpu:
        here = {result.ptx_sha256: result for result in results if result.ok}
        gpu = kernel_compile.gpu_kernels(names or list(kernel_compile.WORKLOADS))
        for kernel in gpu:
            match = here.get(kernel["ptx_sha256"])
            kernel["identical"] = match is not None
            kernel["registers_here"] = match.registers if match else None
            print(f"{'same' if match else 'DIFF'}  {kernel['kernel']}[w{kernel['num_warps']} s{kernel['num_stages']}]"
                  f"  GPU: {kernel['n_regs']} registers, {kernel['n_spills']} B spilled"
                  + (f"; here: {match.registers} registers, {match.stack_bytes} B stack" if match else ""))
        same = sum(kernel["identical"] for kernel in gpu)
        print(f"{same} of {len(gpu)} kernels built by the GPU's JIT have the PTX of a launch compiled here")
    if args.json:
        meta = {"triton": triton.__version__, "capability": args.capability, "variant": args.variant or None}
        write_json(args.json, {**meta, "launches": [asdict(result) for result in results], "gpu": gpu})
    return 1 if failed else 0


if __name__ == "__main__":
    from moba_train.cli import run_entry

    run_entry(lambda: sys.exit(main()))  # a --json path that cannot be written is one line
