"""What the S3 client puts on the wire for a data file: each body with the CRC32C S3 checks.

PutObject and UploadPart requests of staged files are signed with
``UNSIGNED-PAYLOAD`` (no SHA-256 of the body: a second full hash of every byte)
because S3 verifies the ``x-amz-checksum-crc32c`` they carry. These tests watch
the requests the real client sends (botocore's ``before-send`` event, after
signing) and fail if a body goes out without that checksum, with one that does
not match it, or signed after all; and they check that a file changed after its
manifest was made is never completed, by either path of the multipart upload.
"""

from __future__ import annotations

import base64
import hashlib
import os
import urllib.parse
from pathlib import Path

import crc32c
import pytest

import ckptstore
from ckptstore import crc_marks
from ckptstore.backends import resolve
from ckptstore.manifest import hash_file
from conftest import s3_remote

MiB = 1024 * 1024
UNSIGNED = "UNSIGNED-PAYLOAD"


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Wire:
    """The requests an S3 client sends, as signed and about to go out.

    Handed to s3fs as its botocore session (``storage_options["session"]``):
    every client made from it reports each request it sends here.
    """

    def __init__(self) -> None:
        from aiobotocore.session import AioSession

        self.requests: list[dict] = []
        self.session = AioSession()
        self.session.register("before-send.s3", self._record)

    def _record(self, request, **kwargs) -> None:
        headers = {k.lower(): _text(v) for k, v in request.headers.items()}
        url = urllib.parse.urlsplit(request.url)
        body = request.body
        if hasattr(body, "read"):  # a streamed file body: read it as aiohttp will, rewound
            position = body.tell()
            data = body.read()
            body.seek(position)
        else:
            data = body or b""
        self.requests.append(
            {
                "method": request.method,
                "path": urllib.parse.unquote(url.path),
                "query": urllib.parse.parse_qs(url.query, keep_blank_values=True),
                "headers": headers,
                "crc32c": base64.b64encode(crc32c.crc32c(data).to_bytes(4, "big")).decode(),
                "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data),
            }
        )

    def uploads_of(self, key: str) -> list[dict]:
        """PUTs of ``key``'s bytes: the PutObject, or every UploadPart."""
        return [r for r in self.requests if r["method"] == "PUT" and r["path"].endswith(key)]


def _backend(s3_server, wire: Wire, **options):
    spec = s3_remote(s3_server)
    options = {**spec.storage_options, "session": wire.session, **options}
    backend, root = resolve(spec.url, {**options, "skip_instance_cache": True})
    return spec, backend, root


def _staged(tmp_path, name: str, size: int) -> str:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return str(path)


def _assert_checksummed_and_unsigned(sent: list[dict], parts: int) -> None:
    assert len(sent) == parts, [(r["path"], r["query"]) for r in sent]
    for r in sent:
        h = r["headers"]
        where = f"{r['path']} {r['query']}"
        assert h.get("x-amz-checksum-crc32c") == r["crc32c"], f"{where}: body without its CRC32C"
        assert h.get("x-amz-content-sha256") == UNSIGNED, f"{where}: payload signed"
        assert int(h["content-length"]) == r["size"]
    if parts > 1:
        assert sorted(int(r["query"]["partNumber"][0]) for r in sent) == list(range(1, parts + 1))


@pytest.mark.parametrize(
    "size, part_size, parts",
    [
        (1000, 8 * MiB, 1),  # one PutObject
        (20 * MiB + 17, 8 * MiB, 3),  # parts whose CRC32Cs come from the describe pass
        (12 * MiB, 5 * MiB + 4096, 3),  # parts hashed by a reader pass first (not whole MiB)
    ],
)
def test_every_data_upload_carries_the_crc32c_s3_checks_and_is_not_signed(
    s3_server, tmp_path, size, part_size, parts
):
    wire = Wire()
    spec, backend, root = _backend(s3_server, wire)
    backend.part_size = part_size
    local = _staged(tmp_path, "ckpt-1.data-00000-of-00001", size)
    entry = hash_file(local)
    backend.upload(local, f"{root}/{entry.name}", entry)

    _assert_checksummed_and_unsigned(wire.uploads_of(entry.name), parts)
    # No request without the checksum went unsigned (the lease, manifests, completion...).
    for r in wire.requests:
        if r["headers"].get("x-amz-content-sha256") == UNSIGNED:
            assert r["headers"].get("x-amz-checksum-crc32c") == r["crc32c"], r["path"]
    assert backend.verify(f"{root}/{entry.name}", entry) is None
    assert spec.fs.cat_file(f"{root}/{entry.name}") == Path(local).read_bytes()


def test_a_whole_checkpoint_goes_up_checksummed_and_unsigned(s3_server, tmp_path):
    """Through CheckpointManager: every byte of every file of a checkpoint, part by part."""
    from test_cloud_faults import SHAPES
    from training import TrainState

    spec, wire = s3_remote(s3_server), Wire()
    options = {**spec.storage_options, "session": wire.session, "skip_instance_cache": True}
    state = TrainState(SHAPES)
    with ckptstore.CheckpointManager(
        state.checkpoint,
        spec.url,
        max_to_keep=1,
        staging_dir=str(tmp_path / "s"),
        storage_options=options,
        upload_part_size=5 * MiB,
    ) as m:
        state.advance_to(1)
        m.save()
        m.sync()
    staged = {}
    for name in spec.names():
        if name.startswith("ckpt-1.") and not name.endswith(".manifest.json"):
            staged[name] = spec.read(name)
    assert any(len(data) > 5 * MiB for data in staged.values()), "no multipart file"
    for name, data in staged.items():
        sent = wire.uploads_of(name)
        _assert_checksummed_and_unsigned(sent, max(1, -(-len(data) // (5 * MiB))))


def test_an_explicit_choice_to_sign_payloads_is_kept(s3_server, tmp_path):
    wire = Wire()
    _, backend, root = _backend(
        s3_server, wire, config_kwargs={"s3": {"payload_signing_enabled": True}}
    )
    for name, size in (("small.index", 1000), ("big.data-00000-of-00001", 12 * MiB)):
        local = _staged(tmp_path, name, size)
        entry = hash_file(local)
        backend.upload(local, f"{root}/{name}", entry)
        sent = wire.uploads_of(name)
        assert sent
        for r in sent:
            assert r["headers"]["x-amz-content-sha256"] == r["sha256"]
            assert r["headers"]["x-amz-checksum-crc32c"] == r["crc32c"]


def _rewrite_same_size(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(6 * MiB + 5)
        byte = f.read(1)
        f.seek(6 * MiB + 5)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_file_changed_after_it_was_hashed_is_not_completed(s3_server, tmp_path):
    """Changed where its stat shows it: the parts are hashed again, and differ."""
    spec, backend, root = _backend(s3_server, Wire())
    local = _staged(tmp_path, "ckpt-1.data-00000-of-00001", 20 * MiB)
    entry = hash_file(local)
    _rewrite_same_size(local)
    path = f"{root}/{entry.name}"
    with pytest.raises(ckptstore.VerificationError, match="changed after it was hashed"):
        backend.upload(local, path, entry)
    assert not spec.fs.exists(path), "a multipart upload of changed bytes was completed"


def test_a_change_the_stat_does_not_show_is_caught_from_the_bytes_sent(
    s3_server, tmp_path, monkeypatch
):
    """Rewritten within one timestamp tick: the describe pass's part CRC32Cs are used, and
    the bytes sent do not match them. S3 refuses such a part itself; moto stores whatever
    CRC32C it is told, so this is ckptstore's own check."""
    monkeypatch.setattr(crc_marks, "_key", lambda st: (st.st_dev, st.st_ino, st.st_size))
    wire = Wire()
    spec, backend, root = _backend(s3_server, wire)
    local = _staged(tmp_path, "ckpt-1.data-00000-of-00001", 20 * MiB)
    entry = hash_file(local)
    assert crc_marks.part_crcs(local, entry.crc32c, backend.part_size_for(20 * MiB)) is not None
    _rewrite_same_size(local)
    path = f"{root}/{entry.name}"
    with pytest.raises(ckptstore.VerificationError, match="changed after it was hashed"):
        backend.upload(local, path, entry)
    assert not spec.fs.exists(path), "a multipart upload of changed bytes was completed"
    # The part that changed went out with the CRC32C of what the manifest describes.
    mismatched = [
        r
        for r in wire.uploads_of(entry.name)
        if r["headers"]["x-amz-checksum-crc32c"] != r["crc32c"]
    ]
    assert [r["query"]["partNumber"] for r in mismatched] == [["1"]]


@pytest.mark.parametrize("size", [5 * MiB, 5 * MiB + 1, 16 * MiB, 16 * MiB + 12345])
@pytest.mark.parametrize("part_size", [5 * MiB, 8 * MiB])
def test_part_crc32cs_from_the_describe_pass_match_the_parts(tmp_path, size, part_size):
    local = _staged(tmp_path, "f", size)
    entry = hash_file(local)
    data = Path(local).read_bytes()
    expected = [
        (
            offset,
            len(data[offset : offset + part_size]),
            crc32c.crc32c(data[offset : offset + part_size]),
        )
        for offset in range(0, size, part_size)
    ]
    assert crc_marks.part_crcs(local, entry.crc32c, part_size) == expected
    assert crc_marks.part_crcs(local, "00000000", part_size) is None  # another manifest value
    assert crc_marks.part_crcs(local, entry.crc32c, part_size + 1) is None  # not whole MiB
    os.utime(local, ns=(1, 1))  # its stat changed: no marks
    assert crc_marks.part_crcs(local, entry.crc32c, part_size) is None


@pytest.mark.parametrize(
    "size, chosen, expected",
    [
        (1000, None, 8 * MiB),  # small files: one PUT up to 8 MiB
        (20 * MiB, None, 8 * MiB),  # at least 8 MiB a part
        (72 * MiB, None, 9 * MiB),  # eight parts, each a whole number of MiB
        (268 * 10**6, None, 32 * MiB),  # at most 32 MiB a part: parts go 4 at a time
        (2 * 1024 * MiB, None, 32 * MiB),
        (512 * 1024 * MiB, None, 53 * MiB),  # S3 takes at most 10,000 parts
        (20 * MiB, 5 * MiB, 5 * MiB),  # the user's choice is kept
        (20 * MiB, 1024, 5 * MiB),  # ... but never below S3's minimum
        (20 * MiB, 0, 5 * MiB),  # ... even when it is 0 (a choice, not "choose for me")
        (100 * 1024 * MiB, 8 * MiB, 11 * MiB),  # ... nor into more than 10,000 parts
    ],
)
def test_part_size_grows_with_the_file_within_s3s_limits(s3_server, size, chosen, expected):
    """Each part is a request with its own CPU cost (about 0.35 s less CPU per GB with 32 MiB
    parts than with 8 MiB, benchmarks/upload_cpu.py), so large files go in larger parts; S3
    refuses part 10,001 and parts under 5 MiB (but the last)."""
    _, backend, _ = _backend(s3_server, Wire())
    if chosen is not None:
        backend.part_size = chosen
    part = backend.part_size_for(size)
    assert part == expected
    assert part % crc_marks.GRAIN == 0 or part == chosen  # the describe pass's marks apply
    assert -(-size // part) <= 10_000


def test_a_large_file_goes_in_the_parts_its_size_calls_for(s3_server, tmp_path):
    wire = Wire()
    _spec, backend, root = _backend(s3_server, wire)
    local = _staged(tmp_path, "ckpt-1.data-00000-of-00001", 72 * MiB - 3)
    entry = hash_file(local, "ckpt-1.data-00000-of-00001")
    backend.upload(local, f"{root}/ckpt-1.data-00000-of-00001", entry)
    sent = wire.uploads_of("ckpt-1.data-00000-of-00001")
    _assert_checksummed_and_unsigned(sent, 8)  # 72 MiB: eight parts of 9 MiB (the last short)
    assert sorted(r["size"] for r in sent) == [9 * MiB - 3] + [9 * MiB] * 7
    assert backend.verify(f"{root}/ckpt-1.data-00000-of-00001", entry) is None
