"""Run a drain before the interpreter shuts down the machinery uploads depend on.

Background uploads run in daemon threads (they must never keep a crashed
script alive), so without a drain a script that ends right after its last
save would exit before that save reached the remote.

The drain must run *before* Python shuts down ``concurrent.futures``' thread
pools: s3fs (through aiobotocore) and others send requests through one, and
once it is shut down every request fails with "cannot schedule new futures
after shutdown". ``atexit`` handlers run after that shutdown; the hooks of
``threading._register_atexit`` (where ``concurrent.futures`` registers its own
shutdown) run before it, latest first, so drains are registered there. It is
a private hook of CPython 3.9+; without it, ``atexit`` is the fallback.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Callable


def register(drain: Callable[[], None]) -> None:
    """Call ``drain()`` at interpreter exit, before thread pools shut down."""
    hook = getattr(threading, "_register_atexit", None)
    try:
        if hook is None:
            raise RuntimeError("no threading._register_atexit")
        hook(drain)
    except RuntimeError:  # absent, or the interpreter is already shutting down
        atexit.register(drain)
