"""Where the GPU waits on the host in one Triton MoBA fwd+bwd call (the official benchmark times each call
from an idle GPU, so host launch overhead and host syncs count).

Usage (CUDA machine, repo root): PYTHONPATH=$PWD python3 scripts/trace_gaps.py
Prints the host time per call and every GPU idle gap over 60 us with the host ops running during it,
from a torch.profiler trace (written to $OUT or the current directory)."""
import json
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    print("error: trace_gaps.py profiles the Triton kernels on a CUDA device; run it on a GPU machine",
          file=sys.stderr)
    sys.exit(2)

from moba_train.kernels import moba_attention_triton  # noqa: E402

out_dir = os.environ.get("OUT", ".")
for name, seq, block, topk in [("s32k-b128", 32768, 128, 8), ("s32k-b512", 32768, 512, 3)]:
    total = 2 * seq
    cu = torch.arange(0, total + 1, seq, dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(total, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn_like(q)

    def step():
        moba_attention_triton(q, k, v, cu, block, topk).backward(g)
        q.grad = k.grad = v.grad = None

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    host = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    print(name, "host ms per step (no final sync):", [round(h, 2) for h in host])
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        torch.cuda.synchronize()
        step()
        torch.cuda.synchronize()
    path = f"{out_dir}/trace_{name}.json"
    prof.export_chrome_trace(path)
    ev = json.load(open(path))["traceEvents"]
    kern = sorted(
        [e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e], key=lambda e: e["ts"]
    )
    cpu = [e for e in ev if e.get("cat") in ("cpu_op", "python_function", "user_annotation") and "dur" in e]
    span = kern[-1]["ts"] + kern[-1]["dur"] - kern[0]["ts"]
    busy = sum(e["dur"] for e in kern)
    print(f"{name}: GPU span {span / 1e3:.2f} ms, busy {busy / 1e3:.2f} ms")
    for a, b in zip(kern, kern[1:]):
        gap = b["ts"] - (a["ts"] + a["dur"])
        if gap > 60:
            during = [c["name"] for c in cpu if c["ts"] <= a["ts"] + a["dur"] + gap / 2 <= c["ts"] + c["dur"]]
            print(f"  gap {gap / 1e3:.3f} ms after {a['name'][:40]} before {b['name'][:40]}; cpu: {during[-3:]}")
    sys.stdout.flush()
