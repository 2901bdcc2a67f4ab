"""Separate model and optimizer checkpoints, each on its own manager and schedule, on a remote.

What it shows: the workflow with two ``tf.train.CheckpointManager`` objects, one for the model and
one for the training state, runs on ckptstore with one changed call per manager (ckptstore's
class, a URL, and ``when_behind="block"``, see below), each with its own URL under the same base:

* ``tf.train.Checkpoint(model=model)`` every MODEL_EVERY (4) steps to ``<base>/model``,
  ``max_to_keep=5``;
* ``tf.train.Checkpoint(optimizer=optimizer, step=step)`` every TRAIN_EVERY (10) steps to
  ``<base>/train_state``, ``max_to_keep=2``.

Run 1 trains 46 steps and ends. Run 2 is a new process on an EMPTY staging directory, as on a
new machine; both managers restore from the remote alone, and it checks what came back: the
model weights are exactly the ones of the last model save (step 44), the optimizer's state
(iterations, Adam's slots) and the step exactly those of the last training-state save (step
40). It exits non-zero otherwise.

Mind the order of the two restores. With Keras 3 the optimizer tracks the variables it trains,
so ``tf.train.Checkpoint(optimizer=optimizer)`` holds the model's trainable weights as well, of
its own step (Q&A pages written for older Keras say otherwise). Restore the training state
first and the model second, or the older weights silently replace the model checkpoint's.

That is the catch of separate checkpoints: the two halves come from different steps. Resuming
at step 40 with step 44's weights trains steps 41-44 twice, over an optimizer state that never
saw them. **One checkpoint holding both** (``tf.train.Checkpoint(model=model,
optimizer=optimizer, step=step)``, as in ``custom_loop_resume.py``) is usually better: every save
is a consistent pair, written and committed together, and restoring it resumes exactly.

Separate checkpoints make sense when the two are used apart: many model snapshots kept for
evaluation, export or averaging (a model-only checkpoint is a third of a training state with
Adam, which adds two slots per weight), while only the newest training states are kept for
resuming; or when fine-tuning reloads the weights and starts a fresh optimizer. To resume
exactly from them, save the model at every training-state save too (TRAIN_EVERY a multiple of
MODEL_EVERY, and (MODEL_KEEP - 1) * MODEL_EVERY >= TRAIN_EVERY so it is still kept), have
every save uploaded (``when_behind="block"``: by default, when uploads fall behind the saves,
the oldest waiting one is skipped so that training never waits), number the checkpoints by
step, and restore the model checkpoint of the optimizer's step, as run 2 does
with ``model_manager.fetch(f"ckpt-{step}")``. It then trains steps 41-60 and checks that the
weights it recomputes at step 44 equal those run 1 saved there, bit for bit (CPU, op
determinism on, data a function of the step), and that the remote keeps the 5 newest model
checkpoints and the 2 newest training states.

Run it (no arguments: a local S3 server on 127.0.0.1, moto, so no cloud account is needed;
about 10 s)::

    python examples/separate_managers.py
    python examples/separate_managers.py --remote s3://my-bucket/examples \\
        --storage-options '{"profile": "dev"}'

With ``--remote`` it writes under ``<remote>/separate-<id>/`` and leaves those checkpoints
there. The last line is ``example OK: ...`` on success.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import playground

MODEL_EVERY, MODEL_KEEP = 4, 5
TRAIN_EVERY, TRAIN_KEEP = 10, 2
RUN1_STEPS, RUN2_STEPS = 46, 60
PACE = 0.01  # seconds per step: a real step takes longer


# --- not user code: what run 1 saved, to check what run 2 restores --------------------------


class Journal:
    """Fingerprints of the values at each save, in a local file (never used to restore)."""

    def __init__(self, path: str):
        self.path = path
        self.saved = {"model": {}, "train_state": {}}
        if os.path.exists(path):
            with open(path) as f:
                self.saved = json.load(f)

    def record(self, kind: str, step: int, value) -> None:
        self.saved[kind][str(step)] = value
        with open(self.path, "w") as f:
            json.dump(self.saved, f)

    def last(self, kind: str) -> tuple[int, object]:
        step = max(int(s) for s in self.saved[kind])
        return step, self.saved[kind][str(step)]


# --- the training script: what a user writes -------------------------------------------------


def batch(step: int):
    """The data of one step, a function of the step alone (a deterministic input pipeline)."""
    import numpy as np

    rng = np.random.default_rng(step)
    x = rng.standard_normal((64, 16)).astype("float32")
    return x, np.sin(x).sum(axis=1, keepdims=True).astype("float32")


def train(base: str, storage_options: dict, until: int, journal_path: str, name: str) -> None:
    import tensorflow as tf

    import ckptstore

    # Not user code: what run 1 saved, and the start of this process's check lines.
    journal, indent = Journal(journal_path), f"[{name}]   "
    tf.keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()
    model = tf.keras.Sequential(
        [
            tf.keras.Input((16,)),
            tf.keras.layers.Dense(64, activation="relu"),
            tf.keras.layers.Dense(1),
        ]
    )
    optimizer = tf.keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    step = tf.Variable(0, dtype=tf.int64)

    model_ckpt = tf.train.Checkpoint(model=model)
    train_ckpt = tf.train.Checkpoint(optimizer=optimizer, step=step)
    # The changed lines: tf.train.CheckpointManager(model_ckpt, "./model_checkpoints", ...) and
    # tf.train.CheckpointManager(train_ckpt, "./optimizer_checkpoints", ...) become
    # ckptstore.CheckpointManager with the URL. when_behind="block": the resume below takes the
    # model checkpoint of the optimizer's step, so that save must reach the remote. By default
    # ("skip"), when uploads fall behind the saves, ckptstore drops the oldest waiting upload so
    # that training never waits, and that could be the one needed.
    model_manager = ckptstore.CheckpointManager(
        model_ckpt,
        f"{base}/model",
        max_to_keep=MODEL_KEEP,
        storage_options=storage_options,
        when_behind="block",
    )
    train_manager = ckptstore.CheckpointManager(
        train_ckpt,
        f"{base}/train_state",
        max_to_keep=TRAIN_KEEP,
        storage_options=storage_options,
        when_behind="block",
    )

    # A new machine: each manager downloads and verifies its newest committed checkpoint.
    # The training state first: Keras 3's optimizer tracks the variables it trains, so its
    # checkpoint holds the model's trainable weights too (of its own step). Restored second,
    # it would silently put them over the model checkpoint's.
    train_ckpt.restore(train_manager.latest_checkpoint)
    model_ckpt.restore(model_manager.latest_checkpoint)
    if not model_manager.latest_checkpoint:
        print(f"[{name}] nothing on {base} yet: initializing from scratch", flush=True)
    else:
        model_name = os.path.basename(model_manager.latest_checkpoint)
        train_name = os.path.basename(train_manager.latest_checkpoint)
        print(
            f"[{name}] restored {base}/model/{model_name} and {base}/train_state/{train_name} "
            f"(staging {os.path.dirname(model_manager.staging_dir)})",
            flush=True,
        )
        held = [
            k
            for k, _ in tf.train.list_variables(train_manager.latest_checkpoint)
            if k.startswith("optimizer/_trainable_variables/")
        ]
        print(
            f"[{name}] the training-state checkpoint holds {len(held)} model weights too "
            "(Keras 3's optimizer tracks them): restored first, the model checkpoint's win",
            flush=True,
        )
        # Not user code: what came back is what run 1 saved last, in each checkpoint.
        model_step, model_saved = journal.last("model")
        state_step, (iterations, train_saved) = journal.last("train_state")
        playground.check(
            f"model weights equal run 1's at its last model save (step {model_step})",
            playground.digest(model.weights) == model_saved,
            indent,
        )
        playground.check(
            f"optimizer iterations {int(optimizer.iterations)} and step {int(step)} equal run "
            f"1's at its last training-state save (step {state_step}: {iterations})",
            int(optimizer.iterations) == iterations == int(step) == state_step,
            indent,
        )
        playground.check(
            "Adam's slots equal run 1's at that save",
            playground.digest(optimizer.variables) == train_saved,
            indent,
        )
        # The two halves come from different steps. For a consistent pair, take the model
        # checkpoint of the optimizer's step (numbered by step, and kept: 10 is a multiple of 4).
        if model_name != f"ckpt-{int(step)}":
            print(
                f"[{name}] model from {model_name}, training state from {train_name}: "
                f"restoring the model from ckpt-{int(step)} instead, for a consistent pair",
                flush=True,
            )
            model_ckpt.restore(model_manager.fetch(f"ckpt-{int(step)}"))
            playground.check(
                f"model weights equal run 1's at step {int(step)}",
                playground.digest(model.weights) == journal.saved["model"].get(str(int(step))),
                indent,
            )

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x) - y) ** 2)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        step.assign_add(1)
        return loss

    while int(step) < until:
        loss = train_step(*batch(int(step)))
        s = int(step)
        saved = []
        if s % MODEL_EVERY == 0:
            saved.append(f"model/{os.path.basename(model_manager.save(checkpoint_number=s))}")
            # Not user code: a recomputed step must give run 1's weights again.
            before = journal.saved["model"].get(str(s))
            if before is not None:
                playground.check(
                    f"step {s} recomputed: weights equal run 1's",
                    playground.digest(model.weights) == before,
                    indent,
                )
            journal.record("model", s, playground.digest(model.weights))
        if s % TRAIN_EVERY == 0:
            saved.append(f"train_state/{os.path.basename(train_manager.save(checkpoint_number=s))}")
            journal.record("train_state", s, [s, playground.digest(optimizer.variables)])
        if saved:
            print(
                f"[{name}] step {s:2d}  loss {float(loss):.5f}  saved {', '.join(saved)}",
                flush=True,
            )
        time.sleep(PACE)
    model_manager.sync()  # ckptstore's addition: every save verified and committed
    train_manager.sync()
    print(f"[{name}] trained to step {int(step)}; every checkpoint committed", flush=True)


# --- the orchestrator: two processes, one after the other, on different staging dirs ------


def run(work: str, base: str, options: dict, until: int, name: str) -> None:
    journal = os.path.join(work, "journal.json")
    params = {"base": base, "options": options, "until": until, "journal": journal}
    code = playground.start_child(__file__, work, name, params, stdout=None).wait()
    if code != 0:
        playground.fail(f"{name} exited with {code}")


def expect_on_remote(base: str, options: dict, last: int) -> None:
    for kind, every, keep in (
        ("model", MODEL_EVERY, MODEL_KEEP),
        ("train_state", TRAIN_EVERY, TRAIN_KEEP),
    ):
        names = playground.committed(f"{base}/{kind}", options)
        steps = [s for s in range(every, last + 1, every)][-keep:]
        expected = [f"ckpt-{s}" for s in steps]
        print(f"  {base}/{kind}: {', '.join(names)}")
        if names != expected:
            playground.fail(f"{base}/{kind} holds {names}, not {expected}")


def main() -> None:
    args = playground.arguments(__doc__.split("\n\n")[0]).parse_args()
    work = tempfile.mkdtemp(prefix="ckptstore-separate-")
    with playground.remote_base(args, "separate") as (base, options):
        print(
            f"separate managers: model to {base}/model, optimizer and step to {base}/train_state\n"
        )
        run(work, base, options, RUN1_STEPS, "run 1")
        print("\ncommitted on the remote after run 1:")
        expect_on_remote(base, options, RUN1_STEPS)
        print("\n[run 2] a new process on an EMPTY staging directory: the remote alone\n")
        run(work, base, options, RUN2_STEPS, "run 2")
        print("\ncommitted on the remote after run 2:")
        expect_on_remote(base, options, RUN2_STEPS)
    print(
        "example OK: both managers restored from the remote on an empty staging directory: "
        "model weights from the last model save, optimizer state from the last training-state "
        "save; the consistent pair resumed bit for bit"
    )
    shutil.rmtree(work)  # staging directories and the journal; kept when the example fails


if __name__ == "__main__":
    child = playground.child_parameters()
    if child is not None:
        train(child["base"], child["options"], child["until"], child["journal"], child["name"])
    else:
        main()
