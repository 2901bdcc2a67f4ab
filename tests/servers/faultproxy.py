"""An HTTP/1.1 fault-injecting, bandwidth-limiting reverse proxy for tests.

``FaultProxy`` sits between a real client (s3fs / gcsfs, i.e. aiohttp) and a
local fake server (moto, fake-gcs-server) and can, per request:

* ``"5xx"``      answer the whole request itself with ``error_status`` (503);
* ``"reset"``    reset the TCP connection (RST) right after the request head;
* ``"stall"``    read the whole request (body discarded), then say nothing
                 for ``stall_seconds`` (or until the client hangs up or
                 ``stop()``), then reset.  Reading the body matters: a client
                 blocked *writing* is not covered by aiohttp's read timeout,
                 so a server that stopped reading would hang it for the
                 whole stall, while this one trips ``read_timeout``;
* ``"truncate"`` forward the request, relay the response head and half of
                 its body, then reset: a download cut short mid-stream.

It also emulates a slow link (``bandwidth_bytes_per_s`` shared by all
connections, each direction limited separately, as on a full-duplex link)
and added per-request latency, and can play "server gone" (the port refuses
connections) and "server back".

Why HTTP-aware rather than a plain TCP pipe: a 503 has to replace exactly one
request on a keep-alive connection, and the per-request fault rate and the
``requests`` counter need request boundaries.  The proxy therefore parses
request/response heads and body framing (Content-Length or chunked) but
streams every body through in bounded chunks, so 100 MB multipart parts never
sit in memory.

Design notes:

* One thread per client connection, with at most one upstream connection of
  its own.  Keep-alive is per hop: the client connection stays open when the
  upstream closes after a response (moto's werkzeug always does; real S3/GCS
  endpoints keep alive, and that is what aiohttp's pool should see).  Every
  blocking call is a socket operation on a socket that ``stop()`` shuts
  down, or a wait on the stop event, so ``stop()`` always ends every thread.
* ``Expect: 100-continue`` (botocore adds it to PUT/POST with a body) is
  answered by the proxy itself and stripped from the forwarded request, so
  the proxy never has to wait on an interim response from upstream, and a
  ``"5xx"`` fault can refuse the body without reading it.
* ``Location`` headers pointing at the upstream are rewritten to point at the
  proxy, so GCS resumable uploads (whose session URL comes back in
  ``Location``) keep going through the proxy.
* The upstream must be a loopback address: test traffic never leaves the
  machine.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import random
import select
import socket
import threading
import time
from typing import Callable, Dict, List, Sequence, Tuple

ALL_MODES = ("5xx", "reset", "stall", "truncate")

_IO_CHUNK = 256 * 1024  # largest single read/write when streaming bodies
_MAX_LINE = 64 * 1024  # longest request/status/header line accepted
_MAX_HEADERS = 200
_MAX_PEEK = 1024 * 1024  # largest request body a body_filter is shown
# Headers that describe one hop of the connection, not the message; "expect"
# is here because the proxy answers 100-continue itself.
_HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-connection", "te", "upgrade", "expect"))

Headers = List[Tuple[str, str]]
FaultFilter = Callable[[str, str, Headers], bool]
BodyFilter = Callable[[str, str, Headers, "bytes | None"], bool]


class _Stopped(Exception):
    """The proxy is stopping: unwind the connection thread."""


class _ProtocolError(Exception):
    """Malformed or truncated HTTP on one side; drop the connection."""


def _is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def _header(headers: Headers, name: str) -> str | None:
    name = name.lower()
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _has_token(headers: Headers, name: str, token: str) -> bool:
    value = _header(headers, name)
    return value is not None and token in (t.strip().lower() for t in value.split(","))


class _TokenBucket:
    """A rate limiter shared by all connections for one direction of the link.

    Callers take the bytes they are about to move and, if that overdraws the
    bucket, sleep off the debt.  Debt accumulates across threads, so N
    concurrent streams share the rate instead of each getting it.
    """

    def __init__(self, rate: float, stop: threading.Event):
        self.rate = float(rate)
        # A small burst (50 ms worth) keeps the emulated link smooth.
        self.capacity = max(self.rate * 0.05, 4096.0)
        self._tokens = self.capacity
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self._stop = stop

    def take(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            debt = -self._tokens
        if debt > 0 and self._stop.wait(debt / self.rate):
            raise _Stopped


class _Link:
    """Socket I/O for one side of a proxied connection, with throttling."""

    def __init__(self, sock: socket.socket, inbound: _TokenBucket | None, proxy: FaultProxy):
        self.sock = sock
        self.rfile = sock.makefile("rb", buffering=_IO_CHUNK)
        self._inbound = inbound  # bucket charged for bytes read from this side
        self._proxy = proxy

    def readline(self) -> bytes:
        line = self.rfile.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            raise _ProtocolError("line too long")
        if self._inbound is not None:
            self._inbound.take(len(line))
        return line

    def read_some(self, n: int) -> bytes:
        data = self.rfile.read1(n)
        if data and self._inbound is not None:
            self._inbound.take(len(data))
        return data

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self, reset: bool = False) -> None:
        """Close; with ``reset`` send a TCP RST instead of an orderly FIN."""
        try:
            if reset:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        except OSError:
            pass
        for closer in (self.rfile.close, self.sock.close):
            with contextlib.suppress(OSError):
                closer()
        self._proxy._forget_socket(self.sock)


class _UpstreamSlot:
    """The upstream connection (if any) of one client connection."""

    def __init__(self) -> None:
        self.link: _Link | None = None

    def drop(self, reset: bool = False) -> None:
        link, self.link = self.link, None
        if link is not None:
            link.close(reset=reset)


class FaultProxy:
    """Threaded HTTP/1.1 reverse proxy on 127.0.0.1 that injects faults.

    Use as a context manager or call ``start()``/``stop()``; point the client
    at ``endpoint_url``.  Counters: ``requests`` (request heads seen),
    ``faults_injected`` (by mode), ``total_faults``, ``connections``
    (accepted), ``forwarded`` (requests relayed upstream).

    ``failure_rate``/``modes``/``seed``: each request is faulted with that
    probability, the mode drawn uniformly from ``modes``; the draws are
    reproducible for a seed, though which request gets which draw depends on
    the client's concurrency.  ``inject_next(mode)`` forces faults
    deterministically.  ``fault_filter(method, target, headers)`` returning
    False exempts a request (e.g. fault only ``PUT``s).  ``body_filter(method,
    target, headers, body)`` does the same for requests told apart only by
    their body (a GCS upload names its object in the body): requests with a
    Content-Length of at most 1 MiB are read before the fault is chosen and
    ``body`` holds their bytes (``None`` for larger or chunked ones); it is
    consulted after ``fault_filter``.  ``latency_s`` is
    added before each request is handled (an RTT stand-in);
    ``bandwidth_bytes_per_s`` caps each direction across all connections.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        failure_rate: float = 0.0,
        seed: int = 0,
        modes: Sequence[str] = ("5xx", "reset", "stall"),
        stall_seconds: float = 30.0,
        bandwidth_bytes_per_s: float | None = None,
        latency_s: float = 0.0,
        error_status: int = 503,
        fault_filter: FaultFilter | None = None,
        body_filter: BodyFilter | None = None,
    ):
        if not _is_loopback(upstream_host):
            raise ValueError(f"upstream {upstream_host!r} is not a loopback address")
        self.upstream_host = upstream_host
        self.upstream_port = int(upstream_port)
        self.stall_seconds = float(stall_seconds)
        self.latency_s = float(latency_s)
        self.error_status = int(error_status)
        self.fault_filter = fault_filter
        self.body_filter = body_filter
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._failure_rate = 0.0
        self._modes: Tuple[str, ...] = ()
        self.set_failure_rate(failure_rate, modes)
        self._forced: collections.deque = collections.deque()  # modes queued by inject_next
        self._stop = threading.Event()
        if bandwidth_bytes_per_s:
            self._up_bucket: _TokenBucket | None = _TokenBucket(bandwidth_bytes_per_s, self._stop)
            self._down_bucket: _TokenBucket | None = _TokenBucket(bandwidth_bytes_per_s, self._stop)
        else:
            self._up_bucket = self._down_bucket = None
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._threads: set = set()
        self._sockets: set = set()
        self.port = 0
        self._reset_counters_locked()

    # ------------------------------------------------------------------ control

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        if self._listener is not None:
            raise RuntimeError("already started")
        self._stop.clear()
        self._listen(0)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, cut every connection and join every thread."""
        self._stop.set()
        self._close_listener()
        self._cut_connections(reset=True)
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in threads if t.is_alive()]
        if alive:
            raise RuntimeError(f"FaultProxy threads did not stop: {alive}")

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set_failure_rate(self, rate: float, modes: Sequence[str] | None = None) -> None:
        """Fault each request with probability ``rate``, mode drawn from ``modes``."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError("failure_rate must be in [0, 1]")
        if modes is not None:
            bad = set(modes) - set(ALL_MODES)
            if bad or not modes:
                raise ValueError(f"modes must be a non-empty subset of {ALL_MODES}")
        with self._lock:
            self._failure_rate = float(rate)
            if modes is not None:
                self._modes = tuple(modes)

    def inject_next(self, mode: str, count: int = 1) -> None:
        """Force ``mode`` onto the next ``count`` eligible requests (deterministic)."""
        if mode not in ALL_MODES:
            raise ValueError(f"mode must be one of {ALL_MODES}")
        with self._lock:
            self._forced.extend([mode] * count)

    def server_gone(self, reset_existing: bool = True) -> None:
        """Play a dead server: new connections are refused (ECONNREFUSED).

        The listening socket is closed, so the kernel refuses connections to
        the port; with ``reset_existing`` open keep-alive connections are
        reset too, as they would be by a crashed server.
        """
        self._close_listener()
        if reset_existing:
            self._cut_connections(reset=True)

    def server_back(self) -> None:
        """Listen again on the same port after ``server_gone()``."""
        if self._listener is None and not self._stop.is_set():
            self._listen(self.port)

    @property
    def is_gone(self) -> bool:
        return self._listener is None

    # ------------------------------------------------------------------ counters

    def _reset_counters_locked(self) -> None:
        self._requests = 0
        self._connections = 0
        self._forwarded = 0
        self._faults: Dict[str, int] = {m: 0 for m in ALL_MODES}

    def reset_counters(self) -> None:
        with self._lock:
            self._reset_counters_locked()

    @property
    def requests(self) -> int:
        with self._lock:
            return self._requests

    @property
    def connections(self) -> int:
        with self._lock:
            return self._connections

    @property
    def forwarded(self) -> int:
        with self._lock:
            return self._forwarded

    @property
    def faults_injected(self) -> Dict[str, int]:
        with self._lock:
            return dict(self._faults)

    @property
    def total_faults(self) -> int:
        with self._lock:
            return sum(self._faults.values())

    # ------------------------------------------------------------------ plumbing

    def _listen(self, port: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
        # A short accept timeout bounds how long the accept thread can
        # outlive a close of its listener (close() does not wake accept()).
        sock.settimeout(0.2)
        self.port = sock.getsockname()[1]
        self._listener = sock
        t = threading.Thread(
            target=self._accept_loop,
            args=(sock,),
            name=f"faultproxy-accept-{self.port}",
            daemon=True,
        )
        self._accept_thread = t
        self._track_thread(t)
        t.start()

    def _close_listener(self) -> None:
        sock, t = self._listener, self._accept_thread
        self._listener = self._accept_thread = None
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept() on Linux
        if t is not None and t is not threading.current_thread():
            t.join(5.0)
        sock.close()

    def _cut_connections(self, reset: bool) -> None:
        with self._lock:
            socks = list(self._sockets)
        for s in socks:
            try:
                if reset:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                s.shutdown(socket.SHUT_RDWR)  # unblocks recv()/sendall() in the owner
            except OSError:
                pass

    def _track_thread(self, t: threading.Thread) -> None:
        with self._lock:
            self._threads.add(t)

    def _forget_socket(self, s: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(s)

    def _accept_loop(self, listener: socket.socket) -> None:
        try:
            while not self._stop.is_set() and listener is self._listener:
                try:
                    client, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    break  # listener shut down / closed
                client.setblocking(True)
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with self._lock:
                    self._connections += 1
                    self._sockets.add(client)
                t = threading.Thread(
                    target=self._serve_connection,
                    args=(client,),
                    name=f"faultproxy-conn-{self.port}",
                    daemon=True,
                )
                self._track_thread(t)
                t.start()
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _choose_fault(
        self, method: str, target: str, headers: Headers, body: bytes | None
    ) -> str | None:
        if self.fault_filter is not None and not self.fault_filter(method, target, headers):
            return None
        if self.body_filter is not None and not self.body_filter(method, target, headers, body):
            return None
        with self._lock:
            if self._forced:
                mode = self._forced.popleft()
            elif self._failure_rate > 0 and self._rng.random() < self._failure_rate:
                mode = self._rng.choice(self._modes)
            else:
                return None
            self._faults[mode] += 1
            return mode

    def _connect_upstream(self) -> _Link:
        sock = socket.create_connection((self.upstream_host, self.upstream_port), timeout=10)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._sockets.add(sock)
        return _Link(sock, self._down_bucket, self)

    @staticmethod
    def _upstream_is_dead(up: _Link) -> bool:
        """True if the upstream closed an idle keep-alive connection."""
        try:
            up.sock.setblocking(False)
            try:
                return up.sock.recv(1, socket.MSG_PEEK) == b""
            except BlockingIOError:
                return False
            finally:
                up.sock.setblocking(True)
        except OSError:
            return True

    def _wait_for_hangup(self, client: _Link, seconds: float) -> None:
        """Sleep up to ``seconds``; return early if the client closes."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if self._stop.is_set():
                raise _Stopped
            readable, _, _ = select.select([client.sock], [], [], min(left, 0.2))
            if readable:
                try:
                    if not client.sock.recv(65536):
                        return  # client gave up (e.g. its read timeout fired)
                except OSError:
                    return

    def _serve_connection(self, client_sock: socket.socket) -> None:
        client = _Link(client_sock, self._up_bucket, self)
        # The upstream link lives here, not in _serve_one's locals, so that it
        # is closed however a request ends (including by an exception).
        slot = _UpstreamSlot()
        reset_client = False
        try:
            while not self._stop.is_set():
                keep_alive, reset_client = self._serve_one(client, slot)
                if not keep_alive:
                    break
        except (_Stopped, _ProtocolError, OSError, ValueError):
            reset_client = True
        finally:
            client.close(reset=reset_client)
            slot.drop()
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _serve_one(self, client: _Link, slot: _UpstreamSlot) -> Tuple[bool, bool]:
        """Handle one request.  Returns (keep_alive, reset_client)."""
        head = self._read_head(client, allow_eof=True)
        if head is None:
            return False, False  # client closed an idle connection
        start_line, headers = head
        try:
            method, target, version = start_line.split(" ", 2)
        except ValueError:
            raise _ProtocolError(f"bad request line {start_line!r}") from None
        with self._lock:
            self._requests += 1
        expects_continue = _has_token(headers, "Expect", "100-continue")
        body = None
        if self.body_filter is not None:
            body = self._peek_body(client, headers, expects_continue)
            if body is not None:
                expects_continue = False  # answered while reading the body
        fault = self._choose_fault(method, target, headers, body)
        if self.latency_s and self._stop.wait(self.latency_s):
            raise _Stopped
        client_wants_close = _has_token(headers, "Connection", "close") or version == "HTTP/1.0"

        if fault == "reset":
            return False, True
        if fault == "stall":
            # Accept the body (aiohttp's wait for 100 Continue has no timeout
            # either) so that the client ends up waiting for a response.
            if expects_continue:
                client.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            if body is None:
                self._copy_body(client, None, headers, request=True)  # drain & discard
            self._wait_for_hangup(client, self.stall_seconds)
            return False, True
        if fault == "5xx":
            if expects_continue:
                # The client is waiting for our go-ahead: refuse the body
                # outright and close, as a real server may.
                self._send_error(client, method, close=True)
                return False, False
            if body is None:
                self._copy_body(client, None, headers, request=True)  # drain & discard
            self._send_error(client, method, close=client_wants_close)
            return not client_wants_close, False

        # Forward the request (Connection headers are per hop, see module doc).
        if slot.link is not None and self._upstream_is_dead(slot.link):
            slot.drop()
        if slot.link is None:
            try:
                slot.link = self._connect_upstream()
            except OSError:
                self._send_error(client, method, close=True, status=502, code="BadGateway")
                return False, False
        upstream = slot.link
        if expects_continue:
            client.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        fwd_headers = [(k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP]
        upstream.send(self._encode_head(start_line, fwd_headers))
        try:
            if body is None:
                self._copy_body(client, upstream, headers, request=True)
            else:
                upstream.send(body)
        except (BrokenPipeError, ConnectionResetError):
            # Upstream may have answered early and closed; try to relay that.
            client_wants_close = True
        with self._lock:
            self._forwarded += 1

        # Relay the response, passing on interim 1xx heads other than 100.
        while True:
            resp = self._read_head(upstream, allow_eof=False)
            assert resp is not None
            status_line, resp_headers = resp
            status = int(status_line.split(" ", 2)[1])
            if 100 <= status < 200 and status != 101:
                if status != 100:  # we already sent our own 100 Continue
                    client.send(self._encode_head(status_line, resp_headers))
                continue
            break
        no_body = method == "HEAD" or status in (204, 304)
        close_delimited = not no_body and not (
            _has_token(resp_headers, "Transfer-Encoding", "chunked")
            or _header(resp_headers, "Content-Length") is not None
        )
        upstream_close = close_delimited or _has_token(resp_headers, "Connection", "close")
        client_close = client_wants_close or close_delimited or fault == "truncate"
        out_headers = [
            (k, self._rewrite_location(v) if k.lower() == "location" else v)
            for k, v in resp_headers
            if k.lower() not in _HOP_BY_HOP
        ]
        if client_close:
            out_headers.append(("Connection", "close"))
        client.send(self._encode_head(status_line, out_headers))
        if fault == "truncate":
            if not no_body:
                self._copy_body(upstream, client, resp_headers, request=False, truncate=True)
            slot.drop(reset=True)
            return False, True
        if not no_body:
            self._copy_body(upstream, client, resp_headers, request=False)
        if upstream_close:
            slot.drop()
        return not client_close, False

    # ------------------------------------------------------------------ HTTP bits

    def _peek_body(self, client: _Link, headers: Headers, expects_continue: bool) -> bytes | None:
        """Read a small Content-Length body whole (for ``body_filter``); ``None`` if not small."""
        if _has_token(headers, "Transfer-Encoding", "chunked"):
            return None
        length = _header(headers, "Content-Length")
        n = int(length) if length is not None else 0
        if n > _MAX_PEEK:
            return None
        if expects_continue:
            client.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        parts = []
        while n > 0:
            if self._stop.is_set():
                raise _Stopped
            data = client.read_some(min(n, _IO_CHUNK))
            if not data:
                raise _ProtocolError("peer closed mid-body")
            parts.append(data)
            n -= len(data)
        return b"".join(parts)

    def _read_head(self, link: _Link, allow_eof: bool) -> Tuple[str, Headers] | None:
        line = link.readline()
        while line in (b"\r\n", b"\n"):  # tolerate stray CRLF between messages
            line = link.readline()
        if not line:
            if allow_eof:
                return None
            raise _ProtocolError("peer closed before sending a head")
        start = line.rstrip(b"\r\n").decode("latin-1")
        headers: Headers = []
        while True:
            raw = link.readline()
            if not raw:
                raise _ProtocolError("peer closed inside a head")
            if raw in (b"\r\n", b"\n"):
                break
            if len(headers) >= _MAX_HEADERS:
                raise _ProtocolError("too many headers")
            name, sep, value = raw.decode("latin-1").partition(":")
            if not sep:
                raise _ProtocolError(f"bad header line {raw!r}")
            headers.append((name.strip(), value.strip()))
        return start, headers

    @staticmethod
    def _encode_head(start_line: str, headers: Headers) -> bytes:
        lines = [start_line] + [f"{k}: {v}" for k, v in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _rewrite_location(self, value: str) -> str:
        for host in {self.upstream_host, "127.0.0.1", "localhost"}:
            prefix = f"http://{host}:{self.upstream_port}"
            if value.startswith(prefix):
                return self.endpoint_url + value[len(prefix) :]
        return value

    def _send_error(
        self,
        client: _Link,
        method: str,
        close: bool,
        status: int | None = None,
        code: str = "",
    ) -> None:
        status = status or self.error_status
        code = code or "ServiceUnavailable"
        # S3-style XML: botocore parses the code; gcsfs just sees the status.
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>Injected by FaultProxy</Message>"
            "<RequestId>faultproxy</RequestId></Error>"
        ).encode()
        headers = [
            ("Content-Type", "application/xml"),
            ("Content-Length", str(len(body))),
            ("Connection", "close" if close else "keep-alive"),
        ]
        head = self._encode_head(f"HTTP/1.1 {status} Injected Fault", headers)
        # A response to HEAD carries the headers of the body it would have had,
        # but never the body itself.
        client.send(head if method == "HEAD" else head + body)

    def _copy_body(
        self,
        src: _Link,
        dst: _Link | None,
        headers: Headers,
        request: bool,
        truncate: bool = False,
    ) -> bool:
        """Stream one message body from ``src`` to ``dst`` (None: discard).

        Returns True if the body is delimited by connection close (responses
        without Content-Length or chunked framing).  With ``truncate`` only
        about half of the body is sent.
        """
        if _has_token(headers, "Transfer-Encoding", "chunked"):
            self._copy_chunked(src, dst, truncate)
            return False
        length = _header(headers, "Content-Length")
        if length is not None:
            n = int(length)
            self._copy_n(src, dst, n // 2 if truncate else n)
            return False
        if request:
            return False  # a request without framing has no body
        self._copy_n(src, dst, None, truncate=truncate)
        return True

    def _copy_n(self, src: _Link, dst: _Link | None, n: int | None, truncate: bool = False) -> None:
        """Copy ``n`` bytes (``None``: until EOF) in bounded chunks."""
        remaining = n
        copied = 0
        chunk = _IO_CHUNK
        if self._up_bucket is not None:
            # Smaller chunks keep a throttled stream smooth rather than bursty.
            chunk = int(min(_IO_CHUNK, max(4096, self._up_bucket.rate / 50)))
        while remaining is None or remaining > 0:
            if self._stop.is_set():
                raise _Stopped
            want = chunk if remaining is None else min(chunk, remaining)
            data = src.read_some(want)
            if not data:
                if remaining is None:
                    return
                raise _ProtocolError("peer closed mid-body")
            if dst is not None:
                dst.send(data)
            copied += len(data)
            if remaining is not None:
                remaining -= len(data)
            elif truncate:
                return  # close-delimited body: pass one chunk, then cut

    def _copy_chunked(self, src: _Link, dst: _Link | None, truncate: bool) -> None:
        first = True
        while True:
            size_line = src.readline()
            if not size_line:
                raise _ProtocolError("peer closed in chunked body")
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if truncate and not first:
                return  # forwarded the first chunk only, then cut
            first = False
            if dst is not None:
                dst.send(size_line)
            if size == 0:
                while True:  # trailers up to and including the blank line
                    trailer = src.readline()
                    if not trailer:
                        raise _ProtocolError("peer closed in trailers")
                    if dst is not None:
                        dst.send(trailer)
                    if trailer in (b"\r\n", b"\n"):
                        return
            self._copy_n(src, dst, size + 2)  # data plus its CRLF


def main() -> None:
    """Run a proxy in its own process (benchmarks keep its work out of the trainer's).

    ``python faultproxy.py UPSTREAM_PORT [--bandwidth BYTES_PER_S] [--latency SECONDS]``
    prints the proxy's port on one line once it listens, then serves until killed.
    """
    import argparse
    import signal
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("upstream_port", type=int)
    parser.add_argument("--bandwidth", type=float, default=None, help="bytes/s each direction")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added per request")
    args = parser.parse_args()
    proxy = FaultProxy(
        "127.0.0.1",
        args.upstream_port,
        bandwidth_bytes_per_s=args.bandwidth,
        latency_s=args.latency,
    ).start()
    print(proxy.port, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        threading.Event().wait()
    finally:
        proxy.stop()


if __name__ == "__main__":
    main()
