"""Who writes under ``tf.distribute``: the chief uploads, the other workers only take part.

Under ``MultiWorkerMirroredStrategy`` every worker must call ``save()`` (the
variables that are all-reduced while saving need every worker), but only one
may write the real directory. TensorFlow's convention
(``distributed_file_utils.write_dirpath``) gives a worker that should not save
a directory of its own, ``<dir>/workertemp_<task_id>``, and deletes it after.
ckptstore follows it: a worker that is not the chief writes into a local
``workertemp_<task_id>`` directory (in a private directory under its staging
directory, removed when the manager goes), deletes it after each save, reads
the remote to restore, and never writes to it. Under a multi-worker strategy
nobody resumes checkpoints staged but never committed: every worker restores
the newest committed one, the only one they all can see.

Chief-ness is TensorFlow's: ``strategy.extended.should_checkpoint``. The
strategy is the one in scope when the manager is created, else the one the
checkpoint's variables were created under (a manager is often made outside
``strategy.scope()``).

``ParameterServerStrategy`` is refused with a URL. Its coordinator is the only
process that runs the training loop (and ``should_checkpoint`` is true there),
but TensorFlow does not write a checkpoint from the coordinator: each variable's
shard is saved by ``SaveV2`` on the CPU of the task holding the variable, so a
parameter server writes its own part, on its own machine, and the merge runs on
the CPU of the last of those tasks (``functional_saver.py``:
``_single_shard_save``, ``MultiDeviceSaver.save``). A staging directory on the
coordinator's disk would receive the coordinator's part only. A plain path on a
file system every task mounts works (local mode is TensorFlow's manager,
unchanged).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from typing import Any

from ckptstore import staging_lock
from ckptstore.errors import ConfigurationError
from ckptstore.staging import tf
from ckptstore.staging_lock import LOCK_NAME, StagingLock

#: a non-chief worker's private directories inside its staging directory start so
WORKER_DIR_PREFIX = ".ckptstore-worker"


@dataclasses.dataclass(frozen=True)
class Role:
    """What this process does for a run under ``tf.distribute``."""

    #: the run spans several workers (a cluster in TF_CONFIG)
    multi_worker: bool = False
    #: this process writes the checkpoints (TensorFlow's ``should_checkpoint``)
    chief: bool = True
    #: TensorFlow's task id of this worker (``workertemp_<task_id>``)
    task_id: int | None = None
    #: the strategy's class name, for messages
    strategy: str | None = None


SINGLE = Role()


def strategy_of(checkpoint: Any) -> Any:
    """The ``tf.distribute`` strategy in scope, else the one the checkpoint's variables use."""
    if tf.distribute.has_strategy():
        return tf.distribute.get_strategy()
    try:
        objects = tf.train.TrackableView(checkpoint).descendants()
    except Exception:  # not a trackable (TensorFlow's own manager fails later, at save)
        return None
    for obj in objects:
        strategy = getattr(obj, "_distribute_strategy", None)
        if strategy is not None:
            return strategy
    return None


def role_of(checkpoint: Any, shown_url: str = "a URL") -> Role:
    """This process's role for ``checkpoint``'s run (:data:`SINGLE` outside a cluster).

    For remote mode (staging, then upload). Raises :class:`ConfigurationError`
    under ``ParameterServerStrategy``, whose parameter servers write their part
    of a checkpoint themselves, on their own machines.
    """
    strategy = strategy_of(checkpoint)
    if strategy is None:
        return SINGLE
    if isinstance(strategy, _parameter_server_strategies()):
        raise ConfigurationError(
            f"ckptstore.CheckpointManager on {shown_url} cannot checkpoint a "
            "ParameterServerStrategy run: TensorFlow has each parameter server write its "
            "own variables, on its own machine, so the checkpoint cannot be staged on this "
            "machine's disk and uploaded from here. Give the manager a plain path on a file "
            "system every task of the cluster mounts (without staging_dir=, it is "
            "tf.train.CheckpointManager unchanged), or use MultiWorkerMirroredStrategy."
        )
    extended = strategy.extended
    in_cluster = getattr(extended, "_in_multi_worker_mode", lambda: False)()
    if not in_cluster:
        return SINGLE
    return Role(
        multi_worker=True,
        chief=bool(extended.should_checkpoint),
        task_id=getattr(extended, "_task_id", None),
        strategy=type(strategy).__name__,
    )


def worker_staging_dir(staging_dir: str, task_id: int | None) -> tuple[str, StagingLock]:
    """A non-chief worker's private directory inside ``staging_dir``, locked while it lives.

    It holds the worker's restore download and its ``workertemp_<task_id>``, on the
    disk the worker was told to stage on; the chief may stage in ``staging_dir``
    too and never looks inside. The ones killed workers left (their lock is free)
    are removed first, so a machine whose workers are killed again and again does
    not fill up. A new directory is locked under a name no one removes, then
    renamed: nobody ever sees it unlocked.
    """
    # Without flock (not POSIX) a live worker's directory cannot be told from a dead one's.
    for name in os.listdir(staging_dir) if staging_lock.fcntl is not None else ():
        path = os.path.join(staging_dir, name)
        if not name.startswith(WORKER_DIR_PREFIX) or not os.path.isfile(
            os.path.join(path, LOCK_NAME)
        ):
            continue
        lock = StagingLock(path)
        with contextlib.suppress(OSError):  # another worker is removing it right now
            if lock.acquire():
                shutil.rmtree(path, ignore_errors=True)
        lock.release()
    creating = tempfile.mkdtemp(prefix=".ckptstore-new-worker-", dir=staging_dir)
    lock = StagingLock(creating)
    lock.acquire()
    path = os.path.join(staging_dir, WORKER_DIR_PREFIX + f"{task_id}-" + creating.rsplit("-", 1)[1])
    os.rename(creating, path)  # the open lock goes with it
    lock.path = os.path.join(path, LOCK_NAME)
    return path, lock


def _parameter_server_strategies() -> tuple[type, ...]:
    """TensorFlow's ParameterServerStrategy classes (TF2's, and TF1's in tf.compat.v1)."""
    found = []
    for path in (
        ("distribute", "experimental", "ParameterServerStrategy"),
        ("compat", "v1", "distribute", "experimental", "ParameterServerStrategy"),
    ):
        obj: Any = tf
        for name in path:
            obj = getattr(obj, name, None)
        if isinstance(obj, type):
            found.append(obj)
    return tuple(found)
