"""Entry-point plumbing shared by scripts/: `--config PATH section.key=value ...` and error handling.

A user error (ConfigError: bad recipe, override, launch size) prints one line on stderr and exits
with code 2; an aborted run (TrainingAborted) prints one line and exits with code 1. No tracebacks
for either. Under torchrun an error that every process raises alike (SharedConfigError, TrainingAborted)
is printed by the first process of each node only, not once per rank. The others wait for it before
they exit (up to FIRST_RANK_GRACE_S): torchrun ends every worker as soon as one fails, which would kill the
first process before it printed if it got to the error last.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Callable, Sequence

from moba_train.config import ConfigError, load_config
from moba_train.implementations import quiet_megatron_fallbacks


class SharedConfigError(ConfigError):
    """A ConfigError that every process of a launch raises with the same message: it follows from the
    recipe, the launch and the files every process sees (or rank 0 decided it and told the others)."""


FIRST_RANK_GRACE_S = 60.0


def _exit_after_the_first(code: int) -> None:
    """sys.exit(code); a process that is not the first of its node first waits up to FIRST_RANK_GRACE_S
    for the launcher to end it, which it does when the first exits (on the same error, printed). A default
    SIGTERM handler makes that end immediate."""
    if not _first_on_its_node():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(FIRST_RANK_GRACE_S)
    sys.exit(code)


def _first_on_its_node() -> bool:
    return os.environ.get("LOCAL_RANK", "0") == "0"


def positive(kind: type, what: str) -> Callable[[str], float]:
    """An argparse type: `kind(text)` if it is above zero, else the error "<text> is not a positive <what>"."""
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} is not a positive {what}")
        return value

    parse.__name__ = kind.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


def parse_recipe(argv: Sequence[str] | None, description: str, dry_run: bool = False):
    """The validated Config of `--config PATH` plus `section.key=value` overrides (ConfigError if wrong);
    with `dry_run`, (config, arguments) where the arguments hold --dry-run and --world-size."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="recipe YAML, e.g. configs/tiny_moba.yaml")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. train.lr=1e-5 attention.topk=8")
    if dry_run:
        parser.add_argument("--dry-run", action="store_true", help="print the layout and memory per GPU; build nothing")
        parser.add_argument("--world-size", type=positive(int, "number of processes"),
                            help="processes of the launch the dry run describes")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        raise SharedConfigError(str(err)) from None
    return (cfg, args) if dry_run else cfg


def run_entry(main: Callable[[], None]) -> None:
    """Call `main()`; turn user errors, aborts and file-system errors (OSError) into one stderr line and an exit
    code. Megatron-Core's warnings that Transformer Engine and Apex are absent are off (a training run says
    which implementations it uses in one line), so an error is the only line a user sees."""
    quiet_megatron_fallbacks()
    try:
        main()
    except ConfigError as err:
        if not isinstance(err, SharedConfigError):
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)
        if _first_on_its_node():
            print(f"error: {err}", file=sys.stderr, flush=True)
        _exit_after_the_first(2)
    except OSError as err:  # a path the user gave that cannot be written or read: one line, not a traceback
        where = f" '{err.filename}'" if err.filename else ""
        print(f"error: {err.strerror or err}{where}; check the path and its permissions", file=sys.stderr, flush=True)
        _exit_after_the_first(1)
    except Exception as err:
        from moba_train.training import TrainingAborted

        if not isinstance(err, TrainingAborted):
            raise
        if _first_on_its_node():  # every rank aborts alike: the loss is reduced, a failed save fails everywhere
            print(f"error: {err}", file=sys.stderr, flush=True)
        _exit_after_the_first(1)
