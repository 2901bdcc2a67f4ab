"""TensorFlow's ``PreemptionCheckpointHandler`` drives the manager: its final save must land.

After a SIGTERM the handler saves at the next step boundary, inside
TensorFlow's preemption save context, and then calls its ``exit_fn``
(``sys.exit`` with a restart code by default). A save that only queued its
upload would then race the process's end. So a save made in that context
waits for its commit before it returns, bounded by the grace period the
handler's ``TerminationConfig`` gives, and says clearly when the upload cannot
make it: the previous commit then stays the restorable one, and the new
checkpoint stays staged for the next process on this machine.

The handler does not pass its grace period to the manager. It is read from
the handler itself, found on the call stack (its ``_save_checkpoint`` calls
``save()``): private attributes of TensorFlow 2.16-2.21, read defensively, so
a TensorFlow that renames them only loses the bound (the wait is then as long
as the upload takes, and the platform's own kill ends it).

Code that handles the signal itself (``ckptstore.keras.BackupAndRestore`` with
``save_before_preemption=True``) makes its save inside :func:`preemption_save`,
which gives the same wait and names the deadline outright.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator

_declared = threading.local()  # the deadline a preemption_save() in this thread names


@contextlib.contextmanager
def preemption_save(deadline: float | None = None) -> Iterator[None]:
    """Saves inside are preemption saves, as under TensorFlow's handler: each waits for its commit.

    Enters TensorFlow's own preemption save context (what the handler does around
    its save). ``deadline`` (``time.time()``) bounds the wait, as a handler's grace
    period does; ``None``: as long as the upload takes.
    """
    from tensorflow.python.checkpoint import checkpoint_context

    outer = getattr(_declared, "deadline", None)
    _declared.deadline = deadline
    try:
        with checkpoint_context.preemption_save_context():
            yield
    finally:
        _declared.deadline = outer


def in_preemption_save() -> bool:
    """Whether the current ``save()`` is the one TensorFlow's preemption handler makes."""
    try:
        from tensorflow.python.checkpoint import checkpoint_context
    except ImportError:  # pragma: no cover - TensorFlow moved it
        return False
    return bool(checkpoint_context.in_preemption_save_context())


def _handler_on_stack() -> object | None:
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if type(candidate).__name__ == "PreemptionCheckpointHandler":
            return candidate
        frame = frame.f_back
    return None


def grace_deadline() -> float | None:
    """``time.time()`` by which the process must have exited, or ``None`` if not known.

    Known on the worker that received the signal, when the handler's
    ``TerminationConfig`` has a grace period: signal time + grace period; or named
    by :func:`preemption_save`.
    """
    declared = getattr(_declared, "deadline", None)
    if declared is not None:
        return float(declared)
    handler = _handler_on_stack()
    if handler is None:
        return None
    grace = getattr(handler, "_grace_period", 0) or 0
    received = getattr(handler, "_received_own_sigterm_time", None)
    if grace <= 0 or not isinstance(received, (int, float)):
        return None
    return float(received) + float(grace)


def seconds_left(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (never negative); ``None`` stays ``None``."""
    return None if deadline is None else max(0.0, deadline - time.time())
