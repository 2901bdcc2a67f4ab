"""An in-process S3 endpoint (moto server mode) for tests that use real s3fs.

moto's server mode is a werkzeug WSGI server on a thread, so s3fs/aiobotocore
talk to it over real HTTP on 127.0.0.1, through the same code paths as
against AWS (signing, retries, multipart, checksums).

Things worth knowing:

* moto's backend state is process-global: every ``S3Server`` in a process
  serves the same buckets.  The last one to stop resets that state.
* moto computes CRC32C checksums only when the ``crc32c`` package is
  installed (it falls back to CRC32 otherwise).  Client side, botocore needs
  ``awscrt`` (``botocore[crt]``) to compute CRC32C itself
  (``ChecksumAlgorithm="CRC32C"``); a precomputed ``ChecksumCRC32C`` value
  needs no awscrt.  moto stores a client-supplied checksum without checking
  it against the body.
* Do not put ``region_name`` into s3fs ``client_kwargs``: s3fs then sends it
  as a ``LocationConstraint`` and moto answers 400 for us-east-1.
* Conditional writes: moto 5.2.5 answers ``If-None-Match: *`` and
  ``If-Match: <etag>`` on PutObject like S3 (412 ``PreconditionFailed``; 404
  ``NoSuchKey`` for ``If-Match`` on a missing key), but it checks the condition
  and then stores the object as two steps with no lock between them
  (``moto/s3/responses.py``, ``put_object``), so two racing writers can both
  succeed where S3 lets one win (and answers the other 412, or 409
  ``ConditionalRequestConflict``). Seen: with ``sys.setswitchinterval(1e-6)``,
  16 racing creators had two winners in 3 of 60 trials. So this server runs
  the conditional writes one at a time (:class:`_AtomicPreconditions`), as S3
  evaluates them: moto still decides every outcome. No newer moto exists to
  try (5.2.5 is the newest pip offers here).
"""

from __future__ import annotations

import os
import threading
import urllib.request
from typing import Any, Dict

from moto.server import ThreadedMotoServer

ACCESS_KEY = "testing"
SECRET_KEY = "testing"

# Set while a server runs, restored by stop(), so nothing here outlives the
# tests that need it.  Fake credentials keep botocore from finding real ones;
# AWS_EC2_METADATA_DISABLED stops it probing the EC2 metadata address
# (169.254.169.254: a non-loopback address, and a 1 s timeout per probe);
# AWS_CONFIG_FILE/AWS_SHARED_CREDENTIALS_FILE at os.devnull and no AWS_PROFILE
# keep a developer's ~/.aws (region, addressing style, profiles) out of tests.
_ENV_SET = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
_ENV_UNSET = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")

_lock = threading.Lock()
_conditional_writes = threading.Lock()  # process-wide, like moto's state
_running = 0  # S3Servers alive in this process (they share moto's state)
_saved_env: Dict[str, str | None] = {}


def _patch_env() -> None:
    global _running
    with _lock:
        if _running == 0:
            for name in (*_ENV_SET, *_ENV_UNSET):
                _saved_env[name] = os.environ.get(name)
            os.environ.update(_ENV_SET)
            for name in _ENV_UNSET:
                os.environ.pop(name, None)
        _running += 1


def _restore_env() -> None:
    """Undo _patch_env once the last running server stops."""
    global _running
    with _lock:
        _running -= 1
        if _running:
            return
        for name, value in _saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _saved_env.clear()


class _AtomicPreconditions:
    """WSGI middleware: PUT/POST requests with ``If-Match``/``If-None-Match`` run one at a time.

    moto does all of a request's work when its WSGI app is called (the body
    it returns is already built), so holding the lock for the call makes
    check-then-store atomic, as on S3.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: Dict[str, Any], start_response: Any) -> Any:
        conditional = "HTTP_IF_MATCH" in environ or "HTTP_IF_NONE_MATCH" in environ
        if conditional and environ.get("REQUEST_METHOD") in ("PUT", "POST"):
            with _conditional_writes:
                return self.app(environ, start_response)
        return self.app(environ, start_response)


class S3Server:
    """moto S3 on 127.0.0.1 and a free port.  Context manager or start()/stop()."""

    def __init__(self) -> None:
        self._server: ThreadedMotoServer | None = None
        self.host = "127.0.0.1"
        self.port = 0

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> S3Server:
        if self._server is not None:
            raise RuntimeError("already started")
        _patch_env()
        try:
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            server.start()  # returns once the socket is bound
            # werkzeug's server looks its app up per request: from now on, all go through this.
            server._server.app = _AtomicPreconditions(server._server.app)
            self.host, self.port = server.get_host_and_port()
        except BaseException:
            _restore_env()
            raise
        self._server = server
        return self

    def storage_options(self, endpoint_url: str | None = None, **extra: Any) -> Dict[str, Any]:
        """s3fs kwargs for this server, or for ``endpoint_url`` (e.g. a FaultProxy).

        ``extra`` is merged in at top level (``config_kwargs=...``,
        ``skip_instance_cache=True``...).
        """
        opts: Dict[str, Any] = {
            "key": ACCESS_KEY,
            "secret": SECRET_KEY,
            "client_kwargs": {"endpoint_url": endpoint_url or self.endpoint_url},
        }
        opts.update(extra)
        return opts

    def make_bucket(self, name: str) -> None:
        """Create bucket ``name`` (no error if it exists)."""
        import boto3  # moto depends on it; imported late to keep import light

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",  # here fine: no LocationConstraint is sent
        )
        try:
            # us-east-1 semantics: creating a bucket you own again succeeds.
            client.create_bucket(Bucket=name)
        finally:
            client.close()

    def reset(self) -> None:
        """Drop all moto state (buckets and objects) for every server."""
        req = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        with _lock:
            last_one = _running == 1
        try:
            if last_one:
                self.reset()  # moto state is global: clear it once nobody uses it
        finally:
            server.stop()  # ends serve_forever() and joins its thread
            # ThreadedMotoServer.stop() leaves the listening socket open, which
            # would make later connections hang instead of being refused.
            inner = getattr(server, "_server", None)
            if inner is not None:
                inner.server_close()
            _restore_env()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
