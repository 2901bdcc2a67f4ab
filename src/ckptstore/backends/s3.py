"""Amazon S3 and S3-compatible stores (``s3://``, s3fs).

What fsspec does not say about S3:

* **Checksums.** S3 keeps a CRC32C only when the upload asks for one, and s3fs's
  ``info()`` does not return it; ``head_object(ChecksumMode="ENABLED")`` does.
  Every upload here sends the CRC32C it computed from the staged bytes, so S3
  itself rejects a corrupted body, and verification compares S3's record.
* **Multipart.** s3fs's ``put_file`` cannot carry CRC32C through a multipart
  upload (its parts go out with botocore's default CRC32 and real S3 then
  refuses to complete; s3fs issue #672), so large files are uploaded here as
  a multipart of our own: each part with its CRC32C, and the upload created
  with ``ChecksumType="FULL_OBJECT"``, so S3 checks and keeps the CRC32C of the
  *whole object* (the manifest's value, also sent with the completion). Any
  process can then verify it from the manifest alone. S3's default for a
  multipart upload, and what ckptstore 0.1.0 got, is a *composite* checksum
  ("CRC32C of the part CRC32Cs", ``-N`` suffix) that only the uploading process
  can predict; such an object is verified elsewhere by reading it back. A store
  that refuses the full-object type gets a composite upload, verified by the
  uploader against its own prediction. This is the one piece written by hand
  because no library does it.
* **Memory, and one read per file.** Parts are not held in memory: the part
  uploaders send each part straight from the staged file (a seekable slice,
  which botocore can rewind for a retry). Each part's CRC32C must be in its
  request headers before its body goes out; the describe step that hashed the
  file for the manifest left the running CRC32C at every MiB
  (:mod:`ckptstore.crc_marks`), from which each part's follows without reading
  the file again. Where those marks are missing (the file was not hashed by
  this process, or its stat changed since, or the part size is not whole MiB),
  one reader hashes the parts in a streaming pass first, as before. Either
  way the uploaders hash the bytes they send as they read them, and an upload
  whose bytes differ from the manifest is abandoned before it is completed.
  Memory per part in flight is a read buffer, whatever ``upload_part_size`` is.
* **Payload signing.** SigV4 can put the SHA-256 of the body into the
  signature; botocore does so over plain HTTP always, and over HTTPS for our
  requests too (it skips it only where it computed the checksum itself). That
  is a second full hash of every byte, in Python-called C, and awscrt calling
  back into Python per 4 KiB to read the body. PutObject and UploadPart
  requests that carry ``x-amz-checksum-crc32c`` are signed with
  ``UNSIGNED-PAYLOAD`` instead, over HTTP and HTTPS (S3 accepts it on both):
  the checksum header itself is signed, and S3 computes the CRC32C of the body
  it received and refuses the request (``BadDigest``) when it differs, so
  corruption anywhere between the staged file and S3's disk is still caught.
  What the SHA-256 adds, over plain HTTP only, is protection against someone on
  the network path replacing a body with another of the same CRC32C (easy to
  forge: CRC32C is not a cryptographic hash). Where that matters, use HTTPS, or
  ``storage_options={"config_kwargs": {"s3": {"payload_signing_enabled": True}}}``:
  an explicit choice there is always kept. Other requests (the lease, the
  manifest) are signed as botocore decides.
* **Errors.** s3fs turns a 503 into ``OSError(EBUSY)`` and a 500 into
  ``OSError(EIO)``; those, timeouts and connection errors are retried.
* **Conditional writes** (the writer's lease) are S3's own: ``PutObject`` with
  ``If-None-Match: *`` creates, with ``If-Match: <ETag>`` replaces, and S3
  answers 412 when the object is not in that state (404 for ``If-Match`` on a
  missing key, 409 ``ConditionalRequestConflict`` for two conditional writes at
  once). The ETag of a ``PutObject`` is the body's MD5 (unless KMS-encrypted:
  then it is opaque), so a token can repeat only when the content does, which
  lease records never do.

URLs: ``s3://bucket/prefix``. Credentials: ``storage_options={"key": ..., "secret": ...,
"token": ...}`` or ``{"profile": "name"}``, else boto's chain (``AWS_ACCESS_KEY_ID``/
``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, instance metadata). Other endpoints (MinIO, R2,
a local server): ``{"client_kwargs": {"endpoint_url": "http://..."}}``.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import copy
import errno
import logging
import os
import queue
import threading
from typing import Any

import crc32c
from fsspec.asyn import sync

from ckptstore import crc_marks
from ckptstore.backends.base import READ_BACK, SERVICE_CHECKSUM, Backend, Check
from ckptstore.backends.file_part import FilePart
from ckptstore.errors import VerificationError
from ckptstore.manifest import FileEntry

log = logging.getLogger("ckptstore")

MIN_PART = 5 * 1024 * 1024  # S3's minimum for every part but the last
MAX_PARTS = 10_000  # S3's maximum number of parts of one upload
#: When the user sets no part size: a file goes in about AUTO_PARTS parts of between
#: AUTO_MIN_PART and AUTO_MAX_PART. Each part is a request whose signing, headers and
#: bookkeeping cost CPU in the training's process (32 MiB parts take about 0.35 s less
#: CPU per GB than 8 MiB ones, benchmarks/upload_cpu.py); 8 parts keep the 4 senders
#: busy to the end of a file, and 32 MiB at most keeps a retried part cheap on a slow link.
AUTO_PARTS = 8
AUTO_MIN_PART = 8 * 1024 * 1024
AUTO_MAX_PART = 32 * 1024 * 1024
_HASH_CHUNK = 1024 * 1024
_RETRYABLE_ERRNOS = {errno.EBUSY, errno.EAGAIN, errno.EIO, errno.ETIMEDOUT, errno.ECONNRESET}
#: S3's answers to a conditional PutObject whose condition does not hold (409: another
#: conditional write to the key was in progress; it may win).
_LOST_RACE_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})
#: what an S3-compatible store that does not know ``ChecksumType`` may answer to it
_NO_FULL_OBJECT_CODES = frozenset(
    {"InvalidArgument", "InvalidRequest", "NotImplemented", "XNotImplemented", "InvalidChecksum"}
)


def crc_b64(value: int) -> str:
    return base64.b64encode(value.to_bytes(4, "big")).decode()


#: the requests that may go with UNSIGNED-PAYLOAD when they carry a CRC32C S3 checks
_CHECKSUMMED_UPLOADS = frozenset({"PutObject", "UploadPart"})
_CRC32C_HEADER = "x-amz-checksum-crc32c"
_UNSIGNED_HANDLER_ID = "ckptstore-unsigned-payload-with-crc32c"


def _unsigned_payload_with_crc32c(request: Any, operation_name: str = "", **kwargs: Any) -> None:
    """botocore ``before-sign``: ``UNSIGNED-PAYLOAD`` for an upload that carries its CRC32C.

    S3 checks the (signed) ``x-amz-checksum-crc32c`` header against the body it
    received, so the SHA-256 of the body in the signature would only hash every
    byte again (see the module docstring for what it adds over plain HTTP).
    botocore's S3 signers take the explicit ``s3={"payload_signing_enabled": ...}``
    of the client config before anything else, over HTTP and HTTPS alike; this
    request's signer reads that config from the request context, so this request
    gets a copy that says ``False``. The client's own config is not touched, and
    a value the user set there is kept.
    """
    if operation_name not in _CHECKSUMMED_UPLOADS or _CRC32C_HEADER not in request.headers:
        return
    config = request.context.get("client_config")
    if config is None:
        return
    s3 = dict(getattr(config, "s3", None) or {})
    if s3.get("payload_signing_enabled") is not None:
        return  # the user's explicit choice (or this handler's, on a retry)
    s3["payload_signing_enabled"] = False
    config = copy.copy(config)
    config.s3 = s3
    request.context["client_config"] = config


def _s3_error_code(exc: BaseException) -> str | None:
    """S3's error code behind an exception s3fs translated (it keeps the ClientError as cause)."""
    import botocore.exceptions as bexc

    cause = exc if isinstance(exc, bexc.ClientError) else exc.__cause__
    if isinstance(cause, bexc.ClientError):
        return cause.response.get("Error", {}).get("Code")
    return None


def _whole_mib(n: int) -> int:
    """``n`` rounded up to whole MiB: the grain of the describe pass's CRC marks."""
    return -(-n // crc_marks.GRAIN) * crc_marks.GRAIN


class S3Backend(Backend):
    transient_errors = (ConnectionError, TimeoutError, asyncio.TimeoutError)
    conditional_writes = "atomic"
    needs_parent_dirs = False  # flat keys
    #: ``None``: chosen per file by :meth:`part_size_for`
    default_part_size = None

    service_name = "S3"
    #: multipart uploads ask S3 for a full-object CRC32C (cleared where a store refuses it)
    full_object_checksums = True

    def __init__(self, fs: Any):
        super().__init__(fs)
        #: remote path -> the composite CRC32C ("<base64>-<parts>") this process's multipart
        #: upload would get where the store kept a composite instead of a full-object one
        self._composite: dict[str, str] = {}

    def is_transient(self, exc: BaseException) -> bool:
        if super().is_transient(exc):
            return True
        import aiohttp
        import botocore.exceptions as bexc

        if isinstance(exc, (aiohttp.ClientError, bexc.HTTPClientError, bexc.ConnectionError)):
            return True
        return (type(exc) is OSError and exc.errno in _RETRYABLE_ERRNOS) or (
            isinstance(exc, bexc.ClientError)
            and exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500
        )

    def make_dirs(self, path: str) -> None:
        """S3 has no directories; the bucket must exist (creating one is not ours to do)."""
        bucket = self.fs.split_path(path)[0]
        if not self.fs.exists(bucket):
            raise FileNotFoundError(
                f"Bucket {bucket!r} does not exist or is not visible with these credentials; "
                "create it first (aws s3 mb s3://" + bucket + ")"
            )

    def read_versioned(self, path: str) -> tuple[bytes, str] | None:
        bucket, key, _ = self.fs.split_path(path)
        try:  # one GET: the bytes and the ETag describe the same object
            return sync(self.fs.loop, self._get_versioned, bucket, key)
        except FileNotFoundError:
            return None

    async def _get_versioned(self, bucket: str, key: str) -> tuple[bytes, str]:
        reply = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
        async with reply["Body"] as body:
            return await body.read(), reply["ETag"]

    def write_if(self, path: str, data: bytes, expected: str | None) -> str:
        bucket, key, _ = self.fs.split_path(path)
        condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
        try:
            reply = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
        except OSError as exc:  # s3fs's translation of 412, 409 and 404
            code = _s3_error_code(exc)
            if code in _LOST_RACE_CODES or (code == "NoSuchKey" and expected is not None):
                return self._refused(path, data)
            raise
        finally:
            self.fs.invalidate_cache(path)
        return reply["ETag"]

    def part_size_for(self, size: int) -> int:
        """Bytes per part for a file of ``size`` bytes; a file up to this size goes in one PUT.

        The user's ``upload_part_size`` if set, else about :data:`AUTO_PARTS` parts of
        8 to 32 MiB; either way at least S3's 5 MiB and few enough for S3's 10,000 parts.
        Without a user's choice: 20 MB -> 8 MiB (3 parts), 72 MiB -> 9 MiB (8 parts),
        268 MB -> 32 MiB (8 parts), 2 GiB -> 32 MiB (64 parts), 512 GiB -> 53 MiB.
        """
        if self.part_size is not None:
            part = max(MIN_PART, self.part_size)
        else:
            part = min(max(_whole_mib(-(-size // AUTO_PARTS)), AUTO_MIN_PART), AUTO_MAX_PART)
        if -(-size // part) > MAX_PARTS:
            part = _whole_mib(-(-size // MAX_PARTS))
        return part

    def upload(
        self, local_path: str, remote_path: str, entry: FileEntry, callback: Any = None
    ) -> None:
        bucket, key, _ = self.fs.split_path(remote_path)
        size = os.path.getsize(local_path)
        part = self.part_size_for(size)
        if callback is not None:
            callback.set_size(size)
        if size <= part:
            # The manifest's CRC, not one computed from this body: S3 then refuses any
            # body that differs from what the manifest vouches for.
            value = crc_b64(int(entry.crc32c, 16))
            with FilePart(local_path, 0, size) as body:  # streamed, like a part
                self._call_checksummed(
                    "put_object",
                    Bucket=bucket,
                    Key=key,
                    Body=body,
                    ContentLength=size,
                    ChecksumAlgorithm="CRC32C",
                    ChecksumCRC32C=value,
                )
            self._composite.pop(remote_path, None)
            if callback is not None:
                callback.relative_update(size)
        else:  # reports progress part by part
            self._composite[remote_path] = self._multipart(
                local_path, bucket, key, part, entry, callback
            )

    def _call_checksummed(self, method: str, **kwargs: Any) -> Any:
        """``call_s3`` for a PutObject/UploadPart that carries its CRC32C: sent unsigned."""
        return sync(self.fs.loop, self._call_checksummed_async, method, kwargs)

    async def _call_checksummed_async(self, method: str, kwargs: dict[str, Any]) -> Any:
        await self.fs.set_session()
        client = await self.fs.get_s3(kwargs.get("Bucket"))
        # On the client s3fs is using now (it makes a new one after a dropped session);
        # a second registration under the same id is a no-op.
        client.meta.events.register(
            "before-sign.s3", _unsigned_payload_with_crc32c, unique_id=_UNSIGNED_HANDLER_ID
        )
        return await self.fs._call_s3(method, **kwargs)

    def _multipart(
        self,
        local_path: str,
        bucket: str,
        key: str,
        part_size: int,
        entry: FileEntry,
        callback: Any = None,
    ) -> str:
        full_object = self.full_object_checksums
        try:
            mpu = self.fs.call_s3(
                "create_multipart_upload",
                Bucket=bucket,
                Key=key,
                ChecksumAlgorithm="CRC32C",
                **({"ChecksumType": "FULL_OBJECT"} if full_object else {}),
            )
        except Exception as exc:
            if not full_object or _s3_error_code(exc) not in _NO_FULL_OBJECT_CODES:
                raise
            log.info(
                "This S3 endpoint refused full-object checksums (%s); multipart uploads keep a "
                "composite CRC32C, which later verifiers check by reading the object back",
                _s3_error_code(exc),
            )
            self.full_object_checksums = full_object = False
            mpu = self.fs.call_s3(
                "create_multipart_upload", Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32C"
            )
        upload_id = mpu["UploadId"]
        parts: dict[int, dict[str, Any]] = {}
        crcs: dict[int, int] = {}  # part number -> CRC32C announced in its headers
        sent: dict[int, tuple[int, int]] = {}  # part number -> (length, CRC32C of bytes sent)
        errors: list[BaseException] = []
        work: queue.Queue = queue.Queue(maxsize=1)

        def changed(detail: str) -> VerificationError:
            return VerificationError(
                f"{entry.name} changed after it was hashed ({detail}); the upload is abandoned"
            )

        def send() -> None:
            while (item := work.get()) is not None:
                number, offset, length, value = item
                if errors:
                    continue
                try:
                    with FilePart(local_path, offset, length, track_crc32c=True) as body:
                        r = self._call_checksummed(
                            "upload_part",
                            Bucket=bucket,
                            Key=key,
                            UploadId=upload_id,
                            PartNumber=number,
                            Body=body,
                            ContentLength=length,
                            ChecksumAlgorithm="CRC32C",
                            ChecksumCRC32C=crc_b64(value),
                        )
                        got = body.crc32c_read
                        if got is None:  # not read through in order (never seen): hash it
                            body.seek(0)
                            while body.read(_HASH_CHUNK):
                                pass
                            got = body.crc32c_read
                    # S3 refuses a part whose body does not match its CRC32C; a store
                    # that only records the value (moto) does not, so check here too.
                    if got != value:
                        raise changed(f"part {number}: crc32c {got:08x} sent, {value:08x} hashed")
                    sent[number] = (length, got)
                    parts[number] = {
                        "PartNumber": number,
                        "ETag": r["ETag"],
                        "ChecksumCRC32C": crc_b64(value),
                    }
                    if callback is not None:
                        callback.relative_update(length)
                except BaseException as exc:
                    errors.append(exc)

        senders = [  # in the caller's context: the requests are its (ckptstore.ioloop)
            threading.Thread(target=contextvars.copy_context().run, args=(send,), daemon=True)
            for _ in range(self.concurrency)
        ]
        for t in senders:
            t.start()
        try:
            marked = crc_marks.part_crcs(local_path, entry.crc32c, part_size)
            todo = (
                enumerate(marked, 1)
                if marked is not None
                else self._hash_parts(local_path, part_size)
            )
            for number, (offset, length, value) in todo:
                if errors:
                    break
                crcs[number] = value
                work.put((number, offset, length, value))
        finally:
            for _ in senders:
                work.put(None)
            for t in senders:
                t.join()
        if not errors:
            # The object S3 would assemble, from what was sent: the manifest's CRC32C,
            # or the file changed (or was cut short) after the manifest was made.
            whole, size = 0, 0
            for number in sorted(sent):
                length, value = sent[number]
                whole, size = crc_marks.combine(whole, value, length), size + length
            if f"{whole:08x}" != entry.crc32c or size != entry.size:
                errors.append(
                    changed(f"crc32c {whole:08x} of {size} bytes, manifest {entry.crc32c}")
                )
        if errors:
            self._abort(bucket, key, upload_id)
            raise errors[0]
        # With a full-object checksum, S3 checks the assembled object against the manifest's
        # CRC32C before it completes (the same value: ``whole`` matched it above).
        whole_object = (
            {"ChecksumType": "FULL_OBJECT", "ChecksumCRC32C": crc_b64(int(entry.crc32c, 16))}
            if full_object
            else {}
        )
        try:
            self.fs.call_s3(
                "complete_multipart_upload",
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": [parts[n] for n in sorted(parts)]},
                **whole_object,
            )
        except BaseException:
            self._abort(bucket, key, upload_id)
            raise
        joined = b"".join(crcs[n].to_bytes(4, "big") for n in sorted(crcs))
        return f"{crc_b64(crc32c.crc32c(joined))}-{len(crcs)}"

    @staticmethod
    def _hash_parts(local_path: str, part_size: int) -> Any:
        """``(number, (offset, length, crc32c))`` of each part, hashed in one streaming pass
        (for a file without :mod:`ckptstore.crc_marks`)."""
        buffer = memoryview(bytearray(_HASH_CHUNK))  # reused: no allocation per chunk
        with open(local_path, "rb", buffering=0) as f:
            number, offset = 1, 0
            while True:
                value, length = 0, 0
                while length < part_size and (
                    n := f.readinto(buffer[: min(_HASH_CHUNK, part_size - length)])
                ):
                    value = crc32c.crc32c(buffer[:n], value)
                    length += n
                if not length:
                    return
                yield number, (offset, length, value)
                number, offset = number + 1, offset + length

    def _abort(self, bucket: str, key: str, upload_id: str) -> None:
        try:  # leave no billable parts behind
            self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
        except Exception as exc:
            log.info("Could not abort multipart upload of %s: %s", key, type(exc).__name__)

    def _check(self, path: str, entry: FileEntry) -> Check:
        bucket, key, _ = self.fs.split_path(path)
        head = self.fs.call_s3("head_object", Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        size = head.get("ContentLength")
        if size != entry.size:
            return Check(
                f"{entry.name}: stored size {size} != manifest size {entry.size}",
                SERVICE_CHECKSUM,
                "stored size",
            )
        stored = head.get("ChecksumCRC32C")
        if not stored:
            return Check(
                self._verify_by_reading_back(path, entry),
                READ_BACK,
                "S3 keeps no CRC32C for this object",
            )
        # A multipart object's checksum is of the whole object only when it was uploaded
        # with ChecksumType=FULL_OBJECT. Otherwise it is composite, and HEAD may report it
        # with or without its "-N" (moto omits it, and ChecksumType): the ETag of a
        # multipart object ends in "-N" too.
        kind = head.get("ChecksumType")
        multipart = "-" in stored or "-" in str(head.get("ETag", ""))
        if kind == "FULL_OBJECT" or (kind is None and not multipart):
            expected = crc_b64(int(entry.crc32c, 16))
            if stored.split("-")[0] != expected:
                return Check(
                    f"{entry.name}: S3 reports CRC32C {stored}, expected {expected}",
                    SERVICE_CHECKSUM,
                    "S3 CRC32C",
                )
            self._composite.pop(path, None)
            return Check(None, SERVICE_CHECKSUM, "S3 CRC32C")
        predicted = self._composite.get(path)
        if predicted is not None:  # this process uploaded it: it knows the part CRC32Cs
            if stored.split("-")[0] != predicted.split("-")[0]:
                return Check(
                    f"{entry.name}: S3 reports CRC32C {stored}, expected {predicted}",
                    SERVICE_CHECKSUM,
                    "S3 composite CRC32C",
                )
            self._composite.pop(path, None)  # kept until now: a retried verify needs it too
            return Check(None, SERVICE_CHECKSUM, "S3 composite CRC32C")
        return Check(
            self._verify_by_reading_back(path, entry),
            READ_BACK,
            "S3 keeps a composite CRC32C for this multipart object (uploaded without a "
            "full-object checksum, e.g. by ckptstore 0.1.0), which the manifest cannot predict",
        )

    def remove_empty_dir(self, path: str) -> bool:
        return False  # flat keys: no directory to remove
