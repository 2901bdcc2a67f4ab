"""The examples' stand-in for the cloud: a local S3 server, or the remote you pass.

Every example runs as is (``python examples/<name>.py``) against an S3 server
on 127.0.0.1 (moto, as ``make demo`` uses), so no cloud account is needed. Pass
``--remote s3://your-bucket/some/prefix`` (and ``--storage-options '{...}'``,
JSON) to run it against a real bucket, or any other URL ckptstore takes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import uuid
from collections.abc import Iterator
from typing import Any

BUCKET = "examples"


def arguments(description: str) -> argparse.ArgumentParser:
    """The examples' common command line: ``--remote`` and ``--storage-options``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--remote", help="a URL to write under (default: a local S3 server)")
    parser.add_argument("--storage-options", default="{}", help="JSON: fsspec options for --remote")
    return parser


@contextlib.contextmanager
def remote_base(args: argparse.Namespace) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(base URL, storage_options)``: the user's remote, or a fresh prefix on a local S3."""
    if args.remote:
        yield args.remote.rstrip("/"), json.loads(args.storage_options)
        return
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no per-request log lines
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {
            "key": "example",
            "secret": "example",
            "client_kwargs": {"endpoint_url": f"http://{host}:{port}"},
        }
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True, **options).mkdir(BUCKET)
        yield f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}", options
    finally:
        server.stop()
