"""A ``staging_dir`` pointed at a directory the user already had keeps the user's files.

ckptstore deletes in staging only the checkpoints it staged itself (its journal,
``.ckptstore-staged.json``). The first test is TensorFlow's own
``testContinueFromUnmanaged`` (checkpoint_management_test.py) with that
directory as ckptstore's staging directory: TensorFlow's manager never deletes
the user's ``Checkpoint.save()`` output, and neither may ckptstore.
"""

from __future__ import annotations

import os

import tensorflow as tf

import ckptstore
from ckptstore import staging
from conftest import file_remote, open_manager
from training import TrainState


def exists(prefix: str) -> bool:
    return os.path.exists(prefix + ".index")


def snapshot(directory, names: list[str]) -> dict[str, bytes]:
    return {n: (directory / n).read_bytes() for n in names}


def test_continue_from_unmanaged_keeps_the_users_checkpoints(tmp_path):
    directory = tmp_path / "mine"
    prefix = str(directory / "unusual_prefix")
    checkpoint = tf.train.Checkpoint()
    first_path = checkpoint.save(prefix)
    second_path = checkpoint.save(prefix)
    users = snapshot(directory, [n for n in os.listdir(directory) if n.startswith("unusual")])
    del checkpoint

    remote = file_remote(tmp_path)
    checkpoint = tf.train.Checkpoint()
    manager = ckptstore.CheckpointManager(
        checkpoint, remote.url, max_to_keep=2, staging_dir=str(directory)
    )
    checkpoint.restore(manager.latest_checkpoint)
    assert int(checkpoint.save_counter.numpy()) == 2
    third_path = manager.save()
    assert manager.checkpoints == [third_path]
    fourth_path = manager.save()
    assert manager.checkpoints == [third_path, fourth_path]
    fifth_path = manager.save()
    assert manager.checkpoints == [fourth_path, fifth_path]
    manager.close()  # staging is tidied in the background: wait for it

    assert exists(first_path)
    assert exists(second_path)
    assert not exists(third_path)
    assert exists(fourth_path)
    assert exists(fifth_path)
    assert snapshot(directory, list(users)) == users

    # A new manager on the same directory (a restarted process) keeps them too.
    again = ckptstore.CheckpointManager(
        tf.train.Checkpoint(), remote.url, max_to_keep=2, staging_dir=str(directory)
    )
    again.close()
    assert snapshot(directory, list(users)) == users


def test_users_checkpoint_named_like_a_retired_one_is_kept(tmp_path, state):
    # The user keeps their own "best" checkpoints next to the staged ones, under the
    # manager's naming scheme; retention of ckptstore's checkpoints never reaches them.
    directory = tmp_path / "mine"
    directory.mkdir()
    state.advance_to(99)
    state.checkpoint.write(str(directory / "ckpt-1"))  # before any manager: the user's
    users = snapshot(directory, sorted(os.listdir(directory)))

    with open_manager(state, file_remote(tmp_path), directory, max_to_keep=1) as m:
        for step in (1, 2, 3):
            state.advance_to(step)
            m.save(checkpoint_number=step + 1)  # ckpt-2, ckpt-3, ckpt-4
    assert snapshot(directory, list(users)) == users
    assert not exists(str(directory / "ckpt-2"))
    assert not exists(str(directory / "ckpt-3"))
    assert exists(str(directory / "ckpt-4"))


def test_only_partial_writes_of_ckptstore_are_removed(tmp_path):
    directory = tmp_path / "mine"
    users = directory / "model_temp"  # the user's own, e.g. a killed Checkpoint.save()
    ours = directory / "ckpt-7_temp"  # a killed TensorFlow write of ckptstore's ckpt-7
    for leftover in (users, ours):
        leftover.mkdir(parents=True)
        (leftover / "part-00000-of-00001.index").write_bytes(b"partial")
    assert staging.remove_partial_writes(str(directory)) == []  # nothing there is ckptstore's
    assert (users / "part-00000-of-00001.index").read_bytes() == b"partial"

    staging.record_staged(str(directory), ["ckpt-7"])  # as save() does before TF writes
    assert staging.remove_partial_writes(str(directory)) == ["ckpt-7_temp"]
    assert not ours.exists()
    assert (users / "part-00000-of-00001.index").read_bytes() == b"partial"


def test_checkpoints_downloaded_into_staging_are_tidied_like_saved_ones(tmp_path, state):
    remote = file_remote(tmp_path)
    with open_manager(state, remote, tmp_path / "a", max_to_keep=2) as m:
        for step in (1, 2, 3):
            state.advance_to(step)
            m.save()
    fresh = TrainState()
    staging_b = tmp_path / "b"
    with open_manager(fresh, remote, staging_b, max_to_keep=2) as m:
        fresh.checkpoint.restore(m.latest_checkpoint)  # downloads ckpt-3
        assert exists(str(staging_b / "ckpt-3"))
        for step in (4, 5):
            fresh.advance_to(step)
            m.save()
    # ckpt-3 was retired by the second save: its downloaded copy goes like a saved one.
    assert not exists(str(staging_b / "ckpt-3"))
    assert sorted(n for n in os.listdir(staging_b) if n.endswith(".index")) == [
        "ckpt-4.index",
        "ckpt-5.index",
    ]
    assert staging.staged_names(str(staging_b)) == ["ckpt-4", "ckpt-5"]
