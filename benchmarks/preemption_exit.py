"""From SIGTERM to exit under TensorFlow's preemption handler: ckptstore on a slow link, TF local.

Run: ``.venv/bin/python benchmarks/preemption_exit.py [--quick]`` (``--help`` lists the knobs).
Results go to ``benchmarks/results/preemption_exit.{md,json}``.

A training process runs the loop TensorFlow documents for preemptible machines: every step
through ``tf.distribute.experimental.PreemptionCheckpointHandler.run()``, the handler made from a
``TFConfigClusterResolver`` (one machine), TensorFlow's default ``TerminationConfig`` (no grace
period; ``exit_fn`` is ``sys.exit(42)``). The checkpoint is ``slow_link.py``'s: five weights plus
Adam-style slots, ``--size-mb`` MiB (256 by default). Before the measured part the run has saved
a backup (``manager.save()``) that is committed, as a run that has been going for a while has.
Then this script sends SIGTERM and measures, from the signal to the process's end:

  ckptstore            ``ckptstore.CheckpointManager("s3://...")`` over ``link.py``'s link
                       (moto's S3 in its own process behind the test suite's throttling proxy,
                       ``--bandwidth-mb`` MB/s each way, 40 by default, ``--latency-ms`` per
                       request): the handler's save writes to local staging, then ckptstore
                       uploads, verifies and commits it before ``save()`` returns, and the
                       handler exits. Exit with a committed checkpoint.
  ckptstore, backup    the same, with a backup save made right before the signal whose upload
    in flight          has not finished: the handler's checkpoint is uploaded after it.
  tf local             ``tf.train.CheckpointManager`` to a directory on local disk under the same
                       handler: the floor (TensorFlow's write, then exit), with a checkpoint
                       that is only on the disk of the machine being reclaimed.

Each system runs ``--repeats`` times (3), each time in a fresh process on a fresh remote prefix;
the median, min and max are reported, with the split between the signal and ``exit_fn``
(TensorFlow's save, plus ckptstore's upload and commit) and from ``exit_fn`` to the process's
end (the interpreter's shutdown, ckptstore's exit drain). After each ckptstore run the remote is
checked, straight to the server: the handler's checkpoint has its manifest, and its files add
up to the checkpoint's size.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from link import (  # noqa: E402
    BUCKET,
    MB,
    MiB,
    add_link_arguments,
    add_run_arguments,
    open_link,
    write_results,
)
from slow_link import make_checkpoint  # noqa: E402

SYSTEMS = ("ckptstore", "ckptstore, backup in flight", "tf local")
TF_EXIT_STATUS = 42
STEP_SECONDS = 0.05  # a training step, paced; the handler saves at the first boundary after SIGTERM


# --------------------------------------------------------------------------- the training process


def worker(cfg: dict) -> None:
    """Train under the handler until SIGTERM; print ``ready`` once the backup is committed."""
    import tensorflow as tf

    import ckptstore

    tf.get_logger().setLevel("ERROR")  # the handler's own deprecation warning
    ckpt, variables = make_checkpoint(cfg["size_mb"])
    small = min(variables, key=lambda v: int(tf.size(v)))
    if cfg["system"] == "tf local":
        manager = tf.train.CheckpointManager(ckpt, cfg["local_dir"], max_to_keep=3)
    else:
        manager = ckptstore.CheckpointManager(
            ckpt,
            cfg["url"],
            max_to_keep=3,
            staging_dir=cfg["staging"],
            storage_options=cfg["slow"],
        )
    handler = tf.distribute.experimental.PreemptionCheckpointHandler(
        tf.distribute.cluster_resolver.TFConfigClusterResolver(), manager
    )

    @tf.function
    def train_step():
        small.assign_add(tf.ones_like(small) * 1e-3)
        ckpt.optimizer.iterations.assign_add(1)

    manager.save()  # the backup a running job has: committed before the measured part
    if cfg["system"] != "tf local":
        manager.sync()
    for _ in range(3):
        handler.run(train_step)
    if cfg["system"] == "ckptstore, backup in flight":
        manager.save()  # its 256 MB are still on the link when the signal comes
    print("ready", flush=True)
    try:
        while True:
            started = time.monotonic()
            handler.run(train_step)
            time.sleep(max(0.0, STEP_SECONDS - (time.monotonic() - started)))
    except SystemExit:
        print(f"exit_fn {time.time():.6f}", flush=True)
        raise


def run_once(system: str, cfg: dict, direct: dict) -> dict:
    """One process: SIGTERM once it is ready; the times, and whether the checkpoint is there."""
    import fsspec

    work = tempfile.mkdtemp(prefix="ckptstore-preempt-")
    prefix = f"{BUCKET}/preempt-{uuid.uuid4().hex[:8]}"
    run_cfg = {
        **cfg,
        "system": system,
        "url": f"s3://{prefix}",
        "staging": os.path.join(work, "staging"),
        "local_dir": os.path.join(work, "local"),
    }
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    try:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", json.dumps(run_cfg)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-4000:]
        time.sleep(5 * STEP_SECONDS)  # a few steps of training, then the platform's signal
        signalled, signalled_wall = time.monotonic(), time.time()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=600)
        gone = time.monotonic() - signalled
        found = re.search(r"exit_fn (\d+\.\d+)", out)
        if proc.returncode != TF_EXIT_STATUS or not found:
            raise SystemExit(f"{system}: exited with {proc.returncode}\n{err[-4000:]}")
        result = {
            "signal_to_exit": gone,
            "signal_to_exit_fn": float(found[1]) - signalled_wall,
            "checkpoint_bytes": None,
        }
        if system == "tf local":
            with open(os.path.join(run_cfg["local_dir"], "checkpoint")) as f:
                state = f.read()
            latest = re.search(r'^model_checkpoint_path: "(.*)"', state, re.M)[1]
            result["checkpoint"] = os.path.basename(latest)
            result["checkpoint_bytes"] = sum(
                os.path.getsize(os.path.join(run_cfg["local_dir"], n))
                for n in os.listdir(run_cfg["local_dir"])
                if n.startswith(result["checkpoint"] + ".")
            )
            result["committed"] = True  # on this machine's disk only
        else:
            name = re.findall(r"preempted; committing (ckpt-\d+)", err)[-1]
            fs = fsspec.filesystem("s3", skip_instance_cache=True, **direct)
            manifest = json.loads(fs.cat_file(f"{prefix}/{name}.manifest.json"))
            result["checkpoint"] = name
            result["checkpoint_bytes"] = sum(f["size"] for f in manifest["files"])
            upload = re.search(rf"{name} committed to \S+ in (\d+\.\d+) s", err)
            result["commit_wait"] = float(upload[1]) if upload else None
            result["committed"] = (
                f"ckptstore: {name} committed" in err
                and result["checkpoint_bytes"] >= cfg["size_mb"] * MiB
            )
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- report


def summarize(runs: list[dict]) -> dict:
    def stats(key: str) -> dict | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        if not values:
            return None
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    return {
        "runs": runs,
        "signal_to_exit": stats("signal_to_exit"),
        "signal_to_exit_fn": stats("signal_to_exit_fn"),
        "commit_wait": stats("commit_wait"),
        "committed": sum(bool(r["committed"]) for r in runs),
    }


def report(results: dict, link: dict, cfg: dict) -> str:
    lines = [
        f"Checkpoint {cfg['size_mb']} MiB ({cfg['size_mb'] * MiB / MB:.0f} MB), link capped at "
        f"{cfg['bandwidth_mb']:.0f} MB/s + {cfg['latency_ms']:.0f} ms per request; measured "
        f"{link['up'] / MB:.1f} MB/s up, {link['down'] / MB:.1f} MB/s down. "
        f"{cfg['repeats']} runs per system, each in a fresh process; TensorFlow's default "
        f"TerminationConfig (exit status {TF_EXIT_STATUS}, no grace period); {os.cpu_count()} "
        f"cores, the S3 server and the proxy at nice {cfg['server_nice']}.",
        "",
        "| system | SIGTERM to exit, median | min | max | SIGTERM to exit_fn (save + commit) "
        "| exit_fn to exit | checkpoint after exit |",
        "|---|---|---|---|---|---|---|",
    ]
    for system, r in results.items():
        total, to_fn = r["signal_to_exit"], r["signal_to_exit_fn"]
        after = statistics.median(x["signal_to_exit"] - x["signal_to_exit_fn"] for x in r["runs"])
        where = (
            "on the local disk of the machine being reclaimed"
            if system == "tf local"
            else f"committed on the remote ({r['committed']} of {len(r['runs'])} runs)"
        )
        lines.append(
            f"| {system} | {total['median']:.2f} s | {total['min']:.2f} s | {total['max']:.2f} s "
            f"| {to_fn['median']:.2f} s | {after:.2f} s | {where} |"
        )
    up = link["up"]
    lines += [
        "",
        f"One checkpoint crosses the measured link in {cfg['size_mb'] * MiB / up:.1f} s "
        f"({cfg['size_mb'] * MiB / MB:.0f} MB / {up / MB:.1f} MB/s). The handler saves at the "
        f"first step boundary after the signal (steps here are {STEP_SECONDS * 1000:.0f} ms), "
        "writes the checkpoint locally, and ckptstore's save() returns once it is committed; "
        "then exit_fn (sys.exit) runs, and the interpreter's exit (TensorFlow's teardown "
        "included) ends the process. With a backup upload in flight, the handler's checkpoint "
        "waits behind it: a platform's grace period must cover both, or the newest checkpoint "
        "committed before the kill is the one that survives.",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=256, help="checkpoint size (MiB)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per system")
    add_link_arguments(parser)
    add_run_arguments(parser, "preemption_exit", "64 MiB, 1 run: a smoke run")
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.quick:
        args.size_mb, args.repeats = 64, 1

    with open_link(args) as (_, direct, slow, link):
        cfg = {
            "size_mb": args.size_mb,
            "repeats": args.repeats,
            "bandwidth_mb": args.bandwidth_mb,
            "latency_ms": args.latency_ms,
            "server_nice": args.server_nice,
            "slow": slow,
        }
        results = {}
        for system in SYSTEMS:
            runs = []
            for i in range(args.repeats):
                runs.append(run_once(system, cfg, direct))
                print(
                    f"{system} run {i + 1}: SIGTERM to exit {runs[-1]['signal_to_exit']:.2f} s, "
                    f"{runs[-1]['checkpoint']} ({runs[-1]['checkpoint_bytes'] / MB:.0f} MB) "
                    f"{'committed' if runs[-1]['committed'] else 'NOT committed'}",
                    flush=True,
                )
            results[system] = summarize(runs)
    text = report(results, link, cfg)
    write_results(args.out, text, cfg, link, indent=1, results=results)
    print("\n" + text)
    print(f"\nwritten: {args.out}.md, .json")


if __name__ == "__main__":
    main()
