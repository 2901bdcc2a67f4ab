"""``ckptstore pull URL DEST`` as a user runs it, and plain TensorFlow reading DEST after.

Every command runs as a subprocess through the installed entry point against
real local servers (moto S3, fake-gcs-server; the fake Drive server through
``ckptstore.cli.main``, since a ``GoogleAuth`` cannot go on a command line).
What is pulled is written by the library in this process; what the tests break
(a tampered, truncated or deleted object) is written with an independent client.
Reading DEST afterwards is TensorFlow's own ``tf.train.latest_checkpoint``,
``tf.train.load_checkpoint`` and ``tf.train.Checkpoint.restore``.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import termios
import time
import uuid

import numpy as np
import pytest
import tensorflow as tf

import ckptstore
from conftest import BUCKET, dead_writers_lease, gcs_remote, gdrive_remote, s3_remote
from test_cli import (
    ENTRY_POINT,
    SECRET,
    Scaler,
    as_json,
    cli,
    drive_cli,
    drive_command,
    gcs_options,
    heavy_imports,
    s3_options,
    save_keras_model,
    save_run,
)
from training import TrainState

JSON_KEYS = {"url", "dest", "name", "kind", "number", "step", "bytes", "files", "prefix", "ok"}
DATA = "{}.data-00000-of-00001"


def remote_and_options(kind: str, request) -> tuple:
    server = request.getfixturevalue(f"{kind}_server")
    if kind == "s3":
        return s3_remote(server), s3_options(server)
    return gcs_remote(server), gcs_options(server)


@pytest.fixture(scope="module", params=["s3", "gcs"])
def stored_run(request, tmp_path_factory):
    """One closed run with three committed checkpoints (steps 1, 2, 3), on S3 and on GCS."""
    spec, options = remote_and_options(request.param, request)
    save_run(spec, spec.url, tmp_path_factory.mktemp("staging"), steps=(1, 2, 3))
    return spec, options


def restored_step(prefix: str) -> TrainState:
    """A fresh state restored from ``prefix`` by plain TensorFlow (every value must load)."""
    state = TrainState()
    state.checkpoint.restore(prefix).assert_existing_objects_matched()
    return state


def listing(directory) -> list[str]:
    """Every file under ``directory``, relative (temporary names included)."""
    found = []
    for parent, _, names in os.walk(directory):
        found += [os.path.relpath(os.path.join(parent, n), directory) for n in names]
    return sorted(found)


def on_terminal(argv: list[str], timeout: float = 120) -> tuple[int, str]:
    """Run ``argv`` with stdout and stderr on a pseudo-terminal (100 columns); all it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer of the terminal is gone
                break
            if not data:
                break
            chunks.append(data)
        else:
            proc.kill()
            pytest.fail(f"{argv[:3]} did not finish in {timeout} s")
        proc.wait(timeout=30)
    finally:
        os.close(master)
    text = b"".join(chunks).decode("utf-8", errors="replace")
    assert SECRET not in text, "a credential was printed"
    return proc.returncode, text


# --- pulling, and TensorFlow reading what was pulled ---------------------------------------


def test_help_teaches_pull_with_examples_and_exit_statuses():
    got = cli("pull", "--help")
    assert got.returncode == 0, got.stderr
    for text in (
        "usage: ckptstore pull",
        "--checkpoint NAME|NUMBER",
        "tf.train.latest_checkpoint",
        "ckptstore pull s3://bucket/runs/run-7 ./run-7",
        "exit status:",
        "--storage-option",
    ):
        assert text in got.stdout, text
    assert "pull" in cli("--help").stdout
    missing_dest = cli("pull", "s3://bucket/run")
    assert missing_dest.returncode == 2 and "DEST" in missing_dest.stderr


def test_pull_newest_by_name_and_by_number_then_plain_tensorflow_reads_dest(stored_run, tmp_path):
    spec, options = stored_run
    dest = tmp_path / "dest" / "nested"  # created, parents too

    got = cli("pull", "--json", spec.url, str(dest), *options)
    assert got.returncode == 0, got.stderr
    doc = as_json(got)
    assert JSON_KEYS | {"problems"} <= set(doc)
    assert doc["url"] == f"{spec.url}/ckpt-3" and doc["dest"] == str(dest)
    assert (doc["name"], doc["kind"], doc["number"]) == ("ckpt-3", "checkpoint", 3)
    assert doc["ok"] is True and doc["problems"] == []
    assert doc["prefix"] == str(dest / "ckpt-3")
    assert sorted(doc["files"]) == [DATA.format("ckpt-3"), "ckpt-3.index"]
    assert doc["bytes"] == sum(os.path.getsize(dest / f) for f in doc["files"])
    assert listing(dest) == ["checkpoint", DATA.format("ckpt-3"), "ckpt-3.index"]

    # Plain TensorFlow, no ckptstore: the state file, the reader and a restore.
    assert tf.train.latest_checkpoint(str(dest)) == str(dest / "ckpt-3")
    reader = tf.train.load_checkpoint(str(dest))
    assert reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") == 3
    np.testing.assert_array_equal(
        reader.get_tensor("weights/0/.ATTRIBUTES/VARIABLE_VALUE"),
        TrainState.values_for(3, (64, 32), 0),
    )
    assert restored_step(doc["prefix"]).matches_step(3)

    # By name: an older one, added to the list; it is now TensorFlow's latest.
    by_name = cli("pull", spec.url, str(dest), "--checkpoint", "ckpt-1", *options)
    assert by_name.returncode == 0, by_name.stderr
    assert by_name.stdout.startswith(f"pulled  {spec.url}/ckpt-1 -> {dest / 'ckpt-1'}  (")
    assert "verified" in by_name.stdout
    assert f"tf.train.latest_checkpoint('{dest}') returns {dest / 'ckpt-1'}" in by_name.stderr
    assert tf.train.latest_checkpoint(str(dest)) == str(dest / "ckpt-1")
    assert restored_step(str(dest / "ckpt-1")).matches_step(1)

    # By number.
    by_number = as_json(cli("pull", "--json", spec.url, str(dest), "--checkpoint", "2", *options))
    assert by_number["name"] == "ckpt-2" and by_number["ok"] is True
    # Relative paths, as TensorFlow writes them (DEST can be moved); the latest last.
    # Each with the time TensorFlow saved it (the manifest's), which TensorFlow's own
    # CheckpointManager needs to manage a checkpoint.
    lines = (dest / "checkpoint").read_text().splitlines()
    assert lines[:4] == [
        'model_checkpoint_path: "ckpt-2"',
        'all_model_checkpoint_paths: "ckpt-3"',
        'all_model_checkpoint_paths: "ckpt-1"',
        'all_model_checkpoint_paths: "ckpt-2"',
    ]
    stamps = [float(line.split(": ")[1]) for line in lines[4:]]
    assert len(stamps) == 3 and (stamps[0], stamps[2]) == (doc["time"], by_number["time"])
    state = tf.train.get_checkpoint_state(str(dest))
    assert state.model_checkpoint_path == str(dest / "ckpt-2")
    assert list(state.all_model_checkpoint_paths) == [
        str(dest / n) for n in ("ckpt-3", "ckpt-1", "ckpt-2")
    ]
    assert restored_step(tf.train.latest_checkpoint(str(dest))).matches_step(2)
    # TensorFlow's own manager opened on DEST sees all three.
    manager = tf.train.CheckpointManager(TrainState().checkpoint, str(dest), max_to_keep=5)
    assert [os.path.basename(p) for p in manager.checkpoints] == ["ckpt-3", "ckpt-1", "ckpt-2"]

    # Pulling what DEST already holds, matching, downloads nothing and changes no file.
    before = {f: os.stat(dest / f).st_mtime_ns for f in listing(dest) if f != "checkpoint"}
    again = as_json(cli("pull", "--json", spec.url, str(dest), "--checkpoint", "2", *options))
    assert again["ok"] and again["downloaded"] == []
    assert sorted(again["already_present"]) == [DATA.format("ckpt-2"), "ckpt-2.index"]
    assert {f: os.stat(dest / f).st_mtime_ns for f in before} == before
    # An artifact's own URL, as ls and verify print it, pulls that checkpoint.
    own = as_json(cli("pull", "--json", f"{spec.url}/ckpt-1", str(tmp_path / "own"), *options))
    assert own["name"] == "ckpt-1" and restored_step(own["prefix"]).matches_step(1)


def test_a_differing_file_of_the_same_name_in_dest_is_replaced_only_by_a_verified_one(
    stored_run, tmp_path
):
    spec, options = stored_run
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "ckpt-3.index").write_bytes(b"an old, different index")
    (dest / "notes.txt").write_text("the user's own file")
    got = as_json(cli("pull", "--json", spec.url, str(dest), *options))
    assert got["ok"] and sorted(got["downloaded"]) == [DATA.format("ckpt-3"), "ckpt-3.index"]
    assert (dest / "ckpt-3.index").read_bytes() == spec.read("ckpt-3.index")
    assert (dest / "notes.txt").read_text() == "the user's own file"
    assert restored_step(tf.train.latest_checkpoint(str(dest))).matches_step(3)


# --- refusal --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,damage",
    [("s3", "tampered"), ("s3", "truncated"), ("s3", "deleted"), ("gcs", "tampered")],
)
def test_a_damaged_checkpoint_is_refused_with_exit_1_and_nothing_older_is_pulled_instead(
    kind, damage, request, tmp_path
):
    spec, options = remote_and_options(kind, request)
    save_run(spec, spec.url, tmp_path / "s", steps=(1, 2))
    # DEST already holds ckpt-1, pulled earlier, and TensorFlow's state file naming it.
    dest = tmp_path / "dest"
    assert cli("pull", spec.url, str(dest), "--checkpoint", "1", *options).returncode == 0
    files_before = listing(dest)
    state_before = (dest / "checkpoint").read_bytes()

    name = DATA.format("ckpt-2")
    original = spec.read(name)
    if damage == "tampered":
        spec.write(name, bytes(b ^ 0xFF for b in original))  # same size, other bytes
    elif damage == "truncated":
        spec.write(name, original[: len(original) // 2])
    else:
        spec.delete(name)

    got = cli("pull", spec.url, str(dest), *options)
    assert got.returncode == 1, (got.stdout, got.stderr)
    assert f"refused {spec.url}/ckpt-2" in got.stderr and name in got.stdout + got.stderr
    assert got.stdout.startswith(f"REFUSED {spec.url}/ckpt-2")
    assert "No older one was pulled instead" in got.stderr
    # Nothing of ckpt-2 in DEST (no temporary names either); the state file untouched.
    assert listing(dest) == files_before
    assert (dest / "checkpoint").read_bytes() == state_before
    assert tf.train.latest_checkpoint(str(dest)) == str(dest / "ckpt-1")

    # Into an empty DEST: refused, and ckpt-1 (intact) is not pulled in its place.
    fresh = tmp_path / "fresh"
    doc = as_json(cli("pull", "--json", spec.url, str(fresh), *options))
    assert doc["ok"] is False and doc["name"] == "ckpt-2" and doc["downloaded"] == []
    assert len(doc["problems"]) == 1 and name in doc["problems"][0]
    assert listing(fresh) == []
    assert tf.train.latest_checkpoint(str(fresh)) is None
    # Asked for by name, the intact one still comes.
    assert cli("pull", spec.url, str(fresh), "--checkpoint", "ckpt-1", *options).returncode == 0
    assert restored_step(tf.train.latest_checkpoint(str(fresh))).matches_step(1)


# --- usage and access errors: exit 2, nothing written ---------------------------------------


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_no_such_bucket_exits_2_naming_it(kind, request, tmp_path):
    server = request.getfixturevalue(f"{kind}_server")
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    url = f"{'s3' if kind == 's3' else 'gs'}://{bucket}/run"
    options = s3_options(server) if kind == "s3" else gcs_options(server)
    dest = tmp_path / "dest"
    for extra in ([], ["--json"]):
        got = cli("pull", *extra, url, str(dest), *options)
        assert got.returncode == 2, (got.stdout, got.stderr)
        assert bucket in got.stderr and got.stdout == ""
    assert not dest.exists()


def test_a_url_with_nothing_committed_exits_2_and_says_so(s3_server, tmp_path):
    options = s3_options(s3_server)
    dest = tmp_path / "dest"
    empty = f"s3://{BUCKET}/{uuid.uuid4().hex}/nothing-here"
    got = cli("pull", empty, str(dest), *options)
    assert got.returncode == 2 and got.stdout == ""
    assert f"nothing committed under {empty}: nothing is stored there" in got.stderr

    # A writer killed while uploading ckpt-1: data, no manifest. Never pulled.
    spec = s3_remote(s3_server)
    spec.write("ckptstore.lease.json", dead_writers_lease(("ckpt-1",)))
    spec.write("ckpt-1.index", b"partial index")
    spec.write(DATA.format("ckpt-1"), b"partial data")
    left = cli("pull", "--json", spec.url, str(dest), *options)
    assert left.returncode == 2 and left.stdout == ""
    assert f"nothing committed under {spec.url}: only uncommitted items" in left.stderr
    assert f"{spec.url}/ckpt-1 (interrupted)" in left.stderr and "ckptstore gc" in left.stderr
    assert not dest.exists()


def test_a_checkpoint_that_does_not_exist_exits_2_listing_what_does(s3_server, tmp_path):
    spec = s3_remote(s3_server)
    options = s3_options(s3_server)
    save_run(spec, spec.url, tmp_path / "s", steps=(1, 2, 3))
    dest = tmp_path / "dest"
    for wanted in ("ckpt-9", "9"):
        got = cli("pull", spec.url, str(dest), "--checkpoint", wanted, *options)
        assert got.returncode == 2, got.stderr
        assert f"no committed checkpoint '{wanted}' in {spec.url}" in got.stderr
        assert "Committed there: ckpt-1, ckpt-2, ckpt-3" in got.stderr
        assert got.stdout == ""
    assert not dest.exists()


def test_a_url_above_several_runs_exits_2_listing_them(s3_server, tmp_path):
    spec = s3_remote(s3_server)
    options = s3_options(s3_server)
    save_run(spec, f"{spec.url}/run-a", tmp_path / "a", steps=(1,))
    save_run(spec, f"{spec.url}/run-b", tmp_path / "b", steps=(1, 2))
    dest = tmp_path / "dest"
    got = cli("pull", spec.url, str(dest), *options)
    assert got.returncode == 2 and got.stdout == ""
    assert f"{spec.url}/run-a" in got.stderr and f"{spec.url}/run-b" in got.stderr
    assert "Pull one of them" in got.stderr
    assert not dest.exists()
    one = as_json(cli("pull", "--json", f"{spec.url}/run-b", str(dest), *options))
    assert one["url"] == f"{spec.url}/run-b/ckpt-2"
    assert restored_step(tf.train.latest_checkpoint(str(dest))).matches_step(2)


# --- SavedModels and Keras files ------------------------------------------------------------


def test_a_saved_model_version_and_a_keras_file_are_pulled_verified(s3_server, tmp_path):
    import keras

    spec = s3_remote(s3_server)
    options = s3_options(s3_server)
    exporter = ckptstore.saved_model.Exporter(
        f"{spec.url}/serving", storage_options=spec.storage_options, staging_dir=str(tmp_path / "e")
    )
    exporter.save(Scaler(2.0)).wait()
    exporter.save(Scaler(3.0)).wait()

    served = tmp_path / "served"
    doc = as_json(cli("pull", "--json", f"{spec.url}/serving", str(served), *options))
    assert (doc["kind"], doc["name"], doc["number"]) == ("saved_model", "2", 2)
    assert doc["ok"] and doc["prefix"] == str(served) and doc["state_file"] is None
    assert (served / "saved_model.pb").is_file() and (served / "variables").is_dir()
    loaded = tf.saved_model.load(str(served))  # held: its variables live as long as it does
    np.testing.assert_allclose(loaded.score(tf.constant([[1.0, 1.0]]))["y"].numpy(), [[3.0, 3.0]])
    first = tmp_path / "first"
    assert (
        cli("pull", f"{spec.url}/serving", str(first), "--checkpoint", "1", *options).returncode
        == 0
    )
    loaded = tf.saved_model.load(str(first))
    np.testing.assert_allclose(loaded.score(tf.constant([[1.0, 1.0]]))["y"].numpy(), [[2.0, 2.0]])

    model = save_keras_model(spec, f"{spec.url}/models/best.keras", tmp_path / "k")
    models = tmp_path / "models"
    got = cli("pull", f"{spec.url}/models/best.keras", str(models), *options)
    assert got.returncode == 0, got.stderr
    assert "keras.models.load_model" in got.stderr
    pulled = keras.models.load_model(str(models / "best.keras"))
    for a, b in zip(pulled.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert listing(models) == ["best.keras"]


# --- progress bar ---------------------------------------------------------------------------


def test_a_progress_bar_only_on_a_terminal_and_never_with_q(stored_run, tmp_path):
    spec, options = stored_run
    status, shown = on_terminal([ENTRY_POINT, "pull", spec.url, str(tmp_path / "a"), *options])
    assert status == 0, shown
    assert "pull ckpt-3: 100%|" in shown and "B/s]" in shown  # tqdm's bar, filled
    assert f"pulled  {spec.url}/ckpt-3" in shown

    status, quiet = on_terminal(
        [ENTRY_POINT, "pull", "-q", spec.url, str(tmp_path / "b"), *options]
    )
    assert status == 0, quiet
    assert "%|" not in quiet and f"pulled  {spec.url}/ckpt-3" in quiet

    piped = cli("pull", spec.url, str(tmp_path / "c"), *options)
    assert piped.returncode == 0
    assert "%|" not in piped.stdout + piped.stderr and "B/s" not in piped.stderr


def test_pull_from_drive_with_a_bar_through_pydrive2s_download_callback(drive_server, tmp_path):
    drive = gdrive_remote(drive_server)
    save_run(drive, drive.url, tmp_path / "d", steps=(1, 2))
    dest = tmp_path / "dest"
    status, shown = on_terminal(drive_command(drive_server, "pull", drive.url, str(dest)))
    assert status == 0, shown
    assert "pull ckpt-2: 100%|" in shown and f"pulled  {drive.url}/ckpt-2" in shown
    assert restored_step(tf.train.latest_checkpoint(str(dest))).matches_step(2)

    drive.write(DATA.format("ckpt-1"), b"not what the manifest says")
    refused = drive_cli(drive_server, "pull", "--json", drive.url, str(dest), "--checkpoint", "1")
    assert refused.returncode == 1, refused.stderr
    doc = json.loads(refused.stdout)
    assert doc["ok"] is False and DATA.format("ckpt-1") in doc["problems"][0]
    assert f"refused {drive.url}/ckpt-1: " in refused.stderr
    assert DATA.format("ckpt-1") in refused.stderr
    assert not any(f.startswith("ckpt-1") for f in listing(dest))
    assert tf.train.latest_checkpoint(str(dest)) == str(dest / "ckpt-2")


# --- no TensorFlow --------------------------------------------------------------------------


def test_pull_never_imports_tensorflow(stored_run, tmp_path):
    spec, options = stored_run
    for extra in ([], ["--checkpoint", "1"]):
        got = heavy_imports("pull", "-q", spec.url, str(tmp_path / "d"), *extra, *options)
        assert got == (0, []), extra
    # What it pulled is TensorFlow's to read.
    assert restored_step(tf.train.latest_checkpoint(str(tmp_path / "d"))).matches_step(1)
