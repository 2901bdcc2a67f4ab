"""How long fit() waits in the backup callback: ckptstore's BackupAndRestore against Keras's own.

Run: ``.venv/bin/python benchmarks/keras_backup_blocking.py [--quick]`` (``--help`` lists the
knobs). Results go to ``benchmarks/results/keras_backup_blocking.{md,json}``.

One run, three systems, each in a fresh worker process, one after the other, on the same
model, data and backup schedule:

  keras local      ``keras.callbacks.BackupAndRestore`` to a directory on local disk: it
                   writes ``latest.weights.h5`` (weights and optimizer state) in place,
                   in the training thread. The floor for a backup that blocks.
  tf checkpoint local
                   the backup ckptstore takes (a ``tf.train.Checkpoint`` of the model and
                   optimizer) written by ``tf.train.CheckpointManager`` to local disk, with
                   no upload: the floor for ckptstore's blocking time, TensorFlow's writer.
  ckptstore s3     ``ckptstore.keras.BackupAndRestore("s3://...")`` over the slow link:
                   moto's S3 server in its own process behind the test suite's throttling
                   proxy (``link.py``'s link: ``--bandwidth-mb`` MB/s each way, 40 by
                   default, ``--latency-ms`` per request). The backup is written to local
                   staging in the training thread; upload, verification and commit run in
                   the background, and a backup still waiting when the next one comes is
                   dropped (the newer one goes next).

The model: Dense layers of ``--params-m`` million float32 parameters (25.2 M, 101 MB of
weights, by default) trained with Adam, so a backup holds the weights and Adam's two slots
(about 3x the weights). fit() runs ``--backups`` x ``--save-freq`` batches with
``save_freq=--save-freq``; with the defaults a backup is due about as often as one crosses
the link.

Measured per system, inside fit(): the time the callback's ``on_train_batch_end`` takes at
each batch that backs up (what fit() is blocked for, per backup); ``on_train_begin``
(opening the backup directory) and ``on_train_end`` (Keras: delete the local file;
ckptstore: wait for the upload in flight, then delete the remote backup, manifest first);
the median time of a training batch between backups (what background uploads cost the
foreground), and fit()'s wall time. For ckptstore, how many backups were committed and how
many were dropped as superseded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from link import (  # noqa: E402
    BUCKET,
    MB,
    add_link_arguments,
    add_run_arguments,
    open_link,
    run_worker,
    write_results,
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # the workers' TensorFlow: errors only

SYSTEMS = ("keras local", "tf checkpoint local", "ckptstore s3")
HOOKS = ("on_train_begin", "on_epoch_end", "on_train_batch_end", "on_train_end")


# --------------------------------------------------------------------------- a worker


def build_model(params_m: float):
    """Dense layers adding up to about ``params_m`` million parameters, compiled with Adam."""
    import keras

    # Two hidden layers of ``width`` on ``width / 2`` inputs: 1.5 width^2 parameters (+ biases).
    width = int((params_m * 1e6 / 1.5) ** 0.5)
    inputs = width // 2
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((inputs,)),
            keras.layers.Dense(width, activation="relu"),
            keras.layers.Dense(width, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="mse")
    return model, inputs


def tf_checkpoint_backup_class():
    """The same backup as ckptstore's, written by TensorFlow alone to local disk."""
    import keras
    import tensorflow as tf

    class TFCheckpointBackup(keras.callbacks.Callback):
        """``tf.train.CheckpointManager(max_to_keep=1).save()`` every ``save_freq`` batches."""

        def __init__(self, directory: str, save_freq: int):
            super().__init__()
            self.directory, self.save_freq, self.seen = directory, save_freq, 0

        def on_train_begin(self, logs=None):
            model = self.model
            checkpoint = tf.train.Checkpoint(
                model=model, optimizer=model.optimizer, model_variables=list(model.variables)
            )
            self.manager = tf.train.CheckpointManager(checkpoint, self.directory, max_to_keep=1)

        def on_epoch_end(self, epoch, logs=None):
            pass

        def on_train_batch_end(self, batch, logs=None):
            self.seen += 1
            if self.seen % self.save_freq == 0:
                self.manager.save()

        def on_train_end(self, logs=None):
            shutil.rmtree(self.directory, ignore_errors=True)

    return TFCheckpointBackup


def timed(callback, record: list) -> None:
    """Time each hook of ``callback`` (an instance attribute over its method, for this fit)."""
    for hook in HOOKS:
        original = getattr(callback, hook)

        def wrapper(*args, _original=original, _hook=hook, **kwargs):
            t0 = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                record.append((_hook, args[0] if args else None, time.perf_counter() - t0))

        setattr(callback, hook, wrapper)


def worker(cfg: dict) -> dict:
    import keras
    import numpy as np

    import ckptstore.keras

    tf_checkpoint_backup = tf_checkpoint_backup_class()
    system, work = cfg["system"], cfg["work"]
    model, inputs = build_model(cfg["params_m"])
    batches = cfg["backups"] * cfg["save_freq"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batches * cfg["batch_size"], inputs)).astype("float32")
    y = x[:, :1].copy()
    # Warm-up: trace the train function, so no system pays that inside the measurement.
    model.fit(
        x[: cfg["batch_size"] * 2],
        y[: cfg["batch_size"] * 2],
        batch_size=cfg["batch_size"],
        verbose=0,
    )

    if system == "keras local":
        backup_dir = os.path.join(work, "keras-backup")
        callback = keras.callbacks.BackupAndRestore(backup_dir, save_freq=cfg["save_freq"])
    elif system == "tf checkpoint local":
        backup_dir = os.path.join(work, "tf-backup")
        callback = tf_checkpoint_backup(backup_dir, cfg["save_freq"])
    else:
        url = f"s3://{BUCKET}/keras-backup-{uuid.uuid4().hex[:6]}"
        callback = ckptstore.keras.BackupAndRestore(
            url,
            save_freq=cfg["save_freq"],
            storage_options=cfg["slow"],
            staging_dir=os.path.join(work, "staging"),
        )
    hooks: list = []
    timed(callback, hook_record := hooks)
    status: dict = {}
    size = [0]

    if system == "ckptstore s3":
        # Not user code: what the manager did, read just before on_train_end closes it.
        end = callback.on_train_end

        def on_train_end(logs=None):
            manager = callback._manager
            superseded = len(manager.upload_status().skipped)
            prefix = manager.latest_checkpoint or ""
            d = os.path.dirname(prefix)
            size[0] = sum(
                os.path.getsize(os.path.join(d, n))
                for n in os.listdir(d)
                if n.startswith(os.path.basename(prefix) + ".")
            )
            try:
                return end(logs)
            finally:
                after = manager.upload_status()
                status.update(
                    committed=cfg["backups"] - len(after.skipped) - len(after.failed),
                    superseded=superseded,  # dropped during fit(): a newer backup came
                    dropped_at_end=len(after.skipped) - superseded,  # deleted anyway
                )

        callback.on_train_end = on_train_end

    class StepTimer(keras.callbacks.Callback):
        """Time of each batch's training alone: from its begin to the first batch-end hook."""

        def __init__(self):
            super().__init__()
            self.steps: list[float] = []
            self.begins: list[float] = []

        def on_train_batch_begin(self, batch, logs=None):
            self.t0 = time.perf_counter()
            self.begins.append(self.t0)

        def on_train_batch_end(self, batch, logs=None):
            self.steps.append(time.perf_counter() - self.t0)
            if system != "ckptstore s3" and not size[0] and os.path.isdir(backup_dir):
                size[0] = sum(
                    os.path.getsize(os.path.join(backup_dir, n))
                    for n in os.listdir(backup_dir)
                    if n.endswith((".h5", ".index")) or ".data-" in n
                )

    steps = StepTimer()
    t0 = time.perf_counter()
    model.fit(
        x, y, batch_size=cfg["batch_size"], epochs=1, shuffle=False, verbose=0,
        callbacks=[steps, callback],
    )  # fmt: skip
    wall = time.perf_counter() - t0
    batch_hooks = [d for hook, _, d in hook_record if hook == "on_train_batch_end"]
    cycles = [b - a for a, b in zip(steps.begins, steps.begins[1:])]
    # Time in fit() that is neither a training batch nor a hook of the backup callback.
    outside = sum(c - s - h for c, s, h in zip(cycles, steps.steps, batch_hooks))
    per_backup = [
        d
        for hook, batch, d in hook_record
        if hook == "on_train_batch_end" and (batch + 1) % cfg["save_freq"] == 0
    ]
    # The batch right after each backup shares the machine with its upload (ckptstore).
    after = [steps.steps[i] for i in range(len(steps.steps)) if i % cfg["save_freq"] != 0]
    return {
        "system": system,
        "backup_bytes": size[0],
        "blocking": per_backup,
        "on_train_begin": next(d for h, _, d in hook_record if h == "on_train_begin"),
        "on_train_end": next(d for h, _, d in hook_record if h == "on_train_end"),
        "step_median": statistics.median(after),
        "fit_wall": wall,
        "hooks_total": sum(d for _, _, d in hook_record),
        "before_first_batch": steps.begins[0] - t0,
        "between_batches_outside": outside,
        # From the end of the last batch's hooks to fit()'s return, on_train_end excluded.
        "after_last_batch": wall
        - (steps.begins[-1] - t0)
        - steps.steps[-1]
        - batch_hooks[-1]
        - next(d for h, _, d in hook_record if h == "on_train_end"),
        "steps_total": sum(steps.steps),
        **status,
    }


# --------------------------------------------------------------------------- report


def report(results: dict, link: dict, cfg: dict) -> str:
    keras_local = results["keras local"]
    base = statistics.median(keras_local["blocking"])
    size = results["ckptstore s3"]["backup_bytes"] or keras_local["backup_bytes"]
    lines = [
        f"Keras model: {cfg['params_m']:.1f} M parameters ({cfg['params_m'] * 4:.0f} MB of "
        f"float32 weights), Adam. A backup: {keras_local['backup_bytes'] / MB:.0f} MB "
        f"(Keras's .weights.h5), {results['ckptstore s3']['backup_bytes'] / MB:.0f} MB "
        "(ckptstore's TF checkpoint); weights plus Adam's slots.",
        f"fit(): {cfg['backups'] * cfg['save_freq']} batches of {cfg['batch_size']}, "
        f"save_freq={cfg['save_freq']} ({cfg['backups']} backups). Link for ckptstore: capped "
        f"at {cfg['bandwidth_mb']:.0f} MB/s + {cfg['latency_ms']:.0f} ms per request; "
        f"measured {link['up'] / MB:.1f} MB/s up ({size / link['up']:.1f} s per backup). "
        f"{os.cpu_count()} cores.",
        "",
        "| system | blocked per backup: median | p90 | max | / Keras local | on_train_begin "
        "| on_train_end | in the callback, whole fit() | training batch (median) "
        "| backups committed / superseded / dropped at end |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        b = sorted(r["blocking"])
        p90 = b[min(len(b) - 1, round(0.9 * (len(b) - 1)))]
        kept = (
            f"{r['committed']} / {r['superseded']} / {r['dropped_at_end']}"
            if "committed" in r
            else "local file"
        )
        lines.append(
            f"| {name} | {statistics.median(b):.3f} s | {p90:.3f} s | {b[-1]:.3f} s "
            f"| {statistics.median(b) / base:.2f} | {r['on_train_begin']:.3f} s "
            f"| {r['on_train_end']:.3f} s | {r['hooks_total']:.2f} s | {r['step_median']:.3f} s "
            f"| {kept} |"
        )
    lines += [
        "",
        "Blocked per backup: the callback's on_train_batch_end at each batch that backs up, "
        "inside fit(). ckptstore's on_train_end waits for the upload in flight, then deletes "
        "the remote backup (Keras's deletes its local file): it is paid once per fit(), not "
        "per backup. Backups: verified and committed on the remote / dropped while waiting "
        "because a newer one came (the newest always goes next) / waiting when fit() ended, "
        "dropped since the backup is deleted then. 'tf checkpoint local' writes the same "
        "checkpoint ckptstore stages, with TensorFlow's writer and no upload: ckptstore's "
        "blocking time is that write. The JSON has every backup's time and fit()'s wall time "
        "with its breakdown (on a shared machine, the wall time varies by tens of seconds "
        "between runs, outside the callbacks).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params-m", type=float, default=25.2, help="model size, M params")
    parser.add_argument("--backups", type=int, default=8)
    parser.add_argument("--save-freq", type=int, default=30, help="batches between backups")
    parser.add_argument("--batch-size", type=int, default=32)
    add_link_arguments(parser)
    add_run_arguments(parser, "keras_backup_blocking", "4 backups of a 5 M model")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.quick:
        args.params_m, args.backups, args.save_freq = 5.0, 4, 10

    with open_link(args) as (_, _, slow, link):
        cfg = {
            "params_m": args.params_m,
            "backups": args.backups,
            "save_freq": args.save_freq,
            "batch_size": args.batch_size,
            "bandwidth_mb": args.bandwidth_mb,
            "latency_ms": args.latency_ms,
            "slow": slow,
        }
        results = {}
        for system in SYSTEMS:
            print(f"running {system} ...", flush=True)
            results[system] = run_worker(
                __file__, {**cfg, "system": system}, "ckptstore-keras-bench-"
            )
    text = report(results, link, cfg)
    write_results(args.out, text, cfg, link, indent=1, results=results)
    print("\n" + text)
    print(f"\nwritten: {args.out}.md, .json")


if __name__ == "__main__":
    main()
