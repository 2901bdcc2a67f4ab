"""A spot VM: TensorFlow's preemption handler saves, ckptstore commits, a new VM resumes.

What it shows: the loop TensorFlow documents for preemptible machines
(``tf.distribute.experimental.PreemptionCheckpointHandler`` around a custom training step) with a
``ckptstore.CheckpointManager`` on a URL instead of a local directory. When the platform sends
SIGTERM, the handler saves at the next step boundary and exits with TensorFlow's status (42 by
default); ckptstore's ``save()`` returns only once that checkpoint is uploaded, verified and
committed, so it is on the remote before the VM is gone. A periodic ``manager.save()`` is the
backup for a VM that vanishes with no signal at all: then the work since the last commit is lost.

This script plays the platform:

1. VM 1 trains; at step SIGTERM_AT it gets SIGTERM, as a spot VM being reclaimed would;
2. VM 2 is a new process on an EMPTY staging directory, as on a new machine: the handler restores
   the newest committed checkpoint from the remote, and it trains to the end.

It checks that VM 1 exited with TensorFlow's status, that VM 2 restored exactly the step the
handler saved (after the step running at the signal, not the last periodic backup), and that the
model weights, optimizer state and step VM 2 restored are the ones VM 1 had there, bit for bit;
it exits non-zero otherwise.

Run it (no arguments: a local S3 server on 127.0.0.1, moto, so no cloud account is needed;
about 15 s)::

    python examples/spot_vm_training.py
    python examples/spot_vm_training.py --remote s3://my-bucket/examples \\
        --storage-options '{"profile": "dev"}'

With ``--remote`` it writes under ``<remote>/spot-vm-<id>/`` and leaves those checkpoints there.
The last line is ``example OK: ...`` on success.
"""

from __future__ import annotations

import re
import shutil
import signal
import tempfile
import time

import playground

STEPS = 120
SAVE_EVERY = 25  # the periodic backup, for a VM that vanishes without a signal
SIGTERM_AT = 45  # the platform sends SIGTERM once VM 1 reports this step
PACE = 0.03  # seconds per step: a real step takes longer; this keeps the example short
TF_EXIT_STATUS = 42  # TensorFlow's default exit_fn outside GCP: sys.exit(42)


# --- the training script: what a user writes -------------------------------------------------


def batch(step: int):
    """The data of one step, a function of the step alone (a deterministic input pipeline)."""
    import numpy as np

    rng = np.random.default_rng(step)
    x = rng.standard_normal((64, 16)).astype("float32")
    y = np.sin(x).sum(axis=1, keepdims=True).astype("float32")
    return x, y


def train(url: str, storage_options: dict, name: str) -> None:
    import tensorflow as tf

    import ckptstore

    # TensorFlow's handler reads its own deprecated total_run_calls when it saves: not our code.
    tf.get_logger().setLevel("ERROR")
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential(
        [
            tf.keras.Input((16,)),
            tf.keras.layers.Dense(64, activation="relu"),
            tf.keras.layers.Dense(1),
        ]
    )
    optimizer = tf.keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    step = tf.Variable(0, dtype=tf.int64)  # the step lives in the checkpoint
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step)
    everything = [*model.weights, *optimizer.variables, step]  # what fingerprint() covers

    # With TensorFlow alone: tf.train.CheckpointManager(ckpt, "/local/dir", max_to_keep=3).
    manager = ckptstore.CheckpointManager(ckpt, url, max_to_keep=3, storage_options=storage_options)
    # The handler restores the manager's newest committed checkpoint (restore_or_initialize),
    # and from now on a SIGTERM makes it save at the next step boundary, then exit.
    handler = tf.distribute.experimental.PreemptionCheckpointHandler(
        tf.distribute.cluster_resolver.TFConfigClusterResolver(), manager
    )
    print(f"[{name}] starting at step {int(step)}  {fingerprint(everything)}", flush=True)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x) - y) ** 2)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        step.assign_add(1)
        return loss

    try:
        while int(step) < STEPS:
            loss = handler.run(train_step, *batch(int(step) + 1))
            if int(step) % SAVE_EVERY == 0:
                manager.save()  # the backup; its upload runs in the background
                print(
                    f"[{name}] step {int(step):3d}  loss {float(loss):.5f}  backup saved",
                    flush=True,
                )
            elif int(step) % 5 == 0:
                print(f"[{name}] step {int(step):3d}  loss {float(loss):.5f}", flush=True)
            time.sleep(PACE)
    except SystemExit:
        # Not user code: the handler saved (and ckptstore committed) the state it exits with;
        # tell the platform (this script's orchestrator) which one.
        print(f"[{name}] exiting at step {int(step)}  {fingerprint(everything)}", flush=True)
        raise
    manager.close()  # every save committed
    print(f"[{name}] trained to step {int(step)}; every checkpoint committed", flush=True)


def fingerprint(variables) -> str:
    """sha256 of the values of ``variables``: equal fingerprints, equal bits."""
    return f"sha256 {playground.digest(variables)} of {len(variables)} variables"


# --- the orchestrator: plays the platform ----------------------------------------------------


def step_and_fingerprint(lines: list[str], what: str) -> tuple[int, str]:
    for line in lines:
        m = re.match(rf"\[[^]]+\] {what} at step (\d+)  (.*)$", line.rstrip("\n"))
        if m:
            return int(m[1]), m[2]
    playground.fail(f"no '{what} at step' line")


def main() -> None:
    args = playground.arguments(__doc__.split("\n\n")[0]).parse_args()
    work = tempfile.mkdtemp(prefix="ckptstore-spot-vm-")
    with playground.remote_base(args, "spot-vm") as (url, options):
        print(f"spot VM training: checkpoints to {url}\n")

        def reclaim(line: str) -> float | None:
            """The platform sends SIGTERM once VM 1 reports SIGTERM_AT: when it sent it."""
            m = re.match(r"\[[^]]+\] step +(\d+)", line)
            if not (m and int(m[1]) >= SIGTERM_AT):
                return None
            print(f"\n*** SIGTERM: the platform reclaims the VM at step {m[1]} ***\n", flush=True)
            return time.monotonic()

        vm1 = playground.start_child(__file__, work, "vm 1", {"url": url, "options": options})
        lines, sent = playground.relay(vm1, reclaim, signal.SIGTERM)
        took = time.monotonic() - sent if sent is not None else 0.0
        if vm1.returncode != TF_EXIT_STATUS:
            playground.fail(f"VM 1 exited with {vm1.returncode}, not TensorFlow's {TF_EXIT_STATUS}")
        saved, saved_print = step_and_fingerprint(lines, "exiting")
        print(
            f"\nVM 1 exited with status {vm1.returncode}, {took:.1f} s after SIGTERM, its "
            f"step-{saved} checkpoint committed\n"
        )
        print("[vm 2] a new machine, an EMPTY staging directory: the remote alone\n")
        vm2 = playground.start_child(__file__, work, "vm 2", {"url": url, "options": options})
        lines, _ = playground.relay(vm2)
    restored, restored_print = step_and_fingerprint(lines, "starting")
    if saved <= SIGTERM_AT:
        playground.fail(f"VM 1 saved step {saved}, before the signal")
    if restored != saved or restored_print != saved_print:
        playground.fail(
            f"VM 2 restored step {restored} ({restored_print}); VM 1 saved "
            f"step {saved} ({saved_print})"
        )
    if not any(f"trained to step {STEPS}" in line for line in lines):
        playground.fail("VM 2 did not train to the end")
    print(
        f"example OK: SIGTERM at step {SIGTERM_AT}; TensorFlow's handler saved step {saved} and "
        f"VM 1 exited with status {TF_EXIT_STATUS} {took:.1f} s later, the checkpoint committed; "
        f"VM 2 restored step {restored} from the remote onto an empty staging directory, model "
        "and optimizer equal bit for bit, and trained to the end"
    )
    shutil.rmtree(work)  # staging directories; kept when the example fails


if __name__ == "__main__":
    child = playground.child_parameters()
    if child is not None:
        train(child["url"], child["options"], child["name"])
    else:
        main()
