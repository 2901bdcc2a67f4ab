"""``BackupAndRestore(save_before_preemption=True)``: a SIGTERM ends fit() with its batch committed.

The subprocess tests run ``keras_fit_child.py --preempt`` (the deterministic fit() of
test_keras_backup.py) against the test S3 server and play the platform: SIGTERM from this
process at a batch drawn from a seeded ``random.Random``. The child must exit with
TensorFlow's preemption status (42), leave on the remote a committed backup of exactly the
batch it stopped at (the last one its first callback reported trained, never one before
the signal), and a restart on an EMPTY staging directory must end bit for bit
(``np.array_equal``) where a plain, never interrupted ``fit()`` ends.

A slow link (a FaultProxy adding latency to each request) keeps the final upload going
long enough for the platform's second SIGTERM to land in it: the commit still lands, or,
with a ``grace_period`` it cannot meet, the process still exits on time with the previous
commit intact.

The in-process tests check the handler's life: a handler installed before ``fit()`` is
called at each SIGTERM and is back after ``fit()``, whether it returns or raises; and the
inputs that cannot work are refused with the fix.
"""

from __future__ import annotations

import os
import random
import re
import signal
import sys
import threading
import time
import types

import numpy as np
import pytest
import tensorflow as tf

import children
import ckptstore
import ckptstore.keras
from ckptstore.keras.backup import PREEMPTION_EXIT_STATUS
from conftest import file_remote, s3_remote
from servers.faultproxy import FaultProxy
from test_keras_backup import (
    BATCHES,
    EPOCHS,
    Record,
    X,
    Y,
    assert_backup_deleted,
    assert_same_state,
    backup_for,
    child_args,
    final_state,
    resumed_from,
    run_child,
    small_model,
    uninterrupted_fit,
    wait_until,
)

TF_EXIT_STATUS = 42  # TensorFlow's default TerminationConfig outside GCE: sys.exit(42)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, np.ndarray]:
    """The uninterrupted run: a plain fit() without the callback."""
    return uninterrupted_fit(tmp_path_factory.mktemp("reference"))


class Child(children.Child):
    """A keras_fit_child.py process, with the batches it trained."""

    out_tail = 30

    def trained(self) -> list[tuple[int, int]]:
        """(epoch, batch) of every batch the first callback saw trained (``trained E B``)."""
        with self._changed:
            return [tuple(map(int, x.split()[1:])) for x in self.out if x.startswith("trained ")]


def global_batch(epoch: int, batch: int) -> int:
    return epoch * BATCHES + batch


def preempted_checkpoint(child: Child) -> str:
    """The backup the callback saved on SIGTERM (the manager says ``preempted; committing``)."""
    found = re.findall(r"preempted; committing (ckpt-\d+)", child.stderr())
    assert len(found) == 1, child.output()
    return found[0]


# --- SIGTERM at a random batch, resumed on an empty machine ------------------------------------


@pytest.mark.parametrize("seed", [3, 5, 7])
def test_sigterm_at_a_random_batch_commits_that_batch_and_the_restart_ends_exactly(
    seed, s3_server, reference, tmp_path
):
    # From the seed: a backup frequency, a batch (mid-epoch, epoch 0 or 1) after which the
    # signal is sent, and a delay after it (so that it lands in training or between hooks).
    # Replay one with: pytest tests/test_keras_preemption.py -k "random and 3".
    rng = random.Random(seed)
    save_freq = rng.choice(["epoch", "1", "5"])
    epoch, batch = rng.randrange(2), rng.randrange(1, BATCHES - 3)
    delay = rng.uniform(0.0, 0.04)
    print(f"seed {seed}: save_freq={save_freq}, SIGTERM {delay:.3f} s after batch {epoch} {batch}")
    spec = s3_remote(s3_server)
    args = child_args(tmp_path / "a.npz", spec, tmp_path / "staging-a", "--preempt", "--chain")
    child = Child([*args, "--save-freq", save_freq, "--batch-sleep", "0.02"])
    child.wait_for(lambda line: line == f"batch {epoch} {batch}")
    time.sleep(delay)
    child.sigterm()
    code = child.wait()

    assert code == TF_EXIT_STATUS == PREEMPTION_EXIT_STATUS, child.output()
    assert not any(x.startswith("done") for x in child.out), child.output()
    assert child.out.count("chained 1") == 1, child.output()  # the program's own handler
    # It stopped at the end of a batch that had not ended when the signal was sent (the
    # backup callback had seen batch E B end before it was printed), and the backup holds it.
    stopped = child.trained()[-1]
    assert global_batch(*stopped) >= global_batch(epoch, batch) + 1, child.output()
    name = preempted_checkpoint(child)
    assert f"ckptstore: {name} committed to {spec.url}" in child.stderr(), child.output()
    assert "exiting with status 42" in child.stderr()
    assert spec.manifests() == [name]  # committed: the newest (max_to_keep=1) and only one

    # A new machine: an empty staging directory, the same command.
    lines = run_child(
        tmp_path / "b.npz", spec, tmp_path / "staging-b", "--save-freq", save_freq, "--preempt"
    )
    assert resumed_from(lines) == (stopped[0], global_batch(*stopped) + 1)
    assert f"done {EPOCHS * BATCHES}" in lines
    assert_same_state(final_state(tmp_path / "b.npz"), reference)
    assert_backup_deleted(spec)


# --- a second SIGTERM during the final upload ------------------------------------------------

LATENCY = 0.25  # seconds added to each request to S3: a commit takes a couple of seconds
GRACE = 1.5
#: after ``signal + GRACE``: the exit drain, which gives up at once on an upload in flight, and
#: the interpreter's shutdown with TensorFlow loaded (about a second here)
EXIT_MARGIN = 2.5


@pytest.mark.parametrize("grace", [None, GRACE], ids=["commit-lands", "grace-period-ends"])
def test_a_second_sigterm_during_the_final_upload_changes_nothing(
    grace, s3_server, reference, tmp_path
):
    spec = s3_remote(s3_server)
    signal_after = random.Random(41).randrange(2, 8)  # a batch of epoch 1
    proxy = FaultProxy("127.0.0.1", s3_server.port).start()
    try:
        # The same run, through the proxy: a fast link until a backup is committed.
        slow = types.SimpleNamespace(
            url=spec.url, storage_options=s3_server.storage_options(proxy.endpoint_url)
        )
        args = child_args(tmp_path / "a.npz", slow, tmp_path / "staging-a", "--preempt")
        args += ["--chain", "--save-freq", "2", "--batch-sleep", "0.1"]
        if grace is not None:
            args += ["--grace", str(grace)]
        child = Child(args)
        child.wait_for(lambda line: line == "trained 0 4")
        deadline = time.monotonic() + 30
        while not spec.manifests():
            assert time.monotonic() < deadline and child.proc.poll() is None, child.output()
            time.sleep(0.05)
        before = spec.manifests()
        proxy.latency_s = LATENCY  # from now on, a slow link
        child.wait_for(lambda line: line == f"trained 1 {signal_after}")
        signalled = child.sigterm()
        child.wait_for(lambda line: "preempted; committing" in line)
        time.sleep(0.5)
        # A commit takes several round trips of LATENCY: the upload is still going.
        assert child.proc.poll() is None, child.output()
        assert not re.search(r"ckptstore: ckpt-\d+ committed to", child.stderr()), child.output()
        child.sigterm()
        code = child.wait()
    finally:
        proxy.stop()
    took = child.exited_at - signalled

    assert code == TF_EXIT_STATUS, child.output()
    assert child.out.count("chained 1") == 1 and child.out.count("chained 2") == 1
    stopped = child.trained()[-1]
    name = preempted_checkpoint(child)
    if grace is None:
        # The commit landed: the restart resumes at the batch the process stopped at.
        assert f"ckptstore: {name} committed to {spec.url}" in child.stderr(), child.output()
        assert spec.manifests() == [name]
        resumes_at = global_batch(*stopped) + 1
    else:
        # The bound held, the second signal notwithstanding: out on time, the preemption
        # backup not committed (it stays staged, for a restart on this machine), and what
        # was committed before (or by the upload then in flight; the exit may cut short
        # the retirement of the one before it) is what a new machine restores.
        assert took <= GRACE + EXIT_MARGIN, f"exited {took:.1f} s after SIGTERM\n{child.output()}"
        found = re.search(
            rf"the preemption checkpoint {name} could not be committed to \S+ within the grace "
            r"period; (ckpt-\d+) stays the restorable one",
            child.stderr(),
        )
        assert found, child.output()
        committed = sorted(int(m[5:]) for m in spec.manifests())
        assert name not in spec.manifests() and committed[-1] >= int(found.group(1)[5:])
        assert int(found.group(1)[5:]) >= int(before[-1][5:])
        resumes_at = 2 * committed[-1]  # a backup every 2 batches

    lines = run_child(tmp_path / "b.npz", spec, tmp_path / "staging-b", "--save-freq", "2")
    assert resumed_from(lines)[1] == resumes_at
    assert f"done {EPOCHS * BATCHES}" in lines
    assert_same_state(final_state(tmp_path / "b.npz"), reference)


# --- in this process: the handler installed before fit() -------------------------------------


class OwnHandler:
    """The program's own SIGTERM handler: counts the signals; raises ``raises`` if given."""

    def __init__(self, raises: BaseException | None = None):
        self.signals: list[int] = []
        self.raises = raises

    def __call__(self, signum, frame):
        self.signals.append(signum)
        if self.raises is not None:
            raise self.raises


@pytest.fixture
def own_handler():
    """Installs an OwnHandler for the test (a stray SIGTERM must not end pytest), then pytest's."""
    before = signal.getsignal(signal.SIGTERM)
    handler = OwnHandler()
    signal.signal(signal.SIGTERM, handler)
    yield handler
    signal.signal(signal.SIGTERM, before)


class Watch(tf.keras.callbacks.Callback):
    """Notes SIGTERM's handler during training; sends SIGTERM to this process at ``signal_at``."""

    def __init__(self, signal_at: tuple[int, int] | None = None, fail_at=None):
        super().__init__()
        self.signal_at, self.fail_at = signal_at, fail_at
        self.handlers: set = set()
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.handlers.add(type(signal.getsignal(signal.SIGTERM)).__name__)
        if (self.epoch, batch) == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if (self.epoch, batch) == self.fail_at:
            raise KeyboardInterrupt("the user stopped the cell")


def fit_with(model, *callbacks, epochs: int = 3) -> None:
    model.fit(
        X, Y, batch_size=8, epochs=epochs, shuffle=False, verbose=0, callbacks=list(callbacks)
    )


def test_the_handler_installed_before_is_back_after_fit(own_handler, tmp_path):
    remote = file_remote(tmp_path)
    watch = Watch()
    backup = backup_for(remote, tmp_path / "s", save_freq=2, save_before_preemption=True)
    fit_with(small_model(), watch, backup)
    assert watch.handlers == {"_SigtermWatch"}  # the callback's, during training
    assert signal.getsignal(signal.SIGTERM) is own_handler  # and the program's after
    assert own_handler.signals == []
    assert_backup_deleted(remote)

    # Ignoring SIGTERM (SIG_IGN) is replaced during fit() and put back after it, too.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    fit_with(small_model(), backup, epochs=1)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN


class Stop(Exception):
    """What the program's own handler raises to end its training on SIGTERM."""


def test_a_handler_that_raises_is_chained_and_its_exception_ends_fit_once_the_batch_is_committed(
    own_handler, tmp_path
):
    remote = file_remote(tmp_path)
    own_handler.raises = Stop("SIGTERM: the program stops")
    model = small_model()
    backup = backup_for(remote, tmp_path / "s", save_before_preemption=True)
    # The signal comes in batch 2 of epoch 1 (the 9th batch): the backup is taken at its end.
    with pytest.raises(Stop, match="the program stops"):
        fit_with(model, Watch(signal_at=(1, 2)), backup)
    assert own_handler.signals == [signal.SIGTERM]  # called at the signal, once
    assert signal.getsignal(signal.SIGTERM) is own_handler  # back before the exception left
    assert int(model.optimizer.iterations) == 9
    # Committed before fit() raised: ckpt-1 (epoch 0), then the preemption backup ckpt-2.
    assert remote.manifests() == ["ckpt-2"]

    # A new fit() (a new machine: another staging directory) resumes at batch 3 of epoch 1.
    own_handler.raises = None
    resumed = small_model(seed=4)
    record = Watch()
    backup = backup_for(remote, tmp_path / "t", save_before_preemption=True)
    fit_with(resumed, backup, record)
    assert int(resumed.optimizer.iterations) == 18
    for got, want in zip(resumed.variables, train_plainly().variables):
        assert np.array_equal(got.numpy(), want.numpy())
    assert signal.getsignal(signal.SIGTERM) is own_handler


def train_plainly() -> tf.keras.Model:
    model = small_model()
    fit_with(model)
    return model


def test_a_fit_that_raises_puts_the_handler_back_and_a_later_sigterm_goes_to_it(
    own_handler, tmp_path
):
    remote = file_remote(tmp_path)
    backup = backup_for(remote, tmp_path / "s", save_freq=2, save_before_preemption=True)
    with pytest.raises(KeyboardInterrupt):
        fit_with(small_model(), Watch(fail_at=(0, 4)), backup)
    # Back as soon as the fit() call is gone (Keras's callback list freed with its frame).
    assert signal.getsignal(signal.SIGTERM) is own_handler

    # A traceback that is kept (a notebook keeps the last one) keeps fit()'s frame: the
    # callback's handler is still installed, and a SIGTERM goes where it went before.
    with pytest.raises(KeyboardInterrupt) as kept:
        fit_with(small_model(), Watch(fail_at=(1, 1)), backup)
    committed = remote.manifests()
    assert type(signal.getsignal(signal.SIGTERM)).__name__ == "_SigtermWatch"
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(100):  # delivered at the next bytecodes
        if own_handler.signals:
            break
        time.sleep(0.01)
    assert own_handler.signals == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is own_handler
    assert remote.manifests() == committed  # no backup: that fit() is over
    del kept


class SignalAtEpochEnd(tf.keras.callbacks.Callback):
    """Sends SIGTERM to this process at the end of epoch ``epoch`` (after the callbacks before)."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("when", ["in-a-skipped-batch", "after-the-last-batch"])
def test_a_sigterm_between_trained_batches_backs_up_where_the_model_is(when, own_handler, tmp_path):
    remote = file_remote(tmp_path)
    own_handler.raises = Stop("SIGTERM: the program stops")  # in place of sys.exit(42) here
    before, after = [], []  # callbacks before and after the backup callback
    if when == "in-a-skipped-batch":
        # A backup after 10 batches (4 into epoch 1, of 6); the next fit() resumes there, and
        # the signal comes while epoch 1's first 4 batches go by untrained: the model is the
        # restored backup, and so is what is backed up (not "2 batches into epoch 1").
        first = backup_for(remote, tmp_path / "a", save_freq=2)
        with pytest.raises(KeyboardInterrupt):
            fit_with(small_model(), Watch(fail_at=(1, 5)), first)
        wait_until(lambda: remote.manifests() == ["ckpt-5"])
        before.append(Watch(signal_at=(1, 1)))
        expected = (1, 10)
    else:
        # After the last batch (the signal comes after this callback's on_epoch_end): the
        # end of training is backed up, and the restarted fit() has nothing left to train.
        after.append(SignalAtEpochEnd(2))
        expected = (3, 18)
    model = small_model()
    backup = backup_for(remote, tmp_path / "b", save_freq=2, save_before_preemption=True)
    with pytest.raises(Stop):
        fit_with(model, *before, backup, *after)
    assert own_handler.signals == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is own_handler

    own_handler.raises = None
    resumed, record = small_model(seed=4), Record()
    fit_with(resumed, backup_for(remote, tmp_path / "c", save_before_preemption=True), record)
    assert record.started == expected
    assert int(resumed.optimizer.iterations) == 18
    for got, want in zip(resumed.variables, train_plainly().variables):
        assert np.array_equal(got.numpy(), want.numpy())
    assert_backup_deleted(remote)


# --- bad input ---------------------------------------------------------------------------------


def test_a_fit_outside_the_main_thread_is_refused_before_anything_is_written(tmp_path):
    remote = file_remote(tmp_path)
    backup = backup_for(remote, tmp_path / "s", save_before_preemption=True)
    errors = []

    def train():
        try:
            fit_with(small_model(), backup, epochs=1)
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=train, name="trainer")
    worker.start()
    worker.join(60)
    assert len(errors) == 1 and isinstance(errors[0], ckptstore.ConfigurationError), errors
    text = str(errors[0])
    assert "main thread" in text and "'trainer'" in text and remote.url in text
    assert "Call fit() from the main thread" in text and "save_before_preemption=False" in text
    assert remote.names() == []
    assert type(signal.getsignal(signal.SIGTERM)).__name__ != "_SigtermWatch"


@pytest.mark.parametrize("platform", ["no-sigterm", "win32"])
def test_a_platform_without_sigterm_is_refused(platform, monkeypatch):
    if platform == "no-sigterm":
        monkeypatch.delattr(signal, "SIGTERM")
    else:
        monkeypatch.setattr(sys, "platform", "win32")
    with pytest.raises(ckptstore.ConfigurationError, match="has no SIGTERM") as info:
        ckptstore.keras.BackupAndRestore("s3://bucket/run/backup", save_before_preemption=True)
    assert "Leave save_before_preemption=False" in str(info.value)
    if platform == "win32":
        assert "TerminateProcess" in str(info.value)
    ckptstore.keras.BackupAndRestore("s3://bucket/run/backup")  # without it: fine


def test_several_batches_per_execution_are_refused_with_the_fix(tmp_path):
    remote = file_remote(tmp_path)
    backup = backup_for(remote, tmp_path / "s", save_before_preemption=True)
    with pytest.raises(ckptstore.ConfigurationError, match="steps_per_execution=1") as info:
        fit_with(small_model(steps_per_execution=3), backup)
    assert "steps_per_execution=3" in str(info.value) and remote.url in str(info.value)
    assert remote.names() == []
    assert type(signal.getsignal(signal.SIGTERM)).__name__ != "_SigtermWatch"


def test_two_callbacks_that_would_both_handle_sigterm_are_refused(own_handler, tmp_path):
    first = backup_for(file_remote(tmp_path), tmp_path / "a", save_before_preemption=True)
    other = file_remote(tmp_path / "other")
    second = backup_for(other, tmp_path / "b", save_before_preemption=True)
    with pytest.raises(ckptstore.ConfigurationError, match="one backup callback only"):
        fit_with(small_model(), first, second, epochs=1)
    assert signal.getsignal(signal.SIGTERM) is own_handler  # the first one's is gone too


@pytest.mark.parametrize(
    "kwargs, problem",
    [
        ({"save_before_preemption": True, "grace_period": 0}, "grace_period=0"),
        ({"save_before_preemption": True, "grace_period": -5}, "grace_period=-5"),
        ({"save_before_preemption": True, "grace_period": "30"}, "grace_period='30'"),
        ({"save_before_preemption": True, "grace_period": True}, "grace_period=True"),
        ({"grace_period": 30}, "without save_before_preemption=True"),
    ],
)
def test_a_grace_period_that_bounds_nothing_is_refused(kwargs, problem):
    with pytest.raises(ckptstore.ConfigurationError) as info:
        ckptstore.keras.BackupAndRestore("s3://bucket/run/backup", **kwargs)
    assert problem in str(info.value) and "s3://bucket/run/backup" in str(info.value)
