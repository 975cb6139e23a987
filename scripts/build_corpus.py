"""Build a corpus from this machine's Python sources (no network needed); see moba_train/data/corpus.py.

    python scripts/build_corpus.py                 # the embedded default: data/corpus/{tokenizer/, python.bin/.idx}
    python scripts/build_corpus.py --out-dir data/site_corpus --site-packages --max-mb 96 \\
        --vocab-size 32768 --valid-fraction 0.03 --tokenizer-mb 24   # every installed package, held-out packages
"""

import argparse
import os
import sys

from moba_train.cli import positive, run_entry
from moba_train.data.corpus import DEFAULT_MAX_BYTES, DEFAULT_VOCAB_SIZE, build_corpus, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="data/corpus", help="output directory (default: data/corpus)")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                        help=f"BPE vocabulary, EOS included (default: {DEFAULT_VOCAB_SIZE})")
    parser.add_argument("--max-mb", type=positive(float, "size in MiB"), default=DEFAULT_MAX_BYTES / 2**20,
                        help=f"source text to use, in MiB (default: {DEFAULT_MAX_BYTES / 2**20:g})")
    parser.add_argument("--site-packages", action="store_true", help="also use installed packages' sources")
    parser.add_argument("--valid-fraction", type=float, default=0.0,
                        help="share of the bytes held out by whole packages into python_valid (default: 0)")
    parser.add_argument("--tokenizer-mb", type=positive(float, "size in MiB"), default=None,
                        help="train the tokenizer on at most this much of the training split (default: all)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if the corpus is complete")
    args = parser.parse_args()
    manifest = build_corpus(
        args.out_dir, vocab_size=args.vocab_size, max_bytes=int(args.max_mb * 2**20),
        include_site_packages=args.site_packages, valid_fraction=args.valid_fraction,
        tokenizer_bytes=None if args.tokenizer_mb is None else int(args.tokenizer_mb * 2**20),
        workers=max(1, args.workers), overwrite=args.overwrite, progress=sys.stderr.isatty(),
    )
    if manifest is None:
        print(f"{args.out_dir} already complete; pass --overwrite to rebuild")
    else:
        print(f"wrote {args.out_dir}: {summary(manifest)}")


if __name__ == "__main__":
    run_entry(main)  # a DataError (a ConfigError) prints one line and exits with code 2
