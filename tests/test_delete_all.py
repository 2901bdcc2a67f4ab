"""``CheckpointManager.delete_all()``: a finished run's checkpoints go, as retention retires them.

What ``ckptstore.keras.BackupAndRestore(delete_checkpoint=True)`` relies on at the end
of ``fit()``: every committed checkpoint and the state file leave the remote, each
manifest before its data and the oldest first, under the writer's lease; waiting
uploads are dropped, the one in flight settles first; staged copies go too, so no
later manager uploads them again; a failure is raised, never swallowed. Faults
come from :mod:`faultfs`; ckptstore runs unchanged.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import tensorflow as tf

import ckptstore
from conftest import file_remote, open_manager
from faultfs import faulty_file_protocol
from training import TrainState

FAST = ckptstore.RetryPolicy(attempts=2, initial_delay=0.01, max_delay=0.02)
LEASE = "ckptstore.lease.json"


@pytest.fixture
def faults():
    with faulty_file_protocol() as f:
        yield f


def saved(state, manager, *steps: int) -> None:
    for step in steps:
        state.advance_to(step)
        manager.save()
    manager.sync()


def left_on(remote) -> list[str]:
    """What the remote holds besides the writer lease (and its lock file)."""
    return [n for n in remote.names() if not n.startswith(LEASE)]


def staged_checkpoints(staging) -> list[str]:
    return sorted(n for n in os.listdir(staging) if n.startswith("ckpt-") or n == "checkpoint")


def test_delete_all_retires_every_checkpoint_manifest_first_oldest_first(faults, state, tmp_path):
    remote = file_remote(tmp_path)
    m = open_manager(state, remote, tmp_path / "s")
    saved(state, m, 1, 2, 3)
    assert remote.manifests() == ["ckpt-2", "ckpt-3"]
    removed: list[str] = []
    faults.kill_when = lambda op, path: op == "rm" and removed.append(os.path.basename(path))

    m.delete_all()

    def files(name: str) -> set[str]:
        return {name + ".index", name + ".data-00000-of-00001"}

    assert len(removed) == 7, removed
    assert removed[0] == "ckpt-2.manifest.json"  # from here on ckpt-2 exists for no reader
    assert set(removed[1:3]) == files("ckpt-2")
    assert removed[3] == "ckpt-3.manifest.json"
    assert set(removed[4:6]) == files("ckpt-3")
    assert removed[6] == "checkpoint"
    assert left_on(remote) == []
    assert staged_checkpoints(tmp_path / "s") == []
    assert m.latest_checkpoint is None and m.checkpoints == []
    # The manager stays usable: the next save starts the run afresh.
    state.advance_to(4)
    m.save()
    m.close()
    assert remote.manifests() == ["ckpt-4"]
    with open_manager(TrainState(), remote, tmp_path / "fresh") as reader:
        assert os.path.basename(reader.latest_checkpoint) == "ckpt-4"


def test_delete_all_drops_waiting_uploads_and_lets_the_one_in_flight_settle(
    faults, state, tmp_path
):
    remote = file_remote(tmp_path)
    faults.gate = threading.Event()  # uploads wait here
    m = open_manager(state, remote, tmp_path / "s", max_to_keep=3)
    state.advance_to(1)
    m.save()
    deadline = time.monotonic() + 30
    while m.upload_status().in_flight != "ckpt-1":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    state.advance_to(2)
    m.save()  # waits behind ckpt-1
    deleting = threading.Thread(target=m.delete_all)
    deleting.start()
    deleting.join(timeout=0.5)
    assert deleting.is_alive(), "delete_all() must wait for the upload in flight"
    faults.gate.set()
    deleting.join(timeout=60)
    assert not deleting.is_alive()

    status = m.upload_status()
    assert "ckpt-2" in status.skipped  # dropped: it would have been deleted right after
    assert not [p for p in faults.puts if p.startswith("ckpt-2")]
    assert left_on(remote) == []  # ckpt-1 was committed, then deleted
    assert staged_checkpoints(tmp_path / "s") == []
    m.close()


def test_a_failed_deletion_keeps_the_newest_restorable_and_the_next_sync_finishes_it(
    faults, state, tmp_path
):
    remote = file_remote(tmp_path)
    m = open_manager(state, remote, tmp_path / "s", retry=FAST)
    saved(state, m, 1, 2, 3)
    faults.fail_when = lambda op, path: op == "rm" and path.endswith("ckpt-3.manifest.json")
    with pytest.raises(ckptstore.UploadError, match="delete the checkpoints") as info:
        m.delete_all()
    assert remote.url in str(info.value)
    # The oldest went first: what is left is the newest, whole and restorable.
    assert remote.manifests() == ["ckpt-3"]
    assert not [n for n in remote.names() if n.startswith("ckpt-2")]
    fresh = TrainState()
    with open_manager(fresh, remote, tmp_path / "elsewhere", read_only=True) as reader:
        fresh.checkpoint.restore(reader.latest_checkpoint).assert_existing_objects_matched()
    assert fresh.matches_step(3)

    faults.fail_when = None
    m.sync()  # tries the deletion again
    assert left_on(remote) == []
    m.close()


def test_an_upload_that_failed_is_raised_and_its_staged_copy_deleted_with_the_rest(
    faults, state, tmp_path
):
    remote = file_remote(tmp_path)
    m = open_manager(state, remote, tmp_path / "s", retry=FAST)
    saved(state, m, 1)
    faults.fail_when = lambda op, path: op == "put" and "ckpt-2." in path
    state.advance_to(2)
    m.save()
    with pytest.raises(ckptstore.UploadError, match="ckpt-2"):
        m.delete_all()
    assert left_on(remote) == []
    assert staged_checkpoints(tmp_path / "s") == []
    m.close()
    faults.fail_when = None
    # A manager restarted on that staging directory finds nothing to upload.
    with open_manager(TrainState(), remote, tmp_path / "s") as successor:
        assert successor.latest_checkpoint is None
        successor.sync()
    assert left_on(remote) == []


def test_a_writer_that_lost_the_run_deletes_nothing(state, tmp_path):
    remote = file_remote(tmp_path)
    first = open_manager(state, remote, tmp_path / "a")
    saved(state, first, 1, 2)
    taker = open_manager(TrainState(), remote, tmp_path / "b", takeover=True)
    with pytest.raises(ckptstore.OwnershipLost):
        first.delete_all()
    assert remote.manifests() == ["ckpt-1", "ckpt-2"]
    with pytest.raises(ckptstore.OwnershipLost):
        first.close()
    taker.close()


def test_a_reader_cannot_delete_a_run_another_process_writes(state, tmp_path):
    remote = file_remote(tmp_path)
    writer = open_manager(state, remote, tmp_path / "a")
    saved(state, writer, 1, 2)
    reader = open_manager(TrainState(), remote, tmp_path / "b")
    with pytest.raises(ckptstore.OwnershipError, match="is being written by"):
        reader.delete_all()
    assert remote.manifests() == ["ckpt-1", "ckpt-2"]
    reader.close()
    writer.close()


def test_delete_all_in_local_mode_deletes_the_managed_checkpoints_and_the_state_file(
    state, tmp_path
):
    directory = str(tmp_path / "plain")
    m = ckptstore.CheckpointManager(state.checkpoint, directory, max_to_keep=2)
    for step in (1, 2, 3):
        state.advance_to(step)
        m.save()
    assert tf.train.latest_checkpoint(directory).endswith("ckpt-3")
    m.delete_all()
    assert os.listdir(directory) == []
    assert tf.train.latest_checkpoint(directory) is None and m.latest_checkpoint is None
