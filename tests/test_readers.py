"""One writer, many readers (issue 11): a process that only reads a run never changes it.

The bug: a trainer saved to ``s3://bucket/run`` with ``max_to_keep=1``; while its
ckpt-2 uploaded, a second process opened a manager on the same URL to read the
latest checkpoint. Starting up, the reader collected "orphans" and deleted the
trainer's in-flight ``ckpt-2.index``; the trainer then committed ckpt-2, retired
ckpt-1, and the remote was left with nothing restorable.

One side's requests go through a link that records each of them and can hold or
refuse any (a FaultProxy in front of S3, GCS and the fake Drive; ``faultfs`` for
``file://``): in the reproduction the trainer's, held at a chosen instant of its
upload while a reader talks to the server directly; in the zero-write tests the
reader's. A reader (default arguments, or ``read_only=True``) restores, never
writes, and leaves the writer's run exactly as it found it. Secrets given to
either stay out of every text ckptstore emits and every object it stores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import posixpath
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import crc32c
import pytest

import ckptstore
from ckptstore.backends.local import TEMP_MARKER
from conftest import RemoteSpec, file_remote, gcs_remote, gdrive_remote, s3_remote
from faultfs import faulty_file_protocol
from servers.faultproxy import FaultProxy
from training import TrainState

KINDS = ["s3", "gcs", "gdrive", "file"]
DATA = ".data-00000-of-00001"
INDEX2, DATA2, MANIFEST2 = "ckpt-2.index", "ckpt-2" + DATA, "ckpt-2.manifest.json"
LEASE = "ckptstore.lease.json"
SMALL = ((64, 32), (7,))
HOLD_LIMIT = 30.0  # a held request goes on by itself after this, so a failing test ends
ONCE = ckptstore.RetryPolicy(attempts=1)
SECRET = "sEcReT-ckptstore-DO-NOT-PRINT-0123456789"


# --- what a request does, seen from the wire (or from faultfs) ------------------------------


@dataclasses.dataclass(frozen=True)
class Request:
    """One request to the storage: what it does, and to which object where it says so."""

    op: str  # "read", "write" or "delete"
    name: str | None  # base name of the object, when the request names it
    what: str = ""  # the request as sent, for failure messages


def _header(headers: list[tuple[str, str]], name: str) -> str:
    return next((v for k, v in headers if k.lower() == name), "")


def _named_in_body(body: bytes | None) -> str | None:
    """The object a GCS upload or a Drive insert names in its (metadata-first) body."""
    m = re.search(rb'"(?:name|title)"\s*:\s*"([^"]+)"', (body or b"")[:8192])
    return posixpath.basename(m.group(1).decode()) if m else None


def _drive_title(drive: Any, query: dict[str, str], path: str, body: bytes | None) -> str | None:
    """The title a fake-Drive request is about: its upload session's, its file's, or its body's."""
    if "upload_id" in query:
        return next(
            (
                s.metadata.get("title")
                for s in drive.sessions()
                if s.upload_id == query["upload_id"]
            ),
            None,
        )
    m = re.fullmatch(r"/(?:upload/)?drive/v2/files/([^/]+)(?:/trash|/untrash)?", path)
    if m is None:
        return _named_in_body(body)
    try:
        return drive.metadata(m.group(1))["title"]
    except Exception:  # gone already
        return None


def describe(
    kind: str, method: str, target: str, headers: list, body: bytes | None, drive: Any = None
) -> Request:
    """What an HTTP request to ``kind``'s server does, and to which object."""
    parts = urllib.parse.urlsplit(target)
    path = urllib.parse.unquote(parts.path)
    query = dict(urllib.parse.parse_qsl(parts.query))
    what = f"{method} {urllib.parse.unquote(target)}"
    # googleapiclient sends an over-long GET as a POST that says so.
    if method == "POST" and _header(headers, "x-http-method-override").upper() == "GET":
        method = "GET"
    if method not in ("PUT", "POST", "DELETE", "PATCH"):
        op = "read"
    else:
        op = "delete" if method == "DELETE" or path.endswith("/trash") else "write"
    name = None
    if kind == "s3":  # /bucket/prefix/name; /bucket alone is a bucket-level request
        segments = path.strip("/").split("/")
        name = segments[-1] if len(segments) > 1 else None
        if method == "POST" and "delete" in query:
            op = "delete"
    elif kind == "gcs":
        if path.startswith("/upload/"):
            key = query.get("name")
            name = posixpath.basename(key) if key else _named_in_body(body)
        elif "/o/" in path:
            name = posixpath.basename(path.split("/o/", 1)[1])
    elif kind == "gdrive" and op != "read":
        name = _drive_title(drive, query, path, body)
    return Request(op, name, what)


# --- the storage a test talks through --------------------------------------------------------


class Link:
    """A FaultProxy in front of one server that sees every request as a :class:`Request`.

    ``hooks`` run in the proxy's thread before a request is forwarded: a hook that
    blocks holds that request (every other request goes on); a hook returning True
    has it answered with HTTP 403 instead. The proxy shows the hooks small bodies
    too: GCS uploads and Drive inserts name their object only there.
    """

    def __init__(self, kind: str, server: Any):
        self.kind, self.server = kind, server
        self.seen: list[Request] = []
        self.hooks: list[Callable[[Request], Any]] = []
        self.proxy = FaultProxy("127.0.0.1", server.port, body_filter=self._filter)
        self.proxy.error_status = 403
        self.proxy.set_failure_rate(1.0, ("5xx",))  # only for requests a hook refuses

    def _filter(self, method: str, target: str, headers: list, body: bytes | None) -> bool:
        drive = self.server if self.kind == "gdrive" else None
        request = describe(self.kind, method, target, headers, body, drive)
        self.seen.append(request)
        return any([bool(hook(request)) for hook in list(self.hooks)])

    def remote(self) -> RemoteSpec:
        """A fresh remote whose client goes through this link."""
        if self.kind == "s3":
            return s3_remote(self.server, self.proxy.endpoint_url)
        if self.kind == "gcs":
            return gcs_remote(self.server, self.proxy.endpoint_url)
        return gdrive_remote(self.server, url=self.proxy.endpoint_url)

    def direct(self, like: RemoteSpec) -> RemoteSpec:
        """The same remote, with a client of its own that talks to the server directly."""
        make = {"s3": s3_remote, "gcs": gcs_remote, "gdrive": gdrive_remote}[self.kind]
        spec = make(self.server)
        spec.url, spec.root = like.url, like.root
        return spec


class FileLink:
    """The same for ``file://``: faultfs asks the hooks before each put, open, rename and delete.

    A hook returning True has faultfs refuse the operation (PermissionError). A
    small object written under a temporary name and renamed into place counts
    as a write of the object itself. (faultfs asks again right after a delete.)
    """

    OPS = {"put": "write", "rm": "delete", "open-rb": "read"}

    def __init__(self, spec: RemoteSpec):
        self.spec = spec
        self.seen: list[Request] = []
        self.hooks: list[Callable[[Request], Any]] = []

    def check(self, op: str, path: str) -> bool:
        name = os.path.basename(path).split(TEMP_MARKER)[0]
        request = Request(self.OPS.get(op, "write"), name, f"{op} {path}")
        self.seen.append(request)
        return any([bool(hook(request)) for hook in list(self.hooks)])

    def remote(self) -> RemoteSpec:
        return self.spec

    def direct(self, like: RemoteSpec) -> RemoteSpec:
        return like


@contextlib.contextmanager
def link_to(kind: str, request: Any, tmp_path: Any) -> Iterator[Link | FileLink]:
    if kind == "file":
        spec = file_remote(tmp_path)
        with faulty_file_protocol() as faults:
            link = FileLink(spec)
            faults.fail_when = link.check
            yield link
        return
    server = request.getfixturevalue("drive_server" if kind == "gdrive" else f"{kind}_server")
    link = Link(kind, server)
    link.proxy.start()
    try:
        yield link
    finally:
        link.proxy.stop()


class Hold:
    """Holds the requests ``matches`` picks until :meth:`release` (one hold, then never again)."""

    def __init__(self, matches: Callable[[Request], bool]):
        self.matches = matches
        self.reached = threading.Event()
        self.released = threading.Event()
        self.held: list[Request] = []

    def __call__(self, request: Request) -> bool:
        if self.released.is_set() or not self.matches(request):
            return False
        self.held.append(request)
        self.reached.set()
        self.released.wait(HOLD_LIMIT)
        return False  # then forwarded as it was

    def release(self) -> None:
        self.released.set()


# --- looking at the remote -----------------------------------------------------------------


def listing(spec: RemoteSpec) -> dict[str, int]:
    """``{name: size}`` of everything stored under the remote's root."""
    spec.fs.invalidate_cache()
    try:
        entries = spec.fs.ls(spec.root, detail=True)
    except FileNotFoundError:
        return {}
    out: dict[str, int] = {}
    for e in entries:
        name = posixpath.basename(str(e["name"]).rstrip("/"))
        key = name
        while key in out:  # Drive: several files may share a title
            key += "'"
        out[key] = int(e.get("size") or 0)
    return out


def snapshot(spec: RemoteSpec) -> dict[str, Any]:
    """Every stored name and size, and the bytes of the small objects (lease, manifests, state)."""
    names = listing(spec)
    small = {
        n: hashlib.sha256(spec.read(n)).hexdigest()
        for n in names
        if n.endswith(".json") or n == "checkpoint"
    }
    return {"sizes": names, "small": small}


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def assert_every_manifest_matches_its_data(spec: RemoteSpec) -> None:
    assert spec.manifests(), "no committed checkpoint on the remote"
    for checkpoint in spec.manifests():
        doc = json.loads(spec.read(checkpoint + ".manifest.json"))
        for f in doc["files"]:
            data = spec.read(f["name"])
            assert len(data) == f["size"], (checkpoint, f["name"])
            assert f"{crc32c.crc32c(data):08x}" == f["crc32c"], (checkpoint, f["name"])


def manager(state: TrainState, spec: RemoteSpec, staging: Any, **kwargs: Any):
    """A manager on ``spec`` with only the arguments a user must give (plus the test's)."""
    kwargs.setdefault("max_to_keep", 1)
    options = {**spec.storage_options, **kwargs.pop("storage_options", {})}
    return ckptstore.CheckpointManager(
        state.checkpoint, spec.url, staging_dir=str(staging), storage_options=options, **kwargs
    )


def close_quietly(m) -> None:
    """After a failure: stop a manager's background work without hiding the failure."""
    with contextlib.suppress(Exception):
        m.close(timeout=10)


@pytest.fixture(autouse=True)
def _staging_base(tmp_path, monkeypatch):
    # Managers that only read download into a private directory beside the default
    # staging base: keep that under the test's own directory.
    monkeypatch.setenv("CKPTSTORE_STAGING_DIR", str(tmp_path / "default-staging"))


# --- 1. the reproduction: a reader opened while the writer's upload is held -----------------


# point -> (step the reader restores while held, which requests of the trainer to hold)
HOLD_POINTS: dict[str, tuple[int, Callable[[Request], bool]]] = {
    # Every write of ckpt-2: nothing of it is stored.
    "before-any-data": (1, lambda r: r.op == "write" and (r.name or "").startswith("ckpt-2.")),
    # The data file's upload: the index goes up beside it, the data does not.
    "between-data-files": (1, lambda r: r.op == "write" and r.name == DATA2),
    # The manifest's write: every data file is up and verified, nothing commits it yet.
    "between-data-and-manifest": (1, lambda r: r.op == "write" and r.name == MANIFEST2),
    # Retiring ckpt-1 once ckpt-2 is committed: its first deletion (the manifest).
    "during-retention": (2, lambda r: r.op == "delete" and (r.name or "").startswith("ckpt-1.")),
}

HELD_STATE = {  # what the remote holds while the request is held: (present, absent)
    "before-any-data": ((), (INDEX2, DATA2, MANIFEST2)),
    "between-data-files": ((INDEX2,), (DATA2, MANIFEST2)),
    "between-data-and-manifest": ((INDEX2, DATA2), (MANIFEST2,)),
    "during-retention": ((INDEX2, DATA2, MANIFEST2), ()),
}


@pytest.mark.parametrize("point", list(HOLD_POINTS))
@pytest.mark.parametrize("kind", KINDS)
def test_a_reader_opened_during_the_writers_upload_changes_nothing_and_the_run_stays_restorable(
    kind, point, request, tmp_path
):
    restores_while_held, matches = HOLD_POINTS[point]
    with link_to(kind, request, tmp_path) as link, contextlib.ExitStack() as cleanup:
        trainer_spec = link.remote()
        remote = link.direct(trainer_spec)  # the reader's, and the test's look at the remote
        state = TrainState(SMALL)
        trainer = manager(state, trainer_spec, tmp_path / "trainer")
        cleanup.callback(close_quietly, trainer)
        state.advance_to(1)
        trainer.save()
        trainer.sync()
        assert remote.manifests() == ["ckpt-1"]

        hold = Hold(matches)
        link.hooks.append(hold)
        cleanup.callback(hold.release)
        state.advance_to(2)
        trainer.save()
        assert hold.reached.wait(HOLD_LIMIT), f"the trainer never sent the request held {point}"
        if point == "between-data-files":
            wait_until(lambda: INDEX2 in listing(remote), "ckpt-2.index is stored")
        held = listing(remote)
        present, absent = HELD_STATE[point]
        assert set(present) <= set(held) and not set(absent) & set(held), (held, hold.held)

        reader_state = TrainState(SMALL)
        reader = manager(reader_state, remote, tmp_path / "reader")  # default arguments
        try:
            assert not reader.is_writer
            prefix = reader.latest_checkpoint
            assert prefix is not None
            reader_state.checkpoint.restore(prefix).assert_existing_objects_matched()
            assert reader_state.matches_step(restores_while_held)
        finally:
            reader.close()
        after = listing(remote)
        # The lease is renewed by the trainer's heartbeat meanwhile: its size may change.
        held.pop(LEASE, None)
        after.pop(LEASE, None)
        assert after == held, "the reader changed the writer's remote"  # issue 11 failed here

        hold.release()
        trainer.sync()
        reported = trainer.upload_status().committed
        trainer.close()

    newest = max(reported, key=lambda n: int(n.rsplit("-", 1)[1]))
    assert newest == "ckpt-2"
    assert remote.manifests() == [newest]
    assert_every_manifest_matches_its_data(remote)
    fresh = TrainState(SMALL)
    with manager(fresh, remote, tmp_path / "fresh-machine") as m:
        prefix = m.latest_checkpoint
        fresh.checkpoint.restore(prefix).assert_existing_objects_matched()
    assert os.path.basename(prefix) == newest and fresh.matches_step(2)
    for f in json.loads(remote.read(MANIFEST2))["files"]:  # bit for bit what the trainer wrote
        assert remote.read(f["name"]) == (tmp_path / "trainer" / f["name"]).read_bytes()


@pytest.mark.parametrize("kind", KINDS)
def test_a_reader_whose_checkpoint_is_retired_before_it_reads_it_restores_the_newer_one(
    kind, request, tmp_path
):
    # An evaluator opens its manager while ckpt-2 uploads and asks for latest_checkpoint a
    # moment later, after the writer (max_to_keep=1) committed ckpt-2 and retired ckpt-1.
    _, manifest_write = HOLD_POINTS["between-data-and-manifest"]
    with link_to(kind, request, tmp_path) as link, contextlib.ExitStack() as cleanup:
        trainer_spec = link.remote()
        remote = link.direct(trainer_spec)
        state = TrainState(SMALL)
        trainer = manager(state, trainer_spec, tmp_path / "trainer")
        cleanup.callback(close_quietly, trainer)
        state.advance_to(1)
        trainer.save()
        trainer.sync()
        hold = Hold(manifest_write)
        link.hooks.append(hold)
        cleanup.callback(hold.release)
        state.advance_to(2)
        trainer.save()
        assert hold.reached.wait(HOLD_LIMIT), "the trainer never sent ckpt-2's manifest"

        reader_state = TrainState(SMALL)
        reader = manager(reader_state, remote, tmp_path / "reader")  # sees ckpt-1 committed
        cleanup.callback(close_quietly, reader)
        hold.release()
        trainer.sync()
        assert remote.manifests() == ["ckpt-2"]  # ckpt-1 is gone from the remote

        prefix = reader.latest_checkpoint
        assert prefix is not None and os.path.basename(prefix) == "ckpt-2"
        reader_state.checkpoint.restore(prefix).assert_existing_objects_matched()
        assert reader_state.matches_step(2)
        reader.close()
        trainer.close()


# --- 2. readers send no write ----------------------------------------------------------------


def _read_only_look(link, remote: RemoteSpec, reader_spec: RemoteSpec, tmp_path, step) -> None:
    """Open a read_only manager, restore, try to save, close: nothing may change or be sent."""
    before = snapshot(remote)
    mark = len(link.seen)
    state = TrainState(SMALL)
    m = manager(state, reader_spec, tmp_path / f"read-only-{step}", read_only=True)
    try:
        assert not m.is_writer
        prefix = m.latest_checkpoint
        if step is None:
            assert prefix is None
        else:
            state.checkpoint.restore(prefix).assert_existing_objects_matched()
            assert state.matches_step(step)
        counter = int(state.checkpoint.save_counter.numpy())
        with pytest.raises(ckptstore.OwnershipError, match="read_only=True"):
            m.save()
        assert int(state.checkpoint.save_counter.numpy()) == counter
    finally:
        m.close()
    seen = link.seen[mark:]
    assert seen, "the reader's requests did not go through the recording link"
    assert [r.what for r in seen if r.op != "read"] == []
    assert snapshot(remote) == before


@pytest.mark.parametrize("kind", KINDS)
def test_a_read_only_manager_sends_no_write_to_an_empty_or_a_written_remote(
    kind, request, tmp_path
):
    with link_to(kind, request, tmp_path) as link:
        reader_spec = link.remote()
        remote = link.direct(reader_spec)
        _read_only_look(link, remote, reader_spec, tmp_path, None)  # nothing there yet
        assert listing(remote) == {}

        state = TrainState(SMALL)
        # A long lease: no heartbeat rewrites it while the readers look.
        writer = manager(state, remote, tmp_path / "writer", max_to_keep=2, lease_seconds=600)
        try:
            for step in (1, 2):
                state.advance_to(step)
                writer.save()
                writer.sync()
            _read_only_look(link, remote, reader_spec, tmp_path, 2)  # beside a live writer
        finally:
            writer.close()
        assert LEASE in listing(remote)
        _read_only_look(link, remote, reader_spec, tmp_path, 2)  # the lease is free: still reads

        # The link does see writes: a manager that saves through it is recorded writing.
        mark = len(link.seen)
        with manager(state, reader_spec, tmp_path / "next-writer", max_to_keep=2) as m:
            state.advance_to(3)
            m.save()
            m.sync()
            assert m.is_writer
        assert [r for r in link.seen[mark:] if r.op == "write"], "no write seen through the link"
    assert sorted(remote.manifests()) == ["ckpt-2", "ckpt-3"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_manager_beside_a_live_writer_only_reads_and_its_save_names_the_writer(
    kind, request, tmp_path, caplog
):
    with link_to(kind, request, tmp_path) as link:
        reader_spec = link.remote()
        remote = link.direct(reader_spec)
        wstate = TrainState(SMALL)
        writer = manager(wstate, remote, tmp_path / "writer", lease_seconds=600)
        try:
            wstate.advance_to(1)
            writer.save()
            writer.sync()
            assert writer.is_writer
            before, mark = snapshot(remote), len(link.seen)

            staging = tmp_path / "reader"
            state = TrainState(SMALL)
            with caplog.at_level(logging.INFO, logger="ckptstore"):
                caplog.clear()
                reader = manager(state, reader_spec, staging)  # default arguments
                try:
                    assert not reader.is_writer
                    state.checkpoint.restore(
                        reader.latest_checkpoint
                    ).assert_existing_objects_matched()
                    assert state.matches_step(1)
                    said = [r.getMessage() for r in caplog.records if r.name == "ckptstore"]
                    counter = int(state.checkpoint.save_counter.numpy())
                    staged = sorted(os.listdir(staging))
                    state.advance_to(2)
                    with pytest.raises(ckptstore.OwnershipError) as info:
                        reader.save()
                    assert int(state.checkpoint.save_counter.numpy()) == counter
                    assert sorted(os.listdir(staging)) == staged  # nothing staged
                    assert not reader.is_writer
                finally:
                    reader.close()
            seen = link.seen[mark:]
            assert seen, "the reader's requests did not go through the recording link"
            assert [r.what for r in seen if r.op != "read"] == []
            assert snapshot(remote) == before

            message = str(info.value)
            assert socket.gethostname() in message
            assert re.search(rf"\bpid {os.getpid()}\b", message), message
            assert "takeover=True" in message and remote.url in message
            # Said once, naming the writer (host and pid).
            naming = [m for m in said if socket.gethostname() in m and str(os.getpid()) in m]
            assert len(naming) == 1, said

            wstate.advance_to(2)  # the writer goes on as if no reader had come
            writer.save()
            writer.sync()
        finally:
            writer.close()
    assert remote.manifests() == ["ckpt-2"]
    assert_every_manifest_matches_its_data(remote)


def staged_files(directory: str) -> dict[str, tuple[int, int]]:
    return {
        n: (
            os.stat(os.path.join(directory, n)).st_size,
            os.stat(os.path.join(directory, n)).st_mtime_ns,
        )
        for n in os.listdir(directory)
    }


@pytest.mark.parametrize("kind", KINDS)
def test_a_reader_sharing_the_writers_staging_directory_leaves_its_staged_files_alone(
    kind, request, tmp_path
):
    _, between_data_files = HOLD_POINTS["between-data-files"]
    with link_to(kind, request, tmp_path) as link, contextlib.ExitStack() as cleanup:
        trainer_spec = link.remote()
        remote = link.direct(trainer_spec)
        state = TrainState(SMALL)
        # No staging_dir for either: both take the URL's default staging directory.
        trainer = ckptstore.CheckpointManager(
            state.checkpoint, trainer_spec.url, 1, storage_options=trainer_spec.storage_options
        )
        cleanup.callback(close_quietly, trainer)
        state.advance_to(1)
        trainer.save()
        trainer.sync()
        hold = Hold(between_data_files)
        link.hooks.append(hold)
        cleanup.callback(hold.release)
        state.advance_to(2)
        trainer.save()
        assert hold.reached.wait(HOLD_LIMIT), "the trainer never sent its data file"
        wait_until(lambda: INDEX2 in listing(remote), "ckpt-2.index is stored")
        staged = staged_files(trainer.staging_dir)
        assert INDEX2 in staged and DATA2 in staged  # ckpt-2 is still the trainer's to upload

        reader_state = TrainState(SMALL)
        reader = ckptstore.CheckpointManager(
            reader_state.checkpoint, remote.url, 1, storage_options=remote.storage_options
        )
        try:
            assert os.path.realpath(reader.staging_dir) != os.path.realpath(trainer.staging_dir)
            assert not reader.is_writer
            reader_state.checkpoint.restore(
                reader.latest_checkpoint
            ).assert_existing_objects_matched()
            assert reader_state.matches_step(1)
            with pytest.raises(ckptstore.OwnershipError):
                reader.save()
        finally:
            reader.close()
        assert staged_files(trainer.staging_dir) == staged

        hold.release()
        trainer.sync()
        trainer.close()
    assert remote.manifests() == ["ckpt-2"]
    assert_every_manifest_matches_its_data(remote)


# --- 3. credentials, on every backend ----------------------------------------------------------


def with_secrets(kind: str) -> dict[str, Any]:
    """Options carrying SECRET that each client accepts (the local servers ignore them)."""
    if kind == "s3":  # moto checks no signature
        return {"secret": SECRET, "token": "session-" + SECRET}
    if kind == "gcs":  # sent as a header on every request
        return {"session_kwargs": {"headers": {"x-goog-api-key": SECRET}}}
    if kind == "gdrive":  # pydrive2 takes google_auth first
        key = json.dumps({"type": "service_account", "private_key": "PRIVATE-" + SECRET})
        return {"client_id": "id-123", "client_secret": SECRET, "client_json": key}
    return {"token": SECRET, "client_kwargs": {"aws_secret_access_key": SECRET}}


@pytest.mark.parametrize("kind", KINDS)
def test_credentials_never_appear_in_logs_errors_reprs_manifests_or_the_lease(
    kind, request, tmp_path, caplog
):
    secrets = with_secrets(kind)
    texts: list[str] = []
    with link_to(kind, request, tmp_path) as link, caplog.at_level(logging.DEBUG, "ckptstore"):
        spec = link.remote()
        remote = link.direct(spec)
        state = TrainState(SMALL)
        writer = manager(
            state, spec, tmp_path / "writer", max_to_keep=2, storage_options=secrets, retry=ONCE
        )
        try:
            state.advance_to(1)
            writer.save()
            writer.sync()

            reader = manager(
                TrainState(SMALL), remote, tmp_path / "reader", storage_options=secrets
            )
            try:
                assert reader.latest_checkpoint is not None
                with pytest.raises(ckptstore.OwnershipError) as owned:
                    reader.save()
                texts += [repr(reader), str(reader), str(owned.value), repr(owned.value)]
            finally:
                reader.close()

            # The remote refuses the next checkpoint's files: the error path runs too.
            link.hooks.append(lambda r: r.op != "read" and r.name != LEASE)  # not the lease
            state.advance_to(2)
            writer.save()
            with pytest.raises(ckptstore.UploadError) as failed:
                writer.sync()
            link.hooks.clear()
            assert "ckpt-2" in failed.value.failures
            texts += [str(failed.value), repr(failed.value), repr(writer), str(writer)]
            texts += [repr(e) + str(e) for e in failed.value.failures.values()]
            texts += [repr(writer.upload_status())]
        finally:
            writer.close()
    stored = {n: remote.read(n).decode() for n in listing(remote) if n.endswith(".json")}
    stored["checkpoint"] = remote.read("checkpoint").decode()
    lease = json.loads(stored[LEASE])
    assert lease["pid"] == os.getpid() and lease["released"] is True
    assert "ckpt-1.manifest.json" in stored
    formatter = logging.Formatter()
    logged = [formatter.format(r) for r in caplog.records if r.name.startswith("ckptstore")]
    assert any("ckpt-2" in line for line in logged), "the failed upload was not logged"
    leaks = [t for t in texts + logged + list(stored.values()) if SECRET in t]
    assert leaks == []
