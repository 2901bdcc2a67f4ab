"""How long save() blocks training: ckptstore against tf.train.CheckpointManager, same disk.

Run: ``make bench``, or
``.venv/bin/python benchmarks/save_blocking.py [--size-mb 256] [--repeats 9]``

Every figure is a median over repeats, measured in the same run as TensorFlow's
own manager writing to the same disk, and reported as a ratio against it (the
machines here are shared and noisy: absolute times mean little, ratios do).

Systems:
  tf-local        tf.train.CheckpointManager on a local directory (the floor)
  ckptstore-local ckptstore.CheckpointManager on the same kind of directory (plain path)
  ckptstore-file  ckptstore with a file:// remote on the same disk: save() covers the
                  local write only; upload, verify and commit run in the background
                  and are waited for (untimed) before the next save, so each save
                  is measured alone
  ckptstore-busy  as ckptstore-file, but the next save comes while the previous
                  upload may still run (a short training interval): the foreground
                  cost of sharing the disk and CPU with the background work
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf

import ckptstore


def make_checkpoint(size_mb: int) -> tuple[tf.train.Checkpoint, list[tf.Variable]]:
    """Variables of varied sizes adding up to ``size_mb``, plus an optimizer's slots."""
    total = size_mb * 1024 * 1024 // 4  # float32 elements
    # Model weights take half; Adam's two slots per variable take the other half.
    fractions = [0.5, 0.25, 0.15, 0.07, 0.03]
    weights_elems = total // 3
    rng = np.random.default_rng(0)
    variables = []
    for i, f in enumerate(fractions):
        n = max(1, int(weights_elems * f))
        variables.append(tf.Variable(rng.standard_normal(n, dtype=np.float32), name=f"w{i}"))
    optimizer = tf.keras.optimizers.Adam()
    optimizer.build(variables)
    ckpt = tf.train.Checkpoint(weights=variables, optimizer=optimizer)
    return ckpt, variables


def checkpoint_bytes(prefix: str) -> int:
    d = os.path.dirname(prefix)
    base = os.path.basename(prefix) + "."
    return sum(os.path.getsize(os.path.join(d, n)) for n in os.listdir(d) if n.startswith(base))


def touch(variables: list[tf.Variable]) -> None:
    """A 'training step': change the values so every save writes new data."""
    for v in variables:
        v.assign_add(tf.ones_like(v) * 1e-3)


def measure(name: str, manager, variables, repeats: int, settle, interval: float) -> list[float]:
    times = []
    for _ in range(repeats):
        touch(variables)
        t0 = time.perf_counter()
        manager.save()
        times.append(time.perf_counter() - t0)
        if settle is not None:
            settle()
        if interval:
            time.sleep(interval)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()

    base = tempfile.mkdtemp(prefix="ckptstore-bench-", dir=args.dir)
    ckpt, variables = make_checkpoint(args.size_mb)
    results: dict[str, list[float]] = {}
    try:
        tf_manager = tf.train.CheckpointManager(ckpt, os.path.join(base, "tf"), max_to_keep=2)
        tf_manager.save()  # warm-up: graph tracing, first-file costs
        size = checkpoint_bytes(tf_manager.latest_checkpoint)
        print(
            f"checkpoint: {size / 1e6:.0f} MB in {len(variables)} variables + Adam slots; "
            f"{args.repeats} saves per system; TF {tf.__version__}; {sys.platform}"
        )

        local = ckptstore.CheckpointManager(ckpt, os.path.join(base, "cs-local"), max_to_keep=2)
        remote = ckptstore.CheckpointManager(
            ckpt, f"file://{base}/remote", max_to_keep=2, staging_dir=os.path.join(base, "staging")
        )
        busy = ckptstore.CheckpointManager(
            ckpt,
            f"file://{base}/remote-busy",
            max_to_keep=2,
            staging_dir=os.path.join(base, "staging-busy"),
        )
        local.save()
        remote.save()
        remote.sync()
        busy.save()
        busy.sync()
        systems = [
            ("tf-local", tf_manager, None, 0.0),
            ("ckptstore-local", local, None, 0.0),
            ("ckptstore-file", remote, remote.sync, 0.0),
            ("ckptstore-busy", busy, None, 0.05),
        ]
        # Interleave the systems round by round and rotate who goes first: the first
        # writer of a round pays for the page-cache writeback of the round before.
        for round_no in range(args.repeats):
            k = round_no % len(systems)
            for name, manager, settle, interval in systems[k:] + systems[:k]:
                results.setdefault(name, []).extend(
                    measure(name, manager, variables, 1, settle, interval)
                )
        busy.sync()
        for m in (local, remote, busy):
            m.close()
        assert remote.upload_status().failed == {}, remote.upload_status()
    finally:
        shutil.rmtree(base, ignore_errors=True)

    floor = statistics.median(results["tf-local"])
    order = ["tf-local", "ckptstore-local", "ckptstore-file", "ckptstore-busy"]
    results = {name: results[name] for name in order}
    print(f"\n{'system':<18}{'median save() s':>16}{'min':>8}{'max':>8}{'ratio to tf-local':>20}")
    for name, times in results.items():
        med = statistics.median(times)
        print(f"{name:<18}{med:>16.3f}{min(times):>8.3f}{max(times):>8.3f}{med / floor:>20.2f}")


if __name__ == "__main__":
    main()
