"""One worker of a two-worker ``MultiWorkerMirroredStrategy`` run that checkpoints with ckptstore.

Run by test_multi_worker.py as ``python multi_worker_child.py CONFIG`` (CONFIG: JSON with
``url``, ``options`` (storage_options; each worker's endpoint is its own recording proxy),
``staging``, ``until`` (train up to this step, then sync and exit), ``save_every``, ``pace``
(seconds per step)); the cluster comes from ``TF_CONFIG``, as TensorFlow reads it.

Every worker runs the same code, as TensorFlow's convention asks: every worker calls the same
``save()``. The checkpoint holds a SyncOnRead variable (``seen``, summed over the workers), so a
save needs every worker: it is all-reduced while it is written. Worker 0 creates its manager
inside ``strategy.scope()``, the others outside (its role then comes from the checkpoint's
variables): both ways users write it.

With ``"mode": "ps"`` (and ``shared``, a plain directory) it is instead the coordinator of an
in-process ``ParameterServerStrategy`` cluster, and prints whether a manager on ``url`` was
refused (``REFUSED <message>``) and whether one on the plain path saved and restored
(``LOCAL ...``).

Otherwise it prints, one line each (the parent parses them)::

    ROLE task=<i> chief=<0|1> writer=<0|1> staging=<dir>
    RESTORED task=<i> step=<n> digest=<hex> from=<name|none>
    SAVED task=<i> step=<n> digest=<hex> path=<prefix> wrote=<0|1> left=<0|1> committed=<names>
    DONE task=<i> step=<n>

``wrote`` says TensorFlow's write was complete when its write callback ran (``.index`` there),
``left`` whether anything of it (or a ``workertemp_<i>`` directory) remains after ``save()``
returned; ``committed`` is the chief's committed checkpoints at that moment (``-`` elsewhere).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf

import ckptstore

GLOBAL_BATCH = 8


def say(line: str) -> None:
    print(line, flush=True)


def digest(variables) -> str:
    h = hashlib.sha256()
    for v in variables:
        h.update(np.asarray(v.numpy()).tobytes())
    return h.hexdigest()[:16]


def batch(step: int, task: int):
    """This worker's half of the global batch of ``step``: a function of the step and task."""
    rng = np.random.default_rng(step * 10 + task)
    x = rng.standard_normal((GLOBAL_BATCH // 2, 4)).astype("float32")
    return x, x.sum(axis=1, keepdims=True).astype("float32")


def parameter_servers(config: dict) -> None:
    """An in-process ParameterServerStrategy cluster: this process is its coordinator."""
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    cluster = tf.train.ClusterSpec(
        {"worker": [f"127.0.0.1:{ports[0]}"], "ps": [f"127.0.0.1:{ports[1]}"]}
    )
    for job in ("worker", "ps"):
        tf.distribute.Server(cluster, job_name=job, task_index=0, protocol="grpc", start=True)
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(cluster, rpc_layer="grpc")
    strategy = tf.distribute.experimental.ParameterServerStrategy(resolver)
    with strategy.scope():
        weights = tf.Variable(tf.range(6.0))
    say(f"PLACED device={weights.device} should_checkpoint={strategy.extended.should_checkpoint}")
    checkpoint = tf.train.Checkpoint(weights=weights)
    try:
        ckptstore.CheckpointManager(
            checkpoint,
            config["url"],
            max_to_keep=1,
            staging_dir=config["staging"],
            storage_options=config["options"],
        )
    except ckptstore.ConfigurationError as exc:
        say(f"REFUSED {exc}")
    else:
        say("ACCEPTED")
    # A plain path on a file system every task mounts: local mode, TensorFlow's manager.
    local = ckptstore.CheckpointManager(checkpoint, config["shared"], max_to_keep=1)
    path = local.save()
    weights.assign(tf.zeros(6))
    checkpoint.restore(local.latest_checkpoint)
    say(f"LOCAL path={path} restored={weights.numpy().tolist() == list(range(6))}")


def main() -> None:
    config = json.loads(sys.argv[1])
    if config.get("mode") == "ps":
        parameter_servers(config)
        return
    strategy = tf.distribute.MultiWorkerMirroredStrategy()  # TF_CONFIG: TensorFlow's errors
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    with strategy.scope():
        model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(1)])
        optimizer = tf.keras.optimizers.SGD(0.05)
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64)
        seen = tf.Variable(
            0.0,
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.SUM,
        )
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step, seen=seen)

    def open_manager():
        return ckptstore.CheckpointManager(
            checkpoint,
            config["url"],
            max_to_keep=2,
            staging_dir=config["staging"],
            storage_options=config["options"],
        )

    if task == 0:
        with strategy.scope():
            manager = open_manager()
    else:
        manager = open_manager()
    chief = strategy.extended.should_checkpoint
    say(
        f"ROLE task={task} chief={int(chief)} writer={int(manager.is_writer)} "
        f"staging={manager.staging_dir}"
    )

    latest = manager.latest_checkpoint
    checkpoint.restore(latest)
    weights = model.weights + optimizer.variables
    say(
        f"RESTORED task={task} step={int(step.numpy())} digest={digest(weights)} "
        f"from={os.path.basename(latest) if latest else 'none'}"
    )

    @tf.function
    def train_step(x, y):
        def replica(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum((model(x) - y) ** 2) / GLOBAL_BATCH
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            seen.assign_add(float(GLOBAL_BATCH // 2))

        strategy.run(replica, args=(x, y))
        step.assign_add(1)

    written: list[str] = []

    def on_write(save_path: str) -> None:  # the user's own write callback: TensorFlow's API
        written.append((save_path, os.path.exists(save_path + ".index")))

    workertemp = os.path.join(manager.staging_dir, f"workertemp_{task}")
    while int(step.numpy()) < config["until"]:
        train_step(*batch(int(step.numpy()), task))
        s = int(step.numpy())
        if s % config["save_every"] == 0:
            written.clear()
            options = tf.train.CheckpointOptions(experimental_write_callbacks=[on_write])
            path = manager.save(checkpoint_number=s, options=options)
            wrote = written == [(path, True)]
            left = (
                any(os.path.exists(path + suffix) for suffix in (".index", DATA))
                or os.path.exists(workertemp)
                if not chief
                else False
            )
            committed = ",".join(manager.upload_status().committed) if chief else "-"
            say(
                f"SAVED task={task} step={s} digest={digest(weights)} path={path} "
                f"wrote={int(wrote)} left={int(left)} committed={committed or '-'}"
            )
        time.sleep(config["pace"])
    manager.sync()
    manager.close()
    say(f"DONE task={task} step={int(step.numpy())}")


DATA = ".data-00000-of-00001"

if __name__ == "__main__":
    main()
