"""A child process a test plays the platform around: its output as it comes, signals, its end.

The preemption tests start a training process, wait for a line it prints, send it SIGTERM (as
a platform reclaiming a VM does) and check when and how it ended; :class:`Child` is that process.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import pytest


class Child:
    """A process started with ``args``: its stdout and stderr lines as they come, and when it
    exited (``exited_at``, ``time.monotonic()``)."""

    out_tail = 40  # lines of stdout, and of stderr, that output() shows
    err_tail = 60

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self.exited_at: float | None = None
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        threading.Thread(target=self._reap, daemon=True).start()

    def _read(self, stream, lines: list[str]) -> None:
        for line in stream:
            with self._changed:
                lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def _reap(self) -> None:
        self.proc.wait()
        with self._changed:
            self.exited_at = time.monotonic()
            self._changed.notify_all()

    def wait_for(self, predicate, timeout: float = 120.0) -> str:
        """The first stdout or stderr line ``predicate`` accepts; fails if the child ends first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.out + self.err:
                    if predicate(line):
                        return line
                assert self.exited_at is None, f"the child ended first:\n{self.output()}"
                left = deadline - time.monotonic()
                assert left > 0, f"timed out waiting:\n{self.output()}"
                self._changed.wait(left)

    def sigterm(self) -> float:
        """Send SIGTERM; returns when (``time.monotonic()``)."""
        self.proc.send_signal(signal.SIGTERM)
        return time.monotonic()

    def wait(self, timeout: float = 120.0) -> int:
        """Its exit status, once it and its output ended (killed, failing the test, if it does
        not exit within ``timeout`` seconds)."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"the child did not exit within {timeout} s:\n{self.output()}")
        for reader in self._readers:
            reader.join(10)
        while self.exited_at is None:  # the reaper thread notes the time right after wait()
            time.sleep(0.01)
        return code

    def stderr(self) -> str:
        with self._changed:
            return "\n".join(self.err)

    def output(self) -> str:
        """The end of its stdout and stderr, for a failing assertion's message."""
        with self._changed:
            return (
                "stdout:\n"
                + "\n".join(self.out[-self.out_tail :])
                + "\nstderr:\n"
                + "\n".join(self.err[-self.err_tail :])
            )
