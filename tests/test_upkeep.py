"""Nothing is swallowed: upkeep failures reach sync(), and sync()/close() can be bounded.

The upkeep after a commit (retiring old checkpoints, rewriting TensorFlow's state
file, collecting leftovers) used to be logged and forgotten, so ``sync()`` returned
with a stale remote. Faults come from :mod:`faultfs`; ckptstore runs unchanged.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

import ckptstore
from ckptstore.staging import parse_state_text
from conftest import dead_writers_lease, file_remote
from faultfs import faulty_file_protocol

FAST = ckptstore.RetryPolicy(attempts=3, initial_delay=0.01, max_delay=0.02)


@pytest.fixture
def faults():
    with faulty_file_protocol() as f:
        yield f


def make(state, remote, staging, **kwargs):
    kwargs.setdefault("max_to_keep", 1)
    kwargs.setdefault("retry", FAST)
    return ckptstore.CheckpointManager(
        state.checkpoint, remote.url, staging_dir=str(staging), **kwargs
    )


def listed(remote) -> list[str]:
    state = parse_state_text(remote.read("checkpoint").decode())
    return [os.path.basename(p) for p in state.all_model_checkpoint_paths]


def test_a_failed_retirement_is_raised_by_sync_and_retried_by_the_next(faults, state, tmp_path):
    remote = file_remote(tmp_path)
    m = make(state, remote, tmp_path / "s")
    state.advance_to(1)
    m.save()
    m.sync()
    faults.fail_when = lambda op, path: op == "rm" and "ckpt-1." in path
    state.advance_to(2)
    m.save()
    with pytest.raises(ckptstore.UploadError, match="retire") as info:
        m.sync()
    assert remote.url in str(info.value)
    assert "ckpt-2" in remote.manifests()  # the new checkpoint is committed all the same
    faults.fail_when = None
    m.sync()  # tries the retirement again, and succeeds
    assert remote.manifests() == ["ckpt-2"]
    assert not [n for n in remote.names() if n.startswith("ckpt-1.")]
    m.close()


def test_a_failed_state_file_write_is_raised_and_repaired(faults, state, tmp_path):
    remote = file_remote(tmp_path)
    m = make(state, remote, tmp_path / "s", max_to_keep=3)
    state.advance_to(1)
    m.save()
    m.sync()
    faults.fail_when = lambda op, path: op == "open-wb" and "/checkpoint" in path
    state.advance_to(2)
    m.save()
    with pytest.raises(ckptstore.UploadError, match="state file"):
        m.sync()
    assert listed(remote) == ["ckpt-1"]  # stale, and sync() said so
    faults.fail_when = None
    m.sync()
    assert listed(remote) == ["ckpt-1", "ckpt-2"]
    m.close()


def test_a_failed_orphan_sweep_is_raised_by_sync(faults, state, tmp_path):
    remote = file_remote(tmp_path)
    with make(state, remote, tmp_path / "a") as m:
        state.advance_to(1)
        m.save()
    remote.write("ckpt-9.index", b"left by a crash")
    remote.write("ckptstore.lease.json", dead_writers_lease(("ckpt-9",)))
    faults.fail_when = lambda op, path: op == "rm" and "ckpt-9" in path
    m = make(state, remote, tmp_path / "a")
    state.advance_to(2)
    m.save()
    with pytest.raises(ckptstore.UploadError, match="collect orphans"):
        m.sync()
    faults.fail_when = None
    m.sync()
    assert "ckpt-9.index" not in remote.names()
    m.close()


def test_sync_with_a_timeout_names_what_is_still_pending(faults, state, tmp_path):
    remote = file_remote(tmp_path)
    faults.gate = threading.Event()
    m = make(state, remote, tmp_path / "s")
    state.advance_to(1)
    m.save()
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ckpt-1 \(uploading\)"):
        m.sync(timeout=0.5)
    assert time.monotonic() - started < 5
    faults.gate.set()
    m.sync(timeout=60)  # the upload went on in the background
    assert remote.manifests() == ["ckpt-1"]
    m.close()


def test_close_with_a_timeout_cuts_retries_short_and_keeps_the_checkpoint_staged(
    faults, state, tmp_path
):
    remote = file_remote(tmp_path)
    faults.transient_put_failures = 10**6  # the link never comes back
    patient = ckptstore.RetryPolicy(attempts=50, initial_delay=5.0, max_delay=30.0)
    m = make(state, remote, tmp_path / "s", retry=patient)
    state.advance_to(1)
    m.save()
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="ckpt-1"):
        m.close(timeout=1.0)
    # 50 attempts at up to 30 s each would take many minutes: the close cut them short.
    assert time.monotonic() - started < 10
    assert remote.manifests() == []
    assert os.path.exists(tmp_path / "s" / "ckpt-1.index")
    faults.transient_put_failures = 0
    # The next manager on that staging directory uploads what the closed one could not.
    with make(state, remote, tmp_path / "s") as successor:
        successor.sync()
    assert remote.manifests() == ["ckpt-1"]


def test_a_remote_that_keeps_failing_keeps_staging_bounded(faults, state, tmp_path, caplog):
    remote = file_remote(tmp_path)
    faults.refuse_writes = True  # every upload fails at once (PermissionError)
    m = make(state, remote, tmp_path / "s", max_to_keep=2, max_pending_uploads=2)
    with caplog.at_level("WARNING", logger="ckptstore"):
        for step in range(1, 9):
            state.advance_to(step)
            m.save()
            with pytest.raises(ckptstore.UploadError):
                m.sync()
    staged = sorted(n[: -len(".index")] for n in os.listdir(tmp_path / "s") if n.endswith(".index"))
    assert len(staged) <= 2 + 2 + 1, staged
    assert "ckpt-8" in staged  # the newest is always kept for a later retry
    assert set(m.upload_status().failed) >= {"ckpt-7", "ckpt-8"}
    failed_logs = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failed_logs) >= 8  # a warning at each failed upload
    faults.refuse_writes = False
    m.close()
    fresh = ckptstore.CheckpointManager(
        state.checkpoint, remote.url, 2, staging_dir=str(tmp_path / "s")
    )
    fresh.sync()  # the next manager uploads what is still staged and managed
    assert "ckpt-8" in remote.manifests()
    fresh.close()


def test_retired_checkpoints_go_once_any_newer_one_is_committed(faults, state, tmp_path):
    """Saves faster than the link: every upload finishes after the next save retired it.

    Retirement used to wait for a newer checkpoint that retention still kept; when
    each one was retired before its upload ended, none ever qualified, and every
    committed checkpoint stayed on the remote until the run slowed down.
    """
    remote = file_remote(tmp_path)
    released = {n: threading.Event() for n in ("ckpt-1", "ckpt-3", "ckpt-4")}
    faults.hold = lambda path: released.get(os.path.basename(path).split(".")[0])
    m = make(state, remote, tmp_path / "s", max_pending_uploads=1)
    for step in (1, 2, 3):  # ckpt-1 uploading; ckpt-2 retired while queued, ckpt-3 queued
        state.advance_to(step)
        m.save()
    released["ckpt-1"].set()
    deadline = time.monotonic() + 30
    while not any(p.startswith("ckpt-3.") for p in faults.puts):
        assert time.monotonic() < deadline, "ckpt-3's upload never started"
        time.sleep(0.01)
    state.advance_to(4)
    m.save()  # retires ckpt-3 while it uploads
    released["ckpt-3"].set()
    while not any(p.startswith("ckpt-4.") for p in faults.puts):  # ckpt-3 committed, retired
        assert time.monotonic() < deadline, "ckpt-4's upload never started"
        time.sleep(0.01)
    assert remote.manifests() == ["ckpt-3"]  # ckpt-1 went as soon as ckpt-3 was committed
    released["ckpt-4"].set()
    m.sync()
    assert remote.manifests() == ["ckpt-4"]
    m.close()
