"""Evaluate a moba-train checkpoint or an exported Hugging Face model: validation loss, loss by position,
passkey retrieval, synthetic recall, copying (see moba_train/evaluation.py).

    python scripts/evaluate.py runs/study/arms/moba/checkpoints --data data/site_corpus/python_valid \\
        --out eval/moba [--attention full] [--passkey-lengths 2048,8192] [section.key=value ...]

Writes <out>/eval.json, <out>/loss_by_position.png and, with passkey lengths, <out>/passkey.png.
"""

import argparse
import sys
from pathlib import Path

from moba_train.cli import run_entry


def _list(kind):
    return lambda text: tuple(kind(x) for x in text.split(",") if x)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="checkpoint (step_* or a checkpoint root) or Hugging Face model directory")
    parser.add_argument("--out", type=Path, required=True, help="directory for eval.json and the plots")
    parser.add_argument("--attention", choices=["trained", "full", "moba"], default="trained",
                        help="evaluate with the recipe's attention (default), or every layer full, or MoBA")
    parser.add_argument("--data", help="indexed dataset prefix of validation text (e.g. <corpus>/python_valid)")
    parser.add_argument("--tokenizer", help="tokenizer for passkey prompts (default: the recipe's data.tokenizer)")
    parser.add_argument("--seq-length", type=int, help="window length (default: the recipe's train.seq_length)")
    parser.add_argument("--windows", type=int, default=64, help="validation windows (default: 64)")
    parser.add_argument("--bucket", type=int, default=1024, help="position bucket and trailing tokens (1024)")
    parser.add_argument("--passkey-lengths", type=_list(int), default=(), help="e.g. 2048,4096,8192 (default: none)")
    parser.add_argument("--passkey-depths", type=_list(float), default=(0.0, 0.25, 0.5, 0.75, 1.0),
                        help="needle depths, 0 = start of the context (0,0.25,0.5,0.75,1)")
    parser.add_argument("--passkey-samples", type=int, default=20, help="prompts per cell (default: 20)")
    parser.add_argument("--recall-documents", type=int, default=0,
                        help="documents of the recipe's synthetic recall task to score (default: 0)")
    parser.add_argument("--copy-documents", type=int, default=0,
                        help="copy documents (held-out text windows, their start tiled) to score (default: 0)")
    parser.add_argument("--gate-recall", type=int, default=0, metavar="N",
                        help="MoBA models: the gate's recall of dense attention's mass at N positions of each "
                             "position bucket of the long documents (default: 0, not measured)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass (default: 4)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="e.g. attention.topk=8 run.device=cpu (not the model's shapes)")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the flags

    from moba_train import evaluation  # after argument parsing: importing Megatron takes seconds
    from moba_train.config import ConfigError
    from moba_train.distributed import destroy_distributed

    if args.data is None and (args.passkey_lengths or args.copy_documents or not args.recall_documents):
        raise ConfigError("--data is needed for the validation loss, passkey prompts and copy documents; pass a "
                          "validation prefix (or only --recall-documents N for the synthetic task)")
    settings = evaluation.EvalSettings(
        seq_length=args.seq_length, windows=args.windows, bucket_size=args.bucket, trailing_tokens=args.bucket,
        passkey_lengths=args.passkey_lengths, passkey_depths=args.passkey_depths,
        passkey_samples=args.passkey_samples, recall_documents=args.recall_documents,
        copy_documents=args.copy_documents, gate_recall_queries=args.gate_recall, batch_size=args.batch_size)
    mode = [] if args.attention == "trained" else [f"attention.mode={args.attention}"]
    loaded = evaluation.load_model(args.model, [*mode, *args.overrides])
    try:
        results = evaluation.evaluate(loaded, settings, args.data, args.tokenizer, progress=sys.stderr.isatty())
    finally:
        destroy_distributed()
    evaluation.write_report(results, args.out, label=Path(args.model).name)
    print(evaluation.report_summary(results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_entry(lambda: main(sys.argv[1:]))
