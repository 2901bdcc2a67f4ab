"""SIGKILL at every instant of the data path leaves the remote restorable, bit for bit.

Each test runs a training process (kill_child.py) that is killed with SIGKILL
at one point of saving checkpoint 3, then checks, as a new machine would, that:
the newest committed checkpoint restores exactly; every committed manifest
matches its data; and a manager restarted on the dead run's staging directory
finishes the upload the kill interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.parse

import crc32c
import pytest

import ckptstore
from conftest import file_remote
from training import TrainState

CHILD = os.path.join(os.path.dirname(__file__), "kill_child.py")

# kill point -> (last step whose sync() returned, newest committed checkpoint, ckpt-3 left staged)
# During retention the newest is one past what sync() promised: ckpt-5 commits, then retiring
# ckpt-3 (inside the same sync) is where the kill lands.
POINTS = {
    "local-write": (2, 2, False),
    "mid-upload": (2, 2, True),
    "between-data-and-manifest": (2, 2, True),
    "during-retention": (4, 5, False),
}


def run_until_killed(remote_url, staging, point, options=None, on_start=None) -> list[int]:
    """Run the child until it is killed; return the steps whose sync() it reported."""
    args = [sys.executable, CHILD, remote_url, staging, point, "3", "6", json.dumps(options or {})]
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


def restore_on_new_machine(remote, staging) -> tuple[TrainState, str]:
    fresh = TrainState(shapes=((1024, 1024, 8), (64,)))
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
    promised = run_until_killed(remote.url, staging, point)
    assert promised == list(range(1, last_synced + 1)), "the kill landed somewhere unexpected"

    check_after_kill(remote, staging, tmp_path, newest, left_staged)


def check_after_kill(remote, staging, tmp_path, newest, left_staged):
    assert_every_manifest_matches_its_data(remote)
    fresh, prefix = restore_on_new_machine(remote, tmp_path / "new-machine")
    assert os.path.basename(prefix) == f"ckpt-{newest}"
    assert fresh.matches_step(newest)

    # The dead run's staging directory still holds what it could not upload ...
    if left_staged:
        assert os.path.exists(os.path.join(staging, "ckpt-3.index"))
        assert "ckpt-3" not in remote.manifests()
    # ... and a manager restarted on it finishes the job.
    resumed, prefix = restore_on_new_machine(remote, staging)
    expected = 3 if left_staged else newest
    assert os.path.basename(prefix) == f"ckpt-{expected}"
    assert resumed.matches_step(expected)
    assert_every_manifest_matches_its_data(remote)
    if left_staged:
        assert "ckpt-3" in remote.manifests()
    # No partial write, unmanaged staged copy or remote orphan survives the restart.
    assert not [n for n in os.listdir(staging) if n.endswith("_temp")]
    staged = sorted(n for n in os.listdir(staging) if n.endswith(".index"))
    assert staged == [f"ckpt-{i}.index" for i in (expected - 1, expected)]
    committed = set(remote.manifests())
    for n in remote.names():
        if n.endswith(".index") or ".data-" in n:
            assert n.split(".")[0] in committed, f"orphan {n} left on the remote"


# Over HTTP the kill comes from the proxy: when the child sends the chosen request,
# the proxy kills it and resets that request, so the server never sees it.
CLOUD_POINTS = {
    "mid-upload": (
        lambda method, target: method in ("PUT", "POST") and "ckpt-3.data" in target,
        POINTS["mid-upload"],
    ),
    "between-data-and-manifest": (
        lambda method, target: method in ("HEAD", "GET") and "ckpt-3.data" in target,
        POINTS["between-data-and-manifest"],
    ),
    "during-retention": (
        lambda method, target: method == "DELETE" and "ckpt-3.data" in target,
        POINTS["during-retention"],
    ),
}


@pytest.mark.parametrize("point", list(CLOUD_POINTS))
@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_kill_over_http_leaves_the_last_committed_checkpoint_restorable(
    kind, point, tmp_path, request
):
    from conftest import gcs_remote, s3_remote
    from servers.faultproxy import FaultProxy

    server = request.getfixturevalue(f"{kind}_server")
    matches, (last_synced, newest, left_staged) = CLOUD_POINTS[point]
    child: list = []
    killed: list[str] = []

    def kill_on_match(method, target, headers):
        if not killed and child and matches(method, urllib.parse.unquote(target)):
            os.kill(child[0].pid, signal.SIGKILL)
            killed.append(f"{method} {target}")
            proxy.inject_next("reset")  # and this request never reaches the server
            return True
        return False

    proxy = FaultProxy("127.0.0.1", server.port, fault_filter=kill_on_match)
    proxy.start()
    try:
        through_proxy = (s3_remote if kind == "s3" else gcs_remote)(server, proxy.endpoint_url)
        staging = str(tmp_path / "staging")
        promised = run_until_killed(
            through_proxy.url, staging, "external", through_proxy.storage_options, child.append
        )
    finally:
        proxy.stop()
    assert killed, "the chosen request was never sent"
    assert promised == list(range(1, last_synced + 1)), (killed, promised)
    direct = (s3_remote if kind == "s3" else gcs_remote)(server)
    direct.url, direct.root = through_proxy.url, through_proxy.root
    check_after_kill(direct, staging, tmp_path, newest, left_staged)


# On Drive the fake server kills the child: Drive URLs carry file ids, not names,
# and the fake knows which title each request is about.
DRIVE_DATA = "ckpt-3.data-00000-of-00001"
DRIVE_POINTS = {
    "mid-upload": (
        lambda rec: rec.method == "PUT" and rec.title == DRIVE_DATA,
        POINTS["mid-upload"],
    ),
    # The first lookup of the data file's title comes after its upload finished.
    "between-data-and-manifest": (
        lambda rec: rec.method == "GET" and f"title='{DRIVE_DATA}'" in rec.query.get("q", ""),
        POINTS["between-data-and-manifest"],
    ),
    "during-retention": (
        lambda rec: (
            rec.title == DRIVE_DATA and (rec.method == "DELETE" or rec.path.endswith("/trash"))
        ),
        POINTS["during-retention"],
    ),
}


@pytest.mark.parametrize("point", list(DRIVE_POINTS))
def test_kill_on_drive_leaves_the_last_committed_checkpoint_restorable(
    point, tmp_path, drive_server
):
    from conftest import gdrive_remote

    matches, (last_synced, newest, left_staged) = DRIVE_POINTS[point]
    remote = gdrive_remote(drive_server)
    child: list = []
    killed: list[str] = []

    def kill_on_match(rec) -> bool:
        if killed or not child or not matches(rec):
            return False
        os.kill(child[0].pid, signal.SIGKILL)
        killed.append(f"{rec.method} {rec.path} {rec.title}")
        return True  # answered with an error the dead child never reads: nothing is stored

    drive_server.fail_next(1, "backendError", predicate=kill_on_match)
    options = {"fake_drive": [drive_server.url, drive_server.access_token]}
    try:
        promised = run_until_killed(
            remote.url, str(tmp_path / "staging"), "external", options, child.append
        )
    finally:
        drive_server.clear_faults()
    assert killed, "the chosen request was never sent"
    assert promised == list(range(1, last_synced + 1)), (killed, promised)
    check_after_kill(remote, str(tmp_path / "staging"), tmp_path, newest, left_staged)
