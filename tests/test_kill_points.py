"""SIGKILL at every instant of the data path leaves the remote restorable, bit for bit.

Each test runs a training process (kill_child.py) that is killed with SIGKILL
at one point of saving checkpoint 3, then checks, as a new machine would, that:
the newest committed checkpoint restores exactly; every committed manifest
matches its data; and a manager restarted on the dead run's staging directory
finishes the upload the kill interrupted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

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


def run_until_killed(remote_url: str, staging: str, point: str) -> list[int]:
    proc = subprocess.run(
        [sys.executable, CHILD, remote_url, staging, point, "3", "6"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])
    return [
        int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("committed")
    ]


def assert_every_manifest_matches_its_data(remote) -> None:
    import json

    for name in remote.manifests():
        doc = json.loads(remote.read(name + ".manifest.json"))
        for f in doc["files"]:
            data = remote.read(f["name"])
            assert len(data) == f["size"], f["name"]
            assert f"{crc32c.crc32c(data):08x}" == f["crc32c"], f["name"]


def restore_on_new_machine(remote, staging) -> tuple[TrainState, str]:
    fresh = TrainState(shapes=((1024, 1024, 8), (64,)))
    with ckptstore.CheckpointManager(
        fresh.checkpoint, remote.url, max_to_keep=2, staging_dir=str(staging)
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
