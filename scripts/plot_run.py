"""Plot training runs from their files (no W&B needed): loss and validation curves, throughput and MFU,
MoBA routing; several runs overlaid (e.g. MoBA against full attention).

    python scripts/plot_run.py runs/tiny_moba [runs/tiny_full ...] [--out DIR]

PNG files go to DIR (default <first RUN_DIR>/plots); see moba_train/plots.py for what each holds.
"""

import argparse
import sys
from pathlib import Path

from moba_train.cli import run_entry


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="a run's output_dir")
    parser.add_argument("--out", type=Path, help="where the PNG files go (default <first RUN_DIR>/plots)")
    args = parser.parse_args(argv)
    from moba_train.plots import plot_runs

    for path in plot_runs(args.run_dirs, args.out or args.run_dirs[0] / "plots"):
        print(path)


if __name__ == "__main__":
    run_entry(lambda: main(sys.argv[1:]))
