"""Reading W&B offline run files back (test support): the records through the package's own reader
(moba_train.wandb_transaction_log, which describes the format), decoded into rows and config.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from moba_train.wandb_transaction_log import UnreadableLog, records


def _items(items) -> dict:
    """{key: decoded value}; an item with a nested key (a media or histogram value, which W&B logs as its
    fields) lands in nested dicts: {"moba/heatmap": {"_type": "image-file", "path": ...}}."""
    values: dict = {}
    for item in items:
        path = [item.key] if item.key else list(item.nested_key)
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    return values


def _complete(path: Path) -> bool:
    """Whether the file holds the run's exit record (a file still being written may end mid-chunk)."""
    try:
        return any(record.WhichOneof("record_type") == "exit" for record in records(path))
    except UnreadableLog:
        return False


def offline_runs(wandb_dir: Path, timeout: float = 60.0, killed: int = 0) -> list[Path]:
    """The .wandb files under `<dir>/wandb`, oldest run first (directory names start with the start time),
    each once complete: wandb-core writes them asynchronously, and `run.finish()` can return before the
    file is on disk (seen for the first run of a process with wandb 0.31). The first `killed` runs' services
    were killed, so their files never get an exit record: they are read as they are."""
    paths = sorted(Path(wandb_dir).glob("offline-run-*/run-*.wandb"))
    deadline = time.monotonic() + timeout
    for path in paths[killed:]:
        while not _complete(path):
            assert time.monotonic() < deadline, f"{path} has no exit record after {timeout} s"
            time.sleep(0.1)
    return paths


def history(path: Path) -> list[dict]:
    """The history rows of one run file: {key: decoded value} with `_step`, in logged order."""
    return [_items(record.history.item) for record in records(path) if record.WhichOneof("record_type") == "history"]


def run_record(path: Path):
    """The run's RunRecord (id, name, group, tags, notes, config)."""
    return next(r.run for r in records(path) if r.WhichOneof("record_type") == "run")


def config(path: Path) -> dict:
    """The run's config as logged: the run record's entries updated by later config records."""
    values = {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            values.update(_items((record.run.config if kind == "run" else record.config).update))
    return values
