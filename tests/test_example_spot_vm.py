"""examples/spot_vm_training.py runs as a user runs it, and reports an exact resume after SIGTERM.

The example trains a custom loop under TensorFlow's PreemptionCheckpointHandler against a local
S3 server, sends it SIGTERM mid-run, restarts it in a new process on an empty staging directory,
and checks the restored step and values; it exits non-zero unless they are the saved ones, bit
for bit.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join("examples", "spot_vm_training.py")


def example_env() -> dict[str, str]:
    """The user's environment, minus what would point the example's local S3 elsewhere."""
    env = dict(os.environ)
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        env.pop(name, None)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def test_spot_vm_example_resumes_exactly_where_the_preemption_handler_saved():
    proc = subprocess.run(
        [sys.executable, EXAMPLE],
        cwd=REPO,
        env=example_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, output
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("example OK: "), output
    assert "bit for bit" in lines[-1], output
    # The platform really sent SIGTERM, VM 1 exited with TensorFlow's status after ckptstore
    # committed the handler's checkpoint, and VM 2 started from that step.
    assert any(line.startswith("*** SIGTERM") for line in lines), output
    assert "VM 1 exited with status 42" in proc.stdout, output
    name = re.search(r"preempted; committing (ckpt-\d+)", proc.stderr)
    assert name, output
    assert f"{name[1]} committed to" in proc.stderr, output
    saved = re.search(r"\[vm 1\] exiting at step (\d+)", proc.stdout)
    assert saved and f"[vm 2] starting at step {saved[1]} " in proc.stdout, output
