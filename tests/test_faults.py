"""Storage that is slow, flaky, full or hostile: training goes on, nothing committed is lost.

Faults come from :mod:`faultfs` (the storage misbehaves); ckptstore runs unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import threading

import pytest

import ckptstore
from conftest import file_remote
from faultfs import faulty_file_protocol
from training import TrainState

FAST = ckptstore.RetryPolicy(attempts=4, initial_delay=0.01, max_delay=0.05)
SECRET = "AKIAEXAMPLESECRET-0123456789-do-not-print"


@pytest.fixture
def faults():
    with faulty_file_protocol() as f:
        yield f


def make(state, remote, staging, **kwargs):
    kwargs.setdefault("max_to_keep", 3)
    kwargs.setdefault("retry", FAST)
    return ckptstore.CheckpointManager(
        state.checkpoint, remote.url, staging_dir=str(staging), **kwargs
    )


def test_save_returns_while_the_upload_is_still_running(faults, state, tmp_path):
    remote = file_remote(tmp_path)
    faults.gate = threading.Event()  # every upload waits until the test opens the gate
    m = make(state, remote, tmp_path / "s")
    state.advance_to(1)
    prefix = m.save()
    # save() came back although no byte could reach the remote yet.
    assert os.path.exists(prefix + ".index")
    assert remote.manifests() == []
    status = m.upload_status()
    assert "ckpt-1" in (status.in_flight, *status.pending)
    faults.gate.set()
    m.sync()
    assert remote.manifests() == ["ckpt-1"]
    m.close()


def test_transient_errors_are_retried_and_the_checkpoint_commits(faults, state, tmp_path):
    remote = file_remote(tmp_path)
    faults.transient_put_failures = 2
    with make(state, remote, tmp_path / "s") as m:
        state.advance_to(1)
        m.save()
        m.sync()
        assert m.upload_status().retries == 2
    assert remote.manifests() == ["ckpt-1"]


def test_remote_refusing_writes_fails_at_sync_not_in_training(faults, state, tmp_path):
    remote = file_remote(tmp_path)
    with make(state, remote, tmp_path / "s") as m:
        state.advance_to(1)
        m.save()
        m.sync()
    faults.refuse_writes = True
    m = make(state, remote, tmp_path / "s")
    for step in (2, 3):
        state.advance_to(step)
        assert m.save() is not None  # training carries on
    with pytest.raises(ckptstore.UploadError) as info:
        m.sync()
    message = str(info.value)
    assert remote.url in message and "refuses writes" in message
    assert set(info.value.failures) == {"ckpt-2", "ckpt-3"}
    # Nothing committed was lost, and the failed checkpoints are still staged.
    assert remote.manifests() == ["ckpt-1"]
    assert os.path.exists(tmp_path / "s" / "ckpt-3.index")
    m.sync()  # each failure is reported once
    faults.refuse_writes = False
    m.close()


def test_next_manager_uploads_what_a_failed_run_left_staged(faults, state, tmp_path):
    remote = file_remote(tmp_path)
    faults.refuse_writes = True
    m = make(state, remote, tmp_path / "s")
    for step in (1, 2):
        state.advance_to(step)
        m.save()
    with pytest.raises(ckptstore.UploadError):
        m.close()
    faults.refuse_writes = False  # the remote is back
    with make(TrainState(), remote, tmp_path / "s") as m2:
        m2.sync()
    assert sorted(remote.manifests()) == ["ckpt-1", "ckpt-2"]
    fresh = TrainState()
    with make(fresh, remote, tmp_path / "empty") as m3:
        fresh.checkpoint.restore(m3.latest_checkpoint)
    assert fresh.matches_step(2)


def test_skip_policy_keeps_the_backlog_bounded_and_uploads_the_newest(faults, state, tmp_path):
    remote = file_remote(tmp_path)
    faults.gate = threading.Event()
    m = make(state, remote, tmp_path / "s", max_to_keep=None, max_pending_uploads=2)
    for step in range(1, 9):
        state.advance_to(step)
        m.save()
        assert len(m.upload_status().pending) <= 2
        # The link is stalled, yet staging holds only the upload in flight and the queue.
        staged = [n for n in os.listdir(tmp_path / "s") if n.endswith(".index")]
        assert len(staged) <= 3, staged
    faults.gate.set()
    m.sync()
    status = m.upload_status()
    m.close()
    assert "ckpt-8" in remote.manifests(), "the newest checkpoint must always be uploaded"
    assert len(status.skipped) >= 4
    assert not set(status.skipped) & set(remote.manifests())
    # Skipped checkpoints leave the managed list: every listed checkpoint exists somewhere.
    assert sorted(os.path.basename(p) for p in m.checkpoints) == sorted(remote.manifests())
    left = [n for n in os.listdir(tmp_path / "s") if n.endswith(".index")]
    assert set(n[: -len(".index")] for n in left) <= set(remote.manifests())


def test_block_policy_uploads_every_checkpoint(faults, state, tmp_path):
    remote = file_remote(tmp_path)
    faults.put_delay = 0.05
    with make(
        state, remote, tmp_path / "s", max_to_keep=None, max_pending_uploads=1, when_behind="block"
    ) as m:
        for step in range(1, 6):
            state.advance_to(step)
            m.save()
            assert len(m.upload_status().pending) <= 1
        m.sync()
        assert m.upload_status().skipped == ()
    assert sorted(remote.manifests()) == [f"ckpt-{i}" for i in range(1, 6)]


def test_credentials_never_appear_in_logs_errors_reprs_or_manifests(
    faults, state, tmp_path, caplog
):
    remote = file_remote(tmp_path)
    options = {"token": SECRET, "client_kwargs": {"aws_secret_access_key": SECRET}}
    with caplog.at_level(logging.DEBUG, logger="ckptstore"):
        m = make(state, remote, tmp_path / "s", storage_options=options)
        state.advance_to(1)
        m.save()
        m.sync()
        faults.refuse_writes = True
        state.advance_to(2)
        m.save()
        with pytest.raises(ckptstore.UploadError) as info:
            m.sync()
        faults.refuse_writes = False
    seen = [repr(m), str(m), str(info.value), repr(info.value), repr(m.upload_status())]
    seen += [r.getMessage() for r in caplog.records]
    seen += [remote.read(n).decode() for n in remote.names() if n.endswith(".json")]
    assert seen and not [s for s in seen if SECRET in s]
    assert json.loads(remote.read("ckpt-1.manifest.json"))["checkpoint"] == "ckpt-1"
    m.close()


def test_url_userinfo_is_masked_everywhere():
    from ckptstore.redaction import Redactor, redact_url

    assert redact_url("s3://AKIA:hunter22@bucket/run?X-Amz-Signature=abc") == "s3://***@bucket/run"
    assert redact_url("gs://bucket/run-7") == "gs://bucket/run-7"
    r = Redactor("ftp://user:hunter22@host/dir", {"password": "hunter22"})
    assert "hunter22" not in r.scrub("login failed for user:hunter22@host")
    assert "hunter22" not in r.url
