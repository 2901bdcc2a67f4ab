"""A script that saves one artifact in the background and ends at once, without waiting.

Run by test_exit_drain.py as ``python publish_exit_child.py URL HOW OPTIONS`` (HOW as in
exit_child.py). A SavedModel export or a Keras file handed to the publisher must still be
committed: the exit drain waits for it, as it does for checkpoints.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from ckptstore import manifest as mf
from ckptstore import publisher, targets


def main() -> None:
    url, how = sys.argv[1:3]
    options = json.loads(sys.argv[3])
    remote, redactor, name = targets.open_file(url, options)
    local = tempfile.mkdtemp()
    with open(os.path.join(local, name), "wb") as f:
        f.write(b"\x07" * (48 << 20))  # big enough that the upload is running at the end
    publisher.submit(
        publisher.PublishJob(remote, redactor, name, mf.KERAS, local, [name])
    )  # no wait()
    print("saved", flush=True)
    if how == "raise":
        raise RuntimeError("the script crashed after its last save")
    if how == "exit":
        sys.exit(3)


if __name__ == "__main__":
    main()
