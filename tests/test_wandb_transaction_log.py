"""moba_train.wandb_transaction_log: a W&B run file cut anywhere (a service killed mid-write) reads as the whole
records before the cut; a damaged or foreign file is one UnreadableLog."""

import pytest
import wandb
import wandb_offline

from moba_train.wandb_transaction_log import BLOCK, UnreadableLog, newest_step, records, run_files


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    """A finished offline run of 40 steps: over 32 KiB, so records cross a block boundary."""
    out = tmp_path_factory.mktemp("wandb")
    run = wandb.init(project="t", mode="offline", dir=out, id="cut12345")
    for step in range(1, 41):
        run.log({f"train/metric_{i:02d}": step + i / 7 for i in range(30)}, step=step)
    run.finish()
    (path,) = wandb_offline.offline_runs(out / "wandb")
    assert path.stat().st_size > BLOCK
    return path


def test_a_file_cut_anywhere_reads_as_the_whole_records_before_the_cut(run_file, tmp_path):
    data = run_file.read_bytes()
    whole = [record.SerializeToString() for record in records(run_file)]
    cut = tmp_path / "run-cut12345.wandb"
    for end in sorted({*range(0, len(data), 97), *range(BLOCK - 40, BLOCK + 40), len(data)}):
        cut.write_bytes(data[:end])
        got = [record.SerializeToString() for record in records(cut)]
        assert got == whole[:len(got)], end
    assert len(got) == len(whole)


def test_the_newest_step_is_over_every_file_of_the_run_offline_and_online_and_none_without_one(run_file, tmp_path):
    complete = tmp_path / "offline-run-20260101_000000-cut12345" / "run-cut12345.wandb"
    killed = tmp_path / "run-20260102_000000-cut12345" / "run-cut12345.wandb"  # later, online, only its header
    for path, data in ((complete, run_file.read_bytes()), (killed, run_file.read_bytes()[:7])):
        path.parent.mkdir()
        path.write_bytes(data)
    assert run_files(tmp_path, "cut12345") == [complete, killed]
    assert newest_step(tmp_path, "cut12345") == 40
    complete.unlink()
    assert newest_step(tmp_path, "cut12345") == 0
    assert newest_step(tmp_path, "other123") is None


def test_a_damaged_or_foreign_file_is_unreadable(run_file, tmp_path):
    data = bytearray(run_file.read_bytes())
    data[20] ^= 0xFF  # inside the first chunk's payload
    damaged = tmp_path / "damaged.wandb"
    damaged.write_bytes(bytes(data))
    with pytest.raises(UnreadableLog, match="checksum mismatch at byte 7"):
        list(records(damaged))
    foreign = tmp_path / "foreign.wandb"
    foreign.write_bytes(b"SQLite format 3\0")
    with pytest.raises(UnreadableLog, match="does not start with the header of a W&B transaction log"):
        list(records(foreign))
