"""The ``ckptstore`` command (``ls``, ``verify``, ``gc``) as a user runs it.

Every command runs as a subprocess through the installed entry point
(``.venv/bin/ckptstore``; ``python -m ckptstore`` in the TensorFlow test) against
real local servers: moto S3, fake-gcs-server and the fake Drive server. What it
inspects is written by the library in this process (checkpoint managers, a Keras
file, an Exporter); what the tests break (a tampered object, a dead writer's
leftovers) is written with an independent client.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import textwrap
import uuid

import crc32c
import pytest
import tensorflow as tf

import ckptstore
from conftest import BUCKET, dead_writers_lease, gcs_remote, gdrive_remote, s3_remote
from training import TrainState

ENTRY_POINT = os.path.join(os.path.dirname(sys.executable), "ckptstore")
PART = 5 * 1024 * 1024  # S3's smallest part
BIG = ((1024, 1024, 2), (33,))  # an 8 MB data file: a multipart upload of two 5 MiB parts
SECRET = "s3cr3t-that-is-never-printed"  # moto does not check signatures: any secret works


def cli(*args: str) -> subprocess.CompletedProcess:
    """Run the installed ``ckptstore`` command; fail the test if it never exits."""
    assert os.path.exists(ENTRY_POINT), "no ckptstore command: pip install -e . (make does)"
    proc = subprocess.run([ENTRY_POINT, *args], capture_output=True, text=True, timeout=120)
    assert SECRET not in proc.stdout + proc.stderr, "a credential was printed"
    return proc


def as_json(proc: subprocess.CompletedProcess) -> dict:
    """The one JSON document on stdout (json.loads fails on anything else there)."""
    return json.loads(proc.stdout)


def s3_options(server) -> list[str]:
    # A dotted key sets a nested option; the secret must never show up in any output.
    return [
        "-o",
        "key=testing",
        "-o",
        f"secret={SECRET}",
        "-o",
        f"client_kwargs.endpoint_url={server.endpoint_url}",
    ]


def gcs_options(server) -> list[str]:
    # A JSON value (here a plain string that happens to parse as JSON) and a bare string.
    return ["-o", f"endpoint_url={server.endpoint_url}", "-o", 'token="anon"']


def save_run(spec, url: str, staging, steps=(1, 2), shapes=None, **kwargs):
    """A ckptstore run at ``url`` with one committed checkpoint per step; closed (released)."""
    state = TrainState(shapes) if shapes else TrainState()
    with ckptstore.CheckpointManager(
        state.checkpoint,
        url,
        max_to_keep=len(steps),
        staging_dir=str(staging),
        storage_options=spec.storage_options,
        **kwargs,
    ) as m:
        for step in steps:
            state.advance_to(step)
            m.save()


def save_keras_model(spec, url: str, staging):
    """A small Keras model (seeded: the same weights every time) saved to ``url`` by ckptstore."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    ckptstore.keras.save_model(
        model, url, storage_options=spec.storage_options, staging_dir=str(staging)
    ).wait()
    return model


class Scaler(tf.Module):
    """A SavedModel's smallest useful content: one variable, one signature."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = tf.Variable([scale, scale])

    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32)])
    def score(self, x):
        return {"y": x * self.scale}


def live_writer(spec, staging) -> ckptstore.CheckpointManager:
    """A ckptstore run at ``spec.url`` with ckpt-1 committed, its manager still holding the
    run (a live writer, this process); the caller closes it."""
    state = TrainState()
    manager = ckptstore.CheckpointManager(
        state.checkpoint,
        spec.url,
        max_to_keep=3,
        staging_dir=str(staging),
        storage_options=spec.storage_options,
    )
    try:
        state.advance_to(1)
        manager.save()
        manager.sync()  # committed; the manager still holds the run
    except BaseException:
        manager.close()
        raise
    return manager


# Drive needs a GoogleAuth object, which no command line can carry: main() takes it as
# storage_options, here in a child process wired to the fake server as conftest does.
_DRIVE_CHILD = textwrap.dedent(
    """
    import sys, types
    sys.path.insert(0, {tests!r})
    from servers.fake_drive import make_google_auth
    from ckptstore.cli import main
    auth = make_google_auth(types.SimpleNamespace(url={url!r}, access_token={token!r}))
    sys.exit(main(sys.argv[1:], storage_options={{"google_auth": auth}}))
    """
)


def drive_command(drive_server, *args: str) -> list[str]:
    """The command line of a child running ``ckptstore *args`` against the fake Drive server."""
    child = _DRIVE_CHILD.format(
        tests=os.path.dirname(__file__), url=drive_server.url, token=drive_server.access_token
    )
    return [sys.executable, "-c", child, *args]


def drive_cli(drive_server, *args: str, **run_kwargs) -> subprocess.CompletedProcess:
    """Run ``ckptstore *args`` against the fake Drive server (see :func:`drive_command`)."""
    run_kwargs = {"capture_output": True, "text": True, "timeout": 120, **run_kwargs}
    return subprocess.run(drive_command(drive_server, *args), **run_kwargs)


# A child that runs the CLI as ``python -m ckptstore`` does, then says which modules it imported.
_HEAVY_IMPORTS_CHILD = textwrap.dedent(
    """
    import json, runpy, sys
    sys.argv = ["ckptstore", *sys.argv[1:]]
    try:
        runpy.run_module("ckptstore", run_name="__main__")  # python -m ckptstore
    except SystemExit as exc:
        code = exc.code
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
    print(json.dumps({"exit": code, "imported": heavy}))
    """
)


def heavy_imports(*args: str) -> tuple[int, list[str]]:
    """Run ``python -m ckptstore *args``: its exit status and the TensorFlow and Keras
    modules it imported."""
    got = subprocess.run(
        [sys.executable, "-c", _HEAVY_IMPORTS_CHILD, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert got.returncode == 0, got.stderr
    report = json.loads(got.stdout.splitlines()[-1])
    return report["exit"], report["imported"]


@pytest.fixture(scope="module")
def s3_store(s3_server, tmp_path_factory):
    """Several runs under one prefix: checkpoints (multipart), a Keras file, an Exporter."""
    base = tmp_path_factory.mktemp("cli-s3")
    spec = s3_remote(s3_server)
    save_run(spec, f"{spec.url}/run-a", base / "a", shapes=BIG, upload_part_size=PART)
    save_keras_model(spec, f"{spec.url}/models/best.keras", base / "k")
    exporter = ckptstore.saved_model.Exporter(
        f"{spec.url}/models/serving",
        storage_options=spec.storage_options,
        staging_dir=str(base / "e"),
    )
    exporter.save(Scaler(2.0)).wait()
    return spec


# --- help and usage -------------------------------------------------------------------------


def test_help_teaches_each_command_with_an_example_and_bad_usage_exits_2():
    top = cli("--help")
    assert top.returncode == 0
    for word in ("ls", "verify", "gc", "examples:", "exit status:", "credentials:"):
        assert word in top.stdout
    for command, example in [
        ("ls", "ckptstore ls s3://bucket/runs"),
        ("verify", "ckptstore verify --all s3://bucket/runs"),
        ("gc", "ckptstore gc --yes s3://bucket/runs/run-7"),
    ]:
        got = cli(command, "--help")
        assert got.returncode == 0, got.stderr
        assert example in got.stdout and "usage: ckptstore " + command in got.stdout
        assert "--storage-option" in got.stdout and "--json" in got.stdout

    assert cli().returncode == 2  # no command: the help, on stderr
    assert cli("frobnicate", "s3://b/x").returncode == 2
    missing_url = cli("ls")
    assert missing_url.returncode == 2 and "URL" in missing_url.stderr
    # A malformed -o is refused without echoing it (it may be a secret).
    bad = cli("ls", "s3://b/x", "-o", SECRET)
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr


# --- ls -------------------------------------------------------------------------------------


def test_ls_above_several_runs_lists_each_with_its_artifacts_and_writer(s3_store, s3_server):
    got = cli("ls", "--json", s3_store.url, *s3_options(s3_server))
    assert got.returncode == 0, got.stderr
    doc = as_json(got)
    assert doc["url"] == s3_store.url
    runs = {r["path"]: r for r in doc["runs"]}
    assert set(runs) == {"run-a", "models", "models/serving"}

    run_a = runs["run-a"]
    assert run_a["url"] == f"{s3_store.url}/run-a"
    writer = run_a["writer"]
    assert writer["state"] == "released" and writer["pid"] == os.getpid()
    assert writer["host"] == socket.gethostname() and writer["in_flight"] == []
    ckpts = run_a["artifacts"]
    assert [a["name"] for a in ckpts] == ["ckpt-1", "ckpt-2"]
    for number, a in enumerate(ckpts, start=1):
        assert a["kind"] == "checkpoint" and a["number"] == number
        assert a["committed"] is True and a["status"] == "committed"
        assert a["url"] == f"{s3_store.url}/run-a/ckpt-{number}"
        assert a["bytes"] > 8_000_000 and isinstance(a["time"], float)
        assert "step" in a and a["time_utc"].endswith("Z")
        assert sorted(a["files"]) == [f"ckpt-{number}.data-00000-of-00001", f"ckpt-{number}.index"]

    (keras_file,) = runs["models"]["artifacts"]
    assert keras_file["name"] == "best.keras" and keras_file["kind"] == "keras"
    assert keras_file["committed"] and keras_file["url"] == f"{s3_store.url}/models/best.keras"
    (version,) = runs["models/serving"]["artifacts"]
    assert version["name"] == "1" and version["kind"] == "saved_model" and version["number"] == 1
    assert version["committed"] and "saved_model.pb" in version["files"]
    assert runs["models"]["writer"] is None  # Keras files and exports take no lease

    human = cli("ls", s3_store.url, *s3_options(s3_server))
    assert human.returncode == 0
    lines = human.stdout.splitlines()
    assert f"{s3_store.url}/run-a" in lines and f"{s3_store.url}/models/serving" in lines
    assert any("last writer: host" in line and f"pid {os.getpid()}" in line for line in lines)
    assert any(line.split()[:3] == ["ckpt-2", "checkpoint", "2"] for line in lines)
    assert any(line.split()[:2] == ["best.keras", "keras"] for line in lines)
    assert "4 committed artifacts and 0 uncommitted" in human.stderr  # a note: stderr


def test_ls_and_verify_of_a_url_with_nothing_succeed_empty(s3_server):
    empty = f"s3://{BUCKET}/{uuid.uuid4().hex}/nothing-here"
    got = cli("ls", "--json", empty, *s3_options(s3_server))
    assert got.returncode == 0 and as_json(got) == {"url": empty, "runs": []}
    assert "nothing stored" in got.stderr
    checked = cli("verify", "--json", empty, *s3_options(s3_server))
    assert checked.returncode == 0
    assert as_json(checked)["ok"] is True and as_json(checked)["artifacts"] == []
    assert cli("gc", "--yes", empty, *s3_options(s3_server)).returncode == 0


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_no_such_bucket_exits_2_naming_it(kind, request):
    server = request.getfixturevalue(f"{kind}_server")
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    url = f"{'s3' if kind == 's3' else 'gs'}://{bucket}/run"
    options = s3_options(server) if kind == "s3" else gcs_options(server)
    for command in ("ls", "verify", "gc"):
        got = cli(command, url, "-vv", *options)
        assert got.returncode == 2, (command, got.stdout, got.stderr)
        assert bucket in got.stderr and got.stdout == ""


# --- verify ---------------------------------------------------------------------------------


def test_a_multipart_s3_object_is_verified_by_a_fresh_process_without_reading_it(
    s3_store, s3_server
):
    run_a = f"{s3_store.url}/run-a"
    data = "ckpt-2.data-00000-of-00001"
    bucket, key = s3_store.path(f"run-a/{data}").split("/", 1)
    parts = s3_store.fs.call_s3("head_object", Bucket=bucket, Key=key, PartNumber=1)
    assert parts["PartsCount"] == 2, "the data file should be a multipart upload"

    got = cli("verify", "--all", "--json", run_a, *s3_options(s3_server))
    assert got.returncode == 0, got.stderr
    doc = as_json(got)
    assert doc["ok"] is True and doc["all"] is True and doc["deep"] is False
    assert [a["name"] for a in doc["artifacts"]] == ["ckpt-1", "ckpt-2"]
    for a in doc["artifacts"]:
        assert a["ok"] and a["problems"] == [] and a["checked"] == "service-checksum"
        for f in a["files"]:
            assert (f["checked"], f["detail"], f["ok"]) == ("service-checksum", "S3 CRC32C", True)

    newest = cli("verify", run_a, *s3_options(s3_server))
    assert newest.returncode == 0
    assert newest.stdout.startswith(f"OK      {run_a}/ckpt-2  (2 files,")
    assert "S3 CRC32C, nothing downloaded" in newest.stdout and "ckpt-1" not in newest.stdout

    deep = as_json(cli("verify", "--deep", "--json", run_a, *s3_options(s3_server)))
    assert deep["ok"] and {f["checked"] for f in deep["artifacts"][0]["files"]} == {"read-back"}


def test_an_object_an_older_ckptstore_uploaded_with_a_composite_crc_is_read_back(
    s3_server, tmp_path
):
    spec = s3_remote(s3_server)
    save_run(spec, spec.url, tmp_path / "s", steps=(1,), shapes=BIG, upload_part_size=PART)
    # What ckptstore 0.1.0 stored: the same bytes as a multipart upload whose checksum
    # is S3's default, the composite CRC32C of the part CRC32Cs.
    name = "ckpt-1.data-00000-of-00001"
    body = spec.read(name)
    bucket, key = spec.path(name).split("/", 1)
    fs = spec.fs
    upload = fs.call_s3(
        "create_multipart_upload", Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32C"
    )
    done = []
    for number, start in enumerate(range(0, len(body), PART), start=1):
        part = body[start : start + PART]
        value = base64.b64encode(crc32c.crc32c(part).to_bytes(4, "big")).decode()
        reply = fs.call_s3(
            "upload_part",
            Bucket=bucket,
            Key=key,
            UploadId=upload["UploadId"],
            PartNumber=number,
            Body=part,
            ChecksumCRC32C=value,
        )
        done.append({"PartNumber": number, "ETag": reply["ETag"], "ChecksumCRC32C": value})
    fs.call_s3(
        "complete_multipart_upload",
        Bucket=bucket,
        Key=key,
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": done},
    )

    got = cli("verify", "--json", spec.url, *s3_options(s3_server))
    assert got.returncode == 0, got.stderr
    (artifact,) = as_json(got)["artifacts"]
    files = {f["name"]: f for f in artifact["files"]}
    assert artifact["ok"] and artifact["checked"] == "mixed"
    assert files[name]["checked"] == "read-back" and "composite" in files[name]["detail"]
    assert files["ckpt-1.index"]["checked"] == "service-checksum"
    human = cli("verify", spec.url, *s3_options(s3_server))
    assert human.returncode == 0 and "read back (S3 keeps a composite CRC32C" in human.stdout


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_a_tampered_object_fails_verify_with_exit_1_naming_it(kind, request, tmp_path):
    server = request.getfixturevalue(f"{kind}_server")
    spec = s3_remote(server) if kind == "s3" else gcs_remote(server)
    options = s3_options(server) if kind == "s3" else gcs_options(server)
    save_run(spec, spec.url, tmp_path / "s")
    ok = cli("verify", "--all", spec.url, *options)
    assert ok.returncode == 0, ok.stderr
    assert ("S3 CRC32C" if kind == "s3" else "GCS CRC32C") in ok.stdout

    name = "ckpt-2.data-00000-of-00001"
    original = spec.read(name)
    spec.write(name, bytes(b ^ 0xFF for b in original))  # same size, other bytes

    got = cli("verify", spec.url, *options)
    assert got.returncode == 1
    # An artifact's own URL, as ls and verify print it, checks that artifact alone.
    assert cli("verify", f"{spec.url}/ckpt-1", *options).returncode == 0
    assert cli("verify", f"{spec.url}/ckpt-2", *options).returncode == 1
    assert f"FAILED  {spec.url}/ckpt-2" in got.stdout and name in got.stdout
    assert "FAILED" in got.stderr and f"{spec.url}/ckpt-2" in got.stderr
    doc = as_json(cli("verify", "--all", "--json", spec.url, *options))
    assert doc["ok"] is False
    by_name = {a["name"]: a for a in doc["artifacts"]}
    assert by_name["ckpt-1"]["ok"] is True and by_name["ckpt-2"]["ok"] is False
    (problem,) = by_name["ckpt-2"]["problems"]
    assert name in problem
    failed = [f for f in by_name["ckpt-2"]["files"] if not f["ok"]]
    assert [f["name"] for f in failed] == [name]


def test_gcs_and_drive_are_listed_and_verified_by_their_own_checksums(
    gcs_server, drive_server, tmp_path
):
    spec = gcs_remote(gcs_server)
    save_run(spec, spec.url, tmp_path / "g", steps=(1,))
    listed = as_json(cli("ls", "--json", spec.url, *gcs_options(gcs_server)))
    assert [a["name"] for a in listed["runs"][0]["artifacts"]] == ["ckpt-1"]

    # Drive needs a GoogleAuth object, which no command line can carry (see drive_command).
    drive = gdrive_remote(drive_server)
    save_run(drive, drive.url, tmp_path / "d", steps=(1,))

    def drive_json(*args: str) -> dict:
        got = drive_cli(drive_server, *args, "--json", drive.url)
        assert got.returncode == 0, got.stderr
        return as_json(got)

    (checked,) = drive_json("verify")["artifacts"]
    assert checked["ok"] and {f["detail"] for f in checked["files"]} == {"Drive MD5"}
    # A Keras upload killed mid-way: Drive's listing has no times, its metadata does.
    marker = {"format": "ckptstore.pending", "files": ["best.keras"]}
    drive.write("best.keras.ckptstore-pending.json", json.dumps(marker).encode())
    drive.write("best.keras", b"half a keras file")
    listed = {a["name"]: a for a in drive_json("ls")["runs"][0]["artifacts"]}
    assert listed["ckpt-1"]["committed"] and listed["best.keras"]["status"] == "unfinished"
    assert "s ago" in listed["best.keras"]["reason"]  # its age is known
    collected = drive_json("gc", "--yes", "--min-age", "0")
    assert [a["name"] for a in collected["candidates"]] == ["best.keras"]
    assert "best.keras" not in drive.names() and "ckpt-1.index" in drive.names()


# --- gc -------------------------------------------------------------------------------------


def test_gc_dry_run_deletes_nothing_and_yes_deletes_only_ckptstores_leftovers(s3_server, tmp_path):
    spec = s3_remote(s3_server)
    save_run(spec, f"{spec.url}/run", tmp_path / "s", steps=(1,))
    # A writer on this machine was killed while uploading ckpt-9: its lease lists it.
    spec.write("run/ckptstore.lease.json", dead_writers_lease(("ckpt-9",)))
    spec.write("run/ckpt-9.index", b"partial index")
    spec.write("run/ckpt-9.data-00000-of-00001", b"partial data" * 100)
    spec.write("run/embeddings.index", b"a user's file that looks like a checkpoint's")
    # A Keras upload killed after its in-progress marker and part of its files.
    marker = {"format": "ckptstore.pending", "files": ["best.keras", "best.keras.ckptstore-next"]}
    spec.write("models/best.keras.ckptstore-pending.json", json.dumps(marker).encode())
    spec.write("models/best.keras", b"half a keras file")
    # An Exporter's version killed mid-upload (saved_model.pb goes last: never sent).
    marker = {
        "format": "ckptstore.pending",
        "files": ["variables/variables.index", "saved_model.pb"],
    }
    spec.write("serving/2/saved_model.ckptstore-pending.json", json.dumps(marker).encode())
    spec.write("serving/2/variables/variables.index", b"half an export")
    before = sorted(spec.fs.find(spec.root))
    options = s3_options(s3_server)

    listed = as_json(cli("ls", "--json", spec.url, *options))
    states = {
        (r["path"], a["name"]): (a["status"], a["collectable"])
        for r in listed["runs"]
        for a in r["artifacts"]
    }
    assert states == {
        ("run", "ckpt-1"): ("committed", False),
        ("run", "ckpt-9"): ("interrupted", True),
        ("run", "embeddings"): ("unmanaged", False),
        ("models", "best.keras"): ("unfinished", False),  # younger than --min-age (1 h)
        ("serving", "2"): ("unfinished", False),
    }
    assert [r["writer"]["state"] for r in listed["runs"] if r["path"] == "run"] == ["gone"]

    dry = cli("gc", spec.url, *options)
    assert dry.returncode == 0, dry.stderr
    assert f"would delete  {spec.url}/run/ckpt-9  (checkpoint, 2 files" in dry.stdout
    assert "nothing was" in dry.stderr
    dry_json = as_json(cli("gc", "--json", "--min-age", "0", spec.url, *options))
    assert dry_json["dry_run"] is True and dry_json["deleted"] == []
    assert sorted(a["name"] for a in dry_json["candidates"]) == ["2", "best.keras", "ckpt-9"]
    assert sorted(spec.fs.find(spec.root)) == before, "a dry run deleted something"

    done = cli("gc", "--yes", "--json", "--min-age", "0", spec.url, *options)
    assert done.returncode == 0, done.stderr
    doc = as_json(done)
    assert doc["ok"] and doc["dry_run"] is False
    assert sorted(doc["deleted"]) == sorted(
        f"{spec.url}/{p}"
        for p in (
            "run/ckpt-9.index",
            "run/ckpt-9.data-00000-of-00001",
            "models/best.keras",
            "models/best.keras.ckptstore-pending.json",
            "serving/2/variables/variables.index",
            "serving/2/saved_model.ckptstore-pending.json",
        )
    )
    left = sorted(p[len(spec.root) + 1 :] for p in spec.fs.find(spec.root))
    assert left == [
        "run/checkpoint",
        "run/ckpt-1.data-00000-of-00001",
        "run/ckpt-1.index",
        "run/ckpt-1.manifest.json",
        "run/ckptstore.lease.json",
        "run/embeddings.index",
    ]
    lease = json.loads(spec.read("run/ckptstore.lease.json"))
    assert lease["released"] is True and lease["in_flight"] == []  # gc took it, then let go
    assert cli("verify", "--all", spec.url, *options).returncode == 0
    again = as_json(cli("gc", "--json", spec.url, *options))
    assert again["candidates"] == []


def test_gc_leaves_a_run_alone_while_its_writer_lives_and_names_the_writer(s3_server, tmp_path):
    spec = s3_remote(s3_server)
    manager = live_writer(spec, tmp_path / "s")  # ckpt-1 committed; this process holds the run
    try:
        # Data with no manifest yet: to anyone else, exactly what an upload in flight is.
        spec.write("ckpt-2.index", b"being uploaded")
        before = spec.names()
        options = s3_options(s3_server)

        listed = as_json(cli("ls", "--json", spec.url, *options))
        (run,) = listed["runs"]
        assert run["writer"]["state"] == "alive" and run["writer"]["pid"] == os.getpid()
        assert {a["name"]: a["status"] for a in run["artifacts"]} == {
            "ckpt-1": "committed",
            "ckpt-2": "uploading",
        }

        got = cli("gc", "--yes", "--json", "--min-age", "0", spec.url, *options)
        assert got.returncode == 0, got.stderr
        doc = as_json(got)
        assert doc["candidates"] == [] and doc["deleted"] == []
        (skipped,) = doc["skipped"]
        assert skipped["writer"]["pid"] == os.getpid() and skipped["writer"]["state"] == "alive"
        assert f"pid {os.getpid()}" in got.stderr and "leaves this run alone" in got.stderr
        assert spec.names() == before
        assert manager.is_writer  # gc did not take the run
    finally:
        manager.close()


# --- no TensorFlow --------------------------------------------------------------------------


def test_ls_verify_and_gc_never_import_tensorflow(s3_store, s3_server):
    for command in (["ls"], ["verify", "--all"], ["gc"], ["gc", "--yes"]):
        got = heavy_imports(*command, "-q", s3_store.url, *s3_options(s3_server))
        assert got == (0, []), command
