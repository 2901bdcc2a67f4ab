"""A custom training loop with a step counter, killed mid-run and resumed from the remote alone.

What it shows: the loop people write with ``tf.train.CheckpointManager`` (a ``tf.Variable``
step inside the ``tf.train.Checkpoint``, ``step_counter=step``, ``checkpoint_interval=N``,
``manager.save(check_interval=True)`` after every step, ``ckpt.restore(manager.latest_checkpoint)``
at start) runs unchanged on ckptstore, except for one line: the manager's class and its
directory, now a URL. It survives the machine:

1. run 1 trains and checkpoints to ``<remote>/resumed``; it is SIGKILLed mid-run, as a
   preempted VM or a recycled notebook runtime would be (once the remote holds a checkpoint);
2. run 2 is a new process on an EMPTY staging directory, as on a new machine: it restores the
   newest committed checkpoint from the remote and trains to the end;
3. the reference is the same script, never killed, writing to ``<remote>/uninterrupted``
   (it runs beside run 1).

The example then checks that the resumed run ends with exactly the uninterrupted run's model
weights, optimizer state (Adam's iterations and slots) and step, bit for bit, and exits non-zero
otherwise. No tolerance is needed: both runs compute the same float operations on the same
inputs (the data of a step depends on the step alone, the model and optimizer on CPU with
``tf.config.experimental.enable_op_determinism()`` and oneDNN off), and a restore gives back
exactly the bytes that were saved, so the steps the resumed run repeats produce the same values.

Run it (no arguments: a local S3 server on 127.0.0.1, moto, so no cloud account is needed;
about 15 s)::

    python examples/custom_loop_resume.py
    python examples/custom_loop_resume.py --remote s3://my-bucket/examples \\
        --storage-options '{"profile": "dev"}'

With ``--remote`` it writes under ``<remote>/custom-loop-<id>/`` and leaves those checkpoints
there. The last line is ``example OK: ...`` on success.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

STEPS = 160
SAVE_EVERY = 10  # checkpoint_interval, in steps of the step counter
KILL_AT = 95  # run 1 is killed at the first step past this with a checkpoint on the remote
PACE = 0.02  # seconds per step: a real step takes longer; this keeps the example short
CHILD_ENV = "CKPTSTORE_EXAMPLE_CHILD"  # the child's parameters (JSON), kept out of argv


# --- the training script: what a user writes -------------------------------------------------


def batch(step: int):
    """The data of one step, a function of the step alone (a deterministic input pipeline)."""
    import numpy as np

    rng = np.random.default_rng(step)
    x = rng.standard_normal((64, 16)).astype("float32")
    y = np.sin(x).sum(axis=1, keepdims=True).astype("float32")
    return x, y


def train(url: str, storage_options: dict, result: str, name: str) -> None:
    import numpy as np
    import tensorflow as tf

    import ckptstore

    tf.keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()
    model = tf.keras.Sequential(
        [
            tf.keras.Input((16,)),
            tf.keras.layers.Dense(64, activation="relu"),
            tf.keras.layers.Dense(64, activation="relu"),
            tf.keras.layers.Dense(1),
        ]
    )
    optimizer = tf.keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    step = tf.Variable(0, dtype=tf.int64)
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step)

    # The one changed line. With TensorFlow it reads:
    #   manager = tf.train.CheckpointManager(ckpt, "./tf_ckpts", max_to_keep=3, ...)
    manager = ckptstore.CheckpointManager(
        ckpt,
        url,
        max_to_keep=3,
        step_counter=step,
        checkpoint_interval=SAVE_EVERY,
        storage_options=storage_options,
    )
    ckpt.restore(manager.latest_checkpoint)  # a new machine: downloads and verifies it first
    if manager.latest_checkpoint:
        print(
            f"[{name}] restored {os.path.basename(manager.latest_checkpoint)} from {url} -> "
            f"step {int(step)} (staging {manager.staging_dir})",
            flush=True,
        )
    else:
        print(f"[{name}] nothing on {url} yet: initializing from scratch", flush=True)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x) - y) ** 2)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        step.assign_add(1)
        return loss

    while int(step) < STEPS:
        loss = train_step(*batch(int(step)))
        # TensorFlow's interval rule: the first save() of a process saves at once, then one
        # every SAVE_EVERY steps; the other calls return None.
        path = manager.save(check_interval=True)
        if path:
            print(
                f"[{name}] step {int(step):3d}  loss {float(loss):.5f}  "
                f"saved {os.path.basename(path)} (the upload continues in the background)",
                flush=True,
            )
        elif int(step) % 5 == 0:
            print(f"[{name}] step {int(step):3d}  loss {float(loss):.5f}", flush=True)
        time.sleep(PACE)
    path = manager.save(check_interval=False)  # the final state, whatever the interval says
    if path:
        print(
            f"[{name}] step {int(step):3d}  final state saved {os.path.basename(path)}", flush=True
        )
    manager.sync()  # ckptstore's addition: returns once every save is verified and committed
    print(f"[{name}] trained to step {int(step)}; every checkpoint committed", flush=True)

    # Not user code: hand the final values to the orchestrator, which compares the runs.
    final = model.weights + list(optimizer.variables)
    arrays = {f"{i:02d}-{v.path.replace('/', '.')}": v.numpy() for i, v in enumerate(final)}
    np.savez(result, **arrays, step=step.numpy())


# --- the orchestrator: plays the preemption and the new machine -------------------------------


def committed(url: str, options: dict) -> list[str]:
    """The checkpoints committed on the remote (ckptstore commits each one by its manifest)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **options)
    fs.invalidate_cache()
    try:
        names = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    suffix = ".manifest.json"
    found = [p.rsplit("/", 1)[-1][: -len(suffix)] for p in names if p.endswith(suffix)]
    return sorted(found, key=lambda n: int(n.rsplit("-", 1)[-1]))


def start_child(work: str, url: str, options: dict, name: str, **popen) -> subprocess.Popen:
    key = name.replace(" ", "-")
    staging = os.path.join(work, f"machine-{key}")  # a fresh, empty staging base per process
    env = dict(os.environ, CKPTSTORE_STAGING_DIR=staging)
    env[CHILD_ENV] = json.dumps(
        {"url": url, "options": options, "result": os.path.join(work, f"{key}.npz"), "name": name}
    )
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    return subprocess.Popen([sys.executable, __file__], env=env, text=True, **popen)


def relay(proc: subprocess.Popen, kill_at: int | None = None, url: str = "", options=None):
    """Print a child's lines; SIGKILL it at the first step past ``kill_at`` once the remote
    holds a checkpoint. Return its lines and the step it was killed at (None: it ran to the end).
    """
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line)
        m = re.match(r"\[[^]]+\] step +(\d+)", line)
        if kill_at is not None and m and int(m[1]) >= kill_at and committed(url, options):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            print(
                f"\n*** SIGKILL: run 1 died at about step {m[1]}, as a preempted machine would "
                "(no close(), no exit handler) ***\n",
                flush=True,
            )
            return lines, int(m[1])
    if proc.wait() != 0:
        raise SystemExit(f"example FAILED: a training process exited with {proc.returncode}")
    return lines, None


def compare(resumed: str, reference: str) -> list[str]:
    """What differs between two runs' final values (nothing, when the resume is exact)."""
    import numpy as np

    with np.load(resumed) as a, np.load(reference) as b:
        if sorted(a.files) != sorted(b.files):
            return [f"{sorted(a.files)} against {sorted(b.files)}"]
        return [
            f"{k}: max |difference| {np.max(np.abs(a[k] - b[k]))}"
            for k in sorted(a.files)
            if a[k].shape != b[k].shape or not np.array_equal(a[k], b[k])
        ]


def main() -> None:
    from local_s3 import arguments, remote_base

    args = arguments(__doc__.split("\n\n")[0]).parse_args()
    work = tempfile.mkdtemp(prefix="ckptstore-custom-loop-")
    pipe = {"stdout": subprocess.PIPE}
    with remote_base(args) as (base, options):
        root = f"{base}/custom-loop-{uuid.uuid4().hex[:6]}" if args.remote else base
        url, reference_url = f"{root}/resumed", f"{root}/uninterrupted"
        print(f"custom loop resume: checkpoints to {url}; reference run to {reference_url}\n")
        log_path = os.path.join(work, "reference.log")
        with open(log_path, "w") as log:
            # The uninterrupted run: the same script, its own URL, beside run 1.
            reference = start_child(work, reference_url, options, "reference", stdout=log)
            try:
                _, killed_at = relay(
                    start_child(work, url, options, "run 1", **pipe), KILL_AT, url, options
                )
                if killed_at is None:
                    raise SystemExit("example FAILED: run 1 trained to the end, never killed")
                print(
                    f"committed on the remote after the kill: {', '.join(committed(url, options))}"
                )
                print("[run 2] a new process on an EMPTY staging directory: the remote alone\n")
                lines, _ = relay(start_child(work, url, options, "run 2", **pipe))
                if reference.wait() != 0:
                    raise SystemExit(
                        f"example FAILED: the reference run exited with {reference.returncode}"
                    )
            finally:
                if reference.poll() is None:  # this run failed: do not leave the reference behind
                    reference.kill()
                    reference.wait()
        with open(log_path) as f:
            print(f"\nthe uninterrupted reference run: {f.read().splitlines()[-1]}")

    restored = [int(m[1]) for m in (re.search(r"restored .* step (\d+)", x) for x in lines) if m]
    if not restored or not 0 < restored[0] <= killed_at:
        raise SystemExit(f"example FAILED: run 2 restored {restored or 'nothing'} from the remote")
    differences = compare(os.path.join(work, "run-2.npz"), os.path.join(work, "reference.npz"))
    if differences:
        raise SystemExit("example FAILED: the resumed run differs: " + "; ".join(differences))
    print(
        f"example OK: killed at step {killed_at}, resumed from step {restored[0]} on the remote "
        f"with an empty staging directory, trained to step {STEPS}: final weights and optimizer "
        "state equal the uninterrupted run's, bit for bit"
    )
    shutil.rmtree(work)  # staging directories and results; kept when the example fails


if __name__ == "__main__":
    if CHILD_ENV in os.environ:
        child = json.loads(os.environ[CHILD_ENV])
        train(child["url"], child["options"], child["result"], child["name"])
    else:
        main()
