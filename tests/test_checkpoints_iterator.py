"""``ckptstore.checkpoints_iterator``: a sidecar evaluator reading what a trainer commits.

Every scenario runs against every remote (the ``remote`` fixture). The trainer is a
real ``ckptstore.CheckpointManager`` saving with ``sync()``, so each save is
committed before the iterator can see it; the iterator's yields are restored into
a fresh state whose values say which step they came from.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time

import pytest
import tensorflow as tf

import ckptstore
from ckptstore.staging import state_text
from conftest import gcs_remote, memory_remote, open_manager, s3_remote
from servers.faultproxy import FaultProxy
from training import TrainState

FAST = ckptstore.RetryPolicy(attempts=2, initial_delay=0.01, max_delay=0.05)
POLL = 0.05  # seconds between looks at the remote (TensorFlow's is 1 s)


@pytest.fixture(autouse=True)
def staging_base(tmp_path, monkeypatch):
    """The base of default staging directories; every iterator leaves it as it found it."""
    base = tmp_path / "staging-base"
    monkeypatch.setenv("CKPTSTORE_STAGING_DIR", str(base))
    yield base
    assert not base.exists() or os.listdir(base) == [], "an iterator left its directory behind"


def iterate(remote, **kwargs):
    kwargs.setdefault("poll_interval_secs", POLL)
    kwargs.setdefault("retry", FAST)
    kwargs.setdefault("storage_options", remote.storage_options)
    return ckptstore.checkpoints_iterator(remote.url, **kwargs)


class Trainer:
    """A ckptstore manager and the state it saves; each commit is visible when it returns."""

    def __init__(self, remote, staging, **kwargs):
        kwargs.setdefault("max_to_keep", 3)
        kwargs.setdefault("retry", FAST)
        self.state = TrainState()
        self.manager = open_manager(self.state, remote, staging, **kwargs)

    def commit(self, step):
        self.state.advance_to(step)
        self.manager.save()
        self.manager.sync()

    def close(self):
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def restored(prefix):
    """(checkpoint name, step) of a yielded prefix, after checking every value."""
    fresh = TrainState()
    fresh.checkpoint.restore(prefix).assert_existing_objects_matched()
    step = int(fresh.step.numpy())
    assert fresh.matches_step(step), f"{prefix} does not hold the values of step {step}"
    return os.path.basename(prefix), step


def files_of(name):
    return {f"{name}.index", f"{name}.data-00000-of-00001"}


def ckptstore_messages(caplog, level=logging.WARNING):
    return [r.getMessage() for r in caplog.records if r.name == "ckptstore" and r.levelno >= level]


def snapshot(remote):
    """Every object on the remote with its bytes (Drive: duplicate titles listed twice)."""
    return [(name, remote.read(name)) for name in remote.names()]


# --- the evaluator's view --------------------------------------------------------------


def test_yields_each_committed_checkpoint_once_in_order_while_training(remote, tmp_path):
    evaluated: queue.Queue = queue.Queue()
    done = threading.Event()
    failures: list[BaseException] = []

    def train():
        try:
            with Trainer(remote, tmp_path / "trainer", max_to_keep=2) as t:
                for step in (1, 2, 3):
                    t.commit(step)
                    evaluated.get(timeout=60)  # lockstep: nothing is skipped
        except BaseException as exc:
            failures.append(exc)
        finally:
            done.set()

    staging = tmp_path / "eval"
    staging.mkdir()
    (staging / "notes.txt").write_text("the user's")
    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    seen = []
    for prefix in iterate(remote, staging_dir=str(staging), timeout=0.5, timeout_fn=done.is_set):
        name, step = restored(prefix)
        seen.append((name, step))
        # Bounded local disk: the previous checkpoint's copy is gone once this one is placed.
        assert set(os.listdir(staging)) == files_of(name) | {"notes.txt"}
        evaluated.put(step)
    thread.join(60)
    assert not failures, failures
    assert seen == [("ckpt-1", 1), ("ckpt-2", 2), ("ckpt-3", 3)]
    assert (staging / "notes.txt").read_text() == "the user's"
    assert set(os.listdir(staging)) == files_of("ckpt-3") | {"notes.txt"}


def test_only_the_newest_is_yielded_even_when_the_state_file_lags(remote, tmp_path):
    with Trainer(remote, tmp_path / "trainer") as t:
        for step in (1, 2, 3):
            t.commit(step)
    # The TF state file is written after the manifest; a reader may see it lag behind.
    remote.write("checkpoint", state_text(["ckpt-1", "ckpt-2"], [1.0, 2.0], 0.0).encode())
    started = time.monotonic()
    seen = [restored(p) for p in iterate(remote, staging_dir=str(tmp_path / "eval"), timeout=0)]
    assert seen == [("ckpt-3", 3)]  # ckpt-1 and ckpt-2 were committed between looks: skipped
    assert time.monotonic() - started < 30


def test_timeout_without_a_checkpoint_ends_the_iterator(remote, tmp_path):
    started = time.monotonic()
    assert list(iterate(remote, staging_dir=str(tmp_path / "eval"), timeout=0.3)) == []
    assert 0.25 < time.monotonic() - started < 30
    assert remote.names() == [], "the iterator created something on the remote"


def test_timeout_fn_returning_false_keeps_waiting(remote, tmp_path):
    calls = []
    with Trainer(remote, tmp_path / "trainer") as t:

        def timeout_fn():
            calls.append(time.monotonic())
            if len(calls) == 2:
                t.commit(5)  # arrives while the iterator is told to keep waiting
            return len(calls) >= 4

        seen = [restored(p) for p in iterate(remote, timeout=0.1, timeout_fn=timeout_fn)]
    # TensorFlow's contract: a timeout (1), another (2), the checkpoint, the call after a
    # yield (3), a timeout that ends it (4).
    assert seen == [("ckpt-1", 5)]
    assert len(calls) == 4


def test_a_corrupted_newest_checkpoint_is_never_yielded(remote, tmp_path, caplog):
    staging = tmp_path / "eval"
    calls = []
    with Trainer(remote, tmp_path / "trainer") as t:
        t.commit(1)
        t.commit(2)
        name = "ckpt-2.data-00000-of-00001"
        data = bytearray(remote.read(name))
        data[len(data) // 2] ^= 0xFF
        remote.write(name, bytes(data))

        def timeout_fn():
            calls.append(1)
            if len(calls) == 1:
                # Several looks have passed over the damaged ckpt-2: nothing of it was placed.
                assert [n for n in os.listdir(staging) if n.startswith("ckpt-2")] == []
                t.commit(3)
            return len(calls) >= 2

        with caplog.at_level(logging.WARNING, logger="ckptstore"):
            seen = [
                restored(p)
                for p in iterate(
                    remote, staging_dir=str(staging), timeout=0.3, timeout_fn=timeout_fn
                )
            ]
    assert seen == [("ckpt-3", 3)]  # not ckpt-2 (damaged), not ckpt-1 (not the newest)
    warnings = [m for m in ckptstore_messages(caplog) if "ckpt-2" in m]
    assert len(warnings) == 1, warnings  # once, not at every look
    assert "Not yielding ckpt-2" in warnings[0]


def test_the_iterator_never_writes_to_the_remote(remote, tmp_path, request, caplog):
    with Trainer(remote, tmp_path / "trainer") as t:
        t.commit(1)
        t.commit(2)
    # What a writer would tidy, adopt or rewrite, and a reader must leave alone.
    remote.write("ckpt-9.index", b"left by a crash")
    remote.write("ckpt-9.data-00000-of-00001", b"left by a crash")
    remote.write("ckpt-8.manifest.json", b'{"format": "ckptstore.manifest", ')
    remote.delete("checkpoint")
    drive = request.getfixturevalue("drive_server") if remote.url.startswith("gdrive:") else None
    before = snapshot(remote)
    if drive is not None:
        drive.clear_log()
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        seen = [restored(p) for p in iterate(remote, timeout=0.2)]
    if drive is not None:
        methods = {r.method for r in drive.requests()}
        assert methods <= {"GET"}, methods
    assert seen == [("ckpt-2", 2)]
    assert snapshot(remote) == before
    assert sum("Ignoring ckpt-8 " in m for m in ckptstore_messages(caplog)) == 1


def test_min_interval_secs_spaces_the_yields(tmp_path):
    remote = memory_remote()
    times = []
    with Trainer(remote, tmp_path / "trainer") as t:
        t.commit(1)
        for prefix in iterate(remote, min_interval_secs=0.4, timeout=0.2):
            times.append((time.monotonic(), restored(prefix)))
            if len(times) == 1:
                t.commit(2)  # ready at once; still yielded only after the interval
    assert [s for _, s in times] == [("ckpt-1", 1), ("ckpt-2", 2)]
    assert times[1][0] - times[0][0] >= 0.39


# --- local disk ----------------------------------------------------------------------


def test_default_staging_is_private_and_removed_when_the_iterator_is_closed(tmp_path, staging_base):
    base = staging_base
    remote = memory_remote()
    with Trainer(remote, tmp_path / "trainer") as t:
        t.commit(1)
    never_started = iterate(remote, timeout=0)
    del never_started
    assert not base.exists() or os.listdir(base) == []
    it = iterate(remote, timeout=0)
    prefix = next(it)
    assert restored(prefix) == ("ckpt-1", 1)
    private = os.path.dirname(prefix)
    assert os.path.dirname(private) == str(base)
    assert f".reader-{os.getpid()}-" in os.path.basename(private)
    it.close()
    assert not os.path.exists(private)
    # Run to its end, the iterator removes its directory too.
    assert [restored(p) for p in iterate(remote, timeout=0)] == [("ckpt-1", 1)]
    assert os.listdir(base) == []


def test_a_different_copy_already_in_staging_dir_is_not_overwritten(tmp_path):
    remote = memory_remote()
    with Trainer(remote, tmp_path / "trainer") as t:
        t.commit(1)
    staging = tmp_path / "eval"
    staging.mkdir()
    (staging / "ckpt-1.index").write_bytes(b"someone else's")
    with pytest.raises(ckptstore.ConfigurationError, match="does not overwrite"):
        list(iterate(remote, staging_dir=str(staging), timeout=0))
    assert (staging / "ckpt-1.index").read_bytes() == b"someone else's"
    # The same checkpoint already there (verified) is used, and left in place.
    (staging / "ckpt-1.index").unlink()
    for name in files_of("ckpt-1"):
        (staging / name).write_bytes(remote.read(name))
    assert [restored(p) for p in iterate(remote, staging_dir=str(staging), timeout=0)] == [
        ("ckpt-1", 1)
    ]


def test_a_plain_local_path_is_tensorflows_iterator(tmp_path):
    state = TrainState()
    directory = str(tmp_path / "tf")
    tf_manager = tf.train.CheckpointManager(state.checkpoint, directory, max_to_keep=3)
    for step in (1, 2):
        state.advance_to(step)
        tf_manager.save()
    ours = ckptstore.checkpoints_iterator(directory, timeout=0)
    assert ours.gi_code is tf.train.checkpoints_iterator(directory).gi_code
    assert list(ours) == list(tf.train.checkpoints_iterator(directory, timeout=0))
    assert list(ckptstore.checkpoints_iterator(directory, timeout=0, poll_interval_secs=0.05)) == [
        os.path.join(directory, "ckpt-2")
    ]


# --- the network ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_no_request_from_the_iterator_writes(kind, request, tmp_path):
    server = request.getfixturevalue(f"{kind}_server")
    methods: list[str] = []

    def record(method, target, headers):
        methods.append(method)
        return False  # never a fault: the proxy only watches

    proxy = FaultProxy("127.0.0.1", server.port, fault_filter=record)
    proxy.start()
    try:
        make = s3_remote if kind == "s3" else gcs_remote
        direct = make(server)  # the trainer's traffic does not pass the proxy
        through = make(server, proxy.endpoint_url)
        through.url, through.root = direct.url, direct.root
        evaluated: queue.Queue = queue.Queue()
        done = threading.Event()
        failures: list[BaseException] = []

        def train():
            try:
                with Trainer(direct, tmp_path / "trainer", max_to_keep=1) as t:
                    for step in (1, 2):
                        t.commit(step)
                        evaluated.get(timeout=60)
            except BaseException as exc:
                failures.append(exc)
            finally:
                done.set()

        thread = threading.Thread(target=train, daemon=True)
        thread.start()
        seen = []
        for prefix in iterate(through, timeout=0.3, timeout_fn=done.is_set):
            seen.append(restored(prefix))
            evaluated.put(1)
        thread.join(60)
    finally:
        proxy.stop()
    assert not failures, failures
    assert seen == [("ckpt-1", 1), ("ckpt-2", 2)]
    assert methods, "the iterator's requests did not pass the proxy"
    assert set(methods) <= {"GET", "HEAD"}, sorted(set(methods))


def test_an_outage_while_polling_is_survived(s3_server, tmp_path, caplog):
    proxy = FaultProxy("127.0.0.1", s3_server.port)
    proxy.start()
    try:
        spec = s3_remote(s3_server, proxy.endpoint_url)
        spec.storage_options["config_kwargs"] = {
            "connect_timeout": 1,
            "read_timeout": 2,
            "retries": {"total_max_attempts": 1},
        }
        direct = s3_remote(s3_server)
        direct.url, direct.root = spec.url, spec.root
        with Trainer(direct, tmp_path / "trainer") as t:
            t.commit(1)
        proxy.server_gone()
        calls = []

        def timeout_fn():
            calls.append(1)
            if len(calls) == 1:
                proxy.server_back()
            return len(calls) >= 3

        with caplog.at_level(logging.INFO, logger="ckptstore"):
            seen = [restored(p) for p in iterate(spec, timeout=0.5, timeout_fn=timeout_fn)]
    finally:
        proxy.stop()
    assert seen == [("ckpt-1", 1)]
    # Said once as a warning (later failed looks are logged at INFO), and the recovery too.
    warned = [m for m in ckptstore_messages(caplog, logging.WARNING) if "Could not read" in m]
    assert len(warned) == 1 and spec.url in warned[0], warned
    assert any("can be read again" in m for m in ckptstore_messages(caplog, logging.INFO))


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_a_missing_bucket_raises_naming_the_url(kind, request):
    server = request.getfixturevalue(f"{kind}_server")
    spec = (s3_remote if kind == "s3" else gcs_remote)(server)
    if kind == "s3":
        spec.storage_options["secret"] = "sekrit-secret-value"  # moto accepts any
    url = f"{'s3' if kind == 's3' else 'gs'}://no-such-bucket-ckptstore/run"
    it = ckptstore.checkpoints_iterator(
        url, timeout=0, storage_options=spec.storage_options, retry=FAST
    )
    with pytest.raises(ckptstore.ConfigurationError) as info:
        next(it)
    message = str(info.value)
    assert url in message and "does not exist" in message
    assert "sekrit" not in message
