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

log = logging.getLogger("ckptstore")
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How hard to try one storage operation before reporting it failed.

    The defaults ride out about a minute of outage (0.5 + 1 + 2 + 4 + 8 + 16 s,
    jittered) before a checkpoint's upload is reported failed at ``sync()``.
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
    ) -> T:
        """Run ``operation``; retry it while what it raises ``is_transient``."""
        delay = self.initial_delay
        for attempt in range(1, self.attempts + 1):
            try:
                return operation()
            except Exception as exc:
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
