"""examples/keras_fit_resume.py runs as a user runs it, and reports an exact resume.

The example runs a Keras ``fit()`` with ``ckptstore.keras.BackupAndRestore`` against a local S3
server, SIGKILLs it mid-epoch, runs the same call again in a new process on an empty staging
directory, and compares the final values with an uninterrupted ``fit()``'s; it exits non-zero
unless they are equal bit for bit and the backup is gone from the remote.
"""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join("examples", "keras_fit_resume.py")


def example_env() -> dict[str, str]:
    """The user's environment, minus what would point the example's local S3 elsewhere."""
    env = dict(os.environ)
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        env.pop(name, None)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def test_keras_fit_example_resumes_mid_epoch_after_a_kill_exactly():
    proc = subprocess.run(
        [sys.executable, EXAMPLE],
        cwd=REPO,
        env=example_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, output
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("example OK: "), output
    assert "bit for bit" in lines[-1] and "backup was deleted" in lines[-1], output
    # It really was killed, and the second process really resumed mid-epoch from the remote.
    assert any(line.startswith("*** SIGKILL") for line in lines), output
    resumed = [line for line in lines if line.startswith("[run 2] fit() starts at epoch")]
    assert resumed and "batch 0 " not in resumed[0], output
