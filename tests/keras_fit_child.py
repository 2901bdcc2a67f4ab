"""A deterministic Keras ``fit()`` for test_keras_backup.py, with or without the backup callback.

``python keras_fit_child.py OUT [--remote URL --staging DIR --options JSON --save-freq F]
[--hold-at E:B] [--raise-at E:B] [--keep] [--double] [--batch-sleep S]``

Trains a small Dense model with Dropout and Adam on fixed numpy data
(``shuffle=False``) for EPOCHS epochs of BATCHES batches, on CPU with TensorFlow's op
determinism, then writes every model and optimizer variable to OUT (``.npz``).
Without ``--remote`` it is a plain ``fit()``: the uninterrupted reference. With it,
``ckptstore.keras.BackupAndRestore(URL, save_freq=F)`` backs the run up and
restores it. It says on stdout, flushed:

* ``resumed E I`` once the callbacks' ``on_train_begin`` ran: fit() starts at epoch E
  with the optimizer at iteration I (``0 0``: nothing restored);
* ``batch E B`` after each batch (``B`` zero-based, as Keras counts);
* ``holding E B`` at ``--hold-at``: the process then sleeps until it is killed, so the
  parent can wait for a backup to be committed and kill at a known state;
* ``done I`` at the end, I the optimizer's iterations.

``--raise-at E:B`` raises ``Interrupted`` in that batch (fit() fails; the process
exits with 3 after the exception).

``--preempt`` passes ``save_before_preemption=True`` (and ``--grace S``, ``grace_period=S``):
a SIGTERM then ends the process with TensorFlow's status once the batch's backup is
committed. A first callback, before the backup callback, then says ``trained E B`` after
each batch, so the last one said is the batch at whose end the process stopped (the
backup holds it). ``--chain`` first installs a SIGTERM handler of the program's own,
which says ``chained N`` (N: the signals it got so far).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["TF_DETERMINISTIC_OPS"] = "1"
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np
import tensorflow as tf

import ckptstore.keras
from kill_child import storage_options_from_json

EPOCHS = 3
BATCHES = 12  # per epoch
BATCH_SIZE = 8


class Interrupted(Exception):
    pass


def say(line: str) -> None:
    print(line, flush=True)


def build_model() -> tf.keras.Model:
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential(
        [
            tf.keras.Input((8,)),
            tf.keras.layers.Dense(32, activation="relu"),
            tf.keras.layers.Dropout(0.25),  # its seed generator's state must resume too
            tf.keras.layers.Dense(16, activation="relu"),
            tf.keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-2), loss="mse")
    return model


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((BATCHES * BATCH_SIZE, 8)).astype("float32")
    y = (x @ rng.standard_normal((8, 1)) + 0.1 * x[:, :1] ** 2).astype("float32")
    return x, y


def state_of(model: tf.keras.Model) -> dict[str, np.ndarray]:
    """Every model variable (Dropout's seed state included) and optimizer variable, by name."""
    out = {f"model/{i}/{v.path}": v.numpy() for i, v in enumerate(model.variables)}
    out.update({f"opt/{i}/{v.path}": v.numpy() for i, v in enumerate(model.optimizer.variables)})
    return out


class Narrator(tf.keras.callbacks.Callback):
    def __init__(self, hold: tuple[int, int] | None, fail: tuple[int, int] | None, sleep: float):
        super().__init__()
        self.hold, self.fail, self.sleep = hold, fail, sleep
        self.epoch = 0

    def on_train_begin(self, logs=None):
        start = self.model._initial_epoch or 0
        say(f"resumed {start} {int(self.model.optimizer.iterations.numpy())}")

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        say(f"batch {self.epoch} {batch}")
        if (self.epoch, batch) == self.fail:
            raise Interrupted(f"raised in batch {batch} of epoch {self.epoch}")
        if (self.epoch, batch) == self.hold:
            say(f"holding {self.epoch} {batch}")
            time.sleep(3600)
        if self.sleep:
            time.sleep(self.sleep)


class Tally(tf.keras.callbacks.Callback):
    """Says ``trained E B`` after each batch, before the backup callback's hook runs."""

    def __init__(self):
        super().__init__()
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        say(f"trained {self.epoch} {batch}")


def position(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    epoch, batch = text.split(":")
    return int(epoch), int(batch)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--remote")
    parser.add_argument("--staging")
    parser.add_argument("--options", default="{}")
    parser.add_argument("--save-freq", default="epoch")
    parser.add_argument("--hold-at")
    parser.add_argument("--raise-at")
    parser.add_argument("--keep", action="store_true", help="delete_checkpoint=False")
    parser.add_argument("--double", action="store_true", help="double_checkpoint=True")
    parser.add_argument("--batch-sleep", type=float, default=0.0)
    parser.add_argument("--preempt", action="store_true", help="save_before_preemption=True")
    parser.add_argument("--grace", type=float, help="grace_period")
    parser.add_argument("--chain", action="store_true", help="a SIGTERM handler of its own")
    args = parser.parse_args()
    tf.config.experimental.enable_op_determinism()
    if args.chain:
        got = []

        def own_handler(signum, frame):
            got.append(signum)
            # Unbuffered: the signal may land while the main thread is inside print().
            os.write(sys.stdout.fileno(), f"chained {len(got)}\n".encode())

        signal.signal(signal.SIGTERM, own_handler)

    model = build_model()
    callbacks: list[tf.keras.callbacks.Callback] = []
    if args.remote:
        freq = args.save_freq if args.save_freq == "epoch" else int(args.save_freq)
        callbacks.append(
            ckptstore.keras.BackupAndRestore(
                args.remote,
                save_freq=freq,
                double_checkpoint=args.double,
                delete_checkpoint=not args.keep,
                storage_options=storage_options_from_json(args.options),
                staging_dir=args.staging,
                save_before_preemption=args.preempt,
                grace_period=args.grace,
            )
        )
    if args.preempt:
        callbacks.insert(0, Tally())
    callbacks.append(Narrator(position(args.hold_at), position(args.raise_at), args.batch_sleep))
    x, y = data()
    try:
        model.fit(
            x,
            y,
            batch_size=BATCH_SIZE,
            epochs=EPOCHS,
            shuffle=False,
            verbose=0,
            callbacks=callbacks,
        )
    except Interrupted as exc:
        say(f"interrupted {exc}")
        sys.exit(3)
    np.savez(args.out, **state_of(model))
    say(f"done {int(model.optimizer.iterations.numpy())}")


if __name__ == "__main__":
    main()
