"""Upload and restore throughput of a ~300 MB checkpoint to local S3 and GCS servers.

Run: ``.venv/bin/python benchmarks/upload_throughput.py [--size-mb 300] [--repeats 3]``

Servers run as separate processes on 127.0.0.1 (moto's ``moto_server`` and
fake-gcs-server), so client and server do not share one Python interpreter.
Per backend, medians over repeats, in the same run:

  tf+put       what users do today: tf.train.CheckpointManager.save() to local disk,
               then fsspec put_file of each file (training waits for both)
  ckptstore    save() (the blocking part) and the time until sync() returns, i.e.
               until the checkpoint is uploaded, verified by the service's CRC32C
               and committed
  restore      a new manager on an empty staging directory: list, download, verify
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import fsspec
import tensorflow as tf

import ckptstore
from moto_process import start_moto as start_moto_process
from save_blocking import checkpoint_bytes, make_checkpoint, touch
from servers.gcs import GCSServer  # before any gs:// URL: it sets gcsfs's environment


def start_moto() -> tuple[subprocess.Popen, dict]:
    proc, endpoint = start_moto_process()
    options = {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": endpoint}}
    fsspec.filesystem("s3", **options).mkdir("bench")
    return proc, options


def run_backend(name, url_base, options, ckpt, variables, repeats, work):
    rows: dict[str, list[float]] = {}
    fs, _ = fsspec.core.url_to_fs(url_base, **options)
    for r in range(repeats):
        # Baseline: TF's manager locally, then a synchronous upload of the files.
        tf_dir = os.path.join(work, f"tf-{name}-{r}")
        touch(variables)
        t0 = time.perf_counter()
        prefix = tf.train.CheckpointManager(ckpt, tf_dir, max_to_keep=1).save()
        for f in os.listdir(tf_dir):
            if f.startswith(os.path.basename(prefix) + "."):
                fs.put_file(os.path.join(tf_dir, f), f"{url_base}/plain-{r}/{f}")
        rows.setdefault("tf+put total", []).append(time.perf_counter() - t0)
        size = checkpoint_bytes(prefix)
        shutil.rmtree(tf_dir)

        url = f"{url_base}/run-{uuid.uuid4().hex[:8]}"
        staging = os.path.join(work, f"stage-{name}-{r}")
        m = ckptstore.CheckpointManager(
            ckpt, url, max_to_keep=1, staging_dir=staging, storage_options=options
        )
        touch(variables)
        t0 = time.perf_counter()
        m.save()
        t1 = time.perf_counter()
        m.sync()
        t2 = time.perf_counter()
        m.close()
        rows.setdefault("ckptstore save()", []).append(t1 - t0)
        rows.setdefault("ckptstore durable", []).append(t2 - t0)
        rows.setdefault("upload MB/s", []).append(size / 1e6 / (t2 - t1))

        fresh = os.path.join(work, f"fresh-{name}-{r}")
        t0 = time.perf_counter()
        restorer = ckptstore.CheckpointManager(
            ckpt, url, max_to_keep=1, staging_dir=fresh, storage_options=options
        )
        ckpt.restore(restorer.latest_checkpoint)
        t1 = time.perf_counter()
        restorer.close()
        rows.setdefault("restore MB/s", []).append(size / 1e6 / (t1 - t0))
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(fresh, ignore_errors=True)
    return size, {k: statistics.median(v) for k, v in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ckpt, variables = make_checkpoint(args.size_mb)
    work = tempfile.mkdtemp(prefix="ckptstore-tput-")
    moto, s3_options = start_moto()
    gcs = GCSServer().start()
    gcs.make_bucket("bench")
    try:
        results = {
            "s3 (moto)": run_backend(
                "s3", "s3://bench", s3_options, ckpt, variables, args.repeats, work
            ),
            "gcs (fake-gcs-server)": run_backend(
                "gcs", "gs://bench", gcs.storage_options(), ckpt, variables, args.repeats, work
            ),
        }
    finally:
        moto.terminate()
        gcs.stop()
        shutil.rmtree(work, ignore_errors=True)
    for backend, (size, row) in results.items():
        print(f"\n{backend}: {size / 1e6:.0f} MB checkpoint, median of {args.repeats}")
        for k, v in row.items():
            unit = "" if "MB/s" in k else " s"
            print(f"  {k:<20}{v:10.2f}{unit}")
        print(
            f"  {'blocking ratio':<20}{row['ckptstore save()'] / row['tf+put total']:10.2f}"
            "  (ckptstore save() / tf save + synchronous upload)"
        )


if __name__ == "__main__":
    main()
