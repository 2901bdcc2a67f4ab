"""examples/keras_best_checkpoints.py runs as a user runs it, and reports the best model kept.

The example fits with ckptstore.keras.ModelCheckpoint(save_best_only=True) against a local S3
server, loads the best model back (verified), restarts fit() with an untrained model and checks
the committed best survived; it exits non-zero if any check fails.
"""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join("examples", "keras_best_checkpoints.py")


def test_keras_best_checkpoints_example_keeps_the_best_model(tmp_path):
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
    assert lines[-1].startswith("example OK: best.keras is epoch "), output
    assert "kept by a restarted fit()" in lines[-1], output
    assert any(line.startswith("restarted fit(): val_loss ") for line in lines), output
