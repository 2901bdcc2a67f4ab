"""ckptstore.keras: ModelCheckpoint, save_model and load_model on the verified path.

Every test runs Keras for real against real servers (moto S3, fake-gcs-server,
the fake Drive, a local directory, fsspec's memory filesystem); nothing of
ckptstore is replaced. Where a test needs a monitored value it controls, a
callback placed before the checkpoint writes it into the logs (``Scores``), as
a metric would.
"""

from __future__ import annotations

import json
import os
import posixpath
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

import keras
import numpy as np
import pytest

import ckptstore
import ckptstore.keras
from ckptstore.keras.checkpoint import FormatFieldError
from ckptstore.keras.saving import load_weights
from conftest import file_remote, memory_remote, s3_remote
from keras_overwrite_child import build, version_of, versioned_model
from servers.faultproxy import FaultProxy

CHILD = os.path.join(os.path.dirname(__file__), "keras_overwrite_child.py")
SIDE = "best.keras.ckptstore-next"
PENDING = "best.keras.ckptstore-pending.json"

X = np.random.default_rng(0).random((64, 4)).astype(np.float32)
Y = (X @ np.array([[1.0], [2.0], [3.0], [4.0]], dtype=np.float32)).astype(np.float32)


@pytest.fixture(autouse=True)
def _staging_base(tmp_path, monkeypatch):
    """load_model downloads beside the default staging base: keep it inside the test."""
    monkeypatch.setenv("CKPTSTORE_STAGING_DIR", str(tmp_path / "staging-base"))


def small_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(optimizer="adam", loss="mse")
    # Built now, so a model saved before training and one loaded into agree on its variables.
    model.optimizer.build(model.trainable_variables)
    return model


def predictions(model: keras.Model) -> np.ndarray:
    return model.predict(X, verbose=0)


class Scores(keras.callbacks.Callback):
    """Writes the next scripted value into ``logs["score"]`` at each epoch's end."""

    def __init__(self, values):
        super().__init__()
        self.values = list(values)

    def on_epoch_end(self, epoch, logs=None):
        logs["score"] = self.values[epoch]


def fit_with_scores(model, checkpoint, scores):
    """``len(scores)`` epochs; ``checkpoint`` monitors ``score`` (listed after Scores)."""
    model.fit(X, Y, epochs=len(scores), verbose=0, callbacks=[Scores(scores), checkpoint])


def manifest(remote, name: str) -> dict:
    return json.loads(remote.read(name + ".manifest.json"))


# --- format fields, weights, backends ---------------------------------------------------


def test_format_fields_give_one_committed_file_per_epoch_at_its_own_url(tmp_path):
    remote = file_remote(tmp_path)
    model = small_model()
    checkpoint = ckptstore.keras.ModelCheckpoint(
        remote.url + "/model-{epoch:02d}-{val_loss:.3f}.keras", staging_dir=tmp_path / "stage"
    )
    history = model.fit(X, Y, validation_split=0.25, epochs=3, verbose=0, callbacks=[checkpoint])
    # fit() returned: on_train_end waited, so every file is committed now.
    expected = [
        f"model-{epoch:02d}-{loss:.3f}.keras"
        for epoch, loss in enumerate(history.history["val_loss"], start=1)
    ]
    assert len(set(expected)) == 3
    assert sorted(remote.manifests()) == expected
    for epoch, name in enumerate(expected, start=1):
        doc = manifest(remote, name)
        assert doc["kind"] == "keras" and doc["number"] == epoch
        assert [f["name"] for f in doc["files"]] == [name]  # one object, at exactly its URL
        assert doc["files"][0]["size"] == len(remote.read(name))
        meta = doc["metadata"]
        assert meta["epoch"] == epoch and meta["monitor"] == "val_loss" and meta["mode"] == "min"
        assert meta["value"] == pytest.approx(history.history["val_loss"][epoch - 1])
    # Each file is a plain .keras file Keras itself reads; ckptstore's load verifies it first.
    loaded = ckptstore.keras.load_model(remote.url + "/" + expected[-1])
    np.testing.assert_array_equal(predictions(loaded), predictions(model))
    assert not os.listdir(tmp_path / "stage"), "committed files stay in staging"


def test_weights_only_checkpoints_load_into_a_fresh_model(tmp_path):
    remote = memory_remote()
    model = small_model()
    checkpoint = ckptstore.keras.ModelCheckpoint(
        remote.url + "/w-{epoch}.weights.h5", save_weights_only=True, monitor="loss"
    )
    model.fit(X, Y, epochs=2, verbose=0, callbacks=[checkpoint])
    assert sorted(remote.manifests()) == ["w-1.weights.h5", "w-2.weights.h5"]
    fresh = small_model(seed=1)
    assert not np.array_equal(predictions(fresh), predictions(model))
    load_weights(fresh, remote.url + "/w-2.weights.h5")
    np.testing.assert_array_equal(predictions(fresh), predictions(model))
    with pytest.raises(ckptstore.ConfigurationError, match="load_weights"):
        ckptstore.keras.load_model(remote.url + "/w-2.weights.h5")


def test_round_trip_on_every_backend(remote, tmp_path):
    model = small_model()
    checkpoint = ckptstore.keras.ModelCheckpoint(
        remote.url + "/model.keras",
        storage_options=remote.storage_options,
        staging_dir=tmp_path / "stage",
    )
    model.fit(X, Y, validation_split=0.25, epochs=2, verbose=0, callbacks=[checkpoint])
    assert {"model.keras", "model.keras.manifest.json"} <= set(remote.names())
    assert manifest(remote, "model.keras")["metadata"]["epoch"] == 2
    loaded = ckptstore.keras.load_model(
        remote.url + "/model.keras", storage_options=remote.storage_options
    )
    np.testing.assert_array_equal(predictions(loaded), predictions(model))
    # The saved file went over the side copy and left nothing else behind.
    assert not [n for n in remote.names() if "ckptstore-" in n]

    # save_model of a weights file, and load_weights, on the same backend.
    handle = ckptstore.keras.save_model(
        model, remote.url + "/final.weights.h5", storage_options=remote.storage_options
    )
    assert handle.wait(timeout=120).name == "final.weights.h5" and handle.committed
    fresh = small_model(seed=1)
    load_weights(fresh, remote.url + "/final.weights.h5", storage_options=remote.storage_options)
    np.testing.assert_array_equal(predictions(fresh), predictions(model))


def test_save_model_with_overwrite_false_asks_before_replacing_a_stored_file(monkeypatch):
    remote = memory_remote()
    url = remote.url + "/model.keras"
    first, second = small_model(seed=1), small_model(seed=2)
    ckptstore.keras.save_model(first, url).wait()
    kept = remote.read("model.keras.manifest.json")
    asked = []

    def answer(reply):
        monkeypatch.setattr("builtins.input", lambda prompt: asked.append(prompt) or reply)

    answer("n")  # Keras's own prompt, as keras.saving.save_model asks it
    assert ckptstore.keras.save_model(second, url, overwrite=False) is None
    assert url in asked[-1] and remote.read("model.keras.manifest.json") == kept
    answer("y")
    ckptstore.keras.save_model(second, url, overwrite=False).wait()
    np.testing.assert_array_equal(predictions(ckptstore.keras.load_model(url)), predictions(second))
    asked.clear()
    ckptstore.keras.save_model(first, remote.url + "/other.keras", overwrite=False).wait()
    assert asked == [], "asked about a file that is not there"


# --- save_best_only across restarts ------------------------------------------------------


def test_save_best_only_survives_a_restart(tmp_path):
    remote = file_remote(tmp_path)
    url = remote.url + "/best.keras"

    first = small_model(seed=1)
    fit_with_scores(
        first,
        ckptstore.keras.ModelCheckpoint(url, "score", mode="min", save_best_only=True),
        [0.5, 0.3, 0.4],
    )
    meta = manifest(remote, "best.keras")["metadata"]
    assert (meta["best"], meta["epoch"], meta["mode"]) == (0.3, 2, "min")
    kept = remote.read("best.keras.manifest.json")
    best_predictions = predictions(ckptstore.keras.load_model(url))

    # A new process would start here: a new model and a new callback on the same URL.
    # Its first epoch (0.35) is worse than the committed best (0.3): Keras's own callback
    # would save it, forgetting the 0.3; this one does not.
    worse = small_model(seed=2)
    fit_with_scores(
        worse,
        ckptstore.keras.ModelCheckpoint(url, "score", mode="min", save_best_only=True),
        [0.35, 0.6],
    )
    assert remote.read("best.keras.manifest.json") == kept
    np.testing.assert_array_equal(predictions(ckptstore.keras.load_model(url)), best_predictions)

    # A run that beats it replaces it, at the epoch that beat it.
    better = small_model(seed=3)
    fit_with_scores(
        better,
        ckptstore.keras.ModelCheckpoint(url, "score", mode="min", save_best_only=True),
        [0.45, 0.2],
    )
    meta = manifest(remote, "best.keras")["metadata"]
    assert (meta["best"], meta["epoch"]) == (0.2, 2)
    np.testing.assert_array_equal(predictions(ckptstore.keras.load_model(url)), predictions(better))


def test_restored_best_is_the_bar_with_the_stricter_threshold_and_the_same_mode():
    remote = memory_remote()
    url = remote.url + "/best.keras"

    def fit(scores, mode, threshold=None):
        checkpoint = ckptstore.keras.ModelCheckpoint(
            url, "score", mode=mode, save_best_only=True, initial_value_threshold=threshold
        )
        fit_with_scores(small_model(), checkpoint, scores)

    fit([0.7], "max")
    kept = remote.read("best.keras.manifest.json")
    fit([0.6], "max", threshold=0.5)  # the committed 0.7 is the stricter bar: 0.6 is worse
    assert remote.read("best.keras.manifest.json") == kept
    fit([0.75], "max", threshold=0.8)  # the threshold is the stricter bar: 0.75 is worse
    assert remote.read("best.keras.manifest.json") == kept
    # A run that minimises the score does not take the maximum's record as its bar.
    fit([0.9], "min")
    meta = manifest(remote, "best.keras")["metadata"]
    assert (meta["best"], meta["mode"]) == (0.9, "min")


def test_save_best_only_with_fields_resumes_from_the_best_committed_file(tmp_path):
    remote = file_remote(tmp_path)
    pattern = remote.url + "/best-{epoch:02d}-{score:.2f}.keras"

    def run(scores, seed):
        checkpoint = ckptstore.keras.ModelCheckpoint(
            pattern, "score", mode="min", save_best_only=True
        )
        fit_with_scores(small_model(seed), checkpoint, scores)

    run([0.5, 0.3], seed=1)
    assert sorted(remote.manifests()) == ["best-01-0.50.keras", "best-02-0.30.keras"]
    # Restarted: nothing better than 0.30, so no new "best" file appears.
    run([0.4, 0.35], seed=2)
    assert sorted(remote.manifests()) == ["best-01-0.50.keras", "best-02-0.30.keras"]
    run([0.25], seed=3)
    assert sorted(remote.manifests()) == [
        "best-01-0.25.keras",
        "best-01-0.50.keras",
        "best-02-0.30.keras",
    ]


def test_fields_in_the_directory_start_from_no_best_and_say_so(caplog):
    remote = memory_remote()
    checkpoint = ckptstore.keras.ModelCheckpoint(
        remote.url + "/run-{epoch}/best.keras", "score", mode="min", save_best_only=True
    )
    with caplog.at_level("WARNING", logger="ckptstore"):
        fit_with_scores(small_model(), checkpoint, [0.5])
    assert any("format fields in its directory" in r.getMessage() for r in caplog.records)
    assert remote.fs.exists(remote.path("run-1/best.keras.manifest.json"))


def test_save_best_only_with_an_integer_save_freq(tmp_path):
    # Keras 3.15's own callback fails at its second batch-level save (no monitor_op yet).
    remote = memory_remote()
    checkpoint = ckptstore.keras.ModelCheckpoint(
        remote.url + "/best.keras", monitor="loss", save_best_only=True, save_freq=2
    )
    small_model().fit(X, Y, batch_size=8, epochs=1, verbose=0, callbacks=[checkpoint])
    meta = manifest(remote, "best.keras")["metadata"]
    assert meta["batch"] in (2, 4, 6, 8) and meta["mode"] == "min"
    assert meta["best"] == pytest.approx(checkpoint.best)


def test_a_waiting_upload_is_superseded_by_a_newer_save_of_the_same_file(
    s3_server, tmp_path, caplog
):
    direct = s3_remote(s3_server)
    # 200 kB/s: each ~20 kB save takes a tenth of a second, a batch a few milliseconds.
    with FaultProxy("127.0.0.1", s3_server.port, bandwidth_bytes_per_s=200_000) as proxy:
        options = s3_server.storage_options(proxy.endpoint_url)
        checkpoint = ckptstore.keras.ModelCheckpoint(
            direct.url + "/latest.keras", monitor="loss", save_freq=1, storage_options=options
        )
        caplog.set_level("INFO", logger="ckptstore")
        small_model().fit(X, Y, batch_size=2, epochs=1, verbose=0, callbacks=[checkpoint])
    dropped = [r for r in caplog.records if "Not uploading an older save of" in r.getMessage()]
    assert dropped, "every save went up: the link was not the bottleneck"
    # The newest save always went up last: the committed file is the last batch's.
    assert manifest(direct, "latest.keras")["metadata"]["batch"] == 32


# --- overwriting under SIGKILL -------------------------------------------------------------


def test_overwriting_best_keras_survives_sigkill_at_any_moment(s3_server, tmp_path):
    """A process saving best.keras over and over is killed at seeded random moments and at
    chosen steps of the overwrite; after every kill the URL loads, old model or new, intact."""
    direct = s3_remote(s3_server)
    url = direct.url + "/best.keras"
    children: list[subprocess.Popen] = []
    sent: list[tuple[float, str, str]] = []  # (time, method, object) the current child sent
    kills: list[float] = []
    plan: dict = {"point": None}

    def kill_current() -> None:
        kills.append(time.monotonic())
        os.kill(children[-1].pid, signal.SIGKILL)

    def watch(method, target, headers, body) -> bool:
        obj = posixpath.basename(urllib.parse.unquote(target.partition("?")[0]))
        copy = any(k.lower() == "x-amz-copy-source" for k, _ in headers)
        sent.append((time.monotonic(), method, obj + (" (copy)" if copy else "")))
        point = plan["point"]
        if point == "mid-upload" and method == "PUT" and obj == SIDE and not copy:
            plan["point"] = None
            threading.Timer(0.3, kill_current).start()  # the body is still streaming
        elif (point == "copy" and method == "PUT" and obj == "best.keras" and copy) or (
            point == "delete-side" and method == "DELETE" and obj == SIDE
        ):
            plan["point"] = None
            kill_current()
            proxy.inject_next("reset")  # and the request never reaches the server
            return True
        return False

    proxy = FaultProxy(
        "127.0.0.1", s3_server.port, bandwidth_bytes_per_s=1_000_000, body_filter=watch
    ).start()
    options = json.dumps(s3_server.storage_options(proxy.endpoint_url))

    def spawn(first: int) -> subprocess.Popen:
        with open(tmp_path / f"child-{first}.log", "w") as log:
            child = subprocess.Popen(
                [sys.executable, CHILD, url, options, str(first), str(tmp_path / "stage")],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        return child

    model = build()
    ckptstore.keras.save_model(
        versioned_model(model, 1), url, storage_options=direct.storage_options
    ).wait()
    current = 1
    rng = random.Random(13)
    points = [("random", rng.uniform(0.5, 6.0)) for _ in range(4)]
    points += [("mid-upload", None), ("copy", None), ("delete-side", None)]
    landed = []
    warm = spawn(100)
    try:
        for i, (point, delay) in enumerate(points):
            child, first = warm, 100 * (i + 1)
            log = tmp_path / f"child-{first}.log"
            assert child.stdout.readline() == "ready\n", log.read_text()[-3000:]
            children.append(child)
            sent.clear()
            plan["point"] = None if point == "random" else point
            started = time.monotonic()
            child.stdin.write("go\n")
            child.stdin.flush()
            warm = spawn(100 * (i + 2))  # imports TensorFlow while this one runs
            if delay is not None:
                time.sleep(delay)
                kill_current()
            assert child.wait(timeout=60) == -signal.SIGKILL, (point, log.read_text()[-3000:])
            promised = [
                int(line.split()[1]) for line in child.stdout if line.startswith("committed")
            ]
            old = promised[-1] if promised else current
            new = old + 1 if promised else first
            last = [f"{m} {o}" for t, m, o in sent if t <= kills[-1]][-1:]
            landed.append((point, round(kills[-1] - started, 2), last))

            loaded = version_of(
                ckptstore.keras.load_model(url, storage_options=direct.storage_options)
            )
            assert loaded in (old, new), (point, loaded, old, new, landed[-1])
            committed = manifest(direct, "best.keras")
            if point == "mid-upload":  # the side copy was not committed: the old model stays
                assert last == [f"PUT {SIDE}"], landed[-1]
                assert loaded == old and committed["files"][0]["name"] == "best.keras"
            elif point == "copy":  # the new one is committed under the side name
                assert loaded == new and committed["files"][0]["name"] == SIDE
            elif point == "delete-side":  # committed in place; the side copy is left over
                assert loaded == new and committed["files"][0]["name"] == "best.keras"
                assert {SIDE, PENDING} <= set(direct.names())
            current = loaded
    finally:
        for child in [*children, warm]:
            if child.poll() is None:
                child.kill()
                child.wait()
        proxy.stop()

    # The next save cleans what the last kill left (the side copy and the marker).
    handle = ckptstore.keras.save_model(
        versioned_model(model, 9999), url, storage_options=direct.storage_options
    )
    handle.wait(timeout=60)
    assert sorted(direct.names()) == ["best.keras", "best.keras.manifest.json"]
    assert (
        version_of(ckptstore.keras.load_model(url, storage_options=direct.storage_options)) == 9999
    )


def test_a_load_racing_an_overwrite_loads_the_new_copy(s3_server, tmp_path):
    """A reader that read the old manifest and then finds new bytes (an evaluator loading
    best.keras while training saves it again) tries again with the new manifest."""
    direct = s3_remote(s3_server)
    url = direct.url + "/best.keras"
    model = build()
    ckptstore.keras.save_model(
        versioned_model(model, 1), url, storage_options=direct.storage_options
    ).wait()
    overwritten = []

    def overwrite_before_the_download(method, target, headers, body) -> bool:
        path = urllib.parse.unquote(target.partition("?")[0])
        if method == "GET" and path.endswith("/best.keras") and not overwritten:
            # The reader has the old manifest and is about to read the file: save version 2.
            handle = ckptstore.keras.save_model(
                versioned_model(build(), 2), url, storage_options=direct.storage_options
            )
            overwritten.append(handle.wait(timeout=60))
        return False

    with FaultProxy(
        "127.0.0.1", s3_server.port, body_filter=overwrite_before_the_download
    ) as proxy:
        loaded = ckptstore.keras.load_model(
            url, storage_options=s3_server.storage_options(proxy.endpoint_url)
        )
    assert overwritten, "the reader never downloaded the file"
    assert version_of(loaded) == 2


# --- bad input ---------------------------------------------------------------------------------


def test_a_tampered_keras_file_is_never_loaded(s3_server):
    remote = s3_remote(s3_server)
    url = remote.url + "/model.keras"
    ckptstore.keras.save_model(small_model(), url, storage_options=remote.storage_options).wait()
    good = remote.read("model.keras")

    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0xFF  # same size, one byte changed
    remote.write("model.keras", bytes(damaged))
    with pytest.raises(ckptstore.RestoreError) as error:
        ckptstore.keras.load_model(url, storage_options=remote.storage_options)
    message = str(error.value)
    assert url.rsplit("/", 1)[0] in message and "does not match its manifest" in message
    assert "nothing was loaded" in message

    remote.write("model.keras", good[:-10])  # truncated
    with pytest.raises(ckptstore.RestoreError, match="does not match its manifest"):
        ckptstore.keras.load_model(url, storage_options=remote.storage_options)

    remote.write("model.keras", good)
    remote.write("model.keras.manifest.json", b'{"format": "something else"}')
    with pytest.raises(ckptstore.RestoreError, match=r"manifest is not valid.*Save the model"):
        ckptstore.keras.load_model(url, storage_options=remote.storage_options)


def test_a_url_with_nothing_committed_says_why(tmp_path):
    remote = file_remote(tmp_path)
    with pytest.raises(ckptstore.RestoreError, match=r"nothing is stored there.*Check the URL"):
        ckptstore.keras.load_model(remote.url + "/missing.keras")

    # A file Keras wrote there itself: ckptstore cannot vouch for its bytes.
    os.makedirs(remote.root, exist_ok=True)
    small_model().save(os.path.join(remote.root, "plain.keras"))
    with pytest.raises(ckptstore.RestoreError) as error:
        ckptstore.keras.load_model(remote.url + "/plain.keras")
    assert "files ckptstore did not write" in str(error.value)
    assert "keras.saving.load_model" in str(error.value)

    # An upload killed before its commit leaves its marker: the message says so.
    remote.write("half.keras.ckptstore-pending.json", b'{"format": "ckptstore.pending"}')
    remote.write("half.keras", b"partial")
    with pytest.raises(ckptstore.RestoreError, match="interrupted"):
        ckptstore.keras.load_model(remote.url + "/half.keras")


def test_a_remote_that_refuses_the_read_is_an_error_naming_the_url(s3_server):
    remote = s3_remote(s3_server)
    url = remote.url + "/model.keras"
    ckptstore.keras.save_model(small_model(), url, storage_options=remote.storage_options).wait()
    forbidding = FaultProxy(
        "127.0.0.1", s3_server.port, failure_rate=1.0, modes=("5xx",), error_status=403
    )
    with forbidding as proxy, pytest.raises(ckptstore.RemoteUnavailableError) as error:
        ckptstore.keras.load_model(
            url, storage_options=s3_server.storage_options(proxy.endpoint_url)
        )
    assert url in str(error.value) and "Nothing was loaded" in str(error.value)


def test_a_filepath_without_a_keras_extension_is_refused_with_the_fix():
    model = small_model()
    secret = "s3://AKIAEXAMPLE:topsecretvalue@bucket/run/model"
    with pytest.raises(ckptstore.ConfigurationError) as error:
        ckptstore.keras.save_model(model, secret)
    message = str(error.value)
    assert "s3://***@bucket/run/model" in message and "s3://***@bucket/run/model.keras" in message
    assert "topsecretvalue" not in message and "AKIAEXAMPLE" not in message

    with pytest.raises(ckptstore.ConfigurationError, match=r"e\.g\. s3://b/run/m\.keras"):
        ckptstore.keras.ModelCheckpoint("s3://b/run/m.pt")
    with pytest.raises(ckptstore.ConfigurationError, match=r"e\.g\. s3://b/run/m\.weights\.h5"):
        ckptstore.keras.ModelCheckpoint("s3://b/run/m.keras", save_weights_only=True)
    with pytest.raises(ckptstore.ConfigurationError, match="save_weights_only=True"):
        ckptstore.keras.ModelCheckpoint("s3://b/run/m.weights.h5")
    with pytest.raises(ckptstore.ConfigurationError, match="not a valid format string"):
        ckptstore.keras.ModelCheckpoint("s3://b/run/m-{epoch.keras")
    with pytest.raises(ckptstore.ConfigurationError, match="mistyped URL"):
        ckptstore.keras.ModelCheckpoint("s3:/b/run/m.keras")
    with pytest.raises(ckptstore.ConfigurationError, match="no Keras file extension"):
        ckptstore.keras.load_model("gs://b/run/model")
    with pytest.raises(ckptstore.ConfigurationError, match="one object"):
        ckptstore.keras.save_model(model, "memory://b/run/m.keras", zipped=False)


def test_a_field_naming_a_metric_that_is_not_logged_is_a_clear_error():
    remote = memory_remote()
    pattern = remote.url + "/m-{epoch:02d}-{val_accuracy:.2f}.keras"
    checkpoint = ckptstore.keras.ModelCheckpoint(pattern, monitor="loss")
    with pytest.raises(FormatFieldError) as error:
        small_model().fit(X, Y, epochs=1, verbose=0, callbacks=[checkpoint])
    message = str(error.value)
    assert "{val_accuracy}" in message and pattern in message
    assert "epoch, loss" in message and "validation data" in message
    assert isinstance(error.value, KeyError)  # what Keras raises
    assert remote.names() == []


def test_on_train_end_raises_what_failed_and_training_ran_to_the_end(s3_server, tmp_path):
    url = f"s3://no-such-bucket-{os.getpid()}/run/model-{{epoch}}.keras"
    checkpoint = ckptstore.keras.ModelCheckpoint(
        url, storage_options=s3_server.storage_options(), staging_dir=tmp_path / "stage"
    )
    epochs = []
    counter = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: epochs.append(epoch))
    with pytest.raises(ckptstore.UploadError) as error:
        small_model().fit(
            X, Y, validation_split=0.25, epochs=2, verbose=0, callbacks=[counter, checkpoint]
        )
    assert epochs == [0, 1], "a failed upload stopped training"
    message = str(error.value)
    assert "2 of 2 save(s) were not committed" in message
    assert f"s3://no-such-bucket-{os.getpid()}/run/model-1.keras" in message
    assert "does not exist" in message
    assert sorted(error.value.failures) == [url.format(epoch=1), url.format(epoch=2)]
    # The local copies stay, to save again from.
    assert len(os.listdir(tmp_path / "stage")) == 2
