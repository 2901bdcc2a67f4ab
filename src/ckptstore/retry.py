"""Retrying transient storage errors with capped exponential backoff and jitter.

What counts as transient is decided in one place per backend
(:meth:`Backend.is_transient`, built on its ``transient_errors`` tuple as in
s3fs), not by a try/except at every call site.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
from collections.abc import Callable
from typing import TypeVar

from ckptstore import ioloop

log = logging.getLogger("ckptstore")
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How hard to try one storage operation before reporting it failed.

    The defaults try 7 times, pausing 0.5 + 1 + 2 + 4 + 8 + 16 s between attempts
    (each jittered down to as little as half: 16 to 32 s in all) before a checkpoint's
    upload is reported failed at ``sync()``. Each attempt also includes the client
    library's own retries, which can take far longer than the pauses (a refused port:
    about 10 s per attempt with s3fs, 35 to 50 s with gcsfs).
    """

    attempts: int = 7
    initial_delay: float = 0.5
    max_delay: float = 16.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")

    def call(
        self,
        operation: Callable[[], T],
        *,
        is_transient: Callable[[BaseException], bool],
        what: str,
        stop: threading.Event | None = None,
        scrub: Callable[[str], str] = str,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> T:
        """Run ``operation``; retry it while what it raises ``is_transient``.

        ``on_failure`` is told of every failed attempt (to report the last one elsewhere).
        """
        delay = self.initial_delay
        for attempt in range(1, self.attempts + 1):
            try:
                with ioloop.ours():  # its requests' leftover tasks are ckptstore's (ioloop.py)
                    return operation()
            except Exception as exc:
                if on_failure is not None:
                    on_failure(exc)
                if attempt == self.attempts or not is_transient(exc):
                    raise
                pause = min(delay, self.max_delay) * random.uniform(0.5, 1.0)
                log.info(
                    "%s failed (%s); retry %d/%d in %.1fs",
                    what,
                    scrub(f"{type(exc).__name__}: {exc}"),
                    attempt,
                    self.attempts - 1,
                    pause,
                )
                if stop is not None and stop.wait(pause):
                    raise
                if stop is None:
                    threading.Event().wait(pause)
                delay *= 2
        raise AssertionError("unreachable")
