"""Where a model copies from far context: each layer's induction scores on repeated random tokens, and the
attention.layer_kinds that keeps full attention in the layers that copy most (see moba_train/induction.py).

    python scripts/probe_layers.py runs/study/arms/short/checkpoints --full-layers 2 [--segment-length 256] \\
        [--json probe.json] [section.key=value ...]

Prints one line per layer (best head, mean of heads) and the override to train the hybrid with, e.g.
attention.layer_kinds=[moba,...,full]. Works on a moba-train checkpoint or a Hugging Face Llama directory, run
with full attention in every layer. Its defaults are those of the trainer's probe (attention.full_layers_at=probe):
given the training's train.seq_length=N as an override, it scores what the trainer would and chooses the same layers.
"""

import argparse
import sys
from pathlib import Path

from moba_train.cli import positive, run_entry


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="checkpoint (step_* or a checkpoint root) or Hugging Face model directory")
    parser.add_argument("--full-layers", type=int, default=2, help="layers to keep full attention (default: 2)")
    parser.add_argument("--segment-length", type=positive(int, "number of tokens"),
                        help="random tokens before the repeat; twice this must fit the model (default: half the "
                             "recipe's train.seq_length, at most 4096)")
    parser.add_argument("--sequences", type=positive(int, "number of sequences"), default=16,
                        help="repeated sequences averaged over (default: 16)")
    parser.add_argument("--queries", type=positive(int, "number of queries"), default=64,
                        help="query positions of the second copy per sequence (default: 64)")
    parser.add_argument("--batch-size", type=positive(int, "batch size"), default=4,
                        help="sequences per forward pass (default: 4)")
    parser.add_argument("--json", type=Path, help="also write the scores and the layer kinds to this file")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. run.device=cpu")
    args = parser.parse_intermixed_args(argv)

    from moba_train.induction import probe_model  # after argument parsing: importing Megatron takes seconds
    from moba_train.staging import write_json

    scores = probe_model(args.model, args.full_layers, args.overrides, segment_length=args.segment_length,
                         sequences=args.sequences, queries=args.queries, batch_size=args.batch_size,
                         progress=sys.stderr.isatty())
    kinds = scores["layer_kinds"]
    print(f"induction scores on {scores['sequences']} x {scores['segment_length']} random tokens repeated once "
          f"({scores['queries']} queries each): best head / mean of heads")
    for (name, record), kind in zip(scores["layers"].items(), kinds):
        print(f"  layer {int(name.removeprefix('layer_')) + 1:3d}  {record['max']:.3f} / {record['mean']:.3f}"
              f"{'  full' if kind == 'full' else ''}")
    override = f"attention.layer_kinds=[{','.join(kinds)}]"
    if scores["note"]:
        print(f"warning: {scores['note']}")
    print(override)
    if args.json:
        write_json(args.json, {**scores, "override": override})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    run_entry(lambda: main(sys.argv[1:]))
