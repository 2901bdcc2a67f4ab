"""Google Drive (``gdrive://``, pydrive2's fsspec filesystem).

URLs are ``gdrive://`` followed by a pydrive2 path: ``gdrive://root/ckpts/run-7``
is *My Drive/ckpts/run-7*; ``gdrive://<folder id>/run-7`` starts from a folder
(one shared with a service account, or in a shared drive);
``gdrive://appDataFolder/run-7`` is the app's hidden folder. Folders below the
first component are created on the first upload. ``storage_options`` go to
``pydrive2.fs.GDriveFileSystem`` unchanged: ``google_auth`` (a ready
``GoogleAuth``), ``client_id``/``client_secret``, ``client_json`` or
``client_json_file_path`` with ``use_service_account=True``, ``trash_only``...

fsspec's own registry maps ``gdrive`` to another package (gdrive_fsspec); this
module builds pydrive2's class directly, so ``fsspec.filesystem("gdrive")``
keeps meaning what it means for everyone else.

What Drive does differently from an object store, and what this module does:

* **A title is not a key.** A folder may hold several files with one title,
  and pydrive2's upload always creates a new file, so "overwriting" a path
  leaves two and a later read picks either. Every write here therefore ends
  with exactly one file under its title: data and manifests are uploaded as new
  files and every other file of that title is deleted afterwards; the state
  file, rewritten at every commit, is updated in place (one file id, a new
  revision, switched atomically by Drive). Verification fails unless the title
  is unambiguous, and a download picks the copy whose MD5 matches the manifest.
* **The service checksum is MD5** (``md5Checksum``); Drive keeps no CRC32C.
  Manifests on Drive carry both, and verification compares Drive's MD5 with
  the manifest's without reading the file back.
* **Rate limits.** pydrive2 retries ``403 userRateLimitExceeded`` and 5xx
  itself but not ``429``; :meth:`DriveBackend.is_transient` makes ckptstore's
  own backoff cover 429, 408, rate-limit 403s and dropped connections.
* **Trash.** pydrive2 ignores trashed files in every read. Its deletes trash by
  default, and trashed files keep counting against the Drive quota for 30 days;
  that is left as pydrive2 has it (``storage_options={"trash_only": False}``
  deletes for good), and the README says so.
* **Conditional writes** (the writer's lease). Drive v2 honours ``If-Match:
  <etag>`` on ``files.update`` and answers 412 when the file changed since (its
  etag changes with every change to content or metadata, trashing included).
  So a replace is atomic, on the file id the version token names. Drive has no
  "create only if absent": a creator inserts its file, waits
  :attr:`DriveBackend.settle_seconds`, lists the title, and the file created
  first (``createdDate``, then the smaller id) wins; every other creator deletes
  its own file and loses. Readers take that same file. What remains: Drive does
  not promise that a listing shows a file created moments ago; if one shows up
  later than ``settle_seconds``, or two creations are stamped out of order, two
  creators can both win, and a reader during the race may read a loser's file
  (its next write then fails, as the loser's delete changes the etag).
* **Memory.** pydrive2's ``open("wb")``/``pipe_file`` buffer a whole file; data
  files are sent with ``upload_fobj`` on the open staged file, which streams it.
  Downloads ask for :data:`DOWNLOAD_CHUNK` bytes per request instead of
  googleapiclient's 100 MiB, which httplib2 would hold in memory whole.

pydrive2's filesystem has no public call for "the files with this title, with
their ids", so :meth:`DriveBackend._items` uses its private path-to-folder-id
resolution (``_path_to_item_ids``, with its cache and shared-drive handling) and
listing (``_gdrive_list``, with its retries); :meth:`DriveBackend.remove_empty_dir` also
drops a deleted folder from that cache (``_ids_cache``). The conformance tests run these
against pydrive2's real client, so a change there shows up as a failing test.
"""

from __future__ import annotations

import http.client
import io
import posixpath
import time
from collections.abc import Iterable, Mapping
from typing import Any

from ckptstore.backends.base import READ_BACK, SERVICE_CHECKSUM, Backend, Check, mtime_of
from ckptstore.errors import ConfigurationError
from ckptstore.manifest import FileEntry
from ckptstore.redaction import redact_url

FOLDER_MIME = "application/vnd.google-apps.folder"
#: Bytes per ranged GET on download: httplib2 keeps each response body in memory.
DOWNLOAD_CHUNK = 16 * 1024 * 1024
_RATE_LIMIT_REASONS = frozenset({"userRateLimitExceeded", "rateLimitExceeded"})
_CREDENTIAL_HELP = (
    "pass storage_options with one of: google_auth=<an authenticated "
    "pydrive2.auth.GoogleAuth>; client_id= and client_secret= (OAuth, opens a browser "
    "once); client_json_file_path= (or client_json=) with use_service_account=True. "
    "See the README's Google Drive section."
)


def split_drive_url(url: str) -> tuple[str, str]:
    """``gdrive://root/ckpts/run-7`` -> (``"root"``, ``"root/ckpts/run-7"``).

    The first component is where pydrive2 starts (``root``, ``appDataFolder`` or
    a folder id); the second value is the checkpoint directory's pydrive2 path.

    >>> split_drive_url("gdrive://1AbCdEf/run-7/")
    ('1AbCdEf', '1AbCdEf/run-7')
    """
    path = url.split("://", 1)[1] if "://" in url else url
    path = "/".join(p for p in path.split("/") if p)
    return path.split("/", 1)[0], path


def _first_created(items: Iterable[Any]) -> Any:
    """Among files of one title, the one a create race leaves standing (and readers read)."""
    return min(items, key=lambda item: (item.get("createdDate", ""), item["id"]))


def _token(item: Any) -> str:
    """A version token names the file and its etag: If-Match then applies to that file."""
    return f"{item['id']} {item['etag']}"


class DriveBackend(Backend):
    needs_md5 = True
    transient_errors = (ConnectionError, TimeoutError, http.client.HTTPException)
    conditional_writes = "settled"
    #: How long a creator waits before listing rivals (longer than a listing lags behind).
    settle_seconds = 2.0

    @classmethod
    def connect(
        cls, url: str, protocol: str, storage_options: Mapping[str, Any]
    ) -> tuple[DriveBackend, str]:
        from pydrive2.fs import GDriveFileSystem
        from pydrive2.fs.spec import GDriveAuthError

        shown = redact_url(url)
        start, root = split_drive_url(url)
        if not start:
            raise ConfigurationError(
                f"{shown!r} names no folder: gdrive:// needs one, e.g. gdrive://root/ckpts/run-7 "
                "(My Drive/ckpts/run-7) or gdrive://<folder id>/run-7"
            )
        try:
            fs = GDriveFileSystem(start, **dict(storage_options))
        except ValueError as exc:  # pydrive2: "Specify credentials using one of these methods"
            raise ConfigurationError(
                f"No credentials for {shown!r} ({exc}). For gdrive://, {_CREDENTIAL_HELP}"
            ) from None
        except GDriveAuthError as exc:
            cause = exc.__cause__
            detail = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
            raise ConfigurationError(
                f"Google Drive authentication failed for {shown!r} ({detail}). Check the "
                f"credentials in storage_options; {_CREDENTIAL_HELP}"
            ) from None
        if start not in ("root", "appDataFolder"):
            _check_start_folder(fs, start, shown)
        return cls(fs), root

    @property
    def protocol(self) -> str:
        return "gdrive"  # pydrive2's class leaves fsspec's placeholder "abstract"

    # --- what Drive's errors mean ------------------------------------------------

    def is_transient(self, exc: BaseException) -> bool:
        if super().is_transient(exc):
            return True
        status, reason = _http_status(exc)
        if status is not None:
            if status in (408, 429) or 500 <= status < 600:
                return True
            return status == 403 and reason in _RATE_LIMIT_REASONS
        import httplib2

        return isinstance(exc, httplib2.HttpLib2Error) and not isinstance(
            exc, httplib2.RedirectLimit
        )

    # --- titles, not keys ------------------------------------------------------------

    def _items(self, path: str, *, fresh: bool = False) -> list[dict[str, Any]]:
        """Every non-trashed file titled like ``path`` in its folder (oldest id first).

        ``fresh``: look the folder up again rather than in pydrive2's cache, so
        that copies of it that other processes created at the same moment count.
        """
        return [i for i in self._titled(path, fresh=fresh) if i.get("mimeType") != FOLDER_MIME]

    def _titled(self, path: str, *, fresh: bool = False) -> list[dict[str, Any]]:
        """Every non-trashed item, file or folder, titled like ``path`` (oldest id first)."""
        _, base = self.fs.split_path(path)
        parent, title = posixpath.split(base)
        parent_ids = self.fs._path_to_item_ids(parent, use_cache=not fresh)
        if not parent_ids:
            return []
        in_parents = " or ".join(f"'{pid}' in parents" for pid in parent_ids)
        escaped = title.replace("\\", "\\\\").replace("'", "\\'")
        query = f"trashed=false and ({in_parents}) and title='{escaped}'"
        # Drive compares titles case-insensitively in queries; keep exact matches only.
        found = [item for item in self.fs._gdrive_list(query) if item["title"] == title]
        return sorted(found, key=lambda item: item["id"])

    def _delete(self, item_id: str) -> None:
        from pydrive2.files import ApiRequestError

        try:
            self.fs._gdrive_delete_file(item_id)  # trashes or deletes, as trash_only says
        except ApiRequestError as exc:
            if exc.error.get("code") != 404:  # already gone: what we wanted
                raise

    def _keep_only(self, path: str, keep_id: str) -> None:
        for item in self._items(path):
            if item["id"] != keep_id:
                self._delete(item["id"])

    def remove(self, path: str) -> None:
        for item in self._items(path):
            self._delete(item["id"])

    def remove_empty_dir(self, path: str) -> bool:
        # pydrive2's filesystem has no rmdir (fsspec's default does nothing), so a retired
        # SavedModel left its folders in the user's Drive. A folder is an item like a file:
        # delete it (to the trash, as trash_only says) once no item is left in it.
        folders = [i for i in self._titled(path) if i.get("mimeType") == FOLDER_MIME]
        for folder in folders:
            inside = self.fs._gdrive_list(f"trashed=false and '{folder['id']}' in parents")
            if next(iter(inside), None) is not None:  # a lazy listing: its first item says
                return False
        for folder in folders:
            self._delete(folder["id"])
        # pydrive2 caches the ids of the folders it has seen: the next upload to this path
        # must make the folder again, not put files into the deleted one.
        _, base = self.fs.split_path(path)
        cache = self.fs._ids_cache
        for cached in [p for p in cache["dirs"] if p == base or p.startswith(f"{base}/")]:
            for item_id in cache["dirs"].pop(cached):
                cache["ids"].pop(item_id, None)
        return True

    def make_dirs(self, path: str) -> None:
        # Creates the folder chain now, so a bad folder id or a missing permission
        # fails before the first upload rather than in the middle of it.
        _, base = self.fs.split_path(path)
        self.fs._path_to_item_ids(base, create=True)

    # --- writing -------------------------------------------------------------------

    def upload(
        self, local_path: str, remote_path: str, entry: FileEntry, callback: Any = None
    ) -> None:
        if callback is not None:
            callback.set_size(entry.size)
        with open(local_path, "rb") as stream:  # streamed by googleapiclient, never buffered
            item = self.fs.upload_fobj(stream, remote_path, callback=callback)
        # A retried upload, or an earlier save of this name, leaves older files
        # with the same title: remove them so exactly this one remains.
        self._keep_only(remote_path, item["id"])

    def copy_within(self, source: str, target: str) -> bool:
        # pydrive2's cp_file reads the whole file into memory and leaves duplicate
        # titles behind: upload the staged copy again instead.
        return False

    def write_atomic(self, path: str, data: bytes) -> None:
        items = self._items(path)
        if len(items) == 1:
            # One file already: upload a new revision of it. Readers see the old
            # content or the new, never two files (the state file takes this path).
            item = self.fs.client.CreateFile({"id": items[0]["id"]})
            item.content = io.BytesIO(data)
            _gdrive_retry(item.Upload)()
            return
        item = self.fs.upload_fobj(io.BytesIO(data), path)
        self._keep_only(path, item["id"])

    # --- conditional writes (the lease) -------------------------------------------------

    def read_versioned(self, path: str) -> tuple[bytes, str] | None:
        items = self._items(path, fresh=True)
        while items:
            item = _first_created(items)  # its etag is listed before its bytes are read:
            try:  # a token older than the bytes only makes the next write_if fail
                return self._content(item), _token(item)
            except FileNotFoundError:  # deleted since the listing (a race's loser): again
                items = [i for i in self._items(path, fresh=True) if i["id"] != item["id"]]
        return None

    def write_if(self, path: str, data: bytes, expected: str | None) -> str:
        from pydrive2.files import ApiRequestError

        if expected is None:
            return self._create_settled(path, data)
        file_id, _, etag = expected.partition(" ")
        try:
            item = _gdrive_retry(self._update_if_match)(file_id, etag, data)
        except ApiRequestError as exc:
            if exc.error.get("code") not in (404, 412):  # gone, or changed since `expected`
                raise
            return self._refused(path, data)
        return _token(item)

    def _create_settled(self, path: str, data: bytes) -> str:
        if self._items(path, fresh=True):
            return self._refused(path, data)
        # Two processes may each create the folder too; fresh listings see both copies.
        mine = self.fs.upload_fobj(io.BytesIO(data), path)
        time.sleep(self.settle_seconds)
        rivals = {item["id"]: item for item in self._items(path, fresh=True)}
        rivals.setdefault(mine["id"], mine)  # listed or not yet, it is there
        if _first_created(rivals.values())["id"] == mine["id"]:
            return _token(mine)
        self._delete(mine["id"])
        return self._refused(path, data)  # a retried insert of ours may be the winner

    def _update_if_match(self, file_id: str, etag: str, data: bytes) -> dict[str, Any]:
        """files.update of the content, only if the file's etag is still ``etag``.

        Built here because pydrive2's ``Upload`` cannot send a header. One
        multipart request, so the precondition and the content arrive together.
        """
        from googleapiclient.errors import HttpError
        from googleapiclient.http import MediaIoBaseUpload
        from pydrive2.files import ApiRequestError

        auth = self.fs.client.auth
        if auth.service is None:
            auth.Authorize()
        media = MediaIoBaseUpload(io.BytesIO(data), "application/octet-stream", resumable=False)
        request = auth.service.files().update(
            fileId=file_id, body={}, media_body=media, supportsAllDrives=True
        )
        request.headers["If-Match"] = etag
        try:
            return request.execute(http=auth.Get_Http_Object())
        except HttpError as exc:  # as pydrive2 raises it, for its retry and for is_transient
            raise ApiRequestError(exc) from exc

    def _content(self, item: Any) -> bytes:
        from pydrive2.files import ApiRequestError

        try:
            _gdrive_retry(item.FetchContent)()
        except ApiRequestError as exc:
            if exc.error.get("code") == 404:
                raise FileNotFoundError(item["id"]) from None
            raise
        return item.content.getvalue()

    # --- reading -----------------------------------------------------------------------

    def _check(self, path: str, entry: FileEntry) -> Check:
        def found(problem: str | None, detail: str = "Drive MD5") -> Check:
            return Check(problem, SERVICE_CHECKSUM, detail)

        items = self._items(path)
        if not items:
            return found(f"{entry.name}: not found on Drive", "Drive listing")
        if len(items) > 1:
            return found(
                f"{entry.name}: {len(items)} files with this title in the folder "
                "(is another process writing to it?)",
                "Drive listing",
            )
        item = items[0]
        size = int(item.get("fileSize", -1))
        if size != entry.size:
            return found(
                f"{entry.name}: stored size {size} != manifest size {entry.size}", "stored size"
            )
        md5 = item.get("md5Checksum")
        if entry.md5 is None or not md5:
            why = "the manifest has no MD5" if entry.md5 is None else "Drive reports no MD5"
            return Check(self._verify_by_reading_back(path, entry), READ_BACK, why)
        if md5.lower() != entry.md5:
            return found(f"{entry.name}: Drive's md5Checksum {md5} != manifest md5 {entry.md5}")
        return found(None)

    def modified(self, path: str) -> float | None:
        # pydrive2's listings carry no time; Drive's own metadata does.
        items = self._items(path)
        if not items:
            raise FileNotFoundError(path)
        times = [t for t in (mtime_of(dict(item)) for item in items) if t is not None]
        return max(times) if times else None

    def download(
        self, remote_path: str, local_path: str, entry: FileEntry, callback: Any = None
    ) -> None:
        items = self._items(remote_path)
        if not items:
            raise FileNotFoundError(remote_path)
        # With duplicate titles, take the copy the manifest describes.
        chosen = next(
            (i for i in items if entry.md5 and i.get("md5Checksum") == entry.md5), items[0]
        )
        # pydrive2 reports each chunk's position to a callback (after asking Drive for the
        # file's size: one more request per file, so only when someone is watching).
        self.fs._gdrive_get_file(
            chosen["id"], local_path, callback=callback, block_size=DOWNLOAD_CHUNK
        )


def _check_start_folder(fs: Any, folder_id: str, shown_url: str) -> None:
    """Fail now, and say why, when the folder id at the start of the URL is not visible."""
    try:
        _ = fs._list_params  # pydrive2 looks the id up here (and whether it is a shared drive)
    except PermissionError:
        raise ConfigurationError(
            f"{shown_url!r}: Google Drive folder {folder_id!r} (the first part of the URL) was "
            "not found or this account cannot see it. Use the id from the folder's address "
            "(drive.google.com/drive/folders/<id>) and share the folder with the account "
            "(for a service account, with its client_email), or start the URL with root/ "
            "for My Drive."
        ) from None
    except Exception:  # network trouble: the first listing retries it and reports it
        pass


def _gdrive_retry(call: Any) -> Any:
    """pydrive2's own retry (rate-limit 403s and 5xx), as its filesystem applies it."""
    from pydrive2.fs.spec import _gdrive_retry as retry

    return retry(call)


def _http_status(exc: BaseException) -> tuple[int | None, str | None]:
    """HTTP status and Drive's error reason behind ``exc``, if an HTTP answer caused it.

    pydrive2 wraps googleapiclient's ``HttpError`` in ``ApiRequestError`` by
    parsing the body as JSON. A non-JSON body (an HTML 502/503 from a front end
    or proxy) makes that parse raise ``JSONDecodeError`` instead, with the
    ``HttpError`` as its context, so the whole chain is searched.
    """
    from googleapiclient.errors import HttpError
    from pydrive2.files import ApiRequestError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ApiRequestError) and isinstance(current.error, dict):
            code = current.error.get("code")
            if isinstance(code, int):
                errors = current.error.get("errors") or [{}]
                reason = errors[0].get("reason") if isinstance(errors[0], dict) else None
                return code, reason
        if isinstance(current, HttpError):
            status = getattr(current.resp, "status", None)
            return (int(status) if status is not None else None), None
        current = current.__cause__ or current.__context__
    return None, None
