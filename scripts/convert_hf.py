"""Convert between Hugging Face Llama directories and our checkpoints.

    python scripts/convert_hf.py import HF_DIR OUT_DIR      # HF LlamaForCausalLM -> model-only checkpoint
    python scripts/convert_hf.py export CKPT_DIR HF_OUT_DIR # our checkpoint (or a checkpoint root: its newest) -> HF

The imported checkpoint starts training with `checkpoint.init_from=OUT_DIR` under any tensor-parallel
size. The output is published whole when complete; a non-empty target is replaced only when it is an
earlier output of the same direction, or with --overwrite. Bad input (missing or truncated shards, a
damaged config.json, weights that do not match it, a non-Llama model, ...) prints one line and exits
with code 2.
"""

import argparse
import sys

from moba_train.cli import run_entry


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("direction", choices=["import", "export"])
    parser.add_argument("source", help="import: HF model directory; export: checkpoint directory")
    parser.add_argument("target", help="import: checkpoint directory to write; export: HF directory to write")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace TARGET even when it holds other files (they are deleted)")
    args = parser.parse_args(argv)
    from moba_train import convert  # after argument parsing: importing Megatron takes seconds

    if args.direction == "import":
        convert.import_hf(args.source, args.target, overwrite=args.overwrite)
    else:
        convert.export_hf(args.source, args.target, overwrite=args.overwrite)
    print(f"wrote {args.target}")


if __name__ == "__main__":
    run_entry(lambda: main(sys.argv[1:]))
