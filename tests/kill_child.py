"""A training run that SIGKILLs itself at a chosen instant of the data path.

Run by test_kill_points.py as
``python kill_child.py REMOTE STAGING POINT N STEPS [OPTIONS [SHAPES]]``.
The kill comes from the storage (faultfs), from a watcher of the staging
directory, or (POINT ``external``) from the test's side of the HTTP link (the
proxy in front of S3 and GCS, the fake Drive server), which kills this process
when it sees the chosen request; ckptstore itself runs
unchanged. OPTIONS is a JSON object of storage_options, SHAPES a JSON list of the
state's variable shapes (training.py; 32 MiB by default). The run resumes from the
remote's newest checkpoint, if there is one, and trains up to step STEPS. Prints
``committed K`` after each step whose sync() returned, so the parent knows what
was promised durable.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import types

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ckptstore
from faultfs import FAULTS, faulty_file_protocol
from training import TrainState

DATA = ".data-00000-of-00001"
MANIFEST = ".manifest.json"
STATE_FILE = "checkpoint"
LEASE = "ckptstore.lease.json"


def watch_for_partial_write(staging: str, checkpoint: str) -> None:
    """Kill the process while TensorFlow is still writing ``checkpoint`` locally."""
    temp = os.path.join(staging, checkpoint + "_temp")

    def watch() -> None:
        while True:
            if os.path.isdir(temp):
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.0005)

    threading.Thread(target=watch, daemon=True).start()


def storage_options_from_json(text: str) -> dict:
    """storage_options as the parent sent them (``fake_drive``: build the GoogleAuth here)."""
    options = json.loads(text)
    if "fake_drive" in options:  # a GoogleAuth can't travel as JSON
        from servers.fake_drive import make_google_auth

        url, token = options.pop("fake_drive")
        options["google_auth"] = make_google_auth(
            types.SimpleNamespace(url=url, access_token=token)
        )
    return options


def main() -> None:
    remote, staging, point, n, steps = sys.argv[1:6]
    options = storage_options_from_json(sys.argv[6] if len(sys.argv) > 6 else "{}")
    # Big enough by default that TensorFlow's local write takes a while (the watcher needs it).
    shapes = json.loads(sys.argv[7]) if len(sys.argv) > 7 else [[1024, 1024, 8], [64]]
    shapes = tuple(tuple(shape) for shape in shapes)
    n, steps = int(n), int(steps)
    target = f"ckpt-{n}"
    root = remote[len("file://") :] if remote.startswith("file://") else None
    with faulty_file_protocol():
        if point == "local-write":
            watch_for_partial_write(staging, target)
        elif point == "mid-upload":
            FAULTS.kill_mid_put = lambda path: os.path.basename(path) == target + DATA
        elif point == "between-data-and-manifest":
            # Verification reads the uploaded data back: every byte is up, no manifest yet.
            FAULTS.kill_when = lambda op, path: op == "open-rb" and path.endswith(target + DATA)
        elif point == "during-retention":
            # ckpt-N is retired once ckpt-(N+2) commits (max_to_keep=2): die mid-delete.
            FAULTS.kill_when = lambda op, path: op == "rm" and path.endswith(target + DATA)
        elif point == "at-commit":
            # The manifest (the commit itself) is half written when the process dies.
            FAULTS.kill_mid_write = lambda path: os.path.basename(path).startswith(
                target + MANIFEST
            )
        elif point == "between-manifest-and-state-file":
            # ckpt-N's manifest is in place; the state file's rewrite is starting.
            FAULTS.kill_when = lambda op, path: (
                op == "open-wb"
                and os.path.basename(path).startswith(STATE_FILE)
                and os.path.exists(os.path.join(root, target + MANIFEST))
            )
        elif point == "lease-takeover":
            # This process takes the run over from a dead writer: die mid-write of the lease.
            FAULTS.kill_mid_write = lambda path: (
                os.path.basename(path).startswith(LEASE) and not path.endswith(".lock")
            )
        elif point not in ("external", "die-holding-the-lease"):
            raise SystemExit(f"unknown kill point {point}")
        state = TrainState(shapes=shapes)
        manager = ckptstore.CheckpointManager(
            state.checkpoint, remote, max_to_keep=2, staging_dir=staging, storage_options=options
        )
        latest = manager.latest_checkpoint
        if latest is not None:
            state.checkpoint.restore(latest).assert_existing_objects_matched()
        for step in range(int(state.step.numpy()) + 1, steps + 1):
            state.advance_to(step)
            manager.save()
            manager.sync()
            print(f"committed {step}", flush=True)
        if point == "die-holding-the-lease":
            os.kill(os.getpid(), signal.SIGKILL)  # idle, every step committed, lease still held
        manager.close()


if __name__ == "__main__":
    main()
