"""Task exceptions nobody retrieved, from ckptstore's own requests on fsspec's IO loop.

s3fs and gcsfs send every request from one asyncio loop that fsspec runs in a
thread of its own (``fsspec.asyn.get_loop()``), shared by everything else in
the process that uses them. The HTTP client under them (aiohttp) can leave a
task behind when a connection fails; if nobody retrieves that task's exception,
asyncio prints "Task exception was never retrieved" and a traceback to stderr
when the task is collected, once per task. The request itself was already
answered: retried, then reported by ``sync()`` or by the call that made it. For
ckptstore's requests such a print is noise that buries what matters, so it goes
to the ``"ckptstore"`` logger at DEBUG instead.

Scope: ckptstore marks its own remote operations with a context variable
(:func:`ours`, entered by :meth:`RetryPolicy.call` around every operation, and
carried into the threads one operation starts). asyncio copies the caller's
context into each task it creates, and into the tasks those create in turn.
:func:`install` puts a task factory on the loop that, for tasks created under
the mark only, adds a done-callback retrieving their exception (as fsspec does
for its own deferred tasks). Every other task is created exactly as before, by
the factory that was there before if any; nothing else about the loop changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import weakref
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("ckptstore")

_MARK: contextvars.ContextVar[bool] = contextvars.ContextVar("ckptstore_request", default=False)
_lock = threading.Lock()
_installed: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


@contextlib.contextmanager
def ours() -> Iterator[None]:
    """Mark the requests made inside as ckptstore's (their tasks' exceptions are retrieved)."""
    token = _MARK.set(True)
    try:
        yield
    finally:
        _MARK.reset(token)


def install_for(fs: Any) -> None:
    """:func:`install` on the loop of ``fs``, if it is an asynchronous fsspec filesystem."""
    try:
        loop = fs.loop  # fsspec's AsyncFileSystem; a fork-safety check may raise
    except Exception:
        return
    install(loop)


def install(loop: Any) -> None:
    """Retrieve the exceptions of ckptstore's tasks on ``loop``; idempotent, any thread.

    Anything but an asyncio loop (a filesystem that is not asynchronous) is ignored.
    """
    if not isinstance(loop, asyncio.AbstractEventLoop):
        return
    with _lock:
        if loop in _installed:
            return
        _installed.add(loop)
        previous = loop.get_task_factory()

        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
            if previous is not None:
                task = previous(loop, coro, **kwargs)
            else:
                task = asyncio.Task(coro, loop=loop, **kwargs)
            context = kwargs.get("context")
            if context.get(_MARK, False) if context is not None else _MARK.get():
                task.add_done_callback(_retrieve)
            return task

        loop.set_task_factory(factory)


def _retrieve(task: asyncio.Future) -> None:
    if task.cancelled():
        return
    exc = task.exception()  # retrieved: asyncio no longer reports it when the task goes
    if exc is not None:
        coro = getattr(task, "get_coro", lambda: None)()
        log.debug(
            "ckptstore: %s, a task of one of ckptstore's requests, ended with %s (the "
            "request's own failure is handled where it was made)",
            getattr(coro, "__qualname__", "a task"),
            type(exc).__name__,
        )
