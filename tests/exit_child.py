"""A training script that saves once and ends WITHOUT close(), the way the seeds' scripts end.

Run by test_exit_drain.py as ``python exit_child.py URL STAGING HOW OPTIONS``, where HOW is
``end`` (falls off the end), ``raise`` (an uncaught exception) or ``exit`` (``sys.exit(3)``).
The interpreter's exit must still finish the upload of the last save.
"""

from __future__ import annotations

import json
import os
import sys
import types

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Sets gcsfs's environment before gcsfs loads: first.
import servers.gcs  # noqa: F401

# isort: split
import ckptstore
from training import TrainState


def main() -> None:
    url, staging, how = sys.argv[1:4]
    options = json.loads(sys.argv[4])
    if "fake_drive" in options:  # a GoogleAuth can't travel as JSON: build it here
        from servers.fake_drive import make_google_auth

        drive_url, token = options.pop("fake_drive")
        options["google_auth"] = make_google_auth(
            types.SimpleNamespace(url=drive_url, access_token=token)
        )
    # 64 MB of float32: big enough that the upload is still running when the script ends.
    state = TrainState(shapes=((4096, 4096), (64,)))
    manager = ckptstore.CheckpointManager(
        state.checkpoint, url, max_to_keep=2, staging_dir=staging, storage_options=options
    )
    state.advance_to(7)
    manager.save()  # no sync(), no close()
    print("saved", flush=True)
    if how == "raise":
        raise RuntimeError("the training script crashed after its last save")
    if how == "exit":
        sys.exit(3)


if __name__ == "__main__":
    main()
