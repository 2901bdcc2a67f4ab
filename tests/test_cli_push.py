"""``ckptstore push DIR URL``: how a run TensorFlow wrote moves in, as a user runs it.

Every command runs as a subprocess through the installed entry point against
real local servers (moto S3, fake-gcs-server; Drive through
``ckptstore.cli.main`` in a child process, since a ``GoogleAuth`` cannot go on
a command line). The source directories are written by plain TensorFlow here;
what push leaves is read back by the library (a fresh ``CheckpointManager``,
``ckptstore.saved_model.load``) and by ``ckptstore ls``/``verify``.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess

import numpy as np
import pytest
import tensorflow as tf

import ckptstore
from conftest import dead_writers_lease, file_remote, gcs_remote, gdrive_remote, s3_remote
from test_cli import (
    ENTRY_POINT,
    SECRET,
    Scaler,
    as_json,
    cli,
    drive_cli,
    gcs_options,
    live_writer,
    s3_options,
)
from training import TrainState

PUSH_KEYS = {"url", "dir", "kind", "ok", "pushed", "skipped", "problems", "state_file"}
PUSHED_KEYS = {"name", "url", "kind", "number", "step", "time", "bytes", "files"}


def tf_run(directory, steps=(1, 2, 3), *, max_to_keep=3, name="ckpt", offset=0) -> None:
    """What a training run with plain ``tf.train.CheckpointManager`` leaves in ``directory``.

    ``offset`` shifts the values, so two runs with the same names differ in content.
    """
    state = TrainState()
    manager = tf.train.CheckpointManager(
        state.checkpoint, str(directory), max_to_keep=max_to_keep, checkpoint_name=name
    )
    for step in steps:
        state.advance_to(step + offset)
        state.step.assign(step)
        manager.save(checkpoint_number=step)


def stored(spec) -> dict[str, bytes]:
    """Every object under the spec's root and its bytes: "nothing changed" means equal."""
    spec.fs.invalidate_cache()
    try:
        paths = spec.fs.find(spec.root)
    except FileNotFoundError:
        return {}
    return {p[len(spec.root) + 1 :]: spec.fs.cat_file(p) for p in sorted(paths)}


def restored_step(spec, staging) -> tuple[list[str], TrainState]:
    """A fresh machine: a new ckptstore manager on the URL, empty staging, restore."""
    state = TrainState()
    with ckptstore.CheckpointManager(
        state.checkpoint,
        spec.url,
        max_to_keep=3,
        staging_dir=str(staging),
        storage_options=spec.storage_options,
    ) as manager:
        state.checkpoint.restore(manager.latest_checkpoint).assert_consumed()
        names = [os.path.basename(p) for p in manager.checkpoints]
    return names, state


# --- checkpoints: push, then everything reads them as committed ---------------------------


def test_push_to_s3_commits_each_checkpoint_and_a_fresh_manager_restores_the_newest(
    s3_server, tmp_path
):
    source = tmp_path / "run"
    tf_run(source, steps=(1, 2, 3, 4))  # max_to_keep=3: TensorFlow deleted ckpt-1
    spec = s3_remote(s3_server)
    options = s3_options(s3_server)

    got = cli("push", "--json", str(source), spec.url, *options)
    assert got.returncode == 0, got.stderr
    doc = as_json(got)
    assert set(doc) == PUSH_KEYS
    assert (doc["url"], doc["dir"], doc["kind"], doc["ok"]) == (
        spec.url,
        str(source),
        "checkpoint",
        True,
    )
    assert doc["skipped"] == [] and doc["problems"] == []
    assert doc["state_file"] == ["ckpt-2", "ckpt-3", "ckpt-4"]
    assert [p["name"] for p in doc["pushed"]] == ["ckpt-2", "ckpt-3", "ckpt-4"]
    for number, pushed in enumerate(doc["pushed"], start=2):
        assert set(pushed) == PUSHED_KEYS
        assert pushed["url"] == f"{spec.url}/ckpt-{number}" and pushed["kind"] == "checkpoint"
        assert (pushed["number"], pushed["step"]) == (number, number)  # the step variable
        local = sorted(f for f in os.listdir(source) if f.startswith(f"ckpt-{number}."))
        assert sorted(pushed["files"]) == local
        assert pushed["bytes"] == sum(os.path.getsize(source / f) for f in local)

    # ls and verify, fresh processes, see exactly those committed, and the lease released.
    listed = as_json(cli("ls", "--json", spec.url, *options))
    (run,) = listed["runs"]
    assert {a["name"]: a["status"] for a in run["artifacts"]} == {
        "ckpt-2": "committed",
        "ckpt-3": "committed",
        "ckpt-4": "committed",
    }
    assert run["writer"]["state"] == "released" and run["writer"]["in_flight"] == []
    checked = cli("verify", "--all", "--json", spec.url, *options)
    assert checked.returncode == 0, checked.stderr
    assert [a["name"] for a in as_json(checked)["artifacts"]] == ["ckpt-2", "ckpt-3", "ckpt-4"]
    manifest = json.loads(spec.read("ckpt-4.manifest.json"))
    assert manifest["format_version"] == 1 and manifest["step"] == 4  # as the uploader writes

    names, state = restored_step(spec, tmp_path / "fresh")
    assert names == ["ckpt-2", "ckpt-3", "ckpt-4"]
    assert state.matches_step(4)

    # Running the same push again is safe: everything is skipped, nothing changes.
    before = stored(spec)
    again = cli("push", "--json", str(source), spec.url, *options)
    assert again.returncode == 0, again.stderr
    doc = as_json(again)
    assert doc["ok"] and doc["pushed"] == []
    assert [(s["name"], s["status"]) for s in doc["skipped"]] == [
        ("ckpt-2", "identical"),
        ("ckpt-3", "identical"),
        ("ckpt-4", "identical"),
    ]
    assert stored(spec) == before
    human = cli("push", str(source), spec.url, *options)
    assert human.returncode == 0
    assert f"skipped  {spec.url}/ckpt-4  (committed there already, same content)" in human.stdout
    assert "nothing new to push" in human.stderr


def test_push_to_gcs_without_a_state_file_takes_every_complete_checkpoint(gcs_server, tmp_path):
    # Checkpoint.write with Estimator-style names, no state file; one checkpoint lacks
    # its data file (what a save cut short leaves), and a stray file sits beside them.
    source = tmp_path / "estimator"
    state = TrainState()
    global_step = tf.Variable(0, dtype=tf.int64)
    ckpt = tf.train.Checkpoint(global_step=global_step, weights=state.weights)
    for step in (1000, 2000):
        state.advance_to(step)
        global_step.assign(step)
        ckpt.write(str(source / f"model.ckpt-{step}"))
    (source / "model.ckpt-3000.index").write_bytes(b"a save cut short")
    (source / "events.out.tfevents.1").write_bytes(b"summaries")
    assert not (source / "checkpoint").exists()
    spec = gcs_remote(gcs_server)
    options = gcs_options(gcs_server)

    got = cli("push", "--json", str(source), spec.url, *options)
    assert got.returncode == 0, got.stderr
    doc = as_json(got)
    assert [(p["name"], p["number"], p["step"]) for p in doc["pushed"]] == [
        ("model.ckpt-1000", 1000, 1000),
        ("model.ckpt-2000", 2000, 2000),
    ]
    (incomplete,) = doc["skipped"]
    assert incomplete["name"] == "model.ckpt-3000" and incomplete["status"] == "not_selected"
    assert "no model.ckpt-3000.data-* file" in incomplete["reason"]
    assert doc["state_file"] == ["model.ckpt-1000", "model.ckpt-2000"]
    assert "model.ckpt-3000.index" not in spec.names()
    assert "events.out.tfevents.1" not in spec.names()

    checked = cli("verify", "--all", spec.url, *options)
    assert checked.returncode == 0, checked.stderr
    assert "GCS CRC32C, nothing downloaded" in checked.stdout

    fresh = TrainState()
    fresh_step = tf.Variable(0, dtype=tf.int64)
    with ckptstore.CheckpointManager(
        tf.train.Checkpoint(global_step=fresh_step, weights=fresh.weights),
        spec.url,
        max_to_keep=3,
        staging_dir=str(tmp_path / "fresh"),
        storage_options=spec.storage_options,
    ) as manager:
        assert os.path.basename(manager.latest_checkpoint) == "model.ckpt-2000"
        manager.checkpoint.restore(manager.latest_checkpoint)
    assert int(fresh_step.numpy()) == 2000
    fresh.step.assign(2000)
    assert fresh.matches_step(2000)

    # --checkpoint picks one; an unknown name is a usage error naming what DIR holds.
    one = tmp_path / "one"
    picked = cli("push", "--json", str(source), str(one), "--checkpoint", "model.ckpt-1000")
    assert picked.returncode == 0, picked.stderr
    assert [p["name"] for p in as_json(picked)["pushed"]] == ["model.ckpt-1000"]
    unknown = cli("push", str(source), str(tmp_path / "two"), "--checkpoint", "ckpt-9")
    assert unknown.returncode == 2 and "holds no checkpoint 'ckpt-9'" in unknown.stderr
    assert "model.ckpt-1000" in unknown.stderr and not (tmp_path / "two").exists()


def test_push_to_drive_commits_with_md5(drive_server, tmp_path):
    source = tmp_path / "run"
    tf_run(source, steps=(1, 2))
    drive = gdrive_remote(drive_server)
    got = drive_cli(drive_server, "push", "--json", str(source), drive.url, timeout=180)
    assert got.returncode == 0, got.stderr
    assert [p["name"] for p in as_json(got)["pushed"]] == ["ckpt-1", "ckpt-2"]
    manifest = json.loads(drive.read("ckpt-2.manifest.json"))
    assert all(len(f["md5"]) == 32 for f in manifest["files"])  # what Drive verifies by
    checked = drive_cli(drive_server, "verify", "--all", "--json", drive.url, timeout=180)
    assert checked.returncode == 0, checked.stderr
    assert {f["detail"] for a in as_json(checked)["artifacts"] for f in a["files"]} == {"Drive MD5"}
    names, state = restored_step(drive, tmp_path / "fresh")
    assert names == ["ckpt-1", "ckpt-2"] and state.matches_step(2)


# --- what push refuses ----------------------------------------------------------------------


def test_a_same_name_checkpoint_with_other_content_is_refused_and_nothing_changes(
    s3_server, tmp_path
):
    spec = s3_remote(s3_server)
    options = s3_options(s3_server)
    tf_run(tmp_path / "first", steps=(1, 2))
    assert cli("push", str(tmp_path / "first"), spec.url, *options).returncode == 0
    before = stored(spec)

    other = tmp_path / "other"
    tf_run(other, steps=(1, 2), offset=100)  # the same names, other values
    got = cli("push", "--json", str(other), spec.url, *options)
    assert got.returncode == 2
    doc = as_json(got)
    assert doc["ok"] is False and doc["pushed"] == []
    assert [(s["name"], s["status"]) for s in doc["skipped"]] == [
        ("ckpt-1", "conflict"),
        ("ckpt-2", "conflict"),
    ]
    assert len(doc["problems"]) == 2 and "other content" in doc["problems"][0]
    assert stored(spec) == before, "a refused push changed the remote"
    human = cli("push", str(other), spec.url, *options)
    assert human.returncode == 2
    assert f"CONFLICT {spec.url}/ckpt-2" in human.stdout
    assert "push to another URL, or delete" in human.stderr
    assert stored(spec) == before

    # A newer checkpoint beside the conflicting ones still goes up; the exit says 2.
    tf_run(other, steps=(3,), max_to_keep=3, offset=100)
    mixed = as_json(cli("push", "--json", str(other), spec.url, *options))
    assert [p["name"] for p in mixed["pushed"]] == ["ckpt-3"] and mixed["ok"] is False
    assert spec.read("ckpt-1.index") == before["ckpt-1.index"]
    names, restored = restored_step(spec, tmp_path / "fresh")
    assert names == ["ckpt-1", "ckpt-2", "ckpt-3"]
    expected = TrainState()
    expected.advance_to(103)  # ckpt-3 of the other run: the values of 103, step 3
    assert int(restored.step.numpy()) == 3
    assert all(
        np.array_equal(a.numpy(), b.numpy()) for a, b in zip(restored.weights, expected.weights)
    )


@pytest.mark.parametrize("layout", ["missing", "file", "empty", "random"])
def test_a_directory_that_is_not_a_checkpoint_directory_exits_2_naming_it(layout, tmp_path):
    source = tmp_path / "not-a-run"
    if layout == "file":
        source.write_bytes(b"just a file")
    elif layout != "missing":
        source.mkdir()
    if layout == "random":
        (source / "a.txt").write_text("notes")
        (source / "b.bin").write_bytes(b"\0" * 10)
    target = tmp_path / "remote"
    got = cli("push", "--json", str(source), str(target))
    assert got.returncode == 2 and got.stdout == ""
    assert f"{source} is not a TensorFlow checkpoint directory or a SavedModel" in got.stderr
    assert "saved_model.pb" in got.stderr and "Nothing was pushed" in got.stderr
    assert {
        "missing": "no such directory",
        "file": "it is a file",
        "empty": "it is empty",
        "random": "(found: a.txt, b.bin)",
    }[layout] in got.stderr
    assert not target.exists()


def test_a_truncated_or_altered_local_checkpoint_is_refused_before_anything_is_committed(
    s3_server, tmp_path
):
    spec = s3_remote(s3_server)
    options = s3_options(s3_server)
    source = tmp_path / "run"
    tf_run(source, steps=(1, 2, 3))
    data = source / "ckpt-3.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # a disk that filled up
    flipped = source / "ckpt-2.data-00000-of-00001"
    body = bytearray(flipped.read_bytes())
    body[100] ^= 0xFF  # same size, one byte off: only the tensors' CRC32Cs tell
    flipped.write_bytes(bytes(body))

    got = cli("push", "--json", str(source), spec.url, *options)
    assert got.returncode == 2, got.stderr
    doc = as_json(got)
    assert [p["name"] for p in doc["pushed"]] == ["ckpt-1"]
    refused = {s["name"]: s for s in doc["skipped"]}
    assert set(refused) == {"ckpt-2", "ckpt-3"}
    for s in refused.values():
        assert s["status"] == "invalid" and "TensorFlow cannot read it" in s["reason"]
    assert not [n for n in spec.names() if n.startswith(("ckpt-2", "ckpt-3"))]
    assert doc["state_file"] == ["ckpt-1"]
    assert "ckpt-3" in got.stderr and "ckpt-2" in got.stderr

    # A directory whose only checkpoint is unreadable: nothing at all reaches the URL.
    only = tmp_path / "only"
    tf_run(only, steps=(1,))
    shard = only / "ckpt-1.data-00000-of-00001"
    shard.write_bytes(shard.read_bytes()[:10])
    empty = s3_remote(s3_server)
    refused_all = cli("push", str(only), empty.url, *options)
    assert refused_all.returncode == 2 and refused_all.stdout == ""
    assert "no complete, readable checkpoint" in refused_all.stderr
    assert "ckpt-1" in refused_all.stderr
    assert stored(empty) == {}


def test_a_live_writer_keeps_the_run_and_push_names_it_and_writes_nothing(s3_server, tmp_path):
    spec = s3_remote(s3_server)
    options = s3_options(s3_server)
    source = tmp_path / "old"
    tf_run(source, steps=(1, 2), name="old")
    manager = live_writer(spec, tmp_path / "s")  # ckpt-1 committed; this process holds the run
    try:
        before = {k: v for k, v in stored(spec).items() if k != "ckptstore.lease.json"}
        got = cli("push", "--json", str(source), spec.url, *options)
        assert got.returncode == 2 and got.stdout == ""
        assert f"pid {os.getpid()}" in got.stderr and "is being written by host" in got.stderr
        assert "nothing was pushed" in got.stderr and "push again" in got.stderr
        after = {k: v for k, v in stored(spec).items() if k != "ckptstore.lease.json"}
        assert after == before
        assert manager.is_writer
        lease = json.loads(spec.read("ckptstore.lease.json"))
        assert lease["pid"] == os.getpid() and "push" not in lease["library"]
    finally:
        manager.close()
    # Once the writer released the run, the same push goes in beside its checkpoint.
    done = cli("push", "--json", str(source), spec.url, *options)
    assert done.returncode == 0, done.stderr
    assert as_json(done)["state_file"] == ["old-1", "old-2", "ckpt-1"]  # by time


def test_a_dead_pushs_leftovers_are_replaced_or_left_listed_for_gc(s3_server, tmp_path):
    spec = s3_remote(s3_server)
    options = s3_options(s3_server)
    source = tmp_path / "run"
    tf_run(source, steps=(1, 2))
    # A push on this machine was killed while sending ckpt-2 (and, earlier, an upload of a
    # ckpt-9 that DIR no longer holds); plain TensorFlow's ckpt-7 sits there too.
    spec.write("ckptstore.lease.json", dead_writers_lease(("ckpt-2", "ckpt-9")))
    spec.write("ckpt-2.index", b"half an index")
    spec.write("ckpt-9.data-00000-of-00001", b"half of ckpt-9")
    spec.write("ckpt-7.index", b"not ckptstore's")
    spec.write("ckpt-7.data-00000-of-00001", b"not ckptstore's")

    got = cli("push", "--json", str(source), spec.url, *options)
    assert got.returncode == 0, got.stderr
    assert [p["name"] for p in as_json(got)["pushed"]] == ["ckpt-1", "ckpt-2"]
    assert "took over the lease of its last writer" in got.stderr
    assert cli("verify", "--all", spec.url, *options).returncode == 0
    lease = json.loads(spec.read("ckptstore.lease.json"))
    assert lease["released"] and lease["in_flight"] == ["ckpt-9"]  # still a known leftover
    assert spec.read("ckpt-7.index") == b"not ckptstore's"  # never touched

    collected = as_json(cli("gc", "--yes", "--json", spec.url, *options))
    assert collected["deleted"] == [f"{spec.url}/ckpt-9.data-00000-of-00001"]

    # Files of a name no manifest vouches for and no lease lists are not ckptstore's.
    other = tmp_path / "seven"
    tf_run(other, steps=(7,))
    refused = as_json(cli("push", "--json", str(other), spec.url, *options))
    (skipped,) = refused["skipped"]
    assert skipped["status"] == "conflict" and "no manifest vouches for" in skipped["reason"]
    assert spec.read("ckpt-7.index") == b"not ckptstore's"


# --- SavedModels ------------------------------------------------------------------------------


def test_a_saved_model_and_tf_servings_versions_are_pushed_and_load(
    s3_server, gcs_server, tmp_path
):
    export = tmp_path / "export"
    tf.saved_model.save(Scaler(3.0), str(export))
    spec = s3_remote(s3_server)
    options = s3_options(s3_server)
    got = cli("push", "--json", str(export), spec.url, *options)
    assert got.returncode == 0, got.stderr
    doc = as_json(got)
    assert doc["kind"] == "saved_model" and doc["state_file"] is None
    (pushed,) = doc["pushed"]
    assert pushed["kind"] == "saved_model" and "saved_model.pb" in pushed["files"]
    assert "saved_model.manifest.json" in spec.names()
    served = ckptstore.saved_model.load(spec.url, storage_options=spec.storage_options)
    assert served.score(tf.constant([[1.0, 2.0]]))["y"].numpy().tolist() == [[3.0, 6.0]]
    assert cli("verify", spec.url, *options).returncode == 0
    again = as_json(cli("push", "--json", str(export), spec.url, *options))
    assert again["pushed"] == [] and again["skipped"][0]["status"] == "identical"

    # TF Serving's base: each version to URL/<n>; load(URL) takes the newest.
    base = tmp_path / "serving"
    for version, scale in ((1, 1.0), (2, 5.0)):
        tf.saved_model.save(Scaler(scale), str(base / str(version)))
    gcs = gcs_remote(gcs_server)
    versions = cli("push", "--json", str(base), gcs.url, *gcs_options(gcs_server))
    assert versions.returncode == 0, versions.stderr
    doc = as_json(versions)
    assert doc["kind"] == "saved_model_versions"
    assert [(p["name"], p["number"], p["url"]) for p in doc["pushed"]] == [
        ("1", 1, f"{gcs.url}/1"),
        ("2", 2, f"{gcs.url}/2"),
    ]
    newest = ckptstore.saved_model.load(gcs.url, storage_options=gcs.storage_options)
    assert newest.score(tf.constant([[1.0, 1.0]]))["y"].numpy().tolist() == [[5.0, 5.0]]
    listed = as_json(cli("ls", "--json", gcs.url, *gcs_options(gcs_server)))
    assert [
        (a["name"], a["kind"], a["status"]) for r in listed["runs"] for a in r["artifacts"]
    ] == [
        ("1", "saved_model", "committed"),
        ("2", "saved_model", "committed"),
    ]


def test_an_unreadable_or_conflicting_saved_model_is_refused(tmp_path):
    spec = file_remote(tmp_path)
    broken = tmp_path / "broken"
    tf.saved_model.save(Scaler(2.0), str(broken))
    data = broken / "variables" / "variables.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:8])
    got = cli("push", "--json", str(broken), spec.url)
    assert got.returncode == 2
    (refused,) = as_json(got)["skipped"]
    assert refused["status"] == "invalid" and "its variables cannot be read" in refused["reason"]
    assert stored(spec) == {}

    # A SavedModel TensorFlow wrote at the URL is the user's: never overwritten.
    tf.saved_model.save(Scaler(1.0), spec.root)
    before = stored(spec)
    export = tmp_path / "export"
    tf.saved_model.save(Scaler(2.0), str(export))
    conflict = cli("push", str(export), spec.url)
    assert conflict.returncode == 2 and "ckptstore did not write" in conflict.stderr
    assert "ckptstore.saved_model.adopt" in conflict.stderr
    assert stored(spec) == before
    bad_option = cli("push", str(export), spec.url, "--checkpoint", "ckpt-1")
    assert bad_option.returncode == 2 and "--checkpoint" in bad_option.stderr


# --- progress, help ---------------------------------------------------------------------------


def _push_under_pty(source, url, *extra: str) -> str:
    """Run push with a terminal as stdout (as a person at a shell); return its stderr."""
    main, replica = pty.openpty()
    try:
        proc = subprocess.run(
            [ENTRY_POINT, "push", str(source), url, *extra],
            stdout=replica,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(replica)
        os.close(main)
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stderr
    return proc.stderr


def test_a_progress_bar_shows_on_a_terminal_and_never_in_a_pipe_or_with_q(s3_server, tmp_path):
    source = tmp_path / "run"
    tf_run(source, steps=(1,))
    options = s3_options(s3_server)
    bar = _push_under_pty(source, s3_remote(s3_server).url, *options)
    assert "push ckpt-1: 100%|" in bar  # tqdm's bar, through fsspec's TqdmCallback

    piped = cli("push", str(source), s3_remote(s3_server).url, *options)
    assert piped.returncode == 0 and "%|" not in piped.stderr and "%|" not in piped.stdout
    quiet = _push_under_pty(source, s3_remote(s3_server).url, "-q", *options)
    assert "%|" not in quiet and quiet == ""

    # A SavedModel goes through the publisher's steps; its bytes reach the bar too.
    export = tmp_path / "export"
    tf.saved_model.save(Scaler(2.0), str(export))
    exported = s3_remote(s3_server)
    saved_bar = _push_under_pty(export, exported.url, *options)
    assert f"push {exported.url.rsplit('/', 1)[1]}: 100%|" in saved_bar


def test_push_help_teaches_it_with_examples_and_exit_statuses():
    got = cli("push", "--help")
    assert got.returncode == 0
    assert "usage: ckptstore push" in got.stdout and "DIR URL" in got.stdout
    for words in (
        "examples:",
        "ckptstore push ./runs/run-7 s3://bucket/runs/run-7",
        "exit status:",
    ):
        assert words in got.stdout
    assert "push" in cli("--help").stdout
    assert cli("push", "only-one-argument").returncode == 2
