"""A manifest is untrusted input: everything unsafe or malformed is rejected, clearly."""

from __future__ import annotations

import json

import crc32c
import pytest

from ckptstore.errors import ManifestError
from ckptstore.manifest import (
    MAX_FILE_SIZE,
    FileEntry,
    Manifest,
    checkpoint_of_data_file,
    checkpoint_of_manifest,
    describe,
    hash_file,
)


def good_doc(**changes) -> dict:
    doc = {
        "format": "ckptstore.manifest",
        "format_version": 1,
        "checkpoint": "ckpt-3",
        "number": 3,
        "step": 300,
        "timestamp": 1700000000.5,
        "files": [
            {"name": "ckpt-3.index", "size": 10, "crc32c": "0a0b0c0d"},
            {"name": "ckpt-3.data-00000-of-00001", "size": 99, "crc32c": "ffffffff"},
        ],
        "writer": {"host": "h", "pid": 1, "session": "s"},
        "versions": {"ckptstore": "0.1.0"},
    }
    doc.update(changes)
    return doc


def parse(doc) -> Manifest:
    return Manifest.from_json(json.dumps(doc).encode(), expected_checkpoint="ckpt-3")


def with_file(**entry) -> dict:
    base = {"name": "ckpt-3.index", "size": 10, "crc32c": "0a0b0c0d"}
    base.update(entry)
    return good_doc(files=[base])


def test_a_valid_manifest_round_trips():
    m = parse(good_doc())
    assert m.total_bytes == 109
    assert Manifest.from_json(m.to_json()) == m


@pytest.mark.parametrize(
    "name",
    [
        "../ckpt-3.index",
        "ckpt-3.index/../../../etc/passwd",
        "/abs/ckpt-3.index",
        "sub/ckpt-3.index",
        "ckpt-3.index\\..\\x",
        "C:ckpt-3.index",
        "..",
        "ckpt-30.index",
        "",
    ],
)
def test_names_that_escape_or_do_not_belong_are_rejected(name):
    with pytest.raises(ManifestError, match="escapes or does not belong"):
        parse(with_file(name=name))


@pytest.mark.parametrize("size", [-1, MAX_FILE_SIZE + 1, 1.5, "10", None, True])
def test_absurd_or_non_integer_sizes_are_rejected(size):
    with pytest.raises(ManifestError, match="impossible size"):
        parse(with_file(size=size))


@pytest.mark.parametrize(
    "data, message",
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "not a ckptstore manifest"),
        (json.dumps(good_doc(format="other")).encode(), "not a ckptstore manifest"),
        (json.dumps(good_doc(format_version=99)).encode(), "Upgrade ckptstore"),
        (json.dumps(good_doc(files=[])).encode(), "lists 0 files"),
        (json.dumps(good_doc(checkpoint="ckpt-4")).encode(), "describes 'ckpt-4'"),
        (json.dumps(good_doc(checkpoint="../x")).encode(), "not a plain file prefix"),
        (json.dumps(good_doc(timestamp="yesterday")).encode(), "timestamp"),
        (json.dumps(good_doc(number="3")).encode(), "non-integer 'number'"),
        (b" " * (9 * 1024 * 1024), "over the"),
    ],
)
def test_malformed_manifests_are_rejected_with_the_reason(data, message):
    with pytest.raises(ManifestError, match=message):
        Manifest.from_json(data, expected_checkpoint="ckpt-3")


@pytest.mark.parametrize("crc", ["xyz", "123", "0a0b0c0d0e", None, 12345678])
def test_bad_checksums_are_rejected(crc):
    with pytest.raises(ManifestError, match="crc32c"):
        parse(with_file(crc32c=crc))


def test_duplicate_file_entries_are_rejected():
    doc = good_doc()
    doc["files"].append(dict(doc["files"][0]))
    with pytest.raises(ManifestError, match="twice"):
        parse(doc)


def test_hash_file_matches_crc32c_and_md5(tmp_path):
    path = tmp_path / "ckpt-1.index"
    data = bytes(range(256)) * 40000  # ~10 MB: crosses the 8 MiB read-chunk boundary
    path.write_bytes(data)
    entry = hash_file(str(path), with_md5=True)
    import hashlib

    assert entry == FileEntry(
        "ckpt-1.index", len(data), f"{crc32c.crc32c(data):08x}", hashlib.md5(data).hexdigest()
    )


def test_describe_lists_exactly_the_checkpoint_files(tmp_path):
    for name in [
        "ckpt-1.index",
        "ckpt-1.data-00000-of-00001",
        "ckpt-10.index",
        "ckpt-1.manifest.json",
    ]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "ckpt-1_temp").mkdir()
    m = describe(str(tmp_path), "ckpt-1", number=1, step=None, timestamp=1.0)
    assert [f.name for f in m.files] == ["ckpt-1.data-00000-of-00001", "ckpt-1.index"]


def test_describe_refuses_an_incomplete_checkpoint(tmp_path):
    (tmp_path / "ckpt-1.data-00000-of-00001").write_bytes(b"x")
    with pytest.raises(ManifestError, match=r"no \.index"):
        describe(str(tmp_path), "ckpt-1", number=1, step=None, timestamp=1.0)


def test_names_map_back_to_their_checkpoint():
    assert checkpoint_of_manifest("ckpt-7.manifest.json") == "ckpt-7"
    assert checkpoint_of_manifest("ckpt-7.index") is None
    assert checkpoint_of_data_file("ckpt-7.index") == "ckpt-7"
    assert checkpoint_of_data_file("my.model-7.data-00001-of-00002") == "my.model-7"
    assert checkpoint_of_data_file("checkpoint") is None
