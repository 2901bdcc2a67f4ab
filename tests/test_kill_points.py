"""SIGKILL at every instant of the data path leaves the remote restorable, bit for bit.

Each test runs a training process (kill_child.py) that is killed with SIGKILL
at one point of saving checkpoint 3 (or of taking the run over from a dead
writer), then checks, as a new machine would, that: the newest committed
checkpoint restores exactly (manifests are the truth, whatever the state file
says); every committed manifest matches its data; a manager restarted on the
dead run's staging directory finishes the upload the kill interrupted; and the
next writer there takes the run at once (the dead writer held a 60 s lease),
commits, rewrites TensorFlow's state file and leaves no orphan behind.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import signal
import subprocess
import sys
import urllib.parse

import crc32c
import pytest

import ckptstore
from ckptstore.staging import parse_state_text
from conftest import file_remote
from training import TrainState

CHILD = os.path.join(os.path.dirname(__file__), "kill_child.py")

BIG = ((1024, 1024, 8), (64,))  # 32 MiB: a local write takes a while, S3 uploads it in parts
SMALL = ((64, 32), (32,), (7,))  # where the kill is at a small object, a small state is enough
LEASE = "ckptstore.lease.json"
TEMP_MARKER = ".ckptstore-tmp-"

# kill point -> (last step whose sync() returned, newest committed checkpoint, ckpt-3 left staged)
# During retention the newest is one past what sync() promised: ckpt-5 commits, then retiring
# ckpt-3 (inside the same sync) is where the kill lands. Between the manifest and the state
# file, ckpt-3 is committed (its manifest is in place) though its sync() never returned.
POINTS = {
    "local-write": (2, 2, False),
    "mid-upload": (2, 2, True),
    "between-data-and-manifest": (2, 2, True),
    "at-commit": (2, 2, True),
    "between-manifest-and-state-file": (2, 3, False),
    "during-retention": (4, 5, False),
}
#: kill points after which the remote's state file still names the checkpoint before the newest
STATE_FILE_BEHIND = {"between-manifest-and-state-file"}
#: kill points at a small object (manifest, state file, lease): any checkpoint size will do
SMALL_POINTS = {"at-commit", "between-manifest-and-state-file", "lease-takeover"}


def shapes_for(point: str):
    return SMALL if point in SMALL_POINTS else BIG


def run_until_killed(
    remote_url, staging, point, options=None, on_start=None, steps=6, shapes=BIG
) -> list[int]:
    """Run the child until it is killed; return the steps whose sync() it reported."""
    args = [sys.executable, CHILD, remote_url, staging, point, "3", str(steps)]
    args += [json.dumps(options or {}), json.dumps(shapes)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if on_start is not None:
        on_start(proc)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, err[-3000:])
    return [int(line.split()[1]) for line in out.splitlines() if line.startswith("committed")]


def assert_every_manifest_matches_its_data(remote) -> None:

    for name in remote.manifests():
        doc = json.loads(remote.read(name + ".manifest.json"))
        for f in doc["files"]:
            data = remote.read(f["name"])
            assert len(data) == f["size"], f["name"]
            assert f"{crc32c.crc32c(data):08x}" == f["crc32c"], f["name"]


def state_file_latest(remote) -> str:
    """The checkpoint TensorFlow's ``checkpoint`` state file on the remote names as latest."""
    return parse_state_text(remote.read("checkpoint").decode()).model_checkpoint_path


def restore_on_new_machine(remote, staging, shapes=BIG) -> tuple[TrainState, str]:
    fresh = TrainState(shapes=shapes)
    with ckptstore.CheckpointManager(
        fresh.checkpoint,
        remote.url,
        max_to_keep=2,
        staging_dir=str(staging),
        storage_options=remote.storage_options,
    ) as m:
        prefix = m.latest_checkpoint
        fresh.checkpoint.restore(prefix).assert_existing_objects_matched()
    return fresh, prefix


@pytest.mark.parametrize("point", list(POINTS))
def test_kill_leaves_the_last_committed_checkpoint_restorable(point, tmp_path):
    remote = file_remote(tmp_path)
    staging = str(tmp_path / "staging")
    last_synced, newest, left_staged = POINTS[point]
    promised = run_until_killed(remote.url, staging, point, shapes=shapes_for(point))
    assert promised == list(range(1, last_synced + 1)), "the kill landed somewhere unexpected"
    if point == "at-commit":  # half a manifest was written, under its temporary name only
        assert [n for n in remote.names() if n.startswith("ckpt-3.manifest.json" + TEMP_MARKER)]

    check_after_kill(remote, staging, tmp_path, newest, left_staged, point)


def test_kill_during_a_lease_takeover_leaves_the_run_restorable_and_writable(tmp_path):
    # The run's writer dies holding its lease; its successor on the same machine is killed
    # while it writes the lease to take the run over, before it saved anything.
    remote = file_remote(tmp_path)
    staging = str(tmp_path / "staging")
    first = run_until_killed(remote.url, staging, "die-holding-the-lease", steps=2, shapes=SMALL)
    assert first == [1, 2]
    assert run_until_killed(remote.url, staging, "lease-takeover", shapes=SMALL) == []
    # Half the new lease was written, under a temporary name; the stored lease is whole.
    assert [n for n in remote.names() if n.startswith(LEASE + TEMP_MARKER)]
    assert json.loads(remote.read(LEASE))["pid"] > 0
    check_after_kill(remote, staging, tmp_path, 2, False, "lease-takeover")


def check_after_kill(remote, staging, tmp_path, newest, left_staged, point):
    shapes = shapes_for(point)
    assert_every_manifest_matches_its_data(remote)
    listed = newest - 1 if point in STATE_FILE_BEHIND else newest
    assert state_file_latest(remote) == f"ckpt-{listed}", "the kill landed somewhere unexpected"
    # Manifests are the truth: the newest committed checkpoint is restored, listed or not.
    fresh, prefix = restore_on_new_machine(remote, tmp_path / "new-machine", shapes)
    assert os.path.basename(prefix) == f"ckpt-{newest}"
    assert fresh.matches_step(newest)

    # The dead run's staging directory still holds what it could not upload ...
    if left_staged:
        assert os.path.exists(os.path.join(staging, "ckpt-3.index"))
        assert "ckpt-3" not in remote.manifests()
    # ... and a manager restarted on it finishes the job.
    resumed, prefix = restore_on_new_machine(remote, staging, shapes)
    expected = 3 if left_staged else newest
    assert os.path.basename(prefix) == f"ckpt-{expected}"
    assert resumed.matches_step(expected)
    assert_every_manifest_matches_its_data(remote)
    if left_staged:
        assert "ckpt-3" in remote.manifests()
        # The restarted manager wrote (it uploaded ckpt-3), so it tidied up too.
        assert_nothing_left_over(remote, staging, expected)
    the_next_writer_commits(remote, staging, tmp_path, expected, shapes)


def assert_nothing_left_over(remote, staging, newest) -> None:
    """No partial write, unmanaged staged copy, remote orphan or temporary object survives."""
    assert not [n for n in os.listdir(staging) if n.endswith("_temp")]
    staged = sorted(n for n in os.listdir(staging) if n.endswith(".index"))
    assert staged == [f"ckpt-{i}.index" for i in (newest - 1, newest)]
    committed = set(remote.manifests())
    for n in remote.names():
        if n.endswith(".index") or ".data-" in n:
            assert n.split(".")[0] in committed, f"orphan {n} left on the remote"
        # A lease's temporary copy is left alone: a takeover may be writing it right now.
        if not n.startswith(LEASE):
            assert TEMP_MARKER not in n, f"temporary object {n} left on the remote"


def the_next_writer_commits(remote, staging, tmp_path, after, shapes) -> None:
    """A manager on the dead run's staging takes the run at once, saves, and repairs the rest."""
    state = TrainState(shapes=shapes)
    with ckptstore.CheckpointManager(
        state.checkpoint,
        remote.url,
        max_to_keep=2,
        staging_dir=str(staging),
        storage_options=remote.storage_options,
    ) as m:
        state.checkpoint.restore(m.latest_checkpoint).assert_existing_objects_matched()
        assert state.matches_step(after)
        state.advance_to(after + 1)
        assert os.path.basename(m.save()) == f"ckpt-{after + 1}"
        m.sync()
        assert m.is_writer
    names = [f"ckpt-{after}", f"ckpt-{after + 1}"]
    assert sorted(remote.manifests(), key=lambda n: int(n.split("-")[1])) == names
    state_file = parse_state_text(remote.read("checkpoint").decode())
    assert state_file.model_checkpoint_path == names[-1]
    assert list(state_file.all_model_checkpoint_paths) == names
    assert_every_manifest_matches_its_data(remote)
    assert_nothing_left_over(remote, staging, after + 1)
    fresh, prefix = restore_on_new_machine(remote, tmp_path / "another-machine", shapes)
    assert os.path.basename(prefix) == names[-1]
    assert fresh.matches_step(after + 1)


def written_object(method: str, target: str, body: bytes | None) -> str | None:
    """The base name of the object a request writes: S3 PUTs name it in the URL, GCS
    uploads in the metadata that opens their body (the proxy shows small bodies)."""
    if method == "PUT":
        return posixpath.basename(urllib.parse.unquote(target.partition("?")[0]))
    if method == "POST" and body:
        named = re.search(rb'"name":\s*"([^"]+)"', body)
        if named:
            return posixpath.basename(named.group(1).decode())
    return None


# Over HTTP the kill comes from the proxy: when the child sends the chosen request,
# the proxy kills it and resets that request, so the server never sees it. A matcher
# sees (method, target, name of the object written or None, names written before).
CLOUD_POINTS = {
    "mid-upload": (
        lambda method, target, obj, seen: method in ("PUT", "POST") and "ckpt-3.data" in target,
        POINTS["mid-upload"],
    ),
    "between-data-and-manifest": (
        lambda method, target, obj, seen: method in ("HEAD", "GET") and "ckpt-3.data" in target,
        POINTS["between-data-and-manifest"],
    ),
    "at-commit": (
        lambda method, target, obj, seen: obj == "ckpt-3.manifest.json",
        POINTS["at-commit"],
    ),
    "between-manifest-and-state-file": (
        lambda method, target, obj, seen: obj == "checkpoint" and "ckpt-3.manifest.json" in seen,
        POINTS["between-manifest-and-state-file"],
    ),
    "during-retention": (
        lambda method, target, obj, seen: method == "DELETE" and "ckpt-3.data" in target,
        POINTS["during-retention"],
    ),
}


def kill_through_proxy(server, matches, child, killed):
    """A FaultProxy in front of ``server`` that SIGKILLs ``child[0]`` at the first match."""
    from servers.faultproxy import FaultProxy

    seen: list[str] = []

    def kill_on_match(method, target, headers, body):
        obj = written_object(method, target, body)
        hit = not killed and child and matches(method, urllib.parse.unquote(target), obj, seen)
        if obj is not None:
            seen.append(obj)
        if hit:
            os.kill(child[0].pid, signal.SIGKILL)
            killed.append(f"{method} {target} {obj}")
            proxy.inject_next("reset")  # and this request never reaches the server
            return True
        return False

    proxy = FaultProxy("127.0.0.1", server.port, body_filter=kill_on_match)
    return proxy.start()


def direct(remote, through_proxy):
    """The same run as ``through_proxy``, reached without the proxy (the test's own client)."""
    remote.url, remote.root = through_proxy.url, through_proxy.root
    return remote


@pytest.mark.parametrize("point", list(CLOUD_POINTS))
@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_kill_over_http_leaves_the_last_committed_checkpoint_restorable(
    kind, point, tmp_path, request
):
    from conftest import gcs_remote, s3_remote

    server = request.getfixturevalue(f"{kind}_server")
    matches, (last_synced, newest, left_staged) = CLOUD_POINTS[point]
    child: list = []
    killed: list[str] = []
    proxy = kill_through_proxy(server, matches, child, killed)
    try:
        through_proxy = (s3_remote if kind == "s3" else gcs_remote)(server, proxy.endpoint_url)
        staging = str(tmp_path / "staging")
        promised = run_until_killed(
            through_proxy.url,
            staging,
            "external",
            through_proxy.storage_options,
            child.append,
            shapes=shapes_for(point),
        )
    finally:
        proxy.stop()
    assert killed, "the chosen request was never sent"
    assert promised == list(range(1, last_synced + 1)), (killed, promised)
    remote = direct((s3_remote if kind == "s3" else gcs_remote)(server), through_proxy)
    check_after_kill(remote, staging, tmp_path, newest, left_staged, point)


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_kill_over_http_during_a_lease_takeover_leaves_the_run_restorable_and_writable(
    kind, tmp_path, request
):
    from conftest import gcs_remote, s3_remote

    server = request.getfixturevalue(f"{kind}_server")
    remote = (s3_remote if kind == "s3" else gcs_remote)(server)
    staging = str(tmp_path / "staging")
    promised = run_until_killed(
        remote.url, staging, "die-holding-the-lease", remote.storage_options, steps=2, shapes=SMALL
    )
    assert promised == [1, 2]
    child: list = []
    killed: list[str] = []
    proxy = kill_through_proxy(server, lambda m, t, obj, seen: obj == LEASE, child, killed)
    try:
        options = server.storage_options(proxy.endpoint_url)
        promised = run_until_killed(
            remote.url, staging, "external", options, child.append, shapes=SMALL
        )
    finally:
        proxy.stop()
    assert killed, "the lease was never written"
    assert promised == [], (killed, promised)
    check_after_kill(remote, staging, tmp_path, 2, False, "lease-takeover")


# On Drive the fake server kills the child: Drive URLs carry file ids, not names,
# and the fake knows which title each request is about.
# A matcher sees the request and the titles of the files written before it.
DRIVE_DATA = "ckpt-3.data-00000-of-00001"
DRIVE_POINTS = {
    "mid-upload": (
        lambda rec, seen: rec.method == "PUT" and rec.title == DRIVE_DATA,
        POINTS["mid-upload"],
    ),
    # The first lookup of the data file's title comes after its upload finished.
    "between-data-and-manifest": (
        lambda rec, seen: rec.method == "GET" and f"title='{DRIVE_DATA}'" in rec.query.get("q", ""),
        POINTS["between-data-and-manifest"],
    ),
    # Every write of a file's content is a PUT naming the file (a new file's upload session).
    "at-commit": (
        lambda rec, seen: rec.method == "PUT" and rec.title == "ckpt-3.manifest.json",
        POINTS["at-commit"],
    ),
    "between-manifest-and-state-file": (
        lambda rec, seen: (
            rec.method == "PUT" and rec.title == "checkpoint" and "ckpt-3.manifest.json" in seen
        ),
        POINTS["between-manifest-and-state-file"],
    ),
    "during-retention": (
        lambda rec, seen: (
            rec.title == DRIVE_DATA and (rec.method == "DELETE" or rec.path.endswith("/trash"))
        ),
        POINTS["during-retention"],
    ),
}


def drive_writes_the_lease(rec, seen) -> bool:
    return rec.method == "PUT" and rec.title == LEASE  # reading it (GET) names it too


def kill_from_drive(drive_server, matches, child, killed) -> None:
    """Make the fake Drive SIGKILL ``child[0]`` at the first matching request (and fail it)."""
    seen: list[str] = []

    def kill_on_match(rec) -> bool:
        hit = not killed and child and matches(rec, seen)
        if rec.method == "PUT" and rec.title:
            seen.append(rec.title)
        if not hit:
            return False
        os.kill(child[0].pid, signal.SIGKILL)
        killed.append(f"{rec.method} {rec.path} {rec.title}")
        return True  # answered with an error the dead child never reads: nothing is stored

    drive_server.fail_next(1, "backendError", predicate=kill_on_match)


@pytest.mark.parametrize("point", list(DRIVE_POINTS))
def test_kill_on_drive_leaves_the_last_committed_checkpoint_restorable(
    point, tmp_path, drive_server
):
    from conftest import gdrive_remote

    matches, (last_synced, newest, left_staged) = DRIVE_POINTS[point]
    remote = gdrive_remote(drive_server)
    child: list = []
    killed: list[str] = []
    kill_from_drive(drive_server, matches, child, killed)
    options = {"fake_drive": [drive_server.url, drive_server.access_token]}
    staging = str(tmp_path / "staging")
    try:
        promised = run_until_killed(
            remote.url, staging, "external", options, child.append, shapes=shapes_for(point)
        )
    finally:
        drive_server.clear_faults()
    assert killed, "the chosen request was never sent"
    assert promised == list(range(1, last_synced + 1)), (killed, promised)
    check_after_kill(remote, staging, tmp_path, newest, left_staged, point)


def test_kill_on_drive_during_a_lease_takeover_leaves_the_run_restorable_and_writable(
    tmp_path, drive_server
):
    from conftest import gdrive_remote

    remote = gdrive_remote(drive_server)
    staging = str(tmp_path / "staging")
    options = {"fake_drive": [drive_server.url, drive_server.access_token]}
    promised = run_until_killed(
        remote.url, staging, "die-holding-the-lease", options, steps=2, shapes=SMALL
    )
    assert promised == [1, 2]
    child: list = []
    killed: list[str] = []
    kill_from_drive(drive_server, drive_writes_the_lease, child, killed)
    try:
        promised = run_until_killed(
            remote.url, staging, "external", options, child.append, shapes=SMALL
        )
    finally:
        drive_server.clear_faults()
    assert killed, "the lease was never written"
    assert promised == [], (killed, promised)
    check_after_kill(remote, staging, tmp_path, 2, False, "lease-takeover")
