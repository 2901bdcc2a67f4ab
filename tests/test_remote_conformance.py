"""What every remote must do, whatever the backend (fsspec abstract-suite style).

Each test takes the ``remote`` fixture: a :class:`conftest.RemoteSpec` for one
backend. A new backend passes this whole file by adding a fixture param.
"""

from __future__ import annotations

import json
import logging
import os
import time

import pytest
import tensorflow as tf

import ckptstore
from ckptstore.staging import parse_state_text
from conftest import dead_writers_lease, open_manager
from training import TrainState

FAST = ckptstore.RetryPolicy(attempts=3, initial_delay=0.01, max_delay=0.05)


def manager(state, remote, staging, **kwargs):
    kwargs.setdefault("max_to_keep", 3)
    kwargs.setdefault("retry", FAST)
    return open_manager(state, remote, staging, **kwargs)


def save_steps(state, remote, staging, steps, **kwargs):
    with manager(state, remote, staging, **kwargs) as m:
        for step in steps:
            state.advance_to(step)
            m.save()
    return m


def fresh_restore(remote, staging):
    """A new process on an empty machine: new state, new staging, the remote alone."""
    fresh = TrainState()
    m = manager(fresh, remote, staging)
    prefix = m.latest_checkpoint
    if prefix is not None:
        fresh.checkpoint.restore(prefix).assert_existing_objects_matched()
    m.close()
    return fresh, prefix


def test_round_trip_restores_the_last_step_on_an_empty_machine(remote, state, tmp_path):
    save_steps(state, remote, tmp_path / "a", [1, 2, 3])
    fresh, prefix = fresh_restore(remote, tmp_path / "b")
    assert os.path.basename(prefix) == "ckpt-3"
    assert prefix.startswith(str(tmp_path / "b"))
    assert fresh.matches_step(3)


def test_empty_remote_has_no_latest_checkpoint_and_calls_init_fn(remote, state, tmp_path):
    calls = []
    m = manager(state, remote, tmp_path / "s", init_fn=lambda: calls.append(1))
    assert m.latest_checkpoint is None
    assert m.restore_or_initialize() is None
    assert calls == [1]
    m.close()


def test_remote_retention_keeps_only_max_to_keep_committed(remote, state, tmp_path):
    save_steps(state, remote, tmp_path / "s", [1, 2, 3, 4, 5], max_to_keep=2)
    assert sorted(remote.manifests()) == ["ckpt-4", "ckpt-5"]
    data = [n for n in remote.names() if ".index" in n or ".data-" in n]
    assert sorted(data) == [
        "ckpt-4.data-00000-of-00001",
        "ckpt-4.index",
        "ckpt-5.data-00000-of-00001",
        "ckpt-5.index",
    ]
    proto = parse_state_text(remote.read("checkpoint").decode())
    assert proto.model_checkpoint_path == "ckpt-5"
    assert list(proto.all_model_checkpoint_paths) == ["ckpt-4", "ckpt-5"]


def test_manifest_records_every_file_with_size_and_crc32c(remote, state, tmp_path):
    state.step.assign(41)
    with manager(state, remote, tmp_path / "s", step_counter=state.step) as m:
        state.advance_to(42)
        m.save()
    doc = json.loads(remote.read("ckpt-1.manifest.json"))
    assert doc["checkpoint"] == "ckpt-1" and doc["number"] == 1 and doc["step"] == 42
    assert doc["versions"]["tensorflow"] == tf.__version__
    assert {"host", "pid", "session"} <= set(doc["writer"])
    names = {f["name"] for f in doc["files"]}
    assert names == {"ckpt-1.index", "ckpt-1.data-00000-of-00001"}
    for f in doc["files"]:
        assert len(remote.read(f["name"])) == f["size"]
        assert len(f["crc32c"]) == 8


def test_corrupted_data_file_is_never_loaded_and_previous_is_restored(
    remote, state, tmp_path, caplog
):
    save_steps(state, remote, tmp_path / "a", [1, 2, 3])
    name = "ckpt-3.data-00000-of-00001"
    data = bytearray(remote.read(name))
    data[len(data) // 2] ^= 0xFF
    remote.write(name, bytes(data))
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        fresh, prefix = fresh_restore(remote, tmp_path / "b")
    assert os.path.basename(prefix) == "ckpt-2"
    assert fresh.matches_step(2)
    assert not os.path.exists(tmp_path / "b" / name), "corrupt bytes reached staging"
    assert any("ckpt-3" in r.getMessage() for r in caplog.records)


def test_truncated_data_file_is_detected(remote, state, tmp_path):
    save_steps(state, remote, tmp_path / "a", [1, 2])
    name = "ckpt-2.data-00000-of-00001"
    remote.write(name, remote.read(name)[:-10])
    fresh, prefix = fresh_restore(remote, tmp_path / "b")
    assert os.path.basename(prefix) == "ckpt-1"
    assert fresh.matches_step(1)


def test_every_checkpoint_corrupt_raises_instead_of_starting_from_scratch(remote, state, tmp_path):
    save_steps(state, remote, tmp_path / "a", [1, 2])
    for n in ("ckpt-1.index", "ckpt-2.index"):
        remote.write(n, b"garbage")
    fresh = TrainState()
    called = []
    m = manager(fresh, remote, tmp_path / "b", init_fn=lambda: called.append(1))
    with pytest.raises(ckptstore.RestoreError, match="none could be verified"):
        m.restore_or_initialize()
    assert called == [], "init_fn ran although the remote holds checkpoints"
    m.close()


@pytest.mark.parametrize(
    "bad_name", ["../escape.index", "/etc/passwd", "ckpt-2.index/../../x", "other-1.index"]
)
def test_manifest_naming_a_path_outside_the_checkpoint_is_rejected(
    remote, state, tmp_path, bad_name, caplog
):
    save_steps(state, remote, tmp_path / "a", [1, 2])
    doc = json.loads(remote.read("ckpt-2.manifest.json"))
    doc["files"][0]["name"] = bad_name
    remote.write("ckpt-2.manifest.json", json.dumps(doc).encode())
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        fresh, prefix = fresh_restore(remote, tmp_path / "b")
    assert os.path.basename(prefix) == "ckpt-1"
    assert fresh.matches_step(1)
    assert any("escapes" in r.getMessage() for r in caplog.records)
    assert not os.path.exists(tmp_path / "escape.index")


def test_malformed_manifest_json_is_rejected_with_a_clear_warning(remote, state, tmp_path, caplog):
    save_steps(state, remote, tmp_path / "a", [1, 2])
    remote.write("ckpt-2.manifest.json", b'{"format": "ckptstore.manifest", ')
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        fresh, prefix = fresh_restore(remote, tmp_path / "b")
    assert os.path.basename(prefix) == "ckpt-1"
    assert fresh.matches_step(1)
    assert any("not valid JSON" in r.getMessage() for r in caplog.records)


def test_a_dead_writers_leftovers_are_collected_by_the_next_writer(remote, state, tmp_path):
    save_steps(state, remote, tmp_path / "a", [1])
    remote.write("ckpt-9.index", b"left by a crash")
    remote.write("ckpt-9.data-00000-of-00001", b"left by a crash")
    remote.write("ckptstore.lease.json", dead_writers_lease(("ckpt-9",)))
    m = manager(state, remote, tmp_path / "a")
    m.sync()
    # Opening a manager deletes nothing: the files could be a live writer's upload.
    assert "ckpt-9.index" in remote.names()
    state.advance_to(2)
    m.save()  # now it is the run's writer, and the one who left them is gone
    m.sync()
    m.close()
    assert "ckpt-9.index" not in remote.names()
    assert "ckpt-9.data-00000-of-00001" not in remote.names()
    assert "ckpt-1.index" in remote.names()


def test_files_that_only_look_like_checkpoints_are_never_deleted(remote, state, tmp_path):
    save_steps(state, remote, tmp_path / "a", [1])
    theirs = {
        "embeddings.index": b"a user's faiss index",
        "bert.index": b"copied in",
        "bert.data-00000-of-00001": b"copied in",
        "ckpt-9.index": b"no lease lists it: not provably ckptstore's",
    }
    for name, data in theirs.items():
        remote.write(name, data)
    save_steps(state, remote, tmp_path / "a", [2, 3, 4], max_to_keep=1)
    for name, data in theirs.items():
        assert remote.read(name) == data, name
    assert remote.manifests() == ["ckpt-4"]


def test_resaving_a_committed_number_replaces_it_consistently(remote, state, tmp_path):
    with manager(state, remote, tmp_path / "a") as m:
        state.advance_to(1)
        m.save(checkpoint_number=7)
        m.sync()
        state.advance_to(2)
        m.save(checkpoint_number=7)
    assert remote.manifests() == ["ckpt-7"]
    fresh, _ = fresh_restore(remote, tmp_path / "b")
    assert fresh.matches_step(2)


def test_lost_state_file_is_rebuilt_from_manifests(remote, state, tmp_path):
    save_steps(state, remote, tmp_path / "a", [1, 2, 3])
    remote.delete("checkpoint")
    fresh, prefix = fresh_restore(remote, tmp_path / "b")
    assert os.path.basename(prefix) == "ckpt-3"
    assert fresh.matches_step(3)


def test_async_tensorflow_write_is_uploaded(remote, state, tmp_path):
    options = tf.train.CheckpointOptions(enable_async=True)
    with manager(state, remote, tmp_path / "a") as m:
        for step in (1, 2):
            state.advance_to(step)
            m.save(options=options)
        m.sync()
        assert sorted(remote.manifests()) == ["ckpt-1", "ckpt-2"]
    fresh, _ = fresh_restore(remote, tmp_path / "b")
    assert fresh.matches_step(2)


def test_preserved_checkpoints_stay_on_the_remote(remote, state, tmp_path, monkeypatch):
    now = [1_000_000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    with manager(
        state, remote, tmp_path / "a", max_to_keep=1, keep_checkpoint_every_n_hours=1
    ) as m:
        for step in range(1, 6):
            now[0] += 1800  # half an hour of training between saves
            state.advance_to(step)
            m.save()
            m.sync()
    # TensorFlow's rule: a checkpoint leaving the active set is preserved when it is at least
    # an hour newer than the last preserved one (initially: construction time - 1 s). Saves
    # come at +0.5 h, +1 h, ... so ckpt-2 (+1 h) and ckpt-4 (+2 h) are preserved, ckpt-5 active.
    assert sorted(remote.manifests()) == ["ckpt-2", "ckpt-4", "ckpt-5"]
    proto = parse_state_text(remote.read("checkpoint").decode())
    assert list(proto.all_model_checkpoint_paths) == ["ckpt-5"]
    # A new manager keeps them: preserved checkpoints are never retired, by any manager.
    fresh = TrainState()
    with manager(fresh, remote, tmp_path / "b", max_to_keep=1) as m:
        fresh.checkpoint.restore(m.latest_checkpoint)
        now[0] += 1800
        fresh.advance_to(6)
        m.save()
    assert sorted(remote.manifests()) == ["ckpt-2", "ckpt-4", "ckpt-6"]


def test_restarted_manager_continues_numbering_and_retention(remote, state, tmp_path):
    save_steps(state, remote, tmp_path / "a", [1, 2, 3], max_to_keep=2)
    fresh = TrainState()
    with manager(fresh, remote, tmp_path / "b", max_to_keep=2) as m:
        fresh.checkpoint.restore(m.latest_checkpoint)
        fresh.advance_to(4)
        assert os.path.basename(m.save()) == "ckpt-4"
        assert [os.path.basename(p) for p in m.checkpoints] == ["ckpt-3", "ckpt-4"]
    assert sorted(remote.manifests()) == ["ckpt-3", "ckpt-4"]


def test_save_after_close_raises(remote, state, tmp_path):
    m = manager(state, remote, tmp_path / "a")
    m.close()
    with pytest.raises(RuntimeError, match="closed"):
        m.save()


def test_directory_written_by_tensorflow_is_adopted_not_collected(remote, state, tmp_path):
    tf_dir = tmp_path / "written-by-tf"
    tf_manager = tf.train.CheckpointManager(state.checkpoint, str(tf_dir), max_to_keep=2)
    for step in (1, 2, 3):
        state.advance_to(step)
        tf_manager.save()
    remote.fs.makedirs(remote.root, exist_ok=True)
    for name in os.listdir(tf_dir):
        remote.fs.put_file(str(tf_dir / name), remote.path(name))
    before = remote.names()
    fresh, prefix = fresh_restore(remote, tmp_path / "b")
    assert os.path.basename(prefix) == "ckpt-3"
    assert fresh.matches_step(3)
    assert remote.names() == before, "restoring wrote to the remote"
    # The run's writer commits manifests for them, and never takes them for orphans.
    m = manager(state, remote, tmp_path / "c", max_to_keep=3)
    state.advance_to(4)
    m.save()
    m.close()
    assert sorted(remote.manifests()) == ["ckpt-2", "ckpt-3", "ckpt-4"]
    assert "ckpt-2.index" in remote.names(), "TensorFlow's checkpoint was taken for an orphan"


def test_adoption_takes_only_the_managers_own_checkpoint_name(remote, state, tmp_path):
    tf_dir = tmp_path / "written-by-tf"
    ours = tf.train.CheckpointManager(state.checkpoint, str(tf_dir), max_to_keep=5)
    theirs = tf.train.CheckpointManager(
        state.checkpoint, str(tf_dir / "bert"), max_to_keep=5, checkpoint_name="bert"
    )
    state.advance_to(1)
    ours.save()
    theirs.save()
    remote.fs.makedirs(remote.root, exist_ok=True)
    for path in [*tf_dir.glob("ckpt-*"), *(tf_dir / "bert").glob("bert-*")]:
        remote.fs.put_file(str(path), remote.path(path.name))
    save_steps(state, remote, tmp_path / "a", [2, 3], max_to_keep=1)
    # TensorFlow's two saves counted too: ckptstore saved ckpt-3 and ckpt-4, keeping one.
    assert remote.manifests() == ["ckpt-4"]
    assert "ckpt-1.index" not in remote.names()  # adopted, then retired like its own
    assert "bert-2.index" in remote.names() and "bert-2.manifest.json" not in remote.names()
