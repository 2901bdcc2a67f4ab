"""A Keras ``fit()`` in a notebook that loses its runtime, resumed by running the same cell again.

What it shows: the notebook workflow (``model.fit(...)`` with a callback that backs the run up
to Drive or a bucket) with ``ckptstore.keras.BackupAndRestore`` in place of Keras's own
``keras.callbacks.BackupAndRestore``: the same arguments, with ``backup_dir`` a URL. The cell::

    backup = ckptstore.keras.BackupAndRestore("s3://bucket/run-1/backup", save_freq=20)
    model.fit(x, y, batch_size=32, epochs=4, shuffle=False, callbacks=[backup])

1. run 1 trains and backs up every 20 batches; each backup is written locally, then
   uploaded, verified and committed in the background while training goes on. It is
   SIGKILLed in the middle of an epoch (once the remote holds a backup), as a recycled
   notebook runtime would be;
2. run 2 is the same cell in a new process on an EMPTY staging directory, as on a new
   runtime: the callback restores the newest committed backup from the remote (weights,
   Adam's iterations and slots, Dropout's random state, the epoch and the batch in it),
   lets the batches that backup had already trained go by untrained, and trains to the
   end; then it deletes the backup from the remote, as Keras deletes its own;
3. the reference is the same fit() without any callback, never killed (it runs beside run 1).

The example checks that run 2 ends with exactly the reference's weights and optimizer state,
bit for bit, and that the remote no longer holds a backup, and exits non-zero otherwise. (Keras's
own callback would have replayed the interrupted epoch from its first batch, training some
batches twice.) No tolerance is needed: same data order (``shuffle=False``), TensorFlow's op
determinism on CPU with oneDNN off, and a restore gives back exactly the bytes that were saved.

Run it (no arguments: a local S3 server on 127.0.0.1, moto, so no cloud account is needed;
about 20 s)::

    python examples/keras_fit_resume.py
    python examples/keras_fit_resume.py --remote s3://my-bucket/examples \\
        --storage-options '{"profile": "dev"}'

With ``--remote`` it writes under ``<remote>/keras-fit-<id>/backup`` (deleted at the end).
The last line is ``example OK: ...`` on success.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import playground

EPOCHS = 4
BATCH_SIZE = 32
BATCHES = 64  # per epoch
SAVE_FREQ = 20  # batches between backups (counted across epochs, as Keras counts)
KILL_EPOCH = 2  # run 1 is killed in this epoch (zero-based), mid-epoch, once a backup is committed
PACE = 0.01  # seconds per batch: a real step takes longer; this keeps the example short


# --- the notebook: what a user runs --------------------------------------------------------------


def notebook(url: str | None, storage_options: dict, result: str, name: str) -> None:
    import numpy as np
    import tensorflow as tf

    import ckptstore.keras

    # Earlier cells: the data, the model (seeded, so every runtime builds the same one).
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCHES * BATCH_SIZE, 16)).astype("float32")
    y = np.sin(x).sum(axis=1, keepdims=True).astype("float32")
    tf.keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()
    model = tf.keras.Sequential(
        [
            tf.keras.Input((16,)),
            tf.keras.layers.Dense(64, activation="relu"),
            tf.keras.layers.Dropout(0.1),
            tf.keras.layers.Dense(64, activation="relu"),
            tf.keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss="mse")

    class Progress(tf.keras.callbacks.Callback):
        """Prints where training is (a progress bar would do, in a notebook)."""

        def on_train_begin(self, logs=None):
            step = int(self.model.optimizer.iterations)
            where = f"epoch {step // BATCHES}, batch {step % BATCHES}" if step else "the start"
            print(f"[{name}] fit() starts at {where} (optimizer step {step})", flush=True)

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if batch % 8 == 0:
                print(f"[{name}] epoch {self.epoch} batch {batch:2d}  loss {logs['loss']:.4f}")
            sys.stdout.flush()
            time.sleep(PACE)

    callbacks = [Progress()]
    if url is not None:
        # The one changed line. With Keras it reads:
        #   backup = keras.callbacks.BackupAndRestore("/content/drive/MyDrive/backup", 20)
        backup = ckptstore.keras.BackupAndRestore(
            url, save_freq=SAVE_FREQ, storage_options=storage_options
        )
        callbacks.insert(0, backup)
    # The cell that is run again after the runtime is lost: the same call, unchanged.
    model.fit(
        x, y, batch_size=BATCH_SIZE, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=callbacks
    )
    print(f"[{name}] fit() done at optimizer step {int(model.optimizer.iterations)}", flush=True)

    # Not user code: hand the final values to the orchestrator, which compares the runs.
    playground.save_final_values(result, model.variables + list(model.optimizer.variables))


# --- the orchestrator: plays the lost runtime and the new one -------------------------------------


def start_run(work: str, url: str | None, options: dict, name: str, **popen) -> subprocess.Popen:
    """The notebook on a new runtime; its final values go to ``<work>/<name>.npz``."""
    result = os.path.join(work, f"{name.replace(' ', '-')}.npz")
    params = {"url": url, "options": options, "result": result}
    # oneDNN off even if the environment turns it on: the runs must compute the same bits.
    env = {"TF_ENABLE_ONEDNN_OPTS": "0"}
    return playground.start_child(__file__, work, name, params, env=env, **popen)


def main() -> None:
    args = playground.arguments(__doc__.split("\n\n")[0]).parse_args()
    work = tempfile.mkdtemp(prefix="ckptstore-keras-fit-")
    with playground.remote_base(args, "keras-fit") as (root, options):
        url = f"{root}/backup"
        print(f"keras fit() resume: backups to {url}\n")

        def lose_runtime(line: str) -> tuple[int, int] | None:
            """Run 1 dies mid-epoch KILL_EPOCH, once the remote holds a backup."""
            m = re.match(r"\[[^]]+\] epoch (\d+) batch +(\d+)", line)
            if not (
                m
                and int(m[1]) == KILL_EPOCH
                and int(m[2]) > 0
                and playground.committed(url, options)
            ):
                return None
            print(
                f"\n*** SIGKILL: the runtime is lost in epoch {m[1]}, a few batches past batch "
                f"{m[2]} (no on_train_end, no exit handler) ***\n",
                flush=True,
            )
            return int(m[1]), int(m[2])

        # The uninterrupted run: the same notebook without the callback, beside run 1.
        reference = playground.Beside(
            lambda **popen: start_run(work, None, options, "reference", **popen),
            os.path.join(work, "reference.log"),
            "the reference",
        )
        with reference:
            _, killed = playground.relay(start_run(work, url, options, "run 1"), lose_runtime)
            if killed is None:
                playground.fail("run 1 trained to the end, never killed")
            after_kill = playground.committed(url, options)
            print(f"committed on the remote after the kill: {', '.join(after_kill)}")
            print("[run 2] the same cell on a new runtime, with an EMPTY staging directory\n")
            lines, _ = playground.relay(start_run(work, url, options, "run 2"))
        left = playground.committed(url, options)
    print(f"\nthe uninterrupted reference: {reference.last_line}")

    starts = [
        int(m[1]) for m in (re.search(r"starts at .*optimizer step (\d+)", x) for x in lines) if m
    ]
    # Backup ckpt-N is taken after N * SAVE_FREQ batches: run 2 must start right after the
    # newest one committed when run 1 died, mid-epoch.
    newest = max(int(name.rsplit("-", 1)[1]) for name in after_kill) * SAVE_FREQ
    if starts != [newest]:
        playground.fail(f"run 2 resumed from {starts}, not step {newest}")
    if newest % BATCHES == 0:
        playground.fail("the backup restored was not a mid-epoch one")
    differences = playground.compare(
        os.path.join(work, "run-2.npz"), os.path.join(work, "reference.npz")
    )
    if differences:
        playground.fail("the resumed run differs: " + "; ".join(differences))
    if left:
        playground.fail(f"the backup is still on the remote: {left}")
    epoch, batch = divmod(starts[0], BATCHES)
    print(
        f"example OK: killed in epoch {killed[0]} past batch {killed[1]}, resumed at epoch "
        f"{epoch} batch {batch} from the remote on an empty staging directory, trained to the "
        "end: final weights and optimizer state equal the uninterrupted fit()'s, bit for bit; "
        "the backup was deleted from the remote"
    )
    shutil.rmtree(work)  # staging directories and results; kept when the example fails


if __name__ == "__main__":
    child = playground.child_parameters()
    if child is not None:
        notebook(child["url"], child["options"], child["result"], child["name"])
    else:
        main()
