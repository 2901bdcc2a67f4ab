"""examples/two_workers.py runs as a user runs it: two workers, one uploader, one restore point.

The example starts two MultiWorkerMirroredStrategy workers on 127.0.0.1 against a local S3
server, SIGKILLs both mid-run, starts both again on empty staging directories, and exits
non-zero unless only the chief uploaded and both restored the same committed checkpoint with
the chief's weights.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join("examples", "two_workers.py")


def example_env() -> dict[str, str]:
    """The user's environment, minus what would point the example's local S3 elsewhere."""
    env = dict(os.environ)
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        env.pop(name, None)
    env.pop("TF_CONFIG", None)  # the example gives each worker its own
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def test_two_workers_example_uploads_from_the_chief_only_and_both_restore_the_same_commit():
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
    # Both were killed, and both workers of run 2 restored the same checkpoint and weights.
    assert any(line.startswith("*** SIGKILL") for line in lines), output
    restored = {
        m.group(2)
        for m in (re.match(r"\[run 2 worker (\d)\] (restored .*)", line) for line in lines)
        if m
    }
    assert len(restored) == 1 and sum("] restored ckpt-" in x for x in lines) == 2, output
    checks = [line for line in lines if line.startswith("  ") and line.endswith((": YES", ": NO"))]
    assert len(checks) >= 7 and all(line.endswith(": YES") for line in checks), output
