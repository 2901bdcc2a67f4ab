"""Graph mode: what ``save()`` does outside eager execution.

With a plain local directory ckptstore saves in a ``tf.compat.v1`` graph and
session exactly as TensorFlow's manager does (``test_differential.py`` compares
the two). Everywhere else graph mode is refused with a
:class:`ckptstore.ConfigurationError` before anything changes: no save counter
increment, no interval step taken, no file, nothing on the remote.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

import ckptstore
from conftest import file_remote


def checkpoint_files(directory) -> list[str]:
    if not os.path.isdir(directory):
        return []
    return sorted(
        n for n in os.listdir(directory) if ".index" in n or ".data-" in n or "_temp" in n
    )


def test_remote_save_in_a_session_is_refused_before_anything_changes(tmp_path):
    remote = file_remote(tmp_path)
    staging = tmp_path / "staging"
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        step = tf.Variable(0, dtype=tf.int64)
        checkpoint = tf.train.Checkpoint(v=tf.Variable(np.ones(3, np.float32)), step=step)
        counter = checkpoint.save_counter
        session.run(tf.compat.v1.global_variables_initializer())
        manager = ckptstore.CheckpointManager(
            checkpoint,
            remote.url,
            2,
            step_counter=step,
            checkpoint_interval=1,
            staging_dir=str(staging),
        )
        with pytest.raises(ckptstore.ConfigurationError, match="with a remote needs eager"):
            manager.save()
        assert session.run(counter) == 0
    assert checkpoint_files(staging) == []
    assert remote.names() == []
    manager.close()


def eager_state():
    step = tf.Variable(0, dtype=tf.int64)
    checkpoint = tf.train.Checkpoint(v=tf.Variable(np.ones(3, np.float32)), step=step)
    return step, checkpoint


@pytest.mark.parametrize("mode", ["local", "remote"])
def test_save_inside_tf_function_is_refused_before_anything_changes(tmp_path, mode):
    step, checkpoint = eager_state()
    directory = tmp_path / "ckpts"
    kwargs = {"step_counter": step, "checkpoint_interval": 1}
    if mode == "local":
        manager = ckptstore.CheckpointManager(checkpoint, str(directory), 2, **kwargs)
    else:
        manager = ckptstore.CheckpointManager(
            checkpoint, file_remote(tmp_path).url, 2, staging_dir=str(directory), **kwargs
        )

    @tf.function
    def train_step():
        step.assign_add(1)
        manager.save()

    with pytest.raises(Exception) as raised:
        train_step()
    # AutoGraph re-raises an exception type it does not know as a StagingError whose
    # message names the original type and carries its message.
    error = raised.value
    assert isinstance(error, ckptstore.ConfigurationError) or "ConfigurationError" in str(error)
    expected = "with a remote needs eager" if mode == "remote" else "no default tf.compat.v1"
    assert expected in str(error)
    assert int(checkpoint.save_counter.numpy()) == 0
    assert checkpoint_files(directory) == []
    # The refused save took no interval step: an eager save at this step still saves.
    step.assign(1)
    assert os.path.basename(manager.save()) == "ckpt-1"
    manager.close()
