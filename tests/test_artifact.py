"""Artifacts: one manifest format and one upload/verify/commit path for every kind.

The manifest of a SavedModel or a Keras file is untrusted input like a
checkpoint's (paths that could escape are refused), version 1 manifests stay
readable, and checkpoints are still written as version 1. The publisher's
commit protocol is broken on purpose at every remote operation: whatever step
fails, the URL holds one committed, intact copy (old or new), and the next
save cleans what the failed one left.
"""

from __future__ import annotations

import json
import os

import pytest

from ckptstore import artifact, publisher, restore, targets
from ckptstore import manifest as mf
from ckptstore.errors import ManifestError, RestoreError, UploadError
from ckptstore.manifest import Manifest
from ckptstore.retry import RetryPolicy
from faultfs import faulty_file_protocol


def doc(kind: str, name: str, files: list[str], version: int = 2) -> bytes:
    return json.dumps(
        {
            "format": "ckptstore.manifest",
            "format_version": version,
            "kind": kind,
            "checkpoint": name,
            "number": None,
            "step": None,
            "timestamp": 1.0,
            "files": [{"name": f, "size": 1, "crc32c": "00000000"} for f in files],
            "metadata": {"monitor": "val_loss", "best": 0.25},
        }
    ).encode()


def test_a_saved_model_manifest_holds_nested_paths_and_metadata():
    files = ["saved_model.pb", "variables/variables.index", "assets/vocab/words.txt"]
    m = Manifest.from_json(doc(mf.SAVED_MODEL, "saved_model", files))
    assert m.kind == mf.SAVED_MODEL
    assert [e.name for e in m.files] == files
    assert m.metadata == {"monitor": "val_loss", "best": 0.25}
    assert Manifest.from_json(m.to_json()) == m


@pytest.mark.parametrize(
    "path",
    [
        "../outside",
        "variables/../../outside",
        "/etc/passwd",
        "variables//variables.index",
        "variables/./variables.index",
        "variables\\variables.index",
        "C:variables.index",
        "variables/",
        "assets/a\x00b",
        "assets/line\nbreak",
        "/".join(["d"] * (mf.MAX_PATH_DEPTH + 1)),
        "saved_model.manifest.json",
    ],
)
def test_paths_that_could_escape_an_export_directory_are_refused(path):
    with pytest.raises(ManifestError, match="escapes or does not belong"):
        Manifest.from_json(doc(mf.SAVED_MODEL, "saved_model", ["saved_model.pb", path]))


@pytest.mark.parametrize(
    "stored", ["other.keras", "sub/best.keras", "best.keras.bak", "../best.keras"]
)
def test_a_keras_manifest_names_only_its_own_file_or_its_side_copy(stored):
    with pytest.raises(ManifestError):
        Manifest.from_json(doc(mf.KERAS, "best.keras", [stored]))
    for ok in ("best.keras", "best.keras" + mf.KERAS_NEXT_SUFFIX):
        assert Manifest.from_json(doc(mf.KERAS, "best.keras", [ok])).files[0].name == ok


def test_a_keras_manifest_lists_exactly_one_file():
    with pytest.raises(ManifestError, match="2 files for one Keras file"):
        Manifest.from_json(
            doc(mf.KERAS, "best.keras", ["best.keras", "best.keras" + mf.KERAS_NEXT_SUFFIX])
        )


def test_an_unknown_kind_or_version_says_to_upgrade():
    with pytest.raises(ManifestError, match="Upgrade ckptstore"):
        Manifest.from_json(doc("onnx", "model.onnx", ["model.onnx"]))
    with pytest.raises(ManifestError, match="Upgrade ckptstore"):
        Manifest.from_json(doc(mf.KERAS, "a.keras", ["a.keras"], version=3))


def test_version_1_manifests_stay_loadable_and_checkpoints_are_still_written_as_version_1(
    tmp_path,
):
    # Byte for byte what ckptstore 0.1.0 wrote (format_version 1, no kind, no metadata).
    v1 = json.dumps(
        {
            "checkpoint": "ckpt-3",
            "files": [{"crc32c": "0a0b0c0d", "name": "ckpt-3.index", "size": 10}],
            "format": "ckptstore.manifest",
            "format_version": 1,
            "number": 3,
            "step": None,
            "timestamp": 5.0,
            "versions": {"ckptstore": "0.1.0"},
            "writer": {"host": "h", "pid": 1, "session": "s"},
        },
        indent=1,
        sort_keys=True,
    ).encode()
    m = Manifest.from_json(v1, expected_checkpoint="ckpt-3")
    assert (m.kind, m.metadata, m.number) == (mf.CHECKPOINT, {}, 3)
    assert m.to_json() == v1  # an older ckptstore reads what this one writes for checkpoints
    (tmp_path / "ckpt-1.index").write_bytes(b"i")
    (tmp_path / "ckpt-1.data-00000-of-00001").write_bytes(b"d")
    written = json.loads(
        mf.describe(str(tmp_path), "ckpt-1", number=1, step=1, timestamp=1.0).to_json()
    )
    assert written["format_version"] == 1 and "kind" not in written


def test_a_version_1_manifest_cannot_smuggle_a_kind():
    data = json.loads(doc(mf.SAVED_MODEL, "saved_model", ["sub/x"], version=1))
    with pytest.raises(ManifestError, match="escapes or does not belong"):
        Manifest.from_json(json.dumps(data).encode())  # read as a checkpoint: "sub/x" is refused


def test_tree_files_refuses_symbolic_links(tmp_path):
    (tmp_path / "variables").mkdir()
    (tmp_path / "variables" / "variables.index").write_bytes(b"x")
    assert mf.tree_files(str(tmp_path)) == ["variables/variables.index"]
    os.symlink("/etc/hostname", tmp_path / "saved_model.pb")
    with pytest.raises(ManifestError, match="symbolic link"):
        mf.tree_files(str(tmp_path))


def test_a_saved_model_goes_up_with_saved_model_pb_last_and_is_deleted_with_it_first():
    files = ["assets/a", "saved_model.pb", "variables/variables.index", "fingerprint.pb"]
    m = Manifest.from_json(doc(mf.SAVED_MODEL, "saved_model", files))
    groups = [[e.name for e in g] for g in artifact.upload_groups(m)]
    assert groups == [
        ["assets/a", "variables/variables.index", "fingerprint.pb"],
        ["saved_model.pb"],
    ]
    assert artifact.delete_order(m)[0] == "saved_model.pb"


# --- the publisher's commit protocol, broken at every step -----------------------------------


def _publish(remote, redactor, tmp_path, content: bytes, tag: str) -> publisher.PublishHandle:
    local = tmp_path / f"local-{tag}"
    local.mkdir()
    (local / "best.keras").write_bytes(content)
    job = publisher.PublishJob(
        remote,
        redactor,
        "best.keras",
        mf.KERAS,
        str(local),
        ["best.keras"],
        retry=RetryPolicy(attempts=1),
    )
    return publisher.submit(job)


def _committed_bytes(remote, redactor, tmp_path, tag: str) -> bytes:
    out = tmp_path / f"fetched-{tag}"
    out.mkdir()
    m = restore.fetch_artifact(remote, "best.keras", str(out), RetryPolicy(), redactor)
    assert m is not None, "nothing committed"
    return (out / "best.keras").read_bytes()


MUTATIONS = ("put", "open-wb", "mv", "rm", "cp")


def test_overwriting_a_keras_file_leaves_one_intact_committed_copy_whatever_step_fails(tmp_path):
    old, new = b"old model" * 1000, b"new model" * 1200
    with faulty_file_protocol() as faults:
        # Count the remote writes of a clean overwrite, then fail each one in turn.
        base = tmp_path / "count"
        remote, redactor, _ = targets.open_file(f"file://{base}/best.keras", None)
        _publish(remote, redactor, tmp_path, old, "count-0").wait()
        seen: list[tuple[str, str]] = []

        def record(op: str, path: str) -> bool:
            if op in MUTATIONS and str(base) in path:
                seen.append((op, path))
            return False

        faults.fail_when = record
        _publish(remote, redactor, tmp_path, new, "count-1").wait()
        steps = len(seen)
        assert steps >= 6, seen  # marker, side upload, side commit, copy, commit, cleanups
        faults.fail_when = None

        for k in range(steps):
            root = tmp_path / f"run-{k}"
            remote, redactor, _ = targets.open_file(f"file://{root}/best.keras", None)
            _publish(remote, redactor, tmp_path, old, f"{k}-old").wait()
            count = [0]

            def nth(op: str, path: str, k=k, root=root, count=count) -> bool:
                if op not in MUTATIONS or str(root) not in path:
                    return False
                count[0] += 1
                if count[0] != k + 1:
                    return False
                if op in ("put", "cp"):
                    # The write got half-way when the process died: the object is torn.
                    with open(path, "wb") as torn:
                        torn.write(b"torn")
                return True

            faults.fail_when = nth
            with pytest.raises(UploadError, match=r"best\.keras was not committed"):
                _publish(remote, redactor, tmp_path, new, f"{k}-new").wait()
            faults.fail_when = None
            assert _committed_bytes(remote, redactor, tmp_path, f"{k}-a") in (old, new), k
            # The next save finishes the job and leaves nothing of the failed one behind.
            _publish(remote, redactor, tmp_path, b"third" * 999, f"{k}-third").wait()
            assert _committed_bytes(remote, redactor, tmp_path, f"{k}-b") == b"third" * 999
            assert sorted(os.listdir(root)) == ["best.keras", "best.keras.manifest.json"], k


def test_a_killed_upload_is_named_as_interrupted_and_cleaned_by_the_next_save(tmp_path):
    with faulty_file_protocol() as faults:
        remote, redactor = targets.open_dir(f"file://{tmp_path}/export", None)
        local = tmp_path / "local"
        (local / "variables").mkdir(parents=True)
        for name in ("saved_model.pb", "variables/variables.index"):
            (local / name).write_bytes(name.encode())
        files = mf.tree_files(str(local))

        def job() -> publisher.PublishJob:
            return publisher.PublishJob(
                remote,
                redactor,
                "saved_model",
                mf.SAVED_MODEL,
                str(local),
                files,
                remove_local=False,
                retry=RetryPolicy(attempts=1),
            )

        faults.fail_when = lambda op, path: op == "put" and path.endswith("saved_model.pb")
        with pytest.raises(UploadError):
            publisher.submit(job()).wait()
        faults.fail_when = None
        found = remote.list_tree()
        assert "variables/variables.index" in found and "saved_model.pb" not in found
        assert "interrupted" in restore.why_not_committed(remote, "saved_model", found)
        assert (
            restore.fetch_artifact(
                remote, "saved_model", str(tmp_path / "out"), RetryPolicy(), redactor
            )
            is None
        )
        publisher.submit(job()).wait()
        assert remote.list_tree() == [
            "saved_model.manifest.json",
            "saved_model.pb",
            "variables/variables.index",
        ]


def test_a_tampered_artifact_is_refused(tmp_path):
    remote, redactor, _ = targets.open_file(f"file://{tmp_path}/r/best.keras", None)
    _publish(remote, redactor, tmp_path, b"model bytes" * 100, "t").wait()
    (tmp_path / "r" / "best.keras").write_bytes(b"model bytez" * 100)
    with pytest.raises(RestoreError, match="does not match its manifest"):
        restore.fetch_artifact(remote, "best.keras", str(tmp_path / "o"), RetryPolicy(), redactor)
    assert not (tmp_path / "o" / "best.keras").exists()
