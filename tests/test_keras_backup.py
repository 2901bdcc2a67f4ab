"""``ckptstore.keras.BackupAndRestore``: a fit() killed anywhere resumes exactly, from the remote.

The kill tests run ``keras_fit_child.py`` (a deterministic fit(): fixed numpy data,
``shuffle=False``, a small Dense model with Dropout, Adam, CPU with TensorFlow's op
determinism) against the test S3 server, SIGKILL it mid-epoch, and start it again on
an EMPTY staging directory. Its final weights, Dropout seed state and optimizer
state (iterations, Adam's slots, learning rate) must equal, bit for bit
(``np.array_equal``), those of a plain ``fit()`` that was never interrupted and never
had the callback: with op determinism and the same data order every step computes
the same floats, so no tolerance is needed and none is allowed.

The other tests run fit() in this process against ``file://`` and S3: deletion at
the end (and not after an exception), double_checkpoint, a restore onto a fresh
staging directory, and the errors bad input gets.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

import ckptstore
import ckptstore.keras
from conftest import file_remote, s3_remote
from faultfs import faulty_file_protocol

CHILD = os.path.join(os.path.dirname(__file__), "keras_fit_child.py")
EPOCHS, BATCHES = 3, 12  # keras_fit_child.py's
LEASE = "ckptstore.lease.json"


# --- the child process ---------------------------------------------------------------------


def child_args(out, spec=None, staging=None, *extra: str) -> list[str]:
    args = [sys.executable, CHILD, str(out)]
    if spec is not None:
        args += ["--remote", spec.url, "--staging", str(staging)]
        args += ["--options", json.dumps(spec.storage_options)]
    return args + list(extra)


def run_child(out, spec=None, staging=None, *extra: str) -> list[str]:
    """Run the child to its end; return its stdout lines (it must exit 0)."""
    proc = subprocess.run(
        child_args(out, spec, staging, *extra), capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    return proc.stdout.splitlines()


def run_until_killed(args: list[str], at_line, tmp_path, before_kill=lambda: None) -> list[str]:
    """Start the child, SIGKILL it once ``at_line(line)`` is true (after ``before_kill()``).

    Returns every line it printed, those it got out between the cue and the kill too.
    """
    stderr_path = os.path.join(tmp_path, "child-stderr.txt")
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True)
        lines = []
        try:
            for line in proc.stdout:
                lines.append(line.strip())
                if at_line(line.strip()):
                    before_kill()
                    proc.send_signal(signal.SIGKILL)
                    break
            lines += proc.stdout.read().splitlines()
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    with open(stderr_path) as f:
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, lines[-5:], f.read()[-4000:])
    return lines


def wait_for_manifests(spec, expected: list[str], timeout: float = 60.0) -> None:
    """Poll the remote, as another machine would, until exactly ``expected`` are committed."""
    deadline = time.monotonic() + timeout
    while sorted(spec.manifests()) != expected:
        assert time.monotonic() < deadline, f"committed: {spec.manifests()}, wanted {expected}"
        time.sleep(0.05)


def final_state(path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def assert_same_state(got: dict, reference: dict) -> None:
    assert sorted(got) == sorted(reference)
    different = [k for k in reference if not np.array_equal(got[k], reference[k])]
    assert not different, f"differs from the uninterrupted run: {different}"


def resumed_from(lines: list[str]) -> tuple[int, int]:
    """(epoch fit() started at, optimizer iterations) after on_train_begin restored."""
    epoch, iterations = next(line for line in lines if line.startswith("resumed")).split()[1:]
    return int(epoch), int(iterations)


def trained_batches(lines: list[str]) -> list[tuple[int, int]]:
    return [tuple(map(int, line.split()[1:])) for line in lines if line.startswith("batch ")]


def assert_backup_deleted(spec) -> None:
    """Nothing of the backup is left: no manifest, data or state file; the lease stays."""
    assert [n for n in spec.names() if not n.startswith(LEASE)] == []


def uninterrupted_fit(directory) -> dict[str, np.ndarray]:
    """The final state of a plain fit() without the callback, run in ``directory``."""
    out = directory / "reference.npz"
    lines = run_child(out)
    assert lines[-1] == f"done {EPOCHS * BATCHES}"
    return final_state(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, np.ndarray]:
    """The uninterrupted run: a plain fit() without the callback."""
    return uninterrupted_fit(tmp_path_factory.mktemp("reference"))


# --- killed mid-epoch, resumed on an empty machine -------------------------------------------


def test_fit_killed_mid_epoch_resumes_from_the_epoch_backup_exactly(s3_server, reference, tmp_path):
    spec = s3_remote(s3_server)
    # Held in batch 6 of epoch 1 (zero-based): the backup of epoch 0 is the newest.
    args = child_args(tmp_path / "a.npz", spec, tmp_path / "staging-a", "--hold-at", "1:6")
    lines = run_until_killed(
        args,
        lambda line: line == "holding 1 6",
        tmp_path,
        before_kill=lambda: wait_for_manifests(spec, ["ckpt-1"]),
    )
    assert trained_batches(lines)[-1] == (1, 6)  # mid-epoch, not at a boundary
    assert spec.manifests() == ["ckpt-1"]

    lines = run_child(tmp_path / "b.npz", spec, tmp_path / "staging-b")  # an empty machine
    assert resumed_from(lines) == (1, BATCHES)  # epoch 1 again, from its first batch
    assert trained_batches(lines)[0] == (1, 0)
    assert f"done {EPOCHS * BATCHES}" in lines
    assert_same_state(final_state(tmp_path / "b.npz"), reference)
    assert_backup_deleted(spec)  # the resumed fit() succeeded


def test_fit_killed_mid_epoch_skips_the_batches_its_batch_backup_has(
    s3_server, reference, tmp_path
):
    spec = s3_remote(s3_server)
    # save_freq=5: backups after batches 5, 10, 15, 20 of the run (ckpt-1..4); ckpt-4 is
    # 8 batches into epoch 1. Held in batch 10 of epoch 1, two batches past it.
    args = child_args(
        tmp_path / "a.npz", spec, tmp_path / "staging-a", "--save-freq", "5", "--hold-at", "1:9"
    )
    run_until_killed(
        args,
        lambda line: line == "holding 1 9",
        tmp_path,
        before_kill=lambda: wait_for_manifests(spec, ["ckpt-4"]),
    )
    assert spec.manifests() == ["ckpt-4"]

    lines = run_child(tmp_path / "b.npz", spec, tmp_path / "staging-b", "--save-freq", "5")
    # Epoch 1 resumes at its 9th batch: the first 8 go by (Keras still numbers them)
    # untrained, so the optimizer counts 36 steps at the end, not Keras's 44.
    assert resumed_from(lines) == (1, BATCHES + 8)
    assert trained_batches(lines)[:2] == [(1, 0), (1, 1)]
    assert f"done {EPOCHS * BATCHES}" in lines
    assert_same_state(final_state(tmp_path / "b.npz"), reference)
    assert_backup_deleted(spec)


@pytest.mark.parametrize("seed", [14, 0, 6])
def test_a_kill_at_a_random_instant_resumes_to_the_uninterrupted_result(
    seed, s3_server, reference, tmp_path
):
    # A small seeded campaign: a backup frequency, a batch to kill after and a delay
    # after it (so the kill lands in training, a local save or an upload), all drawn
    # from the seed. Replay one with: pytest tests/test_keras_backup.py -k "random and 14".
    rng = random.Random(seed)
    save_freq = rng.choice(["1", "2", "3", "5", "epoch"])
    kill_after = rng.randrange(3, 2 * BATCHES + 6)  # a global batch number, mid-run
    delay = rng.uniform(0.0, 0.05)
    target = f"batch {kill_after // BATCHES} {kill_after % BATCHES}"
    print(f"seed {seed}: save_freq={save_freq}, kill {delay:.3f} s after '{target}'")
    spec = s3_remote(s3_server)
    args = child_args(tmp_path / "a.npz", spec, tmp_path / "staging-a")
    args += ["--save-freq", save_freq, "--batch-sleep", "0.02"]
    lines = run_until_killed(
        args, lambda line: line == target, tmp_path, before_kill=lambda: time.sleep(delay)
    )
    trained = len(trained_batches(lines))
    print(f"killed after {trained} batches; committed then: {spec.manifests()}")

    lines = run_child(tmp_path / "b.npz", spec, tmp_path / "staging-b", "--save-freq", save_freq)
    epoch, iterations = resumed_from(lines)
    # Nothing from beyond the kill (a backup is taken in a batch before it is printed).
    assert iterations <= trained + 1
    assert epoch == iterations // BATCHES if save_freq == "epoch" else epoch <= trained // BATCHES
    assert f"done {EPOCHS * BATCHES}" in lines
    assert_same_state(final_state(tmp_path / "b.npz"), reference)
    assert_backup_deleted(spec)


def test_an_uninterrupted_fit_with_the_callback_deletes_its_backup_and_trains_as_plain_keras(
    s3_server, reference, tmp_path
):
    spec = s3_remote(s3_server)
    lines = run_child(tmp_path / "a.npz", spec, tmp_path / "staging", "--save-freq", "4")
    assert resumed_from(lines) == (0, 0)
    assert_same_state(final_state(tmp_path / "a.npz"), reference)
    assert_backup_deleted(spec)
    staged = [n for n in os.listdir(tmp_path / "staging") if n.startswith("ckpt-")]
    assert staged == []  # nor is anything left staged to be uploaded again


# --- in this process -------------------------------------------------------------------------

X = np.random.default_rng(1).standard_normal((48, 4)).astype("float32")
Y = X.sum(axis=1, keepdims=True)  # 6 batches of 8


def small_model(seed: int = 0, **compile_args) -> tf.keras.Model:
    tf.keras.utils.set_random_seed(seed)
    model = tf.keras.Sequential(
        [tf.keras.Input((4,)), tf.keras.layers.Dense(8), tf.keras.layers.Dense(1)]
    )
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-2), loss="mse", **compile_args)
    return model


class Record(tf.keras.callbacks.Callback):
    """Where fit() started (after the backup callback's on_train_begin), and batches seen."""

    def __init__(self, fail_at: tuple[int, int] | None = None):
        super().__init__()
        self.fail_at = fail_at
        self.started: tuple[int, int] | None = None
        self.epoch = 0

    def on_train_begin(self, logs=None):
        self.started = (self.model._initial_epoch or 0, int(self.model.optimizer.iterations))

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.fail_at:
            raise KeyboardInterrupt("the user stopped the cell")


def fit(model, backup, *, epochs: int = 3, fail_at=None, x=X, y=Y, batch_size: int = 8):
    record = Record(fail_at)
    model.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[backup, record],
    )
    return record


def backup_for(spec, staging, **kwargs) -> ckptstore.keras.BackupAndRestore:
    return ckptstore.keras.BackupAndRestore(
        spec.url, storage_options=spec.storage_options, staging_dir=str(staging), **kwargs
    )


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("same_callback", [True, False], ids=["same-callback", "new-callback"])
def test_a_fit_that_raises_keeps_the_backup_and_the_next_fit_resumes_it(same_callback, tmp_path):
    remote = file_remote(tmp_path)
    model = small_model()
    backup = backup_for(remote, tmp_path / "staging", save_freq=2)
    with pytest.raises(KeyboardInterrupt):
        fit(model, backup, fail_at=(1, 3))  # after 10 batches: backups at 2, 4, ..., 10
    # No deletion: the exception skipped on_train_end. The backup of batch 10 commits
    # in the background (its manager stays open for the next fit()).
    wait_until(lambda: remote.manifests() == ["ckpt-5"])

    # The same cell run again: the same callback, or a new one on the same backup_dir
    # (the first one's manager, left open by the exception, is closed for it).
    again = backup if same_callback else backup_for(remote, tmp_path / "staging", save_freq=2)
    record = fit(model, again)
    assert record.started == (1, 10)
    assert int(model.optimizer.iterations) == 18  # 8 batches trained here, not 12
    assert_backup_deleted(remote)
    assert model._initial_epoch is None  # a next fit() starts from its own arguments

    # Which a next fit() with the same callback then does: from scratch, on a deleted backup.
    fresh = small_model()
    record = fit(fresh, again, epochs=1)
    assert record.started == (0, 0)
    assert int(fresh.optimizer.iterations) == 6
    assert_backup_deleted(remote)


def test_without_delete_checkpoint_the_backup_restores_exactly_on_a_fresh_machine(
    s3_server, tmp_path
):
    spec = s3_remote(s3_server)
    model = small_model()
    fit(model, backup_for(spec, tmp_path / "a", delete_checkpoint=False))
    assert spec.manifests() == ["ckpt-3"]  # committed by the time fit() returned

    # Another machine (empty staging directory), another model object: fit() has no
    # epoch left to train, and the model holds exactly what the first one had.
    other = small_model(seed=5)
    record = fit(other, backup_for(spec, tmp_path / "b", delete_checkpoint=False))
    assert record.started == (3, 18)
    for got, want in zip(other.variables, model.variables):
        assert np.array_equal(got.numpy(), want.numpy())
    for got, want in zip(other.optimizer.variables, model.optimizer.variables):
        assert np.array_equal(got.numpy(), want.numpy()), want.path
    assert spec.manifests() == ["ckpt-3"]


def test_double_checkpoint_keeps_two_and_restores_the_previous_if_the_newest_is_damaged(tmp_path):
    remote = file_remote(tmp_path)
    model = small_model()
    fit(model, backup_for(remote, tmp_path / "a", double_checkpoint=True, delete_checkpoint=False))
    assert remote.manifests() == ["ckpt-2", "ckpt-3"]

    data = next(n for n in remote.names() if n.startswith("ckpt-3.data"))
    damaged = bytearray(remote.read(data))
    damaged[len(damaged) // 2] ^= 0xFF
    remote.write(data, bytes(damaged))
    record = fit(small_model(), backup_for(remote, tmp_path / "b", double_checkpoint=True))
    assert record.started == (2, 12)  # ckpt-3 failed its check; ckpt-2 was restored
    assert_backup_deleted(remote)


def test_backups_never_wait_for_the_network_and_a_waiting_one_is_superseded(tmp_path):
    remote = file_remote(tmp_path)

    class OpenTheLink(tf.keras.callbacks.Callback):
        def on_train_end(self, logs=None):  # runs before the backup's on_train_end
            self.trained = int(self.model.optimizer.iterations)
            faults.gate.set()

    with faulty_file_protocol() as faults:
        faults.gate = threading.Event()  # the link is stuck: no upload gets through
        model = small_model()
        opener = OpenTheLink()
        backup = backup_for(remote, tmp_path / "s", save_freq=1, delete_checkpoint=False)
        model.fit(
            X, Y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=[opener, backup]
        )
        uploaded = sorted({int(name.split(".")[0][5:]) for name in faults.puts})
    assert opener.trained == 18  # every batch trained, each backed up, while nothing uploaded
    # One early backup was on the link; each later one replaced the one waiting behind
    # it, so of 18 backups only the newest followed it (and then the early one was retired).
    assert len(uploaded) == 2 and uploaded[0] < 18 and uploaded[1] == 18, uploaded
    assert remote.manifests() == ["ckpt-18"]


def test_on_train_end_raises_a_backup_that_was_not_committed(tmp_path):
    remote = file_remote(tmp_path)
    with faulty_file_protocol() as faults:
        # The remote refuses the data of the last backup (ckpt-3): training goes on,
        # and the end of fit() says so.
        faults.fail_when = lambda op, path: op == "put" and "ckpt-3.data" in path
        model = small_model()
        with pytest.raises(ckptstore.UploadError, match="ckpt-3") as info:
            fit(model, backup_for(remote, tmp_path / "staging", delete_checkpoint=False))
    assert remote.url in str(info.value)
    assert int(model.optimizer.iterations) == 18  # fit() trained to the end
    assert remote.manifests() == ["ckpt-2"]  # the last committed backup is kept


def test_a_backup_of_another_model_is_refused_with_the_url_and_the_fix(tmp_path):
    remote = file_remote(tmp_path)
    fit(small_model(), backup_for(remote, tmp_path / "a", delete_checkpoint=False), epochs=1)
    tf.keras.utils.set_random_seed(0)
    wider = tf.keras.Sequential(
        [tf.keras.Input((4,)), tf.keras.layers.Dense(16), tf.keras.layers.Dense(1)]
    )
    wider.compile(optimizer=tf.keras.optimizers.Adam(1e-2), loss="mse")
    with pytest.raises(ckptstore.RestoreError, match="does not match") as info:
        fit(wider, backup_for(remote, tmp_path / "b"))
    assert remote.url in str(info.value) and "delete the backup" in str(info.value)
    assert remote.manifests() == ["ckpt-1"]  # untouched


def test_a_batch_backup_resumed_with_other_data_is_refused(tmp_path):
    remote = file_remote(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        fit(small_model(), backup_for(remote, tmp_path / "a", save_freq=5), fail_at=(0, 5))
    wait_until(lambda: remote.manifests() == ["ckpt-1"])  # 5 of epoch 0's 6 batches done
    with pytest.raises(ckptstore.RestoreError, match="5 batches of epoch 1") as info:
        fit(small_model(), backup_for(remote, tmp_path / "a", save_freq=5), x=X[:24], y=Y[:24])
    assert "same data" in str(info.value) or "data and batch_size" in str(info.value)


@pytest.mark.parametrize(
    "save_freq, problem",
    [("batch", "'batch'"), (0, "save_freq=0"), (-3, "save_freq=-3"), (False, "save_freq=False")],
)
def test_a_save_freq_keras_does_not_define_is_refused(save_freq, problem):
    with pytest.raises(ckptstore.ConfigurationError, match="pass 'epoch'") as info:
        ckptstore.keras.BackupAndRestore(
            "s3://AKIAXXXX:topsecret@bucket/run/backup", save_freq=save_freq
        )
    text = str(info.value)
    assert problem in text and "s3://***@bucket/run/backup" in text
    assert "topsecret" not in text


@pytest.mark.parametrize("backup_dir", ["", None])
def test_an_empty_backup_dir_is_refused(backup_dir):
    with pytest.raises(ckptstore.ConfigurationError, match="needs a backup_dir"):
        ckptstore.keras.BackupAndRestore(backup_dir)


def test_a_url_with_a_typo_is_refused_before_it_means_local_disk():
    with pytest.raises(ckptstore.ConfigurationError, match="s3://bucket/run"):
        ckptstore.keras.BackupAndRestore("s3:/bucket/run")


def test_an_unbuilt_model_is_refused_with_how_to_build_it(tmp_path):
    model = tf.keras.Sequential([tf.keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    backup = backup_for(file_remote(tmp_path), tmp_path / "s")
    with pytest.raises(ckptstore.ConfigurationError, match="is not") as info:
        model.fit(X, Y, epochs=1, verbose=0, callbacks=[backup])
    assert "keras.Input" in str(info.value) and "model.build" in str(info.value)


def test_batch_backups_with_several_steps_per_execution_are_refused_with_the_fix(tmp_path):
    model = small_model(steps_per_execution=3)
    remote = file_remote(tmp_path)
    with pytest.raises(ckptstore.ConfigurationError, match="steps_per_execution=1") as info:
        fit(model, backup_for(remote, tmp_path / "s", save_freq=4))
    assert "steps_per_execution=3" in str(info.value) and remote.url in str(info.value)
    assert remote.names() == []  # refused before anything was written
    # Epoch backups need no skipping: they work with it.
    fit(small_model(steps_per_execution=3), backup_for(remote, tmp_path / "s"), epochs=2)
    assert_backup_deleted(remote)


def test_a_plain_local_backup_dir_backs_up_restores_and_deletes_in_place(tmp_path):
    directory = tmp_path / "backup"  # a plain path: TensorFlow's files, written in place
    model = small_model()
    with pytest.raises(KeyboardInterrupt):
        fit(model, ckptstore.keras.BackupAndRestore(str(directory), save_freq=4), fail_at=(1, 2))
    assert tf.train.latest_checkpoint(str(directory)).endswith("ckpt-2")  # after batch 8
    record = fit(small_model(), ckptstore.keras.BackupAndRestore(str(directory), save_freq=4))
    assert record.started == (1, 8)
    assert os.listdir(directory) == []
