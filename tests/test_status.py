"""status() and progress: what a training log can say about the background uploads.

Uploads are held mid-flight with :mod:`faultfs` (the storage waits on an event per
file), so "still uploading" is deterministic; failures come from the storage too.
ckptstore's own code runs unchanged.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import ckptstore
import ckptstore.keras
import ckptstore.saved_model as sm
from ckptstore import progress
from ckptstore.manifest import checkpoint_files
from conftest import file_remote
from faultfs import faulty_file_protocol
from training import TrainState

FAST = ckptstore.RetryPolicy(attempts=2, initial_delay=0.01, max_delay=0.02)
SECRET = "AKIAEXAMPLESECRET-0123456789-do-not-print"


@pytest.fixture
def faults():
    with faulty_file_protocol() as f:
        yield f


@pytest.fixture(autouse=True)
def _staging_base(tmp_path, monkeypatch):
    """Keras files and SavedModels are staged beside the default base: keep it in the test."""
    monkeypatch.setenv("CKPTSTORE_STAGING_DIR", str(tmp_path / "staging-base"))


@pytest.fixture
def bars():
    """Bars are process-wide: whatever a test turns on is off again after it."""
    yield
    ckptstore.progress_bar(False)


def make(state, remote, staging, **kwargs):
    kwargs.setdefault("max_to_keep", 3)
    kwargs.setdefault("retry", FAST)
    return ckptstore.CheckpointManager(
        state.checkpoint, remote.url, staging_dir=str(staging), **kwargs
    )


def staged_bytes(staging, name: str) -> dict[str, int]:
    return {f: os.path.getsize(os.path.join(staging, f)) for f in checkpoint_files(staging, name)}


def wait_until(predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return value


def holds(events: dict[str, threading.Event]):
    """``faults.hold``: a put of a stored file whose name starts with a key waits for its event."""

    def hold(path: str) -> threading.Event | None:
        name = os.path.basename(path)
        return next((e for prefix, e in events.items() if name.startswith(prefix)), None)

    return hold


def is_one_line(text: str) -> bool:
    return "\n" not in text and "\r" not in text


# --- CheckpointManager.status() ---------------------------------------------------------


def test_status_while_uploads_are_held_then_up_to_date_after_sync(faults, state, tmp_path):
    remote = file_remote(tmp_path)
    staging = tmp_path / "s"
    events = {
        "ckpt-1.index": threading.Event(),
        "ckpt-1.data": threading.Event(),
        "ckpt-2.": threading.Event(),
    }
    faults.hold = holds(events)
    m = make(state, remote, staging)
    assert m.status().last_commit is None
    assert "nothing committed yet" in str(m.status())
    state.advance_to(1)
    m.save()
    wait_until(lambda: len([p for p in faults.puts if p.startswith("ckpt-1.")]) == 2, "uploads")
    state.advance_to(2)
    m.save()  # waits behind ckpt-1
    sizes1, sizes2 = staged_bytes(staging, "ckpt-1"), staged_bytes(staging, "ckpt-2")
    total1, total2 = sum(sizes1.values()), sum(sizes2.values())

    held = m.status()
    assert held.role == "writer" and held.is_writer
    assert held.pending == ("ckpt-1", "ckpt-2")
    assert held.in_flight == "ckpt-1"
    assert held.bytes_left == total1 + total2 > 0
    assert held.last_commit is None and held.last_error is None and not held.up_to_date
    line = str(held)
    assert is_one_line(line)
    assert line.startswith(f"ckptstore {remote.url}: 2 pending (ckpt-1 uploading, ")
    assert f"{progress.size_text(total1 + total2)} left" in line and "no errors" in line

    events["ckpt-1.index"].set()  # the index is stored; the data file still waits
    index = sizes1["ckpt-1.index"]
    moving = wait_until(
        lambda: (s := m.status()).bytes_left == total1 + total2 - index and s, "bytes to move"
    )
    assert moving.in_flight == "ckpt-1" and moving.pending == ("ckpt-1", "ckpt-2")
    assert moving.rate is not None and moving.rate > 0
    assert f"left at {progress.size_text(moving.rate)}/s" in str(moving)
    assert m.upload_status().bytes_sent == index  # UploadStatus counts the same bytes

    events["ckpt-1.data"].set()
    after_one = wait_until(
        lambda: (s := m.status()).in_flight == "ckpt-2" and s.last_commit == "ckpt-1" and s,
        "ckpt-1's commit",
    )
    assert after_one.pending == ("ckpt-2",) and after_one.bytes_left == total2
    assert after_one.committed == 1

    released = time.time()
    events["ckpt-2."].set()
    m.sync()
    synced = time.time()
    done = m.status()
    assert done.pending == () and done.in_flight is None and done.bytes_left == 0
    assert done.rate is None and done.up_to_date
    assert done.last_commit == "ckpt-2" and done.committed == 2
    assert released <= done.last_commit_time <= synced
    assert done.last_error is None
    line = str(done)
    assert is_one_line(line)
    assert line.startswith(f"ckptstore {remote.url}: up to date; last commit ckpt-2 ")
    assert line.endswith(" s ago; no errors")
    m.close()
    assert m.status().role == "closed"
    assert m.upload_status().bytes_sent == total1 + total2


def test_a_committed_checkpoint_is_not_pending_while_the_upkeep_after_it_runs(
    faults, state, tmp_path
):
    """After a commit the worker retires old checkpoints and writes the state file; the
    checkpoint it just committed is not "uploading" any more while it does."""
    remote = file_remote(tmp_path)
    retiring = threading.Event()
    faults.hold_rm = lambda path: retiring if os.path.basename(path).startswith("ckpt-1") else None
    m = make(state, remote, tmp_path / "s", max_to_keep=1)
    try:
        state.advance_to(1)
        m.save()
        m.sync()
        state.advance_to(2)
        m.save()  # committed, then ckpt-1's retirement waits on the remote
        during = wait_until(
            lambda: (s := m.status()).last_commit == "ckpt-2" and s, "ckpt-2's commit"
        )
        assert m.upload_status().in_flight == "ckpt-2"  # the worker is still busy with it
        assert during.pending == () and during.in_flight is None and during.bytes_left == 0
        assert during.up_to_date and "up to date; last commit ckpt-2" in str(during)
    finally:
        retiring.set()
        m.close()


def test_a_failed_upload_is_the_last_error_without_credentials(faults, state, tmp_path):
    remote = file_remote(tmp_path)
    options = {"token": SECRET}

    def refuse(op: str, path: str) -> bool:
        if op == "put" and os.path.basename(path).startswith("ckpt-2."):
            # Some clients echo the credential they were refused with.
            raise PermissionError(f"AccessDenied for key {SECRET}\nrequest id 42")
        return False

    m = make(state, remote, tmp_path / "s", storage_options=options)
    state.advance_to(1)
    m.save()
    m.sync()
    faults.fail_when = refuse
    state.advance_to(2)
    m.save()
    with pytest.raises(ckptstore.UploadError):
        m.sync()
    failed = m.status()
    assert failed.last_error is not None and failed.last_error.startswith("upload ckpt-2: ")
    assert "PermissionError" in failed.last_error and "AccessDenied" in failed.last_error
    assert SECRET not in failed.last_error and "***" in failed.last_error
    assert failed.failed == ("ckpt-2",) and not failed.up_to_date
    assert failed.last_commit == "ckpt-1" and failed.pending == ()
    assert failed.last_error_time >= failed.last_commit_time
    line = str(failed)
    assert is_one_line(line) and SECRET not in line
    assert "1 failed (ckpt-2)" in line and "last error " in line and "upload ckpt-2" in line
    assert "up to date" not in line

    faults.fail_when = None
    state.advance_to(3)
    m.save()
    m.sync()
    later = m.status()
    # The failure is kept, with its time; the newer commit shows beside it.
    assert later.last_commit == "ckpt-3" and later.last_error == failed.last_error
    assert later.last_commit_time > later.last_error_time
    assert later.failed == ("ckpt-2",)  # still not on the remote, still staged
    assert "last commit ckpt-3" in str(later) and "last error" in str(later)
    m.close()


def test_a_writer_that_lost_the_run_says_so(faults, state, tmp_path):
    remote = file_remote(tmp_path)
    a = make(state, remote, tmp_path / "a")
    state.advance_to(1)
    a.save()
    a.sync()
    b = make(state, remote, tmp_path / "b", takeover=True)
    state.advance_to(2)
    b.save()
    b.sync()
    state.advance_to(3)
    a.save()
    with pytest.raises(ckptstore.OwnershipLost):
        a.sync()
    lost = a.status()
    assert lost.role == "reader" and not lost.is_writer
    assert lost.last_error.startswith("lost the run: OwnershipLost")
    assert "(reader)" in str(lost) and "lost the run" in str(lost)
    b.close()
    with pytest.raises(ckptstore.OwnershipLost):
        a.close()


def test_reader_and_local_managers_report_a_status_too(faults, state, tmp_path):
    remote = file_remote(tmp_path)
    writer = make(state, remote, tmp_path / "w")
    state.advance_to(1)
    writer.save()
    writer.sync()
    committed_at = writer.status().last_commit_time
    reader = make(state, remote, tmp_path / "r", read_only=True)
    status = reader.status()
    assert status.role == "reader" and not status.is_writer
    assert status.pending == () and status.bytes_left == 0 and status.committed == 1
    assert status.last_commit == "ckpt-1"
    # A reader knows the checkpoint's time from its manifest (when it was saved).
    assert abs(status.last_commit_time - committed_at) < 60
    line = str(status)
    assert line.startswith(f"ckptstore {remote.url} (reader): last commit ckpt-1 ")
    reader.close()
    writer.close()

    fresh = TrainState()  # its save counter starts at 0
    local = ckptstore.CheckpointManager(fresh.checkpoint, str(tmp_path / "plain"), max_to_keep=2)
    assert str(local.status()) == f"ckptstore {tmp_path / 'plain'} (local): nothing saved yet"
    before = time.time()
    local.save()
    status = local.status()
    assert status.role == "local" and status.last_commit == "ckpt-1" and status.pending == ()
    assert status.last_commit_time >= before - 1
    assert str(status).startswith(f"ckptstore {tmp_path / 'plain'} (local): last save ckpt-1 ")


# --- progress: the log and the bar ----------------------------------------------------------


def progress_lines(caplog, name: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "ckptstore"
        and r.levelno == logging.INFO
        and r.getMessage().startswith(f"Uploading {name} to ")
    ]


def test_a_held_upload_logs_progress_at_most_once_per_log_every(
    faults, state, tmp_path, caplog, monkeypatch
):
    monkeypatch.setattr(progress, "LOG_EVERY", 0.2)
    remote = file_remote(tmp_path)
    gate = threading.Event()
    faults.hold = holds({"ckpt-1.data": gate})
    m = make(state, remote, tmp_path / "s")
    with caplog.at_level(logging.INFO, logger="ckptstore"):
        state.advance_to(1)
        started = time.monotonic()
        m.save()
        time.sleep(1.2)  # stalled: the log still says where it stands, at its pace
        gate.set()
        m.sync()
        elapsed = time.monotonic() - started
    lines = progress_lines(caplog, "ckpt-1")
    running = [line for line in lines if ": done, " not in line]
    assert 3 <= len(running) <= elapsed / 0.2 + 1, running
    assert all(" of " in line and "%)" in line for line in running), running
    assert len(lines) - len(running) == 1  # and one line at the end of a long transfer
    assert any(r.getMessage().startswith("Committed ckpt-1 to ") for r in caplog.records)
    m.close()


def test_a_quick_upload_logs_no_progress_line_at_default_settings(faults, state, tmp_path, caplog):
    remote = file_remote(tmp_path)
    with (
        caplog.at_level(logging.DEBUG, logger="ckptstore"),
        make(state, remote, tmp_path / "s") as m,
    ):
        for step in (1, 2):
            state.advance_to(step)
            m.save()
            m.sync()
    assert progress_lines(caplog, "ckpt-1") == [] and progress_lines(caplog, "ckpt-2") == []
    committed = [r for r in caplog.records if r.getMessage().startswith("Committed ckpt-")]
    assert len(committed) == 2 and all(r.levelno == logging.INFO for r in committed)


def test_many_small_reports_log_at_the_set_pace():
    """Thousands of chunk reports over ten (simulated) seconds: about ten lines, not thousands."""
    now = [0.0]
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Collect(logging.INFO)
    logger = logging.getLogger("ckptstore")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        transfer = progress.Transfer("Uploading x", 10_000_000, log_every=1.0, clock=lambda: now[0])
        for _ in range(5000):
            now[0] += 0.002
            transfer.file().relative_update(2000)
        transfer.finish()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    running = [r for r in records if r.startswith("Uploading x: ") and "done" not in r]
    assert 9 <= len(running) <= 11, running
    assert records[-1].startswith("Uploading x: done, 10.0 MB in 10 s (1.0 MB/s)")


def test_the_bar_is_drawn_only_once_asked_for(faults, state, tmp_path, capsys, bars):
    remote = file_remote(tmp_path)
    with make(state, remote, tmp_path / "s") as m:
        state.advance_to(1)
        m.save()
        m.sync()
        quiet = capsys.readouterr().err
        ckptstore.progress_bar()
        state.advance_to(2)
        m.save()
        m.sync()
        drawn = capsys.readouterr().err
        ckptstore.progress_bar(False)
        state.advance_to(3)
        m.save()
        m.sync()
        quiet_again = capsys.readouterr().err
    assert "ckpt-1" not in quiet and "%|" not in quiet
    assert "ckpt-2: 100%|" in drawn, drawn
    assert "ckpt-3" not in quiet_again and "%|" not in quiet_again


# --- Keras callbacks and exports ---------------------------------------------------------


X = np.random.default_rng(0).random((32, 4)).astype(np.float32)
Y = X.sum(axis=1, keepdims=True)


def small_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    return model


class Probe(keras.callbacks.Callback):
    """At the first epoch's end (after ModelCheckpoint's save), look, then let the upload go."""

    def __init__(self, checkpoint, release: threading.Event, started: list[str]):
        super().__init__()
        self.checkpoint, self.release, self.started = checkpoint, release, started
        self.seen = []

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            wait_until(lambda: self.started, "the upload of model-01.keras")
            self.seen.append(self.checkpoint.status())
            self.release.set()


def test_model_checkpoint_status(faults, tmp_path):
    remote = file_remote(tmp_path)
    release = threading.Event()
    faults.hold = holds({"model-01.keras": release})
    checkpoint = ckptstore.keras.ModelCheckpoint(f"{remote.url}/model-{{epoch:02d}}.keras")
    started = faults.puts  # the storage records each put as it begins
    probe = Probe(checkpoint, release, started)
    before = checkpoint.status()
    assert before.pending == () and before.last_commit is None
    small_model().fit(X, Y, epochs=2, verbose=0, callbacks=[checkpoint, probe])

    held = probe.seen[0]
    assert held.pending == ("model-01.keras",) and held.in_flight == "model-01.keras"
    assert held.bytes_left > 0 and held.url == f"{remote.url}/model-{{epoch:02d}}.keras"
    assert str(held).startswith(f"ckptstore {held.url}: 1 pending (model-01.keras uploading, ")

    after = checkpoint.status()
    assert after.pending == () and after.bytes_left == 0 and after.up_to_date
    assert after.last_commit == "model-02.keras" and after.committed == 2
    assert after.last_commit_time <= time.time() and after.last_error is None
    assert " up to date; last commit model-02.keras " in str(after)


class Scaler(tf.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = tf.Variable(tf.fill([3], float(scale)))

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    def score(self, x):
        return {"y": x * self.scale}


def test_exporter_status(faults, tmp_path):
    remote = file_remote(tmp_path)
    release = threading.Event()
    faults.hold = holds({"saved_model.pb": release})
    exporter = sm.Exporter(remote.url, max_to_keep=2)
    handle = exporter.save(Scaler(2.0))
    wait_until(lambda: "saved_model.pb" in faults.puts, "the upload of saved_model.pb")
    held = exporter.status()
    assert held.pending == ("version 1",) and held.in_flight == "version 1"
    assert held.bytes_left > 0 and held.last_commit is None
    assert held.rate is not None  # the variables went up before saved_model.pb
    assert str(held).startswith(f"ckptstore {remote.url}: 1 pending (version 1 uploading, ")
    release.set()
    handle.wait()
    done = exporter.status()
    assert done.up_to_date and done.pending == () and done.bytes_left == 0
    assert done.last_commit == "version 1" and done.committed == 1
    assert str(done).startswith(f"ckptstore {remote.url}: up to date; last commit version 1 ")

    faults.fail_when = lambda op, path: op == "put" and "/remote/2/" in path
    with pytest.raises(ckptstore.UploadError):
        exporter.save(Scaler(3.0)).wait()
    failed = exporter.status()
    assert failed.failed == ("version 2",) and failed.last_commit == "version 1"
    assert failed.last_error.startswith("upload version 2: PermissionError")
    line = str(failed)
    assert is_one_line(line) and "1 failed (version 2)" in line
    assert "last error " in line and "upload version 2" in line


def test_backup_and_restore_status(faults, tmp_path):
    remote = file_remote(tmp_path)
    backup = ckptstore.keras.BackupAndRestore(
        remote.url, delete_checkpoint=False, staging_dir=tmp_path / "s"
    )
    assert backup.status().role == "closed" and backup.status().last_commit is None
    seen = []

    class Look(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(backup.status())

    small_model().fit(X, Y, epochs=2, verbose=0, callbacks=[backup, Look()])
    assert seen[0].role == "writer" and seen[0].url == remote.url
    assert seen[0].pending in ((), ("ckpt-1",))  # it is queued or uploading, or done
    after = backup.status()
    assert after.role == "closed" and after.last_commit == "ckpt-2" and after.pending == ()
    assert str(after).startswith(f"ckptstore {remote.url} (closed): up to date; last commit ckpt-2")
