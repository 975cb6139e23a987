"""What one transformer layer keeps for its backward, measured, against moba_train.memory's formula.

    python scripts/bench_memory.py --config configs/llama1b_moba_32k.yaml [section.key=value ...] \
        [--out bench/results/memory.json]

For MoBA and full attention, with one document per sample and with packed documents (one row of documents, as
with data.reset_attention_mask or context parallelism), `benchmarking.layer_memory` builds the recipe's model
with 1 and 2 layers on this device, runs one micro-batch forward under autograd's saved-tensor hooks and takes
the difference: the tensors one layer keeps, each storage once. Printed and written (JSON): bytes per token
measured and by the formula (`memory.layer_activation_bytes`, the fusions this device resolves), and the kept
tensors; on CUDA also the allocator's bytes after one forward and its peak through the backward, for 1 and 2
layers.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
from pathlib import Path

from moba_train.cli import run_entry
from moba_train.config import load_config
from moba_train.staging import write_text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="recipe YAML")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    parser.add_argument("--out", help="JSON path (default bench/results/memory-<gpu>-<commit>.json)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)

    import torch

    from moba_train.benchmarking import layer_memory
    from moba_train.distributed import resolve_device
    from moba_train.fusions import resolve
    from moba_train.memory import layer_activation_bytes
    from moba_train.model import compute_dtype

    device = resolve_device(cfg, 0)
    fused = resolve(cfg, device)
    element = 2 if compute_dtype(cfg, device) == torch.bfloat16 else 4
    results = []
    for mode in ("moba", "full"):
        arm = load_config(args.config, [*args.overrides, f"attention.mode={mode}"])
        for packed in (False, True):
            measured = layer_memory(arm, packed)
            core, mlp = layer_activation_bytes(arm, fused, element, packed)
            formula = core + (0 if arm.train.recompute == "selective" else mlp)
            record = dict(dataclasses.asdict(measured), formula_bytes_per_token=formula)
            results.append(record)
            print(f"{mode:5} {'packed' if packed else 'one document per sample':24} measured "
                  f"{measured.bytes_per_token:9.1f} B/token, formula {formula:9.1f} "
                  f"({100 * (measured.bytes_per_token / formula - 1):+.1f}%)"
                  + "".join(f"; {n} layer(s): after forward {v['after_forward'] / 2**30:.2f} GiB, peak "
                            f"{v['peak'] / 2**30:.2f} GiB" for n, v in measured.cuda.items()), flush=True)
    commit = os.environ.get("GIT_COMMIT", "unknown")
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    meta = {"gpu": gpu, "torch": torch.__version__, "commit": commit, "config": args.config,
            "overrides": args.overrides, "fusions": fused, "element_bytes": element,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    out = Path(args.out or f"bench/results/memory-{gpu.replace(' ', '_')}-{commit[:7]}.json")
    write_text(out, json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    run_entry(main)
