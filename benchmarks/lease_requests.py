"""Requests per committed checkpoint on S3: what the writer lease costs on the wire.

Every request of a steady-state save (upload, verify, commit, state file, lease,
retirement) passes through the test suite's proxy, which counts them by method.
The lease adds small PUTs (a few hundred bytes each, in the background thread);
this says how many.

    .venv/bin/python benchmarks/lease_requests.py [--saves 10] [--max-to-keep 2]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ckptstore
from servers.faultproxy import FaultProxy
from servers.s3 import S3Server
from training import TrainState


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=10, help="steady-state saves to count")
    parser.add_argument("--max-to-keep", type=int, default=2)
    args = parser.parse_args()

    server = S3Server().start()
    server.make_bucket("lease-bench")
    seen: collections.Counter[str] = collections.Counter()

    def count(method: str, target: str, headers: object) -> bool:
        seen[method] += 1
        return False  # never a fault: the proxy only counts

    port = int(server.endpoint_url.rsplit(":", 1)[1])
    proxy = FaultProxy("127.0.0.1", port, fault_filter=count).start()
    state = TrainState()
    try:
        with ckptstore.CheckpointManager(
            state.checkpoint,
            f"s3://lease-bench/{uuid.uuid4().hex}",
            max_to_keep=args.max_to_keep,
            staging_dir=tempfile.mkdtemp(),
            storage_options=server.storage_options(proxy.endpoint_url),
        ) as manager:
            warm_up = args.max_to_keep + 1  # the writer's start and the first retirements
            for step in range(1, warm_up + 1):
                state.advance_to(step)
                manager.save()
                manager.sync()
            seen.clear()
            for step in range(warm_up + 1, warm_up + args.saves + 1):
                state.advance_to(step)
                manager.save()
                manager.sync()
    finally:
        proxy.stop()
        server.stop()
    per_save = {method: n / args.saves for method, n in sorted(seen.items())}
    print(f"requests per steady-state checkpoint (max_to_keep={args.max_to_keep}): {per_save}")


if __name__ == "__main__":
    main()
