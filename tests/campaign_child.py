"""A training run for the randomized kill campaign (test_kill_campaign.py).

``python campaign_child.py REMOTE STAGING CHECKPOINTS OPTIONS SHAPES [KILL]``

Resumes from the newest checkpoint the manager offers (none on a new run), then
saves CHECKPOINTS more checkpoints with ``sync()`` after each, and says on stdout,
flushed, what it has been promised:

* ``start`` once the imports are done, right before the manager is created
  (the parent's kill timer runs from here);
* ``resumed N`` once checkpoint N is restored (``resumed 0``: nothing to resume);
* ``saved N`` as soon as ``save()`` of checkpoint N returned (staged locally);
* ``committed N`` as soon as the ``sync()`` after it returned;
* ``closed OPS SECONDS PUTS`` at the end of a run nobody killed: how many
  operations and uploads (puts) reached the ``file://`` remote, and how long the
  run took (the campaign's yardstick).

KILL, a JSON object, makes the process SIGKILL itself (saying where first):

* ``{"op": K, "midway": bool}`` (``file://`` only): at the K-th operation on the
  remote (faultfs counts opens, puts, renames and deletes): ``kill op K OP NAME``;
  with midway, a put or a write there gets half of its bytes, then the kill;
* ``{"put": K}`` (``file://`` only): half way through the K-th upload of a file
  (the first two are the first checkpoint's: issue 12 item 6): ``kill put K NAME``;
* ``{"save": J, "delay": S}``: S seconds after the J-th ``save()`` of this life
  returned, so inside its ``sync()``: ``kill sync N S``. Timed here, not by the
  parent, because a ``sync()`` can take a few milliseconds.

Otherwise the kill comes from outside (the parent's timer, the proxy in front of
S3 and GCS, the fake Drive server). ckptstore itself runs unchanged.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ckptstore
from faultfs import FAULTS, faulty_file_protocol
from kill_child import storage_options_from_json
from training import TrainState


def say(line: str) -> None:
    print(line, flush=True)


def kill_at_op(target: int, midway: bool) -> list[int]:
    """Die at the ``target``-th operation on the remote; returns the live operation count."""
    count = [0]
    lock = threading.Lock()
    chosen: set[str] = set()

    def at_op(op: str, path: str) -> bool:
        with lock:
            count[0] += 1
            if count[0] != target:
                return False
            say(f"kill op {count[0]} {op} {os.path.basename(path)}")
            if midway and (op == "put" or op == "open-wb"):
                chosen.add(path)  # faultfs writes half of it, then kills
                return False
            return True

    FAULTS.kill_when = at_op
    FAULTS.kill_mid_put = lambda path: path in chosen
    FAULTS.kill_mid_write = lambda path: path in chosen
    return count


def kill_in_put(target: int) -> None:
    """Write half of the ``target``-th uploaded file, then die."""
    count = [0]
    lock = threading.Lock()

    def at_put(path: str) -> bool:
        with lock:
            count[0] += 1
            if count[0] == target:
                say(f"kill put {target} {os.path.basename(path)}")
            return count[0] == target

    FAULTS.kill_mid_put = at_put


def kill_after(delay: float, what: str) -> None:
    def die() -> None:
        say(f"kill {what} {delay:.4f}")
        os.kill(os.getpid(), signal.SIGKILL)

    timer = threading.Timer(delay, die)
    timer.daemon = True
    timer.start()


def main() -> None:
    remote, staging, checkpoints, options, shapes = sys.argv[1:6]
    options = storage_options_from_json(options)
    shapes = tuple(tuple(s) for s in json.loads(shapes))
    kill = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}
    with faulty_file_protocol():
        if "op" in kill:
            ops = kill_at_op(kill["op"], kill["midway"])
        else:
            if "put" in kill:
                kill_in_put(kill["put"])
            ops = [0]
            FAULTS.kill_when = lambda op, path: ops.__setitem__(0, ops[0] + 1)
        state = TrainState(shapes=shapes)
        say("start")
        began = time.monotonic()
        manager = ckptstore.CheckpointManager(
            state.checkpoint, remote, max_to_keep=2, staging_dir=staging, storage_options=options
        )
        latest = manager.latest_checkpoint
        if latest is not None:
            state.checkpoint.restore(latest).assert_existing_objects_matched()
        resumed = int(state.step.numpy())
        say(f"resumed {resumed}")
        for step in range(resumed + 1, resumed + int(checkpoints) + 1):
            state.advance_to(step)
            manager.save()
            say(f"saved {step}")
            if kill.get("save") == step - resumed:
                kill_after(kill["delay"], f"sync {step}")
            manager.sync()
            say(f"committed {step}")
        manager.close()
        say(f"closed {ops[0]} {time.monotonic() - began:.3f} {len(FAULTS.puts)}")


if __name__ == "__main__":
    main()
