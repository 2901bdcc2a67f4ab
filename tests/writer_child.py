"""A second process writing a run, driven line by line by a test (test_ownership.py).

Run as ``python writer_child.py REMOTE STAGING OPTIONS MANAGER_KWARGS``: OPTIONS is
a JSON object of storage_options (as kill_child.py takes them), MANAGER_KWARGS one
of extra keyword arguments for ``ckptstore.CheckpointManager`` (``lease_seconds``,
``takeover``, ...). It prints ``ready <pid>``, then answers each command read from
stdin with one line:

* ``save N``: the state takes step N's values, ``save(checkpoint_number=N)``: ``saved N``
* ``sync``: ``synced``
* ``close``: ``closed``
* ``writer?``: ``writer True`` or ``writer False`` (``manager.is_writer``)

A command that raises answers ``raised <ExceptionClass>: <message on one line>``, so
the test can assert what ckptstore said. End of input ends the process (without
closing the manager: a process that just stops, as a killed one would).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ckptstore
from kill_child import storage_options_from_json
from training import TrainState


def main() -> None:
    remote, staging, options, kwargs = sys.argv[1:5]
    state = TrainState()
    manager = ckptstore.CheckpointManager(
        state.checkpoint,
        remote,
        staging_dir=staging,
        storage_options=storage_options_from_json(options),
        **{"max_to_keep": 10, **json.loads(kwargs)},
    )
    print(f"ready {os.getpid()}", flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        try:
            if command == "save":
                state.advance_to(int(args[0]))
                manager.save(checkpoint_number=int(args[0]))
                answer = f"saved {args[0]}"
            elif command == "sync":
                manager.sync()
                answer = "synced"
            elif command == "close":
                manager.close()
                answer = "closed"
            elif command == "writer?":
                answer = f"writer {manager.is_writer}"
            else:
                answer = f"unknown command {command}"
        except Exception as exc:
            answer = f"raised {type(exc).__name__}: " + " ".join(str(exc).split())
        print(answer, flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
