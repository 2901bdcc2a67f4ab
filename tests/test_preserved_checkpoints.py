"""Checkpoints kept by ``keep_checkpoint_every_n_hours`` stay reachable from any later manager.

TensorFlow keeps such a checkpoint on disk for good but lists it nowhere: not in
``checkpoints``, not in the state file. With a remote, a new manager on an empty
staging directory must still find it committed and be able to bring it back
(:meth:`ckptstore.CheckpointManager.fetch`), and retention must leave it alone.
Time moves through ``time.time`` only, as in TensorFlow's own tests.
"""

from __future__ import annotations

import os
import time

import pytest

import ckptstore
from conftest import open_manager
from training import TrainState

FAST = ckptstore.RetryPolicy(attempts=3, initial_delay=0.01, max_delay=0.05)
HOURLY = {"max_to_keep": 1, "keep_checkpoint_every_n_hours": 1, "retry": FAST}


@pytest.fixture
def clock(monkeypatch):
    now = [1_000_000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    return now


def train_with_hourly_keeps(state, remote, staging, clock) -> None:
    """Saves every half hour: ckpt-2 (+1 h) and ckpt-4 (+2 h) are preserved, ckpt-5 is active."""
    with open_manager(state, remote, staging, **HOURLY) as m:
        for step in range(1, 6):
            clock[0] += 1800
            state.advance_to(step)
            m.save()
            m.sync()
        assert [os.path.basename(p) for p in m.checkpoints] == ["ckpt-5"]


def test_preserved_checkpoint_is_fetched_by_a_new_manager_on_empty_staging(
    remote, state, tmp_path, clock
):
    train_with_hourly_keeps(state, remote, tmp_path / "a", clock)

    fresh = TrainState()
    staging = tmp_path / "b"
    with open_manager(fresh, remote, staging, **HOURLY) as m:
        # As with TensorFlow: only the active checkpoint is listed...
        assert [os.path.basename(p) for p in m.checkpoints] == ["ckpt-5"]
        assert os.path.basename(m.latest_checkpoint) == "ckpt-5"
        # ...the preserved ones are committed, and any of them comes back verified.
        assert {"ckpt-2", "ckpt-4"} <= set(m.upload_status().committed)
        prefix = m.fetch("ckpt-4")
        assert prefix == str(staging / "ckpt-4")
        fresh.checkpoint.restore(prefix).assert_existing_objects_matched()
        assert fresh.matches_step(4)
        # By the remote's path too, as a TensorFlow user would name it there.
        fresh.checkpoint.restore(m.fetch(f"{remote.url}/ckpt-2")).assert_existing_objects_matched()
        assert fresh.matches_step(2)
        with pytest.raises(ckptstore.RestoreError, match="ckpt-3"):
            m.fetch("ckpt-3")  # retired by max_to_keep: gone, as in TensorFlow

        # Training resumes from the latest and goes on.
        fresh.checkpoint.restore(m.latest_checkpoint)
        clock[0] += 1800
        fresh.advance_to(6)
        assert os.path.basename(m.save()) == "ckpt-6"
    # The new manager retired only what it retired itself (ckpt-5).
    assert sorted(remote.manifests()) == ["ckpt-2", "ckpt-4", "ckpt-6"]


def test_preserved_checkpoint_is_the_fallback_when_the_newest_fails_verification(
    remote, state, tmp_path, clock
):
    train_with_hourly_keeps(state, remote, tmp_path / "a", clock)
    data = "ckpt-5.data-00000-of-00001"
    damaged = bytearray(remote.read(data))
    damaged[len(damaged) // 2] ^= 0xFF
    remote.write(data, bytes(damaged))

    fresh = TrainState()
    with open_manager(fresh, remote, tmp_path / "b", **HOURLY) as m:
        prefix = m.latest_checkpoint
        assert os.path.basename(prefix) == "ckpt-4"  # the newest preserved one
        fresh.checkpoint.restore(prefix).assert_existing_objects_matched()
        assert fresh.matches_step(4)


def test_fetch_in_local_mode_returns_the_preserved_prefix(state, tmp_path, clock):
    directory = tmp_path / "local"
    m = ckptstore.CheckpointManager(
        state.checkpoint, str(directory), max_to_keep=1, keep_checkpoint_every_n_hours=1
    )
    for step in range(1, 6):
        clock[0] += 1800
        state.advance_to(step)
        m.save()
    assert m.fetch("ckpt-4") == str(directory / "ckpt-4")
    with pytest.raises(ckptstore.RestoreError, match="ckpt-3"):
        m.fetch("ckpt-3")
