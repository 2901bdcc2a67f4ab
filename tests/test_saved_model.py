"""ckptstore.saved_model: SavedModels on the verified path, against real local servers.

Every scenario runs the real ckptstore code over real clients (s3fs against
moto, gcsfs against fake-gcs-server, pydrive2 against the fake Drive, local
and memory filesystems). Where timing or a kill matters, a FaultProxy sits
between the client and S3: it slows the link, watches the order of requests,
or SIGKILLs a child process at a chosen request.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hashlib
import json
import posixpath
import signal
import subprocess
import sys
import textwrap
import urllib.parse

import keras
import numpy as np
import pytest
import tensorflow as tf

import ckptstore
import ckptstore.saved_model as sm
from conftest import RemoteSpec, file_remote, gdrive_remote, memory_remote, s3_remote
from servers.faultproxy import FaultProxy

MANIFEST = "saved_model.manifest.json"
MARKER = "saved_model.ckptstore-pending.json"
DATA = "variables/variables.data-00000-of-00001"
X = np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 4.0]], dtype=np.float32)


@pytest.fixture(autouse=True)
def staging_base(tmp_path, monkeypatch):
    """Where load() downloads to (and save() exports to without staging_dir=): per test."""
    base = tmp_path / "staging-base"
    monkeypatch.setenv("CKPTSTORE_STAGING_DIR", str(base))
    return base


class Scaler(tf.Module):
    """``y = x * scale``: the output after a load says which save it came from."""

    def __init__(self, scale: float, *, padding: int = 0, asset: str | None = None):
        super().__init__()
        self.scale = tf.Variable(tf.fill([3], float(scale)))
        if padding:  # bytes of variables, to make an upload take a while
            self.padding = tf.Variable(tf.zeros([padding // 4]))
        if asset is not None:
            self.vocab = tf.saved_model.Asset(asset)

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    def score(self, x):
        return {"y": x * self.scale}


def scaled_by(loaded, scale: float) -> bool:
    y = loaded.signatures["serving_default"](tf.constant(X))["y"].numpy()
    return np.array_equal(y, X * scale)


class Shift(keras.layers.Layer):
    """A custom layer: the export must carry its computation (no Python class at load)."""

    def build(self, input_shape):
        self.offset = self.add_weight(
            shape=(input_shape[-1],), initializer=keras.initializers.Constant(0.25)
        )

    def call(self, x):
        return keras.ops.square(x) + self.offset


def keras_model() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, kernel_initializer=keras.initializers.RandomNormal(seed=7)),
            Shift(),
        ]
    )


def stored(spec: RemoteSpec, under: str) -> set[str]:
    """Every object under ``<root>/<under>``, as paths relative to it (an independent client)."""
    root = spec.path(under).rstrip("/")
    spec.fs.invalidate_cache()
    try:
        found = spec.fs.find(root)
    except FileNotFoundError:
        return set()
    prefix = spec.fs._strip_protocol(root).rstrip("/") + "/"
    paths = (spec.fs._strip_protocol(p) for p in found)
    return {p[len(prefix) :] for p in paths if p.startswith(prefix)}


def replace_stored(spec: RemoteSpec, name: str, data: bytes) -> None:
    """Put other bytes under a stored name, as a person or a faulty sync would."""
    spec.fs.rm_file(spec.path(name))
    spec.fs.pipe_file(spec.path(name), data)


def read_stored(spec: RemoteSpec, name: str) -> bytes:
    spec.fs.invalidate_cache()  # the inspector's listings would be out of date
    with spec.fs.open(spec.path(name), "rb") as f:
        return b"".join(iter(lambda: f.read(1 << 20), b""))


def files_left_in(directory) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]


# --- round trip, every backend -------------------------------------------------------


def test_round_trip_through_every_backend_calls_signatures_after_load(remote, tmp_path):
    module = Scaler(3.0)
    model = keras_model()
    options = remote.storage_options
    exports = tmp_path / "exports"
    first = sm.save(
        module,
        f"{remote.url}/module",
        signatures=module.score,
        storage_options=options,
        staging_dir=exports,
    )
    second = sm.save(model, f"{remote.url}/keras", storage_options=options, staging_dir=exports)
    committed = first.wait(120)
    assert second.wait(120) is not None
    assert first.committed and second.committed

    # On the remote: TensorFlow's tree plus the manifest, nothing else.
    names = {e.name for e in committed.files}
    assert {"saved_model.pb", "variables/variables.index", DATA} <= names
    assert stored(remote, "module") == names | {MANIFEST}
    assert json.loads(read_stored(remote, f"module/{MANIFEST}"))["kind"] == "saved_model"

    loaded = sm.load(f"{remote.url}/module", storage_options=options)
    assert scaled_by(loaded, 3.0)
    served = sm.load(f"{remote.url}/keras", storage_options=options)
    np.testing.assert_allclose(served.serve(tf.constant(X)).numpy(), model(X).numpy(), rtol=1e-6)
    assert "serving_default" in served.signatures


# --- damage on the remote ---------------------------------------------------------------


def test_tampered_or_truncated_files_are_refused_and_nothing_is_loaded(
    remote, tmp_path, staging_base
):
    url = f"{remote.url}/export"
    options = remote.storage_options
    sm.save(Scaler(2.0), url, storage_options=options, staging_dir=tmp_path / "exports").wait(120)
    data = read_stored(remote, f"export/{DATA}")
    graph = read_stored(remote, "export/saved_model.pb")

    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0xFF
    replace_stored(remote, f"export/{DATA}", bytes(flipped))  # same size, other bytes
    with pytest.raises(ckptstore.RestoreError, match="does not match its manifest"):
        sm.load(url, storage_options=options)

    replace_stored(remote, f"export/{DATA}", data)
    replace_stored(remote, "export/saved_model.pb", graph[: len(graph) // 2])  # cut short
    with pytest.raises(ckptstore.RestoreError, match="does not match its manifest") as refused:
        sm.load(url, storage_options=options)
    assert url in str(refused.value)
    assert files_left_in(staging_base) == []  # no partial copy was kept, let alone loaded

    replace_stored(remote, "export/saved_model.pb", graph)  # the same bytes again: trusted
    assert scaled_by(sm.load(url, storage_options=options), 2.0)


# --- a kill mid-upload ------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, os, sys
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import ckptstore.saved_model

    url, options, staging, scale, asset, then = sys.argv[1:7]


    class Exported(tf.Module):
        def __init__(self):
            super().__init__()
            self.scale = tf.Variable(tf.fill([3], float(scale)))
            self.padding = tf.Variable(tf.zeros([1 << 20]))  # 4 MiB: an upload that takes a while
            if asset:
                self.vocab = tf.saved_model.Asset(asset)

        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
        def score(self, x):
            return {"y": x * self.scale}


    module = Exported()
    handle = ckptstore.saved_model.save(
        module, url, signatures=module.score, storage_options=json.loads(options),
        staging_dir=staging,
    )
    print("exported", flush=True)
    if then == "wait":
        handle.wait()
        print("committed", flush=True)
    # "exit": the interpreter's exit drain finishes the upload
    """
)


def run_child(url, options, staging, scale, asset="", then="wait", on_start=None):
    args = [sys.executable, "-c", CHILD, url, json.dumps(options), str(staging), str(scale)]
    proc = subprocess.Popen(
        [*args, asset, then], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if on_start is not None:
        on_start(proc)
    out, err = proc.communicate(timeout=180)
    return proc.returncode, out, err


def test_kill_mid_upload_leaves_not_committed_and_the_next_process_cleans_and_commits(
    s3_server, tmp_path
):
    spec = s3_remote(s3_server)
    url = f"{spec.url}/export"
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("alpha\nbeta\n")
    child: list = []
    killed: list[str] = []
    verified: set[str] = set()

    def kill_once_small_files_are_up(method, target, headers, body):
        # The 4 MiB of variables crawl over the slowed link; the asset and the index go up
        # beside them. Once both are verified (HEAD), the kill lands mid-upload.
        path = urllib.parse.unquote(target.partition("?")[0])
        if method == "HEAD" and path.endswith(("/assets/vocab.txt", "/variables/variables.index")):
            verified.add(posixpath.basename(path))
        if len(verified) == 2 and child and not killed:
            os.kill(child[0].pid, signal.SIGKILL)
            killed.append(f"{method} {path}")
            proxy.inject_next("reset")  # and this request never reaches S3
            return True
        return False

    proxy = FaultProxy(
        "127.0.0.1",
        s3_server.port,
        body_filter=kill_once_small_files_are_up,
        bandwidth_bytes_per_s=1 << 20,
    ).start()
    try:
        code, out, err = run_child(
            url,
            s3_server.storage_options(proxy.endpoint_url),
            tmp_path / "staging-1",
            1.0,
            asset=str(vocab),
            on_start=child.append,
        )
    finally:
        proxy.stop()
    assert killed and code == -signal.SIGKILL, (code, err[-3000:])
    assert "exported" in out and "committed" not in out

    # What the dead upload left: some data, its marker, no saved_model.pb, no manifest.
    left = stored(spec, "export")
    assert {MARKER, "assets/vocab.txt", "variables/variables.index"} <= left
    assert "saved_model.pb" not in left and MANIFEST not in left
    with pytest.raises(ckptstore.RestoreError, match="interrupted") as refused:
        sm.load(url, storage_options=spec.storage_options)
    assert url in str(refused.value) and "save it again" in str(refused.value)

    # The next process saves to the same URL and exits without waiting: the exit drain
    # commits it, and what the dead upload left is gone (this export has no asset).
    code, out, err = run_child(url, spec.storage_options, tmp_path / "staging-2", 2.0, then="exit")
    assert code == 0, err[-3000:]
    committed = json.loads(read_stored(spec, f"export/{MANIFEST}"))
    assert stored(spec, "export") == {f["name"] for f in committed["files"]} | {MANIFEST}
    assert scaled_by(sm.load(url, storage_options=spec.storage_options), 2.0)


# --- versions (TF Serving's layout) -----------------------------------------------------


def interrupted_version(spec: RemoteSpec, version: str) -> None:
    """What a process killed mid-upload leaves in a version: ckptstore's marker, some data."""
    marker = {
        "format": "ckptstore.pending",
        "files": ["fingerprint.pb", "saved_model.pb", "variables/variables.index", DATA],
        "writer": {"host": "gone", "pid": 1},
    }
    spec.fs.pipe_file(spec.path(f"base/{version}/{MARKER}"), json.dumps(marker).encode())
    spec.fs.pipe_file(spec.path(f"base/{version}/variables/variables.index"), b"partial")


def test_exporter_numbers_versions_retires_old_ones_and_load_finds_the_newest_committed(
    s3_server, tmp_path
):
    spec = s3_remote(s3_server)
    base = f"{spec.url}/base"
    options = spec.storage_options
    theirs = {"2/saved_model.pb": b"written by TensorFlow", "2/variables/variables.index": b"x"}
    for name, data in theirs.items():
        spec.fs.pipe_file(spec.path(f"base/{name}"), data)
    interrupted_version(spec, "3")

    exporter = sm.Exporter(base, max_to_keep=2, storage_options=options, staging_dir=tmp_path)
    handles = [exporter.save(Scaler(scale)) for scale in (4.0, 5.0, 6.0)]
    # Next after the largest number there, uncommitted ones included: never reused.
    assert [h.url for h in handles] == [f"{base}/4", f"{base}/5", f"{base}/6"]
    for handle in handles:
        handle.wait(120)

    left = stored(spec, "base")
    assert {n.split("/")[0] for n in left} == {"2", "5", "6"}  # 4 retired, 3 cleaned
    for version in ("5", "6"):
        assert {f"{version}/{MANIFEST}", f"{version}/saved_model.pb"} <= left
    for name, data in theirs.items():  # another writer's version: untouched
        assert read_stored(spec, f"base/{name}") == data

    # Another Exporter (a later run) counts on from what is there.
    later = sm.Exporter(base, storage_options=options, staging_dir=tmp_path)
    newest = later.save(Scaler(7.0))
    assert newest.url == f"{base}/7"
    newest.wait(120)
    assert scaled_by(sm.load(base, storage_options=options), 7.0)

    # A newer version that never committed is skipped: load gives the newest committed one.
    interrupted_version(spec, "8")
    assert scaled_by(sm.load(base, storage_options=options), 7.0)
    # An explicit version URL loads that version.
    assert scaled_by(sm.load(f"{base}/5", storage_options=options), 5.0)


@pytest.mark.parametrize("kind", ["file", "gdrive"])
def test_a_retired_version_leaves_no_folder_behind(kind, request, tmp_path):
    # Filesystems with folders (a local path, Drive): an empty numbered folder would look like
    # a broken version to TF Serving, and it is ckptstore's litter in the user's Drive.
    if kind == "gdrive":
        spec = gdrive_remote(request.getfixturevalue("drive_server"))
    else:
        spec = file_remote(tmp_path)
    base = f"{spec.url}/base"
    exporter = sm.Exporter(
        base, max_to_keep=1, storage_options=spec.storage_options, staging_dir=tmp_path / "s"
    )
    for scale in (1.0, 2.0):
        exporter.save(Scaler(scale)).wait(120)
    spec.fs.invalidate_cache()
    listed = spec.fs.ls(spec.path("base"), detail=False)
    assert [posixpath.basename(p.rstrip("/")) for p in listed] == ["2"]
    assert scaled_by(sm.load(base, storage_options=spec.storage_options), 2.0)


def test_saved_model_pb_goes_up_after_the_data_and_is_retired_right_after_the_manifest(
    s3_server, tmp_path
):
    spec = s3_remote(s3_server)
    requests: list[tuple[str, str]] = []  # (method, path under the base)
    when_graph_arrives: dict[str, dict[str, int]] = {}  # version -> {stored name: size}
    base_path = spec.root + "/base/"

    def watch(method, target, headers, body):
        path = urllib.parse.unquote(target.partition("?")[0]).lstrip("/")
        if path.startswith(base_path):
            name = path[len(base_path) :]
            requests.append((method, name))
            if method == "PUT" and name.endswith("/saved_model.pb"):
                # What a server watching the base finds as saved_model.pb appears.
                version = name.split("/")[0]
                root = spec.path(f"base/{version}")
                spec.fs.invalidate_cache()
                when_graph_arrives[version] = {
                    p[len(root) + 1 :]: info["size"]
                    for p, info in spec.fs.find(root, detail=True).items()
                }
        return False  # watch only

    with FaultProxy(
        "127.0.0.1", s3_server.port, body_filter=watch, bandwidth_bytes_per_s=1 << 20
    ) as proxy:
        exporter = sm.Exporter(
            f"{spec.url}/base",
            max_to_keep=1,
            storage_options=s3_server.storage_options(proxy.endpoint_url),
            staging_dir=tmp_path,
        )
        first = exporter.save(Scaler(1.0, padding=1 << 20))
        assert not first.done()  # save() returned with the 1 MiB still going up
        committed = first.wait(120)
        exporter.save(Scaler(2.0, padding=1 << 20)).wait(120)  # retires version 1

    others = {e.name: e.size for e in committed.files if e.name != "saved_model.pb"}
    assert DATA in others
    assert when_graph_arrives["1"] == others | {MARKER: when_graph_arrives["1"][MARKER]}
    puts = [name for method, name in requests if method == "PUT"]
    assert puts.index("1/saved_model.pb") < puts.index(f"1/{MANIFEST}")

    deleted = [n for m, n in requests if m == "DELETE" and n.startswith("1/") and MARKER not in n]
    assert deleted[:2] == [f"1/{MANIFEST}", "1/saved_model.pb"]
    assert sorted(deleted[2:]) == sorted(f"1/{n}" for n in others)
    assert {n.split("/")[0] for n in stored(spec, "base")} == {"2"}


def test_load_of_a_base_with_no_committed_version_says_why(tmp_path):
    spec = memory_remote()
    spec.fs.pipe_file(spec.path("base/1/saved_model.pb"), b"written by TensorFlow")
    interrupted_version(spec, "2")
    with pytest.raises(ckptstore.RestoreError) as refused:
        sm.load(f"{spec.url}/base")
    message = str(refused.value)
    assert f"{spec.url}/base holds versions 1, 2 but none is committed" in message
    assert "interrupted" in message and "Exporter" in message

    with pytest.raises(ckptstore.RestoreError, match="nothing is stored there") as refused:
        sm.load(f"{spec.url}/nothing")
    assert f"{spec.url}/nothing" in str(refused.value)


# --- bad input ----------------------------------------------------------------------------


def test_an_object_tensorflow_cannot_export_raises_its_error_naming_the_url(tmp_path):
    spec = memory_remote()
    url = f"memory://someone:hunter2secret@{spec.root.lstrip('/')}/export"
    staging = tmp_path / "exports"
    with pytest.raises(ValueError, match="Trackable") as refused:  # TensorFlow's own error
        sm.save(object(), url, staging_dir=staging)
    message = str(refused.value)
    assert f"memory://***@{spec.root.lstrip('/')}/export" in message
    assert "hunter2secret" not in message and "nothing was uploaded" in message
    assert files_left_in(staging) == []  # the local export was removed
    written = [*spec.fs.store, *spec.fs.pseudo_dirs]  # memory://'s whole contents
    assert not [p for p in written if "hunter2secret" in p or spec.root in p]  # nor uploaded


def test_a_savedmodel_ckptstore_did_not_write_is_refused_until_adopted(tmp_path):
    # The seeds' workflow: tf.saved_model.save straight into a (mounted Drive) folder.
    folder = str(tmp_path / "drive" / "my_saved_model")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("alpha\n")
    tf.saved_model.save(Scaler(1.0, asset=str(vocab)), folder)

    def snapshot() -> dict[str, str]:
        return {
            os.path.relpath(p, folder): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in files_left_in(folder)
        }

    before = snapshot()
    with pytest.raises(ckptstore.ConfigurationError) as refused:
        sm.save(Scaler(2.0), folder, staging_dir=tmp_path / "exports")
    message = str(refused.value)
    assert folder in message and f"ckptstore.saved_model.adopt({folder!r})" in message
    assert snapshot() == before  # not a byte changed, nothing added
    with pytest.raises(ckptstore.RestoreError, match="did not write") as refused:
        sm.load(folder)
    assert "adopt(" in str(refused.value)

    adopted = sm.adopt(folder)
    assert {e.name for e in adopted.files} == set(before)
    assert sm.adopt(folder) == adopted  # already committed: nothing to do
    assert scaled_by(sm.load(folder), 1.0)

    # Adopted, it is ckptstore's: a new save replaces it, TensorFlow's asset included.
    sm.save(Scaler(2.0), folder, staging_dir=tmp_path / "exports").wait(60)
    assert "assets/vocab.txt" not in snapshot()
    assert scaled_by(sm.load(folder), 2.0)


def test_adopt_refuses_what_is_not_a_savedmodel(tmp_path):
    spec = file_remote(tmp_path)
    spec.fs.makedirs(spec.path("base/1"))
    spec.fs.pipe_file(spec.path("base/1/saved_model.pb"), b"a version")
    spec.fs.pipe_file(spec.path("base/notes.txt"), b"not a model")
    with pytest.raises(ckptstore.ConfigurationError, match=r"no saved_model\.pb") as refused:
        sm.adopt(f"{spec.url}/base")
    assert f"{spec.url}/base" in str(refused.value) and "adopt each version" in str(refused.value)
    assert stored(spec, "base") == {"1/saved_model.pb", "notes.txt"}  # nothing committed


# --- Keras 3 ---------------------------------------------------------------------------------


def test_keras_export_keeps_custom_layers_and_explicit_signatures(tmp_path):
    spec = memory_remote()
    model = keras_model()

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="features")])
    def doubled(features):
        return {"doubled": model(features) * 2.0}

    options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
    handles = [
        sm.save(model, f"{spec.url}/named", {"doubled": doubled}, options, staging_dir=tmp_path),
        sm.save(model, f"{spec.url}/default", doubled, staging_dir=tmp_path),
    ]
    for handle in handles:
        handle.wait(60)
    expected = model(X).numpy()

    named = sm.load(f"{spec.url}/named")
    assert not isinstance(named, keras.Layer)  # TensorFlow's revived object: no Keras class
    np.testing.assert_allclose(named.serve(tf.constant(X)).numpy(), expected, rtol=1e-6)
    out = named.signatures["doubled"](features=tf.constant(X))["doubled"].numpy()
    np.testing.assert_allclose(out, expected * 2.0, rtol=1e-6)

    default = sm.load(f"{spec.url}/default")  # one function: it is serving_default, as in TF
    np.testing.assert_allclose(default.serve(tf.constant(X)).numpy(), expected, rtol=1e-6)
    out = default.signatures["serving_default"](features=tf.constant(X))["doubled"].numpy()
    np.testing.assert_allclose(out, expected * 2.0, rtol=1e-6)
