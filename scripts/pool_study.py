"""The quality study's targets over repeated runs: a paired gap per run, their mean and 95% interval, and
met / missed / undecided (moba_train/study_pool.py).

    python scripts/pool_study.py bench/results/quality/h200-8668204-short bench/results/quality/h200-f617509-a \
        --out-dir bench/results/quality/pooled

Prints the table; with --out-dir also writes pooled.json, pooled.md and (where the runs evaluated the long held-out
documents) gap_by_position.png there.
"""

import argparse
from pathlib import Path

from moba_train.cli import run_entry


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="results directories of study runs (each holding study.json)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="write pooled.json, pooled.md and gap_by_position.png here")
    parser.add_argument("--mixed-corpora", action="store_true",
                        help="pool runs trained on different corpora (each run's corpus is listed)")
    args = parser.parse_args(argv)

    from moba_train.staging import write_json, write_text
    from moba_train.study_pool import load_runs, plot_gaps_by_position, pool, pooled_markdown

    pooled = pool(load_runs(args.runs), mixed_corpora=args.mixed_corpora)
    text = pooled_markdown(pooled)
    print(text, end="")
    if args.out_dir is not None:
        write_json(args.out_dir / "pooled.json", pooled)
        write_text(args.out_dir / "pooled.md", text)
        if pooled["by_position"]:
            plot_gaps_by_position(pooled, args.out_dir / "gap_by_position.png")


if __name__ == "__main__":
    run_entry(main)
