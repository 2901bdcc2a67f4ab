"""Two workers under MultiWorkerMirroredStrategy on one machine: the chief uploads, both resume.

What it shows: a multi-worker training script runs the same code on every worker, and every
worker calls the same ``manager.save()`` (TensorFlow needs them all for a save: variables are
all-reduced while they are written). With ckptstore every worker opens a manager on the same URL;
the strategy decides who writes, as TensorFlow does (``strategy.extended.should_checkpoint``):

* the chief (worker 0) stages each checkpoint, uploads it in the background, verifies it and
  commits it, like a single-machine run;
* the other worker writes its copy where TensorFlow's convention puts a non-chief's
  (``workertemp_<task_id>``, in a private directory under its staging directory), deletes it
  right after, and never writes to the remote: it only reads it, to restore.

The script starts both workers itself, each a process with its own ``TF_CONFIG`` (a two-worker
cluster on 127.0.0.1) and its own staging directory, as two machines would have:

1. run 1 trains and checkpoints every SAVE_EVERY steps; once the remote holds a committed
   checkpoint and the chief passed step KILL_AT, both are SIGKILLed, as preempted VMs are;
2. run 2 starts both again, each on an EMPTY staging directory (new machines). Both restore the
   newest committed checkpoint from the remote: the same one, with the same weights, the ones
   the chief had when it saved it. Then they train to the end.

It checks that only the chief uploaded (each manager's byte count, and the writer named in every
manifest and in the lease), that both workers restored the same checkpoint, the newest committed
at the kill, with the chief's weights of that step bit for bit, and exits non-zero otherwise.

Run it (no arguments: a local S3 server on 127.0.0.1, moto, so no cloud account is needed;
about 20 s)::

    python examples/two_workers.py
    python examples/two_workers.py --remote s3://my-bucket/examples \\
        --storage-options '{"profile": "dev"}'

With ``--remote`` it writes under ``<remote>/two-workers-<id>/`` and leaves those checkpoints
there. The last line is ``example OK: ...`` on success.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import playground

STEPS = 60
SAVE_EVERY = 5
KILL_AT = 25  # run 1 is killed once the chief passed this step with a checkpoint committed
PACE = 0.03  # seconds per step: a real step takes longer; this keeps the example short
GLOBAL_BATCH = 32
TIMEOUT = 60.0  # seconds a run may take (TensorFlow's start-up included)


# --- the training script: what a user writes, the same on every worker ----------------------


def batch(step: int, task: int):
    """This worker's share of the global batch of ``step`` (a function of the step and task)."""
    import numpy as np

    rng = np.random.default_rng(step * 100 + task)
    x = rng.standard_normal((GLOBAL_BATCH // 2, 8)).astype("float32")
    return x, np.sin(x).sum(axis=1, keepdims=True).astype("float32")


def train(url: str, storage_options: dict, name: str) -> None:
    import tensorflow as tf

    import ckptstore

    strategy = tf.distribute.MultiWorkerMirroredStrategy()  # the cluster comes from TF_CONFIG
    task = strategy.cluster_resolver.task_id
    with strategy.scope():
        model = tf.keras.Sequential(
            [
                tf.keras.Input((8,)),
                tf.keras.layers.Dense(16, activation="relu"),
                tf.keras.layers.Dense(1),
            ]
        )
        optimizer = tf.keras.optimizers.Adam(1e-2)
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64)
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step)

    # The one changed line, the same on every worker. With TensorFlow it reads:
    #   manager = tf.train.CheckpointManager(ckpt, "/shared/disk/ckpts", max_to_keep=3)
    manager = ckptstore.CheckpointManager(ckpt, url, max_to_keep=3, storage_options=storage_options)
    chief = strategy.extended.should_checkpoint  # TensorFlow's answer, and ckptstore's
    if chief:
        print(f"[{name}] the chief: it uploads and commits to {url}", flush=True)
    else:
        print(
            f"[{name}] not the chief: each save goes to workertemp_{task} under "
            f"{manager.staging_dir} and is deleted; it never writes to {url}",
            flush=True,
        )

    ckpt.restore(manager.latest_checkpoint)  # every worker: the same committed checkpoint
    values = model.weights + list(optimizer.variables)
    if manager.latest_checkpoint:
        print(
            f"[{name}] restored {os.path.basename(manager.latest_checkpoint)}: "
            f"step {int(step.numpy())}, weights {playground.digest(values)}",
            flush=True,
        )
    else:
        print(f"[{name}] nothing on {url} yet: initializing from scratch", flush=True)

    @tf.function
    def train_step(x, y):
        def replica_step(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum((model(x) - y) ** 2) / GLOBAL_BATCH
            gradients = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, model.trainable_variables))

        strategy.run(replica_step, args=(x, y))
        step.assign_add(1)

    while int(step.numpy()) < STEPS:
        train_step(*batch(int(step.numpy()), task))
        if int(step.numpy()) % SAVE_EVERY == 0:
            path = manager.save(checkpoint_number=int(step.numpy()))  # every worker calls it
            status = manager.upload_status()
            where = (
                f"committed so far: {', '.join(status.committed) or '-'}"
                if chief
                else f"(written in workertemp_{task}, deleted)"
            )
            print(
                f"[{name}] step {int(step.numpy()):2d}  saved {os.path.basename(path)}  "
                f"weights {playground.digest(values)}  {where}  "
                f"bytes uploaded: {status.bytes_uploaded}",
                flush=True,
            )
        time.sleep(PACE)
    manager.sync()  # the chief: every save verified and committed; the other: its writes done
    status = manager.upload_status()
    print(
        f"[{name}] trained to step {int(step.numpy())}; uploaded {status.bytes_uploaded} bytes; "
        f"writer of the run: {manager.is_writer}",
        flush=True,
    )
    manager.close()


# --- the orchestrator: two machines, played by two processes, killed and restarted ----------


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_cluster(work: str, url: str, options: dict, run: str) -> list[subprocess.Popen]:
    """Both workers, each with its TF_CONFIG and a fresh, empty staging base (a new machine)."""
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        procs.append(
            playground.start_child(
                __file__,
                work,
                f"{run} worker {index}",
                {"url": url, "options": options},
                env={"TF_CONFIG": json.dumps(tf_config)},
            )
        )
    return procs


def relay(procs: list[subprocess.Popen], kill_when=None) -> tuple[list[str], bool]:
    """Print both workers' lines as they come; SIGKILL both once ``kill_when(line)`` is true.

    Returns every line, and whether they were killed.
    """
    lines: queue.Queue = queue.Queue()

    def read(proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    for proc in procs:
        threading.Thread(target=read, args=(proc,), daemon=True).start()
    seen, open_pipes, killed = [], len(procs), False
    deadline = time.monotonic() + TIMEOUT
    while open_pipes:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            for proc in procs:
                proc.kill()
            playground.fail(f"the workers did not finish in {TIMEOUT:.0f} s")
        if line is None:
            open_pipes -= 1
            continue
        print(line, flush=True)
        seen.append(line)
        if kill_when is not None and not killed and kill_when(line):
            for proc in procs:
                proc.send_signal(signal.SIGKILL)
            killed = True
            print(
                "\n*** SIGKILL to both workers, as preempted machines (no close(), no exit "
                "handler) ***\n",
                flush=True,
            )
    for proc in procs:
        code = proc.wait()
        if not killed and code != 0:
            playground.fail(f"a worker exited with {code}")
    return seen, killed


def manifests(url: str, options: dict) -> dict[str, dict]:
    """The checkpoints committed on the remote, oldest first, with their manifests."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **options)
    return {
        n: json.loads(fs.cat_file(f"{root}/{n}.manifest.json"))
        for n in playground.committed(url, options)
    }


def lease_pid(url: str, options: dict) -> int:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **options)
    return int(json.loads(fs.cat_file(f"{root}/ckptstore.lease.json"))["pid"])


def main() -> None:
    args = playground.arguments(__doc__.split("\n\n")[0]).parse_args()
    work = tempfile.mkdtemp(prefix="ckptstore-two-workers-")
    with playground.remote_base(args, "two-workers") as (url, options):
        print(f"two workers, one machine: checkpoints to {url}\n")

        # Run 1: killed once the chief (worker 0) passed KILL_AT with a commit on the remote.
        def chief_far_enough(line: str) -> bool:
            m = re.match(r"\[run 1 worker 0\] step +(\d+) .* committed so far: (\S+)", line)
            return bool(m) and int(m[1]) >= KILL_AT and m[2] != "-"

        run1 = start_cluster(work, url, options, "run 1")
        lines1, killed = relay(run1, chief_far_enough)
        if not killed:
            playground.fail("run 1 trained to the end, never killed")
        before = manifests(url, options)
        newest = list(before)[-1]
        print(f"committed on the remote after the kill: {', '.join(before)}")
        chief_saves = {
            m[1]: m[2]
            for m in (
                re.match(r"\[run 1 worker 0\] step +\d+  saved (\S+)  weights (\w+)", x)
                for x in lines1
            )
            if m
        }
        worker_bytes = [
            int(m[1])
            for m in (re.search(r"\[run 1 worker 1\] .*bytes uploaded: (\d+)", x) for x in lines1)
            if m
        ]
        print("\nrun 1, only the chief wrote the remote:")
        playground.check(
            "worker 1 saved every time, and uploaded 0 bytes",
            bool(worker_bytes) and set(worker_bytes) == {0},
        )
        playground.check(
            f"every committed checkpoint was written by worker 0 (pid {run1[0].pid})",
            all(m["writer"]["pid"] == run1[0].pid for m in before.values()),
        )
        playground.check("the writer lease is worker 0's", lease_pid(url, options) == run1[0].pid)

        # Run 2: both restart on empty staging directories; both restore the same commit.
        print(
            "\n[run 2] both workers again, each on an EMPTY staging directory: the remote alone\n"
        )
        run2 = start_cluster(work, url, options, "run 2")
        lines2, _ = relay(run2)
        restored = [
            m.groups()
            for m in (
                re.match(r"\[run 2 worker \d\] restored (\S+): step \d+, weights (\w+)", x)
                for x in lines2
            )
            if m
        ]
        after = manifests(url, options)
        print("\nrun 2:")
        playground.check(
            f"both workers restored {newest}, the newest commit at the kill",
            [r[0] for r in restored] == [newest] * 2,
        )
        playground.check(
            f"both restored the weights the chief saved in {newest}, bit for bit",
            [r[1] for r in restored] == [chief_saves.get(newest)] * 2,
        )
        new = [n for n in after if n not in before]
        playground.check(
            f"the new commits ({', '.join(new)}) were written by worker 0 (pid {run2[0].pid})",
            bool(new) and all(after[n]["writer"]["pid"] == run2[0].pid for n in new),
        )
        ends = [x for x in lines2 if re.match(r"\[run 2 worker \d\] trained to step", x)]
        playground.check(
            f"both trained to step {STEPS}; worker 1 uploaded 0 bytes and never was the writer",
            len(ends) == 2
            and all(f"trained to step {STEPS};" in x for x in ends)
            and any(
                x.startswith("[run 2 worker 1]")
                and "uploaded 0 bytes" in x
                and x.endswith("writer of the run: False")
                for x in ends
            ),
        )
    print(
        f"example OK: only the chief uploaded; after both workers were killed, both restored "
        f"{newest} from the remote on empty staging directories, with the chief's weights bit for "
        f"bit, and trained to step {STEPS}"
    )
    shutil.rmtree(work)  # staging directories; kept when the example fails


if __name__ == "__main__":
    child = playground.child_parameters()
    if child is not None:
        train(child["url"], child["options"], child["name"])
    else:
        main()
