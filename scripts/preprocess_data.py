"""Tokenize a text collection into a Megatron-Core indexed dataset (<output-prefix>.bin/.idx).

    python scripts/preprocess_data.py --input data/raw/ --tokenizer /models/Llama-3.1-8B \
        --output-prefix data/mydata --text-field text --workers 8
"""

import argparse
import os
import sys

from moba_train.cli import run_entry
from moba_train.data.preprocess import preprocess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="json/jsonl/parquet/txt file or directory, or hub dataset")
    parser.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer directory or tokenizer.json")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.bin and <prefix>.idx")
    parser.add_argument("--text-field", default="text", help="column holding the document text (default: text)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if the output is complete")
    args = parser.parse_args()
    stats = preprocess(args.input, args.tokenizer, args.output_prefix, text_field=args.text_field,
                       workers=max(1, args.workers), overwrite=args.overwrite, progress=sys.stderr.isatty())
    if stats is None:
        print(f"{args.output_prefix}.bin/.idx already complete; pass --overwrite to rebuild")
    else:
        print(f"wrote {args.output_prefix}.bin/.idx: {stats.summary()}")


if __name__ == "__main__":
    run_entry(main)  # a DataError (a ConfigError) prints one line and exits with code 2
