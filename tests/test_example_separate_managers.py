"""examples/separate_managers.py runs as a user runs it, and reports what each manager restored.

The example saves a model checkpoint and a training-state checkpoint on two managers at
different frequencies to a local S3 server, restores both in a new process on an empty staging
directory, and exits non-zero unless each holds exactly what its last save wrote.
"""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join("examples", "separate_managers.py")


def example_env() -> dict[str, str]:
    """The user's environment, minus what would point the example's local S3 elsewhere."""
    env = dict(os.environ)
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        env.pop(name, None)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def test_separate_managers_example_restores_each_checkpoint_from_its_last_save():
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
    # Run 2 restored from the remote, and every check it made passed.
    assert any(line.startswith("[run 2] restored s3://") for line in lines), output
    checks = [line for line in lines if line.startswith("[run 2]   ")]
    assert len(checks) >= 5, output
    assert all(line.endswith(": YES") for line in checks), output
