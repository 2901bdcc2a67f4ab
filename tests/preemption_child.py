"""A custom training loop under TensorFlow's ``PreemptionCheckpointHandler`` (test_preemption.py).

Run as ``python preemption_child.py CONFIG`` (CONFIG: a JSON object, see ``main``). The loop is
the one TensorFlow documents: a ``tf.train.Checkpoint`` with a step variable, a manager, the
handler made from a ``TFConfigClusterResolver`` (no ``TF_CONFIG``: one machine), and every step
run through ``handler.run()``. The manager is ``ckptstore.CheckpointManager`` on a URL, unchanged.
A periodic ``manager.save()`` every ``save_every`` steps is the backup a vanished machine needs.

The parent plays the platform: it reads ``step N`` lines and sends SIGTERM. After each step the
child journals every variable's value (``<journal>/step-N.npz``), so the parent can compare a
restored checkpoint with what the run held at that step, bit for bit. TensorFlow's handler saves
at a step boundary and exits right after, so the last journaled step is the one it saved.

Lines on stdout: ``restored N`` (the step the run resumed from, 0 for none), ``step N``.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

import ckptstore

ONLY_FIRST = tf.VariableAggregation.ONLY_FIRST_REPLICA


class State:
    """A linear model trained with momentum, plus ``ballast`` to set the checkpoint's size.

    Every variable's next value depends on its current one, so a restore of the wrong step (or of
    a step's bytes mixed with another's) shows up in the comparison with the journal.
    """

    def __init__(self, ballast_elements: int = 16):
        self.step = tf.Variable(0, dtype=tf.int64, name="step", aggregation=ONLY_FIRST)
        self.w = tf.Variable(tf.zeros((16, 1)), name="w", aggregation=ONLY_FIRST)
        self.b = tf.Variable(tf.zeros((1,)), name="b", aggregation=ONLY_FIRST)
        self.mw = tf.Variable(tf.zeros((16, 1)), name="mw", aggregation=ONLY_FIRST)
        self.mb = tf.Variable(tf.zeros((1,)), name="mb", aggregation=ONLY_FIRST)
        self.ballast = tf.Variable(
            tf.zeros((ballast_elements,)), name="ballast", aggregation=ONLY_FIRST
        )
        self.checkpoint = tf.train.Checkpoint(
            step=self.step, w=self.w, b=self.b, mw=self.mw, mb=self.mb, ballast=self.ballast
        )

    def variables(self) -> dict[str, tf.Variable]:
        return {
            "step": self.step,
            "w": self.w,
            "b": self.b,
            "mw": self.mw,
            "mb": self.mb,
            "ballast": self.ballast,
        }

    def values(self) -> dict[str, np.ndarray]:
        return {name: v.numpy() for name, v in self.variables().items()}


def batch(step: int) -> tuple[np.ndarray, np.ndarray]:
    """The data of one step, a function of the step alone."""
    rng = np.random.default_rng(step)
    x = rng.standard_normal((32, 16)).astype(np.float32)
    y = (x.sum(axis=1, keepdims=True) * 0.5).astype(np.float32)
    return x, y


def make_train_step(strategy: tf.distribute.Strategy, state: State):
    @tf.function
    def train_step(x, y):
        def step_fn(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((tf.matmul(x, state.w) + state.b - y) ** 2)
            gw, gb = tape.gradient(loss, [state.w, state.b])
            state.mw.assign(0.9 * state.mw + gw)
            state.mb.assign(0.9 * state.mb + gb)
            state.w.assign_sub(0.05 * state.mw)
            state.b.assign_sub(0.05 * state.mb)
            state.ballast.assign(state.ballast * 0.5 + loss)
            state.step.assign_add(1)
            return loss

        return strategy.run(step_fn, args=(x, y))

    return train_step


def journal(directory: str, step: int, values: dict[str, np.ndarray]) -> None:
    path = os.path.join(directory, f"step-{step}.npz")
    with open(path + ".tmp", "wb") as f:
        np.savez(f, **values)
    os.replace(path + ".tmp", path)


def read_journal(directory: str, step: int) -> dict[str, np.ndarray]:
    with np.load(os.path.join(directory, f"step-{step}.npz")) as data:
        return {name: data[name] for name in data.files}


def journaled_steps(directory: str) -> list[int]:
    return sorted(
        int(n[len("step-") : -len(".npz")])
        for n in os.listdir(directory)
        if n.startswith("step-") and n.endswith(".npz")
    )


def main() -> None:
    config = json.loads(sys.argv[1])
    url = config["url"]  # where the manager writes
    options = config.get("storage_options", {})
    staging = config["staging"]
    journal_dir = config["journal"]
    steps = config.get("steps", 60)  # train up to this step, unless preempted first
    pace = config.get("pace", 0.05)  # seconds a step takes at least
    save_every = config.get("save_every", 0)  # periodic manager.save(); 0: only the handler's
    grace_period = config.get("grace_period")  # TerminationConfig's, if given
    exit_code = config.get("exit_code")  # a custom exit_fn: os._exit(exit_code)

    strategy = (
        tf.distribute.MirroredStrategy(["/cpu:0"])
        if config.get("strategy") == "mirrored"
        else tf.distribute.get_strategy()
    )
    with strategy.scope():
        state = State(config.get("ballast_elements", 16))
    manager = ckptstore.CheckpointManager(
        state.checkpoint, url, max_to_keep=3, staging_dir=staging, storage_options=options
    )
    exit_fn = None
    if exit_code is not None:
        # os._exit skips every exit hook: whatever is committed was committed by save().
        def exit_fn() -> None:
            print(f"exit_fn at step {int(state.step.numpy())}", flush=True)
            os._exit(exit_code)

    handler = tf.distribute.experimental.PreemptionCheckpointHandler(
        tf.distribute.cluster_resolver.TFConfigClusterResolver(),
        manager,
        termination_config=tf.distribute.experimental.TerminationConfig(
            exit_fn=exit_fn, grace_period=grace_period
        ),
    )  # restores the manager's latest checkpoint (restore_or_initialize)
    train_step = make_train_step(strategy, state)
    print(f"restored {int(state.step.numpy())}", flush=True)
    os.makedirs(journal_dir, exist_ok=True)
    while int(state.step.numpy()) < steps:
        started = time.monotonic()
        x, y = batch(int(state.step.numpy()) + 1)
        handler.run(train_step, x, y)  # saves and exits here once preempted
        step = int(state.step.numpy())
        journal(journal_dir, step, state.values())
        if save_every and step % save_every == 0:
            manager.save()
        print(f"step {step}", flush=True)
        time.sleep(max(0.0, pace - (time.monotonic() - started)))
    manager.close()
    print("finished", flush=True)


if __name__ == "__main__":
    main()
