"""Bad input gets an error that names the problem and the fix, and loses nothing."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest

import ckptstore
from conftest import file_remote, open_manager
from faultfs import faulty_file_protocol
from training import TrainState

FAST = ckptstore.RetryPolicy(attempts=2, initial_delay=0.01, max_delay=0.02)


def test_unknown_protocol_names_it_and_what_is_supported(state, tmp_path):
    with pytest.raises(ckptstore.ConfigurationError, match=r"Unknown protocol 'nosuch://'.*s3://"):
        ckptstore.CheckpointManager(
            state.checkpoint, "nosuch://bucket/run", 3, staging_dir=str(tmp_path)
        )


def test_missing_extra_says_which_pip_install_fixes_it(tmp_path):
    # Run where s3fs cannot be imported, as on a machine without the extra.
    code = (
        "import sys; sys.modules['s3fs'] = None\n"
        "import ckptstore, tensorflow as tf\n"
        "try:\n"
        "    ckptstore.CheckpointManager(tf.train.Checkpoint(), 's3://b/run', 3,\n"
        f"        staging_dir={str(tmp_path)!r})\n"
        "except ckptstore.MissingExtraError as e:\n"
        "    print('MISSING:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "MISSING:" in out.stdout, out.stderr[-2000:]
    assert "pip install 'ckptstore[s3]'" in out.stdout
    assert "s3://b/run" in out.stdout


def test_unwritable_staging_directory_says_how_to_fix_it(state, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ckptstore.ConfigurationError, match=r"staging directory .* not writable"):
        ckptstore.CheckpointManager(
            state.checkpoint, file_remote(tmp_path).url, 3, staging_dir=str(blocker / "staging")
        )


def test_url_without_a_path_is_rejected(state, tmp_path):
    with pytest.raises(ckptstore.ConfigurationError, match="names no directory"):
        ckptstore.CheckpointManager(state.checkpoint, "memory://", 3, staging_dir=str(tmp_path))


def test_storage_options_the_filesystem_rejects_are_named(state, tmp_path):
    with pytest.raises(ckptstore.ConfigurationError, match="storage_options"):
        ckptstore.CheckpointManager(
            state.checkpoint,
            "s3://bucket/run",
            3,
            staging_dir=str(tmp_path),
            storage_options={"no_such_option_for_s3fs": 1},
        )


def test_unreachable_remote_at_start_refuses_to_guess(state, tmp_path):
    remote = file_remote(tmp_path)
    with faulty_file_protocol() as faults:
        faults.kill_when = None
        original_ls = type(remote.fs).ls

        # The storage answers every listing with a connection error, as a dead server would.
        from faultfs import FaultyLocalFileSystem

        def broken_ls(self, path, detail=False, **kwargs):
            raise ConnectionError("injected: connection refused")

        FaultyLocalFileSystem.ls = broken_ls
        try:
            with pytest.raises(ckptstore.RemoteUnavailableError, match="will not start"):
                ckptstore.CheckpointManager(
                    state.checkpoint, remote.url, 3, staging_dir=str(tmp_path / "s"), retry=FAST
                )
        finally:
            FaultyLocalFileSystem.ls = original_ls


@pytest.mark.parametrize("bad", [0, -1])
def test_max_to_keep_must_be_positive_like_tensorflow(state, tmp_path, bad):
    with pytest.raises(ValueError, match="positive integer or `None` for `max_to_keep`"):
        ckptstore.CheckpointManager(state.checkpoint, str(tmp_path), bad)


def test_max_pending_uploads_must_be_positive(state, tmp_path):
    with pytest.raises(ckptstore.ConfigurationError, match="max_pending_uploads"):
        ckptstore.CheckpointManager(
            state.checkpoint, "memory://x/y", 3, max_pending_uploads=0, staging_dir=str(tmp_path)
        )


def test_script_that_exits_without_close_still_commits_its_last_save(tmp_path):
    remote = file_remote(tmp_path)
    tests_dir, staging = os.path.dirname(__file__), str(tmp_path / "s")
    code = (
        f"import sys; sys.path.insert(0, {tests_dir!r})\n"
        "import ckptstore\n"
        "from training import TrainState\n"
        "s = TrainState()\n"
        f"m = ckptstore.CheckpointManager(s.checkpoint, {remote.url!r}, 3,\n"
        f"                                staging_dir={staging!r})\n"
        "s.advance_to(5)\n"
        "m.save()\n"  # no sync, no close: the interpreter exits right away
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert remote.manifests() == ["ckpt-1"]


@pytest.mark.parametrize(
    "typo, meant",
    [
        ("s3:/bucket/x", "s3://bucket/x"),
        ("gs//b/x", "gs://b/x"),
        ("gcs:/b/x", "gcs://b/x"),
        ("gdrive:root/x", "gdrive://root/x"),
        ("memory:/x", "memory://x"),
        ("file:/tmp/x", "file:///tmp/x"),
        ("S3://bucket/x", "s3://bucket/x"),
        ("GS://bucket/x", "gs://bucket/x"),
    ],
)
def test_a_mistyped_url_is_refused_with_the_url_meant(typo, meant, state, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ckptstore.ConfigurationError) as info:
        ckptstore.CheckpointManager(state.checkpoint, typo, 3)
    assert repr(meant) in str(info.value)
    assert repr(typo) in str(info.value)
    assert os.listdir(tmp_path) == [], "a local directory was created for a typo"


@pytest.mark.parametrize("path", ["gs/run-1", "./s3:/x", "runs/1"])
def test_local_paths_that_only_resemble_a_protocol_stay_local(path, state, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = ckptstore.CheckpointManager(state.checkpoint, path, 3)
    state.advance_to(1)
    assert m.save().startswith(path.rstrip("/"))
    assert os.path.exists(os.path.join(tmp_path, path, "checkpoint"))


def _keras_model():
    import tensorflow as tf

    model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    return model


def test_a_keras_model_as_the_checkpoint_is_refused_at_once_saying_what_to_pass(tmp_path):
    remote = file_remote(tmp_path)
    with pytest.raises(ckptstore.ConfigurationError) as info:
        ckptstore.CheckpointManager(_keras_model(), remote.url, 3, staging_dir=str(tmp_path / "s"))
    message = str(info.value)
    assert "tf.train.Checkpoint(model=model, optimizer=model.optimizer)" in message
    assert "Keras model (Sequential)" in message and remote.url in message
    assert not (tmp_path / "s").exists() and remote.names() == []  # refused before anything


@pytest.mark.parametrize("given", ["v1-checkpoint", "module", "none"])
def test_anything_else_that_is_not_a_tf_train_checkpoint_is_refused_with_a_remote(given, tmp_path):
    import tensorflow as tf

    checkpoint = {
        "v1-checkpoint": lambda: tf.compat.v1.train.Checkpoint(),  # no sync(): close() would fail
        "module": lambda: tf.Module(),
        "none": lambda: None,
    }[given]()
    with pytest.raises(ckptstore.ConfigurationError, match=r"Pass tf\.train\.Checkpoint\("):
        ckptstore.CheckpointManager(checkpoint, "memory://x/y", 3, staging_dir=str(tmp_path))


def test_local_mode_takes_a_keras_model_and_fails_at_save_as_tensorflow_does(tmp_path):
    import tensorflow as tf

    model = _keras_model()
    theirs = tf.train.CheckpointManager(model, str(tmp_path / "tf"), 3)
    ours = ckptstore.CheckpointManager(model, str(tmp_path / "ours"), 3)
    with pytest.raises(AttributeError) as tf_said:
        theirs.save()
    with pytest.raises(AttributeError) as we_said:
        ours.save()
    assert str(we_said.value) == str(tf_said.value)


@pytest.mark.parametrize("bad", [0, -5])
def test_startup_timeout_must_be_positive(state, tmp_path, bad):
    with pytest.raises(ckptstore.ConfigurationError, match="startup_timeout"):
        ckptstore.CheckpointManager(
            state.checkpoint, "memory://x/y", 3, staging_dir=str(tmp_path), startup_timeout=bad
        )


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs: a staging disk that really fills up (the kernel answers ENOSPC)."""
    where = tmp_path / "small-disk"
    where.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command on this machine")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def _committed_size(remote, name: str) -> int:
    manifest = json.loads(remote.read(f"{name}.manifest.json"))
    return sum(f["size"] for f in manifest["files"])


def _assert_says_disk_full(err, remote, staging, needed: int) -> None:
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    message = str(err)
    assert str(staging) in message and f"{needed:,} bytes" in message
    assert "staging_dir=" in message and remote.url in message
    left = [n for n in os.listdir(staging) if "ckpt-1" in n]
    assert left == [], f"a partial download was left behind: {left}"


def test_restoring_onto_a_full_disk_names_the_staging_directory_the_size_and_the_fix(
    remote, small_disk, tmp_path
):
    big = TrainState(((1024, 1024), (7,)))  # 4 MiB: twice the disk
    with open_manager(big, remote, tmp_path / "writer") as m:
        big.advance_to(1)
        m.save()
    reader = open_manager(TrainState(((1024, 1024), (7,))), remote, small_disk)
    with reader as m, pytest.raises(ckptstore.StagingFullError) as info:
        m.latest_checkpoint  # noqa: B018  (the download happens here)
    _assert_says_disk_full(info.value, remote, small_disk, _committed_size(remote, "ckpt-1"))


def test_a_full_staging_disk_is_named_where_no_small_disk_can_be_mounted(tmp_path):
    remote = file_remote(tmp_path)
    state = TrainState()
    with open_manager(state, remote, tmp_path / "writer") as m:
        state.advance_to(1)
        m.save()
    staging = tmp_path / "reader"
    with faulty_file_protocol() as faults:
        faults.local_disk_full = True
        reader = open_manager(TrainState(), remote, staging, retry=FAST)
        with reader as m, pytest.raises(ckptstore.StagingFullError) as info:
            m.latest_checkpoint  # noqa: B018
    _assert_says_disk_full(info.value, remote, staging, _committed_size(remote, "ckpt-1"))


def test_a_note_naming_the_url_survives_on_every_python(caplog):
    """saved_model and keras name the URL on an exception whose type they keep.

    ``add_note`` is Python 3.11's; on 3.10 (which ckptstore supports, and the smoke
    run of ``make test`` covers) it must not raise ``AttributeError`` in an error path.
    """
    from ckptstore.errors import add_note

    class Rigid(Exception):
        def __init__(self, a, b):
            super().__init__(a, b)

    exc = Rigid(1, 2)
    with caplog.at_level("WARNING", logger="ckptstore"):
        add_note(exc, "ckptstore: while writing s3://bucket/model.keras locally")
        add_note(exc, "second")
    assert exc.__notes__ == ["ckptstore: while writing s3://bucket/model.keras locally", "second"]
    if sys.version_info < (3, 11):  # tracebacks do not print notes there: the log says it
        assert "s3://bucket/model.keras" in caplog.text
