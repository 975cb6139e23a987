"""Checksums of every file of a directory, kept in `<dir>/checksums.json`: written when a checkpoint is
published, verified before one is loaded, so that a missing, truncated, emptied or bit-rotten file is
found before it is read rather than as NaN losses steps later.

    {"algorithm": "xxh3_128", "files": {"__0_0.distcp": {"size": 1048576, "xxh3_128": "9f2c..."}, ...}}

xxh3_128 (the xxhash package) is not cryptographic: it detects damage, not tampering. Hashing reads
every byte once more; under torch.distributed the files are shared out over the ranks (rank r hashes
files r, r + world, ... in name order) and the results gathered, so the time is the largest share's.
Measured on the 2-core CPU machine (2026-12-02), one process, a 3.20 GB checkpoint (a 267M-parameter
model with its Adam state): the save took 13.9 s, of which the checksums 0.4 s (7.7 GB/s, the files
in the page cache); verifying it took 0.3 s. (hashlib's sha256 reads 1.4 GB/s on that machine.)
Functions here are collective when torch.distributed is initialized (every rank calls them) and local
otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.distributed as dist
import xxhash

MANIFEST = "checksums.json"
ALGORITHM = "xxh3_128"
_CHUNK = 1 << 24


def _digest(path: Path) -> str:
    digest = xxhash.xxh3_128()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            digest.update(view[:n])
    return digest.hexdigest()


def _rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _gathered(mine: dict) -> dict:
    """Every rank's `mine`, merged (collective under torch.distributed)."""
    if not dist.is_initialized():
        return mine
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {key: value for part in parts for key, value in part.items()}


def compute_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of every file under `directory` but the manifest itself. Every rank must see the same
    files (call it after a barrier); every rank gets the whole manifest."""
    directory = Path(directory)
    rank, world = _rank_and_world()
    names = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    mine = {name: {"size": (directory / name).stat().st_size, ALGORITHM: _digest(directory / name)}
            for name in names[rank::world]}
    files = _gathered(mine)
    return {"algorithm": ALGORITHM, "files": {name: files[name] for name in names}}


def save_manifest(directory: str | os.PathLike, manifest: dict) -> None:
    """Write `manifest` into `directory` (one process's job), synced to disk."""
    with open(Path(directory) / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def write_manifest(directory: str | os.PathLike) -> None:
    """`compute_manifest`, then rank 0 saves it."""
    manifest = compute_manifest(directory)
    if _rank_and_world()[0] == 0:
        save_manifest(directory, manifest)


def has_manifest(directory: str | os.PathLike) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def _damage_of(directory: Path, name: str, expected: dict) -> str | None:
    path = directory / name
    if not path.is_file():
        return f"'{name}' is missing"
    size = path.stat().st_size
    if size != expected["size"]:
        if size == 0:
            return f"'{name}' is empty (it had {expected['size']} bytes)"
        return f"'{name}' has {size} bytes instead of {expected['size']}"
    if _digest(path) != expected[ALGORITHM]:
        return f"'{name}' does not match its checksum (its contents changed)"
    return None


def find_damage(directory: str | os.PathLike) -> str | None:
    """None when every file the manifest lists is there with its size and checksum; otherwise what is
    wrong (the first damaged file in name order). A directory without a manifest is not checked (None):
    `has_manifest` tells those apart."""
    directory = Path(directory)
    if not has_manifest(directory):
        return None
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
        readable = manifest["algorithm"] == ALGORITHM and all({"size", ALGORITHM} <= set(e) for e in files.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        readable = False
    if not readable:
        return f"its {MANIFEST} is unreadable"
    rank, world = _rank_and_world()
    names = sorted(files)
    damage = _gathered({name: _damage_of(directory, name, files[name]) for name in names[rank::world]})
    return next((damage[name] for name in names if damage[name] is not None), None)
