"""W&B's transaction logs read back: the records a run's `run-<id>.wandb` files hold (wandb 0.31 has no
public reader).

wandb-core writes every record of a run to `<dir>/wandb/offline-run-<time>-<id>/run-<id>.wandb` (offline)
or `<dir>/wandb/run-<time>-<id>/run-<id>.wandb` (online), one file per process that continued the run. The
format is a LevelDB-style log: a 7-byte file header (b":W&B", magic 0xBEE1 little-endian, version 0), then
32 KiB blocks (counted from the start of the file) of chunks, each a 7-byte header (CRC-32 of the chunk type
byte followed by the payload, payload length uint16, type uint8: 1 full, 2 first, 3 middle, 4 last) and its
payload; a block's tail shorter than a chunk header is zero padding. Joined payloads are
`wandb.proto.wandb_internal_pb2.Record` protobuf messages.

wandb-core buffers what it writes, and a service killed with the job (SLURM signals every process of a
step) leaves a file that ends mid-record or holds only its header: `records` yields what is whole.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

BLOCK = 32 * 1024
HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class UnreadableLog(ValueError):
    """A file that is not a W&B transaction log in the format above (another W&B version, or damaged)."""


def records(path: Path):
    """Every whole Record of a .wandb file, in order, up to where its writer stopped (a chunk or a record
    cut short ends the file); a file of another format or with a damaged chunk raises UnreadableLog."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if len(data) < HEADER.size:
        return  # killed before its header
    if HEADER.unpack_from(data, 0) != (b":W&B", 0xBEE1, 0):
        raise UnreadableLog(f"{path} does not start with the header of a W&B transaction log of version 0")
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
        if len(payload) < length:
            return  # its writer stopped in the middle of this chunk
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
            raise UnreadableLog(f"{path}: checksum mismatch at byte {pos}")
        if kind not in (FULL, FIRST, MIDDLE, LAST) or (kind in (MIDDLE, LAST)) != (parts is not None):
            raise UnreadableLog(f"{path}: chunk of type {kind} out of sequence at byte {pos}")
        pos += CHUNK.size + length
        if kind == FIRST:
            parts = [payload]
            continue
        if kind != FULL:
            parts.append(payload)
            if kind == MIDDLE:
                continue
            payload, parts = b"".join(parts), None
        try:
            yield wandb_internal_pb2.Record.FromString(payload)
        except DecodeError as err:
            raise UnreadableLog(f"{path}: a record ending at byte {pos} is no W&B Record ({err})") from err


def run_files(wandb_dir: Path, run_id: str) -> list[Path]:
    """The transaction logs of W&B run `run_id` under `wandb_dir`, offline and online, oldest first (the
    directory names hold the start time after their prefix)."""
    paths = [*Path(wandb_dir).glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"),
             *Path(wandb_dir).glob(f"run-*-{run_id}/run-{run_id}.wandb")]
    return sorted(paths, key=lambda path: path.parent.name.removeprefix("offline-"))


def newest_step(wandb_dir: Path, run_id: str) -> int | None:
    """The newest history step that the transaction logs of run `run_id` under `wandb_dir` hold, over all of
    them (0 if none holds a history row; None if there is no log of that run)."""
    paths = run_files(wandb_dir, run_id)
    if not paths:
        return None
    return max((record.history.step.num for path in paths for record in records(path)
                if record.WhichOneof("record_type") == "history"), default=0)
