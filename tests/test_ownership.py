"""One writer, many readers: a run's second writer reads, takes over, or fences the first.

Every scenario runs on file://, S3, GCS and Drive. Each manager stages in a
directory of its own and talks to the remote through a client of its own, as two
machines would. Checkpoint numbers tell the writers apart: the first writer saves
ckpt-1, ckpt-2, ... and the second ckpt-101, ckpt-102, ...; every checkpoint holds
the values of the step equal to its number (training.py), so "restorable bit for
bit" is checked value by value. Where the first writer must be paused or killed it
is a real second process (writer_child.py), stopped with SIGSTOP or SIGKILL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

import ckptstore
from conftest import RemoteSpec, file_remote, gcs_remote, gdrive_remote, open_manager, s3_remote
from faultfs import faulty_file_protocol
from servers.fake_drive import make_google_auth
from training import TrainState

LEASE = "ckptstore.lease.json"
CHILD = os.path.join(os.path.dirname(__file__), "writer_child.py")
#: short enough to wait out, long enough that a save before it expires is surely before
SHORT_LEASE = 3.0


@dataclasses.dataclass
class Shared:
    """One run on one remote, and how a second machine (or process) reaches it."""

    remote: RemoteSpec
    #: storage_options for writer_child.py (JSON: Drive's GoogleAuth is built over there)
    child_options: dict[str, Any]
    #: storage_options for a second manager in this process: its own client
    second_client: dict[str, Any]


def shared_run(kind: str, request, tmp_path) -> Shared:
    if kind == "file":
        remote = file_remote(tmp_path)
        return Shared(remote, {}, {"skip_instance_cache": True})
    if kind == "gdrive":
        server = request.getfixturevalue("drive_server")
        remote = gdrive_remote(server)
        own = {**remote.storage_options, "google_auth": make_google_auth(server)}
        return Shared(remote, {"fake_drive": [server.url, server.access_token]}, own)
    server = request.getfixturevalue(f"{kind}_server")
    remote = (s3_remote if kind == "s3" else gcs_remote)(server)
    own = {**remote.storage_options, "skip_instance_cache": True}
    return Shared(remote, remote.storage_options, own)


@pytest.fixture(params=["file", "s3", "gcs", "gdrive"])
def run(request, tmp_path) -> Shared:
    return shared_run(request.param, request, tmp_path)


@pytest.fixture
def closing():
    """Register a manager to be closed after the test, however it ended (no exit-time drain
    left retrying against servers that are gone)."""
    opened = []
    yield lambda manager: opened.append(manager) or manager
    for manager in opened:
        with contextlib.suppress(Exception):
            manager.close(timeout=10)


def first_machine(shared: Shared, state: TrainState, staging, **kwargs: Any):
    kwargs.setdefault("max_to_keep", 10)
    return open_manager(state, shared.remote, staging, **kwargs)


def second_machine(shared: Shared, state: TrainState, staging, **kwargs: Any):
    """A manager on the same run from "another machine": own staging, own client."""
    remote = dataclasses.replace(shared.remote, storage_options=shared.second_client)
    kwargs.setdefault("max_to_keep", 10)
    return open_manager(state, remote, staging, **kwargs)


def commit(manager, state: TrainState, number: int) -> None:
    state.advance_to(number)
    manager.save(checkpoint_number=number)
    manager.sync()


def committed_numbers(remote: RemoteSpec) -> set[int]:
    return {int(name.rsplit("-", 1)[1]) for name in remote.manifests()}


def lease_on(remote: RemoteSpec) -> dict[str, Any]:
    return json.loads(remote.read(LEASE))


def remote_except_lease(remote: RemoteSpec) -> dict[str, bytes]:
    """Every object but the lease (the writer's heartbeat rewrites that one) with its bytes."""
    return {name: remote.read(name) for name in remote.names() if name != LEASE}


def assert_restorable_bit_for_bit(remote: RemoteSpec, staging, numbers: set[int], newest: int):
    """Exactly ``numbers`` are committed, each holds its own step's values, ``newest`` last."""
    assert committed_numbers(remote) == numbers
    state = TrainState()
    with open_manager(state, remote, staging, max_to_keep=10, read_only=True) as reader:
        assert os.path.basename(reader.latest_checkpoint) == f"ckpt-{newest}"
        for n in sorted(numbers):
            fresh = TrainState()
            fresh.checkpoint.restore(reader.fetch(f"ckpt-{n}")).assert_existing_objects_matched()
            assert fresh.matches_step(n), f"ckpt-{n} does not hold the values of step {n}"


def names_the_writer(text: str, lease: dict[str, Any]) -> bool:
    return f"host {lease['host']}, pid {lease['pid']}" in text


# --- two writers in one process (two machines: own staging, own client) ---------------


def test_a_second_manager_only_reads_while_the_writer_lives_and_its_save_names_the_writer(
    run, tmp_path, closing
):
    remote = run.remote
    first_state = TrainState()
    first = closing(first_machine(run, first_state, tmp_path / "first-machine"))
    commit(first, first_state, 1)
    commit(first, first_state, 2)
    writer = lease_on(remote)
    before = remote_except_lease(remote)

    second_state = TrainState()
    second = closing(second_machine(run, second_state, tmp_path / "second-machine"))
    assert not second.is_writer
    second_state.checkpoint.restore(second.latest_checkpoint).assert_existing_objects_matched()
    assert second_state.matches_step(2)  # a reader restores what the writer committed

    second_state.advance_to(50)
    with pytest.raises(ckptstore.OwnershipError) as refused:
        second.save(checkpoint_number=50)
    assert not isinstance(refused.value, ckptstore.OwnershipLost)
    assert names_the_writer(str(refused.value), writer), str(refused.value)
    assert refused.value.holder.writer == writer["writer"]
    assert not second.is_writer
    assert not [n for n in os.listdir(second.staging_dir) if n.startswith("ckpt-50")]
    second.close()  # a reader's close gives up nothing: the run is not its own

    assert remote_except_lease(remote) == before  # the reader wrote and deleted nothing
    assert lease_on(remote)["writer"] == writer["writer"]
    commit(first, first_state, 3)
    commit(first, first_state, 4)
    assert first.is_writer
    first.close()
    assert_restorable_bit_for_bit(remote, tmp_path / "fresh", {1, 2, 3, 4}, newest=4)


def test_takeover_fences_the_running_writer_which_commits_nothing_more(run, tmp_path, closing):
    remote = run.remote
    first_state = TrainState()
    first = closing(first_machine(run, first_state, tmp_path / "first-machine"))
    commit(first, first_state, 1)
    commit(first, first_state, 2)
    old_writer = lease_on(remote)

    second_state = TrainState()
    second = closing(second_machine(run, second_state, tmp_path / "second-machine", takeover=True))
    assert second.is_writer
    new_writer = lease_on(remote)
    assert new_writer["writer"] != old_writer["writer"]
    second_state.checkpoint.restore(second.latest_checkpoint).assert_existing_objects_matched()
    assert second_state.matches_step(2)

    # The first writer goes on training, unaware: from now on nothing it saves is committed.
    first_state.advance_to(3)
    first.save(checkpoint_number=3)
    with pytest.raises(ckptstore.OwnershipLost) as lost:
        try:
            first.sync()
        finally:
            assert "ckpt-3" not in remote.manifests(), "the fenced writer committed after takeover"
    assert names_the_writer(str(lost.value), new_writer), str(lost.value)
    assert lost.value.holder.writer == new_writer["writer"]
    assert not first.is_writer

    commit(second, second_state, 101)
    with pytest.raises(ckptstore.OwnershipLost):
        commit(first, first_state, 4)
    commit(second, second_state, 102)
    with pytest.raises(ckptstore.OwnershipLost):
        first.close()
    assert second.is_writer
    assert lease_on(remote)["writer"] == new_writer["writer"]  # the fenced close released nothing
    second.close()
    assert_restorable_bit_for_bit(remote, tmp_path / "fresh", {1, 2, 101, 102}, newest=102)


def test_a_fenced_writer_saving_the_same_number_never_damages_the_new_writers_checkpoint(
    run, tmp_path, closing
):
    # Both resume from ckpt-2 and number on from TensorFlow's save counter: both save "ckpt-3".
    remote = run.remote
    first_state = TrainState()
    first = closing(first_machine(run, first_state, tmp_path / "first-machine"))
    for step in (1, 2):
        first_state.advance_to(step)
        first.save()
        first.sync()

    second_state = TrainState()
    second = closing(second_machine(run, second_state, tmp_path / "second-machine", takeover=True))
    second_state.checkpoint.restore(second.latest_checkpoint).assert_existing_objects_matched()
    second_state.advance_to(3)
    assert os.path.basename(second.save()) == "ckpt-3"
    second.sync()

    first_state.advance_to(3)
    first_state.weights[0].assign(first_state.weights[0] + 1.0)  # not the new writer's bytes
    assert os.path.basename(first.save()) == "ckpt-3"
    with pytest.raises(ckptstore.OwnershipLost):
        first.sync()
    with pytest.raises(ckptstore.OwnershipLost):
        first.close()
    second.close()
    assert_restorable_bit_for_bit(remote, tmp_path / "fresh", {1, 2, 3}, newest=3)


def test_a_takeover_while_the_old_writer_uploads_keeps_that_upload_from_being_committed(
    request, tmp_path, closing
):
    # The old writer checked its lease and started uploading ckpt-3; the takeover lands
    # while the bytes are on their way (faultfs holds them back until then).
    shared = shared_run("file", request, tmp_path)
    remote = shared.remote
    with faulty_file_protocol() as faults:
        first_state = TrainState()
        first = closing(first_machine(shared, first_state, tmp_path / "first-machine"))
        commit(first, first_state, 1)
        commit(first, first_state, 2)
        faults.gate = threading.Event()
        first_state.advance_to(3)
        first.save(checkpoint_number=3)
        deadline = time.monotonic() + 30
        while not any(n.startswith("ckpt-3.") for n in faults.puts):
            assert time.monotonic() < deadline, "ckpt-3's upload never started"
            time.sleep(0.01)

        second_state = TrainState()
        second = closing(
            second_machine(shared, second_state, tmp_path / "second-machine", takeover=True)
        )
        faults.gate.set()
        with pytest.raises(ckptstore.OwnershipLost):
            try:
                first.sync()
            finally:
                assert "ckpt-3" not in remote.manifests(), "committed after the takeover"
        commit(second, second_state, 101)
        second.close()
    assert_restorable_bit_for_bit(remote, tmp_path / "fresh", {1, 2, 101}, newest=101)


# --- a writer in another process: paused past its lease, or killed ---------------------


class WriterProcess:
    """writer_child.py: a writer in its own process, answering one line per command."""

    def __init__(self, shared: Shared, staging, log_path, **manager_kwargs: Any):
        self._log = open(log_path, "w")  # noqa: SIM115  (closed in kill())
        self.proc = subprocess.Popen(
            [
                sys.executable,
                CHILD,
                shared.remote.url,
                str(staging),
                json.dumps(shared.child_options),
                json.dumps(manager_kwargs),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        ready = self._next_line(timeout=120)
        assert ready == f"ready {self.proc.pid}", ready

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put("<exited>")

    def _next_line(self, timeout: float) -> str:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            with open(self._log.name) as log:
                tail = log.read()[-3000:]
            raise AssertionError(f"writer_child gave no answer; its log:\n{tail}") from None

    def ask(self, command: str, timeout: float = 120) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._next_line(timeout)

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._log.close()


def wait_until_expired(remote: RemoteSpec) -> None:
    """Sleep until the stored lease is older than its lease_seconds."""
    lease = lease_on(remote)
    time.sleep(max(0.0, lease["last_seen"] + lease["lease_seconds"] + 0.3 - time.time()))


@pytest.mark.parametrize("kind", ["file", "s3", "gcs", "gdrive"])
def test_a_paused_writer_whose_lease_expired_is_taken_over_and_fenced_when_it_resumes(
    kind, request, tmp_path, closing
):
    shared = shared_run(kind, request, tmp_path)
    remote = shared.remote
    first = WriterProcess(
        shared, tmp_path / "first-machine", tmp_path / "first.log", lease_seconds=SHORT_LEASE
    )
    try:
        for n in (1, 2):
            assert first.ask(f"save {n}") == f"saved {n}"
            assert first.ask("sync") == "synced"
        assert lease_on(remote)["pid"] == first.pid
        state = TrainState()
        second = closing(
            second_machine(shared, state, tmp_path / "second-machine", lease_seconds=SHORT_LEASE)
        )
        assert not second.is_writer
        first.pause()

        # Before the paused writer's lease expires, the newcomer only reads.
        state.advance_to(101)
        with pytest.raises(ckptstore.OwnershipError) as refused:
            second.save(checkpoint_number=101)
        refused_at = time.time()
        held = lease_on(remote)
        assert refused_at < held["last_seen"] + SHORT_LEASE, "too slow: the lease had expired"
        assert held["pid"] == first.pid and names_the_writer(str(refused.value), held)
        assert not second.is_writer

        # Once it expired, the same save takes the run over.
        wait_until_expired(remote)
        second.save(checkpoint_number=101)
        second.sync()
        assert second.is_writer
        assert lease_on(remote)["pid"] == os.getpid()

        # The paused writer wakes up and trains on: fenced, and it says so at sync().
        first.resume()
        for n in (3, 4):
            saved = first.ask(f"save {n}")  # the local write may still happen
            assert saved == f"saved {n}" or saved.startswith("raised OwnershipLost: "), saved
            answer = first.ask("sync")
            assert answer.startswith("raised OwnershipLost: "), answer
            assert f"host {socket.gethostname()}, pid {os.getpid()}" in answer, answer
        assert first.ask("writer?") == "writer False"
        assert first.ask("close").startswith("raised OwnershipLost: ")

        commit(second, state, 102)
        assert lease_on(remote)["pid"] == os.getpid()
        second.close()
    finally:
        first.kill()
    assert_restorable_bit_for_bit(remote, tmp_path / "fresh", {1, 2, 101, 102}, newest=102)


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_a_writer_that_died_on_this_machine_is_replaced_at_once(kind, request, tmp_path, closing):
    shared = shared_run(kind, request, tmp_path)
    long_lease = 600.0  # the dead writer's lease would outlive the test
    first = WriterProcess(
        shared, tmp_path / "first-machine", tmp_path / "first.log", lease_seconds=long_lease
    )
    try:
        assert first.ask("save 1") == "saved 1"
        assert first.ask("sync") == "synced"
    finally:
        first.kill()
    assert lease_on(shared.remote)["pid"] == first.pid

    state = TrainState()
    second = closing(
        second_machine(shared, state, tmp_path / "second-machine", lease_seconds=long_lease)
    )
    commit(second, state, 101)
    assert second.is_writer
    assert lease_on(shared.remote)["pid"] == os.getpid()
    second.close()
    assert_restorable_bit_for_bit(shared.remote, tmp_path / "fresh", {1, 101}, newest=101)
