"""Compile the kernels for an NVIDIA GPU that this machine does not have.

Triton's CPU interpreter runs a kernel's Python semantics, but never builds it, so a kernel that its GPU
backend rejects (a pass that fails, a layout it cannot lower) was only found on the GPU machine, after a
device call had started: session 18's warp-specialised variants, recorded there as "fails to compile".
Triton's compiler and the ptxas it ships need no GPU. So this module records the launches of a real call
under the interpreter (kernel, argument types, constexprs, warps, stages) and compiles each one for a
target such as sm_90 (H100/H200) in a process with the interpreter off:

    launches = record_launches(workload)        # TRITON_INTERPRET=1: runs the call, keeps every launch
    compiled = compile_launch(launches[0], 90)  # interpreter off: ptx and cubin, or the compiler's error

`scripts/compile_kernels.py` does both (`record_in_child` records in a child process). It lives outside kernels/,
which imports only torch, triton and numpy.
The recorded signature carries Triton's launch-time specialisations (integers equal to 1, 16-byte divisibility),
taken by the launcher's own function, so the code compiled here is the code the GPU runs.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial

import torch


@dataclass(frozen=True)
class Launch:
    """One kernel launch as the compiler sees it: `signature` maps every argument to its Triton type
    ("*bf16", "i32", "fp32", "tensordesc<bf16[32, 64]>", or "constexpr"), `constexprs` the constexpr values,
    `divisible` the arguments divisible by 16 (`specialize`)."""

    module: str
    kernel: str
    signature: dict = field(hash=False)
    constexprs: dict = field(hash=False)
    divisible: list = field(hash=False, default_factory=list)
    num_warps: int = 4
    num_stages: int = 3

    def key(self) -> str:
        return json.dumps([self.module, self.kernel, self.signature, self.constexprs, self.divisible, self.num_warps,
                           self.num_stages], sort_keys=True)

    def label(self) -> str:
        shown = {k: v for k, v in self.constexprs.items() if v not in (None, False, 0)}
        return f"{self.kernel}[w{self.num_warps} s{self.num_stages}] " + " ".join(f"{k}={v}" for k, v in shown.items())


def specialize(value) -> tuple[str, object]:
    """(Triton type or "constexpr", key) of a launch argument, by the function Triton's JIT launcher itself uses:
    an integer equal to 1 becomes a constexpr (key 1), and key "D" marks a pointer or integer divisible by 16
    (an alignment hint that lets the compiler vectorise). The interpreter's CPU tensors keep the byte offsets of
    the views a GPU launch would pass."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    return native_specialize_impl(BaseBackend, value, False, True, True)


def constexpr_names(fn) -> set[str]:
    """Parameters annotated `tl.constexpr` (a string under `from __future__ import annotations`)."""
    names = set()
    for name, param in inspect.signature(fn).parameters.items():
        ann = param.annotation
        if ann is not inspect.Parameter.empty and "constexpr" in (ann if isinstance(ann, str) else repr(ann)):
            names.add(name)
    return names


# Constexprs that the host sets only because the interpreter runs the kernel, and their value on a GPU: the gate's
# bf16 products, which Triton 3.6's interpreter gets wrong, are emulated there by fp32 ones (gating._gate_dot).
GPU_CONSTEXPRS = {"EMULATE_BF16_DOT": False}


def describe(fn, args, kwargs) -> Launch:
    """The Launch of `fn[grid](*args, **kwargs)`, as a GPU would launch it (GPU_CONSTEXPRS)."""
    options = {name: kwargs.pop(name) for name in ("num_warps", "num_stages") if name in kwargs}
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    consts = constexpr_names(fn)
    signature, constexprs, divisible = {}, {}, []
    for name, value in bound.arguments.items():
        if name in consts or value is None:
            signature[name] = "constexpr"
            constexprs[name] = GPU_CONSTEXPRS.get(name, value)
            continue
        signature[name], key = specialize(value)
        if signature[name] == "constexpr":
            constexprs[name] = key
        elif key == "D":
            divisible.append(name)
    return Launch(fn.__module__, fn.__name__, signature, constexprs, divisible, **options)


def patch_interpreter_for_numpy2() -> None:
    """Triton 3.6's interpreter holds scalars as 1-element numpy arrays and converts them with `int(array)`,
    which numpy 2 rejects, so `range(0, n)` with a runtime `n` (e.g. loaded from memory) fails under the
    interpreter although it compiles on the GPU: convert through `.item()` instead (idempotent)."""
    import triton.runtime.interpreter as interpreter

    patch = interpreter._patch_lang_tensor
    if getattr(patch, "numpy2", False):
        return

    def _patch_lang_tensor_numpy2(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    _patch_lang_tensor_numpy2.numpy2 = True
    interpreter._patch_lang_tensor = _patch_lang_tensor_numpy2


@contextmanager
def recording():
    """Under TRITON_INTERPRET=1: yields a list that every kernel launch appends its Launch to (the launch runs)."""
    from triton.runtime.interpreter import InterpretedFunction

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("recording launches needs TRITON_INTERPRET=1 before triton is imported")
    patch_interpreter_for_numpy2()
    launches: list[Launch] = []
    run = InterpretedFunction.run

    def recorded_run(self, *args, grid, warmup, **kwargs):
        launches.append(describe(self.fn, args, dict(kwargs)))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recorded_run
    try:
        yield launches
    finally:
        InterpretedFunction.run = run


def record_launches(*workloads) -> list[Launch]:
    """The distinct launches of the workloads, called in order, in first-launch order."""
    with recording() as launches:
        for workload in workloads:
            workload()
    return list({launch.key(): launch for launch in launches}.values())


@dataclass
class Compiled:
    launch: Launch
    ok: bool
    seconds: float
    error: str = ""
    shared_bytes: int = 0
    warp_specialized: bool = False  # the PTX splits registers between warp groups (setmaxnreg)
    registers: int = 0  # per thread, as ptxas allocated them
    stack_bytes: int = 0  # per thread: these kernels keep no local arrays, so a stack frame is register spills
    loop_spills: int = 0  # spill loads and stores inside loops (`loop_spills`), paid every iteration
    ptx_sha256: str = ""  # to match the kernel a GPU's JIT builds for the same launch (`gpu_kernels`)


def cuobjdump(cubin: bytes) -> str:
    """The resource usage and the SASS of a cubin, from the cuobjdump that Triton ships."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([tool, "-res-usage", "-sass", path], capture_output=True, text=True, check=True).stdout


def resource_usage(report: str) -> tuple[int, int]:
    """(registers, stack bytes) per thread of the one kernel in a `cuobjdump` report."""
    usage = dict(re.findall(r"(REG|STACK):(\d+)", report))
    return int(usage.get("REG", 0)), int(usage.get("STACK", 0))


def loop_spills(sass: str) -> int:
    """Spill instructions (local loads and stores, LDL / STL) inside the loops of a kernel's SASS: the ones that
    cost every iteration. A loop is the span from a backward branch's target to the branch."""
    code = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    spans = [(int(m.group(1), 16), at) for at, text in code
             if (m := re.search(r"\bBRA\s+0x([0-9a-f]+)", text)) and int(m.group(1), 16) < at]
    return sum(1 for at, text in code if re.match(r"(@!?U?P\w+\s+)?(LDL|STL)\b", text)
               and any(lo <= at <= hi for lo, hi in spans))


def compile_launch(launch: Launch, capability: int = 90) -> Compiled:
    """Compile one recorded launch for an NVIDIA GPU of this compute capability (interpreter off)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(launch.module), launch.kernel)
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError(f"{launch.module}.{launch.kernel} is not a compilable JIT function: unset TRITON_INTERPRET")
    hint = [["tt.divisibility", 16]]
    source = ASTSource(fn, launch.signature, constexprs=launch.constexprs,
                       attrs={(fn.arg_names.index(name),): hint for name in launch.divisible})
    start = time.perf_counter()
    try:
        kernel = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
    except Exception as exc:  # the compiler's error is the result
        lines = [line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        return Compiled(launch, False, time.perf_counter() - start, f"{type(exc).__name__}: {lines[-1][:300]}")
    report = cuobjdump(kernel.asm["cubin"])
    registers, stack = resource_usage(report)
    return Compiled(launch, True, time.perf_counter() - start, shared_bytes=kernel.metadata.shared,
                    warp_specialized="setmaxnreg" in kernel.asm["ptx"], registers=registers, stack_bytes=stack,
                    loop_spills=loop_spills(report),
                    ptx_sha256=hashlib.sha256(kernel.asm["ptx"].encode()).hexdigest())


def gpu_kernels(names) -> list[dict]:
    """On a CUDA machine, interpreter off: run WORKLOADS[names] compiled, and return what Triton's JIT built for
    them: per kernel, its name, warps, stages, the driver's registers and spilled bytes, and its PTX's sha256. A
    launch compiled here with `compile_launch` and the same hash is the same kernel, which checks this module's
    recorded signatures and specialisations against the launcher's."""
    import triton

    from moba_train.kernels import backward, forward, gating, layout, rmsnorm, rope, routing

    for name in names:
        WORKLOADS[name](device="cuda")
    torch.cuda.synchronize()
    built = []
    for module in (forward, backward, gating, layout, rmsnorm, rope, routing):
        for fn in vars(module).values():
            if not isinstance(fn, triton.runtime.JITFunction):
                continue
            for cache in fn.device_caches.values():
                for kernel in cache[0].values():
                    built.append({"kernel": fn.__name__, "num_warps": kernel.metadata.num_warps,
                                  "num_stages": kernel.metadata.num_stages,
                                  "n_regs": getattr(kernel, "n_regs", None),
                                  "n_spills": getattr(kernel, "n_spills", None),
                                  "ptx_sha256": hashlib.sha256(kernel.asm["ptx"].encode()).hexdigest()})
    return built


def _attention(total, hq, hkv, dim, block, topk, lengths_q=None, skew=False, shared=False, workspace=True,
               device="cpu"):
    """One bf16 forward and backward of the Triton attention (self-attention, or suffix queries of
    `lengths_q` tokens per sequence); `skew`: every query draws the first block (split dK/dV programs);
    `workspace`: the workspace passes wherever they apply, as at training's lengths (at these short lengths
    the budget would pick slot passes), else slot passes."""
    from moba_train.kernels import moba_attention_triton
    from moba_train.kernels import workspace as plans

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(total if lengths_q is None else sum(lengths_q), hq, dim, generator=gen)
    k = torch.randn(total, hkv, dim, generator=gen)
    if skew:
        q += 1.0
        k[:block] += 2.0
    q, k = (x.to(device, torch.bfloat16).requires_grad_() for x in (q, k))
    v = torch.randn(total, hkv, dim, generator=gen).to(device, torch.bfloat16).requires_grad_()
    cu = torch.tensor([0, total], dtype=torch.int32, device=device)
    kwargs = {"shared_gqa_selection": shared}
    if lengths_q is not None:
        kwargs.update(cu_seqlens_k=cu, return_lse=True)
        cu = torch.tensor([0, lengths_q[0]], dtype=torch.int32, device=device)
    saved = plans.INFERENCE_BUDGET, plans.TRAINING_BUDGET
    plans.INFERENCE_BUDGET = plans.TRAINING_BUDGET = 1e9 if workspace else 0.0
    try:
        out = moba_attention_triton(q, k, v, cu, block, topk, **kwargs)
        out = out[0] + out[1][..., None] if lengths_q is not None else out
        out.float().square().sum().backward()
    finally:
        plans.INFERENCE_BUDGET, plans.TRAINING_BUDGET = saved


def _rope(device="cpu"):
    """RoPE of one tensor, and the fused QKV split and rotation at the 1.1B recipe's grouping (8 groups of 4 query
    heads, head dim 64)."""
    from moba_train.kernels.rope import qkv_rope_triton, rope_triton

    t = torch.randn(64, 1, 4, 64).to(device, torch.bfloat16).requires_grad_()
    angles = torch.randn(64, 1, 1, 64).to(device)
    rope_triton(t, angles).float().sum().backward()
    mixed = torch.randn(64, 1, 8, 6 * 64).to(device, torch.bfloat16).requires_grad_()
    q, k, v = qkv_rope_triton(mixed, angles, angles, 4)
    (q.float().sum() + k.float().sum() + v.float().sum()).backward()


def _rmsnorm(device="cpu"):
    """The norms of kernels/rmsnorm.py at the 1.1B recipe's width (2,048): the residual forms, and alone."""
    from moba_train.kernels.rmsnorm import add_rms_norm, rms_norm, rms_norm_with_residual

    x, branch = (torch.randn(64, 1, 2048).to(device, torch.bfloat16).requires_grad_() for _ in range(2))
    w = torch.ones(2048).to(device, torch.bfloat16).requires_grad_()
    x1, n1 = rms_norm_with_residual(x, w, 1e-5)
    h, n2 = add_rms_norm(x1, branch, w, 1e-5)
    (n1.float().sum() + h.float().sum() + n2.float().sum() + rms_norm(h, w, 1e-5).float().sum()).backward()


# What the recipes and the benchmark's standard shapes launch, at the smallest lengths that still take each
# path (the tilings depend on the block and head dim, not on the length): the 32K recipe (head dim 64, GQA 32/8,
# block 512: packed dK/dV over 256-key tiles; block 2048), the 128K recipe's block 1024, the quality study's
# group of 3 (block 512, and block 256 top-6: one 256-key tile), a block of one key tile (the dK/dV programs
# write the current block's dQ), the standard shapes' head dim 128, suffix queries (context parallelism),
# training's skewed routing (split programs), slot passes (the backward's plan where the workspace does not
# fit), RoPE (and the fused QKV split) and RMSNorm. Each takes `device` (default the CPU, where the interpreter
# runs them).
WORKLOADS = {
    "d64_b512_gqa4": partial(_attention, 1152, 4, 1, 64, 512, 3),
    "d64_b512_slot_passes": partial(_attention, 1152, 4, 1, 64, 512, 3, workspace=False),
    "d64_b512_skew": partial(_attention, 1152, 4, 1, 64, 512, 3, skew=True),
    "d64_b1024_gqa4": partial(_attention, 1152, 4, 1, 64, 1024, 3),
    "d64_b2048_gqa4": partial(_attention, 2176, 4, 1, 64, 2048, 2),
    "d64_b512_gqa3": partial(_attention, 1152, 3, 1, 64, 512, 3),
    "d64_b256_gqa3": partial(_attention, 1152, 3, 1, 64, 256, 6),
    "d64_b64_shared": partial(_attention, 256, 4, 2, 64, 64, 4, shared=True),
    "d128_b128": partial(_attention, 384, 2, 2, 128, 128, 3),
    "d128_b512": partial(_attention, 1152, 2, 1, 128, 512, 3),
    "d64_b512_suffix": partial(_attention, 1152, 4, 1, 64, 512, 3, lengths_q=[640]),
    "rope": _rope,
    "rmsnorm": _rmsnorm,
}


def record_main(names, variant_file, variant) -> list[Launch]:
    """The launches of WORKLOADS[names] (all if empty), with a benchmark variant's overrides applied."""
    if variant:
        spec = importlib.util.spec_from_file_location("bench_kernels", variant_file)
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        if variant not in bench.VARIANTS:
            raise SystemExit(f"error: no variant {variant!r} in {variant_file}; choose one of its VARIANTS")
        bench.apply_variant(bench.VARIANTS[variant][0])
    return record_launches(*(WORKLOADS[name] for name in names or WORKLOADS))


def record_in_child(names=(), variant_file="", variant="") -> list[Launch]:
    """record_main in a child process under the interpreter (this process keeps its compiled kernels)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", __name__, "--record", *names]
    if variant:
        cmd += ["--variant-file", variant_file, "--variant", variant]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [""])[-1]
        raise RuntimeError(last[len("error: "):] if last.startswith("error: ") else
                           f"recording the launches failed:\n{done.stderr[-3000:]}")
    return [Launch(**item) for item in json.loads(done.stdout.splitlines()[-1])]


if __name__ == "__main__":  # the child of record_in_child
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--record", nargs="*", default=[])
    parser.add_argument("--variant-file", default="")
    parser.add_argument("--variant", default="")
    ns = parser.parse_args()
    print(json.dumps([asdict(launch) for launch in record_main(ns.record, ns.variant_file, ns.variant)]))
