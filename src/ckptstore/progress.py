"""How far a transfer has got: fsspec callbacks in, a rate, a log line and an optional bar out.

Backends report bytes through fsspec's own :class:`~fsspec.callbacks.Callback`,
one callback per file (``put_file(..., callback=...)``), with relative or
absolute updates; a retried attempt starts over from zero. A
:class:`Transfer` is the account of one whole transfer (a checkpoint's files,
a ``ckptstore pull``), fed by a :class:`FileProgress` per file, and passes what
it learns on to:

* a bar: any fsspec callback, in practice fsspec's
  :class:`~fsspec.callbacks.TqdmCallback` (:func:`tqdm_bar`); ckptstore draws no
  bar of its own;
* ckptstore's log, at INFO, at most once per ``log_every`` seconds (also while
  a stalled transfer sends nothing) and once at the end of a long one, so a
  training log shows where a long upload stands without a line per chunk, and a
  quick upload logs no progress line at all;
* a :class:`RateMeter`, for ``manager.status()``.

Bars in the library are opt-in, for the whole process::

    ckptstore.progress_bar()        # every upload from here on shows a bar
    ckptstore.progress_bar(False)   # and no more
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from fsspec.callbacks import Callback

log = logging.getLogger("ckptstore")

#: seconds between two INFO lines about one transfer (read when a transfer starts)
LOG_EVERY = 30.0

_bars_enabled = False
#: ``Transfer(log_every=...)`` left out: :data:`LOG_EVERY` as it is when the transfer starts
_DEFAULT: Any = object()


def progress_bar(enabled: bool = True) -> None:
    """Show a progress bar (tqdm, through fsspec's ``TqdmCallback``) for every upload.

    Off by default: a training log is no place for bars unless asked for. In a
    notebook, ``tqdm.auto`` draws a widget. Applies to checkpoints, SavedModels
    and Keras files alike, from the next upload on. Needs ``tqdm`` (a dependency
    of ckptstore).

    Example::

        import ckptstore
        ckptstore.progress_bar()
    """
    global _bars_enabled
    _bars_enabled = bool(enabled)


def bars_enabled() -> bool:
    """Whether :func:`progress_bar` turned bars on (uploads check it as they start)."""
    return _bars_enabled


def tqdm_bar(desc: str, total: int, *, auto: bool = True, leave: bool = True) -> Callback:
    """fsspec's ``TqdmCallback`` set up for bytes: ``desc``, ``total`` bytes, on stderr.

    ``auto`` picks ``tqdm.auto`` (a widget in Jupyter, text elsewhere).
    """
    from fsspec.callbacks import TqdmCallback

    if auto:
        from tqdm.auto import tqdm as tqdm_cls
    else:
        from tqdm import tqdm as tqdm_cls
    bar = TqdmCallback(
        tqdm_kwargs={
            "desc": desc,
            "unit": "B",
            "unit_scale": True,
            "unit_divisor": 1000,  # decimal, as size_text and object stores count
            "file": sys.stderr,
            "leave": leave,
            "dynamic_ncols": True,
        },
        tqdm_cls=tqdm_cls,
    )
    bar.set_size(total)
    return bar


class RateMeter:
    """Bytes per second over the last ``window`` seconds, up to now.

    A stalled transfer's rate falls as time passes without bytes, and is
    ``None`` once nothing moved for a whole window (or before anything moved).

    Example::

        meter = RateMeter()
        meter.mark()          # a transfer starts: its first bytes count from now
        meter.add(4096)
        meter.rate()          # bytes/s since the mark, or None when nothing moved lately
    """

    def __init__(self, window: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self._window = window
        self._clock = clock
        # (time, total so far); the oldest kept is the last one at or before the window
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._total = 0
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        """Every byte added since the meter was made."""
        with self._lock:
            return self._total

    def mark(self) -> None:
        """A transfer starts: the rate counts from now (its first report included)."""
        with self._lock:
            self._samples.clear()
            self._samples.append((self._clock(), self._total))

    def add(self, n: int) -> None:
        with self._lock:
            self._total += n
            now = self._clock()
            self._samples.append((now, self._total))
            self._prune(now)

    def _prune(self, now: float) -> None:
        while len(self._samples) > 1 and now - self._samples[1][0] >= self._window:
            self._samples.popleft()

    def rate(self) -> float | None:
        """Recent bytes per second; ``None`` when nothing moved in the last window."""
        with self._lock:
            now = self._clock()
            self._prune(now)
            if not self._samples:
                return None
            t0, b0 = self._samples[0]
            t_last, _ = self._samples[-1]
            moved = self._total - b0
            if moved <= 0 or now - t_last >= self._window or now <= t0:
                return None
            return moved / min(now - t0, self._window)


class Transfer:
    """The account of one transfer of ``total`` bytes; thread-safe.

    Give each file's upload or download ``transfer.file()`` as its fsspec
    callback, and call :meth:`finish` when done (or failed). A backend that
    reports nothing while it sends (fsspec's local filesystem) is accounted a
    whole file at a time: :meth:`file_done` tops the file's count up.

    Example::

        transfer = Transfer("Uploading ckpt-7 to s3://b/run", total_bytes)
        fs.put_file(local, remote, callback=transfer.file())
        transfer.file_done(os.path.getsize(local))
        transfer.finish()
    """

    def __init__(
        self,
        what: str,
        total: int,
        *,
        bar: Callback | None = None,
        log_every: float | None = _DEFAULT,
        meter: RateMeter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.what = what
        self.total = total
        self.done = 0
        self._bar = bar
        self._log_every = LOG_EVERY if log_every is _DEFAULT else log_every
        self._meter = meter if meter is not None else RateMeter(clock=clock)
        self._meter.mark()
        self._clock = clock
        self._started = clock()
        self._last_log = self._started
        self._lock = threading.Lock()
        self._finished = False
        # The callback each thread made last: file_done() in that thread tops it up
        # (artifact.upload_verified uploads and verifies one file per thread).
        self._local = threading.local()
        if self._log_every is not None:
            _TICKER.add(self)

    @property
    def left(self) -> int:
        """Bytes not sent yet (0 once everything was sent, retried attempts included)."""
        with self._lock:
            return max(self.total - self.done, 0)

    def file(self) -> FileProgress:
        """A fresh fsspec callback for one file of this transfer."""
        callback = FileProgress(self.add)
        self._local.file = callback
        return callback

    def file_done(self, size: int) -> None:
        """The file whose callback this thread made last is stored whole (``size`` bytes).

        Whatever its backend did not report is counted now.
        """
        callback = getattr(self._local, "file", None)
        if callback is None:
            return
        self._local.file = None
        if callback.value < size:
            callback.relative_update(size - callback.value)

    def add(self, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            self.done += n
            self._meter.add(n)
            if self._bar is not None:
                self._bar.relative_update(min(n, max(self.total - self._bar.value, 0)))
        self.tick()

    def tick(self) -> None:
        """Log where the transfer stands, if the last line is ``log_every`` seconds old."""
        with self._lock:
            if self._finished or self._log_every is None:
                return
            now = self._clock()
            due = now - self._last_log >= self._log_every
            if due:
                self._last_log = now
        if due:
            log.info("%s", self.describe())

    @property
    def rate(self) -> float | None:
        return self._meter.rate()

    def describe(self) -> str:
        """``"Uploading ckpt-7 to s3://b/run: 120.0 MB of 268.4 MB (45%), 38.2 MB/s"``."""
        done = min(self.done, self.total)
        share = f" ({100 * done // self.total}%)" if self.total else ""
        rate = self.rate
        speed = f", {size_text(rate)}/s" if rate else ""
        return f"{self.what}: {size_text(done)} of {size_text(self.total)}{share}{speed}"

    def finish(self, *, ok: bool = True) -> None:
        """Close the bar; log the average rate of a long transfer that succeeded."""
        _TICKER.remove(self)
        with self._lock:
            if self._finished:
                return
            self._finished = True
            if self._bar is not None:
                self._bar.close()
            elapsed = self._clock() - self._started
        if ok and self._log_every is not None and elapsed >= self._log_every:
            average = size_text(self.total / elapsed) if elapsed > 0 else "-"
            log.info(
                "%s: done, %s in %.0f s (%s/s)", self.what, size_text(self.total), elapsed, average
            )


class _Ticker:
    """One daemon thread that lets every running transfer log, even one that sends nothing.

    It runs only while transfers are running (a stalled upload is exactly the
    one whose state a training log should show), and wakes a few times per
    :data:`LOG_EVERY`, at most once a second.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active: set[Transfer] = set()
        self._thread: threading.Thread | None = None

    def add(self, transfer: Transfer) -> None:
        with self._cond:
            self._active.add(transfer)
            if self._thread is not None:
                return
            thread = threading.Thread(target=self._run, name="ckptstore-progress", daemon=True)
            try:
                thread.start()
            except RuntimeError:  # interpreter shutdown: the bytes still count, no log lines
                return
            self._thread = thread

    def remove(self, transfer: Transfer) -> None:
        with self._cond:
            self._active.discard(transfer)
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._active:
                    self._thread = None
                    return
                running = list(self._active)
            for transfer in running:
                transfer.tick()
            with self._cond:
                self._cond.wait(timeout=min(1.0, max(0.01, LOG_EVERY / 4)))


_TICKER = _Ticker()


class FileProgress(Callback):
    """The fsspec callback of one file: turns what a backend reports into increments.

    Backends report either increments (``relative_update``) or positions
    (``absolute_update``, GCS's resumable upload); a position below the last one
    is a retried attempt starting over, counted again from there.
    """

    def __init__(self, sink: Callable[[int], Any]):
        super().__init__()
        self._sink = sink

    def call(self, *args: Any, **kwargs: Any) -> None:
        return None

    def set_size(self, size: int) -> None:  # the transfer knows its total
        self.size = size

    def relative_update(self, inc: int = 1) -> None:
        self.value += inc
        self._sink(inc)

    def absolute_update(self, value: int) -> None:
        if value < self.value:
            self.value = value
            return
        self.relative_update(value - self.value)


def size_text(n: float | None) -> str:
    """``1234567`` -> ``"1.2 MB"`` (decimal units, as object stores bill)."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        # Compared as it will be shown: 999.97 kB reads "1.0 MB", not "1000.0 kB".
        if (value < 999.5 if unit == "B" else value < 999.95) or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


__all__ = ["FileProgress", "RateMeter", "Transfer", "bars_enabled", "progress_bar", "tqdm_bar"]
