"""TensorFlow's ``PreemptionCheckpointHandler`` drives ckptstore's manager on a spot VM.

Each test runs a training process (preemption_child.py: the custom loop TensorFlow documents,
every step through ``handler.run()``, a ckptstore manager on S3) and plays the platform: it
sends SIGTERM from this process at a step drawn from a seeded ``random.Random``. TensorFlow's
handler then saves at the next step boundary, inside its preemption save context, and calls
its ``exit_fn``; ckptstore's ``save()`` commits that checkpoint before it returns. The child
journals every variable after each step, so what a fresh machine restores is compared, bit for
bit, with what the run held at the step the handler saved (the last journaled one: the handler
exits right after saving). Restores use a manager on an EMPTY staging directory, straight to
the S3 server, as a new VM would.

The grace-period tests throttle the link (a FaultProxy in this process) so that the preemption
checkpoint cannot cross it within ``TerminationConfig(grace_period=G)``; what TensorFlow's
handler does then (``_check_preemption_and_maybe_checkpoint``, TensorFlow 2.16-2.21):

1. the signal sets ``_received_own_sigterm``; the next ``run()`` picks the step to save at
   (one more step) and computes ``target = signal + G - 6 * mean step time``;
2. one step later it saves (checkpoint A) and, as a grace period is given, does NOT exit: it
   sets ``_final_checkpoint_countdown`` and goes on training;
3. once ``target`` has passed it picks a step again, trains it, saves (checkpoint B), and only
   then calls ``exit_fn``.

ckptstore's ``save()`` of A waits for A's commit until ``signal + G`` (A cannot make it: an ERROR
says so and names the commit that stays restorable); the save of B finds no time left, says the
same, and the interpreter-exit drain gives up at once: it does not wait for the upload worker to
stop (it would need seconds to finish the part it is sending) nor release the lease after it. So
the process exits shortly after ``signal + G``, with TensorFlow's status.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

import children
import ckptstore
from conftest import s3_remote
from preemption_child import State, journaled_steps, read_journal
from servers.faultproxy import FaultProxy

CHILD = os.path.join(os.path.dirname(__file__), "preemption_child.py")
TF_EXIT_STATUS = 42  # TensorFlow's default exit_fn outside GCP: sys.exit(42)

#: (seed, strategy, custom exit status or None): the seed draws the step at which SIGTERM is sent
RANDOM_STEP_CASES = [
    (11, None, None),
    (12, None, None),
    (13, None, None),
    (14, None, 75),  # TerminationConfig(exit_fn=...): os._exit(75), no exit hooks at all
    (15, "mirrored", None),  # tf.distribute.MirroredStrategy(["/cpu:0"])
]

GRACE = 3.0  # TerminationConfig(grace_period=GRACE) in the grace-period tests
SLOW_LINK = 1_000_000  # bytes/s each way: 16 MB take 16 s, far beyond GRACE
BALLAST = 4_000_000  # float32 elements: a 16 MB checkpoint
#: after ``signal + GRACE``: one training step (50 ms), TensorFlow's local write of B (16 MB, about
#: 0.1 s), the exit drain (which gives up at once: milliseconds) and the interpreter's shutdown
#: (0.7 to 1 s for any process that has TensorFlow loaded, here). Measured: 1.2 to 1.5 s. Waiting
#: for the upload would take 16 s more; the drain's old close() took 6.5 s more (it gave the upload
#: worker 5 s to stop, then released the lease through the slow link).
EXIT_MARGIN = 2.5


class Child(children.Child):
    """A preemption_child.py process, started with ``config`` (as JSON in its argv)."""

    def __init__(self, **config):
        super().__init__([sys.executable, CHILD, json.dumps(config)])

    def wait_for_step(self, step: int) -> None:
        self.wait_for(lambda line: line == f"step {step}")


def preempted_checkpoint(child: Child) -> str:
    """The checkpoint ckptstore says the handler saved (``preempted; committing ckpt-N``)."""
    found = re.findall(r"preempted; committing (ckpt-\d+)", child.stderr())
    assert found, child.output()
    return found[-1]


def restore_on_a_new_machine(remote, staging, ballast: int) -> tuple[str, dict[str, np.ndarray]]:
    """What a new VM restores: a manager on an empty staging directory, straight to S3."""
    assert not os.path.exists(staging) or not os.listdir(staging)
    fresh = State(ballast)
    with ckptstore.CheckpointManager(
        fresh.checkpoint,
        remote.url,
        max_to_keep=3,
        staging_dir=str(staging),
        storage_options=remote.storage_options,
        read_only=True,
    ) as manager:
        prefix = manager.latest_checkpoint
        assert prefix is not None, "nothing restorable on the remote"
        # The handler's own variable (checkpointed_runs) is in the checkpoint too.
        fresh.checkpoint.restore(prefix).assert_existing_objects_matched()
    return os.path.basename(prefix), fresh.values()


def assert_bit_for_bit(restored: dict[str, np.ndarray], journaled: dict[str, np.ndarray]) -> None:
    assert sorted(restored) == sorted(journaled)
    for name, value in journaled.items():
        got = restored[name]
        assert got.dtype == value.dtype and got.shape == value.shape, name
        assert got.tobytes() == value.tobytes(), f"{name} differs from the journaled value"


# --------------------------------------------------------------------------- a SIGTERM mid-run


@pytest.mark.parametrize(("seed", "strategy", "exit_code"), RANDOM_STEP_CASES)
def test_sigterm_at_a_random_step_exits_with_tensorflows_status_and_commits_that_step(
    seed, strategy, exit_code, s3_server, tmp_path
):
    remote = s3_remote(s3_server)
    signal_after = random.Random(seed).randint(2, 14)  # SIGTERM once this step is reported
    child = Child(
        url=remote.url,
        storage_options=remote.storage_options,
        staging=str(tmp_path / "staging"),
        journal=str(tmp_path / "journal"),
        steps=200,
        pace=0.05,
        save_every=4,  # backup saves: the handler's must still be the one restored
        strategy=strategy,
        exit_code=exit_code,
    )
    child.wait_for_step(signal_after)
    child.sigterm()
    code = child.wait()
    assert code == (TF_EXIT_STATUS if exit_code is None else exit_code), child.output()
    assert "finished" not in child.out, "the run ended on its own: the signal came too late"

    # The handler saved at a step boundary after the signal, then exited: that step is the
    # last one the child journaled, and at least the one that was running at the signal.
    saved = journaled_steps(str(tmp_path / "journal"))[-1]
    assert saved >= signal_after + 1, child.output()
    name = preempted_checkpoint(child)
    assert f"ckptstore: {name} committed to {remote.url}" in child.stderr(), child.output()
    if exit_code is not None:
        assert f"exit_fn at step {saved}" in child.out  # exit_fn ran after the commit
    else:
        # sys.exit(42) ran the exit drain: the writer lease is released, so a new VM's first
        # save() takes the run at once (os._exit skips it: the lease then expires on its own).
        assert json.loads(remote.read("ckptstore.lease.json"))["released"] is True

    restored_name, values = restore_on_a_new_machine(remote, tmp_path / "new-vm", 16)
    assert restored_name == name
    assert int(values["step"]) == saved
    assert_bit_for_bit(values, read_journal(str(tmp_path / "journal"), saved))


# --------------------------------------------------------------------------- the grace period


@contextlib.contextmanager
def slow_link(server):
    """storage_options that reach ``server`` through a link of SLOW_LINK bytes/s each way."""
    proxy = FaultProxy("127.0.0.1", server.port, bandwidth_bytes_per_s=SLOW_LINK).start()
    try:
        yield server.storage_options(proxy.endpoint_url)
    finally:
        proxy.stop()


def first_run_commits_step(remote, staging, journal, step: int) -> None:
    """A first life of the run on a fast link: trains to ``step``, saves it, ends normally."""
    child = Child(
        url=remote.url,
        storage_options=remote.storage_options,
        staging=staging,
        journal=journal,
        steps=step,
        pace=0.0,
        save_every=step,
        ballast_elements=BALLAST,
    )
    assert child.wait() == 0, child.output()
    assert "finished" in child.out, child.output()
    assert remote.manifests() == ["ckpt-1"]


@pytest.mark.parametrize("second_sigterm", [False, True], ids=["one-sigterm", "two-sigterms"])
def test_an_upload_that_cannot_finish_in_the_grace_period(second_sigterm, s3_server, tmp_path):
    remote = s3_remote(s3_server)  # the test's own view, straight to the server
    staging, journal = str(tmp_path / "staging"), str(tmp_path / "journal")
    first_run_commits_step(remote, staging, journal, 5)

    with slow_link(s3_server) as slow:
        # Same URL, same staging (the same VM, back up): ckpt-1 is restored from staging.
        child = Child(
            url=remote.url,
            storage_options=slow,
            staging=staging,
            journal=journal,
            steps=10_000,
            pace=0.05,
            grace_period=GRACE,
            ballast_elements=BALLAST,
        )
        child.wait_for(lambda line: line == "restored 5")
        child.wait_for_step(5 + random.Random(21).randint(2, 6))
        signalled = child.sigterm()
        if second_sigterm:
            # While save() waits on the first preemption checkpoint's upload: TensorFlow's
            # handler records the signal's time again (in local mode); the deadline must not move.
            child.wait_for(lambda line: "preempted; committing" in line)
            time.sleep(GRACE - 1.0)
            child.sigterm()
        code = child.wait(timeout=60)
        took = child.exited_at - signalled

    assert code == TF_EXIT_STATUS, child.output()
    assert took <= GRACE + EXIT_MARGIN, f"exited {took:.1f} s after SIGTERM\n{child.output()}"
    # B is saved once A's wait ran out at the deadline: no time is left for it (a second SIGTERM
    # must not have moved the deadline).
    lefts = re.findall(r"grace period: (\d+\.\d) s left", child.stderr())
    assert len(lefts) == 2 and float(lefts[0]) <= GRACE and lefts[1] == "0.0", child.output()
    errors = re.findall(
        r"ERROR:ckptstore:ckptstore: the preemption checkpoint (ckpt-\d+) could not be committed "
        r"to \S+ within the grace period; (ckpt-\d+) stays the restorable one",
        child.stderr(),
    )
    # A (at the first step boundary) and B (at the end of the countdown): neither made it.
    assert [e[0] for e in errors] == ["ckpt-2", "ckpt-3"], child.output()
    assert {e[1] for e in errors} == {"ckpt-1"}, child.output()
    assert "ckpt-2, ckpt-3 NOT committed" in child.stderr(), child.output()
    assert "the grace period is over, so the process exits without waiting" in child.stderr()

    # Nothing committed was lost: ckpt-1 is still what a new machine restores, bit for bit.
    assert remote.manifests() == ["ckpt-1"]
    name, values = restore_on_a_new_machine(remote, tmp_path / "new-vm", BALLAST)
    assert name == "ckpt-1"
    assert_bit_for_bit(values, read_journal(journal, 5))

    # The unfinished checkpoints stayed staged: the next manager on that staging directory
    # (the same VM, back up; a fast link now) uploads them, and the last one is the run's state.
    saved = journaled_steps(journal)[-1]
    assert saved > 5
    state = State(BALLAST)
    with ckptstore.CheckpointManager(
        state.checkpoint,
        remote.url,
        max_to_keep=3,
        staging_dir=staging,
        storage_options=remote.storage_options,
    ) as manager:
        manager.sync()
        assert remote.manifests() == ["ckpt-1", "ckpt-2", "ckpt-3"]
        state.checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        assert_bit_for_bit(state.values(), read_journal(journal, saved))
    name, values = restore_on_a_new_machine(remote, tmp_path / "another-vm", BALLAST)
    assert name == "ckpt-3"
    assert_bit_for_bit(values, read_journal(journal, saved))


def test_a_second_sigterm_during_the_final_upload_changes_nothing(s3_server, tmp_path):
    # No grace period: save() waits for the commit as long as it takes (2 s here), and the
    # platform sends SIGTERM again meanwhile.
    remote = s3_remote(s3_server)
    journal = str(tmp_path / "journal")
    with slow_link(s3_server) as slow:
        child = Child(
            url=remote.url,
            storage_options=slow,
            staging=str(tmp_path / "staging"),
            journal=journal,
            steps=200,
            pace=0.05,
            ballast_elements=BALLAST // 8,  # 2 MB: 2 s through the slow link
        )
        child.wait_for_step(random.Random(31).randint(2, 10))
        child.sigterm()
        child.wait_for(lambda line: "preempted; committing" in line)
        for _ in range(2):
            time.sleep(0.4)
            # 2 MB at 1 MB/s: the upload lasts 2 s at least, well past both signals.
            assert child.proc.poll() is None and "committed to" not in child.stderr()
            child.sigterm()
        code = child.wait()
    assert code == TF_EXIT_STATUS, child.output()
    name = preempted_checkpoint(child)
    assert f"ckptstore: {name} committed to {remote.url}" in child.stderr(), child.output()
    saved = journaled_steps(journal)[-1]
    restored, values = restore_on_a_new_machine(remote, tmp_path / "new-vm", BALLAST // 8)
    assert restored == name
    assert_bit_for_bit(values, read_journal(journal, saved))


# --------------------------------------------------------------------------- bad input


def preemption_save_through(manager, state: State, checkpoint_dir: str) -> np.ndarray:
    """Hand ``manager`` and ``checkpoint_dir`` to TensorFlow's handler, in this process.

    Returns ``w`` as the handler restored it; then a SIGTERM makes it save at the next step
    boundary and call its ``exit_fn`` (here one that records the call instead of exiting).
    """
    exits = []
    previous = signal.getsignal(signal.SIGTERM)
    try:
        handler = tf.distribute.experimental.PreemptionCheckpointHandler(
            tf.distribute.cluster_resolver.TFConfigClusterResolver(),
            manager,
            checkpoint_dir=checkpoint_dir,
            termination_config=tf.distribute.experimental.TerminationConfig(
                exit_fn=lambda: exits.append(True)
            ),
        )
        restored_w = state.w.numpy().copy()
        os.kill(os.getpid(), signal.SIGTERM)  # TensorFlow's handler only records it
        for _ in range(3):
            handler.run(lambda: state.step.assign_add(1))
            if exits:
                break
    finally:
        signal.signal(signal.SIGTERM, previous)  # the handler replaced pytest's
    assert exits == [True]
    return restored_w


def test_a_checkpoint_dir_beside_a_manager_is_ignored_as_tensorflow_ignores_it(s3_server, tmp_path):
    """TensorFlow's rule: ``checkpoint_dir`` only serves a bare ``tf.train.Checkpoint``.

    Given a manager, the handler restores and saves through that manager and never looks at
    ``checkpoint_dir`` (``_maybe_create_checkpoint_manager``; only a Checkpoint WITHOUT one is
    refused, with InvalidArgumentError). Here ``checkpoint_dir`` holds a TensorFlow checkpoint of
    other values: given a ckptstore manager, the handler restores from the remote, saves its
    preemption checkpoint there, and leaves the directory as it was, exactly as it does given
    TensorFlow's own manager.
    """
    elsewhere = str(tmp_path / "checkpoint_dir")
    decoy = State()
    decoy.w.assign(tf.fill((16, 1), 7.0))
    tf.train.CheckpointManager(decoy.checkpoint, elsewhere, max_to_keep=1).save()
    before = sorted(os.listdir(elsewhere))

    committed = [State(), State()]  # one for each manager (a save counts in its checkpoint)
    for c in committed:
        c.w.assign(tf.fill((16, 1), 3.0))
    tf.train.CheckpointManager(committed[0].checkpoint, str(tmp_path / "tf-run"), 3).save()
    remote = s3_remote(s3_server)
    with ckptstore.CheckpointManager(
        committed[1].checkpoint,
        remote.url,
        max_to_keep=3,
        staging_dir=str(tmp_path / "first-vm"),
        storage_options=remote.storage_options,
    ) as m:
        m.save()

    tf_state = State()
    tf_manager = tf.train.CheckpointManager(tf_state.checkpoint, str(tmp_path / "tf-run"), 3)
    tf_restored = preemption_save_through(tf_manager, tf_state, elsewhere)

    state = State()
    manager = ckptstore.CheckpointManager(
        state.checkpoint,
        remote.url,
        max_to_keep=3,
        staging_dir=str(tmp_path / "second-vm"),
        storage_options=remote.storage_options,
    )
    restored = preemption_save_through(manager, state, elsewhere)
    manager.close()

    # Both restored their manager's checkpoint (3.0), not checkpoint_dir's (7.0) ...
    assert np.all(tf_restored == 3.0) and np.all(restored == 3.0)
    # ... saved the preemption checkpoint through it (committed, for ckptstore) ...
    assert [os.path.basename(p) for p in tf_manager.checkpoints] == ["ckpt-1", "ckpt-2"]
    assert [os.path.basename(p) for p in manager.checkpoints] == ["ckpt-1", "ckpt-2"]
    assert remote.manifests() == ["ckpt-1", "ckpt-2"]
    # ... and never wrote to checkpoint_dir.
    assert sorted(os.listdir(elsewhere)) == before
