"""Reading W&B offline run files back (test support; wandb 0.31 removed its own Python reader).

`wandb/offline-run-<time>-<id>/run-<id>.wandb` is a LevelDB-style log: a 7-byte file header
(b":W&B", magic 0xBEE1 little-endian, version 0), then 32 KiB blocks of chunks, each a 7-byte header
(CRC-32 of the chunk type byte followed by the payload, payload length uint16, type uint8: 1 full,
2 first, 3 middle, 4 last) and its payload; a block's tail shorter than a chunk header is zero
padding. Joined payloads are `wandb.proto.wandb_internal_pb2.Record` protobuf messages.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

from google.protobuf.message import DecodeError
from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    """Every Record in a .wandb file, in order; a CRC mismatch or a broken chunk sequence raises."""
    data = Path(path).read_bytes()
    ident, magic, version = HEADER.unpack_from(data, 0)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path} is not a W&B transaction log"
    pos, parts = HEADER.size, None
    while pos + CHUNK.size <= len(data):
        room = BLOCK - pos % BLOCK
        if room < CHUNK.size:
            pos += room
            continue
        crc, length, kind = CHUNK.unpack_from(data, pos)
        if (crc, length, kind) == (0, 0, 0):  # zero padding up to the next block
            pos += room
            continue
        payload = data[pos + CHUNK.size: pos + CHUNK.size + length]
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) == crc, f"{path}: checksum mismatch at byte {pos}"
        pos += CHUNK.size + length
        if kind == FULL:
            yield wandb_internal_pb2.Record.FromString(payload)
        elif kind == FIRST:
            parts = [payload]
        elif kind in (MIDDLE, LAST):
            assert parts is not None, f"{path}: chunk continuation without a first chunk at byte {pos}"
            parts.append(payload)
            if kind == LAST:
                yield wandb_internal_pb2.Record.FromString(b"".join(parts))
                parts = None


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
    except (AssertionError, struct.error, DecodeError):
        return False


def offline_runs(wandb_dir: Path, timeout: float = 60.0) -> list[Path]:
    """The .wandb files under `<dir>/wandb`, oldest run first (directory names start with the start time),
    each once complete: wandb-core writes them asynchronously, and `run.finish()` can return before the
    file is on disk (seen for the first run of a process with wandb 0.31)."""
    paths = sorted(Path(wandb_dir).glob("offline-run-*/run-*.wandb"))
    deadline = time.monotonic() + timeout
    for path in paths:
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
