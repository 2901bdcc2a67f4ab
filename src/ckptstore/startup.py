"""The start-up read: bounded in time, and never silent while it waits.

A manager opened on a remote reads what it holds (its checkpoints, its writer
lease) before it returns, because starting without knowing would mean silently
training from scratch. When the endpoint is down, that read can take minutes:
the client library retries on its own inside each of ckptstore's attempts
(measured against a refused port: about 75 s for s3fs, about 260 s for gcsfs,
with no word said). :class:`StartupBudget` runs each read in a daemon thread
and, from the main thread, with a timer rather than a hook in any client:

* after :data:`WARN_AFTER` seconds without an answer, logs one WARNING naming
  the URL (credentials removed), what is being read, and how long it will keep
  trying;
* once ``startup_timeout`` has passed since the first read began, raises
  :class:`~ckptstore.RemoteUnavailableError` naming the URL, what did not
  finish, and the fix. The read still running in the client is left to finish
  in its daemon thread; :attr:`StartupBudget.expired` is set so that
  ckptstore's own retry loops stop at their next pause.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from ckptstore.errors import ConfigurationError, RemoteUnavailableError

log = logging.getLogger("ckptstore")
T = TypeVar("T")

#: Seconds without an answer before the start-up read says what it is waiting for.
WARN_AFTER = 5.0


class StartupBudget:
    """One manager's start-up reads: one deadline and at most one warning for all of them.

    ``seconds=None`` sets no deadline (the retry policy alone bounds the reads);
    the warning still comes.
    """

    def __init__(
        self,
        url: str,
        seconds: float | None,
        *,
        describe: Callable[[BaseException], str] = repr,
    ):
        if seconds is not None and not seconds > 0:
            raise ConfigurationError(f"startup_timeout must be positive or None, got {seconds!r}")
        self.url = url  # credential-free, for messages
        self.seconds = seconds
        self._describe = describe  # credential-free description of an exception
        self._last_failure: str | None = None
        #: set once the deadline passed: retry loops given it as ``stop`` end at their next pause
        self.expired = threading.Event()
        self._started: float | None = None
        self._warned = False

    def failed(self, exc: BaseException) -> None:
        """Record a failed attempt (a retry loop's ``on_failure``): the messages name the last."""
        self._last_failure = self._describe(exc)

    def run(self, what: str, operation: Callable[[], T]) -> T:
        """Return ``operation()``, or raise RemoteUnavailableError once the budget is spent.

        ``what`` says what the operation reads, as a phrase ("listing it and reading its
        manifests"). Whatever ``operation`` raises is raised here.
        """
        if self._started is None:
            self._started = time.monotonic()
        outcome: list = []
        done = threading.Event()

        def target() -> None:
            try:
                outcome.append((True, operation()))
            except BaseException as exc:  # handed to the caller below
                outcome.append((False, exc))
            finally:
                done.set()

        threading.Thread(target=target, name="ckptstore-startup-read", daemon=True).start()
        warn_at = self._started + (
            WARN_AFTER if self.seconds is None else min(WARN_AFTER, self.seconds / 2)
        )
        deadline = None if self.seconds is None else self._started + self.seconds
        if not self._warned and not done.wait(max(0.0, warn_at - time.monotonic())):
            self._warned = True
            self._warn(what)
        if not done.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
            self.expired.set()
            raise RemoteUnavailableError(
                f"Cannot read {self.url}: {what} did not finish within {self.seconds:g} s "
                f"(startup_timeout={self.seconds:g}){self._last_failure_text()}. ckptstore "
                "will not start without knowing what the remote holds. Check the URL, that "
                "the endpoint is up and reachable from this machine, and the credentials; if "
                "the remote is only slow, pass a larger startup_timeout= (None waits as long "
                "as the retries take)."
            )
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    def _warn(self, what: str) -> None:
        waited = time.monotonic() - (self._started or 0.0)
        if self.seconds is None:
            until = "for as long as the retries take (startup_timeout=None)"
        else:
            until = (
                f"for up to {max(0.0, self.seconds - waited):.0f} s more "
                f"(startup_timeout={self.seconds:g}), then the manager raises "
                "RemoteUnavailableError"
            )
        log.warning(
            "ckptstore: no answer yet from %s after %.0f s (%s%s); the client keeps retrying, "
            "%s. Is the endpoint up and reachable from this machine?",
            self.url,
            waited,
            what,
            self._last_failure_text(),
            until,
        )

    def _last_failure_text(self) -> str:
        return "" if self._last_failure is None else f"; last attempt: {self._last_failure}"
