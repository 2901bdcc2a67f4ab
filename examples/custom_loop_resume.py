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

import os
import re
import shutil
import subprocess
import tempfile
import time

import playground

STEPS = 160
SAVE_EVERY = 10  # checkpoint_interval, in steps of the step counter
KILL_AT = 95  # run 1 is killed at the first step past this with a checkpoint on the remote
PACE = 0.02  # seconds per step: a real step takes longer; this keeps the example short


# --- the training script: what a user writes -------------------------------------------------


def batch(step: int):
    """The data of one step, a function of the step alone (a deterministic input pipeline)."""
    import numpy as np

    rng = np.random.default_rng(step)
    x = rng.standard_normal((64, 16)).astype("float32")
    y = np.sin(x).sum(axis=1, keepdims=True).astype("float32")
    return x, y


def train(url: str, storage_options: dict, result: str, name: str) -> None:
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
            # Where the uploads stand, in one line: pending, bytes left and rate, last commit.
            print(f"[{name}] {manager.status()}", flush=True)
        time.sleep(PACE)
    path = manager.save(check_interval=False)  # the final state, whatever the interval says
    if path:
        print(
            f"[{name}] step {int(step):3d}  final state saved {os.path.basename(path)}", flush=True
        )
    manager.sync()  # ckptstore's addition: returns once every save is verified and committed
    print(f"[{name}] trained to step {int(step)}; every checkpoint committed", flush=True)

    # Not user code: hand the final values to the orchestrator, which compares the runs.
    playground.save_final_values(
        result, model.weights + list(optimizer.variables), step=step.numpy()
    )


# --- the orchestrator: plays the preemption and the new machine -------------------------------


def start_run(work: str, url: str, options: dict, name: str, **popen) -> subprocess.Popen:
    """The training script on a new machine; its final values go to ``<work>/<name>.npz``."""
    result = os.path.join(work, f"{name.replace(' ', '-')}.npz")
    params = {"url": url, "options": options, "result": result}
    return playground.start_child(__file__, work, name, params, **popen)


def main() -> None:
    args = playground.arguments(__doc__.split("\n\n")[0]).parse_args()
    work = tempfile.mkdtemp(prefix="ckptstore-custom-loop-")
    with playground.remote_base(args, "custom-loop") as (root, options):
        url, reference_url = f"{root}/resumed", f"{root}/uninterrupted"
        print(f"custom loop resume: checkpoints to {url}; reference run to {reference_url}\n")

        def preempt(line: str) -> int | None:
            """Run 1 dies at the first step past KILL_AT once the remote holds a checkpoint."""
            m = re.match(r"\[[^]]+\] step +(\d+)", line)
            if not (m and int(m[1]) >= KILL_AT and playground.committed(url, options)):
                return None
            print(
                f"\n*** SIGKILL: run 1 died at about step {m[1]}, as a preempted machine would "
                "(no close(), no exit handler) ***\n",
                flush=True,
            )
            return int(m[1])

        # The uninterrupted run: the same script, its own URL, beside run 1.
        reference = playground.Beside(
            lambda **popen: start_run(work, reference_url, options, "reference", **popen),
            os.path.join(work, "reference.log"),
            "the reference run",
        )
        with reference:
            _, killed_at = playground.relay(start_run(work, url, options, "run 1"), preempt)
            if killed_at is None:
                playground.fail("run 1 trained to the end, never killed")
            after_kill = playground.committed(url, options)
            print(f"committed on the remote after the kill: {', '.join(after_kill)}")
            print("[run 2] a new process on an EMPTY staging directory: the remote alone\n")
            lines, _ = playground.relay(start_run(work, url, options, "run 2"))
        print(f"\nthe uninterrupted reference run: {reference.last_line}")

    # Run 2 must take the newest checkpoint committed when run 1 died. Not "one from before the
    # step the kill was decided at": run 1 trains on, and may commit another checkpoint, while
    # this process reads its output and the signal lands.
    found = [
        m for m in (re.search(r"\] restored (\S+) from \S+ -> step (\d+)", x) for x in lines) if m
    ]
    restored = [(m[1], int(m[2])) for m in found]
    if len(restored) != 1 or restored[0][0] != after_kill[-1]:
        playground.fail(
            f"run 2 restored {restored or 'nothing'} from the remote, not {after_kill[-1]}"
        )
    differences = playground.compare(
        os.path.join(work, "run-2.npz"), os.path.join(work, "reference.npz")
    )
    if differences:
        playground.fail("the resumed run differs: " + "; ".join(differences))
    print(
        f"example OK: killed at step {killed_at}, resumed from {restored[0][0]} (step "
        f"{restored[0][1]}) on the remote with an empty staging directory, trained to step "
        f"{STEPS}: final weights and optimizer "
        "state equal the uninterrupted run's, bit for bit"
    )
    shutil.rmtree(work)  # staging directories and results; kept when the example fails


if __name__ == "__main__":
    child = playground.child_parameters()
    if child is not None:
        train(child["url"], child["options"], child["result"], child["name"])
    else:
        main()
