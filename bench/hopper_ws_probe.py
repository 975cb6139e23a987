"""Which forms of a dK/dV loop Triton's automatic warp specialisation builds for Hopper (sm_90), compiled on a
machine without a GPU (the compiler and ptxas need none; bench/NOTES.md, session 19).

The loop is the packed dK/dV's, reduced to what decides the pass: K and V of one key tile loaded before the
loop, each step's q and dO rows and their lse and delta loaded in it, four products (S^T, dV, dP^T, dK) and,
with DQ, the dQ partials' fifth (K^T dS^T) stored per step. Each form is compiled with `warp_specialize=True`;
a form is warp-specialised when its PTX splits registers between warp groups (setmaxnreg). Pointers carry the
16-byte alignment hint, as the launcher gives aligned tensors.

    python bench/hopper_ws_probe.py [--json bench/results/hopper_ws_probe_triton<version>.json]
"""

from __future__ import annotations

import argparse

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moba_train.staging import write_json


@triton.jit
def dkdv_loop(q_desc, do_desc, k_src, v_src, lse_src, delta_src, dk_ptr, dv_ptr, dq_ptr, first, count, qk_scale,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, TMA_KV: tl.constexpr,
              TMA_ROWS: tl.constexpr, DQ: tl.constexpr):
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, D)
    kv_off = cols[:, None] * D + dims[None, :]
    if TMA_KV:
        k = k_src.load([0, 0])
        v = v_src.load([0, 0])
    else:
        k = tl.load(k_src + kv_off)
        v = tl.load(v_src + kv_off)
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    for i in tl.range(0, count, BLOCK_M, warp_specialize=True):
        rows = first + i + tl.arange(0, BLOCK_M)
        row_ok = i + tl.arange(0, BLOCK_M) < count
        q = tl.where(row_ok[:, None], q_desc.load([first + i, 0]), 0.0)
        do = tl.where(row_ok[:, None], do_desc.load([first + i, 0]), 0.0)
        if TMA_ROWS:
            lse = tl.where(row_ok, lse_src.load([first + i]), 0.0)
            delta = tl.where(row_ok, delta_src.load([first + i]), 0.0)
        else:
            lse = tl.load(lse_src + rows, mask=row_ok, other=0.0)
            delta = tl.load(delta_src + rows, mask=row_ok, other=0.0)
        p_t = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
        dv += tl.dot(p_t.to(tl.bfloat16), do)
        ds_t = (p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])).to(tl.bfloat16)
        dk += tl.dot(ds_t, q)
        if DQ:
            dq = tl.trans(tl.dot(tl.trans(k), ds_t))
            tl.store(dq_ptr + rows[:, None] * D + dims[None, :], dq, mask=row_ok[:, None])
    tl.store(dk_ptr + kv_off, dk.to(tl.bfloat16))
    tl.store(dv_ptr + kv_off, dv.to(tl.bfloat16))


def probe(tma_kv: bool, tma_rows: bool, dq: bool, warps: int, block_m=32, block_n=128, dim=64) -> dict:
    rows = f"tensordesc<bf16[{block_m}, {dim}]>"
    sig = {"q_desc": rows, "do_desc": rows,
           "k_src": f"tensordesc<bf16[{block_n}, {dim}]>" if tma_kv else "*bf16",
           "lse_src": f"tensordesc<fp32[{block_m}]>" if tma_rows else "*fp32",
           "dk_ptr": "*bf16", "dv_ptr": "*bf16", "dq_ptr": "*fp32", "first": "i32", "count": "i32", "qk_scale": "fp32"}
    sig["v_src"], sig["delta_src"] = sig["k_src"], sig["lse_src"]
    consts = dict(BLOCK_M=block_m, BLOCK_N=block_n, D=dim, TMA_KV=tma_kv, TMA_ROWS=tma_rows, DQ=dq)
    sig.update({name: "constexpr" for name in consts})
    form = {"tma_kv": tma_kv, "tma_rows": tma_rows, "dq_product": dq, "warps": warps}
    try:
        pointers = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(dkdv_loop.arg_names) if sig[n][0] == "*"}
        source = ASTSource(dkdv_loop, {n: sig[n] for n in dkdv_loop.arg_names}, constexprs=consts, attrs=pointers)
        kernel = triton.compile(source,
                                target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 2})
    except Exception as exc:  # the compiler's verdict is the result
        return {**form, "compiles": False, "error": str(exc).strip().splitlines()[-1][:200]}
    return {**form, "compiles": True, "warp_specialized": "setmaxnreg" in kernel.asm["ptx"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    results = [probe(tma_kv, tma_rows, dq, warps) for warps in (4, 8) for dq in (False, True)
               for tma_kv, tma_rows in ((False, False), (True, False), (True, True))]
    for r in results:
        verdict = ("warp-specialised" if r["warp_specialized"] else "compiles, not specialised") if r["compiles"] \
            else f"fails: {r['error']}"
        print(f"warps {r['warps']}  dQ product {'yes' if r['dq_product'] else 'no '}  K/V by TMA "
              f"{'yes' if r['tma_kv'] else 'no '}  lse/delta by TMA {'yes' if r['tma_rows'] else 'no '}: {verdict}")
    if args.json:
        write_json(args.json, {"triton": triton.__version__, "target": "sm_90", "forms": results})


if __name__ == "__main__":
    main()
