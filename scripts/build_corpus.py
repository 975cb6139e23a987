"""Build the embedded default corpus from this machine's Python sources (no network needed).

    python scripts/build_corpus.py                 # data/corpus/{tokenizer/, python.bin, python.idx}
    python scripts/build_corpus.py --out-dir data/corpus_big --max-mb 64 --site-packages
"""

import argparse
import os
import sys

from moba_train.cli import run_entry
from moba_train.data.corpus import DEFAULT_MAX_BYTES, DEFAULT_VOCAB_SIZE, build_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="data/corpus", help="output directory (default: data/corpus)")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                        help=f"BPE vocabulary, EOS included (default: {DEFAULT_VOCAB_SIZE})")
    parser.add_argument("--max-mb", type=float, default=DEFAULT_MAX_BYTES / 2**20,
                        help=f"source text to use, in MiB (default: {DEFAULT_MAX_BYTES / 2**20:g})")
    parser.add_argument("--site-packages", action="store_true", help="also use installed packages' sources")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if the corpus is complete")
    args = parser.parse_args()
    stats = build_corpus(args.out_dir, vocab_size=args.vocab_size, max_bytes=int(args.max_mb * 2**20),
                         include_site_packages=args.site_packages, workers=max(1, args.workers),
                         overwrite=args.overwrite, progress=sys.stderr.isatty())
    if stats is None:
        print(f"{args.out_dir} already complete; pass --overwrite to rebuild")
    else:
        print(f"wrote {args.out_dir}: {stats.summary()}")


if __name__ == "__main__":
    run_entry(main)  # a DataError (a ConfigError) prints one line and exits with code 2
