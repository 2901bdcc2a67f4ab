"""The slow link the benchmarks run over, their workers, and the results files they write.

The link: moto's S3 server in its own process (``moto_process.py``), behind the test suite's
throttling proxy in another (``tests/servers/faultproxy.py``), capped at ``--bandwidth-mb`` MB/s
each way with ``--latency-ms`` added per request; its rate is measured (large PUTs and GETs
through it) and reported with the results. ``slow_link.py``, ``preemption_exit.py`` and
``keras_backup_blocking.py`` run over it.

A benchmark's ``main()`` reads, with the helpers here::

    parser = argparse.ArgumentParser(...)
    add_link_arguments(parser)                      # --bandwidth-mb, --latency-ms, --server-nice
    add_run_arguments(parser, "<name>", "...")      # --quick, --out, --worker
    ...
    with open_link(args) as (servers, direct, slow, link):
        ...                                         # each system: run_worker(__file__, cfg, ...)
    write_results(args.out, report(...), cfg, link, results=results)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # botocore: no instance metadata

MB = 1e6
MiB = 1024 * 1024
HERE = os.path.dirname(os.path.abspath(__file__))
BUCKET = "bench"


def start_link(
    bandwidth: float, latency: float, nice: int = 0
) -> tuple[list[subprocess.Popen], dict, dict]:
    """moto and the throttling proxy, each in its own process. Returns options direct/proxied.

    ``nice`` lowers the servers' CPU priority: on a real link they run on another
    machine, here they share this one's cores with the training they serve.
    """
    from moto_process import start_moto

    def lower_priority() -> None:
        os.nice(nice)

    moto, endpoint = start_moto(nice)
    proxy = subprocess.Popen(
        [
            sys.executable,
            os.path.join(HERE, "..", "tests", "servers", "faultproxy.py"),
            endpoint.rsplit(":", 1)[1],
            "--bandwidth",
            str(bandwidth),
            "--latency",
            str(latency),
        ],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lower_priority,
    )
    proxy_port = int(proxy.stdout.readline())

    def options(url: str) -> dict:
        return {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": url}}

    direct, slow = options(endpoint), options(f"http://127.0.0.1:{proxy_port}")
    import fsspec

    fsspec.filesystem("s3", skip_instance_cache=True, **direct).mkdir(BUCKET)
    return [proxy, moto], direct, slow


def measure_link(slow: dict, size: int = 64 * MiB, repeats: int = 2) -> tuple[float, float]:
    """Bytes/s of one large PUT and one large GET through the proxy, as a client sees the link."""
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True, **slow)
    blob = os.urandom(size)
    up, down = [], []
    for i in range(repeats):
        path = f"{BUCKET}/link-probe-{i}"
        t0 = time.perf_counter()
        fs.pipe_file(path, blob)
        up.append(size / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        got = fs.cat_file(path)
        down.append(size / (time.perf_counter() - t0))
        assert got == blob
        fs.rm_file(path)
    return max(up), max(down)


def add_link_arguments(parser: argparse.ArgumentParser) -> None:
    """The link's knobs: ``--bandwidth-mb``, ``--latency-ms``, ``--server-nice``."""
    parser.add_argument("--bandwidth-mb", type=float, default=40.0, help="link cap, MB/s")
    parser.add_argument("--latency-ms", type=float, default=5.0, help="added per request")
    parser.add_argument(
        "--server-nice",
        type=int,
        default=19,
        help="niceness of the S3 server and proxy: on a real link they run on another machine, "
        "so by default they yield the CPU to training (0: compete with it)",
    )


def add_run_arguments(parser: argparse.ArgumentParser, name: str, quick: str) -> None:
    """``--quick`` (a smoke run; ``quick`` says what it runs), ``--out`` (where the results go:
    ``results/<name>``, without the extensions) and the hidden ``--worker`` (the worker's
    configuration, JSON: how :func:`run_worker` starts the script)."""
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--out", default=os.path.join(HERE, "results", name))
    parser.add_argument("--worker", help=argparse.SUPPRESS)


@contextlib.contextmanager
def open_link(
    args: argparse.Namespace,
) -> Iterator[tuple[list[subprocess.Popen], dict, dict, dict]]:
    """The link of :func:`add_link_arguments`' options, started, measured and announced
    (``link: X MB/s up, Y MB/s down``); its processes end when the block does.

    Yields the servers' processes, the storage options straight to the S3 server and through
    the link, and the link's measured rates, ``{"up": bytes/s, "down": bytes/s}``.
    """
    servers, direct, slow = start_link(
        args.bandwidth_mb * MB, args.latency_ms / 1000, args.server_nice
    )
    try:
        up, down = measure_link(slow)
        print(f"link: {up / MB:.1f} MB/s up, {down / MB:.1f} MB/s down", flush=True)
        yield servers, direct, slow, {"up": up, "down": down}
    finally:
        for p in servers:
            p.terminate()
            p.wait()


def run_worker(script: str, cfg: dict, prefix: str) -> dict:
    """``script --worker <cfg as JSON>`` in a fresh process: the JSON line it prints last.

    The worker gets a fresh directory as ``cfg["work"]`` (named ``<prefix>...``), removed after
    it ends. A worker that fails or prints no JSON ends the benchmark, with its stderr's end.
    """
    work = tempfile.mkdtemp(prefix=prefix)
    try:
        out = subprocess.run(
            [sys.executable, script, "--worker", json.dumps({**cfg, "work": work})],
            capture_output=True,
            text=True,
            timeout=3600,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"worker {cfg['system']} failed:\n{out.stderr[-4000:]}")
    return json.loads(lines[-1])


def write_results(
    out: str, text: str, cfg: dict, link: dict, *, indent: int | None = None, **sections
) -> None:
    """``<out>.md``, the report ``text``; ``<out>.json``, ``cfg`` (without the link's storage
    options, ``cfg["slow"]``), the measured ``link`` and ``sections``, each under its name."""
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".md", "w") as f:
        f.write(text + "\n")
    with open(out + ".json", "w") as f:
        json.dump(
            {"cfg": {k: v for k, v in cfg.items() if k != "slow"}, "link": link, **sections},
            f,
            indent=indent,
        )
