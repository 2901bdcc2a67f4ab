"""examples/saved_model_exports.py runs as a user runs it, and loads the newest export.

The example exports a Keras model after every epoch of fit() through
ckptstore.saved_model.Exporter (max_to_keep=3) to a local S3 server, loads the base
back and checks it serves the last epoch's model, and that a retired version no
longer loads; it exits non-zero if a check fails.
"""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join("examples", "saved_model_exports.py")


def test_saved_model_exports_example_loads_the_newest_committed_version(tmp_path):
    env = dict(os.environ)
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        env.pop(name, None)  # nothing may point the example's local S3 elsewhere
    env["CKPTSTORE_STAGING_DIR"] = str(tmp_path / "staging")
    proc = subprocess.run(
        [sys.executable, EXAMPLE],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, output
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == (
        "example OK: 5 epochs exported as versions 1..5 (newest 3 kept), "
        "load() of the base served version 5"
    ), output
    assert [line.rsplit("/", 1)[-1] for line in lines if line.startswith("committed ")] == [
        "1",
        "2",
        "3",
        "4",
        "5",
    ], output
    assert any(
        line.startswith("retired: ") and "/exports/2 no longer loads" in line for line in lines
    ), output
