"""A directory's checksum manifest finds every kind of damage a file can take (missing, truncated,
emptied, grown, one flipped bit in the middle) and an unreadable manifest, names the damaged file, and
ignores files added after it was written. Compared with the bytes as they were written."""

import json
import os

import pytest

from moba_train import checksums

FILES = {"__0_0.distcp": 3 << 20, "__0_1.distcp": 70_001, "common.pt": 1_234, "sub/metadata.json": 10}


@pytest.fixture
def checkpoint(tmp_path):
    for name, size in FILES.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(os.urandom(size))
    checksums.write_manifest(tmp_path)
    return tmp_path


def test_manifest_lists_every_file_with_its_size_and_an_intact_directory_has_no_damage(checkpoint):
    manifest = json.loads((checkpoint / checksums.MANIFEST).read_text())
    assert manifest["algorithm"] == "xxh3_128"
    assert {name: entry["size"] for name, entry in manifest["files"].items()} == FILES
    assert checksums.find_damage(checkpoint) is None
    (checkpoint / "added_later.txt").write_text("not part of the checkpoint")
    assert checksums.find_damage(checkpoint) is None


def _flip_middle_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {
    "missing": (lambda p: p.unlink(), "'__0_1.distcp' is missing"),
    "truncated": (lambda p: os.truncate(p, 70_000), "'__0_1.distcp' has 70000 bytes instead of 70001"),
    "empty": (lambda p: os.truncate(p, 0), "'__0_1.distcp' is empty (it had 70001 bytes)"),
    "grown": (lambda p: p.write_bytes(p.read_bytes() + b"\0"), "'__0_1.distcp' has 70002 bytes instead of 70001"),
    "bit-rot": (_flip_middle_bit, "'__0_1.distcp' does not match its checksum (its contents changed)"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_each_kind_of_damage_is_named(checkpoint, damage):
    do, reason = DAMAGE[damage]
    do(checkpoint / "__0_1.distcp")
    assert checksums.find_damage(checkpoint) == reason


def test_damage_to_the_manifest_itself_is_named_and_a_directory_without_one_is_not_checked(checkpoint):
    os.truncate(checkpoint / checksums.MANIFEST, 40)
    assert checksums.find_damage(checkpoint) == "its checksums.json is unreadable"
    (checkpoint / checksums.MANIFEST).unlink()
    assert not checksums.has_manifest(checkpoint)
    assert checksums.find_damage(checkpoint) is None
