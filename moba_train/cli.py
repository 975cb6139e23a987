"""Entry-point plumbing shared by scripts/: `--config PATH section.key=value ...` and error handling.

A user error (ConfigError: bad recipe, override, launch size) prints one line on stderr and exits
with code 2; an aborted run (TrainingAborted) prints one line and exits with code 1. No tracebacks
for either.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from moba_train.config import Config, ConfigError, load_config


def parse_recipe(argv: Sequence[str] | None, description: str) -> Config:
    """The validated Config of `--config PATH` plus `section.key=value` overrides (ConfigError if wrong)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="recipe YAML, e.g. configs/tiny_moba.yaml")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. train.lr=1e-5 attention.topk=8")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides)


def run_entry(main: Callable[[], None]) -> None:
    """Call `main()`; turn user errors and aborts into one stderr line and an exit code."""
    try:
        main()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Exception as err:
        from moba_train.training import TrainingAborted

        if not isinstance(err, TrainingAborted):
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
