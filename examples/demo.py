"""ckptstore demo: a training run is killed mid-flight and resumes from the remote alone.

What it does (``make demo``):

1. starts a local S3 server (moto) on 127.0.0.1, so no cloud account is needed
   (``--remote file`` uses a local directory as the remote instead);
2. runs a training process that checkpoints to ``s3://demo/run-1`` through
   ``ckptstore.CheckpointManager`` - the one line that differs from TensorFlow;
3. kills it with SIGKILL mid-run, as a preempted VM or recycled notebook would be;
4. starts a new process on an empty staging directory, which restores the newest
   committed checkpoint from the remote, checks the weights are exactly the ones
   the dead run had at that step, and trains on to the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from playground import committed, digest, local_s3

STEPS = 120
SAVE_EVERY = 10
KILL_AT = 75  # the dead run gets this far (and a little further) before SIGKILL


# --- the training script: what a user runs ------------------------------------------------


def fingerprint(model, optimizer) -> str:
    return digest(model.weights + list(optimizer.variables))


def train(remote: str, storage_options: dict, staging: str, journal: str, run: str) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf

    import ckptstore

    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential(
        [
            tf.keras.Input((32,)),
            tf.keras.layers.Dense(256, activation="relu"),
            tf.keras.layers.Dense(256, activation="relu"),
            tf.keras.layers.Dense(1),
        ]
    )
    optimizer = tf.keras.optimizers.Adam(1e-3)
    step = tf.Variable(0, dtype=tf.int64)
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step)
    optimizer.build(model.trainable_variables)

    # The one changed line: tf.train.CheckpointManager -> ckptstore.CheckpointManager.
    manager = ckptstore.CheckpointManager(
        ckpt, remote, max_to_keep=3, staging_dir=staging, storage_options=storage_options
    )
    restored = manager.restore_or_initialize()
    if restored:
        with open(journal) as f:
            seen = {int(k): v for k, v in json.load(f).items()}
        now = fingerprint(model, optimizer)
        same = seen.get(int(step.numpy())) == now
        print(
            f"[{run}] restored {os.path.basename(restored)} from the remote -> step "
            f"{int(step.numpy())}; weights and optimizer state identical to what the killed "
            f"run had at that step: {'YES' if same else 'NO'} ({now})",
            flush=True,
        )
        if not same:
            raise SystemExit("restored values differ from the saved ones")
    else:
        print(f"[{run}] nothing on the remote yet: starting from scratch", flush=True)

    rng = np.random.default_rng(int(step.numpy()))
    x = rng.standard_normal((256, 32)).astype("float32")
    y = x.sum(axis=1, keepdims=True)

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x) - y) ** 2)
        optimizer.apply_gradients(
            zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        )
        step.assign_add(1)
        return loss

    seen: dict[int, str] = {}
    if os.path.exists(journal):
        with open(journal) as f:
            seen = {int(k): v for k, v in json.load(f).items()}
    while int(step.numpy()) < STEPS:
        loss = train_step()
        s = int(step.numpy())
        if s % SAVE_EVERY == 0:
            t0 = time.perf_counter()
            path = manager.save()
            blocked = (time.perf_counter() - t0) * 1000
            seen[s] = fingerprint(model, optimizer)
            with open(journal, "w") as f:
                json.dump(seen, f)
            print(
                f"[{run}] step {s:3d}  loss {float(loss):8.4f}  saved {os.path.basename(path)} "
                f"(save() blocked {blocked:.0f} ms; upload continues in the background)",
                flush=True,
            )
        else:
            print(f"[{run}] step {s:3d}", flush=True)
        time.sleep(0.02)  # a real step takes longer; this keeps the demo short
    manager.close()  # waits until every checkpoint is verified and committed
    print(f"[{run}] trained to step {STEPS}; final checkpoint verified and committed", flush=True)


# --- the orchestrator: plays the cloud, the preemption and the new machine ------------------


def run_child(args: list[str], kill_at: int | None) -> None:
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        print(line, end="", flush=True)
        if kill_at is not None and line.split()[2:4] == ["step", str(kill_at)]:
            time.sleep(0.3)  # let it get a little further: mid-step, maybe mid-upload
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            print(
                f"\n*** SIGKILL: the training process died at about step {kill_at}, as a "
                "preempted VM or recycled notebook would ***\n",
                flush=True,
            )
            return
    if proc.wait() != 0:
        raise SystemExit(f"training process failed with exit code {proc.returncode}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--remote", choices=["s3", "file"], default="s3")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        remote, options, staging, journal, run = args.child
        train(remote, json.loads(options), staging, journal, run)
        return

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # the children's TensorFlow: quiet
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    work = tempfile.mkdtemp(prefix="ckptstore-demo-")
    with contextlib.ExitStack() as cloud:
        if args.remote == "s3":
            options = cloud.enter_context(local_s3("demo", key="demo"))  # stopped on leaving
            remote = "s3://demo/run-1"
            endpoint = options["client_kwargs"]["endpoint_url"]
            print(f"ckptstore demo: remote {remote} on a local S3 server at {endpoint}\n")
        else:
            options = {}
            remote = f"file://{work}/remote"
            print(f"ckptstore demo: remote {remote} (a local directory stands in for the cloud)\n")
        journal = os.path.join(work, "journal.json")  # only to check the values, never to restore
        run_child(
            ["--child", remote, json.dumps(options), f"{work}/staging-run1", journal, "run 1"],
            kill_at=KILL_AT,
        )
        print(f"committed on the remote after the kill: {', '.join(committed(remote, options))}")
        print(
            "[run 2] a new process with an EMPTY staging directory: everything comes from "
            "the remote\n",
            flush=True,
        )
        run_child(
            ["--child", remote, json.dumps(options), f"{work}/staging-run2", journal, "run 2"],
            kill_at=None,
        )
        print(f"\ncommitted on the remote at the end: {', '.join(committed(remote, options))}")
        print("demo OK: killed mid-run, resumed from the remote alone, values verified")


if __name__ == "__main__":
    main()
