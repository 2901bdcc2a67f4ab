"""A script that ends without close() still commits its last save, on every remote.

The seeds' scripts end right after their last ``save()``. The exit drain used to run
after Python had shut down the thread pools that s3fs/aiobotocore send requests
through, so on S3 it failed with "cannot schedule new futures after shutdown" and
the remote stayed empty, while ``file://`` worked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import file_remote, gcs_remote, gdrive_remote, s3_remote
from training import TrainState

CHILD = os.path.join(os.path.dirname(__file__), "exit_child.py")
EXIT_CODES = {"end": 0, "raise": 1, "exit": 3}


def remote_for(kind, request, tmp_path):
    if kind == "s3":
        spec = s3_remote(request.getfixturevalue("s3_server"))
        return spec, spec.storage_options
    if kind == "gcs":
        spec = gcs_remote(request.getfixturevalue("gcs_server"))
        return spec, spec.storage_options
    if kind == "gdrive":
        server = request.getfixturevalue("drive_server")
        spec = gdrive_remote(server)
        return spec, {"fake_drive": [server.url, server.access_token]}
    spec = file_remote(tmp_path)
    return spec, {}


@pytest.mark.parametrize("how", list(EXIT_CODES))
@pytest.mark.parametrize("kind", ["file", "s3", "gcs", "gdrive"])
def test_a_script_that_ends_without_close_commits_its_last_save(kind, how, request, tmp_path):
    spec, options = remote_for(kind, request, tmp_path)
    staging = str(tmp_path / "staging")
    out = subprocess.run(
        [sys.executable, CHILD, spec.url, staging, how, json.dumps(options)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "saved" in out.stdout, out.stderr[-3000:]
    assert out.returncode == EXIT_CODES[how], out.stderr[-3000:]
    assert spec.manifests() == ["ckpt-1"], out.stderr[-3000:]
    assert "ckpt-1 committed" in out.stderr or "finishing" in out.stderr, out.stderr[-3000:]
    # And what was committed is the save, bit for bit, on an empty machine.
    import ckptstore

    fresh = TrainState(shapes=((4096, 4096), (64,)))
    with ckptstore.CheckpointManager(
        fresh.checkpoint,
        spec.url,
        max_to_keep=2,
        staging_dir=str(tmp_path / "fresh"),
        storage_options=spec.storage_options,
        read_only=True,
    ) as m:
        fresh.checkpoint.restore(m.latest_checkpoint)
    assert fresh.matches_step(7)


PUBLISH_CHILD = os.path.join(os.path.dirname(__file__), "publish_exit_child.py")


@pytest.mark.parametrize("how", ["end", "raise"])
@pytest.mark.parametrize("kind", ["file", "s3"])
def test_a_script_that_ends_right_after_saving_a_model_file_commits_it(
    kind, how, request, tmp_path
):
    spec, options = remote_for(kind, request, tmp_path)
    out = subprocess.run(
        [sys.executable, PUBLISH_CHILD, spec.url + "/model.keras", how, json.dumps(options)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "saved" in out.stdout, out.stderr[-3000:]
    assert out.returncode == EXIT_CODES[how], out.stderr[-3000:]
    assert "finishing the upload" in out.stderr, out.stderr[-3000:]
    assert sorted(spec.names()) == ["model.keras", "model.keras.manifest.json"]
    manifest = json.loads(spec.read("model.keras.manifest.json"))
    assert manifest["files"][0]["size"] == 48 << 20
