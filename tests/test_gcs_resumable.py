"""GCS resumable uploads as ckptstore drives them: chunked, streamed, and resumed.

ckptstore sends a large file's chunks itself (so that each body streams from the
staged file) and so must follow the protocol's rules that gcsfs used to follow
for it: chunks in order, and after each 308 go on from the byte GCS says it
holds, which may be fewer than were sent. fake-gcs-server always keeps whole
chunks, so a small proxy in front of it forwards only part of the first chunk
(with the Content-Range rewritten to match), as a real GCS front end may.
"""

from __future__ import annotations

import http.client
import http.server
import os
import re
import threading

import pytest

from ckptstore.backends import resolve
from ckptstore.backends.gcs import persisted_bytes
from ckptstore.manifest import hash_file
from conftest import gcs_remote, open_manager
from training import TrainState

_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


class ChunkProxy(http.server.ThreadingHTTPServer):
    """Forwards to fake-gcs-server; records chunk requests; can cut the first chunk short."""

    def __init__(self, upstream_port: int, keep_of_first_chunk: int | None = None):
        super().__init__(("127.0.0.1", 0), _ChunkHandler)
        self.upstream_port = upstream_port
        self.keep_of_first_chunk = keep_of_first_chunk
        self.chunks: list[str] = []  # Content-Range of every chunk as forwarded
        self.replies: list[int] = []
        self.lock = threading.Lock()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ChunkHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ChunkProxy

    def log_message(self, *args: object) -> None:
        pass

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        match = _RANGE.fullmatch(self.headers.get("Content-Range", ""))
        if match:
            start, end, total = map(int, match.groups())
            with self.server.lock:
                keep = self.server.keep_of_first_chunk
                self.server.keep_of_first_chunk = None
            if keep is not None and keep < len(body):
                # What reaches GCS is a shorter, non-final chunk; its 308 tells the client.
                body, end = body[:keep], start + keep - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{total}"
            headers["Content-Length"] = str(len(body))
            with self.server.lock:
                self.server.chunks.append(headers["Content-Range"])
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=30)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            reply = upstream.getresponse()
            data = reply.read()
        finally:
            upstream.close()
        if match:
            with self.server.lock:
                self.server.replies.append(reply.status)
        self.send_response(reply.status)
        for key, value in reply.getheaders():
            if key.lower() in ("content-length", "connection", "transfer-encoding", "date"):
                continue
            if key.lower() == "location":  # the session URL must come back through us
                value = value.replace(
                    f":{self.server.upstream_port}/", f":{self.server.server_address[1]}/"
                )
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _forward


@pytest.fixture
def chunk_proxy(gcs_server):
    proxies = []

    def start(**kwargs) -> ChunkProxy:
        proxy = ChunkProxy(gcs_server.port, **kwargs)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        proxy.shutdown()
        proxy.server_close()


def _upload(spec, local, part_size=None):
    backend, root = resolve(spec.url, spec.storage_options)
    if part_size is not None:
        backend.part_size = part_size
    entry = hash_file(str(local), "ckpt-1.data-00000-of-00001")
    path = f"{root}/ckpt-1.data-00000-of-00001"
    backend.upload(str(local), path, entry)
    return backend, path, entry


def test_upload_resumes_from_the_byte_gcs_says_it_holds(gcs_server, chunk_proxy, tmp_path):
    mib = 1024 * 1024
    proxy = chunk_proxy(keep_of_first_chunk=3 * mib)  # GCS keeps 3 MiB of the first 8
    spec = gcs_remote(gcs_server, proxy.endpoint_url)
    local = tmp_path / "big"
    local.write_bytes(os.urandom(20 * mib))
    backend, path, entry = _upload(spec, local, part_size=8 * mib)
    # The second chunk starts where GCS's 308 said, not where the first chunk ended.
    assert proxy.chunks[:2] == [
        f"bytes 0-{3 * mib - 1}/{20 * mib}",
        f"bytes {3 * mib}-{11 * mib - 1}/{20 * mib}",
    ]
    assert proxy.replies[0] == 308 and proxy.replies[-1] == 200
    assert backend.verify(path, entry) is None
    assert spec.read("ckpt-1.data-00000-of-00001") == local.read_bytes()


def test_default_chunks_are_large_so_few_round_trips(gcs_server, chunk_proxy, tmp_path):
    # Chunks go one after another, each waiting for its 308: a 96 MiB file takes two.
    proxy = chunk_proxy()
    spec = gcs_remote(gcs_server, proxy.endpoint_url)
    local = tmp_path / "big"
    local.write_bytes(os.urandom(96 * 1024 * 1024))
    before = len(proxy.chunks)
    _upload(spec, local)
    assert len(proxy.chunks) - before == 2, proxy.chunks
    assert spec.read("ckpt-1.data-00000-of-00001") == local.read_bytes()


def test_upload_part_size_sets_the_chunk_through_the_manager(gcs_server, chunk_proxy, tmp_path):
    shapes = ((1024, 1024, 5),)  # one 20 MiB variable
    proxy = chunk_proxy()
    spec = gcs_remote(gcs_server, proxy.endpoint_url)
    state = TrainState(shapes)
    with open_manager(state, spec, tmp_path / "s", upload_part_size=8 * 1024 * 1024) as m:
        state.advance_to(1)
        m.save()
    first, second = (_RANGE.fullmatch(r).groups() for r in proxy.chunks[:2])
    assert [int(end) - int(start) + 1 for start, end, _ in (first, second)] == [8 * 1024 * 1024] * 2
    fresh = TrainState(shapes)
    with open_manager(fresh, spec, tmp_path / "new") as m:
        fresh.checkpoint.restore(m.latest_checkpoint)
    assert fresh.matches_step(1)


@pytest.mark.parametrize(
    ("header", "held"), [(None, 0), ("bytes=0-0", 1), ("bytes=0-8388607", 8 * 1024 * 1024)]
)
def test_persisted_bytes_reads_the_range_of_a_308(header, held):
    assert persisted_bytes({} if header is None else {"Range": header}) == held


def test_a_chunk_retried_by_gcsfs_is_sent_again_from_its_first_byte(gcs_server, tmp_path):
    # gcsfs retries a failed request with the same body object; the body must rewind to
    # the chunk's first byte (a stall reads the whole chunk before the connection drops).
    import aiohttp

    from servers.faultproxy import FaultProxy, _header

    def is_chunk(method: str, target: str, headers) -> bool:
        return _header(headers, "content-range") is not None

    proxy = FaultProxy("127.0.0.1", gcs_server.port, stall_seconds=1, fault_filter=is_chunk)
    proxy.start()
    try:
        for mode in ("stall", "reset", "5xx"):
            proxy.inject_next(mode)
        spec = gcs_remote(gcs_server, proxy.endpoint_url)
        spec.storage_options["requests_timeout"] = aiohttp.ClientTimeout(sock_read=2)
        local = tmp_path / "big"
        local.write_bytes(os.urandom(20 * 1024 * 1024))
        backend, path, entry = _upload(spec, local, part_size=8 * 1024 * 1024)
        faults = proxy.faults_injected
        assert backend.verify(path, entry) is None
    finally:
        proxy.stop()
    assert sum(faults.values()) == 3, faults
    assert spec.read("ckpt-1.data-00000-of-00001") == local.read_bytes()
